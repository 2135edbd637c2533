//! One connection's life, in its own task.
//!
//! 1. TCP options (no delay, keepalive).
//! 2. TLS, if configured, within `limits.handshake_timeout` of the accept.
//! 3. HTTP (hyper-util `auto`: HTTP/1.1 or HTTP/2 by the first bytes). The
//!    client must finish its handshake (HTTP/2 preface and SETTINGS, or a
//!    first HTTP/1.1 request) by the same deadline, or the connection is
//!    closed.
//! 4. While serving: a connection with no open stream for
//!    `limits.idle_timeout` is asked to close (GOAWAY); one older than
//!    `limits.max_connection_age` too, and forced after the grace.
//! 5. Draining (idle, age, or server shutdown): hyper sends GOAWAY and lets
//!    open streams finish. A draining connection with no open stream is
//!    closed after [`GOAWAY_GRACE`] even if the peer never answers. A
//!    connection that has not finished its handshake when shutdown starts
//!    is closed at once: it has nothing to drain.
//! 6. The drain deadline (`force`) closes whatever is left.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto::Builder,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    time::{Instant, MissedTickBehavior},
};
use tokio_util::sync::CancellationToken;

use super::{
    ConnInfo, ConnSlot, ConnStats, Settings,
    accept::LogLimiter,
    handshake::Watched,
    service::{App, ConnService, ConnState, open_streams},
    tls::TlsReloader,
};
use std::sync::{Mutex, PoisonError, atomic::Ordering};

/// How long a draining connection without open streams may take to
/// finish the GOAWAY exchange before it is closed anyway.
pub const GOAWAY_GRACE: Duration = Duration::from_secs(1);

/// "Never", for timers that are not armed (about 30 years).
const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// Quiet idle checks in a row that make a connection idle; the checks run
/// every quarter of `limits.idle_timeout`, so a connection is closed
/// between one and one and a quarter idle timeouts after its last stream.
const IDLE_CHECKS: u32 = 4;

/// What every connection task shares.
pub(super) struct Shared<S> {
    app: S,
    settings: Settings,
    tls: Option<Arc<TlsReloader>>,
    stop: CancellationToken,
    force: CancellationToken,
    builder: Builder<TokioExecutor>,
    tls_failures: Mutex<LogLimiter>,
}

impl<S> Shared<S> {
    pub(super) fn new(
        app: S,
        settings: Settings,
        tls: Option<Arc<TlsReloader>>,
        stop: CancellationToken,
        force: CancellationToken,
    ) -> Self {
        let builder = http_builder(&settings);
        Self {
            app,
            settings,
            tls,
            stop,
            force,
            builder,
            tls_failures: Mutex::new(LogLimiter::default()),
        }
    }

    pub(super) fn settings(&self) -> &Settings {
        &self.settings
    }

    pub(super) fn stop(&self) -> &CancellationToken {
        &self.stop
    }
}

/// hyper's connection builder with every `limits.*` setting.
fn http_builder(settings: &Settings) -> Builder<TokioExecutor> {
    let limits = &settings.limits;
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Every request head after the first must also arrive in time
        // (the first is the handshake, watched by the task).
        .header_read_timeout(settings.handshake_timeout)
        // The request head must fit hyper's read buffer, so this bounds
        // HTTP/1.1 headers by `limits.max_header_list_size` like HTTP/2's
        // (431 and close beyond it); hyper's floor is 8 KiB.
        .max_buf_size(http1_buf_size(limits.max_header_list_size));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(limits.max_local_error_reset_streams)
        .keep_alive_interval(limits.http2_keepalive_interval)
        .keep_alive_timeout(limits.http2_keepalive_timeout)
        .initial_stream_window_size(limits.initial_stream_window_size)
        .initial_connection_window_size(limits.initial_connection_window_size)
        .max_frame_size(limits.max_frame_size)
        .max_header_list_size(limits.max_header_list_size);
    builder
}

/// hyper's HTTP/1.1 read buffer for a header limit of `max_header_list_size`
/// bytes: the limit itself, but at least hyper's minimum of 8 KiB.
fn http1_buf_size(max_header_list_size: u32) -> usize {
    usize::try_from(max_header_list_size)
        .unwrap_or(usize::MAX)
        .max(8 * 1024)
}

/// Serves one accepted connection until it closes.
pub(super) async fn run<S: App>(
    stream: TcpStream,
    remote_addr: SocketAddr,
    shared: Arc<Shared<S>>,
    stats: ConnStats,
    slot: ConnSlot,
) {
    let _slot = slot;
    let deadline = Instant::now() + shared.settings.handshake_timeout;
    set_socket_options(&stream, &shared.settings, remote_addr);
    let local_addr = match stream.local_addr() {
        Ok(addr) => addr,
        Err(err) => {
            tracing::debug!(peer = %remote_addr, %err, "connection gone before it was served");
            return;
        }
    };
    let mut info = ConnInfo {
        remote_addr,
        local_addr,
        tls: false,
        client_certs: None,
    };
    let Some(tls) = &shared.tls else {
        return serve(stream, info, deadline, &shared, &stats).await;
    };
    let acceptor = tls.acceptor();
    let accepted = tokio::select! {
        biased;
        () = shared.force.cancelled() => return,
        () = shared.stop.cancelled() => return,
        accepted = tokio::time::timeout_at(deadline, acceptor.accept(stream)) => accepted,
    };
    let stream = match accepted {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            let suppressed = shared
                .tls_failures
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .allow();
            if let Some(suppressed) = suppressed {
                tracing::info!(peer = %remote_addr, %err, suppressed, "TLS handshake failed");
            }
            return;
        }
        Err(_) => {
            stats
                .inner
                .handshake_timeouts
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %remote_addr, "TLS handshake timed out: connection closed");
            return;
        }
    };
    info.tls = true;
    info.client_certs = stream
        .get_ref()
        .1
        .peer_certificates()
        .map(|chain| Arc::new(chain.to_vec()));
    serve(stream, info, deadline, &shared, &stats).await;
}

fn set_socket_options(stream: &TcpStream, settings: &Settings, peer: SocketAddr) {
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(%peer, %err, "cannot set TCP_NODELAY");
    }
    let keepalive = socket2::TcpKeepalive::new().with_time(settings.limits.tcp_keepalive);
    if let Err(err) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(%peer, %err, "cannot set TCP keepalive");
    }
}

/// Why a connection's task let go of it.
#[derive(Debug, Clone, Copy)]
enum Closed {
    /// hyper finished (the peer closed, or a graceful close completed).
    Done,
    /// No handshake by the deadline.
    Handshake,
    /// Shutdown started before the handshake completed.
    ShutdownBeforeHandshake,
    /// Draining with no stream open, and the peer did not close.
    Drained,
    /// Past `max_connection_age` plus its grace.
    Age,
    /// The drain deadline passed.
    Forced,
}

/// Serves HTTP on `io` (plain or TLS) until the connection closes.
async fn serve<S, IO>(
    io: IO,
    info: ConnInfo,
    handshake_deadline: Instant,
    shared: &Shared<S>,
    stats: &ConnStats,
) where
    S: App,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let settings = &shared.settings;
    let peer = info.remote_addr;
    let state = Arc::new(ConnState::new(
        settings.message_budget,
        settings.limits.max_message_size,
    ));
    let io = Watched::new(io, {
        let state = Arc::clone(&state);
        move || state.mark_handshaken()
    });
    let service = ConnService::new(shared.app.clone(), Arc::clone(&state), info);
    let conn = shared.builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);

    let handshake = tokio::time::sleep_until(handshake_deadline);
    tokio::pin!(handshake);
    let mut handshake_checked = false;

    let check_every = (settings.idle_timeout / IDLE_CHECKS).max(Duration::from_millis(1));
    let mut idle_checks = tokio::time::interval_at(Instant::now() + check_every, check_every);
    idle_checks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut idle = IdleWatch::new(state.activity());

    let age_limit = settings.limits.max_connection_age;
    let age = tokio::time::sleep(age_limit.unwrap_or(FAR));
    tokio::pin!(age);
    let mut aged = false;

    let drain_check = tokio::time::sleep(FAR);
    tokio::pin!(drain_check);
    let mut draining = false;

    let closed = loop {
        tokio::select! {
            biased;
            result = conn.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(%peer, %err, "connection ended with an error");
                }
                break Closed::Done;
            }
            () = shared.force.cancelled() => break Closed::Forced,
            () = &mut handshake, if !handshake_checked => {
                if !state.is_handshaken() {
                    stats.inner.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                    break Closed::Handshake;
                }
                handshake_checked = true;
            }
            () = shared.stop.cancelled(), if !draining => {
                if !state.is_handshaken() {
                    break Closed::ShutdownBeforeHandshake;
                }
                conn.as_mut().graceful_shutdown();
                draining = true;
                drain_check.as_mut().reset(Instant::now() + GOAWAY_GRACE);
            }
            _ = idle_checks.tick(), if !draining => {
                if idle.check(state.activity(), state.is_handshaken()) {
                    stats.inner.idle_closed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, idle_timeout = ?settings.idle_timeout, "idle connection: closing");
                    conn.as_mut().graceful_shutdown();
                    draining = true;
                    drain_check.as_mut().reset(Instant::now() + GOAWAY_GRACE);
                }
            }
            () = &mut drain_check, if draining => {
                if state.open_streams() == 0 {
                    break Closed::Drained;
                }
                drain_check.as_mut().reset(Instant::now() + GOAWAY_GRACE);
            }
            () = &mut age, if age_limit.is_some() => {
                if aged {
                    break Closed::Age;
                }
                aged = true;
                conn.as_mut().graceful_shutdown();
                draining = true;
                drain_check.as_mut().reset(Instant::now() + GOAWAY_GRACE);
                let grace = settings.limits.max_connection_age_grace.unwrap_or(FAR);
                age.as_mut().reset(Instant::now() + grace);
            }
        }
    };
    match closed {
        Closed::Done => tracing::trace!(%peer, "connection closed"),
        Closed::Handshake => tracing::debug!(
            %peer,
            handshake_timeout = ?settings.handshake_timeout,
            "no HTTP handshake in time: connection closed"
        ),
        Closed::Forced => tracing::debug!(%peer, "drain deadline passed: connection closed"),
        other => tracing::debug!(%peer, reason = ?other, "connection closed"),
    }
}

/// Decides when a connection is idle from readings of its activity word.
#[derive(Debug)]
struct IdleWatch {
    last: u64,
    quiet: u32,
}

impl IdleWatch {
    fn new(activity: u64) -> Self {
        Self {
            last: activity,
            quiet: 0,
        }
    }

    /// One periodic check: true once [`IDLE_CHECKS`] checks in a row saw
    /// no stream open and nothing happen.
    fn check(&mut self, activity: u64, handshaken: bool) -> bool {
        if !handshaken || activity != self.last || open_streams(activity) > 0 {
            self.last = activity;
            self.quiet = 0;
            return false;
        }
        self.quiet += 1;
        self.quiet >= IDLE_CHECKS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_needs_quiet_checks_in_a_row_without_open_streams() {
        let mut watch = IdleWatch::new(0);
        // Not handshaken: never idle.
        for _ in 0..10 {
            assert!(!watch.check(0, false));
        }
        // Handshake completed (an event), then quiet.
        let after_handshake = 1 << 32;
        assert!(!watch.check(after_handshake, true));
        for _ in 1..IDLE_CHECKS {
            assert!(!watch.check(after_handshake, true));
        }
        assert!(watch.check(after_handshake, true));

        // A stream open the whole time is never idle.
        let mut watch = IdleWatch::new(0);
        let one_open = (1 << 32) | 1;
        for _ in 0..10 {
            assert!(!watch.check(one_open, true));
        }
        // A stream that opened and closed between checks restarts the count.
        let closed = one_open + (1 << 32) - 1;
        assert!(!watch.check(closed, true));
        for _ in 1..IDLE_CHECKS {
            assert!(!watch.check(closed, true));
        }
        assert!(watch.check(closed, true));
    }
}
