//! A link carries frames between two peers, over TCP or inside one process.
//!
//! Both the client and the broker speak to a [`Link`]: the TCP form (plain or TLS) encodes frames on a
//! socket, the in-process form (used by the embedded broker) hands them over a channel
//! without encoding. Everything above the link is the same code for both.

use std::future::Future;
use std::pin::Pin;

use futures_core::Stream;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;

use crate::protocol::{Frame, FrameCodec, WireError};
use crate::tls::ClientTls;

mod outbox;

pub use outbox::{Burst, FrameSender};

/// Frames queued to the peer; bounded so a slow peer applies backpressure.
pub const LINK_QUEUE: usize = 1024;

/// Incoming frames; an `Err` item ends the stream (the connection is unusable after it).
pub type FrameStream = Pin<Box<dyn Stream<Item = Result<Frame, WireError>> + Send>>;

/// Both directions of a connection.
pub struct Link {
    /// Frames to send to the peer.
    pub tx: FrameSender,
    /// Frames received from the peer.
    pub rx: FrameStream,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Link")
    }
}

/// Opens links to one peer; the client calls it again to reconnect.
pub trait Connector: Send + Sync + 'static {
    /// Opens a new link.
    fn connect(&self) -> Pin<Box<dyn Future<Output = std::io::Result<Link>> + Send + '_>>;
    /// The peer's address, for messages.
    fn addr(&self) -> String;
}

/// Wraps a TCP stream in a link. Frames go out through a [`FrameSender`]: queued frames
/// leave in few syscalls, written by the link's task or by a sender that flushes.
pub fn tcp_link(stream: TcpStream, max_frame: usize) -> Link {
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    Link {
        tx: outbox::tcp_sender(write, max_frame),
        rx: frame_stream(read, max_frame),
    }
}

/// Wraps any byte stream (a TLS stream after its handshake) in a link, as [`tcp_link`]
/// does a TCP stream.
pub fn stream_link<S>(stream: S, max_frame: usize) -> Link
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, write) = tokio::io::split(stream);
    Link {
        tx: outbox::stream_sender(write, max_frame),
        rx: frame_stream(read, max_frame),
    }
}

fn frame_stream<R: AsyncRead + Send + 'static>(read: R, max_frame: usize) -> FrameStream {
    FramedRead::with_capacity(read, FrameCodec::new(max_frame), 64 * 1024).boxed()
}

/// Two links joined back to back, for a peer in the same process.
pub fn memory_link_pair() -> (Link, Link) {
    let (a_tx, a_rx) = mpsc::channel::<Frame>(LINK_QUEUE);
    let (b_tx, b_rx) = mpsc::channel::<Frame>(LINK_QUEUE);
    let stream = |rx: mpsc::Receiver<Frame>| -> FrameStream {
        futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|frame| (Ok(frame), rx))
        })
        .boxed()
    };
    (
        Link {
            tx: FrameSender::from_channel(a_tx),
            rx: stream(b_rx),
        },
        Link {
            tx: FrameSender::from_channel(b_tx),
            rx: stream(a_rx),
        },
    )
}

/// Connects over TCP to a `host:port` address, with TLS when given [`ClientTls`].
#[derive(Debug, Clone)]
pub struct TcpConnector {
    addr: String,
    max_frame: usize,
    tls: Option<ClientTls>,
}

impl TcpConnector {
    /// A connector for `addr` that accepts frames up to `max_frame` bytes.
    pub fn new(addr: impl Into<String>, max_frame: usize) -> TcpConnector {
        TcpConnector {
            addr: addr.into(),
            max_frame,
            tls: None,
        }
    }

    /// Speaks TLS over the connection when `tls` is given, verifying the server's
    /// certificate for the address's host.
    pub fn with_tls(mut self, tls: Option<ClientTls>) -> TcpConnector {
        self.tls = tls;
        self
    }
}

impl Connector for TcpConnector {
    fn connect(&self) -> Pin<Box<dyn Future<Output = std::io::Result<Link>> + Send + '_>> {
        Box::pin(async move {
            let stream = TcpStream::connect(&self.addr).await?;
            match &self.tls {
                None => Ok(tcp_link(stream, self.max_frame)),
                Some(tls) => {
                    let stream = tls.connect(stream, &self.addr).await?;
                    Ok(stream_link(stream, self.max_frame))
                }
            }
        })
    }

    fn addr(&self) -> String {
        self.addr.clone()
    }
}
