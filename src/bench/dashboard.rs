//! Scenario "dashboard" (issue 13): the server's CPU per sample delivered
//! to dashboards through `telemetry.Watch` over gRPC-Web on HTTP/1.1,
//! next to the same samples through native Subscribe (HTTP/2) and through
//! Watch over native gRPC (HTTP/2).
//!
//! `--services` services (1,000) report through one LiveFeed call, each
//! once per `--report-ms` (1 s), spread evenly over the period.
//! `--dashboards` watchers (100) each want every service:
//! - *subscribe*: one Subscribe per service per dashboard (100,000 streams
//!   over connections of `--per-connection`), what a native client without
//!   Watch must do;
//! - *watch-h2*: one Watch (pattern `svc-*`) per dashboard, each on its own
//!   HTTP/2 connection, native gRPC;
//! - *watch-grpc-web*: one Watch per dashboard, each on its own HTTP/1.1
//!   connection, as a browser page does: `POST
//!   /telemetry.TelemetryService/Watch` with `content-type:
//!   application/grpc-web+proto` through hyper's HTTP/1.1 client, the
//!   response's length-prefixed frames parsed and decoded here.
//!
//! After `--warmup` seconds, the server's CPU time is read over
//! `--duration` seconds and divided by the samples the dashboards received
//! in that window. A fresh server per mode and repetition; the modes
//! alternate within each repetition.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Buf, Bytes, BytesMut};
use futures::{StreamExt, stream};
use hyper_util::rt::TokioIo;
use prost::Message as _;
use tokio::{net::TcpStream, sync::mpsc, task::JoinSet};
use tokio_stream::wrappers::ReceiverStream;

use super::{
    BenchError, Options, Target,
    harness::{
        Check, Metrics, Pinning, ProcReader, Row, ServerUnderTest, WireCounter, connect,
        cpu_delta_us, ratio,
    },
};
use crate::proto::telemetry::{
    MetricsPayload, MetricsRequest, WatchEvent, WatchRequest,
    telemetry_service_client::TelemetryServiceClient, watch_event::Event,
};

/// The three ways of watching, as named in the results.
const MODES: [&str; 3] = ["subscribe", "watch-h2", "watch-grpc-web"];

/// The services' name prefix; the Watch pattern is `svc-*`.
const PREFIX: &str = "svc-";

fn service_name(i: usize) -> String {
    format!("{PREFIX}{i:05}")
}

/// Runs the scenario.
pub async fn run(
    options: &Options,
    pinning: &Pinning,
) -> Result<(serde_json::Value, Vec<Row>, Vec<Check>), BenchError> {
    let mut runs: Vec<Vec<Metrics>> = vec![Vec::new(); MODES.len()];
    let mut failures: Vec<Option<BenchError>> = (0..MODES.len()).map(|_| None).collect();
    for rep in 0..options.repetitions {
        for (i, mode) in MODES.iter().enumerate() {
            if failures[i].is_some() {
                continue;
            }
            tracing::info!(mode, rep, "dashboard run");
            match run_once(mode, options, pinning).await {
                Ok(m) => runs[i].push(m),
                Err(err) => {
                    tracing::warn!(mode, %err, "dashboard run failed");
                    failures[i] = Some(err);
                }
            }
        }
    }
    let mut rows = Vec::new();
    for (i, mode) in MODES.iter().enumerate() {
        let config = [
            ("mode", (*mode).to_owned()),
            ("dashboards", options.dashboards.to_string()),
            ("services", options.services.to_string()),
        ];
        let r = std::mem::take(&mut runs[i]);
        rows.push(match (&failures[i], r.is_empty()) {
            (Some(err), true) => Row::failed("streamhub", &config, err),
            _ => Row::new("streamhub", &config, r),
        });
    }
    let get = |mode: &str| {
        rows.iter()
            .find(|r| r.is("mode", mode))
            .and_then(|r| r.get("cpu_us_per_sample"))
    };
    let checks = vec![Check::at_most(
        "server CPU per sample: Watch over gRPC-Web (HTTP/1.1) / native Subscribe",
        ratio(get("watch-grpc-web"), get("subscribe")),
        1.5,
    )];
    let settings = serde_json::json!({
        "dashboards": options.dashboards,
        "services": options.services,
        "report_ms": options.report_ms,
        "subscribe_interval_ms": interval_ms(options),
        "per_connection": options.per_connection,
        "warmup_s": options.warmup,
        "window_s": options.duration,
        "repetitions": options.repetitions,
        "watch": "pattern svc-*, no backfill, alerts on (none raised)",
    });
    Ok((settings, rows, checks))
}

/// The interval the watchers ask for: half the report period, so every
/// sample goes out as it arrives.
fn interval_ms(options: &Options) -> u32 {
    u32::try_from((options.report_ms / 2).max(1)).unwrap_or(u32::MAX)
}

async fn run_once(mode: &str, options: &Options, pinning: &Pinning) -> Result<Metrics, BenchError> {
    let server = ServerUnderTest::start(Target::Streamhub, options, pinning).await?;
    let result = measure(&server, mode, options).await;
    if result.is_err() {
        tracing::debug!(log = %server.log_tail(), "server log");
    }
    server.stop().await;
    result
}

async fn measure(
    server: &ServerUnderTest,
    mode: &str,
    options: &Options,
) -> Result<Metrics, BenchError> {
    let addr = server.addr;
    let proc = server.proc().await;
    let services = options.services.max(1);
    // The services: one LiveFeed call, every service once per period.
    let (tx, rx) = mpsc::channel::<MetricsPayload>(1024);
    let feed_channel = connect(addr, &WireCounter::default()).await?;
    let feed = tokio::spawn(async move {
        let mut client = TelemetryServiceClient::new(feed_channel);
        if let Ok(response) = client.live_feed(ReceiverStream::new(rx)).await {
            let mut alerts = response.into_inner();
            while let Ok(Some(_)) = alerts.message().await {}
        }
    });
    let period = Duration::from_millis(options.report_ms.max(1));
    // Every service once, so that all exist before anyone watches.
    for i in 0..services {
        send(&tx, i, 0).await?;
    }
    let publisher = {
        let tx = tx.clone();
        tokio::spawn(async move {
            let step = period / u32::try_from(services).unwrap_or(u32::MAX);
            let start = tokio::time::Instant::now();
            for n in 0u64.. {
                let round = n / services as u64;
                let i = (n % services as u64) as usize;
                tokio::time::sleep_until(
                    start + period + step * u32::try_from(n).unwrap_or(u32::MAX),
                )
                .await;
                if send(&tx, i, round + 1).await.is_err() {
                    break;
                }
            }
        })
    };

    let received = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    let setup = tokio::time::timeout(Duration::from_secs(options.setup_timeout), async {
        match mode {
            "subscribe" => open_subscribers(addr, options, &received, &errors, &mut tasks).await,
            "watch-h2" => {
                for _ in 0..options.dashboards {
                    let channel = connect(addr, &WireCounter::default()).await?;
                    let mut client = TelemetryServiceClient::new(channel);
                    let mut events = client.watch(watch_request(options)).await?.into_inner();
                    let received = Arc::clone(&received);
                    let errors = Arc::clone(&errors);
                    tasks.spawn(async move {
                        loop {
                            match events.message().await {
                                Ok(Some(WatchEvent {
                                    event: Some(Event::Sample(_)),
                                })) => {
                                    received.fetch_add(1, Ordering::Relaxed);
                                }
                                Ok(Some(_)) => {}
                                Ok(None) => break,
                                Err(_) => {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                    break;
                                }
                            }
                        }
                    });
                }
                Ok(())
            }
            _ => {
                for _ in 0..options.dashboards {
                    let body = grpc_web_watch(addr, options).await?;
                    let received = Arc::clone(&received);
                    let errors = Arc::clone(&errors);
                    tasks.spawn(async move {
                        if read_grpc_web(body, &received).await.is_err() {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
                Ok(())
            }
        }
    })
    .await;
    let outcome = async {
        setup.map_err(|_| BenchError::Timeout(format!("opening the {mode} watchers")))??;
        tokio::time::sleep(Duration::from_secs_f64(
            options.warmup.max(period.as_secs_f64()),
        ))
        .await;
        let before = proc.as_ref().map(ProcReader::read).transpose()?;
        let count_before = received.load(Ordering::Relaxed);
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(options.duration)).await;
        let after = proc.as_ref().map(ProcReader::read).transpose()?;
        let samples = (received.load(Ordering::Relaxed) - count_before) as f64;
        let seconds = started.elapsed().as_secs_f64();
        let mut m = Metrics::new();
        m.insert("samples".into(), samples);
        m.insert("samples_per_s".into(), samples / seconds);
        m.insert(
            "expected_per_s".into(),
            (options.dashboards * services) as f64 / period.as_secs_f64(),
        );
        m.insert("errors".into(), errors.load(Ordering::Relaxed) as f64);
        if let (Some(b), Some(a)) = (before, after) {
            let cpu = cpu_delta_us(&b, &a);
            m.insert("server_cpu_pct".into(), cpu / 1e4 / seconds);
            m.insert("cpu_us_per_sample".into(), cpu / samples.max(1.0));
            m.insert("server_rss_kib".into(), a.rss_kib as f64);
        }
        Ok::<_, BenchError>(m)
    }
    .await;
    publisher.abort();
    drop(tx);
    tasks.abort_all();
    feed.abort();
    outcome
}

async fn send(tx: &mpsc::Sender<MetricsPayload>, i: usize, round: u64) -> Result<(), BenchError> {
    tx.send(MetricsPayload {
        service_name: service_name(i),
        // Below every alert threshold.
        cpu_usage: 10.0 + (round % 50) as f64,
        memory_mb: 512.0,
        timestamp_ms: 0,
        request_count: round,
    })
    .await
    .map_err(|_| BenchError::Setup("the LiveFeed call ended".into()))
}

fn watch_request(options: &Options) -> WatchRequest {
    WatchRequest {
        pattern: format!("{PREFIX}*"),
        interval_ms: interval_ms(options),
        backfill_samples: 0,
        alerts: true,
        backfill_alerts: 0,
    }
}

/// Opens `dashboards × services` Subscribe streams, `--per-connection` per
/// connection, each group read by one task.
async fn open_subscribers(
    addr: SocketAddr,
    options: &Options,
    received: &Arc<AtomicU64>,
    errors: &Arc<AtomicU64>,
    tasks: &mut JoinSet<()>,
) -> Result<(), BenchError> {
    let total = options.dashboards * options.services.max(1);
    let per = options.per_connection.max(1);
    for first in (0..total).step_by(per) {
        let count = per.min(total - first);
        let channel = connect(addr, &WireCounter::default()).await?;
        let client = TelemetryServiceClient::new(channel);
        let interval = interval_ms(options);
        let services = options.services.max(1);
        let streams: Vec<_> = stream::iter(first..first + count)
            .map(|k| {
                let mut client = client.clone();
                async move {
                    let request = MetricsRequest {
                        service_name: service_name(k % services),
                        interval_ms: interval,
                    };
                    client.subscribe(request).await.map(|r| r.into_inner())
                }
            })
            .buffer_unordered(256)
            .collect()
            .await;
        let mut group = stream::SelectAll::new();
        for s in streams {
            group.push(s?);
        }
        let received = Arc::clone(received);
        let errors = Arc::clone(errors);
        tasks.spawn(async move {
            let _client = client;
            while let Some(item) = group.next().await {
                match item {
                    Ok(_) => {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    Ok(())
}

/// A request body of one ready buffer.
struct OneShot(Option<Bytes>);

impl http_body::Body for OneShot {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.take().map(|b| Ok(http_body::Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }
}

/// Opens one Watch over gRPC-Web on its own HTTP/1.1 connection and
/// returns the response body.
async fn grpc_web_watch(
    addr: SocketAddr,
    options: &Options,
) -> Result<hyper::body::Incoming, BenchError> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| BenchError::Setup(format!("HTTP/1.1 handshake: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let message = watch_request(options).encode_to_vec();
    let mut body = BytesMut::with_capacity(5 + message.len());
    body.extend_from_slice(&[0]);
    body.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    body.extend_from_slice(&message);
    let request = http::Request::post(format!("http://{addr}/telemetry.TelemetryService/Watch"))
        .header(http::header::HOST, addr.to_string())
        .header(http::header::CONTENT_TYPE, "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("te", "trailers")
        .body(OneShot(Some(body.freeze())))
        .map_err(|e| BenchError::Setup(format!("gRPC-Web request: {e}")))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| BenchError::Setup(format!("gRPC-Web Watch: {e}")))?;
    if response.status() != http::StatusCode::OK {
        return Err(BenchError::Setup(format!(
            "gRPC-Web Watch answered HTTP {}",
            response.status()
        )));
    }
    if let Some(status) = response.headers().get("grpc-status")
        && status != "0"
    {
        return Err(BenchError::Setup(format!(
            "gRPC-Web Watch ended at once with grpc-status {status:?}"
        )));
    }
    Ok(response.into_body())
}

/// Reads a gRPC-Web response body: frames of a flag byte (0x80 marks the
/// trailers), a 4-byte big-endian length and the message; counts the
/// samples among the decoded `WatchEvent`s.
async fn read_grpc_web(
    mut body: hyper::body::Incoming,
    received: &AtomicU64,
) -> Result<(), BenchError> {
    let mut buf = BytesMut::new();
    loop {
        let frame =
            std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut body), cx)).await;
        let Some(frame) = frame else {
            return Ok(());
        };
        let frame = frame.map_err(|e| BenchError::Setup(format!("gRPC-Web body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while buf.len() >= 5 {
            let flag = buf[0];
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 5 + len {
                break;
            }
            buf.advance(5);
            let message = buf.split_to(len);
            if flag & 0x80 != 0 {
                // Trailers: the call ended.
                return Err(BenchError::Setup(format!(
                    "the Watch ended: {}",
                    String::from_utf8_lossy(&message).trim()
                )));
            }
            let event = WatchEvent::decode(message.freeze())
                .map_err(|e| BenchError::Setup(format!("bad WatchEvent: {e}")))?;
            if matches!(event.event, Some(Event::Sample(_))) {
                received.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
