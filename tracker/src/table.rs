//! The tracker's live table: every node that reported, on which connection, and until when
//! its lease runs; every change numbered and broadcast to subscribers.
//!
//! Pure bookkeeping with the clock passed in, so every rule is unit-tested below:
//! - a report with an older version than the one held is ignored (a late report of a
//!   replaced process cannot bring it back);
//! - a node is dropped when the connection it reported on closes, or when its lease
//!   (`lease_reports` times its own report interval) runs out;
//! - until the tracker is ready (after its warm-up), every update says `ready: false`;
//!   becoming ready is announced with a full snapshot.
//!
//! Each node also keeps the time of its last report, so the monitor can show how fresh
//! every entry is ([`Table::status`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use qbus_wire::topology::{NodeState, TopologyUpdate};
use tokio::sync::broadcast;

use crate::metrics::Metrics;

/// Changes kept for subscribers that fall behind; one further behind gets a snapshot.
const BACKLOG: usize = 1024;
/// Report interval assumed when a node does not say.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);

/// An update as broadcast: encoded once for every subscriber.
#[derive(Debug)]
pub struct Published {
    /// Its sequence number.
    pub seq: u64,
    /// The MessagePack [`TopologyUpdate`].
    pub body: Bytes,
}

/// Why a report was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReportError {
    /// `id` or `addr` is empty.
    #[error("a report needs a non-empty {0}")]
    Missing(&'static str),
    /// Another identity registered a node with this id or address.
    #[error(
        "node {id:?} at {addr:?} is refused: {held} is registered by another identity \
         ({owner:?}); it may report again once that node is gone"
    )]
    Claimed {
        /// The node id reported.
        id: String,
        /// Its address.
        addr: String,
        /// What is held: "this id" or "this address".
        held: &'static str,
        /// Who holds it.
        owner: String,
    },
}

struct Entry {
    state: NodeState,
    conn: u64,
    /// The identity that registered it: only that one may report it, or its address.
    owner: Arc<str>,
    /// When its last accepted report arrived (a repeat of the held version counts: it
    /// proves the node alive).
    reported: Instant,
    expires: Instant,
}

/// One node as the monitor shows it.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    /// What it last reported.
    pub state: NodeState,
    /// Time since that report.
    pub report_age: Duration,
    /// Time left before it is dropped unless it reports again.
    pub lease_left: Duration,
}

/// The table as the monitor shows it, taken under one lock.
#[derive(Debug, Clone)]
pub struct Status {
    /// The change counter: changes published since the start.
    pub seq: u64,
    /// False during the warm-up.
    pub ready: bool,
    /// Reports a node may miss before it is dropped.
    pub lease_reports: u32,
    /// Connections subscribed to changes now.
    pub subscribers: usize,
    /// Every node, sorted by id.
    pub nodes: Vec<NodeStatus>,
}

struct Inner {
    seq: u64,
    ready: bool,
    nodes: HashMap<String, Entry>,
}

/// The live topology of one tracker.
pub struct Table {
    inner: Mutex<Inner>,
    updates: broadcast::Sender<Arc<Published>>,
    lease_reports: u32,
    metrics: Metrics,
}

impl Table {
    /// An empty table; `ready` when there is no warm-up.
    pub fn new(lease_reports: u32, ready: bool) -> Table {
        Table {
            inner: Mutex::new(Inner {
                seq: 0,
                ready,
                nodes: HashMap::new(),
            }),
            updates: broadcast::channel(BACKLOG).0,
            lease_reports: lease_reports.max(1),
            metrics: Metrics::new(),
        }
    }

    /// The tracker's counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("tracker table poisoned")
    }

    /// Records a report received on connection `conn` from identity `owner`. A node whose
    /// id, or address, another identity holds is refused.
    pub fn report(
        &self,
        conn: u64,
        state: NodeState,
        now: Instant,
        owner: &str,
    ) -> Result<(), ReportError> {
        if state.id.is_empty() {
            return Err(ReportError::Missing("id"));
        }
        if state.addr.is_empty() {
            return Err(ReportError::Missing("addr"));
        }
        let interval = match state.report_interval_ms {
            0 => DEFAULT_INTERVAL,
            ms => Duration::from_millis(ms)
                .clamp(Duration::from_millis(10), Duration::from_secs(3600)),
        };
        let expires = now + interval * self.lease_reports;
        let mut inner = self.lock();
        let claimed = |held, owner: &str| ReportError::Claimed {
            id: state.id.clone(),
            addr: state.addr.clone(),
            held,
            owner: owner.to_owned(),
        };
        if let Some(entry) = inner.nodes.get(&state.id) {
            if &*entry.owner != owner {
                return Err(claimed("this id", &entry.owner));
            }
        }
        let same_addr = inner
            .nodes
            .values()
            .find(|e| e.state.addr == state.addr && e.state.id != state.id && &*e.owner != owner);
        if let Some(entry) = same_addr {
            return Err(claimed("this address", &entry.owner));
        }
        let changed = match inner.nodes.get_mut(&state.id) {
            Some(entry) if entry.state.version() > state.version() => {
                tracing::debug!(node = %state.id, "ignoring a report older than the one held");
                return Ok(());
            }
            Some(entry) if entry.state.version() == state.version() => {
                entry.conn = conn;
                entry.reported = now;
                entry.expires = expires;
                false
            }
            _ => true,
        };
        if changed {
            if !inner.nodes.contains_key(&state.id) {
                tracing::info!(node = %state.id, addr = %state.addr, "node joined");
            }
            let update = TopologyUpdate {
                brokers: vec![state.clone()],
                ..TopologyUpdate::default()
            };
            inner.nodes.insert(
                state.id.clone(),
                Entry {
                    state,
                    conn,
                    owner: owner.into(),
                    reported: now,
                    expires,
                },
            );
            self.publish(&mut inner, update);
        }
        Ok(())
    }

    /// Drops the nodes that reported on connection `conn`, which closed.
    pub fn disconnect(&self, conn: u64) {
        let mut inner = self.lock();
        let gone: Vec<String> = inner
            .nodes
            .iter()
            .filter(|(_, e)| e.conn == conn)
            .map(|(id, _)| id.clone())
            .collect();
        self.remove(&mut inner, gone, "connection closed");
    }

    /// Drops the nodes whose lease ran out by `now`.
    pub fn expire(&self, now: Instant) {
        let mut inner = self.lock();
        let gone: Vec<String> = inner
            .nodes
            .iter()
            .filter(|(_, e)| e.expires <= now)
            .map(|(id, _)| id.clone())
            .collect();
        self.remove(&mut inner, gone, "missed its reports");
    }

    fn remove(&self, inner: &mut Inner, gone: Vec<String>, why: &str) {
        if gone.is_empty() {
            return;
        }
        for id in &gone {
            inner.nodes.remove(id);
            tracing::info!(node = %id, reason = why, "node dropped");
        }
        let update = TopologyUpdate {
            removed: gone,
            ..TopologyUpdate::default()
        };
        self.publish(inner, update);
    }

    /// Ends the warm-up: from now on the view counts as complete.
    pub fn set_ready(&self) {
        let mut inner = self.lock();
        if inner.ready {
            return;
        }
        inner.ready = true;
        tracing::info!(
            nodes = inner.nodes.len(),
            "warm-up over; the topology is complete"
        );
        let update = snapshot_of(&inner);
        self.publish(&mut inner, update);
    }

    /// A full snapshot now.
    pub fn snapshot(&self) -> TopologyUpdate {
        snapshot_of(&self.lock())
    }

    /// Every node with the age of its last report and what is left of its lease at `now`.
    pub fn status(&self, now: Instant) -> Status {
        let inner = self.lock();
        Status {
            seq: inner.seq,
            ready: inner.ready,
            lease_reports: self.lease_reports,
            // Each subscribed connection's forwarder holds exactly one receiver.
            subscribers: self.updates.receiver_count(),
            nodes: by_id(&inner)
                .into_iter()
                .map(|e| NodeStatus {
                    state: e.state.clone(),
                    report_age: now.saturating_duration_since(e.reported),
                    lease_left: e.expires.saturating_duration_since(now),
                })
                .collect(),
        }
    }

    /// A full snapshot and a receiver of every later update, taken together so nothing
    /// falls between them.
    pub fn subscribe(&self) -> (TopologyUpdate, broadcast::Receiver<Arc<Published>>) {
        let inner = self.lock();
        (snapshot_of(&inner), self.updates.subscribe())
    }

    /// Numbers and broadcasts an update (a full one when `update.full`).
    fn publish(&self, inner: &mut Inner, mut update: TopologyUpdate) {
        inner.seq += 1;
        update.seq = inner.seq;
        update.ready = inner.ready;
        if update.full {
            update.brokers = sorted(inner);
        }
        match rmp_serde::to_vec_named(&update) {
            Ok(body) => {
                // No subscriber is not an error.
                let _ = self.updates.send(Arc::new(Published {
                    seq: update.seq,
                    body: body.into(),
                }));
            }
            Err(e) => tracing::error!(error = %e, "cannot encode a topology update"),
        }
    }
}

/// Every entry, sorted by node id.
fn by_id(inner: &Inner) -> Vec<&Entry> {
    let mut entries: Vec<&Entry> = inner.nodes.values().collect();
    entries.sort_by(|a, b| a.state.id.cmp(&b.state.id));
    entries
}

fn sorted(inner: &Inner) -> Vec<NodeState> {
    by_id(inner).into_iter().map(|e| e.state.clone()).collect()
}

fn snapshot_of(inner: &Inner) -> TopologyUpdate {
    TopologyUpdate {
        seq: inner.seq,
        ready: inner.ready,
        full: true,
        brokers: sorted(inner),
        removed: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(id: &str, epoch: u64, seq: u64) -> NodeState {
        NodeState {
            id: id.into(),
            addr: id.into(),
            epoch,
            seq,
            report_interval_ms: 100,
            ..NodeState::default()
        }
    }

    fn ids(table: &Table) -> Vec<String> {
        table.snapshot().brokers.into_iter().map(|b| b.id).collect()
    }

    fn update(published: &Published) -> TopologyUpdate {
        rmp_serde::from_slice(&published.body).unwrap()
    }

    #[test]
    fn changes_are_numbered_and_repeats_are_silent() {
        let table = Table::new(3, true);
        let (snapshot, mut rx) = table.subscribe();
        assert_eq!((snapshot.seq, snapshot.brokers.len()), (0, 0));
        let now = Instant::now();
        table.report(1, state("a", 1, 1), now, "node").unwrap();
        table.report(1, state("a", 1, 1), now, "node").unwrap(); // same version: lease only
        table.report(1, state("a", 1, 2), now, "node").unwrap();
        let first = update(&rx.try_recv().unwrap());
        let second = update(&rx.try_recv().unwrap());
        assert_eq!((first.seq, second.seq), (1, 2));
        assert_eq!(second.brokers[0].seq, 2);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn older_reports_do_not_win() {
        let table = Table::new(3, true);
        let now = Instant::now();
        table.report(1, state("a", 2, 1), now, "node").unwrap();
        table.report(2, state("a", 1, 99), now, "node").unwrap(); // the previous process, late
        assert_eq!(table.snapshot().brokers[0].epoch, 2);
        // ... and its connection closing does not drop the new process.
        table.disconnect(2);
        assert_eq!(ids(&table), ["a"]);
        table.disconnect(1);
        assert!(ids(&table).is_empty());
    }

    #[test]
    fn leases_run_out_after_the_missed_reports() {
        let table = Table::new(3, true);
        let (_, mut rx) = table.subscribe();
        let start = Instant::now();
        table.report(1, state("a", 1, 1), start, "node").unwrap();
        table
            .report(
                1,
                state("b", 1, 1),
                start + Duration::from_millis(200),
                "node",
            )
            .unwrap();
        table.expire(start + Duration::from_millis(299));
        assert_eq!(ids(&table), ["a", "b"]);
        table.expire(start + Duration::from_millis(300)); // 3 x 100 ms
        assert_eq!(ids(&table), ["b"]);
        let last = std::iter::from_fn(|| rx.try_recv().ok()).last().unwrap();
        assert_eq!(update(&last).removed, ["a"]);
    }

    #[test]
    fn warm_up_is_announced_with_a_snapshot() {
        let table = Table::new(3, false);
        let (_, mut rx) = table.subscribe();
        table
            .report(1, state("a", 1, 1), Instant::now(), "node")
            .unwrap();
        assert!(!update(&rx.try_recv().unwrap()).ready);
        table.set_ready();
        let ready = update(&rx.try_recv().unwrap());
        assert!(ready.ready && ready.full);
        assert_eq!(ready.brokers.len(), 1);
        assert!(table.snapshot().ready);
    }

    #[test]
    fn status_tells_report_age_and_lease_left() {
        let table = Table::new(3, true);
        let start = Instant::now();
        table.report(1, state("b", 1, 1), start, "node").unwrap();
        table.report(1, state("a", 1, 1), start, "node").unwrap();
        let later = start + Duration::from_millis(150);
        // A repeat of the held version renews the report time; an older one does not.
        table.report(1, state("a", 1, 1), later, "node").unwrap();
        table.report(2, state("b", 0, 9), later, "node").unwrap();
        let status = table.status(start + Duration::from_millis(200));
        let ages: Vec<(&str, Duration, Duration)> = status
            .nodes
            .iter()
            .map(|n| (n.state.id.as_str(), n.report_age, n.lease_left))
            .collect();
        let ms = Duration::from_millis;
        assert_eq!(
            ages,
            [("a", ms(50), ms(250)), ("b", ms(200), ms(100))],
            "sorted by id, lease 3 x 100 ms"
        );
        assert_eq!((status.seq, status.ready, status.subscribers), (2, true, 0));
        let (_, _rx) = table.subscribe();
        assert_eq!(table.status(start).subscribers, 1);
    }

    #[test]
    fn reports_without_identity_are_refused() {
        let table = Table::new(3, true);
        let mut nameless = state("a", 1, 1);
        nameless.id.clear();
        assert_eq!(
            table.report(1, nameless, Instant::now(), "node"),
            Err(ReportError::Missing("id"))
        );
    }

    #[test]
    fn another_identity_cannot_take_a_node_id_or_address() {
        let table = Table::new(3, true);
        let now = Instant::now();
        table.report(1, state("a", 1, 1), now, "broker-a").unwrap();
        // A newer epoch does not help a stranger take the id.
        let taken = table.report(2, state("a", 9, 1), now, "mallory");
        assert!(
            matches!(
                taken,
                Err(ReportError::Claimed {
                    held: "this id",
                    ..
                })
            ),
            "{taken:?}"
        );
        // Nor another id at the same address.
        let mut fake = state("fake", 1, 1);
        fake.addr = "a".into();
        let taken = table.report(2, fake, now, "mallory");
        assert!(
            matches!(
                taken,
                Err(ReportError::Claimed {
                    held: "this address",
                    ..
                })
            ),
            "{taken:?}"
        );
        assert_eq!(ids(&table), ["a"]);
        // The owner itself may restart it with a newer epoch.
        table.report(3, state("a", 2, 1), now, "broker-a").unwrap();
        assert_eq!(table.snapshot().brokers[0].epoch, 2);
    }
}
