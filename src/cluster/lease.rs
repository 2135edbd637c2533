//! One writer per upload name across nodes: leases as keys of the NATS
//! key-value bucket `streamhub_upload_leases`.
//!
//! Taking a lease is a create-if-absent of the key (the upload name made a
//! key by [`super::token`]), which JetStream decides atomically for every
//! node. The holder renews it (a compare-and-set on its revision) every
//! third of `cluster.lease_ttl`; the bucket's stream drops messages older
//! than `lease_ttl`, so the lease of a node that crashed lapses by itself
//! within that time. Releasing deletes the key, only if it is still the
//! holder's revision.
//!
//! The bucket's stream (`KV_streamhub_upload_leases`) is created here
//! rather than by async-nats' `create_key_value`, which nats-server 2.9
//! refuses; then the bucket is opened with `get_key_value`.
//!
//! Known limit: a node that loses NATS for longer than `lease_ttl` while
//! an upload runs cannot renew; another node may then take the name.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{
    kv::{self, CreateErrorKind, Operation},
    stream::DiscardPolicy,
};
use futures::FutureExt as _;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{Cluster, ClusterError, token};
use crate::upload::{
    UploadError,
    store::{SharedLease, SharedLeases},
};

/// The key-value bucket of upload leases.
pub const BUCKET: &str = "streamhub_upload_leases";

/// Upload leases in a NATS key-value bucket.
pub struct NatsLeases {
    cluster: Arc<Cluster>,
    kv: kv::Store,
    ttl: Duration,
}

impl std::fmt::Debug for NatsLeases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsLeases")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// A held lease: dropping it stops the renewals and releases the key.
struct Held {
    name: String,
    _renewal: DropGuard,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held").field("name", &self.name).finish()
    }
}

impl NatsLeases {
    /// Creates the bucket's stream if needed and opens the bucket.
    pub async fn start(cluster: Arc<Cluster>) -> Result<Arc<Self>, ClusterError> {
        let ttl = cluster.config().lease_ttl;
        let config = async_nats::jetstream::stream::Config {
            max_messages_per_subject: 1,
            max_age: ttl,
            // JetStream refuses a duplicate window longer than max_age.
            duplicate_window: ttl.min(cluster.config().duplicate_window),
            allow_rollup: true,
            deny_delete: true,
            discard: DiscardPolicy::New,
            description: Some("streamhub: upload leases (one writer per name)".into()),
            ..cluster.stream_config(format!("KV_{BUCKET}"), vec![format!("$KV.{BUCKET}.>")])
        };
        cluster.ensure_stream(config).await?;
        let kv = cluster
            .jetstream()
            .get_key_value(BUCKET)
            .await
            .map_err(|e| ClusterError::js(format!("open bucket {BUCKET}"), e))?;
        Ok(Arc::new(Self { cluster, kv, ttl }))
    }

    fn unavailable(err: impl std::fmt::Display) -> UploadError {
        UploadError::Unavailable(format!(
            "the upload leases shared by the cluster cannot be reached ({err}); retry"
        ))
    }

    async fn acquire_lease(&self, name: &str) -> Result<SharedLease, UploadError> {
        self.cluster.check().map_err(Self::unavailable)?;
        let key = token(name);
        let holder = format!("{} {}", self.cluster.node(), crate::telemetry::now_ms());
        let revision = match self.kv.create(&key, holder.clone().into()).await {
            Ok(revision) => revision,
            Err(err) if err.kind() == CreateErrorKind::AlreadyExists => {
                return Err(UploadError::Busy {
                    upload: name.to_owned(),
                });
            }
            Err(err) => return Err(Self::unavailable(err)),
        };
        let stop = CancellationToken::new();
        tokio::spawn(renew(
            self.kv.clone(),
            key,
            holder,
            revision,
            self.ttl / 3,
            stop.clone(),
        ));
        Ok(Box::new(Held {
            name: name.to_owned(),
            _renewal: stop.drop_guard(),
        }))
    }

    async fn is_held(&self, name: &str) -> Result<bool, UploadError> {
        self.cluster.check().map_err(Self::unavailable)?;
        match self.kv.entry(token(name)).await {
            Ok(Some(entry)) => Ok(entry.operation == Operation::Put),
            Ok(None) => Ok(false),
            Err(err) => Err(Self::unavailable(err)),
        }
    }
}

/// Renews the lease every `every` until `stop`, then releases it.
async fn renew(
    kv: kv::Store,
    key: String,
    holder: String,
    mut revision: u64,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
        match kv.update(&key, holder.clone().into(), revision).await {
            Ok(next) => revision = next,
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
