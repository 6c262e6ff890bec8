//! RPC calls in the SDK (`docs/protocol.md`, "RPC commands"): a `Call` to an MQ through a
//! broker ([`Broker::send_call`](crate::Broker::send_call)) or straight to a DirectRPC
//! server ([`Connection::send_call`](crate::Connection::send_call)), its reply, and the
//! `Route` a responder sends for a call it consumed. The envelopes inside the bodies are the
//! RPC framework's business (`qbus-rpc`, [`protocol::rpc`](crate::protocol::rpc)).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;

use crate::connection::{Connection, PendingReply};
use crate::error::Result;
use crate::protocol::{Command, Frame, Header, FLAG_ONEWAY};

/// The reply to a call: the response envelope as the responder encoded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallReply {
    /// The response envelope.
    pub body: Bytes,
    /// Its encoding as the `encoding` header names it; `None` is MessagePack.
    pub encoding: Option<String>,
}

/// A call on its way: resolves to its [`CallReply`], or to a refusal as
/// [`ClientError::Server`](crate::ClientError::Server) (from a broker: `404` no such MQ,
/// `503` no responders, `429` reply table full, `504` deadline passed). Dropping it forgets
/// the call.
#[derive(Debug)]
pub struct PendingCall(PendingReply);

impl Future for PendingCall {
    type Output = Result<CallReply>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map_ok(|frame| CallReply {
            body: frame.body,
            encoding: frame.header.encoding,
        })
    }
}

impl PendingCall {
    pub(crate) fn new(reply: PendingReply) -> PendingCall {
        PendingCall(reply)
    }
}

// Here rather than in `connection.rs`, which stays below the commands it carries.
impl Connection {
    /// Sends a call straight to the DirectRPC server at the other end: `body` is the
    /// request envelope, `encoding` its `encoding` header (`None`: MessagePack), `timeout`
    /// the deadline the server enforces.
    ///
    /// Not an `async fn`: the returned future is the send's own, so a call's future stays
    /// as small as a plain request's (it is allocated once per call).
    pub fn send_call(
        &self,
        body: Bytes,
        encoding: Option<String>,
        timeout: Duration,
    ) -> impl Future<Output = Result<PendingCall>> + Send + '_ {
        self.send(call_frame(None, body, encoding, timeout))
            .map(|sent| sent.map(PendingCall))
    }
}

/// The `Call` frame: with `mq`, for a broker to store in that MQ and route the reply back;
/// without, for a DirectRPC server to run.
pub(crate) fn call_frame(
    mq: Option<&str>,
    body: Bytes,
    encoding: Option<String>,
    timeout: Duration,
) -> Frame {
    let mut header = Header::request(Command::Call, mq);
    header.timeout_ms = Some(u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX));
    header.encoding = encoding;
    Frame::with_body(header, body)
}

/// The one-way `Route` frame carrying a responder's reply to the caller waiting on `route`.
/// One-way because the broker answers a failed route only by counting it, and a reply frame
/// per call would halve what the link carries.
pub(crate) fn route_frame(route: String, body: Bytes, encoding: Option<String>) -> Frame {
    let mut header = Header::request(Command::Route, None);
    header.route = Some(route);
    header.encoding = encoding;
    header.flags = FLAG_ONEWAY;
    Frame::with_body(header, body)
}
