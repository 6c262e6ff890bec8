//! The sending half of a link: [`FrameSender`].
//!
//! Over a socket, senders encode their frames into one shared buffer. A writer task drains
//! it, so frames queued while it was waking go out in one syscall. A sender that knows its
//! burst is over (a broker session after one read's requests, a fetch with its reply) can
//! also [`flush`](FrameSender::flush) the buffer itself: the write then happens on the
//! sender's thread, with no task to wake, and the writer task only takes over when the
//! socket pushes back. Waking that task costs a thread switch per burst, which is most of
//! a loopback round trip's latency.

// A refused frame comes back to its sender whole, as tokio's `mpsc` hands it back, so
// the sender can wait and try again without a copy.
#![allow(clippy::result_large_err)]

use std::future::poll_fn;
use std::io::ErrorKind;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc::error::{SendError, TrySendError};
use tokio::sync::{mpsc, Notify};

use super::LINK_QUEUE;
use crate::protocol::frame::encode_within;
use crate::protocol::Frame;

/// Most rounds a flushing sender writes (others may fill the buffer as it goes) before it
/// leaves the rest to the writer task: a sender is never kept writing for everyone else.
const FLUSH_ROUNDS: usize = 4;

/// Sends frames to the peer of a [`Link`](super::Link); cloned by everyone who sends on it.
///
/// Every way of sending queues the frame in order; they differ in who writes it out:
/// [`send`](Self::send) and [`try_send`](Self::try_send) leave it to the link's writer task,
/// [`try_feed`](Self::try_feed) leaves it until the next [`flush`](Self::flush) or send,
/// and [`send_flushed`](Self::send_flushed) writes it at once. The queue holds
/// [`LINK_QUEUE`] frames, so a slow peer applies backpressure.
pub struct FrameSender {
    kind: Kind,
}

enum Kind {
    /// An in-process link: frames are handed over as they are, never encoded.
    Memory(mpsc::Sender<Frame>),
    Socket(Arc<Outbox>),
}

struct Outbox {
    state: Mutex<State>,
    /// Senders waiting for room in a full queue.
    room: Notify,
    /// Written from a sender's thread (`flush`) as well as by the task; `None` for a
    /// stream (TLS) only the task can write.
    tcp: Option<OwnedWriteHalf>,
    max_frame: usize,
    /// Live `FrameSender`s: when the last goes, the task writes what is left and ends,
    /// which closes the socket's sending side.
    senders: AtomicUsize,
}

struct State {
    /// Encoded frames that no writer has taken yet.
    buf: BytesMut,
    /// Frames in `buf`, against `LINK_QUEUE`.
    frames: usize,
    writer: Writer,
    /// The link is done (a write failed, a frame could not be encoded): senders are
    /// refused, and the task ends once what was queued before is out.
    closed: bool,
    /// The task, when it waits for work.
    task: Option<Waker>,
}

/// Who writes to the socket. Whoever writes takes `buf` again after each write, so once
/// the writer is `Idle`, `buf` holds only frames fed since and not yet flushed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Writer {
    Idle,
    /// A sender in `flush`.
    Sender,
    /// The writer task, or a sender's flush handed to it.
    Task,
}

/// What a queued frame asks for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Wake the writer task if nobody is writing.
    WakeTask,
    /// Nothing: the sender flushes.
    Nothing,
}

impl FrameSender {
    /// A sender over an in-process channel (how [`memory_link_pair`](super::memory_link_pair)
    /// and tests join two peers).
    pub fn from_channel(tx: mpsc::Sender<Frame>) -> FrameSender {
        FrameSender {
            kind: Kind::Memory(tx),
        }
    }

    /// Queues `frame`, waiting while the queue is full; fails once the link is closed.
    pub async fn send(&self, frame: Frame) -> Result<(), SendError<Frame>> {
        self.send_then(frame, Then::WakeTask).await
    }

    /// Queues `frame` without waiting: `Full` when the queue is, `Closed` once the link is.
    pub fn try_send(&self, frame: Frame) -> Result<(), TrySendError<Frame>> {
        match &self.kind {
            Kind::Memory(tx) => tx.try_send(frame),
            Kind::Socket(outbox) => outbox.push(frame, Then::WakeTask),
        }
    }

    /// Queues `frame` for the caller's next [`flush`](Self::flush) (or anyone's send): for
    /// a sender with more frames to come in the same burst, which it then writes together.
    pub fn try_feed(&self, frame: Frame) -> Result<(), TrySendError<Frame>> {
        match &self.kind {
            Kind::Memory(tx) => tx.try_send(frame),
            Kind::Socket(outbox) => outbox.push(frame, Then::Nothing),
        }
    }

    /// [`try_feed`](Self::try_feed)s `frame` to `burst` when given, else
    /// [`try_send`](Self::try_send)s it: for code that serves both kinds of sender.
    pub fn try_send_in(
        &self,
        frame: Frame,
        burst: Option<&mut Burst>,
    ) -> Result<(), TrySendError<Frame>> {
        match burst {
            Some(burst) => burst.feed(self, frame),
            None => self.try_send(frame),
        }
    }

    /// Queues `frame` and writes the queue out now, on this thread (see
    /// [`flush`](Self::flush)); waits while the queue is full.
    pub async fn send_flushed(&self, frame: Frame) -> Result<(), SendError<Frame>> {
        self.send_then(frame, Then::Nothing).await?;
        self.flush();
        Ok(())
    }

    /// Writes what is queued now, from this thread, unless a write is already under way
    /// (it takes these frames too). What the socket does not take at once is left to the
    /// writer task, so this never waits.
    pub fn flush(&self) {
        if let Kind::Socket(outbox) = &self.kind {
            outbox.flush();
        }
    }

    async fn send_then(&self, mut frame: Frame, then: Then) -> Result<(), SendError<Frame>> {
        let outbox = match &self.kind {
            Kind::Memory(tx) => return tx.send(frame).await,
            Kind::Socket(outbox) => outbox,
        };
        loop {
            // Registered before trying, so room made in between is not missed.
            let room = outbox.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match outbox.push(frame, then) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(back)) => return Err(SendError(back)),
                Err(TrySendError::Full(back)) => frame = back,
            }
            room.await;
        }
    }

    fn same_link(&self, other: &FrameSender) -> bool {
        match (&self.kind, &other.kind) {
            (Kind::Memory(a), Kind::Memory(b)) => a.same_channel(b),
            (Kind::Socket(a), Kind::Socket(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Clone for FrameSender {
    fn clone(&self) -> FrameSender {
        let kind = match &self.kind {
            Kind::Memory(tx) => Kind::Memory(tx.clone()),
            Kind::Socket(outbox) => {
                outbox.senders.fetch_add(1, Ordering::Relaxed);
                Kind::Socket(outbox.clone())
            }
        };
        FrameSender { kind }
    }
}

impl Drop for FrameSender {
    fn drop(&mut self) {
        if let Kind::Socket(outbox) = &self.kind {
            if outbox.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
                wake_task(outbox.lock());
            }
        }
    }
}

impl std::fmt::Debug for FrameSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameSender")
    }
}

/// The links one burst of work fed frames to, written together when the burst ends: a
/// broker session answering every request one read brought sends each link one write.
/// Dropping it flushes too, so nothing fed is left behind.
///
/// ```
/// use futures_util::StreamExt;
/// use qbus_wire::link::{memory_link_pair, Burst};
/// use qbus_wire::protocol::{Command, Frame, Header};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let (ours, mut theirs) = memory_link_pair();
/// let mut burst = Burst::default();
/// for _ in 0..3 {
///     let reply = Frame::new(Header::request(Command::Heartbeat, None));
///     burst.feed(&ours.tx, reply).expect("room in the link's queue");
/// }
/// burst.flush(); // over TCP: one write, from this task
/// for _ in 0..3 {
///     assert!(theirs.rx.next().await.is_some());
/// }
/// # }
/// ```
#[derive(Debug, Default)]
pub struct Burst {
    fed: Vec<FrameSender>,
}

impl Burst {
    /// Feeds `frame` to `to` ([`FrameSender::try_feed`]) for [`flush`](Self::flush) to
    /// write.
    pub fn feed(&mut self, to: &FrameSender, frame: Frame) -> Result<(), TrySendError<Frame>> {
        to.try_feed(frame)?;
        if !self.fed.iter().any(|fed| fed.same_link(to)) {
            self.fed.push(to.clone());
        }
        Ok(())
    }

    /// Writes out every link fed since the last flush.
    pub fn flush(&mut self) {
        for fed in self.fed.drain(..) {
            fed.flush();
        }
    }
}

impl Drop for Burst {
    fn drop(&mut self) {
        self.flush();
    }
}

/// A sender over a TCP socket's sending half: senders can write it themselves
/// ([`FrameSender::flush`]), with a task for when it pushes back.
pub(super) fn tcp_sender(tcp: OwnedWriteHalf, max_frame: usize) -> FrameSender {
    start(Some(tcp), None::<tokio::io::Sink>, max_frame)
}

/// A sender over any byte stream (TLS), which its task alone writes.
pub(super) fn stream_sender<W>(stream: W, max_frame: usize) -> FrameSender
where
    W: AsyncWrite + Send + Unpin + 'static,
{
    start(None, Some(stream), max_frame)
}

fn start<W>(tcp: Option<OwnedWriteHalf>, stream: Option<W>, max_frame: usize) -> FrameSender
where
    W: AsyncWrite + Send + Unpin + 'static,
{
    let outbox = Arc::new(Outbox {
        state: Mutex::new(State {
            buf: BytesMut::new(),
            frames: 0,
            writer: Writer::Idle,
            closed: false,
            task: None,
        }),
        room: Notify::new(),
        tcp,
        max_frame,
        senders: AtomicUsize::new(1),
    });
    tokio::spawn(write_task(outbox.clone(), stream));
    FrameSender {
        kind: Kind::Socket(outbox),
    }
}

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain bytes and counters, still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, frame: Frame, then: Then) -> Result<(), TrySendError<Frame>> {
        let mut state = self.lock();
        if state.closed {
            return Err(TrySendError::Closed(frame));
        }
        if state.frames >= LINK_QUEUE {
            // Frames fed and never flushed must not keep a full queue full.
            if state.writer == Writer::Idle {
                wake_task(state);
            }
            return Err(TrySendError::Full(frame));
        }
        if let Err(e) = encode_within(&frame, &mut state.buf, self.max_frame) {
            // The peer could never read it; what came before still goes out.
            tracing::debug!(error = %e, "link write failed");
            self.close(state);
            return Err(TrySendError::Closed(frame));
        }
        state.frames += 1;
        if then == Then::WakeTask && state.writer == Writer::Idle {
            wake_task(state);
        }
        Ok(())
    }

    /// Takes the queue for a writer, making room for waiting senders.
    fn take(&self, state: &mut State, into: &mut BytesMut) {
        std::mem::swap(&mut state.buf, into);
        if std::mem::take(&mut state.frames) >= LINK_QUEUE {
            self.room.notify_waiters();
        }
    }

    fn flush(&self) {
        let Some(tcp) = &self.tcp else {
            // Only the task writes a stream: hand it the queue.
            let state = self.lock();
            if state.writer == Writer::Idle && !state.buf.is_empty() {
                wake_task(state);
            }
            return;
        };
        let mut out = BytesMut::new();
        {
            let mut state = self.lock();
            if state.closed || state.writer != Writer::Idle || state.buf.is_empty() {
                return;
            }
            state.writer = Writer::Sender;
            self.take(&mut state, &mut out);
        }
        for _ in 0..FLUSH_ROUNDS {
            while !out.is_empty() {
                match tcp.try_write(&out) {
                    Ok(n) => out.advance(n),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return self.hand_over(out),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return self.fail(&e),
                }
            }
            let mut state = self.lock();
            if state.buf.is_empty() {
                state.writer = Writer::Idle;
                return;
            }
            self.take(&mut state, &mut out);
        }
        self.hand_over(out);
    }

    /// Leaves `rest` (unwritten, ahead of anything queued since) to the task.
    fn hand_over(&self, rest: BytesMut) {
        let mut state = self.lock();
        if !state.buf.is_empty() {
            let mut ahead = rest;
            ahead.extend_from_slice(&state.buf);
            state.buf = ahead;
        } else {
            state.buf = rest;
        }
        state.writer = Writer::Task;
        wake_task(state);
    }

    /// A write failed: what is queued can never go out.
    fn fail(&self, e: &std::io::Error) {
        tracing::debug!(error = %e, "link write failed");
        let mut state = self.lock();
        state.writer = Writer::Idle;
        state.buf.clear();
        self.close(state);
    }

    /// Refuses senders from now on (waking those waiting for room) and lets the task end
    /// once it has written what is still queued.
    fn close(&self, mut state: MutexGuard<'_, State>) {
        state.closed = true;
        self.room.notify_waiters();
        wake_task(state);
    }

    /// Waits until the task has bytes to write (taking them into `out`), or until it is
    /// done: the link closed, or every sender gone with nothing left to write.
    async fn work(&self, out: &mut BytesMut) -> bool {
        poll_fn(|cx| {
            let mut state = self.lock();
            let mine = match state.writer {
                Writer::Sender => false,
                Writer::Task => true,
                Writer::Idle => !state.buf.is_empty(),
            };
            if mine {
                state.writer = Writer::Task;
                self.take(&mut state, out);
                return Poll::Ready(true);
            }
            // Closed, frames queued before still go out (a failed write cleared them).
            let done = state.closed || self.senders.load(Ordering::Acquire) == 0;
            if state.writer == Writer::Idle && done {
                return Poll::Ready(false);
            }
            state.task = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// After the task wrote: takes what was queued meanwhile, or goes idle.
    fn more(&self, out: &mut BytesMut) -> bool {
        let mut state = self.lock();
        if state.buf.is_empty() {
            state.writer = Writer::Idle;
            return false;
        }
        self.take(&mut state, out);
        true
    }
}

/// Wakes the writer task if it waits, after letting go of the lock it would take first.
fn wake_task(mut state: MutexGuard<'_, State>) {
    let task = state.task.take();
    drop(state);
    if let Some(task) = task {
        task.wake();
    }
}

/// Writes what senders queue until the link closes or every sender is gone; then the peer
/// learns the link is done (a TLS close_notify, a TCP FIN once the outbox is dropped).
async fn write_task<W>(outbox: Arc<Outbox>, mut stream: Option<W>)
where
    W: AsyncWrite + Send + Unpin + 'static,
{
    let mut out = BytesMut::new();
    while outbox.work(&mut out).await {
        loop {
            let written = match (&outbox.tcp, stream.as_mut()) {
                (Some(tcp), _) => write_tcp(tcp, &mut out).await,
                (None, Some(stream)) => write_stream(stream, &mut out).await,
                (None, None) => Ok(()),
            };
            if let Err(e) = written {
                return outbox.fail(&e);
            }
            if !outbox.more(&mut out) {
                break;
            }
        }
    }
    if let Some(stream) = stream.as_mut() {
        let _ = stream.shutdown().await;
    }
}

async fn write_tcp(tcp: &OwnedWriteHalf, out: &mut BytesMut) -> std::io::Result<()> {
    while !out.is_empty() {
        tcp.writable().await?;
        match tcp.try_write(out) {
            Ok(n) => out.advance(n),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => return Err(e),
        }
    }
    out.clear();
    Ok(())
}

async fn write_stream<W: AsyncWrite + Unpin>(
    stream: &mut W,
    out: &mut BytesMut,
) -> std::io::Result<()> {
    stream.write_all(out).await?;
    stream.flush().await?;
    out.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use futures_util::StreamExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::link::{tcp_link, Link};
    use crate::protocol::{Command, Header};

    const BOUND: Duration = Duration::from_secs(10);

    async fn pair() -> (Link, Link) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let max = 1 << 20;
        (tcp_link(a.unwrap(), max), tcp_link(b.unwrap().0, max))
    }

    fn numbered(id: u64, body: usize) -> Frame {
        let mut header = Header::request(Command::Produce, Some("q"));
        header.id = id;
        Frame::with_body(header, Bytes::from(vec![b'x'; body]))
    }

    async fn ids(link: &mut Link, n: usize) -> Vec<u64> {
        let mut ids = Vec::with_capacity(n);
        while ids.len() < n {
            let frame = tokio::time::timeout(BOUND, link.rx.next()).await.unwrap();
            ids.push(frame.unwrap().unwrap().header.id);
        }
        ids
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_way_of_sending_keeps_the_order_of_one_sender() {
        let (a, mut b) = pair().await;
        let senders: Vec<_> = (0..4u64)
            .map(|s| {
                let tx = a.tx.clone();
                tokio::spawn(async move {
                    let mut burst = Burst::default();
                    for i in 0..500u64 {
                        let frame = numbered(s << 32 | i, (i % 7) as usize * 100);
                        match i % 4 {
                            0 => tx.send(frame).await.unwrap(),
                            1 => tx.send_flushed(frame).await.unwrap(),
                            2 => {
                                if let Err(TrySendError::Full(frame)) = burst.feed(&tx, frame) {
                                    burst.flush();
                                    tx.send(frame).await.unwrap();
                                }
                            }
                            _ => {
                                burst.flush();
                                if let Err(TrySendError::Full(frame)) = tx.try_send(frame) {
                                    tx.send(frame).await.unwrap();
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        let got = ids(&mut b, 2000).await;
        for sender in senders {
            sender.await.unwrap();
        }
        for s in 0..4u64 {
            let mine: Vec<u64> = got
                .iter()
                .filter(|id| *id >> 32 == s)
                .map(|id| id & 0xffff_ffff)
                .collect();
            assert_eq!(mine, (0..500).collect::<Vec<_>>(), "sender {s}");
        }
    }

    #[tokio::test]
    async fn a_peer_that_stops_reading_fills_the_queue_and_loses_nothing() {
        let (a, mut b) = pair().await;
        let body = 64 * 1024;
        let mut sent = 0u64;
        // The socket buffers fill first, then the queue of LINK_QUEUE frames.
        let full = tokio::time::timeout(BOUND, async {
            loop {
                match a.tx.try_send(numbered(sent, body)) {
                    Ok(()) => sent += 1,
                    Err(TrySendError::Full(_)) => break,
                    Err(TrySendError::Closed(_)) => panic!("closed"),
                }
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(full.is_ok(), "the queue never filled");
        assert!(sent >= LINK_QUEUE as u64);
        // A send waits for room, which reading makes.
        let waiting = tokio::spawn({
            let tx = a.tx.clone();
            async move { tx.send(numbered(u64::MAX, 0)).await.is_ok() }
        });
        let got = ids(&mut b, sent as usize + 1).await;
        assert!(waiting.await.unwrap());
        let mut want: Vec<u64> = (0..sent).collect();
        want.push(u64::MAX);
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn the_last_sender_gone_closes_the_link_after_what_it_fed() {
        let (a, mut b) = pair().await;
        let tx = a.tx.clone();
        tx.send(numbered(1, 10)).await.unwrap();
        tx.try_feed(numbered(2, 10)).unwrap();
        let mut burst = Burst::default();
        burst.feed(&tx, numbered(3, 10)).unwrap();
        drop(burst); // flushes
        a.tx.try_feed(numbered(4, 10)).unwrap();
        drop((a, tx));
        assert_eq!(ids(&mut b, 4).await, [1, 2, 3, 4]);
        let end = tokio::time::timeout(BOUND, b.rx.next()).await.unwrap();
        assert!(end.is_none(), "the peer sees the link end");
    }

    #[tokio::test]
    async fn a_frame_past_the_limit_closes_the_link() {
        let (a, mut b) = pair().await;
        a.tx.send(numbered(1, 10)).await.unwrap();
        let refused = a.tx.try_send(numbered(2, 2 << 20));
        assert!(
            matches!(refused, Err(TrySendError::Closed(_))),
            "{refused:?}"
        );
        assert!(a.tx.send(numbered(3, 10)).await.is_err());
        assert_eq!(ids(&mut b, 1).await, [1]);
        drop(a);
        let end = tokio::time::timeout(BOUND, b.rx.next()).await.unwrap();
        assert!(end.is_none());
    }
}
