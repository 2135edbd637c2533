//! Graceful shutdown: one cancellation token watched by every stream, and a
//! tracker of the server's background tasks.
//!
//! tonic's own graceful shutdown waits for every connection to close, and an
//! open stream keeps its connection open forever unless the server ends it.
//! So every stream the server produces selects on [`Shutdown::cancelled`]
//! and ends itself with UNAVAILABLE once it has delivered what it accepted.
//! (Subscribe streams instead end when the server closes the telemetry hub
//! right after triggering shutdown: one wait per delivery instead of two.)

use std::future::Future;

use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// The message of the status every stream ends with on shutdown.
pub const SHUTTING_DOWN: &str = "server is shutting down; reconnect to a running server";

/// Shared shutdown state of one server.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tasks: TaskTracker,
}

impl Shutdown {
    /// A new, untriggered shutdown.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the shutdown: every watcher of the token wakes.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Whether shutdown has started.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when shutdown starts.
    pub async fn cancelled(&self) {
        self.token.cancelled().await;
    }

    /// The token itself, for futures that must own it.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Spawns a background task that shutdown waits for.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    /// Waits until every spawned background task has finished.
    pub async fn wait_tasks(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Completes on SIGTERM or Ctrl-C (SIGINT).
pub async fn signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(%err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(err) => {
                tracing::error!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
