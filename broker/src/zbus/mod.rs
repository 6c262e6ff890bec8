//! The zbus 7.x protocol on the broker port (`docs/zbus.md`): a door of its own onto the same
//! core, so existing zbus clients (Java, Python, Node.js, C#, C) work unchanged.
//!
//! - [`sniff`]: telling a zbus connection from plain HTTP by its first request's head.
//! - [`codec`]: the HTTP-shaped zbus message, decoded and encoded without I/O.
//! - [`record`]: a zbus message as a qbus record and back; MQ descriptions as zbus's JSON.
//! - [`rpc_envelope`]: zbus's JSON RPC envelope as qbus's and back, where replies cross.
//! - [`session`]: one connection: requests answered out of order by `id`, waiting
//!   consumes, produces, MQ-RPC `route` through the broker's reply table.
//! - [`modes`]: what zbus keeps per MQ beyond qbus's MQ, its `mq_mode` ([`Zbus`]).

pub mod codec;
pub mod modes;
pub mod record;
pub mod rpc_envelope;
pub mod session;
pub mod sniff;

pub use modes::Zbus;
