//! A consumer group's delivery counts: how often records still unacknowledged have been
//! delivered, so `max_deliveries` keeps counting across restarts.
//!
//! `groups/<group>.attempts` is a log of 16-byte entries
//! `[u64 offset][u32 deliveries][u32 crc32 of the first 12 bytes]` (big-endian), appended
//! when a record is delivered again (first deliveries are not written: that would be a
//! write per message, and losing one costs at most one extra delivery). The newest entry of
//! an offset wins; a torn entry fails its CRC and is skipped. Entries are written, not
//! synced: they survive a killed process; a power cut may lose the last few counts. Once the
//! log is large, it is rewritten with only the entries at or past the committed offset.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::StoreError;
use super::fsio::{write_durably, FileIo, FsRef, Open};

const ENTRY: usize = 16;
const CHECKED: usize = 12;
/// Bytes of log after which it is compacted.
const COMPACT_AT: u64 = 64 * 1024;

/// The delivery-count log of one group.
#[derive(Debug)]
pub struct AttemptsFile {
    fs: FsRef,
    path: PathBuf,
    file: Option<Arc<dyn FileIo>>,
    len: u64,
}

impl AttemptsFile {
    /// Opens the log at `path` (it need not exist); returns it with the counts stored for
    /// offsets at or past `committed`.
    pub fn open(
        fs: &FsRef,
        path: &Path,
        committed: u64,
    ) -> Result<(AttemptsFile, BTreeMap<u64, u32>), StoreError> {
        let raw = match fs.read(path) {
            Ok(raw) => raw,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(StoreError::io(path)(e)),
        };
        let mut counts = BTreeMap::new();
        for entry in raw.chunks_exact(ENTRY) {
            if let Some((offset, deliveries)) = decode(entry) {
                if offset >= committed {
                    counts.insert(offset, deliveries);
                }
            }
        }
        let file = AttemptsFile {
            fs: fs.clone(),
            path: path.to_path_buf(),
            file: None,
            // A torn last entry is overwritten by the next one.
            len: (raw.len() - raw.len() % ENTRY) as u64,
        };
        Ok((file, counts))
    }

    /// Records that the records at these offsets have now been delivered this many times
    /// (not counting deliveries given back unseen). `committed` bounds what a compaction
    /// keeps.
    pub fn record(&mut self, counts: &[(u64, u32)], committed: u64) -> Result<(), StoreError> {
        if counts.is_empty() {
            return Ok(());
        }
        if self.len >= COMPACT_AT {
            let (_, live) = AttemptsFile::open(&self.fs, &self.path, committed)?;
            let kept: Vec<u8> = live.into_iter().flat_map(|(o, n)| encode(o, n)).collect();
            write_durably(&*self.fs, &self.path, &kept)?;
            self.file = None;
            self.len = kept.len() as u64;
        }
        let file = match &self.file {
            Some(file) => file.clone(),
            None => {
                let file = self
                    .fs
                    .open(&self.path, Open::OrCreate)
                    .map_err(StoreError::io(&self.path))?;
                self.file = Some(file.clone());
                file
            }
        };
        let bytes: Vec<u8> = counts.iter().flat_map(|&(o, n)| encode(o, n)).collect();
        file.write_all_at(&bytes, self.len)
            .map_err(StoreError::io(&self.path))?;
        self.len += bytes.len() as u64;
        Ok(())
    }
}

fn encode(offset: u64, deliveries: u32) -> [u8; ENTRY] {
    let mut out = [0u8; ENTRY];
    out[..8].copy_from_slice(&offset.to_be_bytes());
    out[8..12].copy_from_slice(&deliveries.to_be_bytes());
    let crc = crc32fast::hash(&out[..CHECKED]);
    out[CHECKED..].copy_from_slice(&crc.to_be_bytes());
    out
}

fn decode(entry: &[u8]) -> Option<(u64, u32)> {
    let stored = u32::from_be_bytes(entry.get(CHECKED..ENTRY)?.try_into().ok()?);
    if crc32fast::hash(&entry[..CHECKED]) != stored {
        return None;
    }
    let offset = u64::from_be_bytes(entry[..8].try_into().ok()?);
    let deliveries = u32::from_be_bytes(entry[8..12].try_into().ok()?);
    Some((offset, deliveries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::simdisk::SimDisk;

    #[test]
    fn counts_survive_reopening_and_compaction() {
        let disk = SimDisk::new();
        let fs = disk.fs();
        let path = Path::new("/g.attempts");
        let (mut file, counts) = AttemptsFile::open(&fs, path, 0).unwrap();
        assert!(counts.is_empty());
        file.record(&[(5, 2), (7, 2)], 0).unwrap();
        file.record(&[(5, 3)], 0).unwrap();
        let (_, counts) = AttemptsFile::open(&fs, path, 6).unwrap();
        assert_eq!(
            counts,
            BTreeMap::from([(7, 2)]),
            "newest wins, acked ones go"
        );
        let (_, counts) = AttemptsFile::open(&fs, path, 0).unwrap();
        assert_eq!(counts, BTreeMap::from([(5, 3), (7, 2)]));

        // A torn entry is skipped and overwritten.
        let mut raw = fs.read(path).unwrap();
        raw.extend_from_slice(&[1, 2, 3]);
        let torn = fs.open(path, Open::Truncate).unwrap();
        torn.write_all_at(&raw, 0).unwrap();
        let (mut file, _) = AttemptsFile::open(&fs, path, 0).unwrap();
        file.record(&[(9, 2)], 0).unwrap();
        let (_, counts) = AttemptsFile::open(&fs, path, 0).unwrap();
        assert_eq!(counts.get(&9), Some(&2));

        // Past the size limit the log is rewritten with what is live.
        let many: Vec<(u64, u32)> = (0..COMPACT_AT / ENTRY as u64).map(|o| (o, 2)).collect();
        file.record(&many, 0).unwrap();
        file.record(&[(100_000, 4)], 4_000).unwrap();
        let (_, counts) = AttemptsFile::open(&fs, path, 0).unwrap();
        let want: BTreeMap<u64, u32> = (4_000..COMPACT_AT / ENTRY as u64)
            .map(|o| (o, 2))
            .chain([(100_000, 4)])
            .collect();
        assert_eq!(
            counts, want,
            "only entries at or past the committed offset are kept"
        );
        let size = fs.read(path).unwrap().len();
        assert_eq!(size, want.len() * ENTRY);
    }
}
