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
use futures::StreamExt as _;
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
    // The summaries follow an empty line, not a literal `\n`.
    let err = stderr(&output);
    assert!(err.contains("\nLiveFeed ended: "), "{err}");
    assert!(!err.contains("\\n"), "{err}");
}

#[tokio::test]
async fn token_new_names_its_own_flag_in_errors() {
    let output = streamhub_env(&["token", "new", "--identity", "x", "--scope", "foo"], &[]).await;
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--scope: ") || err.contains("--scope "),
        "{err}"
    );
    assert!(!err.contains("--scopes"), "{err}");
    // An offline command lists no connection options (only --json).
    let help = stdout(&streamhub_env(&["token", "new", "--help"], &[]).await);
    assert!(help.contains("--json"), "{help}");
    for flag in ["--server", "--token", "--ca", "--cert ", "--key "] {
        assert!(!help.contains(flag), "{flag} in token new --help:\n{help}");
    }
}

#[tokio::test]
async fn subscribe_to_a_server_never_reached_says_it_cannot_connect_not_lost() {
    // Port 1: nothing listens there.
    let output = streamhub_env(
        &[
            "--server",
            "http://127.0.0.1:1",
            "subscribe",
            "x",
            "--duration",
            "1s",
        ],
        &[("STREAMHUB_TOKEN", "")],
    )
    .await;
    let err = stderr(&output);
    assert!(
        err.contains("cannot connect to http://127.0.0.1:1 (nothing is listening there"),
        "{err}"
    );
    assert!(!err.contains("lost"), "{err}");
}

#[tokio::test]
async fn upload_of_a_directory_says_it_is_one() {
    let dir = tempfile::tempdir().unwrap();
    let output = streamhub_env(
        &[
            "--server",
            "http://127.0.0.1:1",
            "upload",
            dir.path().to_str().unwrap(),
        ],
        &[],
    )
    .await;
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is a directory: upload takes one file"),
        "{err}"
    );
    assert!(!err.contains("shrink"), "{err}");
}

#[tokio::test]
async fn usage_errors_are_clap_s_exit_2_with_the_help_hint_as_the_readme_says() {
    let output = streamhub_env(&["subscribe", "--no-such-flag"], &[]).await;
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("For more information, try '--help'."), "{err}");
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(
        readme.contains("exit code 2"),
        "README does not say usage errors exit 2"
    );
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

/// A URL on which nothing listens (a port just freed).
fn unreachable_url() -> (std::net::SocketAddr, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    (addr, format!("http://{addr}"))
}

/// Spawns `streamhub --json --server URL ARGS...` with piped stdin and
/// stdout.
fn spawn_cli(server: &str, args: &[&str]) -> (std::process::Child, Lines) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_streamhub"))
        .args(["--json", "--server", server])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = Lines::of(child.stdout.take().unwrap());
    (child, lines)
}

/// Sends SIGINT, as Ctrl-C in a terminal does.
fn ctrl_c(child: &std::process::Child) {
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits for the process to exit; its exit code (None: killed by a
/// signal).
async fn exit_code(child: &mut std::process::Child) -> Option<i32> {
    within("the CLI to exit", async {
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test]
async fn chat_quits_on_ctrl_c_while_it_waits_to_reconnect() {
    let (_, url) = unreachable_url();
    let (mut chat, lines) = spawn_cli(&url, &["chat", "--name", "z"]);
    lines.wait_for("reconnecting note", |v| v["event"] == "reconnecting");
    ctrl_c(&chat);
    assert_eq!(exit_code(&mut chat).await, Some(0));
}

#[tokio::test]
async fn chat_quits_on_end_of_input_while_the_server_is_unreachable() {
    let (_, url) = unreachable_url();
    let (mut chat, lines) = spawn_cli(&url, &["chat", "--name", "z"]);
    lines.wait_for("reconnecting note", |v| v["event"] == "reconnecting");
    // Ctrl-D: standard input ends.
    drop(chat.stdin.take());
    assert_eq!(exit_code(&mut chat).await, Some(0));
}

#[tokio::test]
async fn subscribe_and_upload_quit_on_ctrl_c_while_they_wait_to_reconnect() {
    let (_, url) = unreachable_url();
    let (mut subscribe, lines) = spawn_cli(&url, &["subscribe", "svc"]);
    lines.wait_for("reconnecting note", |v| v["event"] == "reconnecting");
    ctrl_c(&subscribe);
    assert_eq!(exit_code(&mut subscribe).await, Some(0));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f.bin");
    std::fs::write(&file, b"data").unwrap();
    let (mut upload, lines) = spawn_cli(&url, &["upload", file.to_str().unwrap()]);
    lines.wait_for("retrying note", |v| v["event"] == "retrying");
    ctrl_c(&upload);
    // Interrupted, and says so with the shell's code for it.
    assert_eq!(exit_code(&mut upload).await, Some(130));
}

#[tokio::test]
async fn feed_reconnects_like_subscribe_and_quits_on_ctrl_c() {
    let (addr, url) = unreachable_url();
    let (mut feed, lines) = spawn_cli(
        &url,
        &[
            "feed",
            "--simulate",
            "--service",
            "fed",
            "--interval-ms",
            "50",
        ],
    );
    lines.wait_for("reconnecting note", |v| v["event"] == "reconnecting");
    // The server comes up at that address: the feed reaches it.
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::spawn_on(&addr.to_string(), dir.path(), &[], Stdio::null());
    lines.wait_for("feeding note", |v| v["event"] == "feeding");
    within("a sample from the feed", async {
        loop {
            let output = streamhub(&server.url(), &["--json", "snapshot", "fed"]).await;
            if output.status.success() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    ctrl_c(&feed);
    assert_eq!(exit_code(&mut feed).await, Some(0));
}

/// Sends `texts` to `room` as `sender` on one Chat call and waits until
/// each is acknowledged.
async fn chat_messages(url: String, room: &str, sender: &str, texts: &[String]) {
    use streamhub::proto::chat::{ChatMessage, chat_service_client::ChatServiceClient};
    let mut client = ChatServiceClient::new(common::connect(url).await);
    let messages: Vec<ChatMessage> = texts
        .iter()
        .map(|text| ChatMessage {
            sender: sender.into(),
            message: text.clone(),
            ..ChatMessage::default()
        })
        .collect();
    let mut request =
        tonic::Request::new(futures::stream::iter(messages).chain(futures::stream::pending()));
    request
        .metadata_mut()
        .insert("chat-room", room.parse().unwrap());
    let mut inbound = within("chat", client.chat(request))
        .await
        .unwrap()
        .into_inner();
    let mut acked = 0;
    while acked < texts.len() {
        let message = within("ack", inbound.message()).await.unwrap().unwrap();
        if message.sender == sender {
            acked += 1;
        }
    }
}

#[tokio::test]
async fn chat_history_with_no_input_prints_exactly_the_last_n_every_time() {
    let server = TestServer::start().await;
    let texts: Vec<String> = (1..=60).map(|i| format!("line {i}")).collect();
    chat_messages(server.url(), "hist", "ann", &texts).await;
    for run in 0..3 {
        let output = streamhub(
            &server.url(),
            &[
                "--json",
                "chat",
                "--name",
                "reader",
                "--quiet",
                "--room",
                "hist",
                "--history",
                "50",
            ],
        )
        .await;
        assert!(output.status.success(), "run {run}");
        let shown: Vec<String> = json_lines(&output)
            .into_iter()
            .filter(|v| v["kind"] == "member")
            .map(|v| v["message"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(shown, texts[10..], "run {run}");
    }
    // Fewer than asked for: all of them.
    chat_messages(server.url(), "short", "ann", &texts[..3]).await;
    let output = streamhub(
        &server.url(),
        &[
            "--json",
            "chat",
            "--name",
            "reader",
            "--quiet",
            "--room",
            "short",
            "--history",
            "50",
        ],
    )
    .await;
    assert_eq!(
        json_lines(&output)
            .iter()
            .filter(|v| v["kind"] == "member")
            .count(),
        3
    );
}

#[tokio::test]
async fn text_from_other_clients_reaches_the_terminal_escaped() {
    let server = TestServer::start().await;
    let hostile = "\u{1b}]0;owned\u{7}\u{1b}[2Jgone\r\u{202e}txt".to_owned();
    // Names with control characters are refused by the server; a
    // right-to-left override is not a control character, and still must
    // not reach the terminal as it is.
    chat_messages(
        server.url(),
        "esc",
        "eve\u{202e}x",
        std::slice::from_ref(&hostile),
    )
    .await;
    publish(server.url(), "svc\u{202e}1", 1.0).await;

    let chat = streamhub(
        &server.url(),
        &[
            "chat",
            "--name",
            "reader",
            "--quiet",
            "--room",
            "esc",
            "--history",
            "5",
        ],
    )
    .await;
    let services = streamhub(&server.url(), &["services"]).await;
    for output in [&chat, &services] {
        assert!(output.status.success());
        let text = stdout(output);
        assert!(
            !text.contains('\u{1b}') && !text.contains('\r') && !text.contains('\u{202e}'),
            "{text:?}"
        );
    }
    assert!(stdout(&chat).contains("\\u{1b}"), "{}", stdout(&chat));
    assert!(
        stdout(&services).contains("svc\\u{202e}1"),
        "{}",
        stdout(&services)
    );
    assert!(stdout(&chat).contains("eve\\u{202e}x"), "{}", stdout(&chat));
    // JSON keeps the text as it was (JSON escapes it itself).
    let json = streamhub(
        &server.url(),
        &[
            "--json",
            "chat",
            "--name",
            "reader",
            "--quiet",
            "--room",
            "esc",
            "--history",
            "5",
        ],
    )
    .await;
    assert!(
        json_lines(&json)
            .iter()
            .any(|v| v["message"] == hostile.as_str()),
        "{}",
        stdout(&json)
    );
}

#[tokio::test]
async fn server_urls_other_than_http_are_refused() {
    let server = TestServer::start().await;
    let plain = server.addr.to_string();
    for (url, expected) in [
        (format!("ftp://{plain}"), "scheme"),
        (format!("unix://{plain}"), "scheme"),
        (plain.clone(), "no scheme"),
    ] {
        let output = streamhub(&url, &["services"]).await;
        assert!(!output.status.success(), "{url}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{url}: {stderr}");
    }
    let localhost = format!("http://localhost:{}", server.addr.port());
    assert!(streamhub(&localhost, &["services"]).await.status.success());
}

#[tokio::test]
async fn a_closed_stdout_ends_a_client_quietly() {
    let server = TestServer::start().await;
    publish(server.url(), "svc", 1.0).await;
    let mut cli = std::process::Command::new(env!("CARGO_BIN_EXE_streamhub"))
        .args([
            "--server",
            &server.url(),
            "subscribe",
            "svc",
            "--interval-ms",
            "100",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `streamhub subscribe svc | head -1`.
    let stdout = cli.stdout.take().unwrap();
    // Read on a blocking thread: the server runs on this test's runtime.
    let first = within(
        "the first line",
        tokio::task::spawn_blocking(move || {
            let mut first = String::new();
            BufReader::new(stdout).read_line(&mut first).unwrap();
            first
        }),
    )
    .await
    .unwrap();
    assert!(first.contains("svc"), "{first}");
    let mut stderr = cli.stderr.take().unwrap();
    let mut cpu = 2.0;
    let code = within("the CLI to exit", async {
        loop {
            if let Some(status) = cli.try_wait().unwrap() {
                return status.code();
            }
            publish(server.url(), "svc", cpu).await;
            cpu += 1.0;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let mut errors = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut errors).unwrap();
    assert_eq!(code, Some(0), "{errors}");
    assert!(!errors.contains("panicked"), "{errors}");
}

/// Runs `streamhub ARGS...` with `env` set and RUST_BACKTRACE as given,
/// stdin closed.
async fn streamhub_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let child = Command::new(env!("CARGO_BIN_EXE_streamhub"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output();
    within("the CLI", child).await.unwrap()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A server on a TLS port (self-signed certificate for localhost); the
/// directory holding its files must outlive it.
async fn tls_server() -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.path().join("c.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("k.pem"), cert.signing_key.serialize_pem()).unwrap();
    let mut config = test_config();
    config.tls.cert = Some(dir.path().join("c.pem"));
    config.tls.key = Some(dir.path().join("k.pem"));
    (TestServer::start_with(config).await, dir)
}

#[tokio::test]
async fn a_url_whose_scheme_the_port_does_not_speak_says_which_to_use() {
    let (tls, _files) = tls_server().await;
    let plain = TestServer::start().await;
    let tls_port = tls.url().replace("http://", "");
    let plain_port = plain.url().replace("http://", "");
    // http:// to the TLS port, one-shot and long-running commands alike.
    for args in [
        vec!["services"],
        vec!["files"],
        vec!["subscribe", "x"],
        vec!["chat", "--name", "z"],
    ] {
        let mut all = vec!["--server".to_owned(), format!("http://{tls_port}")];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let output = streamhub_env(&all, &[]).await;
        assert!(!output.status.success(), "{args:?}");
        let err = stderr(&output);
        assert!(
            err.contains(&format!("speaks TLS; use https://{tls_port}")),
            "{args:?}: {err}"
        );
    }
    // https:// to the plaintext port.
    for args in [vec!["services"], vec!["subscribe", "x"]] {
        let mut all = vec!["--server".to_owned(), format!("https://{plain_port}")];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let output = streamhub_env(&all, &[]).await;
        assert!(!output.status.success(), "{args:?}");
        let err = stderr(&output);
        assert!(
            err.contains("does not speak TLS") && err.contains(&format!("use http://{plain_port}")),
            "{args:?}: {err}"
        );
    }
}

#[tokio::test]
async fn errors_print_once_without_a_backtrace_whatever_rust_backtrace_says() {
    let (_, unreachable) = unreachable_url();
    let client = streamhub_env(
        &["--server", &unreachable, "services"],
        &[("RUST_BACKTRACE", "1")],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "listen = 5\n").unwrap();
    let serve = streamhub_env(
        &["serve", "--config", bad.to_str().unwrap()],
        &[("RUST_BACKTRACE", "1")],
    )
    .await;
    for output in [&client, &serve] {
        assert_eq!(output.status.code(), Some(1));
        let err = stderr(output);
        assert!(err.starts_with("error: "), "{err}");
        assert!(
            !err.contains("backtrace") && !err.contains("Caused by"),
            "{err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    assert!(stderr(&client).contains("cannot connect to"));
    // What a refused connection means, said once.
    let err = stderr(&client);
    assert!(
        err.contains("nothing is listening there") && err.contains("streamhub serve"),
        "{err}"
    );
    assert!(!err.contains("tcp connect error"), "{err}");
}

#[tokio::test]
async fn configuration_errors_name_the_file_or_variable_the_key_and_what_was_expected() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "listen = 5\n").unwrap();
    let file = streamhub_env(&["serve", "--config", bad.to_str().unwrap()], &[]).await;
    let err = stderr(&file);
    assert!(
        err.contains(
            "bad.toml: key `listen`: invalid type: found signed int `5`, expected a string"
        ),
        "{err}"
    );
    let env = streamhub_env(&["serve"], &[("STREAMHUB_LIMITS__MAX_CONNECTIONS", "many")]).await;
    let err = stderr(&env);
    assert!(
        err.contains("environment variable STREAMHUB_LIMITS__MAX_CONNECTIONS: invalid type"),
        "{err}"
    );
    let set = streamhub_env(&["serve", "--set", "limits.max_connections=many"], &[]).await;
    let err = stderr(&set);
    assert!(
        err.contains("--set limits.max_connections: invalid type"),
        "{err}"
    );
    for output in [&file, &env, &set] {
        let err = stderr(output);
        assert!(!err.contains("default."), "figment's profile in {err}");
        assert_eq!(err.matches("invalid type").count(), 1, "said twice: {err}");
    }

    // An unknown nested key is named once (not `telemetry.typo.typo`), from
    // each source, with the valid keys of its table in plain backticks.
    let nested = dir.path().join("nested.toml");
    std::fs::write(&nested, "[telemetry]\nmax_servics = 5\n").unwrap();
    let unknown = [
        (
            streamhub_env(&["serve", "--config", nested.to_str().unwrap()], &[]).await,
            "nested.toml: key `telemetry.max_servics`: unknown key `max_servics`",
        ),
        (
            streamhub_env(&["serve"], &[("STREAMHUB_TELEMETRY__TYPO", "1")]).await,
            "environment variable STREAMHUB_TELEMETRY__TYPO: unknown key `typo`",
        ),
        (
            streamhub_env(&["serve", "--set", "telemetry.max_servics=5"], &[]).await,
            "--set telemetry.max_servics: unknown key `max_servics`",
        ),
    ];
    for (output, expected) in &unknown {
        let err = stderr(output);
        assert_eq!(output.status.code(), Some(1), "{err}");
        assert!(err.contains(expected), "{err}");
        assert!(err.contains("`max_services`, "), "{err}");
        assert!(!err.contains("``") && !err.contains("`one of"), "{err}");
    }
    // A duration given as a bare number shows how one is written.
    let duration = streamhub_env(&["serve", "--set", "limits.idle_timeout=5"], &[]).await;
    let err = stderr(&duration);
    assert!(err.contains("--set limits.idle_timeout: "), "{err}");
    assert!(err.contains("`5s`"), "{err}");
}

#[tokio::test]
async fn a_server_that_cannot_reach_nats_says_why_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = format!("data_dir={}", dir.path().display());
    let output = streamhub_env(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--set",
            &data,
            // Port 1: nothing listens there.
            "--set",
            "cluster.nats=[\"nats://127.0.0.1:1\"]",
        ],
        &[],
    )
    .await;
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("cannot connect to NATS").count(), 1, "{err}");
    assert_eq!(err.matches("Connection refused").count(), 1, "{err}");
}

#[tokio::test]
async fn serve_help_lists_only_serves_own_flags_and_refuses_client_flags() {
    let help = streamhub_env(&["serve", "--help"], &[]).await;
    let text = stdout(&help);
    assert!(text.contains("--listen"), "{text}");
    for flag in [
        "--server",
        "--token",
        "--token-file",
        "--ca",
        "--cert ",
        "--key ",
        "--json",
    ] {
        assert!(!text.contains(flag), "{flag} in serve --help:\n{text}");
    }
    // Client subcommands still list (and take) them, before or after.
    let help = stdout(&streamhub_env(&["subscribe", "--help"], &[]).await);
    for flag in ["--server", "--token", "--ca", "--json"] {
        assert!(help.contains(flag), "{flag} missing:\n{help}");
    }
    let refused = streamhub_env(&["serve", "--server", "http://127.0.0.1:1"], &[]).await;
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("not of serve"),
        "{}",
        stderr(&refused)
    );
}

#[tokio::test]
async fn empty_environment_variables_count_as_unset() {
    let server = TestServer::start().await;
    let output = streamhub_env(
        &["services"],
        &[
            ("STREAMHUB_SERVER", &server.url()),
            ("STREAMHUB_TOKEN", ""),
            ("STREAMHUB_TOKEN_FILE", ""),
            ("STREAMHUB_CA", ""),
        ],
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    // The server's own settings too: `STREAMHUB_LISTEN=` is the default.
    let serve = streamhub_env(
        &["serve", "--print-config"],
        &[("STREAMHUB_LISTEN", ""), ("STREAMHUB_DRAIN_TIMEOUT", "")],
    )
    .await;
    assert!(serve.status.success(), "{}", stderr(&serve));
    assert!(
        stdout(&serve).contains("listen = \"127.0.0.1:50051\""),
        "{}",
        stdout(&serve)
    );
    let chat = streamhub_env(
        &[
            "--server",
            &server.url(),
            "chat",
            "--name",
            "z",
            "--history",
            "1",
        ],
        &[("STREAMHUB_CHAT_ROOM", "")],
    )
    .await;
    assert!(chat.status.success(), "{}", stderr(&chat));
}

#[tokio::test]
async fn chat_reading_history_fails_loudly_when_the_server_cannot_answer() {
    // Nothing listens on this port: a history read with empty input must
    // say it failed and exit 1, not print nothing and exit 0 as if the
    // room were empty (found by the new-user pass against a node that was
    // down or cut off from NATS).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let output = streamhub(
        &url,
        &["chat", "--name", "eve", "--room", "dev", "--history", "2"],
    )
    .await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("\"dev\""), "{err}");
}

#[tokio::test]
async fn chat_with_empty_input_shows_history_without_joining() {
    use streamhub::proto::chat::{ChatMessage, chat_service_client::ChatServiceClient};
    let server = TestServer::start().await;
    chat_messages(server.url(), "quiet", "ann", &["hello".to_owned()]).await;
    let mut watcher = ChatServiceClient::new(common::connect(server.url()).await);
    // A member watching the room sees every join and leave.
    let mut request = tonic::Request::new(futures::stream::pending::<ChatMessage>());
    request
        .metadata_mut()
        .insert("chat-room", "quiet".parse().unwrap());
    request
        .metadata_mut()
        .insert("chat-member", "watcher".parse().unwrap());
    let mut inbound = watcher.chat(request).await.unwrap().into_inner();
    for _ in 0..3 {
        let output = streamhub_env(
            &[
                "--server",
                &server.url(),
                "--json",
                "chat",
                "--name",
                "reader",
                "--room",
                "quiet",
                "--history",
                "5",
            ],
            &[],
        )
        .await;
        assert!(output.status.success(), "{}", stderr(&output));
        let lines = json_lines(&output);
        assert!(
            lines.iter().any(|v| v["message"] == "hello"),
            "history: {lines:?}"
        );
        assert!(
            !lines.iter().any(|v| v["sender"] == "reader"),
            "joined: {lines:?}"
        );
    }
    // Then a member that does say something: the watcher's next event is
    // its join, not one of the readers'.
    chat_messages(server.url(), "quiet", "bob", &["hi".to_owned()]).await;
    loop {
        let message = within("the next message", inbound.message())
            .await
            .unwrap()
            .unwrap();
        assert_ne!(message.sender, "reader", "{message:?}");
        if message.sender == "bob" {
            break;
        }
    }
}

#[tokio::test]
async fn an_empty_list_says_when_nothing_is_visible_to_this_identity() {
    let token = "tok-files-only";
    let mut config = test_config();
    config.auth = streamhub::auth::AuthConfig {
        tokens: vec![streamhub::auth::TokenEntry {
            identity: "filer".into(),
            sha256: hex::encode(streamhub::auth::token::digest(token)),
            scopes: vec!["upload:read:rep*".into()],
        }],
        ..streamhub::auth::AuthConfig::default()
    };
    let server = TestServer::start_with(config).await;
    let services = streamhub_env(
        &["--server", &server.url(), "--token", token, "services"],
        &[],
    )
    .await;
    let text = stdout(&services);
    assert!(text.contains("no services visible to \"filer\""), "{text}");
    assert!(text.contains("telemetry:read:*"), "{text}");
    let files = streamhub_env(&["--server", &server.url(), "--token", token, "files"], &[]).await;
    let text = stdout(&files);
    assert!(
        text.contains("no files visible to \"filer\"") && text.contains("upload:read:rep*"),
        "{text}"
    );
    // Without authentication an empty list is just empty.
    let open = TestServer::start().await;
    let text = stdout(&streamhub(&open.url(), &["services"]).await);
    assert!(text.contains("no services have reported yet"), "{text}");
}

// Multi-threaded: the in-process server keeps serving while this thread
// blocks reading the CLI's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_to_a_name_that_has_not_reported_says_it_is_waiting() {
    let server = TestServer::start().await;
    let (mut subscribe, lines) = spawn_cli(&server.url(), &["subscribe", "not-yet"]);
    let note = lines.wait_for("a waiting note", |v| v["event"] == "waiting");
    assert!(
        note["message"]
            .as_str()
            .unwrap()
            .contains("\"not-yet\" has not reported yet"),
        "{note}"
    );
    ctrl_c(&subscribe);
    assert_eq!(exit_code(&mut subscribe).await, Some(0));
}

// Multi-threaded: the in-process server keeps serving while this thread
// blocks reading the CLI's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_names_the_server_it_lost_after_failing_over() {
    // The first URL is down, so the CLI fails over to the second; when
    // that one goes, the note names it (it named the first URL, which the
    // CLI had not been connected to: new-user pass).
    let (_, down) = unreachable_url();
    let server = TestServer::start().await;
    publish(server.url(), "svc", 1.0).await;
    let urls = format!("{down},{}", server.url());
    let (mut subscribe, lines) = spawn_cli(&urls, &["subscribe", "svc"]);
    lines.wait_for("a sample", |v| v["service"] == "svc");
    let live = server.url();
    server.stop().await;
    let note = lines.wait_for("a reconnecting note", |v| v["event"] == "reconnecting");
    let message = note["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!("connection to {live} lost")),
        "{note}"
    );
    ctrl_c(&subscribe);
    assert_eq!(exit_code(&mut subscribe).await, Some(0));
}
