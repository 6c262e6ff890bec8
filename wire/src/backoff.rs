//! Jittered exponential backoff, shared by every reconnect and retry loop.

use std::time::Duration;

use rand::Rng;

/// Waits that start at `first`, double after each use up to `max`, and are jittered by a
/// factor in `[0.5, 1.5)` so that many peers that failed together do not retry together.
///
/// ```
/// use std::time::Duration;
/// use qbus_wire::Backoff;
///
/// let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(2));
/// let first = backoff.next_wait();
/// assert!(first >= Duration::from_millis(10) && first < Duration::from_millis(30));
/// backoff.reset(); // after a success
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    delay: Duration,
}

impl Backoff {
    /// A backoff whose first wait is about `first` and whose waits grow to about `max`.
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            delay: first,
        }
    }

    /// The wait before the next attempt; the one after it will be about twice as long.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.delay.mul_f64(rand::thread_rng().gen_range(0.5..1.5));
        self.delay = (self.delay * 2).min(self.max);
        wait
    }

    /// Starts again from the first wait, after an attempt succeeded.
    pub fn reset(&mut self) {
        self.delay = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_ceiling_within_the_jitter() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(10), ms(40));
        for nominal in [10, 20, 40, 40, 40] {
            let wait = backoff.next_wait();
            assert!(
                wait >= ms(nominal) / 2 && wait < ms(nominal) * 3 / 2,
                "{wait:?} for {nominal} ms"
            );
        }
        backoff.reset();
        assert!(backoff.next_wait() < ms(15));
    }
}
