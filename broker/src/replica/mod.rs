//! Replicas (`docs/replication.md`): every broker is the only writer of its own copy of an
//! MQ; with the MQ's `replicas` option above 1, `replicas - 1` other brokers follow that
//! copy by pulling it. Nothing is elected: a copy's leader is the broker that writes it,
//! always.
//!
//! - [`placement`]: which brokers follow which copy (rendezvous hashing over the live
//!   brokers of the trackers' topology).
//! - [`leader`]: the leader's record of its followers' progress, behind `replicated`
//!   receipts.
//! - [`serve`]: `ReplicaRead`, the leader answering a follower's pull.
//! - [`follower`]: one follower pulling one copy.
//! - [`copies`]: the follower copies in the store directory.
//! - [`cleanup`]: removing copies nobody needs any more.
//! - [`restore`]: a broker that starts on an empty store taking its MQs back from the
//!   copies its followers hold.
//! - [`run`] (here): follows the topology, starts and stops the followers it calls for, and
//!   sweeps stale copies.

pub mod cleanup;
pub mod copies;
pub mod follower;
pub mod leader;
pub mod placement;
pub mod restore;
pub mod serve;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use qbus_client::ha::{HaOptions, TRACKER_SCHEME};
use qbus_client::topology::Topology;
use qbus_client::{Broker, Connection, ConnectionOptions};
use qbus_wire::link::TcpConnector;
use qbus_wire::topology::NodeKind;
use tokio_util::sync::CancellationToken;

use crate::config::Reporting;
use crate::core::Core;
use cleanup::Cleanup;
use follower::Assignment;

/// A connection to the broker at `addr` as this broker's followers and restores speak to
/// it: over the cluster's TLS (as towards the trackers; a cluster is all TLS or all plain)
/// with the node credential, which the other broker's users must allow `register` on the
/// MQs it copies.
fn peer_connection(core: &Core, addr: &str) -> Connection {
    let credentials = core
        .config()
        .reporting
        .as_ref()
        .and_then(|r| r.credentials.clone());
    Connection::new(
        TcpConnector::new(addr.to_owned(), core.config().max_frame)
            .with_tls(core.config().tracker_tls.clone()),
        ConnectionOptions {
            credentials,
            ..ConnectionOptions::default()
        },
    )
}

/// Follows the trackers of `reporting` as broker `me`, and runs a follower for every copy
/// placement gives this broker, until `stop` fires.
pub async fn run(reporting: Reporting, core: Arc<Core>, me: String, stop: CancellationToken) {
    let mut cleanup = Cleanup::new(reporting.interval * cleanup::AFTER_REPORTS);
    // Copies turn stale without the topology changing (time passes): look again this often.
    let mut sweep = tokio::time::interval((cleanup.after() / 10).max(Duration::from_millis(100)));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let trackers = format!("{TRACKER_SCHEME}{}", reporting.trackers.join(","));
    let broker = loop {
        let defaults = HaOptions::default();
        // The trackers as the reporter reaches them: same TLS, same node credential.
        let options = HaOptions {
            tls: core.config().tracker_tls.clone(),
            connection: ConnectionOptions {
                credentials: reporting.credentials.clone(),
                ..defaults.connection.clone()
            },
            ..defaults
        };
        let connecting = Broker::connect_ha(&trackers, options);
        let attempt = tokio::select! {
            attempt = connecting => attempt,
            _ = stop.cancelled() => return,
        };
        match attempt {
            Ok(broker) => break broker,
            Err(e) => tracing::warn!(error = %e, "replicas: no topology yet; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.cancelled() => return,
        }
    };
    let Some(mut topology) = broker.watch_topology() else {
        return;
    };
    tokio::spawn(restore::run(
        core.clone(),
        me.clone(),
        topology.clone(),
        stop.child_token(),
    ));
    let mut running: HashMap<Assignment, CancellationToken> = HashMap::new();
    loop {
        let wanted = assignments(&topology.borrow_and_update(), &me);
        running.retain(|assignment, token| {
            let keep = wanted.contains(assignment) && !token.is_cancelled();
            if !keep {
                token.cancel();
            }
            keep
        });
        for assignment in wanted {
            if running.contains_key(&assignment) {
                continue;
            }
            let token = stop.child_token();
            running.insert(assignment.clone(), token.clone());
            tokio::spawn(follower::follow(
                core.clone(),
                me.clone(),
                assignment,
                token,
            ));
        }
        tokio::select! {
            changed = topology.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = sweep.tick() => {
                let now = topology.borrow().clone();
                cleanup.sweep(&core, &now, &me).await;
            }
            _ = stop.cancelled() => return,
        }
    }
}

/// The copies `me` follows in `topology`: those of live brokers whose placement names it.
/// A leader the trackers dropped is followed again when it returns.
fn assignments(topology: &Topology, me: &str) -> Vec<Assignment> {
    let brokers: Vec<_> = topology
        .brokers()
        .filter(|node| node.kind == NodeKind::Broker)
        .collect();
    let live: Vec<&str> = brokers.iter().map(|node| node.id.as_str()).collect();
    let mut wanted = Vec::new();
    for node in brokers.iter().filter(|node| node.id != me) {
        for mq in node.mqs.iter().filter(|mq| mq.replicas > 1) {
            if placement::followers(&node.id, &mq.name, mq.replicas, &live).contains(&me) {
                wanted.push(Assignment {
                    leader: node.id.clone(),
                    addr: node.addr.clone(),
                    mq: mq.name.clone(),
                });
            }
        }
    }
    wanted
}
