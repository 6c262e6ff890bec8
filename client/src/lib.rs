//! qbus client: the SDK.
//!
//! - [`protocol`]: the wire protocol of `qbus-wire`, re-exported (frames, header, record
//!   format, status codes; no I/O), as are [`link`] (frames over TCP or in-process) and
//!   [`tls`] (the CA and client certificate of `tls://` and `tracker+tls://` addresses).
//! - [`connection`]: one multiplexed, self-reconnecting connection.
//! - [`Broker`] (`broker`): the handle users hold; admin calls and the factory for
//!   producers and consumers.
//! - `transport`: what a handle and everything made from it talk through, one broker or
//!   many; the only place that tells the kinds apart.
//! - [`Producer`] (`producer`): confirmed, pipelined, batched and one-way sends.
//! - [`Consumer`] (`consumer/`): the builder and the stream, each [`Delivery`] with its
//!   acker, and the fetch loop feeding them.
//! - [`Message`] (`message`): what a producer sends; [`ClientError`] (`error`).
//! - `call`: RPC calls to an MQ ([`Broker::send_call`]) or a DirectRPC server
//!   ([`Connection::send_call`]), their [`PendingCall`], and a responder's answer
//!   ([`Delivery::reply`]).
//! - [`topology`]: the merged cluster view an HA client works from.
//! - [`ha`]: the HA kind of `Broker` (`tracker://...`): cached topology, balancing, key
//!   affinity, failover.
//! - [`reporter`]: a node (broker or DirectRPC server) reporting its state to the trackers.
//!
//! ```no_run
//! # async fn demo() -> Result<(), qbus_client::ClientError> {
//! use futures_util::StreamExt;
//! use qbus_client::{Broker, MqOptions};
//!
//! let broker = Broker::connect("127.0.0.1:15555").await?;
//! broker.create_mq("greetings", MqOptions::default()).await?;
//! broker.producer("greetings").send("hello").await?;
//! let mut consumer = broker.consumer("greetings").subscribe().await?;
//! if let Some(delivery) = consumer.next().await {
//!     let delivery = delivery?;
//!     delivery.ack().await?;
//! }
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod broker;
mod call;
mod check_back;
pub mod connection;
mod consumer;
mod error;
pub mod ha;
mod message;
mod producer;
pub mod reporter;
pub mod topology;
mod transaction;
mod transport;

pub use qbus_wire::{link, protocol, tls};

pub use broker::Broker;
pub use call::{CallReply, PendingCall};
pub use check_back::{CheckAnswer, TransactionChecker};
pub use connection::{Connection, ConnectionOptions};
pub use consumer::{Consumer, ConsumerBuilder, Delivery, StartAt};
pub use error::{ClientError, Result};
pub use message::Message;
pub use producer::{Ack, PendingReceipt, Producer, Receipt};
pub use protocol::{
    CheckedMessage, Durability, MqInfo, MqOptions, Status, TxCheck, TxInfo, TxOptions, TxState,
};
pub use transaction::{BrokerTx, Decision, Transaction};
