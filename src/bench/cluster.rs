//! Scenario "cluster" (issue 14): what the NATS hop costs.
//!
//! In one run, each layout on fresh processes (a nats-server with
//! JetStream, `nats-server -js`, and streamhub nodes started with
//! `serve --cluster nats://…`):
//! - *embedded*: one streamhub without `--cluster` (the in-process broker),
//!   the reference;
//! - *1 node*: one streamhub node of a cluster, every client on it;
//! - *3 nodes*: three nodes, the clients' connections spread over them in
//!   turn (the publisher and the chat senders on the first).
//!
//! Fan-out (`--subscribers`, as the fan-out scenario: reach, then
//! saturation) and the chat ladder (`--chat-rates`, publish-to-receipt
//! latency of every member). Every server process (the nodes and
//! nats-server) is pinned to the server's cores (`--server-cpus`), so all
//! layouts get the same CPU; "server CPU" is the sum over all of them, and
//! deliveries per server core divides deliveries per second by it.

use std::{path::PathBuf, time::Duration};

use super::{
    BenchError, Options, Target, chat, fanout,
    harness::{Check, Metrics, Pinning, ProcReader, Row, ServerUnderTest, bench_dir, ratio},
};

/// The layouts measured, as named in the results: (name, nodes, cluster).
const LAYOUTS: [(&str, usize, bool); 3] = [
    ("embedded", 1, false),
    ("1 node", 1, true),
    ("3 nodes", 3, true),
];

/// A nats-server with JetStream and the streamhub nodes using it.
struct Layout {
    nats: Option<ServerUnderTest>,
    nodes: Vec<ServerUnderTest>,
}

impl Layout {
    async fn start(
        nodes: usize,
        cluster: bool,
        options: &Options,
        pinning: &Pinning,
    ) -> Result<Self, BenchError> {
        let mut layout = Self {
            nats: None,
            nodes: Vec::new(),
        };
        let mut o = options.clone();
        o.targets = vec![Target::Streamhub];
        o.external = false;
        if cluster {
            let dir = bench_dir("nats-js")?;
            let store = dir.join("js");
            let args = vec![
                "-a".to_owned(),
                "127.0.0.1".to_owned(),
                "-p".to_owned(),
                "-1".to_owned(),
                "-js".to_owned(),
                "-sd".to_owned(),
                store.display().to_string(),
            ];
            let nats = ServerUnderTest::spawn(
                "nats-server",
                &PathBuf::from("nats-server"),
                &args,
                dir,
                options,
                pinning,
                true,
            )
            .await?;
            o.cluster_nats = vec![format!("nats://{}", nats.addr)];
            layout.nats = Some(nats);
        }
        for _ in 0..nodes {
            match ServerUnderTest::start(Target::Streamhub, &o, pinning).await {
                Ok(node) => layout.nodes.push(node),
                Err(err) => {
                    layout.stop().await;
                    return Err(err);
                }
            }
        }
        Ok(layout)
    }

    fn addrs(&self) -> Vec<std::net::SocketAddr> {
        self.nodes.iter().map(|n| n.addr).collect()
    }

    /// A reader of the CPU and memory of every server process.
    async fn proc(&self) -> Option<ProcReader> {
        let pids: Option<Vec<u32>> = self
            .nodes
            .iter()
            .chain(self.nats.iter())
            .map(|s| s.pid)
            .collect();
        match pids {
            Some(pids) => Some(ProcReader::group(&pids).await),
            None => None,
        }
    }

    async fn stop(self) {
        for node in self.nodes {
            node.stop().await;
        }
        if let Some(nats) = self.nats {
            nats.stop().await;
        }
    }
}

/// Runs the scenario.
pub async fn run(
    options: &Options,
    pinning: &Pinning,
) -> Result<(serde_json::Value, Vec<Row>, Vec<Check>), BenchError> {
    let mut rows = Vec::new();
    // Fan-out: layouts alternate within each repetition.
    for &n in &options.subscribers {
        let mut runs: Vec<Vec<Metrics>> = vec![Vec::new(); LAYOUTS.len()];
        let mut failures: Vec<Option<BenchError>> = (0..LAYOUTS.len()).map(|_| None).collect();
        for rep in 0..options.repetitions {
            for (i, (name, nodes, cluster)) in LAYOUTS.iter().enumerate() {
                if failures[i].is_some() {
                    continue;
                }
                tracing::info!(layout = name, subscribers = n, rep, "cluster: fan-out run");
                let result = async {
                    let layout = Layout::start(*nodes, *cluster, options, pinning).await?;
                    // Let the nodes settle on NATS (streams, buckets).
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let result = fanout::measure_on(
                        &layout.addrs(),
                        layout.proc().await,
                        Target::Streamhub,
                        n,
                        options,
                    )
                    .await;
                    layout.stop().await;
                    result
                }
                .await;
                match result {
                    Ok(mut m) => {
                        per_core(&mut m);
                        runs[i].push(m);
                    }
                    Err(err) => {
                        tracing::warn!(layout = name, %err, "cluster: fan-out run failed");
                        failures[i] = Some(err);
                    }
                }
            }
        }
        for (i, (name, _, _)) in LAYOUTS.iter().enumerate() {
            let config = [
                ("part", "fanout".to_owned()),
                ("layout", (*name).to_owned()),
                ("subscribers", n.to_string()),
            ];
            let r = std::mem::take(&mut runs[i]);
            rows.push(match (&failures[i], r.is_empty()) {
                (Some(err), true) => Row::failed("streamhub", &config, err),
                _ => Row::new("streamhub", &config, r),
            });
        }
    }

    // Chat: one ladder per layout and repetition.
    for (name, nodes, cluster) in LAYOUTS {
        let mut steps: Vec<Vec<Metrics>> = vec![Vec::new(); options.chat_rates.len()];
        let mut failure = None;
        for rep in 0..options.repetitions {
            tracing::info!(layout = name, rep, "cluster: chat ladder");
            let result = async {
                let layout = Layout::start(nodes, cluster, options, pinning).await?;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let result =
                    chat::ladder_on_addrs(&layout.addrs(), layout.proc().await, options).await;
                layout.stop().await;
                result
            }
            .await;
            match result {
                Ok(ms) => {
                    for (slot, m) in steps.iter_mut().zip(ms) {
                        slot.push(m);
                    }
                }
                Err(err) => {
                    tracing::warn!(layout = name, %err, "cluster: chat ladder failed");
                    failure = Some(err);
                    break;
                }
            }
        }
        for (i, &rate) in options.chat_rates.iter().enumerate() {
            let config = [
                ("part", "chat".to_owned()),
                ("layout", name.to_owned()),
                ("rate", rate.to_string()),
            ];
            let r = std::mem::take(&mut steps[i]);
            rows.push(match (&failure, r.is_empty()) {
                (Some(err), true) => Row::failed("streamhub", &config, err),
                (None, true) => Row::failed(
                    "streamhub",
                    &config,
                    &BenchError::Setup("not reached: an earlier rate saturated".into()),
                ),
                _ => Row::new("streamhub", &config, r),
            });
        }
    }

    let checks = checks(&rows, options);
    let settings = serde_json::json!({
        "subscribers": options.subscribers,
        "per_connection": options.per_connection,
        "rounds": options.rounds,
        "saturation_s": options.saturation,
        "pipeline": options.pipeline,
        "chat_members": options.members,
        "chat_senders": options.senders,
        "chat_per_connection": options.chat_per_connection,
        "chat_rates": options.chat_rates,
        "step_seconds": options.step_seconds,
        "repetitions": options.repetitions,
        "nats": "nats-server -js (Debian), one server, on the server cores with the nodes",
        "server_cpus": options.server_cpus,
        "spread": "connections assigned to the nodes in turn; publisher and chat senders on the first node",
    });
    Ok((settings, rows, checks))
}

/// Adds deliveries per second per server core (server CPU summed over
/// every server process).
fn per_core(m: &mut Metrics) {
    if let (Some(&d), Some(&cpu)) = (m.get("deliveries_per_s"), m.get("server_cpu_pct"))
        && cpu > 0.0
    {
        m.insert("deliveries_per_core_s".into(), d / (cpu / 100.0));
    }
}

fn checks(rows: &[Row], options: &Options) -> Vec<Check> {
    let get = |part: &str, layout: &str, key: &str, value: &str, metric: &str| {
        rows.iter()
            .find(|r| r.is("part", part) && r.is("layout", layout) && r.is(key, value))
            .and_then(|r| r.get(metric))
    };
    let mut checks = Vec::new();
    for &n in &options.subscribers {
        let n = n.to_string();
        checks.push(Check::at_least(
            format!("{n} subscribers: deliveries/s per server core, 3 nodes / 1 node"),
            ratio(
                get(
                    "fanout",
                    "3 nodes",
                    "subscribers",
                    &n,
                    "deliveries_per_core_s",
                ),
                get(
                    "fanout",
                    "1 node",
                    "subscribers",
                    &n,
                    "deliveries_per_core_s",
                ),
            ),
            2.0,
        ));
    }
    if let Some(rate) = options.chat_rates.first() {
        let rate = rate.to_string();
        let p50 = |layout: &str| get("chat", layout, "rate", &rate, "latency_p50_us");
        let added = match (p50("3 nodes"), p50("1 node")) {
            (Some(a), Some(b)) => Some(a - b),
            _ => None,
        };
        checks.push(Check::at_most(
            format!("chat at {rate} msgs/s: p50 added by the hop (3 nodes − 1 node), µs"),
            added,
            2000.0,
        ));
    }
    checks
}
