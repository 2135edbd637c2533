//! The no-progress rule shared by every download response (gRPC Download
//! and `GET /files/NAME`): what a response holds (its open file, its
//! download slot) sits in a [`Stallable`]; each step the response takes
//! (taking the value to read, putting it back) counts as progress, and a
//! watchdog takes the value away — closing the file, freeing the slot —
//! once no step was taken for `upload.idle_timeout`. The response finds
//! the value gone when next polled and ends.
//!
//! A client that stops reading stops the response from being polled (HTTP/2
//! flow control, or a full TCP send buffer under HTTP/1.1), so without the
//! watchdog it would hold its slot for as long as it keeps the connection.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio_util::sync::{CancellationToken, DropGuard};

/// A value (a response's file and slot) that a watchdog drops once the
/// response has made no progress for the configured period. Dropping the
/// `Stallable` stops its watchdog.
pub struct Stallable<T> {
    held: Arc<Mutex<Option<T>>>,
    progress: Arc<AtomicU64>,
    _done: DropGuard,
}

impl<T: Send + 'static> Stallable<T> {
    /// Holds `value` and starts its watchdog (on the current tokio
    /// runtime): after `idle` with no [`take`](Self::take) or
    /// [`put`](Self::put), the value is dropped and `on_stall` is called
    /// with it first (to log what stalled).
    pub fn spawn(value: T, idle: Duration, on_stall: impl FnOnce(&T) + Send + 'static) -> Self {
        let held = Arc::new(Mutex::new(Some(value)));
        let progress = Arc::new(AtomicU64::new(0));
        let done = CancellationToken::new();
        tokio::spawn(watchdog(
            Arc::clone(&held),
            Arc::clone(&progress),
            done.clone(),
            idle,
            on_stall,
        ));
        Self {
            held,
            progress,
            _done: done.drop_guard(),
        }
    }

    /// Takes the value to use it (a step of progress); `None` once the
    /// watchdog took it away: the response stalled and must end.
    pub fn take(&self) -> Option<T> {
        self.progress.fetch_add(1, Ordering::Relaxed);
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Puts the value back after a step (a step of progress).
    pub fn put(&self, value: T) {
        self.progress.fetch_add(1, Ordering::Relaxed);
        *self.held.lock().unwrap_or_else(PoisonError::into_inner) = Some(value);
    }
}

/// Drops the held value once `progress` has not moved for a whole `idle`
/// period; ends with the [`Stallable`] (`done`).
async fn watchdog<T>(
    held: Arc<Mutex<Option<T>>>,
    progress: Arc<AtomicU64>,
    done: CancellationToken,
    idle: Duration,
    on_stall: impl FnOnce(&T),
) {
    let mut seen = progress.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            () = done.cancelled() => return,
            () = tokio::time::sleep(idle) => {}
        }
        let now = progress.load(Ordering::Relaxed);
        if now == seen {
            let taken = held.lock().unwrap_or_else(PoisonError::into_inner).take();
            if let Some(stalled) = taken {
                on_stall(&stalled);
                return;
            }
        }
        seen = now;
    }
}
