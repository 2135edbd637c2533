//! The recent history of every service: one bounded ring of samples per
//! service, and the table that gives each service a dense id.
//!
//! A sample in the ring is a [`Point`] of 32 bytes (the name lives once, in
//! the [`Series`]), so a service costs 32 bytes × `telemetry.history` at
//! most (28 KiB at the default 900) plus about 150 bytes of bookkeeping. A
//! ring grows as samples arrive, so a service that reported a few times
//! holds only those. The table holds at most `telemetry.max_services`
//! series. A series that fell silent is dropped by the hub's sweep
//! ([`Histories::remove`], see `Hub::sweep`): its ring is freed at once and
//! its id goes back to a free list, to be reused by a later service with a
//! new [`Key::generation`], so a watcher that still holds the old id can
//! tell the two apart.
//!
//! Appending is O(1) and allocates nothing once a ring is full (while it
//! fills, its buffer grows by doubling up to exactly its capacity).
//! No tonic or protobuf types appear here.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, RwLock},
};

use tokio::time::Instant;

use super::{Sample, TelemetryError};

/// One sample without its service name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// CPU usage in percent.
    pub cpu_usage: f64,
    /// Memory in MB.
    pub memory_mb: f64,
    /// Request count.
    pub request_count: u64,
    /// Unix ms.
    pub timestamp_ms: u64,
}

impl Point {
    fn of(sample: &Sample) -> Self {
        Self {
            cpu_usage: sample.cpu_usage,
            memory_mb: sample.memory_mb,
            request_count: sample.request_count,
            timestamp_ms: sample.timestamp_ms,
        }
    }
}

/// A bounded ring of points, oldest overwritten first.
#[derive(Debug)]
pub struct Ring {
    points: Vec<Point>,
    /// Index of the oldest point once the ring is full.
    head: usize,
    capacity: usize,
}

impl Ring {
    /// An empty ring of at most `capacity` points (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            points: Vec::new(),
            head: 0,
            capacity: capacity.max(1),
        }
    }

    /// Appends `point`, dropping the oldest when full.
    pub fn push(&mut self, point: Point) {
        if self.points.len() < self.capacity {
            if self.points.len() == self.points.capacity() {
                // Double, but never past the capacity.
                let more = self
                    .points
                    .len()
                    .max(4)
                    .min(self.capacity - self.points.len());
                self.points.reserve_exact(more);
            }
            self.points.push(point);
        } else {
            self.points[self.head] = point;
            self.head = (self.head + 1) % self.capacity;
        }
    }

    /// Number of points held.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Whether the ring holds nothing.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The newest point.
    pub fn newest(&self) -> Option<Point> {
        if self.points.len() < self.capacity {
            self.points.last().copied()
        } else {
            let newest = (self.head + self.capacity - 1) % self.capacity;
            self.points.get(newest).copied()
        }
    }

    /// The newest `n` points (all if fewer), oldest first.
    pub fn last(&self, n: usize) -> impl Iterator<Item = Point> + '_ {
        let len = self.points.len();
        let n = n.min(len);
        let start = if len < self.capacity { 0 } else { self.head };
        (len - n..len).map(move |i| self.points[(start + i) % len])
    }
}

/// The state of one series behind its lock.
#[derive(Debug)]
pub struct SeriesState {
    /// Recent points.
    pub ring: Ring,
    /// Samples ever appended (the newest sample's sequence number; 0 when
    /// none).
    pub seq: u64,
    /// When the newest sample was appended (or the series created).
    pub touched: Instant,
    /// Dropped from the table: nothing lands here any more (a sample for
    /// the name creates a new series).
    pub dropped: bool,
}

/// A series' place in the table: its dense id, and the generation that
/// tells it from earlier and later series that held the same id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// Position in the table; reused after a drop.
    pub id: u32,
    /// Different for each series that holds the id.
    pub generation: u32,
}

/// One service's history.
#[derive(Debug)]
pub struct Series {
    /// The dense id of the service (its position in the table; reused by
    /// another service once this one is dropped).
    pub id: u32,
    /// Tells this series from others that held the same id.
    pub generation: u32,
    /// The service name.
    pub name: Arc<str>,
    state: Mutex<SeriesState>,
}

impl Series {
    /// Locks the state. Critical sections are a copy or a push.
    pub fn lock(&self) -> MutexGuard<'_, SeriesState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The newest sample and its sequence number, if newer than `seen`.
    pub fn newer_than(&self, seen: u64) -> Option<Sample> {
        let state = self.lock();
        if state.seq <= seen {
            return None;
        }
        let point = state.ring.newest()?;
        Some(self.sample(point, state.seq))
    }

    /// The newest `n` samples (oldest first) and the newest sequence
    /// number.
    pub fn recent(&self, n: usize) -> (Vec<Sample>, u64) {
        let state = self.lock();
        let taken = n.min(state.ring.len());
        let first_seq = state.seq + 1 - taken as u64;
        let samples = state
            .ring
            .last(taken)
            .zip(first_seq..)
            .map(|(point, seq)| self.sample(point, seq))
            .collect();
        (samples, state.seq)
    }

    /// The sequence number of the newest sample (0 when none).
    pub fn seq(&self) -> u64 {
        self.lock().seq
    }

    /// The series' id and generation.
    pub fn key(&self) -> Key {
        Key {
            id: self.id,
            generation: self.generation,
        }
    }

    fn sample(&self, point: Point, seq: u64) -> Sample {
        Sample {
            service: Arc::clone(&self.name),
            cpu_usage: point.cpu_usage,
            memory_mb: point.memory_mb,
            request_count: point.request_count,
            timestamp_ms: point.timestamp_ms,
            seq,
        }
    }

    /// Appends `sample` (whose `seq` must be `state.seq + 1`) under a lock
    /// the caller holds.
    pub fn append(state: &mut SeriesState, sample: &Sample) {
        state.ring.push(Point::of(sample));
        state.seq = sample.seq;
        state.touched = Instant::now();
    }
}

#[derive(Debug, Default)]
struct Table {
    by_name: HashMap<Arc<str>, Arc<Series>>,
    /// `None`: a free id (also on `free`).
    by_id: Vec<Option<Arc<Series>>>,
    free: Vec<u32>,
    /// The generation the next series gets.
    generation: u32,
}

/// Every service's series, by name and by dense id.
#[derive(Debug)]
pub struct Histories {
    table: RwLock<Table>,
    capacity: usize,
    max_services: usize,
}

impl Histories {
    /// A table of at most `max_services` series of `capacity` samples each.
    pub fn new(capacity: usize, max_services: usize) -> Self {
        Self {
            table: RwLock::new(Table::default()),
            capacity: capacity.max(1),
            max_services,
        }
    }

    /// Samples kept per service.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The series of `name`, if it exists.
    pub fn get(&self, name: &str) -> Option<Arc<Series>> {
        self.read().by_name.get(name).cloned()
    }

    /// The series of `name`, created if needed.
    pub fn get_or_create(&self, name: &Arc<str>) -> Result<Arc<Series>, TelemetryError> {
        if let Some(series) = self.get(name) {
            return Ok(series);
        }
        let mut table = self
            .table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(series) = table.by_name.get(name) {
            return Ok(Arc::clone(series));
        }
        let full = TelemetryError::TooManyServices {
            limit: self.max_services,
        };
        if table.by_name.len() >= self.max_services {
            return Err(full);
        }
        let id = match table.free.pop() {
            Some(id) => id,
            None => u32::try_from(table.by_id.len()).map_err(|_| full)?,
        };
        let generation = table.generation;
        table.generation = generation.wrapping_add(1);
        let series = Arc::new(Series {
            id,
            generation,
            name: Arc::clone(name),
            state: Mutex::new(SeriesState {
                ring: Ring::new(self.capacity),
                seq: 0,
                touched: Instant::now(),
                dropped: false,
            }),
        });
        match table.by_id.get_mut(id as usize) {
            Some(slot) => *slot = Some(Arc::clone(&series)),
            None => table.by_id.push(Some(Arc::clone(&series))),
        }
        table.by_name.insert(Arc::clone(name), Arc::clone(&series));
        Ok(series)
    }

    /// Takes `series` out of the table (if it is still there) and frees its
    /// ring; its id is free for the next new service. The caller holds
    /// `state`, the series' lock, and marks it dropped first, so a sample
    /// that was about to land in it lands in a new series instead.
    pub fn remove(&self, series: &Series, state: &mut SeriesState) {
        state.dropped = true;
        state.ring = Ring::new(1);
        let mut table = self
            .table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let ours = |s: &Arc<Series>| s.key() == series.key();
        if table.by_name.get(&series.name).is_some_and(ours) {
            table.by_name.remove(&series.name);
        }
        if let Some(slot) = table.by_id.get_mut(series.id as usize)
            && slot.as_ref().is_some_and(ours)
        {
            *slot = None;
            table.free.push(series.id);
        }
    }

    /// The series with id `id`.
    pub fn by_id(&self, id: u32) -> Option<Arc<Series>> {
        self.read().by_id.get(id as usize).cloned().flatten()
    }

    /// The series with ids from `from` on, in id order, and the end of the
    /// ids handed out so far (where the next call should start).
    pub fn since(&self, from: usize) -> (usize, Vec<Arc<Series>>) {
        let table = self.read();
        let found = table
            .by_id
            .get(from..)
            .map(|slots| slots.iter().flatten().cloned().collect())
            .unwrap_or_default();
        (table.by_id.len().max(from), found)
    }

    /// Every series, in id order.
    pub fn all(&self) -> Vec<Arc<Series>> {
        self.since(0).1
    }

    /// Number of series in the table.
    pub fn len(&self) -> usize {
        self.read().by_name.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(i: u64) -> Point {
        Point {
            cpu_usage: 1.0,
            memory_mb: 2.0,
            request_count: i,
            timestamp_ms: i,
        }
    }

    fn counts(ring: &Ring, n: usize) -> Vec<u64> {
        ring.last(n).map(|p| p.request_count).collect()
    }

    #[test]
    fn a_ring_keeps_the_newest_and_grows_only_to_its_capacity() {
        let mut ring = Ring::new(5);
        assert!(ring.is_empty());
        assert_eq!(ring.newest(), None);
        for i in 1..=3 {
            ring.push(point(i));
        }
        assert_eq!(counts(&ring, 10), [1, 2, 3]);
        assert_eq!(counts(&ring, 2), [2, 3]);
        for i in 4..=12 {
            ring.push(point(i));
        }
        assert_eq!(ring.len(), 5);
        assert_eq!(ring.points.capacity(), 5, "never past its capacity");
        assert_eq!(counts(&ring, 10), [8, 9, 10, 11, 12]);
        assert_eq!(counts(&ring, 1), [12]);
        assert_eq!(ring.newest().map(|p| p.request_count), Some(12));
    }

    #[test]
    fn series_number_their_samples() {
        let histories = Histories::new(3, 2);
        let name: Arc<str> = Arc::from("a");
        let series = histories.get_or_create(&name).expect("fits");
        assert_eq!(series.newer_than(0), None);
        for seq in 1..=4 {
            let mut state = series.lock();
            let sample = Sample {
                service: Arc::clone(&name),
                cpu_usage: 0.0,
                memory_mb: 0.0,
                request_count: seq * 10,
                timestamp_ms: seq,
                seq,
            };
            Series::append(&mut state, &sample);
        }
        let (recent, seq) = series.recent(10);
        assert_eq!(seq, 4);
        assert_eq!(
            recent
                .iter()
                .map(|s| (s.seq, s.request_count))
                .collect::<Vec<_>>(),
            [(2, 20), (3, 30), (4, 40)]
        );
        assert_eq!(series.newer_than(4), None);
        assert_eq!(series.newer_than(3).map(|s| s.seq), Some(4));
        assert_eq!(histories.by_id(0).map(|s| s.id), Some(0));
        histories.get_or_create(&Arc::from("b")).expect("fits");
        assert_eq!(
            histories.get_or_create(&Arc::from("c")).expect_err("full"),
            TelemetryError::TooManyServices { limit: 2 }
        );
        assert_eq!(histories.since(1).1.len(), 1);
        assert!(histories.since(5).1.is_empty());
    }

    #[test]
    fn a_removed_series_frees_its_ring_and_its_id_for_a_new_generation() {
        let histories = Histories::new(3, 2);
        let a = histories.get_or_create(&Arc::from("a")).expect("fits");
        let b = histories.get_or_create(&Arc::from("b")).expect("fits");
        {
            let mut state = a.lock();
            Series::append(
                &mut state,
                &Sample {
                    service: Arc::from("a"),
                    cpu_usage: 0.0,
                    memory_mb: 0.0,
                    request_count: 1,
                    timestamp_ms: 1,
                    seq: 1,
                },
            );
            histories.remove(&a, &mut state);
            assert!(state.dropped && state.ring.is_empty());
        }
        assert!(histories.get("a").is_none());
        assert!(histories.by_id(a.id).is_none());
        assert_eq!(histories.len(), 1);
        let c = histories
            .get_or_create(&Arc::from("c"))
            .expect("a slot again");
        assert_eq!(c.id, a.id, "the id is reused");
        assert_ne!(c.key(), a.key(), "with a new generation");
        // Removing the old series again touches nothing of the new one.
        histories.remove(&a, &mut a.lock());
        assert_eq!(histories.by_id(c.id).map(|s| s.key()), Some(c.key()));
        assert_eq!(histories.all().len(), 2);
        assert_eq!(b.id, 1);
    }
}
