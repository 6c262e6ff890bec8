//! Delayed delivery: the timer of one MQ.
//!
//! A delayed record (one whose `deliver_at` is later than its append time) is stored in the
//! MQ's log like any other, with the same receipt and fsync; no group delivers it (a fetch
//! goes past it as past a record its tag filter leaves out). The MQ's timer tails the log,
//! notes each delayed record in its on-disk index ([`TimerLog`]), and when one comes due
//! appends a copy of it at the log's end, its `deliver_at` replaced by a mark naming the
//! original's offset. Every group then meets the copy in log order with everything its
//! cursor, acks, redeliveries and restarts already do: the copy's first delivery is
//! attempt 1, a group created later sees it like any record, nothing group-specific is kept.
//!
//! After a crash the timer indexes the log again from its last checkpoint and learns which
//! records it fired since from the marks of the copies past the checkpoint, so each delayed
//! record is copied once (unless a power loss takes a copy that an unsynced MQ acknowledged),
//! and those that came due while the broker was down are copied at once.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use qbus_wire::now_ms;
use qbus_wire::protocol::record::{
    encode_record_meta, records, RecordMeta, RecordRef, DELIVER_AT_COPY_MARK,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::blocking;
use super::group_commit::Committer;
use super::mq::Mq;
use crate::error::BrokerError;
use crate::store::timer_log::{Checkpoint, Entry};
use crate::store::{FsRef, LogReader, StoreError, TimerLog};

/// Most delayed records copied in one append.
const FIRE_BATCH: usize = 4096;
/// Most records read from the log per indexing step.
const INDEX_BATCH: usize = 8192;
const INDEX_BYTES: usize = 4 << 20;
/// How often the index is made durable while only indexing goes on.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Longest sleep between looks at the clock (a clock stepped forward is noticed this soon).
const MAX_SLEEP: Duration = Duration::from_millis(500);

/// The timer of one MQ: its index until the driver takes it, and what the MQ reports.
#[derive(Default)]
pub struct Timer {
    slot: tokio::sync::Mutex<Slot>,
    pending: Arc<AtomicU64>,
}

#[derive(Default)]
enum Slot {
    /// The MQ never had a delayed record.
    #[default]
    None,
    /// Opened with the MQ, not running yet.
    Ready(Box<TimerLog>),
    Running,
}

impl Timer {
    /// The timer of an MQ whose index `log` is (`None`: no delayed record so far).
    pub fn new(log: Option<TimerLog>) -> Timer {
        let pending = log.as_ref().map_or(0, TimerLog::pending);
        Timer {
            slot: tokio::sync::Mutex::new(log.map_or(Slot::None, |log| Slot::Ready(Box::new(log)))),
            pending: Arc::new(AtomicU64::new(pending)),
        }
    }

    /// Delayed records stored and not yet due.
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }
}

/// The running timers of a broker: stopped together, and waited for, so a broker that
/// shut down writes no timer index file afterwards (an embedding application may then
/// remove the store at once).
#[derive(Debug, Default)]
pub struct Timers {
    stop: CancellationToken,
    running: TaskTracker,
}

impl Timers {
    /// Stops every timer and waits until each has finished what it was writing.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.running.close();
        self.running.wait().await;
    }
}

/// Starts the timer of `mq` if it has an index and is not running.
pub async fn start(mq: &Arc<Mq>, committer: &Committer, stop: &Timers) {
    if mq.is_copy() {
        return;
    }
    let mut slot = mq.timer().slot.lock().await;
    if let Slot::Ready(_) = &*slot {
        if let Slot::Ready(log) = std::mem::replace(&mut *slot, Slot::Running) {
            spawn(mq, *log, committer, stop);
        }
    }
}

/// Makes sure `mq` has a durable timer index and a running timer, before a produce of
/// delayed records is staged: the index starts at the log's end, below any record not yet
/// appended.
pub async fn enable(
    mq: &Arc<Mq>,
    fs: &FsRef,
    committer: &Committer,
    stop: &Timers,
) -> Result<(), BrokerError> {
    if mq.is_copy() {
        // A copy takes no produce (the append is refused as read-only) and must not append
        // fired copies of its own: its leader does, and the copy pulls them.
        return Ok(());
    }
    let mut slot = mq.timer().slot.lock().await;
    match std::mem::replace(&mut *slot, Slot::Running) {
        Slot::Running => {}
        Slot::Ready(log) => spawn(mq, *log, committer, stop),
        Slot::None => {
            let (fs, dir, from) = (fs.clone(), mq.dir().to_owned(), mq.reader().end_offset());
            match blocking("timer index creation", move || {
                TimerLog::create(&fs, &dir, from)
            })
            .await
            {
                Ok(log) => spawn(mq, log, committer, stop),
                Err(e) => {
                    *slot = Slot::None;
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Gives the follower copy in `mq_dir`, about to become an MQ of this broker's own
/// (adopted or restored), a timer index over its whole log. A copy has none: it runs no
/// timer, because its leader fires the delayed records and the copy pulls the fired copies
/// with the rest. The timer's recovery then learns from the marks in the log which delayed
/// records the leader fired already, and fires the others. Blocking.
pub fn index_whole_log(fs: &FsRef, mq_dir: &Path) -> Result<(), StoreError> {
    TimerLog::create(fs, mq_dir, 0).map(drop)
}

/// Checks the delay fields of record number `index` of a produce; true when it is delayed.
pub fn check_produced(record: &RecordRef<'_>, index: u32) -> Result<bool, BrokerError> {
    match record.deliver_at {
        Some(at) if at & DELIVER_AT_COPY_MARK != 0 => Err(BrokerError::BadRequest(format!(
            "bad record {index}: deliver_at {at} is not a time (ms since the Unix epoch)"
        ))),
        Some(_) => Ok(true),
        None => Ok(false),
    }
}

fn spawn(mq: &Arc<Mq>, log: TimerLog, committer: &Committer, timers: &Timers) {
    let driver = Driver {
        mq: Arc::downgrade(mq),
        name: mq.name().to_owned(),
        reader: mq.reader().clone(),
        committer: committer.clone(),
        pending: mq.timer().pending.clone(),
        log: Arc::new(Mutex::new(log)),
        late: BTreeSet::new(),
        indexed: 0,
        synced: 0,
        fired_through: 0,
    };
    timers.running.spawn(driver.run(timers.stop.clone()));
}

struct Driver {
    mq: Weak<Mq>,
    name: String,
    reader: LogReader,
    committer: Committer,
    pending: Arc<AtomicU64>,
    log: Arc<Mutex<TimerLog>>,
    /// Offsets of records indexed after their entry's time had been checkpointed as fired
    /// through (they came due before the timer saw them): kept in memory only, so the
    /// checkpoint's `indexed` stays below them until they are fired.
    late: BTreeSet<u64>,
    /// Records below this offset are indexed.
    indexed: u64,
    /// Records below this offset are indexed durably (their entries synced).
    synced: u64,
    /// In force since the last checkpoint (see [`Checkpoint::fired_through`]).
    fired_through: u64,
}

/// What the driver does next.
enum Step {
    /// Indexed or fired something: look again at once.
    Busy,
    /// Nothing to do before this.
    Idle(Option<u64>),
}

impl Driver {
    async fn run(mut self, stop: CancellationToken) {
        if let Err(e) = self.recover().await {
            tracing::error!(mq = %self.name, error = %e, "delayed delivery stopped: cannot recover the timer index");
            return;
        }
        let mut end = self.reader.subscribe_end();
        let mut checkpointed = Instant::now();
        loop {
            if stop.is_cancelled() || self.mq.strong_count() == 0 {
                return;
            }
            end.borrow_and_update();
            let step = match self.step().await {
                Ok(step) => step,
                Err(e) => {
                    tracing::warn!(mq = %self.name, error = %e, "delayed delivery: retrying in 1 s");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.cancelled() => return,
                    }
                    continue;
                }
            };
            if self.indexed != self.synced && checkpointed.elapsed() >= CHECKPOINT_EVERY {
                if let Err(e) = self.checkpoint(true).await {
                    tracing::warn!(mq = %self.name, error = %e, "delayed delivery: cannot checkpoint the timer index");
                }
                checkpointed = Instant::now();
            }
            self.pending.store(
                self.log.lock().expect("timer log poisoned").pending(),
                Ordering::Relaxed,
            );
            let Step::Idle(next) = step else {
                continue;
            };
            let sleep = next.map_or(MAX_SLEEP, |at| {
                Duration::from_millis(at.saturating_sub(now_ms())).min(MAX_SLEEP)
            });
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                changed = end.changed() => if changed.is_err() { return },
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Takes up from the last checkpoint: the records it must not fire again are those whose
    /// copies lie past its `indexed` (see [`Checkpoint::indexed`]).
    async fn recover(&mut self) -> Result<(), BrokerError> {
        let checkpoint = self
            .log
            .lock()
            .expect("timer log poisoned")
            .checkpoint_in_force();
        self.indexed = checkpoint.indexed;
        self.synced = checkpoint.indexed;
        self.fired_through = checkpoint.fired_through;
        let (reader, log) = (self.reader.clone(), self.log.clone());
        blocking("timer recovery", move || {
            let mut from = checkpoint.indexed.max(reader.first_offset());
            let mut fired = Vec::new();
            while from < reader.end_offset() {
                let batch = match reader.read(from, None, INDEX_BATCH, INDEX_BYTES) {
                    Ok(batch) => batch,
                    Err(e) if e.is_damage() => {
                        from = reader.skip_damage(from)?.next_offset;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                for record in records(&batch.data).flatten() {
                    fired.extend(record.copy_of());
                }
                from = batch.next_offset;
            }
            log.lock()
                .expect("timer log poisoned")
                .fired_before_crash(fired);
            Ok(())
        })
        .await
    }

    async fn step(&mut self) -> Result<Step, BrokerError> {
        // Indexing and firing take turns, so a flood of delayed produces does not hold up
        // what comes due meanwhile.
        let indexing = self.indexed < self.reader.end_offset();
        if indexing {
            self.index().await?;
        }
        let now = now_ms();
        let log = self.log.clone();
        let due = blocking("timer index", move || {
            log.lock()
                .expect("timer log poisoned")
                .take_due(now, FIRE_BATCH)
        })
        .await?;
        if due.is_empty() {
            if indexing {
                return Ok(Step::Busy);
            }
            let next = self.log.lock().expect("timer log poisoned").next_due();
            return Ok(Step::Idle(next));
        }
        if let Err(e) = self.fire(&due).await {
            self.log.lock().expect("timer log poisoned").put_back(&due);
            return Err(e);
        }
        for (_, offset) in &due {
            self.late.remove(offset);
        }
        self.checkpoint(false).await?;
        Ok(Step::Busy)
    }

    /// Notes the delayed records of the next stretch of the log.
    async fn index(&mut self) -> Result<(), BrokerError> {
        let (reader, log) = (self.reader.clone(), self.log.clone());
        let (from, fired_through) = (self.indexed.max(reader.first_offset()), self.fired_through);
        let (next, late) = blocking("timer indexing", move || {
            // Right behind the producers: what was just written is still in memory.
            let read = match reader.read_recent(from, INDEX_BATCH, INDEX_BYTES) {
                Some(batch) => Ok(batch),
                None => reader.read(from, None, INDEX_BATCH, INDEX_BYTES),
            };
            let batch = match read {
                Ok(batch) => batch,
                Err(e) if e.is_damage() => {
                    // The readers of the groups report the damage; the timer only goes past.
                    return Ok((reader.skip_damage(from)?.next_offset, Vec::new()));
                }
                Err(e) => return Err(e),
            };
            let (mut entries, mut late) = (Vec::new(), Vec::new());
            for record in records(&batch.data) {
                let record = record.map_err(|reason| StoreError::Corrupt {
                    file: Default::default(),
                    position: 0,
                    reason,
                })?;
                if !record.is_pending_original() {
                    continue;
                }
                let entry = (record.deliver_at.unwrap_or_default(), record.offset);
                if entry.0 <= fired_through {
                    late.push(entry);
                } else {
                    entries.push(entry);
                }
            }
            let mut log = log.lock().expect("timer log poisoned");
            log.add(&entries, true)?;
            log.add(&late, false)?;
            Ok((batch.next_offset, late))
        })
        .await?;
        self.late.extend(late.iter().map(|&(_, offset)| offset));
        self.indexed = next;
        Ok(())
    }

    /// Appends the copies of the due records `due`, and waits until they are stored.
    async fn fire(&self, due: &[Entry]) -> Result<(), BrokerError> {
        let Some(mq) = self.mq.upgrade() else {
            return Ok(());
        };
        let reader = self.reader.clone();
        let wanted = due.to_vec();
        let name = self.name.clone();
        let (copies, count) = blocking("timer read", move || {
            let mut copies = BytesMut::new();
            let mut count = 0u32;
            for (at, offset) in wanted {
                let batch = match reader.read(offset, None, 1, 1) {
                    Ok(batch) if batch.count == 1 => batch,
                    Ok(_) => {
                        tracing::error!(mq = %name, offset, "delayed record deleted by retention before its time: not delivered");
                        continue;
                    }
                    Err(e) if e.is_damage() => {
                        tracing::error!(mq = %name, offset, error = %e, "delayed record damaged on disk: not delivered");
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let Some(Ok(record)) = records(&batch.data).next() else {
                    continue;
                };
                // An entry a crash left for a record the log's recovery cut off (and whose
                // offset a later record took) names a record that is not this one.
                if record.offset != offset
                    || !record.is_pending_original()
                    || record.deliver_at != Some(at)
                {
                    if record.offset > offset {
                        tracing::error!(mq = %name, offset, "delayed record deleted by retention before its time: not delivered");
                    }
                    continue;
                }
                let meta = RecordMeta {
                    deliver_at: Some(DELIVER_AT_COPY_MARK | offset),
                    ..record.meta()
                };
                encode_record_meta(&mut copies, 0, 0, &meta, record.body).map_err(|reason| {
                    StoreError::Corrupt {
                        file: Default::default(),
                        position: 0,
                        reason,
                    }
                })?;
                count += 1;
            }
            Ok((copies, count))
        })
        .await?;
        if count > 0 {
            mq.append(&self.committer, copies, count).await?;
        }
        Ok(())
    }

    /// Makes the index durable as it stands: every entry due up to `fired_through` is fired.
    /// With `sync_index`, also the entries added since the last time, so that the
    /// checkpoint's `indexed` moves on (costs a sync per bucket file written to).
    async fn checkpoint(&mut self, sync_index: bool) -> Result<(), BrokerError> {
        let now = now_ms();
        // Every fired entry but the late ones came due before the earliest unfired one.
        let next = self
            .log
            .lock()
            .expect("timer log poisoned")
            .next_due_but(&self.late);
        let fired_through = self
            .fired_through
            .max(next.map_or(now, |at| at.saturating_sub(1).min(now)));
        let indexed = if sync_index {
            self.indexed
        } else {
            self.synced
        };
        let checkpoint = Checkpoint {
            indexed: self.late.first().map_or(indexed, |&late| late.min(indexed)),
            fired_through,
        };
        let log = self.log.clone();
        blocking("timer checkpoint", move || {
            let mut log = log.lock().expect("timer log poisoned");
            if sync_index {
                log.sync()?;
            }
            log.checkpoint(checkpoint)
        })
        .await?;
        self.synced = indexed;
        self.fired_through = fired_through;
        Ok(())
    }
}
