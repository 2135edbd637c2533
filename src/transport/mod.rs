//! streamhub's connection layer: the accept loop, each connection's life
//! (TLS, handshake deadline, idle timeout, graceful drain), and what every
//! request learns about its connection.
//!
//! tonic's `serve_with_incoming_shutdown` served the gRPC routes until this
//! module replaced it, because it had no answer for connections that never
//! finish a handshake, connections that stay open forever without a call,
//! too many connections, or silent connections holding up the drain. Here
//! one tower service (the [`Router`](tonic::service::AxumRouter) built in
//! `server.rs`: gRPC routes plus any plain HTTP routes) is served over
//! HTTP/1.1 and HTTP/2 (hyper-util's `auto` builder), optionally over TLS.
//!
//! - [`accept`]: the accept loop, the connection cap, error back-off.
//! - [`conn`]: one connection's task: TLS, handshake deadline, idle timeout,
//!   maximum age, graceful shutdown and the forced end of the drain.
//! - [`service`]: the per-connection service: request extensions
//!   ([`ConnInfo`], `TcpConnectInfo`), the open-stream count, and the
//!   per-connection budget of partly received messages.
//! - [`handshake`]: notices when a client has finished the HTTP/2 preface.
//! - [`tls`]: rustls configuration from PEM files, reloaded on SIGHUP and
//!   when the files change.
//! - [`fdlimit`]: raises the file-descriptor limit and derives the
//!   connection cap from it.

pub mod accept;
pub mod conn;
pub mod fdlimit;
pub mod handshake;
pub mod service;
pub mod tls;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::config::{Limits, TlsConfig};

pub use service::{RequestBody, ResponseBody};

/// What a request knows about the connection it came on; inserted into
/// every request's extensions (next to tonic's `TcpConnectInfo`, which keeps
/// `Request::remote_addr()` working).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub remote_addr: SocketAddr,
    /// The server address the client connected to.
    pub local_addr: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The client's verified certificate chain, leaf first, when the server
    /// requires client certificates (`tls.client_ca`); `None` otherwise.
    pub client_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// Counters of the connection layer, shared with whoever reports them
/// (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct ConnStats {
    inner: Arc<StatsInner>,
}

#[derive(Debug, Default)]
struct StatsInner {
    open: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    handshake_timeouts: AtomicU64,
    idle_closed: AtomicU64,
    /// Open connections per client IP address (entries at zero removed).
    per_peer: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

impl ConnStats {
    /// Connections open now (accepted and not yet closed, TLS handshakes
    /// in progress included).
    pub fn open(&self) -> u64 {
        self.inner.open.load(Ordering::Relaxed)
    }

    /// Connections accepted since start (refused ones not included).
    pub fn accepted(&self) -> u64 {
        self.inner.accepted.load(Ordering::Relaxed)
    }

    /// Connections closed at once because `limits.max_connections` were
    /// open.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }

    /// Connections closed because they did not finish the TLS or HTTP
    /// handshake within `limits.handshake_timeout`.
    pub fn handshake_timeouts(&self) -> u64 {
        self.inner.handshake_timeouts.load(Ordering::Relaxed)
    }

    /// Connections closed after `limits.idle_timeout` without an open
    /// stream.
    pub fn idle_closed(&self) -> u64 {
        self.inner.idle_closed.load(Ordering::Relaxed)
    }

    fn per_peer(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<std::net::IpAddr, usize>> {
        self.inner
            .per_peer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a new open connection from `peer`, unless `peer` already has
    /// `per_peer_cap` open (then `None`, and nothing is counted); the slot
    /// gives it back when dropped.
    fn admit(&self, peer: std::net::IpAddr, per_peer_cap: usize) -> Option<ConnSlot> {
        {
            let mut per_peer = self.per_peer();
            let open = per_peer.entry(peer).or_insert(0);
            if *open >= per_peer_cap {
                return None;
            }
            *open += 1;
        }
        self.inner.open.fetch_add(1, Ordering::Relaxed);
        self.inner.accepted.fetch_add(1, Ordering::Relaxed);
        Some(ConnSlot {
            stats: self.clone(),
            peer,
        })
    }
}

/// One open connection, counted in [`ConnStats::open`] and its peer's
/// share until dropped.
#[derive(Debug)]
struct ConnSlot {
    stats: ConnStats,
    peer: std::net::IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.stats.inner.open.fetch_sub(1, Ordering::Relaxed);
        let mut per_peer = self.stats.per_peer();
        if let Some(open) = per_peer.get_mut(&self.peer) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                per_peer.remove(&self.peer);
            }
        }
    }
}

/// Errors that stop the transport from starting.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The TLS configuration could not be loaded.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The listener's address could not be read.
    #[error("cannot read the listener's address: {0}")]
    Listener(std::io::Error),
}

// The cause is in the message, so it is not also a `source()`.
impl From<std::io::Error> for TransportError {
    fn from(err: std::io::Error) -> Self {
        TransportError::Listener(err)
    }
}

/// The settings of the connection layer, taken from `limits.*`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Open connections beyond which new ones are closed at once (already
    /// capped by the file-descriptor limit).
    pub max_connections: usize,
    /// Open connections one client IP address may have; more from it are
    /// closed at once.
    pub max_connections_per_peer: usize,
    /// Time a connection has to finish its TLS and HTTP handshakes.
    pub handshake_timeout: Duration,
    /// Time a connection may go without an open stream.
    pub idle_timeout: Duration,
    /// Bytes of partly received gRPC messages one connection may hold.
    pub message_budget: usize,
    /// The HTTP/2 and TCP settings, as configured.
    pub limits: Limits,
}

/// A listener with its settings, ready to serve.
#[derive(Debug)]
pub struct Transport {
    listener: TcpListener,
    local_addr: SocketAddr,
    settings: Settings,
    tls: Option<Arc<tls::TlsReloader>>,
    tls_reload_interval: Duration,
    /// The SIGHUP handler, installed at once so a SIGHUP as soon as the
    /// server listens reloads instead of ending the process.
    hangup: Option<tls::Hangup>,
    stats: ConnStats,
}

impl Transport {
    /// Prepares to serve on `listener`: raises the file-descriptor limit,
    /// derives the connection cap from it, and loads the TLS files if
    /// `tls` names any (then SIGHUP reloads them: call from within the
    /// runtime).
    ///
    /// # Errors
    ///
    /// [`TransportError::Tls`] if the certificate, key or client CA cannot
    /// be loaded; [`TransportError::Listener`] if the listener has no
    /// address.
    pub fn new(
        listener: TcpListener,
        limits: &Limits,
        tls: &TlsConfig,
    ) -> Result<Self, TransportError> {
        let local_addr = listener.local_addr()?;
        let soft = fdlimit::raise_nofile_limit();
        let max_connections = fdlimit::connection_cap(limits.max_connections, soft);
        if max_connections < limits.max_connections {
            tracing::warn!(
                configured = limits.max_connections,
                max_connections,
                fd_limit = soft,
                "limits.max_connections lowered to fit the file-descriptor limit"
            );
        }
        let tls_reloader = tls::TlsReloader::from_config(tls)?.map(Arc::new);
        let hangup = tls_reloader.as_ref().map(|_| tls::Hangup::listen());
        Ok(Self {
            listener,
            local_addr,
            settings: Settings {
                max_connections,
                max_connections_per_peer: limits.max_connections_per_peer,
                handshake_timeout: limits.handshake_timeout,
                idle_timeout: limits.idle_timeout,
                message_budget: limits.connection_message_budget,
                limits: limits.clone(),
            },
            tls: tls_reloader,
            tls_reload_interval: tls.reload_interval,
            hangup,
            stats: ConnStats::default(),
        })
    }

    /// The address being listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether connections are served over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The connection counters (open connections and more).
    pub fn stats(&self) -> ConnStats {
        self.stats.clone()
    }

    /// The effective settings (after the file-descriptor cap).
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Serves `app` on every accepted connection until `stop` is cancelled;
    /// then stops accepting (the listening socket is closed), asks every
    /// connection to finish (HTTP/2 GOAWAY, HTTP/1 closes after the current
    /// response), closes at once those that never finished a handshake or
    /// have no open stream, and returns when the last connection has
    /// closed. Cancelling `force` closes every connection at once (the
    /// drain deadline).
    pub async fn serve<S>(self, app: S, stop: CancellationToken, force: CancellationToken)
    where
        S: service::App,
    {
        let Transport {
            listener,
            settings,
            tls,
            tls_reload_interval,
            hangup,
            stats,
            ..
        } = self;
        if let (Some(tls), Some(hangup)) = (&tls, hangup) {
            tokio::spawn(Arc::clone(tls).watch(hangup, tls_reload_interval, stop.clone()));
        }
        let shared = Arc::new(conn::Shared::new(app, settings, tls, stop, force));
        let connections = TaskTracker::new();
        accept::run(listener, &shared, &stats, &connections).await;
        connections.close();
        connections.wait().await;
    }
}
