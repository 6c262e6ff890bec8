//! One subscription per tracker: connect, say hello, subscribe, then apply the snapshot and
//! every pushed change; on any failure or gap, reconnect with jittered backoff and take a
//! fresh snapshot. The tracker's last view stays cached while it is away.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use qbus_wire::Backoff;
use tokio::time::Instant;

use super::Shared;
use crate::connection::{hello_body, ConnectionOptions};
use crate::link::{Connector, Link, TcpConnector};
use crate::protocol::{Command, Frame, Header, Status, DEFAULT_MAX_FRAME};
use crate::topology::TopologyUpdate;

/// First and longest wait before reconnecting to a tracker.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Follows tracker `index` until the handle is dropped.
pub(crate) async fn follow(shared: Arc<Shared>, index: usize) {
    let addr = shared.trackers[index].clone();
    let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
    loop {
        let outcome = tokio::select! {
            outcome = subscribe(&shared, index, &addr) => outcome,
            _ = shared.stop.cancelled() => return,
        };
        let reason = match outcome {
            Ended::AfterSnapshot(reason) => {
                backoff.reset();
                tracing::warn!(tracker = %addr, %reason, "lost the tracker; using the cached topology");
                reason
            }
            Ended::Early(reason) => {
                tracing::debug!(tracker = %addr, %reason, "cannot subscribe to the tracker");
                reason
            }
        };
        shared.tracker_lost(index, reason);
        let wait = backoff.next_wait();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.stop.cancelled() => return,
        }
    }
}

enum Ended {
    /// Failed before a snapshot came.
    Early(String),
    /// The subscription was up and then ended.
    AfterSnapshot(String),
}

async fn subscribe(shared: &Arc<Shared>, index: usize, addr: &str) -> Ended {
    let options = &shared.options.connection;
    let connector = TcpConnector::new(addr, DEFAULT_MAX_FRAME).with_tls(shared.options.tls.clone());
    let mut link = match connect(&connector, options.connect_timeout).await {
        Ok(link) => link,
        Err(reason) => return Ended::Early(reason),
    };
    let snapshot = match handshake(&mut link, options).await {
        Ok(snapshot) => snapshot,
        Err(reason) => return Ended::Early(reason),
    };
    if let Err(gap) = shared.apply(index, snapshot) {
        return Ended::Early(format!("bad snapshot: {gap:?}"));
    }
    tracing::debug!(tracker = %addr, "subscribed");
    Ended::AfterSnapshot(follow_changes(shared, index, &mut link, options.heartbeat).await)
}

async fn connect(connector: &TcpConnector, limit: Duration) -> Result<Link, String> {
    match tokio::time::timeout(limit, connector.connect()).await {
        Ok(Ok(link)) => Ok(link),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("connect timed out after {limit:?}")),
    }
}

/// Hello, then Subscribe; returns the snapshot.
async fn handshake(link: &mut Link, options: &ConnectionOptions) -> Result<TopologyUpdate, String> {
    let limit = options.request_timeout;
    let hello = hello_body(options.credentials.clone())?;
    call(link, Command::Hello, 1, hello, limit).await?;
    let reply = call(link, Command::Subscribe, 2, Vec::new(), limit).await?;
    rmp_serde::from_slice(&reply.body).map_err(|e| format!("bad topology snapshot: {e}"))
}

/// Sends one request and waits for its reply (nothing else arrives before it).
async fn call(
    link: &mut Link,
    cmd: Command,
    id: u64,
    body: Vec<u8>,
    limit: Duration,
) -> Result<Frame, String> {
    let mut header = Header::request(cmd, None);
    header.id = id;
    link.tx
        .send(Frame::with_body(header, body.into()))
        .await
        .map_err(|_| "connection closed".to_owned())?;
    let deadline = Instant::now() + limit;
    loop {
        let frame = match tokio::time::timeout_at(deadline, link.rx.next()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(None) => return Err("connection closed".into()),
            Err(_) => return Err(format!("no reply to {cmd:?} within {limit:?}")),
        };
        if frame.header.id != id {
            continue;
        }
        let status = Status::from_code(frame.header.status);
        if status != Status::Ok {
            return Err(format!(
                "{cmd:?} refused with {status}: {} (is this a qbus-tracker?)",
                frame.header.error.unwrap_or_default()
            ));
        }
        return Ok(frame);
    }
}

/// Applies pushed changes until the link fails, goes silent or a gap shows; says why.
async fn follow_changes(
    shared: &Arc<Shared>,
    index: usize,
    link: &mut Link,
    heartbeat: Duration,
) -> String {
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            item = link.rx.next() => match item {
                Some(Ok(frame)) => {
                    last_heard = Instant::now();
                    if frame.header.cmd != Command::TopologyUpdate {
                        continue; // heartbeat replies
                    }
                    let update = match rmp_serde::from_slice::<TopologyUpdate>(&frame.body) {
                        Ok(update) => update,
                        Err(e) => return format!("bad topology update: {e}"),
                    };
                    if let Err(gap) = shared.apply(index, update) {
                        return format!("missed changes (expected #{}, got #{}); resubscribing", gap.expected, gap.got);
                    }
                }
                Some(Err(e)) => return e.to_string(),
                None => return "connection closed".into(),
            },
            _ = ticker.tick() => {
                let silent = last_heard.elapsed();
                if silent >= heartbeat * 3 {
                    return format!("silent for {silent:?}");
                }
                if silent >= heartbeat {
                    let _ = link.tx.try_send(Frame::new(Header::request(Command::Heartbeat, None)));
                }
            }
        }
    }
}
