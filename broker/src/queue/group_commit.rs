//! Group commit: one thread writes every append and cursor update of every MQ, then fsyncs
//! each touched file once for the whole batch before any of them is acknowledged.
//!
//! While the thread is in `fsync`, new requests pile up in its queue and become the next
//! batch, so the number of fsyncs per second stays near the disk's limit however many
//! producers there are, and blocking file I/O never runs on the async reactor threads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use qbus_wire::now_ms;
use qbus_wire::protocol::Durability;
use tokio::sync::{mpsc, oneshot};

use crate::config::FsyncPolicy;
use crate::metrics::{LatencyHistogram, FSYNC_BUCKETS};
use crate::store::{Appended, CursorFile, MqLog, StoreError};

/// Shared handle on an MQ's log; only the commit thread writes through it.
pub type SharedLog = Arc<Mutex<MqLog>>;
/// Shared handle on a group's cursor file.
pub type SharedCursor = Arc<Mutex<CursorFile>>;

type AppendReply = oneshot::Sender<Result<(Appended, Durability), StoreError>>;

/// Most bytes of one MQ's appends joined into a single write.
const MAX_WRITE: usize = 8 << 20;
/// Under `--fsync always`, how long writes of unsynced MQs may wait for an fsync.
const UNSYNCED_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);
/// Most requests taken into one batch.
const MAX_BATCH: usize = 8192;
/// Requests that may wait for the commit thread before senders are made to wait.
const QUEUE: usize = 16 * 1024;

/// One append request: whole records for one log.
struct Append {
    log: SharedLog,
    records: BytesMut,
    /// Records in `records`, so appends can share one write and still get their offsets.
    count: u64,
    /// Whether the reply waits for the fsync (false: acknowledged once written).
    wait_sync: bool,
    reply: AppendReply,
}

/// One store of a group's cursor.
struct CursorStore {
    cursor: SharedCursor,
    /// Read when the job runs, so a newer value queued behind never loses to an older one.
    committed: Arc<AtomicU64>,
    wait_sync: bool,
    /// Every store of this cursor queued in a row shares one write: each acknowledged
    /// the group past what the one before did, and the write reads the newest value.
    replies: Vec<CursorReply>,
}

type CursorReply = oneshot::Sender<Result<Durability, StoreError>>;

/// What a [`CommitBatch`] holds.
enum Work {
    Append(Append),
    Cursor(CursorStore),
}

enum Job {
    /// Appends and cursor stores queued together (the requests of one burst), in order.
    Batch(Vec<Work>),
    Retain {
        log: SharedLog,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    /// Flushes everything written so far to disk, then replies.
    Sync(oneshot::Sender<Result<(), StoreError>>),
    /// Wakes the thread for a background fsync under `FsyncPolicy::Interval`.
    Tick,
    /// Finishes the batch, fsyncs everything and ends the thread.
    Stop,
}

/// Appends and cursor stores gathered to be handed to the commit thread together: a session
/// joins the produces, calls and acks of one read from its socket, so a burst of small
/// requests costs the thread one wake-up and each file one write.
///
/// Each item resolves its own wait once the batch is [submitted](Committer::submit) and the
/// item is as durable as the broker's fsync policy promises (or, with `wait_sync` false, once
/// written: for MQs whose messages are worth less than the fsync's latency, such as RPC
/// requests). A batch dropped unsubmitted fails its waits.
#[derive(Default)]
pub struct CommitBatch {
    work: Vec<Work>,
    bytes: usize,
}

impl CommitBatch {
    /// Adds whole, verified records for `log` (offsets are assigned by the commit thread);
    /// the wait resolves once they are durable and visible to consumers.
    pub fn append(
        &mut self,
        log: &SharedLog,
        records: BytesMut,
        count: u32,
        wait_sync: bool,
    ) -> StoreWait<(Appended, Durability)> {
        let (reply, wait) = oneshot::channel();
        self.bytes += records.len();
        self.work.push(Work::Append(Append {
            log: log.clone(),
            records,
            count: count.into(),
            wait_sync,
            reply,
        }));
        StoreWait(wait)
    }

    /// Adds a store of `cursor` with the value `committed` holds when the commit thread
    /// gets to it.
    pub fn store_cursor(
        &mut self,
        cursor: &SharedCursor,
        committed: &Arc<AtomicU64>,
        wait_sync: bool,
    ) -> StoreWait<Durability> {
        let (reply, wait) = oneshot::channel();
        if let Some(Work::Cursor(last)) = self.work.last_mut() {
            if Arc::ptr_eq(&last.cursor, cursor) && last.wait_sync == wait_sync {
                // The acks of a burst of RPC replies, one per frame: one write for all.
                last.replies.push(reply);
                return StoreWait(wait);
            }
        }
        self.work.push(Work::Cursor(CursorStore {
            cursor: cursor.clone(),
            committed: committed.clone(),
            wait_sync,
            replies: vec![reply],
        }));
        StoreWait(wait)
    }

    /// Bytes of records added so far.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// A write in progress on the commit thread.
pub struct StoreWait<T>(oneshot::Receiver<Result<T, StoreError>>);

/// An append in progress: resolves to its offsets and durability.
pub type AppendWait = StoreWait<(Appended, Durability)>;

impl<T> StoreWait<T> {
    /// A wait that has nothing to wait for.
    pub fn ready(value: T) -> StoreWait<T> {
        let (reply, wait) = oneshot::channel();
        let _ = reply.send(Ok(value));
        StoreWait(wait)
    }

    /// A wait that fails with `error` (a write refused before it was queued).
    pub fn failed(error: StoreError) -> StoreWait<T> {
        let (reply, wait) = oneshot::channel();
        let _ = reply.send(Err(error));
        StoreWait(wait)
    }

    /// Waits for the write to be durable (and an append's records visible).
    pub async fn wait(self) -> Result<T, StoreError> {
        self.0.await.map_err(|_| stopped())?
    }

    /// The outcome if the write is already done, without waiting; else `Err(self)`.
    pub fn done(mut self) -> Result<Result<T, StoreError>, StoreWait<T>> {
        match self.0.try_recv() {
            Ok(outcome) => Ok(outcome),
            Err(oneshot::error::TryRecvError::Empty) => Err(self),
            Err(oneshot::error::TryRecvError::Closed) => Ok(Err(stopped())),
        }
    }
}

/// Handle on the commit thread. Dropping every handle stops the thread after it has
/// finished and synced what was queued.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Job>,
    policy: FsyncPolicy,
    /// Time each batch spent in fsync, recorded by the commit thread.
    fsync: Arc<LatencyHistogram>,
}

/// The commit thread is gone (the broker is shutting down).
fn stopped() -> StoreError {
    StoreError::Io {
        path: "<commit thread>".into(),
        source: std::io::Error::other("the broker is shutting down"),
    }
}

impl Committer {
    /// Starts the commit thread (call inside a Tokio runtime).
    pub fn start(policy: FsyncPolicy) -> std::io::Result<(Committer, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let fsync = Arc::new(LatencyHistogram::new(FSYNC_BUCKETS));
        let timings = fsync.clone();
        let handle = std::thread::Builder::new()
            .name("qbus-commit".into())
            .spawn(move || run(rx, policy, &timings))?;
        if let FsyncPolicy::Interval(every) = policy {
            // A weak sender, so the ticker does not keep the thread alive after shutdown.
            let ticker = tx.downgrade();
            tokio::spawn(async move {
                let mut interval = tokio::time::interval(every);
                loop {
                    interval.tick().await;
                    let Some(tx) = ticker.upgrade() else { return };
                    if tx.send(Job::Tick).await.is_err() {
                        return;
                    }
                }
            });
        }
        Ok((Committer { tx, policy, fsync }, handle))
    }

    /// How long fsyncs take (one observation per batch that had files to sync).
    pub fn fsync_latency(&self) -> &LatencyHistogram {
        &self.fsync
    }

    /// What an acknowledgement promises under this broker's fsync policy.
    pub fn durability(&self) -> Durability {
        durability_of(self.policy)
    }

    /// Hands a batch to the thread with one message (and at most one wake-up). Queuing
    /// order is write order.
    pub async fn submit(&self, batch: CommitBatch) -> Result<(), StoreError> {
        if batch.work.is_empty() {
            return Ok(());
        }
        self.tx
            .send(Job::Batch(batch.work))
            .await
            .map_err(|_| stopped())
    }

    /// Stores a group cursor on its own and waits for it (see [`CommitBatch`]).
    pub async fn store_cursor(
        &self,
        cursor: &SharedCursor,
        committed: &Arc<AtomicU64>,
        wait_sync: bool,
    ) -> Result<Durability, StoreError> {
        let mut batch = CommitBatch::default();
        let wait = batch.store_cursor(cursor, committed, wait_sync);
        self.submit(batch).await?;
        wait.wait().await
    }

    /// Applies retention to a log; returns its new first offset.
    pub async fn retain(&self, log: &SharedLog) -> Result<u64, StoreError> {
        let (reply, wait) = oneshot::channel();
        let job = Job::Retain {
            log: log.clone(),
            reply,
        };
        self.tx.send(job).await.map_err(|_| stopped())?;
        wait.await.map_err(|_| stopped())?
    }

    /// Ends the commit thread after writing and fsyncing everything queued before this call.
    pub async fn stop(&self) {
        let _ = self.tx.send(Job::Stop).await;
    }

    /// Waits until everything queued before this call is written and fsynced.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let (reply, wait) = oneshot::channel();
        self.tx
            .send(Job::Sync(reply))
            .await
            .map_err(|_| stopped())?;
        wait.await.map_err(|_| stopped())?
    }
}

fn durability_of(policy: FsyncPolicy) -> Durability {
    if policy == FsyncPolicy::Always {
        Durability::Synced
    } else {
        Durability::Written
    }
}

/// Files written and not yet fsynced.
#[derive(Default)]
struct Dirty {
    logs: Vec<SharedLog>,
    cursors: Vec<SharedCursor>,
}

impl Dirty {
    fn add_log(&mut self, log: &SharedLog) {
        if !self.logs.iter().any(|l| Arc::ptr_eq(l, log)) {
            self.logs.push(log.clone());
        }
    }

    fn add_cursor(&mut self, cursor: &SharedCursor) {
        if !self.cursors.iter().any(|c| Arc::ptr_eq(c, cursor)) {
            self.cursors.push(cursor.clone());
        }
    }

    fn is_dirty(&self) -> bool {
        !self.logs.is_empty() || !self.cursors.is_empty()
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        let mut first_error = None;
        for log in self.logs.drain(..) {
            if let Err(e) = log.lock().expect("log lock poisoned").sync() {
                first_error.get_or_insert(e);
            }
        }
        for cursor in self.cursors.drain(..) {
            if let Err(e) = cursor.lock().expect("cursor lock poisoned").sync() {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Appends to one log gathered from a batch, written with one call.
struct Staged {
    log: SharedLog,
    records: BytesMut,
    waiters: Vec<(AppendReply, u64)>,
    wait_sync: bool,
}

/// What a batch wrote and owes replies for, finished together at one durability.
#[derive(Default)]
struct Outcomes {
    written: Vec<SharedLog>,
    done: Vec<Done>,
}

impl Outcomes {
    /// Makes the written records visible, then replies with `durability`; or, when the
    /// fsync failed, replies with its error and shows nothing: records whose sync failed
    /// may be gone after a crash, so no consumer may see them before a restart proves
    /// they are on disk.
    fn finish(&mut self, durability: Durability, synced: &Result<(), StoreError>) {
        for log in self.written.drain(..) {
            if synced.is_ok() {
                log.lock().expect("log lock poisoned").publish();
            }
        }
        let synced = || synced.as_ref().map(|_| ()).map_err(StoreError::duplicate);
        for item in self.done.drain(..) {
            match item {
                Done::Append(reply, result) => {
                    let result =
                        result.and_then(|appended| synced().map(|_| (appended, durability)));
                    let _ = reply.send(result);
                }
                Done::Cursor(replies, result) => {
                    for reply in replies {
                        let result = match &result {
                            Ok(()) => synced().map(|_| durability),
                            Err(e) => Err(e.duplicate()),
                        };
                        let _ = reply.send(result);
                    }
                }
                Done::Sync(reply) => {
                    let _ = reply.send(synced());
                }
            }
        }
    }
}

impl Staged {
    /// Writes the gathered records and hands each waiter its share of the offsets. A write
    /// that leaves the file in doubt halts the store (see [`Halt`]).
    fn write(
        self,
        now: u64,
        dirty: &mut Dirty,
        (synced, unsynced): (&mut Outcomes, &mut Outcomes),
        halt: &mut Halt,
    ) {
        let Staged {
            log,
            mut records,
            waiters,
            wait_sync,
        } = self;
        let Outcomes { written, done } = if wait_sync { synced } else { unsynced };
        let result = {
            let mut writer = log.lock().expect("log lock poisoned");
            let result = writer.append(&mut records, now);
            if let Ok(appended) = &result {
                writer.keep_for_readers(appended.first_offset, appended.count, records.freeze());
            }
            result
        };
        match result {
            Ok(appended) => {
                dirty.add_log(&log);
                written.push(log);
                let mut offset = appended.first_offset;
                for (reply, count) in waiters {
                    let share = Appended {
                        first_offset: offset,
                        count,
                        next_offset: offset + count,
                    };
                    offset += count;
                    done.push(Done::Append(reply, Ok(share)));
                }
            }
            Err(e) => {
                if let StoreError::Halted { cause } = &e {
                    halt.set(cause.clone());
                }
                for (reply, _) in waiters {
                    done.push(Done::Append(reply, Err(e.duplicate())));
                }
            }
        }
    }
}

/// Adds `append` to the write gathered for its log, first writing what is gathered if the
/// two would not fit in one write.
fn stage(
    staged: &mut Vec<Staged>,
    append: Append,
    now: u64,
    (dirty, synced, unsynced): (&mut Dirty, &mut Outcomes, &mut Outcomes),
    halt: &mut Halt,
) {
    let Append {
        log,
        records,
        count,
        wait_sync,
        reply,
    } = append;
    let at = staged.iter().position(|s| Arc::ptr_eq(&s.log, &log));
    if let Some(full) = at.filter(|&at| staged[at].records.len() + records.len() > MAX_WRITE) {
        staged
            .swap_remove(full)
            .write(now, dirty, (synced, unsynced), halt);
    }
    let at = match staged.iter().position(|s| Arc::ptr_eq(&s.log, &log)) {
        Some(at) => at,
        None => {
            staged.push(Staged {
                log,
                records: BytesMut::new(),
                waiters: Vec::new(),
                wait_sync,
            });
            staged.len() - 1
        }
    };
    let entry = &mut staged[at];
    if entry.records.is_empty() {
        entry.records = records;
    } else {
        entry.records.extend_from_slice(&records);
    }
    entry.waiters.push((reply, count));
}

/// Writes a cursor; its reply waits with the rest of its durability class.
fn store_cursor(
    store: CursorStore,
    dirty: &mut Dirty,
    synced: &mut Outcomes,
    unsynced: &mut Outcomes,
) {
    let CursorStore {
        cursor,
        committed,
        wait_sync,
        replies,
    } = store;
    let result = cursor
        .lock()
        .expect("cursor lock poisoned")
        .store(committed.load(Ordering::Acquire));
    if result.is_ok() {
        dirty.add_cursor(&cursor);
    }
    let outcomes = if wait_sync { synced } else { unsynced };
    outcomes.done.push(Done::Cursor(replies, result));
}

/// Fail-stop: after a failed fsync the kernel may have dropped the unsynced pages and
/// marked them clean, so a later fsync could succeed over a hole (PostgreSQL's "fsyncgate").
/// From then on the thread refuses every write and sync with [`StoreError::Halted`], until
/// a restart recovers from what is really on disk.
#[derive(Default)]
struct Halt(Option<String>);

impl Halt {
    fn set(&mut self, cause: String) {
        if self.0.is_none() {
            tracing::error!(
                cause = %cause,
                "store halted: refusing writes until the broker is restarted"
            );
            self.0 = Some(cause);
        }
    }

    fn error(&self) -> Option<StoreError> {
        self.0.as_ref().map(|cause| StoreError::Halted {
            cause: cause.clone(),
        })
    }
}

/// Fails every item of a batch the halted store will not write.
fn refuse(work: Vec<Work>, error: &StoreError) {
    for item in work {
        match item {
            Work::Append(append) => {
                let _ = append.reply.send(Err(error.duplicate()));
            }
            Work::Cursor(store) => {
                for reply in store.replies {
                    let _ = reply.send(Err(error.duplicate()));
                }
            }
        }
    }
}

enum Done {
    Append(AppendReply, Result<Appended, StoreError>),
    Cursor(Vec<CursorReply>, Result<(), StoreError>),
    Sync(oneshot::Sender<Result<(), StoreError>>),
}

fn run(mut rx: mpsc::Receiver<Job>, policy: FsyncPolicy, fsync: &LatencyHistogram) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut synced = Outcomes::default();
    let mut unsynced = Outcomes::default();
    let mut dirty = Dirty::default();
    let mut staged: Vec<Staged> = Vec::new();
    let mut last_sync = std::time::Instant::now();
    let mut halt = Halt::default();
    loop {
        if rx.blocking_recv_many(&mut batch, MAX_BATCH) == 0 {
            break;
        }
        let now = now_ms();
        let mut stop = false;
        for job in batch.drain(..) {
            match job {
                Job::Batch(work) => {
                    if let Some(error) = halt.error() {
                        refuse(work, &error);
                        continue;
                    }
                    for item in work {
                        match item {
                            Work::Append(append) => {
                                let outcomes = (&mut dirty, &mut synced, &mut unsynced);
                                stage(&mut staged, append, now, outcomes, &mut halt);
                            }
                            Work::Cursor(store) => {
                                store_cursor(store, &mut dirty, &mut synced, &mut unsynced);
                            }
                        }
                    }
                }
                Job::Retain { log, reply } => {
                    let result = match halt.error() {
                        Some(error) => Err(error),
                        None => log
                            .lock()
                            .expect("log lock poisoned")
                            .enforce_retention(now),
                    };
                    let _ = reply.send(result);
                }
                Job::Sync(reply) => match halt.error() {
                    Some(error) => {
                        let _ = reply.send(Err(error));
                    }
                    None => synced.done.push(Done::Sync(reply)),
                },
                Job::Tick => {}
                Job::Stop => stop = true,
            }
        }
        for entry in staged.drain(..) {
            entry.write(now, &mut dirty, (&mut synced, &mut unsynced), &mut halt);
        }
        unsynced.finish(Durability::Written, &Ok(()));
        let dirty_for = |age| dirty.is_dirty() && last_sync.elapsed() >= age;
        let must_sync = match policy {
            // Only when a reply waits for it: a batch of unsynced MQs alone must not stall
            // the thread in fsync, yet their data still reaches the disk within a second.
            FsyncPolicy::Always => !synced.done.is_empty() || dirty_for(UNSYNCED_FLUSH),
            FsyncPolicy::Interval(every) => dirty_for(every),
            FsyncPolicy::Never => false,
        } || stop
            || synced.done.iter().any(|d| matches!(d, Done::Sync(_)));
        let mut sync_result = Ok(());
        if must_sync {
            // A batch of only reads or syncs has nothing to flush: timing it would fill the
            // histogram with zeros.
            let flushing = dirty.is_dirty();
            let started = std::time::Instant::now();
            sync_result = dirty.sync();
            last_sync = std::time::Instant::now();
            if flushing {
                fsync.observe(last_sync - started);
            }
            if let Err(e) = &sync_result {
                halt.set(format!("an fsync failed: {e}"));
            }
        }
        synced.finish(durability_of(policy), &sync_result);
        if stop {
            // Jobs queued behind the stop fail with "shutting down" when `rx` drops.
            return;
        }
    }
    if let Err(e) = dirty.sync() {
        tracing::error!(error = %e, "final fsync failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LogConfig;
    use qbus_wire::protocol::record::encode_record;

    fn records(n: usize) -> BytesMut {
        let mut out = BytesMut::new();
        for i in 0..n {
            encode_record(&mut out, 0, 0, None, None, format!("{i}").as_bytes()).unwrap();
        }
        out
    }

    fn log(dir: &std::path::Path) -> SharedLog {
        let (log, _reader) =
            MqLog::open(&crate::store::OsFs::shared(), dir, LogConfig::default()).unwrap();
        Arc::new(Mutex::new(log))
    }

    #[tokio::test]
    async fn one_batch_gives_each_append_its_own_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (log(&dir.path().join("a")), log(&dir.path().join("b")));
        let (committer, thread) = Committer::start(FsyncPolicy::Always).unwrap();
        let mut batch = CommitBatch::default();
        let first = batch.append(&a, records(2), 2, true);
        let other = batch.append(&b, records(1), 1, false);
        let second = batch.append(&a, records(3), 3, true);
        assert_eq!(batch.bytes(), records(6).len());
        committer.submit(batch).await.unwrap();
        let (first, durability) = first.wait().await.unwrap();
        assert_eq!((first.first_offset, first.count), (0, 2));
        assert_eq!(durability, Durability::Synced);
        let (second, _) = second.wait().await.unwrap();
        assert_eq!((second.first_offset, second.count), (2, 3));
        let (other, durability) = other.wait().await.unwrap();
        assert_eq!((other.first_offset, durability), (0, Durability::Written));

        // An unsubmitted batch fails its waits instead of leaving them hanging.
        let mut dropped = CommitBatch::default();
        let lost = dropped.append(&a, records(1), 1, true);
        drop(dropped);
        assert!(lost.wait().await.is_err());

        committer.stop().await;
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn cursor_stores_in_a_row_share_one_write_and_all_answer() {
        let dir = tempfile::tempdir().unwrap();
        let fs = crate::store::OsFs::shared();
        let path = dir.path().join("cursor");
        let cursor: SharedCursor = Arc::new(Mutex::new(CursorFile::open(&fs, &path).unwrap().0));
        let committed = Arc::new(AtomicU64::new(0));
        let (committer, thread) = Committer::start(FsyncPolicy::Always).unwrap();
        let mut batch = CommitBatch::default();
        let mut waits = Vec::new();
        for acked in 1..=3 {
            committed.store(acked, Ordering::Release);
            waits.push(batch.store_cursor(&cursor, &committed, false));
        }
        assert_eq!(batch.work.len(), 1, "three stores in a row are one write");
        committer.submit(batch).await.unwrap();
        for wait in waits {
            assert_eq!(wait.wait().await.unwrap(), Durability::Written);
        }
        committer.sync().await.unwrap();
        assert_eq!(CursorFile::open(&fs, &path).unwrap().1, Some(3));
        committer.stop().await;
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
    }
}
