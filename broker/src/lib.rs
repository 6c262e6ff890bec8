//! qbus broker: durable MQs with consumer groups, as a server (`qbus-broker`) or embedded.
//!
//! What outside users need is at the crate root: [`Settings`] and [`Config`], [`run`] and
//! [`bind`] for a server, [`EmbeddedBroker`] for a broker inside an application, and the
//! errors. The rooms, from the doors down:
//!
//! - `server`: start-up, the background tasks, the accept loop and clean shutdown.
//! - `embedded`: the broker inside an application, no socket.
//! - `session`: one binary connection's requests.
//! - `http/`: HTTP/1.1 on the same port: the messaging API, `/api/stats`, `/metrics`, the
//!   monitor page and the RPC gateway.
//! - `zbus/`: the zbus 7.x protocol on the same port, for existing zbus clients
//!   (`docs/zbus.md`).
//! - `reporter`: reporting this broker's MQs to the trackers (`--tracker`).
//! - `replica/`: followers of other brokers' logs and the leader's side of its own
//!   (`docs/replication.md`).
//! - `core`: what every door shares: the MQ table, the commit thread, the reply table,
//!   counters, the change feed the reporter follows; the fetch loop and dead-lettering.
//! - `queue/`: the queue engine: the MQ table, one MQ, a live group and its pure ledger, the
//!   commit thread.
//! - `txn`: transactions (protocol 4): half messages, commit, roll back, timeouts.
//! - `rpc/`: MQ-RPC: `Call` and `Route` handling, and the reply table.
//! - `metrics/`: counters, the fsync histogram and per-second rates behind stats.
//! - `store/`: segment files, indexes, recovery, cursors, the store lock, and the file
//!   operations (with their fsyncs) behind one trait.
//! - `auth`: who a connection's peer is and what each binary request must be allowed
//!   (the model itself is `qbus_server_kit::auth`).
//! - `config`: settings from flags, environment and a TOML file; `error`: errors and their
//!   wire statuses.

mod auth;
mod config;
mod core;
mod embedded;
mod error;
mod http;
mod metrics;
mod queue;
mod replica;
mod reporter;
mod rpc;
mod server;
mod session;
mod store;
mod txn;
mod zbus;

pub use auth::Peer;
pub use config::{Config, ConfigError, FsyncPolicy, Reporting, Settings};
pub use embedded::EmbeddedBroker;
pub use error::BrokerError;
pub use qbus_server_kit::BindError;
pub use server::{bind, run, StartError};
pub use store::StoreError;
