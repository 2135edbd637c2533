//! Scenario 4, chat: one room of `--members` members (default 1,000), of
//! which `--senders` (default 10) send at increasing aggregate rates,
//! durable storage included (each message is stored before it is
//! broadcast). Per rate: acknowledged messages per second (a sender's own
//! message coming back to it), deliveries per second (messages received by
//! all members), and send-to-receipt latency p50/p99; then the rate at
//! which p99 passes 50 ms.
//!
//! Each message's text carries its sender's index, its rate step and its
//! send time, so receivers time it without a clock shared across
//! processes: senders and receivers live in this process.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{
    StreamExt,
    stream::{self, BoxStream, SelectAll},
};
use hdrhistogram::Histogram;
use tokio::{sync::mpsc, task::JoinSet};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::{
    BenchError, Options, Target,
    harness::{
        Check, Metrics, Pinning, ProcReader, Row, ServerUnderTest, WireCounter, connect,
        cpu_delta_us, histogram, latency_metrics, ratio, record,
    },
};
use crate::proto::chat::{ChatMessage, chat_service_client::ChatServiceClient};

/// The room every member joins.
const ROOM: &str = "bench";

/// p99 latency above which a rate counts as past the knee.
const KNEE_US: f64 = 50_000.0;

/// Runs the scenario against every target.
pub async fn run(
    options: &Options,
    pinning: &Pinning,
) -> Result<(serde_json::Value, Vec<Row>, Vec<Check>), BenchError> {
    let mut rows = Vec::new();
    for &target in options.targets.iter().filter(|t| **t != Target::Nats) {
        // runs[step] holds one Metrics per repetition.
        let mut runs: Vec<Vec<Metrics>> = vec![Vec::new(); options.chat_rates.len()];
        let mut failure = None;
        for rep in 0..options.repetitions {
            tracing::info!(target = target.name(), rep, "chat ladder");
            match ladder(target, options, pinning).await {
                Ok(steps) => {
                    for (i, m) in steps.into_iter().enumerate() {
                        if let Some(slot) = runs.get_mut(i) {
                            slot.push(m);
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(target = target.name(), %err, "chat ladder failed");
                    failure = Some(err);
                    break;
                }
            }
        }
        let mut target_rows = Vec::new();
        for (i, &rate) in options.chat_rates.iter().enumerate() {
            let config = [("rate", rate.to_string())];
            let step_runs = std::mem::take(&mut runs[i]);
            target_rows.push(match (&failure, step_runs.is_empty()) {
                (Some(err), true) => Row::failed(target.name(), &config, err),
                (None, true) => Row::failed(
                    target.name(),
                    &config,
                    &BenchError::Setup("not reached: an earlier rate saturated".into()),
                ),
                (_, false) => Row::new(target.name(), &config, step_runs),
            });
        }
        rows.push(knee_row(target.name(), &target_rows));
        rows.extend(target_rows);
    }
    let best = |target: &str| {
        rows.iter()
            .find(|r| r.target == target && r.is("rate", "summary"))
            .and_then(|r| r.get("best_deliveries_per_s_p99_under_50ms"))
    };
    let mut checks = vec![Check::at_least(
        format!(
            "deliveries/s in the {}-member room with p99 under 50 ms",
            options.members
        ),
        best("streamhub"),
        100_000.0,
    )];
    for peer in ["python", "node"] {
        if rows.iter().any(|r| r.target == peer) {
            checks.push(Check::at_least(
                format!("deliveries/s under 50 ms p99, streamhub / {peer} (ahead of the peer)"),
                ratio(best("streamhub"), best(peer)),
                1.0,
            ));
        }
    }
    let settings = serde_json::json!({
        "members": options.members,
        "senders": options.senders,
        "rates_msgs_per_s": options.chat_rates,
        "step_seconds": options.step_seconds,
        "members_per_connection": options.chat_per_connection,
        "repetitions": options.repetitions,
        "data_dir": "on disk (system temp folder)",
    });
    Ok((settings, rows, checks))
}

/// A row summing up a target's ladder: the best deliveries per second with
/// p99 under 50 ms, and the first rate whose p99 passed 50 ms.
fn knee_row(target: &str, rows: &[Row]) -> Row {
    let mut m = Metrics::new();
    let mut best: Option<f64> = None;
    for row in rows {
        let (Some(p99), Some(deliveries)) =
            (row.get("latency_p99_us"), row.get("deliveries_per_s"))
        else {
            continue;
        };
        let rate: f64 = row
            .config
            .get("rate")
            .and_then(|r| r.parse().ok())
            .unwrap_or(f64::NAN);
        if p99 <= KNEE_US {
            best = Some(best.map_or(deliveries, |b: f64| b.max(deliveries)));
        } else if !m.contains_key("knee_rate_msgs_per_s") {
            m.insert("knee_rate_msgs_per_s".into(), rate);
        }
    }
    if let Some(best) = best {
        m.insert("best_deliveries_per_s_p99_under_50ms".into(), best);
    }
    Row::new(target, &[("rate", "summary".to_owned())], vec![m])
}

/// What the member tasks share.
struct Shared {
    base: Instant,
    /// Members in the room.
    members: usize,
    /// Messages received by members, per step.
    deliveries: Vec<AtomicU64>,
    /// Senders' own messages received back, per step.
    acks: Vec<AtomicU64>,
    /// Member calls that ended early (cut off as too slow, or failed).
    errors: AtomicU64,
    /// Send-to-receipt latency per step, merged from the member tasks.
    latency: Mutex<Vec<Histogram<u64>>>,
}

/// Runs one ladder of rates on a fresh server; stops after the first rate
/// that saturates (members cut off, or under half the deliveries made).
pub(crate) async fn ladder(
    target: Target,
    options: &Options,
    pinning: &Pinning,
) -> Result<Vec<Metrics>, BenchError> {
    let server = ServerUnderTest::start(target, options, pinning).await?;
    let result = ladder_on(&server, options).await;
    server.stop().await;
    result
}

async fn ladder_on(
    server: &ServerUnderTest,
    options: &Options,
) -> Result<Vec<Metrics>, BenchError> {
    ladder_on_addrs(&[server.addr], server.proc().await, options).await
}

/// One ladder with the members' connections spread over `addrs` in turn
/// (the nodes of a cluster; the senders are on the first); `proc` reads
/// the server side's CPU.
pub(crate) async fn ladder_on_addrs(
    addrs: &[SocketAddr],
    proc: Option<ProcReader>,
    options: &Options,
) -> Result<Vec<Metrics>, BenchError> {
    if addrs.is_empty() {
        return Err(BenchError::Setup("no server to measure".into()));
    }
    let steps = options.chat_rates.len();
    let members = options.members.max(options.senders).max(1);
    let shared = Arc::new(Shared {
        base: Instant::now(),
        members,
        deliveries: (0..steps).map(|_| AtomicU64::new(0)).collect(),
        acks: (0..steps).map(|_| AtomicU64::new(0)).collect(),
        errors: AtomicU64::new(0),
        latency: Mutex::new((0..steps).map(|_| histogram()).collect()),
    });
    let stop = CancellationToken::new();
    let per = options.chat_per_connection.max(1);
    let groups: Vec<(usize, usize)> = (0..members.div_ceil(per))
        .map(|g| (g * per, per.min(members - g * per)))
        .collect();

    let mut tasks = JoinSet::new();
    let mut senders: Vec<mpsc::Sender<ChatMessage>> = Vec::new();
    // Receive-only members' sending halves, held open: a member that
    // half-closes leaves the room.
    let mut listeners: Vec<mpsc::Sender<ChatMessage>> = Vec::new();
    let joined = tokio::time::timeout(Duration::from_secs(options.setup_timeout), async {
        for (g, (first, count)) in groups.into_iter().enumerate() {
            let (streams, halves) = join_group(addrs[g % addrs.len()], first, count).await?;
            for (index, tx) in halves {
                if index < options.senders {
                    senders.push(tx);
                } else {
                    listeners.push(tx);
                }
            }
            tasks.spawn(drive(streams, Arc::clone(&shared), stop.clone()));
        }
        Ok::<_, BenchError>(())
    })
    .await;
    let outcome = match joined {
        Err(_) => Err(BenchError::Timeout(format!("{members} members joining"))),
        Ok(Err(err)) => Err(err),
        Ok(Ok(())) => run_steps(&senders, &shared, proc.as_ref(), options).await,
    };
    stop.cancel();
    drop(senders);
    drop(listeners);
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .is_err()
    {
        tasks.abort_all();
    }
    // The member tasks merged their latency histograms as they ended.
    let mut steps = outcome?;
    let hists = shared
        .latency
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (m, h) in steps.iter_mut().zip(hists.iter()) {
        m.extend(latency_metrics("latency", h));
    }
    Ok(steps)
}

/// Joins `count` members (global indexes from `first`) on one connection;
/// returns their receiving streams and their sending halves (by index).
async fn join_group(
    addr: SocketAddr,
    first: usize,
    count: usize,
) -> Result<
    (
        Vec<BoxStream<'static, (usize, Option<ChatMessage>)>>,
        Vec<(usize, mpsc::Sender<ChatMessage>)>,
    ),
    BenchError,
> {
    let channel = connect(addr, &WireCounter::default()).await?;
    let client = ChatServiceClient::new(channel);
    let joined: Vec<Result<_, BenchError>> = stream::iter(first..first + count)
        .map(|index| {
            let mut client = client.clone();
            async move {
                let (tx, rx) = mpsc::channel::<ChatMessage>(256);
                let mut request = tonic::Request::new(ReceiverStream::new(rx));
                request.metadata_mut().insert(
                    "chat-room",
                    tonic::metadata::MetadataValue::from_static(ROOM),
                );
                let inbound = client.chat(request).await?.into_inner();
                let stream = inbound
                    .map(move |m| (index, m.ok()))
                    .chain(stream::once(async move { (index, None) }))
                    .boxed();
                Ok((index, stream, tx))
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let mut streams = Vec::with_capacity(count);
    let mut halves = Vec::with_capacity(count);
    for item in joined {
        let (index, stream, tx) = item?;
        streams.push(stream);
        halves.push((index, tx));
    }
    halves.sort_by_key(|(i, _)| *i);
    Ok((streams, halves))
}

/// `k{sender}:{step}:{ns since base}`.
fn text(sender: usize, step: usize, ns: u64) -> String {
    format!("k{sender}:{step}:{ns}")
}

fn parse(text: &str) -> Option<(usize, usize, u64)> {
    let mut parts = text.strip_prefix('k')?.split(':');
    let sender = parts.next()?.parse().ok()?;
    let step = parts.next()?.parse().ok()?;
    let ns = parts.next()?.parse().ok()?;
    Some((sender, step, ns))
}

/// Receives for one group of members until `stop`.
async fn drive(
    streams: Vec<BoxStream<'static, (usize, Option<ChatMessage>)>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let steps = shared.deliveries.len();
    let mut local: Vec<Histogram<u64>> = (0..steps).map(|_| histogram()).collect();
    let mut all: SelectAll<_> = streams.into_iter().collect();
    loop {
        let item = tokio::select! {
            () = stop.cancelled() => break,
            item = all.next() => item,
        };
        let Some((member, message)) = item else { break };
        let Some(message) = message else {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let Some((sender, step, ns)) = parse(&message.message) else {
            continue;
        };
        if step >= steps {
            continue;
        }
        shared.deliveries[step].fetch_add(1, Ordering::Relaxed);
        if sender == member {
            shared.acks[step].fetch_add(1, Ordering::Relaxed);
        }
        let sent = Duration::from_nanos(ns);
        record(&mut local[step], shared.base.elapsed().saturating_sub(sent));
    }
    let mut merged = shared
        .latency
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (into, from) in merged.iter_mut().zip(&local) {
        let _ = into.add(from);
    }
}

async fn run_steps(
    senders: &[mpsc::Sender<ChatMessage>],
    shared: &Arc<Shared>,
    proc: Option<&ProcReader>,
    options: &Options,
) -> Result<Vec<Metrics>, BenchError> {
    let mut results = Vec::new();
    let step_len = Duration::from_secs_f64(options.step_seconds);
    for (step, &rate) in options.chat_rates.iter().enumerate() {
        let errors_before = shared.errors.load(Ordering::Relaxed);
        let cpu_before = proc.map(ProcReader::read).transpose()?;
        let started = Instant::now();
        // Open loop: each sender sends at rate / senders per second, on a
        // schedule; a sender that falls behind sends at once (no burst
        // bigger than its channel).
        let per_sender = (rate as f64 / senders.len().max(1) as f64).max(0.001);
        let period = Duration::from_secs_f64(1.0 / per_sender);
        let count = (per_sender * step_len.as_secs_f64()).ceil() as u64;
        let mut sends = JoinSet::new();
        for (i, tx) in senders.iter().enumerate() {
            let tx = tx.clone();
            let base = shared.base;
            let offset = period.mul_f64(i as f64 / senders.len().max(1) as f64);
            // With --secure every member is the token's identity, and the
            // server refuses a sender naming anyone else: leave it empty
            // (the server fills it in; the text names the sender anyway).
            let secure = options.secure;
            sends.spawn(async move {
                let start = tokio::time::Instant::now() + offset;
                for n in 0..count {
                    tokio::time::sleep_until(start + period.mul_f64(n as f64)).await;
                    let ns = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    let message = ChatMessage {
                        sender: if secure {
                            String::new()
                        } else {
                            format!("bench-{i}")
                        },
                        message: text(i, step, ns),
                        ..ChatMessage::default()
                    };
                    if tx.send(message).await.is_err() {
                        break;
                    }
                }
            });
        }
        while sends.join_next().await.is_some() {}
        let sending = started.elapsed().as_secs_f64();
        // Let the last messages arrive before reading the counters.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let elapsed = started.elapsed().as_secs_f64();
        let cpu_after = proc.map(ProcReader::read).transpose()?;
        let deliveries = shared.deliveries[step].load(Ordering::Relaxed) as f64;
        let acks = shared.acks[step].load(Ordering::Relaxed) as f64;
        let errors = shared.errors.load(Ordering::Relaxed) - errors_before;
        let sent = (count * senders.len() as u64) as f64;
        let expected = sent * shared.members as f64;
        let mut m = Metrics::new();
        m.insert("offered_msgs_per_s".into(), rate as f64);
        m.insert("sent".into(), sent);
        m.insert("delivered_fraction".into(), deliveries / expected.max(1.0));
        m.insert("acked_per_s".into(), acks / sending);
        m.insert("deliveries_per_s".into(), deliveries / sending);
        m.insert("deliveries".into(), deliveries);
        m.insert("members_cut_off".into(), errors as f64);
        m.insert("step_s".into(), elapsed);
        if let (Some(b), Some(a)) = (cpu_before, cpu_after) {
            m.insert(
                "server_cpu_pct".into(),
                cpu_delta_us(&b, &a) / 1e4 / elapsed,
            );
        }
        // Past saturation: members cut off, or under half the deliveries
        // arrived within half a second of the last send.
        let saturated = errors > 0 || deliveries < expected / 2.0;
        results.push(m);
        if saturated {
            break;
        }
    }
    Ok(results)
}
