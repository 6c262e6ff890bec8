//! Slowing down guessing: each failed login from an address makes the next failure from it
//! wait longer (50 ms doubling up to 2 s), and a success clears it. The table is bounded,
//! so a flood of addresses cannot grow it without limit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Addresses remembered at most.
const MAX_ADDRESSES: usize = 4096;
/// A failure older than this is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(60);
const FIRST_DELAY: Duration = Duration::from_millis(50);
const MAX_DELAY: Duration = Duration::from_secs(2);

/// Failed logins by address.
#[derive(Debug, Default)]
pub struct Throttle {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl Throttle {
    /// Records a failure from `ip` and returns how long to wait before answering it.
    pub fn failed(&self, ip: IpAddr) -> Duration {
        let now = Instant::now();
        let mut failures = self.failures.lock().expect("throttle poisoned");
        if failures.len() >= MAX_ADDRESSES && !failures.contains_key(&ip) {
            failures.retain(|_, (_, last)| now.duration_since(*last) < FORGET_AFTER);
            if failures.len() >= MAX_ADDRESSES {
                // Still full of recent guessers: forget the one quiet longest.
                let oldest = failures.iter().min_by_key(|(_, (_, last))| *last);
                if let Some(oldest) = oldest.map(|(ip, _)| *ip) {
                    failures.remove(&oldest);
                }
            }
        }
        let entry = failures.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) >= FORGET_AFTER {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        delay(entry.0)
    }

    /// Forgets the failures of `ip` after it logged in.
    pub fn succeeded(&self, ip: IpAddr) {
        self.failures.lock().expect("throttle poisoned").remove(&ip);
    }

    /// Addresses remembered now.
    pub fn len(&self) -> usize {
        self.failures.lock().expect("throttle poisoned").len()
    }

    /// True when no failure is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn delay(failures: u32) -> Duration {
    FIRST_DELAY
        .saturating_mul(1 << failures.saturating_sub(1).min(10))
        .min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_per_address_and_stay_bounded() {
        let throttle = Throttle::default();
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        assert_eq!(throttle.failed(a), Duration::from_millis(50));
        assert_eq!(throttle.failed(a), Duration::from_millis(100));
        assert_eq!(throttle.failed(b), Duration::from_millis(50));
        for _ in 0..20 {
            assert!(throttle.failed(a) <= MAX_DELAY);
        }
        throttle.succeeded(a);
        assert_eq!(throttle.failed(a), Duration::from_millis(50));
        for i in 0..(MAX_ADDRESSES as u32 + 100) {
            throttle.failed(IpAddr::from(i.to_be_bytes()));
        }
        assert!(throttle.len() <= MAX_ADDRESSES);
    }
}
