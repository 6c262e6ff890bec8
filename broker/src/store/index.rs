//! Sparse offset index of one segment: `<base:020>.idx`.
//!
//! An entry `(relative offset, file position)` (two big-endian `u32`, 8 bytes) is kept for the
//! first record of the segment and then for the first record that starts at least
//! [`INDEX_INTERVAL`] bytes after the previous entry, so a lookup lands at most about that many
//! bytes before the wanted record. The file is never fsynced: recovery checks it against the
//! log and rebuilds it by scanning when it is missing or damaged.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use qbus_wire::protocol::record::RECORD_OVERHEAD;

use super::error::StoreError;
use super::fsio::{FileIo, FsRef, Open};

/// Bytes of log between two index entries.
pub(crate) const INDEX_INTERVAL: u64 = 4096;
const ENTRY_SIZE: usize = 8;

/// One entry: offset relative to the segment base, byte position in the log file.
pub(crate) type Entry = (u32, u32);

/// The entries of one segment, in increasing order, for lookups.
#[derive(Debug, Clone, Default)]
pub(crate) struct OffsetIndex {
    entries: Vec<Entry>,
}

impl OffsetIndex {
    /// Decodes an index file's bytes, keeping the longest prefix that is plausible for a log
    /// of `log_len` valid bytes. The flag says whether anything was dropped.
    pub(crate) fn decode(bytes: &[u8], log_len: u64) -> (OffsetIndex, bool) {
        let mut entries = Vec::with_capacity(bytes.len() / ENTRY_SIZE);
        let raws = bytes.chunks_exact(ENTRY_SIZE);
        let torn = !raws.remainder().is_empty();
        for raw in raws {
            let rel = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
            let pos = u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]);
            if !plausible(entries.last().copied(), (rel, pos), log_len) {
                return (OffsetIndex { entries }, true);
            }
            entries.push((rel, pos));
        }
        (OffsetIndex { entries }, torn)
    }

    /// The greatest entry at or below `rel`; `(0, 0)` (the segment start) when there is none.
    pub(crate) fn lookup(&self, rel: u32) -> Entry {
        let after = self.entries.partition_point(|&(r, _)| r <= rel);
        after.checked_sub(1).map_or((0, 0), |at| self.entries[at])
    }

    /// The last entry.
    pub(crate) fn last(&self) -> Option<Entry> {
        self.entries.last().copied()
    }

    /// Appends entries that follow the existing ones.
    pub(crate) fn extend(&mut self, entries: &[Entry]) {
        self.entries.extend_from_slice(entries);
    }

    /// Drops the entries at or after file position `len` (the log was truncated there).
    /// Returns whether anything was dropped.
    pub(crate) fn truncate_to(&mut self, len: u64) -> bool {
        let keep = self
            .entries
            .partition_point(|&(_, pos)| u64::from(pos) < len);
        let dropped = keep < self.entries.len();
        self.entries.truncate(keep);
        dropped
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    fn encode(entries: &[Entry]) -> Vec<u8> {
        let mut out = Vec::with_capacity(entries.len() * ENTRY_SIZE);
        for &(rel, pos) in entries {
            out.extend_from_slice(&rel.to_be_bytes());
            out.extend_from_slice(&pos.to_be_bytes());
        }
        out
    }
}

/// Whether `next` may follow `prev` in the index of a log of `log_len` bytes: the first
/// entry is the segment start, entries increase, point inside the log, and leave room for at
/// least one whole record per offset between them.
fn plausible(prev: Option<Entry>, next: Entry, log_len: u64) -> bool {
    if u64::from(next.1) >= log_len {
        return false;
    }
    match prev {
        None => next == (0, 0),
        Some((rel, pos)) => {
            next.0 > rel
                && next.1 > pos
                && u64::from(next.0 - rel) * RECORD_OVERHEAD as u64 <= u64::from(next.1 - pos)
        }
    }
}

/// Whether a record starting at `pos` gets an index entry, given the last entry's position.
pub(crate) fn wants_entry(last_pos: Option<u32>, pos: u64) -> bool {
    last_pos.is_none_or(|last| pos >= u64::from(last) + INDEX_INTERVAL)
}

/// The writer of one segment's index file.
///
/// Index writes never fail an append: the records are already in the log, and a lost or
/// damaged index is rebuilt on the next open. On a write error the file is removed so that
/// the next open rebuilds it, and the in-memory index carries on alone.
#[derive(Debug)]
pub(crate) struct IndexFile {
    fs: FsRef,
    path: PathBuf,
    // None once sealed or after a write error.
    file: Option<Arc<dyn FileIo>>,
    entries_in_file: u64,
    last_pos: Option<u32>,
}

impl IndexFile {
    /// Creates (or empties) the index file of a new segment.
    pub(crate) fn create(fs: &FsRef, path: PathBuf) -> Result<IndexFile, StoreError> {
        let file = fs
            .open(&path, Open::Truncate)
            .map_err(StoreError::io(&path))?;
        Ok(IndexFile {
            fs: fs.clone(),
            path,
            file: Some(file),
            entries_in_file: 0,
            last_pos: None,
        })
    }

    /// Opens the index file of a recovered segment whose entries are `index`; rewrites the
    /// file when recovery changed them. `writable` is false for sealed segments, which get no
    /// more entries.
    ///
    /// Never fails: the index is only a shortcut. When the file cannot be rewritten or
    /// opened (a full disk at start-up), it is removed so the next open rebuilds it, and the
    /// segment carries on with the index in memory.
    pub(crate) fn open(
        fs: &FsRef,
        path: PathBuf,
        index: &OffsetIndex,
        rewrite: bool,
        writable: bool,
    ) -> IndexFile {
        let mut opened = IndexFile {
            fs: fs.clone(),
            path,
            file: None,
            entries_in_file: index.len() as u64,
            last_pos: index.last().map(|(_, pos)| pos),
        };
        let written = (|| {
            if rewrite {
                let file = fs.open(&opened.path, Open::Truncate)?;
                file.write_all_at(&OffsetIndex::encode(&index.entries), 0)?;
                if writable {
                    return Ok(Some(file));
                }
            }
            if writable {
                return fs.open(&opened.path, Open::OrCreate).map(Some);
            }
            Ok(None)
        })();
        match written {
            Ok(file) => opened.file = file,
            Err(e) => opened.give_up(&e),
        }
        opened
    }

    /// Position of the last entry, for [`wants_entry`].
    pub(crate) fn last_pos(&self) -> Option<u32> {
        self.last_pos
    }

    /// Appends entries for records just written to the log.
    pub(crate) fn append(&mut self, entries: &[Entry]) {
        let Some(&(_, last)) = entries.last() else {
            return;
        };
        self.last_pos = Some(last);
        let Some(file) = &self.file else {
            return;
        };
        // Positional writes: a short write after an error can never shift later entries.
        let at = self.entries_in_file * ENTRY_SIZE as u64;
        let written = file.write_all_at(&OffsetIndex::encode(entries), at);
        match written {
            Ok(()) => self.entries_in_file += entries.len() as u64,
            Err(e) => self.give_up(&e),
        }
    }

    /// Stops writing the file after `error` and removes it, so the next open rebuilds it
    /// from the log instead of trusting a file that lacks entries.
    fn give_up(&mut self, error: &std::io::Error) {
        tracing::warn!(
            file = %self.path.display(),
            error = %error,
            "cannot write index entries; the index will be rebuilt on the next open"
        );
        self.file = None;
        match self.fs.remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(file = %self.path.display(), error = %e, "cannot remove index");
            }
            _ => {}
        }
    }

    /// Stops writing: the segment is sealed.
    pub(crate) fn seal(&mut self) {
        self.file = None;
    }

    /// Path of the index file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(entries: &[Entry]) -> Vec<u8> {
        OffsetIndex::encode(entries)
    }

    #[test]
    fn lookup_finds_the_greatest_entry_at_or_below() {
        let (index, dropped) =
            OffsetIndex::decode(&bytes(&[(0, 0), (10, 5000), (20, 9000)]), 1 << 20);
        assert!(!dropped);
        assert_eq!(index.lookup(0), (0, 0));
        assert_eq!(index.lookup(9), (0, 0));
        assert_eq!(index.lookup(10), (10, 5000));
        assert_eq!(index.lookup(19), (10, 5000));
        assert_eq!(index.lookup(1000), (20, 9000));
        assert_eq!(OffsetIndex::default().lookup(7), (0, 0));
    }

    #[test]
    fn decode_keeps_the_plausible_prefix() {
        // Past the end of the log.
        let (index, dropped) = OffsetIndex::decode(&bytes(&[(0, 0), (10, 5000)]), 5000);
        assert_eq!((index.len(), dropped), (1, true));
        // Not increasing.
        let (index, dropped) =
            OffsetIndex::decode(&bytes(&[(0, 0), (10, 5000), (10, 6000)]), 1 << 20);
        assert_eq!((index.len(), dropped), (2, true));
        // Zeros left by a lost write.
        let (index, dropped) = OffsetIndex::decode(&bytes(&[(0, 0), (10, 5000), (0, 0)]), 1 << 20);
        assert_eq!((index.len(), dropped), (2, true));
        // More offsets than whole records fit.
        let (index, dropped) = OffsetIndex::decode(&bytes(&[(0, 0), (1000, 5000)]), 1 << 20);
        assert_eq!((index.len(), dropped), (1, true));
        // Not starting at the segment start.
        let (index, dropped) = OffsetIndex::decode(&bytes(&[(3, 100)]), 1 << 20);
        assert_eq!((index.len(), dropped), (0, true));
        // A torn last entry.
        let mut raw = bytes(&[(0, 0), (10, 5000)]);
        raw.truncate(12);
        let (index, dropped) = OffsetIndex::decode(&raw, 1 << 20);
        assert_eq!((index.len(), dropped), (1, true));
    }

    #[test]
    fn truncate_drops_entries_past_the_new_end() {
        let (mut index, _) =
            OffsetIndex::decode(&bytes(&[(0, 0), (10, 5000), (20, 9000)]), 1 << 20);
        assert!(!index.truncate_to(9001));
        assert!(index.truncate_to(9000));
        assert_eq!(index.last(), Some((10, 5000)));
    }

    #[test]
    fn entries_every_interval() {
        assert!(wants_entry(None, 0));
        assert!(!wants_entry(Some(0), INDEX_INTERVAL - 1));
        assert!(wants_entry(Some(0), INDEX_INTERVAL));
    }

    #[test]
    fn index_file_appends_and_reopens() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("x.idx");
        let fs = crate::store::OsFs::shared();
        let mut file = IndexFile::create(&fs, path.clone()).unwrap();
        file.append(&[(0, 0)]);
        file.append(&[(40, 4200), (80, 8400)]);
        assert_eq!(file.last_pos(), Some(8400));
        let (index, dropped) = OffsetIndex::decode(&std::fs::read(&path).unwrap(), 1 << 20);
        assert!(!dropped);
        assert_eq!(index.len(), 3);

        let mut reopened = IndexFile::open(&fs, path.clone(), &index, false, true);
        reopened.append(&[(120, 12600)]);
        let (index, _) = OffsetIndex::decode(&std::fs::read(&path).unwrap(), 1 << 20);
        assert_eq!(index.last(), Some((120, 12600)));
    }
}
