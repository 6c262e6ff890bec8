//! The qbus wire protocol, version 4 (specified in `docs/protocol.md`). No I/O lives here.
//!
//! - [`frame`]: length-prefixed frames and the `tokio_util` codec.
//! - [`header`]: the MessagePack header with command, correlation id and well-known fields.
//! - [`record`]: the record format shared by produce bodies, the log files and fetch bodies.
//! - [`status`]: stable numeric status codes.
//! - [`admin`]: bodies of the administrative commands.
//! - [`route`]: the MQ-RPC reply table as `QueryRoutes` describes it.
//! - [`txn`]: bodies of the transaction commands (protocol 4).
//! - [`rpc`]: the RPC request and response envelopes carried by `Call` and `Route`.

pub mod admin;
pub mod frame;
pub mod header;
mod header_codec;
mod msgpack;
pub mod record;
pub mod route;
pub mod rpc;
pub mod status;
pub mod txn;

pub use admin::{
    Credentials, EpochAnswer, FollowerInfo, GroupInfo, LeaderEpoch, MqInfo, MqOptions, ServerInfo,
};
pub use frame::{decode, encode, Frame, FrameCodec, WireError, DEFAULT_MAX_FRAME};
pub use header::{
    Command, DeliveryToken, Durability, Header, LostRange, FLAG_ACK_LOCAL, FLAG_ACK_REPLICATED,
    FLAG_DUPLICATE, FLAG_LEADER_EPOCH, FLAG_ONEWAY, FLAG_READ_AHEAD, FLAG_ROUTE_ACK,
    FLAG_START_AT_END, FLAG_START_AT_OFFSET, FLAG_TX_ALREADY, FLAG_UNSEEN,
};
pub use route::RouteStats;
pub use status::Status;
pub use txn::{CheckedMessage, TxCheck, TxInfo, TxOptions, TxState};

/// Version of the protocol this crate speaks. Version 2 added the `lost` header field;
/// version 3 the additions of `docs/protocol.md`'s "Version 3" (delayed delivery and TTL:
/// the record fields `deliver_at` and `expires_at`; security: credentials in `Hello` and the
/// statuses 401 and 403; replicas: `ReplicaRead`, durability `replicated`, the produce flags
/// `ACK_REPLICATED` and `ACK_LOCAL`; dedupe ids: record flag bit 3, header flag `DUPLICATE`,
/// field `offsets`). A peer speaks no newer version than the other side said in `Hello` (1
/// when it said nothing). Version 4 adds the pieces of `docs/protocol.md`'s "Version 4",
/// version 5 those of its "Version 5".
pub const PROTOCOL_VERSION: u32 = 5;
