//! The log of one MQ, writer side.
//!
//! A log is a directory of segments named by their first offset. Records are appended to the
//! last (active) segment; when it reaches `segment_bytes` a new one starts. The writer decides
//! when readers see new records ([`MqLog::publish`]), so the broker can publish only after an
//! fsync when the durability contract asks for it, and retention deletes whole old segments.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockWriteGuard};

use bytes::Bytes;

use qbus_wire::protocol::record::{
    parse_record, peek_record_size, stamp_record, RecordError, RECORD_OVERHEAD,
};
use tokio::sync::watch;

use super::error::StoreError;
use super::fsio::FsRef;
use super::index::{wants_entry, Entry};
use super::reader::{LogReader, SegmentView, SharedView, View, Written};
use super::recovery::{list_segments, recover_segment};
use super::segment::Segment;
use super::tail::{Budget, Chunk, Tail};

/// Segment positions are 32-bit in the index.
const MAX_SEGMENT_BYTES: u64 = u32::MAX as u64;

/// Most bytes of records written and not yet published kept for a leader's followers (a
/// commit batch's worth, shared with the readers' cache: no copy): more at once, and the
/// followers read them once published.
const WRITTEN_BUDGET: Budget = Budget {
    bytes: 16 << 20,
    records: u64::MAX,
};

/// Size and retention settings of a log.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A new segment starts once the active one holds this many bytes (default 64 MiB).
    pub segment_bytes: u64,
    /// Oldest segments are deleted while the log is bigger than this.
    pub retention_bytes: Option<u64>,
    /// Segments whose newest record is older than this are deleted.
    pub retention_ms: Option<u64>,
    /// A follower's copy of another broker's log: appended records arrive stamped by their
    /// leader and are kept byte for byte (checksums verified, offsets checked to follow on),
    /// never stamped again.
    pub copy: bool,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            segment_bytes: 64 << 20,
            retention_bytes: None,
            retention_ms: None,
            copy: false,
        }
    }
}

/// The result of [`MqLog::append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Offset of the first record appended.
    pub first_offset: u64,
    /// Number of records appended.
    pub count: u64,
    /// Offset the next record will get.
    pub next_offset: u64,
}

/// The writer of one MQ's log. Not shared: one thread at a time appends, syncs and publishes.
#[derive(Debug)]
pub struct MqLog {
    fs: FsRef,
    dir: PathBuf,
    config: LogConfig,
    sealed: VecDeque<Segment>,
    active: Segment,
    total_bytes: u64,
    // A new segment file's directory entry is not durable until the directory is synced.
    dir_unsynced: bool,
    view: SharedView,
    end: watch::Sender<u64>,
    /// Appended records handed to [`MqLog::keep_for_readers`], shown with the next publish;
    /// until then only a leader's followers read them (`LogReader::read_written`).
    written: Arc<Written>,
    /// Set by [`MqLog::close`]: the files now belong to another writer.
    closed: bool,
}

impl MqLog {
    /// Opens or creates the log in `dir` and recovers it: indexes are loaded (rebuilt when
    /// missing or damaged) and a torn tail of the active segment is truncated. Everything
    /// recovered is published.
    pub fn open(
        fs: &FsRef,
        dir: &Path,
        config: LogConfig,
    ) -> Result<(MqLog, LogReader), StoreError> {
        fs.create_dir_all(dir).map_err(StoreError::io(dir))?;
        let bases = list_segments(&**fs, dir)?;
        let mut sealed = VecDeque::with_capacity(bases.len());
        let mut views = Vec::with_capacity(bases.len().max(1));
        let mut dir_unsynced = false;
        for (at, &base) in bases.iter().enumerate() {
            let (segment, view) =
                Segment::recovered(recover_segment(fs, dir, base, bases.get(at + 1).copied())?);
            sealed.push_back(segment);
            views.push(view);
        }
        let active = match sealed.pop_back() {
            Some(active) => active,
            None => {
                let mut active = Segment::create(fs, dir, 0)?;
                views.push(active.new_view());
                dir_unsynced = true;
                active
            }
        };
        let total_bytes = sealed.iter().map(Segment::size).sum::<u64>() + active.size();
        let first_offset = sealed.front().unwrap_or(&active).base();
        let end_offset = active.next_offset();
        let view = Arc::new(RwLock::new(View {
            segments: views,
            first_offset,
            end_offset,
            size_bytes: total_bytes,
            tail: Tail::default(),
        }));
        let (end, end_rx) = watch::channel(end_offset);
        let written = Arc::new(Written {
            tail: Mutex::new(Tail::with_budget(WRITTEN_BUDGET)),
            end: watch::channel(end_offset).0,
        });
        tracing::debug!(
            dir = %dir.display(),
            first_offset,
            end_offset,
            segments = sealed.len() + 1,
            "log opened"
        );
        let reader = LogReader::new(Arc::clone(&view), end_rx, Arc::clone(&written));
        let log = MqLog {
            fs: fs.clone(),
            dir: dir.to_path_buf(),
            config,
            sealed,
            active,
            total_bytes,
            dir_unsynced,
            view,
            end,
            written,
            closed: false,
        };
        Ok((log, reader))
    }

    /// Creates the files of an empty log in `dir` (its first segment), for a new MQ: every
    /// MQ directory then holds a segment, so reopening one never has to create files (which
    /// a full disk would refuse). The caller syncs `dir`.
    ///
    /// `first` is the offset of its first record: 0, but for a follower's copy of a leader
    /// whose retention already deleted the offsets below it.
    pub fn create_at(fs: &FsRef, dir: &Path, first: u64) -> Result<(), StoreError> {
        fs.create_dir_all(dir).map_err(StoreError::io(dir))?;
        Segment::create(fs, dir, first).map(drop)
    }

    /// Appends `records` (one or more whole records back to back): stamps them in place with
    /// consecutive offsets and `now_ms`, starts a new segment first if the active one is full,
    /// and writes them with one write. On return they are in the file (they survive a
    /// process kill) but not on disk until [`sync`](Self::sync), and invisible to readers
    /// until [`publish`](Self::publish).
    pub fn append(&mut self, records: &mut [u8], now_ms: u64) -> Result<Appended, StoreError> {
        if self.closed {
            return Err(StoreError::ReadOnly {
                mq: self.dir.display().to_string(),
            });
        }
        let first_offset = self.next_offset();
        let bytes = records.len() as u64;
        if bytes == 0 {
            return Ok(Appended {
                first_offset,
                count: 0,
                next_offset: first_offset,
            });
        }
        if bytes > MAX_SEGMENT_BYTES {
            return Err(StoreError::BatchTooLarge {
                bytes: records.len(),
            });
        }
        let roll = self.needs_roll(bytes);
        let (base, start, last_entry) = if roll {
            (first_offset, 0, None)
        } else {
            let active = &self.active;
            (active.base(), active.size(), active.last_index_pos())
        };
        let (count, entries) = if self.config.copy {
            verify_copied(records, base, first_offset, start, last_entry)
        } else {
            stamp(records, base, first_offset, start, last_entry, now_ms)
        }
        .map_err(|reason| StoreError::InvalidBatch { reason })?;
        if roll {
            self.roll()?;
        }
        self.active.append(records, count, entries, now_ms)?;
        self.total_bytes += bytes;
        Ok(Appended {
            first_offset,
            count,
            next_offset: first_offset + count,
        })
    }

    /// Whether a batch of `bytes` must go to a new segment.
    fn needs_roll(&self, bytes: u64) -> bool {
        let active = &self.active;
        if active.size() == 0 {
            return false;
        }
        let records_at_most = bytes / RECORD_OVERHEAD as u64;
        active.size() >= self.config.segment_bytes
            || active.size() + bytes > MAX_SEGMENT_BYTES
            || active.next_offset() - active.base() + records_at_most > u64::from(u32::MAX)
    }

    fn roll(&mut self) -> Result<(), StoreError> {
        let next = Segment::create(&self.fs, &self.dir, self.next_offset())?;
        let mut old = std::mem::replace(&mut self.active, next);
        old.seal();
        tracing::debug!(
            dir = %self.dir.display(),
            base = self.active.base(),
            sealed = old.base(),
            "new segment"
        );
        self.sealed.push_back(old);
        self.dir_unsynced = true;
        Ok(())
    }

    /// Flushes to disk (fdatasync) every segment written since the last sync, and the
    /// directory when segments were created (once per new segment: the only directory sync
    /// on the append path).
    pub fn sync(&mut self) -> Result<(), StoreError> {
        // Only the newest segments can have unsynced writes.
        let unsynced = self.sealed.iter_mut().rev();
        for segment in unsynced.take_while(|s| s.is_unsynced()) {
            segment.sync()?;
        }
        if self.active.is_unsynced() {
            self.active.sync()?;
        }
        if self.dir_unsynced {
            self.sync_dir()?;
            self.dir_unsynced = false;
        }
        Ok(())
    }

    /// Flushes every segment and the directory, whether written by this writer or found
    /// on open: a log recovered after a process kill may hold records only in the page
    /// cache. A leader syncs so before it starts an epoch (`store::epochs`).
    pub fn sync_recovered(&mut self) -> Result<(), StoreError> {
        for segment in self.sealed.iter_mut() {
            segment.sync()?;
        }
        self.active.sync()?;
        self.sync_dir()?;
        self.dir_unsynced = false;
        Ok(())
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        self.fs
            .sync_dir(&self.dir)
            .map_err(StoreError::io(&self.dir))
    }

    fn view(&self) -> RwLockWriteGuard<'_, View> {
        self.view.write().expect("log view lock poisoned")
    }

    /// Keeps `records`, just appended at `first` (`count` of them, stamped), in memory so
    /// readers of the newest records need not touch the files once they are published.
    pub fn keep_for_readers(&mut self, first: u64, count: u64, records: Bytes) {
        self.written.tail().push(Chunk {
            first,
            count,
            data: records,
        });
        self.written.end.send_replace(first + count);
    }

    /// Makes every appended record visible to readers and wakes the end watchers.
    pub fn publish(&mut self) {
        let unpublished = self
            .sealed
            .iter()
            .rev()
            .take_while(|s| s.is_unpublished())
            .count();
        if unpublished == 0 && !self.active.is_unpublished() {
            return;
        }
        let end = self.next_offset();
        let mut view = self.view.write().expect("log view lock poisoned");
        let from = self.sealed.len() - unpublished;
        let segments = self
            .sealed
            .range_mut(from..)
            .chain(std::iter::once(&mut self.active));
        for segment in segments {
            match view.segments.last_mut() {
                Some(known) if known.base == segment.base() => segment.publish_into(known),
                _ => view.segments.push(segment.new_view()),
            }
        }
        view.end_offset = end;
        view.size_bytes = self.total_bytes;
        for chunk in self.written.tail().drain() {
            view.tail.push(chunk);
        }
        drop(view);
        self.written.end.send_if_modified(|written| {
            let moved = *written < end;
            *written = (*written).max(end);
            moved
        });
        self.end.send_replace(end);
    }

    /// Deletes whole oldest segments (never the active one, nor one readers have not been
    /// shown yet) while the log is bigger than `retention_bytes` or the segment's newest
    /// record is older than `retention_ms`. Returns the new first offset.
    pub fn enforce_retention(&mut self, now_ms: u64) -> Result<u64, StoreError> {
        let mut remaining = self.total_bytes;
        let mut doomed = 0;
        for segment in &self.sealed {
            let too_big = self
                .config
                .retention_bytes
                .is_some_and(|max| remaining > max);
            let too_old = self.config.retention_ms.is_some_and(|max| {
                segment
                    .last_timestamp()
                    .is_none_or(|ts| now_ms.saturating_sub(ts) > max)
            });
            if segment.is_unpublished() || !(too_big || too_old) {
                break;
            }
            remaining -= segment.size();
            doomed += 1;
        }
        let first_kept = self.sealed.get(doomed).unwrap_or(&self.active).base();
        if doomed == 0 {
            return Ok(first_kept);
        }
        let unseen: Vec<SegmentView> = {
            let mut view = self.view();
            let gone = view.segments.partition_point(|s| s.base < first_kept);
            let unseen: Vec<SegmentView> = view.segments.drain(..gone).collect();
            view.first_offset = first_kept;
            view.size_bytes -= unseen.iter().map(|s| s.len).sum::<u64>();
            unseen
        };
        drop(unseen);
        let mut result = Ok(first_kept);
        for segment in self.sealed.drain(..doomed) {
            self.total_bytes -= segment.size();
            tracing::info!(
                dir = %self.dir.display(),
                base = segment.base(),
                end = segment.next_offset(),
                bytes = segment.size(),
                "retention: segment deleted"
            );
            if let Err(e) = segment.delete_files(&*self.fs) {
                // Keep deleting the others; the leftover file is an old segment to the next
                // open, deleted again by retention.
                tracing::warn!(error = %e, "retention: cannot delete segment files");
                result = result.and(Err(e));
            }
        }
        // Nobody waits for retention, but a deletion a crash undid would bring old
        // segments back and shift the first offset backwards: one directory sync per
        // retention pass that deleted something.
        result.and(self.sync_dir().map(|()| first_kept))
    }

    /// Refuses every later append: the log's files are handed to another writer (a
    /// follower's copy adopted as an MQ of its broker's own).
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// The first offset of the oldest segment that may hold a record stamped at or after
    /// `ms` (segments whose newest record is older are passed over).
    pub fn first_offset_since(&self, ms: u64) -> u64 {
        self.sealed
            .iter()
            .find(|segment| segment.last_timestamp().is_none_or(|ts| ts >= ms))
            .unwrap_or(&self.active)
            .base()
    }

    /// Offset the next appended record will get.
    pub fn next_offset(&self) -> u64 {
        self.active.next_offset()
    }
}

/// Checks that `records` are whole records back to back and stamps them with consecutive
/// offsets from `first_offset`, as if written at file position `start` of the segment based
/// at `base`. Returns their count and the index entries they are due.
fn stamp(
    records: &mut [u8],
    base: u64,
    first_offset: u64,
    start: u64,
    last_entry: Option<u32>,
    now_ms: u64,
) -> Result<(u64, Vec<Entry>), RecordError> {
    walk(
        records,
        base,
        first_offset,
        start,
        last_entry,
        |record, offset| {
            stamp_record(record, offset, now_ms);
            Ok(())
        },
    )
}

/// Checks that `records`, copied from a leader, are whole and intact, and that their
/// offsets run on from `first_offset`: a copy holds the leader's records at the leader's
/// offsets or nothing.
fn verify_copied(
    records: &mut [u8],
    base: u64,
    first_offset: u64,
    start: u64,
    last_entry: Option<u32>,
) -> Result<(u64, Vec<Entry>), RecordError> {
    walk(
        records,
        base,
        first_offset,
        start,
        last_entry,
        |record, offset| {
            let parsed = parse_record(record)?;
            if parsed.offset != offset {
                return Err(RecordError::OutOfOrder {
                    expected: offset,
                    found: parsed.offset,
                });
            }
            Ok(())
        },
    )
}

/// Goes over the whole records of `records`, handing each with the offset it must have to
/// `each`, and returns their count and the index entries they are due.
fn walk(
    records: &mut [u8],
    base: u64,
    first_offset: u64,
    start: u64,
    mut last_entry: Option<u32>,
    mut each: impl FnMut(&mut [u8], u64) -> Result<(), RecordError>,
) -> Result<(u64, Vec<Entry>), RecordError> {
    let mut entries = Vec::new();
    let mut at = 0;
    let mut offset = first_offset;
    while at < records.len() {
        let have = records.len() - at;
        let size =
            peek_record_size(&records[at..]).ok_or(RecordError::Truncated { need: 4, have })?;
        if size < RECORD_OVERHEAD {
            return Err(RecordError::BadLength { len: size - 4 });
        }
        if size > have {
            return Err(RecordError::Truncated { need: size, have });
        }
        each(&mut records[at..at + size], offset)?;
        let pos = start + at as u64;
        if wants_entry(last_entry, pos) {
            // The caller keeps segments within 32-bit positions and relative offsets.
            let entry = ((offset - base) as u32, pos as u32);
            entries.push(entry);
            last_entry = Some(entry.1);
        }
        at += size;
        offset += 1;
    }
    Ok((offset - first_offset, entries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testutil::{batch, body, config, decode, os};
    use crate::store::ReadPos;

    /// Appends records `0..n` in batches of 1 to 9 records, then publishes.
    fn fill(log: &mut MqLog, n: u64) {
        let mut next = log.next_offset();
        let mut size = 1;
        while next < n {
            let to = (next + size).min(n);
            let mut records = batch(next, to);
            let appended = log.append(&mut records, 1_000 + next).unwrap();
            assert_eq!(appended.first_offset, next);
            assert_eq!(appended.count, to - next);
            next = appended.next_offset;
            size = size % 9 + 1;
        }
        log.publish();
    }

    /// Reads everything from `from` with batches of `max_records`, following the hints.
    fn read_all(
        reader: &LogReader,
        from: u64,
        max_records: usize,
        hints: bool,
    ) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        let mut next = from;
        let mut pos: Option<ReadPos> = None;
        loop {
            let got = reader.read(next, pos, max_records, 1 << 20).unwrap();
            if got.count == 0 {
                assert_eq!(got.next_offset, next.max(reader.first_offset()));
                return out;
            }
            assert!(got.count <= max_records);
            out.extend(decode(&got));
            next = got.next_offset;
            pos = hints.then_some(got.next_pos);
        }
    }

    fn expected(from: u64, to: u64) -> Vec<(u64, Vec<u8>)> {
        (from..to).map(|n| (n, body(n))).collect()
    }

    #[test]
    fn a_copy_keeps_its_leaders_records_byte_for_byte() {
        let (leader_dir, copy_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (mut leader, leader_reader) =
            MqLog::open(&os(), leader_dir.path(), config(2_000)).unwrap();
        fill(&mut leader, 300);
        let copying = LogConfig {
            copy: true,
            ..config(2_000)
        };
        MqLog::create_at(&os(), copy_dir.path(), 100).unwrap();
        let (mut copy, copy_reader) = MqLog::open(&os(), copy_dir.path(), copying).unwrap();
        assert_eq!(copy.next_offset(), 100);
        let mut at = 100;
        while at < 300 {
            let got = leader_reader.read(at, None, 17, 1 << 20).unwrap();
            let mut bytes = got.data.to_vec();
            // Appended later, at another time: nothing is stamped again.
            copy.append(&mut bytes, 9_999_999).unwrap();
            assert_eq!(bytes, got.data.to_vec());
            at = got.next_offset;
        }
        copy.sync().unwrap();
        copy.publish();
        let from_leader = leader_reader.read(100, None, 1_000, 1 << 20).unwrap();
        let from_copy = copy_reader.read(100, None, 1_000, 1 << 20).unwrap();
        assert_eq!(from_copy.count, 200);
        assert_eq!(from_copy.data, from_leader.data);

        // Records that do not follow on, or are damaged, are refused whole.
        let mut again = leader_reader
            .read(250, None, 3, 1 << 20)
            .unwrap()
            .data
            .to_vec();
        let refused = copy.append(&mut again, 0).unwrap_err();
        assert!(
            matches!(refused, StoreError::InvalidBatch { .. }),
            "{refused}"
        );
        fill(&mut leader, 301);
        let mut next = leader_reader
            .read(300, None, 1, 1 << 20)
            .unwrap()
            .data
            .to_vec();
        next[30] ^= 1;
        let refused = copy.append(&mut next, 0).unwrap_err();
        assert!(refused.to_string().contains("checksum"), "{refused}");
        assert_eq!(copy.next_offset(), 300);
    }

    #[test]
    fn round_trip_across_segments() {
        for segment_bytes in [1_000, 20_000, 1 << 20] {
            let tmp = tempfile::tempdir().unwrap();
            let (mut log, reader) = MqLog::open(&os(), tmp.path(), config(segment_bytes)).unwrap();
            fill(&mut log, 2_000);
            assert_eq!((reader.first_offset(), reader.end_offset()), (0, 2_000));
            if segment_bytes < 100_000 {
                assert!(reader.segment_count() > 3, "{}", reader.segment_count());
            }
            let on_disk: u64 = std::fs::read_dir(tmp.path())
                .unwrap()
                .map(|e| e.unwrap())
                .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                .map(|e| e.metadata().unwrap().len())
                .sum();
            assert_eq!(reader.size_bytes(), on_disk);
            for (max_records, hints) in [(1, true), (7, true), (7, false), (100_000, true)] {
                assert_eq!(read_all(&reader, 0, max_records, hints), expected(0, 2_000));
            }
            // Every offset found through the index alone.
            for from in (0..2_000).step_by(13) {
                let got = reader.read(from, None, 3, 1 << 20).unwrap();
                assert_eq!(decode(&got), expected(from, from + 3));
            }
        }
    }

    #[test]
    fn recent_records_are_read_from_memory_only_once_published() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, reader) = MqLog::open(&os(), tmp.path(), config(1 << 20)).unwrap();
        for (from, to) in [(0, 10), (10, 25)] {
            let mut records = batch(from, to);
            let appended = log.append(&mut records, 7).unwrap();
            log.keep_for_readers(appended.first_offset, appended.count, records.into());
        }
        assert!(
            reader.read_recent(0, 100, 1 << 20).is_none(),
            "not published yet"
        );
        log.publish();
        let recent = reader.read_recent(12, 100, 1 << 20).unwrap();
        let from_disk = reader.read(12, None, recent.count, 1 << 20).unwrap();
        assert_eq!(decode(&recent), decode(&from_disk));
        assert_eq!((recent.count, recent.next_offset), (13, 25));
        assert!(
            reader.read_recent(25, 1, 1).is_none(),
            "nothing past the end"
        );
    }

    #[test]
    fn one_read_spans_segments_up_to_the_end() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, reader) = MqLog::open(&os(), tmp.path(), config(500)).unwrap();
        fill(&mut log, 300);
        let got = reader.read(5, None, 10_000, 1 << 20).unwrap();
        assert_eq!(decode(&got), expected(5, 300));
        assert_eq!(got.next_offset, 300);
        // Nothing more: the hint points at the end and stays valid after more appends.
        let empty = reader.read(300, Some(got.next_pos), 10, 1 << 20).unwrap();
        assert_eq!((empty.count, empty.next_offset), (0, 300));
        fill(&mut log, 320);
        let more = reader
            .read(300, Some(empty.next_pos), 100, 1 << 20)
            .unwrap();
        assert_eq!(decode(&more), expected(300, 320));
    }

    #[test]
    fn limits_on_records_and_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, reader) = MqLog::open(&os(), tmp.path(), config(1 << 20)).unwrap();
        fill(&mut log, 100);
        let one = reader.read(10, None, 100, 1).unwrap();
        assert_eq!(decode(&one), expected(10, 11));
        let three_bytes = batch(10, 13).len();
        let three = reader.read(10, None, 100, three_bytes).unwrap();
        assert_eq!(decode(&three), expected(10, 13));
        let almost = reader.read(10, None, 100, three_bytes - 1).unwrap();
        assert_eq!(almost.count, 2);
        let four = reader.read(10, None, 4, 1 << 20).unwrap();
        assert_eq!(decode(&four), expected(10, 14));
        let none = reader.read(10, None, 0, 1 << 20).unwrap();
        assert_eq!((none.count, none.next_offset), (0, 10));

        // A record bigger than max_bytes still comes out whole.
        let mut big = Vec::new();
        qbus_wire::protocol::record::encode_record(&mut big, 0, 0, None, None, &[7u8; 100_000])
            .unwrap();
        log.append(&mut big, 5).unwrap();
        log.publish();
        let got = reader.read(100, None, 10, 100).unwrap();
        assert_eq!(got.count, 1);
        assert_eq!(got.data.len(), big.len());
    }

    #[test]
    fn records_are_invisible_until_published() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, reader) = MqLog::open(&os(), tmp.path(), config(300)).unwrap();
        let mut end = reader.subscribe_end();
        let mut records = batch(0, 20);
        let appended = log.append(&mut records, 1).unwrap();
        assert_eq!((appended.first_offset, appended.next_offset), (0, 20));
        assert_eq!(log.next_offset(), 20);
        assert_eq!(reader.end_offset(), 0);
        assert_eq!(reader.read(0, None, 100, 1 << 20).unwrap().count, 0);
        assert!(!end.has_changed().unwrap());
        log.sync().unwrap();
        log.publish();
        assert!(end.has_changed().unwrap());
        assert_eq!(*end.borrow_and_update(), 20);
        assert_eq!(reader.read(0, None, 100, 1 << 20).unwrap().count, 20);
        // Rolling happens at append time; the new segment is hidden until publish too.
        let segments = reader.segment_count();
        log.append(&mut batch(20, 21), 2).unwrap();
        assert_eq!(reader.segment_count(), segments);
        assert_eq!(reader.read(20, None, 100, 1 << 20).unwrap().count, 0);
        log.publish();
        assert_eq!(reader.segment_count(), segments + 1);
        assert_eq!(
            decode(&reader.read(20, None, 100, 1 << 20).unwrap()),
            expected(20, 21)
        );
    }

    #[test]
    fn reopen_after_clean_close() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, reader) = MqLog::open(&os(), tmp.path(), config(2_000)).unwrap();
        fill(&mut log, 500);
        log.sync().unwrap();
        let segments = reader.segment_count();
        drop((log, reader));

        let (mut log, reader) = MqLog::open(&os(), tmp.path(), config(2_000)).unwrap();
        assert_eq!(
            (
                reader.first_offset(),
                reader.end_offset(),
                log.next_offset()
            ),
            (0, 500, 500)
        );
        assert_eq!(reader.segment_count(), segments);
        assert_eq!(read_all(&reader, 0, 50, true), expected(0, 500));
        fill(&mut log, 600);
        assert_eq!(read_all(&reader, 450, 50, true), expected(450, 600));
    }

    #[test]
    fn retention_by_bytes_deletes_whole_oldest_segments() {
        let tmp = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes: 1_000,
            retention_bytes: Some(3_000),
            retention_ms: None,
            copy: false,
        };
        let (mut log, reader) = MqLog::open(&os(), tmp.path(), config).unwrap();
        fill(&mut log, 400);
        let before = reader.segment_count();
        let first = log.enforce_retention(0).unwrap();
        assert!(first > 0);
        assert_eq!(reader.first_offset(), first);
        assert!(reader.segment_count() < before);
        assert!(reader.size_bytes() <= 3_000, "{}", reader.size_bytes());
        // Only whole segments went: the first kept offset starts a segment file.
        assert!(crate::store::segment::log_path(tmp.path(), first).exists());
        assert!(!crate::store::segment::log_path(tmp.path(), 0).exists());
        // Reading from before the first offset starts at the first offset.
        let got = reader.read(0, None, 5, 1 << 20).unwrap();
        assert_eq!(decode(&got), expected(first, first + 5));
        assert_eq!(read_all(&reader, 0, 1_000, true), expected(first, 400));
        // Idempotent.
        assert_eq!(log.enforce_retention(0).unwrap(), first);
    }

    #[test]
    fn retention_by_age_never_deletes_the_active_segment() {
        let tmp = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes: 1_000,
            retention_bytes: None,
            retention_ms: Some(100),
            copy: false,
        };
        let (mut log, reader) = MqLog::open(&os(), tmp.path(), config).unwrap();
        // A batch's timestamp is 1_000 + its first offset: batches from 200 on are recent at
        // now = 1_300, and a batch holds at most 9 records.
        fill(&mut log, 400);
        let first = log.enforce_retention(1_300).unwrap();
        assert!(first > 0 && first < 200 + 9, "{first}");
        let got = reader.read(0, None, 1, 1 << 20).unwrap();
        let rec = qbus_wire::protocol::record::parse_record(&got.data).unwrap();
        assert_eq!(rec.offset, first);
        // The segment holding `first` has a newer last record than the cut-off.
        assert!(reader.read(first, None, 1000, 1 << 20).unwrap().count > 0);
        // Everything is old now, but the active segment stays.
        let last = log.enforce_retention(1_000_000).unwrap();
        assert_eq!(reader.segment_count(), 1);
        assert_eq!(read_all(&reader, 0, 100, true), expected(last, 400));
        assert_eq!(log.next_offset(), 400);
    }

    #[test]
    fn malformed_batches_are_refused_without_side_effects() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, reader) = MqLog::open(&os(), tmp.path(), config(500)).unwrap();
        let mut records = batch(0, 3);
        records.truncate(records.len() - 1);
        let err = log.append(&mut records, 0).unwrap_err();
        assert!(matches!(err, StoreError::InvalidBatch { .. }), "{err:?}");
        let mut tiny = vec![0, 0, 0, 4, 1, 2, 3, 4];
        assert!(log.append(&mut tiny, 0).is_err());
        assert_eq!(log.next_offset(), 0);
        log.publish();
        assert_eq!(reader.size_bytes(), 0);
    }
}
