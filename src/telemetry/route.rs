//! The telemetry service's HTTP routes, with Subscribe served as
//! ready-made gRPC frames.
//!
//! tonic sends each message of a server stream through its generic encoder:
//! the message is encoded into the call's buffer, split off as a chunk, and
//! passed through a chain of body wrappers, once per delivery. Subscribe is
//! the fan-out path, where one sample becomes thousands of deliveries, so it
//! is served here instead: each sample is encoded once, straight into its
//! gRPC frame (the 5-byte length prefix and the `MetricsResponse`), by the
//! first subscriber that sends it; the others of that service share the
//! bytes, and each response body hands them to HTTP/2 as they are. Everything else about the call is what tonic's generated route
//! does: the request is decoded by tonic's `Streaming`, a refusal is a
//! trailers-only status, and the stream ends with `grpc-status` trailers.
//! Every other method goes to the generated server.

use std::{
    collections::HashMap,
    convert::Infallible,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, ready},
};

use bytes::{BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use http_body::Frame;
use prost::Message;
use tonic::{Request, Status, Streaming, codec::Codec, server::NamedService};

use super::{
    Sample,
    service::{BoxStream, TelemetryService},
};
use crate::{
    codec::SmallBufferCodec,
    proto::telemetry::{
        MetricsRequest, MetricsResponse, telemetry_service_server::TelemetryServiceServer,
    },
};

/// The HTTP path of `TelemetryService.Subscribe`.
pub const SUBSCRIBE_PATH: &str = "/telemetry.TelemetryService/Subscribe";

/// Bytes before each message in a gRPC frame: a compression flag and a
/// big-endian length.
const FRAME_HEADER: usize = 5;

/// The telemetry service as the server mounts it.
#[derive(Debug, Clone)]
pub struct TelemetryServer {
    service: TelemetryService,
    generated: TelemetryServiceServer<TelemetryService>,
    max_message_size: usize,
    frames: Arc<SharedFrames>,
}

impl TelemetryServer {
    pub(super) fn new(
        service: TelemetryService,
        generated: TelemetryServiceServer<TelemetryService>,
        max_message_size: usize,
    ) -> Self {
        let frames: Arc<SharedFrames> = Arc::default();
        let weak = Arc::downgrade(&frames);
        service.hub().on_drop(move |name| {
            if let Some(frames) = weak.upgrade() {
                frames.forget(name);
            }
        });
        Self {
            service,
            generated,
            max_message_size,
            frames,
        }
    }
}

impl NamedService for TelemetryServer {
    const NAME: &'static str = <TelemetryServiceServer<TelemetryService> as NamedService>::NAME;
}

impl tower::Service<http::Request<tonic::body::Body>> for TelemetryServer {
    // The router's body type: a Subscribe body is boxed once, into it.
    type Response = http::Response<axum::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() != SUBSCRIBE_PATH {
            let call = self.generated.call(request);
            return Box::pin(async move { Ok(call.await?.map(axum::body::Body::new)) });
        }
        let service = self.service.clone();
        let max_message_size = self.max_message_size;
        let frames = Arc::clone(&self.frames);
        Box::pin(async move {
            Ok(
                match subscribe(&service, request, max_message_size, frames).await {
                    Ok(frames) => {
                        let mut response = http::Response::new(axum::body::Body::new(frames));
                        response.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/grpc"),
                        );
                        response
                    }
                    Err(status) => status.into_http(),
                },
            )
        })
    }
}

/// Decodes the Subscribe request and opens the stream.
async fn subscribe(
    service: &TelemetryService,
    request: http::Request<tonic::body::Body>,
    max_message_size: usize,
    frames: Arc<SharedFrames>,
) -> Result<Frames, Status> {
    // The server enables no compression, as tonic's route would refuse it.
    if let Some(encoding) = request.headers().get("grpc-encoding")
        && encoding != "identity"
    {
        return Err(Status::unimplemented(format!(
            "Content is compressed with `{}` which isn't supported",
            String::from_utf8_lossy(encoding.as_bytes())
        )));
    }
    let (parts, body) = request.into_parts();
    let decoder = SmallBufferCodec::<MetricsResponse, MetricsRequest>::default().decoder();
    let mut messages = Streaming::new_request(decoder, body, None, Some(max_message_size));
    // A request stream without its one message is a cardinality
    // violation: UNIMPLEMENTED, as the gRPC status-code table says.
    let message = messages.message().await?.ok_or_else(|| {
        Status::unimplemented("the Subscribe call carried no MetricsRequest; it takes exactly one")
    })?;
    let request = Request::from_http(http::Request::from_parts(parts, message));
    Ok(Frames {
        updates: service.updates(request, move |sample| frames.frame(sample))?,
        request: Some(messages),
        ended: false,
    })
}

/// What followed the one request message: nothing (the client closed its
/// side), or a second message (UNIMPLEMENTED), or bytes that do not decode
/// (INTERNAL).
fn after_request(next: Option<Result<MetricsRequest, Status>>) -> Option<Status> {
    match next {
        None => None,
        Some(Ok(_)) => Some(Status::unimplemented(
            "the Subscribe call carried a second MetricsRequest; it takes exactly one",
        )),
        Some(Err(status)) => Some(status),
    }
}

/// The newest frame of each service, shared by its subscribers: a sample
/// is encoded once, by the first subscriber to send it, and the others send
/// the same bytes. One entry per service that has had a sample sent, so it
/// is bounded like the hub's own table (`telemetry.max_services`); an
/// entry goes when the hub's sweep drops its service.
#[derive(Debug, Default)]
struct SharedFrames {
    newest: Mutex<HashMap<Arc<str>, (Sample, Bytes)>>,
}

impl SharedFrames {
    /// The frame of `sample`.
    fn frame(&self, sample: Sample) -> Bytes {
        let mut newest = self
            .newest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((known, frame)) = newest.get(&sample.service)
            && *known == sample
        {
            return frame.clone();
        }
        let encoded = frame(sample.clone());
        newest.insert(Arc::clone(&sample.service), (sample, encoded.clone()));
        encoded
    }

    /// Forgets the frame of `service` (dropped by the hub's sweep).
    fn forget(&self, service: &str) {
        self.newest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(service);
    }
}

/// A sample as one gRPC frame: uncompressed, length, `MetricsResponse`.
fn frame(sample: Sample) -> Bytes {
    let message = MetricsResponse::from(sample);
    let len = message.encoded_len();
    let mut frame = BytesMut::with_capacity(FRAME_HEADER + len);
    frame.put_u8(0);
    // A sample is at most a few hundred bytes (the name is capped).
    frame.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    message.encode_raw(&mut frame);
    frame.freeze()
}

/// The response body of a Subscribe call: each frame as one DATA frame,
/// then the `grpc-status` trailers (OK, or the status the stream ended
/// with).
struct Frames {
    updates: BoxStream<Bytes>,
    /// The rest of the request stream, until the client closes its side:
    /// anything more in it ends the call.
    request: Option<Streaming<MetricsRequest>>,
    ended: bool,
}

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let mut failed = None;
        if let Some(request) = self.request.as_mut()
            && let Poll::Ready(next) = futures::Stream::poll_next(Pin::new(request), cx)
        {
            self.request = None;
            failed = after_request(next);
        }
        let status = match failed {
            Some(status) => status,
            None => match ready!(self.updates.as_mut().poll_next(cx)) {
                Some(Ok(frame)) => return Poll::Ready(Some(Ok(Frame::data(frame)))),
                Some(Err(status)) => status,
                None => Status::ok(""),
            },
        };
        self.ended = true;
        let mut trailers = http::HeaderMap::new();
        Poll::Ready(Some(
            status
                .add_header(&mut trailers)
                .map(|()| Frame::trailers(trailers)),
        ))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::future::poll_fn;

    use http_body::Body as _;

    use super::*;

    fn sample(service: &str, cpu_usage: f64) -> Sample {
        Sample {
            service: Arc::from(service),
            cpu_usage,
            memory_mb: 2.0,
            request_count: 3,
            timestamp_ms: 4,
            seq: 1,
        }
    }

    #[test]
    fn a_frame_is_the_length_prefixed_message() {
        let frame = frame(sample("edge", 1.5));
        assert_eq!(frame[0], 0, "not compressed");
        let len = u32::from_be_bytes(frame[1..FRAME_HEADER].try_into().unwrap());
        assert_eq!(len as usize, frame.len() - FRAME_HEADER);
        let message = MetricsResponse::decode(&frame[FRAME_HEADER..]).unwrap();
        assert_eq!(message, MetricsResponse::from(sample("edge", 1.5)));
    }

    #[test]
    fn subscribers_of_one_sample_share_its_frame() {
        let frames = SharedFrames::default();
        let first = frames.frame(sample("edge", 1.0));
        let again = frames.frame(sample("edge", 1.0));
        assert_eq!(first.as_ptr(), again.as_ptr(), "encoded once");
        let newer = frames.frame(sample("edge", 2.0));
        assert_eq!(newer, frame(sample("edge", 2.0)));
        let other = frames.frame(sample("core", 1.0));
        assert_eq!(other, frame(sample("core", 1.0)));
        // Each service keeps its own newest frame.
        assert_eq!(frames.frame(sample("edge", 2.0)).as_ptr(), newer.as_ptr());
    }

    async fn frames_of(updates: Vec<Result<Bytes, Status>>) -> Vec<Frame<Bytes>> {
        let mut body = Frames {
            updates: Box::pin(futures::stream::iter(updates)),
            request: None,
            ended: false,
        };
        let mut all = Vec::new();
        while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            all.push(frame.unwrap());
        }
        assert!(body.is_end_stream());
        all
    }

    #[tokio::test]
    async fn the_body_sends_each_frame_then_the_status_as_trailers() {
        let data = frame(sample("edge", 1.0));
        let ok = frames_of(vec![Ok(data.clone())]).await;
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[0].data_ref(), Some(&data));
        assert_eq!(ok[1].trailers_ref().unwrap()["grpc-status"], "0");

        let ended = frames_of(vec![
            Ok(data.clone()),
            Err(Status::unavailable("shutting down")),
            Ok(data),
        ])
        .await;
        assert_eq!(ended.len(), 2, "nothing after the status");
        let trailers = ended[1].trailers_ref().unwrap();
        assert_eq!(trailers["grpc-status"], "14");
        assert_eq!(trailers["grpc-message"], "shutting%20down");
    }
}
