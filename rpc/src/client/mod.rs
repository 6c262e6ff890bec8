//! The calling half: what a caller holds and what carries its calls to a server.
//!
//! - [`rpc_client`]: [`RpcClient`](crate::RpcClient), typed and dynamic calls of one module
//!   over any invoker (the generated proxies wrap it).
//! - [`invoker`]: the [`Invoker`](crate::Invoker) trait, a [`Call`](crate::Call) out and its
//!   [`Reply`](crate::Reply) back.
//! - [`direct`]: [`DirectInvoker`](crate::DirectInvoker), straight to one
//!   [`RpcServer`](crate::RpcServer).
//! - [`mq`]: [`MqInvoker`](crate::MqInvoker), through a broker MQ.
//! - [`ha`]: [`HaInvoker`](crate::HaInvoker), among the servers registered at the trackers.

pub mod direct;
pub mod ha;
pub mod invoker;
pub mod mq;
pub mod rpc_client;
