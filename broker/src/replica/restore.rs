//! A broker that starts on an empty store (a new disk under the same broker id) restores
//! each MQ its followers hold a copy of before it takes produce for it: the copy's records
//! byte for byte, then its groups' cursors. While restoring, the MQ is not reported to the
//! trackers and produces to it are refused with `503`; consumers read the follower's copy
//! meanwhile (`Topology::stand_ins`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qbus_client::topology::Topology;
use qbus_client::Connection;
use qbus_wire::topology::copy_name;
use qbus_wire::Backoff;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::follower::{append, query, read, PullError, Read};
use crate::core::Core;

/// How long after its start a broker that started empty looks for copies of itself: the
/// trackers list every live follower's copies within a report or two.
const LOOK_FOR: Duration = Duration::from_secs(30);

/// Restores, as broker `me`, every MQ a follower in `topology` holds a copy of, when the
/// store started empty; returns after [`LOOK_FOR`] (the restores it started go on).
pub async fn run(
    core: Arc<Core>,
    me: String,
    mut topology: watch::Receiver<Arc<Topology>>,
    stop: CancellationToken,
) {
    if !core.registry().started_empty() {
        return;
    }
    let give_up = tokio::time::Instant::now() + LOOK_FOR;
    let mut started = HashSet::new();
    loop {
        let now = topology.borrow_and_update().clone();
        // An MQ held here since the start (made anew, or restored and then removed) is
        // never restored: a removed MQ must not come back from its follower's copy.
        started.extend(core.registry().list().iter().map(|mq| mq.name().to_owned()));
        for broker in now.brokers().filter(|b| b.is_broker() && b.id != me) {
            for copy in broker.copies.iter().filter(|c| c.leader == me) {
                if !started.insert(copy.mq.clone()) {
                    continue;
                }
                let (core, me, mq) = (core.clone(), me.clone(), copy.mq.clone());
                let (addr, stop) = (broker.addr.clone(), stop.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = restore(&core, &me, &addr, &mq) => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        }
        tokio::select! {
            changed = topology.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep_until(give_up) => return,
            _ = stop.cancelled() => return,
        }
    }
}

/// Restores `mq` from the copy the follower at `addr` holds of it, retrying until done.
async fn restore(core: &Core, me: &str, addr: &str, mq: &str) {
    let connection = super::peer_connection(core, addr);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        match restore_once(core, &connection, me, mq).await {
            Ok(Some(end)) => {
                tracing::info!(mq, from = addr, end, "restored from a follower's copy");
                core.changed();
                return;
            }
            Ok(None) => return,
            Err(e) => tracing::warn!(mq, from = addr, error = %e, "restore: retrying"),
        }
        tokio::time::sleep(backoff.next_wait()).await;
    }
}

/// One attempt; the offset after the last record restored, or `None` when the MQ exists
/// already (made anew before the restore began).
async fn restore_once(
    core: &Core,
    connection: &Connection,
    me: &str,
    mq: &str,
) -> Result<Option<u64>, PullError> {
    let copy = copy_name(mq, me);
    let info = query(connection, &copy).await?;
    let registry = core.registry();
    let restoring = match registry.own(mq) {
        Ok(existing) if existing.is_copy() => existing,
        Ok(_) => return Ok(None),
        Err(_) => match registry
            .start_restore(mq, &info.options, info.first_offset)
            .await?
        {
            Some(restoring) => restoring,
            None => return Ok(None),
        },
    };
    let started = Instant::now();
    loop {
        let next = restoring.reader().end_offset();
        let from_copy = Read {
            from: next,
            wait: Duration::ZERO,
            ahead: true,
            epoch: None,
        };
        let reply = read(connection, &copy, me, from_copy).await?;
        let count = reply.header.count.unwrap_or(0);
        if count == 0 {
            break;
        }
        append(core, &restoring, reply.body, count).await?;
    }
    // Cursors as the copy has them now (the copy got the acks made on it meanwhile).
    let info = query(connection, &copy).await?;
    for group in &info.groups {
        restoring
            .advance_group(core.committer(), &group.name, group.committed)
            .await?;
    }
    let restored = registry.finish_restore(mq).await?;
    tracing::debug!(mq, took = ?started.elapsed(), "restore done");
    Ok(Some(restored.reader().end_offset()))
}
