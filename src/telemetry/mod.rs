//! Telemetry: services report metrics samples, subscribers watch them.
//!
//! - [`Hub`] is the core: it validates samples, keeps each service's latest
//!   sample in a [`SampleBroker`] (a
//!   [`LatestBroker`](crate::broker::LatestBroker)), and hands out
//!   subscriptions; its periodic sweep drops services silent for
//!   `telemetry.service_ttl` ([`Hub::sweep`]).
//! - [`alerts`] turns a stream of samples into edge-triggered alerts.
//! - [`host`] samples this machine's CPU and memory.
//! - [`pacer`] spaces one subscriber's messages at its interval.
//! - [`history`] keeps each service's recent samples in a bounded ring.
//! - [`records`] holds this node's histories, change feed and alert feed,
//!   and the [`SampleBroker`] seam that decides when a sample lands there
//!   (at once on one node; as it comes back from NATS in cluster mode).
//! - [`watch`] is the multiplexed watch of many services and alerts (one
//!   stream per dashboard), and the alert feed every LiveFeed call writes.
//! - [`service`] is the gRPC layer: with [`route`], which mounts it and
//!   serves Subscribe as ready-made frames, the only part that knows
//!   protobuf.

pub mod alerts;
pub mod history;
pub mod host;
pub mod pacer;
pub mod records;
pub mod route;
pub mod service;
pub mod watch;

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use metrics::Counter;

pub use self::records::{Records, SampleBroker};
use self::{
    alerts::Alert,
    watch::{AlertRecord, Watch, WatchOptions},
};
use crate::{
    broker::{BrokerError, MemoryBroker, Subscription},
    config::TelemetryConfig,
};

/// Longest accepted service name, in bytes.
pub const MAX_NAME_LEN: usize = 200;

/// One metrics sample of one service.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The reporting service.
    pub service: Arc<str>,
    /// CPU usage in percent.
    pub cpu_usage: f64,
    /// Memory in MB.
    pub memory_mb: f64,
    /// Requests handled by the service (as it reports them).
    pub request_count: u64,
    /// Unix time of the sample, in milliseconds.
    pub timestamp_ms: u64,
    /// The sample's number in its service's sequence on this node, from 1
    /// (assigned when the sample lands, see [`records`]; tells a
    /// subscriber how many samples it skipped).
    pub seq: u64,
}

/// A sample as reported, before validation.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Service name.
    pub service: String,
    /// CPU usage in percent.
    pub cpu_usage: f64,
    /// Memory in MB.
    pub memory_mb: f64,
    /// Request count.
    pub request_count: u64,
    /// Unix ms; 0 means "now".
    pub timestamp_ms: u64,
}

/// What can go wrong in the telemetry core.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TelemetryError {
    /// The service name is empty.
    #[error("service_name is empty")]
    EmptyName,
    /// The service name is too long.
    #[error("service_name is {len} bytes; the limit is {MAX_NAME_LEN}")]
    NameTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The service name has a control character (newline, tab, ...).
    #[error("service_name contains characters that are not printable")]
    NameNotPrintable,
    /// A measured value is NaN, infinite or negative.
    #[error("{field} is {value}; it must be a finite number, zero or more")]
    BadValue {
        /// The protobuf field name.
        field: &'static str,
        /// The value received.
        value: f64,
    },
    /// Nothing has been reported under that name.
    #[error("no metrics have been reported for service {0:?}")]
    UnknownService(String),
    /// The hub was closed: the server is shutting down.
    #[error("the server is shutting down")]
    Closed,
    /// Cluster mode: this node cannot reach the cluster, so it has no live
    /// values to serve or publish.
    #[error("{0}")]
    Unavailable(String),
    /// The table of services is full.
    #[error("the hub already tracks its limit of {limit} services (`telemetry.max_services`)")]
    TooManyServices {
        /// The configured limit.
        limit: usize,
    },
    /// The publisher's identity created its share of the service names
    /// (`telemetry.max_services_per_identity`).
    #[error(transparent)]
    ShareExhausted(#[from] crate::shares::ShareExhausted),
}

impl From<BrokerError> for TelemetryError {
    fn from(err: BrokerError) -> Self {
        match err {
            BrokerError::TooManyTopics { limit } => TelemetryError::TooManyServices { limit },
            BrokerError::Closed => TelemetryError::Closed,
            err @ BrokerError::Unavailable(_) => TelemetryError::Unavailable(err.to_string()),
        }
    }
}

/// Checks a service name: 1 to [`MAX_NAME_LEN`] bytes, no control
/// characters (the rule of room and file names).
pub fn validate_name(name: &str) -> Result<(), TelemetryError> {
    if name.is_empty() {
        return Err(TelemetryError::EmptyName);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(TelemetryError::NameTooLong { len: name.len() });
    }
    if name.chars().any(char::is_control) {
        return Err(TelemetryError::NameNotPrintable);
    }
    Ok(())
}

fn validate_value(field: &'static str, value: f64) -> Result<(), TelemetryError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(TelemetryError::BadValue { field, value })
    }
}

/// Current Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Counters the telemetry core feeds (no-ops unless the server hands it
/// real ones, see [`crate::server_metrics`]).
#[derive(Debug, Clone)]
pub struct TelemetryCounters {
    /// Samples accepted (`streamhub_telemetry_samples_total`).
    pub samples: Counter,
    /// Samples sent to subscribers and watchers
    /// (`streamhub_telemetry_deliveries_total`).
    pub deliveries: Counter,
    /// Samples a slow subscriber or watcher skipped because a newer one
    /// went instead (`streamhub_telemetry_coalesced_total`).
    pub coalesced: Counter,
    /// Services dropped by the sweep (`telemetry.service_ttl`;
    /// `streamhub_telemetry_services_dropped_total`).
    pub dropped: Counter,
}

impl Default for TelemetryCounters {
    fn default() -> Self {
        Self {
            samples: Counter::noop(),
            deliveries: Counter::noop(),
            coalesced: Counter::noop(),
            dropped: Counter::noop(),
        }
    }
}

/// The telemetry core: latest samples, their history, and their
/// subscribers and watchers.
pub struct Hub {
    broker: Arc<dyn SampleBroker>,
    config: TelemetryConfig,
    rpc_count: Arc<AtomicU64>,
    /// Histories, change feed and alert feed: where samples land.
    records: Arc<Records>,
    counters: TelemetryCounters,
    /// `telemetry.max_services_per_identity`: the service names each
    /// authenticated identity created.
    namers: Arc<crate::shares::Shares>,
    named: std::sync::Mutex<std::collections::HashMap<Arc<str>, crate::shares::Share>>,
    /// Open LiveFeed calls by the name each published last: those names
    /// are never dropped by [`Hub::sweep`].
    feeding: Arc<std::sync::Mutex<std::collections::HashMap<Arc<str>, usize>>>,
    /// Called with each name [`Hub::sweep`] drops (caches of other layers).
    on_drop: std::sync::Mutex<Vec<DropHook>>,
}

/// A cache of another layer that forgets a dropped service's name.
type DropHook = Box<dyn Fn(&str) + Send + Sync>;

/// An open LiveFeed call's hold on the name it published last: while it
/// lives, [`Hub::sweep`] keeps that service. Dropping it lets go.
#[derive(Debug)]
pub struct FeedPin {
    feeding: Arc<std::sync::Mutex<std::collections::HashMap<Arc<str>, usize>>>,
    name: Arc<str>,
}

impl FeedPin {
    /// The name held.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for FeedPin {
    fn drop(&mut self) {
        let mut feeding = lock(&self.feeding);
        if let Some(count) = feeding.get_mut(&self.name) {
            *count -= 1;
            if *count == 0 {
                feeding.remove(&self.name);
            }
        }
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is one map update: consistent after a panic.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub over an in-memory broker.
    pub fn new(config: TelemetryConfig) -> Self {
        let broker = Arc::new(MemoryBroker::new(config.max_services));
        let records = Arc::new(Records::new(&config));
        Self::with_broker(config, broker, records)
    }

    /// A hub over any broker; `records` are the ones the broker lands
    /// samples and alerts from elsewhere in (see [`records`]).
    pub fn with_broker(
        config: TelemetryConfig,
        broker: Arc<dyn SampleBroker>,
        records: Arc<Records>,
    ) -> Self {
        Self {
            broker,
            records,
            namers: crate::shares::Shares::new(
                "service names",
                "telemetry.max_services_per_identity",
                config.max_services_per_identity,
            ),
            named: std::sync::Mutex::default(),
            feeding: Arc::default(),
            on_drop: std::sync::Mutex::default(),
            config,
            rpc_count: Arc::new(AtomicU64::new(0)),
            counters: TelemetryCounters::default(),
        }
    }

    /// The hub, feeding `counters`.
    #[must_use]
    pub fn with_counters(mut self, counters: TelemetryCounters) -> Self {
        self.counters = counters;
        self
    }

    /// The counters this hub feeds.
    pub fn counters(&self) -> &TelemetryCounters {
        &self.counters
    }

    /// The settings in force.
    pub fn config(&self) -> &TelemetryConfig {
        &self.config
    }

    /// The counter of RPCs handled by this server, reported as the
    /// self-service's `request_count`.
    pub fn rpc_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.rpc_count)
    }

    /// Charges the service name `service`, if new, to `identity` (the
    /// authenticated publisher; `None` for anonymous ones, not counted),
    /// before its first report is ingested. Names stay charged while the
    /// hub tracks them: until [`Hub::sweep`] drops them.
    ///
    /// # Errors
    /// [`TelemetryError::ShareExhausted`] when `identity` has created
    /// `telemetry.max_services_per_identity` names already.
    pub fn admit_name(&self, service: &str, identity: Option<&str>) -> Result<(), TelemetryError> {
        if identity.is_none() || self.records.histories().get(service).is_some() {
            return Ok(());
        }
        let mut named = self
            .named
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if named.contains_key(service) {
            return Ok(());
        }
        if let Some(share) = self.namers.claim(identity)? {
            named.insert(Arc::from(service), share);
        }
        Ok(())
    }

    /// Gives back the charge [`Hub::admit_name`] took for `service` if the
    /// hub does not track it after all (its report was refused).
    pub fn unadmit_name(&self, service: &str) {
        if self.records.histories().get(service).is_none() {
            self.named
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(service);
        }
    }

    /// Holds `service` against [`Hub::sweep`] for an open LiveFeed call,
    /// which keeps one pin, for the name it published last (a call that
    /// moves on to another name moves its pin).
    pub fn pin_feed(&self, service: &str) -> FeedPin {
        let name: Arc<str> = Arc::from(service);
        *lock(&self.feeding).entry(Arc::clone(&name)).or_insert(0) += 1;
        FeedPin {
            feeding: Arc::clone(&self.feeding),
            name,
        }
    }

    /// Calls `hook` with each name [`Hub::sweep`] drops from now on.
    pub fn on_drop(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        lock(&self.on_drop).push(Box::new(hook));
    }

    /// Drops every service that has not reported for
    /// `telemetry.service_ttl`, unless a LiveFeed call holds it
    /// ([`Hub::pin_feed`]) or a Subscribe call waits on it (an open
    /// broker subscription). A dropped service leaves the broker (GetSnapshot
    /// and ListServices no longer show it) and the history table (its ring
    /// is freed, its id reused), frees its slot of
    /// `telemetry.max_services` and its creator's charge of
    /// `telemetry.max_services_per_identity`; watchers forget it. A later
    /// sample under the name creates it anew. Returns the names dropped.
    ///
    /// O(services), off the publish and delivery paths: run it
    /// periodically ([`Hub::sweep_periodically`]). Does nothing when the
    /// ttl is zero.
    pub fn sweep(&self) -> Vec<Arc<str>> {
        let ttl = self.config.service_ttl;
        let Some(stale_before) = tokio::time::Instant::now().checked_sub(ttl) else {
            return Vec::new();
        };
        if ttl.is_zero() {
            return Vec::new();
        }
        let dropped = self.records.sweep(stale_before, |name| {
            !lock(&self.feeding).contains_key(name) && self.broker.forget(name)
        });
        if dropped.is_empty() {
            return dropped;
        }
        {
            let mut named = lock(&self.named);
            for name in &dropped {
                named.remove(name);
            }
        }
        self.counters.dropped.increment(dropped.len() as u64);
        let hooks = lock(&self.on_drop);
        for name in &dropped {
            for hook in hooks.iter() {
                hook(name);
            }
        }
        tracing::debug!(
            services = dropped.len(),
            "telemetry: dropped services silent for {}",
            humantime::format_duration(ttl)
        );
        dropped
    }

    /// Runs [`Hub::sweep`] every quarter of `telemetry.service_ttl`
    /// (between 10 ms and 1 min) until `token` is cancelled; returns at
    /// once when the ttl is zero.
    pub async fn sweep_periodically(self: Arc<Self>, token: tokio_util::sync::CancellationToken) {
        let ttl = self.config.service_ttl;
        if ttl.is_zero() {
            return;
        }
        let period = (ttl / 4).clamp(Duration::from_millis(10), Duration::from_secs(60));
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = token.cancelled() => return,
                _ = ticks.tick() => {}
            }
            self.sweep();
        }
    }

    /// Validates a report and publishes it as the service's latest
    /// sample. On one node it lands at once (its history gains it,
    /// subscribers and watchers are woken) and comes back numbered; in
    /// cluster mode it lands on every node when NATS delivers it, and
    /// comes back with `seq` 0.
    ///
    /// O(1): a table lookup, the broker's publish, a ring append and one
    /// id on the change feed (see [`Records::land`]).
    pub fn ingest(&self, report: Report) -> Result<Sample, TelemetryError> {
        validate_name(&report.service)?;
        validate_value("cpu_usage", report.cpu_usage)?;
        validate_value("memory_mb", report.memory_mb)?;
        let sample = Sample {
            service: Arc::from(report.service),
            cpu_usage: report.cpu_usage,
            memory_mb: report.memory_mb,
            request_count: report.request_count,
            timestamp_ms: if report.timestamp_ms == 0 {
                now_ms()
            } else {
                report.timestamp_ms
            },
            seq: 0,
        };
        let landed = self.broker.offer(sample.clone(), &self.records)?;
        self.counters.samples.increment(1);
        Ok(landed.unwrap_or(sample))
    }

    /// The newest `limit` samples of `service` (0 = all kept), oldest
    /// first; refused while a clustered broker is cut off (the history may
    /// lack what other nodes published meanwhile).
    pub fn history(&self, service: &str, limit: usize) -> Result<Vec<Sample>, TelemetryError> {
        validate_name(service)?;
        self.broker.check()?;
        let series = self
            .records
            .histories()
            .get(service)
            .filter(|s| s.seq() > 0)
            .ok_or_else(|| TelemetryError::UnknownService(service.to_owned()))?;
        let limit = if limit == 0 { usize::MAX } else { limit };
        Ok(series.recent(limit).0)
    }

    /// Records an alert raised by a LiveFeed call and sends it to every
    /// watcher, on this node at once and (cluster mode) on the others
    /// through the broker.
    pub fn raise_alert(&self, service: Arc<str>, alert: Alert) {
        let record = AlertRecord { service, alert };
        self.broker.broadcast_alert(&record);
        self.records.land_alert(record);
    }

    /// Opens a watch of the services matching `options.pattern` (backfill,
    /// then live), with alerts if asked for; refused while a clustered
    /// broker is cut off, so a new watch never announces stale values as
    /// live (a watch already open stays open and goes on once the broker
    /// is back, as subscriptions do).
    pub fn watch(&self, mut options: WatchOptions) -> Result<Watch, TelemetryError> {
        self.broker.check()?;
        let records = &self.records;
        options.backfill_samples = options.backfill_samples.min(records.histories().capacity());
        options.backfill_alerts = options.backfill_alerts.min(records.alerts().keep());
        // Receivers first, then the snapshot: nothing falls in between.
        let changes = records.changes().subscribe();
        let alerts = options
            .alerts
            .then(|| records.alerts().subscribe(options.backfill_alerts));
        Ok(Watch::new(
            Arc::clone(records.histories()),
            changes,
            alerts,
            options,
        ))
    }

    /// The latest sample of `service`.
    pub fn snapshot(&self, service: &str) -> Result<Sample, TelemetryError> {
        validate_name(service)?;
        self.broker.check()?;
        self.broker
            .latest(service)
            .ok_or_else(|| TelemetryError::UnknownService(service.to_owned()))
    }

    /// Subscribes to `service`, which need not have reported yet.
    pub fn subscribe(&self, service: &str) -> Result<Subscription<Sample>, TelemetryError> {
        validate_name(service)?;
        self.broker.check()?;
        Ok(self.broker.subscribe(service)?)
    }

    /// Closes the hub on shutdown: every subscription ends, and later
    /// reports and subscriptions fail with [`TelemetryError::Closed`].
    pub fn close(&self) {
        self.broker.close();
    }

    /// The interval a subscriber gets when it asks for `requested_ms`.
    pub fn effective_interval(&self, requested_ms: u32) -> Duration {
        if requested_ms == 0 {
            self.config.default_interval.max(self.config.min_interval)
        } else {
            Duration::from_millis(u64::from(requested_ms)).max(self.config.min_interval)
        }
    }

    /// Every known service with its latest sample; refused while a
    /// clustered broker is cut off (its values may be stale).
    pub fn services(&self) -> Result<Vec<(String, Option<Sample>)>, TelemetryError> {
        self.broker.check()?;
        Ok(self.broker.topics())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(name: &str, cpu: f64) -> Report {
        Report {
            service: name.into(),
            cpu_usage: cpu,
            memory_mb: 10.0,
            ..Report::default()
        }
    }

    #[test]
    fn ingest_validates_and_stamps_time() {
        let hub = Hub::new(TelemetryConfig::default());
        assert_eq!(hub.ingest(report("", 1.0)), Err(TelemetryError::EmptyName));
        assert!(matches!(
            hub.ingest(report(&"x".repeat(201), 1.0)),
            Err(TelemetryError::NameTooLong { len: 201 })
        ));
        assert!(matches!(
            hub.ingest(report("a", f64::NAN)),
            Err(TelemetryError::BadValue {
                field: "cpu_usage",
                ..
            })
        ));
        assert!(matches!(
            hub.ingest(report("a", -1.0)),
            Err(TelemetryError::BadValue {
                field: "cpu_usage",
                ..
            })
        ));
        let sample = hub.ingest(report("a", 5.0)).expect("valid");
        assert!(sample.timestamp_ms > 0);
        assert_eq!(hub.snapshot("a").expect("known"), sample);
        assert_eq!(
            hub.snapshot("b"),
            Err(TelemetryError::UnknownService("b".into()))
        );
    }

    #[test]
    fn intervals_have_a_default_and_a_floor() {
        let hub = Hub::new(TelemetryConfig::default());
        assert_eq!(hub.effective_interval(0), Duration::from_millis(1000));
        assert_eq!(hub.effective_interval(5), Duration::from_millis(100));
        assert_eq!(hub.effective_interval(250), Duration::from_millis(250));
    }

    #[test]
    fn service_limit() {
        let config = TelemetryConfig {
            max_services: 1,
            ..TelemetryConfig::default()
        };
        let hub = Hub::new(config);
        hub.ingest(report("a", 1.0)).expect("first fits");
        assert_eq!(
            hub.ingest(report("b", 1.0)),
            Err(TelemetryError::TooManyServices { limit: 1 })
        );
    }

    /// Time is paused: `advance` makes services silent without waiting.
    #[tokio::test(start_paused = true)]
    async fn the_sweep_drops_silent_services_with_their_charges_but_not_pinned_ones() {
        let ttl = Duration::from_secs(60);
        let hub = Hub::new(TelemetryConfig {
            max_services: 3,
            max_services_per_identity: 1,
            service_ttl: ttl,
            ..TelemetryConfig::default()
        });
        let forgotten = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = Arc::clone(&forgotten);
        hub.on_drop(move |name| lock(&seen).push(name.to_owned()));
        hub.admit_name("alice-1", Some("alice"))
            .expect("her first name");
        hub.ingest(report("alice-1", 1.0)).expect("fits");
        assert!(matches!(
            hub.admit_name("alice-2", Some("alice")),
            Err(TelemetryError::ShareExhausted(_))
        ));
        hub.ingest(report("fed", 1.0)).expect("fits");
        let pin = hub.pin_feed("fed");
        hub.ingest(report("watched", 1.0)).expect("fits");
        let subscription = hub.subscribe("watched").expect("subscribe");

        tokio::time::advance(ttl / 2).await;
        assert!(hub.sweep().is_empty(), "nothing silent for the ttl yet");
        tokio::time::advance(ttl).await;
        assert_eq!(
            hub.sweep()
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>(),
            ["alice-1"]
        );
        assert_eq!(*lock(&forgotten), ["alice-1"]);
        assert_eq!(
            hub.snapshot("alice-1"),
            Err(TelemetryError::UnknownService("alice-1".into()))
        );
        assert!(hub.history("alice-1", 0).is_err());
        // Her charge is back, and so is the slot.
        hub.admit_name("alice-2", Some("alice"))
            .expect("her share again");
        hub.ingest(report("alice-2", 1.0)).expect("the slot again");

        drop(pin);
        drop(subscription);
        tokio::time::advance(ttl).await;
        let mut dropped: Vec<String> = hub.sweep().iter().map(|n| n.to_string()).collect();
        dropped.sort();
        assert_eq!(dropped, ["alice-2", "fed", "watched"]);
        assert!(hub.services().expect("served").is_empty());
        // A dropped name comes back with a fresh history.
        let again = hub.ingest(report("fed", 2.0)).expect("re-created");
        assert_eq!(again.seq, 1);
        assert_eq!(hub.history("fed", 0).expect("known").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_ttl_of_zero_drops_nothing() {
        let hub = Hub::new(TelemetryConfig {
            service_ttl: Duration::ZERO,
            ..TelemetryConfig::default()
        });
        hub.ingest(report("a", 1.0)).expect("fits");
        tokio::time::advance(Duration::from_secs(86_400)).await;
        assert!(hub.sweep().is_empty());
    }
}
