//! The timer index of one MQ's delayed records: which offset comes due when, on disk,
//! bucketed by time, with only the buckets about to come due in memory.
//!
//! The delayed records themselves stay in the MQ's log; this index only says when to copy
//! each one to the log's end (see `queue::timer`). It lives in `<mq>/timer/`:
//!
//! - `<bucket>.tl`: entries `(u64 deliver_at, u64 offset)`, 16 bytes each, big-endian, of the
//!   records due in `[bucket × BUCKET_MS, (bucket + 1) × BUCKET_MS)`, in the order indexed.
//!   Appended unsynced; synced at each [`TimerLog::checkpoint`]. A torn entry at the end is
//!   ignored.
//! - `checkpoint`: [`Checkpoint`], replaced durably. Everything the index claims durable is
//!   what it said at its last checkpoint; after a crash the timer indexes the log again from
//!   `indexed`, and learns what it fired since from the copies it finds from there on.
//!
//! Memory: the bucket now coming due is loaded (a sorted set, about 40 bytes an entry);
//! later ones are a count per file. A million messages spread over the next month cost
//! 16 MB of disk and about 1 500 entries in memory; a million due within the next hour
//! are all in memory (about 40 MB), which is what delivering them on time takes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::fsio::{sync_parent, write_durably, FileIo, Open};
use super::{FsRef, StoreError};

/// Width of one bucket file's time range, in ms (about 70 minutes: 40 days are 823 files).
pub const BUCKET_MS: u64 = 1 << 22;
/// A bucket is loaded this long before its first entry may come due.
const LOAD_AHEAD_MS: u64 = 5_000;
/// Most bucket files kept open between syncs.
const MAX_OPEN: usize = 64;
const ENTRY: usize = 16;
const CHECKPOINT: &str = "checkpoint";
const SUFFIX: &str = ".tl";
/// The index's directory inside its MQ's.
pub const TIMER_DIR: &str = "timer";

/// What the index had made durable at its last checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Every delayed record below this offset that was not fired has its entry in a synced
    /// bucket file. Records from here on are indexed again after a crash, and every copy
    /// the timer made of one of them lies past here (a copy is appended after its original).
    pub indexed: u64,
    /// Every entry due at or before this time (ms) that was in a bucket file has been fired.
    pub fired_through: u64,
}

/// One entry: (deliver_at ms, offset of the delayed record).
pub type Entry = (u64, u64);

/// The timer index of one MQ (see the module doc). Blocking I/O throughout.
pub struct TimerLog {
    fs: FsRef,
    dir: PathBuf,
    durable: Checkpoint,
    /// Entries of the loaded buckets not yet fired.
    near: BTreeSet<Entry>,
    /// Buckets below this are loaded into `near`.
    loaded_end: u64,
    /// Entries on disk per bucket not loaded yet (duplicates a crash left count twice).
    far: BTreeMap<u64, u64>,
    /// Bucket files on disk (their names durable).
    files: BTreeSet<u64>,
    /// Bucket files appended since they were last synced.
    dirty: BTreeSet<u64>,
    /// Some of the bucket files written to lately, open, with their length.
    open: HashMap<u64, (Arc<dyn FileIo>, u64)>,
    /// Records fired after the last checkpoint before a crash (their copies are in the
    /// log): not to fire again.
    fired_before_crash: HashSet<u64>,
}

fn be64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(b)
}

fn bucket_of(at: u64) -> u64 {
    at / BUCKET_MS
}

impl TimerLog {
    /// Makes the index of an MQ in `mq_dir` whose delayed records start at offset `from`,
    /// durably (a produce of a delayed record waits for this the first time).
    pub fn create(fs: &FsRef, mq_dir: &Path, from: u64) -> Result<TimerLog, StoreError> {
        let dir = mq_dir.join(TIMER_DIR);
        fs.create_dir_all(&dir).map_err(StoreError::io(&dir))?;
        let checkpoint = Checkpoint {
            indexed: from,
            fired_through: 0,
        };
        write_checkpoint(fs, &dir, &checkpoint)?;
        sync_parent(&**fs, &dir)?;
        Ok(TimerLog::with(fs, dir, checkpoint, BTreeMap::new()))
    }

    /// Opens the index of the MQ in `mq_dir`; `None` when the MQ never had a delayed record.
    pub fn open(fs: &FsRef, mq_dir: &Path) -> Result<Option<TimerLog>, StoreError> {
        let dir = mq_dir.join(TIMER_DIR);
        let path = dir.join(CHECKPOINT);
        let bytes = match fs.read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(&path)(e)),
        };
        let checkpoint: Checkpoint = rmp_serde::from_slice(&bytes)
            .map_err(|e| StoreError::io(&path)(std::io::Error::other(e)))?;
        let mut far = BTreeMap::new();
        for entry in fs.list(&dir).map_err(StoreError::io(&dir))? {
            let Some(bucket) = entry
                .name
                .strip_suffix(SUFFIX)
                .and_then(|b| b.parse::<u64>().ok())
            else {
                continue;
            };
            // Counted, not kept: 16 bytes an entry to read, none to hold.
            let file = dir.join(&entry.name);
            let bytes = fs.read(&file).map_err(StoreError::io(&file))?;
            let unfired = bytes
                .chunks_exact(ENTRY)
                .filter(|e| be64(&e[..8]) > checkpoint.fired_through)
                .count();
            far.insert(bucket, unfired as u64);
        }
        Ok(Some(TimerLog::with(fs, dir, checkpoint, far)))
    }

    fn with(fs: &FsRef, dir: PathBuf, durable: Checkpoint, far: BTreeMap<u64, u64>) -> TimerLog {
        TimerLog {
            fs: fs.clone(),
            dir,
            durable,
            near: BTreeSet::new(),
            loaded_end: 0,
            files: far.keys().copied().collect(),
            far,
            dirty: BTreeSet::new(),
            open: HashMap::new(),
            fired_before_crash: HashSet::new(),
        }
    }

    /// The last durable checkpoint.
    pub fn checkpoint_in_force(&self) -> Checkpoint {
        self.durable
    }

    /// Names records whose copies a crash left in the log past the checkpoint: their
    /// entries are dropped, now and when their buckets load.
    pub fn fired_before_crash(&mut self, originals: impl IntoIterator<Item = u64>) {
        self.fired_before_crash.extend(originals);
        let gone = &self.fired_before_crash;
        self.near.retain(|(_, offset)| !gone.contains(offset));
    }

    /// Delayed messages not yet fired (approximate after a crash until their buckets load).
    pub fn pending(&self) -> u64 {
        self.near.len() as u64 + self.far.values().sum::<u64>()
    }

    /// Adds entries: written to their bucket files (unsynced until the next checkpoint) and,
    /// when their bucket is loaded, to memory. `durable: false` keeps them in memory only:
    /// for entries the next log scan after a crash would find again anyway.
    pub fn add(&mut self, entries: &[Entry], durable: bool) -> Result<(), StoreError> {
        let mut by_bucket: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for &(at, offset) in entries {
            if self.fired_before_crash.contains(&offset) {
                continue;
            }
            let bucket = bucket_of(at);
            // Memory-only entries have no file to load them from later.
            if bucket < self.loaded_end || !durable {
                self.near.insert((at, offset));
            } else {
                *self.far.entry(bucket).or_default() += 1;
            }
            if durable {
                let bytes = by_bucket.entry(bucket).or_default();
                bytes.extend_from_slice(&at.to_be_bytes());
                bytes.extend_from_slice(&offset.to_be_bytes());
            }
        }
        for (bucket, bytes) in by_bucket {
            let (file, len) = match self.open.get(&bucket) {
                Some(open) => open.clone(),
                None => {
                    if self.open.len() >= MAX_OPEN {
                        // Closed unsynced; `sync` opens it again.
                        self.open.clear();
                    }
                    let path = self.bucket_path(bucket);
                    let file = self
                        .fs
                        .open(&path, Open::OrCreate)
                        .map_err(StoreError::io(&path))?;
                    // A torn entry at the end is cut off by writing whole ones over it.
                    let len = file.len().map_err(StoreError::io(&path))?;
                    (file, len - len % ENTRY as u64)
                }
            };
            file.write_all_at(&bytes, len)
                .map_err(StoreError::io(&self.bucket_path(bucket)))?;
            self.open.insert(bucket, (file, len + bytes.len() as u64));
            self.dirty.insert(bucket);
        }
        Ok(())
    }

    /// Makes every entry added so far durable (syncs the files written to since the last
    /// time). Costs one sync per bucket file written to.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        let mut new_files = false;
        for bucket in std::mem::take(&mut self.dirty) {
            let path = self.bucket_path(bucket);
            let file = match self.open.get(&bucket) {
                Some((file, _)) => file.clone(),
                None => self
                    .fs
                    .open(&path, Open::Existing)
                    .map_err(StoreError::io(&path))?,
            };
            file.sync_data().map_err(StoreError::io(&path))?;
            new_files |= self.files.insert(bucket);
        }
        if new_files {
            // A new bucket file's name must be durable before a checkpoint counts on it.
            self.fs
                .sync_dir(&self.dir)
                .map_err(StoreError::io(&self.dir))?;
        }
        Ok(())
    }

    /// Loads every bucket that starts before `until` (ms) into memory.
    fn load_until(&mut self, until: u64) -> Result<(), StoreError> {
        let end = bucket_of(until) + 1;
        while let Some((&bucket, _)) = self.far.first_key_value() {
            if bucket >= end {
                break;
            }
            self.far.remove(&bucket);
            let path = self.bucket_path(bucket);
            let bytes = match self.fs.read(&path) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(StoreError::io(&path)(e)),
            };
            for chunk in bytes.chunks_exact(ENTRY) {
                let (at, offset) = (be64(&chunk[..8]), be64(&chunk[8..]));
                if at > self.durable.fired_through && !self.fired_before_crash.contains(&offset) {
                    self.near.insert((at, offset));
                }
            }
        }
        self.loaded_end = self.loaded_end.max(end);
        Ok(())
    }

    /// Takes up to `max` entries due at or before `now` (ms), earliest first, loading the
    /// bucket about to start first.
    pub fn take_due(&mut self, now: u64, max: usize) -> Result<Vec<Entry>, StoreError> {
        self.load_until(now.saturating_add(LOAD_AHEAD_MS))?;
        let mut due = Vec::new();
        while due.len() < max {
            match self.near.first() {
                Some(&(at, _)) if at <= now => {}
                _ => break,
            }
            if let Some(entry) = self.near.pop_first() {
                due.push(entry);
            }
        }
        Ok(due)
    }

    /// Puts entries taken by [`take_due`](Self::take_due) back (their firing failed).
    pub fn put_back(&mut self, entries: &[Entry]) {
        self.near.extend(entries.iter().copied());
    }

    /// When the earliest entry comes due (ms): exact for a loaded one, a little before the
    /// start of its bucket otherwise (when it must be loaded).
    pub fn next_due(&self) -> Option<u64> {
        self.next_due_but(&BTreeSet::new())
    }

    /// Like [`next_due`](Self::next_due), leaving out the entries of the records `but`.
    pub fn next_due_but(&self, but: &BTreeSet<u64>) -> Option<u64> {
        let near = self
            .near
            .iter()
            .find(|(_, offset)| !but.contains(offset))
            .map(|&(at, _)| at);
        let far = self
            .far
            .keys()
            .next()
            .map(|b| (b * BUCKET_MS).saturating_sub(LOAD_AHEAD_MS));
        near.into_iter().chain(far).min()
    }

    /// Writes `checkpoint` durably (the caller has [`sync`](Self::sync)ed what its
    /// `indexed` counts on) and deletes the bucket files it makes useless.
    pub fn checkpoint(&mut self, checkpoint: Checkpoint) -> Result<(), StoreError> {
        write_checkpoint(&self.fs, &self.dir, &checkpoint)?;
        self.durable = checkpoint;
        // Every entry of a loaded bucket that ends at or before `fired_through` is fired.
        let spent_end = bucket_of(checkpoint.fired_through.saturating_add(1)).min(self.loaded_end);
        let spent: Vec<u64> = self
            .files
            .range(..spent_end)
            .copied()
            .filter(|b| !self.dirty.contains(b))
            .collect();
        for &bucket in &spent {
            self.open.remove(&bucket);
            let path = self.bucket_path(bucket);
            match self.fs.remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(StoreError::io(&path)(e));
                }
                _ => {
                    self.files.remove(&bucket);
                }
            }
        }
        if !spent.is_empty() {
            self.fs
                .sync_dir(&self.dir)
                .map_err(StoreError::io(&self.dir))?;
        }
        Ok(())
    }

    fn bucket_path(&self, bucket: u64) -> PathBuf {
        self.dir.join(format!("{bucket}{SUFFIX}"))
    }
}

fn write_checkpoint(fs: &FsRef, dir: &Path, checkpoint: &Checkpoint) -> Result<(), StoreError> {
    let path = dir.join(CHECKPOINT);
    let bytes = rmp_serde::to_vec_named(checkpoint)
        .map_err(|e| StoreError::io(&path)(std::io::Error::other(e)))?;
    write_durably(&**fs, &path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::OsFs;

    const DAY: u64 = 86_400_000;

    fn reopen(dir: &Path) -> TimerLog {
        TimerLog::open(&OsFs::shared(), dir)
            .unwrap()
            .expect("index")
    }

    #[test]
    fn only_buckets_about_to_come_due_are_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = TimerLog::create(&OsFs::shared(), dir.path(), 0).unwrap();
        let now = 1_000 * DAY;
        // 20 000 entries spread over the next 40 days, and 3 due within a second.
        let far: Vec<Entry> = (0..20_000u64)
            .map(|i| (now + 2 * BUCKET_MS + i * (40 * DAY / 20_000), i + 10))
            .collect();
        log.add(&far, true).unwrap();
        log.sync().unwrap();
        log.add(&[(now + 900, 2), (now + 100, 1), (now + 500, 0)], true)
            .unwrap();
        assert_eq!(log.pending(), 20_003);
        assert_eq!(log.take_due(now, 10).unwrap(), [], "nothing due yet");
        assert_eq!(log.near.len(), 3, "the far entries stay on disk");
        assert_eq!(log.next_due(), Some(now + 100));
        assert_eq!(
            log.take_due(now + 600, 10).unwrap(),
            [(now + 100, 1), (now + 500, 0)],
            "in time order"
        );
        assert_eq!(log.take_due(now + 1_000, 1).unwrap(), [(now + 900, 2)]);
        assert_eq!(log.pending(), 20_000);
        // A month later the month's entries come due, not the rest.
        let later = now + 30 * DAY;
        let due = log.take_due(later, usize::MAX).unwrap();
        assert!(due.windows(2).all(|w| w[0] <= w[1]));
        assert!(due.iter().all(|&(at, _)| at <= later));
        assert!(log.near.len() < 200, "{} loaded", log.near.len());
        assert_eq!(due.len() as u64 + log.pending(), 20_000);
    }

    #[test]
    fn a_checkpoint_keeps_what_is_unfired_and_forgets_what_fired() {
        let dir = tempfile::tempdir().unwrap();
        let now = 500 * DAY;
        let mut log = TimerLog::create(&OsFs::shared(), dir.path(), 7).unwrap();
        log.add(&[(now + 10, 1), (now + 20, 2), (now + 5 * DAY, 3)], true)
            .unwrap();
        assert_eq!(log.take_due(now + 10, 10).unwrap(), [(now + 10, 1)]);
        let checkpoint = Checkpoint {
            indexed: 9,
            fired_through: now + 10,
        };
        log.sync().unwrap();
        log.checkpoint(checkpoint).unwrap();
        drop(log);

        let mut log = reopen(dir.path());
        assert_eq!(log.checkpoint_in_force(), checkpoint);
        assert_eq!(
            log.take_due(now + 5 * DAY, 10).unwrap(),
            [(now + 20, 2), (now + 5 * DAY, 3)],
            "the fired entry is not back"
        );
        // Firing everything and checkpointing past the end of its buckets deletes their
        // files.
        log.checkpoint(Checkpoint {
            fired_through: now + 6 * DAY,
            ..checkpoint
        })
        .unwrap();
        let left: Vec<_> = std::fs::read_dir(dir.path().join(TIMER_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.ends_with(SUFFIX))
            .collect();
        assert_eq!(left, Vec::<String>::new());
        assert_eq!(reopen(dir.path()).pending(), 0);
    }

    /// On the simulated disk, cut by power loss at every point of a sync and a checkpoint:
    /// what a checkpoint says is on disk, and every entry synced before it is there.
    #[test]
    fn a_power_loss_keeps_what_the_checkpoint_counts_on() {
        use crate::store::simdisk::{Rng, SimDisk};
        let now = 10 * DAY;
        let synced: Vec<Entry> = (0..50).map(|i| (now + i * 7 * BUCKET_MS / 3, i)).collect();
        let later: Vec<Entry> = (50..80).map(|i| (now + i * BUCKET_MS / 5, i)).collect();
        let mut rng = Rng::new(7);
        for cut in 0..40 {
            let disk = SimDisk::new();
            let fs = disk.fs();
            let dir = Path::new("/mq");
            fs.create_dir_all(dir).unwrap();
            // The MQ's directory is durable before its timer index is made.
            fs.sync_dir(Path::new("/")).unwrap();
            let mut log = TimerLog::create(&fs, dir, 0).unwrap();
            log.add(&synced, true).unwrap();
            log.sync().unwrap();
            let first = Checkpoint {
                indexed: 50,
                fired_through: 0,
            };
            log.checkpoint(first).unwrap();
            disk.cut_after(cut);
            let second = Checkpoint {
                indexed: 80,
                fired_through: 0,
            };
            let finished = log
                .add(&later, true)
                .and_then(|()| log.sync())
                .and_then(|()| log.checkpoint(second))
                .is_ok();
            let mut log = TimerLog::open(&disk.crash(&mut rng).fs(), dir)
                .unwrap()
                .expect("the index is there");
            let found = log.checkpoint_in_force();
            assert!(found == first || found == second, "cut {cut}: {found:?}");
            if finished {
                assert_eq!(found, second, "cut {cut}: a finished checkpoint is durable");
            }
            let due: BTreeSet<Entry> = log
                .take_due(u64::MAX / 2, usize::MAX)
                .unwrap()
                .into_iter()
                .collect();
            let counted: Vec<Entry> = if found == second {
                synced.iter().chain(&later).copied().collect()
            } else {
                synced.clone()
            };
            for entry in counted {
                assert!(
                    due.contains(&entry),
                    "cut {cut}: {entry:?} lost ({found:?})"
                );
            }
        }
    }

    #[test]
    fn entries_fired_before_a_crash_are_not_fired_again() {
        let dir = tempfile::tempdir().unwrap();
        let now = 100 * DAY;
        let mut log = TimerLog::create(&OsFs::shared(), dir.path(), 0).unwrap();
        log.add(&[(now, 1), (now + 1, 2), (now + 2, 3)], true)
            .unwrap();
        log.sync().unwrap();
        log.checkpoint(Checkpoint::default()).unwrap();
        // A torn entry at the end of a file is ignored and written over.
        let file = dir
            .path()
            .join(TIMER_DIR)
            .join(format!("{}{SUFFIX}", bucket_of(now)));
        let mut bytes = std::fs::read(&file).unwrap();
        bytes.extend_from_slice(&[1, 2, 3]);
        std::fs::write(&file, &bytes).unwrap();
        drop(log);

        let mut log = reopen(dir.path());
        log.fired_before_crash([2]);
        log.add(&[(now + 3, 4)], true).unwrap();
        assert_eq!(
            log.take_due(now + 10, 10).unwrap(),
            [(now, 1), (now + 2, 3), (now + 3, 4)]
        );
        // An entry kept in memory only (the log has it) still comes due.
        log.add(&[(now + 4, 5)], false).unwrap();
        assert_eq!(log.take_due(now + 10, 10).unwrap(), [(now + 4, 5)]);
        log.put_back(&[(now + 4, 5)]);
        assert_eq!(log.next_due(), Some(now + 4));
    }
}
