//! qbus tracker: keeps the live topology of a qbus cluster, which brokers exist, which MQs
//! each holds, and which DirectRPC servers offer which services, and tells subscribers
//! every change. Several trackers run side by side and share nothing; brokers report to
//! each, and clients merge what they say (see `qbus_client::ha`).
//!
//! - [`config`]: settings from flags, environment and a TOML file.
//! - [`server`]: start-up, the accept loop and shutdown ([`run`]).
//! - [`table`]: the nodes, their leases, and numbered changes for subscribers.
//! - [`session`]: one binary-protocol connection (report, subscribe, query).
//! - [`http`]: HTTP on the same port: the monitor page, `GET /api/stats` ([`stats`]),
//!   `GET /metrics` ([`prometheus`]) and `GET /topology`.
//! - [`metrics`]: counters of reports, pushes and requests since the start.
//!
//! The protocol (commands 40 to 43) is in `docs/protocol.md`, section "Tracker commands".

pub mod config;
pub mod http;
pub mod metrics;
pub mod prometheus;
pub mod server;
pub mod session;
pub mod stats;
pub mod table;

pub use config::{Config, Settings};
pub use server::{bind, run, StartError};
