//! The `streamhub serve` process: signals, the drain deadline, and how
//! settings are layered (defaults, file, environment, flags).

#![allow(clippy::unwrap_used)]

mod common;

use std::{process::Stdio, time::Duration};

use common::{ServerProcess, assert_shutting_down, open_live_feed, payload, request, within};
use futures::StreamExt;
use streamhub::proto::telemetry::{
    ListServicesRequest, MetricsPayload, telemetry_service_client::TelemetryServiceClient,
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
    let config: toml::Value = toml::from_str(&String::from_utf8_lossy(&output.stdout)).unwrap();
    // Flag beats file.
    assert_eq!(config["drain_timeout"].as_str(), Some("2s"));
    // Environment beats file.
    assert_eq!(config["telemetry"]["max_services"].as_integer(), Some(50));
    // File beats default.
    assert_eq!(config["telemetry"]["min_interval"].as_str(), Some("250ms"));
    // --set beats file.
    assert_eq!(
        config["limits"]["max_concurrent_streams"].as_integer(),
        Some(20)
    );
    // Untouched: the embedded default.
    assert_eq!(config["listen"].as_str(), Some("127.0.0.1:50051"));

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

/// `streamhub serve --print-config` with `args` and `env`: its stdout, or
/// its stderr as the error.
fn print_config(args: &[&str], env: &[(&str, &str)]) -> Result<String, String> {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_streamhub"))
        .args(["serve", "--print-config"])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[test]
fn the_clients_environment_variables_never_stop_serve() {
    let client_env = [
        ("STREAMHUB_CHAT_NAME", "ann"),
        ("STREAMHUB_CHAT_ROOM", "dev"),
        ("STREAMHUB_SERVICE", "api"),
        ("STREAMHUB_INTERVAL_MS", "500"),
        ("STREAMHUB_CHUNK_SIZE", "1MiB"),
        ("STREAMHUB_SERVER", "http://127.0.0.1:1"),
        ("STREAMHUB_TOKEN", "secret"),
        ("STREAMHUB_REQUIRE_ALL", "1"),
    ];
    let printed = print_config(&[], &client_env).unwrap();
    assert!(printed.contains("listen"), "{printed}");
    // A typo below a server setting is still refused.
    let err = print_config(&[], &[("STREAMHUB_TELEMETRY__TYPO", "1")]).unwrap_err();
    assert!(err.contains("typo"), "{err}");
}

#[test]
fn flags_and_set_beat_the_environment() {
    let env = [
        ("STREAMHUB_LISTEN", "127.0.0.1:7000"),
        ("STREAMHUB_DATA_DIR", "/from/env"),
        ("STREAMHUB_DRAIN_TIMEOUT", "9s"),
    ];
    let config: toml::Value = toml::from_str(
        &print_config(
            &[
                "--set",
                "listen=127.0.0.1:7001",
                "--set",
                "data_dir=/from/set",
                "--drain-timeout",
                "3s",
            ],
            &env,
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(config["listen"].as_str(), Some("127.0.0.1:7001"));
    assert_eq!(config["data_dir"].as_str(), Some("/from/set"));
    assert_eq!(config["drain_timeout"].as_str(), Some("3s"));
    // The environment still beats the defaults.
    let config: toml::Value = toml::from_str(&print_config(&[], &env).unwrap()).unwrap();
    assert_eq!(config["listen"].as_str(), Some("127.0.0.1:7000"));
}

#[test]
fn printed_configuration_is_toml_that_config_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let printed = print_config(
        &[
            "--set",
            "limits.max_connection_age=10m",
            "--set",
            "upload.quota=5000",
        ],
        &[],
    )
    .unwrap();
    let file = dir.path().join("printed.toml");
    std::fs::write(&file, &printed).unwrap();
    let again = print_config(&["--config", file.to_str().unwrap()], &[]).unwrap();
    assert_eq!(again, printed);
}

#[tokio::test]
async fn localhost_is_taken_where_an_address_is() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::spawn_on("localhost:0", dir.path(), &[], Stdio::null());
    assert!(server.addr.ip().is_loopback(), "{}", server.addr);
    let url = format!("http://localhost:{}", server.addr.port());
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamhub"))
        .args(["--server", &url, "services"])
        .output();
    let output = within("services", output).await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn listening_is_printed_only_once_the_server_can_serve() {
    let dir = tempfile::tempdir().unwrap();
    // A data directory that cannot be made: a file is in the way.
    let blocked = dir.path().join("file");
    std::fs::write(&blocked, "not a directory").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_streamhub"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(blocked.join("data"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!stdout.contains("listening"), "{stdout}");
}

/// New-user finding 5: a second server on a data directory in use said
/// redb's "Database already open. Cannot acquire lock." three times. It
/// says once that another streamhub is using the directory, naming it.
#[tokio::test]
async fn a_second_server_on_a_data_directory_in_use_says_so_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = ServerProcess::spawn(dir.path(), &[]);
    let second = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamhub"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env_remove("RUST_BACKTRACE")
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .output();
    let output = within("the second server", second).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let expected = format!(
        "error: another streamhub (or process) is using data directory {} (chat storage is locked)",
        dir.path().display()
    );
    assert_eq!(stderr.trim_end(), expected);
    // The first one serves on, unharmed.
    client(first.url())
        .await
        .list_services(ListServicesRequest::default())
        .await
        .unwrap();
    first.signal("TERM");
    assert_eq!(first.wait_exit(Duration::from_secs(30)).await, Some(0));
}

#[tokio::test]
async fn a_closed_stdout_and_stderr_never_stop_the_server() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    // `streamhub serve 2>&1 | head -1`: one line is read, then the pipes
    // close while the server goes on logging.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_streamhub"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--drain-timeout",
            "5s",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    drop(child.stderr.take());
    let addr = line.trim().rsplit(' ').next().unwrap().to_owned();
    let mut server = ServerProcess {
        child,
        addr: addr.parse().unwrap(),
    };
    // Every call logs a line or two: each write fails with EPIPE.
    for round in 0..3 {
        let (alerts, status) = common::live_feed(
            common::connect(server.url()).await,
            vec![payload("edge", 99.0, 1.0, 0)],
        )
        .await;
        assert!(status.is_none(), "round {round}: {status:?}");
        assert_eq!(alerts.len(), 1, "round {round}");
    }
    let mut client = client(server.url()).await;
    let mut updates = client
        .subscribe(request("edge", 0))
        .await
        .unwrap()
        .into_inner();
    within("a sample", updates.next()).await.unwrap().unwrap();
    server.signal("TERM");
    let end = within("drain", updates.next()).await.unwrap().unwrap_err();
    assert_shutting_down("subscribe", &end);
    assert_eq!(server.wait_exit(Duration::from_secs(10)).await, Some(0));
}

#[tokio::test]
async fn a_client_chosen_name_with_a_newline_cannot_forge_a_log_line() {
    use streamhub::proto::chat::{WatchRoomRequest, chat_service_client::ChatServiceClient};
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let data = dir.path().join("data");
    let server = ServerProcess::spawn_on("127.0.0.1:0", &data, &[], Stdio::from(log));
    let forged = "INFO streamhub: FORGED stream closed";
    let mut chat = ChatServiceClient::new(common::connect(server.url()).await);
    // Refused (a bad room name), but its stream is logged opened and closed.
    let refused = within(
        "WatchRoom",
        chat.watch_room(WatchRoomRequest {
            room: format!("evil\n{forged}\r\n{forged}"),
            ..WatchRoomRequest::default()
        }),
    )
    .await
    .map(drop)
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    let text = within("the stream's close in the log", async {
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap();
            if text.contains("stream closed") {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    for line in text.lines() {
        assert!(
            !line.contains("FORGED") || line.contains("evil"),
            "forged line: {line:?}\nlog:\n{text}"
        );
    }
    assert!(text.contains(r"evil\n"), "the name, escaped:\n{text}");
    drop(server);
}
