//! Durable chat history in embedded storage: one redb database file,
//! `<data-dir>/chat/chat.redb`.
//!
//! Why redb: a pure-Rust, well-maintained embedded key-value store with ACID
//! transactions whose commit is durable (fsync) by default, checksummed
//! pages, and ordered range scans, which is exactly what a per-room log with
//! replay needs. A hand-written append-only log would need its own framing,
//! CRCs, torn-write recovery and compaction for history trimming.
//!
//! Tables:
//! - `messages`: `(room, seq)` → encoded record (kind, time, sender, key,
//!   text). Range scans read a room's history in order.
//! - `rooms`: `room` → `(epoch, oldest seq, last seq)`.
//!
//! Group commit: every append goes to one writer thread, which takes all
//! appends waiting at that moment (from every room), writes them in one
//! transaction and commits once, so one fsync covers many messages. A room
//! waits for its append to be committed before it broadcasts, so nothing is
//! delivered that is not durable.
//!
//! No tonic or protobuf types appear here.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
    time::{SystemTime, UNIX_EPOCH},
};

use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::{Kind, Message};

const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
const ROOMS: TableDefinition<&str, (u64, u64, u64)> = TableDefinition::new("rooms");

/// Errors of the chat storage.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The storage directory cannot be created.
    #[error("cannot create chat storage directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The database failed.
    #[error("chat storage error: {0}")]
    Db(#[from] Box<redb::Error>),
    /// A stored record cannot be decoded.
    #[error("chat storage holds a corrupt record for room {room:?} seq {seq}")]
    Corrupt {
        /// The room.
        room: String,
        /// The seq.
        seq: u64,
    },
    /// A commit failed (the whole batch it carried is not stored).
    #[error("chat storage commit failed: {0}")]
    Commit(String),
    /// The storage was closed (the server is stopping).
    #[error("chat storage is closed")]
    Closed,
    /// A blocking storage task panicked or was cancelled.
    #[error("chat storage task failed: {0}")]
    Task(String),
}

fn db_err(err: impl Into<redb::Error>) -> StoreError {
    StoreError::Db(Box::new(err.into()))
}

/// A room's persistent state as loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomState {
    /// History epoch.
    pub epoch: u64,
    /// Oldest stored seq; `last + 1` when nothing is stored.
    pub oldest: u64,
    /// Newest seq ever assigned (0 for a new room).
    pub last: u64,
    /// The most recent stored messages that carry an idempotency key,
    /// oldest first (at most the requested window).
    pub recent_keys: Vec<Message>,
}

/// One room's part of a commit.
#[derive(Debug)]
pub struct Append {
    /// The room.
    pub room: Arc<str>,
    /// New messages, in seq order, following the room's last seq.
    pub messages: Vec<Arc<Message>>,
    /// The room's oldest seq after this append: older ones are deleted.
    pub oldest: u64,
    /// The room's last seq after this append.
    pub last: u64,
    /// The room's epoch.
    pub epoch: u64,
}

struct Job {
    append: Append,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// The chat storage: reads run on tokio's blocking pool, writes on one
/// writer thread with group commit.
pub struct Store {
    db: Arc<Database>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    max_batch: usize,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the storage in `dir`; a commit holds at most
    /// `max_batch` messages' worth of appends (roughly).
    pub fn open(dir: &Path, max_batch: usize) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let db = Database::create(dir.join("chat.redb")).map_err(db_err)?;
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(MESSAGES).map_err(db_err)?;
        txn.open_table(ROOMS).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel();
        let writer_db = Arc::clone(&db);
        let writer = std::thread::Builder::new()
            .name("chat-store-writer".into())
            .spawn(move || write_loop(&writer_db, &rx, max_batch))
            .map_err(|e| StoreError::Task(e.to_string()))?;
        Ok(Self {
            db,
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            max_batch,
        })
    }

    /// Loads `room`, creating it (with a fresh epoch, durably) if it has
    /// never been seen; remembers the last `key_window` keyed messages.
    pub async fn load_room(&self, room: &str, key_window: usize) -> Result<RoomState, StoreError> {
        let db = Arc::clone(&self.db);
        let room = room.to_owned();
        blocking(move || load_room(&db, &room, key_window)).await
    }

    /// Durably stores `append`; returns once it is committed.
    pub async fn append(&self, append: Append) -> Result<(), StoreError> {
        let (done, committed) = oneshot::channel();
        {
            let jobs = self
                .jobs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let sender = jobs.as_ref().ok_or(StoreError::Closed)?;
            sender
                .send(Job { append, done })
                .map_err(|_| StoreError::Closed)?;
        }
        committed.await.map_err(|_| StoreError::Closed)?
    }

    /// Stored messages of `room` with seq in `from..=to`, at most `limit`,
    /// in order.
    pub async fn read(
        &self,
        room: &str,
        epoch: u64,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<Arc<Message>>, StoreError> {
        let db = Arc::clone(&self.db);
        let room = room.to_owned();
        blocking(move || read_range(&db, &room, epoch, from, to, limit)).await
    }

    /// The most messages one commit takes.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Stops the writer once the appends already queued are committed, and
    /// waits for it. Appends after this fail with [`StoreError::Closed`].
    pub fn close(&self) {
        drop(
            self.jobs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(writer) = writer
            && writer.join().is_err()
        {
            tracing::error!("chat storage writer panicked");
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

async fn blocking<T, F>(work: F) -> Result<T, StoreError>
where
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}

/// A new epoch: random, non-zero, below 2^53 so it survives JSON numbers.
fn new_epoch() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(nanos);
    hasher.write_u32(std::process::id());
    (hasher.finish() & ((1 << 53) - 1)).max(1)
}

fn load_room(db: &Database, room: &str, key_window: usize) -> Result<RoomState, StoreError> {
    let existing = {
        let txn = db.begin_read().map_err(db_err)?;
        let rooms = txn.open_table(ROOMS).map_err(db_err)?;
        rooms.get(room).map_err(db_err)?.map(|v| v.value())
    };
    let (epoch, oldest, last) = match existing {
        Some(meta) => meta,
        None => {
            let meta = (new_epoch(), 1, 0);
            let txn = db.begin_write().map_err(db_err)?;
            {
                let mut rooms = txn.open_table(ROOMS).map_err(db_err)?;
                // Another loader may have won the race (not within one
                // server, whose hub loads a room once, but be safe).
                let current = rooms.get(room).map_err(db_err)?.map(|v| v.value());
                if let Some(current) = current {
                    drop(rooms);
                    txn.abort().map_err(db_err)?;
                    return finish_load(db, room, current, key_window);
                }
                rooms.insert(room, meta).map_err(db_err)?;
            }
            txn.commit().map_err(db_err)?;
            meta
        }
    };
    finish_load(db, room, (epoch, oldest, last), key_window)
}

fn finish_load(
    db: &Database,
    room: &str,
    (epoch, oldest, last): (u64, u64, u64),
    key_window: usize,
) -> Result<RoomState, StoreError> {
    let mut recent_keys = Vec::new();
    if key_window > 0 && last >= oldest {
        let txn = db.begin_read().map_err(db_err)?;
        let messages = txn.open_table(MESSAGES).map_err(db_err)?;
        for entry in messages
            .range((room, oldest)..=(room, last))
            .map_err(db_err)?
            .rev()
        {
            let (key, value) = entry.map_err(db_err)?;
            let seq = key.value().1;
            let message = decode(room, seq, epoch, value.value())?;
            if !message.key.is_empty() {
                recent_keys.push(message);
                if recent_keys.len() >= key_window {
                    break;
                }
            }
        }
        recent_keys.reverse();
    }
    Ok(RoomState {
        epoch,
        oldest,
        last,
        recent_keys,
    })
}

fn read_range(
    db: &Database,
    room: &str,
    epoch: u64,
    from: u64,
    to: u64,
    limit: usize,
) -> Result<Vec<Arc<Message>>, StoreError> {
    let mut out = Vec::new();
    if from > to || limit == 0 {
        return Ok(out);
    }
    let txn = db.begin_read().map_err(db_err)?;
    let messages = txn.open_table(MESSAGES).map_err(db_err)?;
    for entry in messages.range((room, from)..=(room, to)).map_err(db_err)? {
        let (key, value) = entry.map_err(db_err)?;
        let seq = key.value().1;
        out.push(Arc::new(decode(room, seq, epoch, value.value())?));
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

fn write_loop(db: &Database, jobs: &mpsc::Receiver<Job>, max_batch: usize) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        let mut messages = batch[0].append.messages.len();
        while messages < max_batch {
            match jobs.try_recv() {
                Ok(job) => {
                    messages += job.append.messages.len();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        let result = commit(db, &batch);
        if let Err(err) = &result {
            tracing::error!(%err, "chat storage commit failed");
        }
        for job in batch {
            let outcome = match &result {
                Ok(()) => Ok(()),
                Err(err) => Err(StoreError::Commit(err.to_string())),
            };
            // The room may have given up waiting (shutdown): nothing to do.
            let _ = job.done.send(outcome);
        }
    }
}

fn commit(db: &Database, batch: &[Job]) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(db_err)?;
    {
        let mut messages = txn.open_table(MESSAGES).map_err(db_err)?;
        let mut rooms = txn.open_table(ROOMS).map_err(db_err)?;
        let mut buf = Vec::new();
        for Job { append, .. } in batch {
            let room: &str = &append.room;
            let previous_oldest = rooms.get(room).map_err(db_err)?.map_or(1, |v| v.value().1);
            for message in &append.messages {
                buf.clear();
                encode(message, &mut buf);
                messages
                    .insert((room, message.seq), buf.as_slice())
                    .map_err(db_err)?;
            }
            if append.oldest > previous_oldest {
                messages
                    .retain_in((room, previous_oldest)..(room, append.oldest), |_, _| false)
                    .map_err(db_err)?;
            }
            rooms
                .insert(room, (append.epoch, append.oldest, append.last))
                .map_err(db_err)?;
        }
    }
    txn.commit().map_err(db_err)?;
    Ok(())
}

/// Record layout: kind (1 byte), timestamp ms (i64 LE), sender length
/// (u32 LE), sender, key length (u32 LE), key, then the text to the end.
fn encode(message: &Message, buf: &mut Vec<u8>) {
    buf.push(message.kind.to_byte());
    buf.extend_from_slice(&message.timestamp_ms.to_le_bytes());
    for field in [&message.sender, &message.key] {
        // Names and keys are validated far below 4 GiB.
        let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(field.as_bytes());
    }
    buf.extend_from_slice(message.text.as_bytes());
}

fn decode(room: &str, seq: u64, epoch: u64, bytes: &[u8]) -> Result<Message, StoreError> {
    let corrupt = || StoreError::Corrupt {
        room: room.to_owned(),
        seq,
    };
    let (&kind, rest) = bytes.split_first().ok_or_else(corrupt)?;
    let kind = Kind::from_byte(kind).ok_or_else(corrupt)?;
    let (ts, mut rest) = rest.split_at_checked(8).ok_or_else(corrupt)?;
    let timestamp_ms = i64::from_le_bytes(ts.try_into().map_err(|_| corrupt())?);
    let mut strings = [String::new(), String::new()];
    for slot in &mut strings {
        let (len, tail) = rest.split_at_checked(4).ok_or_else(corrupt)?;
        let len = u32::from_le_bytes(len.try_into().map_err(|_| corrupt())?);
        let len = usize::try_from(len).map_err(|_| corrupt())?;
        let (value, tail) = tail.split_at_checked(len).ok_or_else(corrupt)?;
        *slot = String::from_utf8(value.to_vec()).map_err(|_| corrupt())?;
        rest = tail;
    }
    let text = String::from_utf8(rest.to_vec()).map_err(|_| corrupt())?;
    let [sender, key] = strings;
    Ok(Message {
        seq,
        epoch,
        kind,
        sender,
        text,
        key,
        timestamp_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: u64, text: &str, key: &str) -> Arc<Message> {
        Arc::new(Message {
            seq,
            epoch: 0,
            kind: Kind::Member,
            sender: "ann".into(),
            text: text.into(),
            key: key.into(),
            timestamp_ms: 1_700_000_000_000,
        })
    }

    #[test]
    fn records_round_trip_and_corruption_is_detected() {
        let m = message(3, "héllo", "k1");
        let mut buf = Vec::new();
        encode(&m, &mut buf);
        let back = decode("r", 3, 0, &buf).expect("decodes");
        assert_eq!(back, *m);
        assert!(decode("r", 3, 0, &buf[..5]).is_err());
        assert!(decode("r", 3, 0, &[9]).is_err());
    }

    #[tokio::test]
    async fn append_read_trim_and_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 64).expect("opens");
        let state = store.load_room("r", 10).await.expect("loads");
        assert_eq!((state.oldest, state.last), (1, 0));
        let epoch = state.epoch;
        assert_ne!(epoch, 0);
        let batch: Vec<_> = (1..=5).map(|s| message(s, "m", &format!("k{s}"))).collect();
        store
            .append(Append {
                room: Arc::from("r"),
                messages: batch,
                oldest: 1,
                last: 5,
                epoch,
            })
            .await
            .expect("appends");
        // Keep only the last 3.
        store
            .append(Append {
                room: Arc::from("r"),
                messages: vec![message(6, "six", "")],
                oldest: 4,
                last: 6,
                epoch,
            })
            .await
            .expect("appends");
        let read = store.read("r", epoch, 1, 10, 100).await.expect("reads");
        let seqs: Vec<u64> = read.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [4, 5, 6]);
        let limited = store.read("r", epoch, 4, 10, 2).await.expect("reads");
        assert_eq!(limited.len(), 2);
        store.close();
        drop(store);

        let store = Store::open(dir.path(), 64).expect("reopens");
        let state = store.load_room("r", 1).await.expect("loads");
        assert_eq!((state.epoch, state.oldest, state.last), (epoch, 4, 6));
        let keys: Vec<&str> = state.recent_keys.iter().map(|m| m.key.as_str()).collect();
        assert_eq!(keys, ["k5"]);
        let other = store.load_room("other", 1).await.expect("loads");
        assert_ne!(other.epoch, epoch);
    }
}
