//! One multiplexed stream for a whole dashboard: the samples of every
//! service whose name matches a pattern (services that appear later
//! included) and every alert, a backfill of recent history first, then
//! live.
//!
//! # How one stream follows many services without a task per service
//!
//! Every publish sends the service's dense id (a `u32`) on one
//! `tokio::sync::broadcast` channel, the *change feed*: O(1) for the
//! publisher, whatever the number of watchers or services. A watch stream
//! keeps, per matching service, the sequence number of the last sample it
//! sent and a [`Pacer`]. Woken, it drains the ids waiting for it, marks
//! those services ready (once each, however many ids arrived), and sends
//! each one's *newest* sample if it is newer than what it sent and its
//! pacer allows; a service whose interval has not passed is held on one
//! timer per stream (the earliest due) and sends whatever is newest when
//! it is due. Ids of services it has never seen are looked up once and
//! matched against the pattern, which is how services that appear later
//! join the stream.
//!
//! # Services that are dropped
//!
//! A service silent for `telemetry.service_ttl` is dropped by the hub's
//! sweep (see `Hub::sweep`), and its id may later go to another service.
//! Ids on the change feed therefore come with the series' generation (a
//! [`Key`]): a key whose generation differs from what the stream holds for
//! that id means the id changed hands, and the stream looks the id up
//! again. The sweep announces each dropped key too; the stream then
//! forgets the service (it sends nothing for it, and no event says so: a
//! dashboard sees the service fall silent, and it is absent from the
//! backfill of a new watch). If the name reports again it is a new
//! service to the stream, whose samples are sent from its first.
//!
//! # Slow readers
//!
//! Samples: skip to the newest, as Subscribe. A stream that is not polled
//! leaves ids in the change feed; if more than [`CHANGE_FEED`] pile up, the
//! feed reports a lag and the stream rescans every matching service
//! instead, sending each one's newest sample. Nothing queues per stream
//! beyond one ready flag per service.
//!
//! Alerts are never coalesced: a stream that falls more than
//! `telemetry.alert_history` (at least [`MIN_ALERT_FEED`]) alerts behind
//! ends with [`WatchError::AlertsLagged`], which the service layer turns
//! into RESOURCE_EXHAUSTED; the client reconnects and gets the recent
//! alerts as backfill.
//!
//! No tonic or protobuf types appear here.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::broadcast::{self, error::RecvError, error::TryRecvError},
    time::Instant,
};

use super::{
    Sample,
    alerts::Alert,
    history::{Histories, Key, Series},
    now_ms,
    pacer::Pacer,
};

/// Ids the change feed holds for a stream that is not reading; beyond
/// that the stream rescans (skip to newest).
pub const CHANGE_FEED: usize = 4096;

/// Least number of alerts a watcher may fall behind before it is ended.
pub const MIN_ALERT_FEED: usize = 256;

/// A glob on service names: `*` matches any run of characters, everything
/// else itself. Empty matches everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    /// The pattern `glob` (empty = `*`).
    pub fn new(glob: &str) -> Self {
        if glob.is_empty() {
            Self("*".to_owned())
        } else {
            Self(glob.to_owned())
        }
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        let mut parts = self.0.split('*');
        // split always yields at least one part.
        let first = parts.next().unwrap_or_default();
        let Some(mut rest) = name.strip_prefix(first) else {
            return false;
        };
        let parts: Vec<&str> = parts.collect();
        let Some((last, middle)) = parts.split_last() else {
            // No `*` at all: the whole name must be the pattern.
            return rest.is_empty();
        };
        for part in middle {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last)
    }
}

/// Which service names a watcher may see, besides its pattern (the
/// caller's `telemetry:read` scopes): samples, backfill and alerts of any
/// other name are never sent to it. Cheap to clone.
#[derive(Clone)]
pub struct Visible(Option<Arc<NameTest>>);

/// A test on a service name.
type NameTest = dyn Fn(&str) -> bool + Send + Sync;

impl Visible {
    /// Every name.
    pub fn all() -> Self {
        Self(None)
    }

    /// The names for which `allows` is true.
    pub fn only(allows: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(allows)))
    }

    /// Whether `name` may be seen.
    pub fn allows(&self, name: &str) -> bool {
        self.0.as_ref().is_none_or(|allows| allows(name))
    }
}

impl Default for Visible {
    fn default() -> Self {
        Self::all()
    }
}

impl std::fmt::Debug for Visible {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Visible(only)"
        } else {
            "Visible(all)"
        })
    }
}

/// An alert raised by some LiveFeed call, about one service.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRecord {
    /// The service the alert is about.
    pub service: Arc<str>,
    /// The alert.
    pub alert: Alert,
}

/// The recent alerts (oldest first) and a receiver of every later one.
pub type AlertSubscription = (Vec<Arc<AlertRecord>>, broadcast::Receiver<Arc<AlertRecord>>);

/// Every alert of the server: the last `alert_history` kept for backfill,
/// each one broadcast to every watcher.
#[derive(Debug)]
pub struct AlertFeed {
    recent: Mutex<VecDeque<Arc<AlertRecord>>>,
    keep: usize,
    tx: broadcast::Sender<Arc<AlertRecord>>,
}

impl AlertFeed {
    /// A feed keeping `keep` alerts for backfill.
    pub fn new(keep: usize) -> Self {
        let (tx, _) = broadcast::channel(keep.max(MIN_ALERT_FEED));
        Self {
            recent: Mutex::new(VecDeque::new()),
            keep,
            tx,
        }
    }

    /// Records `record` and sends it to every watcher.
    pub fn publish(&self, record: AlertRecord) {
        let record = Arc::new(record);
        let mut recent = self.lock();
        if self.keep > 0 {
            if recent.len() == self.keep {
                recent.pop_front();
            }
            recent.push_back(Arc::clone(&record));
        }
        // Sent under the lock, so a new watcher's backfill and its live
        // feed meet without a gap or a duplicate. No receivers is fine.
        let _ = self.tx.send(record);
    }

    /// The newest `n` alerts (oldest first) and a receiver of every later
    /// one.
    pub fn subscribe(
        &self,
        n: usize,
    ) -> (Vec<Arc<AlertRecord>>, broadcast::Receiver<Arc<AlertRecord>>) {
        let recent = self.lock();
        let skip = recent.len().saturating_sub(n);
        let backfill = recent.iter().skip(skip).cloned().collect();
        (backfill, self.tx.subscribe())
    }

    /// Alerts kept for backfill.
    pub fn keep(&self) -> usize {
        self.keep
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<AlertRecord>>> {
        self.recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What a watcher asks for.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Which services.
    pub pattern: Pattern,
    /// Which services the watcher may see at all (its read permission):
    /// applied to samples, backfill and alerts, also of services that
    /// appear later.
    pub visible: Visible,
    /// At most one sample per service per interval.
    pub interval: Duration,
    /// Samples of history per service first (capped at the history kept).
    pub backfill_samples: usize,
    /// Whether alerts are delivered.
    pub alerts: bool,
    /// Recent alerts first (capped at the alerts kept).
    pub backfill_alerts: usize,
}

/// What a watch stream yields.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchItem {
    /// The recent history of one matching service, oldest first.
    Backfill {
        /// The service.
        service: Arc<str>,
        /// Its samples.
        samples: Vec<Sample>,
    },
    /// A new latest sample of a matching service.
    Sample(Sample),
    /// An alert.
    Alert(Arc<AlertRecord>),
    /// The backfill is complete; what follows is live. Server time, Unix
    /// ms.
    Live(u64),
}

/// Why a watch stream ended.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum WatchError {
    /// The watcher fell too far behind on alerts.
    #[error(
        "the watcher fell more than {missed} alerts behind and missed them; \
         reconnect to get the recent alerts again"
    )]
    AlertsLagged {
        /// Alerts missed.
        missed: u64,
    },
}

/// A matching service as one watch stream sees it.
#[derive(Debug)]
struct Watched {
    series: Arc<Series>,
    /// Sequence number of the last sample sent (or backfilled).
    seen: u64,
    pacer: Pacer,
    /// In the ready list.
    queued: bool,
    /// On the timer heap.
    held: bool,
}

#[derive(Debug)]
enum Phase {
    Backfill {
        services: VecDeque<Arc<Series>>,
        alerts: VecDeque<Arc<AlertRecord>>,
    },
    Live,
}

/// Counters of a watch stream (flushed into the server's metrics by the
/// caller).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WatchCounts {
    /// Samples sent live.
    pub delivered: u64,
    /// Samples skipped because a newer one was sent instead.
    pub coalesced: u64,
}

/// What one watch stream knows of one id of the table.
#[derive(Debug, Default)]
struct Slot {
    /// The generation of the series last looked at under this id (`None`:
    /// none, or it was dropped).
    generation: Option<u32>,
    /// `Some` when that series matches.
    watched: Option<Box<Watched>>,
}

/// One watch stream's state: no task of its own; [`Watch::next`] is
/// polled by the response stream.
#[derive(Debug)]
pub struct Watch {
    histories: Arc<Histories>,
    changes: broadcast::Receiver<Key>,
    alerts: Option<broadcast::Receiver<Arc<AlertRecord>>>,
    options: WatchOptions,
    phase: Phase,
    /// By series id; ids below `classified` have been looked at.
    watched: Vec<Slot>,
    classified: usize,
    ready: VecDeque<u32>,
    timers: BinaryHeap<Reverse<(Instant, u32)>>,
    counts: WatchCounts,
}

impl Watch {
    /// Opens a watch over `histories`, whose publishes are announced on
    /// `changes`. The receivers must be made before the snapshot of what
    /// exists, so nothing falls between the backfill and the live part.
    pub fn new(
        histories: Arc<Histories>,
        changes: broadcast::Receiver<Key>,
        alerts: Option<AlertSubscription>,
        options: WatchOptions,
    ) -> Self {
        let (alert_backfill, alerts) = match alerts {
            Some((backfill, rx)) => (
                backfill
                    .into_iter()
                    .filter(|record| options.visible.allows(&record.service))
                    .collect(),
                Some(rx),
            ),
            None => (VecDeque::new(), None),
        };
        let mut watch = Self {
            histories,
            changes,
            alerts,
            options,
            phase: Phase::Live,
            watched: Vec::new(),
            classified: 0,
            ready: VecDeque::new(),
            timers: BinaryHeap::new(),
            counts: WatchCounts::default(),
        };
        watch.classify_new();
        let services = watch
            .watched
            .iter()
            .filter_map(|slot| slot.watched.as_ref())
            .map(|w| Arc::clone(&w.series))
            .collect();
        watch.phase = Phase::Backfill {
            services,
            alerts: alert_backfill,
        };
        watch
    }

    /// Counts so far.
    pub fn counts(&self) -> WatchCounts {
        self.counts
    }

    /// Takes the counts so far, leaving zeros.
    pub fn take_counts(&mut self) -> WatchCounts {
        std::mem::take(&mut self.counts)
    }

    /// Looks at the series created since the last look and adds those
    /// that match; each becomes ready, so its newest sample goes out.
    fn classify_new(&mut self) {
        let (end, new) = self.histories.since(self.classified);
        self.classified = end;
        if self.watched.len() < end {
            self.watched.resize_with(end, Slot::default);
        }
        for series in new {
            self.classify(series);
        }
    }

    /// Makes `series` what its id's slot holds, watched if it matches.
    fn classify(&mut self, series: Arc<Series>) {
        let id = series.id as usize;
        if self.watched.len() <= id {
            self.watched.resize_with(id + 1, Slot::default);
        }
        let matches =
            self.options.pattern.matches(&series.name) && self.options.visible.allows(&series.name);
        self.watched[id] = Slot {
            generation: Some(series.generation),
            watched: matches.then(|| {
                Box::new(Watched {
                    series,
                    seen: 0,
                    pacer: Pacer::new(self.options.interval),
                    queued: false,
                    held: false,
                })
            }),
        };
        if matches {
            self.mark(id);
        }
    }

    /// Looks the id up again: it was dropped, or went to a new series.
    fn reclassify(&mut self, id: u32) {
        match self.histories.by_id(id) {
            Some(series) => self.classify(series),
            None => {
                if let Some(slot) = self.watched.get_mut(id as usize) {
                    *slot = Slot::default();
                }
            }
        }
    }

    fn mark(&mut self, id: usize) {
        if let Some(Slot {
            watched: Some(watched),
            ..
        }) = self.watched.get_mut(id)
            && !watched.queued
        {
            watched.queued = true;
            self.ready.push_back(watched.series.id);
        }
    }

    fn changed(&mut self, key: Key) {
        if key.id as usize >= self.classified {
            self.classify_new();
        }
        let known = self
            .watched
            .get(key.id as usize)
            .and_then(|slot| slot.generation);
        if known != Some(key.generation) {
            // A series this stream has not seen under that id (the one it
            // saw was dropped): look again.
            self.reclassify(key.id);
        }
        self.mark(key.id as usize);
    }

    /// Every matching service becomes ready (after a lag of the change
    /// feed: whatever changed, its newest sample goes; whatever was
    /// dropped or replaced is looked up again).
    fn rescan(&mut self) {
        self.classify_new();
        let mut current: Vec<Option<Arc<Series>>> = vec![None; self.watched.len()];
        for series in self.histories.all() {
            if let Some(at) = current.get_mut(series.id as usize) {
                *at = Some(series);
            }
        }
        for (id, series) in current.into_iter().enumerate() {
            let held = self.watched[id].generation;
            match series {
                Some(series) if held != Some(series.generation) => self.classify(series),
                Some(_) => {}
                None => self.watched[id] = Slot::default(),
            }
        }
        for id in 0..self.watched.len() {
            self.mark(id);
        }
    }

    fn drain_changes(&mut self) -> bool {
        loop {
            match self.changes.try_recv() {
                Ok(id) => self.changed(id),
                Err(TryRecvError::Lagged(_)) => self.rescan(),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Closed) => return false,
            }
        }
    }

    /// The next ready sample that may go now, holding those that may not.
    fn next_ready(&mut self, now: Instant) -> Option<Sample> {
        while let Some(id) = self.ready.pop_front() {
            let Some(slot) = self.watched.get_mut(id as usize) else {
                continue;
            };
            let Some(watched) = &mut slot.watched else {
                continue;
            };
            watched.queued = false;
            let Some(sample) = watched.series.newer_than(watched.seen) else {
                if watched.series.lock().dropped {
                    // Its ring is already freed; forget the rest.
                    *slot = Slot::default();
                }
                continue;
            };
            if let Some(until) = watched.pacer.hold_until(now) {
                if !watched.held {
                    watched.held = true;
                    self.timers.push(Reverse((until, id)));
                }
                continue;
            }
            watched.pacer.sent(now);
            if watched.seen > 0 {
                self.counts.coalesced += sample.seq.saturating_sub(watched.seen + 1);
            }
            watched.seen = sample.seq;
            self.counts.delivered += 1;
            return Some(sample);
        }
        None
    }

    /// Moves the services whose hold has passed to the ready list.
    fn release_due(&mut self, now: Instant) {
        while let Some(Reverse((until, id))) = self.timers.peek().copied() {
            if until > now {
                break;
            }
            self.timers.pop();
            if let Some(Slot {
                watched: Some(watched),
                ..
            }) = self.watched.get_mut(id as usize)
            {
                watched.held = false;
            }
            self.mark(id as usize);
        }
    }

    /// The next item: backfill first, then the live marker, then live
    /// samples and alerts. `None` when the feeds closed (the hub is gone).
    /// Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> Option<Result<WatchItem, WatchError>> {
        if let Phase::Backfill { services, alerts } = &mut self.phase {
            while let Some(series) = services.pop_front() {
                let (samples, seq) = series.recent(self.options.backfill_samples);
                let id = series.id as usize;
                if let Some(Slot {
                    watched: Some(watched),
                    ..
                }) = self.watched.get_mut(id)
                {
                    if self.options.backfill_samples > 0 {
                        // Sent as backfill: live goes on from there.
                        watched.seen = seq;
                    }
                    if !samples.is_empty() {
                        return Some(Ok(WatchItem::Backfill {
                            service: Arc::clone(&series.name),
                            samples,
                        }));
                    }
                }
            }
            if let Some(alert) = alerts.pop_front() {
                return Some(Ok(WatchItem::Alert(alert)));
            }
            self.phase = Phase::Live;
            return Some(Ok(WatchItem::Live(now_ms())));
        }
        loop {
            // Alerts first: they are never coalesced, so they go as soon as
            // they are seen.
            while let Some(rx) = &mut self.alerts {
                match rx.try_recv() {
                    Ok(alert) if self.options.visible.allows(&alert.service) => {
                        return Some(Ok(WatchItem::Alert(alert)));
                    }
                    // About a service the watcher may not see.
                    Ok(_) => {}
                    Err(TryRecvError::Lagged(missed)) => {
                        return Some(Err(WatchError::AlertsLagged { missed }));
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Closed) => return None,
                }
            }
            if !self.drain_changes() {
                return None;
            }
            let now = Instant::now();
            self.release_due(now);
            if let Some(sample) = self.next_ready(now) {
                return Some(Ok(WatchItem::Sample(sample)));
            }
            let due = self.timers.peek().map(|Reverse((until, _))| *until);
            let (changes, alerts) = (&mut self.changes, &mut self.alerts);
            let alerts = async {
                match alerts {
                    Some(rx) => Some(rx.recv().await),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                change = changes.recv() => match change {
                    Ok(id) => self.changed(id),
                    Err(RecvError::Lagged(_)) => self.rescan(),
                    Err(RecvError::Closed) => return None,
                },
                alert = alerts => match alert {
                    Some(Ok(alert)) if self.options.visible.allows(&alert.service) => {
                        return Some(Ok(WatchItem::Alert(alert)));
                    }
                    // About a service the watcher may not see.
                    Some(Ok(_)) => {}
                    Some(Err(RecvError::Lagged(missed))) => {
                        return Some(Err(WatchError::AlertsLagged { missed }));
                    }
                    Some(Err(RecvError::Closed)) | None => return None,
                },
                () = sleep_until(due) => {}
            }
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::TelemetryConfig,
        telemetry::{Hub, Report},
    };

    fn hub() -> Hub {
        Hub::new(TelemetryConfig {
            history: 10,
            ..TelemetryConfig::default()
        })
    }

    fn publish(hub: &Hub, service: &str, count: u64) {
        hub.ingest(Report {
            service: service.into(),
            cpu_usage: 1.0,
            memory_mb: 2.0,
            request_count: count,
            timestamp_ms: 0,
        })
        .expect("valid");
    }

    fn options(pattern: &str, backfill_samples: usize) -> WatchOptions {
        WatchOptions {
            pattern: Pattern::new(pattern),
            visible: Visible::all(),
            interval: Duration::from_secs(1),
            backfill_samples,
            alerts: false,
            backfill_alerts: 0,
        }
    }

    async fn next(watch: &mut Watch) -> WatchItem {
        tokio::time::timeout(Duration::from_secs(60), watch.next())
            .await
            .expect("an item")
            .expect("open")
            .expect("not ended")
    }

    async fn sample(watch: &mut Watch) -> (String, u64) {
        match next(watch).await {
            WatchItem::Sample(s) => (s.service.to_string(), s.request_count),
            other => panic!("expected a sample, got {other:?}"),
        }
    }

    /// Time is paused: the pacer's holds pass as soon as nothing else can
    /// happen, so the test needs no real waiting.
    #[tokio::test(start_paused = true)]
    async fn backfill_then_live_skipping_to_the_newest_per_service() {
        let hub = hub();
        for n in 1..=3 {
            publish(&hub, "api-1", n);
        }
        publish(&hub, "db", 1);
        let mut watch = hub
            .watch(options("api-*", 2))
            .expect("the in-process broker is always live");
        match next(&mut watch).await {
            WatchItem::Backfill { service, samples } => {
                assert_eq!(&*service, "api-1");
                let counts: Vec<u64> = samples.iter().map(|s| s.request_count).collect();
                assert_eq!(counts, [2, 3]);
            }
            other => panic!("expected a backfill, got {other:?}"),
        }
        assert!(matches!(next(&mut watch).await, WatchItem::Live(_)));

        // A watcher that is not polled while 97 samples are published
        // gets the newest only, at once (its first live sample).
        for n in 4..=100 {
            publish(&hub, "api-1", n);
        }
        assert_eq!(sample(&mut watch).await, ("api-1".into(), 100));
        assert_eq!(
            watch.take_counts(),
            WatchCounts {
                delivered: 1,
                coalesced: 96
            }
        );
        // Within its interval: held, then the newest by then.
        for n in 101..=150 {
            publish(&hub, "api-1", n);
        }
        assert_eq!(sample(&mut watch).await, ("api-1".into(), 150));
        assert_eq!(watch.take_counts().coalesced, 49);

        // Services that appear later are included if they match.
        publish(&hub, "web", 1);
        publish(&hub, "api-2", 7);
        assert_eq!(sample(&mut watch).await, ("api-2".into(), 7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_watcher_far_behind_the_change_feed_rescans_and_sends_the_newest() {
        let hub = hub();
        let mut watch = hub
            .watch(options("", 0))
            .expect("the in-process broker is always live");
        assert!(matches!(next(&mut watch).await, WatchItem::Live(_)));
        let total = CHANGE_FEED as u64 * 2;
        for n in 1..=total {
            publish(&hub, if n % 2 == 0 { "a" } else { "b" }, n);
        }
        let mut got = vec![sample(&mut watch).await, sample(&mut watch).await];
        got.sort();
        assert_eq!(got, [("a".into(), total), ("b".into(), total - 1)]);
    }

    #[tokio::test(start_paused = true)]
    async fn without_backfill_the_current_samples_go_first() {
        let hub = hub();
        publish(&hub, "a", 5);
        let mut watch = hub
            .watch(options("a", 0))
            .expect("the in-process broker is always live");
        assert!(matches!(next(&mut watch).await, WatchItem::Live(_)));
        assert_eq!(sample(&mut watch).await, ("a".into(), 5));
    }

    #[tokio::test(start_paused = true)]
    async fn alerts_are_backfilled_then_live_and_a_watcher_too_far_behind_ends() {
        let hub = Hub::new(TelemetryConfig {
            alert_history: 2,
            ..TelemetryConfig::default()
        });
        let alert = |n: u64| Alert {
            alert_type: "CPU_HIGH".into(),
            message: format!("alert {n}"),
            value: 95.0,
            timestamp_ms: n,
        };
        for n in 1..=3 {
            hub.raise_alert(Arc::from("api"), alert(n));
        }
        let mut watch = hub
            .watch(WatchOptions {
                alerts: true,
                backfill_alerts: 10,
                ..options("", 0)
            })
            .expect("the in-process broker is always live");
        let mut times = Vec::new();
        loop {
            match next(&mut watch).await {
                WatchItem::Alert(record) => times.push(record.alert.timestamp_ms),
                WatchItem::Live(_) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(times, [2, 3], "the last alert_history alerts");
        hub.raise_alert(Arc::from("db"), alert(4));
        match next(&mut watch).await {
            WatchItem::Alert(record) => assert_eq!(&*record.service, "db"),
            other => panic!("unexpected {other:?}"),
        }
        for n in 0..=(MIN_ALERT_FEED as u64) {
            hub.raise_alert(Arc::from("db"), alert(n));
        }
        let end = tokio::time::timeout(Duration::from_secs(60), watch.next())
            .await
            .expect("an item")
            .expect("open");
        assert!(
            matches!(end, Err(WatchError::AlertsLagged { .. })),
            "{end:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn only_visible_services_and_their_alerts_are_sent_also_those_that_appear_later() {
        let hub = Hub::new(TelemetryConfig::default());
        let alert = |n: u64| Alert {
            alert_type: "CPU_HIGH".into(),
            message: String::new(),
            value: 95.0,
            timestamp_ms: n,
        };
        publish(&hub, "api-1", 1);
        publish(&hub, "db-1", 1);
        hub.raise_alert(Arc::from("db-1"), alert(1));
        hub.raise_alert(Arc::from("api-1"), alert(2));
        let mut watch = hub
            .watch(WatchOptions {
                visible: Visible::only(|name| name.starts_with("api-")),
                alerts: true,
                backfill_alerts: 10,
                ..options("", 5)
            })
            .expect("the in-process broker is always live");
        assert!(
            matches!(next(&mut watch).await, WatchItem::Backfill { service, .. } if &*service == "api-1")
        );
        assert!(matches!(next(&mut watch).await, WatchItem::Alert(a) if a.alert.timestamp_ms == 2));
        assert!(matches!(next(&mut watch).await, WatchItem::Live(_)));
        publish(&hub, "db-2", 1);
        hub.raise_alert(Arc::from("db-2"), alert(3));
        publish(&hub, "api-2", 1);
        hub.raise_alert(Arc::from("api-2"), alert(4));
        assert!(matches!(next(&mut watch).await, WatchItem::Alert(a) if a.alert.timestamp_ms == 4));
        assert_eq!(sample(&mut watch).await, ("api-2".into(), 1));
        assert!(format!("{:?}", Visible::all()).contains("all"));
    }

    #[test]
    fn patterns() {
        let cases = [
            ("", "anything", true),
            ("*", "", true),
            ("api", "api", true),
            ("api", "api-2", false),
            ("api*", "api-2", true),
            ("api*", "ap", false),
            ("*-db", "users-db", true),
            ("*-db", "users-db2", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "acb", false),
            ("a*a", "a", false),
            ("a*a", "aa", true),
            ("*mid*", "xmidy", true),
            ("**", "x", true),
        ];
        for (glob, name, expected) in cases {
            assert_eq!(
                Pattern::new(glob).matches(name),
                expected,
                "{glob} ~ {name}"
            );
        }
    }

    #[test]
    fn the_alert_feed_keeps_the_newest_and_meets_live_without_gap() {
        let feed = AlertFeed::new(2);
        let record = |n: u64| AlertRecord {
            service: Arc::from("s"),
            alert: Alert {
                alert_type: "X".into(),
                message: String::new(),
                value: 0.0,
                timestamp_ms: n,
            },
        };
        for n in 1..=3 {
            feed.publish(record(n));
        }
        let (backfill, mut rx) = feed.subscribe(10);
        let times: Vec<u64> = backfill.iter().map(|r| r.alert.timestamp_ms).collect();
        assert_eq!(times, [2, 3]);
        feed.publish(record(4));
        assert_eq!(rx.try_recv().map(|r| r.alert.timestamp_ms), Ok(4));
        assert_eq!(feed.subscribe(1).0.len(), 1);
    }
}
