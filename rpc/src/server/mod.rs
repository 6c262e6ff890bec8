//! The serving half: what runs calls and what brings them to it.
//!
//! - [`processor`]: [`RpcProcessor`](crate::RpcProcessor), module + method → handler,
//!   deadlines enforced; both doors below hand it their calls.
//! - [`direct`]: [`RpcServer`](crate::RpcServer), DirectRPC on its own port.
//! - `session`: one connection to an `RpcServer`.
//! - `registration`: an `RpcServer` reporting its modules to the trackers.
//! - [`mq`]: [`MqRpcService`](crate::MqRpcService), serving the calls of an MQ.

pub mod direct;
pub mod mq;
pub mod processor;
mod registration;
mod session;
