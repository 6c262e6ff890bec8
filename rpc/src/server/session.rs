//! One connection to an [`RpcServer`](crate::RpcServer): the wire protocol of the broker port,
//! answering `Hello`, `Heartbeat` and `Call`. A call whose handler finishes without waiting
//! is answered in place; one that waits runs as its own task, so slow calls never hold up
//! fast ones.

use std::sync::Arc;
use std::time::Duration;

use qbus_wire::link::Link;
use qbus_wire::protocol::{Command, Frame, Header, Status, PROTOCOL_VERSION};
use qbus_wire::serve::{hello_reply, next_frame};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::client::invoker::Reply;
use crate::server::processor::{RpcProcessor, Started, SHUTDOWN_GRACE};

/// A connection silent this long is closed (clients heartbeat every 5 s by default).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a session takes from the server's options, copied out so a session does not
/// depend on the server that spawns it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Largest frame accepted.
    pub(super) max_frame: usize,
    /// Calls running at once before the connection is no longer read.
    pub(super) max_in_flight: usize,
}

/// Serves one client until it closes, fails, or `shutdown` fires (then the calls running
/// finish, within [`SHUTDOWN_GRACE`]). Calls still running when the client goes away are
/// stopped: nobody is left to read their replies.
/// `identity` is the name in the client's verified TLS certificate, if it sent one.
pub(crate) async fn serve(
    link: Link,
    peer: String,
    identity: Option<String>,
    processor: RpcProcessor,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let span = tracing::info_span!("rpc_session", %peer, identity = identity.as_deref());
    run(link, processor, limits, shutdown)
        .instrument(span)
        .await
}

async fn run(link: Link, processor: RpcProcessor, limits: Limits, shutdown: CancellationToken) {
    tracing::debug!("session opened");
    let Link {
        tx,
        rx: mut inbound,
    } = link;
    let permits = Arc::new(Semaphore::new(limits.max_in_flight.max(1)));
    let mut calls = JoinSet::new();
    while let Some(frame) = next_frame(&mut inbound, &tx, IDLE_TIMEOUT, &shutdown).await {
        let request = &frame.header;
        if request.is_reply() {
            continue;
        }
        let reply = match request.cmd {
            Command::Hello => {
                hello_reply(request, env!("CARGO_PKG_VERSION"), limits.max_frame, None)
            }
            Command::Heartbeat => Frame::new(Header::reply_to(request)),
            Command::Call => {
                let Frame { header, body } = frame;
                match processor.start(header.encoding.as_deref(), body, Duration::ZERO) {
                    Started::Done(reply) => reply_frame(&header, reply),
                    // Only calls that waited before they got here (MQ-RPC) can expire.
                    Started::Expired => continue,
                    Started::Running(running) => {
                        // Waiting for a permit stops reading: a client with too many calls
                        // running is slowed by TCP itself. At shutdown a call already begun
                        // still finishes (the drain below waits for it).
                        let permit = tokio::select! {
                            biased;
                            permit = permits.clone().acquire_owned() => permit.ok(),
                            _ = shutdown.cancelled() => None,
                        };
                        let tx = tx.clone();
                        calls.spawn(async move {
                            let reply = running.finish().await;
                            let _ = tx.send(reply_frame(&header, reply)).await;
                            drop(permit);
                        });
                        while calls.try_join_next().is_some() {}
                        continue;
                    }
                }
            }
            other => Frame::new(Header::error(
                other,
                request.id,
                Status::UnknownCommand,
                format!(
                    "{other:?} is not served here: this is a qbus RPC server, which answers \
                     Hello, Heartbeat and Call (protocol {PROTOCOL_VERSION})"
                ),
            )),
        };
        if tx.send(reply).await.is_err() {
            break;
        }
    }
    if shutdown.is_cancelled() {
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while calls.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "stopping calls still running at shutdown");
        }
    }
    calls.shutdown().await;
    tracing::debug!("session closed");
}

/// The `Call` reply to `request` carrying `reply`.
fn reply_frame(request: &Header, reply: Reply) -> Frame {
    let mut header = Header::reply_to(request);
    header.encoding = reply.encoding.header_value();
    Frame::with_body(header, reply.body)
}
