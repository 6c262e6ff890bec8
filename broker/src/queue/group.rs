//! The live consumer group: its ledger behind a lock, its cursor file, and the wake-up of
//! fetches waiting on it. What the rules are is in [`GroupLedger`]; this is where they meet
//! the commit thread and waiting consumers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

use super::group_commit::SharedCursor;
use super::group_ledger::GroupLedger;
use crate::store::{AttemptsFile, CursorFile, ReadPos};

/// Where a group created by a fetch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Oldest retained record.
    Earliest,
    /// The end: only records produced from now on.
    Latest,
    /// A given offset (clamped to what is retained).
    Offset(u64),
}

/// A consumer group with its persistence and wake-ups.
pub struct Group {
    state: Mutex<GroupLedger>,
    /// The cursor file; none for a memory MQ's group, which lives only in memory.
    pub(super) cursor: Option<SharedCursor>,
    /// Delivery counts of redelivered records, kept across restarts (none in memory).
    pub(super) attempts: Option<Arc<Mutex<AttemptsFile>>>,
    /// Highest committed offset handed to the commit thread.
    pub(super) persisted: Arc<AtomicU64>,
    /// Serialises reads of new records so two consumers never get the same batch; holds
    /// the file position of `next` so sequential reads skip the index.
    pub(super) read_pos: tokio::sync::Mutex<Option<ReadPos>>,
    /// Signalled when deliveries are released, and when they are acknowledged while a
    /// fetch waits for room or the group orders by key (see [`Group::ack_wakes`]).
    pub(super) changed: Notify,
    /// Fetches waiting with no room left (their connection holds its most deliveries):
    /// counted under the state's lock, which an ack takes too, so none misses its wake.
    room_waiters: AtomicUsize,
}

impl Group {
    /// A group whose every offset below `committed` is acknowledged; `counts` are the
    /// delivery counts `attempts` held for records above it.
    pub(super) fn new(
        name: &str,
        committed: u64,
        cursor: CursorFile,
        (attempts, counts): (AttemptsFile, BTreeMap<u64, u32>),
    ) -> Arc<Group> {
        let mut ledger = GroupLedger::new(name, committed);
        ledger.restore_counts(counts);
        Group::with_files(
            ledger,
            committed,
            Some(Arc::new(Mutex::new(cursor))),
            Some(Arc::new(Mutex::new(attempts))),
        )
    }

    /// A memory MQ's group: no files, its cursor and counts die with the process.
    pub(super) fn in_memory(name: &str, committed: u64) -> Arc<Group> {
        Group::with_files(GroupLedger::new(name, committed), committed, None, None)
    }

    fn with_files(
        ledger: GroupLedger,
        committed: u64,
        cursor: Option<SharedCursor>,
        attempts: Option<Arc<Mutex<AttemptsFile>>>,
    ) -> Arc<Group> {
        Arc::new(Group {
            state: Mutex::new(ledger),
            cursor,
            attempts,
            persisted: Arc::new(AtomicU64::new(committed)),
            read_pos: tokio::sync::Mutex::new(None),
            changed: Notify::new(),
            room_waiters: AtomicUsize::new(0),
        })
    }

    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, GroupLedger> {
        self.state.lock().expect("group state poisoned")
    }

    /// Whether acknowledging deliveries (with `state` locked) must wake the waiting
    /// fetches: only those without room, or records parked behind their key, can go on
    /// because of it. Others wait for new records or redeliveries, which wake them
    /// themselves: an MQ-RPC responder's fetch, say, woke once per burst of replies for
    /// nothing.
    pub(super) fn ack_wakes(&self, state: &mut GroupLedger) -> bool {
        state.key_order().is_some() || self.room_waiters.load(Ordering::Acquire) > 0
    }
}

/// A fetch waiting for room: acks wake the group's fetches while one is (see
/// [`Group::ack_wakes`]). Start it with the group's state locked.
pub(super) struct WaitingForRoom<'a> {
    group: &'a Group,
}

impl<'a> WaitingForRoom<'a> {
    pub(super) fn start(group: &'a Group, _locked: &GroupLedger) -> WaitingForRoom<'a> {
        group.room_waiters.fetch_add(1, Ordering::AcqRel);
        WaitingForRoom { group }
    }
}

impl Drop for WaitingForRoom<'_> {
    fn drop(&mut self) {
        self.group.room_waiters.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A fetch under way: its connection counts as a consumer of the group until it ends,
/// however it ends.
pub(super) struct Fetching<'a> {
    group: &'a Group,
    conn: u64,
}

impl<'a> Fetching<'a> {
    pub(super) fn start(group: &'a Group, conn: u64) -> Fetching<'a> {
        group.state().join(conn);
        Fetching { group, conn }
    }
}

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        self.group.state().fetch_ended(self.conn, Instant::now());
    }
}
