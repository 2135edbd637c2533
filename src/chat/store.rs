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
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock, mpsc},
    thread::JoinHandle,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::{oneshot, watch};

use super::{Kind, Message};
use crate::fsx::{Access, DirHandle, OpenError};

const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
const ROOMS: TableDefinition<&str, (u64, u64, u64)> = TableDefinition::new("rooms");

/// File name of the database in the chat directory.
pub const DB_FILE: &str = "chat.redb";

/// First wait before reopening the database after a storage error; it
/// doubles on each failed attempt up to [`REOPEN_BACKOFF_MAX`].
pub const REOPEN_BACKOFF_FIRST: Duration = Duration::from_millis(100);

/// Longest wait between two attempts to reopen the database.
pub const REOPEN_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Errors of the chat storage.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The storage directory cannot be created.
    #[error("cannot create chat storage directory {path}: {cause}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause (in the message, so not a `source()`).
        cause: std::io::Error,
    },
    /// The database file is locked: another process (most likely another
    /// streamhub on the same data directory) has it open.
    #[error("the chat database is locked by another process")]
    Locked,
    /// The database failed.
    #[error("chat storage error: {0}")]
    Db(Box<redb::Error>),
    /// A stored record cannot be decoded.
    #[error("chat storage holds a corrupt record for room {room:?} seq {seq}")]
    Corrupt {
        /// The room.
        room: String,
        /// The seq.
        seq: u64,
    },
    /// The storage failed and is being reopened; nothing of the failed
    /// commit was stored.
    #[error("chat storage is unavailable: {reason}; it is being reopened, retry shortly")]
    Unavailable {
        /// Why, without paths.
        reason: String,
        /// Whether the disk (or a size limit) is full.
        full: bool,
    },
    /// The storage was closed (the server is stopping).
    #[error("chat storage is closed")]
    Closed,
    /// A blocking storage task panicked or was cancelled.
    #[error("chat storage task failed: {0}")]
    Task(String),
}

// The cause is in the message, so it is not also a `source()`.
impl From<Box<redb::Error>> for StoreError {
    fn from(err: Box<redb::Error>) -> Self {
        StoreError::Db(err)
    }
}

impl StoreError {
    /// Whether the error means the disk (or a file size limit) is full.
    pub fn is_full(&self) -> bool {
        match self {
            StoreError::Unavailable { full, .. } => *full,
            StoreError::Db(err) => is_full(err),
            _ => false,
        }
    }

    /// What went wrong, without the "chat storage is unavailable" an
    /// [`StoreError::Unavailable`] already says (for wrapping it again).
    pub fn reason(&self) -> String {
        match self {
            StoreError::Unavailable { reason, .. } => reason.clone(),
            other => other.to_string(),
        }
    }

    /// The error as it is told to clients: without paths.
    fn unavailable(&self) -> StoreError {
        match self {
            StoreError::Unavailable { reason, full } => StoreError::Unavailable {
                reason: reason.clone(),
                full: *full,
            },
            other => StoreError::Unavailable {
                reason: if other.is_full() {
                    "the disk is full".to_owned()
                } else {
                    "a storage error occurred (details in the server log)".to_owned()
                },
                full: other.is_full(),
            },
        }
    }
}

fn is_full(err: &redb::Error) -> bool {
    matches!(err, redb::Error::Io(e) if matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge
    ))
}

fn db_err(err: impl Into<redb::Error>) -> StoreError {
    StoreError::Db(Box::new(err.into()))
}

/// Whether the storage can serve, as health reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageHealth {
    /// Reads and commits work.
    Serving,
    /// A storage error occurred; the database is being reopened.
    Failed {
        /// What happened (for the log).
        reason: String,
    },
}

/// Opens the database: the production opener reads `chat.redb` in a
/// directory; tests may wrap the file in a fault-injecting backend.
pub type Opener = Arc<dyn Fn() -> Result<Database, StoreError> + Send + Sync>;

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

/// What the writer thread is asked to do.
enum Work {
    /// Commit an append.
    Append(Job),
    /// A read failed: reopen the database.
    Reopen,
}

/// The database as shared by readers and the writer: `None` while it is
/// being reopened.
struct Shared {
    db: RwLock<Option<Arc<Database>>>,
    health: watch::Sender<StorageHealth>,
}

impl Shared {
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        let current = self.db.read().unwrap_or_else(PoisonError::into_inner);
        current.clone().ok_or_else(|| {
            let reason = match &*self.health.borrow() {
                StorageHealth::Failed { reason } if reason.contains("full") => {
                    return StoreError::Unavailable {
                        reason: "the disk is full".into(),
                        full: true,
                    };
                }
                _ => "it is being reopened after a storage error".to_owned(),
            };
            StoreError::Unavailable {
                reason,
                full: false,
            }
        })
    }

    fn set_db(&self, db: Option<Arc<Database>>) {
        *self.db.write().unwrap_or_else(PoisonError::into_inner) = db;
    }
}

/// The chat storage: reads run on tokio's blocking pool, writes on one
/// writer thread with group commit. After a storage error it reopens the
/// database by itself (with backoff) and reports its health meanwhile.
pub struct Store {
    shared: Arc<Shared>,
    jobs: Mutex<Option<mpsc::Sender<Work>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    max_batch: usize,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// The production opener: `chat.redb` in `dir`, a real directory (not a
/// symbolic link), opened without following a link.
pub fn file_opener(dir: &Path) -> Result<Opener, StoreError> {
    let handle = DirHandle::create(dir).map_err(|cause| StoreError::Dir {
        path: dir.to_path_buf(),
        cause,
    })?;
    Ok(Arc::new(move || {
        let file = match handle.open_file(DB_FILE, Access::Create) {
            Ok(file) => file,
            Err(OpenError::NotRegular) => {
                tracing::error!(
                    path = %handle.display(DB_FILE).display(),
                    "the chat database is not a regular file (a link, a directory, a FIFO?)"
                );
                return Err(StoreError::Unavailable {
                    reason: "the chat database is not a regular file (details in the server log)"
                        .into(),
                    full: false,
                });
            }
            Err(e) => return Err(db_err(io::Error::from(e))),
        };
        redb::Builder::new()
            .create_file(file)
            .map_err(|err| match err {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked,
                other => db_err(other),
            })
    }))
}

fn open_db(opener: &Opener) -> Result<Database, StoreError> {
    let db = opener()?;
    let txn = db.begin_write().map_err(db_err)?;
    txn.open_table(MESSAGES).map_err(db_err)?;
    txn.open_table(ROOMS).map_err(db_err)?;
    txn.commit().map_err(db_err)?;
    Ok(db)
}

impl Store {
    /// Opens (or creates) the storage in `dir`; a commit holds at most
    /// `max_batch` messages' worth of appends (roughly).
    pub fn open(dir: &Path, max_batch: usize) -> Result<Self, StoreError> {
        Self::open_with(file_opener(dir)?, max_batch)
    }

    /// Opens the storage with `opener`, which is called again to reopen
    /// the database after a storage error.
    pub fn open_with(opener: Opener, max_batch: usize) -> Result<Self, StoreError> {
        let db = Arc::new(open_db(&opener)?);
        let (health, _) = watch::channel(StorageHealth::Serving);
        let shared = Arc::new(Shared {
            db: RwLock::new(Some(db)),
            health,
        });
        let (tx, rx) = mpsc::channel();
        let writer_shared = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("chat-store-writer".into())
            .spawn(move || write_loop(&writer_shared, &opener, &rx, max_batch))
            .map_err(|e| StoreError::Task(e.to_string()))?;
        Ok(Self {
            shared,
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            max_batch,
        })
    }

    /// Whether the storage can serve; changes when a storage error occurs
    /// and when the database has been reopened.
    pub fn health(&self) -> watch::Receiver<StorageHealth> {
        self.shared.health.subscribe()
    }

    /// Asks the writer to reopen the database after a read failed with a
    /// database error.
    fn read_failed(&self, err: &StoreError) {
        if !matches!(err, StoreError::Db(_)) {
            return;
        }
        tracing::error!(%err, "chat storage read failed; reopening the database");
        self.shared.health.send_if_modified(|health| {
            let changed = *health == StorageHealth::Serving;
            *health = StorageHealth::Failed {
                reason: err.to_string(),
            };
            changed
        });
        if let Some(jobs) = self
            .jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            let _ = jobs.send(Work::Reopen);
        }
    }

    async fn reading<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let db = self.shared.db()?;
        let result = tokio::task::spawn_blocking(move || work(&db))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?;
        result.map_err(|err| {
            self.read_failed(&err);
            match err {
                StoreError::Db(_) => err.unavailable(),
                other => other,
            }
        })
    }

    /// Loads `room`, creating it (with a fresh epoch, durably) if it has
    /// never been seen; remembers the last `key_window` keyed messages.
    pub async fn load_room(&self, room: &str, key_window: usize) -> Result<RoomState, StoreError> {
        let room = room.to_owned();
        self.reading(move |db| load_room(db, &room, key_window))
            .await
    }

    /// Durably stores `append`; returns once it is committed.
    pub async fn append(&self, append: Append) -> Result<(), StoreError> {
        let (done, committed) = oneshot::channel();
        {
            let jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
            let sender = jobs.as_ref().ok_or(StoreError::Closed)?;
            sender
                .send(Work::Append(Job { append, done }))
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
        let room = room.to_owned();
        self.reading(move |db| read_range(db, &room, epoch, from, to, limit))
            .await
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
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(writer) = writer
            && writer.join().is_err()
        {
            tracing::error!("chat storage writer panicked");
        }
        self.shared.set_db(None);
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
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

fn write_loop(shared: &Shared, opener: &Opener, jobs: &mpsc::Receiver<Work>, max_batch: usize) {
    loop {
        if *shared.health.borrow() != StorageHealth::Serving && !reopen(shared, opener, jobs) {
            return;
        }
        let first = match jobs.recv() {
            Ok(Work::Append(job)) => job,
            Ok(Work::Reopen) => continue,
            Err(_) => return,
        };
        let mut batch = vec![first];
        let mut messages = batch[0].append.messages.len();
        let mut reopen_asked = false;
        while messages < max_batch {
            match jobs.try_recv() {
                Ok(Work::Append(job)) => {
                    messages += job.append.messages.len();
                    batch.push(job);
                }
                Ok(Work::Reopen) => reopen_asked = true,
                Err(_) => break,
            }
        }
        let result = shared.db().and_then(|db| commit(&db, &batch));
        if let Err(err) = &result {
            tracing::error!(%err, "chat storage commit failed; reopening the database");
            // From now on nobody uses the failed handle.
            shared.set_db(None);
            let reason = if err.is_full() {
                format!("the disk is full ({err})")
            } else {
                err.to_string()
            };
            shared.health.send_replace(StorageHealth::Failed { reason });
        } else if reopen_asked {
            // A read failed but this commit worked: nothing to repair.
            shared.health.send_if_modified(|health| {
                let changed = *health != StorageHealth::Serving;
                *health = StorageHealth::Serving;
                changed
            });
        }
        for job in batch {
            let outcome = match &result {
                Ok(()) => Ok(()),
                Err(err) => Err(err.unavailable()),
            };
            // The room may have given up waiting (shutdown): nothing to do.
            let _ = job.done.send(outcome);
        }
    }
}

/// Reopens the database with backoff, refusing appends meanwhile; false
/// if the store was closed first.
fn reopen(shared: &Shared, opener: &Opener, jobs: &mpsc::Receiver<Work>) -> bool {
    // redb refuses every call after an I/O error until the database is
    // closed and opened again; readers holding the old handle finish with
    // it and new ones wait for the new one.
    shared.set_db(None);
    let mut backoff = REOPEN_BACKOFF_FIRST;
    let mut attempts = 0u32;
    loop {
        // Refuse what arrives while waiting, so rooms never hang on a
        // broken disk.
        let deadline = std::time::Instant::now() + backoff;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            match jobs.recv_timeout(left) {
                Ok(Work::Append(job)) => {
                    let _ = job
                        .done
                        .send(Err(shared.db().err().unwrap_or(StoreError::Closed)));
                }
                Ok(Work::Reopen) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
        attempts += 1;
        match open_db(opener) {
            Ok(db) => {
                shared.set_db(Some(Arc::new(db)));
                shared.health.send_replace(StorageHealth::Serving);
                tracing::info!(attempts, "chat storage reopened; serving again");
                return true;
            }
            Err(err) => {
                // Log the first failures, then every tenth.
                if attempts <= 3 || attempts.is_multiple_of(10) {
                    tracing::warn!(%err, attempts, retry_in = ?backoff, "chat storage cannot be reopened yet");
                }
                if err.is_full() {
                    shared.health.send_if_modified(|health| {
                        let reason = format!("the disk is full ({err})");
                        let changed =
                            !matches!(health, StorageHealth::Failed { reason: r } if *r == reason);
                        *health = StorageHealth::Failed { reason };
                        changed
                    });
                }
            }
        }
        backoff = (backoff * 2).min(REOPEN_BACKOFF_MAX);
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
        encoding: Default::default(),
    })
}

/// A storage backend that fails on demand, for tests of the recovery path.
#[cfg(test)]
pub(crate) mod faulty {
    use std::{
        fs::OpenOptions,
        io,
        path::Path,
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
    };

    use redb::{StorageBackend, backends::FileBackend};

    use super::{Opener, db_err};

    /// Every write, resize and sync fails with "storage full" while `fail`
    /// is set, like a full disk.
    #[derive(Debug)]
    struct Faulty {
        inner: FileBackend,
        fail: Arc<AtomicBool>,
    }

    impl Faulty {
        fn check(&self) -> io::Result<()> {
            if self.fail.load(Ordering::SeqCst) {
                Err(io::ErrorKind::StorageFull.into())
            } else {
                Ok(())
            }
        }
    }

    impl StorageBackend for Faulty {
        fn len(&self) -> io::Result<u64> {
            self.inner.len()
        }

        fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
            self.inner.read(offset, len)
        }

        fn set_len(&self, len: u64) -> io::Result<()> {
            self.check()?;
            self.inner.set_len(len)
        }

        fn sync_data(&self, eventual: bool) -> io::Result<()> {
            self.check()?;
            self.inner.sync_data(eventual)
        }

        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.check()?;
            self.inner.write(offset, data)
        }
    }

    /// An opener of `dir/chat.redb` whose disk is "full" while the returned
    /// switch is on.
    pub(crate) fn opener(dir: &Path) -> (Opener, Arc<AtomicBool>) {
        let path = dir.join(super::DB_FILE);
        let fail = Arc::new(AtomicBool::new(false));
        let switch = Arc::clone(&fail);
        let opener: Opener = Arc::new(move || {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(db_err)?;
            let backend = Faulty {
                inner: FileBackend::new(file).map_err(db_err)?,
                fail: Arc::clone(&fail),
            };
            redb::Builder::new()
                .create_with_backend(backend)
                .map_err(db_err)
        });
        (opener, switch)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_unavailable_store_wrapped_again_says_its_reason_once() {
        let inner = StoreError::Unavailable {
            reason: "the disk is full".into(),
            full: true,
        };
        let outer = StoreError::Unavailable {
            reason: inner.reason(),
            full: inner.is_full(),
        };
        let text = outer.to_string();
        assert_eq!(
            text.matches("chat storage is unavailable").count(),
            1,
            "{text}"
        );
        assert_eq!(text.matches("being reopened").count(), 1, "{text}");
    }

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
            encoding: Default::default(),
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

    #[tokio::test]
    async fn a_full_disk_is_recovered_from_without_losing_what_was_committed() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().expect("tempdir");
        let (opener, full) = faulty::opener(dir.path());
        let store = Store::open_with(opener, 64).expect("opens");
        let mut health = store.health();
        let epoch = store.load_room("r", 10).await.expect("loads").epoch;
        let append = |seqs: std::ops::RangeInclusive<u64>| Append {
            room: Arc::from("r"),
            messages: seqs.clone().map(|s| message(s, "m", "")).collect(),
            oldest: 1,
            last: *seqs.end(),
            epoch,
        };
        store.append(append(1..=3)).await.expect("appends");

        full.store(true, Ordering::SeqCst);
        let err = store.append(append(4..=4)).await.expect_err("disk full");
        assert!(err.is_full(), "{err}");
        assert!(
            !err.to_string()
                .contains(dir.path().to_str().expect("utf-8"))
        );
        tokio::time::timeout(
            Duration::from_secs(10),
            health.wait_for(|h| matches!(h, StorageHealth::Failed { .. })),
        )
        .await
        .expect("in time")
        .expect("health");
        // Meanwhile every call fails at once; none hangs.
        let err = store.append(append(4..=4)).await.expect_err("still full");
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
        assert!(store.read("r", epoch, 1, 10, 10).await.is_err());

        full.store(false, Ordering::SeqCst);
        tokio::time::timeout(
            Duration::from_secs(20),
            health.wait_for(|h| *h == StorageHealth::Serving),
        )
        .await
        .expect("recovers in time")
        .expect("health");
        let seqs = |read: Vec<Arc<Message>>| read.iter().map(|m| m.seq).collect::<Vec<_>>();
        let read = store.read("r", epoch, 1, 10, 10).await.expect("reads");
        assert_eq!(seqs(read), [1, 2, 3]);
        store.append(append(4..=4)).await.expect("appends again");
        let read = store.read("r", epoch, 1, 10, 10).await.expect("reads");
        assert_eq!(seqs(read), [1, 2, 3, 4]);
    }

    #[test]
    fn a_database_that_is_a_link_is_never_opened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let target = outside.path().join("other.redb");
        std::fs::write(&target, b"not yours").expect("write");
        std::os::unix::fs::symlink(&target, dir.path().join(DB_FILE)).expect("symlink");
        let err = Store::open(dir.path(), 64).expect_err("refused");
        assert!(err.to_string().contains("not a regular file"), "{err}");
        assert_eq!(std::fs::read(&target).expect("read"), b"not yours");
    }

    /// New-user finding 5: a second opener of one directory is told the
    /// database is locked, in one sentence without redb's text.
    #[test]
    fn a_database_open_elsewhere_is_locked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = Store::open(dir.path(), 64).expect("opens");
        let err = Store::open(dir.path(), 64).expect_err("refused");
        assert!(matches!(err, StoreError::Locked), "{err:?}");
    }
}
