//! The serving side of links, shared by every qbus server (`qbus-broker`, `qbus-tracker` and
//! the RPC server of `qbus-rpc`): accepting TCP connections until shutdown, reading one
//! connection's frames with an idle limit and a clear error reply to bad input, and the set
//! of connection tasks that shutdown waits for; and the `Hello` reply every server gives.
//!
//! ```no_run
//! # async fn demo(listener: tokio::net::TcpListener) {
//! use std::time::Duration;
//! use qbus_wire::link::tcp_link;
//! use qbus_wire::protocol::DEFAULT_MAX_FRAME;
//! use qbus_wire::serve::{accept, next_frame, Connections};
//!
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let mut connections = Connections::default();
//! while let Some((stream, _peer)) = accept(&listener, &shutdown).await {
//!     let shutdown = shutdown.child_token();
//!     connections.spawn(async move {
//!         let mut link = tcp_link(stream, DEFAULT_MAX_FRAME);
//!         let idle = Duration::from_secs(30);
//!         while let Some(frame) = next_frame(&mut link.rx, &link.tx, idle, &shutdown).await {
//!             // ... answer `frame` on `link.tx`
//!             # drop(frame);
//!         }
//!     });
//! }
//! connections.close(Duration::from_secs(5)).await;
//! # }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::link::{FrameSender, FrameStream};
use crate::protocol::{Command, Frame, Header, ServerInfo, Status, WireError, PROTOCOL_VERSION};

/// How long [`accept`] waits after a failed accept before it tries again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The next connection on `listener`, or `None` once `shutdown` fires. A failed accept (out
/// of file descriptors and the like) is logged and retried after a pause instead of
/// spinning.
pub async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(connection) => return Some(connection),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            _ = shutdown.cancelled() => return None,
        }
    }
}

/// The next frame a peer sends on `inbound`, or `None` when the connection should close:
/// the peer closed it, it stayed silent for `idle`, `shutdown` fired, or it sent bad input.
/// Bad input is answered on `out` first with an error frame saying what was wrong
/// (`TooLarge` for an oversized frame, else `BadRequest`), so the peer is never left
/// guessing why it was disconnected.
pub async fn next_frame(
    inbound: &mut FrameStream,
    out: &FrameSender,
    idle: Duration,
    shutdown: &CancellationToken,
) -> Option<Frame> {
    let item = tokio::select! {
        item = tokio::time::timeout(idle, inbound.next()) => item,
        _ = shutdown.cancelled() => return None,
    };
    match item {
        Ok(item) => received(item, out).await,
        Err(_) => {
            tracing::info!(?idle, "closing idle connection");
            None
        }
    }
}

/// A frame the peer has already sent, without waiting for the network: `Some(Some(frame))`,
/// `Some(None)` when the connection should close (as [`next_frame`] says it), `None` when
/// nothing whole is buffered. Servers use it to handle a burst of requests together.
pub async fn buffered_frame(inbound: &mut FrameStream, out: &FrameSender) -> Option<Option<Frame>> {
    let item = inbound.next().now_or_never()?;
    Some(received(item, out).await)
}

/// What [`next_frame`] and [`buffered_frame`] make of an item of the stream.
async fn received(item: Option<Result<Frame, WireError>>, out: &FrameSender) -> Option<Frame> {
    match item {
        Some(Ok(frame)) => Some(frame),
        // A TLS peer that goes away without its close_notify (a process that exits) has
        // closed, as a TCP peer does with its FIN: nothing is left to answer.
        Some(Err(WireError::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            tracing::debug!(error = %e, "peer closed without a TLS close_notify");
            None
        }
        Some(Err(e)) => {
            tracing::warn!(error = %e, "closing connection after bad input");
            let status = match e {
                WireError::FrameTooLarge { .. } => Status::TooLarge,
                _ => Status::BadRequest,
            };
            let bad = Header::error(Command::Hello, 0, status, e.to_string());
            let _ = out.send(Frame::new(bad)).await;
            None
        }
        None => None,
    }
}

/// The reply to a `Hello` request: the protocol this server speaks, its software `version`,
/// the largest frame it accepts, and the user it serves the client as (protocol 3).
pub fn hello_reply(
    request: &Header,
    version: &str,
    max_frame: usize,
    identity: Option<&str>,
) -> Frame {
    let info = ServerInfo {
        protocol: PROTOCOL_VERSION,
        version: version.to_owned(),
        max_frame: max_frame as u64,
        credentials: None,
        identity: identity.map(str::to_owned),
    };
    match rmp_serde::to_vec_named(&info) {
        Ok(body) => Frame::with_body(Header::reply_to(request), body.into()),
        Err(e) => Frame::new(Header::error(
            request.cmd,
            request.id,
            Status::Internal,
            format!("cannot encode the server info: {e}"),
        )),
    }
}

/// The tasks serving a server's connections, so shutdown can wait for them.
#[derive(Debug, Default)]
pub struct Connections {
    tasks: JoinSet<()>,
}

impl Connections {
    /// Runs `connection` in the set, first dropping the tasks already finished so the set
    /// does not grow.
    pub fn spawn(&mut self, connection: impl Future<Output = ()> + Send + 'static) {
        while self.tasks.try_join_next().is_some() {}
        self.tasks.spawn(connection);
    }

    /// Waits up to `grace` for every connection to finish, then stops the rest. True when
    /// all finished in time.
    pub async fn close(mut self, grace: Duration) -> bool {
        let finished = tokio::time::timeout(grace, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await
        .is_ok();
        if !finished {
            self.tasks.abort_all();
        }
        finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::memory_link_pair;

    #[tokio::test(start_paused = true)]
    async fn frames_then_idle_close() {
        let (mut server, client) = memory_link_pair();
        let shutdown = CancellationToken::new();
        let idle = Duration::from_secs(30);
        let ping = Frame::new(Header::request(Command::Heartbeat, None));
        client.tx.send(ping).await.unwrap();
        let got = next_frame(&mut server.rx, &server.tx, idle, &shutdown).await;
        assert_eq!(got.map(|f| f.header.cmd), Some(Command::Heartbeat));
        // Paused time: the idle limit passes at once with nothing sent.
        assert!(next_frame(&mut server.rx, &server.tx, idle, &shutdown)
            .await
            .is_none());
        shutdown.cancel();
        assert!(next_frame(&mut server.rx, &server.tx, idle, &shutdown)
            .await
            .is_none());
    }

    #[tokio::test]
    async fn bad_input_is_answered_before_the_close() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let tx = FrameSender::from_channel(tx);
        let mut inbound: FrameStream =
            futures_util::stream::iter([Err(WireError::FrameTooLarge { size: 9, max: 8 })]).boxed();
        let shutdown = CancellationToken::new();
        let idle = Duration::from_secs(1);
        assert!(next_frame(&mut inbound, &tx, idle, &shutdown)
            .await
            .is_none());
        let reply = rx.recv().await.unwrap();
        assert_eq!(reply.header.status, Status::TooLarge.code());
    }

    #[test]
    fn hello_says_what_the_server_speaks() {
        let request = Header::request(Command::Hello, None);
        let reply = hello_reply(&request, "9.9.9", 4096, Some("app"));
        assert_eq!(reply.header.status, Status::Ok.code());
        let info: ServerInfo = rmp_serde::from_slice(&reply.body).unwrap();
        assert_eq!(
            (info.protocol, info.version.as_str(), info.max_frame),
            (PROTOCOL_VERSION, "9.9.9", 4096)
        );
        assert_eq!(info.identity.as_deref(), Some("app"));
    }

    #[tokio::test(start_paused = true)]
    async fn close_stops_what_outlives_the_grace() {
        let mut connections = Connections::default();
        connections.spawn(async {});
        assert!(Connections::default().close(Duration::from_secs(1)).await);
        connections.spawn(std::future::pending());
        assert!(!connections.close(Duration::from_secs(1)).await);
    }
}
