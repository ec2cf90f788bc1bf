//! `Backoff`: the one retry pause of both sides: the daemon side's
//! restarts of a sidecar, and the SDK's loops (connecting, registering, a
//! stream that keeps ending, the keystore watch, a handler's `Retry`).

use std::time::Duration;

/// Exponential backoff: the first pause is `initial`, each next one twice
/// the last, never more than `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff from `initial`, doubling, up to `max`.
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    /// The SDK's reconnect pace: 20 ms, doubling, at most 2 s.
    pub const fn reconnect() -> Self {
        Self::new(Duration::from_millis(20), Duration::from_secs(2))
    }

    /// The pause before the next attempt; the one after it doubles.
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        pause
    }

    /// Back to the initial pause, after an attempt that worked.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Backoff;

    #[test]
    fn doubles_up_to_the_maximum_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(20), ms(100));
        let pauses: Vec<_> = (0..5).map(|_| b.next_pause()).collect();
        assert_eq!(pauses, [ms(20), ms(40), ms(80), ms(100), ms(100)]);
        b.reset();
        assert_eq!(b.next_pause(), ms(20));
        let mut huge = Backoff::new(Duration::MAX / 2, Duration::MAX);
        huge.next_pause();
        huge.next_pause();
        assert_eq!(
            huge.next_pause(),
            Duration::MAX,
            "saturates, never overflows"
        );
    }
}
