//! A consumer over an HA handle: one fetch loop per broker holding the MQ, all feeding the
//! consumer's one stream. A supervisor follows the topology, starting a loop for a broker
//! that joins and stopping the loop of a broker that leaves. Each broker keeps its group's
//! place, so a broker that leaves and comes back is read on from where the group was. The
//! loop itself is the caller's (`start`), so this knows brokers, not deliveries.
//!
//! For an MQ with replicas, a leader missing from the topology is stood in for by a
//! follower's copy of its log (`Topology::stand_ins`): a loop reads `MQ@LEADER` from that
//! follower until the leader holds the MQ again.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Ha;
use crate::connection::Connection;

/// Starts the supervisor, which calls `start` with a connection to each holder of `mq` (or
/// of a stand-in copy), the name to read there (`mq`, or the copy's `MQ@LEADER`), a clone
/// of `tx` and the token that stops that loop; it ends when `tx`'s receiver is dropped.
pub(crate) fn follow_holders<T, F>(ha: &Ha, mq: &str, tx: mpsc::Sender<T>, start: F)
where
    T: Send + 'static,
    F: Fn(Connection, String, mpsc::Sender<T>, CancellationToken) + Send + 'static,
{
    // The task holds a handle so the topology keeps following while the consumer lives,
    // even when the application dropped its `Broker`.
    let ha = ha.clone();
    let mq = mq.to_owned();
    let mut watch = ha.watch();
    tokio::spawn(async move {
        let shared = &ha.shared;
        // (broker address, name read there) to the token stopping its loop.
        let mut running: HashMap<(Arc<str>, String), CancellationToken> = HashMap::new();
        loop {
            let topology = watch.borrow_and_update().clone();
            let sources: Vec<(Arc<str>, String)> = topology
                .holders(&mq)
                .iter()
                .map(|c| (c.addr.clone(), mq.clone()))
                .chain(
                    topology
                        .stand_ins(&mq)
                        .into_iter()
                        .map(|s| (s.addr, s.copy)),
                )
                .collect();
            running.retain(|source, stop| {
                let stays = sources.contains(source);
                if !stays {
                    let (addr, name) = source;
                    tracing::info!(mq = %name, broker = %addr, "broker left; no longer consuming from it");
                    stop.cancel();
                }
                stays
            });
            for source in sources {
                if running.contains_key(&source) {
                    continue;
                }
                let (addr, name) = &source;
                tracing::debug!(mq = %name, broker = %addr, "consuming from broker");
                let stop = CancellationToken::new();
                let node = shared.pool.node(addr);
                start(node.conn.clone(), name.clone(), tx.clone(), stop.clone());
                running.insert(source, stop);
            }
            tokio::select! {
                changed = watch.changed() => if changed.is_err() { break },
                _ = tx.closed() => break,
            }
        }
        for stop in running.values() {
            stop.cancel();
        }
    });
}
