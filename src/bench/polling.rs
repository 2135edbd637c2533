//! Scenario 1, the seed's claim: a thousand clients polling GetSnapshot
//! every second against a thousand clients each holding one Subscribe.
//!
//! One service reports through LiveFeed every `report_ms` (and every
//! `quiet_report_ms` in the quiet variant). Each client has its own
//! connection. After a warm-up, the server's CPU time and the bytes on the
//! clients' connections are read over a measured window and divided by the
//! updates the clients actually received: a poll that returns the sample it
//! already had is not an update.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::harness::BenchChannel as Channel;
use futures::{StreamExt, TryStreamExt, stream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{
    BenchError, Options, Target,
    harness::{
        BENCH_SERVICE, Check, Metrics, Pinning, ProcReader, Publisher, Row, ServerUnderTest,
        WireCounter, connect, cpu_delta_us, ratio, repeat,
    },
};
use crate::proto::telemetry::{MetricsRequest, telemetry_service_client::TelemetryServiceClient};

/// How the clients get their updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// GetSnapshot every `poll_ms`.
    Polling,
    /// One Subscribe at `poll_ms`.
    Streaming,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Polling => "polling",
            Self::Streaming => "streaming",
        }
    }
}

/// One variant: how often the service reports and how long to measure.
#[derive(Debug, Clone, Copy)]
struct Variant {
    name: &'static str,
    report: Duration,
    window: Duration,
}

/// Runs the scenario against every target.
pub async fn run(
    options: &Options,
    pinning: &Pinning,
) -> Result<(serde_json::Value, Vec<Row>, Vec<Check>), BenchError> {
    let variants = [
        Variant {
            name: "normal",
            report: Duration::from_millis(options.report_ms),
            window: Duration::from_secs_f64(options.duration),
        },
        Variant {
            name: "quiet",
            report: Duration::from_millis(options.quiet_report_ms),
            window: Duration::from_secs_f64(options.quiet_duration),
        },
    ];
    let mut rows = Vec::new();
    for &target in options.targets.iter().filter(|t| **t != Target::Nats) {
        let server = match ServerUnderTest::start(target, options, pinning).await {
            Ok(server) => server,
            Err(err) => {
                for variant in &variants {
                    for mode in [Mode::Polling, Mode::Streaming] {
                        rows.push(Row::failed(target.name(), &config(variant, mode), &err));
                    }
                }
                continue;
            }
        };
        let proc = server.proc().await;
        for variant in &variants {
            for mode in [Mode::Polling, Mode::Streaming] {
                let runs = repeat(options.repetitions, |rep| {
                    tracing::info!(
                        target = target.name(),
                        variant = variant.name,
                        mode = mode.name(),
                        rep,
                        "polling run"
                    );
                    run_once(server.addr, proc.as_ref(), mode, *variant, options)
                })
                .await;
                rows.push(Row::of(target.name(), &config(variant, mode), runs));
            }
        }
        server.stop().await;
    }
    let checks = checks(&rows);
    let settings = serde_json::json!({
        "clients": options.clients,
        "poll_ms": options.poll_ms,
        "report_ms": options.report_ms,
        "quiet_report_ms": options.quiet_report_ms,
        "window_s": options.duration,
        "quiet_window_s": options.quiet_duration,
        "warmup_s": options.warmup,
        "repetitions": options.repetitions,
        "connections": "one per client",
    });
    Ok((settings, rows, checks))
}

fn config(variant: &Variant, mode: Mode) -> [(&'static str, String); 2] {
    [
        ("variant", variant.name.to_owned()),
        ("mode", mode.name().to_owned()),
    ]
}

fn find<'a>(rows: &'a [Row], target: &str, variant: &str, mode: &str) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.target == target && r.is("variant", variant) && r.is("mode", mode))
}

fn metric(rows: &[Row], target: &str, variant: &str, mode: &str, key: &str) -> Option<f64> {
    find(rows, target, variant, mode).and_then(|r| r.get(key))
}

fn checks(rows: &[Row]) -> Vec<Check> {
    let sh = "streamhub";
    let cpu = |t: &str, v: &str, m: &str| metric(rows, t, v, m, "cpu_us_per_update");
    let bytes = |t: &str, v: &str, m: &str| metric(rows, t, v, m, "bytes_per_update");
    let mut checks = vec![
        Check::at_least(
            "normal: polling CPU per update / streaming CPU per update",
            ratio(cpu(sh, "normal", "polling"), cpu(sh, "normal", "streaming")),
            5.0,
        ),
        Check::at_least(
            "normal: polling bytes per update / streaming bytes per update",
            ratio(
                bytes(sh, "normal", "polling"),
                bytes(sh, "normal", "streaming"),
            ),
            3.0,
        ),
        Check::at_least(
            "quiet: polling CPU per update / streaming CPU per update",
            ratio(cpu(sh, "quiet", "polling"), cpu(sh, "quiet", "streaming")),
            10.0,
        ),
    ];
    for peer in ["python", "node"] {
        for variant in ["normal", "quiet"] {
            if find(rows, peer, variant, "streaming").is_some() {
                checks.push(Check::at_least(
                    format!(
                        "{variant}: {peer} streaming CPU per update / streamhub's (ahead of the peer)"
                    ),
                    ratio(
                        cpu(peer, variant, "streaming"),
                        cpu(sh, variant, "streaming"),
                    ),
                    1.0,
                ));
            }
        }
    }
    checks
}

/// Counters the clients share.
#[derive(Debug, Default)]
struct Counts {
    updates: AtomicU64,
    calls: AtomicU64,
    errors: AtomicU64,
}

async fn run_once(
    addr: std::net::SocketAddr,
    proc: Option<&ProcReader>,
    mode: Mode,
    variant: Variant,
    options: &Options,
) -> Result<Metrics, BenchError> {
    let wire = WireCounter::default();
    let channels: Vec<Channel> = stream::iter(0..options.clients)
        .map(|_| connect(addr, &wire))
        .buffer_unordered(64)
        .try_collect()
        .await?;

    // The publisher's own connection is not counted: it is the same in
    // both modes.
    let publisher_channel = connect(addr, &WireCounter::default()).await?;
    let publisher = Publisher::open(publisher_channel.clone());
    publisher.publish(1).await?;
    wait_for_first_sample(publisher_channel).await?;

    let stop = CancellationToken::new();
    let counts = Arc::new(Counts::default());
    let poll = Duration::from_millis(options.poll_ms.max(1));
    let total = Duration::from_secs_f64(options.warmup) + variant.window;
    let mut tasks = JoinSet::new();

    // The reporting service: one sample per report period, bounded by the
    // run's length.
    {
        let stop = stop.clone();
        let report = variant.report;
        let max_samples = (total.as_secs_f64() / report.as_secs_f64()).ceil() as u64 + 10;
        tasks.spawn(async move {
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + report, report);
            for seq in 2..2 + max_samples {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = ticker.tick() => {}
                }
                if publisher.publish(seq).await.is_err() {
                    break;
                }
            }
            publisher.close().await;
        });
    }

    let clients = channels.len().max(1) as u32;
    for (i, channel) in channels.into_iter().enumerate() {
        let stop = stop.clone();
        let counts = Arc::clone(&counts);
        // Spread the pollers evenly over one period, as real clients would
        // be.
        let offset = poll * u32::try_from(i).unwrap_or(0) / clients;
        match mode {
            Mode::Polling => {
                tasks.spawn(poller(channel, poll, offset, stop, counts));
            }
            Mode::Streaming => {
                tasks.spawn(streamer(channel, options.poll_ms, stop, counts));
            }
        }
    }

    tokio::time::sleep(Duration::from_secs_f64(options.warmup)).await;
    let before = (
        proc.map(ProcReader::read).transpose()?,
        wire.total(),
        counts.updates.load(Ordering::Relaxed),
        counts.calls.load(Ordering::Relaxed),
    );
    let started = Instant::now();
    tokio::time::sleep(variant.window).await;
    let window = started.elapsed().as_secs_f64();
    let after = (
        proc.map(ProcReader::read).transpose()?,
        wire.total(),
        counts.updates.load(Ordering::Relaxed),
        counts.calls.load(Ordering::Relaxed),
    );
    stop.cancel();
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .is_err()
    {
        tasks.abort_all();
    }

    let updates = (after.2 - before.2) as f64;
    let calls = (after.3 - before.3) as f64;
    let bytes = (after.1 - before.1) as f64;
    let mut m = Metrics::new();
    m.insert("window_s".into(), window);
    m.insert("clients".into(), options.clients as f64);
    m.insert("updates".into(), updates);
    m.insert("updates_per_s".into(), updates / window);
    m.insert("calls".into(), calls);
    m.insert(
        "errors".into(),
        counts.errors.load(Ordering::Relaxed) as f64,
    );
    m.insert("wire_bytes".into(), bytes);
    if updates > 0.0 {
        m.insert("bytes_per_update".into(), bytes / updates);
    }
    if let (Some(b), Some(a)) = (before.0, after.0) {
        let cpu_us = cpu_delta_us(&b, &a);
        m.insert("server_cpu_ms".into(), cpu_us / 1000.0);
        m.insert("server_cpu_pct".into(), cpu_us / 1e4 / window);
        if updates > 0.0 {
            m.insert("cpu_us_per_update".into(), cpu_us / updates);
        }
        m.insert("server_rss_kib".into(), a.rss_kib as f64);
    }
    Ok(m)
}

/// Waits until GetSnapshot sees the first sample (bounded).
async fn wait_for_first_sample(channel: Channel) -> Result<(), BenchError> {
    let mut client = TelemetryServiceClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let request = MetricsRequest {
            service_name: BENCH_SERVICE.into(),
            interval_ms: 0,
        };
        match client.get_snapshot(request).await {
            Ok(_) => return Ok(()),
            Err(status) if Instant::now() > deadline => return Err(status.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn poller(
    channel: Channel,
    poll: Duration,
    offset: Duration,
    stop: CancellationToken,
    counts: Arc<Counts>,
) {
    let mut client = TelemetryServiceClient::new(channel);
    tokio::select! {
        () = stop.cancelled() => return,
        () = tokio::time::sleep(offset) => {}
    }
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let request = MetricsRequest {
            service_name: BENCH_SERVICE.into(),
            interval_ms: 0,
        };
        match client.get_snapshot(request).await {
            Ok(response) => {
                counts.calls.fetch_add(1, Ordering::Relaxed);
                let seq = response.get_ref().request_count;
                if last != Some(seq) {
                    last = Some(seq);
                    counts.updates.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                counts.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

async fn streamer(
    channel: Channel,
    interval_ms: u64,
    stop: CancellationToken,
    counts: Arc<Counts>,
) {
    let mut client = TelemetryServiceClient::new(channel);
    let request = MetricsRequest {
        service_name: BENCH_SERVICE.into(),
        interval_ms: u32::try_from(interval_ms).unwrap_or(u32::MAX),
    };
    let mut updates = tokio::select! {
        () = stop.cancelled() => return,
        response = client.subscribe(request) => match response {
            Ok(response) => response.into_inner(),
            Err(_) => {
                counts.errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        },
    };
    counts.calls.fetch_add(1, Ordering::Relaxed);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            message = updates.message() => match message {
                Ok(Some(_)) => {
                    counts.updates.fetch_add(1, Ordering::Relaxed);
                }
                Ok(None) => break,
                Err(_) => {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            },
        }
    }
}
