//! Telemetry subcommands: `snapshot`, `services`, `subscribe`, `feed`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

use super::{
    Backoff, Context, format_ms, is_transient, out, status_error, status_text, terminal_safe,
};
use crate::{
    proto::telemetry::{
        AlertResponse, ListServicesRequest, MetricsPayload, MetricsRequest, MetricsResponse,
        telemetry_service_client::TelemetryServiceClient,
    },
    telemetry::host::HostSampler,
};

/// A sample as the CLI prints it.
#[derive(Debug, Serialize)]
pub struct SampleView<'a> {
    /// Service name.
    pub service: &'a str,
    /// CPU %.
    pub cpu_usage: f64,
    /// Memory MB.
    pub memory_mb: f64,
    /// Request count.
    pub request_count: u64,
    /// Unix ms.
    pub timestamp_ms: u64,
}

impl<'a> From<&'a MetricsResponse> for SampleView<'a> {
    fn from(m: &'a MetricsResponse) -> Self {
        Self {
            service: &m.service_name,
            cpu_usage: m.cpu_usage,
            memory_mb: m.memory_mb,
            request_count: m.request_count,
            timestamp_ms: m.timestamp_ms,
        }
    }
}

/// Prints one sample.
pub fn print_sample(ctx: &Context, m: &MetricsResponse) {
    ctx.emit(&SampleView::from(m), || {
        format!(
            "[{}] {:<20} CPU {:>5.1}%  memory {:>8.0} MB  requests {}",
            format_ms(m.timestamp_ms),
            terminal_safe(&m.service_name),
            m.cpu_usage,
            m.memory_mb,
            m.request_count
        )
    });
}

/// Prints one alert.
pub fn print_alert(ctx: &Context, a: &AlertResponse) {
    #[derive(Serialize)]
    struct AlertView<'a> {
        alert_type: &'a str,
        message: &'a str,
        value: f64,
        timestamp_ms: u64,
    }
    ctx.emit(
        &AlertView {
            alert_type: &a.alert_type,
            message: &a.message,
            value: a.value,
            timestamp_ms: a.timestamp_ms,
        },
        || {
            format!(
                "[ALERT] {:<20} {}",
                terminal_safe(&a.alert_type),
                terminal_safe(&a.message)
            )
        },
    );
}

/// Arguments of `streamhub snapshot`.
#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    /// Service whose latest sample to show.
    pub name: String,
}

/// `streamhub snapshot NAME`.
pub async fn snapshot(ctx: &Context, args: SnapshotArgs) -> anyhow::Result<()> {
    let request = MetricsRequest {
        service_name: args.name,
        interval_ms: 0,
    };
    let sample = ctx
        .call(|channel| {
            let request = request.clone();
            async move {
                TelemetryServiceClient::new(channel)
                    .get_snapshot(request)
                    .await
            }
        })
        .await?
        .into_inner();
    print_sample(ctx, &sample);
    Ok(())
}

/// `streamhub services`: every known service with its latest sample.
pub async fn services(ctx: &Context) -> anyhow::Result<()> {
    let list = ctx
        .call(|channel| async move {
            TelemetryServiceClient::new(channel)
                .list_services(ListServicesRequest {})
                .await
        })
        .await?
        .into_inner();
    if list.services.is_empty() && !ctx.json {
        out(&super::token::empty_list_text(
            ctx,
            crate::auth::Resource::Telemetry,
            "services",
            "no services have reported yet",
        )
        .await);
    }
    for entry in &list.services {
        match &entry.latest {
            Some(sample) => print_sample(ctx, sample),
            None => ctx.emit(
                &serde_json::json!({ "service": entry.service_name, "awaiting_first_sample": true }),
                || {
                    format!(
                        "{:<20} (awaited by subscribers, no sample yet)",
                        terminal_safe(&entry.service_name)
                    )
                },
            ),
        }
    }
    Ok(())
}

/// Arguments of `streamhub subscribe`.
#[derive(Debug, clap::Args)]
pub struct SubscribeArgs {
    /// Service to watch; it need not have reported yet.
    pub name: String,
    /// At most one update per this many milliseconds (0: server default).
    #[arg(long, default_value_t = 1000, env = "STREAMHUB_INTERVAL_MS")]
    pub interval_ms: u32,
    /// Stop after this many samples (default: until Ctrl-C).
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this long, e.g. `10s` (default: until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
}

/// `streamhub subscribe NAME`: prints samples until Ctrl-C (see
/// `main.rs`), reconnecting with backoff when the server goes away.
pub async fn subscribe(ctx: &Context, args: SubscribeArgs) -> anyhow::Result<()> {
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let until_deadline = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        result = subscribe_loop(ctx, &args) => result,
        () = until_deadline => Ok(()),
    }
}

async fn subscribe_loop(ctx: &Context, args: &SubscribeArgs) -> anyhow::Result<()> {
    let mut received = 0u64;
    let mut told_waiting = false;
    let mut backoff = Backoff::new(Duration::from_secs(10));
    loop {
        let lost =
            match subscribe_once(ctx, args, &mut received, &mut backoff, &mut told_waiting).await {
                Ok(()) => return Ok(()),
                Err(lost) => lost,
            };
        // The server the attempt used (connecting may have failed over).
        let server = ctx.current_server().to_owned();
        // A URL whose scheme the port does not speak never gets better.
        ctx.check_scheme().await?;
        ctx.note("reconnecting", &retry_text(lost, &server, backoff.delay())?);
        backoff.wait().await;
    }
}

enum Lost {
    /// The connection to `server` broke, or it ended the call.
    Transient {
        server: String,
        why: String,
    },
    /// No connection could be made (the server may never have answered).
    Unreachable(String),
    Fatal(anyhow::Error),
}

/// What to say before waiting `delay` to try again after `lost` (`server`:
/// the URL tried, for a connection that could not be made)
/// (a fatal failure is returned as the error instead).
fn retry_text(lost: Lost, server: &str, delay: Duration) -> anyhow::Result<String> {
    let delay = delay.as_secs_f64();
    match lost {
        Lost::Fatal(err) => Err(err),
        Lost::Transient { server, why } => Ok(format!(
            "connection to {server} lost ({why}); reconnecting in {delay:.1}s"
        )),
        Lost::Unreachable(why) => {
            let prefix = format!("cannot connect to {server}: ");
            let why = why.strip_prefix(&prefix).unwrap_or(&why);
            Ok(format!(
                "cannot connect to {server} ({why}); trying again in {delay:.1}s"
            ))
        }
    }
}

/// A call that ended with a status worth retrying: an UNAVAILABLE node is
/// left for the next server URL.
fn transient(ctx: &Context, status: &tonic::Status) -> Lost {
    // Named before noting the failure, which may move on to the next
    // server URL.
    let server = ctx.current_server().to_owned();
    ctx.note_failure(status);
    Lost::Transient {
        server,
        why: status_text(status),
    }
}

/// A connection that could not be made: fatal if it never can be (a
/// permanent failure, see `is_permanent`), else worth another try.
fn unreachable(err: anyhow::Error) -> Lost {
    if super::is_permanent(&err) {
        Lost::Fatal(err)
    } else {
        Lost::Unreachable(format!("{err:#}"))
    }
}

async fn subscribe_once(
    ctx: &Context,
    args: &SubscribeArgs,
    received: &mut u64,
    backoff: &mut Backoff,
    told_waiting: &mut bool,
) -> Result<(), Lost> {
    let channel = ctx.connect().await.map_err(unreachable)?;
    let mut client = TelemetryServiceClient::new(channel);
    let request = MetricsRequest {
        service_name: args.name.clone(),
        interval_ms: args.interval_ms,
    };
    let mut stream = match client.subscribe(request).await {
        Ok(response) => response.into_inner(),
        Err(status) if is_transient(&status) => return Err(transient(ctx, &status)),
        Err(status) => return Err(Lost::Fatal(status_error(status))),
    };
    if *received > 0 {
        ctx.note(
            "reconnected",
            &format!("reconnected to {}", ctx.current_server()),
        );
    } else if !*told_waiting {
        // A name that has not reported (a typo among them) would otherwise
        // look like a hung command: say what it waits for.
        *told_waiting = true;
        let snapshot = client
            .get_snapshot(MetricsRequest {
                service_name: args.name.clone(),
                interval_ms: 0,
            })
            .await;
        if snapshot.is_err_and(|status| status.code() == tonic::Code::NotFound) {
            ctx.note(
                "waiting",
                &format!(
                    "{:?} has not reported yet (or is not visible to you); waiting for its \
                     first sample (`streamhub services` lists the known ones)",
                    args.name
                ),
            );
        }
    }
    loop {
        match stream.next().await {
            Some(Ok(sample)) => {
                backoff.reset();
                print_sample(ctx, &sample);
                *received += 1;
                if args.count.is_some_and(|n| *received >= n) {
                    return Ok(());
                }
            }
            Some(Err(status)) if is_transient(&status) => return Err(transient(ctx, &status)),
            Some(Err(status)) => return Err(Lost::Fatal(status_error(status))),
            None => {
                return Err(Lost::Transient {
                    server: ctx.current_server().to_owned(),
                    why: "the server ended the stream".into(),
                });
            }
        }
    }
}

/// Arguments of `streamhub feed`.
#[derive(Debug, clap::Args)]
pub struct FeedArgs {
    /// Name to report under (default: this machine's host name).
    #[arg(long, env = "STREAMHUB_SERVICE")]
    pub service: Option<String>,
    /// Milliseconds between payloads.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// Send the seed's synthetic pattern (a CPU spike every tenth tick)
    /// instead of this machine's real metrics.
    #[arg(long)]
    pub simulate: bool,
    /// Stop after this many payloads (default: until Ctrl-C).
    #[arg(long)]
    pub count: Option<u64>,
}

/// The seed's synthetic metrics for tick `tick` (1-based): CPU 95% every
/// tenth tick, 45-49% otherwise; memory growing 10 MB a tick from 2 GB.
pub fn simulated(tick: u64) -> (f64, f64) {
    #[allow(clippy::cast_precision_loss)] // tick counts stay far below 2^52
    let cpu = if tick.is_multiple_of(10) {
        95.0
    } else {
        45.0 + (tick % 5) as f64
    };
    #[allow(clippy::cast_precision_loss)]
    let memory = 2048.0 + tick as f64 * 10.0;
    (cpu, memory)
}

/// `streamhub feed`: streams metrics through LiveFeed and prints alerts
/// until `--count` payloads are sent or Ctrl-C (see `main.rs`),
/// reconnecting with backoff when the server goes away, as `subscribe`
/// does. `--count` counts payloads across reconnects.
pub async fn feed(ctx: &Context, args: FeedArgs) -> anyhow::Result<()> {
    let service = match args.service.clone() {
        Some(name) => name,
        None => sysinfo::System::host_name().unwrap_or_else(|| "localhost".to_owned()),
    };
    let ticks = Arc::new(AtomicU64::new(0));
    let mut backoff = Backoff::new(Duration::from_secs(10));
    let mut connected_before = false;
    loop {
        let lost = match feed_once(ctx, &args, &service, &ticks, &mut connected_before).await {
            Ok(()) => return Ok(()),
            Err(lost) => lost,
        };
        // The server the attempt used (connecting may have failed over).
        let server = ctx.current_server().to_owned();
        // A URL whose scheme the port does not speak never gets better.
        ctx.check_scheme().await?;
        ctx.note("reconnecting", &retry_text(lost, &server, backoff.delay())?);
        backoff.wait().await;
    }
}

/// One LiveFeed call: payloads from the shared tick counter on, alerts
/// printed, until the call ends.
async fn feed_once(
    ctx: &Context,
    args: &FeedArgs,
    service: &str,
    ticks: &Arc<AtomicU64>,
    connected_before: &mut bool,
) -> Result<(), Lost> {
    let channel = ctx.connect().await.map_err(unreachable)?;
    let mut client = TelemetryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel::<MetricsPayload>(16);
    let producer = tokio::spawn(produce(
        service.to_owned(),
        args.simulate,
        args.interval_ms,
        args.count,
        Arc::clone(ticks),
        tx,
    ));
    // The producer stops when the call's request stream is dropped.
    let _producer = AbortOnDrop(producer);
    let mut alerts = match client.live_feed(ReceiverStream::new(rx)).await {
        Ok(response) => response.into_inner(),
        Err(status) if is_transient(&status) => return Err(transient(ctx, &status)),
        Err(status) => return Err(Lost::Fatal(status_error(status))),
    };
    if *connected_before {
        ctx.note(
            "reconnected",
            &format!("reconnected to {}", ctx.current_server()),
        );
    } else {
        ctx.note(
            "feeding",
            &format!("streaming metrics of {service}; alerts follow"),
        );
    }
    *connected_before = true;
    loop {
        match alerts.next().await {
            Some(Ok(alert)) => print_alert(ctx, &alert),
            Some(Err(status)) if is_transient(&status) => return Err(transient(ctx, &status)),
            Some(Err(status)) => return Err(Lost::Fatal(status_error(status))),
            // The server ends the call once the producer has sent
            // `--count` payloads and half-closed.
            None => return Ok(()),
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends payloads every `interval_ms`, numbering them from the shared
/// `ticks` (so a reconnect goes on where the last call stopped), until
/// `count` have been sent or the call goes away.
async fn produce(
    service: String,
    simulate: bool,
    interval_ms: u64,
    count: Option<u64>,
    ticks: Arc<AtomicU64>,
    tx: mpsc::Sender<MetricsPayload>,
) {
    let mut sampler = (!simulate).then(HostSampler::new);
    let mut interval = tokio::time::interval(Duration::from_millis(interval_ms.max(1)));
    while count.is_none_or(|n| ticks.load(Ordering::Relaxed) < n) {
        interval.tick().await;
        let tick = ticks.load(Ordering::Relaxed) + 1;
        let (cpu_usage, memory_mb) = match sampler.as_mut() {
            Some(sampler) => sampler.sample(),
            None => simulated(tick),
        };
        let payload = MetricsPayload {
            service_name: service.clone(),
            cpu_usage,
            memory_mb,
            timestamp_ms: 0,
            request_count: tick,
        };
        if tx.send(payload).await.is_err() {
            return;
        }
        ticks.store(tick, Ordering::Relaxed);
    }
    // Dropping the sender half-closes the call; the server then ends it.
}
