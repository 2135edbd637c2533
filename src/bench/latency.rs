//! Scenario 5, the latency floor: one LiveFeed publisher and one
//! subscriber on separate connections, one sample at a time, timed from
//! publish to receipt; next to it, in the same run, a plain TCP ping-pong
//! over loopback with an echo server pinned like the gRPC server.
//!
//! Both paths make two loopback hops through another process: publisher →
//! server → subscriber, and client → echo → client.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::{
    BenchError, Options, Target,
    harness::{
        BENCH_SERVICE, Check, Metrics, Pinning, Publisher, Row, ServerUnderTest, WireCounter,
        bench_dir, connect, histogram, latency_metrics, ratio, record, repeat,
    },
};
use crate::proto::telemetry::{
    MetricsRequest, MetricsResponse, telemetry_service_client::TelemetryServiceClient,
};

/// Bytes in one ping: about the size of an encoded metrics sample.
const PING_BYTES: usize = 64;

/// Samples sent untimed first.
const WARMUP_SAMPLES: u64 = 20;

/// Runs the scenario: every target, then the TCP ping-pong.
pub async fn run(
    options: &Options,
    pinning: &Pinning,
) -> Result<(serde_json::Value, Vec<Row>, Vec<Check>), BenchError> {
    let mut rows = Vec::new();
    let config = [("path", "publish → subscriber".to_owned())];
    for &target in options.targets.iter().filter(|t| **t != Target::Nats) {
        let result = async {
            let server = ServerUnderTest::start(target, options, pinning).await?;
            let runs = repeat(options.repetitions, |_| {
                measure_grpc(server.addr, target, options)
            })
            .await;
            server.stop().await;
            runs
        }
        .await;
        rows.push(Row::of(target.name(), &config, result));
    }

    let tcp_config = [("path", "TCP ping-pong".to_owned())];
    let result = async {
        let exe = std::env::current_exe()?;
        let args: Vec<String> = ["bench", "tcp-echo", "--no-pin", "--listen", "127.0.0.1:0"]
            .map(str::to_owned)
            .to_vec();
        let echo = ServerUnderTest::spawn(
            "tcp-echo",
            &exe,
            &args,
            bench_dir("tcp-echo")?,
            options,
            pinning,
            false,
        )
        .await?;
        let runs = repeat(options.repetitions, |_| measure_tcp(echo.addr, options)).await;
        echo.stop().await;
        runs
    }
    .await;
    rows.push(Row::of("tcp", &tcp_config, result));

    let p50 = |target: &str| {
        rows.iter()
            .find(|r| r.target == target)
            .and_then(|r| r.get("latency_p50_us"))
    };
    let mut checks = vec![Check::at_most(
        "streamhub publish-to-receipt p50 / TCP ping-pong p50",
        ratio(p50("streamhub"), p50("tcp")),
        2.0,
    )];
    for peer in ["python", "node"] {
        if rows.iter().any(|r| r.target == peer) {
            checks.push(Check::at_least(
                format!("{peer} p50 / streamhub p50 (ahead of the peer)"),
                ratio(p50(peer), p50("streamhub")),
                1.0,
            ));
        }
    }
    let settings = serde_json::json!({
        "samples": options.samples,
        "max_seconds_per_target": options.max_seconds,
        "warmup_samples": WARMUP_SAMPLES,
        "repetitions": options.repetitions,
        "gap_ms": "subscribe floor + 4 ms (streamhub 1 ms floor, peers 100 ms)",
        "ping_bytes": PING_BYTES,
    });
    Ok((settings, rows, checks))
}

/// How many samples fit in the time allowed at `gap` apart.
fn sample_count(options: &Options, gap: Duration) -> u64 {
    let fit = (options.max_seconds / gap.as_secs_f64()).floor() as u64;
    options.samples.min(fit).max(1)
}

async fn measure_grpc(
    addr: SocketAddr,
    target: Target,
    options: &Options,
) -> Result<Metrics, BenchError> {
    let publisher = Publisher::open(connect(addr, &WireCounter::default()).await?);
    let mut subscriber = TelemetryServiceClient::new(connect(addr, &WireCounter::default()).await?);
    publisher.publish(1).await?;
    let request = MetricsRequest {
        service_name: BENCH_SERVICE.into(),
        interval_ms: 1,
    };
    let mut updates = subscriber.subscribe(request).await?.into_inner();
    // Past the subscriber's interval, so each sample goes out at once.
    let gap = Duration::from_millis(target.min_interval_ms() + 4);
    let timed = sample_count(options, gap);
    let mut h = histogram();
    let mut seq = 1;
    wait_for(seq, &mut updates).await?;
    for i in 0..WARMUP_SAMPLES + timed {
        tokio::time::sleep(gap).await;
        seq += 1;
        let started = Instant::now();
        publisher.publish(seq).await?;
        wait_for(seq, &mut updates).await?;
        if i >= WARMUP_SAMPLES {
            record(&mut h, started.elapsed());
        }
    }
    drop(updates);
    publisher.close().await;
    let mut m = latency_metrics("latency", &h);
    m.insert("gap_ms".into(), gap.as_secs_f64() * 1000.0);
    Ok(m)
}

/// Reads `updates` until sample `seq` (or a newer one) arrives.
async fn wait_for(
    seq: u64,
    updates: &mut tonic::Streaming<MetricsResponse>,
) -> Result<(), BenchError> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), updates.message()).await {
            Ok(Ok(Some(m))) if m.request_count >= seq => return Ok(()),
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => return Err(BenchError::Setup("Subscribe ended".into())),
            Ok(Err(status)) => return Err(status.into()),
            Err(_) => return Err(BenchError::Timeout(format!("sample {seq}"))),
        }
    }
}

async fn measure_tcp(addr: SocketAddr, options: &Options) -> Result<Metrics, BenchError> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let gap = Duration::from_millis(Target::Streamhub.min_interval_ms() + 4);
    let timed = sample_count(options, gap);
    let ping = [7u8; PING_BYTES];
    let mut pong = [0u8; PING_BYTES];
    let mut h = histogram();
    for i in 0..WARMUP_SAMPLES + timed {
        tokio::time::sleep(gap).await;
        let started = Instant::now();
        stream.write_all(&ping).await?;
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut pong))
            .await
            .map_err(|_| BenchError::Timeout("TCP pong".into()))??;
        if i >= WARMUP_SAMPLES {
            record(&mut h, started.elapsed());
        }
    }
    let mut m = latency_metrics("latency", &h);
    m.insert("gap_ms".into(), gap.as_secs_f64() * 1000.0);
    Ok(m)
}

/// The echo server of the ping-pong: prints `listening on ADDR`, echoes
/// every byte back, and exits on its own after an hour at most.
pub async fn echo_server(listen: SocketAddr) -> Result<(), BenchError> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    let serve = async {
        loop {
            let (mut socket, _) = listener.accept().await?;
            socket.set_nodelay(true)?;
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if socket.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
        #[allow(unreachable_code)] // the loop ends only through `?`
        Ok::<(), BenchError>(())
    };
    match tokio::time::timeout(Duration::from_secs(3600), serve).await {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}
