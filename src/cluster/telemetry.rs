//! The clustered latest-value broker: telemetry samples shared by every
//! node through NATS JetStream.
//!
//! - A sample published on a node goes to the subject
//!   `streamhub.telemetry.sample.<name>` (the name made a subject token by
//!   [`super::token`]). The stream `STREAMHUB_TELEMETRY` captures those
//!   subjects and keeps one message per subject: the latest value of every
//!   service, for nodes that start (or reconnect) later.
//! - Every node follows that stream with one ordered consumer and feeds
//!   what it receives into its own [`MemoryBroker`]; its subscribers wait
//!   on that, exactly as on a single node. A node's own samples come back
//!   the same way, so every node sees each sample once, in one order, and
//!   a slow subscriber still skips to the newest.
//! - On start, and after every reconnect, the consumer begins with the
//!   last message of every subject; the node serves values as live only
//!   once it has read up to the stream's end as of that moment. While it
//!   is cut off, [`LatestBroker::check`] says so and the hub refuses
//!   snapshots, lists, subscriptions and publishes with UNAVAILABLE; open
//!   subscriptions stay open and continue after the reconnect.
//! - Publishing never waits on the network: samples wait in a per-service
//!   slot (a newer sample replaces an unsent one) for the node's publisher
//!   task, so a burst of one service costs one slot.
//!
//! Alerts are meant for the subject [`ALERT_SUBJECT`], which every node
//! subscribes to, once the hub has an alert broadcast to feed.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream::consumer::DeliverPolicy;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::{Cluster, ClusterError, token};
use crate::{
    broker::{BrokerError, LatestBroker, MemoryBroker, Subscription},
    shutdown::Shutdown,
    telemetry::Sample,
};

/// The stream holding the latest sample of every service.
pub const STREAM: &str = "STREAMHUB_TELEMETRY";

/// Subjects of samples: `streamhub.telemetry.sample.<token of the name>`.
pub const SAMPLE_PREFIX: &str = "streamhub.telemetry.sample";

/// The subject alerts are broadcast on, to every node.
pub const ALERT_SUBJECT: &str = "streamhub.telemetry.alert";

/// How long a node waits at start for the latest values before serving.
const CATCH_UP: Duration = Duration::from_secs(30);

/// A sample as it travels between nodes (JSON, so `nats sub` shows it).
#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    service: String,
    cpu_usage: f64,
    memory_mb: f64,
    request_count: u64,
    timestamp_ms: u64,
    /// The sample's number in its service's sequence on the node that
    /// took it.
    #[serde(default)]
    seq: u64,
}

impl From<&Sample> for Wire {
    fn from(s: &Sample) -> Self {
        Self {
            service: s.service.to_string(),
            cpu_usage: s.cpu_usage,
            memory_mb: s.memory_mb,
            request_count: s.request_count,
            timestamp_ms: s.timestamp_ms,
            seq: s.seq,
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
            seq: w.seq,
        }
    }
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
    pending: Mutex<Pending>,
    wake: Notify,
    /// Whether the feed has read up to the stream's end since the last
    /// (re)connection.
    fresh: AtomicBool,
    closed: AtomicBool,
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
    /// Creates the stream if needed, starts following it and publishing,
    /// and returns once the latest value of every service is read (at
    /// most 30 s). Its tasks run until `shutdown`.
    pub async fn start(
        cluster: Arc<Cluster>,
        max_topics: usize,
        shutdown: &Shutdown,
    ) -> Result<Arc<Self>, ClusterError> {
        cluster.ensure_stream(stream_config(&cluster)).await?;
        let broker = Arc::new(Self {
            cluster,
            local: Arc::new(MemoryBroker::new(max_topics)),
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            fresh: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        let (caught_up_tx, mut caught_up) = watch::channel(false);
        shutdown.spawn(Arc::clone(&broker).feed(shutdown.token(), caught_up_tx));
        shutdown.spawn(Arc::clone(&broker).publisher(shutdown.token()));
        let ready = tokio::time::timeout(CATCH_UP, caught_up.wait_for(|c| *c)).await;
        if !matches!(ready, Ok(Ok(_))) {
            return Err(ClusterError::js(
                format!("read the latest values of stream {STREAM}"),
                "not done within 30 s",
            ));
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

    /// Follows the stream into the local broker, recreating the consumer
    /// after errors and reconnects, until `token` is cancelled.
    async fn feed(self: Arc<Self>, token: CancellationToken, caught_up: watch::Sender<bool>) {
        let mut link = self.cluster.link();
        // The stream sequence applied last, per service: a re-read after a
        // reconnect delivers values already applied, which are skipped.
        let mut applied: HashMap<Arc<str>, u64> = HashMap::new();
        let mut created = None;
        let filter = format!("{SAMPLE_PREFIX}.>");
        loop {
            self.fresh.store(false, Ordering::Relaxed);
            // Wait for a connection.
            let connected = tokio::select! {
                biased;
                () = token.cancelled() => return,
                state = link.wait_for(|l| l.connected) => state.map(|l| l.generation),
            };
            let Ok(generation) = connected else { return };
            let attempt = async {
                let stream = self
                    .cluster
                    .ensure_stream(stream_config(&self.cluster))
                    .await?;
                let info = stream.cached_info();
                let messages = self
                    .cluster
                    .follow(STREAM, &filter, DeliverPolicy::LastPerSubject)
                    .await?;
                Ok::<_, ClusterError>((info.created, info.state.last_sequence, messages))
            };
            let (stream_created, target, messages) = tokio::select! {
                biased;
                () = token.cancelled() => return,
                result = attempt => match result {
                    Ok(found) => found,
                    Err(err) => {
                        tracing::warn!(%err, "cluster: cannot follow the telemetry stream; retrying");
                        if pause(&token).await { return; }
                        continue;
                    }
                },
            };
            if created != Some(stream_created) {
                // A new stream (NATS lost its storage): sequences restart.
                applied.clear();
                created = Some(stream_created);
            }
            if target == 0 {
                self.mark_fresh(&caught_up);
            }
            tokio::pin!(messages);
            loop {
                let next = tokio::select! {
                    biased;
                    () = token.cancelled() => return,
                    changed = link.changed() => {
                        if changed.is_err() { return; }
                        let now = *link.borrow_and_update();
                        if now.connected && now.generation == generation {
                            continue;
                        }
                        break;
                    }
                    next = messages.next() => next,
                };
                let message = match next {
                    Some(Ok(message)) => message,
                    Some(Err(err)) => {
                        tracing::warn!(%err, "cluster: telemetry consumer failed; recreating it");
                        break;
                    }
                    None => break,
                };
                let seq = message.info().map_or(0, |i| i.stream_sequence);
                match serde_json::from_slice::<Wire>(&message.payload) {
                    Ok(wire) => self.apply(&mut applied, seq, wire.into()),
                    Err(err) => {
                        tracing::warn!(%err, subject = %message.subject, "cluster: undecodable sample skipped");
                    }
                }
                if seq >= target {
                    self.mark_fresh(&caught_up);
                }
            }
            if pause(&token).await {
                return;
            }
        }
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
        match self.local.publish(&topic, sample) {
            Ok(()) => {
                applied.insert(topic, seq);
            }
            Err(BrokerError::Closed) => {}
            Err(err) => tracing::warn!(%err, service = %topic, "cluster: sample not kept"),
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

fn stream_config(cluster: &Cluster) -> async_nats::jetstream::stream::Config {
    async_nats::jetstream::stream::Config {
        max_messages_per_subject: 1,
        description: Some("streamhub: the latest telemetry sample of every service".into()),
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
