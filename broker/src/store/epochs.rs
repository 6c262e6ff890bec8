//! Leader epochs (`docs/replication.md`, "Followers copy ahead of the leader's fsync").
//!
//! A leader serves its followers records it has written but not yet synced, so a power loss
//! of the leader can leave a follower holding records the leader lost, and the leader then
//! writes different records at those offsets. Every open of an MQ (its own, not a copy)
//! therefore starts a new epoch at the log's end, after syncing the log it recovered, and
//! records it in `epochs` before the MQ serves anything: records below an epoch's start
//! are on the leader's disk for good. A follower remembers the epoch it last followed
//! ([`write_followed`]); when the leader's epoch has moved on, the leader says where that
//! epoch ended ([`Epochs::answer`]) and the follower drops what its copy holds from there.

use std::path::Path;

use qbus_wire::protocol::{EpochAnswer, LeaderEpoch};
use serde::{Deserialize, Serialize};

use super::error::StoreError;
use super::fsio::{write_durably, Fs};

/// The leader's epoch history, in the MQ's directory.
const EPOCHS_FILE: &str = "epochs";
/// The epoch a follower's copy last followed, in the copy's directory.
const FOLLOWED_FILE: &str = "leader-epoch";
/// Epochs kept (one per open of the MQ); a follower whose epoch is older than all of them
/// is told it is unknown and resyncs.
const KEPT: usize = 1024;

/// An MQ's epoch history as its leader keeps it: `(epoch, first offset)` in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epochs {
    history: u64,
    starts: Vec<(u64, u64)>,
}

impl Epochs {
    /// Starts a new epoch of the MQ in `dir` at offset `end` and records it durably. The
    /// caller has synced the log up to `end`. An unreadable history starts a new one (a
    /// follower of the old one then resyncs: it can no longer be told what is safe).
    pub fn begin(fs: &dyn Fs, dir: &Path, end: u64) -> Result<Epochs, StoreError> {
        let path = dir.join(EPOCHS_FILE);
        let mut epochs = match fs.read(&path) {
            Ok(bytes) => rmp_serde::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %path.display(), error = %e, "unreadable epoch history: starting a new one");
                Epochs::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Epochs::default(),
            Err(e) => return Err(StoreError::io(&path)(e)),
        };
        if epochs.history == 0 {
            epochs = Epochs {
                history: rand::random::<u64>().max(1),
                starts: Vec::new(),
            };
        }
        let next = epochs.starts.last().map_or(1, |&(epoch, _)| epoch + 1);
        epochs.starts.push((next, end));
        if epochs.starts.len() > KEPT {
            epochs.starts.drain(..epochs.starts.len() - KEPT);
        }
        let bytes = rmp_serde::to_vec(&epochs)
            .map_err(|e| StoreError::io(&path)(std::io::Error::other(e)))?;
        write_durably(fs, &path, &bytes)?;
        Ok(epochs)
    }

    /// The epoch now.
    pub fn current(&self) -> LeaderEpoch {
        LeaderEpoch {
            history: self.history,
            epoch: self.starts.last().map_or(0, |&(epoch, _)| epoch),
        }
    }

    /// What a follower whose copy last followed `followed` is told: the epoch now and
    /// where `followed` ended.
    pub fn answer(&self, followed: LeaderEpoch) -> EpochAnswer {
        let current = self.current();
        let oldest = self.starts.first().map_or(0, |&(epoch, _)| epoch);
        let known =
            followed.history == self.history && (oldest..=current.epoch).contains(&followed.epoch);
        let ended_at = if known {
            self.starts
                .iter()
                .find(|&&(epoch, _)| epoch > followed.epoch)
                .map(|&(_, start)| start)
        } else {
            None
        };
        EpochAnswer {
            current,
            known,
            ended_at,
        }
    }
}

/// Whether a follower's copy holding offsets `first..end`, which last followed `followed`,
/// holds only records of its leader, whose log ends at `leader_end` and whose epoch
/// history gave `answer`: else the follower drops it and copies the leader afresh.
pub fn copy_is_leaders(
    followed: Option<LeaderEpoch>,
    answer: &EpochAnswer,
    (first, end): (u64, u64),
    leader_end: u64,
) -> bool {
    match followed {
        // Never followed an epoch: it took only records its leader had synced.
        None => true,
        Some(epoch) if epoch == answer.current => true,
        // Records from where that epoch ended on the leader are not the leader's.
        Some(_) if answer.known => answer.ended_at.is_none_or(|at| end <= at),
        // Nothing is known of its records (the leader's MQ was made anew, or restored).
        // One holding more than the leader is kept: following stops there, and it is what
        // a restore or an adoption takes.
        Some(_) => end == first || end > leader_end,
    }
}

/// The epoch the copy in `dir` last followed; `None` when it never followed an epoch (made
/// by an older broker, or new).
pub fn read_followed(fs: &dyn Fs, dir: &Path) -> Result<Option<LeaderEpoch>, StoreError> {
    let path = dir.join(FOLLOWED_FILE);
    match fs.read(&path) {
        Ok(bytes) => Ok(rmp_serde::from_slice(&bytes).ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io(&path)(e)),
    }
}

/// Records durably that the copy in `dir` follows `epoch` (before it appends any record
/// of it).
pub fn write_followed(fs: &dyn Fs, dir: &Path, epoch: LeaderEpoch) -> Result<(), StoreError> {
    let path = dir.join(FOLLOWED_FILE);
    let bytes =
        rmp_serde::to_vec(&epoch).map_err(|e| StoreError::io(&path)(std::io::Error::other(e)))?;
    write_durably(fs, &path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use qbus_wire::protocol::record::{encode_record, records};

    use crate::store::log::{LogConfig, MqLog};
    use crate::store::reader::LogReader;
    use crate::store::simdisk::{Rng, SimDisk};
    use crate::store::testutil::sim_store;

    /// Appends records with `bodies` to the leader's log, kept for readers (not synced).
    fn write(log: &mut MqLog, bodies: &[&str]) {
        let mut out = BytesMut::new();
        for body in bodies {
            encode_record(&mut out, 0, 0, None, None, body.as_bytes()).unwrap();
        }
        let appended = log.append(&mut out, 1).unwrap();
        log.keep_for_readers(appended.first_offset, appended.count, out.freeze());
    }

    /// Copies everything the leader wrote from `copy`'s end, synced there or not, as a
    /// follower agreed on the leader's epoch does; then syncs the copy.
    fn pull(leader: &LogReader, copy: &mut MqLog) {
        loop {
            let at = copy.next_offset();
            let batch = if at < leader.end_offset() {
                leader.read(at, None, 2, 1 << 20).unwrap()
            } else {
                match leader.read_written(at, 2, 1 << 20) {
                    Some(batch) => batch,
                    None => break,
                }
            };
            copy.append(&mut batch.data.to_vec(), 0).unwrap();
        }
        copy.sync().unwrap();
        copy.publish();
    }

    fn bodies(reader: &LogReader, from: u64) -> Vec<(u64, String)> {
        let batch = reader.read(from, None, 1_000, 1 << 20).unwrap();
        records(&batch.data)
            .map(|r| {
                let r = r.unwrap();
                (r.offset, String::from_utf8(r.body.to_vec()).unwrap())
            })
            .collect()
    }

    fn open_leader(disk: &SimDisk, dir: &Path) -> (MqLog, LogReader, Epochs) {
        let (mut log, reader) = MqLog::open(&disk.fs(), dir, LogConfig::default()).unwrap();
        log.sync_recovered().unwrap();
        disk.fs().sync_dir(crate::store::fsio::parent(dir)).unwrap();
        let epochs = Epochs::begin(&*disk.fs(), dir, log.next_offset()).unwrap();
        (log, reader, epochs)
    }

    fn open_copy(disk: &SimDisk, dir: &Path) -> (MqLog, LogReader) {
        MqLog::create_at(&disk.fs(), dir, 0).unwrap();
        disk.fs().sync_dir(dir).unwrap();
        disk.fs().sync_dir(crate::store::fsio::parent(dir)).unwrap();
        let copy = LogConfig {
            copy: true,
            ..LogConfig::default()
        };
        MqLog::open(&disk.fs(), dir, copy).unwrap()
    }

    #[test]
    fn a_follower_drops_the_records_its_leaders_power_loss_took() {
        let mut rng = Rng::new(15);
        let (leader_disk, copy_disk) = (SimDisk::new(), SimDisk::new());
        let store = sim_store(&leader_disk);
        sim_store(&copy_disk);
        let (leader_dir, copy_dir) = (store.join("orders"), store.join("copy"));
        let (mut leader, leader_reader, first) = open_leader(&leader_disk, &leader_dir);
        // Five records synced (those a receipt may have confirmed), three only written.
        write(&mut leader, &["a0", "a1", "a2", "a3", "a4"]);
        leader.sync().unwrap();
        leader.publish();
        write(&mut leader, &["a5", "a6", "a7"]);
        let (mut copy, copy_reader) = open_copy(&copy_disk, &copy_dir);
        write_followed(&*copy_disk.fs(), &copy_dir, first.current()).unwrap();
        pull(&leader_reader, &mut copy);
        assert_eq!(
            copy.next_offset(),
            8,
            "the copy holds what the leader had not synced"
        );

        // The leader's machine loses power: its unsynced records go (some of them at
        // least), and it writes others at their offsets.
        drop((leader, leader_reader));
        let leader_disk = leader_disk.crash(&mut rng);
        let (mut leader, leader_reader, second) = open_leader(&leader_disk, &leader_dir);
        let restarted_at = leader.next_offset();
        assert!((5..8).contains(&restarted_at), "{restarted_at}");
        write(&mut leader, &["b", "b", "b", "b"]);
        leader.sync().unwrap();
        leader.publish();
        let leaders = bodies(&leader_reader, 0);
        // Pulling on from its end, the copy would hold other records at 5..8 than the
        // leader, with the leader's records from 8 on behind them.
        let at = restarted_at as usize;
        assert_ne!(bodies(&copy_reader, restarted_at)[0], leaders[at]);

        // With epochs: the leader says where the epoch the copy followed ended, and the
        // copy, holding records from there on, is dropped and copied afresh.
        let followed = read_followed(&*copy_disk.fs(), &copy_dir).unwrap();
        assert_eq!(followed, Some(first.current()));
        let answer = second.answer(first.current());
        assert_eq!(answer.ended_at, Some(restarted_at));
        let held = (0, copy.next_offset());
        assert!(!copy_is_leaders(
            followed,
            &answer,
            held,
            leader.next_offset()
        ));
        drop((copy, copy_reader));
        let fresh_dir = store.join("copy-afresh");
        let (mut copy, copy_reader) = open_copy(&copy_disk, &fresh_dir);
        write_followed(&*copy_disk.fs(), &fresh_dir, answer.current).unwrap();
        write(&mut leader, &["b"]);
        pull(&leader_reader, &mut copy);
        leader.sync().unwrap();
        leader.publish();
        // Byte for byte the leader's log, same offsets; every synced record is there.
        let (from_leader, from_copy) = (
            leader_reader.read(0, None, 1_000, 1 << 20).unwrap(),
            copy_reader.read(0, None, 1_000, 1 << 20).unwrap(),
        );
        assert_eq!(from_copy.count as u64, restarted_at + 5);
        assert_eq!(from_copy.data, from_leader.data);
        let kept: Vec<_> = bodies(&copy_reader, 0)
            .into_iter()
            .map(|(_, b)| b)
            .collect();
        assert_eq!(kept[..5], ["a0", "a1", "a2", "a3", "a4"]);
        assert!(kept[restarted_at as usize..].iter().all(|b| b == "b"));
        // Following the new epoch, it is the leader's.
        let now = Some(second.current());
        let held = (0, copy.next_offset());
        let end = leader.next_offset();
        assert!(copy_is_leaders(
            now,
            &second.answer(second.current()),
            held,
            end
        ));
    }

    #[test]
    fn every_open_starts_an_epoch_that_survives_a_power_loss() {
        let mut rng = Rng::new(15);
        let disk = SimDisk::new();
        let dir = sim_store(&disk);
        let first = Epochs::begin(&*disk.fs(), dir, 0).unwrap();
        let disk = disk.crash(&mut rng);
        let second = Epochs::begin(&*disk.fs(), dir, 5).unwrap();
        let disk = disk.crash(&mut rng);
        let third = Epochs::begin(&*disk.fs(), dir, 9).unwrap();
        assert_eq!(first.current().history, third.current().history);
        assert_eq!(third.current().epoch, 3);
        let asked = |epoch| LeaderEpoch {
            history: first.current().history,
            epoch,
        };
        assert_eq!(third.answer(asked(1)).ended_at, Some(5));
        assert_eq!(third.answer(asked(2)).ended_at, Some(9));
        assert_eq!(
            third.answer(asked(3)),
            EpochAnswer {
                current: third.current(),
                known: true,
                ended_at: None,
            }
        );
        assert!(
            !third.answer(asked(4)).known,
            "from the future: not this history"
        );
        let other = LeaderEpoch {
            history: second.current().history ^ 1,
            epoch: 1,
        };
        assert!(!third.answer(other).known, "another history");
    }
}
