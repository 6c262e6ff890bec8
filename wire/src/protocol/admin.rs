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
    /// How long a dedupe id is remembered (protocol 3; default 120 000 = 2 minutes, 0 turns
    /// deduplication off for the MQ): a record whose dedupe id was stored within this
    /// window is not stored again.
    pub dedupe_window_ms: Option<u64>,
    /// Copies of each broker's log of this MQ: its own plus `replicas - 1` followers on
    /// other brokers (default 1: no followers). Above 1, produces are acknowledged at
    /// `replicated` unless they ask for less (see `docs/replication.md`).
    pub replicas: Option<u32>,
    /// Followers that must hold a record before a `replicated` receipt (default: every
    /// follower in sync, at least one). Fewer reachable followers fail the produce (`503`).
    pub min_replicas: Option<u32>,
    /// Protocol 4: keep the MQ's messages in a bounded ring in memory, never on disk
    /// (default false). Produce and consume work as on any MQ (groups, acks, redelivery,
    /// tag filters, TTL) and every receipt says `memory`; the messages and the groups are
    /// lost when the broker stops, by design, while the MQ itself comes back, empty. A
    /// memory MQ takes no delayed messages, no dedupe ids and no replicas.
    pub memory: Option<bool>,
    /// Memory MQs: most messages the ring keeps (default 1 048 576); the oldest go first.
    pub memory_max_messages: Option<u64>,
    /// Memory MQs: most bytes of records the ring keeps (default 64 MiB).
    pub memory_max_bytes: Option<u64>,
    /// Memory MQs: messages older than this leave the ring (default 60 000 = 1 minute).
    pub memory_max_age_ms: Option<u64>,
}

impl MqOptions {
    /// Copies of each broker's log, at least 1.
    pub fn replica_count(&self) -> u32 {
        self.replicas.unwrap_or(1).max(1)
    }

    /// Whether the MQ keeps its messages in memory only (protocol 4).
    pub fn is_memory(&self) -> bool {
        self.memory == Some(true)
    }
}

/// One epoch of a leader's copy of an MQ (protocol 5): every open of the MQ starts a new
/// one, recorded durably before anything is served. `history` tells apart the histories of
/// MQs made anew under the same name (deleted and created again, restored, adopted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LeaderEpoch {
    /// Random, chosen when the MQ's epoch history starts.
    pub history: u64,
    /// Counts the opens of the MQ within that history, from 1.
    pub epoch: u64,
}

/// A leader's answer to `ReplicaEpoch` (protocol 5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EpochAnswer {
    /// The leader's epoch now: reads and confirmations carry it.
    pub current: LeaderEpoch,
    /// Whether the leader knows the epoch asked about (same history, not older than the
    /// oldest it keeps). An unknown one tells the follower nothing of its copy's records.
    pub known: bool,
    /// Where the epoch asked about ended on the leader (the next epoch's first offset):
    /// records of the copy from there on are not the leader's. `None` for the current
    /// epoch, or an unknown one.
    pub ended_at: Option<u64>,
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
    /// Bytes of those records in the leader's log (from its offset index: up to about
    /// 4 KiB over when the follower stopped inside a segment). Protocol 4; 0 from older
    /// brokers.
    pub lag_bytes: u64,
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
    /// Protocol 4, memory MQs: messages the ring dropped (its size or age limit) before
    /// this group read them.
    pub dropped: u64,
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
    /// Protocol 4, memory MQs: messages groups lost because the ring dropped them before
    /// they read them, summed over the groups since the broker started.
    pub dropped: u64,
}

impl MqInfo {
    /// Records retained.
    pub fn depth(&self) -> u64 {
        self.next_offset.saturating_sub(self.first_offset)
    }
}

/// Body of `Hello`, both ways: what each side speaks; a client's may carry its
/// credentials, a server's reply the identity it took the client for (protocol 3).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerInfo {
    /// Protocol version spoken (see `docs/protocol.md`).
    pub protocol: u32,
    /// Server software version.
    pub version: String,
    /// Largest frame the server accepts.
    pub max_frame: u64,
    /// A client's credentials (protocol 3); absent: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Credentials>,
    /// In a server's reply: the user the client is served as (`anonymous` without
    /// credentials); absent from servers before protocol 3.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// How a client proves who it is (in `Hello`; see `docs/protocol.md`, "Version 3").
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Credentials {
    /// A user name and its password.
    Password {
        /// The user name.
        user: String,
        /// The password.
        password: String,
    },
    /// A token (`qbus-broker new-token`), which names its user itself.
    Token {
        /// The token.
        token: String,
    },
}

impl Credentials {
    /// A user name and password.
    pub fn password(user: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials::Password {
            user: user.into(),
            password: password.into(),
        }
    }

    /// A token.
    pub fn token(token: impl Into<String>) -> Credentials {
        Credentials::Token {
            token: token.into(),
        }
    }
}

/// Secrets stay out of logs.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Password { user, .. } => f
                .debug_struct("Password")
                .field("user", user)
                .finish_non_exhaustive(),
            Credentials::Token { .. } => f.write_str("Token { .. }"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ServerInfo` as a version 2 peer reads it.
    #[derive(Debug, Deserialize, PartialEq)]
    struct OldServerInfo {
        protocol: u32,
        version: String,
        max_frame: u64,
    }

    #[test]
    fn credentials_travel_in_hello_and_older_peers_skip_them() {
        let hello = ServerInfo {
            protocol: 3,
            version: "x".into(),
            max_frame: 0,
            credentials: Some(Credentials::password("app", "s3cret")),
            identity: None,
        };
        let bytes = rmp_serde::to_vec_named(&hello).unwrap();
        assert_eq!(rmp_serde::from_slice::<ServerInfo>(&bytes).unwrap(), hello);
        let old: OldServerInfo = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(old.protocol, 3);
        // And a version 2 Hello reads as one without credentials.
        let v2 = rmp_serde::to_vec_named(&ServerInfo::default()).unwrap();
        assert_eq!(
            rmp_serde::from_slice::<ServerInfo>(&v2)
                .unwrap()
                .credentials,
            None
        );
        assert!(
            !format!("{hello:?}").contains("s3cret"),
            "secrets stay out of logs"
        );
    }
}
