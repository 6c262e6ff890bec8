//! The fetch loop: long-polls one broker for a consumer's group and feeds the consumer's
//! channel, retrying with backoff while the broker cannot be reached.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use qbus_wire::Backoff;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::delivery::{Acker, Delivery, Target, Verdict};
use crate::connection::{Connection, LinkId};
use crate::error::{ClientError, Result};
use crate::protocol::record::records;
use crate::protocol::{Command, Frame, Header, Status, FLAG_START_AT_END, FLAG_START_AT_OFFSET};

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

/// What every fetch loop of one consumer shares.
pub(super) struct FetchSpec {
    pub(super) target: Arc<Target>,
    pub(super) tag: Option<String>,
    pub(super) start: StartAt,
    pub(super) batch: u32,
    pub(super) long_poll: Duration,
    /// Over an HA handle one broker lacking the MQ does not end the stream: the topology
    /// may be a report behind, so that fetch loop retries with backoff.
    pub(super) tolerate_missing: bool,
}

/// Starts a fetch loop on `connection` (with its own acker) that reads `name` (the
/// consumer's MQ, or a follower's copy of it, `MQ@LEADER`) and feeds `tx` until the
/// consumer is dropped or `stop` fires.
pub(super) fn spawn_fetcher(
    spec: &Arc<FetchSpec>,
    connection: Connection,
    name: String,
    tx: mpsc::Sender<Result<Vec<Delivery>>>,
    stop: CancellationToken,
) {
    let target = if name == spec.target.mq {
        spec.target.clone()
    } else {
        Arc::new(Target {
            mq: name,
            group: spec.target.group.clone(),
        })
    };
    let acker = Arc::new(Acker::spawn(connection.clone(), target.clone()));
    let fetcher = Fetcher {
        spec: spec.clone(),
        target,
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
    /// What this loop reads: the spec's, or a follower's copy.
    target: Arc<Target>,
    connection: Connection,
    acker: Arc<Acker>,
    tx: mpsc::Sender<Result<Vec<Delivery>>>,
    stop: CancellationToken,
}

impl Fetcher {
    async fn run(self) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            let fetch = self
                .connection
                .request_with_link(self.request(), self.spec.long_poll);
            tokio::pin!(fetch);
            let reply = tokio::select! {
                reply = &mut fetch => reply,
                _ = self.tx.closed() => return self.give_back(fetch).await,
                _ = self.stop.cancelled() => return self.give_back(fetch).await,
            };
            let reply = reply.and_then(|(frame, link)| match self.lost(&frame.header) {
                Some(notice) => Ok(Err(notice)),
                None => self.deliveries(frame, link).map(Ok),
            });
            match reply {
                Ok(Err(notice)) => {
                    backoff.reset();
                    tracing::warn!(error = %notice, "records lost on the broker's disk");
                    if self.tx.send(Err(notice)).await.is_err() {
                        return;
                    }
                }
                Ok(Ok(deliveries)) => {
                    backoff.reset();
                    if deliveries.is_empty() {
                        continue;
                    }
                    if let Err(mpsc::error::SendError(Ok(unhandled))) =
                        self.tx.send(Ok(deliveries)).await
                    {
                        // The consumer is gone: give back what it will never see.
                        for delivery in unhandled {
                            self.acker.settle_later(&delivery, Verdict::Unseen);
                        }
                        return;
                    }
                }
                Err(e)
                    if e.is_transport()
                        || (self.spec.tolerate_missing && e.status() == Some(Status::NotFound)) =>
                {
                    let wait = backoff.next_wait();
                    tracing::warn!(mq = %self.target.mq, broker = %self.connection.addr(), error = %e, retry_in = ?wait, "fetch failed");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.tx.closed() => return,
                        _ = self.stop.cancelled() => return,
                    }
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
    async fn give_back(&self, fetch: impl Future<Output = Result<(Frame, LinkId)>>) {
        let fetched = fetch.await;
        let Ok(deliveries) = fetched.and_then(|(frame, link)| self.deliveries(frame, link)) else {
            return;
        };
        for delivery in deliveries {
            self.acker.settle_later(&delivery, Verdict::Unseen);
        }
    }

    fn request(&self) -> Frame {
        let spec = &self.spec;
        let mut header = Header::request(Command::Fetch, Some(&self.target.mq));
        header.group = Some(self.target.group.clone());
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

    /// The notice of a fetch reply that went past damaged records (protocol 2).
    fn lost(&self, header: &Header) -> Option<ClientError> {
        let lost = header.lost?;
        Some(ClientError::RecordsLost {
            mq: self.target.mq.clone(),
            first: lost.first,
            end: lost.end,
            detail: header.error.clone().unwrap_or_default(),
        })
    }

    fn deliveries(&self, frame: Frame, link: LinkId) -> Result<Vec<Delivery>> {
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
                delayed_from: record.copy_of(),
                expires_at: record.expires_at,
                body: body.slice(record.body_range.clone()),
                attempt: attempts.get(i).copied().unwrap_or(1),
                acker: self.acker.clone(),
                link,
            });
        }
        Ok(out)
    }
}
