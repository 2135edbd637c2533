//! One writer per upload name across nodes: leases as keys of the NATS
//! key-value bucket `streamhub_upload_leases`.
//!
//! Taking a lease is a create-if-absent of the key (the upload name made a
//! key by [`super::token`]), which JetStream decides atomically for every
//! node. The bucket's stream drops messages older than its `max_age`, so
//! the lease of a node that crashed lapses by itself within that time.
//! That `max_age` is the lease's lifetime: it is set by whichever node
//! created the stream (from its `cluster.lease_ttl`) and read back by
//! every node at start and whenever it recreates the stream; a node whose
//! `cluster.lease_ttl` differs warns and goes by the stream's value. The
//! holder renews (a compare-and-set on its revision) every third of it.
//! Releasing deletes the key, only if it is still the holder's revision.
//!
//! A holder writes only while it is sure it still holds the lease
//! ([`HeldLease::holds`]): until the local monotonic deadline (the start
//! of the last successful renewal + the lifetime, less a tenth of it),
//! and never again once a renewal found another revision (the key lapsed
//! or was taken). A node paused past its lease, or cut off from NATS,
//! thus stops writing before another node can take the name.
//!
//! The bucket's stream (`KV_streamhub_upload_leases`) is created here
//! rather than by async-nats' `create_key_value`, which nats-server 2.9
//! refuses; then the bucket is opened with `get_key_value`. A lease
//! operation that fails while the stream is missing (NATS restarted with
//! an empty store) recreates it the same way and is retried once.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::jetstream::{
    self,
    kv::{self, CreateErrorKind, Operation, UpdateErrorKind},
    stream::DiscardPolicy,
};
use futures::FutureExt as _;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{Cluster, ClusterError, token};
use crate::upload::{
    UploadError,
    store::{HeldLease, SharedLease, SharedLeases},
};

/// The key-value bucket of upload leases.
pub const BUCKET: &str = "streamhub_upload_leases";

/// The stream behind [`BUCKET`].
fn stream_name() -> String {
    format!("KV_{BUCKET}")
}

/// The opened bucket and the lifetime of its leases (its stream's
/// `max_age`).
#[derive(Clone)]
struct Bucket {
    kv: kv::Store,
    ttl: Duration,
}

/// Upload leases in a NATS key-value bucket.
pub struct NatsLeases {
    cluster: Arc<Cluster>,
    bucket: Mutex<Bucket>,
}

impl std::fmt::Debug for NatsLeases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsLeases")
            .field("ttl", &self.bucket().ttl)
            .finish_non_exhaustive()
    }
}

/// What the writer and the renewal share about one held lease.
#[derive(Debug)]
struct Validity {
    /// A renewal found another revision: gone for good.
    lost: AtomicBool,
    /// Writes stop at this instant unless a renewal moves it on.
    deadline: Mutex<Instant>,
    /// The lease's lifetime less the safety margin.
    usable: Duration,
}

impl Validity {
    fn new(sent: Instant, ttl: Duration) -> Self {
        // A tenth of the lifetime covers a write already under way and a
        // NATS server clock running a little fast.
        let usable = ttl.saturating_sub(ttl / 10);
        Self {
            lost: AtomicBool::new(false),
            deadline: Mutex::new(sent + usable),
            usable,
        }
    }

    /// A renewal sent at `sent` succeeded: the server stored it no
    /// earlier, so the key lives at least until `sent` + the lifetime.
    fn renewed(&self, sent: Instant) {
        let mut deadline = self.deadline.lock().unwrap_or_else(PoisonError::into_inner);
        *deadline = (*deadline).max(sent + self.usable);
    }

    fn holds(&self) -> bool {
        !self.lost.load(Ordering::Acquire)
            && Instant::now() < *self.deadline.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A held lease: dropping it stops the renewals and releases the key.
struct Held {
    name: String,
    validity: Arc<Validity>,
    _renewal: DropGuard,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("name", &self.name)
            .field("validity", &self.validity)
            .finish()
    }
}

impl HeldLease for Held {
    fn holds(&self) -> bool {
        self.validity.holds()
    }
}

impl NatsLeases {
    /// Creates the bucket's stream if needed and opens the bucket.
    pub async fn start(cluster: Arc<Cluster>) -> Result<Arc<Self>, ClusterError> {
        let bucket = open(&cluster).await?;
        Ok(Arc::new(Self {
            cluster,
            bucket: Mutex::new(bucket),
        }))
    }

    fn bucket(&self) -> Bucket {
        self.bucket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn unavailable(err: impl std::fmt::Display) -> UploadError {
        UploadError::Unavailable(format!(
            "the upload leases shared by the cluster cannot be reached ({err}); retry"
        ))
    }

    /// After a failed lease operation: if the bucket's stream is missing
    /// (NATS lost its storage, or an operator deleted it), recreates it as
    /// at start and returns true, so the operation is retried once.
    async fn recreate_if_missing(&self) -> Result<bool, UploadError> {
        match self.cluster.jetstream().get_stream(stream_name()).await {
            Ok(_) => Ok(false),
            Err(err) if super::stream_not_found(&err) => {
                tracing::warn!(
                    stream = %stream_name(),
                    "cluster: the upload lease bucket's stream is missing; recreating it"
                );
                let bucket = open(&self.cluster).await.map_err(Self::unavailable)?;
                *self.bucket.lock().unwrap_or_else(PoisonError::into_inner) = bucket;
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }

    async fn acquire_lease(&self, name: &str) -> Result<SharedLease, UploadError> {
        self.cluster.check().map_err(Self::unavailable)?;
        let key = token(name);
        let holder = format!("{} {}", self.cluster.node(), crate::telemetry::now_ms());
        let mut retried = false;
        let (bucket, sent, revision) = loop {
            let bucket = self.bucket();
            let sent = Instant::now();
            match bucket.kv.create(&key, holder.clone().into()).await {
                Ok(revision) => break (bucket, sent, revision),
                Err(err) if err.kind() == CreateErrorKind::AlreadyExists => {
                    return Err(UploadError::Busy {
                        upload: name.to_owned(),
                    });
                }
                Err(err) => {
                    if retried || !self.recreate_if_missing().await? {
                        return Err(Self::unavailable(err));
                    }
                    retried = true;
                }
            }
        };
        let validity = Arc::new(Validity::new(sent, bucket.ttl));
        let stop = CancellationToken::new();
        tokio::spawn(renew(
            bucket,
            key,
            holder,
            revision,
            Arc::clone(&validity),
            stop.clone(),
        ));
        Ok(Box::new(Held {
            name: name.to_owned(),
            validity,
            _renewal: stop.drop_guard(),
        }))
    }

    async fn is_held(&self, name: &str) -> Result<bool, UploadError> {
        self.cluster.check().map_err(Self::unavailable)?;
        let key = token(name);
        let mut retried = false;
        loop {
            match self.bucket().kv.entry(&key).await {
                Ok(Some(entry)) => return Ok(entry.operation == Operation::Put),
                Ok(None) => return Ok(false),
                Err(err) => {
                    if retried || !self.recreate_if_missing().await? {
                        return Err(Self::unavailable(err));
                    }
                    retried = true;
                }
            }
        }
    }
}

/// Creates the bucket's stream unless it exists, opens the bucket and
/// reads the lifetime of its leases from the stream's `max_age`.
async fn open(cluster: &Cluster) -> Result<Bucket, ClusterError> {
    let wanted = cluster.config().lease_ttl;
    let config = jetstream::stream::Config {
        max_messages_per_subject: 1,
        max_age: wanted,
        // JetStream refuses a duplicate window longer than max_age.
        duplicate_window: wanted.min(cluster.config().duplicate_window),
        allow_rollup: true,
        deny_delete: true,
        discard: DiscardPolicy::New,
        description: Some("streamhub: upload leases (one writer per name)".into()),
        ..cluster.stream_config(stream_name(), vec![format!("$KV.{BUCKET}.>")])
    };
    let mut stream = cluster.ensure_stream(config).await?;
    let max_age = stream
        .info()
        .await
        .map_err(|e| ClusterError::js(format!("look up stream {}", stream_name()), e))?
        .config
        .max_age;
    let ttl = if max_age.is_zero() {
        // Made by hand without an age limit: leases never lapse, so renew
        // and stop writing by our own setting.
        tracing::warn!(
            stream = %stream_name(),
            lease_ttl = ?wanted,
            "cluster: the upload lease stream has no max_age, so the lease of a crashed node never lapses; recreate it"
        );
        wanted
    } else {
        if max_age != wanted {
            tracing::warn!(
                stream = %stream_name(),
                lease_ttl = ?wanted,
                max_age = ?max_age,
                "cluster: cluster.lease_ttl is {} but the upload lease stream (made by another node) keeps leases for {}; this node renews and stops writing by the stream's {}",
                humantime::format_duration(wanted),
                humantime::format_duration(max_age),
                humantime::format_duration(max_age),
            );
        }
        max_age
    };
    let kv = cluster
        .jetstream()
        .get_key_value(BUCKET)
        .await
        .map_err(|e| ClusterError::js(format!("open bucket {BUCKET}"), e))?;
    Ok(Bucket { kv, ttl })
}

/// Renews the lease every third of its lifetime until `stop`, then
/// releases it. A renewal finding another revision marks the lease lost
/// (the writer stops) and ends the renewals.
async fn renew(
    bucket: Bucket,
    key: String,
    holder: String,
    mut revision: u64,
    validity: Arc<Validity>,
    stop: CancellationToken,
) {
    let Bucket { kv, ttl } = bucket;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(ttl / 3) => {}
        }
        let sent = Instant::now();
        match kv.update(&key, holder.clone().into(), revision).await {
            Ok(next) => {
                revision = next;
                validity.renewed(sent);
            }
            Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => {
                validity.lost.store(true, Ordering::Release);
                tracing::warn!(
                    %err,
                    key,
                    "cluster: an upload lease was lost (it lapsed or another node took it); its writer stops"
                );
                // Not ours any more: nothing to release.
                return;
            }
            Err(err) => tracing::warn!(%err, key, "cluster: renewing an upload lease failed"),
        }
    }
    if let Err(err) = kv.delete_expect_revision(&key, Some(revision)).await {
        tracing::debug!(%err, key, "cluster: releasing an upload lease failed; it lapses by itself");
    }
}

impl SharedLeases for NatsLeases {
    fn acquire(
        &self,
        name: &str,
    ) -> futures::future::BoxFuture<'_, Result<SharedLease, UploadError>> {
        let name = name.to_owned();
        async move { self.acquire_lease(&name).await }.boxed()
    }

    fn held(&self, name: &str) -> futures::future::BoxFuture<'_, Result<bool, UploadError>> {
        let name = name.to_owned();
        async move { self.is_held(&name).await }.boxed()
    }
}
