//! Cluster mode over NATS: a nats-server (or three) on loopback with
//! JetStream, and several streamhub nodes, in this process or as child
//! processes. Each test starts its own nats-server on a free port with its
//! own storage directory.
//!
//! Needs `nats-server` on the PATH (Debian: `apt-get install nats-server`;
//! `scripts/test` installs it). Without it every test prints a line
//! starting with "SKIPPED:" and returns.

#![allow(clippy::unwrap_used)] // tests

mod common;

use std::{
    collections::HashSet,
    io::{BufRead, BufReader},
    net::TcpListener as StdListener,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc as std_mpsc,
    time::Duration,
};

use common::{ServerProcess, TestServer, payload, publish, request, test_config, within};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use streamhub::proto::{
    chat::{ChatMessage, SendRequest, WatchRoomRequest, chat_service_client::ChatServiceClient},
    fileupload::{
        FileChunk, QueryUploadRequest, file_upload_service_client::FileUploadServiceClient,
    },
    telemetry::{
        HistoryRequest, ListServicesRequest, WatchEvent, WatchRequest,
        telemetry_service_client::TelemetryServiceClient, watch_event::Event,
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// A nats-server child process with JetStream.
struct Nats {
    child: Child,
    port: u16,
    store: tempfile::TempDir,
    extra: Vec<String>,
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether nats-server can be run; prints the skip line if not.
fn nats_available(test: &str) -> bool {
    let found = Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        println!(
            "SKIPPED: {test}: cluster tests need nats-server on the PATH \
             (apt-get install nats-server), and it was not found"
        );
    }
    found
}

impl Nats {
    /// Starts a single nats-server with JetStream on a free port.
    fn start() -> Self {
        Self::start_with(free_port(), tempfile::tempdir().unwrap(), Vec::new())
    }

    fn start_with(port: u16, store: tempfile::TempDir, extra: Vec<String>) -> Self {
        let child = spawn_nats(port, store.path(), &extra);
        Self {
            child,
            port,
            store,
            extra,
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port with the same storage.
    fn restart(&mut self) {
        self.kill();
        self.child = spawn_nats(self.port, self.store.path(), &self.extra);
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns nats-server and waits for its "Server is ready" line.
fn spawn_nats(port: u16, store: &Path, extra: &[String]) -> Child {
    let mut child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std_mpsc::channel();
    let echo = std::env::var_os("STREAMHUB_TEST_NATS_LOG").is_some();
    std::thread::spawn(move || {
        let mut ready = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if echo {
                eprintln!("nats {port}: {line}");
            }
            if line.contains("Server is ready")
                && let Some(tx) = ready.take()
            {
                let _ = tx.send(());
            }
            // Keep draining so the server never blocks on a full pipe.
        }
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("nats-server did not become ready within 20 s");
    child
}

/// A streamhub node in this process, in the cluster at `urls`.
async fn node(urls: &[String]) -> TestServer {
    node_with(urls, |_| {}).await
}

async fn node_with(
    urls: &[String],
    tweak: impl FnOnce(&mut streamhub::config::Config),
) -> TestServer {
    // RUST_LOG=debug shows the nodes' logs.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut config = test_config();
    config.cluster.nats = urls.to_vec();
    config.cluster.node = "test".into();
    tweak(&mut config);
    let server = TestServer::start_with(config).await;
    // The node serves once it has joined: wait for its port to answer.
    within("node start", health(&server.url(), "")).await;
    server
}

async fn health(url: &str, service: &str) -> ServingStatus {
    loop {
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(url.to_owned())
            .unwrap()
            .connect()
            .await
        {
            let answer = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await;
            if let Ok(answer) = answer {
                return answer.into_inner().status();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_health(url: &str, want: ServingStatus) {
    within(&format!("health {want:?}"), async {
        while health(url, "chat.ChatService").await != want {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// The next sample a Subscribe stream sends, with its cpu value.
async fn next_cpu(stream: &mut Streaming<streamhub::proto::telemetry::MetricsResponse>) -> f64 {
    within("a sample", stream.next())
        .await
        .expect("stream open")
        .expect("a sample, not an error")
        .cpu_usage
}

async fn subscribe(
    server: &TestServer,
    service: &str,
) -> Streaming<streamhub::proto::telemetry::MetricsResponse> {
    TelemetryServiceClient::new(server.channel().await)
        .subscribe(request(service, 100))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn samples_reach_every_node_and_a_later_node_sees_the_latest() {
    if !nats_available("samples_reach_every_node") {
        return;
    }
    let nats = Nats::start();
    let urls = vec![nats.url()];
    let (a, b, c) = (node(&urls).await, node(&urls).await, node(&urls).await);
    let mut on_b = subscribe(&b, "api").await;
    let mut on_c = subscribe(&c, "api").await;
    publish(a.channel().await, "api", 11.0).await;
    assert_eq!(next_cpu(&mut on_b).await, 11.0);
    assert_eq!(next_cpu(&mut on_c).await, 11.0);
    // No duplicate: the next thing each sees is the next sample.
    publish(c.channel().await, "api", 12.0).await;
    assert_eq!(next_cpu(&mut on_b).await, 12.0);
    assert_eq!(next_cpu(&mut on_c).await, 12.0);
    publish(b.channel().await, "db", 3.0).await;
    let mut db_on_a = subscribe(&a, "db").await;
    assert_eq!(next_cpu(&mut db_on_a).await, 3.0);

    // A node started now sees the latest of every service at once.
    let d = node(&urls).await;
    let mut client = TelemetryServiceClient::new(d.channel().await);
    let api = client.get_snapshot(request("api", 0)).await.unwrap();
    assert_eq!(api.into_inner().cpu_usage, 12.0);
    let listed = client
        .list_services(ListServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: HashSet<_> = listed
        .services
        .iter()
        .map(|s| s.service_name.as_str())
        .collect();
    assert!(names.contains("api") && names.contains("db"), "{names:?}");
    for server in [a, b, c, d] {
        server.stop().await;
    }
}

/// The names `server` lists, polled until `done` holds for them.
async fn listed_until(server: &TestServer, what: &str, done: impl Fn(&[String]) -> bool) {
    let mut client = TelemetryServiceClient::new(server.channel().await);
    within(what, async {
        loop {
            if let Ok(listed) = client.list_services(ListServicesRequest {}).await {
                let names: Vec<String> = listed
                    .into_inner()
                    .services
                    .into_iter()
                    .map(|s| s.service_name)
                    .collect();
                if done(&names) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn each_node_drops_a_silent_service_and_its_slot_is_free_on_every_node() {
    if !nats_available("each_node_drops_a_silent_service") {
        return;
    }
    let mut nats = Nats::start();
    let urls = vec![nats.url()];
    let tweak = |config: &mut streamhub::config::Config| {
        config.telemetry.max_services = 1;
        config.telemetry.service_ttl = Duration::from_secs(1);
    };
    let (a, b) = (node_with(&urls, tweak).await, node_with(&urls, tweak).await);
    publish(a.channel().await, "old", 1.0).await;
    // Each node lands it, then drops it once silent for the ttl.
    for node in [&a, &b] {
        listed_until(node, "old to land", |names| names == ["old"]).await;
    }
    for node in [&a, &b] {
        listed_until(node, "old to be dropped", <[String]>::is_empty).await;
    }
    // Its slot is free on both: a new name fits (on the old code it
    // never does), and the stream's last sample of "old" does not come
    // back by itself.
    publish(b.channel().await, "new", 1.0).await;
    for node in [&a, &b] {
        listed_until(node, "new to land", |names| names == ["new"]).await;
    }
    // After NATS comes back, the nodes re-read the stream, which still
    // holds old's last sample: it is skipped as applied already. (A node
    // lists again only once it has re-read everything.)
    nats.kill();
    wait_health(&a.url(), ServingStatus::NotServing).await;
    nats.restart();
    for node in [&a, &b] {
        listed_until(node, "the stream to be re-read", |names| {
            assert!(!names.iter().any(|n| n == "old"), "{names:?}");
            true
        })
        .await;
    }
    for server in [a, b] {
        server.stop().await;
    }
}

/// A Watch of the services matching `pattern`, alerts included, once its
/// backfill is done (its Live marker seen).
async fn watch_live(server: &TestServer, pattern: &str) -> Streaming<WatchEvent> {
    let mut stream = TelemetryServiceClient::new(server.channel().await)
        .watch(WatchRequest {
            pattern: pattern.into(),
            interval_ms: 100,
            alerts: true,
            ..WatchRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    while !matches!(watch_event(&mut stream).await, Event::Live(_)) {}
    stream
}

async fn watch_event(stream: &mut Streaming<WatchEvent>) -> Event {
    within("a watch event", stream.message())
        .await
        .unwrap()
        .expect("watch still open")
        .event
        .expect("an event")
}

/// Skips events until a sample of `service` with `cpu` arrives.
async fn watch_sample(stream: &mut Streaming<WatchEvent>, service: &str, cpu: f64) {
    loop {
        if let Event::Sample(s) = watch_event(stream).await
            && s.service_name == service
            && s.cpu_usage == cpu
        {
            return;
        }
    }
}

/// The cpu values of `service`'s history on `server`, oldest first.
async fn history_cpu(server: &TestServer, service: &str) -> Vec<f64> {
    TelemetryServiceClient::new(server.channel().await)
        .get_history(HistoryRequest {
            service_name: service.into(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .samples
        .iter()
        .map(|s| s.cpu_usage)
        .collect()
}

#[tokio::test]
async fn history_and_watch_show_samples_published_on_any_node() {
    if !nats_available("history_and_watch_show_samples_published_on_any_node") {
        return;
    }
    let nats = Nats::start();
    let urls = vec![nats.url()];
    let (a, b) = (node(&urls).await, node(&urls).await);
    let mut on_a = watch_live(&a, "hist").await;
    let mut on_b = watch_live(&b, "hist").await;
    // Published on either node, one at a time: every node records each
    // one, in one order.
    for (cpu, via) in [(1.0, &a), (2.0, &b), (3.0, &a)] {
        publish(via.channel().await, "hist", cpu).await;
        watch_sample(&mut on_a, "hist", cpu).await;
        watch_sample(&mut on_b, "hist", cpu).await;
    }
    assert_eq!(history_cpu(&a, "hist").await, [1.0, 2.0, 3.0]);
    assert_eq!(history_cpu(&b, "hist").await, [1.0, 2.0, 3.0]);

    // A node started later has the same history (and the same Watch
    // backfill) at once: the stream keeps `telemetry.history` samples per
    // service and a new node reads them all.
    let c = node(&urls).await;
    assert_eq!(history_cpu(&c, "hist").await, [1.0, 2.0, 3.0]);
    let mut backfill = TelemetryServiceClient::new(c.channel().await)
        .watch(WatchRequest {
            pattern: "hist".into(),
            backfill_samples: 10,
            ..WatchRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    match watch_event(&mut backfill).await {
        Event::Backfill(h) => {
            let cpu: Vec<f64> = h.samples.iter().map(|s| s.cpu_usage).collect();
            assert_eq!(cpu, [1.0, 2.0, 3.0]);
        }
        other => panic!("expected the backfill, got {other:?}"),
    }
    // And what is published later reaches it like the others.
    publish(a.channel().await, "hist", 4.0).await;
    watch_sample(&mut on_b, "hist", 4.0).await;
    let mut on_c = watch_live(&c, "hist").await;
    publish(b.channel().await, "hist", 5.0).await;
    watch_sample(&mut on_c, "hist", 5.0).await;
    for server in [&a, &b, &c] {
        assert_eq!(history_cpu(server, "hist").await, [1.0, 2.0, 3.0, 4.0, 5.0]);
    }
    drop((on_a, on_b, on_c, backfill));
    for server in [a, b, c] {
        server.stop().await;
    }
}

/// The alert types a Watch delivers until it has seen `n`, skipping
/// samples.
async fn watch_alerts(stream: &mut Streaming<WatchEvent>, n: usize) -> Vec<(String, String)> {
    let mut alerts = Vec::new();
    while alerts.len() < n {
        match watch_event(stream).await {
            Event::Alert(a) => alerts.push((a.service_name, a.alert.unwrap().alert_type)),
            Event::Sample(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    alerts
}

#[tokio::test]
async fn an_alert_raised_on_one_node_reaches_watchers_on_every_node_once() {
    if !nats_available("an_alert_raised_on_one_node_reaches_watchers_on_every_node_once") {
        return;
    }
    let nats = Nats::start();
    let urls = vec![nats.url()];
    let (a, b) = (node(&urls).await, node(&urls).await);
    let mut on_a = watch_live(&a, "hot").await;
    let mut on_b = watch_live(&b, "hot").await;
    // One LiveFeed call on A: above the CPU threshold, then back below.
    let (alerts, status) = common::live_feed(
        a.channel().await,
        vec![
            payload("hot", 95.0, 100.0, 0),
            payload("hot", 10.0, 100.0, 0),
        ],
    )
    .await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    let want = vec![
        ("hot".to_owned(), "CPU_HIGH".to_owned()),
        ("hot".to_owned(), "CPU_HIGH_RESOLVED".to_owned()),
    ];
    // Each watcher sees each alert once: A's own is not echoed back to it.
    assert_eq!(watch_alerts(&mut on_b, 2).await, want);
    assert_eq!(watch_alerts(&mut on_a, 2).await, want);
    // A later alert from B: nothing of the first pair came twice.
    publish(b.channel().await, "hot", 99.0).await;
    let high = vec![("hot".to_owned(), "CPU_HIGH".to_owned())];
    assert_eq!(watch_alerts(&mut on_a, 1).await, high);
    assert_eq!(watch_alerts(&mut on_b, 1).await, high);
    // A node started later back-fills the alerts raised before it (the
    // alert stream keeps them), in the order they were raised.
    let c = node(&urls).await;
    let all: Vec<(String, String)> = want.into_iter().chain(high).collect();
    let backfilled = within("the later node back-filling the earlier alerts", async {
        loop {
            let got = backfilled_alerts(&c, "hot").await;
            if got.len() >= all.len() {
                return got;
            }
            // Its alert feed is still reading the stream: ask again.
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(backfilled, all);
    drop((on_a, on_b));
    for server in [a, b, c] {
        server.stop().await;
    }
}

#[tokio::test]
async fn an_alert_the_stream_cannot_take_yet_is_retried_until_stored() {
    if !nats_available("an_alert_the_stream_cannot_take_yet_is_retried_until_stored") {
        return;
    }
    let nats = Nats::start();
    let urls = vec![nats.url()];
    let (a, b) = (node(&urls).await, node(&urls).await);
    let mut on_b = watch_live(&b, "warm").await;
    // The alert stream goes away (deleted by an operator, or a NATS
    // server that lost its storage); the nodes recreate it when their
    // consumers notice, seconds later. An alert raised on A meanwhile
    // has nowhere to be stored: the old code published it once on a
    // subject no stream captured, and it never reached B.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.delete_stream("STREAMHUB_ALERTS").await.unwrap();
    let (alerts, status) =
        common::live_feed(a.channel().await, vec![payload("warm", 97.0, 100.0, 0)]).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    // A retries until the recreated stream stores it: B sees it, once.
    let want = vec![("warm".to_owned(), "CPU_HIGH".to_owned())];
    assert_eq!(watch_alerts(&mut on_b, 1).await, want);
    // The retries stored it once: after one more alert, B's feed holds
    // two, not three.
    publish(a.channel().await, "warm", 99.0).await;
    assert_eq!(watch_alerts(&mut on_b, 1).await, want);
    let twice: Vec<_> = want.iter().chain(&want).cloned().collect();
    assert_eq!(backfilled_alerts(&b, "warm").await, twice);
    drop(on_b);
    a.stop().await;
    b.stop().await;
}

/// The alerts of services matching `pattern` that a new Watch on `server`
/// back-fills (up to 10), oldest first.
async fn backfilled_alerts(server: &TestServer, pattern: &str) -> Vec<(String, String)> {
    let mut watch = TelemetryServiceClient::new(server.channel().await)
        .watch(WatchRequest {
            pattern: pattern.into(),
            alerts: true,
            backfill_alerts: 10,
            ..WatchRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut alerts = Vec::new();
    loop {
        match watch_event(&mut watch).await {
            Event::Alert(a) => alerts.push((a.service_name, a.alert.unwrap().alert_type)),
            Event::Live(_) => return alerts,
            Event::Sample(_) | Event::Backfill(_) => {}
        }
    }
}

/// One open Chat call.
struct Member {
    tx: mpsc::Sender<ChatMessage>,
    rx: Streaming<ChatMessage>,
}

fn msg(sender: &str, text: &str, key: &str) -> ChatMessage {
    ChatMessage {
        sender: sender.into(),
        message: text.into(),
        idempotency_key: key.into(),
        ..ChatMessage::default()
    }
}

async fn open(channel: Channel, meta: &[(&'static str, String)]) -> Result<Member, Status> {
    let (tx, rx) = mpsc::channel(64);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    for (key, value) in meta {
        request.metadata_mut().insert(*key, value.parse().unwrap());
    }
    let response = ChatServiceClient::new(channel).chat(request).await?;
    Ok(Member {
        tx,
        rx: response.into_inner(),
    })
}

async fn join(url: String, room: &str) -> Member {
    open(
        common::connect(url).await,
        &[("chat-room", room.to_owned())],
    )
    .await
    .unwrap()
}

impl Member {
    async fn send(&self, message: ChatMessage) {
        self.tx.send(message).await.unwrap();
    }

    async fn next(&mut self) -> ChatMessage {
        within("a chat message", self.rx.message())
            .await
            .unwrap()
            .expect("stream still open")
    }
}

#[tokio::test]
async fn members_on_three_nodes_see_one_order() {
    if !nats_available("members_on_three_nodes_see_one_order") {
        return;
    }
    let nats = Nats::start();
    let urls = vec![nats.url()];
    let nodes = [node(&urls).await, node(&urls).await, node(&urls).await];
    let mut members = Vec::new();
    for n in &nodes {
        members.push(join(n.url(), "r").await);
    }
    const EACH: usize = 10;
    for i in 0..EACH {
        for (m, member) in members.iter().enumerate() {
            member
                .send(msg(&format!("m{m}"), &format!("{i}"), ""))
                .await;
        }
    }
    let mut orders = Vec::new();
    for member in &mut members {
        let mut seen = Vec::new();
        while seen.len() < EACH * 3 {
            let message = member.next().await;
            seen.push((message.seq, message.sender, message.message));
        }
        orders.push(seen);
    }
    assert_eq!(orders[0], orders[1]);
    assert_eq!(orders[0], orders[2]);
    let seqs: Vec<u64> = orders[0].iter().map(|m| m.0).collect();
    assert_eq!(seqs, (1..=30).collect::<Vec<u64>>(), "seqs are dense");
    // Each sender's own messages keep their order.
    for m in 0..3 {
        let sender = format!("m{m}");
        let texts: Vec<_> = orders[0]
            .iter()
            .filter(|x| x.1 == sender)
            .map(|x| x.2.clone())
            .collect();
        assert_eq!(texts, (0..EACH).map(|i| i.to_string()).collect::<Vec<_>>());
    }
    drop(members);
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test]
async fn duplicate_sends_through_different_nodes_are_stored_once() {
    if !nats_available("duplicate_sends_through_different_nodes") {
        return;
    }
    let nats = Nats::start();
    let urls = vec![nats.url()];
    let (a, b, c) = (node(&urls).await, node(&urls).await, node(&urls).await);
    let mut on_a = join(a.url(), "d").await;
    let mut on_b = join(b.url(), "d").await;
    let mut watcher = join(c.url(), "d").await;
    on_a.send(msg("ann", "hello", "ann-1")).await;
    let first = on_a.next().await;
    assert_eq!((first.seq, first.message.as_str()), (1, "hello"));
    assert_eq!(on_b.next().await.seq, 1);
    // The same sender and key through another node: acknowledged with the
    // original, stored and broadcast no more.
    on_b.send(msg("ann", "hello", "ann-1")).await;
    let ack = on_b.next().await;
    assert_eq!((ack.seq, ack.idempotency_key.as_str()), (1, "ann-1"));
    on_b.send(msg("bob", "next", "")).await;
    let seen: Vec<_> = [watcher.next().await, watcher.next().await]
        .into_iter()
        .map(|m| (m.seq, m.message))
        .collect();
    assert_eq!(seen, vec![(1, "hello".into()), (2, "next".into())]);
    drop((on_a, on_b, watcher));
    for n in [a, b, c] {
        n.stop().await;
    }
}

#[tokio::test]
async fn a_member_resumes_on_another_node_after_its_node_is_killed() {
    if !nats_available("a_member_resumes_on_another_node") {
        return;
    }
    let nats = Nats::start();
    let urls = vec![nats.url()];
    let dir = tempfile::tempdir().unwrap();
    let killed = ServerProcess::spawn(
        dir.path(),
        &[
            "--cluster",
            &nats.url(),
            "--set",
            "telemetry.self_sample_interval=0s",
        ],
    );
    let other = node(&urls).await;
    let sender_node = node(&urls).await;
    let mut reader = join(killed.url(), "k").await;
    let sender = join(sender_node.url(), "k").await;
    for i in 1..=5 {
        sender
            .send(msg("s", &format!("{i}"), &format!("s-{i}")))
            .await;
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(reader.next().await);
    }
    let last_seen = got.last().unwrap();
    let (last_seq, epoch) = (last_seen.seq, last_seen.epoch);
    killed.signal("KILL");
    drop(killed);
    for i in 6..=8 {
        sender
            .send(msg("s", &format!("{i}"), &format!("s-{i}")))
            .await;
    }
    let mut resumed = open(
        common::connect(other.url()).await,
        &[
            ("chat-room", "k".into()),
            ("chat-after-seq", last_seq.to_string()),
            ("chat-epoch", epoch.to_string()),
        ],
    )
    .await
    .unwrap();
    for _ in 0..5 {
        got.push(resumed.next().await);
    }
    let texts: Vec<_> = got.iter().map(|m| m.message.clone()).collect();
    assert_eq!(
        texts,
        (1..=8).map(|i| i.to_string()).collect::<Vec<_>>(),
        "each message exactly once, in order"
    );
    let seqs: Vec<_> = got.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=8).collect::<Vec<u64>>());
    // A resume past the room's end is refused as on one server.
    let err = open(
        common::connect(other.url()).await,
        &[("chat-room", "k".into()), ("chat-after-seq", "99".into())],
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    drop((resumed, sender));
    other.stop().await;
    sender_node.stop().await;
}

fn upload_client(channel: Channel) -> FileUploadServiceClient<Channel> {
    FileUploadServiceClient::new(channel)
        .max_decoding_message_size(8 << 20)
        .max_encoding_message_size(8 << 20)
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn chunk(
    name: &str,
    index: u32,
    bytes: &[u8],
    offset: Option<u64>,
    last: Option<&[u8]>,
) -> FileChunk {
    FileChunk {
        filename: name.into(),
        data: bytes.to_vec(),
        chunk_index: index,
        is_last: last.is_some(),
        offset,
        sha256: last
            .map(|all| Sha256::digest(all).to_vec())
            .unwrap_or_default(),
    }
}

#[tokio::test]
async fn an_upload_begun_on_one_node_is_resumed_on_another_through_a_shared_dir() {
    if !nats_available("an_upload_begun_on_one_node_is_resumed") {
        return;
    }
    let nats = Nats::start();
    let urls = vec![nats.url()];
    let shared = tempfile::tempdir().unwrap();
    let dir = shared.path().to_path_buf();
    let a = node_with(&urls, |c| c.upload.dir = Some(dir.clone())).await;
    let b = node_with(&urls, |c| c.upload.dir = Some(dir.clone())).await;
    let all = data(300 * 1024);
    let (first, rest) = all.split_at(100 * 1024);
    // Begun on A without is_last: A keeps the bytes for a resume.
    let mut on_a = upload_client(a.channel().await);
    let cut = on_a
        .upload(tokio_stream::iter(vec![chunk(
            "shared.bin",
            0,
            first,
            None,
            None,
        )]))
        .await
        .expect_err("no is_last: not stored");
    assert_eq!(cut.code(), Code::Aborted, "{cut:?}");
    // B sees it and finishes it.
    let mut on_b = upload_client(b.channel().await);
    let held = on_b
        .query_upload(QueryUploadRequest {
            filename: "shared.bin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held.committed_size, first.len() as u64);
    let done = on_b
        .upload(tokio_stream::iter(vec![chunk(
            "shared.bin",
            1,
            rest,
            Some(first.len() as u64),
            Some(&all),
        )]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.resumed_from, first.len() as u64);
    assert_eq!(
        std::fs::read(dir.join("shared.bin")).unwrap(),
        all,
        "byte-identical"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn two_nodes_cannot_write_one_name_at_once() {
    if !nats_available("two_nodes_cannot_write_one_name_at_once") {
        return;
    }
    let nats = Nats::start();
    let urls = vec![nats.url()];
    let shared = tempfile::tempdir().unwrap();
    let dir = shared.path().to_path_buf();
    let a = node_with(&urls, |c| c.upload.dir = Some(dir.clone())).await;
    let b = node_with(&urls, |c| c.upload.dir = Some(dir.clone())).await;
    let all = data(64 * 1024);
    // A call on A holds the name (one chunk sent, stream kept open).
    let (tx, rx) = mpsc::channel(4);
    let mut on_a = upload_client(a.channel().await);
    let holder = tokio::spawn(async move { on_a.upload(ReceiverStream::new(rx)).await });
    tx.send(chunk("one.bin", 0, &all[..1024], None, None))
        .await
        .unwrap();
    let mut on_b = upload_client(b.channel().await);
    within("B to see the upload in progress", async {
        loop {
            let q = on_b
                .query_upload(QueryUploadRequest {
                    filename: "one.bin".into(),
                })
                .await
                .unwrap()
                .into_inner();
            if q.in_progress {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let refused = on_b
        .upload(tokio_stream::iter(vec![chunk(
            "one.bin",
            0,
            &all,
            None,
            Some(&all),
        )]))
        .await
        .expect_err("busy");
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    assert!(refused.message().contains("in progress"), "{refused:?}");
    // Once A's call ends, B may write the name.
    drop(tx);
    let _ = within("A's call to end", holder).await.unwrap();
    within("B's upload", async {
        loop {
            let result = on_b
                .upload(tokio_stream::iter(vec![chunk(
                    "one.bin",
                    0,
                    &all,
                    None,
                    Some(&all),
                )]))
                .await;
            match result {
                Ok(_) => return,
                Err(status) if status.code() == Code::Aborted => {
                    // A's release is on its way through NATS.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    })
    .await;
    assert_eq!(std::fs::read(dir.join("one.bin")).unwrap(), all);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn nats_restart_keeps_open_streams_and_nats_down_is_not_serving() {
    if !nats_available("nats_restart_keeps_open_streams") {
        return;
    }
    let mut nats = Nats::start();
    let urls = vec![nats.url()];
    let (a, b) = (node(&urls).await, node(&urls).await);
    let mut on_b = subscribe(&b, "svc").await;
    let mut alerts_on_b = watch_live(&b, "svc").await;
    publish(a.channel().await, "svc", 1.0).await;
    assert_eq!(next_cpu(&mut on_b).await, 1.0);
    let mut member = join(b.url(), "room").await;
    let writer = join(a.url(), "room").await;
    writer.send(msg("w", "before", "w-1")).await;
    assert_eq!(member.next().await.message, "before");

    // NATS down: health says so, calls that need it are refused, nothing
    // stale is served as live.
    nats.kill();
    wait_health(&b.url(), ServingStatus::NotServing).await;
    let mut client = TelemetryServiceClient::new(b.channel().await);
    let refused = client.get_snapshot(request("svc", 0)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    // A new Watch would back-fill the values the node holds and announce
    // them as live, and history would lack what other nodes publish
    // meanwhile: both refused too (the break-it pass found them served).
    let refused = client
        .watch(WatchRequest {
            pattern: "*".into(),
            backfill_samples: 1,
            ..WatchRequest::default()
        })
        .await
        .expect_err("a Watch refused while NATS is down");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let refused = client
        .get_history(HistoryRequest {
            service_name: "svc".into(),
            limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let refused = open(b.channel().await, &[("chat-room", "other".into())])
        .await
        .err()
        .expect("refused");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    // Back: the nodes reconnect by themselves; open streams continue.
    nats.restart();
    wait_health(&a.url(), ServingStatus::Serving).await;
    wait_health(&b.url(), ServingStatus::Serving).await;
    within("a sample after the restart", async {
        let mut feed = TelemetryServiceClient::new(a.channel().await);
        loop {
            let (_, status) =
                common::live_feed(a.channel().await, vec![payload("svc", 2.0, 1.0, 0)]).await;
            if status.is_none() {
                break;
            }
            // The node is still re-reading the latest values.
            let _ = feed.get_snapshot(request("svc", 0)).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(next_cpu(&mut on_b).await, 2.0);
    writer.send(msg("w", "after", "w-2")).await;
    assert_eq!(member.next().await.message, "after");
    // The alert subscription came back with the connection: an alert
    // raised on A reaches a Watch on B opened before the restart.
    publish(a.channel().await, "svc", 95.0).await;
    assert_eq!(
        watch_alerts(&mut alerts_on_b, 1).await,
        vec![("svc".to_owned(), "CPU_HIGH".to_owned())]
    );
    drop((member, writer, alerts_on_b));
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_node_shut_down_ends_its_streams_and_the_others_carry_on() {
    if !nats_available("a_node_shut_down_ends_its_streams") {
        return;
    }
    let nats = Nats::start();
    let urls = vec![nats.url()];
    let (a, b) = (node(&urls).await, node(&urls).await);
    let mut leaving = join(a.url(), "s").await;
    let mut staying = join(b.url(), "s").await;
    let mut samples = subscribe(&b, "x").await;
    a.stop().await;
    loop {
        match within("the end of the stream", leaving.rx.message()).await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("ended without a status"),
            Err(status) => {
                common::assert_shutting_down("chat on the stopped node", &status);
                break;
            }
        }
    }
    staying.send(msg("b", "still here", "")).await;
    assert_eq!(staying.next().await.message, "still here");
    publish(b.channel().await, "x", 5.0).await;
    assert_eq!(next_cpu(&mut samples).await, 5.0);
    drop(staying);
    b.stop().await;
}

#[tokio::test]
async fn a_three_server_nats_cluster_survives_losing_one_server() {
    if !nats_available("a_three_server_nats_cluster") {
        return;
    }
    let (ports, routes): (Vec<u16>, Vec<u16>) = (0..3).map(|_| (free_port(), free_port())).unzip();
    let route_list = routes
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut servers: Vec<Nats> = (0..3)
        .map(|i| {
            let extra = vec![
                "-n".into(),
                format!("n{i}"),
                "--cluster_name".into(),
                "sh".into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{}", routes[i]),
                "--routes".into(),
                route_list.clone(),
            ];
            Nats::start_with(ports[i], tempfile::tempdir().unwrap(), extra)
        })
        .collect();
    let urls: Vec<String> = servers.iter().map(Nats::url).collect();
    // JetStream elects its meta leader once the routes are up: the first
    // node retries joining until then.
    let joining = Duration::from_secs(60);
    let a = tokio::time::timeout(joining, async {
        loop {
            let mut config = test_config();
            config.cluster.nats = urls.clone();
            config.cluster.replicas = 3;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let dir = tempfile::tempdir().unwrap();
            config.data_dir = dir.path().to_path_buf();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let addr = listener.local_addr().unwrap();
            let task = tokio::spawn(streamhub::server::run(listener, config, async {
                let _ = stopped.await;
            }));
            // Either it serves, or it fails to join (no leader yet).
            let url = format!("http://{addr}");
            let served = tokio::select! {
                result = task => { let _ = result; false }
                status = health(&url, "") => status == ServingStatus::Serving,
            };
            if served {
                return (stop, addr, dir);
            }
            drop(stop);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("a node joins the NATS cluster within 60 s");
    // Node B talks to NATS through server n1 only (it learns the others
    // for reconnecting). Each room's feed on B is a consumer that lives on
    // one NATS server, placed by JetStream: open rooms on B until one's
    // consumer lives on another server than n1, and kill that server, so
    // B's connection survives but its feed's consumer does not.
    let b = node_with(&urls[1..2], |c| c.cluster.replicas = 3).await;
    let probe = async_nats::connect(urls[1].clone()).await.unwrap();
    let js = async_nats::jetstream::new(probe);
    let mut members = Vec::new();
    let mut target = None;
    for i in 0..12 {
        let room = format!("ha{i}");
        let mut member = join(b.url(), &room).await;
        member.send(msg("m", "one", &format!("m-{i}"))).await;
        assert_eq!(member.next().await.seq, 1);
        let leader = feed_server(&js, &room).await;
        members.push(member);
        if leader != "n1" {
            target = Some((room, members.len() - 1, leader));
            break;
        }
    }
    let (room, index, leader) =
        target.expect("JetStream placed one of 12 room consumers on another server than n1");
    let victim: usize = leader.trim_start_matches('n').parse().unwrap();
    let a_url = format!("http://{}", a.1);
    // A Subscribe on B, open across the loss too.
    let mut on_b = subscribe(&b, "ha-svc").await;
    publish(common::connect(a_url.clone()).await, "ha-svc", 0.5).await;
    assert_eq!(next_cpu(&mut on_b).await, 0.5);
    // Lose one NATS server: JetStream keeps a quorum of two.
    servers[victim].kill();
    // JetStream elects new leaders for what the lost server led: allow
    // it more than the usual wait. Meanwhile sends fail (the call ends
    // with UNAVAILABLE) and, if node A was connected to the lost server,
    // A refuses joins with UNAVAILABLE until it has reconnected: each
    // attempt is a new call.
    let failover = Duration::from_secs(60);
    let (mut writer, first) = tokio::time::timeout(failover, async {
        let mut i = 1;
        loop {
            i += 1;
            let text = format!("w{i}");
            let joined = open(
                common::connect(a_url.clone()).await,
                &[("chat-room", room.clone())],
            )
            .await;
            if let Ok(mut writer) = joined {
                writer.send(msg("w", &text, &format!("w-{i}"))).await;
                // Wait for this message's own acknowledgment.
                while let Ok(Some(m)) = writer.rx.message().await {
                    if m.sender == "w" && m.message == text {
                        return (writer, m.seq);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a message stored and acknowledged within 60 s of losing a NATS server");
    // Three more, acknowledged in turn.
    let mut acked = vec![(first, String::new())];
    for text in ["after-1", "after-2", "after-3"] {
        writer.send(msg("w", text, text)).await;
        loop {
            let m = writer.next().await;
            if m.sender == "w" && m.message == text {
                acked.push((m.seq, m.message));
                break;
            }
        }
    }
    let last = acked.last().unwrap().0;
    // The member that stayed connected to B across the loss receives
    // every message stored after "one" (seq 1), including attempts stored
    // before their call failed: each seq once, in order, none missing.
    let member = &mut members[index];
    let mut received = Vec::new();
    while received.last().is_none_or(|&(seq, _)| seq < last) {
        let m = member.next().await;
        received.push((m.seq, m.message));
    }
    let seqs: Vec<u64> = received.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, (2..=last).collect::<Vec<_>>(), "{received:?}");
    for (seq, text) in acked.iter().skip(1) {
        assert_eq!(&received[usize::try_from(*seq - 2).unwrap()].1, text);
    }
    // Nothing acknowledged is lost either for a member resuming on B (the
    // replay may meet JetStream still settling: UNAVAILABLE, retried).
    let resumed = tokio::time::timeout(failover, async {
        loop {
            let joined = open(
                common::connect(b.url()).await,
                &[
                    ("chat-room", room.clone()),
                    ("chat-after-seq", (last - 1).to_string()),
                ],
            )
            .await;
            if let Ok(mut resumed) = joined
                && let Ok(Some(m)) = resumed.rx.message().await
            {
                assert_eq!((m.seq, m.message.as_str()), (last, "after-3"));
                return resumed;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a member resuming on B receives the last message");
    // The Subscribe on B gets samples published on A after the loss
    // (samples are not acknowledged: publish until one arrives).
    tokio::time::timeout(failover, async {
        let mut cpu = 1.0;
        loop {
            if let Ok(channel) = tonic::transport::Endpoint::from_shared(a_url.clone())
                .unwrap()
                .connect()
                .await
            {
                let _ = common::live_feed(channel, vec![payload("ha-svc", cpu, 1.0, 0)]).await;
            }
            tokio::select! {
                next = on_b.next() => {
                    let sample = next.expect("stream open").expect("a sample");
                    assert!(sample.cpu_usage >= 1.0, "{sample:?}");
                    return;
                }
                () = tokio::time::sleep(Duration::from_millis(200)) => cpu += 1.0,
            }
        }
    })
    .await
    .expect("a Subscribe on B receives a sample published on A after the loss");
    drop((writer, members, resumed, on_b));
    let _ = a.0.send(());
    b.stop().await;
}

/// The NATS server holding the consumer of the room's feed on the one
/// node that has the room open (the newest consumer of its stream).
async fn feed_server(js: &async_nats::jetstream::Context, room: &str) -> String {
    let stream = js
        .get_stream(format!(
            "{}{}",
            streamhub::cluster::chat::STREAM_PREFIX,
            streamhub::cluster::token(room)
        ))
        .await
        .unwrap();
    let consumers: Vec<_> = stream.consumers().collect().await;
    consumers
        .into_iter()
        .map(Result::unwrap)
        .max_by_key(|info| info.created)
        .and_then(|info| info.cluster.and_then(|c| c.leader))
        .expect("the room's feed has a consumer with a leader")
}

#[tokio::test]
async fn the_cli_fails_over_to_the_next_server_url() {
    let server = TestServer::start().await;
    publish(server.channel().await, "cli-svc", 7.0).await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    for args in [
        vec!["--server".to_owned(), format!("{dead},{}", server.url())],
        vec![
            "--server".to_owned(),
            dead.clone(),
            "--server".to_owned(),
            server.url(),
        ],
    ] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamhub"))
            .args(&args)
            .args(["--json", "snapshot", "cli-svc"])
            .output();
        let output = within("the CLI", output).await.unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{args:?}: {output:?}");
        assert!(stdout.contains("cli-svc"), "{stdout}");
    }
    server.stop().await;
}

#[tokio::test]
async fn the_cli_moves_on_when_a_node_answers_unavailable() {
    if !nats_available("the_cli_moves_on_when_a_node_answers_unavailable") {
        return;
    }
    // Two nodes on two separate NATS servers: losing one cuts off only
    // node A, which then answers (it does not refuse connections) with
    // UNAVAILABLE.
    let mut lost = Nats::start();
    let kept = Nats::start();
    let a = node(&[lost.url()]).await;
    let b = node(&[kept.url()]).await;
    let mut on_b = subscribe(&b, "cli-svc").await;
    publish(b.channel().await, "cli-svc", 7.0).await;
    assert_eq!(next_cpu(&mut on_b).await, 7.0);
    lost.kill();
    wait_health(&a.url(), ServingStatus::NotServing).await;
    let servers = format!("{},{}", a.url(), b.url());
    for command in [
        &["snapshot", "cli-svc"][..],
        &["services"],
        &["subscribe", "cli-svc", "--count", "1"],
    ] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamhub"))
            .args(["--server", &servers, "--json"])
            .args(command)
            .kill_on_drop(true)
            .output();
        let output = within("the CLI", output).await.unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{command:?}: {output:?}");
        assert!(stdout.contains("cli-svc"), "{command:?}: {stdout}");
    }
    drop(on_b);
    for server in [a, b] {
        server.stop().await;
    }
}

#[tokio::test]
async fn each_node_reports_its_own_host_under_its_own_name() {
    if !nats_available("each_node_reports_its_own_host_under_its_own_name") {
        return;
    }
    let nats = Nats::start();
    let urls = vec![nats.url()];
    let named = |name: &'static str| {
        move |c: &mut streamhub::config::Config| {
            c.cluster.node = name.into();
            c.telemetry.self_sample_interval = Duration::from_millis(200);
        }
    };
    let a = node_with(&urls, named("n1")).await;
    let b = node_with(&urls, named("n2")).await;
    let mut from_a = subscribe(&b, "streamhub@n1").await;
    let mut from_b = subscribe(&a, "streamhub@n2").await;
    within("n1's host sample", from_a.next())
        .await
        .unwrap()
        .unwrap();
    within("n2's host sample", from_b.next())
        .await
        .unwrap()
        .unwrap();
    drop((from_a, from_b));
    // GetServerInfo names the node as the cluster does (it said the host
    // name, so `streamhub demo` could not find the node's own metrics).
    use streamhub::proto::streamhub::{
        ServerInfoRequest, server_service_client::ServerServiceClient,
    };
    let info = ServerServiceClient::new(a.channel().await)
        .get_server_info(ServerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node, "n1");
    // The demo finds the node's own metrics by itself (it waited for
    // `streamhub`, which a cluster node never reports).
    let demo = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamhub"))
        .args(["--server", &a.url(), "demo", "--subscribe-for", "300ms"])
        .args([
            "--feed-ticks",
            "2",
            "--tick-ms",
            "10",
            "--upload-bytes",
            "1000",
        ])
        .args(["--chat-lines", "1"])
        .env_remove("RUST_BACKTRACE")
        .stdin(std::process::Stdio::null())
        .output();
    let demo = within("the demo", demo).await.unwrap();
    let err = String::from_utf8_lossy(&demo.stderr);
    assert!(demo.status.success(), "{err}");
    assert!(err.contains("streamhub@n1"), "{err}");
    for server in [a, b] {
        server.stop().await;
    }
}

/// Joins `room` on `url` (with `extra` metadata), waiting while the node
/// has no free room slot.
async fn join_when_free(url: &str, room: &str, extra: &[(&'static str, String)]) -> Member {
    within("a free room slot", async {
        loop {
            let mut meta = vec![("chat-room", room.to_owned())];
            meta.extend_from_slice(extra);
            match open(common::connect(url.to_owned()).await, &meta).await {
                Ok(member) => return member,
                Err(status) if status.code() == Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    })
    .await
}

#[tokio::test]
async fn idle_rooms_close_on_a_node_and_reopen_with_their_history() {
    if !nats_available("idle_rooms_close_on_a_node") {
        return;
    }
    let nats = Nats::start();
    let node = node_with(&[nats.url()], |config| {
        config.chat.max_rooms = 1;
        config.chat.room_idle_timeout = Duration::from_millis(100);
    })
    .await;
    let mut member = join(node.url(), "a").await;
    member.send(msg("ann", "one", "ann-1")).await;
    assert_eq!(member.next().await.message, "one");
    drop(member);
    // Room "a" closes when idle: "b" gets its slot.
    let member = join_when_free(&node.url(), "b", &[]).await;
    drop(member);
    // And "a" reopens with its history.
    let mut member = join_when_free(&node.url(), "a", &[("chat-history", "10".into())]).await;
    let first = member.next().await;
    assert_eq!((first.seq, first.message.as_str()), (1, "one"));
    drop(member);
    node.stop().await;
}

impl Member {
    /// The status the call ends with (after whatever was still queued).
    async fn ended(&mut self) -> Status {
        within("the member's call to end", async {
            loop {
                match self.rx.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("the call ended without a status"),
                    Err(status) => return status,
                }
            }
        })
        .await
    }
}

#[tokio::test]
async fn a_room_whose_stream_is_lost_is_created_again_as_a_new_epoch() {
    if !nats_available("a_room_whose_stream_is_lost_is_created_again") {
        return;
    }
    let nats = Nats::start();
    let urls = vec![nats.url()];
    let (a, b) = (node(&urls).await, node(&urls).await);
    let mut on_a = join(a.url(), "wiped").await;
    let mut on_b = join(b.url(), "wiped").await;
    let mut watcher = ChatServiceClient::new(common::connect(b.url()).await)
        .watch_room(WatchRoomRequest {
            room: "wiped".into(),
            ..WatchRoomRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    on_a.send(msg("ann", "before", "ann-1")).await;
    let before = on_a.next().await;
    assert_eq!((before.seq, before.message.as_str()), (1, "before"));
    assert_eq!(on_b.next().await.seq, 1);
    let watched = within("a watched message", watcher.message()).await;
    assert_eq!(watched.unwrap().unwrap().seq, 1);
    // The room's stream goes away, as when nats-server restarts with an
    // empty store. The old code looked the stream up forever and never
    // recovered: the members were never ended and every Send answered
    // UNAVAILABLE "no stream found".
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.delete_stream(format!(
        "{}{}",
        streamhub::cluster::chat::STREAM_PREFIX,
        streamhub::cluster::token("wiped")
    ))
    .await
    .unwrap();
    // Each node's feed creates the stream again (the first one does; the
    // other finds it) and ends its members as for any reset room:
    // UNAVAILABLE naming the reset...
    for member in [&mut on_a, &mut on_b] {
        let status = member.ended().await;
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("history was reset"), "{status:?}");
    }
    // (a watcher too)...
    let status = within("the watcher's end", async {
        loop {
            match watcher.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the watch ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // ...and their resume in the old epoch is refused: FAILED_PRECONDITION.
    let refused = open(
        common::connect(b.url()).await,
        &[
            ("chat-room", "wiped".to_owned()),
            ("chat-after-seq", "1".to_owned()),
            ("chat-epoch", before.epoch.to_string()),
        ],
    )
    .await
    .err()
    .expect("a resume in the old epoch is refused");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    // The room carries on as a new epoch: a member joins on B, a Send
    // through A is stored and reaches it.
    let mut new_b = join(b.url(), "wiped").await;
    let stored = ChatServiceClient::new(common::connect(a.url()).await)
        .send(SendRequest {
            room: "wiped".into(),
            message: Some(msg("bob", "after", "bob-1")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((stored.seq, stored.message.as_str()), (1, "after"));
    assert_ne!(stored.epoch, before.epoch);
    let seen = new_b.next().await;
    assert_eq!(
        (seen.seq, seen.epoch, seen.message.as_str()),
        (1, stored.epoch, "after")
    );
    drop((on_a, on_b, new_b));
    a.stop().await;
    b.stop().await;
}

/// The upload leases' key-value bucket, opened from the test.
async fn lease_bucket(nats: &Nats) -> async_nats::jetstream::kv::Store {
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.get_key_value(streamhub::cluster::lease::BUCKET)
        .await
        .unwrap()
}

/// Waits until `client`'s node reports upload `name` in progress.
async fn until_in_progress(client: &mut FileUploadServiceClient<Channel>, name: &str) {
    within("the upload to be in progress", async {
        loop {
            let q = client
                .query_upload(QueryUploadRequest {
                    filename: name.into(),
                })
                .await
                .unwrap()
                .into_inner();
            if q.in_progress {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_writer_whose_lease_was_taken_stops_writing_and_ends_aborted() {
    if !nats_available("a_writer_whose_lease_was_taken_stops_writing") {
        return;
    }
    let nats = Nats::start();
    let shared = tempfile::tempdir().unwrap();
    let dir = shared.path().to_path_buf();
    let a = node_with(&[nats.url()], |c| {
        c.upload.dir = Some(dir.clone());
        // Renewals every second, so the loss is noticed quickly.
        c.cluster.lease_ttl = Duration::from_secs(3);
    })
    .await;
    let name = "taken-lease.bin";
    let piece = data(1024);
    let (tx, rx) = mpsc::channel(4);
    let mut on_a = upload_client(a.channel().await);
    let mut call = {
        let mut on_a = on_a.clone();
        tokio::spawn(async move { on_a.upload(ReceiverStream::new(rx)).await })
    };
    tx.send(chunk(name, 0, &piece, None, None)).await.unwrap();
    until_in_progress(&mut on_a, name).await;
    // Another writer now holds the key (as after A's lease lapsed while A
    // was paused, and another node took the name): A's next renewal
    // finds another revision. The old code only logged that and went on
    // writing, into whatever the partial had become.
    lease_bucket(&nats)
        .await
        .put(streamhub::cluster::token(name), "another-node 0".into())
        .await
        .unwrap();
    // The client keeps sending (paced, not as synchronisation) until A
    // ends the call.
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    let mut index = 1;
    let ended = within("A to end the call", async {
        loop {
            tokio::select! {
                ended = &mut call => return ended.unwrap(),
                _ = pace.tick() => {
                    let _ = tx.send(chunk(name, index, &piece, None, None)).await;
                    index += 1;
                }
            }
        }
    })
    .await;
    let refused = ended.expect_err("the lease is lost");
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    assert!(refused.message().contains("lease"), "{refused:?}");
    assert!(refused.message().contains("QueryUpload"), "{refused:?}");
    // The bytes were left for the new holder (not discarded), nothing was
    // published, and the name stays held by the other writer.
    let partial = dir.join(".streamhub/partial").join(name);
    let held = std::fs::metadata(&partial).unwrap().len();
    assert!(held >= 1024 && held < u64::from(index) * 1024, "{held}");
    assert!(!dir.join(name).exists());
    let q = on_a
        .query_upload(QueryUploadRequest {
            filename: name.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(q.in_progress, "{q:?}");
    drop(tx);
    a.stop().await;
}

#[tokio::test]
async fn a_node_with_a_longer_lease_ttl_renews_by_the_buckets_max_age() {
    if !nats_available("a_node_with_a_longer_lease_ttl_renews") {
        return;
    }
    let nats = Nats::start();
    let urls = vec![nats.url()];
    let shared = tempfile::tempdir().unwrap();
    let dir = shared.path().to_path_buf();
    // Node 1 creates the bucket with leases of 3 s; node 2 is set to the
    // default 30 s (the old code renewed every 10 s: its lease lapsed 3 s
    // into every upload and a second writer was admitted).
    let one = node_with(&urls, |c| {
        c.upload.dir = Some(dir.clone());
        c.cluster.lease_ttl = Duration::from_secs(3);
    })
    .await;
    let two = node_with(&urls, |c| c.upload.dir = Some(dir.clone())).await;
    let name = "mixed-ttl.bin";
    let all = data(64 * 1024);
    let bucket = lease_bucket(&nats).await;
    let mut entries = bucket.watch(streamhub::cluster::token(name)).await.unwrap();
    let (tx, rx) = mpsc::channel(4);
    let mut on_two = upload_client(two.channel().await);
    let call = tokio::spawn(async move { on_two.upload(ReceiverStream::new(rx)).await });
    tx.send(chunk(name, 0, &all[..1024], None, None))
        .await
        .unwrap();
    // The upload stays quiet until node 2 has written its lease four
    // times (taken, then renewed three times): each renewal is a
    // compare-and-set on the previous revision, so the lease lived on
    // past the bucket's 3 s without a gap.
    within("node 2 to renew its lease three times", async {
        let mut puts = 0;
        while puts < 4 {
            let entry = entries.next().await.unwrap().unwrap();
            if entry.operation == async_nats::jetstream::kv::Operation::Put {
                puts += 1;
            }
        }
    })
    .await;
    let mut on_one = upload_client(one.channel().await);
    let q = on_one
        .query_upload(QueryUploadRequest {
            filename: name.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(q.in_progress, "{q:?}");
    let refused = on_one
        .upload(tokio_stream::iter(vec![chunk(
            name,
            0,
            &all,
            None,
            Some(&all),
        )]))
        .await
        .expect_err("one writer per name");
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    // Node 2's upload then completes.
    tx.send(chunk(name, 1, &all[1024..], None, Some(&all)))
        .await
        .unwrap();
    within("node 2's upload", call).await.unwrap().unwrap();
    assert_eq!(std::fs::read(dir.join(name)).unwrap(), all);
    one.stop().await;
    two.stop().await;
}

#[tokio::test]
async fn uploads_work_again_after_the_lease_stream_is_lost() {
    if !nats_available("uploads_work_again_after_the_lease_stream_is_lost") {
        return;
    }
    let nats = Nats::start();
    let node = node(&[nats.url()]).await;
    // NATS lost its storage (or an operator deleted the stream): the old
    // code created the bucket's stream only at start, and every Upload and
    // QueryUpload failed UNAVAILABLE from then on.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.delete_stream(format!("KV_{}", streamhub::cluster::lease::BUCKET))
        .await
        .unwrap();
    let all = data(8 * 1024);
    let mut client = upload_client(node.channel().await);
    let q = client
        .query_upload(QueryUploadRequest {
            filename: "after-wipe.bin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!q.in_progress, "{q:?}");
    let done = client
        .upload(tokio_stream::iter(vec![chunk(
            "after-wipe.bin",
            0,
            &all,
            None,
            Some(&all),
        )]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.total_bytes, all.len() as u64);
    node.stop().await;
}
