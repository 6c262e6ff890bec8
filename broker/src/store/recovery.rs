//! Reopening a log: what is on disk becomes a list of verified segments.
//!
//! Reopen time must not grow with the amount of data, so sealed segments are not scanned:
//! their index is loaded and only the records after its last entry (a few KiB) are verified,
//! which also proves the index and the end of the file agree. The active segment gets the
//! same treatment, and a torn tail (a write cut short by a crash) is truncated there. Any
//! damage triggers a full scan of that one segment first, so a bad index entry can never
//! make recovery cut off good records; damage followed by an intact record is damage in the
//! middle, not a torn tail: the scan resynchronises past it (`resync`) and keeps the rest.
//! Missing or damaged index files are rebuilt.

use std::fmt;
use std::path::Path;

use qbus_wire::protocol::record::{parse_record, peek_record_size, RecordError, RECORD_OVERHEAD};

use super::error::StoreError;
use super::fsio::{FileIo, Fs, FsRef};
use super::index::{wants_entry, Entry, IndexFile, OffsetIndex};
use super::resync::next_intact;
use super::segment::{index_path, log_path, open_log_file, parse_log_name, Recovered};

/// Bytes read per call while scanning.
const SCAN_CHUNK: usize = 1 << 20;

/// Base offsets of the segments in `dir`, oldest first.
pub(crate) fn list_segments(fs: &dyn Fs, dir: &Path) -> Result<Vec<u64>, StoreError> {
    let mut bases = Vec::new();
    for entry in fs.list(dir).map_err(StoreError::io(dir))? {
        if let Some(base) = parse_log_name(&entry.name) {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// Recovers the segment starting at `base`. `next_base` is the base of the following
/// segment, `None` for the active (last) one.
pub(crate) fn recover_segment(
    fs: &FsRef,
    dir: &Path,
    base: u64,
    next_base: Option<u64>,
) -> Result<Recovered, StoreError> {
    let log_path = log_path(dir, base);
    let file = open_log_file(&**fs, &log_path, false)?;
    let len = file.len().map_err(StoreError::io(&log_path))?;
    let idx_path = index_path(dir, base);
    let raw = match fs.read(&idx_path) {
        Ok(raw) => raw,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(StoreError::io(&idx_path)(e)),
    };
    let (mut index, damaged) = OffsetIndex::decode(&raw, len);
    let missing = raw.is_empty() && len > 0;
    let mut rewrite = damaged || missing;

    let tail = Tail {
        file: &*file,
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
    if missing || damaged {
        // Worth a line: a lost index is harmless, but a damaged one hints at a bad disk.
        tracing::warn!(
            file = %idx_path.display(),
            problem = if missing { "missing or empty" } else { "damaged" },
            entries = index.len(),
            "index rebuilt from the log"
        );
    }
    if let Some(next_base) = next_base.filter(|&next| scan.next_offset < next) {
        tracing::warn!(
            file = %log_path.display(),
            first = scan.next_offset,
            end = next_base,
            "records lost before the next segment; readers skip the gap"
        );
    }
    let index_file = IndexFile::open(fs, idx_path, &index, rewrite, next_base.is_none());
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
    file: &'a dyn FileIo,
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
                    // An intact record further on means damage in the middle, not a torn
                    // tail: the records after it are kept, only the damaged ones are lost.
                    let at = scan.valid_len;
                    let last = self.base + u64::from(u32::MAX);
                    let wanted = scan.next_offset + 1..self.limit.unwrap_or(last).min(last);
                    let Some((offset, pos)) =
                        next_intact(self.file, self.path, at, self.len, wanted)?
                    else {
                        scan.damage = Some((at, damage));
                        break;
                    };
                    tracing::warn!(
                        file = %self.path.display(),
                        position = at,
                        reason = %damage,
                        lost_from = scan.next_offset,
                        lost_to = offset,
                        "damaged records skipped; the intact records after them are kept"
                    );
                    // Reads of the records after the damage start here, not before it.
                    let entry = ((offset - self.base) as u32, pos as u32);
                    scan.entries.push(entry);
                    last_entry = Some(entry.1);
                    scan.valid_len = pos;
                    scan.next_offset = offset;
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
    file: &'a dyn FileIo,
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Instant;

    use qbus_wire::protocol::record::encode_record;

    use super::*;
    use crate::store::testutil::{batch, body, config, decode, os};
    use crate::store::{LogReader, Lost, MqLog, OsFs};

    fn write(dir: &Path, segment_bytes: u64, n: u64) {
        let (mut log, _) = MqLog::open(&os(), dir, config(segment_bytes)).unwrap();
        for from in (0..n).step_by(10) {
            log.append(&mut batch(from, (from + 10).min(n)), 42)
                .unwrap();
        }
        log.sync().unwrap();
    }

    fn all(reader: &LogReader) -> Vec<(u64, Vec<u8>)> {
        decode(&reader.read(0, None, usize::MAX, usize::MAX).unwrap())
    }

    fn expected(from: u64, to: u64) -> Vec<(u64, Vec<u8>)> {
        (from..to).map(|n| (n, body(n))).collect()
    }

    fn active_log(dir: &Path) -> PathBuf {
        let bases = list_segments(&OsFs, dir).unwrap();
        log_path(dir, *bases.last().unwrap())
    }

    /// File positions of the records of a segment file.
    fn record_positions(path: &Path) -> Vec<u64> {
        let raw = std::fs::read(path).unwrap();
        let mut at = 0;
        let mut out = Vec::new();
        while at < raw.len() {
            out.push(at as u64);
            at += peek_record_size(&raw[at..]).unwrap();
        }
        out
    }

    #[test]
    fn torn_tail_is_truncated_and_appends_continue() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), 3_000, 200);
        let active = active_log(tmp.path());
        let len = std::fs::metadata(&active).unwrap().len();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&active)
            .unwrap();
        file.set_len(len - 3).unwrap();
        drop(file);

        let (mut log, reader) = MqLog::open(&os(), tmp.path(), config(3_000)).unwrap();
        assert_eq!(log.next_offset(), 199);
        assert_eq!(all(&reader), expected(0, 199));
        let mut again = batch(199, 210);
        assert_eq!(log.append(&mut again, 43).unwrap().first_offset, 199);
        log.publish();
        assert_eq!(all(&reader), expected(0, 210));
        drop((log, reader));
        let (log, reader) = MqLog::open(&os(), tmp.path(), config(3_000)).unwrap();
        assert_eq!(log.next_offset(), 210);
        assert_eq!(all(&reader), expected(0, 210));
    }

    #[test]
    fn garbage_after_the_tail_is_truncated() {
        for garbage in [vec![0u8; 3], vec![0u8; 100], vec![0xABu8; 5_000]] {
            let tmp = tempfile::tempdir().unwrap();
            write(tmp.path(), 3_000, 200);
            let active = active_log(tmp.path());
            let len = std::fs::metadata(&active).unwrap().len();
            let mut raw = std::fs::read(&active).unwrap();
            raw.extend_from_slice(&garbage);
            std::fs::write(&active, raw).unwrap();

            let (mut log, reader) = MqLog::open(&os(), tmp.path(), config(3_000)).unwrap();
            assert_eq!(std::fs::metadata(&active).unwrap().len(), len);
            assert_eq!(log.next_offset(), 200);
            log.append(&mut batch(200, 205), 43).unwrap();
            log.publish();
            assert_eq!(all(&reader), expected(0, 205));
        }
    }

    #[test]
    fn a_record_with_the_wrong_offset_ends_the_tail() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), 1 << 20, 50);
        // A valid record, but carrying an offset from the past.
        let active = active_log(tmp.path());
        let mut raw = std::fs::read(&active).unwrap();
        encode_record(&mut raw, 3, 0, None, None, b"stale").unwrap();
        std::fs::write(&active, raw).unwrap();
        let (log, reader) = MqLog::open(&os(), tmp.path(), config(1 << 20)).unwrap();
        assert_eq!(log.next_offset(), 50);
        assert_eq!(all(&reader), expected(0, 50));
    }

    #[test]
    fn a_flipped_byte_in_a_sealed_segment_is_reported_on_read() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, reader) = MqLog::open(&os(), tmp.path(), config(2_000)).unwrap();
        for from in (0..300).step_by(10) {
            log.append(&mut batch(from, from + 10), 42).unwrap();
        }
        log.publish();
        let bases = list_segments(&OsFs, tmp.path()).unwrap();
        assert!(bases.len() > 3);
        let (base, next_base) = (bases[1], bases[2]);
        let sealed = log_path(tmp.path(), base);
        let positions = record_positions(&sealed);
        let victim = base + 2;
        let position = positions[2];
        let mut raw = std::fs::read(&sealed).unwrap();
        raw[position as usize + 30] ^= 0x01;
        std::fs::write(&sealed, raw).unwrap();

        // Records before it still read.
        let good = reader.read(base, None, 2, 1 << 20).unwrap();
        assert_eq!(decode(&good), expected(base, base + 2));
        // A read that meets it returns the records before it, and stops there.
        let before = reader.read(base, None, 100, 1 << 20).unwrap();
        assert_eq!(decode(&before), expected(base, victim));
        assert_eq!(before.next_offset, victim);
        for (from, pos) in [(victim, None), (victim, Some(good.next_pos))] {
            let err = reader.read(from, pos, 100, 1 << 20).unwrap_err();
            match &err {
                StoreError::Corrupt {
                    file,
                    position: at,
                    reason: RecordError::Checksum { .. },
                } => {
                    assert_eq!((file, *at), (&sealed, position));
                }
                other => panic!("unexpected {other:?}"),
            }
            let msg = err.to_string();
            assert!(msg.contains(&sealed.display().to_string()), "{msg}");
            assert!(msg.contains(&position.to_string()), "{msg}");
        }
        // Records after it still read.
        let after = reader.read(victim + 1, None, 1_000, 1 << 20).unwrap();
        assert_eq!(
            decode(&after)[..(next_base - victim - 1) as usize],
            expected(victim + 1, next_base)[..]
        );
    }

    #[test]
    fn missing_or_damaged_indexes_are_rebuilt() {
        let tmp = tempfile::tempdir().unwrap();
        // Big segments so each has many index entries.
        write(tmp.path(), 20_000, 2_000);
        let bases = list_segments(&OsFs, tmp.path()).unwrap();
        assert!(bases.len() >= 3);
        let originals: Vec<Vec<u8>> = bases
            .iter()
            .map(|&b| std::fs::read(index_path(tmp.path(), b)).unwrap())
            .collect();
        assert!(originals[0].len() >= 24);
        // Sealed: missing. Another sealed: a bogus but plausible last entry. Active: empty.
        std::fs::remove_file(index_path(tmp.path(), bases[0])).unwrap();
        let mut bogus = originals[1].clone();
        let (rel, pos) = {
            let n = bogus.len();
            let last = &bogus[n - 8..];
            (
                u32::from_be_bytes(last[..4].try_into().unwrap()),
                u32::from_be_bytes(last[4..].try_into().unwrap()),
            )
        };
        bogus.extend_from_slice(&(rel + 1).to_be_bytes());
        bogus.extend_from_slice(&(pos + 4_000).to_be_bytes());
        std::fs::write(index_path(tmp.path(), bases[1]), bogus).unwrap();
        let last = *bases.last().unwrap();
        std::fs::write(index_path(tmp.path(), last), b"").unwrap();

        let (log, reader) = MqLog::open(&os(), tmp.path(), config(20_000)).unwrap();
        assert_eq!(log.next_offset(), 2_000);
        for from in (0..2_000).step_by(37) {
            let got = reader.read(from, None, 2, 1 << 20).unwrap();
            assert_eq!(decode(&got), expected(from, from + 2));
        }
        let rebuilt: Vec<Vec<u8>> = bases
            .iter()
            .map(|&b| std::fs::read(index_path(tmp.path(), b)).unwrap())
            .collect();
        assert_eq!(rebuilt, originals);
    }

    #[test]
    fn a_sealed_segment_that_lost_its_tail_leaves_a_gap() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), 2_000, 300);
        let bases = list_segments(&OsFs, tmp.path()).unwrap();
        let (base, next_base) = (bases[1], bases[2]);
        let sealed = log_path(tmp.path(), base);
        let positions = record_positions(&sealed);
        let cut = positions[positions.len() - 2];
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&sealed)
            .unwrap();
        file.set_len(cut + 5).unwrap();
        drop(file);

        let (log, reader) = MqLog::open(&os(), tmp.path(), config(2_000)).unwrap();
        assert_eq!(std::fs::metadata(&sealed).unwrap().len(), cut);
        assert_eq!(log.next_offset(), 300);
        let lost = next_base - 2;
        let want: Vec<_> = expected(0, 300)
            .into_iter()
            .filter(|(o, _)| !(lost..next_base).contains(o))
            .collect();
        assert_eq!(all(&reader), want);
        let got = reader.read(lost, None, 1, 1 << 20).unwrap();
        assert_eq!(decode(&got), expected(next_base, next_base + 1));
    }

    /// Reads the whole log as a consumer does: on damage, skips to the next intact record.
    /// Returns what was read and what was reported lost.
    fn read_past_damage(reader: &LogReader) -> (Vec<(u64, Vec<u8>)>, Vec<Lost>) {
        let (mut out, mut lost) = (Vec::new(), Vec::new());
        let (mut next, mut pos) = (0, None);
        while next < reader.end_offset() {
            match reader.read(next, pos, 7, 1 << 20) {
                Ok(got) => {
                    out.extend(decode(&got));
                    (next, pos) = (got.next_offset, Some(got.next_pos));
                }
                Err(e) => {
                    assert!(e.is_damage(), "{e}");
                    let skip = reader.skip_damage(next).unwrap();
                    assert!(skip.next_offset > next || skip.lost.is_none());
                    lost.extend(skip.lost);
                    (next, pos) = (skip.next_offset, Some(skip.next_pos));
                }
            }
        }
        (out, lost)
    }

    #[test]
    fn one_damaged_record_loses_only_itself() {
        const N: u64 = 300;
        let mut rng = crate::store::simdisk::Rng::new(0x5eed_da7a);
        for trial in 0..150 {
            let tmp = tempfile::tempdir().unwrap();
            write(tmp.path(), 3_000, N);
            // A random bit of a random record of a random segment: length, checksum, offset,
            // timestamp, tag or body.
            let bases = list_segments(&OsFs, tmp.path()).unwrap();
            let at = rng.below(bases.len() as u64) as usize;
            let path = log_path(tmp.path(), bases[at]);
            let positions = record_positions(&path);
            let victim = rng.below(positions.len() as u64) as usize;
            let mut raw = std::fs::read(&path).unwrap();
            let end = positions.get(victim + 1).map_or(raw.len() as u64, |&p| p);
            let byte = positions[victim] + rng.below(end - positions[victim]);
            raw[byte as usize] ^= 1 << rng.below(8);
            std::fs::write(&path, &raw).unwrap();
            let damaged = bases[at] + victim as u64;

            let (mut log, reader) = MqLog::open(&os(), tmp.path(), config(3_000)).unwrap();
            let (got, lost) = read_past_damage(&reader);
            let want: Vec<_> = expected(0, N)
                .into_iter()
                .filter(|(o, _)| *o != damaged)
                .collect();
            let context = format!("trial {trial}: bit of byte {byte} of record {damaged}");
            assert_eq!(got, want, "{context}: every intact record, nothing corrupt");
            if let Some(lost) = lost.first() {
                assert_eq!((lost.first, lost.end), (damaged, damaged + 1), "{context}");
                assert_eq!(lost.file, path, "{context}");
            }
            // The log goes on where it ended, unless recovery cut a damaged last record.
            let last = damaged == N - 1;
            assert_eq!(log.next_offset(), if last { N - 1 } else { N }, "{context}");
            log.append(&mut batch(N, N + 1), 50).unwrap();
        }
    }

    #[test]
    fn reopening_a_million_records_is_fast() {
        const N: u64 = 1_000_000;
        const BATCH: u64 = 10_000;
        // Several segments, so sealed ones are reopened too.
        const SEGMENT: u64 = 8 << 20;
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut log, _) = MqLog::open(&os(), tmp.path(), config(SEGMENT)).unwrap();
            let mut records = Vec::new();
            for n in 0..BATCH {
                encode_record(&mut records, 0, 0, None, None, &n.to_be_bytes()).unwrap();
            }
            for _ in 0..N / BATCH {
                log.append(&mut records, 7).unwrap();
            }
            log.sync().unwrap();
        }
        let started = Instant::now();
        let (log, reader) = MqLog::open(&os(), tmp.path(), config(SEGMENT)).unwrap();
        let took = started.elapsed();
        println!(
            "reopened {N} records in {} segments in {took:?}",
            reader.segment_count()
        );
        assert_eq!((reader.first_offset(), log.next_offset()), (0, N));
        assert!(took.as_secs_f64() < 3.0, "reopen took {took:?}");
        let got = reader.read(N - 1, None, 10, 1 << 20).unwrap();
        assert_eq!(
            decode(&got),
            vec![(N - 1, (BATCH - 1).to_be_bytes().to_vec())]
        );
    }
}
