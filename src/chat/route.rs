//! The chat service's HTTP routes, with each room message encoded once
//! for all the members it goes to.
//!
//! tonic's generated route encodes every message of a server stream for
//! each call: a room of 1,000 members turned each message into 1,000
//! protobuf messages (three strings copied each) and encoded each, a third
//! of the server's CPU in the chat benchmark. Chat and WatchRoom are served
//! here instead, through tonic's own `Grpc` machinery (request decoding,
//! size limits, framing, trailers: the same as the generated route) with a
//! codec whose encoder takes a room's shared message ([`Outgoing`]) and
//! copies its encoding, made once by the first member's call that sends it
//! and kept in the message itself ([`super::Encoding`]): it is freed with
//! the message, when the last member's queue lets go of it, so no table
//! holds encodings of rooms long closed or pushes out live ones.
//! Send and the other paths go to the generated server.

use std::{
    convert::Infallible,
    task::{Context, Poll},
};

use bytes::{BufMut, Bytes};
use futures::future::BoxFuture;
use prost::Message as _;
use tonic::{
    Request, Response, Status, Streaming,
    codec::{BufferSettings, Codec, EncodeBuf, Encoder},
    server::{Grpc, NamedService, ServerStreamingService, StreamingService},
};
use tonic_prost::ProstDecoder;

use super::{
    Message,
    service::{BoxStream, ChatService, Outgoing},
};
use crate::proto::chat::{self as pb, chat_service_server::ChatServiceServer};

/// The HTTP path of `ChatService.Chat`.
pub const CHAT_PATH: &str = "/chat.ChatService/Chat";
/// The HTTP path of `ChatService.WatchRoom`.
pub const WATCH_ROOM_PATH: &str = "/chat.ChatService/WatchRoom";

/// The chat service as the server mounts it.
#[derive(Debug, Clone)]
pub struct ChatServer {
    service: ChatService,
    generated: ChatServiceServer<ChatService>,
    max_message_size: usize,
}

impl ChatServer {
    pub(super) fn new(
        service: ChatService,
        generated: ChatServiceServer<ChatService>,
        max_message_size: usize,
    ) -> Self {
        Self {
            service,
            generated,
            max_message_size,
        }
    }

    fn grpc<D>(&self) -> Grpc<SharedCodec<D>>
    where
        D: prost::Message + Default + Send + 'static,
    {
        Grpc::new(SharedCodec {
            _decode: std::marker::PhantomData,
        })
        .apply_max_message_size_config(Some(self.max_message_size), Some(self.max_message_size))
    }
}

impl NamedService for ChatServer {
    const NAME: &'static str = <ChatServiceServer<ChatService> as NamedService>::NAME;
}

impl tower::Service<http::Request<tonic::body::Body>> for ChatServer {
    // The router's body type: boxed once, into it.
    type Response = http::Response<axum::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        match request.uri().path() {
            CHAT_PATH => {
                let mut grpc = self.grpc::<pb::ChatMessage>();
                let method = ChatMethod(self.service.clone());
                Box::pin(async move {
                    Ok(grpc
                        .streaming(method, request)
                        .await
                        .map(axum::body::Body::new))
                })
            }
            WATCH_ROOM_PATH => {
                let mut grpc = self.grpc::<pb::WatchRoomRequest>();
                let method = WatchMethod(self.service.clone());
                Box::pin(async move {
                    Ok(grpc
                        .server_streaming(method, request)
                        .await
                        .map(axum::body::Body::new))
                })
            }
            _ => {
                let call = self.generated.call(request);
                Box::pin(async move { Ok(call.await?.map(axum::body::Body::new)) })
            }
        }
    }
}

/// Chat, answering with [`Outgoing`] messages.
struct ChatMethod(ChatService);

impl StreamingService<pb::ChatMessage> for ChatMethod {
    type Response = Outgoing;
    type ResponseStream = BoxStream<Outgoing>;
    type Future = BoxFuture<'static, Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<pb::ChatMessage>>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.open_chat(request).await })
    }
}

/// WatchRoom, answering with [`Outgoing`] messages.
struct WatchMethod(ChatService);

impl ServerStreamingService<pb::WatchRoomRequest> for WatchMethod {
    type Response = Outgoing;
    type ResponseStream = BoxStream<Outgoing>;
    type Future = BoxFuture<'static, Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<pb::WatchRoomRequest>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.open_watch(request).await })
    }
}

/// The protobuf encoding of `message` (a `chat.ChatMessage`): made by the
/// first call that sends it, then copied from the message.
fn encoding(message: &Message) -> Bytes {
    message
        .encoding
        .get_or_init(|| Bytes::from(pb::ChatMessage::from(message).encode_to_vec()))
}

/// Decodes requests with prost; encodes [`Outgoing`] messages, a shared
/// one by copying its shared encoding.
struct SharedCodec<D> {
    _decode: std::marker::PhantomData<fn() -> D>,
}

impl<D> Codec for SharedCodec<D>
where
    D: prost::Message + Default + Send + 'static,
{
    type Encode = Outgoing;
    type Decode = D;
    type Encoder = SharedEncoder;
    type Decoder = ProstDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        SharedEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::default())
    }
}

/// The encoder of [`SharedCodec`].
struct SharedEncoder;

impl Encoder for SharedEncoder {
    type Item = Outgoing;
    type Error = Status;

    fn encode(&mut self, item: Outgoing, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            Outgoing::Shared(message) => {
                dst.put_slice(&encoding(&message));
                Ok(())
            }
            Outgoing::Own(message) => message
                .encode(dst)
                .map_err(|err| Status::internal(format!("a chat message does not encode: {err}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn message(seq: u64) -> Arc<Message> {
        Arc::new(Message {
            seq,
            epoch: 1,
            kind: super::super::Kind::Member,
            sender: "ann".into(),
            text: format!("hello {seq}"),
            key: String::new(),
            timestamp_ms: 1_700_000_000_000,
            encoding: Default::default(),
        })
    }

    #[test]
    fn members_of_one_message_share_its_encoding() {
        let first = message(1);
        let bytes = encoding(&first);
        assert_eq!(
            bytes,
            pb::ChatMessage::from(&*first).encode_to_vec(),
            "the protobuf encoding"
        );
        assert_eq!(encoding(&first).as_ptr(), bytes.as_ptr(), "encoded once");
        // A copy (which may be changed) starts without the encoding.
        let copy = Arc::new((*first).clone());
        assert_eq!(copy.encoding.held(), 0);
        assert_ne!(encoding(&copy).as_ptr(), bytes.as_ptr());
        assert_eq!(encoding(&copy), bytes);
    }

    /// The encoding lives in the message's allocation: when the last
    /// reference (a member's queue) goes, so does the encoding; nothing
    /// else holds it. (The old shared table kept the newest 1,024
    /// messages and their encodings after every room had closed.)
    #[test]
    fn nothing_keeps_an_encoding_once_its_message_is_gone() {
        let sent = message(1);
        let bytes = encoding(&sent);
        assert_eq!(sent.encoding.held(), bytes.len());
        let watch = Arc::downgrade(&sent);
        drop(sent);
        assert!(watch.upgrade().is_none(), "nothing else holds the message");
        // The only other owner of the bytes is this test's handle.
        assert!(bytes.is_unique(), "nothing else holds the encoding");
    }
}
