//! One MQ: its log, its consumer groups, and the fetch/ack logic that joins them.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use qbus_wire::now_ms;
use qbus_wire::protocol::record::{intact_records, records};
use qbus_wire::protocol::{DeliveryToken, Durability, LeaderEpoch, MqInfo, MqOptions};

use super::blocking;
use super::dedupe::{self, Dedupe, ProduceWait, Receipt, Settled};
use super::group::{Fetching, Group, Start, WaitingForRoom};
use super::group_commit::{AppendWait, CommitBatch, Committer, LogHandle, SharedLog, StoreWait};
use super::group_ledger::Redeliveries;
use super::key_filter::KeyFilter;
use super::ring::{Ring, RingLimits};
use super::timer::Timer;
use crate::error::{validate_name, BrokerError};
use crate::metrics::MqCounters;
use crate::replica::leader::{Followers, ReplicationError};
use crate::store::epochs::{self, Epochs};
use crate::store::fsio::{sync_parent, write_durably};
use crate::store::{
    AttemptsFile, CursorFile, FsRef, LogConfig, LogReader, Lost, MqLog, ReadBatch, Skip,
    StoreError, TimerLog,
};

const OPTIONS_FILE: &str = "mq.options";
const GROUPS_DIR: &str = "groups";
const CURSOR_SUFFIX: &str = ".cursor";
const ATTEMPTS_SUFFIX: &str = ".attempts";
/// Most bytes of records put in one fetch reply.
pub const MAX_FETCH_BYTES: usize = 1 << 20;

/// Options with the broker's defaults applied.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Redeliver after this.
    pub ack_timeout: Duration,
    /// Dead-letter after this many deliveries.
    pub max_deliveries: u32,
    /// Unacknowledged deliveries per connection and group.
    pub max_in_flight: u32,
}

/// Records handed out by one fetch.
#[derive(Debug, Default)]
pub struct Fetched {
    /// Whole records back to back.
    pub body: Bytes,
    /// Delivery attempt of each record, in order.
    pub attempts: Vec<u32>,
    /// Records that reached the delivery limit, for the caller to move to the dead-letter MQ.
    pub dead: DeadLetters,
    /// Offsets the group just went past because their records are damaged; such a fetch
    /// carries no records, so the loss reaches the consumer in order.
    pub lost: Option<Lost>,
    /// Records the group went past because they expired: their count, and the records
    /// themselves (without their expiry) when the MQ moves expired records to its
    /// dead-letter MQ.
    pub expired: DeadLetters,
    /// Memory MQs: offsets the group just went past because the ring dropped them before
    /// the group read them; such a fetch carries no records, so the loss reaches the
    /// consumer in order.
    pub dropped: Option<std::ops::Range<u64>>,
}

/// Records a fetch retired after too many deliveries, read whole: the MQ does not reach
/// for its dead-letter MQ itself, whoever holds the MQ table hands them over.
#[derive(Debug, Default)]
pub struct DeadLetters {
    /// Whole records back to back.
    pub records: BytesMut,
    /// How many.
    pub count: u32,
}

impl DeadLetters {
    /// True when the fetch retired nothing.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// One MQ.
pub struct Mq {
    fs: FsRef,
    name: String,
    dir: PathBuf,
    options: MqOptions,
    limits: Limits,
    log: SharedLog,
    reader: LogReader,
    groups: Mutex<HashMap<String, Arc<Group>>>,
    counters: MqCounters,
    /// Dedupe ids stored within the window.
    dedupe: Arc<Dedupe>,
    /// zbus's duplicate filter: keys present until removed.
    keys: KeyFilter,
    /// Damaged records already logged and counted (file, byte position): once per MQ, not
    /// once per group that meets them.
    damage_seen: Mutex<HashSet<(PathBuf, u64)>>,
    /// Delayed delivery (see [`super::timer`]).
    timer: Timer,
    /// A follower's copy of another broker's log (read-only to clients), not a log of its own.
    copy: bool,
    /// Followers of this broker's log, when it is its own.
    followers: Followers,
    /// Its leader epochs, for an MQ of this broker's own followed by replicas.
    epochs: Option<Epochs>,
    /// A memory MQ's messages: produce and fetch use this instead of the log, which stays
    /// empty (the MQ's directory holds only its options).
    ring: Option<Ring>,
}

impl Mq {
    /// Makes the files of a new MQ with `options` in `dir`, an empty directory nobody else
    /// sees yet, and makes them durable (files and `dir` synced), so that the registry can
    /// rename `dir` into place in one step. Blocking.
    pub fn prepare(fs: &FsRef, dir: &Path, options: &MqOptions) -> Result<(), StoreError> {
        Mq::prepare_at(fs, dir, options, 0)
    }

    /// [`prepare`](Self::prepare) for a log starting at offset `first` (a follower's copy).
    pub fn prepare_at(
        fs: &FsRef,
        dir: &Path,
        options: &MqOptions,
        first: u64,
    ) -> Result<(), StoreError> {
        let groups = dir.join(GROUPS_DIR);
        fs.create_dir_all(&groups)
            .map_err(StoreError::io(&groups))?;
        MqLog::create_at(fs, dir, first)?;
        let options_path = dir.join(OPTIONS_FILE);
        let bytes = rmp_serde::to_vec_named(options)
            .map_err(|e| StoreError::io(&options_path)(std::io::Error::other(e)))?;
        // Syncs `dir` last, which makes the names above durable too.
        write_durably(&**fs, &options_path, &bytes)
    }

    /// Opens the MQ stored in `dir` (made by [`Mq::prepare`]). Blocking.
    pub fn open(
        fs: &FsRef,
        name: &str,
        dir: &Path,
        log_config: LogConfig,
        defaults: &Limits,
    ) -> Result<Mq, StoreError> {
        let groups_dir = dir.join(GROUPS_DIR);
        fs.create_dir_all(&groups_dir)
            .map_err(StoreError::io(&groups_dir))?;
        let options_path = dir.join(OPTIONS_FILE);
        let options = match fs.read(&options_path) {
            Ok(bytes) => rmp_serde::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %options_path.display(), error = %e, "unreadable MQ options, using defaults");
                MqOptions::default()
            }),
            Err(e) => {
                tracing::warn!(file = %options_path.display(), error = %e, "MQ options missing, using defaults");
                MqOptions::default()
            }
        };
        let limits = Limits {
            ack_timeout: options
                .ack_timeout_ms
                .map_or(defaults.ack_timeout, Duration::from_millis),
            max_deliveries: options
                .max_deliveries
                .unwrap_or(defaults.max_deliveries)
                .max(1),
            max_in_flight: defaults.max_in_flight,
        };
        let copy = log_config.copy;
        let (mut log, reader) = MqLog::open(fs, dir, log_config)?;
        // A leader followed by replicas starts an epoch: followers copy its records before
        // it syncs them, and learn from its epochs which of them a power loss took.
        let epochs = if !copy && options.replica_count() > 1 && !options.is_memory() {
            log.sync_recovered()?;
            Some(Epochs::begin(&**fs, dir, log.next_offset())?)
        } else {
            None
        };
        let timer = Timer::new(TimerLog::open(fs, dir)?);
        let ring = options
            .is_memory()
            .then(|| Ring::new(RingLimits::of(&options)));
        // A memory MQ checks no dedupe ids: nothing it stores outlives the window anyway.
        let window = if ring.is_some() {
            Duration::ZERO
        } else {
            options
                .dedupe_window_ms
                .map_or(dedupe::DEFAULT_WINDOW, Duration::from_millis)
        };
        let window_ms = window.as_millis().try_into().unwrap_or(u64::MAX);
        let dedupe = Dedupe::new(
            window,
            log.first_offset_since(now_ms().saturating_sub(window_ms)),
        );
        let mut groups = HashMap::new();
        for entry in fs.list(&groups_dir).map_err(StoreError::io(&groups_dir))? {
            let Some(group) = entry.name.strip_suffix(CURSOR_SUFFIX) else {
                continue;
            };
            if validate_name("group", group).is_err() || ring.is_some() {
                continue;
            }
            let (cursor, committed) = CursorFile::open(fs, &groups_dir.join(&entry.name))?;
            let committed = committed
                .unwrap_or(0)
                .clamp(reader.first_offset(), reader.end_offset());
            let attempts_path = groups_dir.join(format!("{group}{ATTEMPTS_SUFFIX}"));
            let attempts = AttemptsFile::open(fs, &attempts_path, committed)?;
            let live = Group::new(group, committed, cursor, attempts);
            if options.ordered_by_key == Some(true) {
                live.state().order_by_key();
            }
            groups.insert(group.to_owned(), live);
        }
        Ok(Mq {
            fs: fs.clone(),
            name: name.to_owned(),
            dir: dir.to_owned(),
            options,
            limits,
            log: LogHandle::new(log),
            reader,
            groups: Mutex::new(groups),
            counters: MqCounters::default(),
            dedupe,
            keys: KeyFilter::new(fs.clone(), dir.to_owned()),
            damage_seen: Mutex::new(HashSet::new()),
            timer,
            copy,
            followers: Followers::default(),
            epochs,
            ring,
        })
    }

    /// Its delayed delivery.
    pub fn timer(&self) -> &Timer {
        &self.timer
    }

    /// A memory MQ's ring (`None` for an MQ on disk).
    pub fn ring(&self) -> Option<&Ring> {
        self.ring.as_ref()
    }

    /// Oldest offset held: in the ring, or retained in the log.
    fn first_offset(&self) -> u64 {
        self.ring
            .as_ref()
            .map_or_else(|| self.reader.first_offset(), Ring::first_offset)
    }

    /// Offset the next record gets (the published end of the log).
    pub fn end_offset(&self) -> u64 {
        self.ring
            .as_ref()
            .map_or_else(|| self.reader.end_offset(), Ring::end_offset)
    }

    /// Follows [`end_offset`](Self::end_offset), to wait for new records.
    fn subscribe_end(&self) -> tokio::sync::watch::Receiver<u64> {
        self.ring
            .as_ref()
            .map_or_else(|| self.reader.subscribe_end(), Ring::subscribe_end)
    }

    /// When a record stored at `timestamp_ms` that carries `expires_at` expires: that, or
    /// the MQ's default TTL after it was stored.
    fn expiry(&self, timestamp_ms: u64, expires_at: Option<u64>) -> Option<u64> {
        expires_at.or_else(|| {
            self.options
                .ttl_ms
                .map(|ttl| timestamp_ms.saturating_add(ttl))
        })
    }

    /// Whether expired records go to the dead-letter MQ (else they are dropped).
    pub fn expired_to_dead_letter(&self) -> bool {
        self.options.expired_to_dead_letter.unwrap_or(false)
    }

    /// Adds the expired record `bytes` to `expired`: kept (without its expiry, lest it
    /// expire again where it goes) when the MQ dead-letters expired records.
    fn retire_expired(&self, expired: &mut DeadLetters, bytes: &[u8]) {
        expired.count += 1;
        if !self.expired_to_dead_letter() {
            return;
        }
        if let Some(Ok(record)) = records(bytes).next() {
            let meta = qbus_wire::protocol::record::RecordMeta {
                expires_at: None,
                ..record.meta()
            };
            let _ = qbus_wire::protocol::record::encode_record_meta(
                &mut expired.records,
                0,
                0,
                &meta,
                record.body,
            );
        }
    }

    /// The MQ's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its key set (zbus's duplicate filter).
    pub fn keys(&self) -> &KeyFilter {
        &self.keys
    }

    /// The options it was created with (unset fields unset).
    pub fn options(&self) -> &MqOptions {
        &self.options
    }

    /// Whether this is a follower's copy of another broker's log: clients may read it and
    /// ack on it, never produce to it.
    pub fn is_copy(&self) -> bool {
        self.copy
    }

    /// Whether produces are acknowledged at `replicated` unless they ask for less.
    pub fn replicated_by_default(&self) -> bool {
        !self.copy && self.options.replica_count() > 1
    }

    /// The followers of this broker's log.
    pub fn followers(&self) -> &Followers {
        &self.followers
    }

    /// Its leader epochs: `None` for a copy, or an MQ without replicas.
    pub fn epochs(&self) -> Option<&Epochs> {
        self.epochs.as_ref()
    }

    /// The epoch of its leader this copy last followed (blocking: reads a file).
    pub fn followed_epoch(&self) -> Result<Option<LeaderEpoch>, StoreError> {
        epochs::read_followed(&*self.fs, &self.dir)
    }

    /// Records durably that this copy follows `epoch` of its leader (blocking).
    pub fn follow_epoch(&self, epoch: LeaderEpoch) -> Result<(), StoreError> {
        epochs::write_followed(&*self.fs, &self.dir, epoch)
    }

    /// Refuses a `replicated` produce before it is written when too few followers are
    /// reachable for the MQ's `min_replicas`.
    pub fn admit_replicated(&self) -> Result<(), ReplicationError> {
        self.followers.check_reachable(self.options.min_replicas)
    }

    /// Waits until enough followers hold every record below `end` for a `replicated`
    /// receipt.
    pub async fn wait_replicated(&self, end: u64) -> Result<(), ReplicationError> {
        self.followers
            .wait_replicated(end, self.options.min_replicas)
            .await
    }

    /// `receipt` once the followers hold every record it names (its repeats' originals
    /// included), at `replicated`.
    pub async fn confirm_replicated(&self, mut receipt: Receipt) -> Result<Receipt, BrokerError> {
        let end = receipt
            .offsets
            .iter()
            .max()
            .map_or(receipt.first_offset + receipt.count, |last| last + 1);
        self.wait_replicated(end).await?;
        receipt.durability = Durability::Replicated;
        Ok(receipt)
    }

    /// The log's reader (what is published: synced, under `--fsync always`).
    pub fn reader(&self) -> &LogReader {
        &self.reader
    }

    /// Moves group `name` up to `committed` (created there if new): every record below is
    /// taken as acknowledged. A follower's copy takes its leader's cursors so; a cursor is
    /// never moved back.
    pub async fn advance_group(
        &self,
        committer: &Committer,
        name: &str,
        committed: u64,
    ) -> Result<(), BrokerError> {
        let committed = committed.clamp(self.first_offset(), self.end_offset());
        let group = self
            .group(committer, name, Start::Offset(committed))
            .await?;
        let moved = {
            let mut state = group.state();
            if state.committed() < committed {
                state.truncate_before(committed);
            }
            state.committed()
        };
        if group.persisted.fetch_max(moved, Ordering::AcqRel) < moved {
            if let Some(cursor) = &group.cursor {
                committer
                    .store_cursor(cursor, &group.persisted, self.wait_sync())
                    .await?;
            }
            group.changed.notify_waiters();
        }
        Ok(())
    }

    /// Whether produces and acks wait for the fsync (the `sync` option, default true).
    pub fn wait_sync(&self) -> bool {
        self.options.sync.unwrap_or(true)
    }

    /// The log, for the commit thread.
    pub fn log(&self) -> &SharedLog {
        &self.log
    }

    /// Messages and bytes through this MQ since the broker started.
    pub fn counters(&self) -> &MqCounters {
        &self.counters
    }

    /// Adds `count` whole, verified records to `batch`; the returned wait resolves once
    /// the batch is submitted and they are durable (see [`CommitBatch`]).
    /// A follower's copy takes no produce: its wait fails with [`StoreError::ReadOnly`].
    pub fn stage(&self, batch: &mut CommitBatch, records: BytesMut, count: u32) -> AppendWait {
        if self.copy {
            return AppendWait::failed(StoreError::ReadOnly {
                mq: self.name.clone(),
            });
        }
        self.counters.produced(count.into(), records.len() as u64);
        if let Some(ring) = &self.ring {
            // Straight into the ring and out to the waiting fetches: no commit thread.
            let appended = ring.append(records, now_ms());
            return AppendWait::ready((appended, Durability::Memory));
        }
        batch.append(&self.log, records, count, self.wait_sync())
    }

    /// Appends records copied from their leader, byte for byte, to a follower's copy (or an
    /// MQ being restored from one) and waits until they are durable.
    pub async fn append_copied(
        &self,
        committer: &Committer,
        records: BytesMut,
        count: u32,
    ) -> Result<(), BrokerError> {
        self.stage_copied(committer, records, count)
            .await?
            .wait()
            .await?;
        Ok(())
    }

    /// Hands records copied from their leader to the commit thread (in order with earlier
    /// ones) and returns the wait for their durability.
    pub async fn stage_copied(
        &self,
        committer: &Committer,
        records: BytesMut,
        count: u32,
    ) -> Result<AppendWait, BrokerError> {
        let mut batch = CommitBatch::default();
        let wait = batch.append(&self.log, records, count, self.wait_sync());
        committer.submit(batch).await?;
        Ok(wait)
    }

    /// Like [`Mq::stage`] for records some of which carry dedupe ids: a record whose id was
    /// stored within the MQ's window is not stored again, and the wait's receipt gives its
    /// original's offset. The first such produce after the MQ opened rebuilds the table of
    /// ids from the log.
    pub async fn stage_deduped(
        &self,
        batch: &mut CommitBatch,
        records: Bytes,
        count: u32,
    ) -> Result<ProduceWait, BrokerError> {
        if self.dedupe.window().is_zero() {
            let wait = self.stage(batch, BytesMut::from(records), count);
            return Ok(ProduceWait::Plain(wait));
        }
        let mut admitted = self.dedupe.admit(&self.reader, records, count).await?;
        self.counters
            .duplicates(u64::from(count) - admitted.records.as_ref().map_or(0, |r| u64::from(r.1)));
        let append = admitted
            .records
            .take()
            .map(|(records, count)| self.stage(batch, records, count));
        Ok(admitted.into_wait(append))
    }

    /// A produce on its own (HTTP, zbus): stages `count` verified records, deduplicated
    /// when `deduped`, and waits for the receipt.
    pub async fn produce(
        &self,
        committer: &Committer,
        records: Bytes,
        count: u32,
        deduped: bool,
    ) -> Result<Receipt, BrokerError> {
        let mut batch = CommitBatch::default();
        let wait = if deduped {
            self.stage_deduped(&mut batch, records, count).await?
        } else {
            ProduceWait::Plain(self.stage(&mut batch, BytesMut::from(records), count))
        };
        committer.submit(batch).await?;
        match wait.settle().await {
            Settled::Now(receipt) => receipt,
            Settled::Later(receipt) => receipt.await,
        }
    }

    /// The MQ's dedupe table.
    pub fn dedupe(&self) -> &Dedupe {
        &self.dedupe
    }

    /// Appends whole, verified records on their own and waits for them.
    pub async fn append(
        &self,
        committer: &Committer,
        records: BytesMut,
        count: u32,
    ) -> Result<(crate::store::Appended, Durability), BrokerError> {
        let mut batch = CommitBatch::default();
        let wait = self.stage(&mut batch, records, count);
        committer.submit(batch).await?;
        Ok(wait.wait().await?)
    }

    /// The group `name`, created at `start` if new.
    pub async fn group(
        &self,
        committer: &Committer,
        name: &str,
        start: Start,
    ) -> Result<Arc<Group>, BrokerError> {
        if let Some(group) = self.groups.lock().expect("groups poisoned").get(name) {
            return Ok(group.clone());
        }
        validate_name("group", name)?;
        let committed = match start {
            Start::Earliest => self.first_offset(),
            Start::Latest => self.end_offset(),
            Start::Offset(offset) => offset.clamp(self.first_offset(), self.end_offset()),
        };
        if self.ring.is_some() {
            let mut groups = self.groups.lock().expect("groups poisoned");
            let group = groups
                .entry(name.to_owned())
                .or_insert_with(|| Group::in_memory(name, committed));
            return Ok(group.clone());
        }
        let (path, attempts_path) = (self.cursor_path(name), self.attempts_path(name));
        let fs = self.fs.clone();
        let (cursor, attempts) = blocking("group creation", move || {
            let (cursor, _) = CursorFile::open(&fs, &path)?;
            Ok((cursor, AttemptsFile::open(&fs, &attempts_path, committed)?))
        })
        .await?;
        let group = {
            let mut groups = self.groups.lock().expect("groups poisoned");
            groups
                .entry(name.to_owned())
                .or_insert_with(|| {
                    let group = Group::new(name, committed, cursor, attempts);
                    if self.options.ordered_by_key == Some(true) {
                        group.state().order_by_key();
                    }
                    group
                })
                .clone()
        };
        group
            .persisted
            .fetch_max(group.state().committed(), Ordering::AcqRel);
        let stored = match &group.cursor {
            Some(cursor) => {
                committer
                    .store_cursor(cursor, &group.persisted, self.wait_sync())
                    .await
            }
            None => Ok(Durability::Memory),
        };
        if let Err(e) = stored {
            // Not durable, so not created: the next attempt stores the cursor again instead
            // of finding a group a crash could lose.
            let mut groups = self.groups.lock().expect("groups poisoned");
            if groups.get(name).is_some_and(|g| Arc::ptr_eq(g, &group)) {
                groups.remove(name);
            }
            return Err(e.into());
        }
        Ok(group)
    }

    /// Hands out up to `count` records to connection `conn`: released deliveries first,
    /// then new records (with `tag`, when a filter is given). Waits up to `wait` for one.
    pub async fn fetch(
        &self,
        group: &Group,
        conn: u64,
        count: usize,
        tag: Option<&str>,
        wait: Duration,
    ) -> Result<Fetched, BrokerError> {
        let give_up = tokio::time::Instant::now() + wait;
        let mut end = self.subscribe_end();
        let _fetching = Fetching::start(group, conn);
        let mut _for_room = None;
        loop {
            let changed = group.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            end.borrow_and_update();

            let ack_deadline = Instant::now() + self.limits.ack_timeout;
            let (room, redo) = {
                let mut state = group.state();
                if state.is_retired() {
                    return Ok(Fetched::default());
                }
                let room = (self
                    .limits
                    .max_in_flight
                    .saturating_sub(state.held_by(conn)) as usize)
                    .min(count);
                // Replaced under the lock: an ack that sees no fetch waiting for room
                // comes before this check, which then sees the room it freed.
                _for_room = (room == 0).then(|| WaitingForRoom::start(group, &state));
                let redo = if room > 0 && state.has_redeliveries() {
                    state.take_redeliveries(room, self.limits.max_deliveries, conn, ack_deadline)
                } else {
                    Default::default()
                };
                (room, redo)
            };
            if !redo.deliver.is_empty() || !redo.dead.is_empty() {
                return self.read_redeliveries(group, redo).await;
            }
            if room > 0 {
                if let Some(fetched) = self.fetch_new(group, conn, room, tag, ack_deadline).await? {
                    return Ok(fetched);
                }
            }
            tokio::select! {
                _ = &mut changed => {}
                _ = end.changed() => {}
                _ = tokio::time::sleep_until(give_up) => return Ok(Fetched::default()),
            }
        }
    }

    /// Reads new records for `group`; `None` when there are none (or all were filtered out
    /// and nothing more is there).
    async fn fetch_new(
        &self,
        group: &Group,
        conn: u64,
        room: usize,
        tag: Option<&str>,
        ack_deadline: Instant,
    ) -> Result<Option<Fetched>, BrokerError> {
        let mut read_pos = group.read_pos.lock().await;
        // Guards against skipping in place forever, should the log disagree with itself.
        let mut skipped_at = None;
        loop {
            let (from, full) = {
                let mut state = group.state();
                let full = state.key_order().is_some_and(|order| order.is_full());
                (state.next(), full)
            };
            if from >= self.end_offset() || full {
                return Ok(None);
            }
            let ring_read = self.ring.as_ref().map(|ring| {
                ring.read(from, room, MAX_FETCH_BYTES)
                    .ok_or_else(|| ring.first_offset())
            });
            // Consumers that keep up read what was just written: from memory, no file I/O.
            let read = match ring_read {
                Some(Ok(batch)) => Read::Batch(batch),
                Some(Err(first)) if first > from => {
                    // The ring dropped what this group had not read: it goes on from the
                    // oldest kept, and is told what it lost.
                    *read_pos = None;
                    let mut state = group.state();
                    state.deliver_new(first, &[], conn, ack_deadline);
                    state.count_dropped(first - from);
                    self.counters.dropped(first - from);
                    return Ok(Some(Fetched {
                        dropped: Some(from..first),
                        ..Fetched::default()
                    }));
                }
                // Not written yet after all (the end moved under us): wait for it.
                Some(Err(_)) => return Ok(None),
                None => match self.reader.read_recent(from, room, MAX_FETCH_BYTES) {
                    Some(batch) => Read::Batch(batch),
                    None => {
                        let reader = self.reader.clone();
                        let hint = *read_pos;
                        blocking("read task", move || {
                            match reader.read(from, hint, room, MAX_FETCH_BYTES) {
                                Err(e) if e.is_damage() => reader.skip_damage(from).map(Read::Skip),
                                other => other.map(Read::Batch),
                            }
                        })
                        .await?
                    }
                },
            };
            let batch = match read {
                Read::Batch(batch) => batch,
                Read::Skip(skip) => {
                    if skip.lost.is_none() && skipped_at.replace(from) == Some(from) {
                        return Err(BrokerError::Internal(format!(
                            "MQ {:?}: reading offset {from} keeps failing on damage it cannot locate",
                            self.name
                        )));
                    }
                    // The group's cursor moves past lost offsets as past filtered records:
                    // they can never be delivered.
                    *read_pos = Some(skip.next_pos);
                    group
                        .state()
                        .deliver_new(skip.next_offset, &[], conn, ack_deadline);
                    if let Some(lost) = skip.lost {
                        self.report_lost(&lost);
                        return Ok(Some(Fetched {
                            lost: Some(lost),
                            ..Fetched::default()
                        }));
                    }
                    continue;
                }
            };
            *read_pos = Some(batch.next_pos);
            // The records the tag lets through.
            let mut picked = Vec::with_capacity(batch.count);
            let mut expired = DeadLetters::default();
            let now = qbus_wire::now_ms();
            let mut at = 0;
            // Checked when they arrived or were read from disk: not again for each group.
            for record in intact_records(&batch.data) {
                let record = record.map_err(|e| corrupt(self, e))?;
                // A delayed record before its time goes past like a filtered one: the
                // timer appends its copy when it comes due (see `super::timer`).
                if (tag.is_none() || record.tag == tag) && !record.is_pending_original() {
                    let expiry = self.expiry(record.timestamp_ms, record.expires_at);
                    if expiry.is_some_and(|expiry| expiry <= now) {
                        self.retire_expired(&mut expired, &batch.data[at..at + record.size]);
                    } else {
                        picked.push(Picked {
                            offset: record.offset,
                            start: at,
                            size: record.size,
                            key: record.key.map(|_| record.key_range.clone()),
                        });
                    }
                }
                at += record.size;
            }
            if expired.count > 0 {
                self.counters.expired(expired.count.into());
            }
            let mut offsets: Vec<u64> = picked.iter().map(|picked| picked.offset).collect();
            let (attempts, dead, parked) = {
                let mut state = group.state();
                let dead = state.take_exhausted(&offsets, self.limits.max_deliveries);
                if !dead.is_empty() {
                    offsets.retain(|o| dead.binary_search(o).is_err());
                }
                let parked = park_by_key(&mut state, &batch.data, &picked, &mut offsets);
                let attempts = state.deliver_new(batch.next_offset, &offsets, conn, ack_deadline);
                (attempts, dead, parked)
            };
            if offsets.is_empty() && dead.is_empty() {
                if !expired.records.is_empty() {
                    return Ok(Some(Fetched {
                        expired,
                        ..Fetched::default()
                    }));
                }
                if batch.count == 0 {
                    return Ok(None);
                }
                continue;
            }
            // Deliveries counted on from before a restart: their count goes on counting.
            let counted: Vec<(u64, u32)> = offsets
                .iter()
                .zip(&attempts)
                .filter(|&(_, &attempt)| attempt > 1)
                .map(|(&offset, &attempt)| (offset, attempt))
                .collect();
            self.store_counts(group, counted).await;
            let whole = picked.len() == batch.count && dead.is_empty() && parked.is_empty();
            let (body, dead) = if whole {
                (batch.data, DeadLetters::default())
            } else {
                let (mut kept, mut retired) = (BytesMut::new(), DeadLetters::default());
                for picked in &picked {
                    let bytes = &batch.data[picked.start..picked.start + picked.size];
                    if dead.binary_search(&picked.offset).is_ok() {
                        retired.records.extend_from_slice(bytes);
                        retired.count += 1;
                    } else if parked.binary_search(&picked.offset).is_err() {
                        kept.extend_from_slice(bytes);
                    }
                }
                (kept.freeze(), retired)
            };
            return Ok(Some(Fetched {
                body,
                attempts,
                dead,
                lost: None,
                expired,
                dropped: None,
            }));
        }
    }

    /// Stores delivery counts (offset, deliveries) of `group` so they survive a restart.
    /// A failure costs only extra deliveries after a restart, so it is logged, not fatal.
    async fn store_counts(&self, group: &Group, counted: Vec<(u64, u32)>) {
        let Some(file) = group.attempts.clone() else {
            return;
        };
        if counted.is_empty() {
            return;
        }
        let committed = group.state().committed();
        let stored = blocking("delivery counts", move || {
            file.lock()
                .expect("attempts file poisoned")
                .record(&counted, committed)
        })
        .await;
        if let Err(e) = stored {
            tracing::warn!(mq = %self.name, error = %e, "cannot store delivery counts");
        }
    }

    /// Logs and counts damaged records a fetch went past, once per MQ.
    fn report_lost(&self, lost: &Lost) {
        let first_time = self
            .damage_seen
            .lock()
            .expect("damage set poisoned")
            .insert((lost.file.clone(), lost.position));
        if first_time {
            tracing::error!(
                mq = %self.name,
                first = lost.first,
                end = lost.end,
                file = %lost.file.display(),
                position = lost.position,
                reason = %lost.reason,
                "damaged records skipped: offsets first..end cannot be delivered"
            );
            self.counters.lost(lost.end - lost.first);
        }
    }

    /// Reads the records to deliver again, each with its attempt, and those to dead-letter.
    /// A record damaged on disk since its first delivery cannot go out again: it is left
    /// out, counted as lost and settled in the group, so nothing waits for it.
    async fn read_redeliveries(
        &self,
        group: &Group,
        mut redo: Redeliveries,
    ) -> Result<Fetched, BrokerError> {
        self.store_counts(group, std::mem::take(&mut redo.counted))
            .await;
        // (what was lost, the delivery now holding it if it was to go out again)
        let (body, attempts, dead, dead_count, damaged) = match &self.ring {
            // Memory: what the ring dropped meanwhile is lost like a damaged record.
            Some(ring) => gather_redeliveries(redo, |offset| {
                Ok(ring.read(offset, 1, 1).map(|b| b.data).ok_or(None))
            })?,
            None => {
                let reader = self.reader.clone();
                // Records a key-ordered group kept need no read, nor the hop to do it.
                let reads = !redo.dead.is_empty() || redo.kept.iter().any(Option::is_none);
                let gather = move || {
                    gather_redeliveries(redo, |offset| match reader.read(offset, None, 1, 1) {
                        Ok(batch) => Ok(Ok(batch.data)),
                        Err(e) if e.is_damage() => Ok(Err(Some(lost_record(offset, &e)))),
                        Err(e) => Err(e),
                    })
                };
                if reads {
                    blocking("read task", gather).await?
                } else {
                    gather()?
                }
            }
        };
        let (body, attempts, expired_tokens, expired) = self.drop_expired(body, attempts);
        let mut settled: Vec<DeliveryToken> =
            damaged.iter().filter_map(|(_, token)| *token).collect();
        settled.extend(expired_tokens);
        if !settled.is_empty() {
            group.state().ack(&settled);
        }
        for (lost, _) in &damaged {
            match lost {
                Some(lost) => self.report_lost(lost),
                None => {
                    group.state().count_dropped(1);
                    self.counters.dropped(1);
                }
            }
        }
        Ok(Fetched {
            body: body.freeze(),
            attempts,
            dead: DeadLetters {
                records: dead,
                count: dead_count,
            },
            lost: None,
            expired,
            dropped: None,
        })
    }

    /// Takes the records that expired since their first delivery out of redeliveries
    /// (`body` with `attempts`): returns what is left, the deliveries to settle, and the
    /// expired records.
    fn drop_expired(
        &self,
        body: BytesMut,
        attempts: Vec<u32>,
    ) -> (BytesMut, Vec<u32>, Vec<DeliveryToken>, DeadLetters) {
        let now = qbus_wire::now_ms();
        let is_expired = |record: &qbus_wire::protocol::record::RecordRef<'_>| {
            self.expiry(record.timestamp_ms, record.expires_at)
                .is_some_and(|expiry| expiry <= now)
        };
        if !intact_records(&body).flatten().any(|r| is_expired(&r)) {
            return (body, attempts, Vec::new(), DeadLetters::default());
        }
        let (mut kept, mut kept_attempts) = (BytesMut::new(), Vec::new());
        let (mut settled, mut expired) = (Vec::new(), DeadLetters::default());
        let mut at = 0;
        for (record, attempt) in intact_records(&body).flatten().zip(attempts) {
            let bytes = &body[at..at + record.size];
            at += record.size;
            if is_expired(&record) {
                settled.push(DeliveryToken {
                    offset: record.offset,
                    attempt,
                });
                self.retire_expired(&mut expired, bytes);
            } else {
                kept.extend_from_slice(bytes);
                kept_attempts.push(attempt);
            }
        }
        self.counters.expired(expired.count.into());
        (kept, kept_attempts, settled, expired)
    }

    /// Acknowledges deliveries and adds a store of the group's cursor to `batch` if it
    /// moved. Returns how many were acknowledged and a wait for the cursor's durability.
    pub fn ack(
        &self,
        committer: &Committer,
        batch: &mut CommitBatch,
        group: &Group,
        tokens: &[DeliveryToken],
    ) -> (usize, StoreWait<Durability>) {
        let (acked, committed, wake) = {
            let mut state = group.state();
            let acked = state.ack(tokens);
            let wake = acked > 0 && group.ack_wakes(&mut state);
            (acked, state.committed(), wake)
        };
        if wake {
            group.changed.notify_waiters();
        }
        let moved = group.persisted.fetch_max(committed, Ordering::AcqRel) < committed;
        let stored = if let (true, Some(cursor)) = (moved, &group.cursor) {
            batch.store_cursor(cursor, &group.persisted, self.wait_sync())
        } else if self.ring.is_some() {
            StoreWait::ready(Durability::Memory)
        } else if self.wait_sync() {
            StoreWait::ready(committer.durability())
        } else {
            StoreWait::ready(Durability::Written)
        };
        (acked, stored)
    }

    /// Releases deliveries for immediate redelivery (`unseen`: see `GroupLedger::nack`).
    pub fn nack(&self, group: &Group, tokens: &[DeliveryToken], unseen: bool) -> usize {
        let released = group.state().nack(tokens, unseen);
        if released > 0 {
            group.changed.notify_waiters();
        }
        released
    }

    /// Deletes group `name` with its cursor file, refused while a consumer is attached.
    /// Deliveries it had in flight are forgotten; a fetch under that name later creates the
    /// group afresh.
    pub async fn remove_group(&self, name: &str) -> Result<(), BrokerError> {
        let group = {
            let mut groups = self.groups.lock().expect("groups poisoned");
            let group = groups.get(name).ok_or_else(|| BrokerError::NoSuchGroup {
                mq: self.name.clone(),
                group: name.to_owned(),
            })?;
            let mut state = group.state();
            if state.has_consumers(Instant::now()) {
                return Err(BrokerError::GroupInUse {
                    mq: self.name.clone(),
                    group: name.to_owned(),
                });
            }
            state.retire();
            drop(state);
            groups.remove(name)
        };
        // A fetch that found the group just before it went joins it after the check above:
        // woken, it sees the group retired and returns empty.
        if let Some(group) = group {
            group.changed.notify_waiters();
        }
        let (path, attempts_path) = (self.cursor_path(name), self.attempts_path(name));
        let fs = self.fs.clone();
        blocking("group removal", move || {
            // The counts first: a group a crash brings back keeps its cursor and merely
            // forgets how often its records went out.
            for file in [&attempts_path, &path] {
                match fs.remove_file(file) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(StoreError::io(file)(e));
                    }
                    _ => {}
                }
            }
            // The removal is acknowledged: a crash must not bring the group back.
            sync_parent(&*fs, &path)
        })
        .await
    }

    fn cursor_path(&self, group: &str) -> PathBuf {
        self.dir
            .join(GROUPS_DIR)
            .join(format!("{group}{CURSOR_SUFFIX}"))
    }

    fn attempts_path(&self, group: &str) -> PathBuf {
        self.dir
            .join(GROUPS_DIR)
            .join(format!("{group}{ATTEMPTS_SUFFIX}"))
    }

    /// An existing group.
    pub fn existing_group(&self, name: &str) -> Option<Arc<Group>> {
        self.groups
            .lock()
            .expect("groups poisoned")
            .get(name)
            .cloned()
    }

    /// Releases everything connection `conn` holds in any group.
    pub fn disconnect(&self, conn: u64) {
        for group in self.groups.lock().expect("groups poisoned").values() {
            if group.state().leave(conn) > 0 {
                group.changed.notify_waiters();
            }
        }
    }

    /// Stops counting `conn` as a consumer of any group, keeping what it holds (see
    /// `GroupLedger::detach`).
    pub fn detach(&self, conn: u64) {
        for group in self.groups.lock().expect("groups poisoned").values() {
            group.state().detach(conn);
        }
    }

    /// True while some connection consumes from any group (MQ-RPC's "is anyone there"; see
    /// `GroupLedger::has_consumers`).
    pub fn has_consumers(&self) -> bool {
        let now = Instant::now();
        self.groups
            .lock()
            .expect("groups poisoned")
            .values()
            .any(|group| group.state().has_consumers(now))
    }

    /// Releases deliveries past their ack deadline and drops records lost to retention.
    pub fn sweep(&self, now: Instant) {
        self.dedupe.expire();
        if let Some(ring) = &self.ring {
            ring.expire(now_ms());
        }
        let first = self.first_offset();
        for group in self.groups.lock().expect("groups poisoned").values() {
            let mut state = group.state();
            // What a memory MQ's ring dropped is settled where a group meets it, so that
            // the loss is counted and reported (see `fetch_new`, `read_redeliveries`).
            if self.ring.is_none() {
                state.truncate_before(first);
            }
            if state.expire(now) > 0 {
                drop(state);
                group.changed.notify_waiters();
            }
        }
    }

    /// A description for `QueryMq`.
    pub fn info(&self) -> MqInfo {
        let end = self.end_offset();
        let now = Instant::now();
        let mut groups: Vec<_> = self
            .groups
            .lock()
            .expect("groups poisoned")
            .values()
            .map(|g| g.state().info(end, now))
            .collect();
        groups.sort_by(|a, b| a.name.cmp(&b.name));
        let limits = self.ring.as_ref().map(Ring::limits);
        MqInfo {
            name: self.name.clone(),
            first_offset: self.first_offset(),
            next_offset: end,
            size_bytes: self
                .ring
                .as_ref()
                .map_or_else(|| self.reader.size_bytes(), Ring::size_bytes),
            segments: if self.ring.is_some() {
                0
            } else {
                self.reader.segment_count()
            },
            options: MqOptions {
                ack_timeout_ms: Some(self.limits.ack_timeout.as_millis() as u64),
                max_deliveries: Some(self.limits.max_deliveries),
                dead_letter_mq: Some(self.dead_letter_mq()),
                sync: Some(self.wait_sync()),
                ttl_ms: self.options.ttl_ms,
                expired_to_dead_letter: Some(self.expired_to_dead_letter()),
                ordered_by_key: Some(self.options.ordered_by_key == Some(true)),
                replicas: Some(self.options.replica_count()),
                min_replicas: self.options.min_replicas,
                dedupe_window_ms: Some(self.dedupe.window().as_millis() as u64),
                memory: Some(self.ring.is_some()),
                memory_max_messages: limits.map(|l| l.max_messages),
                memory_max_bytes: limits.map(|l| l.max_bytes),
                memory_max_age_ms: limits.map(|l| l.max_age.as_millis() as u64),
            },
            groups,
            delayed: self.timer.pending(),
            expired: self.counters.read().expired,
            followers: self
                .followers
                .info(end, |from| self.reader.bytes_after(from)),
            dropped: self.counters.read().dropped,
        }
    }

    /// Where records go after too many deliveries.
    pub fn dead_letter_mq(&self) -> String {
        self.options
            .dead_letter_mq
            .clone()
            .unwrap_or_else(|| format!("{}.DLQ", self.name))
    }
}

/// A record of a fetch that the tag lets through: its offset, where it is in the data
/// read, and where its key is.
struct Picked {
    offset: u64,
    start: usize,
    size: usize,
    key: Option<Range<usize>>,
}

/// For a group ordered by key: takes the records of `offsets` (about to go out, ascending,
/// each in `picked`) whose key has a record out, parks them in the group with a copy of
/// their bytes from `data`, and returns them (ascending).
fn park_by_key(
    state: &mut super::group_ledger::GroupLedger,
    data: &[u8],
    picked: &[Picked],
    offsets: &mut Vec<u64>,
) -> Vec<u64> {
    let Some(order) = state.key_order() else {
        return Vec::new();
    };
    let mut parked = Vec::new();
    let mut next = 0;
    for picked in picked {
        // `offsets` is `picked` less the dead, in the same order.
        if offsets.get(next) != Some(&picked.offset) {
            continue;
        }
        next += 1;
        // Checked as UTF-8 when the record was parsed.
        let Some(Ok(key)) = picked
            .key
            .clone()
            .map(|key| std::str::from_utf8(&data[key]))
        else {
            continue;
        };
        let record = &data[picked.start..picked.start + picked.size];
        if !order.admit(picked.offset, key, record) {
            parked.push(picked.offset);
        }
    }
    if !parked.is_empty() {
        offsets.retain(|o| parked.binary_search(o).is_err());
        state.park(&parked);
    }
    parked
}

/// One record read again: its bytes, or what became of it (`Some`: damaged on disk; `None`:
/// dropped from a memory MQ's ring).
type Reread = Result<Bytes, Option<Lost>>;

/// Records found again, each kept delivery's attempt, dead letters read whole with their
/// count, and the records that could not be read (with the delivery that held them).
type Gathered = (
    BytesMut,
    Vec<u32>,
    BytesMut,
    u32,
    Vec<(Option<Lost>, Option<DeliveryToken>)>,
);

/// Gathers the records of `redo`: those the group kept, and the others read with `read`
/// (one record by offset) from the log or a ring.
fn gather_redeliveries(
    redo: Redeliveries,
    mut read: impl FnMut(u64) -> Result<Reread, StoreError>,
) -> Result<Gathered, StoreError> {
    debug_assert_eq!(redo.deliver.len(), redo.kept.len());
    let mut missing = Vec::new();
    let (mut body, mut kept) = (BytesMut::new(), Vec::new());
    for ((offset, attempt), record) in redo.deliver.into_iter().zip(redo.kept) {
        let found = match record {
            Some(record) => Ok(record),
            None => read(offset)?,
        };
        match found {
            Ok(data) => {
                body.extend_from_slice(&data);
                kept.push(attempt);
            }
            Err(lost) => missing.push((lost, Some(DeliveryToken { offset, attempt }))),
        }
    }
    let (mut dead, mut dead_count) = (BytesMut::new(), 0u32);
    for offset in redo.dead {
        match read(offset)? {
            Ok(data) => {
                dead.extend_from_slice(&data);
                dead_count += 1;
            }
            Err(lost) => missing.push((lost, None)),
        }
    }
    Ok((body, kept, dead, dead_count, missing))
}

/// What one read of new records found.
enum Read {
    Batch(ReadBatch),
    /// The read met damage at its first record; where to go on.
    Skip(Skip),
}

fn corrupt(mq: &Mq, e: qbus_wire::protocol::record::RecordError) -> BrokerError {
    BrokerError::Store(StoreError::Corrupt {
        file: mq.dir.clone(),
        position: 0,
        reason: e,
    })
}

/// The one record at `offset` that `damage` (a damage error of the store) made unreadable.
fn lost_record(offset: u64, damage: &StoreError) -> Lost {
    let (file, position) = match damage {
        StoreError::Corrupt { file, position, .. }
        | StoreError::OffsetMismatch { file, position, .. } => (file.clone(), *position),
        _ => (Default::default(), 0),
    };
    Lost {
        first: offset,
        end: offset + 1,
        file,
        position,
        reason: damage.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::testutil::{produce, read, tokens, Commit};
    use crate::store::OsFs;

    fn limits() -> Limits {
        Limits {
            ack_timeout: Duration::from_secs(30),
            max_deliveries: 16,
            max_in_flight: 1024,
        }
    }

    fn open(dir: &Path, options: Option<MqOptions>) -> Mq {
        let fs = OsFs::shared();
        if let Some(options) = options {
            Mq::prepare(&fs, dir, &options).unwrap();
        }
        Mq::open(&fs, "orders", dir, LogConfig::default(), &limits()).unwrap()
    }

    async fn append(mq: &Mq, commit: &Commit, bodies: &[&str]) {
        let (records, count) = produce(bodies);
        mq.append(&commit.committer, records, count).await.unwrap();
    }

    #[tokio::test]
    async fn produce_then_fetch_then_ack() {
        let dir = tempfile::tempdir().unwrap();
        let commit = Commit::start();
        let mq = open(dir.path(), Some(MqOptions::default()));
        append(&mq, &commit, &["a", "b", "c"]).await;
        let group = mq
            .group(&commit.committer, "g", Start::Earliest)
            .await
            .unwrap();

        let fetched = mq.fetch(&group, 1, 2, None, Duration::ZERO).await.unwrap();
        assert_eq!(read(&fetched.body), [(0, "a".into()), (1, "b".into())]);
        assert_eq!(fetched.attempts, [1, 1]);
        assert!(fetched.dead.is_empty());
        let rest = mq.fetch(&group, 1, 10, None, Duration::ZERO).await.unwrap();
        assert_eq!(read(&rest.body), [(2, "c".into())]);
        let empty = mq.fetch(&group, 1, 10, None, Duration::ZERO).await.unwrap();
        assert!(empty.attempts.is_empty(), "everything is out");

        let mut batch = CommitBatch::default();
        let (acked, stored) = mq.ack(
            &commit.committer,
            &mut batch,
            &group,
            &tokens(&fetched.body, &fetched.attempts),
        );
        commit.committer.submit(batch).await.unwrap();
        assert_eq!(
            (acked, stored.wait().await.unwrap()),
            (2, Durability::Synced)
        );
        let info = mq.info();
        assert_eq!(
            (
                info.next_offset,
                info.groups[0].committed,
                info.groups[0].in_flight
            ),
            (3, 2, 1)
        );
        commit.stop().await;
    }

    /// An ack wakes a fetch only when it can go on because of it: one waiting for room (its
    /// connection holds its most deliveries) gets the next record at once; one that has
    /// room waits for new records, which wake it themselves.
    #[tokio::test]
    async fn acks_wake_only_fetches_waiting_for_room() {
        let dir = tempfile::tempdir().unwrap();
        let commit = Commit::start();
        let fs = OsFs::shared();
        Mq::prepare(&fs, dir.path(), &MqOptions::default()).unwrap();
        let one = Limits {
            max_in_flight: 1,
            ..limits()
        };
        let mq = Arc::new(Mq::open(&fs, "orders", dir.path(), LogConfig::default(), &one).unwrap());
        append(&mq, &commit, &["a", "b"]).await;
        let group = mq
            .group(&commit.committer, "g", Start::Earliest)
            .await
            .unwrap();
        let first = mq.fetch(&group, 1, 10, None, Duration::ZERO).await.unwrap();
        assert_eq!(read(&first.body), [(0, "a".into())]);
        assert!(!group.ack_wakes(&mut group.state()), "no fetch waits");

        let waiting = tokio::spawn({
            let (mq, group) = (mq.clone(), group.clone());
            async move { mq.fetch(&group, 1, 10, None, Duration::from_secs(30)).await }
        });
        tokio::time::timeout(Duration::from_secs(5), async {
            while !group.ack_wakes(&mut group.state()) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the second fetch waits for room");
        let mut batch = CommitBatch::default();
        let tokens = tokens(&first.body, &first.attempts);
        let (acked, _) = mq.ack(&commit.committer, &mut batch, &group, &tokens);
        commit.committer.submit(batch).await.unwrap();
        assert_eq!(acked, 1);
        let second = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the ack woke the fetch")
            .unwrap()
            .unwrap();
        assert_eq!(read(&second.body), [(1, "b".into())]);
        assert!(!group.ack_wakes(&mut group.state()), "it stopped waiting");
        commit.stop().await;
    }

    #[tokio::test]
    async fn reopening_keeps_records_options_and_cursors() {
        let dir = tempfile::tempdir().unwrap();
        let commit = Commit::start();
        let options = MqOptions {
            max_deliveries: Some(3),
            ..MqOptions::default()
        };
        let mq = open(dir.path(), Some(options));
        append(&mq, &commit, &["a", "b", "c"]).await;
        let group = mq
            .group(&commit.committer, "g", Start::Earliest)
            .await
            .unwrap();
        let fetched = mq.fetch(&group, 1, 1, None, Duration::ZERO).await.unwrap();
        let mut batch = CommitBatch::default();
        let (_, stored) = mq.ack(
            &commit.committer,
            &mut batch,
            &group,
            &tokens(&fetched.body, &fetched.attempts),
        );
        commit.committer.submit(batch).await.unwrap();
        stored.wait().await.unwrap();
        drop((group, mq));

        let mq = open(dir.path(), None);
        let info = mq.info();
        assert_eq!((info.first_offset, info.next_offset), (0, 3));
        assert_eq!(info.options.max_deliveries, Some(3));
        assert_eq!(
            (info.groups[0].name.as_str(), info.groups[0].committed),
            ("g", 1)
        );
        let group = mq.existing_group("g").expect("the group is back");
        let fetched = mq.fetch(&group, 2, 10, None, Duration::ZERO).await.unwrap();
        assert_eq!(read(&fetched.body), [(1, "b".into()), (2, "c".into())]);
        commit.stop().await;
    }

    /// Flips a bit in the body of record `index` of the MQ's first segment, in place (an
    /// open reader sees it).
    fn damage_record(dir: &Path, index: usize) {
        let segment = dir.join("00000000000000000000.log");
        let mut raw = std::fs::read(&segment).unwrap();
        let mut at = 0;
        for _ in 0..index {
            at += qbus_wire::protocol::record::peek_record_size(&raw[at..]).unwrap();
        }
        raw[at + 30] ^= 0x10;
        std::fs::write(&segment, &raw).unwrap();
    }

    #[tokio::test]
    async fn fetches_go_past_a_damaged_record_and_count_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let commit = Commit::start();
        let mq = open(dir.path(), Some(MqOptions::default()));
        let bodies: Vec<String> = (0..30).map(|i| format!("message {i}")).collect();
        let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
        append(&mq, &commit, &refs).await;
        drop(mq);
        damage_record(dir.path(), 12);

        let mq = open(dir.path(), None);
        for name in ["g", "h"] {
            let group = mq
                .group(&commit.committer, name, Start::Earliest)
                .await
                .unwrap();
            let (mut got, mut lost) = (Vec::new(), Vec::new());
            loop {
                let fetched = mq
                    .fetch(&group, 1, 100, None, Duration::ZERO)
                    .await
                    .unwrap();
                if let Some(gone) = fetched.lost {
                    assert!(fetched.attempts.is_empty(), "a loss comes alone");
                    lost.push((gone.first, gone.end, got.len()));
                    continue;
                }
                if fetched.attempts.is_empty() {
                    break;
                }
                got.extend(read(&fetched.body).into_iter().map(|(offset, _)| offset));
            }
            let want: Vec<u64> = (0..30).filter(|&o| o != 12).collect();
            assert_eq!(got, want, "group {name}: every intact record, in order");
            assert_eq!(
                lost,
                [(12, 13, 12)],
                "group {name}: told once, after offset 11"
            );
        }
        assert_eq!(mq.counters().read().lost, 1, "counted once per MQ");
        commit.stop().await;
    }

    #[tokio::test]
    async fn a_record_damaged_after_its_delivery_is_settled_not_redelivered() {
        let dir = tempfile::tempdir().unwrap();
        let commit = Commit::start();
        let mq = open(dir.path(), Some(MqOptions::default()));
        append(&mq, &commit, &["zero", "one", "two"]).await;
        let group = mq
            .group(&commit.committer, "g", Start::Earliest)
            .await
            .unwrap();
        let first = mq.fetch(&group, 1, 10, None, Duration::ZERO).await.unwrap();
        assert_eq!(first.attempts, [1, 1, 1]);
        // Record 1 goes bad on disk while it is out.
        damage_record(dir.path(), 1);

        let given_back = tokens(&first.body, &first.attempts);
        assert_eq!(mq.nack(&group, &given_back, false), 3);
        let again = mq.fetch(&group, 1, 10, None, Duration::ZERO).await.unwrap();
        let offsets: Vec<u64> = read(&again.body).into_iter().map(|(o, _)| o).collect();
        assert_eq!(offsets, [0, 2], "the damaged record is not served");
        assert_eq!(again.attempts, [2, 2]);
        assert_eq!(mq.counters().read().lost, 1);
        // Nothing waits for the damaged one: acking the others commits all three.
        let mut batch = CommitBatch::default();
        let (acked, _) = mq.ack(
            &commit.committer,
            &mut batch,
            &group,
            &tokens(&again.body, &again.attempts),
        );
        assert_eq!(acked, 2);
        assert_eq!(group.state().committed(), 3);
        commit.stop().await;
    }

    #[tokio::test]
    async fn delivery_counts_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let commit = Commit::start();
        let options = MqOptions {
            max_deliveries: Some(3),
            ..MqOptions::default()
        };
        let mq = open(dir.path(), Some(options));
        append(&mq, &commit, &["poison", "fine"]).await;
        let group = mq
            .group(&commit.committer, "g", Start::Earliest)
            .await
            .unwrap();
        // Delivered twice, given back each time (a consumer that crashes on it).
        let first = mq.fetch(&group, 1, 1, None, Duration::ZERO).await.unwrap();
        mq.nack(&group, &tokens(&first.body, &first.attempts), false);
        let second = mq.fetch(&group, 1, 1, None, Duration::ZERO).await.unwrap();
        assert_eq!(second.attempts, [2]);
        drop((group, mq));

        // After a restart the count goes on: the third delivery is the last.
        let mq = open(dir.path(), None);
        let group = mq.existing_group("g").unwrap();
        let third = mq.fetch(&group, 1, 1, None, Duration::ZERO).await.unwrap();
        assert_eq!(
            (read(&third.body), third.attempts.clone()),
            (vec![(0, "poison".into())], vec![3])
        );
        mq.nack(&group, &tokens(&third.body, &third.attempts), false);
        drop((group, mq));

        // And after another, it is dead-lettered instead of delivered a fourth time.
        let mq = open(dir.path(), None);
        let group = mq.existing_group("g").unwrap();
        let next = mq.fetch(&group, 1, 10, None, Duration::ZERO).await.unwrap();
        assert_eq!(read(&next.dead.records), [(0, "poison".into())]);
        assert_eq!(read(&next.body), [(1, "fine".into())]);
        assert_eq!(next.attempts, [1]);
        assert_eq!(mq.info().groups[0].dead_lettered, 1);
        commit.stop().await;
    }

    #[tokio::test]
    async fn records_past_their_delivery_limit_come_back_as_dead_letters() {
        let dir = tempfile::tempdir().unwrap();
        let commit = Commit::start();
        let options = MqOptions {
            max_deliveries: Some(1),
            ..MqOptions::default()
        };
        let mq = open(dir.path(), Some(options));
        append(&mq, &commit, &["poison", "fine"]).await;
        let group = mq
            .group(&commit.committer, "g", Start::Earliest)
            .await
            .unwrap();
        let fetched = mq.fetch(&group, 1, 1, None, Duration::ZERO).await.unwrap();
        assert_eq!(
            mq.nack(&group, &tokens(&fetched.body, &fetched.attempts), false),
            1
        );

        let again = mq.fetch(&group, 1, 10, None, Duration::ZERO).await.unwrap();
        assert!(again.attempts.is_empty(), "nothing redelivered");
        assert_eq!(again.dead.count, 1);
        assert_eq!(read(&again.dead.records), [(0, "poison".into())]);
        let next = mq.fetch(&group, 1, 10, None, Duration::ZERO).await.unwrap();
        assert_eq!(read(&next.body), [(1, "fine".into())]);
        assert!(next.dead.is_empty());
        assert_eq!(mq.info().groups[0].dead_lettered, 1);
        commit.stop().await;
    }
}
