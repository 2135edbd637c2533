//! The disk side of uploads: no gRPC types here.
//!
//! Layout under `<data-dir>/uploads/`:
//! - `<name>`: stored files. Nothing appears here except by an atomic
//!   rename of a complete, fsynced, hash-checked file.
//! - `.streamhub/partial/<name>`: the bytes of an unfinished upload, at
//!   most one per name, kept for a resume until they expire.
//! - `.streamhub/meta/<name>`: the SHA-256 of a stored file, with the size,
//!   inode and modification time it was computed for (a stale or missing
//!   record is recomputed, so it is a cache, never the truth).
//! - `.streamhub/tmp/`: scratch files for atomic writes of those records.
//!
//! Every one of those directories is held open from startup and every file
//! is reached relative to it without following symbolic links
//! ([`crate::fsx`]); anything that is not a regular file is treated as
//! absent for reads and refused for writes.
//!
//! A *lease* (in memory) marks a name as being written by one call; a
//! second call for the same name is refused with [`UploadError::Busy`], so
//! two uploads of one name never mix, unless the holder has received no
//! chunk for `takeover_after`: then the newcomer ends it (its bytes kept)
//! and takes the name over. The lease travels with the open file and is
//! released only once the last write has finished and the file is closed,
//! so a resume never races with bytes still being written.
//! In cluster mode, where several servers share one upload directory, a
//! [`SharedLeases`] implementation (`crate::cluster::lease`) adds a lease
//! every server sees, taken after this process's own. Every write and the
//! publish first ask it whether it is still held ([`HeldLease::holds`]);
//! once it is not, nothing more is written and the partial is neither
//! published nor removed ([`UploadError::LeaseLost`]).
//!
//! No call holds a thread: chunks go in batches ([`WRITE_BATCH`]) to one
//! blocking task per batch (hash, `write_all`), which takes the file and
//! hasher and hands them back. One batch is written while the next is
//! gathered, so memory per upload stays at about two batches. All blocking
//! file work of uploads and downloads shares one semaphore
//! (`upload.max_blocking_io`), so look-ups and chat storage always find a
//! free blocking thread. Nothing is fsynced until the upload completes;
//! after a process crash the partial file's length is still exactly what
//! was written, so it is a correct resume point.

use std::{
    collections::HashMap,
    fs::{File, Metadata},
    io::{self, Read, Seek, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::OnceLock,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures::future::BoxFuture;
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{
    Digest, RESERVED_NAME, UploadError,
    limits::{CallLimit, CallSlot},
    validate_name,
};
use crate::{
    config::UploadConfig,
    fsx::{Access, DirHandle, OpenError},
};

/// Chunks are handed to a blocking write in batches of about this many
/// bytes: one hand-off per batch instead of per chunk (the receiving task
/// and the writes share one core under load).
pub const WRITE_BATCH: usize = 1024 * 1024;

/// Held bytes re-read per blocking step when a resume rebuilds the
/// SHA-256 state.
const REHASH_STEP: u64 = 64 * 1024 * 1024;

const READ_BUF: usize = 1024 * 1024;

/// Longest a metadata record may be.
const META_MAX: u64 = 256;

/// A call that ends this close to its deadline is taken to have ended
/// because of it (the client's clock started earlier than the server's).
const DEADLINE_SLACK: Duration = Duration::from_millis(200);

/// How long a new call waits for a quiet holder it has told to stop.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

/// A stored (complete) file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFile {
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256.
    pub sha256: Digest,
    /// Unix ms of its last modification (when its upload completed).
    pub modified_ms: u64,
}

/// What the server holds of one upload name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadStatus {
    /// Bytes of an unfinished upload held: the offset to resume from.
    pub held: u64,
    /// Whether a live call is writing it right now (one that has been
    /// quiet for `takeover_after` does not count: a new call may take it
    /// over).
    pub in_progress: bool,
    /// When the held bytes expire, if any are held.
    pub expires_at: Option<SystemTime>,
    /// Size of the stored file of that name, if there is one.
    pub stored_size: Option<u64>,
}

/// An unfinished upload the server holds bytes of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialUpload {
    /// Its name.
    pub name: String,
    /// Bytes held on disk: the offset a resume starts from.
    pub held: u64,
    /// Whether a call is writing it right now.
    pub in_progress: bool,
    /// When the held bytes expire.
    pub expires_at: Option<SystemTime>,
}

/// The call holding a name: when it last received a chunk, and how to
/// tell it to stop.
#[derive(Debug)]
pub struct Holder {
    id: u64,
    /// Milliseconds since the store's `epoch` of the last chunk received.
    last_active_ms: AtomicU64,
    /// Cancelled when a new call takes the name over.
    takeover: CancellationToken,
    /// Cancelled when the lease is released.
    released: CancellationToken,
}

#[derive(Debug, Default)]
struct State {
    /// Names being written, with their holders.
    leases: HashMap<String, Arc<Holder>>,
    next_lease: u64,
    /// Bytes counted against the quota for each unfinished upload.
    partials: HashMap<String, u64>,
    /// Bytes of stored files plus unfinished uploads.
    used: u64,
}

impl State {
    fn set_partial(&mut self, name: &str, bytes: u64) {
        let old = self.partials.insert(name.to_owned(), bytes).unwrap_or(0);
        self.used = self.used.saturating_sub(old).saturating_add(bytes);
    }

    fn drop_partial(&mut self, name: &str) {
        if let Some(old) = self.partials.remove(name) {
            self.used = self.used.saturating_sub(old);
        }
    }
}

/// Leases on upload names held outside this process: in cluster mode, one
/// writer per name across every server sharing the upload directory. The
/// store takes one after its own in-memory lease, and drops it with that.
pub trait SharedLeases: Send + Sync + std::fmt::Debug + 'static {
    /// Takes the lease on `name`: [`UploadError::Busy`] if another server
    /// holds it, [`UploadError::Unavailable`] if the leases cannot be
    /// reached. The lease is released when the returned value is dropped.
    fn acquire(&self, name: &str) -> BoxFuture<'_, Result<SharedLease, UploadError>>;

    /// Whether some server holds the lease on `name`.
    fn held(&self, name: &str) -> BoxFuture<'_, Result<bool, UploadError>>;
}

/// A held [`SharedLeases`] lease; dropping it releases it.
pub type SharedLease = Box<dyn HeldLease>;

/// What a writer asks a held shared lease before every write and before
/// publishing.
pub trait HeldLease: std::fmt::Debug + Send + Sync {
    /// Whether this server can be sure it still holds the lease: false
    /// once a renewal found another revision, or once the local deadline
    /// (last successful renewal + the lease's lifetime, less a margin) has
    /// passed. Cheap and non-blocking: it is called on blocking threads
    /// right before each write.
    fn holds(&self) -> bool;
}

/// The upload store of one data directory.
#[derive(Debug)]
pub struct Store {
    shared: OnceLock<Arc<dyn SharedLeases>>,
    uploads: DirHandle,
    partial_dir: DirHandle,
    meta_dir: DirHandle,
    tmp_dir: DirHandle,
    config: UploadConfig,
    state: Mutex<State>,
    tmp_counter: AtomicU64,
    /// Bounds the blocking file work of uploads and downloads.
    io: Arc<Semaphore>,
    epoch: Instant,
    upload_calls: Arc<CallLimit>,
    download_calls: Arc<CallLimit>,
}

fn io_err(action: &'static str, path: PathBuf) -> impl FnOnce(io::Error) -> UploadError {
    move |cause| UploadError::Io {
        action,
        path,
        cause,
    }
}

/// Runs short blocking file work (look-ups) off the async threads.
async fn blocking<T, F>(work: F) -> Result<T, UploadError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, UploadError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| UploadError::Internal(format!("file task failed: {e}")))?
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What a metadata record is checked against: size, inode, mtime (ns).
fn fingerprint(md: &Metadata) -> String {
    let mtime = md
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{} {} {mtime}", md.len(), md.ino())
}

fn hash_open_file(file: &mut File, path: &Path) -> Result<Digest, UploadError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0; READ_BUF];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(io_err("read", path.to_path_buf()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().into())
}

/// Why a name could not be leased at once.
enum Taken {
    /// A live call holds it.
    Busy,
    /// The holder has been quiet for `takeover_after`.
    Stale(Arc<Holder>),
}

impl Store {
    /// Opens (creating as needed) the store under `upload.dir` (default
    /// `<data_dir>/uploads`), counts what it holds, and discards expired
    /// unfinished uploads.
    /// `uploads` and the server's own folders in it must be real
    /// directories, not symbolic links.
    pub fn open(data_dir: &Path, config: UploadConfig) -> Result<Arc<Self>, UploadError> {
        let path = config
            .dir
            .clone()
            .unwrap_or_else(|| data_dir.join("uploads"));
        let uploads =
            DirHandle::create(&path).map_err(io_err("open the uploads directory", path))?;
        let own = uploads.subdir(RESERVED_NAME).map_err(io_err(
            "open the server's upload state directory",
            uploads.display(RESERVED_NAME),
        ))?;
        let sub = |name: &str| {
            own.subdir(name)
                .map_err(io_err("open directory", own.display(name)))
        };
        let store = Self {
            shared: OnceLock::new(),
            partial_dir: sub("partial")?,
            meta_dir: sub("meta")?,
            tmp_dir: sub("tmp")?,
            io: Arc::new(Semaphore::new(config.max_blocking_io)),
            epoch: Instant::now(),
            upload_calls: CallLimit::new(
                "uploads",
                config.max_concurrent_uploads,
                config.max_uploads_per_connection,
            ),
            download_calls: CallLimit::new(
                "downloads",
                config.max_concurrent_downloads,
                config.max_downloads_per_connection,
            ),
            uploads,
            config,
            state: Mutex::new(State::default()),
            tmp_counter: AtomicU64::new(0),
        };
        // Scratch files of a previous run are garbage.
        let listing = |dir: &DirHandle| {
            dir.entries()
                .map_err(io_err("list directory", dir.path().to_path_buf()))
        };
        for (name, _) in listing(&store.tmp_dir)? {
            let _ = store.tmp_dir.remove(&name);
        }
        let mut used = 0u64;
        for (name, regular) in listing(&store.uploads)? {
            if regular
                && validate_name(&name).is_ok()
                && let Ok(Some(md)) = store.uploads.stat_regular(&name)
            {
                used += md.len();
            }
        }
        {
            let partials = listing(&store.partial_dir)?;
            let mut state = store.state();
            state.used = used;
            for (name, regular) in partials {
                if regular && let Ok(Some(md)) = store.partial_dir.stat_regular(&name) {
                    state.set_partial(&name, md.len());
                }
            }
        }
        let store = Arc::new(store);
        let expired = store.sweep_expired();
        if expired > 0 {
            tracing::info!(expired, "discarded expired unfinished uploads");
        }
        Ok(store)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The configuration in force.
    pub fn config(&self) -> &UploadConfig {
        &self.config
    }

    /// Bytes used by stored files and unfinished uploads together.
    pub fn used(&self) -> u64 {
        self.state().used
    }

    /// A slot for one Upload call from connection `peer`, or
    /// [`UploadError::TooManyCalls`] beyond `upload.max_concurrent_uploads`
    /// or `upload.max_uploads_per_connection`.
    pub fn upload_slot(&self, peer: &str) -> Result<CallSlot, UploadError> {
        self.upload_calls.acquire(peer)
    }

    /// A slot for one Download call from connection `peer`, or
    /// [`UploadError::TooManyCalls`] beyond the download caps.
    pub fn download_slot(&self, peer: &str) -> Result<CallSlot, UploadError> {
        self.download_calls.acquire(peer)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn quiet_for(&self, holder: &Holder) -> Duration {
        Duration::from_millis(
            self.now_ms()
                .saturating_sub(holder.last_active_ms.load(Ordering::Relaxed)),
        )
    }

    /// Adds leases shared with other servers (cluster mode); set once,
    /// before the store is used. Returns false if some were set already.
    pub fn set_shared_leases(&self, leases: Arc<dyn SharedLeases>) -> bool {
        self.shared.set(leases).is_ok()
    }

    fn lease(self: &Arc<Self>, name: &str) -> Result<Lease, Taken> {
        let mut state = self.state();
        if let Some(holder) = state.leases.get(name) {
            if self.quiet_for(holder) >= self.config.takeover_after {
                return Err(Taken::Stale(Arc::clone(holder)));
            }
            return Err(Taken::Busy);
        }
        state.next_lease += 1;
        let holder = Arc::new(Holder {
            id: state.next_lease,
            last_active_ms: AtomicU64::new(self.now_ms()),
            takeover: CancellationToken::new(),
            released: CancellationToken::new(),
        });
        state.leases.insert(name.to_owned(), Arc::clone(&holder));
        Ok(Lease {
            store: Arc::clone(self),
            name: name.to_owned(),
            holder,
            shared: None,
        })
    }

    /// Leases `name`, taking it over from a holder that has been quiet for
    /// `takeover_after` (that call ends, keeping its bytes).
    async fn acquire(self: &Arc<Self>, name: &str) -> Result<Lease, UploadError> {
        let busy = || UploadError::Busy {
            upload: name.to_owned(),
        };
        for _ in 0..3 {
            match self.lease(name) {
                Ok(mut lease) => {
                    // This process's lease first, then the one every
                    // server of a cluster sees.
                    if let Some(shared) = self.shared.get() {
                        lease.shared = Some(shared.acquire(name).await?);
                    }
                    return Ok(lease);
                }
                Err(Taken::Busy) => return Err(busy()),
                Err(Taken::Stale(holder)) => {
                    tracing::info!(
                        upload = %name,
                        quiet_ms = u64::try_from(self.quiet_for(&holder).as_millis()).unwrap_or(u64::MAX),
                        "a new call takes over upload {name} from a call that went quiet"
                    );
                    holder.takeover.cancel();
                    if tokio::time::timeout(TAKEOVER_WAIT, holder.released.cancelled())
                        .await
                        .is_err()
                    {
                        return Err(busy());
                    }
                }
            }
        }
        Err(busy())
    }

    /// Runs blocking file work of an upload or download, at most
    /// `upload.max_blocking_io` at once.
    async fn io_blocking<T, F>(&self, work: F) -> Result<T, UploadError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let permit = Arc::clone(&self.io)
            .acquire_owned()
            .await
            .map_err(|_| UploadError::Internal("the file work limiter is closed".into()))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .map_err(|e| UploadError::Internal(format!("file task failed: {e}")))
    }

    /// Starts writing upload `name`: afresh when `offset` is 0 (discarding
    /// any held bytes), else resuming, which needs `offset` to equal the
    /// bytes held. A resume re-reads the held bytes once to restore the
    /// SHA-256 state, in steps of 64 MiB.
    pub async fn begin(self: &Arc<Self>, name: &str, offset: u64) -> Result<Upload, UploadError> {
        validate_name(name)?;
        let lease = self.acquire(name).await?;
        let holder = Arc::clone(&lease.holder);
        let store = Arc::clone(self);
        let mut writer = self
            .io_blocking(move || store.open_partial(lease, offset))
            .await??;
        while writer.written < offset {
            writer = self
                .io_blocking(move || {
                    let mut writer = writer;
                    writer.rehash_step(offset).map(|()| writer)
                })
                .await??;
        }
        Ok(Upload {
            store: Arc::clone(self),
            name: name.to_owned(),
            start: offset,
            position: offset,
            chunk: 0,
            peer: String::new(),
            pending: Vec::new(),
            pending_len: 0,
            slot: Slot::Idle(writer),
            holder,
            deadline: None,
            settled: false,
        })
    }

    /// Opens the partial file of the leased name: created empty when
    /// `offset` is 0, else checked to hold `offset` bytes. The SHA-256
    /// state of a resume is rebuilt afterwards by [`Writer::rehash_step`].
    fn open_partial(&self, lease: Lease, offset: u64) -> Result<Box<Writer>, UploadError> {
        let name = lease.name.clone();
        let bad_state = |what: &str| {
            tracing::error!(
                upload = %name,
                path = %self.partial_dir.display(&name).display(),
                "the held bytes of an upload are {what}; remove it to use the name again"
            );
            UploadError::BadState {
                upload: name.clone(),
            }
        };
        match self.uploads.stat(&name) {
            Ok(Some(md)) if !md.is_file() => {
                tracing::warn!(
                    upload = %name,
                    path = %self.uploads.display(&name).display(),
                    "an upload's name is taken by something that is not a stored file"
                );
                return Err(UploadError::NotAFile { upload: name });
            }
            Ok(_) => {}
            Err(e) => return Err(io_err("stat", self.uploads.display(&name))(e)),
        }
        if offset == 0 {
            let file = match self.partial_dir.open_file(&name, Access::CreateTruncate) {
                Ok(file) => file,
                Err(OpenError::NotRegular) => return Err(bad_state("not a regular file")),
                Err(e) => return Err(io_err("create", self.partial_dir.display(&name))(e.into())),
            };
            self.state().set_partial(&name, 0);
            return Ok(Box::new(Writer::new(file, lease)));
        }
        let file = match self.partial_dir.open_file(&name, Access::ReadWrite) {
            Ok(file) => file,
            Err(OpenError::NotFound) => {
                return Err(UploadError::ResumeOffset {
                    upload: name,
                    offset,
                    held: 0,
                });
            }
            Err(OpenError::NotRegular) => return Err(bad_state("not a regular file")),
            Err(e) => return Err(io_err("open", self.partial_dir.display(&name))(e.into())),
        };
        let held = file
            .metadata()
            .map_err(io_err("stat", self.partial_dir.display(&name)))?
            .len();
        if held != offset {
            return Err(UploadError::ResumeOffset {
                upload: name,
                offset,
                held,
            });
        }
        // Restart the expiry clock: the upload is alive.
        let _ = file.set_modified(SystemTime::now());
        self.state().set_partial(&name, held);
        Ok(Box::new(Writer::new(file, lease)))
    }

    /// What the server holds of upload `name`. Only regular files count:
    /// a link or anything else in their place reveals nothing.
    pub async fn status(self: &Arc<Self>, name: &str) -> Result<UploadStatus, UploadError> {
        validate_name(name)?;
        let elsewhere = match self.shared.get() {
            Some(shared) => shared.held(name).await?,
            None => false,
        };
        let store = Arc::clone(self);
        let name = name.to_owned();
        blocking(move || {
            let in_progress = store
                .state()
                .leases
                .get(&name)
                .is_some_and(|holder| store.quiet_for(holder) < store.config.takeover_after);
            let mut status = UploadStatus {
                in_progress: elsewhere || in_progress,
                ..UploadStatus::default()
            };
            let partial = store
                .partial_dir
                .stat_regular(&name)
                .map_err(io_err("stat", store.partial_dir.display(&name)))?;
            if let Some(md) = partial {
                status.held = md.len();
                status.expires_at = md.modified().ok().map(|t| t + store.config.partial_ttl);
            }
            status.stored_size = store
                .uploads
                .stat_regular(&name)
                .map_err(io_err("stat", store.uploads.display(&name)))?
                .map(|md| md.len());
            Ok(status)
        })
        .await
    }

    /// Every unfinished upload the server holds bytes of, by name. Only
    /// regular files count (links and the like are skipped).
    pub async fn partials(self: &Arc<Self>) -> Result<Vec<PartialUpload>, UploadError> {
        let store = Arc::clone(self);
        blocking(move || {
            let dir = &store.partial_dir;
            let entries = dir
                .entries()
                .map_err(io_err("list directory", dir.path().to_path_buf()))?;
            let mut partials = Vec::new();
            for (name, regular) in entries {
                if !regular || validate_name(&name).is_err() {
                    continue;
                }
                // Removed (completed, cancelled, expired) while listing:
                // skip it.
                let Ok(Some(md)) = dir.stat_regular(&name) else {
                    continue;
                };
                let in_progress =
                    store.state().leases.get(&name).is_some_and(|holder| {
                        store.quiet_for(holder) < store.config.takeover_after
                    });
                partials.push(PartialUpload {
                    in_progress,
                    held: md.len(),
                    expires_at: md.modified().ok().map(|t| t + store.config.partial_ttl),
                    name,
                });
            }
            partials.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(partials)
        })
        .await
    }

    /// Discards the held bytes of upload `name`; returns how many there
    /// were. Refused while a live call is writing it (a quiet one is taken
    /// over).
    pub async fn cancel(self: &Arc<Self>, name: &str) -> Result<u64, UploadError> {
        validate_name(name)?;
        let lease = self.acquire(name).await?;
        let store = Arc::clone(self);
        blocking(move || {
            let held = match store.partial_dir.stat_regular(&lease.name) {
                Ok(Some(md)) => md.len(),
                Ok(None) => return Ok(0),
                Err(e) => return Err(io_err("stat", store.partial_dir.display(&lease.name))(e)),
            };
            store.remove_partial(&lease.name)?;
            Ok(held)
        })
        .await
    }

    fn remove_partial(&self, name: &str) -> Result<(), UploadError> {
        self.partial_dir
            .remove(name)
            .map_err(io_err("remove", self.partial_dir.display(name)))?;
        self.state().drop_partial(name);
        Ok(())
    }

    /// Discards unfinished uploads whose last write is older than the
    /// configured time to live, unless a call is writing them. Returns how
    /// many were discarded.
    pub fn sweep_expired(&self) -> usize {
        let Ok(entries) = self.partial_dir.entries() else {
            return 0;
        };
        let now = SystemTime::now();
        let mut expired = 0;
        for (name, regular) in entries {
            if !regular {
                continue;
            }
            let Ok(Some(modified)) = self
                .partial_dir
                .stat_regular(&name)
                .map(|md| md.and_then(|md| md.modified().ok()))
            else {
                continue;
            };
            if modified + self.config.partial_ttl > now {
                continue;
            }
            // Holding the state lock across the check and the removal keeps
            // a resume from starting in between.
            let mut state = self.state();
            if state.leases.contains_key(&name) {
                continue;
            }
            if self.partial_dir.remove(&name).is_ok() {
                state.drop_partial(&name);
                expired += 1;
                tracing::info!(upload = %name, "unfinished upload expired; its bytes were discarded");
            }
        }
        expired
    }

    /// Sweeps expired unfinished uploads every `sweep_interval` until
    /// `token` is cancelled.
    pub async fn sweep_periodically(self: Arc<Self>, token: CancellationToken) {
        let mut ticks = tokio::time::interval(self.config.sweep_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await; // the first tick is immediate; open() swept already
        loop {
            tokio::select! {
                () = token.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let store = Arc::clone(&self);
            if let Err(err) = tokio::task::spawn_blocking(move || store.sweep_expired()).await {
                tracing::warn!(%err, "sweep of expired uploads failed");
            }
        }
    }

    /// The stored files, by name, with their digests (computed and
    /// recorded for files that have no valid record). Only regular files
    /// are listed: links, directories, FIFOs and the like are skipped.
    pub async fn list(self: &Arc<Self>) -> Result<Vec<StoredFile>, UploadError> {
        let store = Arc::clone(self);
        blocking(move || {
            let mut files = Vec::new();
            let entries = store
                .uploads
                .entries()
                .map_err(io_err("list directory", store.uploads.path().to_path_buf()))?;
            for (name, regular) in entries {
                if !regular || validate_name(&name).is_err() {
                    continue;
                }
                if let Some(file) = store.describe(&name)? {
                    files.push(file);
                }
            }
            files.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(files)
        })
        .await
    }

    /// Describes stored file `name`, if it is a regular file.
    fn describe(&self, name: &str) -> Result<Option<StoredFile>, UploadError> {
        let mut file = match self.uploads.open_file(name, Access::Read) {
            Ok(file) => file,
            // Replaced, removed or not a file: skip it.
            Err(OpenError::NotFound | OpenError::NotRegular) => return Ok(None),
            Err(e) => return Err(io_err("open", self.uploads.display(name))(e.into())),
        };
        let path = self.uploads.display(name);
        let md = file.metadata().map_err(io_err("stat", path.clone()))?;
        let sha256 = match self.read_meta(name, &md) {
            Some(digest) => digest,
            None => {
                let digest = hash_open_file(&mut file, &path)?;
                // Record it only if the file did not change while hashing.
                if let Ok(now) = file.metadata()
                    && fingerprint(&now) == fingerprint(&md)
                {
                    self.write_meta(name, &md, &digest);
                }
                digest
            }
        };
        Ok(Some(StoredFile {
            name: name.to_owned(),
            size: md.len(),
            sha256,
            modified_ms: md.modified().map_or(0, unix_ms),
        }))
    }

    fn read_meta(&self, name: &str, md: &Metadata) -> Option<Digest> {
        let file = self.meta_dir.open_file(name, Access::Read).ok()?;
        let mut text = String::new();
        file.take(META_MAX).read_to_string(&mut text).ok()?;
        let (hex_digest, print) = text.trim_end().split_once(' ')?;
        if print != fingerprint(md) {
            return None;
        }
        let mut digest = [0u8; 32];
        hex::decode_to_slice(hex_digest, &mut digest).ok()?;
        Some(digest)
    }

    /// Records the digest of stored file `name` (best effort: a missing
    /// record only costs a re-hash).
    fn write_meta(&self, name: &str, md: &Metadata, digest: &Digest) {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = format!("meta-{}-{n}", std::process::id());
        let text = format!("{} {}\n", hex::encode(digest), fingerprint(md));
        let result = self
            .tmp_dir
            .open_file(&tmp, Access::CreateNew)
            .map_err(io::Error::from)
            .and_then(|mut file| file.write_all(text.as_bytes()))
            .and_then(|()| self.tmp_dir.rename(&tmp, &self.meta_dir, name));
        if let Err(err) = result {
            let _ = self.tmp_dir.remove(&tmp);
            tracing::warn!(upload = %name, %err, "cannot record the digest of a stored file");
        }
    }

    /// Opens stored file `name` for reading. The open file stays the same
    /// even if a new upload replaces the name meanwhile. Anything but a
    /// regular file (a link, a directory, a FIFO) is [`UploadError::NotFound`].
    pub async fn open_stored(self: &Arc<Self>, name: &str) -> Result<StoredReader, UploadError> {
        validate_name(name)?;
        let store = Arc::clone(self);
        let name = name.to_owned();
        blocking(move || {
            let path = store.uploads.display(&name);
            let file = match store.uploads.open_file(&name, Access::Read) {
                Ok(file) => file,
                Err(OpenError::NotFound | OpenError::NotRegular) => {
                    return Err(UploadError::NotFound { name });
                }
                Err(e) => return Err(io_err("open", path)(e.into())),
            };
            let md = file.metadata().map_err(io_err("stat", path.clone()))?;
            let known = store.read_meta(&name, &md);
            Ok(StoredReader {
                path,
                file: Some(file),
                size: md.len(),
                offset: 0,
                known,
                hasher: Sha256::new(),
            })
        })
        .await
    }

    /// Opens stored file `name` with its description (size, SHA-256,
    /// time), for a reader that needs the digest before the bytes (an
    /// HTTP `ETag`). The digest is the recorded one, or is computed from
    /// the open file (and recorded); the returned file is positioned at 0
    /// and stays the same even if a new upload replaces the name. Anything
    /// but a regular file (a link, a directory, a FIFO) is
    /// [`UploadError::NotFound`].
    pub async fn open_described(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<(File, StoredFile), UploadError> {
        validate_name(name)?;
        let store = Arc::clone(self);
        let name = name.to_owned();
        self.io_blocking(move || {
            let path = store.uploads.display(&name);
            let mut file = match store.uploads.open_file(&name, Access::Read) {
                Ok(file) => file,
                Err(OpenError::NotFound | OpenError::NotRegular) => {
                    return Err(UploadError::NotFound { name });
                }
                Err(e) => return Err(io_err("open", path)(e.into())),
            };
            let md = file.metadata().map_err(io_err("stat", path.clone()))?;
            let sha256 = match store.read_meta(&name, &md) {
                Some(digest) => digest,
                None => {
                    let digest = hash_open_file(&mut file, &path)?;
                    if let Ok(now) = file.metadata()
                        && fingerprint(&now) == fingerprint(&md)
                    {
                        store.write_meta(&name, &md, &digest);
                    }
                    digest
                }
            };
            io::Seek::rewind(&mut file).map_err(io_err("seek", path))?;
            let stored = StoredFile {
                size: md.len(),
                sha256,
                modified_ms: md.modified().map_or(0, unix_ms),
                name,
            };
            Ok((file, stored))
        })
        .await?
    }

    /// Reads the next piece (at most `max` bytes) of `reader` on a
    /// blocking thread, within the file work limit; hands the reader back.
    pub async fn read_chunk(
        &self,
        mut reader: StoredReader,
        max: usize,
    ) -> (StoredReader, Result<Vec<u8>, UploadError>) {
        let path = reader.path.clone();
        let file = reader.file.take();
        let size = reader.size;
        let offset = reader.offset;
        let done = self
            .io_blocking(move || {
                let Some(mut file) = file else {
                    return (
                        None,
                        Err(UploadError::Internal("reader already failed".into())),
                    );
                };
                let left = size.saturating_sub(offset);
                let want = usize::try_from(left.min(max as u64)).unwrap_or(max);
                let mut buf = vec![0; want];
                let result = file.read_exact(&mut buf).map(|()| buf);
                (Some(file), result.map_err(io_err("read", path)))
            })
            .await;
        match done {
            Ok((file, Ok(data))) => {
                reader.file = file;
                if reader.known.is_none() {
                    reader.hasher.update(&data);
                }
                reader.offset += data.len() as u64;
                (reader, Ok(data))
            }
            Ok((file, Err(err))) => {
                reader.file = file;
                (reader, Err(err))
            }
            Err(err) => (reader, Err(err)),
        }
    }

    /// Makes a complete upload visible: fsync, rename over any earlier file
    /// of the name, fsync the directory, record the digest.
    ///
    /// Right before the rename, checks that the lease is still held and
    /// that the partial under the name is still the file this writer
    /// wrote (same inode): otherwise nothing is renamed.
    fn publish(
        &self,
        lease: &Lease,
        file: File,
        digest: &Digest,
        size: u64,
    ) -> Result<StoredFile, UploadError> {
        let name = lease.name.as_str();
        file.sync_all()
            .map_err(io_err("fsync", self.partial_dir.display(name)))?;
        let md = file
            .metadata()
            .map_err(io_err("stat", self.partial_dir.display(name)))?;
        drop(file);
        let replaced = match self.uploads.stat(name) {
            Ok(Some(old)) if old.is_file() => old.len(),
            Ok(Some(_)) => {
                return Err(UploadError::NotAFile {
                    upload: name.to_owned(),
                });
            }
            Ok(None) => 0,
            Err(e) => return Err(io_err("stat", self.uploads.display(name))(e)),
        };
        let ours = match self.partial_dir.stat(name) {
            Ok(Some(now)) => now.dev() == md.dev() && now.ino() == md.ino(),
            Ok(None) => false,
            Err(e) => return Err(io_err("stat", self.partial_dir.display(name))(e)),
        };
        if !ours || !lease.holds() {
            return Err(lease.lost());
        }
        self.partial_dir
            .rename(name, &self.uploads, name)
            .map_err(io_err("rename into place", self.uploads.display(name)))?;
        {
            let mut state = self.state();
            state.drop_partial(name);
            state.used = state.used.saturating_sub(replaced).saturating_add(size);
        }
        self.uploads
            .sync()
            .map_err(io_err("fsync directory", self.uploads.path().to_path_buf()))?;
        self.write_meta(name, &md, digest);
        Ok(StoredFile {
            name: name.to_owned(),
            size,
            sha256: *digest,
            modified_ms: md.modified().map_or(0, unix_ms),
        })
    }

    /// Counts `len` more bytes of upload `name` against the quota.
    fn reserve(&self, name: &str, index: u32, len: u64) -> Result<(), UploadError> {
        let mut state = self.state();
        if let Some(quota) = self.config.quota
            && state.used.saturating_add(len) > quota
        {
            return Err(UploadError::QuotaExceeded {
                upload: name.to_owned(),
                index,
                quota,
                used: state.used,
            });
        }
        let held = state.partials.get(name).copied().unwrap_or(0);
        state.set_partial(name, held + len);
        Ok(())
    }
}

/// Marks a name as being written; released on drop (the shared lease,
/// if any, with it).
#[derive(Debug)]
struct Lease {
    store: Arc<Store>,
    name: String,
    holder: Arc<Holder>,
    shared: Option<SharedLease>,
}

impl Lease {
    /// Whether this call may still write the name: always with this
    /// process's lease alone; in cluster mode only while the shared lease
    /// is certainly held (another node may have taken it otherwise).
    fn holds(&self) -> bool {
        self.shared.as_ref().is_none_or(|shared| shared.holds())
    }

    fn lost(&self) -> UploadError {
        UploadError::LeaseLost {
            upload: self.name.clone(),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        {
            let mut state = self.store.state();
            if state
                .leases
                .get(&self.name)
                .is_some_and(|h| h.id == self.holder.id)
            {
                state.leases.remove(&self.name);
            }
        }
        self.holder.released.cancel();
    }
}

/// The open partial file of one upload with its running SHA-256 and the
/// lease on its name. It moves into each blocking write and back, so no
/// thread is held between batches.
struct Writer {
    file: File,
    hasher: Sha256,
    /// Bytes in the file (hashed so far, while a resume re-reads them).
    written: u64,
    error: Option<io::Error>,
    /// Set when a write was refused because the shared lease may be
    /// gone: nothing more is written, and the partial is left alone.
    lost: bool,
    lease: Lease,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("written", &self.written)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl Writer {
    fn new(file: File, lease: Lease) -> Self {
        Self {
            file,
            hasher: Sha256::new(),
            written: 0,
            error: None,
            lost: false,
            lease,
        }
    }

    /// Re-reads up to [`REHASH_STEP`] held bytes into the hasher, towards
    /// `held` (blocking).
    fn rehash_step(&mut self, held: u64) -> Result<(), UploadError> {
        let path = || self.lease.store.partial_dir.display(&self.lease.name);
        let mut buf = vec![0; READ_BUF];
        let stop = held.min(self.written + REHASH_STEP);
        while self.written < stop {
            let want =
                usize::try_from((stop - self.written).min(READ_BUF as u64)).unwrap_or(READ_BUF);
            let n = self
                .file
                .read(&mut buf[..want])
                .map_err(|e| io_err("read", path())(e))?;
            if n == 0 {
                return Err(io_err("read", path())(io::ErrorKind::UnexpectedEof.into()));
            }
            self.hasher.update(&buf[..n]);
            self.written += n as u64;
        }
        Ok(())
    }

    /// Hashes and writes one batch (blocking). After a failed write the
    /// file's length is what is held.
    fn write_batch(&mut self, batch: Vec<Vec<u8>>) {
        if self.error.is_some() || self.lost {
            return;
        }
        for data in batch {
            // Right before each write: a node that may have lost its
            // lease must not write into a partial another node may have
            // resumed, or published (a rename keeps this fd's inode).
            if !self.lease.holds() {
                self.lost = true;
                return;
            }
            if let Err(err) = self.file.write_all(&data) {
                if let Ok(end) = self.file.stream_position() {
                    self.written = end;
                }
                self.error = Some(err);
                return;
            }
            self.hasher.update(&data);
            self.written += data.len() as u64;
        }
    }
}

/// Where an upload's writer is: between batches, or in a blocking write.
#[derive(Debug)]
enum Slot {
    Idle(Box<Writer>),
    Busy(tokio::task::JoinHandle<Box<Writer>>),
    Closed,
}

/// An upload being written by one call. Dropping it keeps the bytes
/// written so far for a resume.
#[derive(Debug)]
pub struct Upload {
    store: Arc<Store>,
    name: String,
    start: u64,
    position: u64,
    chunk: u32,
    peer: String,
    /// Accepted chunks not yet handed to a write, and their bytes.
    pending: Vec<Vec<u8>>,
    pending_len: usize,
    slot: Slot,
    holder: Arc<Holder>,
    deadline: Option<tokio::time::Instant>,
    settled: bool,
}

impl Upload {
    /// The upload's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The offset this call started at (above 0 for a resume).
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Bytes accepted so far, counting those held before this call.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Cancelled when a new call takes this upload's name over (this call
    /// has received no chunk for `upload.takeover_after`).
    pub fn takeover_signal(&self) -> CancellationToken {
        self.holder.takeover.clone()
    }

    /// How long since the last chunk arrived.
    pub fn quiet_for(&self) -> Duration {
        self.store.quiet_for(&self.holder)
    }

    /// Names the peer in the log line written if the call is dropped.
    pub fn set_peer(&mut self, peer: &str) {
        peer.clone_into(&mut self.peer);
    }

    /// The call's deadline, if it has one: a call dropped after it is
    /// logged as having passed its deadline, not as a disconnection.
    pub fn set_deadline(&mut self, deadline: Option<tokio::time::Instant>) {
        self.deadline = deadline;
    }

    /// Whether the call's deadline has passed, or is so close that a
    /// client ending the call now is doing so because of it (its clock
    /// started before the request reached the server).
    pub fn deadline_passed(&self) -> bool {
        self.deadline
            .is_some_and(|deadline| tokio::time::Instant::now() + DEADLINE_SLACK >= deadline)
    }

    /// Appends chunk `index`'s bytes. They are handed to a blocking write
    /// in batches of [`WRITE_BATCH`] bytes, or by [`Upload::flush`]. Waits
    /// while the previous batch is still being written, which pushes back
    /// on the client through HTTP/2 flow control.
    pub async fn write(&mut self, index: u32, data: Vec<u8>) -> Result<(), UploadError> {
        // Until it is accepted, this chunk is the one in flight.
        self.chunk = index;
        self.holder
            .last_active_ms
            .store(self.store.now_ms(), Ordering::Relaxed);
        let len = data.len() as u64;
        let limit = self.store.config.max_file_size;
        if self.position.saturating_add(len) > limit {
            return Err(UploadError::TooLarge {
                upload: self.name.clone(),
                index,
                limit,
            });
        }
        if len == 0 {
            return Ok(());
        }
        if matches!(self.slot, Slot::Closed) {
            return Err(self.stopped());
        }
        self.store.reserve(&self.name, index, len)?;
        self.pending_len += data.len();
        self.pending.push(data);
        self.position += len;
        self.chunk = index.saturating_add(1);
        if self.pending_len >= WRITE_BATCH {
            self.send_pending().await?;
        }
        Ok(())
    }

    /// Hands the accepted chunks to a write now. The receiving side calls
    /// it whenever no further chunk is ready, so bytes are batched only
    /// while more are already arriving and held bytes never lag an idle
    /// stream.
    pub async fn flush(&mut self) -> Result<(), UploadError> {
        self.send_pending().await
    }

    /// Waits for the write in progress, if any; fails if a write failed.
    /// Cancel-safe: the write stays in the slot until it has finished.
    async fn idle_writer(&mut self) -> Result<(), UploadError> {
        if let Slot::Busy(handle) = &mut self.slot {
            match handle.await {
                Ok(writer) => self.slot = Slot::Idle(writer),
                Err(e) => {
                    self.slot = Slot::Closed;
                    return Err(UploadError::Internal(format!("upload write failed: {e}")));
                }
            }
        }
        match &self.slot {
            Slot::Idle(writer) if writer.lost => Err(writer.lease.lost()),
            Slot::Idle(writer) => match &writer.error {
                Some(err) => Err(self.write_error(err)),
                None => Ok(()),
            },
            Slot::Busy(_) | Slot::Closed => Err(self.stopped()),
        }
    }

    /// Starts writing the pending chunks once the previous write is done.
    /// Cancel-safe: until the write starts the chunks stay pending (and
    /// [`Drop`] writes them).
    async fn send_pending(&mut self) -> Result<(), UploadError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.idle_writer().await?;
        let permit = Arc::clone(&self.store.io)
            .acquire_owned()
            .await
            .map_err(|_| UploadError::Internal("the file work limiter is closed".into()))?;
        let Slot::Idle(mut writer) = std::mem::replace(&mut self.slot, Slot::Closed) else {
            return Err(self.stopped());
        };
        let batch = std::mem::take(&mut self.pending);
        self.pending_len = 0;
        self.slot = Slot::Busy(tokio::task::spawn_blocking(move || {
            let _permit = permit;
            writer.write_batch(batch);
            writer
        }));
        Ok(())
    }

    fn stopped(&self) -> UploadError {
        UploadError::Internal(format!("the writer of upload {} stopped", self.name))
    }

    fn write_error(&self, error: &io::Error) -> UploadError {
        if matches!(
            error.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge
        ) {
            UploadError::DiskFull {
                upload: self.name.clone(),
            }
        } else {
            UploadError::Io {
                action: "write",
                path: self.store.partial_dir.display(&self.name),
                cause: io::Error::new(error.kind(), error.to_string()),
            }
        }
    }

    /// Writes what is pending, waits for the last write and takes the
    /// writer out; corrects the quota count to what the file holds.
    async fn close(&mut self) -> Result<Box<Writer>, UploadError> {
        let sent = self.send_pending().await;
        // A failed write is reported by the caller from the writer itself.
        let _ = self.idle_writer().await;
        let Slot::Idle(writer) = std::mem::replace(&mut self.slot, Slot::Closed) else {
            return Err(sent.err().unwrap_or_else(|| self.stopped()));
        };
        self.store.state().set_partial(&self.name, writer.written);
        Ok(writer)
    }

    /// Completes the upload: checks the digest against `expected` (if
    /// given), then publishes the file. On a mismatch the bytes are
    /// discarded and nothing is published.
    pub async fn finish(mut self, expected: Option<Digest>) -> Result<StoredFile, UploadError> {
        self.settled = true;
        let writer = self.close().await?;
        if writer.lost || !writer.lease.holds() {
            // The bytes may be another node's now: leave them alone.
            return Err(writer.lease.lost());
        }
        if let Some(err) = &writer.error {
            let err = self.write_error(err);
            self.remove(writer).await?;
            return Err(err);
        }
        let Writer {
            file,
            hasher,
            written,
            lease,
            ..
        } = *writer;
        let digest: Digest = hasher.finalize().into();
        if let Some(expected) = expected
            && expected != digest
        {
            let store = Arc::clone(&self.store);
            self.store
                .io_blocking(move || {
                    drop(file);
                    if !lease.holds() {
                        return Err(lease.lost());
                    }
                    store.remove_partial(&lease.name)
                })
                .await??;
            return Err(UploadError::DigestMismatch {
                upload: self.name.clone(),
                size: written,
                expected: hex::encode(expected),
                actual: hex::encode(digest),
            });
        }
        let store = Arc::clone(&self.store);
        self.store
            .io_blocking(move || {
                let stored = store.publish(&lease, file, &digest, written);
                drop(lease);
                stored
            })
            .await?
    }

    /// Stops writing and keeps the bytes for a resume; returns how many
    /// are held. The name is free for another call once this returns.
    pub async fn suspend(mut self) -> u64 {
        self.settled = true;
        match self.close().await {
            Ok(writer) => {
                let held = writer.written;
                // Closing a file may block (NFS): not on an async thread.
                let _ = self.store.io_blocking(move || drop(writer)).await;
                held
            }
            Err(err) => {
                tracing::error!(upload = %self.name, %err, "cannot stop the upload writer");
                self.position
            }
        }
    }

    /// Stops writing and discards the bytes.
    pub async fn discard(mut self) -> Result<(), UploadError> {
        self.settled = true;
        let writer = self.close().await?;
        self.remove(writer).await
    }

    async fn remove(&self, writer: Box<Writer>) -> Result<(), UploadError> {
        let store = Arc::clone(&self.store);
        self.store
            .io_blocking(move || {
                let Writer { file, lease, .. } = *writer;
                drop(file);
                if !lease.holds() {
                    return Err(lease.lost());
                }
                let removed = store.remove_partial(&lease.name);
                drop(lease);
                removed
            })
            .await?
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        let slot = std::mem::replace(&mut self.slot, Slot::Closed);
        let pending = std::mem::take(&mut self.pending);
        if !matches!(slot, Slot::Closed) {
            // Chunks accepted but not yet written belong to the bytes held
            // for a resume: finish writing them, then close the file and
            // free the name.
            let store = Arc::clone(&self.store);
            let name = self.name.clone();
            let finish = async move {
                let writer = match slot {
                    Slot::Busy(handle) => handle.await.ok(),
                    Slot::Idle(writer) => Some(writer),
                    Slot::Closed => None,
                };
                let Some(mut writer) = writer else {
                    return;
                };
                let io = Arc::clone(&store);
                let _ = io
                    .io_blocking(move || {
                        if !pending.is_empty() {
                            writer.write_batch(pending);
                        }
                        store.state().set_partial(&name, writer.written);
                        drop(writer);
                    })
                    .await;
            };
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(finish);
                }
                Err(_) => tracing::warn!(upload = %self.name, "upload dropped outside the runtime"),
            }
        }
        if !self.settled {
            if self.deadline_passed() {
                tracing::warn!(
                    upload = %self.name,
                    peer = %self.peer,
                    chunk = self.chunk,
                    held = self.position,
                    "deadline passed during chunk {} of upload {}; {} bytes kept for a resume",
                    self.chunk, self.name, self.position
                );
            } else {
                // tonic dropped the call mid-await: its client went away.
                tracing::warn!(
                    upload = %self.name,
                    peer = %self.peer,
                    chunk = self.chunk,
                    held = self.position,
                    "client disconnected during chunk {} of upload {}; {} bytes kept for a resume",
                    self.chunk, self.name, self.position
                );
            }
        }
    }
}

/// A stored file being read back, with its digest. Reads go through
/// [`Store::read_chunk`], one blocking step per chunk.
#[derive(Debug)]
pub struct StoredReader {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    offset: u64,
    known: Option<Digest>,
    hasher: Sha256,
}

impl StoredReader {
    /// The file's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The offset of the next read.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Whether every byte has been read.
    pub fn is_done(&self) -> bool {
        self.offset >= self.size
    }

    /// The file's SHA-256: recorded at upload, or computed from the bytes
    /// read (call after reading everything).
    pub fn digest(&self) -> Digest {
        self.known
            .unwrap_or_else(|| self.hasher.clone().finalize().into())
    }
}

/// How long after `modified` held bytes expire, as Unix ms.
pub fn expires_ms(at: Option<SystemTime>) -> u64 {
    at.map_or(0, unix_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_folders_that_are_links_are_refused_at_open() {
        let data = tempfile::tempdir().expect("tempdir");
        let elsewhere = tempfile::tempdir().expect("tempdir");
        let own = data.path().join("uploads").join(RESERVED_NAME);
        std::fs::create_dir_all(&own).expect("mkdir");
        std::os::unix::fs::symlink(elsewhere.path(), own.join("partial")).expect("symlink");
        let err = Store::open(data.path(), UploadConfig::default()).expect_err("refused");
        assert!(
            err.to_string().contains("not a directory streamhub made"),
            "{err}"
        );
        std::fs::remove_file(own.join("partial")).expect("unlink");
        Store::open(data.path(), UploadConfig::default()).expect("opens once it is gone");
        assert_eq!(std::fs::read_dir(elsewhere.path()).expect("ls").count(), 0);
    }

    /// Shared leases whose held leases say "held" until `valid` is cleared
    /// (as a local deadline passing would).
    #[derive(Debug)]
    struct Switch(Arc<std::sync::atomic::AtomicBool>);

    #[derive(Debug)]
    struct SwitchLease(Arc<std::sync::atomic::AtomicBool>);

    impl HeldLease for SwitchLease {
        fn holds(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl SharedLeases for Switch {
        fn acquire(&self, _: &str) -> BoxFuture<'_, Result<SharedLease, UploadError>> {
            let lease: SharedLease = Box::new(SwitchLease(Arc::clone(&self.0)));
            Box::pin(async move { Ok(lease) })
        }

        fn held(&self, _: &str) -> BoxFuture<'_, Result<bool, UploadError>> {
            Box::pin(async { Ok(false) })
        }
    }

    #[tokio::test]
    async fn a_lease_that_stops_holding_stops_writes_and_the_publish() {
        let data = tempfile::tempdir().expect("tempdir");
        let store = Store::open(data.path(), UploadConfig::default()).expect("open");
        let valid = Arc::new(std::sync::atomic::AtomicBool::new(true));
        assert!(store.set_shared_leases(Arc::new(Switch(Arc::clone(&valid)))));
        let mut upload = store.begin("f.bin", 0).await.expect("begin");
        upload.write(0, vec![1; 1000]).await.expect("write");
        upload.flush().await.expect("flush");
        // The second flush waits for the first batch to be written.
        upload.write(1, vec![2; 1000]).await.expect("write");
        upload.flush().await.expect("flush");
        valid.store(false, Ordering::SeqCst);
        // Accepted, but never written; the finish publishes nothing.
        upload.write(2, vec![3; 1000]).await.expect("accepted");
        let err = upload.finish(None).await.expect_err("lease gone");
        assert!(matches!(err, UploadError::LeaseLost { .. }), "{err}");
        let uploads = data.path().join("uploads");
        assert!(!uploads.join("f.bin").exists());
        let partial = uploads.join(RESERVED_NAME).join("partial").join("f.bin");
        let held = std::fs::read(partial).expect("kept");
        // The second batch may have been written before the lease went.
        assert!(held.len() == 1000 || held.len() == 2000, "{}", held.len());
        assert_eq!(held[..1000], [1; 1000]);
        assert!(!held.contains(&3));
    }
}
