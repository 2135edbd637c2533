//! `streamhub demo`: the seed article's tour of the gRPC patterns, against a
//! running server and with real data.

use std::time::Duration;

use tokio_stream::StreamExt;

use super::{
    Context,
    chat::print_message,
    status_error,
    telemetry::{print_alert, print_sample, simulated},
};
use crate::{
    chat::service::{MEMBER_KEY, ROOM_KEY},
    proto::{
        chat::{ChatMessage, MessageKind, chat_service_client::ChatServiceClient},
        fileupload::{FileChunk, file_upload_service_client::FileUploadServiceClient},
        streamhub::{ServerInfoRequest, server_service_client::ServerServiceClient},
        telemetry::{
            ListServicesRequest, MetricsPayload, MetricsRequest,
            telemetry_service_client::TelemetryServiceClient,
        },
    },
};

/// Arguments of `streamhub demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The server's own service name, whose real metrics the tour reads
    /// (default: found by asking the server: `streamhub`, or
    /// `streamhub@<node>` on a cluster node).
    #[arg(long)]
    pub self_name: Option<String>,
    /// How long to watch live metrics in the server-streaming step.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub subscribe_for: Duration,
    /// Payloads to send in the bidirectional step.
    #[arg(long, default_value_t = 20)]
    pub feed_ticks: u64,
    /// Milliseconds between those payloads.
    #[arg(long, default_value_t = 100)]
    pub tick_ms: u64,
    /// Size of the generated file uploaded in the client-streaming step.
    #[arg(long, default_value_t = 1_000_000)]
    pub upload_bytes: usize,
    /// Messages each of the two members sends in the chat step.
    #[arg(long, default_value_t = 3)]
    pub chat_lines: usize,
}

/// The seed's chunk size.
const DEMO_CHUNK: usize = 64 * 1024;

/// How long the tour waits for the server's own first sample (it reports
/// one a second by default).
const FIRST_SAMPLE: Duration = Duration::from_secs(5);

/// The name the server reports its own metrics under: `streamhub` when
/// that has reported, else `streamhub@<node>` with the node's name from
/// GetServerInfo (a cluster node), else `streamhub` (the step then says
/// what to do if nothing comes).
async fn own_name(channel: super::Channel) -> String {
    const PLAIN: &str = "streamhub";
    let listed = TelemetryServiceClient::new(channel.clone())
        .list_services(ListServicesRequest {})
        .await
        .map(|r| r.into_inner().services)
        .unwrap_or_default();
    if listed.iter().any(|s| s.service_name == PLAIN) {
        return PLAIN.to_owned();
    }
    match ServerServiceClient::new(channel)
        .get_server_info(ServerInfoRequest {})
        .await
    {
        Ok(info) if !info.get_ref().node.is_empty() => {
            let name = format!("{PLAIN}@{}", info.get_ref().node);
            if listed.iter().any(|s| s.service_name == name) {
                return name;
            }
            PLAIN.to_owned()
        }
        _ => PLAIN.to_owned(),
    }
}

fn step(ctx: &Context, title: &str) {
    // A blank line of the CLI's own before each step (a note's text is
    // made terminal-safe, which would show a `\n`).
    super::err_line("");
    ctx.note("step", &format!("== {title} =="));
}

/// Runs the tour.
pub async fn run(ctx: &Context, args: DemoArgs) -> anyhow::Result<()> {
    let channel = ctx.connect().await?;
    let mut client = TelemetryServiceClient::new(channel.clone());
    let self_name = match &args.self_name {
        Some(name) => name.clone(),
        None => own_name(channel.clone()).await,
    };

    step(
        ctx,
        "1. Unary: GetSnapshot of the server's own host metrics",
    );
    // The server samples itself every second; wait for the first sample if
    // it has just started.
    let request = MetricsRequest {
        service_name: self_name.clone(),
        interval_ms: 0,
    };
    let mut first = client
        .subscribe(request.clone())
        .await
        .map_err(status_error)?
        .into_inner();
    match tokio::time::timeout(FIRST_SAMPLE, first.next()).await {
        Ok(Some(Err(status))) => return Err(status_error(status)),
        Ok(_) => {}
        Err(_) => anyhow::bail!(
            "no metrics of {self_name:?} within {}s: the server reports its own under telemetry.self_name \
             (streamhub, or streamhub@<node> on a cluster node; 0s self_sample_interval turns it off); \
             give --self-name NAME (`streamhub services` lists the names)",
            FIRST_SAMPLE.as_secs()
        ),
    }
    drop(first);
    let snapshot = client
        .get_snapshot(request)
        .await
        .map_err(status_error)?
        .into_inner();
    print_sample(ctx, &snapshot);

    step(
        ctx,
        &format!(
            "2. Server streaming: Subscribe to {} for {:?} (one update a second, no polling)",
            self_name, args.subscribe_for
        ),
    );
    let mut updates = client
        .subscribe(MetricsRequest {
            service_name: self_name.clone(),
            interval_ms: 1000,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let watch = async {
        while let Some(update) = updates.next().await {
            print_sample(ctx, &update.map_err(status_error)?);
        }
        anyhow::Ok(())
    };
    if let Ok(result) = tokio::time::timeout(args.subscribe_for, watch).await {
        result?;
    }

    step(
        ctx,
        &format!(
            "3. Bidirectional: LiveFeed of {} synthetic payloads (CPU spike every tenth), alerts come back",
            args.feed_ticks
        ),
    );
    let ticks = args.feed_ticks;
    let interval = Duration::from_millis(args.tick_ms.max(1));
    let payloads = async_stream::stream! {
        let mut timer = tokio::time::interval(interval);
        for tick in 1..=ticks {
            timer.tick().await;
            let (cpu_usage, memory_mb) = simulated(tick);
            yield MetricsPayload {
                service_name: "demo-gateway".to_owned(),
                cpu_usage,
                memory_mb,
                timestamp_ms: 0,
                request_count: tick * 100,
            };
        }
    };
    let mut alerts = client
        .live_feed(payloads)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut count = 0;
    while let Some(alert) = alerts.next().await {
        print_alert(ctx, &alert.map_err(status_error)?);
        count += 1;
    }
    blank_line(ctx);
    ctx.note(
        "done",
        &format!("LiveFeed ended: {count} alerts for {ticks} payloads."),
    );

    step(
        ctx,
        &format!(
            "4. Client streaming: Upload a generated {} byte file in {} KiB chunks",
            args.upload_bytes,
            DEMO_CHUNK / 1024
        ),
    );
    upload_step(ctx, channel.clone(), args.upload_bytes).await?;
    chat_step(ctx, channel, args.chat_lines).await
}

/// The seed's upload: the whole file in chunks, the server acks at the end
/// with the stored file's SHA-256.
async fn upload_step(ctx: &Context, channel: super::Channel, size: usize) -> anyhow::Result<()> {
    use sha2::Digest as _;

    // Recognisable, not compressible: a simple xorshift sequence.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<u8> = (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect();
    let digest = sha2::Sha256::digest(&data).to_vec();
    let filename = "demo-upload.bin".to_owned();
    let total = data.len().div_ceil(DEMO_CHUNK).max(1);
    let chunks: Vec<FileChunk> = (0..total)
        .map(|i| {
            let start = i * DEMO_CHUNK;
            let end = (start + DEMO_CHUNK).min(data.len());
            FileChunk {
                filename: filename.clone(),
                data: data[start..end].to_vec(),
                chunk_index: u32::try_from(i).unwrap_or(u32::MAX),
                is_last: i + 1 == total,
                offset: None,
                sha256: if i + 1 == total {
                    digest.clone()
                } else {
                    Vec::new()
                },
            }
        })
        .collect();
    ctx.note(
        "uploading",
        &format!("Uploading {filename} in {total} chunks..."),
    );
    let response = FileUploadServiceClient::new(channel)
        .upload(tokio_stream::iter(chunks))
        .await
        .map_err(status_error)?
        .into_inner();
    ctx.emit(
        &serde_json::json!({
            "filename": response.filename,
            "total_bytes": response.total_bytes,
            "total_chunks": response.total_chunks,
            "success": response.success,
            "message": response.message,
            "sha256": hex::encode(&response.sha256),
        }),
        || {
            format!(
                "Upload complete: {} bytes in {} chunks — {} (sha256 {})",
                response.total_bytes,
                response.total_chunks,
                response.message,
                hex::encode(&response.sha256)
            )
        },
    );
    Ok(())
}

/// The chat seed: two members talking at once over one bidirectional call
/// each, both seeing one order.
async fn chat_step(ctx: &Context, channel: super::Channel, lines: usize) -> anyhow::Result<()> {
    let room = format!("demo-{}", std::process::id());
    step(
        ctx,
        &format!("5. Bidirectional: chat in room {room}, two members talking at once"),
    );
    let (ann, bob) = tokio::join!(
        chat_member(channel.clone(), &room, "ann", lines, 2 * lines),
        chat_member(channel, &room, "bob", lines, 2 * lines),
    );
    let (ann, bob) = (ann?, bob?);
    for message in &ann {
        print_message(ctx, &room, message);
    }
    let same = ann == bob;
    blank_line(ctx);
    ctx.note(
        "done",
        &format!(
            "Both members received the same {} messages in the same order: {same}.",
            ann.len()
        ),
    );
    anyhow::ensure!(same, "the two members saw different orders");
    Ok(())
}

/// One demo chat member: sends `lines` messages while reading, until it has
/// received `expect` members' messages (its own included).
async fn chat_member(
    channel: super::Channel,
    room: &str,
    name: &str,
    lines: usize,
    expect: usize,
) -> anyhow::Result<Vec<ChatMessage>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert(ROOM_KEY, room.parse()?);
    request.metadata_mut().insert(MEMBER_KEY, name.parse()?);
    let mut inbound = ChatServiceClient::new(channel)
        .chat(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let sender = name.to_owned();
    let talk = tokio::spawn(async move {
        for i in 1..=lines {
            let message = ChatMessage {
                sender: sender.clone(),
                message: format!("hello #{i} from {sender}"),
                idempotency_key: format!("{sender}-{i}"),
                ..ChatMessage::default()
            };
            if tx.send(message).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Keep the sending side open until the reading side is done.
        tx.closed().await;
    });
    let mut received = Vec::new();
    while received.len() < expect {
        match inbound.next().await {
            Some(Ok(message)) if message.kind == i32::from(MessageKind::KindMember) => {
                received.push(message);
            }
            Some(Ok(_)) => {}
            Some(Err(status)) => return Err(status_error(status)),
            None => anyhow::bail!("the server ended the chat early"),
        }
    }
    drop(inbound);
    talk.abort();
    Ok(received)
}

/// An empty line on stderr before a summary, in text mode (a note's text
/// passes through [`super::terminal_safe`], which shows a `\n` as such).
fn blank_line(ctx: &Context) {
    if !ctx.json {
        super::err_line("");
    }
}
