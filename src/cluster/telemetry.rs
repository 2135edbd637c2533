//! The clustered latest-value broker: telemetry samples shared by every
//! node through NATS JetStream.
//!
//! - A sample published on a node goes to the subject
//!   `streamhub.telemetry.sample.<name>` (the name made a subject token by
//!   [`super::token`]). The stream `STREAMHUB_TELEMETRY` captures those
//!   subjects and keeps `telemetry.history` messages per subject (the
//!   largest any node asked for): the history of every service, for nodes
//!   that start (or reconnect) later.
//! - Every node follows that stream ([`Cluster::follow`]) and lands
//!   what it receives in its own records ([`Records::land`]: numbered,
//!   stored in its own [`MemoryBroker`], appended to the history, announced
//!   on the change feed); its subscribers and watchers wait on those,
//!   exactly as on a single node. A node's own samples come back the same
//!   way (they land on no node before), so every node records each sample
//!   once, in one order, and a slow subscriber still skips to the newest.
//!   A sample's `seq` is numbered by each node as it lands (it is not sent).
//! - On start the consumer reads the whole stream, so a node started
//!   later has the same history as the others (and the latest value of
//!   every service); after a reconnect it goes on from the stream
//!   sequence it applied last + 1, so samples published while it was cut
//!   off land too (as many per service as the stream still keeps). The
//!   node serves values as live only once it has read up to the stream's
//!   end as of that moment. Reading the whole stream costs one message per
//!   stored sample at start: `telemetry.history` × services (900 × 1,000
//!   is 900,000 small JSON messages, about 7 s); the start waits as long
//!   as the read goes on (`CATCH_UP_STALL`). While it
//!   is cut off, [`LatestBroker::check`] says so and the hub refuses
//!   snapshots, lists, subscriptions, watches, history and publishes with
//!   UNAVAILABLE; open subscriptions and watches stay open and continue
//!   after the reconnect.
//! - Publishing never waits on the network: samples wait in a per-service
//!   slot (a newer sample replaces an unsent one) for the node's publisher
//!   task, so a burst of one service costs one slot.
//!
//! - Alerts raised on a node (already in its own alert feed) are published
//!   on the subject [`ALERT_SUBJECT`] with the node's origin id, through
//!   JetStream, retried until stored (`NatsBroker::alert_publisher`); the stream
//!   [`ALERT_STREAM`] keeps the last `telemetry.alert_history` of them.
//!   Every node follows that stream as it follows the samples (from the
//!   start, then from the last sequence handled + 1 after a reconnect) and
//!   lands the alerts of other origins in its alert feed, so each node's
//!   watchers see each alert once, a node started later back-fills the
//!   recent ones, and a node cut off meanwhile gets them late.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream::{consumer::DeliverPolicy, message::PublishMessage};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{Cluster, ClusterError, token};
use crate::{
    broker::{BrokerError, LatestBroker, MemoryBroker, Subscription},
    config::TelemetryConfig,
    shutdown::Shutdown,
    telemetry::{Records, Sample, SampleBroker, TelemetryError, alerts::Alert, watch::AlertRecord},
};

/// The stream holding the latest sample of every service.
pub const STREAM: &str = "STREAMHUB_TELEMETRY";

/// Subjects of samples: `streamhub.telemetry.sample.<token of the name>`.
pub const SAMPLE_PREFIX: &str = "streamhub.telemetry.sample";

/// The subject alerts are broadcast on, to every node.
pub const ALERT_SUBJECT: &str = "streamhub.telemetry.alert";

/// The stream keeping the last `telemetry.alert_history` alerts.
pub const ALERT_STREAM: &str = "STREAMHUB_ALERTS";

/// How long a node starting may go without reading any stored sample
/// before it gives up: the read at start takes as long as the stream's
/// size needs (about 7 s for 900,000 samples, measured in docs/cluster.md),
/// but a read that stops is an error.
const CATCH_UP_STALL: Duration = Duration::from_secs(30);

/// How often a node starting logs how many stored samples it has read.
const CATCH_UP_REPORT: Duration = Duration::from_secs(5);

/// Alerts waiting to be published; more are dropped (and logged).
const ALERT_QUEUE: usize = 1024;

/// A sample as it travels between nodes (JSON, so `nats sub` shows it).
#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    service: String,
    cpu_usage: f64,
    memory_mb: f64,
    request_count: u64,
    timestamp_ms: u64,
}

impl From<&Sample> for Wire {
    fn from(s: &Sample) -> Self {
        Self {
            service: s.service.to_string(),
            cpu_usage: s.cpu_usage,
            memory_mb: s.memory_mb,
            request_count: s.request_count,
            timestamp_ms: s.timestamp_ms,
        }
    }
}

impl From<Wire> for Sample {
    fn from(w: Wire) -> Self {
        Self {
            service: Arc::from(w.service),
            cpu_usage: w.cpu_usage,
            memory_mb: w.memory_mb,
            request_count: w.request_count,
            timestamp_ms: w.timestamp_ms,
            // Numbered by each node as it lands.
            seq: 0,
        }
    }
}

/// An alert as it travels between nodes (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct AlertWire {
    /// The publishing node's [`NatsBroker::origin`]: a node skips its own.
    origin: String,
    service: String,
    alert_type: String,
    message: String,
    value: f64,
    timestamp_ms: u64,
}

impl AlertWire {
    fn new(origin: &str, record: &AlertRecord) -> Self {
        Self {
            origin: origin.to_owned(),
            service: record.service.to_string(),
            alert_type: record.alert.alert_type.clone(),
            message: record.alert.message.clone(),
            value: record.alert.value,
            timestamp_ms: record.alert.timestamp_ms,
        }
    }

    fn record(self) -> AlertRecord {
        AlertRecord {
            service: Arc::from(self.service),
            alert: Alert {
                alert_type: self.alert_type,
                message: self.message,
                value: self.value,
                timestamp_ms: self.timestamp_ms,
            },
        }
    }
}

/// An id for this node's broker that no other node has: its name (for
/// people reading `nats sub`) and 64 random bits (node names may repeat).
fn origin_id(node: &str) -> String {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness: the clock and the process id still differ
        // between nodes in practice.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        #[allow(clippy::cast_possible_truncation)] // any 64 bits will do
        let mixed = (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32);
        bytes = mixed.to_le_bytes();
    }
    format!("{node}/{}", hex::encode(bytes))
}

/// Samples waiting for the publisher task: the newest per service, in the
/// order services first became pending.
#[derive(Default)]
struct Pending {
    newest: HashMap<Arc<str>, Sample>,
    order: VecDeque<Arc<str>>,
}

/// The clustered [`LatestBroker`] of telemetry samples.
pub struct NatsBroker {
    cluster: Arc<Cluster>,
    local: Arc<MemoryBroker<Sample>>,
    /// Where samples and other nodes' alerts land.
    records: Arc<Records>,
    /// This broker's id on alerts it publishes.
    origin: String,
    /// Alerts for the alert publisher task.
    alerts: mpsc::Sender<AlertRecord>,
    pending: Mutex<Pending>,
    wake: Notify,
    /// Whether the feed has read up to the stream's end since the last
    /// (re)connection.
    fresh: AtomicBool,
    closed: AtomicBool,
    /// Samples the stream keeps per service (`telemetry.history`).
    history: usize,
    /// Stored samples read since start: the start's progress.
    read: AtomicU64,
}

impl std::fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBroker")
            .field("node", &self.cluster.node())
            .finish_non_exhaustive()
    }
}

fn sample_subject(topic: &str) -> String {
    format!("{SAMPLE_PREFIX}.{}", token(topic))
}

impl NatsBroker {
    /// Creates the sample and alert streams if needed (or raises what
    /// they keep to `telemetry.history` samples per service and
    /// `telemetry.alert_history` alerts), starts following them (landing
    /// samples and other nodes' alerts in `records`) and publishing, and
    /// returns once every stored sample is read (at most 30 s). Its tasks
    /// run until `shutdown`.
    ///
    /// # Errors
    /// [`ClusterError`] when a stream cannot be created, looked up or
    /// updated, or the stored samples are not read within 30 s.
    pub async fn start(
        cluster: Arc<Cluster>,
        records: Arc<Records>,
        telemetry: &TelemetryConfig,
        shutdown: &Shutdown,
    ) -> Result<Arc<Self>, ClusterError> {
        let history = telemetry.history;
        let config = stream_config(&cluster, history);
        let stream = cluster.ensure_stream(config.clone()).await?;
        if stream.cached_info().config.max_messages_per_subject < config.max_messages_per_subject {
            // Made by an older streamhub (the latest value only) or a node
            // keeping less history: keep as much as this node shows.
            cluster.update_stream(config).await?;
        }
        let config = alert_stream_config(&cluster, telemetry.alert_history);
        let stream = cluster.ensure_stream(config.clone()).await?;
        if stream.cached_info().config.max_messages < config.max_messages {
            cluster.update_stream(config).await?;
        }
        let (alerts, outgoing) = mpsc::channel(ALERT_QUEUE);
        let broker = Arc::new(Self {
            origin: origin_id(cluster.node()),
            cluster,
            local: Arc::new(MemoryBroker::new(telemetry.max_services)),
            records,
            alerts,
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            fresh: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            history,
            read: AtomicU64::new(0),
        });
        let (caught_up_tx, mut caught_up) = watch::channel(false);
        shutdown.spawn(Arc::clone(&broker).feed(shutdown.token(), caught_up_tx));
        shutdown.spawn(Arc::clone(&broker).publisher(shutdown.token()));
        shutdown.spawn(Arc::clone(&broker).alert_publisher(outgoing, shutdown.token()));
        shutdown.spawn(Arc::clone(&broker).alert_feed(shutdown.token(), telemetry.alert_history));
        // Wait until the stream is read up to its end, however long that
        // takes, as long as the read goes on.
        let mut read = 0;
        let mut quiet = Duration::ZERO;
        loop {
            match tokio::time::timeout(CATCH_UP_REPORT, caught_up.wait_for(|c| *c)).await {
                Ok(Ok(_)) => break,
                Ok(Err(_)) => {
                    return Err(ClusterError::js(
                        format!("read the samples stored in stream {STREAM}"),
                        "the node is shutting down",
                    ));
                }
                Err(_) => {}
            }
            let now = broker.read.load(Ordering::Relaxed);
            if now > read {
                tracing::info!(
                    read = now,
                    stream = STREAM,
                    "cluster: reading the stored samples"
                );
                read = now;
                quiet = Duration::ZERO;
            } else {
                quiet += CATCH_UP_REPORT;
                if quiet >= CATCH_UP_STALL {
                    return Err(ClusterError::js(
                        format!("read the samples stored in stream {STREAM}"),
                        format!(
                            "nothing read for {} s ({read} read before)",
                            CATCH_UP_STALL.as_secs()
                        ),
                    ));
                }
            }
        }
        Ok(broker)
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends pending samples to NATS until `token` is cancelled.
    async fn publisher(self: Arc<Self>, token: CancellationToken) {
        loop {
            tokio::select! {
                biased;
                () = token.cancelled() => return,
                () = self.wake.notified() => {}
            }
            loop {
                let next = {
                    let mut pending = self.pending();
                    let next = pending.order.pop_front();
                    next.and_then(|topic| pending.newest.remove(&topic))
                };
                let Some(sample) = next else { break };
                let payload = match serde_json::to_vec(&Wire::from(&sample)) {
                    Ok(payload) => payload,
                    Err(err) => {
                        tracing::error!(%err, "cluster: cannot encode a sample");
                        continue;
                    }
                };
                let subject = sample_subject(&sample.service);
                if let Err(err) = self.cluster.client().publish(subject, payload.into()).await {
                    tracing::warn!(%err, service = %sample.service, "cluster: publishing a sample failed");
                }
            }
        }
    }

    /// Publishes this node's alerts on [`ALERT_SUBJECT`], in the order
    /// raised, until `token` is cancelled. Each is published through
    /// JetStream and retried (every 250 ms, the same `Nats-Msg-Id`, so the
    /// stream stores it once) until [`ALERT_STREAM`] acknowledges it: an
    /// alert raised as the node loses NATS, or while the stream's leader
    /// is being elected, reaches the other nodes once NATS is back instead
    /// of depending on the client's reconnect buffer. Alerts raised
    /// meanwhile wait in the queue (`ALERT_QUEUE`; beyond it they are
    /// dropped and logged).
    async fn alert_publisher(
        self: Arc<Self>,
        mut outgoing: mpsc::Receiver<AlertRecord>,
        token: CancellationToken,
    ) {
        let mut published = 0u64;
        loop {
            let record = tokio::select! {
                biased;
                () = token.cancelled() => return,
                next = outgoing.recv() => match next {
                    Some(record) => record,
                    None => return,
                },
            };
            let payload = match serde_json::to_vec(&AlertWire::new(&self.origin, &record)) {
                Ok(payload) => bytes::Bytes::from(payload),
                Err(err) => {
                    tracing::error!(%err, "cluster: cannot encode an alert");
                    continue;
                }
            };
            published += 1;
            // The origin is random per start: ids never repeat across
            // restarts within the stream's duplicate window.
            let id = format!("{}/{published}", self.origin);
            let mut warned = false;
            loop {
                let message = PublishMessage::build()
                    .payload(payload.clone())
                    .message_id(id.as_str());
                let acked = async {
                    let ack = self
                        .cluster
                        .jetstream()
                        .send_publish(ALERT_SUBJECT, message)
                        .await
                        .map_err(|e| e.to_string())?;
                    ack.await.map_err(|e| e.to_string())
                };
                let result = tokio::select! {
                    biased;
                    () = token.cancelled() => return,
                    result = acked => result,
                };
                match result {
                    Ok(_) => break,
                    Err(err) => {
                        if !warned {
                            tracing::warn!(%err, service = %record.service, "cluster: publishing an alert failed; retrying until NATS stores it");
                            warned = true;
                        }
                        if pause(&token).await {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Follows the sample stream into the node's records until `token` is
    /// cancelled (see [`follow_stream`]).
    async fn feed(self: Arc<Self>, token: CancellationToken, caught_up: watch::Sender<bool>) {
        let config = stream_config(&self.cluster, self.history);
        let mut follower = SampleFollower {
            broker: &self,
            applied: HashMap::new(),
            caught_up,
        };
        follow_stream(&self.cluster, config, &token, &mut follower).await;
    }

    /// Follows the alert stream into the node's alert feed until `token`
    /// is cancelled (see [`follow_stream`]): alerts of other origins land,
    /// including the ones raised while this node was cut off (late, once
    /// each), and on start the ones the stream keeps.
    async fn alert_feed(self: Arc<Self>, token: CancellationToken, alert_history: usize) {
        let config = alert_stream_config(&self.cluster, alert_history);
        let mut follower = AlertFollower { broker: &self };
        follow_stream(&self.cluster, config, &token, &mut follower).await;
    }

    fn mark_fresh(&self, caught_up: &watch::Sender<bool>) {
        if !self.fresh.swap(true, Ordering::Relaxed) {
            tracing::debug!("cluster: latest telemetry values read");
        }
        caught_up.send_replace(true);
    }

    fn apply(&self, applied: &mut HashMap<Arc<str>, u64>, seq: u64, sample: Sample) {
        if applied
            .get(&sample.service)
            .is_some_and(|&last| last >= seq)
        {
            return;
        }
        let topic = Arc::clone(&sample.service);
        let landed = self
            .records
            .land(sample, |sample| self.local.publish(&topic, sample));
        match landed {
            Ok(_) => {
                applied.insert(topic, seq);
            }
            Err(TelemetryError::Closed) => {}
            Err(err) => tracing::warn!(%err, service = %topic, "cluster: sample not kept"),
        }
    }
}

/// What [`follow_stream`] hands a stream's messages to.
trait Follower {
    /// The feed is (re)connecting: what the node holds may be behind.
    fn behind(&mut self) {}
    /// The stream is not the one followed before (first start, or NATS
    /// lost its storage): its sequences restart.
    fn restart(&mut self) {}
    /// One message, with its stream sequence.
    fn handle(&mut self, seq: u64, message: &async_nats::jetstream::Message);
    /// Everything the stream held when the consumer was made is handled.
    fn caught_up(&mut self) {}
}

/// Follows the stream `config` describes (created if needed) into
/// `follower` until `token` is cancelled: on start from its first message,
/// after a reconnect or a failed consumer ([`Cluster::follow`]) from the
/// last sequence handled + 1, so nothing the stream still keeps is missed
/// or handled twice.
async fn follow_stream(
    cluster: &Cluster,
    config: async_nats::jetstream::stream::Config,
    token: &CancellationToken,
    follower: &mut impl Follower,
) {
    let mut link = cluster.link();
    let name = config.name.clone();
    let filter = config.subjects.first().cloned().unwrap_or_default();
    // The stream sequence handled last: a new consumer goes on after it.
    let mut last = 0u64;
    let mut created = None;
    loop {
        follower.behind();
        let connected = tokio::select! {
            biased;
            () = token.cancelled() => return,
            state = link.wait_for(|l| l.connected) => state.map(|l| l.generation),
        };
        let Ok(generation) = connected else { return };
        let attempt = async {
            let stream = cluster.ensure_stream(config.clone()).await?;
            let info = stream.cached_info();
            // The same stream as before: go on after the last sequence
            // handled; else read all it keeps.
            let policy = if created == Some(info.created) && last > 0 {
                DeliverPolicy::ByStartSequence {
                    start_sequence: last + 1,
                }
            } else {
                DeliverPolicy::All
            };
            let messages = cluster.follow(&name, &filter, policy).await?;
            Ok::<_, ClusterError>((info.created, info.state.last_sequence, messages))
        };
        let (stream_created, target, messages) = tokio::select! {
            biased;
            () = token.cancelled() => return,
            result = attempt => match result {
                Ok(found) => found,
                Err(err) => {
                    tracing::warn!(%err, stream = %name, "cluster: cannot follow a stream; retrying");
                    if pause(token).await { return; }
                    continue;
                }
            },
        };
        if created != Some(stream_created) {
            follower.restart();
            last = 0;
            created = Some(stream_created);
        }
        if target <= last {
            follower.caught_up();
        }
        tokio::pin!(messages);
        loop {
            let next = tokio::select! {
                biased;
                () = token.cancelled() => return,
                () = super::connection_gone(&mut link, generation) => break,
                next = messages.next() => next,
            };
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(err)) => {
                    tracing::warn!(%err, stream = %name, "cluster: consumer failed; recreating it");
                    break;
                }
                None => break,
            };
            let seq = message.info().map_or(0, |i| i.stream_sequence);
            last = last.max(seq);
            follower.handle(seq, &message);
            if seq >= target {
                follower.caught_up();
            }
        }
        if pause(token).await {
            return;
        }
    }
}

/// Lands samples in the node's records.
struct SampleFollower<'a> {
    broker: &'a NatsBroker,
    /// The stream sequence applied last, per service: a re-read of a
    /// stream may deliver values already applied, which are skipped.
    applied: HashMap<Arc<str>, u64>,
    caught_up: watch::Sender<bool>,
}

impl Follower for SampleFollower<'_> {
    fn behind(&mut self) {
        self.broker.fresh.store(false, Ordering::Relaxed);
    }

    fn restart(&mut self) {
        self.applied.clear();
    }

    fn handle(&mut self, seq: u64, message: &async_nats::jetstream::Message) {
        self.broker.read.fetch_add(1, Ordering::Relaxed);
        match serde_json::from_slice::<Wire>(&message.payload) {
            Ok(wire) => self.broker.apply(&mut self.applied, seq, wire.into()),
            Err(err) => {
                tracing::warn!(%err, subject = %message.subject, "cluster: undecodable sample skipped");
            }
        }
    }

    fn caught_up(&mut self) {
        self.broker.mark_fresh(&self.caught_up);
    }
}

/// Lands other nodes' alerts in the node's alert feed.
struct AlertFollower<'a> {
    broker: &'a NatsBroker,
}

impl Follower for AlertFollower<'_> {
    fn handle(&mut self, _seq: u64, message: &async_nats::jetstream::Message) {
        match serde_json::from_slice::<AlertWire>(&message.payload) {
            // This node's own: already in its feed.
            Ok(wire) if wire.origin == self.broker.origin => {}
            Ok(wire) => self.broker.records.land_alert(wire.record()),
            Err(err) => tracing::warn!(%err, "cluster: undecodable alert skipped"),
        }
    }
}

/// Waits a moment before a retry; true if `token` was cancelled meanwhile.
async fn pause(token: &CancellationToken) -> bool {
    tokio::select! {
        () = token.cancelled() => true,
        () = tokio::time::sleep(Duration::from_millis(250)) => false,
    }
}

/// The stream of alerts: the last `alert_history` alerts raised on any
/// node.
fn alert_stream_config(
    cluster: &Cluster,
    alert_history: usize,
) -> async_nats::jetstream::stream::Config {
    async_nats::jetstream::stream::Config {
        max_messages: i64::try_from(alert_history.max(1)).unwrap_or(i64::MAX),
        description: Some("streamhub: the alerts raised on every node".into()),
        ..cluster.stream_config(ALERT_STREAM.to_owned(), vec![ALERT_SUBJECT.to_owned()])
    }
}

fn stream_config(cluster: &Cluster, history: usize) -> async_nats::jetstream::stream::Config {
    async_nats::jetstream::stream::Config {
        max_messages_per_subject: i64::try_from(history.max(1)).unwrap_or(i64::MAX),
        description: Some("streamhub: the telemetry history of every service".into()),
        ..cluster.stream_config(STREAM.to_owned(), vec![format!("{SAMPLE_PREFIX}.>")])
    }
}

impl LatestBroker<Sample> for NatsBroker {
    fn publish(&self, topic: &str, value: Sample) -> Result<(), BrokerError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(BrokerError::Closed);
        }
        self.check()?;
        let mut pending = self.pending();
        if !self.local.contains(topic)
            && !pending.newest.contains_key(topic)
            && self.local.len() + pending.newest.len() >= self.local.max_topics()
        {
            return Err(BrokerError::TooManyTopics {
                limit: self.local.max_topics(),
            });
        }
        let topic: Arc<str> = Arc::from(topic);
        if pending.newest.insert(Arc::clone(&topic), value).is_none() {
            pending.order.push_back(topic);
        }
        drop(pending);
        self.wake.notify_one();
        Ok(())
    }

    fn latest(&self, topic: &str) -> Option<Sample> {
        self.local.latest(topic)
    }

    fn subscribe(&self, topic: &str) -> Result<Subscription<Sample>, BrokerError> {
        self.local.subscribe(topic)
    }

    fn topics(&self) -> Vec<(String, Option<Sample>)> {
        self.local.topics()
    }

    /// Forgets this node's view only: the stream keeps the last sample
    /// (re-read after a reconnect, it is skipped as applied already).
    fn forget(&self, topic: &str) -> bool {
        self.local.forget(topic)
    }

    fn check(&self) -> Result<(), BrokerError> {
        self.cluster
            .check()
            .map_err(|err| BrokerError::Unavailable(err.to_string()))?;
        if self.fresh.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err(BrokerError::Unavailable(
                "this node is re-reading the latest values from NATS; retry in a moment".into(),
            ))
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.local.close();
    }
}

impl SampleBroker for NatsBroker {
    /// Sends the sample to NATS; it lands (here too) when the feed
    /// delivers it back.
    fn offer(&self, sample: Sample, _records: &Records) -> Result<Option<Sample>, TelemetryError> {
        let topic = Arc::clone(&sample.service);
        self.publish(&topic, sample)?;
        Ok(None)
    }

    fn broadcast_alert(&self, record: &AlertRecord) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        if let Err(err) = self.alerts.try_send(record.clone()) {
            tracing::warn!(%err, service = %record.service, "cluster: alert not sent to the other nodes");
        }
    }
}
