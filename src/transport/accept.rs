//! The accept loop: admits connections up to `limits.max_connections`
//! (and `limits.max_connections_per_peer` from one IP address), closes
//! the rest at once, and backs off on accept errors.
//!
//! An accept error that concerns one connection (it was reset before we
//! took it) is skipped. Any other (EMFILE, ENFILE, ENOBUFS, ENOMEM) means
//! the process or the system is out of something, and retrying at once
//! would spin: the loop sleeps, from 5 ms doubling up to 1 s, and logs at
//! most once a second.

use std::{
    io,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use super::{ConnStats, conn, service::App};
use std::sync::atomic::Ordering;

/// First pause after an accept error.
const MIN_BACKOFF: Duration = Duration::from_millis(5);
/// Longest pause after repeated accept errors.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts until the stop token is cancelled, then closes the listener.
pub(super) async fn run<S: App>(
    listener: TcpListener,
    shared: &Arc<conn::Shared<S>>,
    stats: &ConnStats,
    connections: &TaskTracker,
) {
    let max_connections = shared.settings().max_connections;
    let per_peer_cap = shared.settings().max_connections_per_peer;
    let mut refused_log = LogLimiter::default();
    let mut error_log = LogLimiter::default();
    let mut backoff = MIN_BACKOFF;
    loop {
        let accepted = tokio::select! {
            biased;
            () = shared.stop().cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = MIN_BACKOFF;
                let open = stats.open();
                if open >= u64::try_from(max_connections).unwrap_or(u64::MAX) {
                    drop(stream);
                    stats.inner.refused.fetch_add(1, Ordering::Relaxed);
                    if let Some(suppressed) = refused_log.allow() {
                        tracing::warn!(
                            %peer,
                            open,
                            max_connections,
                            suppressed,
                            "connection refused: limits.max_connections are open"
                        );
                    }
                    continue;
                }
                let Some(slot) = stats.admit(peer.ip(), per_peer_cap) else {
                    drop(stream);
                    stats.inner.refused.fetch_add(1, Ordering::Relaxed);
                    if let Some(suppressed) = refused_log.allow() {
                        tracing::warn!(
                            %peer,
                            max_connections_per_peer = per_peer_cap,
                            suppressed,
                            "connection refused: this address has limits.max_connections_per_peer open"
                        );
                    }
                    continue;
                };
                connections.spawn(conn::run(
                    stream,
                    peer,
                    Arc::clone(shared),
                    stats.clone(),
                    slot,
                ));
            }
            Err(err) if concerns_one_connection(&err) => {
                tracing::debug!(%err, "a connection was lost before it was accepted");
            }
            Err(err) => {
                if let Some(suppressed) = error_log.allow() {
                    tracing::error!(%err, retry_in = ?backoff, suppressed, "cannot accept connections");
                }
                tokio::select! {
                    () = shared.stop().cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    // Dropping the listener closes the socket: new clients are refused by
    // the kernel instead of waiting on a backlog nobody reads.
    drop(listener);
}

/// Whether an accept error concerns only the connection being accepted.
fn concerns_one_connection(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Lets a log line through at most once a [`LogLimiter::EVERY`], counting
/// the ones held back.
#[derive(Debug, Default)]
pub(super) struct LogLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// The shortest time between two lines.
    pub(super) const EVERY: Duration = Duration::from_secs(1);

    /// `Some(lines held back since the last one)` if a line may be written
    /// now; `None` if it must be held back.
    pub(super) fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < Self::EVERY => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_limiter_lets_one_line_through_and_counts_the_rest() {
        let mut limiter = LogLimiter::default();
        assert_eq!(limiter.allow(), Some(0));
        assert_eq!(limiter.allow(), None);
        assert_eq!(limiter.allow(), None);
        limiter.last = Some(Instant::now() - LogLimiter::EVERY);
        assert_eq!(limiter.allow(), Some(2));
    }

    #[test]
    fn only_per_connection_errors_are_retried_at_once() {
        assert!(concerns_one_connection(&io::Error::from(
            io::ErrorKind::ConnectionAborted
        )));
        // EMFILE
        assert!(!concerns_one_connection(&io::Error::from_raw_os_error(24)));
        assert!(!concerns_one_connection(&io::Error::from(
            io::ErrorKind::OutOfMemory
        )));
    }
}
