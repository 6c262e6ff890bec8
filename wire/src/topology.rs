//! What nodes tell trackers and trackers tell clients about the cluster: which brokers
//! exist, which MQs each holds, and which DirectRPC servers offer which services.
//!
//! Brokers (and DirectRPC servers) send their [`NodeState`] to every tracker; trackers send
//! [`TopologyUpdate`]s to their subscribers; an HA client merges what every tracker says into
//! one view (`qbus_client::topology::Topology`). All of them are MessagePack maps on the wire (field names as here), so
//! fields can be added without breaking older peers.

use serde::{Deserialize, Serialize};

use crate::protocol::FollowerInfo;

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
    /// The MQ's `replicas` option (0 when unreported, which means 1): brokers other than
    /// this one follow its copy when above 1 (`docs/replication.md`).
    pub replicas: u32,
    /// The followers of this broker's copy as it sees them (leader side), sorted by id:
    /// their lag in records and bytes and whether they are in sync. Empty for MQs without
    /// replicas and from older brokers.
    pub followers: Vec<FollowerInfo>,
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
/// use qbus_wire::topology::{NodeState, MqState};
/// let state = NodeState {
///     id: "10.0.0.7:15555".into(),
///     addr: "10.0.0.7:15555".into(),
///     epoch: 1_700_000_000_000,
///     seq: 3,
///     mqs: vec![MqState { name: "orders".into(), depth: 42, ..MqState::default() }],
///     ..NodeState::default()
/// };
/// assert!(state.holds("orders"));
/// assert_eq!(state.version().seq, 3);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeState {
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
    /// Follower copies this broker holds of other brokers' MQs (`docs/replication.md`),
    /// sorted by name (`MQ@LEADER`). A client reads one (as `MQ@LEADER`) while its leader is
    /// missing from the topology.
    pub copies: Vec<CopyState>,
}

/// A follower's copy of another broker's MQ, as reported to the trackers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CopyState {
    /// The leader broker's id.
    pub leader: String,
    /// The MQ.
    pub mq: String,
    /// Offset after the copy's last record.
    pub end: u64,
}

impl CopyState {
    /// The name clients fetch the copy by: `MQ@LEADER`.
    pub fn name(&self) -> String {
        copy_name(&self.mq, &self.leader)
    }
}

/// The name of a follower's copy of `leader`'s `mq`: `MQ@LEADER` (an MQ's own name never
/// has an `@`).
pub fn copy_name(mq: &str, leader: &str) -> String {
    format!("{mq}@{leader}")
}

impl NodeState {
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
    pub brokers: Vec<NodeState>,
    /// Ids of nodes that left (changes only).
    pub removed: Vec<String>,
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
        let state: NodeState = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!((state.id.as_str(), state.seq), ("a", 9));
        assert!(state.is_broker() && state.mqs.is_empty());
    }
}
