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
//! restart delivers them again from the log in order. While parked, a record's bytes are
//! kept here (a copy, within [`MAX_PARKED_BYTES`]): with many keys busy nearly every record
//! is parked once, and reading each back from the log by its offset when its turn came was
//! most of what an ordered group cost. Pure bookkeeping, no I/O.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::offset_map::OffsetMap;

/// Most records parked per group; past it the group reads no new records until some are
/// settled (a key whose consumer is slow then holds up the others, but memory stays bounded).
pub const MAX_PARKED: usize = 100_000;

/// Most bytes of parked records kept per group; past it, as past [`MAX_PARKED`], the group
/// reads no new records for now.
pub const MAX_PARKED_BYTES: usize = 32 << 20;

/// One key's records: the one out, and those waiting behind it, oldest first.
#[derive(Debug)]
struct Lane {
    /// The key (one copy, shared with `KeyOrder::keys`).
    key: Arc<str>,
    head: u64,
    waiting: VecDeque<(u64, Bytes)>,
}

/// Key-ordered bookkeeping of one group.
#[derive(Debug, Default)]
pub struct KeyOrder {
    /// Keys with a record out.
    lanes: HashMap<Arc<str>, Lane>,
    /// Key of every record out or parked (shared with its lane: one copy per busy key).
    /// Records are admitted in log order, so this is mostly pushes and front pops.
    keys: OffsetMap<Arc<str>>,
    /// Parked records whose key came free, in the order they did: to deliver first.
    ready: VecDeque<(u64, Bytes)>,
    /// Records waiting in lanes.
    parked: usize,
    /// Bytes of the records waiting in lanes or ready.
    kept_bytes: usize,
}

impl KeyOrder {
    /// Whether the new record at `offset` with `key` may go out now (its key is taken by
    /// it); `false` parks it, a copy of its bytes `record`, behind the key's record that is
    /// out.
    pub fn admit(&mut self, offset: u64, key: &str, record: &[u8]) -> bool {
        match self.lanes.get_mut(key) {
            Some(lane) => {
                self.keys.insert(offset, lane.key.clone());
                lane.waiting
                    .push_back((offset, Bytes::copy_from_slice(record)));
                self.parked += 1;
                self.kept_bytes += record.len();
                false
            }
            None => {
                let key: Arc<str> = Arc::from(key);
                self.keys.insert(offset, key.clone());
                self.lanes.insert(
                    key.clone(),
                    Lane {
                        key,
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
        let Some(key) = self.keys.remove(offset) else {
            return;
        };
        let Some(lane) = self.lanes.get_mut(&key) else {
            return;
        };
        if lane.head != offset {
            // A parked record settled before its turn (retention deleted it).
            if let Some(at) = lane.waiting.iter().position(|&(o, _)| o == offset) {
                if let Some((_, record)) = lane.waiting.remove(at) {
                    self.kept_bytes -= record.len();
                }
                self.parked -= 1;
            }
            return;
        }
        match lane.waiting.pop_front() {
            Some(next) => {
                lane.head = next.0;
                self.parked -= 1;
                self.ready.push_back(next);
            }
            None => {
                self.lanes.remove(&key);
            }
        }
    }

    /// Takes the next ready record: its offset and its bytes.
    pub fn take_ready(&mut self) -> Option<(u64, Bytes)> {
        let (offset, record) = self.ready.pop_front()?;
        self.kept_bytes -= record.len();
        Some((offset, record))
    }

    /// True when parked records came free.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// True when the group should read no new records for now.
    pub fn is_full(&self) -> bool {
        self.parked >= MAX_PARKED || self.kept_bytes >= MAX_PARKED_BYTES
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
        assert!(order.admit(0, "a", b"record"));
        assert!(
            order.admit(1, "b", b"record"),
            "another key goes out at once"
        );
        assert!(!order.admit(2, "a", b"record"));
        assert!(!order.admit(3, "a", b"record"));
        assert_eq!(
            (order.parked(), order.take_ready().map(|(offset, _)| offset)),
            (2, None)
        );
        order.settled(1);
        assert_eq!(
            order.take_ready().map(|(offset, _)| offset),
            None,
            "b had nothing behind it"
        );
        assert!(order.admit(4, "b", b"record"), "b is free again");
        order.settled(0);
        assert_eq!(order.take_ready().map(|(offset, _)| offset), Some(2));
        assert_eq!(
            order.take_ready().map(|(offset, _)| offset),
            None,
            "3 waits for 2"
        );
        order.settled(2);
        assert_eq!(order.take_ready().map(|(offset, _)| offset), Some(3));
        order.settled(3);
        assert!(order.admit(5, "a", b"record"));
        assert_eq!(order.parked(), 0);
    }

    #[test]
    fn a_parked_record_deleted_before_its_turn_is_forgotten() {
        let mut order = KeyOrder::default();
        assert!(order.admit(0, "k", b"record"));
        assert!(!order.admit(1, "k", b"record"));
        assert!(!order.admit(2, "k", b"record"));
        order.settled(1);
        assert_eq!(order.parked(), 1);
        order.settled(0);
        assert_eq!(order.take_ready().map(|(offset, _)| offset), Some(2));
        order.settled(7); // unknown: ignored
    }

    #[test]
    fn a_parked_record_comes_back_with_its_bytes_and_they_count_toward_the_limit() {
        let mut order = KeyOrder::default();
        assert!(order.admit(0, "k", b"first"));
        let big = vec![7u8; MAX_PARKED_BYTES / 2];
        assert!(!order.admit(1, "k", &big));
        assert!(!order.is_full());
        assert!(!order.admit(2, "k", &big));
        assert!(order.is_full(), "the bytes kept reached the limit");
        order.settled(0);
        assert!(order.is_full(), "ready records are still kept");
        let (offset, record) = order.take_ready().unwrap();
        assert_eq!((offset, record.len()), (1, big.len()));
        assert!(!order.is_full());
        order.settled(2);
        assert!(!order.admit(3, "k", b"x"), "1 is still out");
        order.settled(1);
        assert_eq!(
            order.take_ready().map(|(offset, _)| offset),
            Some(3),
            "2, settled before its turn, was forgotten"
        );
    }
}
