//! The `streamhub serve` process: signals, the drain deadline, and how
//! settings are layered (defaults, file, environment, flags).

#![allow(clippy::unwrap_used)]

mod common;

use std::{process::Stdio, time::Duration};

use common::{ServerProcess, assert_shutting_down, open_live_feed, payload, request, within};
use futures::StreamExt;
use streamhub::proto::telemetry::{
    MetricsPayload, telemetry_service_client::TelemetryServiceClient,
};

async fn client(url: String) -> TelemetryServiceClient<tonic::transport::Channel> {
    TelemetryServiceClient::new(common::connect(url).await)
}

#[tokio::test]
async fn sigterm_ends_open_streams_with_unavailable_and_exits_within_the_drain_timeout() {
    sigterm_drains_on("multi-thread").await;
}

#[tokio::test]
async fn sigterm_drains_the_same_on_the_current_thread_runtime() {
    // The runtime `auto` picks on one CPU (e.g. under taskset).
    sigterm_drains_on("current-thread").await;
}

async fn sigterm_drains_on(flavor: &str) {
    let dir = tempfile::tempdir().unwrap();
    let flavor = format!("runtime.flavor={flavor}");
    let mut server = ServerProcess::spawn(dir.path(), &["--drain-timeout", "5s", "--set", &flavor]);
    let mut client = client(server.url()).await;

    let (tx, mut alerts) = open_live_feed(&mut client, 4).await;
    tx.send(payload("edge", 99.0, 1.0, 0)).await.unwrap();
    assert_eq!(
        within("alert", alerts.next())
            .await
            .unwrap()
            .unwrap()
            .alert_type,
        "CPU_HIGH"
    );
    let mut updates = client
        .subscribe(request("edge", 0))
        .await
        .unwrap()
        .into_inner();
    within("first", updates.next()).await.unwrap().unwrap();

    server.signal("TERM");
    let start = std::time::Instant::now();
    let subscribe_end = within("subscribe end", updates.next())
        .await
        .unwrap()
        .unwrap_err();
    let feed_end = within("feed end", alerts.next())
        .await
        .unwrap()
        .unwrap_err();
    assert_shutting_down("subscribe", &subscribe_end);
    assert_shutting_down("live feed", &feed_end);
    let code = server.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(code, Some(0));
    // Every stream ended on its own: no need to wait for the deadline.
    assert!(start.elapsed() < Duration::from_secs(5));
    drop(tx);
}

#[tokio::test]
async fn a_stream_that_cannot_drain_is_forced_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut server = ServerProcess::spawn_on(
        "127.0.0.1:0",
        &dir.path().join("data"),
        &[
            "--drain-timeout",
            "1s",
            "--set",
            "telemetry.min_interval=1ms",
        ],
        Stdio::from(log),
    );
    let mut client = client(server.url()).await;
    let (tx, mut alerts) = open_live_feed(&mut client, 1).await;
    tx.send(payload("flood", 1.0, 1.0, 0)).await.unwrap();
    // A subscriber that never reads, on a connection whose HTTP/2 stream
    // window holds two samples: the window fills up, so the server cannot
    // deliver its closing status.
    let tiny_window = within(
        "connect",
        tonic::transport::Endpoint::from_shared(server.url())
            .unwrap()
            .initial_stream_window_size(Some(100))
            .connect(),
    )
    .await
    .unwrap();
    let mut stalled = TelemetryServiceClient::new(tiny_window)
        .subscribe(request("flood", 1))
        .await
        .unwrap()
        .into_inner();
    within("first", stalled.next()).await.unwrap().unwrap();
    // A second subscriber shows each payload has been published before the
    // next is sent.
    let mut probe = client
        .subscribe(request("flood", 1))
        .await
        .unwrap()
        .into_inner();
    for i in 0..3000u32 {
        tx.send(MetricsPayload {
            service_name: "flood".into(),
            cpu_usage: 1.0,
            memory_mb: f64::from(i),
            timestamp_ms: 0,
            request_count: u64::from(i),
        })
        .await
        .unwrap();
        let mut seen = within("probe", probe.next()).await.unwrap().unwrap();
        while seen.request_count < u64::from(i) {
            seen = within("probe", probe.next()).await.unwrap().unwrap();
        }
    }

    server.signal("TERM");
    let code = server.wait_exit(Duration::from_secs(4)).await;
    assert_eq!(code, Some(0));
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("drain timeout passed"), "{log}");
    drop((tx, alerts.next().await, stalled));
}

#[tokio::test]
async fn sigterm_with_connections_that_never_sent_a_request_exits_without_waiting_for_them() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    // A drain timeout far beyond the test's wait: only connections closed
    // at once let the server exit in time.
    let mut server = ServerProcess::spawn(dir.path(), &["--drain-timeout", "120s"]);
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    // Sends nothing.
    let silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // Sends half the HTTP/2 preface.
    let mut half = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    half.write_all(&preface[..10]).await.unwrap();
    // Finishes the HTTP/2 handshake, then neither reads nor answers.
    let mut mute = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    mute.write_all(preface).await.unwrap();
    mute.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    // A call answered after them: the server has accepted all three.
    let mut client = client(server.url()).await;
    within("snapshot", client.get_snapshot(request("nobody", 0)))
        .await
        .unwrap_err();

    server.signal("TERM");
    let code = server.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(code, Some(0));
    drop((silent, half, mute));
}

#[test]
fn settings_come_from_defaults_file_environment_and_flags_in_that_order() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("streamhub.toml");
    std::fs::write(
        &file,
        "drain_timeout = \"7s\"\n[telemetry]\nmax_services = 100\nmin_interval = \"250ms\"\n\
         [limits]\nmax_concurrent_streams = 10\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_streamhub"))
        .args(["serve", "--print-config", "--config"])
        .arg(&file)
        .args([
            "--drain-timeout",
            "2s",
            "--set",
            "limits.max_concurrent_streams=20",
        ])
        .env("STREAMHUB_TELEMETRY__MAX_SERVICES", "50")
        .env("STREAMHUB_SERVER", "http://ignored:1")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let config: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    // Flag beats file.
    assert_eq!(config["drain_timeout"], "2s");
    // Environment beats file.
    assert_eq!(config["telemetry"]["max_services"], 50);
    // File beats default.
    assert_eq!(config["telemetry"]["min_interval"], "250ms");
    // --set beats file.
    assert_eq!(config["limits"]["max_concurrent_streams"], 20);
    // Untouched: the embedded default.
    assert_eq!(config["listen"], "127.0.0.1:50051");

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_streamhub"))
        .args([
            "serve",
            "--print-config",
            "--set",
            "telemetry.max_servces=5",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("max_servces"), "{stderr}");
}
