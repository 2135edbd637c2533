//! Pub/sub of latest values, keyed by topic.
//!
//! A topic holds one value: the newest published. Subscribers are not queues:
//! each one sees the newest value whenever it next looks, so a slow reader
//! skips intermediate values instead of delaying the publisher or growing
//! memory. Fan-out is shared: a publish touches the topic once, whatever the
//! number of subscribers, and wakes each waiting subscriber's task.
//!
//! The [`LatestBroker`] trait is what the telemetry hub depends on (through
//! `crate::telemetry::SampleBroker`, which adds when a sample lands in the
//! node's history); the in-process [`MemoryBroker`] implements it. The
//! clustered broker (`crate::cluster::telemetry::NatsBroker`) implements
//! the same traits by feeding a local [`MemoryBroker`] from a NATS
//! JetStream consumer, so the service layer does not change.
//!
//! No tonic or protobuf types appear here.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::sync::watch;

/// Errors a broker can return.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BrokerError {
    /// Creating the topic would exceed the configured number of topics.
    #[error("too many topics: the limit is {limit}")]
    TooManyTopics {
        /// The configured limit.
        limit: usize,
    },
    /// The broker was closed (the server is shutting down).
    #[error("the broker is closed")]
    Closed,
    /// A clustered broker cannot reach its peers: what it holds may be
    /// stale, so it serves nothing as live. The text says why.
    #[error("the cluster is unavailable: {0}")]
    Unavailable(String),
}

/// A latest-value pub/sub broker.
pub trait LatestBroker<T>: Send + Sync + 'static {
    /// Makes `value` the newest value of `topic`, creating the topic if
    /// needed, and wakes its subscribers.
    fn publish(&self, topic: &str, value: T) -> Result<(), BrokerError>;

    /// The newest value of `topic`, if it has one.
    fn latest(&self, topic: &str) -> Option<T>;

    /// Subscribes to `topic`, creating it (without a value) if needed, so a
    /// subscriber may wait for a topic's first value.
    fn subscribe(&self, topic: &str) -> Result<Subscription<T>, BrokerError>;

    /// Every topic with its newest value, sorted by name.
    fn topics(&self) -> Vec<(String, Option<T>)>;

    /// Removes `topic` and its value unless a subscription is open on it;
    /// true if the topic is gone (or never was). Used by the telemetry
    /// hub's sweep of silent services, never on the publish or delivery
    /// paths.
    fn forget(&self, topic: &str) -> bool;

    /// Whether the broker's values are live right now. The in-process
    /// broker always is; a clustered one cut off from its peers returns
    /// [`BrokerError::Unavailable`], and callers then refuse to serve
    /// [`LatestBroker::latest`] or [`LatestBroker::topics`] as current.
    fn check(&self) -> Result<(), BrokerError> {
        Ok(())
    }

    /// Closes the broker: every subscription's `next` returns `None`, and
    /// later publishes and subscribes fail with [`BrokerError::Closed`].
    /// Subscribers need not watch a shutdown signal of their own.
    fn close(&self);
}

type Topics<T> = HashMap<Arc<str>, watch::Sender<Option<T>>>;

/// The in-process broker: one `watch` channel per topic.
pub struct MemoryBroker<T> {
    topics: Arc<Mutex<Topics<T>>>,
    max_topics: usize,
    /// Set, and read, with `topics` locked.
    closed: AtomicBool,
}

impl<T> std::fmt::Debug for MemoryBroker<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("max_topics", &self.max_topics)
            .finish_non_exhaustive()
    }
}

impl<T: Clone + Send + Sync + 'static> MemoryBroker<T> {
    /// A broker that holds at most `max_topics` topics.
    pub fn new(max_topics: usize) -> Self {
        Self {
            topics: Arc::new(Mutex::new(HashMap::new())),
            max_topics,
            closed: AtomicBool::new(false),
        }
    }

    /// Whether `topic` exists (has a value or a subscriber).
    pub fn contains(&self, topic: &str) -> bool {
        lock(&self.topics).contains_key(topic)
    }

    /// Number of topics.
    pub fn len(&self) -> usize {
        lock(&self.topics).len()
    }

    /// Whether there is no topic.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most topics this broker holds.
    pub fn max_topics(&self) -> usize {
        self.max_topics
    }

    /// Number of subscriptions currently open across all topics.
    pub fn subscriber_count(&self) -> usize {
        lock(&self.topics)
            .values()
            .map(watch::Sender::receiver_count)
            .sum()
    }

    fn topic<'a>(
        &self,
        topics: &'a mut Topics<T>,
        name: &str,
    ) -> Result<&'a watch::Sender<Option<T>>, BrokerError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(BrokerError::Closed);
        }
        if !topics.contains_key(name) {
            if topics.len() >= self.max_topics {
                return Err(BrokerError::TooManyTopics {
                    limit: self.max_topics,
                });
            }
            let (tx, _) = watch::channel(None);
            topics.insert(Arc::from(name), tx);
        }
        // Just checked or inserted.
        Ok(topics
            .get(name)
            .unwrap_or_else(|| unreachable!("topic {name} was inserted above")))
    }
}

impl<T: Clone + Send + Sync + 'static> LatestBroker<T> for MemoryBroker<T> {
    fn publish(&self, topic: &str, value: T) -> Result<(), BrokerError> {
        let mut topics = lock(&self.topics);
        // send_replace stores the value even when nobody subscribes yet.
        self.topic(&mut topics, topic)?.send_replace(Some(value));
        Ok(())
    }

    fn latest(&self, topic: &str) -> Option<T> {
        lock(&self.topics).get(topic)?.borrow().clone()
    }

    fn subscribe(&self, topic: &str) -> Result<Subscription<T>, BrokerError> {
        let mut topics = lock(&self.topics);
        let mut rx = self.topic(&mut topics, topic)?.subscribe();
        // A new subscriber has not seen the current value yet: report it at
        // once if there is one.
        rx.mark_changed();
        Ok(Subscription {
            rx,
            topic: Arc::from(topic),
            topics: Arc::clone(&self.topics),
        })
    }

    fn topics(&self) -> Vec<(String, Option<T>)> {
        let mut all: Vec<_> = lock(&self.topics)
            .iter()
            .map(|(name, tx)| (name.to_string(), tx.borrow().clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    fn forget(&self, topic: &str) -> bool {
        let mut topics = lock(&self.topics);
        match topics.get(topic) {
            None => true,
            Some(tx) if tx.receiver_count() == 0 => {
                topics.remove(topic);
                true
            }
            Some(_) => false,
        }
    }

    fn close(&self) {
        let mut topics = lock(&self.topics);
        self.closed.store(true, Ordering::Relaxed);
        // Dropping the senders ends every receiver's `changed`.
        topics.clear();
    }
}

fn lock<T>(topics: &Mutex<Topics<T>>) -> MutexGuard<'_, Topics<T>> {
    // The map stays consistent even if a holder panicked: every mutation is
    // a single insert, remove or send.
    topics
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A subscriber's view of one topic.
///
/// Dropping it frees everything it held; a topic that never received a
/// value is removed when its last subscriber leaves, so waiting for unknown
/// names cannot fill the topic table.
pub struct Subscription<T> {
    rx: watch::Receiver<Option<T>>,
    topic: Arc<str>,
    topics: Arc<Mutex<Topics<T>>>,
}

impl<T> std::fmt::Debug for Subscription<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl<T: Clone> Subscription<T> {
    /// Waits until the topic holds a value this subscription has not
    /// returned yet, and returns it. Values published while the subscriber
    /// was away are skipped: only the newest is returned.
    ///
    /// Returns `None` if the topic was closed.
    pub async fn next(&mut self) -> Option<T> {
        loop {
            self.rx.changed().await.ok()?;
            if let Some(value) = self.rx.borrow_and_update().clone() {
                return Some(value);
            }
        }
    }

    /// The newest value published since this subscription last returned
    /// one, without waiting; `None` if there is none.
    pub fn newest(&mut self) -> Option<T> {
        if self.rx.has_changed().unwrap_or(false) {
            self.rx.borrow_and_update().clone()
        } else {
            None
        }
    }

    /// The topic this subscription watches.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

impl<T> Drop for Subscription<T> {
    fn drop(&mut self) {
        let mut topics = lock(&self.topics);
        if let Some(tx) = topics.get(&*self.topic) {
            // This receiver is still counted while it is being dropped.
            if tx.borrow().is_none() && tx.receiver_count() <= 1 {
                topics.remove(&*self.topic);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn next_soon(sub: &mut Subscription<u32>) -> Option<u32> {
        tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("a value within 5 s")
    }

    #[tokio::test]
    async fn subscriber_sees_current_value_at_once_then_only_new_ones() {
        let broker = MemoryBroker::new(10);
        broker.publish("a", 1).expect("publish");
        let mut sub = broker.subscribe("a").expect("subscribe");
        assert_eq!(next_soon(&mut sub).await, Some(1));
        // No duplicate: nothing new, so next() waits.
        let waited = tokio::time::timeout(Duration::from_millis(50), sub.next()).await;
        assert!(waited.is_err(), "no new value, so no message");
        broker.publish("a", 2).expect("publish");
        assert_eq!(next_soon(&mut sub).await, Some(2));
    }

    #[tokio::test]
    async fn slow_subscriber_skips_to_latest() {
        let broker = MemoryBroker::new(10);
        let mut sub = broker.subscribe("a").expect("subscribe");
        for v in 0..100 {
            broker.publish("a", v).expect("publish");
        }
        assert_eq!(next_soon(&mut sub).await, Some(99));
    }

    #[tokio::test]
    async fn waits_for_first_value_of_unknown_topic() {
        let broker = Arc::new(MemoryBroker::new(10));
        let mut sub = broker.subscribe("later").expect("subscribe");
        let publisher = Arc::clone(&broker);
        tokio::spawn(async move { publisher.publish("later", 7) });
        assert_eq!(next_soon(&mut sub).await, Some(7));
    }

    #[test]
    fn topic_limit_and_cleanup_of_empty_topics() {
        let broker = MemoryBroker::<u32>::new(2);
        broker.publish("a", 1).expect("publish");
        let waiting = broker.subscribe("b").expect("subscribe");
        assert_eq!(
            broker.subscribe("c").expect_err("over the limit"),
            BrokerError::TooManyTopics { limit: 2 }
        );
        assert_eq!(broker.subscriber_count(), 1);
        drop(waiting);
        // "b" never got a value, so it is gone and "c" fits.
        assert_eq!(broker.topics().len(), 1);
        let _c = broker.subscribe("c").expect("room again");
        // Topics with values stay after their subscribers leave.
        let a = broker.subscribe("a").expect("subscribe");
        assert!(!broker.forget("a"), "kept while subscribed");
        drop(a);
        assert_eq!(broker.latest("a"), Some(1));
        // Until forgotten.
        assert!(broker.forget("a"));
        assert_eq!(broker.latest("a"), None);
        assert!(broker.forget("never"));
    }

    #[tokio::test]
    async fn close_ends_subscriptions_and_refuses_new_ones() {
        let broker = MemoryBroker::new(10);
        broker.publish("a", 1).expect("publish");
        let mut waiting = broker.subscribe("b").expect("subscribe");
        let mut seen = broker.subscribe("a").expect("subscribe");
        assert_eq!(next_soon(&mut seen).await, Some(1));
        broker.close();
        assert_eq!(next_soon(&mut waiting).await, None);
        assert_eq!(next_soon(&mut seen).await, None);
        assert_eq!(broker.publish("a", 2), Err(BrokerError::Closed));
        assert!(matches!(broker.subscribe("a"), Err(BrokerError::Closed)));
    }
}
