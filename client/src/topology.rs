//! The merged view of a qbus cluster an HA client works from: every node the trackers
//! know, and for each MQ the brokers holding it. The reports it is made of
//! (node reports and tracker updates) are `qbus-wire` types, re-exported here.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

pub use qbus_wire::topology::{
    CopyState, GroupState, MqState, NodeKind, NodeState, TopologyUpdate, Version,
};

/// A broker holding an MQ, as a [`Selector`](crate::ha::Selector) sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The broker's id.
    pub id: Arc<str>,
    /// Where to connect.
    pub addr: Arc<str>,
    /// Records the MQ holds there.
    pub depth: u64,
    /// Records there not yet acknowledged by its slowest group (the depth when it has none).
    pub lag: u64,
    /// Deliveries awaiting an ack there.
    pub in_flight: u64,
}

/// A follower's copy standing in for a leader that does not hold its MQ now; see
/// [`Topology::stand_ins`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandIn {
    /// The missing leader's id.
    pub leader: Arc<str>,
    /// Where the follower holding the copy is reached.
    pub addr: Arc<str>,
    /// The copy's name, `MQ@LEADER`, to fetch it by.
    pub copy: String,
}

/// The merged view of the cluster an HA client works from; cheap to share behind an `Arc`.
///
/// ```
/// use qbus_client::topology::{NodeState, MqState, Topology};
/// let broker = |id: &str, mqs: &[&str]| NodeState {
///     id: id.into(),
///     addr: id.into(),
///     mqs: mqs.iter().map(|m| MqState { name: m.to_string(), ..Default::default() }).collect(),
///     ..NodeState::default()
/// };
/// let topology = Topology::new([broker("a:1", &["orders"]), broker("b:1", &["orders", "jobs"])]);
/// assert_eq!(topology.holders("orders").len(), 2);
/// assert_eq!(&*topology.holders("jobs")[0].addr, "b:1");
/// assert!(topology.holders("missing").is_empty());
/// ```
#[derive(Debug, Clone, Default)]
pub struct Topology {
    brokers: BTreeMap<String, NodeState>,
    /// MQ name to the brokers holding it, sorted by id; built once per change so a send
    /// finds its candidates without scanning.
    holders: HashMap<String, Arc<[Candidate]>>,
}

impl PartialEq for Topology {
    fn eq(&self, other: &Self) -> bool {
        // `holders` is derived from `brokers`.
        self.brokers == other.brokers
    }
}

impl Eq for Topology {}

impl Topology {
    /// The topology made of `brokers` (a later entry with the same id replaces an earlier).
    pub fn new(brokers: impl IntoIterator<Item = NodeState>) -> Topology {
        let brokers: BTreeMap<String, NodeState> =
            brokers.into_iter().map(|b| (b.id.clone(), b)).collect();
        let mut holders: HashMap<String, Vec<Candidate>> = HashMap::new();
        for broker in brokers.values().filter(|b| b.is_broker()) {
            let (id, addr): (Arc<str>, Arc<str>) =
                (broker.id.as_str().into(), broker.addr.as_str().into());
            for mq in &broker.mqs {
                holders.entry(mq.name.clone()).or_default().push(Candidate {
                    id: id.clone(),
                    addr: addr.clone(),
                    depth: mq.depth,
                    lag: mq.groups.iter().map(|g| g.lag).max().unwrap_or(mq.depth),
                    in_flight: mq.in_flight(),
                });
            }
        }
        Topology {
            brokers,
            holders: holders.into_iter().map(|(k, v)| (k, v.into())).collect(),
        }
    }

    /// Every node, sorted by id.
    pub fn brokers(&self) -> impl Iterator<Item = &NodeState> {
        self.brokers.values()
    }

    /// The node with `id`.
    pub fn broker(&self, id: &str) -> Option<&NodeState> {
        self.brokers.get(id)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.brokers.len()
    }

    /// True when no node is known.
    pub fn is_empty(&self) -> bool {
        self.brokers.is_empty()
    }

    /// The brokers holding `mq`, sorted by id; empty when none does.
    pub fn holders(&self, mq: &str) -> &[Candidate] {
        self.holders.get(mq).map_or(&[], |c| c)
    }

    /// Followers' copies of `mq` standing in for leaders that do not hold it now (dropped
    /// by the trackers, or restarted without it): one per missing leader, the copy that
    /// reaches furthest (ties: the follower with the smallest id). Consumers read these as
    /// `MQ@LEADER` while the leader is away (`docs/replication.md`).
    pub fn stand_ins(&self, mq: &str) -> Vec<StandIn> {
        let holders = self.holders(mq);
        let mut best: BTreeMap<&str, (&NodeState, u64)> = BTreeMap::new();
        for broker in self.brokers.values().filter(|b| b.is_broker()) {
            for copy in broker.copies.iter().filter(|c| c.mq == mq) {
                if holders.iter().any(|h| *h.id == copy.leader) {
                    continue;
                }
                let better = best
                    .get(copy.leader.as_str())
                    .is_none_or(|&(_, end)| copy.end > end);
                if better {
                    best.insert(&copy.leader, (broker, copy.end));
                }
            }
        }
        best.into_iter()
            .map(|(leader, (broker, _))| StandIn {
                leader: leader.into(),
                addr: broker.addr.as_str().into(),
                copy: qbus_wire::topology::copy_name(mq, leader),
            })
            .collect()
    }

    /// Every MQ name held somewhere, sorted.
    pub fn mq_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.holders.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The nodes offering the DirectRPC service `name`, sorted by id.
    pub fn providers(&self, service: &str) -> Vec<&NodeState> {
        self.brokers
            .values()
            .filter(|b| b.services.iter().any(|s| s == service))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_servers_hold_no_mqs_but_offer_services() {
        let rpc = NodeState {
            id: "rpc".into(),
            kind: NodeKind::RpcServer,
            mqs: vec![MqState {
                name: "ignored".into(),
                ..MqState::default()
            }],
            services: vec!["calc".into()],
            ..NodeState::default()
        };
        let topology = Topology::new([rpc]);
        assert!(topology.holders("ignored").is_empty());
        assert_eq!(topology.providers("calc").len(), 1);
    }
}
