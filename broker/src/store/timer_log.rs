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
//!   `indexed`, and learns what it fired since from the copies at the log's end.
//!
//! Memory: the buckets up to the one after the current time are loaded (a sorted set, about
//! 40 bytes an entry); later ones are a count per file. A million messages due next month
//! cost 16 MB of disk and next to no memory; a million due in the next two minutes cost
//! about 40 MB, which is what delivering them on time takes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::fsio::{sync_parent, write_durably, FileIo, Open};
use super::{FsRef, StoreError};

/// Width of one bucket file's time range, in ms (about 65 s).
pub const BUCKET_MS: u64 = 1 << 16;
const ENTRY: usize = 16;
const CHECKPOINT: &str = "checkpoint";
const SUFFIX: &str = ".tl";
/// The index's directory inside its MQ's.
pub const TIMER_DIR: &str = "timer";

/// What the index had made durable at its last checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Every delayed record below this offset (but for those due at or before
    /// `fired_through`) has its entry in a synced bucket file.
    pub indexed: u64,
    /// Every entry due at or before this time (ms) whose record lies below `indexed` has
    /// been fired: its copy is in the log, below `log_end`.
    pub fired_through: u64,
    /// The log's end when this was written: copies at or past it were made later.
    pub log_end: u64,
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
    /// Bucket files appended since the last checkpoint, with their length.
    open: HashMap<u64, (Arc<dyn FileIo>, u64)>,
    /// Records fired after the last checkpoint before a crash (their copies are in the
    /// log): not to fire again.
    fired_before_crash: HashSet<u64>,
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
            log_end: from,
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
            let file = dir.join(&entry.name);
            let len = fs
                .open(&file, Open::Existing)
                .and_then(|f| f.len())
                .map_err(StoreError::io(&file))?;
            far.insert(bucket, len / ENTRY as u64);
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
                let at = u64::from_be_bytes(chunk[..8].try_into().unwrap_or_default());
                let offset = u64::from_be_bytes(chunk[8..].try_into().unwrap_or_default());
                if at > self.durable.fired_through && !self.fired_before_crash.contains(&offset) {
                    self.near.insert((at, offset));
                }
            }
        }
        self.loaded_end = self.loaded_end.max(end);
        Ok(())
    }

    /// Takes up to `max` entries due at or before `now` (ms), earliest first, loading the
    /// buckets due within one bucket's width first.
    pub fn take_due(&mut self, now: u64, max: usize) -> Result<Vec<Entry>, StoreError> {
        self.load_until(now.saturating_add(BUCKET_MS))?;
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

    /// When the earliest entry comes due (ms): exact for a loaded one, the start of its
    /// bucket otherwise.
    pub fn next_due(&self) -> Option<u64> {
        let near = self.near.first().map(|&(at, _)| at);
        let far = self.far.keys().next().map(|b| b * BUCKET_MS);
        near.into_iter().chain(far).min()
    }

    /// Makes the entries added so far durable (syncs their files), then writes `checkpoint`
    /// durably and deletes the bucket files it makes useless.
    pub fn checkpoint(&mut self, checkpoint: Checkpoint) -> Result<(), StoreError> {
        let new_files = !self.open.is_empty();
        for (bucket, (file, _)) in self.open.drain() {
            file.sync_data()
                .map_err(StoreError::io(&self.dir.join(format!("{bucket}{SUFFIX}"))))?;
            self.files.insert(bucket);
        }
        if new_files {
            // A new bucket file's name must be durable before the checkpoint counts on it.
            self.fs
                .sync_dir(&self.dir)
                .map_err(StoreError::io(&self.dir))?;
        }
        write_checkpoint(&self.fs, &self.dir, &checkpoint)?;
        self.durable = checkpoint;
        // Every entry of a loaded bucket that ends at or before `fired_through` is fired.
        let spent_end = bucket_of(checkpoint.fired_through.saturating_add(1)).min(self.loaded_end);
        let spent: Vec<u64> = self.files.range(..spent_end).copied().collect();
        for &bucket in &spent {
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
