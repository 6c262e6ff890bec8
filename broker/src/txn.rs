//! Transactions on one broker (protocol 4): begin, half messages, commit or roll back.
//!
//! A transaction's half messages are entries of the broker's transaction log
//! ([`TxnLog`]), synced before they are acknowledged like any produce, and in no MQ's log:
//! no group can deliver them. A commit is first a durable decision entry, then one append
//! per target MQ, all handed to the commit thread in one batch, each record carrying its
//! sender's dedupe id or else `tx:<txn>:<n>`: an MQ publishes an append's records together,
//! so a consumer sees all of a transaction's messages of its MQ or none, and a commit
//! applied again (a repeated commit after a failed append, or recovery after `kill -9`
//! between the decision and the appends) is answered by the MQ's dedupe window instead of
//! storing twice. A sender's id already in the window (a plain produce, or another
//! transaction, stored it) is not stored again either. An `Applied` entry ends it. A
//! rollback is one durable entry.
//!
//! Each transaction is decided under its own lock, so a decision for one never waits on or
//! touches another; a decided transaction answers a repeat of its decision with the same
//! outcome and the other decision with `409`. Ids are never reused: each is above every id
//! the log names, and a compacted log starts with the next id to issue.
//!
//! A transaction left undecided for its timeout is checked once per interval: when it
//! names a producer group and a connection of that group sent `TxCheckerReady`, one such
//! connection (in turn) is sent a `TxCheck` and may answer with the decision; after its
//! maximum checks the broker applies its policy (roll back unless it said
//! `commit_unresolved`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use qbus_wire::link::FrameSender;
use qbus_wire::now_ms;
use qbus_wire::protocol::record::{encode_record_meta, records, RecordMeta};
use qbus_wire::protocol::txn::{
    DEFAULT_TX_MAX_CHECKS, DEFAULT_TX_TIMEOUT_MS, MAX_CHECKED_MESSAGES,
};
use qbus_wire::protocol::{
    CheckedMessage, Command, Frame, Header, TxCheck, TxInfo, TxOptions, TxState,
};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

use crate::error::BrokerError;
use crate::queue::dedupe::{ProduceWait, Settled};
use crate::queue::group_commit::{CommitBatch, Committer};
use crate::queue::registry::Registry;
use crate::store::txn_log::{Event, TxnLog, TXN_DIR};
use crate::store::txn_log_writer::TxnLogWriter;
use crate::store::{FsRef, StoreError};

/// Most half messages one transaction may hold.
pub const MAX_MESSAGES: usize = 10_000;
/// Most bytes of half messages all open transactions together may hold in memory.
pub const MAX_PENDING_BYTES: usize = 256 << 20;
/// Most producer groups one connection may answer checks for.
pub const MAX_CHECKER_GROUPS: usize = 64;
/// Decided transactions remembered for idempotent answers (oldest forgotten first).
const REMEMBER_DECIDED: usize = 100_000;

/// What the log keeps of a begin.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Began {
    options: TxOptions,
    began_ms: u64,
}

struct Txn {
    began: Began,
    state: TxState,
    /// A commit whose messages are all in their MQs (meaningless otherwise).
    applied: bool,
    /// Half messages per MQ: whole records back to back, and their count.
    halves: Vec<(String, Bytes, u32)>,
    checks: u32,
    /// Held while the transaction is written to or decided.
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Txn {
    /// `records` (`count` of them) less those whose dedupe id one of its messages already
    /// has: a send retried after its reply was lost (the broker restarted, the connection
    /// dropped) adds nothing the first one stored. Records without a dedupe id are not
    /// looked at twice.
    fn without_repeats(
        &self,
        id: u64,
        sent: Bytes,
        count: u32,
    ) -> Result<(Bytes, u32), BrokerError> {
        let damaged = |e| BrokerError::BadRequest(format!("transaction {id}: a bad record: {e}"));
        let mut has_ids = false;
        for record in records(&sent) {
            has_ids |= record.map_err(damaged)?.dedupe_id.is_some();
        }
        if !has_ids {
            return Ok((sent, count));
        }
        let mut seen = HashSet::new();
        for (_, bytes, _) in &self.halves {
            for record in records(bytes).flatten() {
                if let Some(dedupe) = record.dedupe_id {
                    seen.insert(dedupe.to_owned());
                }
            }
        }
        // One verdict per record, so a repeat within this request counts as one too.
        let mut keep = Vec::with_capacity(count as usize);
        for record in records(&sent) {
            let dedupe = record.map_err(damaged)?.dedupe_id;
            keep.push(dedupe.is_none_or(|d| seen.insert(d.to_owned())));
        }
        if keep.iter().all(|&k| k) {
            return Ok((sent, count));
        }
        let mut kept = BytesMut::new();
        let mut kept_count = 0;
        for (record, _) in records(&sent).zip(&keep).filter(|(_, &k)| k) {
            let record = record.map_err(damaged)?;
            encode_record_meta(&mut kept, 0, 0, &record.meta(), record.body).map_err(|e| {
                BrokerError::Internal(format!("transaction {id}: re-encoding a half: {e}"))
            })?;
            kept_count += 1;
        }
        Ok((kept.freeze(), kept_count))
    }

    fn new(began: Began) -> Txn {
        Txn {
            began,
            state: TxState::Pending,
            applied: false,
            halves: Vec::new(),
            checks: 0,
            lock: Arc::default(),
        }
    }

    fn bytes(&self) -> usize {
        self.halves.iter().map(|(_, r, _)| r.len()).sum()
    }

    fn messages(&self) -> usize {
        self.halves.iter().map(|(_, _, n)| *n as usize).sum()
    }

    fn timeout_ms(&self) -> u64 {
        self.began
            .options
            .timeout_ms
            .unwrap_or(DEFAULT_TX_TIMEOUT_MS)
    }

    /// When the next check is due.
    fn next_check_ms(&self) -> u64 {
        let interval = self
            .began
            .options
            .check_interval_ms
            .unwrap_or_else(|| self.timeout_ms());
        self.began
            .began_ms
            .saturating_add(self.timeout_ms())
            .saturating_add(interval.saturating_mul(self.checks.into()))
    }

    /// Whether its log entries are still needed (open, or a commit not applied yet).
    fn live(&self) -> bool {
        self.state == TxState::Pending || (self.state == TxState::Committed && !self.applied)
    }

    /// The `TxCheck` push asking about it.
    fn check_frame(&self, id: u64, now: u64) -> Frame {
        let mut messages = Vec::new();
        'halves: for (mq, bytes, _) in &self.halves {
            // Verified when they were sent: an unreadable one cannot occur, and is skipped.
            for record in records(bytes).flatten() {
                if messages.len() == MAX_CHECKED_MESSAGES {
                    break 'halves;
                }
                messages.push(CheckedMessage {
                    mq: mq.clone(),
                    key: record.key.map(str::to_owned),
                    tag: record.tag.map(str::to_owned),
                });
            }
        }
        let check = TxCheck {
            txn: self.info(id, now),
            messages,
        };
        let mut header = Header::request(Command::TxCheck, None);
        header.offset = Some(id);
        // Serialising our own plain structs cannot fail.
        let body = rmp_serde::to_vec_named(&check).unwrap_or_default();
        Frame::with_body(header, body.into())
    }

    fn info(&self, id: u64, now: u64) -> TxInfo {
        let mut mqs: Vec<(String, u32)> = Vec::new();
        for (mq, _, n) in &self.halves {
            match mqs.iter_mut().find(|(name, _)| name == mq) {
                Some((_, total)) => *total += n,
                None => mqs.push((mq.clone(), *n)),
            }
        }
        TxInfo {
            id,
            group: self.began.options.group.clone(),
            state: self.state,
            mqs,
            age_ms: now.saturating_sub(self.began.began_ms),
            checks: self.checks,
        }
    }
}

#[derive(Default)]
struct State {
    next_id: u64,
    txns: BTreeMap<u64, Txn>,
    /// The decided transactions of `txns` (those not [live](Txn::live)), in the order
    /// they were decided: the oldest are forgotten first, without a scan of `txns`.
    decided: VecDeque<u64>,
    pending_bytes: usize,
}

/// The connections that answer checks, per producer group: (connection id, its frames).
type Checkers = HashMap<String, Vec<(u64, FrameSender)>>;

/// Counters of the broker's transactions (since it started).
#[derive(Debug, Default)]
pub struct TxCounters {
    /// Begun.
    pub begun: AtomicU64,
    /// Committed (by the producer or by policy).
    pub committed: AtomicU64,
    /// Rolled back (by the producer or by policy).
    pub rolled_back: AtomicU64,
    /// Checks: times an undecided transaction's timeout or interval passed.
    pub checked: AtomicU64,
    /// Checks sent to a connection of the transaction's producer group.
    pub checks_sent: AtomicU64,
    /// Resolved by the broker's policy after the maximum checks.
    pub timed_out: AtomicU64,
}

/// The counters at one moment, for stats and `/metrics`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct TxTotals {
    /// Begun.
    pub begun: u64,
    /// Committed (by the producer or by policy).
    pub committed: u64,
    /// Rolled back (by the producer or by policy).
    pub rolled_back: u64,
    /// Checks: times an undecided transaction's timeout or interval passed.
    pub checked: u64,
    /// Checks sent to a connection of the transaction's producer group.
    pub checks_sent: u64,
    /// Resolved by the broker's policy after the maximum checks.
    pub timed_out: u64,
}

/// What a decision did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decided {
    /// Taken now.
    Now,
    /// The transaction had been so decided already: nothing changed.
    Already,
}

/// The broker's transactions.
pub struct Transactions {
    log: TxnLogWriter,
    state: Mutex<State>,
    checkers: Mutex<Checkers>,
    counters: TxCounters,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Transactions {
    /// Opens the transaction log of the store and rebuilds every transaction it names;
    /// compacts it when it holds decided ones. Blocking.
    pub fn open(
        fs: &FsRef,
        store: &std::path::Path,
        sync: bool,
    ) -> Result<Transactions, StoreError> {
        let (mut log, events) = TxnLog::open(fs, store, sync)?;
        let mut state = State {
            next_id: 1,
            ..State::default()
        };
        let total = events.len();
        for event in events {
            state.next_id = state.next_id.max(event.txn() + 1);
            let txn = event.txn();
            match event {
                Event::Begin { options, .. } => {
                    let Ok(began) = rmp_serde::from_slice::<Began>(&options) else {
                        tracing::warn!(txn, "transaction log: unreadable begin, skipped");
                        continue;
                    };
                    state.txns.insert(txn, Txn::new(began));
                }
                Event::Issued { .. } => {}
                other => {
                    let Some(t) = state.txns.get_mut(&txn) else {
                        continue;
                    };
                    match other {
                        Event::Half {
                            mq, records: bytes, ..
                        } => {
                            let count = records(&bytes).count() as u32;
                            state.pending_bytes += bytes.len();
                            t.halves.push((mq, Bytes::from(bytes), count));
                        }
                        Event::Commit { .. } => t.state = TxState::Committed,
                        Event::Rollback { .. } => t.state = TxState::RolledBack,
                        Event::Applied { .. } => t.applied = true,
                        Event::Begin { .. } | Event::Issued { .. } => {}
                    }
                    if !t.live() {
                        state.pending_bytes -= t.bytes();
                        t.halves.clear();
                    }
                }
            }
        }
        let live = live_events(&state);
        if live.len() < total {
            log.rewrite(&live)?;
        }
        state.decided = state
            .txns
            .iter()
            .filter(|(_, t)| !t.live())
            .map(|(id, _)| *id)
            .collect();
        let log = TxnLogWriter::start(log).map_err(|source| StoreError::Io {
            path: store.join(TXN_DIR),
            source,
        })?;
        Ok(Transactions {
            log,
            state: Mutex::new(state),
            checkers: Mutex::default(),
            counters: TxCounters::default(),
        })
    }

    /// The counters now.
    pub fn totals(&self) -> TxTotals {
        let c = &self.counters;
        let read = |n: &AtomicU64| n.load(Ordering::Relaxed);
        TxTotals {
            begun: read(&c.begun),
            committed: read(&c.committed),
            rolled_back: read(&c.rolled_back),
            checked: read(&c.checked),
            checks_sent: read(&c.checks_sent),
            timed_out: read(&c.timed_out),
        }
    }

    /// Appends `events` to the log; returns once they are synced (with the appends of
    /// other transactions that came at the same time).
    async fn append(&self, events: Vec<Event>) -> Result<(), BrokerError> {
        Ok(self.log.append(&events).await?)
    }

    /// Opens a transaction; its id once the begin is durable.
    pub async fn begin(&self, options: TxOptions) -> Result<u64, BrokerError> {
        if options.timeout_ms == Some(0) || options.check_interval_ms == Some(0) {
            return Err(BrokerError::BadRequest(
                "a transaction's timeout_ms and check_interval_ms must be above 0".into(),
            ));
        }
        let began = Began {
            options,
            began_ms: now_ms(),
        };
        let encoded = rmp_serde::to_vec_named(&began)
            .map_err(|e| BrokerError::Internal(format!("encoding a begin: {e}")))?;
        let (id, txn) = {
            let mut state = lock(&self.state);
            let id = state.next_id;
            state.next_id += 1;
            let txn = Txn::new(began);
            let guard = txn.lock.clone();
            state.txns.insert(id, txn);
            (id, guard)
        };
        // Nothing can decide it before the begin is durable.
        let _held = txn.lock().await;
        if let Err(e) = self
            .append(vec![Event::Begin {
                txn: id,
                options: encoded,
            }])
            .await
        {
            lock(&self.state).txns.remove(&id);
            return Err(e);
        }
        self.counters.begun.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    /// The lock of transaction `id`, or why there is none.
    fn txn_lock(&self, id: u64) -> Result<Arc<tokio::sync::Mutex<()>>, BrokerError> {
        let state = lock(&self.state);
        match state.txns.get(&id) {
            Some(txn) => Ok(txn.lock.clone()),
            None => Err(BrokerError::NoSuchTxn(id)),
        }
    }

    /// Adds `count` verified records (`records`, back to back) to transaction `id` for
    /// `mq` (which must exist), durably; they stay invisible until the commit.
    pub async fn produce(
        &self,
        registry: &Registry,
        id: u64,
        mq: &str,
        records: Bytes,
        count: u32,
    ) -> Result<(), BrokerError> {
        let target = registry.own(mq)?;
        let guard = self.txn_lock(id)?;
        let _held = guard.lock().await;
        let (records, count) = {
            let state = lock(&self.state);
            let txn = state.txns.get(&id).ok_or(BrokerError::NoSuchTxn(id))?;
            if txn.state != TxState::Pending {
                return Err(BrokerError::Conflict(format!(
                    "transaction {id} was {}: it takes no more messages",
                    txn.state
                )));
            }
            let (records, count) = txn.without_repeats(id, records, count)?;
            if count == 0 {
                // A retried send (its reply was lost, say to a broker restart): stored.
                return Ok(());
            }
            if txn.messages() + count as usize > MAX_MESSAGES {
                return Err(BrokerError::BadRequest(format!(
                    "transaction {id} would hold more than {MAX_MESSAGES} messages"
                )));
            }
            if state.pending_bytes + records.len() > MAX_PENDING_BYTES {
                return Err(BrokerError::Overloaded(format!(
                    "open transactions hold {MAX_PENDING_BYTES} bytes of messages; commit or roll back some first"
                )));
            }
            (records, count)
        };
        self.append(vec![Event::Half {
            txn: id,
            mq: target.name().to_owned(),
            records: records.to_vec(),
        }])
        .await?;
        let mut state = lock(&self.state);
        state.pending_bytes += records.len();
        if let Some(txn) = state.txns.get_mut(&id) {
            txn.halves.push((target.name().to_owned(), records, count));
        }
        Ok(())
    }

    /// Commits transaction `id`: every message becomes visible, each MQ's at once.
    pub async fn commit(
        &self,
        registry: &Registry,
        committer: &Committer,
        id: u64,
    ) -> Result<Decided, BrokerError> {
        let guard = self.txn_lock(id)?;
        let _held = guard.lock().await;
        let (state, applied) = self.state_of(id)?;
        let decided = match state {
            TxState::RolledBack => {
                return Err(BrokerError::Conflict(format!(
                    "transaction {id} was rolled back; it cannot be committed"
                )))
            }
            TxState::Committed if applied => return Ok(Decided::Already),
            TxState::Committed => Decided::Already,
            TxState::Pending => {
                self.append(vec![Event::Commit { txn: id }]).await?;
                if let Some(txn) = lock(&self.state).txns.get_mut(&id) {
                    txn.state = TxState::Committed;
                }
                self.counters.committed.fetch_add(1, Ordering::Relaxed);
                Decided::Now
            }
        };
        self.apply(registry, committer, id).await?;
        Ok(decided)
    }

    fn state_of(&self, id: u64) -> Result<(TxState, bool), BrokerError> {
        let state = lock(&self.state);
        let txn = state.txns.get(&id).ok_or(BrokerError::NoSuchTxn(id))?;
        Ok((txn.state, txn.applied))
    }

    /// Appends a committed transaction's messages to their MQs (in one commit batch), then
    /// notes it applied. Call with the transaction's lock held.
    async fn apply(
        &self,
        registry: &Registry,
        committer: &Committer,
        id: u64,
    ) -> Result<(), BrokerError> {
        let halves = {
            let state = lock(&self.state);
            let txn = state.txns.get(&id).ok_or(BrokerError::NoSuchTxn(id))?;
            txn.halves.clone()
        };
        // One append per MQ, its records in the order sent, each with its dedupe id.
        let mut per_mq: Vec<(String, BytesMut, u32)> = Vec::new();
        let mut n = 0u64;
        for (mq, bytes, _) in &halves {
            let slot = match per_mq.iter().position(|(name, _, _)| name == mq) {
                Some(i) => i,
                None => {
                    per_mq.push((mq.clone(), BytesMut::new(), 0));
                    per_mq.len() - 1
                }
            };
            for record in records(bytes) {
                let record = record.map_err(|e| {
                    BrokerError::Internal(format!(
                        "transaction {id}: a stored half is damaged: {e}"
                    ))
                })?;
                // The sender's own id is kept, so the MQ's window refuses it when a plain
                // produce or another transaction stored it already, and answers it later.
                let generated;
                let dedupe = match record.dedupe_id {
                    Some(theirs) => theirs,
                    None => {
                        generated = format!("tx:{id}:{n}");
                        generated.as_str()
                    }
                };
                n += 1;
                let meta = RecordMeta {
                    dedupe_id: Some(dedupe),
                    ..record.meta()
                };
                let (_, out, count) = &mut per_mq[slot];
                encode_record_meta(out, 0, 0, &meta, record.body).map_err(|e| {
                    BrokerError::Internal(format!("transaction {id}: re-encoding a half: {e}"))
                })?;
                *count += 1;
            }
        }
        let mut batch = CommitBatch::default();
        let mut waits: Vec<ProduceWait> = Vec::new();
        for (name, out, count) in per_mq {
            let mq = match registry.own(&name) {
                Ok(mq) => mq,
                Err(e) => {
                    tracing::warn!(txn = id, mq = %name, error = %e, "committed messages for an MQ that is gone: dropped");
                    continue;
                }
            };
            waits.push(mq.stage_deduped(&mut batch, out.freeze(), count).await?);
        }
        committer.submit(batch).await?;
        for wait in waits {
            match wait.settle().await {
                Settled::Now(receipt) => receipt?,
                Settled::Later(receipt) => receipt.await?,
            };
        }
        self.append(vec![Event::Applied { txn: id }]).await?;
        self.finish(id, TxState::Committed);
        Ok(())
    }

    /// Notes `id` decided and done with: its halves dropped, the oldest decided ones
    /// forgotten past [`REMEMBER_DECIDED`].
    fn finish(&self, id: u64, outcome: TxState) {
        let mut state = lock(&self.state);
        let mut freed = 0;
        let mut newly_decided = false;
        if let Some(txn) = state.txns.get_mut(&id) {
            newly_decided = txn.live();
            txn.state = outcome;
            txn.applied = true;
            freed = txn.bytes();
            txn.halves.clear();
        }
        state.pending_bytes -= freed;
        if newly_decided {
            state.decided.push_back(id);
        }
        while state.decided.len() > REMEMBER_DECIDED {
            if let Some(old) = state.decided.pop_front() {
                state.txns.remove(&old);
            }
        }
    }

    /// Rolls back transaction `id`: its messages are discarded.
    pub async fn rollback(&self, id: u64) -> Result<Decided, BrokerError> {
        let guard = self.txn_lock(id)?;
        let _held = guard.lock().await;
        match self.state_of(id)?.0 {
            TxState::Committed => Err(BrokerError::Conflict(format!(
                "transaction {id} was committed; it cannot be rolled back"
            ))),
            TxState::RolledBack => Ok(Decided::Already),
            TxState::Pending => {
                self.append(vec![Event::Rollback { txn: id }]).await?;
                self.counters.rolled_back.fetch_add(1, Ordering::Relaxed);
                self.finish(id, TxState::RolledBack);
                Ok(Decided::Now)
            }
        }
    }

    /// Applies the commits a crash interrupted (decided, not all appended yet).
    pub async fn recover(&self, registry: &Registry, committer: &Committer) {
        let unapplied: Vec<u64> = lock(&self.state)
            .txns
            .iter()
            .filter(|(_, t)| t.state == TxState::Committed && !t.applied)
            .map(|(id, _)| *id)
            .collect();
        for id in unapplied {
            if let Err(e) = self.commit(registry, committer, id).await {
                tracing::warn!(txn = id, error = %e, "re-applying a commit after restart failed");
            }
        }
    }

    /// Connection `conn` (whose frames go to `out`) answers the checks of producer group
    /// `group` until [`checker_gone`](Self::checker_gone).
    pub fn checker_ready(
        &self,
        group: &str,
        conn: u64,
        out: FrameSender,
    ) -> Result<(), BrokerError> {
        let mut checkers = lock(&self.checkers);
        let groups = checkers
            .values()
            .filter(|conns| conns.iter().any(|(c, _)| *c == conn))
            .count();
        let group_conns = checkers.entry(group.to_owned()).or_default();
        if group_conns.iter().any(|(c, _)| *c == conn) {
            return Ok(());
        }
        if groups >= MAX_CHECKER_GROUPS {
            return Err(BrokerError::BadRequest(format!(
                "a connection answers checks for at most {MAX_CHECKER_GROUPS} producer groups"
            )));
        }
        group_conns.push((conn, out));
        Ok(())
    }

    /// Connection `conn` closed: it answers no more checks.
    pub fn checker_gone(&self, conn: u64) {
        let mut checkers = lock(&self.checkers);
        checkers.retain(|_, conns| {
            conns.retain(|(c, _)| *c != conn);
            !conns.is_empty()
        });
    }

    /// Sends the check `frame` to one connection of `group` (the `nth` in turn), if any
    /// is there with room for it: a check not sent is one the producer did not answer.
    fn send_check(&self, group: Option<&str>, nth: u32, frame: impl FnOnce() -> Frame) {
        let checkers = lock(&self.checkers);
        let Some(conns) = group.and_then(|g| checkers.get(g)) else {
            return;
        };
        let (_, out) = &conns[nth as usize % conns.len()];
        if out.try_send(frame()).is_ok() {
            self.counters.checks_sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Checks every open transaction whose timeout or interval passed (asking its
    /// producer group when a connection of it is ready), and resolves by policy those past
    /// their maximum checks.
    pub async fn sweep(&self, registry: &Registry, committer: &Committer) {
        let now = now_ms();
        let mut resolve = Vec::new();
        {
            let mut state = lock(&self.state);
            for (id, txn) in state.txns.iter_mut() {
                if txn.state != TxState::Pending || txn.next_check_ms() > now {
                    continue;
                }
                let max = txn
                    .began
                    .options
                    .max_checks
                    .unwrap_or(DEFAULT_TX_MAX_CHECKS);
                if txn.checks >= max {
                    resolve.push((*id, txn.began.options.commit_unresolved == Some(true)));
                } else {
                    txn.checks += 1;
                    self.counters.checked.fetch_add(1, Ordering::Relaxed);
                    let group = txn.began.options.group.as_deref();
                    self.send_check(group, txn.checks, || txn.check_frame(*id, now));
                }
            }
        }
        for (id, commit) in resolve {
            let done = if commit {
                self.commit(registry, committer, id).await
            } else {
                self.rollback(id).await
            };
            match done {
                Ok(Decided::Now) => {
                    self.counters.timed_out.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        txn = id,
                        commit,
                        "transaction resolved by policy after its checks"
                    );
                }
                Ok(Decided::Already) => {}
                Err(e) => tracing::warn!(txn = id, error = %e, "resolving a transaction failed"),
            }
        }
    }

    /// The open transactions (and commits not applied yet), oldest first.
    pub fn list(&self) -> Vec<TxInfo> {
        let now = now_ms();
        lock(&self.state)
            .txns
            .iter()
            .filter(|(_, t)| t.live())
            .map(|(id, t)| t.info(*id, now))
            .collect()
    }

    /// Where transaction `id` stands.
    pub fn get(&self, id: u64) -> Result<TxInfo, BrokerError> {
        let state = lock(&self.state);
        let txn = state.txns.get(&id).ok_or(BrokerError::NoSuchTxn(id))?;
        Ok(txn.info(id, now_ms()))
    }
}

/// The log entries of what `state` holds, after the next id to issue: live transactions
/// with their messages, decided ones remembered without them (so a repeated decision is
/// answered alike after a restart).
fn live_events(state: &State) -> Vec<Event> {
    let mut events = vec![Event::Issued {
        txn: state.next_id.saturating_sub(1),
    }];
    for (id, txn) in &state.txns {
        let Ok(options) = rmp_serde::to_vec_named(&txn.began) else {
            continue;
        };
        events.push(Event::Begin { txn: *id, options });
        for (mq, records, _) in &txn.halves {
            events.push(Event::Half {
                txn: *id,
                mq: mq.clone(),
                records: records.to_vec(),
            });
        }
        match txn.state {
            TxState::Pending => {}
            TxState::Committed => events.push(Event::Commit { txn: *id }),
            TxState::RolledBack => events.push(Event::Rollback { txn: *id }),
        }
        if !txn.live() && txn.state == TxState::Committed {
            events.push(Event::Applied { txn: *id });
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::core::Core;
    use crate::queue::testutil::{produce, Commit};
    use crate::store::OsFs;

    /// The log a broker killed between a commit's decision and its appends leaves.
    fn decided_not_applied(store: &std::path::Path, id: u64) {
        let (mut log, _) = TxnLog::open(&OsFs::shared(), store, true).unwrap();
        let began = Began {
            options: TxOptions::default(),
            began_ms: now_ms(),
        };
        let (records, _) = produce(&["debit", "credit"]);
        log.rewrite(&[
            Event::Begin {
                txn: id,
                options: rmp_serde::to_vec_named(&began).unwrap(),
            },
            Event::Half {
                txn: id,
                mq: "orders".into(),
                records: records.to_vec(),
            },
            Event::Commit { txn: id },
        ])
        .unwrap();
    }

    #[tokio::test]
    async fn a_commit_cut_by_a_crash_is_applied_once_at_recovery_however_often_it_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let depth = |core: &Core| core.registry().get("orders").unwrap().info().depth();
        {
            let commit = Commit::start();
            let core =
                Core::open(Config::with_store(dir.path()), commit.committer.clone()).unwrap();
            core.create("orders", Default::default()).await.unwrap();
            drop(core);
            commit.stop().await;
        }
        decided_not_applied(dir.path(), 7);
        for round in 0..2 {
            let commit = Commit::start();
            let core =
                Core::open(Config::with_store(dir.path()), commit.committer.clone()).unwrap();
            assert_eq!(core.txns().get(7).unwrap().state, TxState::Committed);
            core.txns().recover(core.registry(), core.committer()).await;
            assert_eq!(depth(&core), 2, "round {round}: applied once");
            assert!(core.txns().list().is_empty());
            drop(core);
            commit.stop().await;
            // A second crash after the appends, before `Applied` reached the log: the
            // appends are found again by their dedupe ids.
            decided_not_applied(dir.path(), 7);
        }
        // And ids go on above it.
        let commit = Commit::start();
        let core = Core::open(Config::with_store(dir.path()), commit.committer.clone()).unwrap();
        assert!(core.txns().begin(TxOptions::default()).await.unwrap() > 7);
        drop(core);
        commit.stop().await;
    }

    #[tokio::test]
    async fn a_connection_answers_for_a_bounded_number_of_groups_until_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        let commit = Commit::start();
        let core = Core::open(Config::with_store(dir.path()), commit.committer.clone()).unwrap();
        let txns = core.txns();
        let (out, _frames) = tokio::sync::mpsc::channel(4);
        let out = FrameSender::from_channel(out);
        for g in 0..MAX_CHECKER_GROUPS {
            txns.checker_ready(&format!("g{g}"), 1, out.clone())
                .unwrap();
        }
        // Again for a group it has: harmless; one more group: refused.
        txns.checker_ready("g0", 1, out.clone()).unwrap();
        let refused = txns.checker_ready("one-too-many", 1, out.clone());
        assert!(
            matches!(refused, Err(BrokerError::BadRequest(_))),
            "{refused:?}"
        );
        // Another connection is not limited by the first one's groups.
        txns.checker_ready("one-too-many", 2, out.clone()).unwrap();
        txns.checker_gone(1);
        assert_eq!(
            lock(&txns.checkers).len(),
            1,
            "only connection 2's group is left"
        );
        txns.checker_ready("g0", 1, out).unwrap();
        drop(core);
        commit.stop().await;
    }
}
