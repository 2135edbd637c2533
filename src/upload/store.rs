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
//! A *lease* (in memory) marks a name as being written by one call; a
//! second call for the same name is refused with [`UploadError::Busy`], so
//! two uploads of one name never mix. In cluster mode, where several
//! servers share one upload directory, a [`SharedLeases`] implementation
//! (`crate::cluster::lease`) adds a lease every server sees. The lease is held by the writer
//! thread and released only once that thread has closed the file, so a
//! resume never races with bytes still being written.
//!
//! Memory stays flat: chunks go in batches ([`WRITE_BATCH`]) through a
//! bounded queue ([`WRITE_QUEUE`] batches) to one blocking writer thread
//! per upload, which hashes and
//! writes them. Nothing is fsynced until the upload completes; after a
//! process crash the partial file's length is still exactly what was
//! written, so it is a correct resume point.

use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    path::{Path, PathBuf},
    sync::OnceLock,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use futures::future::BoxFuture;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Digest, RESERVED_NAME, UploadError, validate_name};
use crate::config::UploadConfig;

/// Batches queued between the receiving task and the writer thread of one
/// upload: bounds the memory an upload holds to a few batches.
pub const WRITE_QUEUE: usize = 4;

/// Chunks are handed to the writer thread in batches of about this many
/// bytes: one wake-up of the writer per batch instead of per chunk (both
/// share one core under load).
pub const WRITE_BATCH: usize = 1024 * 1024;

const READ_BUF: usize = 1024 * 1024;

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
    /// Whether a call is writing it right now.
    pub in_progress: bool,
    /// When the held bytes expire, if any are held.
    pub expires_at: Option<SystemTime>,
    /// Size of the stored file of that name, if there is one.
    pub stored_size: Option<u64>,
}

#[derive(Debug, Default)]
struct State {
    /// Names being written, with the id of the lease.
    leases: HashMap<String, u64>,
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
pub type SharedLease = Box<dyn std::fmt::Debug + Send + Sync>;

/// The upload store of one data directory.
#[derive(Debug)]
pub struct Store {
    shared: OnceLock<Arc<dyn SharedLeases>>,
    uploads: PathBuf,
    partial_dir: PathBuf,
    meta_dir: PathBuf,
    tmp_dir: PathBuf,
    config: UploadConfig,
    state: Mutex<State>,
    tmp_counter: AtomicU64,
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> UploadError + 'a {
    move |source| UploadError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Runs blocking file work off the async threads.
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
fn fingerprint(md: &fs::Metadata) -> String {
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(md);
    #[cfg(not(unix))]
    let ino = 0u64;
    let mtime = md
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{} {ino} {mtime}", md.len())
}

fn sync_dir(dir: &Path) -> Result<(), UploadError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

fn hash_file(path: &Path) -> Result<(Digest, u64), UploadError> {
    let mut file = File::open(path).map_err(io_err("open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0; READ_BUF];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hasher.finalize().into(), total))
}

impl Store {
    /// Opens (creating as needed) the store under `upload.dir` (default
    /// `<data_dir>/uploads`), counts what it holds, and discards expired
    /// unfinished uploads.
    pub fn open(data_dir: &Path, config: UploadConfig) -> Result<Arc<Self>, UploadError> {
        let uploads = config
            .dir
            .clone()
            .unwrap_or_else(|| data_dir.join("uploads"));
        let own = uploads.join(RESERVED_NAME);
        let store = Self {
            shared: OnceLock::new(),
            partial_dir: own.join("partial"),
            meta_dir: own.join("meta"),
            tmp_dir: own.join("tmp"),
            uploads,
            config,
            state: Mutex::new(State::default()),
            tmp_counter: AtomicU64::new(0),
        };
        for dir in [&store.partial_dir, &store.meta_dir, &store.tmp_dir] {
            fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        }
        // Scratch files of a previous run are garbage.
        for entry in fs::read_dir(&store.tmp_dir).map_err(io_err("read", &store.tmp_dir))? {
            let entry = entry.map_err(io_err("read", &store.tmp_dir))?;
            let _ = fs::remove_file(entry.path());
        }
        let mut used = 0u64;
        for entry in fs::read_dir(&store.uploads).map_err(io_err("read", &store.uploads))? {
            let entry = entry.map_err(io_err("read", &store.uploads))?;
            if let Ok(md) = entry.metadata()
                && md.is_file()
            {
                used += md.len();
            }
        }
        {
            let mut state = store.state();
            state.used = used;
            for entry in
                fs::read_dir(&store.partial_dir).map_err(io_err("read", &store.partial_dir))?
            {
                let entry = entry.map_err(io_err("read", &store.partial_dir))?;
                if let (Ok(md), Some(name)) = (entry.metadata(), entry.file_name().to_str())
                    && md.is_file()
                {
                    state.set_partial(name, md.len());
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

    /// Adds leases shared with other servers (cluster mode); set once,
    /// before the store is used. Returns false if some were set already.
    pub fn set_shared_leases(&self, leases: Arc<dyn SharedLeases>) -> bool {
        self.shared.set(leases).is_ok()
    }

    /// This process's lease on `name`, then the shared one if any.
    async fn lease_everywhere(self: &Arc<Self>, name: &str) -> Result<Lease, UploadError> {
        let mut lease = self.lease(name)?;
        if let Some(shared) = self.shared.get() {
            lease.shared = Some(shared.acquire(name).await?);
        }
        Ok(lease)
    }

    fn lease(self: &Arc<Self>, name: &str) -> Result<Lease, UploadError> {
        let mut state = self.state();
        if state.leases.contains_key(name) {
            return Err(UploadError::Busy {
                upload: name.to_owned(),
            });
        }
        state.next_lease += 1;
        let id = state.next_lease;
        state.leases.insert(name.to_owned(), id);
        Ok(Lease {
            store: Arc::clone(self),
            name: name.to_owned(),
            id,
            shared: None,
        })
    }

    /// Starts writing upload `name`: afresh when `offset` is 0 (discarding
    /// any held bytes), else resuming, which needs `offset` to equal the
    /// bytes held. A resume re-reads the held bytes once to restore the
    /// SHA-256 state.
    pub async fn begin(self: &Arc<Self>, name: &str, offset: u64) -> Result<Upload, UploadError> {
        validate_name(name)?;
        let lease = self.lease_everywhere(name).await?;
        let store = Arc::clone(self);
        let owned = name.to_owned();
        let (file, hasher) = blocking(move || store.open_partial(&owned, offset)).await?;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let store = Arc::clone(self);
        let writer = tokio::task::spawn_blocking(move || {
            write_loop(&store, file, hasher, offset, lease, rx)
        });
        Ok(Upload {
            store: Arc::clone(self),
            name: name.to_owned(),
            start: offset,
            position: offset,
            chunk: 0,
            peer: String::new(),
            tx: Some(tx),
            pending: Vec::new(),
            pending_len: 0,
            writer: Some(writer),
            ended: None,
            settled: false,
        })
    }

    fn open_partial(&self, name: &str, offset: u64) -> Result<(File, Sha256), UploadError> {
        let path = self.partial_dir.join(name);
        if offset == 0 {
            let file = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&path)
                .map_err(io_err("create", &path))?;
            self.state().set_partial(name, 0);
            return Ok((file, Sha256::new()));
        }
        let mut file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(UploadError::ResumeOffset {
                    upload: name.to_owned(),
                    offset,
                    held: 0,
                });
            }
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        let held = file.metadata().map_err(io_err("stat", &path))?.len();
        if held != offset {
            return Err(UploadError::ResumeOffset {
                upload: name.to_owned(),
                offset,
                held,
            });
        }
        let mut hasher = Sha256::new();
        let mut buf = vec![0; READ_BUF];
        let mut left = held;
        while left > 0 {
            let want = usize::try_from(left.min(READ_BUF as u64)).unwrap_or(READ_BUF);
            let n = file.read(&mut buf[..want]).map_err(io_err("read", &path))?;
            if n == 0 {
                return Err(UploadError::Io {
                    action: "read",
                    path,
                    source: io::ErrorKind::UnexpectedEof.into(),
                });
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        // Restart the expiry clock: the upload is alive.
        let _ = file.set_modified(SystemTime::now());
        self.state().set_partial(name, held);
        Ok((file, hasher))
    }

    /// What the server holds of upload `name`.
    pub async fn status(self: &Arc<Self>, name: &str) -> Result<UploadStatus, UploadError> {
        validate_name(name)?;
        let elsewhere = match self.shared.get() {
            Some(shared) => shared.held(name).await?,
            None => false,
        };
        let store = Arc::clone(self);
        let name = name.to_owned();
        blocking(move || {
            let partial = store.partial_dir.join(&name);
            let mut status = UploadStatus {
                in_progress: elsewhere || store.state().leases.contains_key(&name),
                ..UploadStatus::default()
            };
            match fs::metadata(&partial) {
                Ok(md) => {
                    status.held = md.len();
                    status.expires_at = md.modified().ok().map(|t| t + store.config.partial_ttl);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("stat", &partial)(e)),
            }
            if let Ok(md) = fs::metadata(store.uploads.join(&name))
                && md.is_file()
            {
                status.stored_size = Some(md.len());
            }
            Ok(status)
        })
        .await
    }

    /// Discards the held bytes of upload `name`; returns how many there
    /// were. Refused while a call is writing it.
    pub async fn cancel(self: &Arc<Self>, name: &str) -> Result<u64, UploadError> {
        validate_name(name)?;
        let lease = self.lease_everywhere(name).await?;
        let store = Arc::clone(self);
        blocking(move || {
            let path = store.partial_dir.join(&lease.name);
            let held = match fs::metadata(&path) {
                Ok(md) => md.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
                Err(e) => return Err(io_err("stat", &path)(e)),
            };
            store.remove_partial(&lease.name)?;
            Ok(held)
        })
        .await
    }

    fn remove_partial(&self, name: &str) -> Result<(), UploadError> {
        let path = self.partial_dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &path)(e)),
        }
        self.state().drop_partial(name);
        Ok(())
    }

    /// Discards unfinished uploads whose last write is older than the
    /// configured time to live, unless a call is writing them. Returns how
    /// many were discarded.
    pub fn sweep_expired(&self) -> usize {
        let Ok(entries) = fs::read_dir(&self.partial_dir) else {
            return 0;
        };
        let now = SystemTime::now();
        let mut expired = 0;
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let Ok(modified) = entry.metadata().and_then(|md| md.modified()) else {
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
            if fs::remove_file(entry.path()).is_ok() {
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
    /// recorded for files that have no valid record).
    pub async fn list(self: &Arc<Self>) -> Result<Vec<StoredFile>, UploadError> {
        let store = Arc::clone(self);
        blocking(move || {
            let mut files = Vec::new();
            let entries = fs::read_dir(&store.uploads).map_err(io_err("read", &store.uploads))?;
            for entry in entries {
                let entry = entry.map_err(io_err("read", &store.uploads))?;
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if validate_name(&name).is_err() {
                    continue;
                }
                match store.describe(&name) {
                    Ok(Some(file)) => files.push(file),
                    Ok(None) => {}
                    // Replaced or removed while listing: skip it.
                    Err(UploadError::Io { source, .. })
                        if source.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            files.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(files)
        })
        .await
    }

    /// Describes stored file `name`, if it is a regular file.
    fn describe(&self, name: &str) -> Result<Option<StoredFile>, UploadError> {
        let path = self.uploads.join(name);
        let md = fs::symlink_metadata(&path).map_err(io_err("stat", &path))?;
        if !md.is_file() {
            return Ok(None);
        }
        let sha256 = match self.read_meta(name, &md) {
            Some(digest) => digest,
            None => {
                let (digest, _) = hash_file(&path)?;
                // Record it only if the file did not change while hashing.
                if let Ok(now) = fs::metadata(&path)
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

    fn read_meta(&self, name: &str, md: &fs::Metadata) -> Option<Digest> {
        let text = fs::read_to_string(self.meta_dir.join(name)).ok()?;
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
    fn write_meta(&self, name: &str, md: &fs::Metadata, digest: &Digest) {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self.tmp_dir.join(format!("meta-{n}"));
        let text = format!("{} {}\n", hex::encode(digest), fingerprint(md));
        let result =
            fs::write(&tmp, text).and_then(|()| fs::rename(&tmp, self.meta_dir.join(name)));
        if let Err(err) = result {
            let _ = fs::remove_file(&tmp);
            tracing::warn!(upload = %name, %err, "cannot record the digest of a stored file");
        }
    }

    /// Opens stored file `name` for reading. The open file stays the same
    /// even if a new upload replaces the name meanwhile.
    pub async fn open_stored(self: &Arc<Self>, name: &str) -> Result<StoredReader, UploadError> {
        validate_name(name)?;
        let store = Arc::clone(self);
        let name = name.to_owned();
        blocking(move || {
            let path = store.uploads.join(&name);
            let file = match File::open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(UploadError::NotFound { name });
                }
                Err(e) => return Err(io_err("open", &path)(e)),
            };
            let md = file.metadata().map_err(io_err("stat", &path))?;
            if !md.is_file() {
                return Err(UploadError::NotFound { name });
            }
            let known = store.read_meta(&name, &md);
            Ok(StoredReader {
                path,
                file,
                size: md.len(),
                offset: 0,
                known,
                hasher: Sha256::new(),
            })
        })
        .await
    }

    /// Makes a complete upload visible: fsync, rename over any earlier file
    /// of the name, fsync the directory, record the digest.
    fn publish(
        &self,
        name: &str,
        file: File,
        digest: &Digest,
        size: u64,
    ) -> Result<StoredFile, UploadError> {
        let partial = self.partial_dir.join(name);
        file.sync_all().map_err(io_err("fsync", &partial))?;
        drop(file);
        let target = self.uploads.join(name);
        let replaced = fs::symlink_metadata(&target)
            .ok()
            .filter(fs::Metadata::is_file)
            .map_or(0, |md| md.len());
        fs::rename(&partial, &target).map_err(io_err("rename into place", &target))?;
        {
            let mut state = self.state();
            state.drop_partial(name);
            state.used = state.used.saturating_sub(replaced).saturating_add(size);
        }
        sync_dir(&self.uploads)?;
        let md = fs::metadata(&target).map_err(io_err("stat", &target))?;
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
    id: u64,
    shared: Option<SharedLease>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut state = self.store.state();
        if state.leases.get(&self.name) == Some(&self.id) {
            state.leases.remove(&self.name);
        }
    }
}

/// What the writer thread hands back when its queue closes.
struct WriterEnd {
    file: File,
    hasher: Sha256,
    written: u64,
    error: Option<io::Error>,
    lease: Lease,
}

fn write_loop(
    store: &Store,
    mut file: File,
    mut hasher: Sha256,
    mut written: u64,
    lease: Lease,
    mut rx: mpsc::Receiver<Vec<Vec<u8>>>,
) -> WriterEnd {
    let mut error = None;
    'batches: while let Some(batch) = rx.blocking_recv() {
        for data in batch {
            if let Err(err) = file.write_all(&data) {
                error = Some(err);
                break 'batches;
            }
            hasher.update(&data);
            written += data.len() as u64;
        }
    }
    if error.is_some() {
        // A failed write may have left part of a chunk: the file's length
        // is what is held.
        if let Ok(md) = file.metadata() {
            written = md.len();
        }
    }
    store.state().set_partial(&lease.name, written);
    WriterEnd {
        file,
        hasher,
        written,
        error,
        lease,
    }
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
    tx: Option<mpsc::Sender<Vec<Vec<u8>>>>,
    /// Accepted chunks not yet handed to the writer, and their bytes.
    pending: Vec<Vec<u8>>,
    pending_len: usize,
    writer: Option<tokio::task::JoinHandle<WriterEnd>>,
    ended: Option<WriterEnd>,
    settled: bool,
}

impl std::fmt::Debug for WriterEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterEnd")
            .field("written", &self.written)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
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

    /// Appends chunk `index`'s bytes. They are handed to the writer in
    /// batches of [`WRITE_BATCH`] bytes, or by [`Upload::flush`]. Waits
    /// when the writer is a few batches behind, which pushes back on the
    /// client through HTTP/2 flow control.
    pub async fn write(&mut self, index: u32, data: Vec<u8>) -> Result<(), UploadError> {
        // Until it is accepted, this chunk is the one in flight.
        self.chunk = index;
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
        if self.tx.is_none() {
            return Err(self.writer_stopped().await);
        }
        self.store.reserve(&self.name, index, len)?;
        self.pending_len += data.len();
        self.pending.push(data);
        self.position += len;
        self.chunk = index.saturating_add(1);
        if self.pending_len >= WRITE_BATCH && !self.send_pending().await {
            return Err(self.writer_stopped().await);
        }
        Ok(())
    }

    /// Hands the accepted chunks to the writer now. The receiving side
    /// calls it whenever no further chunk is ready, so bytes are batched
    /// only while more are already arriving and held bytes never lag an
    /// idle stream.
    pub async fn flush(&mut self) -> Result<(), UploadError> {
        if self.send_pending().await {
            Ok(())
        } else {
            Err(self.writer_stopped().await)
        }
    }

    /// Hands the pending chunks to the writer; false if it has stopped.
    /// Cancel-safe: until a queue slot is granted the chunks stay pending
    /// (and [`Drop`] hands them over).
    async fn send_pending(&mut self) -> bool {
        if self.pending.is_empty() {
            return true;
        }
        let Some(tx) = &self.tx else {
            return false;
        };
        match tx.reserve().await {
            Ok(permit) => {
                permit.send(std::mem::take(&mut self.pending));
                self.pending_len = 0;
                true
            }
            Err(_) => false,
        }
    }

    async fn writer_stopped(&mut self) -> UploadError {
        match self.stop_writer().await {
            Ok(end) => {
                let err = self.write_error(end.error.as_ref());
                self.ended = Some(end);
                err
            }
            Err(err) => err,
        }
    }

    /// Names the peer in the log line written if the call is dropped.
    pub fn set_peer(&mut self, peer: &str) {
        peer.clone_into(&mut self.peer);
    }

    fn write_error(&self, error: Option<&io::Error>) -> UploadError {
        match error {
            Some(e) if e.kind() == io::ErrorKind::StorageFull => UploadError::DiskFull {
                upload: self.name.clone(),
            },
            Some(e) => UploadError::Io {
                action: "write",
                path: self.store.partial_dir.join(&self.name),
                source: io::Error::new(e.kind(), e.to_string()),
            },
            None => UploadError::Internal(format!("the writer of upload {} stopped", self.name)),
        }
    }

    async fn stop_writer(&mut self) -> Result<WriterEnd, UploadError> {
        if let Some(end) = self.ended.take() {
            return Ok(end);
        }
        self.send_pending().await;
        self.tx = None;
        let writer = self
            .writer
            .take()
            .ok_or_else(|| UploadError::Internal("upload writer already stopped".into()))?;
        writer
            .await
            .map_err(|e| UploadError::Internal(format!("upload writer failed: {e}")))
    }

    /// Completes the upload: checks the digest against `expected` (if
    /// given), then publishes the file. On a mismatch the bytes are
    /// discarded and nothing is published.
    pub async fn finish(mut self, expected: Option<Digest>) -> Result<StoredFile, UploadError> {
        self.settled = true;
        let end = self.stop_writer().await?;
        if end.error.is_some() {
            let err = self.write_error(end.error.as_ref());
            self.remove(end).await?;
            return Err(err);
        }
        let WriterEnd {
            file,
            hasher,
            written,
            lease,
            ..
        } = end;
        let digest: Digest = hasher.finalize().into();
        if let Some(expected) = expected
            && expected != digest
        {
            let store = Arc::clone(&self.store);
            blocking(move || store.remove_partial(&lease.name)).await?;
            return Err(UploadError::DigestMismatch {
                upload: self.name.clone(),
                size: written,
                expected: hex::encode(expected),
                actual: hex::encode(digest),
            });
        }
        let store = Arc::clone(&self.store);
        blocking(move || {
            let stored = store.publish(&lease.name, file, &digest, written);
            drop(lease);
            stored
        })
        .await
    }

    /// Stops writing and keeps the bytes for a resume; returns how many
    /// are held. The name is free for another call once this returns.
    pub async fn suspend(mut self) -> u64 {
        self.settled = true;
        match self.stop_writer().await {
            Ok(end) => end.written,
            Err(err) => {
                tracing::error!(upload = %self.name, %err, "cannot stop the upload writer");
                self.position
            }
        }
    }

    /// Stops writing and discards the bytes.
    pub async fn discard(mut self) -> Result<(), UploadError> {
        self.settled = true;
        let end = self.stop_writer().await?;
        self.remove(end).await
    }

    async fn remove(&self, end: WriterEnd) -> Result<(), UploadError> {
        let store = Arc::clone(&self.store);
        blocking(move || {
            drop(end.file);
            let removed = store.remove_partial(&end.lease.name);
            drop(end.lease);
            removed
        })
        .await
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take()
            && !self.pending.is_empty()
        {
            // Chunks accepted but not yet handed over: they belong to the
            // bytes held for a resume.
            let batch = std::mem::take(&mut self.pending);
            if let Err(mpsc::error::TrySendError::Full(batch)) = tx.try_send(batch)
                && let Ok(runtime) = tokio::runtime::Handle::try_current()
            {
                runtime.spawn(async move {
                    let _ = tx.send(batch).await;
                });
            }
        }
        if !self.settled {
            // tonic dropped the call mid-await: its client went away. The
            // writer thread drains its queue, closes the file and frees the
            // name on its own.
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

/// A stored file being read back, with its digest.
#[derive(Debug)]
pub struct StoredReader {
    path: PathBuf,
    file: File,
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

    /// Reads the next piece of at most `max` bytes (blocking).
    pub fn read(&mut self, max: usize) -> Result<Vec<u8>, UploadError> {
        let left = self.size - self.offset;
        let want = usize::try_from(left.min(max as u64)).unwrap_or(max);
        let mut buf = vec![0; want];
        self.file
            .read_exact(&mut buf)
            .map_err(io_err("read", &self.path))?;
        if self.known.is_none() {
            self.hasher.update(&buf);
        }
        self.offset += want as u64;
        Ok(buf)
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
