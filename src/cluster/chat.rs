//! The clustered room hub: chat rooms stored in NATS JetStream, one order
//! and one history per room whichever nodes its members are on.
//!
//! - Each room is a stream `STREAMHUB_CHAT_<room>` with the one subject
//!   `streamhub.chat.<room>` (the room name made a token by
//!   [`super::token`]), keeping the last `chat.history` messages. Its
//!   stream sequence is the room's seq: dense, from 1, the same on every
//!   node, so `chat-after-seq` means what it means on a single server and
//!   the resume check stays exact. The epoch is the stream's creation
//!   time (microseconds): a room whose stream was deleted and created
//!   again has a new epoch.
//! - A node that has members in a room runs two tasks for it. The
//!   *publisher* takes what members submit and publishes it to JetStream
//!   with `Nats-Msg-Id` = a digest of sender and idempotency key, so a
//!   resend through any node within the stream's duplicate window
//!   (`cluster.duplicate_window`) is not stored again: its sender gets the
//!   original back as the acknowledgment. The *feed* follows the stream
//!   with [`Cluster::follow`] and hands each stored message, in stream
//!   order, to the node's members' bounded queues, under the lock joins
//!   take. So a member's own copy (its acknowledgment) arrives only after
//!   JetStream stored it, every member sees one order, and a join gets
//!   exactly the messages after the room's last seq as this node knows it,
//!   replaying the ones before from the stream.
//! - A resume after a seq this node has not received yet (the member
//!   comes from a faster node) asks JetStream for the room's last seq and
//!   waits for the feed to get there, instead of refusing.
//! - While the node cannot reach NATS, joins and replays fail with
//!   UNAVAILABLE, and a member whose message cannot be stored is ended
//!   with UNAVAILABLE (reconnect and resend: nothing is stored twice).
//!   Members already joined keep their streams; the feed continues after
//!   the reconnect from the last seq it delivered. Likewise when the NATS
//!   server holding the feed's consumer is lost while the node's own
//!   connection survives (a NATS cluster losing one server): the consumer
//!   goes quiet, and [`Cluster::follow`] reports it within two heartbeats.
//! - A room whose stream is gone (deleted, or NATS lost its storage) is
//!   created again by the first feed that notices, with the settings a
//!   room opens with; every node with the room open then sees the new
//!   epoch, ends its members and watchers (the old epoch's seqs cannot be
//!   resumed: FAILED_PRECONDITION on a resume) and leaves the room to be
//!   opened anew by the next join or Send.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::jetstream::{
    consumer::DeliverPolicy, context::PublishAckFuture, message::PublishMessage,
    stream::DiscardPolicy,
};
use futures::{StreamExt, future::BoxFuture};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{Cluster, ClusterError, token};
use crate::{
    chat::{
        ChatError, Draft, Kind, Message, RoomName, Start, now_ms,
        room::{
            EndReason, JoinRequest, Membership, Outbox, RoomHub, RoomTable, Slot, Submission,
            add_member, idle_check_period, idle_expired,
        },
    },
    config::ChatConfig,
    shutdown::Shutdown,
};

/// Prefix of the rooms' stream names.
pub const STREAM_PREFIX: &str = "STREAMHUB_CHAT_";

/// Prefix of the rooms' subjects.
pub const SUBJECT_PREFIX: &str = "streamhub.chat";

/// How long the feed may stay behind what JetStream acknowledged to this
/// node before its consumer is taken for stuck and recreated.
const STALL: Duration = Duration::from_secs(2);

/// A stored chat message's payload (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    kind: u8,
    sender: String,
    text: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    key: String,
    timestamp_ms: i64,
}

fn decode(seq: u64, epoch: u64, payload: &[u8]) -> Option<Message> {
    let wire: Wire = serde_json::from_slice(payload).ok()?;
    Some(Message {
        seq,
        epoch,
        kind: Kind::from_byte(wire.kind)?,
        sender: wire.sender,
        text: wire.text,
        key: wire.key,
        timestamp_ms: wire.timestamp_ms,
        encoding: Default::default(),
    })
}

/// The `Nats-Msg-Id` of a keyed message: a digest of sender and key, so
/// any text fits a header and the room's stream dedupes it.
fn message_id(sender: &str, key: &str) -> String {
    let mut hash = Sha256::new();
    hash.update((sender.len() as u64).to_le_bytes());
    hash.update(sender.as_bytes());
    hash.update(key.as_bytes());
    hex::encode(hash.finalize())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the state consistent.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unavailable(err: impl std::fmt::Display) -> ChatError {
    ChatError::Unavailable(format!(
        "{err}; reconnect (to any node) with chat-after-seq and resend what was not acknowledged"
    ))
}

/// The clustered [`RoomHub`].
pub struct NatsHub {
    cluster: Arc<Cluster>,
    config: ChatConfig,
    shutdown: Shutdown,
    rooms: Arc<RoomTable<Room>>,
}

impl std::fmt::Debug for NatsHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsHub").finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    Shutdown,
    Reset,
    /// No members and nothing pending for `chat.room_idle_timeout`.
    Idle,
}

struct Shared {
    oldest: u64,
    last: u64,
    members: HashMap<u64, Slot>,
    next_id: u64,
    closed: Option<Closed>,
    /// When the last member left or the last message was delivered.
    last_used: Instant,
}

/// One room open on this node.
struct Room {
    name: RoomName,
    /// The stream's settings, to create it again if it is gone.
    config: async_nats::jetstream::stream::Config,
    stream: String,
    subject: String,
    epoch: u64,
    history: u64,
    tx: mpsc::Sender<Submission>,
    queue: usize,
    announce: bool,
    shared: Mutex<Shared>,
    /// The last seq the feed delivered.
    delivered: watch::Sender<u64>,
    /// The highest seq this node's publisher had acknowledged: if the feed
    /// stays behind it, the feed's consumer is stuck and is recreated.
    published: AtomicU64,
    /// Stops the feed once the publisher is done.
    done: CancellationToken,
}

impl NatsHub {
    /// A hub over `cluster`; rooms open on first join and run until
    /// `shutdown`.
    pub fn new(cluster: Arc<Cluster>, config: ChatConfig, shutdown: Shutdown) -> Self {
        Self {
            cluster,
            rooms: RoomTable::new(&config),
            config,
            shutdown,
        }
    }

    fn stream_config(&self, room: &RoomName) -> async_nats::jetstream::stream::Config {
        let tok = token(room.as_str());
        async_nats::jetstream::stream::Config {
            max_messages: i64::try_from(self.config.history).unwrap_or(i64::MAX),
            discard: DiscardPolicy::Old,
            description: Some(format!("streamhub chat room {room}")),
            ..self.cluster.stream_config(
                format!("{STREAM_PREFIX}{tok}"),
                vec![format!("{SUBJECT_PREFIX}.{tok}")],
            )
        }
    }

    async fn open_room(&self, name: &RoomName) -> Result<Arc<Room>, ChatError> {
        self.cluster.check().map_err(unavailable)?;
        let config = self.stream_config(name);
        let (stream, subject) = (config.name.clone(), config.subjects[0].clone());
        let mut handle = self
            .cluster
            .ensure_stream(config.clone())
            .await
            .map_err(unavailable)?;
        let info = handle
            .info()
            .await
            .map_err(|e| unavailable(ClusterError::js(format!("read stream {stream}"), e)))?;
        let epoch = epoch_of(info.created);
        let last = info.state.last_sequence;
        let oldest = if info.state.messages == 0 {
            last + 1
        } else {
            info.state.first_sequence
        };
        let history = u64::try_from(info.config.max_messages)
            .ok()
            .filter(|&h| h > 0)
            .unwrap_or(u64::MAX);
        let (tx, rx) = mpsc::channel(self.config.max_batch.max(64));
        let (delivered, _) = watch::channel(last);
        let room = Arc::new(Room {
            name: name.clone(),
            config,
            stream,
            subject,
            epoch,
            history,
            tx,
            queue: self.config.member_queue,
            announce: self.config.announce_members,
            shared: Mutex::new(Shared {
                oldest,
                last,
                members: HashMap::new(),
                next_id: 1,
                closed: None,
                last_used: Instant::now(),
            }),
            delivered,
            published: AtomicU64::new(0),
            done: CancellationToken::new(),
        });
        tracing::debug!(room = %name, epoch, last, "cluster: room opened");
        self.shutdown
            .spawn(Arc::clone(&room).feed(Arc::clone(&self.cluster)));
        self.shutdown.spawn(Arc::clone(&room).publisher(
            Arc::clone(&self.cluster),
            rx,
            self.config.max_batch,
            self.shutdown.token(),
            (Arc::clone(&self.rooms), self.config.room_idle_timeout),
        ));
        Ok(room)
    }

    async fn join_once(&self, request: &JoinRequest) -> Result<Membership, ChatError> {
        if self.shutdown.is_triggered() {
            return Err(ChatError::ShuttingDown);
        }
        self.cluster.check().map_err(unavailable)?;
        let room = self.room(&request.room, request.owner.as_deref()).await?;
        let presence = self
            .rooms
            .enter(&request.room, &room, request.owner.as_deref())?;
        Ok(room
            .join(&self.cluster, request.start, request.member.clone())
            .await?
            .holding(presence))
    }

    async fn room(&self, name: &RoomName, owner: Option<&str>) -> Result<Arc<Room>, ChatError> {
        self.rooms
            .get_or_open(name, owner, || self.open_room(name))
            .await
    }

    async fn read(
        &self,
        room: RoomName,
        epoch: u64,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<Arc<Message>>, ChatError> {
        let mut out = Vec::new();
        if from > to || limit == 0 {
            return Ok(out);
        }
        self.cluster.check().map_err(unavailable)?;
        let tok = token(room.as_str());
        let stream = format!("{STREAM_PREFIX}{tok}");
        let subject = format!("{SUBJECT_PREFIX}.{tok}");
        let messages = self
            .cluster
            .follow(
                &stream,
                &subject,
                DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
            )
            .await
            .map_err(unavailable)?;
        tokio::pin!(messages);
        let wait = self.cluster.config().request_timeout;
        let want = usize::try_from(to - from + 1)
            .unwrap_or(usize::MAX)
            .min(limit);
        while out.len() < want {
            let message = match tokio::time::timeout(wait, messages.next()).await {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(err))) => return Err(unavailable(err)),
                Ok(None) | Err(_) => {
                    return Err(unavailable(format!(
                        "replaying room {room} from NATS stalled after {} messages",
                        out.len()
                    )));
                }
            };
            let seq = message.info().map_or(0, |i| i.stream_sequence);
            if seq > to {
                break;
            }
            match decode(seq, epoch, &message.payload) {
                Some(decoded) => out.push(Arc::new(decoded)),
                None => {
                    return Err(unavailable(format!(
                        "room {room} holds an undecodable message at seq {seq}"
                    )));
                }
            }
        }
        Ok(out)
    }
}

/// A room's epoch from its stream's creation time: microseconds, below
/// 2^53 so it survives JSON numbers, never 0.
fn epoch_of(created: async_nats::datetime::DateTime) -> u64 {
    let micros = created.unix_timestamp_nanos() / 1000;
    (u64::try_from(micros).unwrap_or(0) & ((1 << 53) - 1)).max(1)
}

impl RoomHub for NatsHub {
    fn join(&self, request: JoinRequest) -> BoxFuture<'_, Result<Membership, ChatError>> {
        Box::pin(async move {
            match self.join_once(&request).await {
                Err(ChatError::Store(_)) => {
                    // The room's stream was reset under it, or the room
                    // closed as idle: open it anew.
                    self.rooms.forget(&request.room);
                    self.join_once(&request).await
                }
                other => other,
            }
        })
    }

    fn history(
        &self,
        room: RoomName,
        epoch: u64,
        from: u64,
        to: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Arc<Message>>, ChatError>> {
        Box::pin(self.read(room, epoch, from, to, limit))
    }

    fn send(
        &self,
        room: RoomName,
        draft: Draft,
        owner: Option<Arc<str>>,
    ) -> BoxFuture<'_, Result<Arc<Message>, ChatError>> {
        Box::pin(async move {
            for _ in 0..2 {
                if self.shutdown.is_triggered() {
                    return Err(ChatError::ShuttingDown);
                }
                self.cluster.check().map_err(unavailable)?;
                let open = self.room(&room, owner.as_deref()).await?;
                let reopen = || {
                    let closed = lock(&open.shared).closed;
                    matches!(closed, Some(Closed::Idle | Closed::Reset))
                };
                if reopen() {
                    // Reset (or closed as idle) before this send: open it
                    // anew.
                    self.rooms.remove_open(&room, &open);
                    continue;
                }
                let (reply, answer) = tokio::sync::oneshot::channel();
                let sent = open
                    .tx
                    .send(Submission {
                        member: None,
                        draft: draft.clone(),
                        reply: Some(reply),
                    })
                    .await;
                let answer = match sent {
                    Ok(()) => answer.await.ok(),
                    Err(_) => None,
                };
                match answer {
                    Some(stored) => return stored,
                    // Closed as idle or reset under this send, which was
                    // not published: open it anew.
                    None if reopen() => self.rooms.remove_open(&room, &open),
                    None => return Err(ChatError::ShuttingDown),
                }
            }
            Err(ChatError::ShuttingDown)
        })
    }
}

impl Room {
    async fn join(
        self: &Arc<Self>,
        cluster: &Cluster,
        start: Start,
        member: Option<String>,
    ) -> Result<Membership, ChatError> {
        // A resume past what this node has delivered: if JetStream holds
        // that seq, wait for the feed to deliver it; else refuse below.
        if let Start::After { seq, epoch } = start
            && epoch.is_none_or(|e| e == self.epoch)
            && seq > *self.delivered.borrow()
        {
            let stream = cluster
                .jetstream()
                .get_stream(&self.stream)
                .await
                .map_err(|e| unavailable(ClusterError::js(format!("read {}", self.stream), e)))?;
            if seq <= stream.cached_info().state.last_sequence {
                let mut delivered = self.delivered.subscribe();
                let wait = cluster.config().request_timeout;
                let reached = tokio::time::timeout(wait, delivered.wait_for(|&d| d >= seq)).await;
                if !matches!(reached, Ok(Ok(_))) {
                    return Err(unavailable(format!(
                        "this node has not received room {} up to seq {seq} yet",
                        self.name
                    )));
                }
            }
        }
        let mut shared = lock(&self.shared);
        match shared.closed {
            Some(Closed::Shutdown) => return Err(ChatError::ShuttingDown),
            Some(Closed::Reset | Closed::Idle) => {
                return Err(ChatError::Store(crate::chat::StoreError::Closed));
            }
            None => {}
        }
        let (epoch, oldest, last) = (self.epoch, shared.oldest, shared.last);
        let replay_from = start.replay_from(&self.name, epoch, oldest, last)?;
        let (id, live, end) = {
            let shared = &mut *shared;
            add_member(&mut shared.members, &mut shared.next_id, self.queue)
        };
        drop(shared);
        let name = member.filter(|_| self.announce);
        if let Some(name) = &name {
            self.announce(Kind::Joined, name);
        }
        Ok(Membership::new(
            self.name.clone(),
            epoch,
            oldest,
            last,
            replay_from,
            live,
            Outbox::new(id, self.tx.clone()),
            end,
            Box::new(Leave {
                room: Arc::clone(self),
                id,
                name,
            }),
        ))
    }

    fn announce(&self, kind: Kind, name: &str) {
        let submission = Submission {
            member: None,
            draft: Draft::announcement(kind, name),
            reply: None,
        };
        // Announcements never wait: under a full inbox one is skipped.
        if self.tx.try_send(submission).is_err() {
            tracing::debug!(room = %self.name, member = name, "announcement skipped: room busy or closed");
        }
    }

    /// Hands `message` to every member (cutting off the full ones) and
    /// records it as the room's last; skips what was delivered already.
    fn deliver(&self, message: Message) {
        let seq = message.seq;
        let message = Arc::new(message);
        let mut shared = lock(&self.shared);
        if seq <= shared.last {
            return;
        }
        let queue = self.queue;
        shared
            .members
            .retain(|_, slot| match slot.tx.try_send(Arc::clone(&message)) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    slot.end.end(EndReason::TooSlow { queue });
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
        shared.last = seq;
        shared.last_used = Instant::now();
        shared.oldest = shared.oldest.max((seq + 1).saturating_sub(self.history));
        drop(shared);
        self.delivered.send_replace(seq);
    }

    /// Follows the room's stream into the members' queues until the
    /// publisher is done, recreating the consumer after errors and
    /// reconnects. A stream that is gone (deleted, or NATS lost its
    /// storage) is created again with the room's settings, as when a room
    /// opens; its new epoch then resets the room here (see
    /// [`Room::reset`]).
    async fn feed(self: Arc<Self>, cluster: Arc<Cluster>) {
        let mut link = cluster.link();
        let mut warned = None;
        loop {
            let connected = tokio::select! {
                biased;
                () = self.done.cancelled() => return,
                state = link.wait_for(|l| l.connected) => state.map(|l| l.generation),
            };
            let Ok(generation) = connected else { return };
            let from = lock(&self.shared).last + 1;
            let attempt = async {
                let stream = cluster.ensure_stream(self.config.clone()).await?;
                let created = stream.cached_info().created;
                let messages = cluster
                    .follow(
                        &self.stream,
                        &self.subject,
                        DeliverPolicy::ByStartSequence {
                            start_sequence: from,
                        },
                    )
                    .await?;
                Ok::<_, ClusterError>((created, messages))
            };
            let (created, messages) = tokio::select! {
                biased;
                () = self.done.cancelled() => return,
                result = attempt => match result {
                    Ok(found) => found,
                    Err(err) => {
                        if warning_due(&mut warned) {
                            tracing::warn!(room = %self.name, %err, "cluster: cannot follow the room's stream; retrying (this warning repeats at most every 30 s)");
                        } else {
                            tracing::debug!(room = %self.name, %err, "cluster: cannot follow the room's stream; retrying");
                        }
                        if pause(&self.done).await { return; }
                        continue;
                    }
                },
            };
            warned = None;
            let epoch = epoch_of(created);
            if epoch != self.epoch {
                self.reset(epoch);
                return;
            }
            tokio::pin!(messages);
            let mut watchdog = tokio::time::interval_at(tokio::time::Instant::now() + STALL, STALL);
            watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut at_last_tick = *self.delivered.borrow();
            loop {
                let next = tokio::select! {
                    biased;
                    () = self.done.cancelled() => return,
                    _ = watchdog.tick() => {
                        // A consumer whose server went away can stall
                        // without an error: if JetStream stored messages
                        // this node has not received for a whole period,
                        // start a new one where this one stopped.
                        let delivered = *self.delivered.borrow();
                        let behind = self.published.load(Ordering::Relaxed) > delivered;
                        if behind && delivered == at_last_tick {
                            tracing::warn!(room = %self.name, delivered, "cluster: room consumer stalled; recreating it");
                            break;
                        }
                        at_last_tick = delivered;
                        continue;
                    }
                    () = super::connection_gone(&mut link, generation) => break,
                    next = messages.next() => next,
                };
                let message = match next {
                    Some(Ok(message)) => message,
                    Some(Err(err)) => {
                        tracing::warn!(room = %self.name, %err, "cluster: room consumer failed; recreating it");
                        break;
                    }
                    None => break,
                };
                let seq = message.info().map_or(0, |i| i.stream_sequence);
                match decode(seq, self.epoch, &message.payload) {
                    Some(decoded) => self.deliver(decoded),
                    None => {
                        tracing::warn!(room = %self.name, seq, "cluster: undecodable chat message skipped");
                        // Count it as delivered so the room moves on.
                        let mut shared = lock(&self.shared);
                        shared.last = shared.last.max(seq);
                        drop(shared);
                        self.delivered.send_replace(seq);
                    }
                }
            }
            if pause(&self.done).await {
                return;
            }
        }
    }

    /// The room's stream is not the one this room opened (it was deleted
    /// or lost, and created again, here or by another node): the room
    /// carries on as a new epoch, in a new [`Room`]. This one ends its
    /// members and watchers (their seqs belong to the old epoch: a resume
    /// with it is refused with FAILED_PRECONDITION) and stops its
    /// publisher, which takes it out of the table.
    fn reset(&self, epoch: u64) {
        tracing::warn!(room = %self.name, old_epoch = self.epoch, epoch, "cluster: the room's stream was created anew (history reset); its members must rejoin");
        let old = self.epoch;
        self.close(Closed::Reset, || EndReason::StorageFailed {
            reason: format!("the room's history was reset: epoch {old} is now {epoch}"),
            full: false,
        });
        self.done.cancel();
    }

    fn close(&self, why: Closed, reason: impl Fn() -> EndReason) {
        let mut shared = lock(&self.shared);
        shared.closed.get_or_insert(why);
        for (_, slot) in shared.members.drain() {
            slot.end.end(reason());
        }
    }

    /// Publishes what members submit until `token` (or until the room has
    /// been idle for `idle`, when it leaves `table`); then publishes what
    /// was already submitted, waits for the feed to deliver it, and ends
    /// every member.
    async fn publisher(
        self: Arc<Self>,
        cluster: Arc<Cluster>,
        mut rx: mpsc::Receiver<Submission>,
        max_batch: usize,
        token: CancellationToken,
        (table, idle): (Arc<RoomTable<Room>>, Duration),
    ) {
        let mut published = 0u64;
        let period = idle_check_period(idle);
        let mut checks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                biased;
                () = token.cancelled() => break,
                () = self.done.cancelled() => break,
                next = rx.recv() => match next {
                    Some(submission) => submission,
                    None => break,
                },
                _ = checks.tick() => {
                    let mut shared = lock(&self.shared);
                    let pending = !rx.is_empty()
                        || self.published.load(Ordering::Relaxed) > shared.last;
                    if shared.closed.is_none()
                        && idle_expired(shared.members.len(), pending, shared.last_used, idle)
                    {
                        shared.closed = Some(Closed::Idle);
                        break;
                    }
                    continue;
                }
            };
            let batch = take_batch(&mut rx, first, max_batch);
            published = published.max(self.publish(&cluster, batch).await);
        }
        rx.close();
        if lock(&self.shared).closed == Some(Closed::Reset) {
            // Nothing more goes to the old epoch: what is still queued is
            // dropped unsent (a Send sees its reply dropped and retries in
            // the room opened anew; members were ended already).
            while rx.recv().await.is_some() {}
            table.remove_open(&self.name, &self);
            tracing::debug!(room = %self.name, "cluster: reset room closed");
            return;
        }
        while let Some(first) = rx.recv().await {
            let batch = take_batch(&mut rx, first, max_batch);
            published = published.max(self.publish(&cluster, batch).await);
        }
        // Every member gets what was stored before the end.
        let mut delivered = self.delivered.subscribe();
        let wait = cluster.config().request_timeout;
        let _ = tokio::time::timeout(wait, delivered.wait_for(|&d| d >= published)).await;
        self.close(Closed::Shutdown, || EndReason::Shutdown);
        self.done.cancel();
        if lock(&self.shared).closed == Some(Closed::Idle) {
            table.remove_open(&self.name, &self);
            tracing::debug!(room = %self.name, "cluster: idle room closed");
            return;
        }
        tracing::debug!(room = %self.name, published, "cluster: room closed for shutdown");
    }

    /// Publishes one batch (pipelined: every message is sent before the
    /// first acknowledgment is awaited); returns the highest seq stored.
    async fn publish(&self, cluster: &Cluster, batch: Vec<Submission>) -> u64 {
        let js = cluster.jetstream();
        let now = now_ms();
        let mut pending: Vec<(Submission, Result<PublishAckFuture, String>)> =
            Vec::with_capacity(batch.len());
        for submission in batch {
            let draft = &submission.draft;
            let wire = Wire {
                kind: draft.kind.to_byte(),
                sender: draft.sender.clone(),
                text: draft.text.clone(),
                key: draft.key.clone(),
                timestamp_ms: now,
            };
            let sent = match serde_json::to_vec(&wire) {
                Ok(payload) => {
                    let mut message = PublishMessage::build().payload(payload.into());
                    if !draft.key.is_empty() {
                        message = message.message_id(message_id(&draft.sender, &draft.key));
                    }
                    js.send_publish(self.subject.clone(), message)
                        .await
                        .map_err(|e| e.to_string())
                }
                Err(err) => Err(err.to_string()),
            };
            pending.push((submission, sent));
        }
        let mut highest = 0;
        for (
            Submission {
                member,
                draft,
                reply,
            },
            sent,
        ) in pending
        {
            let acked = match sent {
                Ok(future) => future.await.map_err(|e| e.to_string()),
                Err(err) => Err(err),
            };
            match acked {
                Ok(ack) if ack.duplicate => {
                    let original = self.original(cluster, ack.sequence, draft).await;
                    if let Some(member) = member {
                        self.acknowledge(member, original.clone());
                    }
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(original));
                    }
                }
                Ok(ack) => {
                    highest = highest.max(ack.sequence);
                    self.published.fetch_max(ack.sequence, Ordering::Relaxed);
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(Arc::new(Message {
                            seq: ack.sequence,
                            epoch: self.epoch,
                            kind: draft.kind,
                            sender: draft.sender,
                            text: draft.text,
                            key: draft.key,
                            timestamp_ms: now,
                            encoding: Default::default(),
                        })));
                    }
                }
                Err(err) => {
                    tracing::warn!(room = %self.name, %err, "cluster: storing a chat message failed");
                    let reason = format!("NATS JetStream did not store the message: {err}");
                    if let Some(member) = member {
                        let slot = lock(&self.shared).members.remove(&member);
                        if let Some(slot) = slot {
                            slot.end.end(EndReason::StorageFailed {
                                reason: reason.clone(),
                                full: false,
                            });
                        }
                    }
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(unavailable(reason)));
                    }
                }
            }
        }
        highest
    }

    /// The stored original of a duplicate at `seq`, once the feed has
    /// delivered it (so an acknowledgment never comes before the message).
    async fn original(&self, cluster: &Cluster, seq: u64, draft: Draft) -> Arc<Message> {
        let mut delivered = self.delivered.subscribe();
        let wait = cluster.config().request_timeout;
        let _ = tokio::time::timeout(wait, delivered.wait_for(|&d| d >= seq)).await;
        let original = match cluster.jetstream().get_stream(&self.stream).await {
            Ok(stream) => stream
                .get_raw_message(seq)
                .await
                .ok()
                .and_then(|raw| decode(seq, self.epoch, &raw.payload)),
            Err(_) => None,
        };
        Arc::new(original.unwrap_or_else(|| Message {
            seq,
            epoch: self.epoch,
            kind: draft.kind,
            sender: draft.sender,
            text: draft.text,
            key: draft.key,
            timestamp_ms: now_ms(),
            encoding: Default::default(),
        }))
    }

    /// Sends `member` the original of its duplicate as its acknowledgment.
    fn acknowledge(&self, member: u64, original: Arc<Message>) {
        let mut shared = lock(&self.shared);
        if let Some(slot) = shared.members.get(&member)
            && let Err(mpsc::error::TrySendError::Full(_)) = slot.tx.try_send(original)
        {
            slot.end.end(EndReason::TooSlow { queue: self.queue });
            shared.members.remove(&member);
        }
    }
}

fn take_batch(
    rx: &mut mpsc::Receiver<Submission>,
    first: Submission,
    max_batch: usize,
) -> Vec<Submission> {
    let mut batch = vec![first];
    while batch.len() < max_batch {
        match rx.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) => break,
        }
    }
    batch
}

/// How often a feed that keeps failing logs a warning.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Whether a repeated warning is due (the first of a run of failures,
/// then one every [`WARN_EVERY`]); records it in `last` if so.
fn warning_due(last: &mut Option<Instant>) -> bool {
    let now = Instant::now();
    if last.is_some_and(|at| now.duration_since(at) < WARN_EVERY) {
        return false;
    }
    *last = Some(now);
    true
}

/// Waits a moment before a retry; true if `token` was cancelled meanwhile.
async fn pause(token: &CancellationToken) -> bool {
    tokio::select! {
        () = token.cancelled() => true,
        () = tokio::time::sleep(Duration::from_millis(250)) => false,
    }
}

/// Leaves the room when a membership is dropped.
struct Leave {
    room: Arc<Room>,
    id: u64,
    name: Option<String>,
}

impl Drop for Leave {
    fn drop(&mut self) {
        let open = {
            let mut shared = lock(&self.room.shared);
            shared.members.remove(&self.id);
            shared.closed.is_none()
        };
        if open && let Some(name) = &self.name {
            self.room.announce(Kind::Left, name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_separate_sender_and_key() {
        assert_ne!(message_id("ab", "c"), message_id("a", "bc"));
        assert_eq!(message_id("a", "k"), message_id("a", "k"));
        assert_eq!(message_id("a", "k").len(), 64);
    }

    #[test]
    fn a_run_of_failures_warns_once_per_period() {
        let mut last = None;
        assert!(warning_due(&mut last));
        assert!(!warning_due(&mut last));
        last = last.and_then(|at: Instant| at.checked_sub(WARN_EVERY));
        assert!(warning_due(&mut last));
    }

    #[test]
    fn payloads_round_trip() {
        let wire = Wire {
            kind: Kind::Joined.to_byte(),
            sender: "ann".into(),
            text: "ann joined".into(),
            key: String::new(),
            timestamp_ms: 5,
        };
        let bytes = serde_json::to_vec(&wire).expect("encodes");
        let message = decode(3, 9, &bytes).expect("decodes");
        assert_eq!((message.seq, message.epoch), (3, 9));
        assert_eq!(message.kind, Kind::Joined);
        assert!(decode(1, 1, b"{}").is_none());
    }
}
