//! A consumer group's durable cursor: the offset below which everything is acknowledged.
//!
//! The file holds two fixed 32-byte slots, each
//! `[u64 seq][u64 committed][u64 0][u32 0][u32 crc32 of the first 28 bytes]` (big-endian).
//! Each store overwrites the older slot with a higher sequence number, so a write torn by a
//! crash damages only that slot and the previous value survives in the other.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::StoreError;
use super::fsio::{sync_parent, FileIo, FsRef, Open};

const SLOT_SIZE: usize = 32;
const CHECKED: usize = 28;

/// The cursor file of one consumer group.
#[derive(Debug)]
pub struct CursorFile {
    fs: FsRef,
    path: PathBuf,
    file: Arc<dyn FileIo>,
    seq: u64,
    committed: Option<u64>,
    // Slot holding the newest value; the next store goes to the other one.
    newest_slot: Option<usize>,
    unsynced: bool,
    // A new file's directory entry needs a sync of the directory to be durable.
    dir_unsynced: bool,
}

impl CursorFile {
    /// Opens or creates the cursor file at `path`; returns it with the stored committed
    /// offset (`None` for a new file, or when neither slot is intact).
    pub fn open(fs: &FsRef, path: &Path) -> Result<(CursorFile, Option<u64>), StoreError> {
        let (file, created) = match fs.open(path, Open::CreateNew) {
            Ok(file) => (file, true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let file = fs
                    .open(path, Open::Existing)
                    .map_err(StoreError::io(path))?;
                (file, false)
            }
            Err(e) => return Err(StoreError::io(path)(e)),
        };
        let len = file.len().map_err(StoreError::io(path))?;
        let mut raw = vec![0u8; len.min(2 * SLOT_SIZE as u64) as usize];
        file.read_exact_at(&mut raw, 0)
            .map_err(StoreError::io(path))?;
        let newest = raw
            .chunks_exact(SLOT_SIZE)
            .enumerate()
            .filter_map(|(slot, bytes)| {
                decode(bytes).map(|(seq, committed)| (seq, committed, slot))
            })
            .max_by_key(|&(seq, _, _)| seq);
        if newest.is_none() && !raw.is_empty() {
            tracing::warn!(file = %path.display(), "cursor file has no intact slot; starting over");
        }
        let cursor = CursorFile {
            fs: fs.clone(),
            path: path.to_path_buf(),
            file,
            seq: newest.map_or(0, |(seq, _, _)| seq),
            committed: newest.map(|(_, committed, _)| committed),
            newest_slot: newest.map(|(_, _, slot)| slot),
            unsynced: false,
            dir_unsynced: created,
        };
        let committed = cursor.committed;
        Ok((cursor, committed))
    }

    /// Records `committed`: every offset below it is acknowledged. Written in place (not yet
    /// on disk until [`sync`](Self::sync)); nothing is written when it is unchanged.
    pub fn store(&mut self, committed: u64) -> Result<(), StoreError> {
        if self.committed == Some(committed) {
            return Ok(());
        }
        let seq = self.seq + 1;
        let slot = self.newest_slot.map_or(0, |newest| 1 - newest);
        self.file
            .write_all_at(&encode(seq, committed), (slot * SLOT_SIZE) as u64)
            .map_err(StoreError::io(&self.path))?;
        self.seq = seq;
        self.committed = Some(committed);
        self.newest_slot = Some(slot);
        self.unsynced = true;
        Ok(())
    }

    /// Flushes the last stored value to disk (fdatasync) if it changed since the last sync.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if self.unsynced {
            self.file.sync_data().map_err(StoreError::io(&self.path))?;
            self.unsynced = false;
        }
        if self.dir_unsynced {
            sync_parent(&*self.fs, &self.path)?;
            self.dir_unsynced = false;
        }
        Ok(())
    }
}

fn encode(seq: u64, committed: u64) -> [u8; SLOT_SIZE] {
    let mut slot = [0u8; SLOT_SIZE];
    slot[0..8].copy_from_slice(&seq.to_be_bytes());
    slot[8..16].copy_from_slice(&committed.to_be_bytes());
    let crc = crc32fast::hash(&slot[..CHECKED]);
    slot[CHECKED..].copy_from_slice(&crc.to_be_bytes());
    slot
}

/// `(seq, committed)` of an intact slot.
fn decode(slot: &[u8]) -> Option<(u64, u64)> {
    let stored = u32::from_be_bytes(slot.get(CHECKED..SLOT_SIZE)?.try_into().ok()?);
    if crc32fast::hash(&slot[..CHECKED]) != stored {
        return None;
    }
    let seq = u64::from_be_bytes(slot[0..8].try_into().ok()?);
    let committed = u64::from_be_bytes(slot[8..16].try_into().ok()?);
    Some((seq, committed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::OsFs;

    #[test]
    fn stores_and_reopens() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("group.cursor");
        let (mut cursor, committed) = CursorFile::open(&OsFs::shared(), &path).unwrap();
        assert_eq!(committed, None);
        cursor.store(5).unwrap();
        cursor.store(9).unwrap();
        cursor.store(12).unwrap();
        cursor.sync().unwrap();
        drop(cursor);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 64);

        let (mut cursor, committed) = CursorFile::open(&OsFs::shared(), &path).unwrap();
        assert_eq!(committed, Some(12));
        cursor.store(13).unwrap();
        drop(cursor);
        assert_eq!(
            CursorFile::open(&OsFs::shared(), &path).unwrap().1,
            Some(13)
        );
    }

    #[test]
    fn a_torn_newer_slot_falls_back_to_the_older_value() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("group.cursor");
        let (mut cursor, _) = CursorFile::open(&OsFs::shared(), &path).unwrap();
        cursor.store(100).unwrap(); // slot 0
        cursor.store(200).unwrap(); // slot 1
        drop(cursor);
        // Tear the newer slot: half of it is garbage.
        let mut raw = std::fs::read(&path).unwrap();
        raw[SLOT_SIZE + 8..SLOT_SIZE + 24].fill(0xA5);
        std::fs::write(&path, &raw).unwrap();

        let (mut cursor, committed) = CursorFile::open(&OsFs::shared(), &path).unwrap();
        assert_eq!(committed, Some(100));
        // The next store replaces the torn slot, keeping the intact one.
        cursor.store(300).unwrap();
        drop(cursor);
        let raw = std::fs::read(&path).unwrap();
        assert_eq!(decode(&raw[..SLOT_SIZE]), Some((1, 100)));
        assert_eq!(
            CursorFile::open(&OsFs::shared(), &path).unwrap().1,
            Some(300)
        );
    }

    #[test]
    fn unchanged_value_is_not_rewritten() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("group.cursor");
        let (mut cursor, _) = CursorFile::open(&OsFs::shared(), &path).unwrap();
        cursor.store(7).unwrap();
        cursor.store(7).unwrap();
        assert_eq!(cursor.seq, 1);
        cursor.sync().unwrap();
    }

    #[test]
    fn garbage_file_reads_as_no_cursor() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("group.cursor");
        std::fs::write(&path, [0xFFu8; 64]).unwrap();
        assert_eq!(CursorFile::open(&OsFs::shared(), &path).unwrap().1, None);
    }
}
