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
//! and kept in a small table shared by every call ([`SharedEncodings`]).
//! Send and the other paths go to the generated server.

use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    sync::{Arc, Mutex, PoisonError},
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

/// Encoded messages kept for calls still to send them: enough for every
/// member of a busy room to find the messages its queue holds
/// (`chat.member_queue`, 256 by default), across a few rooms.
const KEPT: usize = 1024;

/// The chat service as the server mounts it.
#[derive(Debug, Clone)]
pub struct ChatServer {
    service: ChatService,
    generated: ChatServiceServer<ChatService>,
    max_message_size: usize,
    encodings: Arc<SharedEncodings>,
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
            encodings: Arc::default(),
        }
    }

    fn grpc<D>(&self) -> Grpc<SharedCodec<D>>
    where
        D: prost::Message + Default + Send + 'static,
    {
        Grpc::new(SharedCodec {
            encodings: Arc::clone(&self.encodings),
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

/// The encodings of the room messages sent most recently, shared by every
/// call: the first call to send a message encodes it, the others copy the
/// bytes. Keyed by the message's allocation, which the table keeps alive
/// while it holds the entry (so no other message can share the key); the
/// oldest of more than [`KEPT`] entries is dropped. A message no longer
/// in the table (a member far behind) is encoded again, as before.
#[derive(Debug, Default)]
struct SharedEncodings {
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    by_message: HashMap<usize, (Arc<Message>, Bytes)>,
    order: VecDeque<usize>,
}

impl SharedEncodings {
    /// The protobuf encoding of `message` (a `chat.ChatMessage`).
    fn encoding(&self, message: &Arc<Message>) -> Bytes {
        let key = Arc::as_ptr(message) as usize;
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((known, bytes)) = table.by_message.get(&key)
            && Arc::ptr_eq(known, message)
        {
            return bytes.clone();
        }
        let bytes = Bytes::from(pb::ChatMessage::from(&**message).encode_to_vec());
        table
            .by_message
            .insert(key, (Arc::clone(message), bytes.clone()));
        table.order.push_back(key);
        while table.order.len() > KEPT {
            if let Some(oldest) = table.order.pop_front() {
                table.by_message.remove(&oldest);
            }
        }
        bytes
    }
}

/// Decodes requests with prost; encodes [`Outgoing`] messages, a shared
/// one by copying its shared encoding.
struct SharedCodec<D> {
    encodings: Arc<SharedEncodings>,
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
        SharedEncoder {
            encodings: Arc::clone(&self.encodings),
        }
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::default())
    }
}

/// The encoder of [`SharedCodec`].
struct SharedEncoder {
    encodings: Arc<SharedEncodings>,
}

impl Encoder for SharedEncoder {
    type Item = Outgoing;
    type Error = Status;

    fn encode(&mut self, item: Outgoing, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            Outgoing::Shared(message) => {
                dst.put_slice(&self.encodings.encoding(&message));
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
        })
    }

    #[test]
    fn members_of_one_message_share_its_encoding() {
        let encodings = SharedEncodings::default();
        let first = message(1);
        let bytes = encodings.encoding(&first);
        assert_eq!(
            bytes,
            pb::ChatMessage::from(&*first).encode_to_vec(),
            "the protobuf encoding"
        );
        assert_eq!(
            encodings.encoding(&first).as_ptr(),
            bytes.as_ptr(),
            "encoded once"
        );
        // An equal message in another allocation is its own entry.
        let copy = Arc::new((*first).clone());
        assert_ne!(encodings.encoding(&copy).as_ptr(), bytes.as_ptr());
    }

    #[test]
    fn the_table_keeps_the_newest_messages_only() {
        let encodings = SharedEncodings::default();
        let oldest = message(0);
        let kept = encodings.encoding(&oldest);
        for seq in 1..=KEPT as u64 {
            encodings.encoding(&message(seq));
        }
        let table = encodings
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        assert_eq!(table.by_message.len(), KEPT);
        assert_eq!(table.order.len(), KEPT);
        drop(table);
        // Dropped from the table: encoded again, to the same bytes.
        let again = encodings.encoding(&oldest);
        assert_ne!(again.as_ptr(), kept.as_ptr());
        assert_eq!(again, kept);
    }
}
