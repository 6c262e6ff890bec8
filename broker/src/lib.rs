//! qbus broker: durable MQs with consumer groups, as a server (`qbus-broker`) or embedded.
//!
//! - `config`: settings from flags, environment and a TOML file.
//! - `server`: start-up, the accept loop and clean shutdown ([`run`]).
//! - `session`: one client connection's requests.
//! - `http/`: HTTP/1.1 on the same port: the messaging API, `/api/stats`, `/metrics`, the
//!   monitor page and the RPC gateway.
//! - `reporter`: reporting this broker's MQs to the trackers (`--tracker`).
//! - `rpc/`: MQ-RPC calls stored in MQs, and the reply table that routes replies back.
//! - `queue/`: the queue engine: the MQ table, one MQ, consumer groups and their ledger,
//!   the commit thread.
//! - `metrics/`: the counters behind stats and `/metrics`, and their per-second rates.
//! - `store/`: segment files, indexes, recovery, cursors, the store lock.
//! - `embedded`: the broker inside an application, no socket.

pub mod config;
pub mod core;
pub mod embedded;
pub mod error;
pub mod http;
pub mod metrics;
pub mod queue;
pub mod reporter;
pub mod rpc;
pub mod server;
pub mod session;
pub mod store;

pub use config::{Config, FsyncPolicy, Reporting, Settings};
pub use embedded::EmbeddedBroker;
pub use error::BrokerError;
pub use server::{bind, run, StartError};
