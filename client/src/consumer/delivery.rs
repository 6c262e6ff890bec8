//! A received message and the acker that settles it: acks and nacks from every delivery of
//! a consumer, sent in batches, one acker per broker connection.

use std::future::{ready, Future};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::{BoxFuture, Either};
use tokio::sync::{mpsc, oneshot};

use crate::call::route_frame;
use crate::connection::{Connection, LinkId};
use crate::error::{ClientError, Result};
use crate::link::Burst;
use crate::protocol::{Command, DeliveryToken, Frame, Header, FLAG_ROUTE_ACK, FLAG_UNSEEN};

/// A received message. Call [`ack`](Delivery::ack) once it is handled, or it is delivered
/// again after the MQ's ack timeout.
#[derive(Debug)]
pub struct Delivery {
    /// Offset in the MQ.
    pub offset: u64,
    /// When the broker stored it, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Tag given by the producer.
    pub tag: Option<String>,
    /// Key given by the producer.
    pub key: Option<String>,
    /// Message id given by the producer (always set for sends through an HA handle): two
    /// deliveries with one id are the same message sent twice after a failover.
    pub id: Option<u128>,
    /// For a message sent with a delay: the offset at which the broker stored it when it
    /// was sent (this delivery is the copy the broker appended when it came due).
    pub delayed_from: Option<u64>,
    /// When it expires, ms since the Unix epoch, if it does.
    pub expires_at: Option<u64>,
    /// The payload.
    pub body: Bytes,
    /// 1 for the first delivery, more for redeliveries.
    pub attempt: u32,
    /// Shared by every delivery of one fetch loop (one count to bump per delivery).
    pub(super) acker: Arc<Acker>,
    /// The link it came over: the broker lets go of it when that link closes, so an ack
    /// is sent over that link or not at all.
    pub(super) link: LinkId,
}

impl Delivery {
    /// Names this delivery for ack and nack.
    pub fn token(&self) -> DeliveryToken {
        DeliveryToken {
            offset: self.offset,
            attempt: self.attempt,
        }
    }

    /// Acknowledges many deliveries with one request per broker they came from, and
    /// resolves once the brokers have recorded every ack. Cheaper than awaiting
    /// [`Delivery::ack`] for each when handling a batch from
    /// [`Consumer::recv_batch`](crate::Consumer::recv_batch).
    pub async fn ack_all(deliveries: &[Delivery]) -> Result<()> {
        let mut by_link: Vec<(&Acker, LinkId, Vec<DeliveryToken>)> = Vec::new();
        for delivery in deliveries {
            match by_link.iter_mut().find(|(acker, link, _)| {
                *link == delivery.link && std::ptr::eq(*acker, &*delivery.acker)
            }) {
                Some((_, _, tokens)) => tokens.push(delivery.token()),
                None => by_link.push((&delivery.acker, delivery.link, vec![delivery.token()])),
            }
        }
        let requests = by_link
            .into_iter()
            .map(|(acker, link, tokens)| acker.settle_now(link, tokens, Verdict::Ack));
        futures_util::future::try_join_all(requests).await.map(drop)
    }

    /// Acknowledges the message; resolves when the broker has recorded the ack.
    ///
    /// An error for which [`ClientError::is_transport`] holds is not fatal to the
    /// consumer (over HA it goes on with the other brokers); it means the connection the
    /// message came over failed (its broker died, hung or left the topology), and the
    /// message is delivered again, once its broker has noticed the connection close or
    /// restarted. If the connection had failed before the ack could be sent, the ack is
    /// not sent at all (the broker let go of the delivery with that connection), so the
    /// message surely comes again; if it failed after, the ack is in doubt: the broker may
    /// have recorded it, and then the message does not come again.
    pub async fn ack(&self) -> Result<()> {
        self.acker
            .settle(self.token(), self.link, Verdict::Ack)
            .await
    }

    /// Gives the message back for immediate redelivery.
    pub async fn nack(&self) -> Result<()> {
        self.acker
            .settle(self.token(), self.link, Verdict::Nack)
            .await
    }

    /// Answers the MQ-RPC call this delivery carries (its key is the caller's reply route):
    /// `body` is the response envelope, `encoding` its `encoding` header. The reply goes to
    /// the broker the call came from, which alone can route it to the caller; it is sent
    /// one-way, so `Ok` means it left, not that a caller still waited for it.
    pub async fn reply(&self, body: Bytes, encoding: Option<String>) -> Result<()> {
        let route = self.route()?;
        self.acker
            .connection
            .send_oneway(route_frame(route, body, encoding))
            .await
    }

    /// Answers the MQ-RPC call this delivery carries, as [`reply`](Delivery::reply) does,
    /// and acknowledges it. A broker of protocol 4 takes both in one frame (a `Route` with
    /// `FLAG_ROUTE_ACK`), one-way: `Ok` means the frame left over the link the call came
    /// over (the broker records the ack with the requests that arrived with it).
    /// An older broker gets the reply and then an ack, and `Ok` means it recorded the ack.
    /// Fails like [`ack`](Delivery::ack) when that link is gone: the call comes again.
    ///
    /// The frame is queued when this is called, if the link has room: the future (which
    /// does not borrow the delivery) then is ready at once, and a server answering many
    /// calls can poll it once instead of keeping it.
    pub fn reply_and_ack(
        &self,
        body: Bytes,
        encoding: Option<String>,
    ) -> impl Future<Output = Result<()>> + Unpin + Send + 'static {
        self.reply_and_ack_in(body, encoding, None)
    }

    /// [`reply_and_ack`](Delivery::reply_and_ack), with the frame fed to `burst` when given:
    /// it leaves at [`Burst::flush`] (or the burst's drop), together with the other replies
    /// of the burst, in one write from the caller's thread. For a server answering a batch
    /// of calls in one loop: it flushes once the batch is answered.
    pub fn reply_and_ack_in(
        &self,
        body: Bytes,
        encoding: Option<String>,
        burst: Option<&mut Burst>,
    ) -> impl Future<Output = Result<()>> + Unpin + Send + 'static {
        match self.start_reply_and_ack(body, encoding, burst) {
            Ok(None) => Either::Left(ready(Ok(()))),
            Ok(Some(rest)) => Either::Right(rest),
            Err(e) => Either::Left(ready(Err(e))),
        }
    }

    /// Queues the reply (with its ack) if it can be queued now; otherwise returns what is
    /// left to do.
    fn start_reply_and_ack(
        &self,
        body: Bytes,
        encoding: Option<String>,
        burst: Option<&mut Burst>,
    ) -> Result<Option<BoxFuture<'static, Result<()>>>> {
        let route = self.route()?;
        let connection = &self.acker.connection;
        let Some(protocol) = connection.link_protocol(self.link) else {
            // The broker let go of the call with the link; it comes again.
            return Err(ClientError::Disconnected {
                addr: connection.addr(),
            });
        };
        let mut frame = route_frame(route, body, encoding);
        let link = self.link;
        if protocol < 4 {
            let (acker, token) = (self.acker.clone(), self.token());
            return Ok(Some(Box::pin(async move {
                acker.connection.send_oneway(frame).await?;
                acker.settle(token, link, Verdict::Ack).await
            })));
        }
        let header = &mut frame.header;
        header.flags |= FLAG_ROUTE_ACK;
        header.mq = Some(self.acker.target.mq.clone());
        header.group = Some(self.acker.target.group.clone());
        header.tokens = vec![self.token()];
        match connection.try_send_oneway_on(link, frame, burst)? {
            None => Ok(None),
            Some(frame) => {
                let connection = connection.clone();
                Ok(Some(Box::pin(async move {
                    connection.send_oneway_on(link, frame).await
                })))
            }
        }
    }

    /// The reply route of the MQ-RPC call this delivery carries (its key).
    fn route(&self) -> Result<String> {
        self.key.clone().ok_or_else(|| {
            ClientError::Protocol(format!(
                "the record at offset {} is not an MQ-RPC call: it has no reply route as key",
                self.offset
            ))
        })
    }
}

/// The group of an MQ that a consumer reads for.
pub(super) struct Target {
    pub(super) mq: String,
    pub(super) group: String,
}

struct Settle {
    token: DeliveryToken,
    link: LinkId,
    verdict: Verdict,
    done: Option<oneshot::Sender<Result<()>>>,
}

/// What a consumer tells the broker of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Handled.
    Ack,
    /// Not handled: deliver it again (another attempt).
    Nack,
    /// Never handed to the application (the consumer stopped with it prefetched): deliver
    /// it again without counting an attempt against the MQ's delivery limit.
    Unseen,
}

impl Verdict {
    /// The request telling the broker this of `tokens`.
    fn request(self, target: &Target, tokens: Vec<DeliveryToken>) -> Frame {
        let cmd = match self {
            Verdict::Ack => Command::Ack,
            Verdict::Nack | Verdict::Unseen => Command::Nack,
        };
        let mut header = Header::request(cmd, Some(&target.mq));
        header.group = Some(target.group.clone());
        header.tokens = tokens;
        if self == Verdict::Unseen {
            header.flags |= FLAG_UNSEEN;
        }
        Frame::new(header)
    }
}

/// Collects acks and nacks from every delivery of a consumer and sends them in batches.
pub(super) struct Acker {
    tx: mpsc::Sender<Settle>,
    /// The connection the deliveries came over.
    connection: Connection,
    target: Arc<Target>,
}

impl std::fmt::Debug for Acker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Acker")
    }
}

const ACK_BATCH: usize = 4096;

impl Acker {
    pub(super) fn spawn(connection: Connection, target: Arc<Target>) -> Acker {
        let (tx, rx) = mpsc::channel(ACK_BATCH);
        tokio::spawn(Acker::run(connection.clone(), target.clone(), rx));
        Acker {
            tx,
            connection,
            target,
        }
    }

    /// Sends one request for `tokens` (delivered over `link`) and waits for the answer.
    async fn settle_now(
        &self,
        link: LinkId,
        tokens: Vec<DeliveryToken>,
        verdict: Verdict,
    ) -> Result<()> {
        let request = verdict.request(&self.target, tokens);
        self.connection
            .send_on(link, request)
            .await?
            .await
            .map(drop)
    }

    async fn settle(&self, token: DeliveryToken, link: LinkId, verdict: Verdict) -> Result<()> {
        let (done, wait) = oneshot::channel();
        let request = Settle {
            token,
            link,
            verdict,
            done: Some(done),
        };
        self.tx
            .send(request)
            .await
            .map_err(|_| ClientError::Closed)?;
        wait.await.map_err(|_| ClientError::Closed)?
    }

    /// Queues a settle without waiting for it (used on drop and for auto-ack).
    pub(super) fn settle_later(&self, delivery: &Delivery, verdict: Verdict) {
        let request = Settle {
            token: delivery.token(),
            link: delivery.link,
            verdict,
            done: None,
        };
        if self.tx.try_send(request).is_err() {
            tracing::debug!(
                token = ?delivery.token(),
                "ack queue full; the broker will redeliver after its timeout"
            );
        }
    }

    async fn run(connection: Connection, target: Arc<Target>, mut rx: mpsc::Receiver<Settle>) {
        let mut batch = Vec::with_capacity(ACK_BATCH);
        while rx.recv_many(&mut batch, ACK_BATCH).await > 0 {
            // One request per verdict and link; deliveries of one fetch share a link, so
            // this is one request per verdict but across a reconnect.
            while let Some((verdict, link)) = batch.first().map(|s| (s.verdict, s.link)) {
                let settles: Vec<Settle> = batch
                    .extract_if(.., |s| s.verdict == verdict && s.link == link)
                    .collect();
                let tokens = settles.iter().map(|s| s.token).collect();
                let sent = connection
                    .send_on(link, verdict.request(&target, tokens))
                    .await;
                let (connection, target) = (connection.clone(), target.clone());
                tokio::spawn(async move {
                    let outcome = match sent {
                        Ok(reply) => reply.await.map(drop),
                        Err(e) => Err(e),
                    };
                    if let Err(error) = &outcome {
                        // Said here too, for settles nobody awaits (auto-ack, drop).
                        tracing::warn!(mq = %target.mq, broker = %connection.addr(), ?verdict, count = settles.len(), %error, "settles not confirmed; the broker delivers those messages again");
                    }
                    for settle in settles {
                        if let Some(done) = settle.done {
                            let _ = done.send(outcome.clone());
                        }
                    }
                });
            }
        }
    }
}
