//! qbus tracker: keeps the live topology of a qbus cluster, which brokers exist, which MQs
//! each holds, and which DirectRPC servers offer which services, and tells subscribers
//! every change. Several trackers run side by side and share nothing; brokers report to
//! each, and clients merge what they say (see `qbus_client::ha`).
//!
//! - `config.rs`: settings from flags, environment and a TOML file.
//! - `server.rs`: start-up, the accept loop and shutdown ([`run`]).
//! - `table.rs`: the nodes, their leases, and numbered changes for subscribers.
//! - `session.rs`: one binary-protocol connection (report, subscribe, query).
//! - `http/`: HTTP on the same port: the monitor page, `GET /api/stats` (`stats.rs`),
//!   `GET /metrics` (`prometheus.rs`) and `GET /topology`.
//! - `metrics.rs`: counters of reports, pushes and requests since the start.
//!
//! The protocol (commands 40 to 43) is in `docs/protocol.md`, section "Tracker commands".

mod config;
mod http;
mod metrics;
mod server;
mod session;
mod table;

pub use config::{Config, Settings};
pub use qbus_server_kit::BindError;
pub use server::{bind, run};
