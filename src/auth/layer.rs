//! The tower layer every request passes, and the one authorization
//! question services ask.
//!
//! [`AuthLayer`] resolves the caller's [`Identity`] from the
//! `authorization` metadata and the connection's client certificate
//! ([`PeerCertificates`]) and puts it in the request's extensions. Bad or
//! missing credentials get UNAUTHENTICATED before the handler is called,
//! so no handler side effect can happen; this covers every RPC shape and
//! every route mounted behind the layer, the hand-written Subscribe route
//! included. Health and reflection are served without credentials unless
//! configured otherwise.
//!
//! Credentials that expire (a JWT's `exp`) bound the call: the handler is
//! raced against the deadline (a client-streaming call runs entirely in
//! its handler), and the response body is wrapped so that, at the
//! deadline, no further frame is taken from the handler's stream and the
//! call ends with UNAUTHENTICATED trailers ("token expired"). Every
//! long-lived RPC gets this without code of its own.
//!
//! With `limits.max_streams_per_identity`, each identity's open calls are
//! counted from the call until its response body is dropped; one more is
//! refused with RESOURCE_EXHAUSTED.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use futures::future::{BoxFuture, Either, Ready, ready};
use http_body::Frame;
use tonic::Status;

use super::{Action, Authenticator, Identity, PeerCertificates, Resource, scope};

/// The status message a stream ends with when its credentials expire.
pub const TOKEN_EXPIRED: &str = "token expired";

const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";
const REFLECTION_PREFIXES: [&str; 2] = [
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// PERMISSION_DENIED unless `identity` may do `action` on `resource`
/// named `name`; the message names the scope needed.
pub fn authorize(
    identity: &Identity,
    resource: Resource,
    action: Action,
    name: &str,
) -> Result<(), Status> {
    if identity.allows(resource, action, name) {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "identity {:?} lacks the scope {} (or a pattern matching it)",
        identity.name(),
        scope::needed(resource, action, name)
    )))
}

/// PERMISSION_DENIED unless `identity` has some scope for `action` on
/// `resource`, whatever its pattern: a list call that could list nothing
/// says so instead of answering with an empty list.
pub fn authorize_any(
    identity: &Identity,
    resource: Resource,
    action: Action,
) -> Result<(), Status> {
    if identity.scopes().grants(resource, action) {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "identity {:?} has no {}:{} scope (such as {})",
        identity.name(),
        resource.as_str(),
        action.as_str(),
        scope::needed(resource, action, "*")
    )))
}

/// The caller's identity from a request's extensions. A request that did
/// not pass [`AuthLayer`] has none and gets an identity with no scopes, so
/// a service mounted without the layer denies rather than allows.
pub fn identity(extensions: &http::Extensions) -> Identity {
    Identity::of(extensions).cloned().unwrap_or_else(|| {
        Identity::new(
            "unauthenticated",
            super::Scopes::default(),
            super::Method::None,
            None,
        )
    })
}

/// The verified client certificates of a request's connection, if any.
fn peer_certificates(
    extensions: &http::Extensions,
) -> Option<&[rustls_pki_types::CertificateDer<'static>]> {
    // The transport's verified chain (mTLS); a `PeerCertificates` put in
    // by whoever else terminates TLS in front of the layer.
    extensions
        .get::<crate::transport::ConnInfo>()
        .and_then(|info| info.client_certs.as_deref())
        .map(Vec::as_slice)
        .or_else(|| {
            extensions
                .get::<PeerCertificates>()
                .map(|certs| certs.0.as_slice())
        })
}

/// Counts each identity's open calls.
#[derive(Debug)]
struct StreamCounter {
    limit: usize,
    open: Mutex<HashMap<Arc<str>, usize>>,
}

impl StreamCounter {
    fn acquire(self: &Arc<Self>, name: Arc<str>) -> Option<Permit> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(Arc::clone(&name)).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(Permit {
            counter: Arc::clone(self),
            name,
        })
    }
}

/// One open call of an identity; released on drop.
#[derive(Debug)]
struct Permit {
    counter: Arc<StreamCounter>,
    name: Arc<str>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self
            .counter
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.name) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.name);
            }
        }
    }
}

/// The layer: see the module documentation.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
    streams: Option<Arc<StreamCounter>>,
}

impl AuthLayer {
    /// A layer authenticating with `auth`, allowing each identity at most
    /// `max_streams_per_identity` open calls (0 = no limit).
    pub fn new(auth: Arc<Authenticator>, max_streams_per_identity: usize) -> Self {
        let streams = (auth.enabled() && max_streams_per_identity > 0).then(|| {
            Arc::new(StreamCounter {
                limit: max_streams_per_identity,
                open: Mutex::default(),
            })
        });
        Self { auth, streams }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            auth: Arc::clone(&self.auth),
            streams: self.streams.clone(),
        }
    }
}

/// The service produced by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    auth: Arc<Authenticator>,
    streams: Option<Arc<StreamCounter>>,
}

impl<S> Auth<S> {
    fn is_open(&self, path: &str) -> bool {
        (self.auth.open_health() && path.starts_with(HEALTH_PREFIX))
            || (self.auth.open_reflection()
                && REFLECTION_PREFIXES.iter().any(|p| path.starts_with(p)))
    }
}

/// The layer's response: the router's body type, so a response passed
/// through is not boxed again.
type Response = http::Response<axum::body::Body>;

/// A refusal, as gRPC (a trailers-only status) or, for a plain HTTP
/// request, as the HTTP status.
fn refusal(grpc: bool, status: &Status, http_status: http::StatusCode) -> Response {
    if grpc {
        return status.clone().into_http();
    }
    let mut response =
        http::Response::new(axum::body::Body::from(format!("{}\n", status.message())));
    *response.status_mut() = http_status;
    if http_status == http::StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

impl<S, B, RB> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Either<
        Either<Ready<Result<Response, S::Error>>, PassThrough<S::Future, RB>>,
        BoxFuture<'static, Result<Response, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if !self.auth.enabled() {
            request.extensions_mut().insert(Identity::anonymous());
            return Either::Left(Either::Right(pass(self.inner.call(request))));
        }
        if self.is_open(request.uri().path()) {
            return Either::Left(Either::Right(pass(self.inner.call(request))));
        }
        let grpc = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let authorization = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(http::HeaderValue::as_bytes);
        let identity = match self
            .auth
            .authenticate(authorization, peer_certificates(request.extensions()))
        {
            Ok(identity) => identity,
            Err(err) => {
                let peer = request
                    .extensions()
                    .get::<tonic::transport::server::TcpConnectInfo>()
                    .and_then(|info| info.remote_addr)
                    .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
                tracing::info!(%peer, method = request.uri().path(), reason = %err, "call refused: unauthenticated");
                let status = Status::unauthenticated(err.to_string());
                return Either::Left(Either::Left(ready(Ok(refusal(
                    grpc,
                    &status,
                    http::StatusCode::UNAUTHORIZED,
                )))));
            }
        };
        let permit = match &self.streams {
            Some(counter) => match counter.acquire(identity.shared_name()) {
                Some(permit) => Some(permit),
                None => {
                    let status = Status::resource_exhausted(format!(
                        "identity {:?} has {} calls open, the limit (limits.max_streams_per_identity); \
                         close one first",
                        identity.name(),
                        counter.limit
                    ));
                    return Either::Left(Either::Left(ready(Ok(refusal(
                        grpc,
                        &status,
                        http::StatusCode::TOO_MANY_REQUESTS,
                    )))));
                }
            },
            None => None,
        };
        let expires_at = identity.expires_at();
        let method = request.uri().path().to_owned();
        request.extensions_mut().insert(identity.clone());
        let call = self.inner.call(request);
        if expires_at.is_none() && permit.is_none() {
            return Either::Left(Either::Right(pass(call)));
        }
        Either::Right(Box::pin(async move {
            let deadline = expires_at.map(deadline_of);
            let response = match deadline {
                Some(deadline) => {
                    tokio::select! {
                        biased;
                        response = call => response?,
                        () = tokio::time::sleep_until(deadline) => {
                            tracing::info!(identity = %identity.name(), %method, "call ended: token expired");
                            return Ok(refusal(grpc, &Status::unauthenticated(TOKEN_EXPIRED), http::StatusCode::UNAUTHORIZED));
                        }
                    }
                }
                None => call.await?,
            };
            // A trailers-only response (an error status) is complete.
            if response.headers().contains_key("grpc-status") {
                return Ok(response.map(axum::body::Body::new));
            }
            Ok(response.map(|body| {
                axum::body::Body::new(Guarded {
                    body: axum::body::Body::new(body),
                    deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
                    grpc,
                    ended: false,
                    _permit: permit,
                    identity,
                    method,
                })
            }))
        }))
    }
}

/// The inner service's response future, its body turned into the
/// router's body type (free when it is one already, as the routes' is).
type PassThrough<F, RB> = futures::future::MapOk<F, fn(http::Response<RB>) -> Response>;

fn pass<F, RB, E>(future: F) -> PassThrough<F, RB>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<axum::BoxError>,
{
    futures::TryFutureExt::map_ok(future, |response| response.map(axum::body::Body::new))
}

/// When `at` comes, on tokio's clock.
fn deadline_of(at: SystemTime) -> tokio::time::Instant {
    let left = at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    tokio::time::Instant::now() + left
}

/// A response body that ends at its credentials' expiry and holds the
/// identity's call permit while it lives.
struct Guarded {
    body: axum::body::Body,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    grpc: bool,
    ended: bool,
    _permit: Option<Permit>,
    identity: Identity,
    method: String,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let this = &mut *self;
        if let Some(deadline) = &mut this.deadline {
            // Checked before every frame, so nothing the handler produces
            // after the deadline goes out (a timer may fire a little late).
            if tokio::time::Instant::now() >= deadline.deadline()
                || deadline.as_mut().poll(cx).is_ready()
            {
                this.ended = true;
                tracing::info!(identity = %this.identity.name(), method = %this.method, "stream ended: token expired");
                if !this.grpc {
                    return Poll::Ready(Some(Err(axum::Error::new(Status::unauthenticated(
                        TOKEN_EXPIRED,
                    )))));
                }
                let mut trailers = http::HeaderMap::new();
                return Poll::Ready(Some(
                    Status::unauthenticated(TOKEN_EXPIRED)
                        .add_header(&mut trailers)
                        .map(|()| Frame::trailers(trailers))
                        .map_err(axum::Error::new),
                ));
            }
        }
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(status))) => {
                this.ended = true;
                Poll::Ready(Some(Err(status)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_trailers() {
                    this.ended = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || (self.deadline.is_none() && self.body.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        if self.deadline.is_some() {
            http_body::SizeHint::default()
        } else {
            self.body.size_hint()
        }
    }
}
