//! Transaction checkers over `tracker://`: a producer group's checker answers the checks of
//! every broker of the topology.
//!
//! Which broker a transaction lives on depends on the topology at its `begin`, and on the
//! producer that began it (one connected to a broker directly, one before the topology
//! changed), so the checker must be where any of them may be. A checker registered over
//! `tracker://` registers on the connection of every broker the topology lists, and a
//! supervisor follows the topology: a broker that joins, or comes back after it left (a
//! new connection), is registered on at once; a broker that leaves is let go of. A broker
//! that restarts within the topology is registered on again by its connection, which
//! repeats the registration on each new link (and is kept up by the checker).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::{Ha, Shared};
use crate::check_back::{self, TransactionChecker};
use crate::connection::{Connection, WeakConnection};
use crate::error::Result;
use crate::protocol::{Frame, Header};
use crate::topology::Topology;

/// Registers `checker` for producer group `group` on every broker of `ha`'s topology, now
/// and as brokers join, until the handle's last clone is dropped. Fails, registering
/// nothing, when a broker refuses (one older than protocol 4, or one that denies this
/// user); a broker that cannot be reached now is registered on once it can. A broker that
/// refuses later (one that joins, or is met only then) is noted on the returned status.
pub(crate) async fn register<C: TransactionChecker>(
    ha: &Ha,
    group: &str,
    checker: C,
) -> Result<CheckerStatus> {
    let status = CheckerStatus::default();
    let shared = ha.shared.clone();
    let checker = Arc::new(checker);
    let mut watch = ha.watch();
    let mut brokers = Brokers::default();
    let now = watch.borrow_and_update().clone();
    // Those there now answer (or are found unreachable) before this returns, so a check
    // due at once finds the checker, and a refusal reaches the caller.
    for (addr, connection, ready) in brokers.follow(&shared, &now, group, &checker) {
        match connection.request(Frame::new(ready)).await {
            Ok(_) => {}
            Err(e) if e.is_transport() => {
                tracing::debug!(broker = %addr, error = %e, "the checker registers there once it is reachable");
            }
            Err(e) => {
                brokers.stop_all();
                return Err(e);
            }
        }
    }
    let group = group.to_owned();
    let noted = status.clone();
    // The task holds the shared state, not a handle, so it ends with the handle's last clone.
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = watch.changed() => if changed.is_err() { break },
                _ = shared.stop.cancelled() => break,
            }
            let topology = watch.borrow_and_update().clone();
            for (addr, connection, ready) in brokers.follow(&shared, &topology, &group, &checker) {
                // Not awaited here, so one slow broker holds up no other's registration. A
                // link that is down sends it again when it opens.
                let noted = noted.clone();
                tokio::spawn(async move {
                    match connection.request(Frame::new(ready)).await {
                        Ok(_) => noted.accepted(&addr),
                        Err(e) if e.is_transport() => {
                            tracing::debug!(broker = %addr, error = %e, "the checker registers there once it is reachable");
                        }
                        Err(e) => {
                            tracing::warn!(broker = %addr, error = %e, "a broker refused the transaction checker");
                            noted.refused(&addr, &e);
                        }
                    }
                });
            }
        }
        brokers.stop_all();
    });
    Ok(status)
}

/// Where a registered checker stands: the brokers that refused it after
/// [`Broker::register_checker`](crate::Broker::register_checker) returned (one that joined
/// the topology later and is older than protocol 4, or denies this user). Their checks go
/// unanswered, so their transactions of the group fall to their policy. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct CheckerStatus {
    /// Per broker address, why it refused (at most one per broker of the topology).
    refusals: Arc<Mutex<HashMap<String, String>>>,
}

impl CheckerStatus {
    /// The brokers that refused the checker and why, by address.
    pub fn refusals(&self) -> Vec<(String, String)> {
        let refusals = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<_> = refusals
            .iter()
            .map(|(a, e)| (a.clone(), e.clone()))
            .collect();
        list.sort();
        list
    }

    fn refused(&self, broker: &str, error: &crate::ClientError) {
        let mut refusals = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        refusals.insert(broker.to_owned(), error.to_string());
    }

    fn accepted(&self, broker: &str) {
        let mut refusals = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        refusals.remove(broker);
    }
}

/// The broker connections a checker is attached to, by broker address.
#[derive(Default)]
struct Brokers {
    attached: HashMap<Arc<str>, (WeakConnection, CancellationToken)>,
}

impl Brokers {
    /// Attaches the checker to the connection of each broker of `topology` it is not
    /// attached to yet, and detaches it from brokers that left; returns the new ones with
    /// the request that registers it there.
    fn follow<C: TransactionChecker>(
        &mut self,
        shared: &Arc<Shared>,
        topology: &Topology,
        group: &str,
        checker: &Arc<C>,
    ) -> Vec<(Arc<str>, Connection, Header)> {
        let wanted: Vec<Arc<str>> = topology
            .brokers()
            .filter(|b| b.is_broker())
            .map(|b| Arc::from(b.addr.as_str()))
            .collect();
        self.attached.retain(|addr, (_, stop)| {
            let stays = wanted.contains(addr);
            if !stays {
                tracing::debug!(broker = %addr, group, "broker left; its checks are no longer answered");
                stop.cancel();
            }
            stays
        });
        let mut new = Vec::new();
        for addr in wanted {
            // A broker that left and came back between two looks has a new connection.
            let connection = shared.pool.node(&addr).conn.clone();
            if let Some((attached, stop)) = self.attached.get(&addr) {
                if attached.is(&connection) {
                    continue;
                }
                stop.cancel();
            }
            let stop = CancellationToken::new();
            let ready = check_back::attach(&connection, group, checker.clone(), stop.clone());
            self.attached
                .insert(addr.clone(), (connection.downgrade(), stop));
            new.push((addr, connection, ready));
        }
        new
    }

    fn stop_all(&mut self) {
        for (_, stop) in self.attached.drain().map(|(_, a)| a) {
            stop.cancel();
        }
    }
}
