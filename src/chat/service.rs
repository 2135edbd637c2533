//! The gRPC face of the chat rooms: reads the request metadata, converts
//! between protobuf and domain types, maps errors to statuses, and runs the
//! two halves of each call independently.
//!
//! Each call has a reader task (inbound messages, validated and submitted
//! to the room) and a response stream (replay from storage, then the
//! member's live queue). The reader never waits for the stream and the
//! stream never waits for the reader, so a member may send without reading
//! and read without sending; a half-closed call keeps receiving.

use std::{
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use futures::Stream;
use tonic::{
    Request, Response, Status, Streaming,
    metadata::{MetadataMap, MetadataValue},
};

use super::{
    ChatError, DEFAULT_ROOM, Draft, Kind, Message, MessageLimits, RoomName, Start,
    room::{EndReason, EndSignal, JoinRequest, Membership, Outbox, RoomHub},
    validate_name,
};
use crate::{
    auth::{self, Action, Identity, Resource},
    proto::chat::{self as pb, chat_service_server},
    rpc::{DeadlineTrailers, StreamLog, shutting_down},
    shutdown::{SHUTTING_DOWN, Shutdown},
};

/// Request metadata: the room to join.
pub const ROOM_KEY: &str = "chat-room";
/// Request metadata: replay stored messages after this seq first.
pub const AFTER_SEQ_KEY: &str = "chat-after-seq";
/// Request and response metadata: the room's history epoch.
pub const EPOCH_KEY: &str = "chat-epoch";
/// Request metadata: replay the last N stored messages first.
pub const HISTORY_KEY: &str = "chat-history";
/// Request metadata: announce the join and leave under this name.
pub const MEMBER_KEY: &str = "chat-member";
/// Response and trailing metadata: the last seq (at joining, or sent).
pub const LAST_SEQ_KEY: &str = "chat-last-seq";
/// Response and trailing metadata: the oldest seq stored.
pub const OLDEST_SEQ_KEY: &str = "chat-oldest-seq";

/// Messages read from storage per step of a replay.
const REPLAY_CHUNK: usize = 256;

pub(super) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// One message of a member's response stream: a room's stored message,
/// shared with every other member it goes to (so [`super::route`] encodes
/// it once for all of them), or a message of this call alone.
#[derive(Debug)]
pub enum Outgoing {
    /// A message as the room broadcast it to its members.
    Shared(Arc<Message>),
    /// A message for this call only (replayed history, notices).
    Own(pb::ChatMessage),
}

impl From<Outgoing> for pb::ChatMessage {
    fn from(outgoing: Outgoing) -> Self {
        match outgoing {
            Outgoing::Shared(message) => Self::from(&*message),
            Outgoing::Own(message) => message,
        }
    }
}

/// The `chat.ChatService` implementation.
#[derive(Clone)]
pub struct ChatService {
    hub: Arc<dyn RoomHub>,
    limits: MessageLimits,
    shutdown: Shutdown,
}

impl std::fmt::Debug for ChatService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatService").finish_non_exhaustive()
    }
}

impl ChatService {
    /// A service over `hub`, whose calls end when `shutdown` triggers.
    pub fn new(hub: Arc<dyn RoomHub>, limits: MessageLimits, shutdown: Shutdown) -> Self {
        Self {
            hub,
            limits,
            shutdown,
        }
    }

    /// The server of this service, with message size limits: tonic's
    /// generated server, with Chat and WatchRoom served by
    /// [`super::route`] (each stored message encoded once for all members).
    pub fn into_server(self, max_message_size: usize) -> super::route::ChatServer {
        let generated = chat_service_server::ChatServiceServer::new(self.clone())
            .max_decoding_message_size(max_message_size)
            .max_encoding_message_size(max_message_size);
        super::route::ChatServer::new(self, generated, max_message_size)
    }
}

fn insert(map: &mut MetadataMap, key: &'static str, value: u64) {
    map.insert(key, MetadataValue::from(value));
}

/// A refused resume: the status carries the room's oldest and last seq and
/// its epoch in trailers, besides naming them in the message.
fn resume_refused(
    code: tonic::Code,
    err: &ChatError,
    oldest: u64,
    last: u64,
    epoch: u64,
) -> Status {
    let mut map = MetadataMap::new();
    insert(&mut map, OLDEST_SEQ_KEY, oldest);
    insert(&mut map, LAST_SEQ_KEY, last);
    insert(&mut map, EPOCH_KEY, epoch);
    Status::with_metadata(code, err.to_string(), map)
}

/// Maps a chat error to the status a client sees.
pub fn status(err: &ChatError) -> Status {
    match err {
        ChatError::Invalid { .. } => Status::invalid_argument(err.to_string()),
        ChatError::NotYourName { .. } => Status::permission_denied(err.to_string()),
        ChatError::HistoryGap {
            oldest,
            last,
            epoch,
            ..
        } => resume_refused(tonic::Code::OutOfRange, err, *oldest, *last, *epoch),
        ChatError::EpochChanged {
            oldest,
            last,
            epoch,
            ..
        } => resume_refused(tonic::Code::FailedPrecondition, err, *oldest, *last, *epoch),
        ChatError::TooManyRooms { .. } | ChatError::ShareExhausted(_) => {
            Status::resource_exhausted(err.to_string())
        }
        ChatError::ShuttingDown => shutting_down(),
        ChatError::Store(store) if store.is_full() => Status::resource_exhausted(err.to_string()),
        ChatError::Store(_) => Status::unavailable(err.to_string()),
        ChatError::Unavailable(_) => Status::unavailable(err.to_string()),
    }
}

fn kind_to_pb(kind: Kind) -> pb::MessageKind {
    match kind {
        Kind::Member => pb::MessageKind::KindMember,
        Kind::Joined => pb::MessageKind::KindJoined,
        Kind::Left => pb::MessageKind::KindLeft,
        Kind::Shutdown => pb::MessageKind::KindShutdown,
    }
}

impl From<&Message> for pb::ChatMessage {
    fn from(m: &Message) -> Self {
        Self {
            sender: m.sender.clone(),
            message: m.text.clone(),
            timestamp: m.timestamp_ms.div_euclid(1000),
            seq: m.seq,
            idempotency_key: m.key.clone(),
            kind: kind_to_pb(m.kind).into(),
            epoch: m.epoch,
            timestamp_ms: m.timestamp_ms,
        }
    }
}

fn text<'a>(map: &'a MetadataMap, key: &'static str) -> Result<Option<&'a str>, ChatError> {
    // Two values would leave it to chance which one the call used.
    let given = map.get_all(key).iter().count();
    if given > 1 {
        return Err(ChatError::invalid(
            key,
            format!("is given {given} times; give it once"),
        ));
    }
    match map.get(key) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(Some)
            .map_err(|_| ChatError::invalid(key, "is not printable ASCII")),
    }
}

fn number(map: &MetadataMap, key: &'static str) -> Result<Option<u64>, ChatError> {
    text(map, key)?
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| ChatError::invalid(key, format!("is {v:?}, not a whole number")))
        })
        .transpose()
}

/// Reads a Chat call's request metadata.
pub fn join_request(map: &MetadataMap) -> Result<JoinRequest, ChatError> {
    let room = RoomName::parse(text(map, ROOM_KEY)?.unwrap_or(DEFAULT_ROOM))?;
    let after = number(map, AFTER_SEQ_KEY)?;
    let epoch = number(map, EPOCH_KEY)?;
    let history = number(map, HISTORY_KEY)?;
    let start = match (after, history) {
        (Some(seq), _) => Start::After { seq, epoch },
        (None, Some(n)) if n > 0 => Start::Last(n),
        (None, _) => Start::Live,
    };
    let member = text(map, MEMBER_KEY)?
        .map(|name| {
            validate_name(MEMBER_KEY, name)?;
            Ok::<_, ChatError>(name.to_owned())
        })
        .transpose()?;
    Ok(JoinRequest {
        room,
        start,
        member,
        owner: None,
    })
}

/// Reads a WatchRoom request: the fields mean what Chat's metadata means.
pub fn watch_request(request: pb::WatchRoomRequest) -> Result<JoinRequest, ChatError> {
    let room = RoomName::parse(if request.room.is_empty() {
        DEFAULT_ROOM
    } else {
        &request.room
    })?;
    let start = match request.after_seq {
        Some(seq) => Start::After {
            seq,
            epoch: (request.epoch != 0).then_some(request.epoch),
        },
        None if request.history > 0 => Start::Last(u64::from(request.history)),
        None => Start::Live,
    };
    let member = if request.member.is_empty() {
        None
    } else {
        validate_name("member", &request.member)?;
        Some(request.member)
    };
    Ok(JoinRequest {
        room,
        start,
        member,
        owner: None,
    })
}

/// With authentication on (`identity` given), a member's name is its
/// identity: an empty one is filled in, another one is refused.
fn bind_name(
    field: &'static str,
    given: &mut String,
    identity: Option<&Identity>,
) -> Result<(), ChatError> {
    let Some(identity) = identity else {
        return Ok(());
    };
    if given.is_empty() {
        identity.name().clone_into(given);
    } else if given != identity.name() {
        return Err(ChatError::NotYourName {
            field,
            given: std::mem::take(given),
            identity: identity.name().to_owned(),
        });
    }
    Ok(())
}

fn draft(
    mut message: pb::ChatMessage,
    limits: MessageLimits,
    identity: Option<&Identity>,
) -> Result<Draft, ChatError> {
    bind_name("sender", &mut message.sender, identity)?;
    if message.kind != i32::from(pb::MessageKind::KindMember) {
        return Err(ChatError::invalid(
            "kind",
            "must be KIND_MEMBER (0): only the server writes other kinds",
        ));
    }
    Draft::member(
        message.sender,
        message.message,
        message.idempotency_key,
        limits,
    )
}

/// What the reader of one member's inbound messages needs.
struct Inbound {
    outbox: Outbox,
    end: Arc<EndSignal>,
    /// Where a failed read leaves the status the call ends with.
    failure: Arc<OnceLock<Status>>,
    limits: MessageLimits,
    shutdown: Shutdown,
    room: RoomName,
    /// The member's identity, with authentication on: its messages'
    /// sender.
    identity: Option<Identity>,
}

/// Reads a member's messages and submits them to the room until the
/// client half-closes or leaves, the member's delivery ends, or the server
/// shuts down (after which nothing new is accepted). A message that cannot
/// be read (undecodable, over the size limit) ends the member's call with
/// the reading's status, left in `failure`.
async fn read_inbound(mut inbound: Streaming<pb::ChatMessage>, member: Inbound) {
    let Inbound {
        outbox,
        end,
        failure,
        limits,
        shutdown,
        room,
        identity,
    } = member;
    let mut received = 0u64;
    loop {
        let next = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            () = end.ended() => return,
            next = inbound.message() => next,
        };
        let message = match next {
            Ok(Some(message)) => message,
            Ok(None) => {
                tracing::debug!(room = %room, received, "member half-closed; still receiving");
                return;
            }
            Err(err) => {
                tracing::debug!(room = %room, received, %err, "member's inbound stream failed");
                let _ = failure.set(Status::new(
                    err.code(),
                    format!(
                        "message {} could not be read: {}",
                        received + 1,
                        err.message()
                    ),
                ));
                end.end(EndReason::InboundFailed);
                return;
            }
        };
        received += 1;
        // The auth layer ends the call at expiry; nothing read after it
        // is submitted meanwhile.
        if identity.as_ref().is_some_and(Identity::is_expired) {
            return;
        }
        match draft(message, limits, identity.as_ref()) {
            Ok(draft) => {
                if outbox.submit(draft).await.is_err() {
                    return;
                }
            }
            Err(err) => {
                end.end(EndReason::Invalid(err));
                return;
            }
        }
    }
}

fn notice() -> pb::ChatMessage {
    pb::ChatMessage::from(&Message {
        seq: 0,
        epoch: 0,
        kind: Kind::Shutdown,
        sender: String::new(),
        text: SHUTTING_DOWN.to_owned(),
        key: String::new(),
        timestamp_ms: super::now_ms(),
        encoding: Default::default(),
    })
}

fn with_last_seq(status: Status, last: u64) -> Status {
    let mut map = MetadataMap::new();
    insert(&mut map, LAST_SEQ_KEY, last);
    Status::with_metadata(status.code(), status.message().to_owned(), map)
}

/// The status a member's call ends with, given why delivery ended (and,
/// if its inbound stream failed, how) and the last seq it was sent.
fn end_status(reason: Option<&EndReason>, failure: Option<&Status>, last_sent: u64) -> Status {
    let status = match reason {
        Some(EndReason::Shutdown) | None => shutting_down(),
        Some(EndReason::TooSlow { queue }) => Status::resource_exhausted(format!(
            "member too slow: its queue of {queue} messages was full; last seq sent \
             {last_sent}; reconnect with chat-after-seq: {last_sent} to miss nothing"
        )),
        Some(EndReason::Invalid(err)) => status(err),
        Some(EndReason::StorageFailed { reason, full }) => Status::new(
            if *full {
                tonic::Code::ResourceExhausted
            } else {
                tonic::Code::Unavailable
            },
            format!(
                "storage failed ({reason}); last seq sent {last_sent}; reconnect with \
                 chat-after-seq: {last_sent} and resend what was not acknowledged"
            ),
        ),
        Some(EndReason::InboundFailed) => failure
            .cloned()
            .unwrap_or_else(|| Status::internal("a message could not be read")),
    };
    with_last_seq(status, last_sent)
}

/// Lets `identity` join as `join` asks, before anything happens (a join
/// opens the room and announces the member): it needs `chat:join` on the
/// room, and with authentication on, the announced member name is the
/// identity's own (filled in when empty, refused when another).
fn admit(identity: &Identity, join: &mut JoinRequest) -> Result<(), Status> {
    auth::authorize(identity, Resource::Chat, Action::Join, join.room.as_str())?;
    if identity.is_authenticated() {
        join.owner = Some(identity.shared_name());
        let mut member = join.member.take().unwrap_or_default();
        bind_name(MEMBER_KEY, &mut member, Some(identity)).map_err(|err| status(&err))?;
        join.member = Some(member);
    }
    Ok(())
}

impl ChatService {
    /// The outbound half of a member's call: the response metadata, then
    /// replay from storage, then the member's live queue, then the closing
    /// status. Shared by Chat and WatchRoom.
    ///
    /// `failure` holds the status of a failed inbound read, if the call has
    /// an inbound half (Chat) and it failed.
    fn deliver(
        &self,
        membership: Membership,
        failure: Arc<OnceLock<Status>>,
        mut log: StreamLog,
    ) -> Response<BoxStream<Outgoing>> {
        let room = membership.room.clone();

        let mut headers = MetadataMap::new();
        if let Ok(value) = MetadataValue::try_from(room.as_str()) {
            headers.insert(ROOM_KEY, value);
        }
        insert(&mut headers, EPOCH_KEY, membership.epoch);
        insert(&mut headers, LAST_SEQ_KEY, membership.last);
        insert(&mut headers, OLDEST_SEQ_KEY, membership.oldest);

        let hub = Arc::clone(&self.hub);
        let shutdown = self.shutdown.clone();
        // The last seq handed on, for the trailer of a call its deadline
        // ends (the status layer ends it, dropping this stream).
        let sent = Arc::new(AtomicU64::new(0));
        let seen = Arc::clone(&sent);
        let stream = async_stream::stream! {
            let sent = seen;
            let mut membership = membership;
            let mut last_sent = membership.replay_from.saturating_sub(1);
            sent.store(last_sent, Ordering::Relaxed);
            // Replay, in chunks, what was stored before joining.
            let mut next = membership.replay_from;
            while next <= membership.last {
                if shutdown.is_triggered() {
                    log.end("server shutting down during replay");
                    yield Ok(Outgoing::Own(notice()));
                    yield Err(with_last_seq(shutting_down(), last_sent));
                    return;
                }
                let chunk = hub
                    .history(room.clone(), membership.epoch, next, membership.last, REPLAY_CHUNK)
                    .await;
                let chunk = match chunk {
                    Ok(chunk) => chunk,
                    Err(err) => {
                        log.end(format!("replay failed: {err}"));
                        yield Err(with_last_seq(status(&err), last_sent));
                        return;
                    }
                };
                // History trimmed under the replay: never hand back a gap.
                if chunk.first().map(|m| m.seq) != Some(next) {
                    let err = ChatError::HistoryGap {
                        room: room.to_string(),
                        after: next - 1,
                        oldest: chunk.first().map_or(membership.last + 1, |m| m.seq),
                        last: membership.last,
                        epoch: membership.epoch,
                    };
                    log.end(format!("replay failed: {err}"));
                    yield Err(status(&err));
                    return;
                }
                for message in &chunk {
                    next = message.seq + 1;
                    last_sent = message.seq;
                    sent.store(last_sent, Ordering::Relaxed);
                    yield Ok(Outgoing::Own(pb::ChatMessage::from(&**message)));
                }
            }
            // Live.
            loop {
                let message = tokio::select! {
                    biased;
                    () = membership.end.ended() => None,
                    message = membership.live.recv() => message,
                };
                match message {
                    Some(message) => {
                        last_sent = last_sent.max(message.seq);
                        sent.store(last_sent, Ordering::Relaxed);
                        yield Ok(Outgoing::Shared(message));
                    }
                    None => break,
                }
            }
            // Delivery ended: deliver what was queued before it did.
            while let Ok(message) = membership.live.try_recv() {
                last_sent = last_sent.max(message.seq);
                sent.store(last_sent, Ordering::Relaxed);
                yield Ok(Outgoing::Shared(message));
            }
            let reason = membership.end.reason();
            match reason {
                Some(EndReason::Shutdown) | None => {
                    log.end(format!("server shutting down; last seq sent {last_sent}"));
                    yield Ok(Outgoing::Own(notice()));
                }
                Some(other) => log.end(format!("{other:?}; last seq sent {last_sent}")),
            }
            yield Err(end_status(reason, failure.get(), last_sent));
        };
        let mut response = Response::new(Box::pin(stream) as BoxStream<Outgoing>);
        *response.metadata_mut() = headers;
        response
            .extensions_mut()
            .insert(DeadlineTrailers(Arc::new(move |trailers| {
                let last = sent.load(Ordering::Relaxed);
                trailers.insert(LAST_SEQ_KEY, http::HeaderValue::from(last));
            })));
        response
    }
}

impl ChatService {
    /// WatchRoom, its messages as [`Outgoing`].
    pub(super) async fn open_watch(
        &self,
        request: Request<pb::WatchRoomRequest>,
    ) -> Result<Response<BoxStream<Outgoing>>, Status> {
        let mut log = StreamLog::open(&request, "WatchRoom", &request.get_ref().room);
        let identity = auth::layer::identity(request.extensions());
        let mut join = watch_request(request.into_inner()).map_err(|err| {
            log.end(format!("refused: {err}"));
            status(&err)
        })?;
        log.set_subject(join.room.as_str());
        admit(&identity, &mut join).inspect_err(|refused| {
            log.end(format!("refused: {}", refused.message()));
        })?;
        let membership = self.hub.join(join).await.map_err(|err| {
            log.end(format!("refused: {err}"));
            status(&err)
        })?;
        Ok(self.deliver(membership, Arc::new(OnceLock::new()), log))
    }

    /// Send.
    async fn send_one(
        &self,
        request: Request<pb::SendRequest>,
    ) -> Result<Response<pb::ChatMessage>, Status> {
        let identity = auth::layer::identity(request.extensions());
        let pb::SendRequest { room, message } = request.into_inner();
        let room = RoomName::parse(if room.is_empty() { DEFAULT_ROOM } else { &room })
            .map_err(|err| status(&err))?;
        // Before anything is stored or broadcast.
        auth::authorize(&identity, Resource::Chat, Action::Join, room.as_str())?;
        let message = message
            .ok_or_else(|| Status::invalid_argument("message is missing: nothing to send"))?;
        let bound = identity.is_authenticated().then_some(&identity);
        let draft = draft(message, self.limits, bound).map_err(|err| status(&err))?;
        let stored = self
            .hub
            .send(room, draft, bound.map(Identity::shared_name))
            .await
            .map_err(|err| status(&err))?;
        Ok(Response::new(pb::ChatMessage::from(&*stored)))
    }

    /// Chat, its messages as [`Outgoing`].
    pub(super) async fn open_chat(
        &self,
        request: Request<Streaming<pb::ChatMessage>>,
    ) -> Result<Response<BoxStream<Outgoing>>, Status> {
        let mut log = StreamLog::open(&request, "Chat", "");
        let identity = auth::layer::identity(request.extensions());
        let mut join = join_request(request.metadata()).map_err(|err| {
            log.end(format!("refused: {err}"));
            status(&err)
        })?;
        log.set_subject(join.room.as_str());
        admit(&identity, &mut join).inspect_err(|refused| {
            log.end(format!("refused: {}", refused.message()));
        })?;
        let bound = identity.is_authenticated().then_some(&identity);
        let membership = self.hub.join(join).await.map_err(|err| {
            log.end(format!("refused: {err}"));
            status(&err)
        })?;
        let room = membership.room.clone();
        tracing::debug!(
            room = %room,
            epoch = membership.epoch,
            last = membership.last,
            replay_from = membership.replay_from,
            "member joined"
        );

        let failure = Arc::new(OnceLock::new());
        self.shutdown.spawn(read_inbound(
            request.into_inner(),
            Inbound {
                outbox: membership.outbox.clone(),
                end: Arc::clone(&membership.end),
                failure: Arc::clone(&failure),
                limits: self.limits,
                shutdown: self.shutdown.clone(),
                room: room.clone(),
                identity: bound.cloned(),
            },
        ));

        Ok(self.deliver(membership, failure, log))
    }
}

/// The generated server's entry points (what `into_server`'s route does
/// not serve itself: [`super::route`] serves Chat and WatchRoom with
/// shared frames).
#[tonic::async_trait]
impl chat_service_server::ChatService for ChatService {
    type ChatStream = BoxStream<pb::ChatMessage>;

    type WatchRoomStream = BoxStream<pb::ChatMessage>;

    async fn watch_room(
        &self,
        request: Request<pb::WatchRoomRequest>,
    ) -> Result<Response<Self::WatchRoomStream>, Status> {
        Ok(self.open_watch(request).await?.map(to_pb))
    }

    async fn send(
        &self,
        request: Request<pb::SendRequest>,
    ) -> Result<Response<pb::ChatMessage>, Status> {
        self.send_one(request).await
    }

    async fn chat(
        &self,
        request: Request<Streaming<pb::ChatMessage>>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        Ok(self.open_chat(request).await?.map(to_pb))
    }
}

/// A member's stream as protobuf messages.
fn to_pb(stream: BoxStream<Outgoing>) -> BoxStream<pb::ChatMessage> {
    use futures::StreamExt;
    Box::pin(stream.map(|item| item.map(pb::ChatMessage::from)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut map = MetadataMap::new();
        for (k, v) in pairs {
            map.insert(*k, v.parse().expect("ascii"));
        }
        map
    }

    #[test]
    fn metadata_is_read_and_checked() {
        let plain = join_request(&MetadataMap::new()).expect("defaults");
        assert_eq!(plain.room.as_str(), DEFAULT_ROOM);
        assert_eq!(plain.start, Start::Live);
        let resume = join_request(&map(&[
            (ROOM_KEY, "dev"),
            (AFTER_SEQ_KEY, "12"),
            (EPOCH_KEY, "7"),
        ]))
        .expect("valid");
        assert_eq!(
            resume.start,
            Start::After {
                seq: 12,
                epoch: Some(7)
            }
        );
        let recent = join_request(&map(&[(HISTORY_KEY, "5")])).expect("valid");
        assert_eq!(recent.start, Start::Last(5));
        let bad = join_request(&map(&[(AFTER_SEQ_KEY, "x")])).expect_err("bad");
        assert!(bad.to_string().contains(AFTER_SEQ_KEY), "{bad}");
        let long = "r".repeat(65);
        let bad = join_request(&map(&[(ROOM_KEY, long.as_str())])).expect_err("bad");
        assert_eq!(status(&bad).code(), tonic::Code::InvalidArgument);
        let bad = join_request(&map(&[(MEMBER_KEY, "ann\tx")])).expect_err("bad");
        assert!(bad.to_string().starts_with(MEMBER_KEY), "{bad}");
    }

    #[test]
    fn clients_cannot_send_server_kinds() {
        let limits = MessageLimits {
            max_text_bytes: 100,
        };
        let forged = pb::ChatMessage {
            sender: "server".into(),
            message: "joined".into(),
            kind: pb::MessageKind::KindJoined.into(),
            ..pb::ChatMessage::default()
        };
        let err = draft(forged, limits, None).expect_err("refused");
        assert!(err.to_string().starts_with("kind"), "{err}");
    }

    #[test]
    fn authenticated_members_speak_under_their_identity() {
        let limits = MessageLimits {
            max_text_bytes: 100,
        };
        let alice = Identity::new("alice", auth::Scopes::all(), auth::Method::Token, None);
        let message = |sender: &str| pb::ChatMessage {
            sender: sender.into(),
            message: "hi".into(),
            ..pb::ChatMessage::default()
        };
        let filled = draft(message(""), limits, Some(&alice)).expect("filled in");
        assert_eq!(filled.sender, "alice");
        assert!(draft(message("alice"), limits, Some(&alice)).is_ok());
        let spoofed = draft(message("bob"), limits, Some(&alice)).expect_err("spoof");
        assert_eq!(status(&spoofed).code(), tonic::Code::PermissionDenied);
        // Without authentication the sender is the client's to choose.
        assert!(draft(message("bob"), limits, None).is_ok());
    }
}
