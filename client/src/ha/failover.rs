//! Sending through an HA handle: pick a broker holding the MQ (key affinity, else the
//! selector), skipping brokers this client saw fail; on a connection error, a timeout, a
//! broker shutting down or halted (`503`) or out of disk (`507`, nothing stored), send the
//! same frame to the next broker until one confirms or every holder was tried.

use std::future::Future;
use std::sync::Arc;

use super::{affinity, pool::Node, Ha, Shared};
use crate::connection::{Connection, PendingReply};
use crate::error::{ClientError, Result};
use crate::protocol::{Frame, Status};
use crate::topology::Candidate;

/// True for failures another broker may not have.
pub(crate) fn retryable(e: &ClientError) -> bool {
    e.is_transport()
        || matches!(
            e.status(),
            Some(Status::Unavailable | Status::InsufficientStorage)
        )
}

/// A request sent through an HA handle, with what it takes to send it again elsewhere.
pub(crate) struct HaReply {
    shared: Arc<Shared>,
    mq: Arc<str>,
    key: Option<String>,
    frame: Frame,
    tried: Vec<Arc<str>>,
    node: Arc<Node>,
    reply: PendingReply,
}

impl std::fmt::Debug for HaReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HaReply")
            .field("mq", &self.mq)
            .field("broker", &self.node.addr)
            .finish()
    }
}

impl Ha {
    /// Sends a request frame for `mq` (a message's `key` picks the broker) and returns its
    /// reply handle; fails over while sending.
    pub(crate) async fn send(
        &self,
        mq: &Arc<str>,
        key: Option<String>,
        frame: Frame,
    ) -> Result<HaReply> {
        let shared = &self.shared;
        let mut tried = Vec::new();
        let (node, reply) = shared
            .route(mq, key.as_deref(), &mut tried, |conn| {
                let frame = frame.clone();
                async move { conn.send(frame).await }
            })
            .await?;
        Ok(HaReply {
            shared: shared.clone(),
            mq: mq.clone(),
            key,
            frame,
            tried,
            node,
            reply,
        })
    }

    /// Sends a frame that gets no reply; fails over only while sending.
    pub(crate) async fn send_oneway(
        &self,
        mq: &Arc<str>,
        key: Option<&str>,
        frame: Frame,
    ) -> Result<()> {
        self.shared
            .route(mq, key, &mut Vec::new(), |conn| {
                let frame = frame.clone();
                async move { conn.send_oneway(frame).await }
            })
            .await
            .map(drop)
    }

    /// Sends a request frame for `mq` to a holder chosen as for a message without a key,
    /// moving on to the next while it cannot be sent; once sent, it is never sent again.
    pub(crate) async fn send_request(&self, mq: &str, frame: Frame) -> Result<PendingReply> {
        let send = |conn: Connection| {
            let frame = frame.clone();
            async move { conn.send(frame).await }
        };
        let (_, reply) = self.shared.route(mq, None, &mut Vec::new(), send).await?;
        Ok(reply)
    }
}

impl HaReply {
    /// Waits for the reply (each broker within the request timeout), sending again to the
    /// next broker when one fails.
    pub(crate) async fn wait(mut self) -> Result<Frame> {
        let limit = self.shared.options.connection.request_timeout;
        loop {
            let outcome = match tokio::time::timeout(limit, &mut self.reply).await {
                Ok(outcome) => outcome,
                Err(_) => Err(ClientError::Timeout(limit)),
            };
            let error = match outcome {
                Ok(frame) => return Ok(frame),
                Err(e) if retryable(&e) => e,
                Err(e) => return Err(e),
            };
            self.shared.pool.failed(&self.shared, &self.node, &error);
            self.tried.push(self.node.addr.clone());
            let frame = &self.frame;
            let (node, reply) = self
                .shared
                .route(&self.mq, self.key.as_deref(), &mut self.tried, |conn| {
                    let frame = frame.clone();
                    async move { conn.send(frame).await }
                })
                .await
                .map_err(|next| match next {
                    ClientError::NoBroker { .. } => error,
                    other => other,
                })?;
            self.node = node;
            self.reply = reply;
        }
    }
}

impl Shared {
    /// Runs `op` on the chosen broker's connection, moving on to the next broker while it
    /// fails in a retryable way. `tried` collects the brokers that failed.
    pub(crate) async fn route<T, F, Fut>(
        self: &Arc<Self>,
        mq: &str,
        key: Option<&str>,
        tried: &mut Vec<Arc<str>>,
        mut op: F,
    ) -> Result<(Arc<Node>, T)>
    where
        F: FnMut(Connection) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut last = None;
        loop {
            let node = match self.pick(mq, key, tried) {
                Ok(node) => node,
                Err(e) => return Err(last.unwrap_or(e)),
            };
            match op(node.conn.clone()).await {
                Ok(value) => {
                    node.succeeded();
                    return Ok((node, value));
                }
                Err(e) if retryable(&e) => {
                    self.pool.failed(self, &node, &e);
                    tried.push(node.addr.clone());
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The broker for the next attempt: among holders of `mq` not yet tried, the healthy
    /// ones if any, else the others (one of them may be back).
    pub(crate) fn pick(
        self: &Arc<Self>,
        mq: &str,
        key: Option<&str>,
        tried: &[Arc<str>],
    ) -> Result<Arc<Node>> {
        let topology = self.topology.load();
        let holders = topology.holders(mq);
        if holders.is_empty() {
            return Err(ClientError::NoBroker {
                mq: mq.to_owned(),
                reason: "no broker in the topology holds it; create it first (the trackers learn of a new MQ within 100 ms)".into(),
            });
        }
        let fresh = |c: &Candidate| !tried.contains(&c.addr);
        let healthy = |c: &Candidate| fresh(c) && !self.pool.avoid(self, &c.addr);
        let chosen = if tried.is_empty() && holders.iter().all(&healthy) {
            self.choose(mq, key, holders)
        } else {
            let mut usable: Vec<Candidate> =
                holders.iter().filter(|c| healthy(c)).cloned().collect();
            if usable.is_empty() {
                usable = holders.iter().filter(|c| fresh(c)).cloned().collect();
            }
            if usable.is_empty() {
                return Err(ClientError::NoBroker {
                    mq: mq.to_owned(),
                    reason: format!(
                        "every broker holding it failed this request ({})",
                        tried.join(", ")
                    ),
                });
            }
            self.choose(mq, key, &usable)
        };
        Ok(self.pool.node(&chosen))
    }

    fn choose(&self, mq: &str, key: Option<&str>, candidates: &[Candidate]) -> Arc<str> {
        let index = match key {
            Some(key) => affinity::owner(key, candidates),
            None => self.options.selector.select(mq, candidates) % candidates.len(),
        };
        candidates[index].addr.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(status: Status) -> ClientError {
        ClientError::Server {
            status,
            message: String::new(),
        }
    }

    #[test]
    fn a_broker_out_of_disk_or_stopping_is_left_for_another() {
        assert!(retryable(&refused(Status::Unavailable)));
        assert!(retryable(&refused(Status::InsufficientStorage)));
        assert!(retryable(&ClientError::Timeout(std::time::Duration::ZERO)));
        // The same request would fail the same way anywhere.
        assert!(!retryable(&refused(Status::BadRequest)));
        assert!(!retryable(&refused(Status::TooLarge)));
    }
}
