//! Choosing a broker for a message without a key: the pluggable [`Selector`] and the two
//! built in, [`RoundRobin`] (the default) and [`LeastLoaded`].

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::topology::Candidate;

/// Picks the broker a message without a key goes to, among the live brokers holding its MQ.
/// Messages with a key do not come here: they follow key affinity.
///
/// Called on every send, from many tasks at once: keep it cheap and lock-free.
///
/// ```
/// use qbus_client::ha::Selector;
/// use qbus_client::topology::Candidate;
///
/// /// Always the first broker by id: everything on one broker while it lives.
/// #[derive(Debug)]
/// struct First;
///
/// impl Selector for First {
///     fn select(&self, _mq: &str, _candidates: &[Candidate]) -> usize {
///         0
///     }
/// }
/// ```
pub trait Selector: Send + Sync + fmt::Debug + 'static {
    /// The index in `candidates` (never empty, sorted by broker id) to send to. An index out
    /// of range is taken modulo the length.
    fn select(&self, mq: &str, candidates: &[Candidate]) -> usize;
}

/// Each broker in turn, so the load spreads evenly. The default.
///
/// ```
/// use qbus_client::ha::{RoundRobin, Selector};
/// use qbus_client::topology::Candidate;
/// let broker = |id: &str| Candidate { id: id.into(), addr: id.into(), depth: 0, lag: 0, in_flight: 0 };
/// let brokers = [broker("a:1"), broker("b:1")];
/// let rr = RoundRobin::default();
/// assert_eq!([rr.select("q", &brokers), rr.select("q", &brokers), rr.select("q", &brokers)], [0, 1, 0]);
/// ```
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Selector for RoundRobin {
    fn select(&self, _mq: &str, candidates: &[Candidate]) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % candidates.len()
    }
}

/// The broker whose copy of the MQ has the least work waiting (consumer lag plus deliveries
/// awaiting an ack), as last reported to the trackers; ties go round-robin.
///
/// Reports come every few seconds, so this steers the next interval's messages toward
/// brokers whose consumers keep up; it is not a per-message balance.
///
/// ```
/// use qbus_client::ha::{HaOptions, LeastLoaded};
/// let options = HaOptions::default().with_selector(LeastLoaded::default());
/// # drop(options);
/// ```
#[derive(Debug, Default)]
pub struct LeastLoaded {
    ties: RoundRobin,
}

impl Selector for LeastLoaded {
    fn select(&self, _mq: &str, candidates: &[Candidate]) -> usize {
        let load = |c: &Candidate| c.lag.saturating_add(c.in_flight);
        let least = candidates.iter().map(load).min().unwrap_or(0);
        let ties = candidates
            .iter()
            .filter(|c| load(c) == least)
            .count()
            .max(1);
        let nth = self.ties.next.fetch_add(1, Ordering::Relaxed) % ties;
        candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| load(c) == least)
            .nth(nth)
            .map_or(0, |(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(id: &str, lag: u64, in_flight: u64) -> Candidate {
        Candidate {
            id: id.into(),
            addr: id.into(),
            depth: lag,
            lag,
            in_flight,
        }
    }

    #[test]
    fn round_robin_visits_everyone() {
        let all = [
            candidate("a", 0, 0),
            candidate("b", 0, 0),
            candidate("c", 0, 0),
        ];
        let rr = RoundRobin::default();
        let picks: Vec<usize> = (0..6).map(|_| rr.select("q", &all)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn least_loaded_prefers_the_idle_and_rotates_among_ties() {
        let all = [
            candidate("a", 9, 0),
            candidate("b", 1, 1),
            candidate("c", 0, 2),
        ];
        let ll = LeastLoaded::default();
        let picks: Vec<usize> = (0..4).map(|_| ll.select("q", &all)).collect();
        assert!(picks.iter().all(|&i| i == 1 || i == 2));
        assert!(picks.contains(&1) && picks.contains(&2));
        let skewed = [candidate("a", 0, 0), candidate("b", 5, 0)];
        assert!((0..4).all(|_| ll.select("q", &skewed) == 0));
    }
}
