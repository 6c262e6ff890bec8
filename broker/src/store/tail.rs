//! The tail cache: the most recently published records of a log, kept in memory exactly as
//! the commit thread wrote them.
//!
//! A consumer that keeps up (and every MQ-RPC service) asks for records that were written
//! microseconds ago. Serving those from memory saves a trip through the blocking thread pool
//! and a `read_at` per fetch; what is not here is read from the files as before.

use std::collections::VecDeque;

use bytes::Bytes;
use qbus_wire::protocol::record::peek_record_size;

/// Most bytes of records kept per log: enough for a fetch or two of a busy MQ, small enough
/// that thousands of MQs stay cheap.
pub(crate) const TAIL_BYTES: usize = 256 * 1024;

/// Whole records with consecutive offsets, as appended in one write.
#[derive(Debug, Clone)]
pub(crate) struct Chunk {
    pub(crate) first: u64,
    pub(crate) count: u64,
    pub(crate) data: Bytes,
}

/// How much a tail keeps: the oldest chunks go once either bound is passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    /// Most bytes of records.
    pub(crate) bytes: usize,
    /// Most records.
    pub(crate) records: u64,
}

impl Default for Budget {
    /// A log's read cache: [`TAIL_BYTES`], any number of records.
    fn default() -> Budget {
        Budget {
            bytes: TAIL_BYTES,
            records: u64::MAX,
        }
    }
}

/// Recent chunks, oldest first, with consecutive offsets across chunks. A log keeps one as
/// its read cache; a memory MQ's ring (`queue::ring`) is one with the MQ's own budget.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    records: u64,
    budget: Budget,
}

/// Records served from the cache.
#[derive(Debug)]
pub(crate) struct Cached {
    pub(crate) data: Bytes,
    pub(crate) count: usize,
    pub(crate) next_offset: u64,
}

impl Tail {
    /// An empty tail that keeps at most `budget`.
    pub(crate) fn with_budget(budget: Budget) -> Tail {
        Tail {
            budget,
            ..Tail::default()
        }
    }

    /// Adds a published chunk; drops the oldest ones beyond the budget. A gap (a chunk not
    /// following the last one) starts the cache afresh.
    pub(crate) fn push(&mut self, chunk: Chunk) {
        if self
            .chunks
            .back()
            .is_some_and(|last| last.first + last.count != chunk.first)
        {
            self.clear();
        }
        if chunk.data.len() > self.budget.bytes || chunk.count > self.budget.records {
            self.clear();
            return;
        }
        self.bytes += chunk.data.len();
        self.records += chunk.count;
        self.chunks.push_back(chunk);
        while self.bytes > self.budget.bytes || self.records > self.budget.records {
            self.pop_front();
        }
    }

    /// Drops the oldest chunk.
    pub(crate) fn pop_front(&mut self) {
        if let Some(old) = self.chunks.pop_front() {
            self.bytes -= old.data.len();
            self.records -= old.count;
        }
    }

    /// The oldest chunk.
    pub(crate) fn front(&self) -> Option<&Chunk> {
        self.chunks.front()
    }

    /// Bytes of records held.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Takes every chunk out, oldest first.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = Chunk> {
        self.bytes = 0;
        self.records = 0;
        std::mem::take(&mut self.chunks).into_iter()
    }

    /// Forgets everything (after truncation or retention).
    pub(crate) fn clear(&mut self) {
        self.chunks.clear();
        self.bytes = 0;
        self.records = 0;
    }

    /// Records from `from` on: at most `max_records` and about `max_bytes` (at least one).
    /// `None` when `from` is not cached or `max_records` is 0. Zero-copy when they lie in
    /// one chunk.
    pub(crate) fn read(&self, from: u64, max_records: usize, max_bytes: usize) -> Option<Cached> {
        if max_records == 0 {
            return None;
        }
        // Chunks are in offset order: a ring of many thousands is searched, not walked.
        let at = self.chunks.partition_point(|c| c.first + c.count <= from);
        if self.chunks.get(at)?.first > from {
            return None;
        }
        let mut parts: Vec<Bytes> = Vec::new();
        let (mut count, mut bytes, mut next) = (0usize, 0usize, from);
        for chunk in self.chunks.iter().skip(at) {
            let data = &chunk.data;
            let mut pos = 0;
            for _ in chunk.first..next {
                pos += peek_record_size(&data[pos..])?;
            }
            let start = pos;
            while pos < data.len() && count < max_records && (count == 0 || bytes < max_bytes) {
                let size = peek_record_size(&data[pos..])?;
                pos += size;
                bytes += size;
                count += 1;
            }
            if pos > data.len() {
                return None;
            }
            if pos > start {
                parts.push(data.slice(start..pos));
            }
            next = from + count as u64;
            if count >= max_records || bytes >= max_bytes {
                break;
            }
        }
        let data = match parts.len() {
            0 => return None,
            1 => parts.pop()?,
            _ => {
                let mut joined = bytes::BytesMut::with_capacity(bytes);
                for part in &parts {
                    joined.extend_from_slice(part);
                }
                joined.freeze()
            }
        };
        Some(Cached {
            data,
            count,
            next_offset: next,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qbus_wire::protocol::record::{encode_record, records};

    fn chunk(first: u64, count: u64, size: usize) -> Chunk {
        let mut data = Vec::new();
        for offset in first..first + count {
            encode_record(&mut data, offset, 0, None, None, &vec![b'x'; size]).unwrap();
        }
        Chunk {
            first,
            count,
            data: data.into(),
        }
    }

    fn offsets(cached: &Cached) -> Vec<u64> {
        records(&cached.data).map(|r| r.unwrap().offset).collect()
    }

    #[test]
    fn serves_from_any_offset_within_a_chunk() {
        let mut tail = Tail::default();
        tail.push(chunk(10, 5, 4));
        tail.push(chunk(15, 5, 4));
        let got = tail.read(12, 100, 1 << 20).unwrap();
        assert_eq!((got.count, got.next_offset), (8, 20));
        assert_eq!(
            offsets(&tail.read(12, 3, 1 << 20).unwrap()),
            vec![12, 13, 14]
        );
        let got = tail.read(15, 2, 1 << 20).unwrap();
        assert_eq!(offsets(&got), vec![15, 16]);
        let across = tail.read(13, 100, 1 << 20).unwrap();
        assert_eq!(
            (offsets(&across), across.next_offset),
            ((13..20).collect(), 20)
        );
        assert!(tail.read(9, 1, 1).is_none());
        assert!(tail.read(12, 0, 1 << 20).is_none(), "nothing asked for");
        assert!(tail.read(20, 1, 1).is_none());
        let one = tail.read(10, 100, 1).unwrap();
        assert_eq!(one.count, 1, "at least one record even past max_bytes");
    }

    #[test]
    fn stays_within_its_budget_and_restarts_on_a_gap() {
        let mut tail = Tail::default();
        for i in 0..100 {
            tail.push(chunk(i * 10, 10, 1000));
        }
        assert!(tail.bytes <= TAIL_BYTES);
        assert!(tail.read(0, 1, 1).is_none(), "oldest chunks evicted");
        assert!(tail.read(995, 1, 1).is_some());
        tail.push(chunk(2000, 1, 1));
        assert!(
            tail.read(995, 1, 1).is_none(),
            "a gap drops what came before"
        );
        assert!(tail.read(2000, 1, 1).is_some());
    }
}
