//! A memory MQ's messages: a bounded ring of records in memory, never on disk.
//!
//! A produce stamps its records (offsets, timestamp, checksum) and adds them to the ring as
//! one chunk under a short lock, then moves the end every waiting fetch watches: no commit
//! thread, no file, no blocking pool. The ring keeps at most its limits' messages, bytes and
//! age; what falls out is gone, and a group that had not read it yet is told so by its next
//! fetch (see `Mq::fetch`).

use std::sync::Mutex;
use std::time::Duration;

use bytes::BytesMut;
use qbus_wire::protocol::record::{parse_intact_record, peek_record_size, stamp_record};
use qbus_wire::protocol::MqOptions;
use tokio::sync::watch;

use crate::store::tail::{Budget, Chunk, Tail};
use crate::store::{Appended, ReadBatch, ReadPos};

/// What a ring keeps; the oldest messages go once any limit is passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLimits {
    /// Most messages (default [`RingLimits::DEFAULT_MESSAGES`]).
    pub max_messages: u64,
    /// Most bytes of records (default [`RingLimits::DEFAULT_BYTES`]).
    pub max_bytes: u64,
    /// Messages older than this go (default [`RingLimits::DEFAULT_AGE`]).
    pub max_age: Duration,
}

impl RingLimits {
    /// Default `memory_max_messages`.
    pub const DEFAULT_MESSAGES: u64 = 1 << 20;
    /// Default `memory_max_bytes`: 64 MiB.
    pub const DEFAULT_BYTES: u64 = 64 << 20;
    /// Default `memory_max_age_ms`: one minute.
    pub const DEFAULT_AGE: Duration = Duration::from_secs(60);

    /// The limits an MQ's options ask for, defaults for those unset (zero counts as one).
    pub fn of(options: &MqOptions) -> RingLimits {
        RingLimits {
            max_messages: options
                .memory_max_messages
                .unwrap_or(Self::DEFAULT_MESSAGES)
                .max(1),
            max_bytes: options
                .memory_max_bytes
                .unwrap_or(Self::DEFAULT_BYTES)
                .max(1),
            max_age: options
                .memory_max_age_ms
                .map_or(Self::DEFAULT_AGE, Duration::from_millis)
                .max(Duration::from_millis(1)),
        }
    }
}

impl Default for RingLimits {
    fn default() -> RingLimits {
        RingLimits::of(&MqOptions::default())
    }
}

/// The ring of one memory MQ. Shared by its producers and fetches.
pub struct Ring {
    state: Mutex<State>,
    end: watch::Sender<u64>,
    limits: RingLimits,
}

struct State {
    tail: Tail,
    /// Offset of the oldest message kept (the end when the ring is empty).
    first: u64,
    /// Offset the next message gets.
    next: u64,
}

impl Ring {
    /// An empty ring whose first message gets offset 0.
    pub fn new(limits: RingLimits) -> Ring {
        let budget = Budget {
            bytes: usize::try_from(limits.max_bytes).unwrap_or(usize::MAX),
            records: limits.max_messages,
        };
        Ring {
            state: Mutex::new(State {
                tail: Tail::with_budget(budget),
                first: 0,
                next: 0,
            }),
            end: watch::Sender::new(0),
            limits,
        }
    }

    /// Its limits.
    pub fn limits(&self) -> RingLimits {
        self.limits
    }

    /// Adds `records` (whole records back to back, verified by the caller): stamps each
    /// with the next offset and `now_ms`, drops the oldest messages beyond the limits, and
    /// wakes the fetches waiting for more.
    pub fn append(&self, mut records: BytesMut, now_ms: u64) -> Appended {
        let mut state = self.state.lock().expect("ring poisoned");
        let first_offset = state.next;
        let (mut pos, mut offset) = (0, first_offset);
        while let Some(size) = peek_record_size(&records[pos..]) {
            if size == 0 || pos + size > records.len() {
                break;
            }
            stamp_record(&mut records[pos..pos + size], offset, now_ms);
            pos += size;
            offset += 1;
        }
        records.truncate(pos);
        let count = offset - first_offset;
        if count > 0 {
            state.next = offset;
            state.tail.push(Chunk {
                first: first_offset,
                count,
                data: records.freeze(),
            });
            state.first = state.tail.front().map_or(state.next, |c| c.first);
            self.drop_older(&mut state, now_ms);
        }
        let end = state.next;
        drop(state);
        self.end.send_replace(end);
        Appended {
            first_offset,
            count,
            next_offset: first_offset + count,
        }
    }

    /// Drops the messages older than the age limit (whole chunks: one produce's records
    /// share a timestamp).
    pub fn expire(&self, now_ms: u64) {
        let mut state = self.state.lock().expect("ring poisoned");
        self.drop_older(&mut state, now_ms);
    }

    fn drop_older(&self, state: &mut State, now_ms: u64) {
        let max_age = u64::try_from(self.limits.max_age.as_millis()).unwrap_or(u64::MAX);
        let cutoff = now_ms.saturating_sub(max_age);
        while let Some(front) = state.tail.front() {
            let stamped = parse_intact_record(&front.data).map_or(0, |r| r.timestamp_ms);
            if stamped >= cutoff {
                break;
            }
            state.tail.pop_front();
        }
        state.first = state.tail.front().map_or(state.next, |c| c.first);
    }

    /// Up to `max_records` records from `from` on, about `max_bytes` (at least one);
    /// `None` when `from` is not in the ring (dropped, or not written yet).
    pub fn read(&self, from: u64, max_records: usize, max_bytes: usize) -> Option<ReadBatch> {
        let state = self.state.lock().expect("ring poisoned");
        let cached = state.tail.read(from, max_records, max_bytes)?;
        Some(ReadBatch {
            data: cached.data,
            count: cached.count,
            next_offset: cached.next_offset,
            next_pos: ReadPos::unknown(cached.next_offset),
        })
    }

    /// Offset of the oldest message kept.
    pub fn first_offset(&self) -> u64 {
        self.state.lock().expect("ring poisoned").first
    }

    /// Offset the next message gets.
    pub fn end_offset(&self) -> u64 {
        *self.end.borrow()
    }

    /// Bytes of records held.
    pub fn size_bytes(&self) -> u64 {
        self.state.lock().expect("ring poisoned").tail.bytes() as u64
    }

    /// Follows the end, to wait for new messages.
    pub fn subscribe_end(&self) -> watch::Receiver<u64> {
        self.end.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qbus_wire::protocol::record::{encode_record, records};

    fn batch(n: usize, size: usize) -> BytesMut {
        let mut data = Vec::new();
        for _ in 0..n {
            encode_record(&mut data, 0, 0, None, None, &vec![b'x'; size]).unwrap();
        }
        data.as_slice().into()
    }

    #[test]
    fn stamps_offsets_and_keeps_checksums_valid() {
        let ring = Ring::new(RingLimits::default());
        assert_eq!(ring.append(batch(3, 4), 5).first_offset, 0);
        assert_eq!(ring.append(batch(2, 4), 6).first_offset, 3);
        let read = ring.read(1, 10, 1 << 20).unwrap();
        let got: Vec<_> = records(&read.data).map(|r| r.unwrap()).collect();
        assert_eq!(
            got.iter().map(|r| r.offset).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!(got[3].timestamp_ms, 6);
        assert!(ring.read(5, 1, 1).is_none(), "not written yet");
    }

    #[test]
    fn drops_the_oldest_past_each_limit() {
        let ring = Ring::new(RingLimits {
            max_messages: 10,
            ..RingLimits::default()
        });
        for _ in 0..5 {
            ring.append(batch(4, 4), 1);
        }
        assert_eq!((ring.first_offset(), ring.end_offset()), (12, 20));
        assert!(ring.read(11, 1, 1).is_none());

        let ring = Ring::new(RingLimits {
            max_bytes: 1000,
            ..RingLimits::default()
        });
        for _ in 0..100 {
            ring.append(batch(1, 100), 1);
        }
        assert!(ring.size_bytes() <= 1000);
        assert!(ring.first_offset() >= 90);

        let ring = Ring::new(RingLimits {
            max_age: Duration::from_millis(100),
            ..RingLimits::default()
        });
        ring.append(batch(2, 4), 1_000);
        ring.append(batch(2, 4), 1_050);
        ring.expire(1_120);
        assert_eq!(ring.first_offset(), 2);
        ring.expire(10_000);
        assert_eq!((ring.first_offset(), ring.end_offset()), (4, 4));
    }
}
