//! MQ-RPC on the broker: calls stored in MQs, replies routed straight back to their callers.
//!
//! - [`call`]: the `Call`, `Route` and `QueryRoutes` commands, and one call made from
//!   inside the broker (the HTTP gateway).
//! - [`reply_table`]: the callers awaiting a reply, their deadlines and reply routes.

pub mod call;
pub mod reply_table;
