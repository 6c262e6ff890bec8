//! One segment of a log, writer side: `<base:020>.log` and its index `<base:020>.idx`.
//!
//! The log file is opened once, read-write, and shared as an `Arc<dyn FileIo>`: the writer appends
//! with positional writes at its own idea of the end and readers use positional reads, so the
//! two never share a file cursor and never need a lock around I/O.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::StoreError;
use super::fsio::{FileIo, Fs, FsRef, Open};
use super::index::{Entry, IndexFile, OffsetIndex};
use super::reader::SegmentView;

/// Path of the log file of the segment starting at `base`.
pub(crate) fn log_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

/// Path of the index file of the segment starting at `base`.
pub(crate) fn index_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.idx"))
}

/// Base offset of a segment from its log file name, `None` for any other file.
pub(crate) fn parse_log_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Opens a segment's log file for positional reads and writes.
pub(crate) fn open_log_file(
    fs: &dyn Fs,
    path: &Path,
    create: bool,
) -> Result<Arc<dyn FileIo>, StoreError> {
    let how = if create {
        Open::Truncate
    } else {
        Open::Existing
    };
    fs.open(path, how).map_err(StoreError::io(path))
}

/// What recovery learnt about a segment.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub(crate) base: u64,
    pub(crate) next_offset: u64,
    pub(crate) size: u64,
    pub(crate) last_timestamp: Option<u64>,
    pub(crate) file: Arc<dyn FileIo>,
    pub(crate) log_path: PathBuf,
    pub(crate) index: OffsetIndex,
    pub(crate) index_file: IndexFile,
}

/// One segment as the writer sees it.
#[derive(Debug)]
pub(crate) struct Segment {
    base: u64,
    next_offset: u64,
    size: u64,
    last_timestamp: Option<u64>,
    file: Arc<dyn FileIo>,
    log_path: Arc<Path>,
    index: IndexFile,
    // Entries written since the last publish, handed to the readers' copy of the index then.
    unpublished_entries: Vec<Entry>,
    unpublished: bool,
    unsynced: bool,
}

impl Segment {
    /// Creates the empty files of a new segment starting at `base`.
    /// Their names are durable once the directory is synced (`MqLog::sync`).
    pub(crate) fn create(fs: &FsRef, dir: &Path, base: u64) -> Result<Segment, StoreError> {
        let log_path = log_path(dir, base);
        let file = open_log_file(&**fs, &log_path, true)?;
        let index = IndexFile::create(fs, index_path(dir, base))?;
        Ok(Segment {
            base,
            next_offset: base,
            size: 0,
            last_timestamp: None,
            file,
            log_path: log_path.into(),
            index,
            unpublished_entries: Vec::new(),
            unpublished: true,
            unsynced: true,
        })
    }

    /// Wraps a recovered segment; returns it with the readers' view of it.
    pub(crate) fn recovered(r: Recovered) -> (Segment, SegmentView) {
        let segment = Segment {
            base: r.base,
            next_offset: r.next_offset,
            size: r.size,
            last_timestamp: r.last_timestamp,
            file: r.file,
            log_path: r.log_path.into(),
            index: r.index_file,
            unpublished_entries: Vec::new(),
            unpublished: false,
            unsynced: false,
        };
        let view = SegmentView {
            base: segment.base,
            end: segment.next_offset,
            len: segment.size,
            file: Arc::clone(&segment.file),
            path: Arc::clone(&segment.log_path),
            index: r.index,
        };
        (segment, view)
    }

    pub(crate) fn base(&self) -> u64 {
        self.base
    }

    pub(crate) fn next_offset(&self) -> u64 {
        self.next_offset
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn last_timestamp(&self) -> Option<u64> {
        self.last_timestamp
    }

    pub(crate) fn is_unpublished(&self) -> bool {
        self.unpublished
    }

    pub(crate) fn is_unsynced(&self) -> bool {
        self.unsynced
    }

    /// Position of the last index entry, for deciding where the next one goes.
    pub(crate) fn last_index_pos(&self) -> Option<u32> {
        self.index.last_pos()
    }

    /// Writes `count` stamped records (whole, back to back) at the end of the log with one
    /// positional write, then their index entries. On a failed write the file is cut back so
    /// that the next append starts clean.
    pub(crate) fn append(
        &mut self,
        data: &[u8],
        count: u64,
        entries: Vec<Entry>,
        timestamp: u64,
    ) -> Result<(), StoreError> {
        if let Err(e) = self.file.write_all_at(data, self.size) {
            // Cut the partial write off, so that the next append does not leave the end of
            // this one behind it, where recovery would take it for records nobody acked.
            if let Err(cut) = self.file.set_len(self.size) {
                return Err(StoreError::Halted {
                    cause: format!(
                        "append to {} failed ({e}) and cutting it back failed too ({cut})",
                        self.log_path.display()
                    ),
                });
            }
            return Err(StoreError::io(&self.log_path)(e));
        }
        self.size += data.len() as u64;
        self.next_offset += count;
        self.last_timestamp = Some(timestamp);
        self.index.append(&entries);
        if self.unpublished_entries.is_empty() {
            self.unpublished_entries = entries;
        } else {
            self.unpublished_entries.extend_from_slice(&entries);
        }
        self.unpublished = true;
        self.unsynced = true;
        Ok(())
    }

    /// Stops index writes: the segment will get no more records.
    pub(crate) fn seal(&mut self) {
        self.index.seal();
    }

    /// Flushes the log file's data to disk.
    pub(crate) fn sync(&mut self) -> Result<(), StoreError> {
        self.file
            .sync_data()
            .map_err(StoreError::io(&self.log_path))?;
        self.unsynced = false;
        Ok(())
    }

    /// Hands what was appended since the last publish to the readers' view of this segment.
    pub(crate) fn publish_into(&mut self, view: &mut SegmentView) {
        view.end = self.next_offset;
        view.len = self.size;
        view.index.extend(&self.unpublished_entries);
        self.unpublished_entries.clear();
        self.unpublished = false;
    }

    /// A readers' view of this segment as of now, for a segment they do not know yet.
    pub(crate) fn new_view(&mut self) -> SegmentView {
        let mut view = SegmentView {
            base: self.base,
            end: self.base,
            len: 0,
            file: Arc::clone(&self.file),
            path: Arc::clone(&self.log_path),
            index: OffsetIndex::default(),
        };
        self.publish_into(&mut view);
        view
    }

    /// Deletes both files, the index first: a crash in between leaves a log file whose
    /// index is rebuilt, never an index without its log. The caller syncs the directory.
    pub(crate) fn delete_files(&self, fs: &dyn Fs) -> Result<(), StoreError> {
        match fs.remove_file(self.index.path()) {
            // A failed index write removes the index early.
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(StoreError::io(self.index.path())(e));
            }
            _ => {}
        }
        fs.remove_file(&self.log_path)
            .map_err(StoreError::io(&self.log_path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let dir = Path::new("/x");
        let path = log_path(dir, 1234);
        assert_eq!(path, Path::new("/x/00000000000000001234.log"));
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_log_name(name), Some(1234));
        assert_eq!(parse_log_name("00000000000000001234.idx"), None);
        assert_eq!(parse_log_name("1234.log"), None);
        assert_eq!(parse_log_name("0000000000000000123x.log"), None);
    }
}
