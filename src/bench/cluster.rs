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
//!
//! With `--node-cpu-quota Q`, fan-out is also measured with one and three
//! nodes each held to Q of a core by a CFS quota (a cgroup per node): the
//! three then have three times the CPU of the one, as on machines of their
//! own, which on a two-core machine is the only way to see whether adding
//! nodes adds deliveries.

use std::{path::PathBuf, time::Duration};

use super::{
    BenchError, Options, Target, chat, fanout,
    harness::{Check, Metrics, Pinning, ProcReader, Row, ServerUnderTest, bench_dir, ratio},
};

/// One layout measured, as named in the results.
#[derive(Debug, Clone)]
struct Spec {
    name: String,
    nodes: usize,
    /// On NATS (`--cluster`), or the embedded broker.
    cluster: bool,
    /// The fraction of one core each streamhub node may use, if held to
    /// one ([`ServerUnderTest::limit_cpu`]).
    quota: Option<f64>,
}

impl Spec {
    fn new(name: &str, nodes: usize, cluster: bool) -> Self {
        Self {
            name: name.to_owned(),
            nodes,
            cluster,
            quota: None,
        }
    }
}

/// The layouts every part measures: the embedded broker, one cluster
/// node, three.
fn layouts() -> Vec<Spec> {
    vec![
        Spec::new("embedded", 1, false),
        Spec::new("1 node", 1, true),
        Spec::new("3 nodes", 3, true),
    ]
}

/// Fan-out's layouts: those of [`layouts`], and with `--node-cpu-quota`
/// one and three nodes each held to that fraction of a core.
fn fanout_layouts(options: &Options) -> Vec<Spec> {
    let mut all = layouts();
    let q = options.node_cpu_quota;
    if q > 0.0 {
        for (name, nodes) in [(quota_name(1, q), 1), (quota_name(3, q), 3)] {
            all.push(Spec {
                quota: Some(q),
                ..Spec::new(&name, nodes, true)
            });
        }
    }
    all
}

/// "1 node, 0.2 core", "3 nodes, 0.2 core each".
fn quota_name(nodes: usize, q: f64) -> String {
    if nodes == 1 {
        format!("1 node, {q} core")
    } else {
        format!("{nodes} nodes, {q} core each")
    }
}

/// A nats-server with JetStream and the streamhub nodes using it.
struct Layout {
    nats: Option<ServerUnderTest>,
    nodes: Vec<ServerUnderTest>,
}

impl Layout {
    async fn start(spec: &Spec, options: &Options, pinning: &Pinning) -> Result<Self, BenchError> {
        let Spec {
            nodes,
            cluster,
            quota,
            ..
        } = *spec;
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
            let started = ServerUnderTest::start(Target::Streamhub, &o, pinning)
                .await
                .and_then(|mut node| match quota {
                    Some(q) => node.limit_cpu(q).map(|()| node),
                    None => Ok(node),
                });
            match started {
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
    let fanout_specs = fanout_layouts(options);
    for &n in &options.subscribers {
        let mut runs: Vec<Vec<Metrics>> = vec![Vec::new(); fanout_specs.len()];
        let mut failures: Vec<Option<BenchError>> = (0..fanout_specs.len()).map(|_| None).collect();
        for rep in 0..options.repetitions {
            for (i, spec) in fanout_specs.iter().enumerate() {
                if failures[i].is_some() {
                    continue;
                }
                let name = &spec.name;
                tracing::info!(layout = name, subscribers = n, rep, "cluster: fan-out run");
                let result = async {
                    let layout = Layout::start(spec, options, pinning).await?;
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
        for (i, spec) in fanout_specs.iter().enumerate() {
            let config = [
                ("part", "fanout".to_owned()),
                ("layout", spec.name.clone()),
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
    for spec in layouts() {
        let name = spec.name.as_str();
        let mut steps: Vec<Vec<Metrics>> = vec![Vec::new(); options.chat_rates.len()];
        let mut failure = None;
        for rep in 0..options.repetitions {
            tracing::info!(layout = name, rep, "cluster: chat ladder");
            let result = async {
                let layout = Layout::start(&spec, options, pinning).await?;
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
        "node_cpu_quota": options.node_cpu_quota,
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
        let fanout = |layout: &str, metric: &str| get("fanout", layout, "subscribers", &n, metric);
        // The nodes share the machine's cores, so three nodes cannot have
        // three times one node's CPU: per server core, three nodes doing
        // at least 2/3 of one node's work means three nodes with a core
        // each deliver at least twice what one does.
        checks.push(Check::at_least(
            format!(
                "{n} subscribers: deliveries/s per server core, 3 nodes / 1 node (0.67: 3 nodes on a core each deliver 2x one)"
            ),
            ratio(
                fanout("3 nodes", "deliveries_per_core_s"),
                fanout("1 node", "deliveries_per_core_s"),
            ),
            0.67,
        ));
        let q = options.node_cpu_quota;
        if q > 0.0 {
            checks.push(Check::at_least(
                format!("{n} subscribers, every node held to {q} of a core: deliveries/s, 3 nodes / 1 node"),
                ratio(
                    fanout(&quota_name(3, q), "deliveries_per_s"),
                    fanout(&quota_name(1, q), "deliveries_per_s"),
                ),
                2.0,
            ));
        }
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
