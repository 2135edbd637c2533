//! The `streamhub` client subcommands, run as a user would run them.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    sync::mpsc as std_mpsc,
    time::Duration,
};

use common::{ServerProcess, TestServer, WAIT, test_config, within};
use serde_json::Value;
use streamhub::proto::telemetry::MetricsPayload;
use tokio::process::Command;

async fn streamhub(server: &str, args: &[&str]) -> std::process::Output {
    let child = Command::new(env!("CARGO_BIN_EXE_streamhub"))
        .arg("--server")
        .arg(server)
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .output();
    within("the CLI", child).await.unwrap()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn json_lines(output: &std::process::Output) -> Vec<Value> {
    stdout(output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// Publishes one sample (request count 3) and waits until it is accepted.
async fn publish(url: String, service: &str, cpu: f64) {
    let sample = MetricsPayload {
        request_count: 3,
        ..common::payload(service, cpu, 512.0, 0)
    };
    let (_, status) = common::live_feed(common::connect(url).await, vec![sample]).await;
    assert!(status.is_none(), "{status:?}");
}

#[tokio::test]
async fn snapshot_and_services_print_text_or_json() {
    let server = TestServer::start().await;
    publish(server.url(), "api-gateway", 42.5).await;

    let text = streamhub(&server.url(), &["snapshot", "api-gateway"]).await;
    assert!(text.status.success());
    let line = stdout(&text);
    assert!(
        line.contains("api-gateway") && line.contains("42.5%"),
        "{line}"
    );

    let json = streamhub(&server.url(), &["--json", "snapshot", "api-gateway"]).await;
    let lines = json_lines(&json);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["service"], "api-gateway");
    assert_eq!(lines[0]["cpu_usage"], 42.5);
    assert_eq!(lines[0]["request_count"], 3);

    let services = streamhub(&server.url(), &["--json", "services"]).await;
    assert_eq!(json_lines(&services)[0]["service"], "api-gateway");

    let missing = streamhub(&server.url(), &["snapshot", "nobody"]).await;
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("NotFound") && stderr.contains("nobody"),
        "{stderr}"
    );
}

#[tokio::test]
async fn feed_simulate_streams_the_seed_pattern_and_prints_alerts() {
    let server = TestServer::start().await;
    let output = streamhub(
        &server.url(),
        &[
            "--json",
            "feed",
            "--simulate",
            "--service",
            "sim",
            "--count",
            "21",
            "--interval-ms",
            "5",
        ],
    )
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let alerts: Vec<_> = json_lines(&output)
        .into_iter()
        .filter_map(|v| {
            v.get("alert_type")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect();
    // Spikes at ticks 10 and 20, each resolved on the next tick.
    assert_eq!(
        alerts,
        [
            "CPU_HIGH",
            "CPU_HIGH_RESOLVED",
            "CPU_HIGH",
            "CPU_HIGH_RESOLVED"
        ]
    );
}

#[tokio::test]
async fn feed_sends_this_machines_real_metrics() {
    let server = TestServer::start().await;
    let output = streamhub(
        &server.url(),
        &[
            "feed",
            "--service",
            "real-host",
            "--count",
            "2",
            "--interval-ms",
            "300",
        ],
    )
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json = streamhub(&server.url(), &["--json", "snapshot", "real-host"]).await;
    let sample = &json_lines(&json)[0];
    assert!(sample["memory_mb"].as_f64().unwrap() > 1.0, "{sample}");
}

#[tokio::test]
async fn demo_tours_the_patterns_with_real_data() {
    let mut config = test_config();
    config.telemetry.self_sample_interval = Duration::from_millis(200);
    let server = TestServer::start_with(config).await;
    let output = streamhub(
        &server.url(),
        &[
            "demo",
            "--subscribe-for",
            "1s",
            "--feed-ticks",
            "10",
            "--tick-ms",
            "5",
        ],
    )
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out = stdout(&output);
    assert!(out.contains("streamhub"), "{out}");
    assert!(out.contains("[ALERT] CPU_HIGH"), "{out}");
}

/// Reads a child's stdout lines on a thread, so the test can wait for a
/// given line with a timeout.
struct Lines(std_mpsc::Receiver<String>);

impl Lines {
    fn of(stdout: std::process::ChildStdout) -> Self {
        let (tx, rx) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self(rx)
    }

    /// Waits for a line that satisfies `want`; returns it.
    fn wait_for(&self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .0
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no line for {what}"));
            let value: Value = serde_json::from_str(&line).unwrap();
            if want(&value) {
                return value;
            }
        }
    }
}

#[tokio::test]
async fn subscribe_reconnects_when_the_server_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let first = ServerProcess::spawn(dir.path(), &["--drain-timeout", "2s"]);
    let addr = first.addr;
    publish(first.url(), "svc", 1.0).await;

    let mut cli = std::process::Command::new(env!("CARGO_BIN_EXE_streamhub"))
        .args([
            "--json",
            "--server",
            &first.url(),
            "subscribe",
            "svc",
            "--interval-ms",
            "100",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = Lines::of(cli.stdout.take().unwrap());
    lines.wait_for("first sample", |v| v["cpu_usage"] == 1.0);

    first.signal("TERM");
    let mut first = first;
    assert_eq!(first.wait_exit(Duration::from_secs(5)).await, Some(0));
    lines.wait_for("reconnecting note", |v| v["event"] == "reconnecting");

    // Same address, new process.
    let second = ServerProcess::spawn_on(&addr.to_string(), dir.path(), &[], Stdio::null());
    publish(second.url(), "svc", 2.0).await;
    lines.wait_for("reconnected note", |v| v["event"] == "reconnected");
    lines.wait_for("sample from the new server", |v| v["cpu_usage"] == 2.0);
    cli.kill().unwrap();
    cli.wait().unwrap();
}
