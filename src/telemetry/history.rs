//! The recent history of every service: one bounded ring of samples per
//! service, and the table that gives each service a dense id.
//!
//! A sample in the ring is a [`Point`] of 32 bytes (the name lives once, in
//! the [`Series`]), so a service costs 32 bytes × `telemetry.history` at
//! most (28 KiB at the default 900) plus about 150 bytes of bookkeeping. A
//! ring grows as samples arrive, so a service that reported a few times
//! holds only those. The table holds at most `telemetry.max_services`
//! series and, like the broker, forgets none while the server runs.
//!
//! Appending is O(1) and allocates nothing once a ring is full (while it
//! fills, its buffer grows by doubling up to exactly its capacity).
//! No tonic or protobuf types appear here.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, RwLock},
};

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
}

/// One service's history.
#[derive(Debug)]
pub struct Series {
    /// The dense id of the service (its position in the table).
    pub id: u32,
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
    }
}

#[derive(Debug, Default)]
struct Table {
    by_name: HashMap<Arc<str>, Arc<Series>>,
    by_id: Vec<Arc<Series>>,
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
        if table.by_id.len() >= self.max_services {
            return Err(TelemetryError::TooManyServices {
                limit: self.max_services,
            });
        }
        let id = u32::try_from(table.by_id.len()).map_err(|_| TelemetryError::TooManyServices {
            limit: self.max_services,
        })?;
        let series = Arc::new(Series {
            id,
            name: Arc::clone(name),
            state: Mutex::new(SeriesState {
                ring: Ring::new(self.capacity),
                seq: 0,
            }),
        });
        table.by_id.push(Arc::clone(&series));
        table.by_name.insert(Arc::clone(name), Arc::clone(&series));
        Ok(series)
    }

    /// The series with id `id`.
    pub fn by_id(&self, id: u32) -> Option<Arc<Series>> {
        self.read().by_id.get(id as usize).cloned()
    }

    /// The series with ids from `from` on, in id order.
    pub fn since(&self, from: usize) -> Vec<Arc<Series>> {
        self.read()
            .by_id
            .get(from..)
            .map(<[_]>::to_vec)
            .unwrap_or_default()
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
        assert_eq!(histories.since(1).len(), 1);
        assert!(histories.since(5).is_empty());
    }
}
