//! Pacing of one subscriber's messages: one per interval, on a steady
//! schedule, without a timer when a sample arrives on time.
//!
//! This is the generic cell rate algorithm: each send moves a theoretical
//! time for the next one (`next`) an interval forward, from wherever it was
//! or from the send, whichever is later. A sample may go at once when it is
//! at most a quarter interval ahead of that schedule; the tolerance absorbs
//! the jitter of a publisher reporting exactly once per interval, whose
//! samples would otherwise each wait a moment for a timer and drift behind.
//! Over any stretch of time the rate stays one per interval, and from
//! 4 ms up two sends are never closer than three quarters of an interval.
//! The tolerance is for samples that arrive on their own: a sample that
//! must wait is held until its full place in the schedule (less one timer
//! tick), not three quarters of the way.
//!
//! The tolerance is never below the timer's tick (1 ms): a held sample
//! waits for a timer, which fires on a tick and may be late by another
//! moment when the server is busy. With a tolerance finer than that, every
//! held send would land after its place in the schedule and move the
//! schedule on by the lateness, so a subscriber asking for 1 ms would get
//! one message every 1.5 to 2 ms. With it, lateness of up to a tick is
//! absorbed; short intervals (below 4 ms) pay with sends that may come
//! closer together, never with more of them.

use std::time::Duration;

use tokio::time::Instant;

/// The resolution of tokio's timer: the least tolerance worth having.
const TIMER_TICK: Duration = Duration::from_millis(1);

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
            tolerance: (interval / 4).max(TIMER_TICK.min(interval)),
            next: None,
        }
    }

    /// When a message that is ready at `now` may be sent: `None` if at once
    /// (it is at most the tolerance ahead of the schedule). A message held
    /// waits for its full place in the schedule, less one timer tick (so
    /// the timer's rounding does not make it late), never for the
    /// tolerance: the tolerance absorbs a publisher's jitter, and a held
    /// send going a quarter early would make the gap after the first
    /// message of a stream a quarter short (the sender then sends the
    /// newest sample by that time, whose timestamp is older still).
    pub fn hold_until(&self, now: Instant) -> Option<Instant> {
        let next = self.next?;
        let earliest = next.checked_sub(self.tolerance)?;
        let wake = next
            .checked_sub(TIMER_TICK)
            .map_or(earliest, |wake| wake.max(earliest));
        (now < earliest).then_some(wake)
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
    fn a_burst_is_held_for_the_whole_interval_then_one_per_interval() {
        let start = Instant::now();
        let mut pacer = Pacer::new(SECOND);
        pacer.sent(start);
        // New-user finding 3: a held message waited only until 750 ms, so
        // the second message of a stream came a quarter interval early.
        let soon = start + Duration::from_millis(10);
        assert_eq!(
            pacer.hold_until(soon),
            Some(start + Duration::from_millis(999))
        );
        // Sent when held until, the schedule stays on its beat.
        let held = start + Duration::from_millis(999);
        pacer.sent(held);
        assert_eq!(
            pacer.hold_until(held),
            Some(start + Duration::from_millis(1999))
        );
        // A message that arrives within a quarter of its place goes at once.
        assert_eq!(pacer.hold_until(start + Duration::from_millis(1750)), None);
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

    /// Sends in one second of a firehose paced at 1 ms, when every timer
    /// fires on the next whole millisecond and the send comes `late`
    /// after that.
    fn sends_in_a_second_at_one_ms(late: Duration) -> u32 {
        let start = Instant::now();
        let tick = Duration::from_millis(1);
        let mut pacer = Pacer::new(tick);
        let mut sent = 0;
        let mut now = start;
        while now < start + SECOND {
            match pacer.hold_until(now) {
                None => {
                    pacer.sent(now);
                    sent += 1;
                    now += Duration::from_micros(10);
                }
                Some(until) => {
                    let ticks = (until - start).as_micros().div_ceil(1000);
                    now = start + tick * u32::try_from(ticks).unwrap_or(u32::MAX) + late;
                }
            }
        }
        sent
    }

    #[test]
    fn a_one_ms_interval_keeps_its_rate_on_a_one_ms_timer() {
        // Timers on whole milliseconds, woken late by up to most of one:
        // the schedule absorbs it, and the rate stays one per interval.
        for late_us in [0, 300, 900] {
            let sent = sends_in_a_second_at_one_ms(Duration::from_micros(late_us));
            assert!(
                (990..=1002).contains(&sent),
                "{sent} sends in 1 s at 1 ms, woken {late_us} µs late"
            );
        }
    }

    #[test]
    fn the_tolerance_is_a_quarter_interval_from_four_ms_up() {
        let start = Instant::now();
        let mut pacer = Pacer::new(Duration::from_millis(4));
        pacer.sent(start);
        assert_eq!(
            pacer.hold_until(start),
            Some(start + Duration::from_millis(3))
        );
        let mut pacer = Pacer::new(Duration::from_millis(2));
        pacer.sent(start);
        assert_eq!(
            pacer.hold_until(start),
            Some(start + Duration::from_millis(1))
        );
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
            Some(later + Duration::from_millis(999))
        );
    }
}
