//! nats-server, the dedicated pub/sub engine the fan-out scenario measures
//! streamhub against, and the Rust client side of that comparison.
//!
//! The server is Debian's `nats-server`, started on a random loopback port
//! with a configuration written here. The client is `async-nats`; the
//! payload is the same encoded `MetricsResponse` a gRPC subscriber receives,
//! so both sides decode the same bytes.

use std::path::PathBuf;

use futures::StreamExt;
use prost::Message as _;

use super::{
    BenchError, Options,
    harness::{BENCH_SERVICE, Pinning, ServerUnderTest, bench_dir},
};
use crate::proto::telemetry::MetricsResponse;

/// The subject every subscriber listens on.
pub const SUBJECT: &str = "telemetry.bench-svc";

/// The configuration given to nats-server: loopback only, a random port,
/// and room for a pipeline of samples to tens of thousands of subscribers
/// on one connection before it counts as a slow consumer.
const CONFIG: &str = "\
host: 127.0.0.1
port: -1
max_payload: 1048576
max_pending: 268435456
write_deadline: \"10s\"
max_connections: 65536
";

/// Starts nats-server pinned to the server's cores.
pub async fn start(options: &Options, pinning: &Pinning) -> Result<ServerUnderTest, BenchError> {
    let dir = bench_dir("nats")?;
    let config = dir.join("nats.conf");
    std::fs::write(&config, CONFIG)?;
    let program = PathBuf::from("nats-server");
    let args = vec!["-c".to_owned(), config.display().to_string()];
    ServerUnderTest::spawn("nats-server", &program, &args, dir, options, pinning, true)
        .await
        .map_err(|err| match err {
            BenchError::Spawn { cause, .. } if cause.kind() == std::io::ErrorKind::NotFound => {
                BenchError::Setup(
                    "nats-server is not installed (apt-get install -y nats-server)".into(),
                )
            }
            other => other,
        })
}

/// Connects a client to the server at `addr`.
pub async fn connect(addr: std::net::SocketAddr) -> Result<async_nats::Client, BenchError> {
    async_nats::ConnectOptions::new()
        .connection_timeout(std::time::Duration::from_secs(10))
        .connect(format!("nats://{addr}"))
        .await
        .map_err(|e| BenchError::Nats(e.to_string()))
}

/// The sample numbered `seq`, encoded as subscribers of streamhub get it.
pub fn encode(seq: u64) -> bytes::Bytes {
    MetricsResponse {
        service_name: BENCH_SERVICE.to_owned(),
        cpu_usage: 10.0 + (seq % 50) as f64,
        memory_mb: 512.0,
        request_count: seq,
        timestamp_ms: crate::telemetry::now_ms(),
    }
    .encode_to_vec()
    .into()
}

/// Publishes sample `seq` and flushes it to the server.
pub async fn publish(client: &async_nats::Client, seq: u64) -> Result<(), BenchError> {
    client
        .publish(SUBJECT, encode(seq))
        .await
        .map_err(|e| BenchError::Nats(e.to_string()))?;
    client
        .flush()
        .await
        .map_err(|e| BenchError::Nats(e.to_string()))
}

/// Opens `count` subscriptions on `client`; each yields the sequence
/// numbers of the samples it receives.
pub async fn subscribe(
    client: &async_nats::Client,
    count: usize,
) -> Result<Vec<futures::stream::BoxStream<'static, Option<u64>>>, BenchError> {
    let mut streams = Vec::with_capacity(count);
    for _ in 0..count {
        let sub = client
            .subscribe(SUBJECT)
            .await
            .map_err(|e| BenchError::Nats(e.to_string()))?;
        streams.push(
            sub.map(|msg| {
                MetricsResponse::decode(msg.payload)
                    .ok()
                    .map(|m| m.request_count)
            })
            .boxed(),
        );
    }
    // Every SUB has reached the server once the flush returns.
    client
        .flush()
        .await
        .map_err(|e| BenchError::Nats(e.to_string()))?;
    Ok(streams)
}
