//! The log of one MQ, writer side.
//!
//! A log is a directory of segments named by their first offset. Records are appended to the
//! last (active) segment; when it reaches `segment_bytes` a new one starts. The writer decides
//! when readers see new records ([`MqLog::publish`]), so the broker can publish only after an
//! fsync when the durability contract asks for it, and retention deletes whole old segments.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockWriteGuard};

use qbus_client::protocol::record::{peek_record_size, stamp_record, RecordError, RECORD_OVERHEAD};
use tokio::sync::watch;

use super::index::{wants_entry, Entry};
use super::reader::{LogReader, SegmentView, SharedView, View};
use super::recovery::{list_segments, recover_segment};
use super::segment::Segment;
use super::StoreError;

/// Segment positions are 32-bit in the index.
const MAX_SEGMENT_BYTES: u64 = u32::MAX as u64;

/// Size and retention settings of a log.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A new segment starts once the active one holds this many bytes (default 64 MiB).
    pub segment_bytes: u64,
    /// Oldest segments are deleted while the log is bigger than this.
    pub retention_bytes: Option<u64>,
    /// Segments whose newest record is older than this are deleted.
    pub retention_ms: Option<u64>,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            segment_bytes: 64 << 20,
            retention_bytes: None,
            retention_ms: None,
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
    dir: PathBuf,
    config: LogConfig,
    sealed: VecDeque<Segment>,
    active: Segment,
    total_bytes: u64,
    // A new segment file's directory entry is not durable until the directory is synced.
    dir_unsynced: bool,
    view: SharedView,
    end: watch::Sender<u64>,
}

impl MqLog {
    /// Opens or creates the log in `dir` and recovers it: indexes are loaded (rebuilt when
    /// missing or damaged) and a torn tail of the active segment is truncated. Everything
    /// recovered is published.
    pub fn open(dir: &Path, config: LogConfig) -> Result<(MqLog, LogReader), StoreError> {
        std::fs::create_dir_all(dir).map_err(StoreError::io(dir))?;
        let bases = list_segments(dir)?;
        let mut sealed = VecDeque::with_capacity(bases.len());
        let mut views = Vec::with_capacity(bases.len().max(1));
        let mut dir_unsynced = false;
        for (at, &base) in bases.iter().enumerate() {
            let (segment, view) =
                Segment::recovered(recover_segment(dir, base, bases.get(at + 1).copied())?);
            sealed.push_back(segment);
            views.push(view);
        }
        let active = match sealed.pop_back() {
            Some(active) => active,
            None => {
                let mut active = Segment::create(dir, 0)?;
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
        }));
        let (end, end_rx) = watch::channel(end_offset);
        tracing::debug!(
            dir = %dir.display(),
            first_offset,
            end_offset,
            segments = sealed.len() + 1,
            "log opened"
        );
        let reader = LogReader::new(Arc::clone(&view), end_rx);
        let log = MqLog {
            dir: dir.to_path_buf(),
            config,
            sealed,
            active,
            total_bytes,
            dir_unsynced,
            view,
            end,
        };
        Ok((log, reader))
    }

    /// Appends `records` (one or more whole records back to back): stamps them in place with
    /// consecutive offsets and `now_ms`, starts a new segment first if the active one is full,
    /// and writes them with one write. On return they are in the file (they survive a
    /// process kill) but not on disk until [`sync`](Self::sync), and invisible to readers
    /// until [`publish`](Self::publish).
    pub fn append(&mut self, records: &mut [u8], now_ms: u64) -> Result<Appended, StoreError> {
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
        let (count, entries) = stamp(records, base, first_offset, start, last_entry, now_ms)
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
        let next = Segment::create(&self.dir, self.next_offset())?;
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
    /// directory when segments were created.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        // Only the newest segments can have unsynced writes.
        let unsynced = self.sealed.iter_mut().rev().take_while(|s| s.is_unsynced());
        let mut unsynced: Vec<&mut Segment> = unsynced.collect();
        unsynced.reverse();
        for segment in unsynced {
            segment.sync()?;
        }
        if self.active.is_unsynced() {
            self.active.sync()?;
        }
        if self.dir_unsynced {
            File::open(&self.dir)
                .and_then(|dir| dir.sync_all())
                .map_err(StoreError::io(&self.dir))?;
            self.dir_unsynced = false;
        }
        Ok(())
    }

    fn view(&self) -> RwLockWriteGuard<'_, View> {
        self.view.write().expect("log view lock poisoned")
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
        drop(view);
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
            if let Err(e) = segment.delete_files() {
                // Keep deleting the others; the leftover file is an old segment to the next
                // open, deleted again by retention.
                tracing::warn!(error = %e, "retention: cannot delete segment files");
                result = result.and(Err(e));
            }
        }
        result
    }

    /// Deletes the log: its directory and everything in it. Readers see an empty log from
    /// now on and end watchers are closed.
    pub fn destroy(self) -> Result<(), StoreError> {
        {
            let mut view = self.view();
            view.segments.clear();
            view.first_offset = view.end_offset;
            view.size_bytes = 0;
        }
        let dir = self.dir.clone();
        drop(self);
        std::fs::remove_dir_all(&dir).map_err(StoreError::io(&dir))
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
    mut last_entry: Option<u32>,
    now_ms: u64,
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
        stamp_record(&mut records[at..at + size], offset, now_ms);
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
