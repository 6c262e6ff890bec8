//! The live topology of a qbus cluster: which brokers exist, which MQs each holds, and which
//! DirectRPC servers offer which services.
//!
//! Brokers (and DirectRPC servers) send their [`BrokerState`] to every tracker; trackers send
//! [`TopologyUpdate`]s to their subscribers; an HA client merges what every tracker says into
//! one [`Topology`]. All of them are MessagePack maps on the wire (field names as here), so
//! fields can be added without breaking older peers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Orders the reports of one broker: a later start (`epoch`) wins, then a later `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Version {
    /// When the broker process started, ms since the Unix epoch.
    pub epoch: u64,
    /// Bumped by the broker each time its state changes.
    pub seq: u64,
}

/// What a node is; decides whether MQs may be created on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum NodeKind {
    /// A broker holding MQs (`"broker"`).
    #[default]
    Broker,
    /// A DirectRPC server offering services (`"rpc"`).
    RpcServer,
    /// A kind this version does not know, kept as sent.
    Other(String),
}

impl From<String> for NodeKind {
    fn from(kind: String) -> Self {
        match kind.as_str() {
            "broker" => NodeKind::Broker,
            "rpc" => NodeKind::RpcServer,
            _ => NodeKind::Other(kind),
        }
    }
}

impl From<NodeKind> for String {
    fn from(kind: NodeKind) -> String {
        match kind {
            NodeKind::Broker => "broker".into(),
            NodeKind::RpcServer => "rpc".into(),
            NodeKind::Other(kind) => kind,
        }
    }
}

/// A consumer group as reported to the trackers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GroupState {
    /// Group name.
    pub name: String,
    /// Connections consuming for this group now.
    pub consumers: u32,
    /// Records retained and not yet acknowledged by this group.
    pub lag: u64,
    /// Deliveries awaiting an ack.
    pub in_flight: u64,
}

/// An MQ as reported to the trackers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MqState {
    /// MQ name.
    pub name: String,
    /// Records retained.
    pub depth: u64,
    /// Its consumer groups.
    pub groups: Vec<GroupState>,
}

impl MqState {
    /// Deliveries awaiting an ack, over every group.
    pub fn in_flight(&self) -> u64 {
        self.groups.iter().map(|g| g.in_flight).sum()
    }
}

/// Everything one node tells the trackers about itself; the body of a `Report`.
///
/// ```
/// use qbus_client::topology::{BrokerState, MqState};
/// let state = BrokerState {
///     id: "10.0.0.7:15555".into(),
///     addr: "10.0.0.7:15555".into(),
///     epoch: 1_700_000_000_000,
///     seq: 3,
///     mqs: vec![MqState { name: "orders".into(), depth: 42, groups: vec![] }],
///     ..BrokerState::default()
/// };
/// assert!(state.holds("orders"));
/// assert_eq!(state.version().seq, 3);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BrokerState {
    /// Stable identity of the node (a broker uses its advertised address).
    pub id: String,
    /// Where clients connect (`host:port`).
    pub addr: String,
    /// Broker or DirectRPC server.
    pub kind: NodeKind,
    /// Start time of the process, ms since the Unix epoch.
    pub epoch: u64,
    /// Bumped on every change of the state.
    pub seq: u64,
    /// How often the node reports; the tracker drops it after missing a few.
    pub report_interval_ms: u64,
    /// MQs held, sorted by name.
    pub mqs: Vec<MqState>,
    /// DirectRPC services offered, by name.
    pub services: Vec<String>,
}

impl BrokerState {
    /// The version of this report.
    pub fn version(&self) -> Version {
        Version {
            epoch: self.epoch,
            seq: self.seq,
        }
    }

    /// The MQ `name`, if held.
    pub fn mq(&self, name: &str) -> Option<&MqState> {
        self.mqs.iter().find(|mq| mq.name == name)
    }

    /// True when the node holds the MQ `name`.
    pub fn holds(&self, name: &str) -> bool {
        self.mq(name).is_some()
    }

    /// True when MQs may live on this node.
    pub fn is_broker(&self) -> bool {
        self.kind == NodeKind::Broker
    }
}

/// What a tracker sends: a full snapshot (the reply to `Subscribe` and `QueryTopology`, or a
/// resync) or a change (pushed as a `TopologyUpdate` frame).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TopologyUpdate {
    /// The tracker's change counter; a change carries the previous one plus 1, so a
    /// subscriber that sees a gap asks for a snapshot again.
    pub seq: u64,
    /// False while a freshly started tracker is still collecting reports: its view may miss
    /// live brokers, so subscribers must not forget brokers it does not list.
    pub ready: bool,
    /// True for a full snapshot (`brokers` is everything), false for a change.
    pub full: bool,
    /// Nodes added or changed (all of them in a snapshot).
    pub brokers: Vec<BrokerState>,
    /// Ids of nodes that left (changes only).
    pub removed: Vec<String>,
}

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

/// The merged view of the cluster an HA client works from; cheap to share behind an `Arc`.
///
/// ```
/// use qbus_client::topology::{BrokerState, MqState, Topology};
/// let broker = |id: &str, mqs: &[&str]| BrokerState {
///     id: id.into(),
///     addr: id.into(),
///     mqs: mqs.iter().map(|m| MqState { name: m.to_string(), ..Default::default() }).collect(),
///     ..BrokerState::default()
/// };
/// let topology = Topology::new([broker("a:1", &["orders"]), broker("b:1", &["orders", "jobs"])]);
/// assert_eq!(topology.holders("orders").len(), 2);
/// assert_eq!(&*topology.holders("jobs")[0].addr, "b:1");
/// assert!(topology.holders("missing").is_empty());
/// ```
#[derive(Debug, Clone, Default)]
pub struct Topology {
    brokers: BTreeMap<String, BrokerState>,
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
    pub fn new(brokers: impl IntoIterator<Item = BrokerState>) -> Topology {
        let brokers: BTreeMap<String, BrokerState> =
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
    pub fn brokers(&self) -> impl Iterator<Item = &BrokerState> {
        self.brokers.values()
    }

    /// The node with `id`.
    pub fn broker(&self, id: &str) -> Option<&BrokerState> {
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

    /// Every MQ name held somewhere, sorted.
    pub fn mq_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.holders.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The nodes offering the DirectRPC service `name`, sorted by id.
    pub fn providers(&self, service: &str) -> Vec<&BrokerState> {
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
    fn kinds_survive_the_wire_and_unknown_ones_are_kept() {
        for kind in [
            NodeKind::Broker,
            NodeKind::RpcServer,
            NodeKind::Other("gateway".into()),
        ] {
            let bytes = rmp_serde::to_vec_named(&kind).unwrap();
            assert_eq!(rmp_serde::from_slice::<NodeKind>(&bytes).unwrap(), kind);
        }
    }

    #[test]
    fn state_decodes_with_missing_and_extra_fields() {
        #[derive(Serialize)]
        struct Newer {
            id: &'static str,
            addr: &'static str,
            seq: u64,
            future_field: u32,
        }
        let bytes = rmp_serde::to_vec_named(&Newer {
            id: "a",
            addr: "a:1",
            seq: 9,
            future_field: 1,
        })
        .unwrap();
        let state: BrokerState = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!((state.id.as_str(), state.seq), ("a", 9));
        assert!(state.is_broker() && state.mqs.is_empty());
    }

    #[test]
    fn rpc_servers_hold_no_mqs_but_offer_services() {
        let rpc = BrokerState {
            id: "rpc".into(),
            kind: NodeKind::RpcServer,
            mqs: vec![MqState {
                name: "ignored".into(),
                ..MqState::default()
            }],
            services: vec!["calc".into()],
            ..BrokerState::default()
        };
        let topology = Topology::new([rpc]);
        assert!(topology.holders("ignored").is_empty());
        assert_eq!(topology.providers("calc").len(), 1);
    }
}
