//! Removing stale follower copies, so a follower's disk does not fill with copies nobody
//! needs: copies of MQs their leader removed, and copies placement gave to another broker
//! (`docs/replication.md`, "Stale copies").
//!
//! A copy is stale while its leader is in the topology, has been up for a while, and
//! either holds the MQ no more, or holds it with placement naming other followers, one of
//! which is in sync. A copy whose leader is missing is never stale: it is what consumers
//! read meanwhile and what the leader restores from. A copy stale for [`Cleanup::after`]
//! without a break and unread for as long (a restoring leader reads its copy) is removed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use qbus_client::topology::Topology;
use qbus_wire::now_ms;

use super::placement;
use crate::core::Core;

/// A stale copy goes after this many report intervals (60 s with the default 2 s).
pub const AFTER_REPORTS: u32 = 30;

/// The stale copies of one broker and since when each is stale.
pub struct Cleanup {
    after: Duration,
    since: HashMap<(String, String), Instant>,
}

impl Cleanup {
    /// Removes copies stale for `after`.
    pub fn new(after: Duration) -> Cleanup {
        Cleanup {
            after,
            since: HashMap::new(),
        }
    }

    /// How long a copy stays stale before it is removed.
    pub fn after(&self) -> Duration {
        self.after
    }

    /// Looks at every copy `me` holds against `topology`; removes those stale long enough.
    pub async fn sweep(&mut self, core: &Core, topology: &Topology, me: &str) {
        let copies = core.registry().copies();
        let now = Instant::now();
        let mut seen = HashMap::new();
        for copy in copies.list() {
            let Some((mq, leader)) = copy.name().split_once('@') else {
                continue;
            };
            let key = (leader.to_owned(), mq.to_owned());
            if !is_stale(topology, me, leader, mq, self.after, now_ms()) {
                continue;
            }
            let since = *self.since.get(&key).unwrap_or(&now);
            seen.insert(key, since);
            if now.duration_since(since) >= self.after && copies.idle(leader, mq) >= self.after {
                if let Err(e) = copies.remove(leader, mq).await {
                    tracing::warn!(leader, mq, error = %e, "could not remove a stale copy");
                    continue;
                }
                core.changed();
            }
        }
        self.since = seen;
    }
}

/// Whether `me`'s copy of `leader`'s `mq` is stale in `topology` at `now_ms` (see the
/// module doc); `after` is how long the leader must have been up.
fn is_stale(
    topology: &Topology,
    me: &str,
    leader: &str,
    mq: &str,
    after: Duration,
    now_ms: u64,
) -> bool {
    let Some(node) = topology.broker(leader).filter(|node| node.is_broker()) else {
        return false;
    };
    // A leader that started moments ago may be restoring the MQ (not reported meanwhile).
    if now_ms.saturating_sub(node.epoch) < after.as_millis() as u64 {
        return false;
    }
    let Some(state) = node.mq(mq) else {
        return true;
    };
    let live: Vec<&str> = topology
        .brokers()
        .filter(|node| node.is_broker())
        .map(|node| node.id.as_str())
        .collect();
    if placement::followers(leader, mq, state.replicas, &live).contains(&me) {
        return false;
    }
    state.followers.iter().any(|f| f.id != me && f.in_sync)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qbus_client::topology::{MqState, NodeState};
    use qbus_wire::protocol::FollowerInfo;

    const AFTER: Duration = Duration::from_secs(60);
    const NOW: u64 = 1_000_000;

    fn node(id: &str, epoch: u64, mqs: Vec<MqState>) -> NodeState {
        NodeState {
            id: id.into(),
            addr: id.into(),
            epoch,
            seq: 1,
            mqs,
            ..NodeState::default()
        }
    }

    fn topology(nodes: Vec<NodeState>) -> Topology {
        Topology::new(nodes)
    }

    fn orders(followers: &[(&str, bool)]) -> MqState {
        MqState {
            name: "orders".into(),
            replicas: 2,
            followers: followers
                .iter()
                .map(|(id, in_sync)| FollowerInfo {
                    id: (*id).into(),
                    in_sync: *in_sync,
                    ..FollowerInfo::default()
                })
                .collect(),
            ..MqState::default()
        }
    }

    #[test]
    fn a_copy_is_stale_only_when_its_live_leader_no_longer_needs_it() {
        let old = NOW - AFTER.as_millis() as u64;
        let ids = ["a", "b", "c"];
        // Whoever placement picks as a's follower of orders, and one it does not.
        let chosen = placement::followers("a", "orders", 2, &ids)[0];
        let other = *ids[1..].iter().find(|id| **id != chosen).unwrap();
        let with = |leader: NodeState| {
            topology(vec![leader, node("b", old, vec![]), node("c", old, vec![])])
        };
        let stale = |t: &Topology, me| is_stale(t, me, "a", "orders", AFTER, NOW);

        // The leader missing: the copy is what consumers read, never stale.
        assert!(!stale(&topology(vec![node("b", old, vec![])]), "b"));
        // The MQ removed on the leader: stale, unless the leader just started (restoring).
        assert!(stale(&with(node("a", old, vec![])), "b"));
        assert!(!stale(&with(node("a", NOW - 1_000, vec![])), "b"));
        // Placement names this broker: needed.
        assert!(!stale(&with(node("a", old, vec![orders(&[])])), chosen));
        // Out of placement: stale once another follower is in sync.
        assert!(!stale(
            &with(node("a", old, vec![orders(&[(chosen, false)])])),
            other
        ));
        assert!(stale(
            &with(node("a", old, vec![orders(&[(chosen, true)])])),
            other
        ));
    }
}
