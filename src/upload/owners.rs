//! Who owns which upload, for `upload.quota_per_identity`. No gRPC types.
//!
//! An owner record is a small file holding an identity's name:
//! `uploads/.streamhub/owners/partial/<name>` for the unfinished upload of
//! `<name>` (written when an authenticated call begins it), moved to
//! `.../owners/stored/<name>` when that upload is published. The records
//! say only *who*; how many bytes is always read from the files themselves
//! (the store's [`Store::status`]), so a record left behind by an expired or
//! cancelled upload counts nothing.
//!
//! An identity's usage is the size of the stored files it owns plus the
//! bytes held of its unfinished uploads, read when an upload starts; the
//! call then counts what it writes on top. Concurrent uploads by one
//! identity are each checked against the usage when they started, so
//! together they may pass the quota by what they write at the same time.

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use super::{RESERVED_NAME, Store, UploadError};

#[derive(Debug, Default)]
struct Index {
    /// Identity → names of stored files it owns.
    stored: HashMap<String, HashSet<String>>,
    /// Identity → names of unfinished uploads it owns.
    partial: HashMap<String, HashSet<String>>,
    /// Name → owner, for each kind.
    stored_owner: HashMap<String, String>,
    partial_owner: HashMap<String, String>,
}

fn set(
    owners: &mut HashMap<String, String>,
    names: &mut HashMap<String, HashSet<String>>,
    name: &str,
    identity: Option<&str>,
) {
    if let Some(old) = owners.remove(name)
        && let Some(set) = names.get_mut(&old)
    {
        set.remove(name);
        if set.is_empty() {
            names.remove(&old);
        }
    }
    if let Some(identity) = identity {
        owners.insert(name.to_owned(), identity.to_owned());
        names
            .entry(identity.to_owned())
            .or_default()
            .insert(name.to_owned());
    }
}

/// The owner records of one upload store.
#[derive(Debug)]
pub struct Owners {
    stored_dir: PathBuf,
    partial_dir: PathBuf,
    index: Mutex<Index>,
}

fn load(dir: &Path) -> io::Result<Vec<(String, String)>> {
    let mut records = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let (Some(name), Ok(owner)) = (
            entry.file_name().to_str().map(str::to_owned),
            fs::read_to_string(entry.path()),
        ) {
            records.push((name, owner.trim_end_matches('\n').to_owned()));
        }
    }
    Ok(records)
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> UploadError + 'a {
    move |cause| UploadError::Io {
        action,
        path: path.to_path_buf(),
        cause,
    }
}

impl Owners {
    /// Opens (creating) the records under `<data_dir>/uploads`.
    pub fn open(data_dir: &Path) -> Result<Arc<Self>, UploadError> {
        let root = data_dir.join("uploads").join(RESERVED_NAME).join("owners");
        let owners = Self {
            stored_dir: root.join("stored"),
            partial_dir: root.join("partial"),
            index: Mutex::default(),
        };
        let mut index = Index::default();
        for (dir, stored) in [(&owners.stored_dir, true), (&owners.partial_dir, false)] {
            fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
            for (name, owner) in load(dir).map_err(io_err("read", dir))? {
                if stored {
                    set(
                        &mut index.stored_owner,
                        &mut index.stored,
                        &name,
                        Some(&owner),
                    );
                } else {
                    set(
                        &mut index.partial_owner,
                        &mut index.partial,
                        &name,
                        Some(&owner),
                    );
                }
            }
        }
        *owners.index.lock().unwrap_or_else(PoisonError::into_inner) = index;
        Ok(Arc::new(owners))
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes `identity` holds in `store`: its stored files and unfinished
    /// uploads, as on disk now.
    pub async fn usage(&self, store: &Arc<Store>, identity: &str) -> Result<u64, UploadError> {
        let (stored, partial): (Vec<String>, Vec<String>) = {
            let index = self.index();
            (
                index
                    .stored
                    .get(identity)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default(),
                index
                    .partial
                    .get(identity)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default(),
            )
        };
        let mut total = 0u64;
        for name in stored {
            total += store.status(&name).await?.stored_size.unwrap_or(0);
        }
        for name in partial {
            total += store.status(&name).await?.held;
        }
        Ok(total)
    }

    /// Whether the unfinished upload `name` is `identity`'s.
    pub fn owns_partial(&self, name: &str, identity: &str) -> bool {
        self.index().partial_owner.get(name).map(String::as_str) == Some(identity)
    }

    /// Whether the stored file `name` is `identity`'s.
    pub fn owns_stored(&self, name: &str, identity: &str) -> bool {
        self.index().stored_owner.get(name).map(String::as_str) == Some(identity)
    }

    /// Records that `identity` is writing upload `name`.
    pub fn begin(&self, name: &str, identity: &str) {
        let path = self.partial_dir.join(name);
        if let Err(err) = fs::write(&path, identity) {
            tracing::warn!(upload = %name, %err, "cannot record the owner of an upload");
        }
        let mut index = self.index();
        let index = &mut *index;
        set(
            &mut index.partial_owner,
            &mut index.partial,
            name,
            Some(identity),
        );
    }

    /// Records that upload `name` was published: its writer owns the file.
    pub fn published(&self, name: &str) {
        let from = self.partial_dir.join(name);
        let to = self.stored_dir.join(name);
        if let Err(err) = fs::rename(&from, &to) {
            tracing::warn!(upload = %name, %err, "cannot record the owner of a stored file");
        }
        let mut index = self.index();
        let index = &mut *index;
        let owner = index.partial_owner.get(name).cloned();
        set(&mut index.partial_owner, &mut index.partial, name, None);
        set(
            &mut index.stored_owner,
            &mut index.stored,
            name,
            owner.as_deref(),
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::config::UploadConfig;

    #[tokio::test]
    async fn usage_follows_the_files_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), UploadConfig::default()).unwrap();
        let owners = Owners::open(dir.path()).unwrap();
        owners.begin("a.bin", "alice");
        let mut upload = store.begin("a.bin", 0).await.unwrap();
        upload.write(0, vec![1; 100]).await.unwrap();
        let held = upload.suspend().await;
        assert_eq!(held, 100);
        assert_eq!(owners.usage(&store, "alice").await.unwrap(), 100);
        assert_eq!(owners.usage(&store, "bob").await.unwrap(), 0);

        let mut upload = store.begin("a.bin", 100).await.unwrap();
        upload.write(1, vec![2; 50]).await.unwrap();
        upload.finish(None).await.unwrap();
        owners.published("a.bin");
        assert_eq!(owners.usage(&store, "alice").await.unwrap(), 150);

        let reopened = Owners::open(dir.path()).unwrap();
        assert_eq!(reopened.usage(&store, "alice").await.unwrap(), 150);
    }
}
