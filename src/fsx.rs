//! Files under the data directory, opened without following symbolic
//! links and checked to be what streamhub put there.
//!
//! A [`DirHandle`] is a directory streamhub made, held open (by file
//! descriptor) from startup. Every file is reached *relative to* such a
//! handle (`openat` and friends), with `O_NOFOLLOW` on the last component,
//! so neither a symbolic link placed under the data directory nor a
//! directory swapped for a link later can lead outside it. Every open also
//! carries `O_NONBLOCK`, so a FIFO placed where a file should be fails the
//! regular-file check instead of blocking a thread forever (the flag has no
//! effect on regular files).
//!
//! Errors here are plain `io::Error`s; callers log them with
//! [`DirHandle::path`] and keep paths out of client-facing messages.

use std::{
    fs::{File, Metadata},
    io,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use rustix::fs::{AtFlags, Mode, OFlags};

/// How [`DirHandle::open_file`] opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only; the file must exist.
    Read,
    /// Read and write; the file must exist.
    ReadWrite,
    /// Read and write, created if missing.
    Create,
    /// Read and write, created if missing and truncated to 0 bytes.
    CreateTruncate,
    /// Write only; the file must not exist.
    CreateNew,
}

/// Why a file could not be opened as a regular file.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Nothing has that name.
    #[error("no such file")]
    NotFound,
    /// Something that is not a regular file has that name (a symbolic
    /// link, a directory, a FIFO, a socket, a device).
    #[error("not a regular file")]
    NotRegular,
    /// Any other failure.
    #[error(transparent)]
    Io(io::Error),
}

impl From<rustix::io::Errno> for OpenError {
    fn from(errno: rustix::io::Errno) -> Self {
        match errno {
            rustix::io::Errno::NOENT => OpenError::NotFound,
            // ELOOP: a symbolic link under O_NOFOLLOW; EISDIR: a directory
            // opened for writing; ENXIO: a FIFO without a reader opened
            // non-blocking for writing; ENOTDIR: a directory expected.
            rustix::io::Errno::LOOP
            | rustix::io::Errno::ISDIR
            | rustix::io::Errno::NXIO
            | rustix::io::Errno::NOTDIR => OpenError::NotRegular,
            other => OpenError::Io(other.into()),
        }
    }
}

impl From<OpenError> for io::Error {
    fn from(err: OpenError) -> Self {
        match err {
            OpenError::NotFound => io::ErrorKind::NotFound.into(),
            OpenError::NotRegular => io::Error::other("not a regular file"),
            OpenError::Io(err) => err,
        }
    }
}

const DIR_FLAGS: OFlags = OFlags::DIRECTORY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::RDONLY)
    .union(OFlags::CLOEXEC);

/// An open directory that streamhub made; files are reached relative to it.
#[derive(Debug)]
pub struct DirHandle {
    fd: OwnedFd,
    path: PathBuf,
}

impl DirHandle {
    /// Creates (if missing) and opens directory `path`. Its parent is
    /// followed as given; `path` itself must be a real directory, not a
    /// symbolic link to one.
    pub fn create(path: &Path) -> io::Result<Self> {
        match std::fs::create_dir(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let fd = rustix::fs::open(path, DIR_FLAGS, Mode::empty()).map_err(not_a_dir)?;
        Ok(Self {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Creates (if missing) and opens subdirectory `name`, which must be a
    /// real directory.
    pub fn subdir(&self, name: &str) -> io::Result<Self> {
        match rustix::fs::mkdirat(&self.fd, name, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let fd = rustix::fs::openat(&self.fd, name, DIR_FLAGS, Mode::empty()).map_err(not_a_dir)?;
        Ok(Self {
            fd,
            path: self.path.join(name),
        })
    }

    /// The directory's path, for log lines only.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` in this directory, for log lines only.
    pub fn display(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Opens `name` as a regular file, never following a symbolic link and
    /// never blocking on a FIFO.
    pub fn open_file(&self, name: &str, access: Access) -> Result<File, OpenError> {
        let base = OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let flags = match access {
            Access::Read => OFlags::RDONLY,
            Access::ReadWrite => OFlags::RDWR,
            Access::Create => OFlags::RDWR | OFlags::CREATE,
            Access::CreateTruncate => OFlags::RDWR | OFlags::CREATE | OFlags::TRUNC,
            Access::CreateNew => OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
        };
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            base | flags,
            Mode::from_bits_truncate(0o644),
        )?;
        let file = File::from(fd);
        let md = file.metadata().map_err(OpenError::Io)?;
        if !md.is_file() {
            return Err(OpenError::NotRegular);
        }
        Ok(file)
    }

    /// What `name` is, without following a symbolic link; `None` if
    /// nothing has that name.
    pub fn stat(&self, name: &str) -> io::Result<Option<Metadata>> {
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => File::from(fd).metadata().map(Some),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The size and times of `name` if it is a regular file; `None` if it
    /// is missing or anything else.
    pub fn stat_regular(&self, name: &str) -> io::Result<Option<Metadata>> {
        Ok(self.stat(name)?.filter(Metadata::is_file))
    }

    /// The names in the directory that are valid UTF-8, with whether each
    /// is a regular file (by its directory entry; check again on open).
    pub fn entries(&self) -> io::Result<Vec<(String, bool)>> {
        let mut out = Vec::new();
        for entry in rustix::fs::Dir::read_from(&self.fd)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().to_str() else {
                continue;
            };
            if name == "." || name == ".." {
                continue;
            }
            let regular = match entry.file_type() {
                rustix::fs::FileType::RegularFile => true,
                // Some file systems do not fill in the type.
                rustix::fs::FileType::Unknown => self.stat(name)?.is_some_and(|md| md.is_file()),
                _ => false,
            };
            out.push((name.to_owned(), regular));
        }
        Ok(out)
    }

    /// Renames `name` here to `to_name` in `to`, replacing what is there
    /// (a symbolic link there is replaced itself, never followed).
    pub fn rename(&self, name: &str, to: &DirHandle, to_name: &str) -> io::Result<()> {
        rustix::fs::renameat(&self.fd, name, &to.fd, to_name).map_err(Into::into)
    }

    /// Removes the file (or symbolic link) `name`; missing is fine.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Flushes the directory's entries (after a rename) to disk.
    pub fn sync(&self) -> io::Result<()> {
        rustix::fs::fsync(&self.fd).map_err(Into::into)
    }
}

fn not_a_dir(errno: rustix::io::Errno) -> io::Error {
    match errno {
        rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => io::Error::other(
            "not a directory streamhub made (a symbolic link or another kind of file)",
        ),
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_fifos_and_directories_are_not_regular_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, b"secret").expect("write");
        let dir = DirHandle::create(&tmp.path().join("d")).expect("creates");
        std::os::unix::fs::symlink(&outside, dir.display("link")).expect("symlink");
        std::fs::create_dir(dir.display("sub")).expect("mkdir");
        let status = std::process::Command::new("mkfifo")
            .arg(dir.display("fifo"))
            .status()
            .expect("mkfifo runs");
        assert!(status.success());
        for name in ["link", "sub", "fifo"] {
            for access in [Access::Read, Access::ReadWrite, Access::CreateTruncate] {
                assert!(
                    matches!(dir.open_file(name, access), Err(OpenError::NotRegular)),
                    "{name} {access:?}"
                );
            }
            assert!(dir.stat_regular(name).expect("stat").is_none(), "{name}");
        }
        assert!(matches!(
            dir.open_file("missing", Access::Read),
            Err(OpenError::NotFound)
        ));
        dir.open_file("plain", Access::CreateNew).expect("creates");
        let entries = dir.entries().expect("lists");
        let regular: Vec<&str> = entries
            .iter()
            .filter(|(_, regular)| *regular)
            .map(|(name, _)| name.as_str())
            .collect();
        assert_eq!(regular, ["plain"]);
        // A symbolic link where a directory should be is refused.
        std::os::unix::fs::symlink(tmp.path(), dir.display("dirlink")).expect("symlink");
        assert!(dir.subdir("dirlink").is_err());
        assert!(DirHandle::create(&dir.display("dirlink")).is_err());
        assert_eq!(std::fs::read(&outside).expect("read"), b"secret");
    }
}
