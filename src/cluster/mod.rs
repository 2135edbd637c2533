//! Cluster mode: several streamhub nodes that behave as one server, over
//! NATS (core subjects, JetStream streams and a key-value bucket).
//!
//! Each concern is another implementation of an interface the single-node
//! server already has; the services do not know which one they got:
//!
//! - [`telemetry`]: [`telemetry::NatsBroker`], a
//!   [`SampleBroker`](crate::telemetry::SampleBroker) whose samples travel
//!   on `streamhub.telemetry.sample.<name>` into the stream
//!   `STREAMHUB_TELEMETRY` (one message kept per subject: the latest), and
//!   come back to every node through one consumer that lands them
//!   in the node's records (in-process broker, history, change feed);
//!   alerts travel on `streamhub.telemetry.alert`.
//! - [`chat`]: [`chat::NatsHub`], a [`RoomHub`](crate::chat::room::RoomHub)
//!   whose rooms are JetStream streams (`STREAMHUB_CHAT_<room>`), so a
//!   room's stream sequence is its seq on every node.
//! - [`lease`]: [`lease::NatsLeases`], the upload store's
//!   [`SharedLeases`](crate::upload::store::SharedLeases): one writer per
//!   upload name across nodes, as keys with expiry in the bucket
//!   `streamhub_upload_leases`.
//!
//! This file holds the connection: [`Cluster::connect`], the link state
//! every implementation consults before serving anything as live, and the
//! helpers that create streams idempotently (nats-server 2.9 included).
//!
//! No tonic or protobuf types appear here.

pub mod chat;
pub mod lease;
pub mod telemetry;

use std::{fmt::Write as _, net::SocketAddr, sync::Arc, time::Duration};

use async_nats::{
    ConnectOptions, Event, ServerAddr,
    jetstream::{
        self,
        consumer::{AckPolicy, DeliverPolicy, ReplayPolicy, pull},
        stream::{self, StorageType},
    },
};
use futures::{Stream, StreamExt};
use tokio::sync::watch;

use crate::config::ClusterConfig;

/// Errors of cluster mode.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A `cluster.nats` entry is not a NATS URL.
    #[error("cluster.nats entry {url:?} is not a NATS server URL: {reason}")]
    BadUrl {
        /// The entry.
        url: String,
        /// Why.
        reason: String,
    },
    /// The credentials or CA file cannot be read.
    #[error("cannot read {what}: {cause}")]
    File {
        /// Which setting.
        what: &'static str,
        /// The cause (in the message, so not a `source()`).
        cause: std::io::Error,
    },
    /// NATS cannot be reached.
    #[error("cannot connect to NATS ({servers}): {reason}")]
    Connect {
        /// The servers tried.
        servers: String,
        /// Why.
        reason: String,
    },
    /// NATS answered a JetStream request with an error, or not in time.
    #[error("NATS JetStream {action} failed: {reason}")]
    JetStream {
        /// What was being done.
        action: String,
        /// Why.
        reason: String,
    },
    /// This node is not connected to NATS right now.
    #[error("this node has lost its connection to NATS (cluster mode); try another node or retry")]
    Disconnected,
}

impl ClusterError {
    /// A [`ClusterError::JetStream`] for `action`.
    pub fn js(action: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        ClusterError::JetStream {
            action: action.into(),
            reason: reason.to_string(),
        }
    }
}

/// The node's link to NATS as its implementations see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    /// Whether the client is connected right now.
    pub connected: bool,
    /// Counts connections: it changes on every reconnect, so consumers
    /// that may have been lost with the old connection are recreated.
    pub generation: u64,
}

/// Waits until the connection counted as `generation` is gone (lost, or
/// replaced by a reconnect): consumers made on it must then be recreated.
/// Returns at once if the link is no longer watched (the node is closing).
pub async fn connection_gone(link: &mut watch::Receiver<Link>, generation: u64) {
    let _ = link
        .wait_for(|now| !(now.connected && now.generation == generation))
        .await;
}

/// A node's connection to the cluster: one NATS client and its JetStream
/// context, shared by every cluster implementation of the node.
#[derive(Debug)]
pub struct Cluster {
    client: async_nats::Client,
    js: jetstream::Context,
    node: String,
    config: ClusterConfig,
    link: watch::Receiver<Link>,
}

impl Cluster {
    /// Connects to the NATS servers of `config` (waiting at most
    /// `request_timeout`); `listen` names the node when `cluster.node` is
    /// empty. The client reconnects by itself, forever, after a loss.
    pub async fn connect(
        config: &ClusterConfig,
        listen: SocketAddr,
    ) -> Result<Arc<Self>, ClusterError> {
        let node = if config.node.is_empty() {
            let host = sysinfo::System::host_name().unwrap_or_else(|| "localhost".to_owned());
            format!("{host}:{}", listen.port())
        } else {
            config.node.clone()
        };
        let mut servers = Vec::with_capacity(config.nats.len());
        for url in &config.nats {
            for part in url.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let addr = part
                    .parse::<ServerAddr>()
                    .map_err(|err| ClusterError::BadUrl {
                        url: part.to_owned(),
                        reason: err.to_string(),
                    })?;
                servers.push(addr);
            }
        }
        let (link_tx, link) = watch::channel(Link {
            connected: false,
            generation: 0,
        });
        let link_tx = Arc::new(link_tx);
        let events = Arc::clone(&link_tx);
        let mut options = ConnectOptions::new()
            .name(format!("streamhub {node}"))
            .connection_timeout(config.request_timeout)
            .request_timeout(Some(config.request_timeout))
            // Reconnect forever; while cut off the node says NOT_SERVING.
            .max_reconnects(None)
            .reconnect_delay_callback(|attempt| {
                Duration::from_millis(100u64.saturating_mul(1 << attempt.min(5)))
            })
            .event_callback(move |event| {
                let events = Arc::clone(&events);
                async move {
                    match event {
                        Event::Connected => {
                            tracing::info!("cluster: connected to NATS");
                            events.send_modify(|l| {
                                l.connected = true;
                                l.generation += 1;
                            });
                        }
                        Event::Disconnected | Event::Closed => {
                            tracing::warn!("cluster: lost the connection to NATS");
                            events.send_modify(|l| l.connected = false);
                        }
                        other => tracing::info!(event = %other, "cluster: NATS event"),
                    }
                }
            });
        if let Some(creds) = &config.nats_creds {
            options =
                options
                    .credentials_file(creds)
                    .await
                    .map_err(|cause| ClusterError::File {
                        what: "cluster.nats_creds",
                        cause,
                    })?;
        }
        if let Some(ca) = &config.nats_tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        let listed = config.nats.join(",");
        let client = options
            .connect(servers)
            .await
            .map_err(|err| ClusterError::Connect {
                servers: listed,
                reason: err.to_string(),
            })?;
        link_tx.send_modify(|l| {
            if !l.connected {
                l.connected = true;
                l.generation += 1;
            }
        });
        let mut js = jetstream::new(client.clone());
        js.set_timeout(config.request_timeout);
        tracing::info!(node = %node, servers = %config.nats.join(","), "cluster: joined");
        Ok(Arc::new(Self {
            client,
            js,
            node,
            config: config.clone(),
            link,
        }))
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The cluster settings.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// The NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context (requests time out after
    /// `cluster.request_timeout`).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The link state, to watch for losses and reconnects.
    pub fn link(&self) -> watch::Receiver<Link> {
        self.link.clone()
    }

    /// Ok while connected; [`ClusterError::Disconnected`] otherwise.
    pub fn check(&self) -> Result<(), ClusterError> {
        if self.link.borrow().connected {
            Ok(())
        } else {
            Err(ClusterError::Disconnected)
        }
    }

    /// Creates the stream `config` describes unless it exists (any node
    /// may be first), and returns it. An existing stream keeps its own
    /// settings.
    pub async fn ensure_stream(
        &self,
        config: stream::Config,
    ) -> Result<stream::Stream, ClusterError> {
        let name = config.name.clone();
        match self.js.get_stream(&name).await {
            Ok(stream) => Ok(stream),
            Err(err) if stream_not_found(&err) => {
                // Not there yet: create it; a racing creator with the same
                // config makes this a no-op.
                match self.js.create_stream(config).await {
                    Ok(stream) => Ok(stream),
                    Err(create) => match self.js.get_stream(&name).await {
                        Ok(stream) => Ok(stream),
                        Err(_) => Err(ClusterError::js(format!("create stream {name}"), create)),
                    },
                }
            }
            Err(err) => Err(ClusterError::js(format!("look up stream {name}"), err)),
        }
    }

    /// Changes the settings of the existing stream `config` names to
    /// `config` (JetStream allows raising limits such as
    /// `max_messages_per_subject` on a live stream).
    ///
    /// # Errors
    /// [`ClusterError`] when JetStream refuses the update or does not
    /// answer.
    pub async fn update_stream(&self, config: stream::Config) -> Result<(), ClusterError> {
        let name = config.name.clone();
        self.js
            .update_stream(config)
            .await
            .map_err(|err| ClusterError::js(format!("update stream {name}"), err))?;
        Ok(())
    }

    /// A stream config with the settings streamhub uses everywhere: file
    /// storage, `cluster.replicas` replicas, `cluster.duplicate_window`.
    pub fn stream_config(&self, name: String, subjects: Vec<String>) -> stream::Config {
        stream::Config {
            name,
            subjects,
            storage: StorageType::File,
            num_replicas: self.config.replicas.max(1),
            duplicate_window: self.config.duplicate_window,
            allow_direct: true,
            ..stream::Config::default()
        }
    }

    /// Follows `stream` filtered on `subject` from `policy`: messages in
    /// stream order, no acks, through an ephemeral pull consumer (one
    /// replica, in memory) that sends an idle heartbeat every
    /// [`HEARTBEAT`] while it has nothing to deliver.
    ///
    /// The returned stream yields an error, and the caller recreates the
    /// consumer from the last sequence it handled + 1, as soon as
    /// anything is off: no heartbeat and no message for two periods (the
    /// NATS server holding the consumer is gone, even though this
    /// node's own connection is fine), a skipped delivery (the consumer
    /// sequence is not the previous one + 1), the consumer deleted, or no
    /// server answering. async-nats' own ordered consumer would recover
    /// from those too, but only after two missed 15 s heartbeats (up to a
    /// minute without delivering), which is why it is not used here.
    pub async fn follow(
        &self,
        stream: &str,
        subject: &str,
        policy: DeliverPolicy,
    ) -> Result<impl Stream<Item = Result<jetstream::Message, String>> + Send + use<>, ClusterError>
    {
        let stream_handle = self
            .js
            .get_stream(stream)
            .await
            .map_err(|e| ClusterError::js(format!("look up stream {stream}"), e))?;
        let consumer = stream_handle
            .create_consumer(pull::Config {
                filter_subject: subject.to_owned(),
                deliver_policy: policy,
                ack_policy: AckPolicy::None,
                replay_policy: ReplayPolicy::Instant,
                num_replicas: 1,
                memory_storage: true,
                // An abandoned consumer (recreated, or its node gone) is
                // removed by the server after this long without pulls.
                inactive_threshold: Duration::from_secs(10),
                ..pull::Config::default()
            })
            .await
            .map_err(|e| ClusterError::js(format!("follow stream {stream}"), e))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(FOLLOW_BATCH)
            .expires(FOLLOW_EXPIRES)
            .heartbeat(HEARTBEAT)
            .messages()
            .await
            .map_err(|e| ClusterError::js(format!("follow stream {stream}"), e))?;
        let mut delivered = 0u64;
        Ok(messages.map(move |next| {
            let message = next.map_err(|e| e.to_string())?;
            let info = message.info().map_err(|e| e.to_string())?;
            if info.consumer_sequence != delivered + 1 {
                return Err(format!(
                    "the consumer skipped from delivery {delivered} to {}",
                    info.consumer_sequence
                ));
            }
            delivered = info.consumer_sequence;
            Ok(message)
        }))
    }
}

/// How often a consumer made by [`Cluster::follow`] hears from its NATS
/// server while idle; two periods without a word and it is recreated.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long one pull request of [`Cluster::follow`] lasts before the next.
const FOLLOW_EXPIRES: Duration = Duration::from_secs(30);

/// How many messages one pull request of [`Cluster::follow`] asks for.
const FOLLOW_BATCH: usize = 500;

/// Keeps health in step with the link until `token`: every name in
/// `services`, and the server as a whole (`""`), NOT_SERVING while the
/// node cannot reach NATS, SERVING again once it can. Stops at shutdown,
/// which sets NOT_SERVING itself.
pub async fn report_health(
    mut link: watch::Receiver<Link>,
    health: tonic_health::server::HealthReporter,
    services: &'static [&'static str],
    token: tokio_util::sync::CancellationToken,
) {
    let mut was = true;
    loop {
        let connected = link.borrow_and_update().connected;
        if connected != was && !token.is_cancelled() {
            let status = if connected {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for name in std::iter::once(&"").chain(services) {
                health.set_service_status(*name, status).await;
            }
            was = connected;
        }
        tokio::select! {
            () = token.cancelled() => return,
            changed = link.changed() => if changed.is_err() { return },
        }
    }
}

/// Whether a stream look-up failed because the stream does not exist
/// (JetStream's `STREAM_NOT_FOUND`), as opposed to NATS not answering.
pub fn stream_not_found(err: &jetstream::context::GetStreamError) -> bool {
    matches!(
        err.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(ref e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// Turns any name into one NATS subject token, stream-name part and
/// key-value key: ASCII letters, digits and `-` stay; every other byte
/// becomes `=` and two upper-case hex digits. Distinct names stay distinct.
pub fn token(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' {
            out.push(char::from(byte));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "={byte:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_safe_and_distinct() {
        assert_eq!(token("api-1"), "api-1");
        assert_eq!(token("a.b c"), "a=2Eb=20c");
        assert_eq!(token("a_b"), "a=5Fb");
        assert_eq!(token("=2E"), "=3D2E");
        assert_ne!(token("a.b"), token("a=2Eb"));
        assert_eq!(token("é"), "=C3=A9");
        for t in [token("x*>/\\\t"), token("salle à manger")] {
            assert!(
                t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'='),
                "{t}"
            );
        }
    }
}
