//! Consuming messages: a `Stream` of deliveries fed by a background long-poll fetch loop,
//! with batched acks.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use futures_util::StreamExt;
use rand::Rng;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, Kind};
use crate::connection::Connection;
use crate::error::{ClientError, Result};
use crate::protocol::record::records;
use crate::protocol::{
    Command, DeliveryToken, Frame, Header, Status, FLAG_START_AT_END, FLAG_START_AT_OFFSET,
    FLAG_UNSEEN,
};

/// Where a group that does not exist yet starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartAt {
    /// The oldest retained message (the default).
    #[default]
    Earliest,
    /// Only messages produced from now on.
    Latest,
    /// A given offset.
    Offset(u64),
}

/// Options for a consumer; see [`Broker::consumer`].
#[derive(Debug, Clone)]
pub struct ConsumerBuilder {
    broker: Broker,
    mq: String,
    group: Option<String>,
    tag: Option<String>,
    start: StartAt,
    batch: u32,
    long_poll: Duration,
    auto_ack: bool,
}

impl ConsumerBuilder {
    pub(crate) fn new(broker: Broker, mq: &str) -> ConsumerBuilder {
        ConsumerBuilder {
            broker,
            mq: mq.to_owned(),
            group: None,
            tag: None,
            start: StartAt::Earliest,
            batch: 256,
            long_poll: Duration::from_secs(2),
            auto_ack: false,
        }
    }

    /// The consumer group. Default: the MQ's name. Consumers in one group share the
    /// messages; every group sees every message.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Only deliver messages with this tag. Default: all.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = Some(tag.into());
        self
    }

    /// Where a new group starts. Default: [`StartAt::Earliest`]. Ignored for an existing group.
    pub fn start(mut self, start: StartAt) -> Self {
        self.start = start;
        self
    }

    /// Most messages per fetch. Default 256.
    pub fn batch(mut self, batch: u32) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// How long one fetch waits on the broker for a message. Default 2 s.
    pub fn long_poll(mut self, wait: Duration) -> Self {
        self.long_poll = wait;
        self
    }

    /// Acknowledge each message as it is handed out (at most once). Default off.
    pub fn auto_ack(mut self, on: bool) -> Self {
        self.auto_ack = on;
        self
    }

    /// Starts consuming. Fails if the MQ does not exist. Over an HA handle, consumes from
    /// every broker holding the MQ, following brokers as they join and leave.
    pub async fn subscribe(self) -> Result<Consumer> {
        self.broker.query_mq(&self.mq).await?;
        let group = self.group.clone().unwrap_or_else(|| self.mq.clone());
        let (tx, rx) = mpsc::channel(self.batch as usize * 2);
        let spec = Arc::new(FetchSpec {
            target: Arc::new(Target {
                mq: self.mq.clone(),
                group: group.clone(),
            }),
            tag: self.tag,
            start: self.start,
            batch: self.batch,
            long_poll: self.long_poll,
            auto_ack: self.auto_ack,
            tolerate_missing: matches!(self.broker.kind(), Kind::Ha(_)),
        });
        match self.broker.kind() {
            Kind::Single(connection) => {
                spawn_fetcher(&spec, connection.clone(), tx, CancellationToken::new());
            }
            Kind::Ha(ha) => crate::ha::consume::follow_holders(ha, spec, tx),
        }
        Ok(Consumer {
            rx,
            mq: self.mq,
            group,
        })
    }
}

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
    /// The payload.
    pub body: Bytes,
    /// 1 for the first delivery, more for redeliveries.
    pub attempt: u32,
    acker: Acker,
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
    /// [`Consumer::recv_batch`].
    pub async fn ack_all(deliveries: &[Delivery]) -> Result<()> {
        let mut by_broker: Vec<(&Acker, Vec<DeliveryToken>)> = Vec::new();
        for delivery in deliveries {
            match by_broker
                .iter_mut()
                .find(|(acker, _)| acker.tx.same_channel(&delivery.acker.tx))
            {
                Some((_, tokens)) => tokens.push(delivery.token()),
                None => by_broker.push((&delivery.acker, vec![delivery.token()])),
            }
        }
        let requests = by_broker
            .into_iter()
            .map(|(acker, tokens)| acker.settle_now(tokens, Verdict::Ack));
        futures_util::future::try_join_all(requests).await.map(drop)
    }

    /// Acknowledges the message; resolves when the broker has recorded the ack.
    pub async fn ack(&self) -> Result<()> {
        self.acker.settle(self.token(), Verdict::Ack).await
    }

    /// Gives the message back for immediate redelivery.
    pub async fn nack(&self) -> Result<()> {
        self.acker.settle(self.token(), Verdict::Nack).await
    }

    /// The connection to the broker this delivery came from: where an answer that must
    /// reach that very broker goes (an MQ-RPC reply is routed by the broker that stored
    /// the request).
    pub fn connection(&self) -> &Connection {
        &self.acker.connection
    }
}

/// A stream of [`Delivery`]s from one group of one MQ. Survives reconnects: the fetch loop
/// retries with backoff and the broker keeps the group's place. Dropping it stops fetching
/// and gives buffered, unhandled deliveries back to the broker.
///
/// ```no_run
/// # async fn demo() -> Result<(), qbus_client::ClientError> {
/// use futures_util::StreamExt;
/// let broker = qbus_client::Broker::connect("127.0.0.1:15555").await?;
/// let mut consumer = broker.consumer("orders").group("billing").subscribe().await?;
/// while let Some(delivery) = consumer.next().await {
///     let delivery = delivery?;
///     println!("{}", String::from_utf8_lossy(&delivery.body));
///     delivery.ack().await?;
/// }
/// # Ok(()) }
/// ```
pub struct Consumer {
    rx: mpsc::Receiver<Result<Delivery>>,
    mq: String,
    group: String,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("mq", &self.mq)
            .field("group", &self.group)
            .finish()
    }
}

impl Consumer {
    /// The MQ consumed.
    pub fn mq(&self) -> &str {
        &self.mq
    }

    /// The group consumed for.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The next delivery; `None` after a fatal error has been returned.
    pub async fn recv(&mut self) -> Option<Result<Delivery>> {
        self.rx.recv().await
    }

    /// Waits for at least one delivery, then returns every one already received, up to `max`.
    pub async fn recv_batch(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let mut batch = Vec::new();
        let Some(first) = self.rx.recv().await else {
            return Ok(batch);
        };
        batch.push(first?);
        while batch.len() < max {
            match self.rx.try_recv() {
                Ok(delivery) => batch.push(delivery?),
                Err(_) => break,
            }
        }
        Ok(batch)
    }

    /// Runs `handler` on every delivery with at most `concurrency` running at once; acks
    /// each message whose handler returns `Ok` and nacks the others. Returns on the first
    /// fatal consumer error.
    pub async fn process<F, Fut, E>(self, concurrency: usize, handler: F) -> Result<()>
    where
        F: Fn(&Delivery) -> Fut,
        Fut: Future<Output = std::result::Result<(), E>>,
        E: std::fmt::Display,
    {
        let handler = &handler;
        let outcome = std::sync::Mutex::new(Ok(()));
        let outcome_ref = &outcome;
        self.for_each_concurrent(concurrency.max(1), |delivery| async move {
            let delivery = match delivery {
                Ok(delivery) => delivery,
                Err(e) => {
                    *outcome_ref.lock().expect("outcome poisoned") = Err(e);
                    return;
                }
            };
            let settled = match handler(&delivery).await {
                Ok(()) => delivery.ack().await,
                Err(e) => {
                    tracing::warn!(offset = delivery.offset, error = %e, "handler failed, nacking");
                    delivery.nack().await
                }
            };
            if let Err(e) = settled {
                tracing::warn!(offset = delivery.offset, error = %e, "settling failed; the broker will redeliver");
            }
        })
        .await;
        outcome.into_inner().expect("outcome poisoned")
    }
}

impl Stream for Consumer {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.rx.close();
        while let Ok(Ok(delivery)) = self.rx.try_recv() {
            delivery
                .acker
                .settle_later(delivery.token(), Verdict::Unseen);
        }
    }
}

struct Target {
    mq: String,
    group: String,
}

struct Settle {
    token: DeliveryToken,
    verdict: Verdict,
    done: Option<oneshot::Sender<Result<()>>>,
}

/// What a consumer tells the broker of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Handled.
    Ack,
    /// Not handled: deliver it again (another attempt).
    Nack,
    /// Never handed to the application (the consumer stopped with it prefetched): deliver
    /// it again without counting an attempt against the MQ's delivery limit.
    Unseen,
}

impl Verdict {
    const ALL: [Verdict; 3] = [Verdict::Ack, Verdict::Nack, Verdict::Unseen];

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
#[derive(Clone)]
struct Acker {
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
    fn spawn(connection: Connection, target: Arc<Target>) -> Acker {
        let (tx, rx) = mpsc::channel(ACK_BATCH);
        tokio::spawn(Acker::run(connection.clone(), target.clone(), rx));
        Acker {
            tx,
            connection,
            target,
        }
    }

    /// Sends one request for `tokens` and waits for the broker's answer.
    async fn settle_now(&self, tokens: Vec<DeliveryToken>, verdict: Verdict) -> Result<()> {
        let request = verdict.request(&self.target, tokens);
        self.connection.send(request).await?.await.map(drop)
    }

    async fn settle(&self, token: DeliveryToken, verdict: Verdict) -> Result<()> {
        let (done, wait) = oneshot::channel();
        let request = Settle {
            token,
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
    fn settle_later(&self, token: DeliveryToken, verdict: Verdict) {
        let request = Settle {
            token,
            verdict,
            done: None,
        };
        if self.tx.try_send(request).is_err() {
            tracing::debug!(
                ?token,
                "ack queue full; the broker will redeliver after its timeout"
            );
        }
    }

    async fn run(connection: Connection, target: Arc<Target>, mut rx: mpsc::Receiver<Settle>) {
        let mut batch = Vec::with_capacity(ACK_BATCH);
        while rx.recv_many(&mut batch, ACK_BATCH).await > 0 {
            for verdict in Verdict::ALL {
                let settles: Vec<Settle> = batch
                    .extract_if(.., |settle| settle.verdict == verdict)
                    .collect();
                if settles.is_empty() {
                    continue;
                }
                let tokens = settles.iter().map(|s| s.token).collect();
                let sent = connection.send(verdict.request(&target, tokens)).await;
                tokio::spawn(async move {
                    let outcome = match sent {
                        Ok(reply) => reply.await.map(drop),
                        Err(e) => Err(e),
                    };
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

/// What every fetch loop of one consumer shares.
pub(crate) struct FetchSpec {
    target: Arc<Target>,
    tag: Option<String>,
    start: StartAt,
    batch: u32,
    long_poll: Duration,
    auto_ack: bool,
    /// Over an HA handle one broker lacking the MQ does not end the stream: the topology
    /// may be a report behind, so that fetch loop retries with backoff.
    tolerate_missing: bool,
}

impl FetchSpec {
    /// The MQ consumed.
    pub(crate) fn mq(&self) -> &str {
        &self.target.mq
    }
}

/// Starts a fetch loop on `connection` (with its own acker) that feeds `tx` until the
/// consumer is dropped or `stop` fires.
pub(crate) fn spawn_fetcher(
    spec: &Arc<FetchSpec>,
    connection: Connection,
    tx: mpsc::Sender<Result<Delivery>>,
    stop: CancellationToken,
) {
    let acker = Acker::spawn(connection.clone(), spec.target.clone());
    let fetcher = Fetcher {
        spec: spec.clone(),
        connection,
        acker,
        tx,
        stop,
    };
    tokio::spawn(fetcher.run());
}

/// The background loop that long-polls one broker and feeds the consumer's channel.
struct Fetcher {
    spec: Arc<FetchSpec>,
    connection: Connection,
    acker: Acker,
    tx: mpsc::Sender<Result<Delivery>>,
    stop: CancellationToken,
}

impl Fetcher {
    async fn run(self) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let fetch = self
                .connection
                .request_with_wait(self.request(), self.spec.long_poll);
            tokio::pin!(fetch);
            let reply = tokio::select! {
                reply = &mut fetch => reply,
                _ = self.tx.closed() => return self.give_back(fetch).await,
                _ = self.stop.cancelled() => return self.give_back(fetch).await,
            };
            match reply.and_then(|frame| self.deliveries(frame)) {
                Ok(deliveries) => {
                    backoff = Duration::from_millis(50);
                    let mut deliveries = deliveries.into_iter();
                    while let Some(delivery) = deliveries.next() {
                        if self.spec.auto_ack {
                            self.acker.settle_later(delivery.token(), Verdict::Ack);
                        }
                        if let Err(mpsc::error::SendError(Ok(unhandled))) =
                            self.tx.send(Ok(delivery)).await
                        {
                            // The consumer is gone: give back what it will never see.
                            for delivery in std::iter::once(unhandled).chain(deliveries) {
                                self.acker.settle_later(delivery.token(), Verdict::Unseen);
                            }
                            return;
                        }
                    }
                }
                Err(e)
                    if e.is_transport()
                        || (self.spec.tolerate_missing && e.status() == Some(Status::NotFound)) =>
                {
                    let wait = backoff.mul_f64(rand::thread_rng().gen_range(0.5..1.5));
                    tracing::warn!(mq = %self.spec.target.mq, broker = %self.connection.addr(), error = %e, retry_in = ?wait, "fetch failed");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.tx.closed() => return,
                        _ = self.stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    let _ = self.tx.send(Err(e)).await;
                    return;
                }
            }
        }
    }

    /// Waits out the fetch still on the broker when the consumer stops and gives back what
    /// it brings. Abandoned, its deliveries would stay held by this connection until their
    /// ack timeout, and the broker would go on counting the connection as a consumer.
    async fn give_back(&self, fetch: impl Future<Output = Result<Frame>>) {
        let Ok(deliveries) = fetch.await.and_then(|frame| self.deliveries(frame)) else {
            return;
        };
        for delivery in deliveries {
            self.acker.settle_later(delivery.token(), Verdict::Unseen);
        }
    }

    fn request(&self) -> Frame {
        let spec = &self.spec;
        let mut header = Header::request(Command::Fetch, Some(&spec.target.mq));
        header.group = Some(spec.target.group.clone());
        header.tag = spec.tag.clone();
        header.count = Some(spec.batch);
        header.timeout_ms = Some(spec.long_poll.as_millis().min(u32::MAX as u128) as u32);
        match spec.start {
            StartAt::Earliest => {}
            StartAt::Latest => header.flags |= FLAG_START_AT_END,
            StartAt::Offset(offset) => {
                header.flags |= FLAG_START_AT_OFFSET;
                header.offset = Some(offset);
            }
        }
        Frame::new(header)
    }

    fn deliveries(&self, frame: Frame) -> Result<Vec<Delivery>> {
        let body = frame.body;
        let attempts = frame.header.attempts;
        let mut out = Vec::with_capacity(attempts.len());
        for (i, record) in records(&body).enumerate() {
            let record = record?;
            out.push(Delivery {
                offset: record.offset,
                timestamp_ms: record.timestamp_ms,
                tag: record.tag.map(str::to_owned),
                key: record.key.map(str::to_owned),
                id: record.id,
                body: body.slice(record.body_range.clone()),
                attempt: attempts.get(i).copied().unwrap_or(1),
                acker: self.acker.clone(),
            });
        }
        Ok(out)
    }
}
