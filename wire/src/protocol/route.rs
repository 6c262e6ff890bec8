//! MQ-RPC reply routing as the wire sees it: the reply body of `QueryRoutes`.
//!
//! A broker that stores an MQ-RPC request remembers the caller's connection and correlation
//! id in a bounded table until a responder routes the reply back, the deadline passes or the
//! caller disconnects (see `docs/protocol.md`, "RPC commands").

use serde::{Deserialize, Serialize};

/// The state of a broker's table of callers awaiting an MQ-RPC reply; the reply body of
/// `QueryRoutes`, a MessagePack map so fields can be added.
///
/// ```
/// use qbus_wire::protocol::RouteStats;
/// let stats = RouteStats { pending: 3, capacity: 65_536, ..RouteStats::default() };
/// assert!(stats.pending < stats.capacity);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RouteStats {
    /// Callers waiting for a reply now.
    pub pending: u64,
    /// Most callers that may wait at once on this broker; a call beyond it is refused with
    /// `429`.
    pub capacity: u64,
    /// Most callers one connection may have waiting at once.
    pub per_connection: u64,
    /// Replies delivered to their caller since the broker started.
    pub routed: u64,
    /// Entries dropped because their deadline passed (the caller got a `504`).
    pub expired: u64,
    /// Entries dropped because their caller disconnected.
    pub abandoned: u64,
    /// Routes that named no waiting caller (late replies, or a caller already gone).
    pub unroutable: u64,
}
