//! The service each connection runs: what it adds to every request and
//! what it counts.
//!
//! - Every request gets tonic's `TcpConnectInfo` (so `Request::remote_addr`
//!   works) and a [`ConnInfo`] in its extensions.
//! - Every stream (HTTP/2) or request (HTTP/1.1) is counted open from the
//!   request's arrival until its response body has been sent or dropped;
//!   the connection's idle timeout looks at that count and nothing else, so
//!   keepalive pings do not keep a connection alive. One atomic add at the
//!   start and one at the end of a stream: no lock, no allocation.
//! - The request body of a gRPC call is metered: each call is charged the
//!   largest message length it has announced (tonic reserves that much for
//!   the call's receive buffer and keeps it for the call's life) against a
//!   per-connection budget, `limits.connection_message_budget`; a message
//!   that would pass it ends the call with RESOURCE_EXHAUSTED. So one
//!   connection cannot hold `max_concurrent_streams × max_message_size`
//!   bytes of half-sent messages.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tonic::transport::server::TcpConnectInfo;

use super::ConnInfo;

/// The boxed error type of bodies and services.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the transport serves: a cloneable tower service taking
/// [`RequestBody`] requests, e.g. an `axum::Router` wrapped in
/// `tonic::service::RecoverError`. Implemented for every such service.
pub trait App: Clone + Send + Sync + 'static {
    /// The response body.
    type Body: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static;
    /// The service's error (turned into a connection error by hyper).
    type Error: Into<BoxError> + Send + 'static;
    /// The response future.
    type Future: Future<Output = Result<Response<Self::Body>, Self::Error>> + Send + 'static;

    /// Handles one request (readiness is awaited first).
    fn serve(self, request: Request<RequestBody>) -> Self::Future;
}

impl<S, B> App for S
where
    S: tower::Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    B: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static,
{
    type Body = B;
    type Error = S::Error;
    type Future = tower::util::Oneshot<S, Request<RequestBody>>;

    fn serve(self, request: Request<RequestBody>) -> Self::Future {
        tower::ServiceExt::oneshot(self, request)
    }
}

/// One added to [`ConnState::activity`] per stream event (the high half).
const EVENT: u64 = 1 << 32;

/// What one connection's streams share with its task.
#[derive(Debug)]
pub struct ConnState {
    /// Low 32 bits: streams open now. High 32 bits: a wrapping count of
    /// events (stream opened, stream closed, handshake done), so the idle
    /// check can tell "nothing happened" from "something opened and closed
    /// again". One word, so each event is one atomic add.
    activity: AtomicU64,
    handshaken: AtomicBool,
    budget_used: AtomicUsize,
    budget_limit: usize,
    max_message_size: usize,
}

impl ConnState {
    /// A new connection's state, with `budget_limit` bytes for partly
    /// received messages of at most `max_message_size` bytes.
    pub fn new(budget_limit: usize, max_message_size: usize) -> Self {
        Self {
            activity: AtomicU64::new(0),
            handshaken: AtomicBool::new(false),
            budget_used: AtomicUsize::new(0),
            budget_limit,
            max_message_size,
        }
    }

    /// The activity word: compare two readings to see whether anything
    /// happened in between; [`open_streams`] tells how many are open.
    pub fn activity(&self) -> u64 {
        self.activity.load(Ordering::Acquire)
    }

    /// Streams open now.
    pub fn open_streams(&self) -> u64 {
        open_streams(self.activity())
    }

    /// Whether the client has finished its handshake (HTTP/2 preface and
    /// SETTINGS, or a first HTTP/1.1 request).
    pub fn is_handshaken(&self) -> bool {
        self.handshaken.load(Ordering::Acquire)
    }

    /// Records that the handshake is complete (idempotent).
    pub fn mark_handshaken(&self) {
        if !self.handshaken.swap(true, Ordering::AcqRel) {
            self.activity.fetch_add(EVENT, Ordering::AcqRel);
        }
    }

    /// Bytes of partly received messages charged now.
    pub fn budget_used(&self) -> usize {
        self.budget_used.load(Ordering::Relaxed)
    }

    fn stream_opened(self: &Arc<Self>) -> StreamGuard {
        self.activity.fetch_add(EVENT + 1, Ordering::AcqRel);
        StreamGuard(Arc::clone(self))
    }
}

/// The number of open streams in an activity word.
pub fn open_streams(activity: u64) -> u64 {
    activity & (EVENT - 1)
}

/// Counts one stream open while it lives.
#[derive(Debug)]
struct StreamGuard(Arc<ConnState>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        // One event up, one stream down (the carry out of the low half
        // lands in the event count).
        self.0.activity.fetch_add(EVENT - 1, Ordering::AcqRel);
    }
}

/// The per-connection service: adds the connection's extensions, counts
/// the stream, meters gRPC request bodies, and calls the app.
#[derive(Debug, Clone)]
pub struct ConnService<S> {
    app: S,
    state: Arc<ConnState>,
    info: ConnInfo,
    tcp: TcpConnectInfo,
}

impl<S> ConnService<S> {
    /// The service of one connection.
    pub fn new(app: S, state: Arc<ConnState>, info: ConnInfo) -> Self {
        let tcp = TcpConnectInfo {
            local_addr: Some(info.local_addr),
            remote_addr: Some(info.remote_addr),
        };
        Self {
            app,
            state,
            info,
            tcp,
        }
    }
}

impl<S: App> hyper::service::Service<Request<Incoming>> for ConnService<S> {
    type Response = Response<ResponseBody<S::Body>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        let guard = self.state.stream_opened();
        if !self.state.is_handshaken() {
            // An HTTP/1.1 connection's handshake is its first request.
            self.state.mark_handshaken();
        }
        let meter = is_grpc(request.headers()).then(|| Meter::new(Arc::clone(&self.state)));
        let extensions = request.extensions_mut();
        extensions.insert(self.tcp.clone());
        extensions.insert(self.info.clone());
        let request = request.map(|body| RequestBody { inner: body, meter });
        ResponseFuture {
            inner: self.app.clone().serve(request),
            guard: Some(guard),
        }
    }
}

/// Whether a request carries gRPC framing that can be metered (binary
/// gRPC and gRPC-Web; not gRPC-Web's base64 text form).
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .map(http::HeaderValue::as_bytes)
        .is_some_and(|ct| {
            ct.starts_with(b"application/grpc") && !ct.starts_with(b"application/grpc-web-text")
        })
}

pin_project_lite::pin_project! {
    /// The response future: hands the stream's count to the body.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        guard: Option<StreamGuard>,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let guard = this.guard.take();
        Poll::Ready(Ok(response.map(|inner| ResponseBody {
            inner,
            _stream: guard,
        })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its stream counted open until it is
    /// finished or dropped.
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
        _stream: Option<StreamGuard>,
    }
}

impl<B: Body> Body for ResponseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body as the app sees it: hyper's, with gRPC messages metered
/// against the connection's budget.
#[derive(Debug)]
pub struct RequestBody {
    inner: Incoming,
    meter: Option<Meter>,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.meter.as_ref().is_some_and(|m| m.failed) {
            return Poll::Ready(None);
        }
        let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(err)) => return Poll::Ready(Some(Err(err.into()))),
            None => return Poll::Ready(None),
        };
        if let (Some(meter), Some(data)) = (this.meter.as_mut(), frame.data_ref())
            && let Err(status) = meter.observe(data.chunk())
        {
            meter.failed = true;
            return Poll::Ready(Some(Err(Box::new(status))));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Bytes before each gRPC message: a compression flag and a big-endian
/// length.
const GRPC_HEADER: usize = 5;

/// Follows one call's gRPC framing and charges the connection's budget.
#[derive(Debug)]
struct Meter {
    state: Arc<ConnState>,
    /// Bytes charged: the largest message length announced so far.
    charged: usize,
    header: [u8; GRPC_HEADER],
    header_filled: usize,
    /// Bytes of the current message still to come.
    payload_left: usize,
    failed: bool,
}

impl Meter {
    fn new(state: Arc<ConnState>) -> Self {
        Self {
            state,
            charged: 0,
            header: [0; GRPC_HEADER],
            header_filled: 0,
            payload_left: 0,
            failed: false,
        }
    }

    /// Follows `data`; charges each message length announced in it.
    fn observe(&mut self, mut data: &[u8]) -> Result<(), tonic::Status> {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let take = self.payload_left.min(data.len());
                self.payload_left -= take;
                data = &data[take..];
                continue;
            }
            let take = (GRPC_HEADER - self.header_filled).min(data.len());
            self.header[self.header_filled..self.header_filled + take]
                .copy_from_slice(&data[..take]);
            self.header_filled += take;
            data = &data[take..];
            if self.header_filled == GRPC_HEADER {
                self.header_filled = 0;
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                self.charge(len)?;
                self.payload_left = len;
            }
        }
        Ok(())
    }

    fn charge(&mut self, len: usize) -> Result<(), tonic::Status> {
        // An oversized message is refused by the decoder before it buffers
        // anything; leave that status to it.
        if len <= self.charged || len > self.state.max_message_size {
            return Ok(());
        }
        let extra = len - self.charged;
        let before = self.state.budget_used.fetch_add(extra, Ordering::AcqRel);
        if before.saturating_add(extra) > self.state.budget_limit {
            self.state.budget_used.fetch_sub(extra, Ordering::AcqRel);
            return Err(tonic::Status::resource_exhausted(format!(
                "this connection's calls already hold {before} bytes of partly received \
                 messages; a {len}-byte message would pass the connection's limit of {} \
                 bytes (limits.connection_message_budget): send it on another connection \
                 or when other calls have ended",
                self.state.budget_limit
            )));
        }
        self.charged = len;
        Ok(())
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if self.charged > 0 {
            self.state
                .budget_used
                .fetch_sub(self.charged, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests
mod tests {
    use super::*;

    fn frame(len: u32) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend(len.to_be_bytes());
        bytes.resize(GRPC_HEADER + len as usize, 7);
        bytes
    }

    #[test]
    fn activity_counts_open_streams_and_events() {
        let state = Arc::new(ConnState::new(100, 100));
        let start = state.activity();
        let a = state.stream_opened();
        let b = state.stream_opened();
        assert_eq!(state.open_streams(), 2);
        drop(a);
        assert_eq!(state.open_streams(), 1);
        drop(b);
        assert_eq!(state.open_streams(), 0);
        assert_ne!(state.activity(), start, "events are visible");
        let idle = state.activity();
        state.mark_handshaken();
        state.mark_handshaken();
        assert_eq!(state.activity(), idle + EVENT);
    }

    #[test]
    fn meter_charges_the_largest_message_in_any_split_and_gives_it_back() {
        let state = Arc::new(ConnState::new(1000, 600));
        let mut bytes = frame(10);
        bytes.extend(frame(300));
        bytes.extend(frame(20));
        bytes.extend(&frame(200)[..3]);
        for split in 0..bytes.len() {
            let mut meter = Meter::new(Arc::clone(&state));
            meter.observe(&bytes[..split]).unwrap();
            meter.observe(&bytes[split..]).unwrap();
            assert_eq!(meter.charged, 300);
            assert_eq!(state.budget_used(), 300);
            drop(meter);
            assert_eq!(state.budget_used(), 0);
        }
    }

    #[test]
    fn meter_refuses_past_the_budget_and_leaves_oversized_messages_to_the_decoder() {
        let state = Arc::new(ConnState::new(1000, 600));
        let mut first = Meter::new(Arc::clone(&state));
        first.observe(&frame(600)[..GRPC_HEADER]).unwrap();
        let mut second = Meter::new(Arc::clone(&state));
        let status = second.observe(&frame(500)[..GRPC_HEADER]).unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("connection_message_budget"),
            "{status:?}"
        );
        assert_eq!(state.budget_used(), 600);
        // Over max_message_size: not charged, the decoder refuses it.
        second.observe(&frame(5000)[..GRPC_HEADER]).unwrap();
        assert_eq!(state.budget_used(), 600);
        drop((first, second));
        let mut third = Meter::new(Arc::clone(&state));
        third.observe(&frame(400)[..GRPC_HEADER]).unwrap();
        assert_eq!(state.budget_used(), 400);
    }

    #[test]
    fn grpc_content_types_are_metered() {
        let headers = |ct: &'static str| {
            let mut map = http::HeaderMap::new();
            map.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(ct),
            );
            map
        };
        assert!(is_grpc(&headers("application/grpc")));
        assert!(is_grpc(&headers("application/grpc+proto")));
        assert!(is_grpc(&headers("application/grpc-web+proto")));
        assert!(!is_grpc(&headers("application/grpc-web-text")));
        assert!(!is_grpc(&headers("application/json")));
        assert!(!is_grpc(&http::HeaderMap::new()));
    }
}
