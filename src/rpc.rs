//! Pieces shared by every gRPC service: the log line of each stream, the
//! request gate that counts calls and refuses new ones while draining, the
//! status every stream ends with on shutdown, and the call layer that ends
//! every call the way the gRPC spec says (deadlines, size limits, request
//! cardinality) and counts it.

use std::{
    collections::HashSet,
    future::Future,
    pin::Pin,
    sync::{
        Arc, LazyLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::future::{Either, Ready, ready};
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::{
    calls::{CallStats, OpenCall},
    shutdown::SHUTTING_DOWN,
};

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
/// the client went away, or because its deadline passed, is logged too.
#[derive(Debug)]
pub struct StreamLog {
    peer: String,
    identity: String,
    method: &'static str,
    subject: String,
    reason: Option<String>,
    opened: Instant,
    deadline: Option<Deadline>,
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
            deadline: request.extensions().get::<Deadline>().copied(),
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
        // A stream dropped without a reason was cancelled: by its client,
        // or by `StatusLayer` when its deadline passed.
        let reason = self.reason.as_deref().unwrap_or_else(|| {
            if self.deadline.is_some_and(Deadline::passed) {
                "deadline passed"
            } else {
                "client went away"
            }
        });
        tracing::info!(
            peer = %self.peer,
            identity = %self.identity,
            method = self.method,
            // Debug: a client-chosen name cannot forge log lines.
            subject = ?self.subject,
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

impl<S, B, ResBody> tower::Service<http::Request<B>> for Gate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>,
    ResBody: Default,
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

/// The deadline of a call, from its `grpc-timeout` header, as
/// [`StatusLayer`] puts it in the request's extensions (and so in
/// `tonic::Request::extensions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub tokio::time::Instant);

impl Deadline {
    /// The deadline carried by `extensions`, if the call has one.
    pub fn of(extensions: &http::Extensions) -> Option<Self> {
        extensions.get::<Self>().copied()
    }

    /// Whether the deadline has passed.
    pub fn passed(self) -> bool {
        tokio::time::Instant::now() >= self.0
    }
}

/// Parses a `grpc-timeout` value: at most 8 digits and a unit (`H`, `M`,
/// `S`, `m`, `u`, `n`), as the gRPC over HTTP/2 protocol defines it.
/// `None` for anything else (the call is then refused with INTERNAL
/// naming the header, as grpc-go does; tonic ignored it, so the call ran
/// without a deadline).
pub fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Tower layer in front of every route (generated, hand-written, and any
/// later one) that makes each call end with the status the gRPC spec gives
/// it, whatever the handler does, and counts it:
///
/// - **Deadlines**: a call whose `grpc-timeout` header is malformed is
///   refused with INTERNAL naming the header and its form, before its
///   handler runs. A call with a `grpc-timeout` header ends with
///   DEADLINE_EXCEEDED when it passes, streaming calls included. Before the
///   response headers the handler's future is dropped and a trailers-only
///   status sent; after, the response body is dropped (so the handler's
///   stream sees cancellation) and the call ends with a DEADLINE_EXCEEDED
///   trailer. The deadline is put in the request's extensions
///   ([`Deadline`]) for handlers and logs.
/// - **Oversized messages**: tonic reports a message over the size limit
///   (received or sent) as OUT_OF_RANGE; the spec says RESOURCE_EXHAUSTED.
/// - **Request cardinality**: tonic reports a unary or server-streaming
///   call without its request message as INTERNAL, and decodes and drops
///   any message after the first; the spec says UNIMPLEMENTED for both.
///   The request body of each method known to take one message
///   ([`unary_request_methods`]) is watched by a small wrapper that fails
///   the call as soon as a second message begins (it counts frame lengths,
///   buffers nothing). Streaming-request methods, and Subscribe (its route
///   checks this itself, off the fan-out path), are not wrapped.
/// - **Counting** ([`CallStats`], if given): each call of a served method
///   is open from its request until its response body is dropped, then
///   finished with the status it ended with (after the rewrites above).
///
/// All of it is one wrapper around the response body ([`CallBody`]), so a
/// message of a long stream passes one extra `poll_frame` and one boxing
/// (into `axum::body::Body`, the router's body type), not one per concern.
///
/// The size limit and a missing request are recognised by tonic's own
/// status messages (pinned by `tests/statuses.rs`), in trailers-only
/// responses and in trailers alike.
#[derive(Debug, Clone, Default)]
pub struct StatusLayer {
    calls: Option<Arc<CallStats>>,
}

impl StatusLayer {
    /// The layer, counting calls in `calls` (`None`: not counted).
    pub fn new(calls: Option<Arc<CallStats>>) -> Self {
        Self { calls }
    }
}

impl<S> tower::Layer<S> for StatusLayer {
    type Service = Call<S>;

    fn layer(&self, inner: S) -> Self::Service {
        // Built as the routes are, not on the first call.
        LazyLock::force(&UNARY_REQUEST);
        Call {
            inner,
            calls: self.calls.clone(),
        }
    }
}

/// The service produced by [`StatusLayer`].
#[derive(Debug, Clone)]
pub struct Call<S> {
    inner: S,
    calls: Option<Arc<CallStats>>,
}

impl<S, RB> tower::Service<http::Request<axum::body::Body>> for Call<S>
where
    S: tower::Service<http::Request<axum::body::Body>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    RB::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<axum::body::Body>;
    type Error = S::Error;
    type Future = CallFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<axum::body::Body>) -> Self::Future {
        let call = self
            .calls
            .as_ref()
            .and_then(|calls| calls.start(request.uri().path()));
        if let Some(method) = UNARY_REQUEST.get(request.uri().path()) {
            request = request.map(|body| axum::body::Body::new(OneMessage::new(body, method)));
        }
        let (timeout, refused) = match request.headers().get("grpc-timeout") {
            None => (None, None),
            Some(value) => match parse_grpc_timeout(value.as_bytes()) {
                Some(timeout) => (Some(timeout), None),
                // As grpc-go: a call must not run without the deadline
                // its client meant to set.
                None if is_grpc(request.headers()) => {
                    (None, Some(malformed_timeout(value.as_bytes())))
                }
                None => (None, None),
            },
        };
        if let Some(status) = refused {
            return CallFuture {
                inner: None,
                deadline: None,
                call,
                refused: Some(status),
            };
        }
        let mut deadline = None;
        if let Some(timeout) = timeout {
            let at = tokio::time::Instant::now() + timeout;
            request.extensions_mut().insert(Deadline(at));
            deadline = Some(CallDeadline {
                sleep: Box::pin(tokio::time::sleep_until(at)),
                timeout,
            });
        }
        CallFuture {
            inner: Some(Box::pin(self.inner.call(request))),
            deadline,
            call,
            refused: None,
        }
    }
}

/// Whether a request is a gRPC call (`content-type: application/grpc…`).
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// INTERNAL for a `grpc-timeout` header that is not the protocol's form.
fn malformed_timeout(value: &[u8]) -> Status {
    let shown: String = String::from_utf8_lossy(value).chars().take(32).collect();
    Status::internal(format!(
        "malformed grpc-timeout header {shown:?}: expected 1 to 8 digits and a unit \
         (H, M, S, m, u or n), e.g. 500m or 30S"
    ))
}

/// Trailers a handler wants on its call's DEADLINE_EXCEEDED ending, which
/// [`StatusLayer`] writes after dropping the handler's stream (so the
/// handler cannot): put in the response's extensions (tonic carries them
/// to the HTTP response); called once, when the deadline passes. Chat
/// adds `chat-last-seq`, as every other ending of a chat call has.
#[derive(Clone)]
pub struct DeadlineTrailers(pub Arc<dyn Fn(&mut http::HeaderMap) + Send + Sync>);

impl std::fmt::Debug for DeadlineTrailers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeadlineTrailers")
    }
}

/// A call's deadline: its timer and the timeout the client asked for.
struct CallDeadline {
    sleep: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
}

impl CallDeadline {
    fn status(&self) -> Status {
        Status::deadline_exceeded(format!(
            "the call's deadline passed (grpc-timeout {:?})",
            self.timeout
        ))
    }
}

/// The response future of [`Call`].
pub struct CallFuture<F> {
    inner: Option<Pin<Box<F>>>,
    deadline: Option<CallDeadline>,
    /// Dropped with the future if the client goes away first (CANCELLED).
    call: Option<OpenCall>,
    /// The status of a call refused before its handler ran (a malformed
    /// `grpc-timeout`), answered trailers-only.
    refused: Option<Status>,
}

impl<F> std::fmt::Debug for CallFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallFuture").finish_non_exhaustive()
    }
}

impl<F, E, RB> Future for CallFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
    RB: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    RB::Error: Into<tonic::codegen::StdError>,
{
    type Output = Result<http::Response<axum::body::Body>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Some(status) = this.refused.take() {
            let response: http::Response<axum::body::Body> = status.into_http();
            if let Some(call) = &mut this.call {
                call.saw(response.headers());
            }
            this.call = None;
            return Poll::Ready(Ok(response));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Pending;
        };
        if let Poll::Ready(result) = inner.as_mut().poll(cx) {
            this.inner = None;
            let mut call = this.call.take();
            return Poll::Ready(result.map(|response| {
                let (mut parts, body) = response.into_parts();
                fix_status(&mut parts.headers);
                if let Some(call) = &mut call {
                    // A trailers-only response carries its status here.
                    call.saw(&parts.headers);
                }
                let body = CallBody {
                    inner: Some(body),
                    deadline: this.deadline.take(),
                    extra: parts.extensions.get::<DeadlineTrailers>().cloned(),
                    call,
                };
                http::Response::from_parts(parts, axum::body::Body::new(body))
            }));
        }
        if let Some(deadline) = this.deadline.as_mut()
            && deadline.sleep.as_mut().poll(cx).is_ready()
        {
            // Dropping the handler's future cancels it.
            this.inner = None;
            let response: http::Response<axum::body::Body> = deadline.status().into_http();
            if let Some(call) = &mut this.call {
                call.saw(response.headers());
            }
            // Counted finished now: the response is complete.
            this.call = None;
            return Poll::Ready(Ok(response));
        }
        Poll::Pending
    }
}

/// A response body that ends with DEADLINE_EXCEEDED when the call's
/// deadline passes, whose trailers say the spec's status, and that keeps
/// its call counted open until it is dropped.
struct CallBody<B> {
    /// `None` once the call has ended.
    inner: Option<B>,
    deadline: Option<CallDeadline>,
    /// What the handler adds to a DEADLINE_EXCEEDED ending's trailers.
    extra: Option<DeadlineTrailers>,
    call: Option<OpenCall>,
}

impl<B> CallBody<B> {
    /// Ends the call with `trailers` (counted with their status).
    fn end_with(&mut self, trailers: &http::HeaderMap) {
        self.inner = None;
        if let Some(call) = &mut self.call {
            call.saw(trailers);
        }
    }
}

impl<B> http_body::Body for CallBody<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Status>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some(deadline) = this.deadline.as_mut()
            && deadline.sleep.as_mut().poll(cx).is_ready()
        {
            // Dropping the body drops the handler's stream.
            let mut trailers = http::HeaderMap::new();
            let added = deadline.status().add_header(&mut trailers);
            if let Some(extra) = &this.extra {
                (extra.0)(&mut trailers);
            }
            this.end_with(&trailers);
            return Poll::Ready(Some(added.map(|()| http_body::Frame::trailers(trailers))));
        }
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(mut frame))) => {
                if let Some(trailers) = frame.trailers_mut() {
                    fix_status(trailers);
                    this.end_with(trailers);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(Status::from_error(err.into())))),
            Poll::Ready(None) => {
                this.inner = None;
                if let Some(call) = &mut this.call {
                    call.ended();
                }
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match (&self.inner, &self.deadline) {
            (Some(inner), None) => inner.size_hint(),
            _ => http_body::SizeHint::default(),
        }
    }
}

/// The paths of the methods whose request is one message.
static UNARY_REQUEST: LazyLock<HashSet<String>> = LazyLock::new(|| {
    let mut methods = unary_request_methods(&[
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ]);
    // Its route checks the cardinality itself, next to its fan-out.
    methods.remove(crate::telemetry::route::SUBSCRIBE_PATH);
    methods
});

/// The paths (`/package.Service/Method`) of every unary and
/// server-streaming method in the encoded `FileDescriptorSet`s `sets`: the
/// methods whose request is exactly one message. A set that does not
/// decode is logged and skipped.
pub fn unary_request_methods(sets: &[&[u8]]) -> HashSet<String> {
    let mut methods = HashSet::new();
    for set in sets {
        let set = match prost_types::FileDescriptorSet::decode(*set) {
            Ok(set) => set,
            Err(err) => {
                tracing::error!(%err, "a descriptor set does not decode: its methods' request cardinality is not checked");
                continue;
            }
        };
        for file in &set.file {
            for service in &file.service {
                let service_name = if file.package().is_empty() {
                    service.name().to_owned()
                } else {
                    format!("{}.{}", file.package(), service.name())
                };
                methods.extend(
                    service
                        .method
                        .iter()
                        .filter(|method| !method.client_streaming())
                        .map(|method| format!("/{service_name}/{}", method.name())),
                );
            }
        }
    }
    methods
}

/// The request body of a call whose method takes one message: passed on
/// as it comes, except that the first byte after the first message ends
/// the call with UNIMPLEMENTED (the decoder sees the error instead of the
/// frame). Only frame lengths are counted; nothing is buffered.
struct OneMessage {
    inner: axum::body::Body,
    /// For the status message.
    method: &'static str,
    /// Bytes of the current frame header seen, up to [`FRAME_HEADER`].
    header: [u8; FRAME_HEADER],
    header_seen: usize,
    /// Bytes of the current message still to come.
    remaining: u64,
    /// Messages whose header has been seen.
    messages: u64,
    /// The call has been failed.
    failed: bool,
}

/// A gRPC frame header: compression flag, big-endian length.
const FRAME_HEADER: usize = 5;

impl OneMessage {
    fn new(inner: axum::body::Body, method: &'static str) -> Self {
        Self {
            inner,
            method,
            header: [0; FRAME_HEADER],
            header_seen: 0,
            remaining: 0,
            messages: 0,
            failed: false,
        }
    }

    /// Follows the frames through `data`; `true` once a second message
    /// begins.
    fn second_message_in(&mut self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            if self.remaining > 0 {
                let skip =
                    usize::try_from(self.remaining).map_or(data.len(), |r| r.min(data.len()));
                data = &data[skip..];
                self.remaining -= skip as u64;
                continue;
            }
            if self.header_seen == 0 && self.messages >= 1 {
                return true;
            }
            let take = (FRAME_HEADER - self.header_seen).min(data.len());
            self.header[self.header_seen..self.header_seen + take].copy_from_slice(&data[..take]);
            self.header_seen += take;
            data = &data[take..];
            if self.header_seen == FRAME_HEADER {
                let [_, a, b, c, d] = self.header;
                self.remaining = u64::from(u32::from_be_bytes([a, b, c, d]));
                self.header_seen = 0;
                self.messages += 1;
            }
        }
        false
    }
}

impl http_body::Body for OneMessage {
    type Data = bytes::Bytes;
    type Error = tonic::codegen::StdError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && this.second_message_in(data)
                {
                    this.failed = true;
                    let status = Status::unimplemented(format!(
                        "the call to {} carried a second request message; the method takes exactly one",
                        this.method
                    ));
                    return Poll::Ready(Some(Err(Box::new(status))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(Box::new(err)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// tonic's message when a message is over the size limit, sent or
/// received ("Error, decoded message length too large: …").
const TONIC_TOO_LARGE: &str = "message length too large";
/// tonic's message when a unary or server-streaming call carried no
/// request message.
const TONIC_MISSING_REQUEST: &str = "Missing request message.";

/// Rewrites the `grpc-status` in `headers` (response headers of a
/// trailers-only response, or trailers) where tonic's code deviates from
/// the gRPC spec's.
fn fix_status(headers: &mut http::HeaderMap) {
    let code = match headers
        .get(Status::GRPC_STATUS)
        .map(http::HeaderValue::as_bytes)
    {
        Some(b"11") => tonic::Code::ResourceExhausted,
        Some(b"13") => tonic::Code::Unimplemented,
        _ => return,
    };
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    let deviates = match code {
        tonic::Code::ResourceExhausted => status.message().contains(TONIC_TOO_LARGE),
        _ => status.message() == TONIC_MISSING_REQUEST,
    };
    if deviates {
        headers.insert(Status::GRPC_STATUS, http::HeaderValue::from(code as i32));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_protocol_defines_them() {
        assert_eq!(parse_grpc_timeout(b"1S"), Some(Duration::from_secs(1)));
        assert_eq!(
            parse_grpc_timeout(b"250m"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_grpc_timeout(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout(b"3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout(b"5u"), Some(Duration::from_micros(5)));
        assert_eq!(
            parse_grpc_timeout(b"99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in [&b""[..], b"S", b"123456789S", b"1s", b"-1S", b"1.5S", b"10"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_methods_taking_one_message_are_known() {
        let methods = &*UNARY_REQUEST;
        for unary in [
            "/telemetry.TelemetryService/GetSnapshot",
            "/fileupload.FileUploadService/Download",
            "/chat.ChatService/WatchRoom",
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/streamhub.ServerService/WhoAmI",
        ] {
            assert!(methods.contains(unary), "{unary}");
        }
        for streaming in [
            "/telemetry.TelemetryService/LiveFeed",
            "/telemetry.TelemetryService/Subscribe",
            "/fileupload.FileUploadService/Upload",
            "/chat.ChatService/Chat",
        ] {
            assert!(!methods.contains(streaming), "{streaming}");
        }
    }

    #[test]
    fn a_second_message_is_seen_wherever_the_data_frames_split() {
        let message = |len: u8| {
            let mut frame = vec![0, 0, 0, 0, len];
            frame.extend(std::iter::repeat_n(7, usize::from(len)));
            frame
        };
        let one = [message(3), message(0)].concat();
        let two = [message(3), message(0), message(1)].concat();
        // The first message and an empty second one, then a third.
        for split in 0..=two.len() {
            for (bytes, second_at) in [(&one[..8], None), (&one[..], Some(8)), (&two[..], Some(8))]
            {
                let split = split.min(bytes.len());
                let mut body = OneMessage::new(axum::body::Body::empty(), "/m");
                let first = body.second_message_in(&bytes[..split]);
                let seen = first || body.second_message_in(&bytes[split..]);
                assert_eq!(seen, second_at.is_some(), "{bytes:?} split at {split}");
                if let Some(at) = second_at {
                    assert_eq!(first, split > at, "{bytes:?} split at {split}");
                }
            }
        }
    }

    #[test]
    fn only_tonics_deviating_statuses_are_rewritten() {
        let fixed = |status: Status| {
            let mut headers = http::HeaderMap::new();
            status.add_header(&mut headers).expect("valid");
            fix_status(&mut headers);
            Status::from_header_map(&headers).expect("status").code()
        };
        let large = "Error, decoded message length too large: found 9 bytes, the limit is: 4 bytes";
        assert_eq!(
            fixed(Status::out_of_range(large)),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(
            fixed(Status::out_of_range("history gap")),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            fixed(Status::internal(TONIC_MISSING_REQUEST)),
            tonic::Code::Unimplemented
        );
        assert_eq!(fixed(Status::internal("broken")), tonic::Code::Internal);
        assert_eq!(fixed(Status::ok("")), tonic::Code::Ok);
    }
}
