//! Per-identity shares of a server-wide count limit, so one identity cannot
//! take every slot: `chat.max_rooms_per_identity` of `chat.max_rooms`, and
//! the like. No gRPC types.
//!
//! A slot is charged to an identity for as long as the caller holds the
//! [`Share`]; dropping it gives the slot back. (Open rooms are charged to
//! each identity in them, see `chat::room::RoomTable`.) Like `upload.quota_per_identity`
//! (`crate::upload::owners`), shares apply to authenticated identities
//! only: with authentication off every caller is the same anonymous
//! identity, and the release of unused slots is what protects the others.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

/// One identity's share of a limit is used up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{identity} already holds {limit} {what}, its share (`{key}`)")]
pub struct ShareExhausted {
    /// What is counted, plural ("open rooms").
    pub what: &'static str,
    /// The config key of the share.
    pub key: &'static str,
    /// The identity's name.
    pub identity: String,
    /// The share.
    pub limit: usize,
}

/// How many slots of one kind each identity holds.
#[derive(Debug)]
pub struct Shares {
    what: &'static str,
    key: &'static str,
    per_identity: usize,
    held: Mutex<HashMap<Arc<str>, usize>>,
}

impl Shares {
    /// Shares of `per_identity` slots each (0: no per-identity limit) of
    /// `what` (plural, for messages), configured as `key`.
    pub fn new(what: &'static str, key: &'static str, per_identity: usize) -> Arc<Self> {
        Arc::new(Self {
            what,
            key,
            per_identity,
            held: Mutex::default(),
        })
    }

    fn held(&self) -> MutexGuard<'_, HashMap<Arc<str>, usize>> {
        // Each critical section is one insert or update.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes one slot for `identity` (`None`: an anonymous caller, not
    /// counted).
    ///
    /// # Errors
    /// [`ShareExhausted`] when the identity holds its share already.
    pub fn claim(
        self: &Arc<Self>,
        identity: Option<&str>,
    ) -> Result<Option<Share>, ShareExhausted> {
        let Some(identity) = identity.filter(|_| self.per_identity > 0) else {
            return Ok(None);
        };
        let mut held = self.held();
        let count = held.entry(Arc::from(identity)).or_insert(0);
        if *count >= self.per_identity {
            return Err(ShareExhausted {
                what: self.what,
                key: self.key,
                identity: identity.to_owned(),
                limit: self.per_identity,
            });
        }
        *count += 1;
        Ok(Some(Share {
            shares: Arc::clone(self),
            identity: Arc::from(identity),
        }))
    }

    /// Slots `identity` holds now.
    pub fn count(&self, identity: &str) -> usize {
        self.held().get(identity).copied().unwrap_or(0)
    }
}

/// One slot charged to an identity; dropping it gives the slot back.
#[derive(Debug)]
pub struct Share {
    shares: Arc<Shares>,
    identity: Arc<str>,
}

impl Share {
    /// The identity charged.
    pub fn identity(&self) -> &str {
        &self.identity
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut held = self.shares.held();
        if let Some(count) = held.get_mut(&self.identity) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.identity);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn an_identity_gets_its_share_and_gets_slots_back_on_drop() {
        let shares = Shares::new("open rooms", "chat.max_rooms_per_identity", 2);
        let a = shares.claim(Some("alice")).unwrap();
        let b = shares.claim(Some("alice")).unwrap();
        let err = shares.claim(Some("alice")).unwrap_err();
        assert!(
            err.to_string().contains("chat.max_rooms_per_identity"),
            "{err}"
        );
        assert!(shares.claim(Some("bob")).unwrap().is_some());
        assert!(shares.claim(None).unwrap().is_none());
        drop(a);
        assert_eq!(shares.count("alice"), 1);
        let _c = shares.claim(Some("alice")).unwrap();
        drop(b);
        assert_eq!(shares.count("alice"), 1);
    }

    #[test]
    fn a_share_of_zero_limits_nobody() {
        let shares = Shares::new("open rooms", "chat.max_rooms_per_identity", 0);
        assert!(shares.claim(Some("alice")).unwrap().is_none());
    }
}
