//! Smoke test of the benchmark suite: every scenario at a tiny scale,
//! against servers the suite starts itself (streamhub, the Python and Node
//! peers, nats-server, iperf3), checking that the JSON results are well-formed.
//! It asserts no timings: only that every row was measured and counted
//! something.
//!
//! Needs the peers, nats-server and iperf3 installed, as `./scripts/test`
//! does. Without them (a machine with only the Rust toolchain, plain
//! `cargo test`) each test says on stderr what it is missing and is skipped;
//! with `STREAMHUB_REQUIRE_ALL=1` (set by `./scripts/test`, so by CI) a
//! missing piece fails the test instead.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

/// What a scenario needs beyond the Rust toolchain.
#[derive(Debug, Clone, Copy)]
enum Need {
    /// The Python reference peer (`bench/peers/setup.sh`).
    Python,
    /// The Node reference peer (`bench/peers/setup.sh`, and `node`).
    Node,
    /// `nats-server` on the PATH.
    Nats,
    /// `iperf3` on the PATH.
    Iperf3,
}

/// The environment variable that turns a skip into a failure.
const REQUIRE_ALL: &str = "STREAMHUB_REQUIRE_ALL";

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/peers")
}

/// Why `need` is not met, if it is not.
fn missing(need: Need) -> Option<String> {
    let peers = peers_dir();
    let ok = match need {
        Need::Python => {
            peers.join("python/.venv/bin/python").is_file() && peers.join("python/gen").is_dir()
        }
        Need::Node => on_path("node") && peers.join("node/node_modules").is_dir(),
        Need::Nats => on_path("nats-server"),
        Need::Iperf3 => on_path("iperf3"),
    };
    (!ok).then(|| match need {
        Need::Python => "the Python peer (run bench/peers/setup.sh)".to_owned(),
        Need::Node => "node and the Node peer (run bench/peers/setup.sh)".to_owned(),
        Need::Nats => "nats-server on the PATH".to_owned(),
        Need::Iperf3 => "iperf3 on the PATH".to_owned(),
    })
}

/// Whether `test` can run: if something in `needs` is missing it says so
/// on stderr and returns false (the test then returns, skipped), or fails
/// when `STREAMHUB_REQUIRE_ALL=1`.
fn ready(test: &str, needs: &[Need]) -> bool {
    let absent: Vec<String> = needs.iter().filter_map(|need| missing(*need)).collect();
    if absent.is_empty() {
        return true;
    }
    let why = format!(
        "bench_smoke::{test} needs {}; ./scripts/test installs them",
        absent.join(", ")
    );
    assert!(
        std::env::var(REQUIRE_ALL).map_or(true, |v| v.is_empty() || v == "0"),
        "{why} ({REQUIRE_ALL} is set, so nothing may be skipped)"
    );
    // Straight to the process's stderr: libtest captures `eprintln!`, and
    // a skip must be seen without --nocapture.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("SKIPPED: {why}\n").as_bytes(),
    );
    false
}

/// Runs `streamhub bench SCENARIO ARGS...` and returns its parsed results.
fn bench(scenario: &str, args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join(format!("{scenario}.json"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(env!("CARGO_BIN_EXE_streamhub"))
        .current_dir(root)
        .arg("bench")
        .arg(scenario)
        .args(["--repetitions", "1", "--no-pin", "--setup-timeout", "30"])
        .args(args)
        .arg("--out")
        .arg(&out)
        .env("RUST_LOG", "warn")
        .output()
        .expect("streamhub bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "bench {scenario} failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("results written to"), "{stdout}");
    let text = std::fs::read_to_string(&out).expect("results file written");
    serde_json::from_str(&text).expect("results are JSON")
}

/// Checks the report's common fields and returns its rows.
fn rows<'a>(report: &'a Value, scenario: &str) -> &'a Vec<Value> {
    assert_eq!(report["scenario"], scenario);
    for field in ["started_at", "machine", "pinning", "settings", "command"] {
        assert!(!report[field].is_null(), "{field} missing");
    }
    assert!(report["machine"]["nproc"].as_u64().unwrap() >= 1);
    assert!(report["checks"].as_array().is_some_and(|c| !c.is_empty()));
    for check in report["checks"].as_array().unwrap() {
        assert!(check["name"].is_string() && check["goal"].is_string());
        assert!(check["met"].is_boolean());
    }
    report["rows"].as_array().expect("rows")
}

/// Asserts every row was measured, with `keys` present and `positive`
/// above zero in its medians and its single run.
fn measured(row: &Value, keys: &[&str], positive: &[&str]) {
    assert!(row["error"].is_null(), "row failed: {row}");
    assert_eq!(row["runs"].as_array().unwrap().len(), 1, "{row}");
    for key in keys {
        assert!(row["median"][key].is_number(), "{key} missing in {row}");
    }
    for key in positive {
        assert!(
            row["median"][key].as_f64().unwrap() > 0.0,
            "{key} is not above zero in {row}"
        );
    }
}

fn targets(rows: &[Value]) -> Vec<&str> {
    let mut names: Vec<&str> = Vec::new();
    for name in rows.iter().map(|r| r["target"].as_str().unwrap()) {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

#[test]
fn polling_versus_streaming() {
    if !ready("polling_versus_streaming", &[Need::Python, Need::Node]) {
        return;
    }
    let report = bench(
        "polling",
        &[
            "--clients",
            "5",
            "--warmup",
            "0.3",
            "--duration",
            "1",
            "--quiet-duration",
            "1",
            "--poll-ms",
            "200",
            "--report-ms",
            "200",
            "--quiet-report-ms",
            "500",
        ],
    );
    let rows = rows(&report, "polling");
    assert_eq!(rows.len(), 12, "3 targets x 2 variants x 2 modes");
    assert_eq!(targets(rows), ["streamhub", "python", "node"]);
    for row in rows {
        measured(
            row,
            &[
                "updates",
                "calls",
                "wire_bytes",
                "bytes_per_update",
                "server_cpu_ms",
            ],
            &["updates", "wire_bytes", "bytes_per_update"],
        );
        // Streamers make their one call before the measured window.
        if row["config"]["mode"] == "polling" {
            assert!(row["median"]["calls"].as_f64().unwrap() > 0.0, "{row}");
        }
    }
}

#[test]
fn fan_out_with_peers_and_nats() {
    if !ready(
        "fan_out_with_peers_and_nats",
        &[Need::Python, Need::Node, Need::Nats],
    ) {
        return;
    }
    let report = bench(
        "fanout",
        &[
            "--subscribers",
            "5",
            "--per-connection",
            "3",
            "--python-per-connection",
            "3",
            "--rounds",
            "2",
            "--saturation",
            "0.5",
        ],
    );
    let rows = rows(&report, "fanout");
    assert_eq!(targets(rows), ["streamhub", "python", "node", "nats"]);
    for row in rows {
        measured(
            row,
            &[
                "reach_p50_us",
                "reach_p99_us",
                "reach_max_us",
                "mem_per_sub_bytes",
                "server_cpu_pct",
                "load_cpu_pct",
            ],
            &["held", "deliveries_per_s", "reach_count", "samples_per_s"],
        );
        // 5 subscribers over connections of at most 3.
        assert_eq!(row["median"]["connections"], 2.0, "{row}");
        assert_eq!(row["median"]["held"], 5.0, "{row}");
    }
}

#[test]
fn upload_next_to_iperf3_and_dd() {
    if !ready(
        "upload_next_to_iperf3_and_dd",
        &[Need::Python, Need::Node, Need::Iperf3],
    ) {
        return;
    }
    let report = bench(
        "upload",
        &[
            "--upload-mib",
            "2",
            "--big-upload-mib",
            "4",
            "--chunk-sizes",
            "16KiB,64KiB",
            "--iperf-seconds",
            "1",
        ],
    );
    let rows = rows(&report, "upload");
    assert_eq!(
        targets(rows),
        [
            "iperf3",
            "dd",
            "sha256",
            "store",
            "streamhub",
            "python",
            "node"
        ]
    );
    // iperf3, dd x 2, sha256, store x 2, 3 targets x 2 storages x 2 chunk
    // sizes, 3 big uploads.
    assert_eq!(rows.len(), 1 + 2 + 1 + 2 + 12 + 3);
    for row in rows {
        measured(row, &["mib_per_s"], &["mib_per_s"]);
        if !["iperf3", "dd", "sha256", "store"].contains(&row["target"].as_str().unwrap()) {
            measured(
                row,
                &["server_hwm_kib", "seconds"],
                &["server_hwm_kib", "bytes"],
            );
        }
    }
}

#[test]
fn chat_room_at_two_rates() {
    if !ready("chat_room_at_two_rates", &[Need::Python, Need::Node]) {
        return;
    }
    let report = bench(
        "chat",
        &[
            "--members",
            "6",
            "--senders",
            "2",
            "--chat-per-connection",
            "4",
            "--chat-rates",
            "10,20",
            "--step-seconds",
            "0.5",
        ],
    );
    let rows = rows(&report, "chat");
    assert_eq!(targets(rows), ["streamhub", "python", "node"]);
    assert_eq!(rows.len(), 3 * 3, "a summary and two rates per target");
    for row in rows {
        if row["config"]["rate"] == "summary" {
            assert!(row["error"].is_null(), "{row}");
            continue;
        }
        measured(
            row,
            &["latency_p50_us", "latency_p99_us", "members_cut_off"],
            &["sent", "acked_per_s", "deliveries_per_s", "latency_count"],
        );
    }
}

#[test]
fn latency_floor_next_to_tcp() {
    if !ready("latency_floor_next_to_tcp", &[Need::Python, Need::Node]) {
        return;
    }
    let report = bench("latency", &["--samples", "10", "--max-seconds", "2"]);
    let rows = rows(&report, "latency");
    assert_eq!(targets(rows), ["streamhub", "python", "node", "tcp"]);
    for row in rows {
        measured(
            row,
            &["latency_p50_us", "latency_p99_us", "latency_max_us"],
            &["latency_count", "latency_p50_us"],
        );
    }
}

#[test]
fn security_plaintext_versus_tls_and_token() {
    // streamhub alone: needs nothing beyond the Rust toolchain.
    let report = bench(
        "security",
        &[
            "--subscribers",
            "5",
            "--per-connection",
            "3",
            "--rounds",
            "2",
            "--saturation",
            "0.5",
            "--upload-mib",
            "2",
            "--members",
            "6",
            "--senders",
            "2",
            "--chat-per-connection",
            "4",
            "--chat-rates",
            "10",
            "--step-seconds",
            "0.5",
        ],
    );
    let rows = rows(&report, "security");
    assert_eq!(targets(rows), ["streamhub"]);
    // fan-out, upload on disk and tmpfs, chat at one rate; each both ways.
    assert_eq!(rows.len(), 2 * 4, "{rows:?}");
    for mode in ["plaintext", "tls+token"] {
        let row = |part: &str, key: &str, value: &str| {
            rows.iter()
                .find(|r| {
                    r["config"]["part"] == part
                        && r["config"]["security"] == mode
                        && r["config"][key] == value
                })
                .unwrap_or_else(|| panic!("no {part} row for {mode}"))
        };
        measured(
            row("fanout", "subscribers", "5"),
            &["reach_p99_us"],
            &["deliveries_per_s"],
        );
        measured(
            row("upload", "storage", "disk"),
            &["seconds"],
            &["mib_per_s"],
        );
        measured(
            row("upload", "storage", "tmpfs"),
            &["seconds"],
            &["mib_per_s"],
        );
        measured(
            row("chat", "rate", "10"),
            &["latency_p50_us"],
            &["acked_per_s", "deliveries_per_s"],
        );
    }
    assert!(report["checks"].as_array().unwrap().len() >= 3);
}

#[test]
fn dashboard_watch_over_grpc_web_next_to_subscribe() {
    // streamhub alone: needs nothing beyond the Rust toolchain.
    let report = bench(
        "dashboard",
        &[
            "--dashboards",
            "2",
            "--services",
            "5",
            "--report-ms",
            "200",
            "--per-connection",
            "4",
            "--warmup",
            "0.3",
            "--duration",
            "1",
        ],
    );
    let rows = rows(&report, "dashboard");
    assert_eq!(targets(rows), ["streamhub"]);
    let modes: Vec<&str> = rows
        .iter()
        .map(|r| r["config"]["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["subscribe", "watch-h2", "watch-grpc-web"]);
    for row in rows {
        measured(
            row,
            &["cpu_us_per_sample", "server_cpu_pct", "errors"],
            &["samples", "samples_per_s", "expected_per_s"],
        );
        assert_eq!(row["median"]["errors"].as_f64().unwrap(), 0.0, "{row}");
    }
}

#[test]
fn cluster_three_nodes_next_to_one() {
    if !ready("cluster_three_nodes_next_to_one", &[Need::Nats]) {
        return;
    }
    let report = bench(
        "cluster",
        &[
            "--subscribers",
            "6",
            "--per-connection",
            "2",
            "--rounds",
            "2",
            "--saturation",
            "0.5",
            "--members",
            "6",
            "--senders",
            "2",
            "--chat-per-connection",
            "2",
            "--chat-rates",
            "10",
            "--step-seconds",
            "0.5",
            "--node-cpu-quota",
            "0.5",
        ],
    );
    let rows = rows(&report, "cluster");
    assert_eq!(targets(rows), ["streamhub"]);
    assert_eq!(
        rows.len(),
        2 * 3 + 2,
        "fan-out and chat per layout, fan-out with the quota on 1 and 3 nodes: {rows:?}"
    );
    for row in rows {
        let layout = row["config"]["layout"].as_str().unwrap();
        if layout.contains("0.5 core") && !row["error"].is_null() {
            // Without root or a cgroup cpu controller the quota rows say
            // why they were not measured.
            let error = row["error"].as_str().unwrap();
            assert!(error.contains("cgroup"), "{row}");
            continue;
        }
        if row["config"]["part"] == "fanout" {
            measured(
                row,
                &["reach_p99_us", "server_cpu_pct"],
                &["deliveries_per_s", "deliveries_per_core_s"],
            );
        } else {
            measured(
                row,
                &["latency_p50_us", "latency_p99_us"],
                &["acked_per_s", "deliveries_per_s"],
            );
        }
    }
}
