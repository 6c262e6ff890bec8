//! The read side of a log, shared by every fetch of an MQ.
//!
//! Readers see a [`View`] of the published segments behind an `RwLock`. A read holds the lock
//! only to locate its start (index lookup) and clone the segment's file handle, then reads
//! with `read_at` without any lock, so the writer never waits for disk reads and readers
//! never wait for disk writes. Sealed segments are immutable and the active one only grows
//! past what is published, so bytes a reader was told about never change under it; a segment
//! deleted by retention stays readable through the open handle until the read ends.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use bytes::Bytes;
use qbus_wire::protocol::record::{parse_record, peek_record_size, RecordError, RECORD_OVERHEAD};
use tokio::sync::watch;

use super::error::StoreError;
use super::fsio::FileIo;
use super::index::{OffsetIndex, INDEX_INTERVAL};
use super::resync::next_intact;
use super::tail::Tail;

/// A segment as readers see it: only published records.
#[derive(Debug)]
pub(crate) struct SegmentView {
    pub(crate) base: u64,
    /// Offset after the last published record.
    pub(crate) end: u64,
    /// Bytes of published records.
    pub(crate) len: u64,
    pub(crate) file: Arc<dyn FileIo>,
    pub(crate) path: Arc<Path>,
    pub(crate) index: OffsetIndex,
}

/// The published state of a log.
#[derive(Debug)]
pub(crate) struct View {
    pub(crate) segments: Vec<SegmentView>,
    pub(crate) first_offset: u64,
    pub(crate) end_offset: u64,
    pub(crate) size_bytes: u64,
    /// The newest published records, in memory.
    pub(crate) tail: Tail,
}

/// The lock around the view, shared by the writer and every reader.
pub(crate) type SharedView = Arc<RwLock<View>>;

/// Where an offset lies in the files; returned by a read to speed up the next one.
///
/// Opaque: only meaningful to the [`LogReader`] that returned it, for the offset it was
/// returned with. A stale one (its segment was deleted) is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadPos {
    base: u64,
    offset: u64,
    position: u64,
}

impl ReadPos {
    /// Matches no segment, so the next read looks the offset up (also what a read from
    /// memory returns).
    pub(crate) fn unknown(offset: u64) -> ReadPos {
        ReadPos {
            base: u64::MAX,
            offset,
            position: 0,
        }
    }
}

/// The result of [`LogReader::read`].
#[derive(Debug, Clone)]
pub struct ReadBatch {
    /// Whole verified records back to back, exactly as stored.
    pub data: Bytes,
    /// Number of records in `data`.
    pub count: usize,
    /// Offset to read from next.
    pub next_offset: u64,
    /// Position hint for reading `next_offset`.
    pub next_pos: ReadPos,
}

/// The shared read side of one MQ's log: cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct LogReader {
    view: SharedView,
    end: watch::Receiver<u64>,
    written: Arc<Written>,
}

/// Records written but not yet published (under `--fsync always`: not yet synced), kept
/// by the log's writer from the write to the publish, for a leader's followers to copy
/// while the leader syncs (`docs/replication.md`); and the offset after them.
#[derive(Debug)]
pub(crate) struct Written {
    pub(crate) tail: std::sync::Mutex<Tail>,
    pub(crate) end: watch::Sender<u64>,
}

impl Written {
    pub(crate) fn tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.tail.lock().expect("written tail poisoned")
    }
}

/// A stretch of one segment to read: everything needed once the lock is released.
struct Span {
    base: u64,
    end: u64,
    len: u64,
    file: Arc<dyn FileIo>,
    path: Arc<Path>,
    // Where to start: an indexed or hinted record at or before the wanted offset.
    start_offset: u64,
    start_pos: u64,
    is_last: bool,
}

/// Where a read starts.
enum Start {
    Span(Span),
    /// Nothing to read at the offset; the hint to return.
    Nothing(ReadPos),
}

// Read sizes when the records' size is unknown.
const DEFAULT_RECORD_ESTIMATE: u64 = 256;
const MIN_READ: u64 = 512;

impl ReadBatch {
    /// A batch of records read from memory (no file position known).
    fn cached(cached: super::tail::Cached) -> ReadBatch {
        ReadBatch {
            data: cached.data,
            count: cached.count,
            next_offset: cached.next_offset,
            next_pos: ReadPos::unknown(cached.next_offset),
        }
    }
}

impl LogReader {
    pub(crate) fn new(
        view: SharedView,
        end: watch::Receiver<u64>,
        written: Arc<Written>,
    ) -> LogReader {
        LogReader { view, end, written }
    }

    fn view(&self) -> RwLockReadGuard<'_, View> {
        self.view.read().expect("log view lock poisoned")
    }

    /// Offset of the oldest retained record.
    pub fn first_offset(&self) -> u64 {
        self.view().first_offset
    }

    /// Offset after the last published record.
    pub fn end_offset(&self) -> u64 {
        self.view().end_offset
    }

    /// Bytes of published records on disk.
    pub fn size_bytes(&self) -> u64 {
        self.view().size_bytes
    }

    /// Bytes of published records from offset `from` to the end, as the offset index
    /// places `from`: exact from a segment start, otherwise up to about `INDEX_INTERVAL`
    /// (4 KiB) over, without reading any file. Used for a follower's lag in bytes.
    pub fn bytes_after(&self, from: u64) -> u64 {
        let view = self.view();
        if from >= view.end_offset {
            return 0;
        }
        view.segments
            .iter()
            .filter(|seg| seg.end > from)
            .map(|seg| {
                if from <= seg.base {
                    return seg.len;
                }
                let rel = u32::try_from(from - seg.base).unwrap_or(u32::MAX);
                let (_, pos) = seg.index.lookup(rel);
                seg.len.saturating_sub(u64::from(pos))
            })
            .sum()
    }

    /// Number of segments.
    pub fn segment_count(&self) -> u32 {
        u32::try_from(self.view().segments.len()).unwrap_or(u32::MAX)
    }

    /// A watch of the published end offset, woken by every publish that moves it.
    ///
    /// Subscribe before checking [`end_offset`](Self::end_offset) so no publish falls in
    /// between. `changed()` fails once the log's writer is dropped (log closed or destroyed).
    pub fn subscribe_end(&self) -> watch::Receiver<u64> {
        let mut rx = self.end.clone();
        rx.borrow_and_update();
        rx
    }

    /// The offset after the last record written, published or not.
    pub fn written_end(&self) -> u64 {
        *self.written.end.borrow()
    }

    /// A watch of [`written_end`](Self::written_end), woken by every write that moves it.
    pub fn subscribe_written_end(&self) -> watch::Receiver<u64> {
        let mut rx = self.written.end.subscribe();
        rx.borrow_and_update();
        rx
    }

    /// Records from `from` on that are written but not yet published, without blocking:
    /// `None` when `from` is not among them (published by now, or not written yet). Only a
    /// leader's followers read these (`docs/replication.md`): they may not survive a power
    /// loss of this machine.
    pub fn read_written(
        &self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Option<ReadBatch> {
        let cached = self.written.tail().read(from, max_records, max_bytes)?;
        Some(ReadBatch::cached(cached))
    }

    /// Like [`read`](Self::read) for records still in the in-memory tail of the log, without
    /// blocking: `None` when `from` is not there (read the files then). Records there were
    /// verified when produced and have not touched the disk since.
    pub fn read_recent(
        &self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Option<ReadBatch> {
        let view = self.view();
        if from < view.first_offset || from >= view.end_offset {
            return None;
        }
        let cached = view.tail.read(from, max_records, max_bytes)?;
        Some(ReadBatch::cached(cached))
    }

    /// Reads whole records from `from` (clamped up to the first offset) up to the published
    /// end: at most `max_records`, and about `max_bytes` (at least one record when one is
    /// available, however big). Blocking: call it off the async runtime.
    ///
    /// `pos` is the `next_pos` of the previous read when `from` is its `next_offset`; it skips
    /// the index lookup and is ignored when stale. Every returned record's checksum and offset
    /// are verified. A bad record ends the batch before it; a read that starts at one fails
    /// with [`StoreError::Corrupt`] (or `OffsetMismatch`) naming its file and position, and
    /// [`skip_damage`](Self::skip_damage) says where to go on. A read usually takes one
    /// `read_at`; one that reaches the end of a sealed segment carries on into the next.
    pub fn read(
        &self,
        from: u64,
        pos: Option<ReadPos>,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch, StoreError> {
        if max_records == 0 {
            let from = from.max(self.first_offset());
            return Ok(ReadBatch {
                data: Bytes::new(),
                count: 0,
                next_offset: from,
                next_pos: pos
                    .filter(|p| p.offset == from)
                    .unwrap_or(ReadPos::unknown(from)),
            });
        }
        let mut out = Vec::new();
        let mut data_start = None;
        let mut count = 0usize;
        let mut bytes = 0usize;
        let mut from = from;
        let mut hint = pos;
        let mut next_pos = ReadPos::unknown(from);
        loop {
            let span = {
                let view = self.view();
                from = from.max(view.first_offset);
                match locate(&view, from, hint) {
                    Start::Span(span) => span,
                    Start::Nothing(pos) => {
                        next_pos = pos;
                        break;
                    }
                }
            };
            from = from.max(span.base);
            if data_start.is_some() && span.start_offset < from {
                // Retention moved the start meanwhile; the data so far must stay contiguous.
                break;
            }
            let mut reader = SpanReader::new(&span, &mut out);
            // Guess how many bytes the wanted records take, to read them in one call.
            let avg = span
                .len
                .checked_div(span.end - span.base)
                .map_or(DEFAULT_RECORD_ESTIMATE, |avg| avg + 1);
            let ahead = |count: usize, bytes: usize| -> u64 {
                let wanted = ((max_records - count) as u64).saturating_mul(avg);
                wanted
                    .min(max_bytes.saturating_sub(bytes) as u64)
                    .max(MIN_READ)
            };
            let mut p = span.start_pos;
            let mut off = span.start_offset;
            let skip = if off < from { INDEX_INTERVAL } else { 0 };
            reader.fill(p + 4, skip + ahead(count, bytes))?;
            while off < from {
                reader.fill(p + 4, ahead(count, bytes))?;
                let size = reader.record_size(p)?;
                p += size;
                off += 1;
            }
            if data_start.is_none() {
                data_start = Some(reader.at(p));
            }
            let mut damaged = false;
            while count < max_records && off < span.end {
                reader.fill(p + 4, ahead(count, bytes))?;
                // The records before a damaged one go out; the next read, from the damaged
                // offset, reports it.
                let size = match reader.record_size(p) {
                    Ok(size) => size,
                    Err(e) if count == 0 => return Err(e),
                    Err(_) => {
                        damaged = true;
                        break;
                    }
                };
                if count > 0 && bytes + size as usize > max_bytes {
                    break;
                }
                reader.fill(p + size, ahead(count, bytes))?;
                match reader.verify(p, size, off) {
                    Ok(()) => {}
                    Err(e) if count == 0 => return Err(e),
                    Err(_) => {
                        damaged = true;
                        break;
                    }
                }
                p += size;
                off += 1;
                count += 1;
                bytes += size as usize;
            }
            let end_of_data = reader.at(p);
            out.truncate(end_of_data);
            next_pos = ReadPos {
                base: span.base,
                offset: off,
                position: p,
            };
            from = off;
            let budget_left = count < max_records && bytes < max_bytes;
            if damaged || !budget_left || off < span.end || span.is_last {
                break;
            }
            hint = Some(next_pos);
        }
        let data = Bytes::from(out).slice(data_start.unwrap_or(0)..);
        Ok(ReadBatch {
            data,
            count,
            next_offset: from,
            next_pos,
        })
    }

    /// Where reading goes on after a read from `from` failed on damage
    /// ([`StoreError::is_damage`]): the first intact record at or after `from`, found by
    /// walking from the index with every record verified and resynchronising past damaged
    /// ones (`resync`). Reports the offsets it had to give up, if any. Blocking.
    pub fn skip_damage(&self, from: u64) -> Result<Skip, StoreError> {
        let span = {
            let view = self.view();
            match locate(&view, from.max(view.first_offset), None) {
                Start::Span(span) => span,
                Start::Nothing(pos) => {
                    return Ok(Skip {
                        next_offset: pos.offset,
                        next_pos: pos,
                        lost: None,
                    })
                }
            }
        };
        let from = from.max(span.start_offset);
        let (mut off, mut p) = (span.start_offset, span.start_pos);
        let mut lost = None;
        while off < span.end {
            match check_record(&span, p, off)? {
                Ok(_) if off >= from => {
                    let next_pos = ReadPos {
                        base: span.base,
                        offset: off,
                        position: p,
                    };
                    return Ok(Skip {
                        next_offset: off,
                        next_pos,
                        lost,
                    });
                }
                Ok(size) => {
                    p += size;
                    off += 1;
                }
                Err(damage) => {
                    let found =
                        next_intact(&*span.file, &span.path, p, span.len, off + 1..span.end)?;
                    let (next, at) = found.unwrap_or((span.end, span.len));
                    if next > from && lost.is_none() {
                        lost = Some(Lost {
                            first: from,
                            end: next,
                            file: span.path.to_path_buf(),
                            position: p,
                            reason: damage.to_string(),
                        });
                    }
                    (off, p) = (next, at);
                }
            }
        }
        let next_pos = if span.is_last {
            ReadPos {
                base: span.base,
                offset: off,
                position: span.len,
            }
        } else {
            ReadPos::unknown(off)
        };
        Ok(Skip {
            next_offset: off,
            next_pos,
            lost,
        })
    }
}

/// The result of [`LogReader::skip_damage`].
#[derive(Debug, Clone)]
pub struct Skip {
    /// The first offset readable from `from` on.
    pub next_offset: u64,
    /// Its position, to read it without walking over the damage again.
    pub next_pos: ReadPos,
    /// The offsets given up, when there were any.
    pub lost: Option<Lost>,
}

/// Offsets of a log that cannot be read because their records are damaged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    /// The first offset lost.
    pub first: u64,
    /// The offset after the last one lost: reading goes on there.
    pub end: u64,
    /// The segment file.
    pub file: PathBuf,
    /// Byte position of the damaged record in it.
    pub position: u64,
    /// What is wrong with it.
    pub reason: String,
}

/// Verifies the record at `pos` of `span` that should have `offset`: its size, or the
/// damage found (the outer error is an I/O failure).
fn check_record(span: &Span, pos: u64, offset: u64) -> Result<Result<u64, StoreError>, StoreError> {
    let corrupt = |reason| StoreError::Corrupt {
        file: span.path.to_path_buf(),
        position: pos,
        reason,
    };
    let left = span.len.saturating_sub(pos);
    let mut head = [0u8; 4];
    if left < head.len() as u64 {
        let have = left as usize;
        return Ok(Err(corrupt(RecordError::Truncated { need: 4, have })));
    }
    span.file
        .read_exact_at(&mut head, pos)
        .map_err(StoreError::io(&span.path))?;
    let size = peek_record_size(&head).unwrap_or(0);
    if size < RECORD_OVERHEAD {
        return Ok(Err(corrupt(RecordError::BadLength {
            len: size.saturating_sub(4),
        })));
    }
    if size as u64 > left {
        let have = left as usize;
        return Ok(Err(corrupt(RecordError::Truncated { need: size, have })));
    }
    let mut record = vec![0u8; size];
    span.file
        .read_exact_at(&mut record, pos)
        .map_err(StoreError::io(&span.path))?;
    Ok(match parse_record(&record) {
        Err(reason) => Err(corrupt(reason)),
        Ok(rec) if rec.offset != offset => Err(StoreError::OffsetMismatch {
            file: span.path.to_path_buf(),
            position: pos,
            expected: offset,
            found: rec.offset,
        }),
        Ok(_) => Ok(size as u64),
    })
}

/// Finds the segment and starting point for reading `from`, trusting `hint` when it still
/// matches. Moves past the end of sealed segments (and over any gap recovery left).
fn locate(view: &View, from: u64, hint: Option<ReadPos>) -> Start {
    if from >= view.end_offset {
        let pos = match view.segments.last() {
            Some(last) if from == view.end_offset => ReadPos {
                base: last.base,
                offset: from,
                position: last.len,
            },
            _ => ReadPos::unknown(from),
        };
        return Start::Nothing(pos);
    }
    let hinted = hint.filter(|h| h.offset == from).and_then(|h| {
        let at = view
            .segments
            .binary_search_by_key(&h.base, |s| s.base)
            .ok()?;
        (h.position <= view.segments[at].len).then_some((at, h.position))
    });
    let (mut at, mut start) = match hinted {
        Some((at, position)) => (at, Some((from, position))),
        None => {
            let after = view.segments.partition_point(|s| s.base <= from);
            (after.saturating_sub(1), None)
        }
    };
    let Some(mut seg) = view.segments.get(at) else {
        return Start::Nothing(ReadPos::unknown(from));
    };
    while from >= seg.end {
        let Some(next) = view.segments.get(at + 1) else {
            return Start::Nothing(ReadPos::unknown(from));
        };
        at += 1;
        seg = next;
        start = Some((seg.base, 0));
    }
    let (start_offset, start_pos) = start.unwrap_or_else(|| {
        let rel = u32::try_from(from.saturating_sub(seg.base)).unwrap_or(u32::MAX);
        let (rel_at, pos) = seg.index.lookup(rel);
        (seg.base + u64::from(rel_at), u64::from(pos))
    });
    Start::Span(Span {
        base: seg.base,
        end: seg.end,
        len: seg.len,
        file: Arc::clone(&seg.file),
        path: Arc::clone(&seg.path),
        start_offset,
        start_pos,
        is_last: at + 1 == view.segments.len(),
    })
}

/// Reads a span's bytes into the tail of the batch buffer, extending it on demand.
struct SpanReader<'a> {
    span: &'a Span,
    out: &'a mut Vec<u8>,
    // Index in `out` of the byte at file position `span.start_pos`.
    origin: usize,
}

impl<'a> SpanReader<'a> {
    fn new(span: &'a Span, out: &'a mut Vec<u8>) -> SpanReader<'a> {
        let origin = out.len();
        SpanReader { span, out, origin }
    }

    /// Index in the buffer of file position `pos`.
    fn at(&self, pos: u64) -> usize {
        self.origin + (pos - self.span.start_pos) as usize
    }

    /// Makes the buffer hold the file up to position `need` (capped at the published end),
    /// reading `ahead` bytes more than it has when it has to read at all.
    fn fill(&mut self, need: u64, ahead: u64) -> Result<(), StoreError> {
        let have = self.span.start_pos + (self.out.len() - self.origin) as u64;
        let need = need.min(self.span.len);
        if need <= have {
            return Ok(());
        }
        let upto = need.max(have.saturating_add(ahead)).min(self.span.len);
        let old = self.out.len();
        self.out.resize(old + (upto - have) as usize, 0);
        self.span
            .file
            .read_exact_at(&mut self.out[old..], have)
            .map_err(StoreError::io(&self.span.path))
    }

    /// Size of the record at `pos`, checked to fit the published bytes.
    fn record_size(&self, pos: u64) -> Result<u64, StoreError> {
        let left = self.span.len.saturating_sub(pos);
        let start = self.at(pos).min(self.out.len());
        let size = peek_record_size(&self.out[start..]).ok_or(RecordError::Truncated {
            need: 4,
            have: left as usize,
        });
        let size = size.and_then(|size| {
            if size < RECORD_OVERHEAD {
                Err(RecordError::BadLength { len: size - 4 })
            } else if size as u64 > left {
                Err(RecordError::Truncated {
                    need: size,
                    have: left as usize,
                })
            } else {
                Ok(size as u64)
            }
        });
        size.map_err(|reason| self.corrupt(pos, reason))
    }

    /// Verifies the checksum and offset of the record at `pos`, already in the buffer.
    fn verify(&self, pos: u64, size: u64, offset: u64) -> Result<(), StoreError> {
        let start = self.at(pos);
        let rec = parse_record(&self.out[start..start + size as usize])
            .map_err(|reason| self.corrupt(pos, reason))?;
        if rec.offset != offset {
            return Err(StoreError::OffsetMismatch {
                file: self.span.path.to_path_buf(),
                position: pos,
                expected: offset,
                found: rec.offset,
            });
        }
        Ok(())
    }

    fn corrupt(&self, position: u64, reason: RecordError) -> StoreError {
        StoreError::Corrupt {
            file: self.span.path.to_path_buf(),
            position,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testutil::{batch, body, decode, os};
    use crate::store::{LogConfig, MqLog};

    #[test]
    fn reader_is_shareable() {
        fn shareable<T: Send + Sync + Clone + 'static>() {}
        shareable::<LogReader>();
    }

    #[test]
    fn bytes_after_counts_the_records_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes: 4_000,
            retention_bytes: None,
            retention_ms: None,
            copy: false,
        };
        let (mut log, reader) = MqLog::open(&os(), tmp.path(), config).unwrap();
        for from in (0..200).step_by(20) {
            log.append(&mut batch(from, from + 20), 1).unwrap();
        }
        log.publish();
        let total = reader.size_bytes();
        assert!(reader.segment_count() > 1);
        assert_eq!(reader.bytes_after(0), total);
        assert_eq!(reader.bytes_after(200), 0);
        let one = reader.read(199, None, 1, 1 << 20).unwrap().data.len() as u64;
        let last = reader.bytes_after(199);
        assert!(
            last >= one && last < one + INDEX_INTERVAL + one,
            "{last} {one}"
        );
        // Monotone: fewer bytes behind a later offset.
        let mut before = total;
        for from in (0..=200).step_by(10) {
            let now = reader.bytes_after(from);
            assert!(now <= before, "{from}: {now} > {before}");
            before = now;
        }
    }

    #[test]
    fn reads_run_concurrently_with_appends_and_retention() {
        const N: u64 = 5_000;
        let tmp = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes: 4_000,
            retention_bytes: Some(1 << 20),
            retention_ms: None,
            copy: false,
        };
        let (mut log, reader) = MqLog::open(&os(), tmp.path(), config).unwrap();
        let writer = std::thread::spawn(move || {
            for from in (0..N).step_by(25) {
                log.append(&mut batch(from, from + 25), 1).unwrap();
                log.publish();
                log.enforce_retention(2).unwrap();
            }
            log
        });
        let mut next = 0;
        let mut pos = None;
        let mut end = reader.subscribe_end();
        while next < N {
            let published = reader.end_offset();
            let got = reader.read(next, pos, 64, 4_096).unwrap();
            for (offset, data) in decode(&got) {
                assert_eq!((offset, data), (next, body(next)));
                assert!(offset < reader.end_offset().max(published));
                next += 1;
            }
            assert_eq!(got.next_offset, next);
            pos = Some(got.next_pos);
            if got.count == 0 {
                let _ = end.has_changed();
                end.borrow_and_update();
                std::thread::yield_now();
            }
        }
        let log = writer.join().unwrap();
        assert_eq!(log.next_offset(), N);
    }
}
