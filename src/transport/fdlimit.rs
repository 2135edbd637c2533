//! The process's file-descriptor limit: raised to its maximum at start, and
//! the connection cap derived from it.
//!
//! Every connection is one descriptor; the server also needs some for its
//! own files (the chat database, uploads in progress, the runtime's
//! epoll and timers). If connections could take them all, an accept flood
//! would make the server unable to open an upload or the database with
//! EMFILE. So `limits.max_connections` is held below the soft limit with
//! some headroom.

use std::sync::OnceLock;

/// Descriptors kept free for the server's own files when the limit is
/// large; half the limit when it is small.
pub const HEADROOM: u64 = 256;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (once per process) and
/// returns the soft limit now in force, or `None` where it cannot be read.
pub fn raise_nofile_limit() -> Option<u64> {
    static SOFT: OnceLock<Option<u64>> = OnceLock::new();
    *SOFT.get_or_init(raise)
}

#[cfg(unix)]
fn raise() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(soft) => {
            tracing::debug!(soft, "file-descriptor limit raised");
            Some(soft)
        }
        Err(err) => {
            tracing::warn!(%err, "cannot raise the file-descriptor limit");
            rlimit::Resource::NOFILE.get().ok().map(|(soft, _)| soft)
        }
    }
}

#[cfg(not(unix))]
fn raise() -> Option<u64> {
    None
}

/// The connection cap: `configured`, but at most the soft limit minus
/// [`HEADROOM`] (or half the soft limit when that is smaller), and at
/// least 1.
pub fn connection_cap(configured: usize, soft_limit: Option<u64>) -> usize {
    let Some(soft) = soft_limit else {
        return configured;
    };
    let usable = soft.saturating_sub(HEADROOM.min(soft / 2)).max(1);
    configured.min(usize::try_from(usable).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_keeps_headroom_below_the_fd_limit() {
        assert_eq!(connection_cap(10_000, Some(1_048_576)), 10_000);
        assert_eq!(connection_cap(10_000, Some(1024)), 768);
        assert_eq!(connection_cap(10_000, Some(100)), 50);
        assert_eq!(connection_cap(10_000, Some(1)), 1);
        assert_eq!(connection_cap(10_000, None), 10_000);
    }

    #[test]
    fn raising_the_limit_leaves_a_soft_limit_in_force() {
        if cfg!(unix) {
            let soft = raise_nofile_limit().expect("a soft limit");
            assert!(soft >= 1);
        }
    }
}
