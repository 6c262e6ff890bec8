//! What the qbus servers (`qbus-broker`, `qbus-tracker`) share, so each is written once:
//!
//! - [`auth`]: users, permissions and the anonymous policy every door checks.
//! - [`launch`]: a server binary's `main`: logging, settings layered over a TOML file, the
//!   runtime, and exit codes.
//! - [`signals`]: SIGINT and SIGTERM as a shutdown token.
//! - [`config`]: [`ConfigError`] naming the bad key, and reading a TOML settings file.
//! - [`units`]: durations (`30s`) and sizes (`64MiB`) in settings.
//! - [`listen`]: binding the listen address, [`BindError`] saying what to do when it fails.
//! - [`sniff`]: HTTP or the binary protocol, decided by a connection's first byte, and
//!   [`Rewind`](sniff::Rewind) to replay bytes read to decide.
//! - [`tls`]: the TLS settings (certificate, key, client CA, tracker CA) checked into
//!   rustls configs.
//! - [`http`]: serving one HTTP/1.1 connection until shutdown, and building replies.
//! - [`prometheus`]: writing the Prometheus text exposition format.
//! - [`page`]: the look and script helpers the monitor pages share.
//!
//! The wire-level parts servers share (the accept loop, the frame read loop) are in
//! `qbus_wire::serve`, since the RPC server uses them too.

pub mod auth;
pub mod config;
pub mod http;
pub mod launch;
pub mod listen;
pub mod page;
pub mod prometheus;
pub mod signals;
pub mod sniff;
pub mod tls;
pub mod units;

pub use config::ConfigError;
pub use listen::BindError;
