//! Key-ordered delivery: the bookkeeping that keeps one record per key out at a time in a
//! group of an MQ created with `ordered_by_key`.
//!
//! A record with a key whose previous record is still out (delivered and not acknowledged,
//! or released and waiting to go out again) is parked behind it; when that one is settled
//! (acknowledged, dead-lettered, expired, lost) the next parked record of the key becomes
//! ready, and goes out before new records. A consumer that leaves releases its deliveries,
//! which go out again (to any consumer) ahead of what is parked behind them, so a key's
//! records reach the application in log order, one at a time, whoever consumes them. Keys
//! spread over consumers as fetches come; records without a key are not held.
//!
//! Parked records stay unacknowledged in the group (its cursor stops at the oldest), so a
//! restart delivers them again from the log in order. Pure bookkeeping, no I/O.

use std::collections::{HashMap, VecDeque};

/// Most records parked per group; past it the group reads no new records until some are
/// settled (a key whose consumer is slow then holds up the others, but memory stays bounded).
pub const MAX_PARKED: usize = 100_000;

/// One key's records: the one out, and those waiting behind it, oldest first.
#[derive(Debug, Default)]
struct Lane {
    head: u64,
    waiting: VecDeque<u64>,
}

/// Key-ordered bookkeeping of one group.
#[derive(Debug, Default)]
pub struct KeyOrder {
    /// Keys with a record out.
    lanes: HashMap<String, Lane>,
    /// Key of every record out or parked.
    keys: HashMap<u64, String>,
    /// Parked records whose key came free, in the order they did: to deliver first.
    ready: VecDeque<u64>,
    parked: usize,
}

impl KeyOrder {
    /// Whether the new record at `offset` with `key` may go out now (its key is taken by
    /// it); `false` parks it behind the key's record that is out.
    pub fn admit(&mut self, offset: u64, key: &str) -> bool {
        self.keys.insert(offset, key.to_owned());
        match self.lanes.get_mut(key) {
            Some(lane) => {
                lane.waiting.push_back(offset);
                self.parked += 1;
                false
            }
            None => {
                self.lanes.insert(
                    key.to_owned(),
                    Lane {
                        head: offset,
                        waiting: VecDeque::new(),
                    },
                );
                true
            }
        }
    }

    /// The record at `offset` is settled: its key's next record, if any, becomes ready.
    pub fn settled(&mut self, offset: u64) {
        let Some(key) = self.keys.remove(&offset) else {
            return;
        };
        let Some(lane) = self.lanes.get_mut(&key) else {
            return;
        };
        if lane.head != offset {
            // A parked record settled before its turn (retention deleted it).
            if let Some(at) = lane.waiting.iter().position(|&o| o == offset) {
                lane.waiting.remove(at);
                self.parked -= 1;
            }
            return;
        }
        match lane.waiting.pop_front() {
            Some(next) => {
                lane.head = next;
                self.parked -= 1;
                self.ready.push_back(next);
            }
            None => {
                self.lanes.remove(&key);
            }
        }
    }

    /// Takes the next ready record.
    pub fn take_ready(&mut self) -> Option<u64> {
        self.ready.pop_front()
    }

    /// True when parked records came free.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// True when the group should read no new records for now.
    pub fn is_full(&self) -> bool {
        self.parked >= MAX_PARKED
    }

    /// Records parked behind their key.
    #[cfg(test)]
    pub fn parked(&self) -> usize {
        self.parked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_record_per_key_out_in_log_order() {
        let mut order = KeyOrder::default();
        assert!(order.admit(0, "a"));
        assert!(order.admit(1, "b"), "another key goes out at once");
        assert!(!order.admit(2, "a"));
        assert!(!order.admit(3, "a"));
        assert_eq!((order.parked(), order.take_ready()), (2, None));
        order.settled(1);
        assert_eq!(order.take_ready(), None, "b had nothing behind it");
        assert!(order.admit(4, "b"), "b is free again");
        order.settled(0);
        assert_eq!(order.take_ready(), Some(2));
        assert_eq!(order.take_ready(), None, "3 waits for 2");
        order.settled(2);
        assert_eq!(order.take_ready(), Some(3));
        order.settled(3);
        assert!(order.admit(5, "a"));
        assert_eq!(order.parked(), 0);
    }

    #[test]
    fn a_parked_record_deleted_before_its_turn_is_forgotten() {
        let mut order = KeyOrder::default();
        assert!(order.admit(0, "k"));
        assert!(!order.admit(1, "k"));
        assert!(!order.admit(2, "k"));
        order.settled(1);
        assert_eq!(order.parked(), 1);
        order.settled(0);
        assert_eq!(order.take_ready(), Some(2));
        order.settled(7); // unknown: ignored
    }
}
