//! Producing messages: confirmed, pipelined, batched and one-way.

mod send_queue;

use std::sync::Arc;

use bytes::BytesMut;

use crate::error::Result;
use crate::message::Message;
use crate::protocol::{
    Command, Durability, Frame, Header, FLAG_ACK_LOCAL, FLAG_ACK_REPLICATED, FLAG_ONEWAY,
};
use crate::transport::Transport;
pub use send_queue::PendingReceipt;
use send_queue::SendQueue;

/// What the broker confirmed for a send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Offset of the (first) message in the MQ; for a repeated dedupe id, the offset the
    /// first send with it got.
    pub offset: u64,
    /// Messages stored by this send (repeats of a dedupe id are not).
    pub count: u32,
    /// How durable they were when confirmed.
    pub durability: Durability,
    /// When some messages repeated a dedupe id the broker had stored (and so were not
    /// stored again): the offset of each message of the send, in order. Empty otherwise.
    pub offsets: Vec<u64>,
}

impl Receipt {
    /// True when at least one message of the send repeated a dedupe id and was not stored
    /// again; [`Receipt::offsets`] says where each one is.
    pub fn duplicate(&self) -> bool {
        !self.offsets.is_empty()
    }
}

/// Sends messages to one MQ. Cheap to clone.
///
/// ```no_run
/// # async fn demo() -> Result<(), qbus_client::ClientError> {
/// let broker = qbus_client::Broker::connect("127.0.0.1:15555").await?;
/// let producer = broker.producer("orders");
/// let receipt = producer.send("order #1").await?;
/// println!("stored at offset {} ({})", receipt.offset, receipt.durability);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Producer {
    transport: Transport,
    mq: Arc<str>,
    /// `FLAG_ACK_*` bits of every produce.
    ack: u32,
    /// Confirmed sends not yet handed to the connection, shared by clones.
    queue: Arc<SendQueue>,
}

/// How far a produce must get before its receipt (protocol 3; see `docs/replication.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ack {
    /// What the MQ does: `replicated` for an MQ with `replicas` above 1, else the broker's
    /// fsync policy (`synced` or `written`). The default.
    #[default]
    MqDefault,
    /// This broker's disk only, even on an MQ with replicas.
    Local,
    /// Synced here and on the MQ's `min_replicas` followers, even on an MQ whose default is
    /// less (it then fails with `503` unless followers exist).
    Replicated,
}

impl Producer {
    pub(crate) fn new(transport: Transport, mq: &str) -> Producer {
        Producer {
            transport,
            mq: mq.into(),
            ack: 0,
            queue: Arc::new(SendQueue::new()),
        }
    }

    /// This producer with its sends acknowledged at `ack` (default [`Ack::MqDefault`]).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), qbus_client::ClientError> {
    /// use qbus_client::{Ack, Durability};
    /// let broker = qbus_client::Broker::connect("tracker://127.0.0.1:16666").await?;
    /// let producer = broker.producer("orders").with_ack(Ack::Replicated);
    /// let receipt = producer.send("order #1").await?;
    /// assert_eq!(receipt.durability, Durability::Replicated);
    /// # Ok(()) }
    /// ```
    pub fn with_ack(mut self, ack: Ack) -> Producer {
        self.ack = match ack {
            Ack::MqDefault => 0,
            Ack::Local => FLAG_ACK_LOCAL,
            Ack::Replicated => FLAG_ACK_REPLICATED,
        };
        // Sends at another level never share a frame with this producer's.
        self.queue = Arc::new(SendQueue::new());
        self
    }

    /// The MQ this producer sends to.
    pub fn mq(&self) -> &str {
        &self.mq
    }

    /// Sends one message and waits until the broker has stored it.
    pub async fn send(&self, message: impl Into<Message>) -> Result<Receipt> {
        self.send_async(message).await?.await
    }

    /// Queues one message and returns at once with a handle on its receipt, so many sends
    /// can be in flight. Messages queued from one task are stored in the order queued.
    ///
    /// Sends queued while earlier ones are still on their way out leave together in one
    /// produce request (nothing waits to fill it: a lone send leaves at once). A failure of
    /// that request is the failure of each of its sends, reported by their receipts; this
    /// call itself fails only for a message that cannot be encoded.
    pub async fn send_async(&self, message: impl Into<Message>) -> Result<PendingReceipt> {
        // Queued by reference: a message is encoded where it is, never moved again.
        let message = message.into();
        self.queue
            .push(&self.transport, &self.mq, self.ack, [&message])
            .await
    }

    /// Sends several messages in one request; they get consecutive offsets. Over an HA
    /// handle the whole batch goes to one broker, chosen by the first message's key.
    pub async fn send_batch(&self, messages: impl IntoIterator<Item = Message>) -> Result<Receipt> {
        self.send_batch_async(messages).await?.await
    }

    /// Queues a batch and returns a handle on its receipt.
    pub async fn send_batch_async(
        &self,
        messages: impl IntoIterator<Item = Message>,
    ) -> Result<PendingReceipt> {
        self.queue
            .push(&self.transport, &self.mq, self.ack, messages)
            .await
    }

    /// Sends one message with no confirmation: `Ok` means it was queued on a live
    /// connection, not that it was stored (at most once). It does not wait for confirmed
    /// sends queued before it.
    pub async fn send_oneway(&self, message: impl Into<Message>) -> Result<()> {
        let mut message = message.into();
        let key = if self.transport.is_cluster() {
            message.id.get_or_insert_with(rand::random);
            message.key.clone()
        } else {
            None
        };
        let mut body = BytesMut::with_capacity(message.encoded_len());
        message.encode(&mut body)?;
        let mut header = Header::request(Command::Produce, Some(&self.mq));
        header.count = Some(1);
        header.flags = FLAG_ONEWAY | self.ack;
        self.transport
            .send_oneway(
                &self.mq,
                key.as_deref(),
                Frame::with_body(header, body.freeze()),
            )
            .await
    }
}
