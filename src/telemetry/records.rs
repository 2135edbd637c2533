//! This node's records of telemetry, and the seam through which a broker
//! lands samples and alerts in them.
//!
//! The records are each service's history ring, the change feed watchers
//! wait on, and the alert feed. A sample *lands* on a node when it becomes
//! the node's latest value of its service: it is then numbered (the
//! service's next sequence number on this node), stored in the broker's
//! latest-value table, appended to the history and announced on the
//! change feed, all under the service's history lock, so Subscribe, Watch
//! and GetHistory see one order.
//!
//! The [`SampleBroker`] decides when a sample lands:
//!
//! - the in-process [`MemoryBroker`] lands a published sample at once;
//! - the clustered broker (`crate::cluster::telemetry::NatsBroker`) sends
//!   it to the cluster and lands it when it comes back, on every node (the
//!   publishing one included), so every node records every service's
//!   samples in the cluster's one order.
//!
//! Alerts are raised by the LiveFeed call that saw the sample: the hub
//! records them in its own alert feed at once and hands them to the broker
//! ([`SampleBroker::broadcast_alert`]), which brings them to the other
//! nodes' records (the in-process broker has no one to tell).
//!
//! No tonic or protobuf types appear here.

use std::sync::Arc;

use tokio::sync::broadcast;

use super::{
    Sample, TelemetryError,
    history::{Histories, Key, Series},
    watch::{AlertFeed, AlertRecord, CHANGE_FEED},
};
use crate::{
    broker::{BrokerError, LatestBroker, MemoryBroker},
    config::TelemetryConfig,
};

/// This node's history rings, change feed and alert feed.
#[derive(Debug)]
pub struct Records {
    histories: Arc<Histories>,
    /// The change feed: the key of each service whose sample landed, or
    /// that was dropped (see [`super::watch`]).
    changes: broadcast::Sender<Key>,
    alerts: AlertFeed,
}

impl Records {
    /// Empty records sized by `config` (`history` samples per service,
    /// `max_services` services, `alert_history` alerts).
    pub fn new(config: &TelemetryConfig) -> Self {
        let (changes, _) = broadcast::channel(CHANGE_FEED);
        Self {
            histories: Arc::new(Histories::new(config.history, config.max_services)),
            changes,
            alerts: AlertFeed::new(config.alert_history),
        }
    }

    /// Lands `sample` (its `seq` is ignored): numbers it as its service's
    /// next sample on this node, hands it to `store` (which makes it the
    /// latest value, e.g. a [`MemoryBroker`]'s publish), appends it to the
    /// history and announces it to watchers. Returns the sample as
    /// recorded.
    ///
    /// O(1) with the service's history locked throughout.
    ///
    /// # Errors
    ///
    /// [`TelemetryError::TooManyServices`] for a new service beyond
    /// `max_services`, or what `store` returns; nothing is recorded then.
    pub fn land(
        &self,
        sample: Sample,
        store: impl FnOnce(Sample) -> Result<(), BrokerError>,
    ) -> Result<Sample, TelemetryError> {
        loop {
            let series = self.histories.get_or_create(&sample.service)?;
            let mut state = series.lock();
            if state.dropped {
                // Dropped by a sweep after we found it: the name starts
                // over in a new series.
                continue;
            }
            let sample = Sample {
                seq: state.seq + 1,
                ..sample
            };
            store(sample.clone())?;
            Series::append(&mut state, &sample);
            drop(state);
            // No watcher is fine.
            let _ = self.changes.send(series.key());
            return Ok(sample);
        }
    }

    /// Drops every service that has not landed a sample since
    /// `stale_before` and that `release` lets go (it is called with the
    /// service's lock held, so no sample lands meanwhile, and must free
    /// whatever else holds the name, e.g. the broker's topic, returning
    /// false to keep it). A dropped service's ring is freed, its id
    /// reused later, and its key announced on the change feed so watchers
    /// forget it. Returns the names dropped.
    ///
    /// O(services); runs off the publish and delivery paths (the hub's
    /// periodic sweep).
    pub fn sweep(
        &self,
        stale_before: tokio::time::Instant,
        mut release: impl FnMut(&str) -> bool,
    ) -> Vec<Arc<str>> {
        let mut dropped = Vec::new();
        for series in self.histories.all() {
            let mut state = series.lock();
            if state.dropped || state.touched > stale_before || !release(&series.name) {
                continue;
            }
            self.histories.remove(&series, &mut state);
            drop(state);
            let _ = self.changes.send(series.key());
            dropped.push(Arc::clone(&series.name));
        }
        dropped
    }

    /// Records an alert in the alert feed and sends it to every watcher
    /// on this node.
    pub fn land_alert(&self, record: AlertRecord) {
        self.alerts.publish(record);
    }

    /// The history rings.
    pub fn histories(&self) -> &Arc<Histories> {
        &self.histories
    }

    /// The change feed.
    pub fn changes(&self) -> &broadcast::Sender<Key> {
        &self.changes
    }

    /// The alert feed.
    pub fn alerts(&self) -> &AlertFeed {
        &self.alerts
    }
}

/// The telemetry hub's broker: a [`LatestBroker`] of samples that also
/// decides when a published sample lands in the node's [`Records`], and
/// carries alerts to other nodes.
pub trait SampleBroker: LatestBroker<Sample> {
    /// Publishes `sample` (validated; its `seq` unset). Returns the sample
    /// as recorded if it landed in `records` at once (the in-process
    /// broker), or `None` if it was sent on and lands when the broker
    /// delivers it back (a clustered broker lands it in the records it was
    /// started with, which must be these).
    ///
    /// # Errors
    ///
    /// Too many services, a closed broker, or (clustered) no link to the
    /// cluster.
    fn offer(&self, sample: Sample, records: &Records) -> Result<Option<Sample>, TelemetryError>;

    /// Brings an alert raised on this node (and already in its own
    /// records) to the other nodes' records. Never waits; the in-process
    /// broker has no other node to tell.
    fn broadcast_alert(&self, record: &AlertRecord) {
        let _ = record;
    }
}

impl SampleBroker for MemoryBroker<Sample> {
    fn offer(&self, sample: Sample, records: &Records) -> Result<Option<Sample>, TelemetryError> {
        records
            .land(sample, |sample| {
                let topic = Arc::clone(&sample.service);
                self.publish(&topic, sample)
            })
            .map(Some)
    }
}
