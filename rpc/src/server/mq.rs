//! MQ-RPC, the server side: an [`MqRpcService`] consumes calls from an MQ, runs them on an
//! [`RpcProcessor`] with a limit on how many run at once, and sends each reply back to the
//! broker that stored the call, which routes it to the caller.

use std::future::Future;
use std::time::Duration;

use futures_util::future::Either;
use futures_util::stream::FuturesUnordered;
use futures_util::FutureExt;
use futures_util::StreamExt;
use qbus_client::{Broker, ClientError, Consumer, Delivery, StartAt};
use qbus_wire::link::Burst;
use qbus_wire::now_ms;
use qbus_wire::protocol::MqOptions;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::client::invoker::Reply;
use crate::error::RpcError;
use crate::server::processor::{RpcProcessor, Started, SHUTDOWN_GRACE};

/// Settings of an [`MqRpcService`]. Build with the `with_*` methods.
#[derive(Debug, Clone)]
pub struct MqServiceOptions {
    /// The consumer group. Default: the MQ's name, so every instance of the service shares
    /// the calls.
    pub group: Option<String>,
    /// Calls run at once; the rest wait in the MQ. Default 64.
    pub concurrency: usize,
    /// Create the MQ when it does not exist. Default true. A created MQ acknowledges calls
    /// once written, without waiting for the broker's fsync: a call is worth less than the
    /// fsync's latency, and a caller whose broker crashes gets an error either way.
    pub create_mq: bool,
    /// How long `start` waits for the broker to count the service as a consumer (until it
    /// does, callers get "no responders"). Default 5 s.
    pub ready_timeout: Duration,
}

impl Default for MqServiceOptions {
    fn default() -> Self {
        MqServiceOptions {
            group: None,
            concurrency: 64,
            create_mq: true,
            ready_timeout: Duration::from_secs(5),
        }
    }
}

impl MqServiceOptions {
    /// Sets [`concurrency`](MqServiceOptions::concurrency) (at least 1).
    pub fn with_concurrency(mut self, calls: usize) -> Self {
        self.concurrency = calls.max(1);
        self
    }

    /// Sets [`group`](MqServiceOptions::group).
    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }
}

/// Serves an [`RpcProcessor`] to the callers of an MQ until shut down.
///
/// A call is acknowledged once its reply is sent, so a call taken by an instance that dies
/// goes to another instance (if its deadline allows). Calls whose deadline passed while
/// they waited in the MQ are skipped: their callers were already told.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use qbus_rpc::{MqRpcService, RpcProcessor};
/// let mut processor = RpcProcessor::new();
/// processor
///     .module("Greeter")
///     .method("hello", |(name,): (String,)| async move { format!("Hello, {name}!") });
/// let broker = qbus_client::Broker::connect("127.0.0.1:15555").await?;
/// let service = MqRpcService::start(&broker, "greeter-rpc", processor).await?;
/// // ... later
/// service.shutdown().await;
/// # Ok(()) }
/// ```
pub struct MqRpcService {
    mq: String,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for MqRpcService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqRpcService")
            .field("mq", &self.mq)
            .finish()
    }
}

impl MqRpcService {
    /// Starts serving the calls sent to `mq` with default options.
    pub async fn start(
        broker: &Broker,
        mq: &str,
        processor: RpcProcessor,
    ) -> Result<MqRpcService, RpcError> {
        MqRpcService::start_with(broker, mq, processor, MqServiceOptions::default()).await
    }

    /// Starts serving with `options`; returns once the broker counts the service as a
    /// consumer of `mq`, so calls made afterwards find it.
    pub async fn start_with(
        broker: &Broker,
        mq: &str,
        processor: RpcProcessor,
        options: MqServiceOptions,
    ) -> Result<MqRpcService, RpcError> {
        let failed = |e: ClientError| RpcError::from_client(e, mq);
        if options.create_mq {
            let options = MqOptions {
                sync: Some(false),
                ..MqOptions::default()
            };
            broker.create_mq(mq, options).await.map_err(failed)?;
        }
        let group = options.group.clone().unwrap_or_else(|| mq.to_owned());
        let concurrency = options.concurrency.max(1);
        let consumer = broker
            .consumer(mq)
            .group(group.clone())
            .start(StartAt::Latest)
            .batch(u32::try_from(concurrency.min(1024)).unwrap_or(1024))
            .subscribe()
            .await
            .map_err(failed)?;
        wait_until_consuming(broker, mq, &group, options.ready_timeout).await?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(consumer, processor, concurrency, stop.clone()));
        tracing::info!(%mq, %group, concurrency, "MQ-RPC service started");
        Ok(MqRpcService {
            mq: mq.to_owned(),
            stop,
            task,
        })
    }

    /// The MQ served.
    pub fn mq(&self) -> &str {
        &self.mq
    }

    /// Stops taking calls, lets the running ones finish (within 5 s) and gives the calls
    /// fetched but not started back to the MQ.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for MqRpcService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until the broker counts a consumer in `group`: the consumer's first fetch is on
/// its way when `subscribe` returns, and until it lands callers would hear "no responders".
async fn wait_until_consuming(
    broker: &Broker,
    mq: &str,
    group: &str,
    limit: Duration,
) -> Result<(), RpcError> {
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        let info = broker
            .query_mq(mq)
            .await
            .map_err(|e| RpcError::from_client(e, mq))?;
        if info
            .groups
            .iter()
            .any(|g| g.name == group && g.consumers > 0)
        {
            return Ok(());
        }
        if started.elapsed() >= limit {
            return Err(RpcError::NoResponders {
                target: format!("MQ {mq:?}"),
                reason: format!(
                    "the broker did not count this service as a consumer of group {group:?} \
                     within {limit:?}"
                ),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Takes calls off the consumer, at most `concurrency` running at once. A call whose
/// handler finishes without waiting is answered in place; one that waits gets a task.
async fn serve(
    mut consumer: Consumer,
    processor: RpcProcessor,
    concurrency: usize,
    stop: CancellationToken,
) {
    let mut running = JoinSet::new();
    let mut acks = FuturesUnordered::new();
    // Replies to the calls of one fetched batch, written together once it is answered.
    let mut burst = Burst::default();
    loop {
        if !consumer.has_buffered() {
            burst.flush();
        }
        let delivery = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            Some(()) = acks.next(), if !acks.is_empty() => continue,
            Some(_) = running.join_next(), if !running.is_empty() => continue,
            delivery = consumer.next(), if running.len() < concurrency => delivery,
        };
        let delivery = match delivery {
            Some(Ok(delivery)) => delivery,
            // Calls damaged on the broker's disk are gone; their callers time out.
            Some(Err(lost @ ClientError::RecordsLost { .. })) => {
                tracing::warn!(error = %lost, "MQ-RPC calls lost");
                continue;
            }
            Some(Err(e)) => {
                tracing::error!(mq = consumer.mq(), error = %e, "MQ-RPC service stopped: cannot consume");
                break;
            }
            None => break,
        };
        if delivery.key.is_none() {
            tracing::warn!(
                offset = delivery.offset,
                "not an MQ-RPC call (its record has no reply route as key); skipped"
            );
            acks.push(Either::Left(ack(delivery)));
            continue;
        }
        let waited = Duration::from_millis(now_ms().saturating_sub(delivery.timestamp_ms));
        match processor.start(delivery.tag.as_deref(), delivery.body.clone(), waited) {
            Started::Done(reply) => {
                // Queued at once when the link has room: nothing to keep for most calls.
                let mut sent = reply_and_ack(&delivery, reply, Some(&mut burst));
                if (&mut sent).now_or_never().is_none() {
                    acks.push(Either::Right(sent));
                }
            }
            Started::Expired => acks.push(Either::Left(ack(delivery))),
            Started::Running(call) => {
                running.spawn(async move {
                    let reply = call.finish().await;
                    reply_and_ack(&delivery, reply, None).await;
                });
            }
        }
    }
    // Calls fetched but not started go back to the MQ for another instance.
    drop(consumer);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while acks.next().await.is_some() {}
        while running.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "stopping MQ-RPC calls still running at shutdown");
    }
}

/// Sends a reply back through the broker the call came from, which routes it to the
/// caller, and acknowledges the call (one frame to a protocol 4 broker): until then a
/// service that dies leaves it to another. Queued before this returns when the link has
/// room (fed to `burst` when given, to leave at its flush); the future only waits for room
/// (or, to an older broker, for the ack).
fn reply_and_ack(
    delivery: &Delivery,
    reply: Reply,
    burst: Option<&mut Burst>,
) -> impl Future<Output = ()> + Unpin {
    let offset = delivery.offset;
    delivery
        .reply_and_ack_in(reply.body, reply.encoding.header_value(), burst)
        .map(move |sent| {
            if let Err(e) = sent {
                tracing::debug!(offset, error = %e, "reply or ack lost with its broker connection; the broker will redeliver the call");
            }
        })
}

/// Acknowledges a call skipped without a reply.
async fn ack(delivery: Delivery) {
    if let Err(e) = delivery.ack().await {
        tracing::debug!(offset = delivery.offset, error = %e, "ack failed; the broker will redeliver the call");
    }
}
