//! qbus wire: what every qbus peer shares (clients, brokers, trackers, RPC servers), and no
//! SDK. The protocol is specified in `docs/protocol.md`.
//!
//! - [`protocol`]: frames, header, record format, status codes, admin and RPC bodies (no I/O).
//! - [`link`]: moving frames over TCP or inside one process.
//! - [`serve`]: the serving side of links: accept loop, frame read loop with an idle limit,
//!   the `Hello` reply.
//! - [`tls`]: TLS on links, server and client side, with rustls.
//! - [`topology`]: what nodes report to trackers and trackers push to subscribers.
//! - [`Backoff`]: the jittered exponential backoff every reconnect and retry uses.
//! - [`now_ms`]: wall-clock milliseconds, as records and reports carry them.
//!
//! ```
//! use bytes::BytesMut;
//! use qbus_wire::protocol::{decode, encode, Command, Frame, Header, DEFAULT_MAX_FRAME};
//!
//! let frame = Frame::new(Header::request(Command::Heartbeat, None));
//! let mut buf = BytesMut::new();
//! encode(&frame, &mut buf).unwrap();
//! assert_eq!(decode(&buf, DEFAULT_MAX_FRAME).unwrap(), (frame, buf.len()));
//! ```

#![warn(missing_docs)]

mod backoff;
mod clock;
pub mod link;
pub mod protocol;
pub mod serve;
pub mod tls;
pub mod topology;

pub use backoff::Backoff;
pub use clock::now_ms;
