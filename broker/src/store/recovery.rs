//! Reopening a log: what is on disk becomes a list of verified segments.
//!
//! Reopen time must not grow with the amount of data, so sealed segments are not scanned:
//! their index is loaded and only the records after its last entry (a few KiB) are verified,
//! which also proves the index and the end of the file agree. The active segment gets the
//! same treatment, and a torn tail (a write cut short by a crash) is truncated there. Any
//! damage triggers a full scan of that one segment first, so a bad index entry can never
//! make recovery cut off good records. Missing or damaged index files are rebuilt.

use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use qbus_client::protocol::record::{parse_record, peek_record_size, RecordError, RECORD_OVERHEAD};

use super::index::{wants_entry, Entry, IndexFile, OffsetIndex};
use super::segment::{index_path, log_path, open_log_file, parse_log_name, Recovered};
use super::StoreError;

/// Bytes read per call while scanning.
const SCAN_CHUNK: usize = 1 << 20;

/// Base offsets of the segments in `dir`, oldest first.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let mut bases = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(StoreError::io(dir))? {
        let entry = entry.map_err(StoreError::io(dir))?;
        if let Some(base) = entry.file_name().to_str().and_then(parse_log_name) {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// Recovers the segment starting at `base`. `next_base` is the base of the following
/// segment, `None` for the active (last) one.
pub(crate) fn recover_segment(
    dir: &Path,
    base: u64,
    next_base: Option<u64>,
) -> Result<Recovered, StoreError> {
    let log_path = log_path(dir, base);
    let file = open_log_file(&log_path, false)?;
    let len = file.metadata().map_err(StoreError::io(&log_path))?.len();
    let idx_path = index_path(dir, base);
    let raw = match std::fs::read(&idx_path) {
        Ok(raw) => raw,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(StoreError::io(&idx_path)(e)),
    };
    let (mut index, mut rewrite) = OffsetIndex::decode(&raw, len);
    rewrite |= raw.is_empty() && len > 0;

    let tail = Tail {
        file: &file,
        path: &log_path,
        len,
        base,
        limit: next_base,
    };
    let mut scan = tail.scan(index.last())?;
    if scan.damage.is_some() && index.len() > 1 {
        // The log may be fine and the index entry wrong: find out from the start.
        index = OffsetIndex::default();
        scan = tail.scan(None)?;
        rewrite = true;
    }
    if let Some((position, damage)) = &scan.damage {
        tracing::warn!(
            file = %log_path.display(),
            position,
            reason = %damage,
            sealed = next_base.is_some(),
            "torn tail: truncating the segment at the first invalid record"
        );
        file.set_len(*position).map_err(StoreError::io(&log_path))?;
        file.sync_data().map_err(StoreError::io(&log_path))?;
        rewrite |= index.truncate_to(*position);
    }
    if !scan.entries.is_empty() {
        index.extend(&scan.entries);
        rewrite = true;
    }
    if let Some(next_base) = next_base.filter(|&next| scan.next_offset < next) {
        tracing::warn!(
            file = %log_path.display(),
            first = scan.next_offset,
            end = next_base,
            "records lost before the next segment; readers skip the gap"
        );
    }
    let index_file = IndexFile::open(idx_path, &index, rewrite, next_base.is_none())?;
    Ok(Recovered {
        base,
        next_offset: scan.next_offset,
        size: scan.valid_len,
        last_timestamp: scan.last_timestamp,
        file,
        log_path,
        index,
        index_file,
    })
}

/// Why recovery stops trusting a segment at some position.
#[derive(Debug)]
enum Damage {
    Record(RecordError),
    Offset { expected: u64, found: u64 },
    PastNextSegment { next_base: u64 },
    TooLarge,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damage::Record(e) => e.fmt(f),
            Damage::Offset { expected, found } => {
                write!(f, "record has offset {found}, expected {expected}")
            }
            Damage::PastNextSegment { next_base } => {
                write!(
                    f,
                    "records continue past the next segment's base {next_base}"
                )
            }
            Damage::TooLarge => f.write_str("segment exceeds 32-bit positions"),
        }
    }
}

/// The outcome of verifying a segment from some record to its end.
struct Scan {
    valid_len: u64,
    next_offset: u64,
    last_timestamp: Option<u64>,
    /// Index entries due for the records verified.
    entries: Vec<Entry>,
    /// Where and why the valid part ends, if before the end of the file.
    damage: Option<(u64, Damage)>,
}

/// The part of a segment file to verify.
struct Tail<'a> {
    file: &'a File,
    path: &'a Path,
    len: u64,
    base: u64,
    limit: Option<u64>,
}

impl Tail<'_> {
    /// Verifies every record from `start` (an index entry known to be a record start, or the
    /// segment start) to the end of the file.
    fn scan(&self, start: Option<Entry>) -> Result<Scan, StoreError> {
        let (rel, pos) = start.unwrap_or((0, 0));
        let mut last_entry = start.map(|(_, pos)| pos);
        let mut chunk = Chunk {
            file: self.file,
            path: self.path,
            buf: Vec::new(),
            at: 0,
        };
        let mut scan = Scan {
            valid_len: u64::from(pos),
            next_offset: self.base + u64::from(rel),
            last_timestamp: None,
            entries: Vec::new(),
            damage: None,
        };
        while scan.valid_len < self.len {
            match self.check(&mut chunk, scan.valid_len, scan.next_offset)? {
                Ok((size, timestamp)) => {
                    let p = scan.valid_len;
                    if wants_entry(last_entry, p) {
                        // `check` proved both fit in 32 bits.
                        let entry = ((scan.next_offset - self.base) as u32, p as u32);
                        scan.entries.push(entry);
                        last_entry = Some(entry.1);
                    }
                    scan.valid_len += size;
                    scan.next_offset += 1;
                    scan.last_timestamp = Some(timestamp);
                }
                Err(damage) => {
                    scan.damage = Some((scan.valid_len, damage));
                    break;
                }
            }
        }
        Ok(scan)
    }

    /// Verifies the record at `pos` that should have `offset`: its size and timestamp, or
    /// what is wrong with it.
    fn check(
        &self,
        chunk: &mut Chunk<'_>,
        pos: u64,
        offset: u64,
    ) -> Result<Result<(u64, u64), Damage>, StoreError> {
        if let Some(next_base) = self.limit.filter(|&next| offset >= next) {
            return Ok(Err(Damage::PastNextSegment { next_base }));
        }
        if u32::try_from(pos).is_err() || u32::try_from(offset - self.base).is_err() {
            return Ok(Err(Damage::TooLarge));
        }
        let left = (self.len - pos) as usize;
        let Some(size) = peek_record_size(chunk.get(pos, 4.min(left), self.len)?) else {
            return Ok(Err(Damage::Record(RecordError::Truncated {
                need: 4,
                have: left,
            })));
        };
        if size < RECORD_OVERHEAD {
            return Ok(Err(Damage::Record(RecordError::BadLength {
                len: size - 4,
            })));
        }
        if size > left {
            return Ok(Err(Damage::Record(RecordError::Truncated {
                need: size,
                have: left,
            })));
        }
        match parse_record(chunk.get(pos, size, self.len)?) {
            Err(e) => Ok(Err(Damage::Record(e))),
            Ok(rec) if rec.offset != offset => Ok(Err(Damage::Offset {
                expected: offset,
                found: rec.offset,
            })),
            Ok(rec) => Ok(Ok((size as u64, rec.timestamp_ms))),
        }
    }
}

/// A window of a file read in large chunks.
struct Chunk<'a> {
    file: &'a File,
    path: &'a Path,
    buf: Vec<u8>,
    // File position of `buf[0]`.
    at: u64,
}

impl Chunk<'_> {
    /// The `n` bytes at `pos`, which the caller checked lie before `len`.
    fn get(&mut self, pos: u64, n: usize, len: u64) -> Result<&[u8], StoreError> {
        let have = pos >= self.at && pos + n as u64 <= self.at + self.buf.len() as u64;
        if !have {
            let read = (len - pos).min(SCAN_CHUNK.max(n) as u64) as usize;
            self.buf.clear();
            self.buf.resize(read, 0);
            self.file
                .read_exact_at(&mut self.buf, pos)
                .map_err(StoreError::io(self.path))?;
            self.at = pos;
        }
        let start = (pos - self.at) as usize;
        Ok(&self.buf[start..start + n])
    }
}
