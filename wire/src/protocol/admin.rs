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
    /// How long a dedupe id is remembered (protocol 3; default 120 000 = 2 minutes, 0 turns
    /// deduplication off for the MQ): a record whose dedupe id was stored within this
    /// window is not stored again.
    pub dedupe_window_ms: Option<u64>,
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
