//! qbus broker: durable MQs with consumer groups, as a server (`qbus-broker`) or embedded.
//!
//! - [`config`]: settings from flags, environment and a TOML file.
//! - [`server`]: start-up, the accept loop and clean shutdown ([`run`]).
//! - [`session`]: one client connection's requests.
//! - [`http`]: HTTP/1.1 on the same port: the messaging API, `/api/stats`, `/metrics` and
//!   the monitor page; [`metrics`]: the counters behind them; [`rates`]: their recent
//!   per-second history.
//! - [`reporter`]: reporting this broker's MQs to the trackers (`--tracker`).
//! - [`rpc_route`]: MQ-RPC calls stored in MQs and their replies routed back to callers.
//! - [`registry`]: the MQs of a store directory; [`mq`]: one MQ's fetch/ack logic;
//!   [`consumer_group`]: a group's delivery bookkeeping.
//! - [`group_commit`]: the thread that writes and fsyncs for everyone at once.
//! - [`store`]: segment files, indexes, recovery, cursors, the store lock.
//! - [`embedded`]: the broker inside an application, no socket.

pub mod config;
pub mod consumer_group;
pub mod embedded;
pub mod error;
pub mod group_commit;
pub mod http;
pub mod metrics;
pub mod mq;
pub mod rates;
pub mod registry;
pub mod reporter;
pub mod rpc_route;
pub mod server;
pub mod session;
pub mod store;

pub use config::{Config, FsyncPolicy, Settings};
pub use embedded::EmbeddedBroker;
pub use error::BrokerError;
pub use server::{bind, run, StartError};
