//! The durable key set of one MQ: zbus's duplicate filter (`add_key` / `remove_key`, a
//! produce whose `key` is already present in its `key_group` is refused).
//!
//! Unlike dedupe ids, whose window ends by itself, a key stays until it is removed, so the
//! set cannot be rebuilt from the log's records (retention may have deleted them): it has a
//! file of its own, `<mq>/keys.log`, a list of changes replayed at open:
//!
//! - entry: `u32 length` of the payload, `u32` CRC-32 of the payload, payload = `u8` op
//!   (1 add, 2 remove the key, 3 remove the group, 4 remove every group), `u16` group
//!   length, group, key; big-endian. Every change is synced before it is answered.
//! - A torn or damaged entry ends the file: it and anything after it are cut off at open
//!   (only the last, unanswered change can be torn; damage further up loses the changes
//!   past it, which is said in the log).
//! - Once the file is over [`COMPACT_AT`] and twice the size of what it holds, it is
//!   replaced durably by one `add` per present key.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::fsio::{sync_parent, write_durably, FileIo, Open};
use super::{FsRef, StoreError};

/// The file's name inside its MQ's directory.
pub const KEY_LOG: &str = "keys.log";
/// Most keys one MQ holds; an add past it fails (so a peer cannot grow the broker freely).
pub const MAX_KEYS: usize = 1 << 20;
/// Longest group or key, in bytes.
pub const MAX_NAME: usize = 4096;
/// Size from which the file is compacted (when half of it or more is history).
const COMPACT_AT: u64 = 4 << 20;
const HEAD: usize = 8;

/// One change to the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change<'a> {
    /// Adds `key` to `group`.
    Add { group: &'a str, key: &'a str },
    /// Removes `key` from `group`.
    Remove { group: &'a str, key: &'a str },
    /// Removes every key of `group`.
    RemoveGroup { group: &'a str },
    /// Removes every key of every group.
    RemoveAll,
}

/// Why a change is refused before anything is written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A group or key name is longer than [`MAX_NAME`].
    #[error("a key or key group is {0} bytes long; at most {MAX_NAME} are allowed")]
    TooLong(usize),
    /// The set holds [`MAX_KEYS`] keys.
    #[error("the MQ holds {MAX_KEYS} keys, the most it may; remove some (remove_key) first")]
    Full,
    /// The file could not be written or synced.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The key set and its file.
#[derive(Debug)]
pub struct KeyLog {
    fs: FsRef,
    path: PathBuf,
    /// Open once the first change is written.
    file: Option<Arc<dyn FileIo>>,
    len: u64,
    groups: HashMap<String, HashSet<String>>,
    keys: usize,
    /// Bytes the present keys would take as entries.
    live_bytes: u64,
}

fn entry(change: Change<'_>) -> Vec<u8> {
    let (op, group, key) = match change {
        Change::Add { group, key } => (1u8, group, key),
        Change::Remove { group, key } => (2, group, key),
        Change::RemoveGroup { group } => (3, group, ""),
        Change::RemoveAll => (4, "", ""),
    };
    let payload_len = 3 + group.len() + key.len();
    let mut out = Vec::with_capacity(HEAD + payload_len);
    out.extend_from_slice(&(payload_len as u32).to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(op);
    out.extend_from_slice(&(group.len() as u16).to_be_bytes());
    out.extend_from_slice(group.as_bytes());
    out.extend_from_slice(key.as_bytes());
    let crc = crc32fast::hash(&out[HEAD..]);
    out[4..HEAD].copy_from_slice(&crc.to_be_bytes());
    out
}

/// The change an entry's payload holds, if it is well formed.
fn parse(payload: &[u8]) -> Option<Change<'_>> {
    let (&op, rest) = payload.split_first()?;
    let group_len = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let group = std::str::from_utf8(rest.get(2..2 + group_len)?).ok()?;
    let key = std::str::from_utf8(rest.get(2 + group_len..)?).ok()?;
    Some(match op {
        1 => Change::Add { group, key },
        2 => Change::Remove { group, key },
        3 => Change::RemoveGroup { group },
        4 => Change::RemoveAll,
        _ => return None,
    })
}

fn entry_len(group: &str, key: &str) -> u64 {
    (HEAD + 3 + group.len() + key.len()) as u64
}

impl KeyLog {
    /// Opens the key set of the MQ in `mq_dir` (empty when it never had one), cutting off a
    /// torn or damaged end. Blocking.
    pub fn open(fs: &FsRef, mq_dir: &Path) -> Result<KeyLog, StoreError> {
        let path = mq_dir.join(KEY_LOG);
        let mut log = KeyLog {
            fs: fs.clone(),
            path: path.clone(),
            file: None,
            len: 0,
            groups: HashMap::new(),
            keys: 0,
            live_bytes: 0,
        };
        let bytes = match fs.read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(log),
            Err(e) => return Err(StoreError::io(&path)(e)),
        };
        let mut at = 0;
        while let Some(head) = bytes.get(at..at + HEAD) {
            let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
            let crc = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
            let Some(payload) = bytes.get(at + HEAD..at + HEAD + len) else {
                break;
            };
            if crc32fast::hash(payload) != crc {
                break;
            }
            let Some(change) = parse(payload) else { break };
            log.apply(change);
            at += HEAD + len;
        }
        let file = fs
            .open(&path, Open::Existing)
            .map_err(StoreError::io(&path))?;
        if at < bytes.len() {
            tracing::warn!(
                file = %path.display(),
                kept = at,
                cut = bytes.len() - at,
                "key set: a torn or damaged end was cut off"
            );
            file.set_len(at as u64).map_err(StoreError::io(&path))?;
            file.sync_data().map_err(StoreError::io(&path))?;
        }
        log.len = at as u64;
        log.file = Some(file);
        Ok(log)
    }

    /// Whether `key` is present in `group`.
    pub fn contains(&self, group: &str, key: &str) -> bool {
        self.groups
            .get(group)
            .is_some_and(|keys| keys.contains(key))
    }

    /// Keys held, over all groups.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.keys
    }

    /// Makes `change` durable and applies it; returns how many keys it added or removed
    /// (an add of a present key, or a removal of an absent one, writes nothing and
    /// returns 0). Blocking.
    pub fn change(&mut self, change: Change<'_>) -> Result<u64, KeyError> {
        let changed = match change {
            Change::Add { group, key } => {
                let longest = group.len().max(key.len());
                if longest > MAX_NAME {
                    return Err(KeyError::TooLong(longest));
                }
                if self.contains(group, key) {
                    return Ok(0);
                }
                if self.keys >= MAX_KEYS {
                    return Err(KeyError::Full);
                }
                1
            }
            Change::Remove { group, key } => u64::from(self.contains(group, key)),
            Change::RemoveGroup { group } => self.groups.get(group).map_or(0, |k| k.len() as u64),
            Change::RemoveAll => self.keys as u64,
        };
        if changed == 0 {
            return Ok(0);
        }
        self.write(&entry(change))?;
        self.apply(change);
        if self.len > COMPACT_AT && self.len > 2 * self.live_bytes {
            self.compact()?;
        }
        Ok(changed)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let path = &self.path;
        let file = match &self.file {
            Some(file) => file.clone(),
            None => {
                let file = self
                    .fs
                    .open(path, Open::OrCreate)
                    .map_err(StoreError::io(path))?;
                // The new name must be durable before a change in it is answered.
                sync_parent(&*self.fs, path)?;
                self.file = Some(file.clone());
                file
            }
        };
        let written = file
            .write_all_at(bytes, self.len)
            .and_then(|()| file.sync_data());
        if let Err(e) = written {
            // What was written past `len` is not counted: the next write goes over it, and
            // an open cuts it off if it is torn.
            return Err(StoreError::io(path)(e));
        }
        self.len += bytes.len() as u64;
        Ok(())
    }

    fn apply(&mut self, change: Change<'_>) {
        match change {
            Change::Add { group, key } => {
                if self
                    .groups
                    .entry(group.to_owned())
                    .or_default()
                    .insert(key.to_owned())
                {
                    self.keys += 1;
                    self.live_bytes += entry_len(group, key);
                }
            }
            Change::Remove { group, key } => {
                if let Some(keys) = self.groups.get_mut(group) {
                    if keys.remove(key) {
                        self.keys -= 1;
                        self.live_bytes -= entry_len(group, key);
                    }
                    if keys.is_empty() {
                        self.groups.remove(group);
                    }
                }
            }
            Change::RemoveGroup { group } => {
                if let Some(keys) = self.groups.remove(group) {
                    self.keys -= keys.len();
                    self.live_bytes -= keys.iter().map(|k| entry_len(group, k)).sum::<u64>();
                }
            }
            Change::RemoveAll => {
                self.groups.clear();
                self.keys = 0;
                self.live_bytes = 0;
            }
        }
    }

    /// Replaces the file by one add per present key.
    fn compact(&mut self) -> Result<(), StoreError> {
        let mut bytes = Vec::with_capacity(self.live_bytes as usize);
        for (group, keys) in &self.groups {
            for key in keys {
                bytes.extend_from_slice(&entry(Change::Add { group, key }));
            }
        }
        write_durably(&*self.fs, &self.path, &bytes)?;
        self.file = Some(
            self.fs
                .open(&self.path, Open::Existing)
                .map_err(StoreError::io(&self.path))?,
        );
        self.len = bytes.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fsio::OsFs;
    use crate::store::simdisk::{Rng, SimDisk};

    fn add<'a>(group: &'a str, key: &'a str) -> Change<'a> {
        Change::Add { group, key }
    }

    #[test]
    fn adds_and_removals_come_back_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let fs = OsFs::shared();
        let mut log = KeyLog::open(&fs, dir.path()).unwrap();
        assert_eq!(log.change(add("g", "a")).unwrap(), 1);
        assert_eq!(log.change(add("g", "a")).unwrap(), 0, "present: refused");
        assert_eq!(log.change(add("g", "b")).unwrap(), 1);
        assert_eq!(log.change(add("", "a")).unwrap(), 1, "another group");
        assert_eq!(log.change(add("h", "x")).unwrap(), 1);
        let remove = Change::Remove {
            group: "g",
            key: "a",
        };
        assert_eq!(log.change(remove).unwrap(), 1);
        assert_eq!(log.change(remove).unwrap(), 0);
        assert_eq!(log.change(Change::RemoveGroup { group: "h" }).unwrap(), 1);
        drop(log);
        let mut log = KeyLog::open(&fs, dir.path()).unwrap();
        assert!(!log.contains("g", "a") && log.contains("g", "b") && log.contains("", "a"));
        assert!(!log.contains("h", "x"));
        assert_eq!(log.len(), 2);
        assert_eq!(log.change(Change::RemoveAll).unwrap(), 2);
        assert_eq!(KeyLog::open(&fs, dir.path()).unwrap().len(), 0);
    }

    #[test]
    fn a_torn_or_damaged_end_is_cut_off_and_written_over() {
        let dir = tempfile::tempdir().unwrap();
        let fs = OsFs::shared();
        let mut log = KeyLog::open(&fs, dir.path()).unwrap();
        log.change(add("g", "kept")).unwrap();
        log.change(add("g", "torn")).unwrap();
        drop(log);
        let path = dir.path().join(KEY_LOG);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
        let mut log = KeyLog::open(&fs, dir.path()).unwrap();
        assert!(log.contains("g", "kept") && !log.contains("g", "torn"));
        log.change(add("g", "after")).unwrap();
        drop(log);
        // A flipped byte in the last entry: that entry goes, the rest stays.
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();
        let log = KeyLog::open(&fs, dir.path()).unwrap();
        assert!(log.contains("g", "kept") && !log.contains("g", "after"));
        assert_eq!(log.len(), 1);
    }

    #[test]
    fn limits_refuse_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = KeyLog::open(&OsFs::shared(), dir.path()).unwrap();
        let long = "k".repeat(MAX_NAME + 1);
        assert!(matches!(
            log.change(add("g", &long)),
            Err(KeyError::TooLong(n)) if n == MAX_NAME + 1
        ));
        assert!(!dir.path().join(KEY_LOG).exists());
    }

    #[test]
    fn compaction_keeps_exactly_the_present_keys() {
        let dir = tempfile::tempdir().unwrap();
        let fs = OsFs::shared();
        let mut log = KeyLog::open(&fs, dir.path()).unwrap();
        let big = "x".repeat(2000);
        // Churn well past COMPACT_AT: each round adds and removes one big key.
        for i in 0..3000 {
            let key = format!("{big}{i}");
            log.change(add("churn", &key)).unwrap();
            log.change(Change::Remove {
                group: "churn",
                key: &key,
            })
            .unwrap();
            if i % 100 == 0 {
                log.change(add("stay", &i.to_string())).unwrap();
            }
        }
        let size = std::fs::metadata(dir.path().join(KEY_LOG)).unwrap().len();
        assert!(size <= COMPACT_AT + 8192, "compacted: {size} bytes");
        drop(log);
        let log = KeyLog::open(&fs, dir.path()).unwrap();
        assert_eq!(log.len(), 30);
        assert!((0..3000)
            .step_by(100)
            .all(|i| log.contains("stay", &i.to_string())));
    }

    #[test]
    fn a_power_loss_keeps_every_answered_change() {
        let mut rng = Rng::new(11);
        for cut in 0..30 {
            let disk = SimDisk::new();
            let fs = disk.fs();
            let dir = Path::new("/mq");
            fs.create_dir_all(dir).unwrap();
            fs.sync_dir(Path::new("/")).unwrap();
            let mut log = KeyLog::open(&fs, dir).unwrap();
            disk.cut_after(cut);
            let mut answered = Vec::new();
            for i in 0..10 {
                let key = i.to_string();
                if log.change(add("g", &key)).is_ok() {
                    answered.push(key);
                } else {
                    break;
                }
            }
            let after = disk.crash(&mut rng);
            let log = KeyLog::open(&after.fs(), dir).unwrap();
            for key in &answered {
                assert!(log.contains("g", key), "cut {cut}: answered key {key} lost");
            }
        }
    }
}
