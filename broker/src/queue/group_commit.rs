//! Group commit: one thread writes every append and cursor update of every MQ, then fsyncs
//! each touched file once for the whole batch before any of them is acknowledged.
//!
//! While the thread is in `fsync`, new requests pile up in its queue and become the next
//! batch, so the number of fsyncs per second stays near the disk's limit however many
//! producers there are, and fsyncs never run on the async reactor threads.
//!
//! Records and cursors of `sync: false` MQs need no fsync before their reply, so they skip
//! the thread when they can: [`Committer::submit`] writes them at once on the submitting
//! task (one buffered write per log per batch, into the page cache) when nothing of their
//! log waits in the thread's queue and no one holds the file, and the thread only fsyncs
//! them later with the rest (under `--fsync always` within [`UNSYNCED_FLUSH`]). A call
//! through the broker (MQ-RPC) then costs no thread hop and no wake-up of this thread.
//! Anything else, or when the file is busy (being synced), goes through the queue as before,
//! in order: once one append of a log is queued, the log's later appends queue behind it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LockResult, Mutex, MutexGuard, OnceLock};

use bytes::BytesMut;
use qbus_wire::now_ms;
use qbus_wire::protocol::Durability;
use tokio::sync::{mpsc, oneshot};

use crate::config::FsyncPolicy;
use crate::metrics::{LatencyHistogram, FSYNC_BUCKETS};
use crate::store::{Appended, CursorFile, MqLog, StoreError};

/// Shared handle on an MQ's log, written by the commit thread (and for `sync: false` MQs
/// by [`Committer::submit`] itself, see the module's doc).
pub type SharedLog = Arc<LogHandle>;

/// An MQ's log and how many of its appends wait in the commit thread's queue.
pub struct LogHandle {
    log: Mutex<MqLog>,
    /// Appends submitted to the thread and not yet written: while any are, later appends
    /// of this log queue behind them instead of being written at once, so the log keeps
    /// the order in which they were submitted.
    queued: AtomicUsize,
}

impl LogHandle {
    /// Shares `log`.
    pub fn new(log: MqLog) -> SharedLog {
        Arc::new(LogHandle {
            log: Mutex::new(log),
            queued: AtomicUsize::new(0),
        })
    }

    /// Locks the log.
    pub fn lock(&self) -> LockResult<MutexGuard<'_, MqLog>> {
        self.log.lock()
    }

    fn written(&self, appends: usize) {
        self.queued.fetch_sub(appends, Ordering::AcqRel);
    }
}
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

impl Work {
    /// Whether its reply waits for the fsync.
    fn waits_sync(&self) -> bool {
        match self {
            Work::Append(append) => append.wait_sync,
            Work::Cursor(store) => store.wait_sync,
        }
    }
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
    /// Files written by [`Committer::submit`] itself, for the thread to fsync.
    written_here: Arc<Mutex<Dirty>>,
    halt: Halt,
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
        let written_here = Arc::new(Mutex::new(Dirty::default()));
        let halt = Halt::default();
        let thread = Thread {
            policy,
            fsync: fsync.clone(),
            written_here: written_here.clone(),
            halt: halt.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("qbus-commit".into())
            .spawn(move || run(rx, &thread))?;
        let tick = match policy {
            FsyncPolicy::Interval(every) => Some(every),
            // Writes made outside the thread wake it for nothing: a tick brings their fsync.
            FsyncPolicy::Always => Some(UNSYNCED_FLUSH),
            FsyncPolicy::Never => None,
        };
        if let Some(every) = tick {
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
        let committer = Committer {
            tx,
            policy,
            fsync,
            written_here,
            halt,
        };
        Ok((committer, handle))
    }

    /// How long fsyncs take (one observation per batch that had files to sync).
    pub fn fsync_latency(&self) -> &LatencyHistogram {
        &self.fsync
    }

    /// What an acknowledgement promises under this broker's fsync policy.
    pub fn durability(&self) -> Durability {
        durability_of(self.policy)
    }

    /// Hands a batch to the thread with one message (and at most one wake-up), after
    /// writing at once what need not wait for it (see the module's doc). Queuing order is
    /// write order.
    pub async fn submit(&self, batch: CommitBatch) -> Result<(), StoreError> {
        let work = self.write_through(batch.work);
        if work.is_empty() {
            return Ok(());
        }
        for item in &work {
            if let Work::Append(append) = item {
                append.log.queued.fetch_add(1, Ordering::AcqRel);
            }
        }
        self.tx.send(Job::Batch(work)).await.map_err(|_| stopped())
    }

    /// Writes the appends and cursor stores of `work` that wait for no fsync, when their
    /// file is free and (appends) nothing of their log is queued; returns the rest, in order.
    fn write_through(&self, work: Vec<Work>) -> Vec<Work> {
        if work.iter().all(Work::waits_sync) || self.halt.error().is_some() {
            return work;
        }
        let mut kept = Vec::with_capacity(work.len());
        // Logs with an append kept for the thread: their later appends follow it there.
        let mut kept_logs: Vec<SharedLog> = Vec::new();
        let mut now: Vec<(SharedLog, Vec<Append>)> = Vec::new();
        for item in work {
            match item {
                Work::Append(append)
                    if !append.wait_sync
                        && append.log.queued.load(Ordering::Acquire) == 0
                        && !kept_logs.iter().any(|l| Arc::ptr_eq(l, &append.log)) =>
                {
                    match now
                        .iter_mut()
                        .find(|(log, _)| Arc::ptr_eq(log, &append.log))
                    {
                        Some((_, appends)) => appends.push(append),
                        None => now.push((append.log.clone(), vec![append])),
                    }
                }
                Work::Cursor(store) if !store.wait_sync => {
                    if let Some(store) = self.store_cursor_now(store) {
                        kept.push(Work::Cursor(store));
                    }
                }
                Work::Append(append) => {
                    if !kept_logs.iter().any(|l| Arc::ptr_eq(l, &append.log)) {
                        kept_logs.push(append.log.clone());
                    }
                    kept.push(Work::Append(append));
                }
                other => kept.push(other),
            }
        }
        for (log, appends) in now {
            // No appends of `log` were kept: these, kept now, still queue in their order.
            if let Some(appends) = self.append_now(&log, appends) {
                kept.extend(appends.into_iter().map(Work::Append));
            }
        }
        kept
    }

    /// Writes `appends` (all of one log) with one write and publishes them, unless another
    /// writer holds the log: then they are handed back.
    fn append_now(&self, log: &SharedLog, appends: Vec<Append>) -> Option<Vec<Append>> {
        let Ok(mut writer) = log.log.try_lock() else {
            return Some(appends);
        };
        let mut staged = Staged {
            log: log.clone(),
            records: BytesMut::new(),
            waiters: Vec::with_capacity(appends.len()),
            wait_sync: false,
        };
        for append in appends {
            staged.add(append);
        }
        let mut done = Outcomes::default();
        let mut dirty = Dirty::default();
        let mut halt = self.halt.clone();
        staged.write_locked(&mut writer, now_ms(), &mut dirty, &mut done, &mut halt);
        if dirty.is_dirty() {
            writer.publish();
        }
        drop(writer);
        done.written.clear();
        self.written_here
            .lock()
            .expect("dirty list poisoned")
            .merge(dirty);
        done.finish(Durability::Written, &Ok(()));
        None
    }

    /// Writes a cursor store that waits for no fsync, unless another writer holds the file:
    /// then it is handed back.
    fn store_cursor_now(&self, store: CursorStore) -> Option<CursorStore> {
        let Ok(mut file) = store.cursor.try_lock() else {
            return Some(store);
        };
        let result = file.store(store.committed.load(Ordering::Acquire));
        drop(file);
        if result.is_ok() {
            self.written_here
                .lock()
                .expect("dirty list poisoned")
                .add_cursor(&store.cursor);
        }
        for reply in store.replies {
            let _ = reply.send(match &result {
                Ok(()) => Ok(Durability::Written),
                Err(e) => Err(e.duplicate()),
            });
        }
        None
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

    fn merge(&mut self, other: Dirty) {
        for log in &other.logs {
            self.add_log(log);
        }
        for cursor in &other.cursors {
            self.add_cursor(cursor);
        }
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
    /// Adds `append`'s records behind those gathered.
    fn add(&mut self, append: Append) {
        if self.records.is_empty() {
            self.records = append.records;
        } else {
            self.records.extend_from_slice(&append.records);
        }
        self.waiters.push((append.reply, append.count));
    }

    /// Writes the gathered records on the commit thread (see [`Staged::write_locked`]).
    fn write(
        self,
        now: u64,
        dirty: &mut Dirty,
        (synced, unsynced): (&mut Outcomes, &mut Outcomes),
        halt: &mut Halt,
    ) {
        let log = self.log.clone();
        let appends = self.waiters.len();
        let outcomes = if self.wait_sync { synced } else { unsynced };
        {
            let mut writer = log.lock().expect("log lock poisoned");
            self.write_locked(&mut writer, now, dirty, outcomes, halt);
        }
        log.written(appends);
    }

    /// Writes the gathered records to `writer` (their log, locked) and hands each waiter
    /// its share of the offsets, into `outcomes`. A write that leaves the file in doubt
    /// halts the store (see [`Halt`]).
    fn write_locked(
        self,
        writer: &mut MqLog,
        now: u64,
        dirty: &mut Dirty,
        outcomes: &mut Outcomes,
        halt: &mut Halt,
    ) {
        let Staged {
            log,
            mut records,
            waiters,
            wait_sync: _,
        } = self;
        let Outcomes { written, done } = outcomes;
        let result = writer.append(&mut records, now);
        if let Ok(appended) = &result {
            writer.keep_for_readers(appended.first_offset, appended.count, records.freeze());
        }
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
    let at = staged.iter().position(|s| Arc::ptr_eq(&s.log, &append.log));
    let size = append.records.len();
    if let Some(full) = at.filter(|&at| staged[at].records.len() + size > MAX_WRITE) {
        staged
            .swap_remove(full)
            .write(now, dirty, (synced, unsynced), halt);
    }
    let at = match staged.iter().position(|s| Arc::ptr_eq(&s.log, &append.log)) {
        Some(at) => at,
        None => {
            staged.push(Staged {
                log: append.log.clone(),
                records: BytesMut::new(),
                waiters: Vec::new(),
                wait_sync: append.wait_sync,
            });
            staged.len() - 1
        }
    };
    staged[at].add(append);
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
/// Shared by the thread and the handles, which write nothing once it is set.
#[derive(Default, Clone)]
struct Halt(Arc<OnceLock<String>>);

impl Halt {
    fn set(&mut self, cause: String) {
        if self.0.set(cause.clone()).is_ok() {
            tracing::error!(
                cause = %cause,
                "store halted: refusing writes until the broker is restarted"
            );
        }
    }

    fn error(&self) -> Option<StoreError> {
        self.0.get().map(|cause| StoreError::Halted {
            cause: cause.clone(),
        })
    }
}

/// Fails every item of a batch the halted store will not write.
fn refuse(work: Vec<Work>, error: &StoreError) {
    for item in work {
        match item {
            Work::Append(append) => {
                append.log.written(1);
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

/// What the commit thread shares with its handles.
struct Thread {
    policy: FsyncPolicy,
    fsync: Arc<LatencyHistogram>,
    written_here: Arc<Mutex<Dirty>>,
    halt: Halt,
}

impl Thread {
    /// Takes over the files the handles wrote, to sync them with its own.
    fn take_written(&self, dirty: &mut Dirty) {
        let written = std::mem::take(&mut *self.written_here.lock().expect("dirty list poisoned"));
        dirty.merge(written);
    }
}

fn run(mut rx: mpsc::Receiver<Job>, thread: &Thread) {
    let (policy, fsync) = (thread.policy, &thread.fsync);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut synced = Outcomes::default();
    let mut unsynced = Outcomes::default();
    let mut dirty = Dirty::default();
    let mut staged: Vec<Staged> = Vec::new();
    let mut last_sync = std::time::Instant::now();
    let mut halt = thread.halt.clone();
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
        // After this batch's jobs: a `Sync` covers what the handles wrote before sending it.
        thread.take_written(&mut dirty);
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
    thread.take_written(&mut dirty);
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
        LogHandle::new(log)
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

    // The guards stand for the commit thread busy with a file while the test submits; the
    // test's runtime has one thread, which nothing else needs.
    #[allow(clippy::await_holding_lock)]
    #[tokio::test]
    async fn unsynced_writes_skip_the_thread_but_keep_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let (x, y, z) = (
            log(&dir.path().join("x")),
            log(&dir.path().join("y")),
            log(&dir.path().join("z")),
        );
        let (committer, thread) = Committer::start(FsyncPolicy::Always).unwrap();
        // The thread is stuck on `x` (as in a long write): nothing behind it moves.
        let held_x = x.lock().unwrap();
        let mut batch = CommitBatch::default();
        let stuck = batch.append(&x, records(1), 1, true);
        committer.submit(batch).await.unwrap();
        // `y` busy too: its first append must queue behind `x`, and so must its second,
        // although `y` is free by then.
        let held_y = y.lock().unwrap();
        let mut batch = CommitBatch::default();
        let first = batch.append(&y, records(1), 1, false);
        committer.submit(batch).await.unwrap();
        drop(held_y);
        let mut batch = CommitBatch::default();
        let second = batch.append(&y, records(2), 2, false);
        committer.submit(batch).await.unwrap();
        // `z` is free with nothing queued: written and answered with the thread still stuck.
        let path = dir.path().join("z.cursor");
        let fs = crate::store::OsFs::shared();
        let cursor: SharedCursor = Arc::new(Mutex::new(CursorFile::open(&fs, &path).unwrap().0));
        let committed = Arc::new(AtomicU64::new(7));
        let mut batch = CommitBatch::default();
        let at_once = batch.append(&z, records(3), 3, false);
        let stored = batch.store_cursor(&cursor, &committed, false);
        committer.submit(batch).await.unwrap();
        let wait = std::time::Duration::from_secs(5);
        let (appended, durability) = tokio::time::timeout(wait, at_once.wait())
            .await
            .expect("not held up by the thread")
            .unwrap();
        assert_eq!((appended.first_offset, appended.count), (0, 3));
        assert_eq!(durability, Durability::Written);
        let stored = tokio::time::timeout(wait, stored.wait()).await.unwrap();
        assert_eq!(stored.unwrap(), Durability::Written);

        drop(held_x);
        assert_eq!(stuck.wait().await.unwrap().0.first_offset, 0);
        let (first, _) = first.wait().await.unwrap();
        let (second, _) = second.wait().await.unwrap();
        assert_eq!((first.first_offset, second.first_offset), (0, 1));
        // A sync covers what was written outside the thread.
        committer.sync().await.unwrap();
        assert_eq!(CursorFile::open(&fs, &path).unwrap().1, Some(7));
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
