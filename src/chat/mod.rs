//! Chat rooms: ordered, durable, resumable fan-out of messages.
//!
//! - This module holds the domain types ([`Message`], [`Draft`],
//!   [`RoomName`]), validation and the [`ChatError`] enum.
//! - [`store`] is the embedded storage (redb): history, room epochs, group
//!   commit. No tonic types.
//! - [`room`] is the room hub: one actor per room assigns seqs, stores
//!   batches and fans them out to bounded per-member queues. It sits behind
//!   the [`room::RoomHub`] trait so a clustered hub can replace it.
//! - [`service`] is the gRPC layer: the only part that knows protobuf and
//!   `tonic::Status`.

pub mod room;
pub mod route;
pub mod service;
pub mod store;

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

pub use store::StoreError;

/// Room joined when a call names none.
pub const DEFAULT_ROOM: &str = "lobby";

/// Longest room name, in bytes.
pub const MAX_ROOM_LEN: usize = 64;

/// Longest sender (and member) name, in bytes.
pub const MAX_SENDER_LEN: usize = 128;

/// Longest idempotency key, in bytes.
pub const MAX_KEY_LEN: usize = 128;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A member of the room.
    Member,
    /// The server: `sender` joined.
    Joined,
    /// The server: `sender` left.
    Left,
    /// The server: it is shutting down (never stored).
    Shutdown,
}

impl Kind {
    /// The byte this kind is stored as.
    pub fn to_byte(self) -> u8 {
        match self {
            Kind::Member => 0,
            Kind::Joined => 1,
            Kind::Left => 2,
            Kind::Shutdown => 3,
        }
    }

    /// The kind stored as `byte`, if any.
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Kind::Member),
            1 => Some(Kind::Joined),
            2 => Some(Kind::Left),
            3 => Some(Kind::Shutdown),
            _ => None,
        }
    }
}

/// A message as stored and delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Position in the room, from 1; 0 for messages that are not stored
    /// (shutdown notices).
    pub seq: u64,
    /// The room's history epoch.
    pub epoch: u64,
    /// Who wrote it.
    pub kind: Kind,
    /// The sender's name (for joins and leaves: the member's).
    pub sender: String,
    /// The text.
    pub text: String,
    /// The client's idempotency key, or empty.
    pub key: String,
    /// Server time of storing, Unix milliseconds.
    pub timestamp_ms: i64,
    /// Its wire encoding, made by the first call that sends it (see
    /// `chat::route`) and freed with the message, when no member's queue
    /// holds it any more.
    pub encoding: Encoding,
}

/// A message's wire encoding, filled once by the service layer. It travels
/// in the message's `Arc`, so every member sending one broadcast message
/// copies one encoding, and nothing keeps it once the message is gone.
/// Equal to any other (it is derived from the message's fields); a clone
/// starts empty, since a clone may be changed before it is sent.
#[derive(Default)]
pub struct Encoding(std::sync::OnceLock<bytes::Bytes>);

impl Encoding {
    /// The encoding, made by `encode` if this is the first asking.
    pub fn get_or_init(&self, encode: impl FnOnce() -> bytes::Bytes) -> bytes::Bytes {
        self.0.get_or_init(encode).clone()
    }

    /// Bytes held: the encoding's length, 0 before the first send.
    pub fn held(&self) -> usize {
        self.0.get().map_or(0, bytes::Bytes::len)
    }
}

impl Clone for Encoding {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for Encoding {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Encoding {}

impl std::fmt::Debug for Encoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Encoding({} bytes)", self.held())
    }
}

/// A message submitted to a room, before it has a seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    /// Who wrote it.
    pub kind: Kind,
    /// The sender's name.
    pub sender: String,
    /// The text.
    pub text: String,
    /// Idempotency key, or empty.
    pub key: String,
}

/// A validated room name: 1 to [`MAX_ROOM_LEN`] bytes, no control
/// characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoomName(Arc<str>);

impl RoomName {
    /// Validates `name`.
    pub fn parse(name: &str) -> Result<Self, ChatError> {
        if name.is_empty() {
            return Err(ChatError::invalid("room", "is empty"));
        }
        if name.len() > MAX_ROOM_LEN {
            return Err(ChatError::invalid(
                "room",
                format!("is {} bytes; the limit is {MAX_ROOM_LEN}", name.len()),
            ));
        }
        if name.chars().any(char::is_control) {
            return Err(ChatError::invalid(
                "room",
                "contains characters that are not printable",
            ));
        }
        Ok(Self(Arc::from(name)))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RoomName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a member's delivery starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Only messages stored after joining.
    Live,
    /// The last `n` stored messages first (as many as history holds).
    Last(u64),
    /// Every stored message with a seq above `seq` first; all or nothing.
    After {
        /// The last seq the member has.
        seq: u64,
        /// The epoch that seq belongs to, if the member knows it.
        epoch: Option<u64>,
    },
}

impl Start {
    /// The first seq to replay to a member starting at `self` in room
    /// `room` of epoch `epoch`, whose history holds `oldest..=last`: the
    /// one resume rule every room hub applies, so a resume is exact (all
    /// or nothing).
    ///
    /// # Errors
    /// [`ChatError::EpochChanged`] when `After` names another epoch;
    /// [`ChatError::HistoryGap`] when its seq is past the room's last or
    /// before what its history still holds.
    pub fn replay_from(
        self,
        room: &RoomName,
        epoch: u64,
        oldest: u64,
        last: u64,
    ) -> Result<u64, ChatError> {
        match self {
            Self::Live => Ok(last + 1),
            Self::Last(n) => Ok((last + 1).saturating_sub(n).max(oldest)),
            Self::After { seq, epoch: given } => {
                if let Some(given) = given
                    && given != epoch
                {
                    return Err(ChatError::EpochChanged {
                        room: room.to_string(),
                        given,
                        epoch,
                        oldest,
                        last,
                    });
                }
                if seq > last || seq + 1 < oldest {
                    return Err(ChatError::HistoryGap {
                        room: room.to_string(),
                        after: seq,
                        oldest,
                        last,
                        epoch,
                    });
                }
                Ok(seq + 1)
            }
        }
    }
}

/// What can go wrong in the chat core.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// A field of a request or message is not acceptable.
    #[error("{field} {reason}")]
    Invalid {
        /// The field (protobuf field or metadata key).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// History no longer reaches back to the requested seq (or the seq is
    /// beyond the room's last one).
    #[error(
        "cannot resume room {room:?} after seq {after}: history holds seqs {oldest} to {last} \
         (epoch {epoch}); the oldest seq available is {oldest}"
    )]
    HistoryGap {
        /// The room.
        room: String,
        /// The seq asked for.
        after: u64,
        /// Oldest stored seq (last + 1 when nothing is stored).
        oldest: u64,
        /// Newest stored seq (0 when nothing was ever stored).
        last: u64,
        /// The room's epoch.
        epoch: u64,
    },
    /// The room's history was reset since the member's epoch.
    #[error(
        "cannot resume room {room:?}: its history was reset (epoch {given} is now {epoch}); \
         the oldest seq available is {oldest}"
    )]
    EpochChanged {
        /// The room.
        room: String,
        /// The epoch the member gave.
        given: u64,
        /// The room's epoch.
        epoch: u64,
        /// Oldest stored seq.
        oldest: u64,
        /// Newest stored seq.
        last: u64,
    },
    /// A name in a message or the metadata is not the caller's identity.
    #[error(
        "{field} {given:?} is not the authenticated identity {identity:?}: a member speaks only \
         under its own name (leave {field} empty to have it filled in)"
    )]
    NotYourName {
        /// The field (`sender` or `chat-member`).
        field: &'static str,
        /// The name sent.
        given: String,
        /// The caller's identity.
        identity: String,
    },
    /// The server holds its limit of open rooms.
    #[error(
        "too many rooms open: the limit is {limit} (`chat.max_rooms`); a room \
         without members closes after `chat.room_idle_timeout`"
    )]
    TooManyRooms {
        /// The configured limit.
        limit: usize,
    },
    /// The caller's identity is in (or opened) its share of the open
    /// rooms already (`chat.max_rooms_per_identity`).
    #[error(transparent)]
    ShareExhausted(#[from] crate::shares::ShareExhausted),
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// Cluster mode: the cluster's storage cannot be reached from this
    /// node; the text says what failed and what to do.
    #[error("{0}")]
    Unavailable(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ChatError {
    /// An [`ChatError::Invalid`] for `field`.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ChatError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// Limits a message is checked against.
#[derive(Debug, Clone, Copy)]
pub struct MessageLimits {
    /// Largest text, in bytes.
    pub max_text_bytes: usize,
}

/// Checks a member's name (sender or `chat-member`) for `field`: 1 to
/// `MAX_SENDER_LEN` bytes, no control characters (as room names).
pub fn validate_name(field: &'static str, name: &str) -> Result<(), ChatError> {
    if name.is_empty() {
        return Err(ChatError::invalid(field, "is empty"));
    }
    if name.len() > MAX_SENDER_LEN {
        return Err(ChatError::invalid(
            field,
            format!("is {} bytes; the limit is {MAX_SENDER_LEN}", name.len()),
        ));
    }
    // The rule of room and file names: a newline in a name could forge
    // lines in logs and terminals.
    if name.chars().any(char::is_control) {
        return Err(ChatError::invalid(
            field,
            "contains characters that are not printable",
        ));
    }
    Ok(())
}

impl Draft {
    /// A member's message, validated against `limits`.
    pub fn member(
        sender: String,
        text: String,
        key: String,
        limits: MessageLimits,
    ) -> Result<Self, ChatError> {
        validate_name("sender", &sender)?;
        if text.is_empty() {
            return Err(ChatError::invalid("message", "is empty"));
        }
        if text.len() > limits.max_text_bytes {
            return Err(ChatError::invalid(
                "message",
                format!(
                    "is {} bytes; the limit is {}",
                    text.len(),
                    limits.max_text_bytes
                ),
            ));
        }
        if key.len() > MAX_KEY_LEN {
            return Err(ChatError::invalid(
                "idempotency_key",
                format!("is {} bytes; the limit is {MAX_KEY_LEN}", key.len()),
            ));
        }
        Ok(Self {
            kind: Kind::Member,
            sender,
            text,
            key,
        })
    }

    /// A server-originated announcement about `member`.
    pub fn announcement(kind: Kind, member: &str) -> Self {
        let text = match kind {
            Kind::Joined => format!("{member} joined"),
            Kind::Left => format!("{member} left"),
            Kind::Member | Kind::Shutdown => String::new(),
        };
        Self {
            kind,
            sender: member.to_owned(),
            text,
            key: String::new(),
        }
    }
}

/// Current Unix time in milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: MessageLimits = MessageLimits { max_text_bytes: 10 };

    fn field(err: ChatError) -> &'static str {
        match err {
            ChatError::Invalid { field, .. } => field,
            other => panic!("not a validation error: {other}"),
        }
    }

    #[test]
    fn room_names() {
        assert!(RoomName::parse("lobby").is_ok());
        assert!(RoomName::parse("salle à manger").is_ok());
        assert_eq!(field(RoomName::parse("").expect_err("invalid")), "room");
        assert_eq!(
            field(RoomName::parse(&"r".repeat(65)).expect_err("invalid")),
            "room"
        );
        assert!(RoomName::parse(&"r".repeat(64)).is_ok());
        assert_eq!(field(RoomName::parse("a\tb").expect_err("invalid")), "room");
    }

    #[test]
    fn drafts_are_validated() {
        let ok = Draft::member("a".into(), "hi".into(), String::new(), LIMITS);
        assert_eq!(ok.expect("valid").kind, Kind::Member);
        let err = |s: &str, t: &str, k: &str| {
            field(Draft::member(s.into(), t.into(), k.into(), LIMITS).expect_err("invalid"))
        };
        assert_eq!(err("", "hi", ""), "sender");
        assert_eq!(err("a", "", ""), "message");
        assert_eq!(err("a", "01234567890", ""), "message");
        assert_eq!(err("a", "hi", &"k".repeat(129)), "idempotency_key");
    }

    #[test]
    fn kinds_round_trip() {
        for kind in [Kind::Member, Kind::Joined, Kind::Left, Kind::Shutdown] {
            assert_eq!(Kind::from_byte(kind.to_byte()), Some(kind));
        }
        assert_eq!(Kind::from_byte(9), None);
    }
}
