//! Pacing of one subscriber's messages: one per interval, on a steady
//! schedule, without a timer when a sample arrives on time.
//!
//! This is the generic cell rate algorithm: each send moves a theoretical
//! time for the next one (`next`) an interval forward, from wherever it was
//! or from the send, whichever is later. A sample may go at once when it is
//! at most a quarter interval ahead of that schedule; the tolerance absorbs
//! the jitter of a publisher reporting exactly once per interval, whose
//! samples would otherwise each wait a moment for a timer and drift behind.
//! Two sends are never closer than three quarters of an interval, and over
//! any stretch of time the rate stays one per interval.

use std::time::Duration;

use tokio::time::Instant;

/// Paces one subscriber. Pure arithmetic on the instants it is given.
#[derive(Debug, Clone)]
pub struct Pacer {
    interval: Duration,
    tolerance: Duration,
    next: Option<Instant>,
}

impl Pacer {
    /// A pacer for one message per `interval`; the first may go at once.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            tolerance: interval / 4,
            next: None,
        }
    }

    /// When a message that is ready at `now` may be sent: `None` if at once.
    pub fn hold_until(&self, now: Instant) -> Option<Instant> {
        let earliest = self.next?.checked_sub(self.tolerance)?;
        (now < earliest).then_some(earliest)
    }

    /// Records a message sent at `at`.
    pub fn sent(&mut self, at: Instant) {
        let from = self.next.map_or(at, |next| next.max(at));
        self.next = Some(from + self.interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn first_message_goes_at_once() {
        let pacer = Pacer::new(SECOND);
        assert_eq!(pacer.hold_until(Instant::now()), None);
    }

    #[test]
    fn samples_on_a_jittery_one_second_beat_are_never_held() {
        let start = Instant::now();
        let mut pacer = Pacer::new(SECOND);
        // A publisher reporting every second, each sample a few ms early or
        // late: every one goes out when it arrives.
        for (i, jitter_ms) in [0i64, -3, 4, -2, 0, -5, 5, -1].into_iter().enumerate() {
            let ms = 1000 * i as i64 + 10 + jitter_ms;
            let at = start + Duration::from_millis(ms as u64);
            assert_eq!(pacer.hold_until(at), None, "sample {i} held");
            pacer.sent(at);
        }
    }

    #[test]
    fn a_burst_is_held_to_three_quarters_of_an_interval_then_one_per_interval() {
        let start = Instant::now();
        let mut pacer = Pacer::new(SECOND);
        pacer.sent(start);
        let soon = start + Duration::from_millis(10);
        assert_eq!(
            pacer.hold_until(soon),
            Some(start + Duration::from_millis(750))
        );
        // Sent when held until, the schedule stays on its beat: the next
        // may go a quarter before 2 s, not 0.75 s after this send.
        let held = start + Duration::from_millis(750);
        pacer.sent(held);
        assert_eq!(
            pacer.hold_until(held),
            Some(start + Duration::from_millis(1750))
        );
    }

    #[test]
    fn the_long_run_rate_never_exceeds_one_per_interval() {
        let start = Instant::now();
        let mut pacer = Pacer::new(SECOND);
        // A firehose: a sample ready every millisecond for 100 s.
        let mut sent = 0u32;
        let mut now = start;
        while now < start + 100 * SECOND {
            match pacer.hold_until(now) {
                None => {
                    pacer.sent(now);
                    sent += 1;
                }
                Some(until) => now = until.max(now + Duration::from_millis(1)),
            }
        }
        assert!((100..=101).contains(&sent), "{sent} sends in 100 s");
    }

    #[test]
    fn a_quiet_spell_does_not_bank_sends() {
        let start = Instant::now();
        let mut pacer = Pacer::new(SECOND);
        pacer.sent(start);
        // Nothing for a minute, then a burst: one goes, the next waits.
        let later = start + 60 * SECOND;
        assert_eq!(pacer.hold_until(later), None);
        pacer.sent(later);
        assert_eq!(
            pacer.hold_until(later + Duration::from_millis(1)),
            Some(later + Duration::from_millis(750))
        );
    }
}
