//! Caps on open Upload and Download calls: one for the whole server and
//! one per connection, so a single client cannot take every slot. A call
//! beyond either cap is refused at once (RESOURCE_EXHAUSTED), never queued.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use super::UploadError;

/// Counts the open calls of one kind (uploads or downloads).
#[derive(Debug)]
pub struct CallLimit {
    what: &'static str,
    max_total: usize,
    max_per_peer: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_peer: HashMap<String, usize>,
}

impl CallLimit {
    /// A cap of `max_total` calls of kind `what` (for messages, e.g.
    /// "uploads"), and `max_per_peer` per connection.
    pub fn new(what: &'static str, max_total: usize, max_per_peer: usize) -> Arc<Self> {
        Arc::new(Self {
            what,
            max_total,
            max_per_peer,
            open: Mutex::new(Open::default()),
        })
    }

    /// Takes a slot for a call from `peer` (the connection's remote
    /// address); the slot is given back when the returned guard drops.
    pub fn acquire(self: &Arc<Self>, peer: &str) -> Result<CallSlot, UploadError> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.total >= self.max_total {
            return Err(UploadError::TooManyCalls {
                what: self.what,
                scope: "on this server",
                limit: self.max_total,
            });
        }
        let mine = open.by_peer.get(peer).copied().unwrap_or(0);
        if mine >= self.max_per_peer {
            return Err(UploadError::TooManyCalls {
                what: self.what,
                scope: "on this connection",
                limit: self.max_per_peer,
            });
        }
        open.total += 1;
        open.by_peer.insert(peer.to_owned(), mine + 1);
        Ok(CallSlot {
            limit: Arc::clone(self),
            peer: peer.to_owned(),
        })
    }

    /// Calls open now.
    pub fn open(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

/// One open call's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct CallSlot {
    limit: Arc<CallLimit>,
    peer: String,
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        let mut open = self
            .limit
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.total = open.total.saturating_sub(1);
        if let Some(count) = open.by_peer.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                open.by_peer.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_server_and_per_connection() {
        let limit = CallLimit::new("uploads", 3, 2);
        let a1 = limit.acquire("a").expect("first");
        let _a2 = limit.acquire("a").expect("second");
        let err = limit.acquire("a").expect_err("per connection");
        assert!(err.to_string().contains("on this connection"), "{err}");
        let _b1 = limit.acquire("b").expect("other connection");
        let err = limit.acquire("c").expect_err("server");
        assert!(err.to_string().contains("on this server"), "{err}");
        drop(a1);
        let _c = limit.acquire("c").expect("freed");
        assert_eq!(limit.open(), 3);
    }
}
