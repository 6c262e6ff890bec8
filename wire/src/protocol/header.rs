//! The frame header: command, correlation id and well-known fields, encoded as a MessagePack
//! array whose positions are frozen (see `docs/protocol.md`). New fields are only ever
//! appended, and a missing trailing field decodes to its default, so older peers keep working.

use serde::{Deserialize, Serialize};

use super::status::Status;

/// What a frame asks for. Replies carry the command of their request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(from = "u8", into = "u8")]
pub enum Command {
    /// Opens a session: the reply names the broker and the protocol version.
    #[default]
    Hello,
    /// Keeps an idle connection alive and proves the peer is there.
    Heartbeat,
    /// Appends the records in the body to `mq`.
    Produce,
    /// Takes up to `count` records for `group` of `mq`, waiting up to `timeout_ms`.
    Fetch,
    /// Acknowledges the deliveries named in `tokens`.
    Ack,
    /// Gives the deliveries named in `tokens` back for immediate redelivery.
    Nack,
    /// Creates `mq`; the body may hold [`MqOptions`](super::MqOptions).
    CreateMq,
    /// Describes `mq`; the reply body is an [`MqInfo`](super::MqInfo).
    QueryMq,
    /// Lists every MQ; the reply body is a list of [`MqInfo`](super::MqInfo).
    ListMq,
    /// Deletes `mq` with its data and groups.
    RemoveMq,
    /// Deletes consumer group `group` of `mq` (its cursor and deliveries in flight); refused
    /// with `409` while a consumer is attached.
    RemoveGroup,
    /// Broker to tracker: the body is the broker's full
    /// [`NodeState`](crate::topology::NodeState); the reply is empty.
    Report,
    /// Client to tracker: the reply body is a full
    /// [`TopologyUpdate`](crate::topology::TopologyUpdate); every later change is pushed on
    /// the same connection as a `TopologyUpdate` frame.
    Subscribe,
    /// Tracker to subscriber, unsolicited (id 0): a versioned change or a full snapshot.
    TopologyUpdate,
    /// One-shot query of a tracker: the reply body is a full
    /// [`TopologyUpdate`](crate::topology::TopologyUpdate) and nothing is pushed later.
    QueryTopology,
    /// An RPC call (see `docs/protocol.md`, "RPC commands"). To a DirectRPC server the body
    /// is a request envelope and the reply body its response envelope; to a broker, with
    /// `mq` set, the request is stored in `mq` for its consumers and the reply arrives when
    /// one of them sends a [`Route`](Command::Route).
    Call,
    /// MQ-RPC responder to broker: `route` names the waiting caller (the request record's
    /// key) and the body is the response envelope, passed on to the caller unchanged.
    Route,
    /// Describes the broker's table of MQ-RPC callers awaiting a reply: the reply body is a
    /// [`RouteStats`](super::RouteStats) map.
    QueryRoutes,
    /// Protocol 3, follower broker to leader broker: the leader's own records of `mq` from
    /// `offset` on, byte for byte as stored (at most `count`, waiting up to `timeout_ms` for
    /// one). `group` names the follower; asking from `offset` confirms that it holds every
    /// record below `offset` durably (see `docs/replication.md`).
    ReplicaRead,
    /// Protocol 3, follower broker to leader broker: group `group` of the leader's own `mq`
    /// was acknowledged up to `offset` on the follower's copy (consumers read it there
    /// while the leader was away); the leader moves its cursor up to it (never back).
    ReplicaCursor,
    /// Protocol 3, operator to a follower broker: makes its copy `mq` (`MQ@LEADER`) an MQ
    /// of its own named `MQ`, for a leader that is never coming back; the reply body is
    /// its [`MqInfo`](super::MqInfo).
    AdoptCopy,
    /// Protocol 5, follower broker to leader broker: the leader epoch of `mq` now, and where
    /// the epoch the follower's copy last followed ended (its records from there on may be
    /// ones the leader lost in a power loss). `group` names the follower; the body holds the
    /// copy's [`LeaderEpoch`](super::LeaderEpoch) or nothing; the reply body is an
    /// [`EpochAnswer`](super::EpochAnswer) (see `docs/replication.md`).
    ReplicaEpoch,
    /// Protocol 4: opens a transaction; the body may hold
    /// [`TxOptions`](super::TxOptions); the reply's `offset` is the new transaction id.
    TxBegin,
    /// Protocol 4: the records in the body are half messages of transaction `offset` for
    /// `mq`: stored durably, delivered to no group until the transaction commits.
    TxProduce,
    /// Protocol 4: commits transaction `offset`: all its messages become visible at once.
    TxCommit,
    /// Protocol 4: rolls back transaction `offset`: its messages are discarded.
    TxRollback,
    /// Protocol 4: the broker's open transactions; the reply body is a list of
    /// [`TxInfo`](super::TxInfo).
    TxList,
    /// Protocol 4, producer to broker: this connection answers the broker's checks of the
    /// undecided transactions of producer group `group` (until it closes).
    TxCheckerReady,
    /// Protocol 4, broker to a producer connection that sent `TxCheckerReady`, pushed with
    /// id `0`: transaction `offset` of its group is undecided past its timeout; the body is
    /// a [`TxCheck`](super::TxCheck). The producer answers with `TxCommit` or `TxRollback`,
    /// or not at all (unknown: the broker asks again at the next interval).
    TxCheck,
    /// A command number this version does not know.
    Unknown(u8),
}

impl From<u8> for Command {
    fn from(code: u8) -> Self {
        match code {
            1 => Command::Hello,
            2 => Command::Heartbeat,
            10 => Command::Produce,
            11 => Command::Fetch,
            12 => Command::Ack,
            13 => Command::Nack,
            20 => Command::CreateMq,
            21 => Command::QueryMq,
            22 => Command::ListMq,
            23 => Command::RemoveMq,
            24 => Command::RemoveGroup,
            30 => Command::Call,
            31 => Command::Route,
            32 => Command::QueryRoutes,
            40 => Command::Report,
            41 => Command::Subscribe,
            42 => Command::TopologyUpdate,
            43 => Command::QueryTopology,
            50 => Command::TxBegin,
            51 => Command::TxProduce,
            52 => Command::TxCommit,
            53 => Command::TxRollback,
            54 => Command::TxCheckerReady,
            55 => Command::TxCheck,
            56 => Command::TxList,
            80 => Command::ReplicaRead,
            81 => Command::ReplicaCursor,
            82 => Command::AdoptCopy,
            83 => Command::ReplicaEpoch,
            other => Command::Unknown(other),
        }
    }
}

impl From<Command> for u8 {
    fn from(cmd: Command) -> u8 {
        match cmd {
            Command::Hello => 1,
            Command::Heartbeat => 2,
            Command::Produce => 10,
            Command::Fetch => 11,
            Command::Ack => 12,
            Command::Nack => 13,
            Command::CreateMq => 20,
            Command::QueryMq => 21,
            Command::ListMq => 22,
            Command::RemoveMq => 23,
            Command::RemoveGroup => 24,
            Command::Call => 30,
            Command::Route => 31,
            Command::QueryRoutes => 32,
            Command::Report => 40,
            Command::Subscribe => 41,
            Command::TopologyUpdate => 42,
            Command::QueryTopology => 43,
            Command::TxBegin => 50,
            Command::TxProduce => 51,
            Command::TxCommit => 52,
            Command::TxRollback => 53,
            Command::TxCheckerReady => 54,
            Command::TxCheck => 55,
            Command::TxList => 56,
            Command::ReplicaRead => 80,
            Command::ReplicaCursor => 81,
            Command::AdoptCopy => 82,
            Command::ReplicaEpoch => 83,
            Command::Unknown(code) => code,
        }
    }
}

/// How far a record had gone when the broker acknowledged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(from = "u8", into = "u8")]
pub enum Durability {
    /// Protocol 4: kept in a memory MQ's ring only, never on disk: lost when the broker
    /// stops. A broker sends it only to version 4 peers; older ones get `Written` (see
    /// `docs/protocol.md`, version 4).
    /// The weakest: first in the order.
    Memory,
    /// Written to the store file: survives a killed broker process, not a power loss.
    Written,
    /// Flushed to disk with fsync: survives a power loss.
    Synced,
    /// Protocol 3: synced here and held by at least `min_replicas` followers on other
    /// brokers: survives the loss of this broker's machine. A version 2 peer reads the code
    /// as `Synced`.
    Replicated,
}

impl From<u8> for Durability {
    fn from(code: u8) -> Self {
        match code {
            2 => Durability::Synced,
            3 => Durability::Replicated,
            4 => Durability::Memory,
            // Codes above are newer than this version: promise the least.
            _ => Durability::Written,
        }
    }
}

impl From<Durability> for u8 {
    fn from(d: Durability) -> u8 {
        match d {
            Durability::Written => 1,
            Durability::Synced => 2,
            Durability::Replicated => 3,
            Durability::Memory => 4,
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Durability::Written => "written",
            Durability::Synced => "synced",
            Durability::Replicated => "replicated",
            Durability::Memory => "memory",
        })
    }
}

/// Names one delivery of one record: a late ack for an earlier attempt cannot acknowledge a
/// redelivered copy, because the attempt numbers differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeliveryToken {
    /// Offset of the record in its MQ.
    pub offset: u64,
    /// Delivery attempt, starting at 1.
    pub attempt: u32,
}

/// Offsets a fetch went past because their records are damaged on disk (protocol 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LostRange {
    /// The first offset lost.
    pub first: u64,
    /// The offset after the last one lost.
    pub end: u64,
}

/// Header flag: the producer wants no reply (one-way send).
pub const FLAG_ONEWAY: u32 = 1;
/// Header flag on a fetch: a group created by this fetch starts at the end of the MQ.
pub const FLAG_START_AT_END: u32 = 1 << 1;
/// Header flag on a fetch: a group created by this fetch starts at `offset`.
pub const FLAG_START_AT_OFFSET: u32 = 1 << 2;
/// Header flag on a nack: the consumer gives the deliveries back without having handed them
/// to its application (it stopped with them prefetched); they do not count toward the MQ's
/// delivery limit.
pub const FLAG_UNSEEN: u32 = 1 << 3;
/// Header flag on a produce reply (protocol 3): at least one record of the request carried
/// a dedupe id the MQ had seen within its window and was not stored again; `offsets` says
/// where each record of the request is.
pub const FLAG_DUPLICATE: u32 = 1 << 4;
/// Header flag on a produce (protocol 3): the receipt waits until the records are on
/// enough followers ([`Durability::Replicated`]), whatever the MQ's default.
pub const FLAG_ACK_REPLICATED: u32 = 1 << 16;
/// Header flag on a produce (protocol 3): the receipt waits for this broker only, even on
/// an MQ with replicas (which acknowledges at `replicated` by default).
pub const FLAG_ACK_LOCAL: u32 = 1 << 17;
/// Header flag on a `ReplicaRead` (protocol 3): a read ahead, which does not confirm
/// `offset`; the follower confirms what it made durable with later reads without it (a
/// confirmation with `count` 0 asks for no records).
pub const FLAG_READ_AHEAD: u32 = 1 << 18;
/// Header flag on a `ReplicaRead` (protocol 5): the body is the
/// [`LeaderEpoch`](super::LeaderEpoch) the follower agreed on with `ReplicaEpoch`. The leader
/// refuses the request (`503`) when that is not its epoch now, and may answer a read with
/// records written but not yet synced (the receipts still wait for its own sync).
pub const FLAG_LEADER_EPOCH: u32 = 1 << 28;
/// Header flag on a `Route` (protocol 4): the frame also acknowledges the call it answers,
/// as an `Ack` of `mq`, `group` and `tokens` would, so a responder's reply and its ack
/// are one frame. A broker honours it only on connections that said protocol 4 in
/// `Hello` (an older broker would route the reply and ignore the ack), so a responder sets
/// it only when the broker's `Hello` reply said 4.
pub const FLAG_ROUTE_ACK: u32 = 1 << 26;

/// Header flag on a `TxCommit` or `TxRollback` reply (protocol 4): the transaction had
/// been so decided already; nothing changed.
pub const FLAG_TX_ALREADY: u32 = 1 << 20;

/// The header of every frame. Field order is the wire order; do not reorder.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Header {
    /// What the frame asks for (replies repeat their request's command).
    pub cmd: Command,
    /// Correlation id chosen by the requester; the reply carries the same id.
    pub id: u64,
    /// 0 in requests; a [`Status`] code in replies.
    pub status: u16,
    /// The MQ the command acts on.
    pub mq: Option<String>,
    /// The consumer group (fetch, ack, nack).
    pub group: Option<String>,
    /// Tag filter on a fetch: only records with this tag are delivered.
    pub tag: Option<String>,
    /// Produce reply: offset of the first record. Fetch: start offset for a new group.
    pub offset: Option<u64>,
    /// Produce: number of records in the body. Fetch: most records wanted / delivered.
    pub count: Option<u32>,
    /// Fetch: how long to wait for a record before replying empty.
    pub timeout_ms: Option<u32>,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Produce reply: how durable the records were when acknowledged.
    pub durability: Option<Durability>,
    /// Fetch reply: the delivery attempt of each record in the body, in order.
    pub attempts: Vec<u32>,
    /// Ack and nack: the deliveries acted on.
    pub tokens: Vec<DeliveryToken>,
    /// Error replies: a message a person can act on.
    pub error: Option<String>,
    /// Call and its reply: how the body is encoded, `"msgpack"` (also when absent) or
    /// `"json"`; the reply uses the request's encoding.
    pub encoding: Option<String>,
    /// Route: the MQ-RPC reply route, copied from the key of the request record.
    pub route: Option<String>,
    /// Fetch reply, protocol 2: offsets the group went past because their records are
    /// damaged on disk (`error` then names the file and byte). Sent only to peers that said
    /// protocol 2 in `Hello`; a version 1 peer refuses a header with this field.
    pub lost: Option<LostRange>,
    /// Produce reply with [`FLAG_DUPLICATE`], protocol 3: the offset of each record of the
    /// request, in order (a duplicate's is its original's). Sent only to version 3 peers
    /// (only they send dedupe ids).
    pub offsets: Vec<u64>,
}

impl Header {
    /// A request header for `cmd` on `mq`.
    pub fn request(cmd: Command, mq: Option<&str>) -> Header {
        Header {
            cmd,
            mq: mq.map(str::to_owned),
            ..Header::default()
        }
    }

    /// A success reply to `request`.
    pub fn reply_to(request: &Header) -> Header {
        Header {
            cmd: request.cmd,
            id: request.id,
            status: Status::Ok.code(),
            ..Header::default()
        }
    }

    /// An error reply to the request with `cmd` and `id`.
    pub fn error(cmd: Command, id: u64, status: Status, message: impl Into<String>) -> Header {
        Header {
            cmd,
            id,
            status: status.code(),
            error: Some(message.into()),
            ..Header::default()
        }
    }

    /// True for replies (a status is set), false for requests.
    pub fn is_reply(&self) -> bool {
        self.status != 0
    }

    /// True when a flag bit is set.
    pub fn has_flag(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}
