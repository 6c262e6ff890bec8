//! Consuming messages: a `Stream` of deliveries fed by background long-poll fetch loops,
//! with batched acks.
//!
//! - this file: [`ConsumerBuilder`] (the options) and [`Consumer`] (the stream).
//! - `delivery`: a received [`Delivery`] and the acker that batches its acks and nacks.
//! - `fetcher`: the loop that long-polls one broker and feeds the stream, and [`StartAt`].

mod delivery;
mod fetcher;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::error::{ClientError, Result};
use crate::transport::Transport;

pub use delivery::Delivery;
pub use fetcher::StartAt;

use delivery::{Target, Verdict};
use fetcher::{spawn_fetcher, FetchSpec};

/// Options for a consumer; see [`Broker::consumer`](crate::Broker::consumer).
#[derive(Debug, Clone)]
pub struct ConsumerBuilder {
    transport: Transport,
    mq: String,
    group: Option<String>,
    tag: Option<String>,
    start: StartAt,
    batch: u32,
    long_poll: Duration,
    auto_ack: bool,
}

impl ConsumerBuilder {
    pub(crate) fn new(transport: Transport, mq: &str) -> ConsumerBuilder {
        ConsumerBuilder {
            transport,
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
        self.transport.query_mq(&self.mq).await?;
        let group = self.group.clone().unwrap_or_else(|| self.mq.clone());
        // Two fetches' worth per broker: one being handled, one arriving.
        let (tx, rx) = mpsc::channel(2);
        let spec = Arc::new(FetchSpec {
            target: Arc::new(Target {
                mq: self.mq.clone(),
                group: group.clone(),
            }),
            tag: self.tag,
            start: self.start,
            batch: self.batch,
            long_poll: self.long_poll,
            tolerate_missing: self.transport.is_cluster(),
        });
        self.transport
            .follow_holders(&self.mq, tx, move |connection, name, tx, stop| {
                spawn_fetcher(&spec, connection, name, tx, stop)
            });
        Ok(Consumer {
            rx,
            buffered: VecDeque::new(),
            auto_ack: self.auto_ack,
            held: None,
            mq: self.mq,
            group,
        })
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
    /// A fetch's deliveries travel together (one channel step per fetch, not per message).
    rx: mpsc::Receiver<Result<Vec<Delivery>>>,
    /// The rest of the last fetch received, handed out before anything else.
    buffered: VecDeque<Delivery>,
    /// Ack each delivery as it is handed out: not when it arrives, so that what a dropped
    /// consumer never saw goes back to the broker unacknowledged.
    auto_ack: bool,
    /// An error `recv_batch` met after deliveries: returned by the next receive, so that
    /// the deliveries before it are not dropped with it.
    held: Option<ClientError>,
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

    /// The next delivery; `None` after a fatal error has been returned. A
    /// [`ClientError::RecordsLost`] is a notice, not fatal: deliveries go on after it.
    pub async fn recv(&mut self) -> Option<Result<Delivery>> {
        std::future::poll_fn(|cx| self.poll_delivery(cx)).await
    }

    /// A delivery on its way to the user, acked first under [`ConsumerBuilder::auto_ack`].
    fn hand_out(&self, delivery: Delivery) -> Delivery {
        if self.auto_ack {
            delivery.acker.settle_later(&delivery, Verdict::Ack);
        }
        delivery
    }

    /// Whether deliveries already fetched wait to be taken (the next `next` will not wait
    /// for the network for them): a server answering a batch of calls flushes its replies
    /// once this turns false.
    pub fn has_buffered(&self) -> bool {
        !self.buffered.is_empty()
    }

    /// The next delivery: buffered first, then a held error, then the channel.
    fn poll_delivery(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Delivery>>> {
        loop {
            if let Some(delivery) = self.buffered.pop_front() {
                return Poll::Ready(Some(Ok(self.hand_out(delivery))));
            }
            if let Some(e) = self.held.take() {
                return Poll::Ready(Some(Err(e)));
            }
            match std::task::ready!(self.rx.poll_recv(cx)) {
                Some(Ok(deliveries)) => self.buffered = deliveries.into(),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => return Poll::Ready(None),
            }
        }
    }

    /// Waits for at least one delivery, then returns every one already received, up to `max`.
    /// An error after some deliveries ends the batch and comes with the next call.
    pub async fn recv_batch(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let max = max.max(1);
        while self.buffered.is_empty() {
            if let Some(e) = self.held.take() {
                return Err(e);
            }
            match std::future::poll_fn(|cx| self.rx.poll_recv(cx)).await {
                Some(Ok(deliveries)) => self.buffered = deliveries.into(),
                Some(Err(e)) => return Err(e),
                None => return Ok(Vec::new()),
            }
        }
        let mut batch: Vec<Delivery> = if self.buffered.len() <= max {
            // A whole fetch goes out as it came, not moved delivery by delivery.
            std::mem::take(&mut self.buffered).into()
        } else {
            self.buffered.drain(..max).collect()
        };
        while batch.len() < max && self.held.is_none() {
            match self.rx.try_recv() {
                Ok(Ok(deliveries)) => {
                    self.buffered = deliveries.into();
                    let take = (max - batch.len()).min(self.buffered.len());
                    batch.extend(self.buffered.drain(..take));
                }
                Ok(Err(e)) => self.held = Some(e),
                Err(_) => break,
            }
        }
        if self.auto_ack {
            for delivery in &batch {
                delivery.acker.settle_later(delivery, Verdict::Ack);
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
                Err(lost @ ClientError::RecordsLost { .. }) => {
                    tracing::warn!(error = %lost, "records lost on the broker's disk; going on after them");
                    return;
                }
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
        self.poll_delivery(cx)
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.rx.close();
        let mut unseen = std::mem::take(&mut self.buffered);
        while let Ok(received) = self.rx.try_recv() {
            unseen.extend(received.into_iter().flatten());
        }
        for delivery in unseen {
            delivery.acker.settle_later(&delivery, Verdict::Unseen);
        }
    }
}
