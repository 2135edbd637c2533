//! Pieces shared by every gRPC service: the log line of each stream, the
//! request gate that counts calls and refuses new ones while draining, and
//! the status every stream ends with on shutdown.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use futures::future::{Either, Ready, ready};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::shutdown::SHUTTING_DOWN;

/// The status every stream ends with when the server shuts down.
pub fn shutting_down() -> Status {
    Status::unavailable(SHUTTING_DOWN)
}

/// The peer address of a request, for logs.
pub fn peer<T>(request: &tonic::Request<T>) -> String {
    request
        .remote_addr()
        .map_or_else(|| "unknown".to_owned(), |addr| addr.to_string())
}

/// Logs one line when a stream opens and one when it closes, with why and
/// the caller's identity.
///
/// The close line is written on drop, so a stream dropped by tonic because
/// the client went away is logged too.
#[derive(Debug)]
pub struct StreamLog {
    peer: String,
    identity: String,
    method: &'static str,
    subject: String,
    reason: Option<String>,
    opened: Instant,
}

impl StreamLog {
    /// Logs the opening of `method` by the peer of `request`, about
    /// `subject` (a service name, an upload, a room).
    pub fn open<T>(request: &tonic::Request<T>, method: &'static str, subject: &str) -> Self {
        let log = Self {
            peer: peer(request),
            identity: crate::auth::Identity::of(request.extensions())
                .map_or_else(|| "unknown".to_owned(), |who| who.name().to_owned()),
            method,
            subject: subject.to_owned(),
            reason: None,
            opened: Instant::now(),
        };
        tracing::info!(peer = %log.peer, identity = %log.identity, method, subject, "stream opened");
        log
    }

    /// Sets what the stream is about, once it is known.
    pub fn set_subject(&mut self, subject: &str) {
        if self.subject != subject {
            subject.clone_into(&mut self.subject);
        }
    }

    /// Records why the stream ended; the first reason given wins.
    pub fn end(&mut self, reason: impl Into<String>) {
        if self.reason.is_none() {
            self.reason = Some(reason.into());
        }
    }
}

impl Drop for StreamLog {
    fn drop(&mut self) {
        let reason = self.reason.as_deref().unwrap_or("client went away");
        tracing::info!(
            peer = %self.peer,
            identity = %self.identity,
            method = self.method,
            subject = %self.subject,
            reason,
            duration_ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX),
            "stream closed"
        );
    }
}

/// Tower layer in front of every service: counts RPCs and, once shutdown
/// has started, refuses new calls with UNAVAILABLE (health checks excepted,
/// so probes can still see NOT_SERVING).
#[derive(Debug, Clone)]
pub struct GateLayer {
    token: CancellationToken,
    calls: Arc<AtomicU64>,
}

impl GateLayer {
    /// A gate watching `token`, counting calls in `calls`.
    pub fn new(token: CancellationToken, calls: Arc<AtomicU64>) -> Self {
        Self { token, calls }
    }
}

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Gate {
            inner,
            token: self.token.clone(),
            calls: Arc::clone(&self.calls),
        }
    }
}

/// The service produced by [`GateLayer`].
#[derive(Debug, Clone)]
pub struct Gate<S> {
    inner: S,
    token: CancellationToken,
    calls: Arc<AtomicU64>,
}

const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

impl<S, B> tower::Service<http::Request<B>> for Gate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if self.token.is_cancelled() && !request.uri().path().starts_with(HEALTH_PREFIX) {
            return Either::Left(ready(Ok(shutting_down().into_http())));
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        Either::Right(self.inner.call(request))
    }
}
