//! A consumer over an HA handle: one fetch loop per broker holding the MQ, all feeding the
//! consumer's one stream. A supervisor follows the topology, starting a loop for a broker
//! that joins and stopping the loop of a broker that leaves. Each broker keeps its group's
//! place, so a broker that leaves and comes back is read on from where the group was. The
//! loop itself is the caller's (`start`), so this knows brokers, not deliveries.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Ha;
use crate::connection::Connection;

/// Starts the supervisor, which calls `start` with a connection to each holder of `mq`, a
/// clone of `tx` and the token that stops that loop; it ends when `tx`'s receiver is dropped.
pub(crate) fn follow_holders<T, F>(ha: &Ha, mq: &str, tx: mpsc::Sender<T>, start: F)
where
    T: Send + 'static,
    F: Fn(Connection, mpsc::Sender<T>, CancellationToken) + Send + 'static,
{
    // The task holds a handle so the topology keeps following while the consumer lives,
    // even when the application dropped its `Broker`.
    let ha = ha.clone();
    let mq = mq.to_owned();
    let mut watch = ha.watch();
    tokio::spawn(async move {
        let shared = &ha.shared;
        let mut running: HashMap<Arc<str>, CancellationToken> = HashMap::new();
        loop {
            let topology = watch.borrow_and_update().clone();
            let holders = topology.holders(&mq);
            running.retain(|addr, stop| {
                let stays = holders.iter().any(|c| c.addr == *addr);
                if !stays {
                    tracing::info!(%mq, broker = %addr, "broker left; no longer consuming from it");
                    stop.cancel();
                }
                stays
            });
            for candidate in holders {
                if running.contains_key(&candidate.addr) {
                    continue;
                }
                tracing::debug!(%mq, broker = %candidate.addr, "consuming from broker");
                let stop = CancellationToken::new();
                let node = shared.pool.node(&candidate.addr);
                start(node.conn.clone(), tx.clone(), stop.clone());
                running.insert(candidate.addr.clone(), stop);
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
