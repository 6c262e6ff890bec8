//! Bodies of the administrative commands, encoded as MessagePack maps so fields can be added.

use serde::{Deserialize, Serialize};

/// Options of an MQ, sent in the body of `CreateMq`. Unset fields take the broker's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MqOptions {
    /// How long a delivery may stay unacknowledged before it is redelivered (default 30 s).
    pub ack_timeout_ms: Option<u64>,
    /// Deliveries of one record before it moves to the dead-letter MQ (default 16).
    pub max_deliveries: Option<u32>,
    /// Where records go after `max_deliveries` (default `<mq>.DLQ`).
    pub dead_letter_mq: Option<String>,
    /// Whether produces wait for the fsync under `--fsync always` (default true). False
    /// acknowledges them once written (`written` durability) and shows them to consumers at
    /// once: for messages worth less than an fsync's latency, such as RPC requests.
    pub sync: Option<bool>,
    /// Time to live of the MQ's messages that carry no `expires_at` of their own, counted
    /// from when a message is stored (for a delayed one, from when it comes due). Default:
    /// none, messages never expire.
    pub ttl_ms: Option<u64>,
    /// What happens to an expired message: `false` (the default) drops it, `true` moves it
    /// to the dead-letter MQ.
    pub expired_to_dead_letter: Option<bool>,
    /// Whether every group of the MQ delivers one message per key at a time, in log order:
    /// the next message of a key goes out once the previous one is acknowledged (or
    /// dead-lettered, or expired). Messages without a key are not held. Default false.
    pub ordered_by_key: Option<bool>,
    /// Copies of each broker's log of this MQ: its own plus `replicas - 1` followers on
    /// other brokers (default 1: no followers). Above 1, produces are acknowledged at
    /// `replicated` unless they ask for less (see `docs/replication.md`).
    pub replicas: Option<u32>,
    /// Followers that must hold a record before a `replicated` receipt (default: every
    /// follower in sync, at least one). Fewer reachable followers fail the produce (`503`).
    pub min_replicas: Option<u32>,
}

impl MqOptions {
    /// Copies of each broker's log, at least 1.
    pub fn replica_count(&self) -> u32 {
        self.replicas.unwrap_or(1).max(1)
    }
}

/// A follower of one broker's copy of an MQ, as its leader sees it; part of [`MqInfo`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FollowerInfo {
    /// The follower broker's id (its advertised address).
    pub id: String,
    /// The leader whose copy it follows: empty from a broker describing its own MQ, set
    /// (to the broker's address) by HA clients combining several brokers' answers.
    pub leader: String,
    /// Every record below this offset is durable on the follower.
    pub acked: u64,
    /// Records the leader holds that the follower does not yet.
    pub lag: u64,
    /// Whether it caught up with the leader's end recently (it then counts for
    /// `replicated` receipts by default).
    pub in_sync: bool,
}

/// State of a consumer group, part of [`MqInfo`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GroupInfo {
    /// Group name.
    pub name: String,
    /// Every record below this offset is acknowledged (the durable cursor).
    pub committed: u64,
    /// Next record never yet delivered to this group.
    pub next: u64,
    /// Deliveries awaiting an ack.
    pub in_flight: u64,
    /// Records retained and not yet acknowledged by this group.
    pub lag: u64,
    /// Consumers (connections) fetching for this group now.
    pub consumers: u32,
    /// Records moved to the dead-letter MQ.
    pub dead_lettered: u64,
    /// Records delivered more than once.
    pub redelivered: u64,
}

/// Description of an MQ, the reply body of `QueryMq` and (as a list) `ListMq`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MqInfo {
    /// MQ name.
    pub name: String,
    /// Oldest retained offset.
    pub first_offset: u64,
    /// Offset the next record will get.
    pub next_offset: u64,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// Segment files.
    pub segments: u32,
    /// Options in force.
    pub options: MqOptions,
    /// Consumer groups.
    pub groups: Vec<GroupInfo>,
    /// Delayed messages stored and not yet due.
    pub delayed: u64,
    /// Messages a group met expired since the broker started (once per group).
    pub expired: u64,
    /// Followers of this broker's copy (MQs with `replicas` above 1).
    pub followers: Vec<FollowerInfo>,
}

impl MqInfo {
    /// Records retained.
    pub fn depth(&self) -> u64 {
        self.next_offset.saturating_sub(self.first_offset)
    }
}

/// Reply body of `Hello`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerInfo {
    /// Protocol version spoken (see `docs/protocol.md`).
    pub protocol: u32,
    /// Server software version.
    pub version: String,
    /// Largest frame the server accepts.
    pub max_frame: u64,
}
