//! Transactions (protocol 4): messages to one or several MQs of one broker that become
//! visible together at the commit, or never.

use bytes::BytesMut;

use crate::connection::Connection;
use crate::error::{decode_reply, ClientError, Result};
use crate::ha::txn_pin::Pin;
use crate::message::Message;
use crate::protocol::{Command, Frame, Header, TxInfo, TxOptions, FLAG_TX_ALREADY};

/// An open transaction on one broker. Its messages are stored durably as they are sent
/// and delivered to no consumer until [`commit`](Transaction::commit); a
/// [`rollback`](Transaction::rollback) discards them. One left undecided is resolved by
/// the broker after its timeout and checks (rolled back unless
/// [`TxOptions::commit_unresolved`] says otherwise).
///
/// ```no_run
/// # async fn demo() -> Result<(), qbus_client::ClientError> {
/// let broker = qbus_client::Broker::connect("127.0.0.1:15555").await?;
/// let tx = broker.begin(Default::default()).await?;
/// tx.send("orders", "order #1").await?;
/// tx.send("audit", "order #1 placed").await?;
/// // ... the local database work ...
/// tx.commit().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Transaction {
    connection: Connection,
    id: u64,
    /// Over `tracker://`: the broker it is pinned to.
    pin: Option<Pin>,
}

/// What a commit or rollback found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Decided by this request.
    Taken,
    /// The transaction had been so decided already (a retry, or the broker's policy).
    Already,
}

impl Transaction {
    /// Opens a transaction on the broker behind `connection` (`pin`: over `tracker://`,
    /// that broker's pin).
    pub(crate) async fn begin(
        connection: Connection,
        pin: Option<Pin>,
        options: &TxOptions,
    ) -> Result<Transaction> {
        let body = rmp_serde::to_vec_named(options)
            .map_err(|e| ClientError::Protocol(format!("encoding transaction options: {e}")))?;
        let request = Frame::with_body(Header::request(Command::TxBegin, None), body.into());
        let mut tx = Transaction {
            connection,
            id: 0,
            pin,
        };
        let reply = tx.request(request).await?;
        tx.id = reply
            .header
            .offset
            .ok_or_else(|| ClientError::Protocol("transaction begin reply without an id".into()))?;
        Ok(tx)
    }

    /// A handle on transaction `id` of the broker behind `connection` (to decide one
    /// another process began; `pin`: over `tracker://`, that broker's pin).
    pub(crate) fn attach(connection: Connection, id: u64, pin: Option<Pin>) -> Transaction {
        Transaction {
            connection,
            id,
            pin,
        }
    }

    /// Its id, unique on its broker.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The address of the broker it is on: over `tracker://`, the one it is pinned to
    /// (a checker for its producer group must be registered there).
    pub fn broker(&self) -> String {
        match &self.pin {
            Some(pin) => pin.addr().to_owned(),
            None => self.connection.addr(),
        }
    }

    /// Sends one request of this transaction to its broker.
    async fn request(&self, frame: Frame) -> Result<Frame> {
        match &self.pin {
            Some(pin) => pin.request(&self.connection, self.id, frame).await,
            None => self.connection.request(frame).await,
        }
    }

    /// Adds a message for `mq` (which must exist), stored durably before this returns.
    ///
    /// Sends may be in flight together (`&self`: join them), and the broker then syncs them
    /// together; their order in the MQ is then the order they reach the broker in, so send
    /// one after the other (or use [`send_batch`](Transaction::send_batch)) where it matters.
    pub async fn send(&self, mq: &str, message: impl Into<Message>) -> Result<()> {
        self.send_batch(mq, std::iter::once(message.into())).await
    }

    /// Adds several messages for `mq` in one request.
    pub async fn send_batch(
        &self,
        mq: &str,
        messages: impl IntoIterator<Item = Message>,
    ) -> Result<()> {
        let mut body = BytesMut::new();
        let mut count = 0u32;
        for message in messages {
            body.reserve(message.encoded_len());
            message.encode(&mut body)?;
            count += 1;
        }
        let mut header = Header::request(Command::TxProduce, Some(mq));
        header.offset = Some(self.id);
        header.count = Some(count);
        self.request(Frame::with_body(header, body.freeze()))
            .await?;
        Ok(())
    }

    /// Commits: every message becomes visible, each MQ's all at once. Sending it again is
    /// harmless; after a rollback it fails with `409`.
    pub async fn commit(&self) -> Result<Decision> {
        self.decide(Command::TxCommit).await
    }

    /// Rolls back: the messages are discarded. Sending it again is harmless; after a
    /// commit it fails with `409`.
    pub async fn rollback(&self) -> Result<Decision> {
        self.decide(Command::TxRollback).await
    }

    /// Where it stands on the broker.
    pub async fn info(&self) -> Result<TxInfo> {
        let reply = self.request(list_frame(Some(self.id))).await?;
        let mut list: Vec<TxInfo> = decode_reply(&reply.body)?;
        list.pop()
            .ok_or_else(|| ClientError::Protocol("empty transaction listing".into()))
    }

    async fn decide(&self, cmd: Command) -> Result<Decision> {
        let mut header = Header::request(cmd, None);
        header.offset = Some(self.id);
        let reply = self.request(Frame::new(header)).await?;
        Ok(if reply.header.has_flag(FLAG_TX_ALREADY) {
            Decision::Already
        } else {
            Decision::Taken
        })
    }
}

/// The request for the broker's open transactions (`only`: just that one, in any state it
/// is known in).
fn list_frame(only: Option<u64>) -> Frame {
    let mut header = Header::request(Command::TxList, None);
    header.offset = only;
    Frame::new(header)
}

/// One row of [`Broker::transactions`](crate::Broker::transactions): a transaction and
/// the broker it is on (ids are unique per broker only; decide it with
/// [`Broker::transaction_on`](crate::Broker::transaction_on) and this address).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BrokerTx {
    /// The address of its broker.
    pub broker: String,
    /// The transaction.
    #[serde(flatten)]
    pub txn: TxInfo,
}

/// The open transactions of the broker behind `connection`, whose address is `broker`.
pub(crate) async fn list(connection: &Connection, broker: &str) -> Result<Vec<BrokerTx>> {
    let list: Vec<TxInfo> = decode_reply(&connection.request(list_frame(None)).await?.body)?;
    Ok(list
        .into_iter()
        .map(|txn| BrokerTx {
            broker: broker.to_owned(),
            txn,
        })
        .collect())
}
