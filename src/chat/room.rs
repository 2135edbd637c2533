//! The room hub: ordered, durable fan-out of a room's messages to its
//! members.
//!
//! One actor task per open room owns the room's sequence. It takes every
//! submission waiting in its channel as one batch, gives each message the
//! next seq, has the batch committed by the store (one fsync for many
//! messages, and for many rooms), and only then hands each message, as one
//! shared `Arc`, to every member's bounded queue. So every member sees one
//! order, and nothing is delivered that is not durable.
//!
//! Joining registers the member's queue and reads the room's last seq under
//! the same lock the actor broadcasts under: the member gets, live, exactly
//! the messages after that seq, and replays the ones before it from the
//! store. No gap, no duplicate.
//!
//! A member whose queue is full is cut off (its queue is dropped and its
//! [`EndSignal`] says why); nobody else waits for it.
//!
//! Open rooms are held in a [`RoomTable`], shared with the clustered hub:
//! at most `chat.max_rooms`, each charged to the identities in it, or to
//! its opener while nobody is (at most `chat.max_rooms_per_identity` each,
//! see [`RoomTable`] and [`crate::shares`]). A
//! room with no members and nothing pending for `chat.room_idle_timeout`
//! closes and leaves the table (its actor checks, see [`idle_expired`]);
//! its history stays stored and the next join or send opens it again.
//!
//! [`RoomHub`] is what the gRPC service depends on; [`LocalHub`] is the
//! single-server implementation. The clustered hub
//! (`crate::cluster::chat::NatsHub`, a JetStream stream per room whose
//! stream sequence is the seq) implements the same trait. No tonic or
//! protobuf types appear here.

use std::{
    collections::{HashMap, VecDeque, hash_map::Entry},
    path::Path,
    sync::{Arc, Mutex, MutexGuard, OnceLock},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use metrics::Counter;
use tokio::sync::{OnceCell, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{
    ChatError, Draft, Kind, Message, RoomName, Start, StoreError, now_ms,
    store::{Append, StorageHealth, Store},
};
use crate::{
    config::ChatConfig,
    shares::{Share, Shares},
    shutdown::Shutdown,
};

/// A room service: join rooms, read their history.
pub trait RoomHub: Send + Sync + 'static {
    /// Joins a room (opening it if needed).
    fn join(&self, request: JoinRequest) -> BoxFuture<'_, Result<Membership, ChatError>>;

    /// Stored messages of `room` (whose epoch is `epoch`) with seq in
    /// `from..=to`, at most `limit`, in order.
    fn history(
        &self,
        room: RoomName,
        epoch: u64,
        from: u64,
        to: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Arc<Message>>, ChatError>>;

    /// Sends one message to `room` (opening it if needed, charged to
    /// `owner`, the authenticated caller) without joining: it takes its
    /// place in the room's one order like a member's message, and the
    /// stored message, with its seq, is returned once it is durable. A
    /// draft whose sender and idempotency key are known returns the stored
    /// original instead.
    fn send(
        &self,
        room: RoomName,
        draft: Draft,
        owner: Option<Arc<str>>,
    ) -> BoxFuture<'_, Result<Arc<Message>, ChatError>>;
}

/// Counters the room hub feeds (no-ops unless the server hands it real
/// ones, see [`crate::server_metrics`]).
#[derive(Debug, Clone)]
pub struct ChatCounters {
    /// Messages stored (`streamhub_chat_messages_total`).
    pub messages: Counter,
    /// Members cut off as too slow (`streamhub_chat_cutoffs_total`).
    pub cutoffs: Counter,
}

impl Default for ChatCounters {
    fn default() -> Self {
        Self {
            messages: Counter::noop(),
            cutoffs: Counter::noop(),
        }
    }
}

/// What a member asks for when joining.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    /// The room.
    pub room: RoomName,
    /// Where delivery starts.
    pub start: Start,
    /// A name to announce the join and leave under, if any.
    pub member: Option<String>,
    /// The authenticated caller, charged with the room while it is in it
    /// (`chat.max_rooms_per_identity`); `None` when anonymous.
    pub owner: Option<Arc<str>>,
}

/// Why a member's delivery ended.
#[derive(Debug)]
pub enum EndReason {
    /// The server is shutting down; everything accepted was delivered.
    Shutdown,
    /// The member's queue of `queue` messages was full.
    TooSlow {
        /// The queue's capacity.
        queue: usize,
    },
    /// The member sent something unacceptable.
    Invalid(ChatError),
    /// Storage failed; the messages of the failed batch were not stored.
    StorageFailed {
        /// What failed, without paths.
        reason: String,
        /// Whether the disk is full.
        full: bool,
    },
    /// The member's inbound stream failed (a message that cannot be
    /// decoded or is over the size limit, or the client went away); the
    /// service layer holds the status the call ends with.
    InboundFailed,
}

/// Tells a member's stream that its delivery has ended, and why. The queue
/// is closed before, so whatever was queued can still be delivered.
#[derive(Debug, Default)]
pub struct EndSignal {
    token: CancellationToken,
    reason: OnceLock<EndReason>,
}

impl EndSignal {
    /// Ends delivery for `reason`; the first reason wins.
    pub fn end(&self, reason: EndReason) {
        if self.reason.set(reason).is_ok() {
            self.token.cancel();
        }
    }

    /// Completes once delivery has ended.
    pub async fn ended(&self) {
        self.token.cancelled().await;
    }

    /// Why delivery ended, if it has.
    pub fn reason(&self) -> Option<&EndReason> {
        self.reason.get()
    }
}

/// A message submitted to a room actor.
#[derive(Debug)]
pub struct Submission {
    /// The submitting member (to send a duplicate's acknowledgment to), or
    /// `None` for the server's own announcements.
    pub member: Option<u64>,
    /// The message.
    pub draft: Draft,
    /// Where to send the stored message (or the original, for a
    /// duplicate) once it is durable, for a send without membership.
    pub reply: Option<Reply>,
}

/// The answer to a [`RoomHub::send`].
pub type Reply = oneshot::Sender<Result<Arc<Message>, ChatError>>;

/// Sends a member's messages to its room.
#[derive(Debug, Clone)]
pub struct Outbox {
    member: u64,
    tx: mpsc::Sender<Submission>,
}

impl Outbox {
    /// An outbox for `member` feeding `tx` (for other [`RoomHub`]s).
    pub fn new(member: u64, tx: mpsc::Sender<Submission>) -> Self {
        Self { member, tx }
    }

    /// Submits `draft`; waits while the room's inbox is full. The message
    /// is acknowledged later, by its copy arriving in the member's queue.
    pub async fn submit(&self, draft: Draft) -> Result<(), ChatError> {
        self.tx
            .send(Submission {
                member: Some(self.member),
                draft,
                reply: None,
            })
            .await
            .map_err(|_| ChatError::ShuttingDown)
    }
}

/// A member of a room. Dropping it leaves the room.
pub struct Membership {
    /// The room.
    pub room: RoomName,
    /// The room's epoch.
    pub epoch: u64,
    /// Oldest stored seq when joining.
    pub oldest: u64,
    /// Last seq when joining: the queue delivers messages after it.
    pub last: u64,
    /// First seq to replay from storage (nothing to replay when above
    /// `last`).
    pub replay_from: u64,
    /// Live messages, in order; duplicate acknowledgments may carry an
    /// older seq.
    pub live: mpsc::Receiver<Arc<Message>>,
    /// Where this member's messages go.
    pub outbox: Outbox,
    /// Signals the end of delivery.
    pub end: Arc<EndSignal>,
    _leave: Box<dyn Send + Sync>,
}

impl Membership {
    /// A membership made by another [`RoomHub`]: `leave` is dropped with
    /// it, and does whatever leaving the room takes.
    #[allow(clippy::too_many_arguments)] // the fields of the struct, each documented there
    pub fn new(
        room: RoomName,
        epoch: u64,
        oldest: u64,
        last: u64,
        replay_from: u64,
        live: mpsc::Receiver<Arc<Message>>,
        outbox: Outbox,
        end: Arc<EndSignal>,
        leave: Box<dyn Send + Sync>,
    ) -> Self {
        Self {
            room,
            epoch,
            oldest,
            last,
            replay_from,
            live,
            outbox,
            end,
            _leave: leave,
        }
    }

    /// This membership, also holding `presence` (its identity's charge for
    /// being in the room) until it is dropped.
    pub(crate) fn holding<R: Send + Sync + 'static>(
        mut self,
        presence: Option<Presence<R>>,
    ) -> Self {
        if presence.is_some() {
            let leave = std::mem::replace(&mut self._leave, Box::new(()));
            self._leave = Box::new((leave, presence));
        }
        self
    }
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("room", &self.room)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

/// A room being opened or open: filled in once by the first opener.
pub(crate) type Cell<R> = Arc<OnceCell<Arc<R>>>;

struct TableEntry<R> {
    cell: Cell<R>,
    /// The opener's share, until anyone is in the room (or the room
    /// closes): a room opened by Send is charged to its sender until
    /// somebody joins or watches it.
    opener: Option<Share>,
    /// The identities in the room (members and watchers), each charged
    /// once however many calls it has there, with that number of calls.
    present: HashMap<Arc<str>, (usize, Option<Share>)>,
}

/// The open rooms of a hub (`R` is the hub's room type): at most
/// `chat.max_rooms`. A room counts against `chat.max_rooms_per_identity`
/// of each identity that is in it (member or watcher), from its
/// [`RoomTable::enter`] until its last call there ends; a room nobody is
/// in is charged to its opener until somebody enters, then to nobody
/// (it closes when idle). So one identity cannot use up another's share by
/// staying in the rooms the other opened. Shared by the local and the
/// clustered hub.
pub(crate) struct RoomTable<R> {
    max_rooms: usize,
    shares: Arc<Shares>,
    rooms: Mutex<HashMap<RoomName, TableEntry<R>>>,
}

impl<R> RoomTable<R> {
    /// An empty table with `config`'s limits.
    pub(crate) fn new(config: &ChatConfig) -> Arc<Self> {
        Arc::new(Self {
            max_rooms: config.max_rooms,
            shares: Shares::new(
                "open rooms",
                "chat.max_rooms_per_identity",
                config.max_rooms_per_identity,
            ),
            rooms: Mutex::new(HashMap::new()),
        })
    }

    /// The cell of `room`, a new one (charged to `owner`) if the room is
    /// not open.
    pub(crate) fn cell(&self, room: &RoomName, owner: Option<&str>) -> Result<Cell<R>, ChatError> {
        let mut rooms = lock(&self.rooms);
        let open = rooms.len();
        match rooms.entry(room.clone()) {
            Entry::Occupied(entry) => Ok(Arc::clone(&entry.get().cell)),
            Entry::Vacant(entry) => {
                if open >= self.max_rooms {
                    return Err(ChatError::TooManyRooms {
                        limit: self.max_rooms,
                    });
                }
                let share = self.shares.claim(owner)?;
                let cell = Arc::default();
                entry.insert(TableEntry {
                    cell: Arc::clone(&cell),
                    opener: share,
                    present: HashMap::new(),
                });
                Ok(cell)
            }
        }
    }

    /// Charges `identity` (`None`: anonymous, not counted) for being in
    /// the open room `open` until the returned [`Presence`] is dropped;
    /// a second call of the same identity in the room costs nothing more.
    /// The opener's charge ends here (taken over if the opener is the one
    /// entering).
    ///
    /// # Errors
    /// [`ChatError::ShareExhausted`] when `identity` is in its share of
    /// rooms already.
    pub(crate) fn enter(
        self: &Arc<Self>,
        room: &RoomName,
        open: &Arc<R>,
        identity: Option<&str>,
    ) -> Result<Option<Presence<R>>, ChatError> {
        let Some(identity) = identity else {
            return Ok(None);
        };
        let mut rooms = lock(&self.rooms);
        let Some(entry) = rooms
            .get_mut(room)
            .filter(|entry| entry.cell.get().is_some_and(|held| Arc::ptr_eq(held, open)))
        else {
            // Gone from the table (closing): nothing left to charge.
            return Ok(None);
        };
        if let Some((calls, _)) = entry.present.get_mut(identity) {
            *calls += 1;
        } else {
            let share = match entry.opener.take() {
                Some(share) if share.identity() == identity => Some(share),
                opener => match self.shares.claim(Some(identity)) {
                    Ok(share) => share,
                    Err(exhausted) => {
                        entry.opener = opener;
                        return Err(exhausted.into());
                    }
                },
            };
            entry.present.insert(Arc::from(identity), (1, share));
        }
        Ok(Some(Presence {
            table: Arc::clone(self),
            room: room.clone(),
            cell: Arc::clone(&entry.cell),
            identity: Arc::from(identity),
        }))
    }

    /// The open room `room`, opened by `open` if it is not open yet (a
    /// slot taken with [`RoomTable::cell`], charged to `owner`); if the
    /// opening fails, the slot is free again.
    ///
    /// # Errors
    /// Those of [`RoomTable::cell`], or `open`'s.
    pub(crate) async fn get_or_open<F, Fut>(
        &self,
        room: &RoomName,
        owner: Option<&str>,
        open: F,
    ) -> Result<Arc<R>, ChatError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Arc<R>, ChatError>>,
    {
        let cell = self.cell(room, owner)?;
        match cell.get_or_try_init(open).await {
            Ok(opened) => Ok(Arc::clone(opened)),
            Err(err) => {
                // Nothing opened: the slot is free again.
                if !cell.initialized() {
                    self.remove(room, &cell);
                }
                Err(err)
            }
        }
    }

    /// Removes `room` if its entry is still `cell` (not a newer opening).
    pub(crate) fn remove(&self, room: &RoomName, cell: &Cell<R>) {
        let mut rooms = lock(&self.rooms);
        if rooms
            .get(room)
            .is_some_and(|entry| Arc::ptr_eq(&entry.cell, cell))
        {
            rooms.remove(room);
        }
    }

    /// Removes `room` if its entry holds the open room `open`.
    pub(crate) fn remove_open(&self, room: &RoomName, open: &Arc<R>) {
        let mut rooms = lock(&self.rooms);
        if rooms
            .get(room)
            .and_then(|entry| entry.cell.get())
            .is_some_and(|held| Arc::ptr_eq(held, open))
        {
            rooms.remove(room);
        }
    }

    /// Removes `room` whatever its entry holds.
    pub(crate) fn forget(&self, room: &RoomName) {
        lock(&self.rooms).remove(room);
    }

    /// Rooms in the table.
    pub(crate) fn len(&self) -> usize {
        lock(&self.rooms).len()
    }
}

/// One call of an identity in a room (see [`RoomTable::enter`]); when the
/// identity's last call there ends, its share of rooms gets the room back.
pub(crate) struct Presence<R> {
    table: Arc<RoomTable<R>>,
    room: RoomName,
    cell: Cell<R>,
    identity: Arc<str>,
}

impl<R> Drop for Presence<R> {
    fn drop(&mut self) {
        let mut rooms = lock(&self.table.rooms);
        let Some(entry) = rooms
            .get_mut(&self.room)
            .filter(|entry| Arc::ptr_eq(&entry.cell, &self.cell))
        else {
            return;
        };
        if let Some((calls, _)) = entry.present.get_mut(&self.identity) {
            *calls = calls.saturating_sub(1);
            if *calls == 0 {
                entry.present.remove(&self.identity);
            }
        }
    }
}

/// How often a room checks whether it has been idle for `idle`.
pub(crate) fn idle_check_period(idle: Duration) -> Duration {
    (idle / 4).max(Duration::from_millis(10))
}

/// Whether a room with `members` members, no pending submission
/// (`pending` false) and last used at `last_used` has been idle for `idle`:
/// then it may close.
pub(crate) fn idle_expired(
    members: usize,
    pending: bool,
    last_used: Instant,
    idle: Duration,
) -> bool {
    members == 0 && !pending && last_used.elapsed() >= idle
}

/// The single-server room hub over the embedded store.
pub struct LocalHub {
    store: Arc<Store>,
    config: ChatConfig,
    shutdown: Shutdown,
    rooms: Arc<RoomTable<Room>>,
    counters: ChatCounters,
}

impl std::fmt::Debug for LocalHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalHub").finish_non_exhaustive()
    }
}

impl LocalHub {
    /// Opens the store in `dir`; room actors run until `shutdown`.
    pub fn open(dir: &Path, config: ChatConfig, shutdown: Shutdown) -> Result<Self, ChatError> {
        let store = Arc::new(Store::open(dir, config.max_batch)?);
        Ok(Self::with_store(store, config, shutdown))
    }

    /// A hub over an already opened `store`.
    pub fn with_store(store: Arc<Store>, config: ChatConfig, shutdown: Shutdown) -> Self {
        Self {
            store,
            rooms: RoomTable::new(&config),
            config,
            shutdown,
            counters: ChatCounters::default(),
        }
    }

    /// Whether the storage can serve: NOT_SERVING for health while it is
    /// being reopened after an error.
    pub fn storage_health(&self) -> tokio::sync::watch::Receiver<StorageHealth> {
        self.store.health()
    }

    /// The hub, feeding `counters`.
    #[must_use]
    pub fn with_counters(mut self, counters: ChatCounters) -> Self {
        self.counters = counters;
        self
    }

    /// Closes the store once the room actors are done (call after the
    /// shutdown's tasks have finished).
    pub fn close(&self) {
        self.store.close();
    }

    /// Rooms open now.
    pub fn open_rooms(&self) -> usize {
        self.rooms.len()
    }

    async fn open_room(&self, name: &RoomName) -> Result<Arc<Room>, ChatError> {
        let state = self
            .store
            .load_room(name.as_str(), self.config.idempotency_window)
            .await?;
        let (tx, rx) = mpsc::channel(self.config.max_batch.max(64));
        let room = Arc::new(Room {
            name: name.clone(),
            tx,
            queue: self.config.member_queue,
            announce: self.config.announce_members,
            shared: Mutex::new(Shared {
                epoch: state.epoch,
                oldest: state.oldest,
                last: state.last,
                members: HashMap::new(),
                next_id: 1,
                closed: None,
                last_used: Instant::now(),
            }),
            gone: CancellationToken::new(),
        });
        let mut keys = Keys::new(self.config.idempotency_window);
        for message in &state.recent_keys {
            keys.insert(message.sender.clone(), message.key.clone(), message);
        }
        let actor = Actor {
            room: Arc::clone(&room),
            store: Arc::clone(&self.store),
            rx,
            keys,
            epoch: state.epoch,
            oldest: state.oldest,
            last: state.last,
            history: self.config.history,
            max_batch: self.config.max_batch,
            counters: self.counters.clone(),
            idle: self.config.room_idle_timeout,
            table: Arc::clone(&self.rooms),
        };
        tracing::debug!(room = %name, epoch = state.epoch, last = state.last, "room opened");
        self.shutdown.spawn(actor.run(self.shutdown.token()));
        Ok(room)
    }

    async fn room(&self, name: &RoomName, owner: Option<&str>) -> Result<Arc<Room>, ChatError> {
        if self.shutdown.is_triggered() {
            return Err(ChatError::ShuttingDown);
        }
        self.rooms
            .get_or_open(name, owner, || self.open_room(name))
            .await
    }

    /// Runs `attempt` on the open room `name`, again on a fresh opening if
    /// the room closed under it: once after a storage failure (reopening
    /// from what the store really holds), and whenever it closed as idle
    /// (after its actor has finished, so the reopening reads all it
    /// stored).
    async fn on_room<T, F>(
        &self,
        name: &RoomName,
        owner: Option<&str>,
        attempt: impl Fn(Arc<Room>) -> F,
    ) -> Result<T, ChatError>
    where
        F: Future<Output = Result<T, ChatError>>,
    {
        let mut reopened = false;
        loop {
            let room = self.room(name, owner).await?;
            let result = attempt(Arc::clone(&room)).await;
            let closed = lock(&room.shared).closed;
            match (result, closed) {
                (Err(ChatError::Store(_)), Some(Closed::Idle)) => room.gone.cancelled().await,
                (Err(ChatError::Store(err)), _) if !reopened && !self.shutdown.is_triggered() => {
                    tracing::warn!(room = %name, %err, "reopening room after a storage failure");
                    self.rooms.remove_open(name, &room);
                    reopened = true;
                }
                (result, _) => return result,
            }
        }
    }

    async fn send_once(room: Arc<Room>, draft: Draft) -> Result<Arc<Message>, ChatError> {
        if lock(&room.shared).closed.is_some() {
            // Closed by a storage failure or as idle: reopened by the
            // caller; for a shutdown, the caller ends.
            return Err(ChatError::Store(StoreError::Closed));
        }
        let (reply, answer) = oneshot::channel();
        room.tx
            .send(Submission {
                member: None,
                draft,
                reply: Some(reply),
            })
            .await
            .map_err(|_| ChatError::Store(StoreError::Closed))?;
        // Dropped unanswered: the actor stopped (shutdown) before storing.
        answer.await.unwrap_or(Err(ChatError::ShuttingDown))
    }
}

impl RoomHub for LocalHub {
    fn join(&self, request: JoinRequest) -> BoxFuture<'_, Result<Membership, ChatError>> {
        Box::pin(async move {
            let result = self
                .on_room(&request.room, request.owner.as_deref(), |room| {
                    let joined = self
                        .rooms
                        .enter(&request.room, &room, request.owner.as_deref())
                        .and_then(|presence| {
                            room.join(request.start, request.member.clone())
                                .map(|joined| joined.holding(presence))
                        });
                    async move { joined }
                })
                .await;
            shutting_down(result, &self.shutdown)
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
        Box::pin(async move {
            Ok(self
                .store
                .read(room.as_str(), epoch, from, to, limit)
                .await?)
        })
    }

    fn send(
        &self,
        room: RoomName,
        draft: Draft,
        owner: Option<Arc<str>>,
    ) -> BoxFuture<'_, Result<Arc<Message>, ChatError>> {
        Box::pin(async move {
            let result = self
                .on_room(&room, owner.as_deref(), |open| {
                    Self::send_once(open, draft.clone())
                })
                .await;
            shutting_down(result, &self.shutdown)
        })
    }
}

/// A storage error met while the server shuts down is the shutdown.
fn shutting_down<T>(result: Result<T, ChatError>, shutdown: &Shutdown) -> Result<T, ChatError> {
    match result {
        Err(ChatError::Store(StoreError::Closed)) if shutdown.is_triggered() => {
            Err(ChatError::ShuttingDown)
        }
        other => other,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the state consistent (single inserts,
    // removals, sends), so a panic elsewhere does not poison the meaning.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A member's place in a room: its delivery queue and its end signal.
/// Shared with the other [`RoomHub`] implementations (cluster mode).
pub(crate) struct Slot {
    pub(crate) tx: mpsc::Sender<Arc<Message>>,
    pub(crate) end: Arc<EndSignal>,
}

/// Registers a new member in `members` under the next id: its bounded
/// queue of `queue` messages and its end signal. Returns the id, the
/// receiving end of the queue and the signal.
pub(crate) fn add_member(
    members: &mut HashMap<u64, Slot>,
    next_id: &mut u64,
    queue: usize,
) -> (u64, mpsc::Receiver<Arc<Message>>, Arc<EndSignal>) {
    let id = *next_id;
    *next_id += 1;
    let (tx, live) = mpsc::channel(queue);
    let end = Arc::new(EndSignal::default());
    members.insert(
        id,
        Slot {
            tx,
            end: Arc::clone(&end),
        },
    );
    (id, live, end)
}

/// Why a room no longer takes members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    Shutdown,
    StorageFailed,
    /// No members and nothing pending for `chat.room_idle_timeout`.
    Idle,
}

struct Shared {
    epoch: u64,
    oldest: u64,
    last: u64,
    members: HashMap<u64, Slot>,
    next_id: u64,
    closed: Option<Closed>,
    /// When the last member left or the last message was delivered.
    last_used: Instant,
}

/// One open room of the [`LocalHub`].
struct Room {
    name: RoomName,
    tx: mpsc::Sender<Submission>,
    queue: usize,
    announce: bool,
    shared: Mutex<Shared>,
    /// Cancelled once a room closed as idle has stored what it took and
    /// left the table: a reopening then reads everything.
    gone: CancellationToken,
}

impl Room {
    fn join(
        self: &Arc<Self>,
        start: Start,
        member: Option<String>,
    ) -> Result<Membership, ChatError> {
        let mut shared = lock(&self.shared);
        match shared.closed {
            Some(Closed::Shutdown) => return Err(ChatError::ShuttingDown),
            Some(Closed::StorageFailed | Closed::Idle) => {
                return Err(ChatError::Store(super::StoreError::Closed));
            }
            None => {}
        }
        let (epoch, oldest, last) = (shared.epoch, shared.oldest, shared.last);
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
        Ok(Membership {
            room: self.name.clone(),
            epoch,
            oldest,
            last,
            replay_from,
            live,
            outbox: Outbox::new(id, self.tx.clone()),
            end,
            _leave: Box::new(Leave {
                room: Arc::clone(self),
                id,
                name,
            }),
        })
    }

    fn announce(&self, kind: Kind, name: &str) {
        let submission = Submission {
            member: None,
            draft: Draft::announcement(kind, name),
            reply: None,
        };
        // Announcements never wait: under a full inbox one is skipped
        // rather than holding up a join or a leave.
        if self.tx.try_send(submission).is_err() {
            tracing::debug!(room = %self.name, member = name, "announcement skipped: room busy or closed");
        }
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
            shared.last_used = Instant::now();
            shared.closed.is_none()
        };
        if open && let Some(name) = &self.name {
            self.room.announce(Kind::Left, name);
        }
    }
}

/// Idempotency keys of a room's recent messages, per sender.
struct Keys {
    window: usize,
    map: HashMap<(String, String), (u64, i64)>,
    order: VecDeque<(String, String)>,
}

impl Keys {
    fn new(window: usize) -> Self {
        Self {
            window,
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn get(&self, sender: &str, key: &str) -> Option<(u64, i64)> {
        // Allocation-free lookups would need a borrowed pair type; keys are
        // short and this runs once per keyed message.
        self.map.get(&(sender.to_owned(), key.to_owned())).copied()
    }

    fn insert(&mut self, sender: String, key: String, message: &Message) {
        if self.window == 0 {
            return;
        }
        let pair = (sender, key);
        if self
            .map
            .insert(pair.clone(), (message.seq, message.timestamp_ms))
            .is_none()
        {
            self.order.push_back(pair);
        }
        while self.order.len() > self.window {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }
}

struct Actor {
    room: Arc<Room>,
    store: Arc<Store>,
    rx: mpsc::Receiver<Submission>,
    keys: Keys,
    epoch: u64,
    oldest: u64,
    last: u64,
    history: u64,
    max_batch: usize,
    counters: ChatCounters,
    /// `chat.room_idle_timeout`.
    idle: Duration,
    /// The hub's table, to leave when closing as idle.
    table: Arc<RoomTable<Room>>,
}

impl Actor {
    async fn run(mut self, token: CancellationToken) {
        let period = idle_check_period(self.idle);
        let mut checks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                biased;
                () = token.cancelled() => break,
                next = self.rx.recv() => match next {
                    Some(submission) => submission,
                    None => break,
                },
                _ = checks.tick() => {
                    if self.close_if_idle() {
                        break;
                    }
                    continue;
                }
            };
            let batch = self.take_batch(first);
            if !self.process(batch).await {
                return;
            }
        }
        // Shutdown or idle: accept nothing new, but store and deliver what
        // was already submitted (a send that raced the idle close), then
        // end every member.
        self.rx.close();
        while let Some(first) = self.rx.recv().await {
            let batch = self.take_batch(first);
            if !self.process(batch).await {
                return;
            }
        }
        let mut shared = lock(&self.room.shared);
        let closed = *shared.closed.get_or_insert(Closed::Shutdown);
        for (_, slot) in shared.members.drain() {
            slot.end.end(EndReason::Shutdown);
        }
        drop(shared);
        if closed == Closed::Idle {
            self.table.remove_open(&self.room.name, &self.room);
            self.room.gone.cancel();
            tracing::debug!(room = %self.room.name, last = self.last, "idle room closed");
        } else {
            tracing::debug!(room = %self.room.name, last = self.last, "room closed for shutdown");
        }
    }

    /// Closes the room if it has been idle for `chat.room_idle_timeout`
    /// (no members, nothing submitted); joins and sends then wait for it
    /// to be gone and open it again.
    fn close_if_idle(&self) -> bool {
        let mut shared = lock(&self.room.shared);
        if shared.closed.is_none()
            && idle_expired(
                shared.members.len(),
                !self.rx.is_empty(),
                shared.last_used,
                self.idle,
            )
        {
            shared.closed = Some(Closed::Idle);
            return true;
        }
        false
    }

    fn take_batch(&mut self, first: Submission) -> Vec<Submission> {
        let mut batch = vec![first];
        while batch.len() < self.max_batch {
            match self.rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        batch
    }

    /// Stores and delivers one batch; false if storage failed and the room
    /// is closed.
    async fn process(&mut self, batch: Vec<Submission>) -> bool {
        let now = now_ms();
        let mut stored: Vec<Arc<Message>> = Vec::with_capacity(batch.len());
        let mut acks: Vec<(u64, Arc<Message>)> = Vec::new();
        let mut replies: Vec<(Reply, Arc<Message>)> = Vec::new();
        let mut batch_keys: HashMap<(String, String), (u64, i64)> = HashMap::new();
        let mut next = self.last + 1;
        for Submission {
            member,
            draft,
            reply,
        } in batch
        {
            if !draft.key.is_empty() {
                let pair = (draft.sender.clone(), draft.key.clone());
                let known = self
                    .keys
                    .get(&draft.sender, &draft.key)
                    .or_else(|| batch_keys.get(&pair).copied());
                if let Some((seq, timestamp_ms)) = known {
                    let original = Arc::new(Message {
                        seq,
                        epoch: self.epoch,
                        kind: draft.kind,
                        sender: draft.sender,
                        text: draft.text,
                        key: draft.key,
                        timestamp_ms,
                        encoding: Default::default(),
                    });
                    if let Some(reply) = reply {
                        replies.push((reply, Arc::clone(&original)));
                    }
                    if let Some(member) = member {
                        acks.push((member, original));
                    }
                    continue;
                }
                batch_keys.insert(pair, (next, now));
            }
            let message = Arc::new(Message {
                seq: next,
                epoch: self.epoch,
                kind: draft.kind,
                sender: draft.sender,
                text: draft.text,
                key: draft.key,
                timestamp_ms: now,
                encoding: Default::default(),
            });
            if let Some(reply) = reply {
                replies.push((reply, Arc::clone(&message)));
            }
            stored.push(message);
            next += 1;
        }

        if !stored.is_empty() {
            let last = next - 1;
            let oldest = self.oldest.max((last + 1).saturating_sub(self.history));
            let append = Append {
                room: Arc::from(self.room.name.as_str()),
                messages: stored.clone(),
                oldest,
                last,
                epoch: self.epoch,
            };
            if let Err(err) = self.store.append(append).await {
                tracing::error!(room = %self.room.name, %err, "storing messages failed; closing the room");
                let mut shared = lock(&self.room.shared);
                shared.closed = Some(Closed::StorageFailed);
                for (_, slot) in shared.members.drain() {
                    slot.end.end(EndReason::StorageFailed {
                        reason: err.reason(),
                        full: err.is_full(),
                    });
                }
                for (reply, _) in replies {
                    let _ = reply.send(Err(ChatError::Store(StoreError::Unavailable {
                        reason: err.reason(),
                        full: err.is_full(),
                    })));
                }
                return false;
            }
            self.counters.messages.increment(stored.len() as u64);
            for message in &stored {
                if !message.key.is_empty() {
                    self.keys
                        .insert(message.sender.clone(), message.key.clone(), message);
                }
            }
            self.last = last;
            self.oldest = oldest;
        }

        let mut shared = lock(&self.room.shared);
        for message in &stored {
            let queue = self.room.queue;
            shared
                .members
                .retain(|_, slot| match slot.tx.try_send(Arc::clone(message)) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        slot.end.end(EndReason::TooSlow { queue });
                        self.counters.cutoffs.increment(1);
                        false
                    }
                    // The member's stream is gone; its Leave is on the way.
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                });
        }
        shared.last = self.last;
        shared.oldest = self.oldest;
        shared.last_used = Instant::now();
        for (member, ack) in acks {
            if let Some(slot) = shared.members.get(&member)
                && let Err(mpsc::error::TrySendError::Full(_)) = slot.tx.try_send(ack)
            {
                slot.end.end(EndReason::TooSlow {
                    queue: self.room.queue,
                });
                self.counters.cutoffs.increment(1);
                shared.members.remove(&member);
            }
        }
        drop(shared);
        for (reply, message) in replies {
            // The caller may have gone; the message is stored regardless.
            let _ = reply.send(Ok(message));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(dir: &Path, config: ChatConfig) -> (LocalHub, Shutdown) {
        let shutdown = Shutdown::new();
        let hub = LocalHub::open(dir, config, shutdown.clone()).expect("opens");
        (hub, shutdown)
    }

    fn request(room: &str, start: Start) -> JoinRequest {
        JoinRequest {
            room: RoomName::parse(room).expect("valid"),
            start,
            member: None,
            owner: None,
        }
    }

    fn draft(text: &str, key: &str) -> Draft {
        Draft {
            kind: Kind::Member,
            sender: "ann".into(),
            text: text.into(),
            key: key.into(),
        }
    }

    async fn recv(m: &mut Membership) -> Arc<Message> {
        tokio::time::timeout(std::time::Duration::from_secs(5), m.live.recv())
            .await
            .expect("in time")
            .expect("open")
    }

    #[tokio::test]
    async fn order_dedupe_resume_and_shutdown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (hub, shutdown) = hub(dir.path(), ChatConfig::default());
        let mut a = hub.join(request("r", Start::Live)).await.expect("joins");
        let mut b = hub.join(request("r", Start::Live)).await.expect("joins");
        a.outbox.submit(draft("one", "k1")).await.expect("submits");
        b.outbox.submit(draft("two", "")).await.expect("submits");
        for m in [&mut a, &mut b] {
            assert_eq!(recv(m).await.seq, 1);
            assert_eq!(recv(m).await.seq, 2);
        }
        // The duplicate is acknowledged to its sender only, with the
        // original's seq.
        a.outbox.submit(draft("one", "k1")).await.expect("submits");
        b.outbox.submit(draft("three", "")).await.expect("submits");
        let ack = recv(&mut a).await;
        let third = if ack.seq == 1 {
            recv(&mut a).await
        } else {
            assert_eq!(recv(&mut a).await.seq, 1);
            ack
        };
        assert_eq!(third.seq, 3);
        assert_eq!(recv(&mut b).await.seq, 3);

        let late = hub
            .join(request(
                "r",
                Start::After {
                    seq: 1,
                    epoch: Some(a.epoch),
                },
            ))
            .await
            .expect("resumes");
        assert_eq!((late.replay_from, late.last), (2, 3));
        let replay = hub
            .history(late.room.clone(), late.epoch, 2, 3, 10)
            .await
            .expect("reads");
        assert_eq!(replay.len(), 2);
        let wrong_epoch = hub
            .join(request(
                "r",
                Start::After {
                    seq: 1,
                    epoch: Some(a.epoch + 1),
                },
            ))
            .await;
        assert!(matches!(wrong_epoch, Err(ChatError::EpochChanged { .. })));
        let future = hub
            .join(request(
                "r",
                Start::After {
                    seq: 9,
                    epoch: None,
                },
            ))
            .await;
        assert!(matches!(future, Err(ChatError::HistoryGap { .. })));

        shutdown.trigger();
        shutdown.wait_tasks().await;
        assert!(matches!(a.end.reason(), Some(EndReason::Shutdown)));
        assert!(a.live.recv().await.is_none());
        hub.close();
    }

    #[tokio::test]
    async fn slow_member_is_cut_off_and_history_is_trimmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = ChatConfig {
            member_queue: 2,
            history: 3,
            ..ChatConfig::default()
        };
        let (hub, _shutdown) = hub(dir.path(), config);
        let mut fast = hub.join(request("r", Start::Live)).await.expect("joins");
        let slow = hub.join(request("r", Start::Live)).await.expect("joins");
        for i in 0..5 {
            fast.outbox
                .submit(draft(&format!("m{i}"), ""))
                .await
                .expect("submits");
            assert_eq!(recv(&mut fast).await.seq, i + 1);
        }
        assert!(matches!(
            slow.end.reason(),
            Some(EndReason::TooSlow { queue: 2 })
        ));
        let gap = hub
            .join(request(
                "r",
                Start::After {
                    seq: 1,
                    epoch: None,
                },
            ))
            .await;
        assert!(matches!(gap, Err(ChatError::HistoryGap { oldest: 3, .. })));
        let recent = hub
            .join(request("r", Start::Last(10)))
            .await
            .expect("joins");
        assert_eq!((recent.replay_from, recent.last), (3, 5));
    }

    #[tokio::test]
    async fn rooms_serve_again_after_the_storage_recovers() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().expect("tempdir");
        let (opener, full) = super::super::store::faulty::opener(dir.path());
        let store = Arc::new(Store::open_with(opener, 64).expect("opens"));
        let shutdown = Shutdown::new();
        let hub = LocalHub::with_store(store, ChatConfig::default(), shutdown.clone());
        let mut health = hub.storage_health();
        let mut a = hub.join(request("r", Start::Live)).await.expect("joins");
        a.outbox.submit(draft("kept", "")).await.expect("submits");
        assert_eq!(recv(&mut a).await.seq, 1);

        full.store(true, Ordering::SeqCst);
        a.outbox.submit(draft("lost", "")).await.expect("submits");
        tokio::time::timeout(std::time::Duration::from_secs(10), a.end.ended())
            .await
            .expect("the member is told");
        assert!(matches!(
            a.end.reason(),
            Some(EndReason::StorageFailed { full: true, .. })
        ));
        // A join while the storage is down fails at once.
        assert!(matches!(
            hub.join(request("r", Start::Live)).await,
            Err(ChatError::Store(_))
        ));

        full.store(false, Ordering::SeqCst);
        tokio::time::timeout(
            std::time::Duration::from_secs(20),
            health.wait_for(|h| *h == StorageHealth::Serving),
        )
        .await
        .expect("recovers in time")
        .expect("health");
        let mut b = hub
            .join(request("r", Start::Last(10)))
            .await
            .expect("joins again");
        assert_eq!((b.replay_from, b.last), (1, 1));
        b.outbox.submit(draft("again", "")).await.expect("submits");
        assert_eq!(recv(&mut b).await.seq, 2);
        shutdown.trigger();
        shutdown.wait_tasks().await;
        hub.close();
    }
}
