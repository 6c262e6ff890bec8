//! The transaction log: every transaction's begin, half messages and decision, appended to
//! one file per broker (`<store>/.txn/log`), so that pending transactions (with their half
//! messages and deadlines) and decided-but-unapplied commits come back after a crash.
//!
//! Entries follow each other: `u32 len | u32 crc | payload` (big-endian; `crc` is CRC-32 of
//! the payload), payload `u8 kind | u64 txn | body`. Appends are synced before they are
//! acknowledged under `--fsync always`, by one writer thread that syncs concurrent appends
//! together ([`TxnLogWriter`](super::txn_log_writer::TxnLogWriter)). At open the file is read up to the first entry that
//! is torn or damaged (a power cut mid-append), and cut there: everything before was
//! acknowledged, nothing after was. [`TxnLog::rewrite`] replaces the file by the entries of
//! the transactions still open (compaction), durably, so it does not grow forever.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::fsio::{sync_parent, write_durably, FileIo, Open};
use super::{FsRef, StoreError};

/// The log's directory inside the store (a dot: no MQ may be named so).
pub const TXN_DIR: &str = ".txn";
const FILE: &str = "log";
/// Largest entry accepted when reading (an entry is at most one request's records).
const MAX_ENTRY: usize = 1 << 30;
const HEAD: usize = 8;

/// One thing that happened to a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Began, with its options (MessagePack of the broker's begin record).
    Begin { txn: u64, options: Vec<u8> },
    /// Half messages for `mq`: whole records, back to back.
    Half {
        txn: u64,
        mq: String,
        records: Vec<u8>,
    },
    /// Decided: commit. Its messages are to be appended to their MQs.
    Commit { txn: u64 },
    /// Decided: roll back.
    Rollback { txn: u64 },
    /// A commit's messages are all in their MQs.
    Applied { txn: u64 },
    /// Every id up to `txn` was issued (first in a compacted log, so ids are never reused).
    Issued { txn: u64 },
}

impl Event {
    /// The transaction it concerns.
    pub fn txn(&self) -> u64 {
        match self {
            Event::Begin { txn, .. }
            | Event::Half { txn, .. }
            | Event::Commit { txn }
            | Event::Rollback { txn }
            | Event::Applied { txn }
            | Event::Issued { txn } => *txn,
        }
    }

    /// Appends the entry for this event to `dst`.
    pub fn encode(&self, dst: &mut Vec<u8>) {
        let mut payload = Vec::with_capacity(16);
        let (kind, body): (u8, &[u8]) = match self {
            Event::Begin { options, .. } => (1, options),
            Event::Half { .. } => (2, &[]),
            Event::Commit { .. } => (3, &[]),
            Event::Rollback { .. } => (4, &[]),
            Event::Applied { .. } => (5, &[]),
            Event::Issued { .. } => (6, &[]),
        };
        payload.push(kind);
        payload.extend_from_slice(&self.txn().to_be_bytes());
        if let Event::Half { mq, records, .. } = self {
            // MQ names are at most 128 bytes (validated before a half is accepted).
            payload.push(mq.len().min(255) as u8);
            payload.extend_from_slice(&mq.as_bytes()[..mq.len().min(255)]);
            payload.extend_from_slice(records);
        } else {
            payload.extend_from_slice(body);
        }
        dst.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        dst.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
        dst.extend_from_slice(&payload);
    }

    fn decode(payload: &[u8]) -> Option<Event> {
        let (&kind, rest) = payload.split_first()?;
        let txn = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
        let body = &rest[8..];
        Some(match kind {
            1 => Event::Begin {
                txn,
                options: body.to_vec(),
            },
            2 => {
                let (&len, rest) = body.split_first()?;
                let mq = std::str::from_utf8(rest.get(..usize::from(len))?).ok()?;
                Event::Half {
                    txn,
                    mq: mq.to_owned(),
                    records: rest[usize::from(len)..].to_vec(),
                }
            }
            3 => Event::Commit { txn },
            4 => Event::Rollback { txn },
            5 => Event::Applied { txn },
            6 => Event::Issued { txn },
            _ => return None,
        })
    }
}

/// Reads the entries at the start of `bytes`: the events, and the length of the intact
/// part (where a torn or damaged entry begins, or the end).
pub fn read_entries(bytes: &[u8]) -> (Vec<Event>, usize) {
    let mut events = Vec::new();
    let mut pos = 0;
    while let Some(head) = bytes.get(pos..pos + HEAD) {
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        if len > MAX_ENTRY {
            break;
        }
        let Some(payload) = bytes.get(pos + HEAD..pos + HEAD + len) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Some(event) = Event::decode(payload) else {
            break;
        };
        events.push(event);
        pos += HEAD + len;
    }
    (events, pos)
}

/// The open transaction log. Blocking I/O throughout.
pub struct TxnLog {
    fs: FsRef,
    path: PathBuf,
    file: Arc<dyn FileIo>,
    len: u64,
    /// Whether appends are synced (the broker's fsync policy is `always`).
    sync: bool,
}

impl TxnLog {
    /// Opens (or creates) the log in `store`, cuts a torn or damaged tail, and returns it
    /// with every intact event in order.
    pub fn open(fs: &FsRef, store: &Path, sync: bool) -> Result<(TxnLog, Vec<Event>), StoreError> {
        let dir = store.join(TXN_DIR);
        fs.create_dir_all(&dir).map_err(StoreError::io(&dir))?;
        sync_parent(&**fs, &dir)?;
        let path = dir.join(FILE);
        let bytes = match fs.read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(StoreError::io(&path)(e)),
        };
        let (events, intact) = read_entries(&bytes);
        let file = fs
            .open(&path, Open::OrCreate)
            .map_err(StoreError::io(&path))?;
        if intact < bytes.len() {
            tracing::warn!(
                file = %path.display(),
                at = intact,
                dropped = bytes.len() - intact,
                "transaction log: cut a torn or damaged tail"
            );
            file.set_len(intact as u64)
                .and_then(|()| file.sync_data())
                .map_err(StoreError::io(&path))?;
        }
        sync_parent(&**fs, &path)?;
        let log = TxnLog {
            fs: fs.clone(),
            path,
            file,
            len: intact as u64,
            sync,
        };
        Ok((log, events))
    }

    /// Appends entries already [encoded](Event::encode) (one write), synced when the policy
    /// says so. The [writer thread](super::txn_log_writer) joins concurrent appends into one.
    pub fn append_encoded(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let written = self.file.write_all_at(bytes, self.len).and_then(|()| {
            if self.sync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            // Whatever part reached the file is cut at the next open; the writer thread
            // writes nothing more after a failure (see its fail-stop).
            return Err(StoreError::io(&self.path)(e));
        }
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Replaces the log by `events` (those of the transactions still open), durably: a
    /// crash leaves the old file or the new one.
    pub fn rewrite(&mut self, events: &[Event]) -> Result<(), StoreError> {
        let mut bytes = Vec::new();
        for event in events {
            event.encode(&mut bytes);
        }
        write_durably(&*self.fs, &self.path, &bytes)?;
        self.file = self
            .fs
            .open(&self.path, Open::Existing)
            .map_err(StoreError::io(&self.path))?;
        self.len = bytes.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::simdisk::{Rng, SimDisk};
    use crate::store::testutil::sim_store;

    fn append(log: &mut TxnLog, events: &[Event]) {
        let mut bytes = Vec::new();
        for event in events {
            event.encode(&mut bytes);
        }
        log.append_encoded(&bytes).unwrap();
    }

    fn half(txn: u64, body: &str) -> Event {
        Event::Half {
            txn,
            mq: "orders".into(),
            records: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn events_round_trip_and_a_damaged_entry_ends_the_log() {
        let events = vec![
            Event::Begin {
                txn: 7,
                options: vec![0x80],
            },
            half(7, "debit"),
            Event::Commit { txn: 7 },
            Event::Applied { txn: 7 },
            Event::Rollback { txn: 8 },
        ];
        let mut bytes = Vec::new();
        for e in &events {
            e.encode(&mut bytes);
        }
        assert_eq!(read_entries(&bytes), (events.clone(), bytes.len()));
        // A torn tail: every prefix reads as the whole entries it holds.
        for cut in 0..bytes.len() {
            let (read, intact) = read_entries(&bytes[..cut]);
            assert!(intact <= cut);
            assert_eq!(read[..], events[..read.len()]);
        }
        // A flipped byte in the second entry: only the first survives.
        let first_len = {
            let mut one = Vec::new();
            events[0].encode(&mut one);
            one.len()
        };
        let mut damaged = bytes.clone();
        damaged[first_len + 10] ^= 0x40;
        assert_eq!(read_entries(&damaged), (events[..1].to_vec(), first_len));
    }

    #[test]
    fn a_power_cut_keeps_every_synced_append_and_cuts_the_torn_tail() {
        for seed in 0..40 {
            let disk = SimDisk::new();
            let store = sim_store(&disk);
            let (mut log, events) = TxnLog::open(&disk.fs(), store, true).unwrap();
            assert!(events.is_empty());
            let mut synced = Vec::new();
            for txn in 0..5 {
                let batch = [
                    Event::Begin {
                        txn,
                        options: Vec::new(),
                    },
                    half(txn, &"x".repeat(txn as usize * 100)),
                ];
                append(&mut log, &batch);
                synced.extend(batch);
            }
            // An unsynced append after the last synced one may be torn by the cut.
            log.sync = false;
            append(&mut log, &[Event::Commit { txn: 4 }]);
            let after = disk.crash(&mut Rng::new(seed));
            let (mut log, events) = TxnLog::open(&after.fs(), store, true).unwrap();
            assert!(events.starts_with(&synced), "seed {seed}: {events:?}");
            assert!(events.len() <= synced.len() + 1);
            // Appends go on after the cut, and read back after a restart.
            append(&mut log, &[Event::Rollback { txn: 3 }]);
            let (_, again) = TxnLog::open(&after.restart().fs(), store, true).unwrap();
            assert_eq!(
                again.last(),
                Some(&Event::Rollback { txn: 3 }),
                "seed {seed}"
            );
            assert!(again.starts_with(&synced));
        }
    }

    #[test]
    fn rewrite_keeps_only_what_it_is_given_durably() {
        let disk = SimDisk::new();
        let store = sim_store(&disk);
        let (mut log, _) = TxnLog::open(&disk.fs(), store, true).unwrap();
        append(
            &mut log,
            &[half(1, "a"), Event::Rollback { txn: 1 }, half(2, "b")],
        );
        log.rewrite(&[half(2, "b")]).unwrap();
        append(&mut log, &[Event::Commit { txn: 2 }]);
        let after = disk.crash(&mut Rng::new(1));
        let (_, events) = TxnLog::open(&after.fs(), store, true).unwrap();
        assert_eq!(events, [half(2, "b"), Event::Commit { txn: 2 }]);
    }
}
