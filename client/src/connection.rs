//! One multiplexed connection: many requests in flight, matched to replies by correlation id,
//! reconnected on demand with jittered exponential backoff, kept honest by heartbeats.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use qbus_wire::Backoff;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{ClientError, Result};
use crate::link::{Burst, Connector, FrameSender, FrameStream};
use crate::protocol::{
    Command, Credentials, Frame, Header, ServerInfo, Status, WireError, PROTOCOL_VERSION,
};

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ConnectionOptions {
    /// Deadline for one connect, covering TCP, handshake and retries with backoff. Default 10 s.
    pub connect_timeout: Duration,
    /// Deadline for a request-reply (not for long-poll fetches, which add their own wait).
    /// Default 30 s.
    pub request_timeout: Duration,
    /// Liveness: a heartbeat is sent after this much silence from the peer, and a peer
    /// silent for three to four of these periods (no reply, no heartbeat answer) is taken
    /// as hung: the connection closes and its pending requests fail with
    /// [`ClientError::Disconnected`]. Default 5 s (a hung peer is noticed within 15–20 s).
    pub heartbeat: Duration,
    /// Who to log in as in `Hello` (protocol 3). Default none: served as anonymous where
    /// the server allows it. Bad credentials fail the connect at once with
    /// [`ClientError::Server`] and status 401, without retrying.
    pub credentials: Option<Credentials>,
}

impl Default for ConnectionOptions {
    fn default() -> Self {
        ConnectionOptions {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            heartbeat: Duration::from_secs(5),
            credentials: None,
        }
    }
}

type Pending = Mutex<Option<HashMap<u64, oneshot::Sender<Frame>>>>;

/// Names one link of a connection (each reconnect opens a new one). A broker lets go of a
/// link's deliveries when it closes, so an ack sent over a later link may or may not count:
/// acks go over their delivery's link or not at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LinkId(u64);

/// A connected link and the requests waiting on it.
struct Live {
    link: LinkId,
    tx: FrameSender,
    /// `None` once the link is dead, so no request can be registered after the final drain.
    pending: Pending,
    /// Fires when the link is closed (or the whole connection shuts down): it stops the
    /// dispatcher and frees senders waiting for room in a queue that a hung peer no longer
    /// drains.
    closed: CancellationToken,
    addr: String,
    /// Why the peer's stream ended, when it ended in an error: a TLS alert (a client
    /// certificate refused) arrives as the first read's error, after the handshake.
    ended: OnceLock<OpenError>,
}

/// Why a link could not be opened; a permanent failure (a certificate that does not
/// verify, a server refusing the handshake) is not retried within the connect deadline.
#[derive(Debug, Clone)]
struct OpenError {
    reason: String,
    permanent: bool,
    /// The server refused the credentials: the connect fails with its reply.
    refusal: Option<ClientError>,
}

impl From<String> for OpenError {
    fn from(reason: String) -> Self {
        OpenError {
            reason,
            permanent: false,
            refusal: None,
        }
    }
}

impl OpenError {
    /// Failures that trying again cannot mend: TLS refusals (rustls reports them as
    /// invalid data, as it does bytes that are not TLS).
    fn from_io(e: &std::io::Error) -> OpenError {
        OpenError {
            reason: e.to_string(),
            permanent: e.kind() == std::io::ErrorKind::InvalidData,
            refusal: None,
        }
    }
}

impl Live {
    fn register(&self, id: u64) -> Result<oneshot::Receiver<Frame>> {
        let (tx, rx) = oneshot::channel();
        let mut pending = self.pending.lock().expect("pending map poisoned");
        match pending.as_mut() {
            Some(map) => {
                map.insert(id, tx);
                Ok(rx)
            }
            None => Err(self.disconnected()),
        }
    }

    fn forget(&self, id: u64) {
        if let Some(map) = self.pending.lock().expect("pending map poisoned").as_mut() {
            map.remove(&id);
        }
    }

    fn complete(&self, frame: Frame) {
        let waiter = self
            .pending
            .lock()
            .expect("pending map poisoned")
            .as_mut()
            .and_then(|map| map.remove(&frame.header.id));
        if let Some(waiter) = waiter {
            let _ = waiter.send(frame);
        }
    }

    /// Fails every pending request (their receivers see the sender dropped) and stops the
    /// link's dispatcher and waiting senders.
    fn close(&self) {
        self.pending.lock().expect("pending map poisoned").take();
        self.closed.cancel();
    }

    /// Queues `frame` once the queue has room; fails (with the frame not sent) if the link
    /// closes first.
    async fn queue(&self, frame: Frame) -> Result<()> {
        tokio::select! {
            sent = self.tx.send(frame) => sent.map_err(|_| self.disconnected()),
            _ = self.closed.cancelled() => Err(self.disconnected()),
        }
    }

    fn disconnected(&self) -> ClientError {
        ClientError::Disconnected {
            addr: self.addr.clone(),
        }
    }
}

struct Inner {
    connector: Box<dyn Connector>,
    options: ConnectionOptions,
    next_id: AtomicU64,
    /// Numbers links from 1, so `LinkId(0)` is never a live one.
    next_link: AtomicU64,
    live: ArcSwapOption<Live>,
    connecting: tokio::sync::Mutex<()>,
    server: ArcSwapOption<ServerInfo>,
    shutdown: CancellationToken,
    /// Receivers of the frames the peer sends unasked (id `0`, not a reply): each gets every
    /// one; a full or closed receiver misses it (the broker asks again).
    pushes: Mutex<Vec<mpsc::Sender<Frame>>>,
    /// Requests sent again on every new link, so what they told the peer about this
    /// connection (say, "I answer checks for group G") outlives a reconnect.
    on_connect: Mutex<Vec<Header>>,
}

impl Inner {
    fn push(&self, frame: Frame) {
        let mut pushes = self.pushes.lock().expect("push list poisoned");
        pushes.retain(|to| !to.is_closed());
        for to in pushes.iter() {
            let _ = to.try_send(frame.clone());
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A cheap-to-clone handle on one connection that the library drives in the background.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("addr", &self.inner.connector.addr())
            .finish()
    }
}

impl Connection {
    /// A connection that opens links with `connector` when first needed.
    pub fn new(connector: impl Connector, options: ConnectionOptions) -> Connection {
        Connection {
            inner: Arc::new(Inner {
                connector: Box::new(connector),
                options,
                next_id: AtomicU64::new(1),
                next_link: AtomicU64::new(1),
                live: ArcSwapOption::empty(),
                connecting: tokio::sync::Mutex::new(()),
                server: ArcSwapOption::empty(),
                shutdown: CancellationToken::new(),
                pushes: Mutex::default(),
                on_connect: Mutex::default(),
            }),
        }
    }

    /// The peer's address.
    pub fn addr(&self) -> String {
        self.inner.connector.addr()
    }

    /// The settings in force.
    pub fn options(&self) -> &ConnectionOptions {
        &self.inner.options
    }

    /// True while a link is up (the next request does not have to connect first).
    pub fn is_connected(&self) -> bool {
        self.inner.live.load().is_some()
    }

    /// What the server said in the handshake, once connected.
    pub fn server_info(&self) -> Option<Arc<ServerInfo>> {
        self.inner.server.load_full()
    }

    /// Sends `to` every frame the peer sends unasked from now on (until `to` is dropped).
    pub(crate) fn subscribe_pushes(&self, to: mpsc::Sender<Frame>) {
        self.inner
            .pushes
            .lock()
            .expect("push list poisoned")
            .push(to);
    }

    /// Sends `request` again (its reply unread) on every link opened from now on.
    pub(crate) fn repeat_on_connect(&self, request: Header) {
        let mut repeated = self.inner.on_connect.lock().expect("repeat list poisoned");
        if !repeated.contains(&request) {
            repeated.push(request);
        }
    }

    /// Stops repeating `request` (see [`repeat_on_connect`](Self::repeat_on_connect)).
    pub(crate) fn stop_repeating(&self, request: &Header) {
        let mut repeated = self.inner.on_connect.lock().expect("repeat list poisoned");
        repeated.retain(|r| r != request);
    }

    /// A handle that does not keep the connection open.
    pub(crate) fn downgrade(&self) -> WeakConnection {
        WeakConnection(Arc::downgrade(&self.inner))
    }

    /// Connects now if not connected (within the connect deadline).
    pub async fn ensure_connected(&self) -> Result<()> {
        self.live().await.map(drop)
    }

    /// Sends a request and returns a future for its reply. The request is queued in call
    /// order, so requests sent one after another from one task keep their order on the wire.
    pub async fn send(&self, frame: Frame) -> Result<PendingReply> {
        // The common case (connected, room in the queue) takes no await, which keeps this
        // future small: it is allocated and moved with every request's.
        match self.try_send(frame) {
            Attempt::Done(sent) => sent,
            Attempt::Wait(frame) => Box::pin(self.send_waiting(*frame)).await,
        }
    }

    /// Sends at once when connected with room in the queue.
    fn try_send(&self, mut frame: Frame) -> Attempt {
        let Some(live) = self.inner.live.load_full() else {
            return Attempt::Wait(Box::new(frame));
        };
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        frame.header.id = id;
        let rx = match live.register(id) {
            Ok(rx) => rx,
            Err(e) => return Attempt::Done(Err(e)),
        };
        match live.tx.try_send(frame) {
            Ok(()) => Attempt::Done(Ok(PendingReply {
                rx,
                live: Some(live),
                id,
            })),
            Err(mpsc::error::TrySendError::Full(frame)) => {
                live.forget(id);
                Attempt::Wait(Box::new(frame))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                live.forget(id);
                Attempt::Done(Err(live.disconnected()))
            }
        }
    }

    /// Sends once connected and the queue has room.
    async fn send_waiting(&self, frame: Frame) -> Result<PendingReply> {
        let live = self.live().await?;
        self.send_over(live, frame).await
    }

    /// Sends a request over link `link` only: once that link has closed, fails with
    /// [`ClientError::Disconnected`] without sending (and without connecting again).
    pub(crate) async fn send_on(&self, link: LinkId, frame: Frame) -> Result<PendingReply> {
        let live = self.live_on(link)?;
        self.send_over(live, frame).await
    }

    /// Link `link` while it is the live one; [`ClientError::Disconnected`] once it closed.
    fn live_on(&self, link: LinkId) -> Result<Arc<Live>> {
        match self.inner.live.load_full() {
            Some(live) if live.link == link => Ok(live),
            _ => Err(ClientError::Disconnected { addr: self.addr() }),
        }
    }

    /// Sends on `live` once its queue has room.
    async fn send_over(&self, live: Arc<Live>, mut frame: Frame) -> Result<PendingReply> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        frame.header.id = id;
        let rx = live.register(id)?;
        if let Err(e) = live.queue(frame).await {
            live.forget(id);
            return Err(e);
        }
        Ok(PendingReply {
            rx,
            live: Some(live),
            id,
        })
    }

    /// Sends a request and waits for its reply, up to the request timeout plus `extra` (the
    /// long-poll wait of a fetch).
    pub async fn request_with_wait(&self, frame: Frame, extra: Duration) -> Result<Frame> {
        self.request_with_link(frame, extra)
            .await
            .map(|(reply, _)| reply)
    }

    /// [`request_with_wait`](Connection::request_with_wait), also naming the link the
    /// reply came over.
    pub(crate) async fn request_with_link(
        &self,
        frame: Frame,
        extra: Duration,
    ) -> Result<(Frame, LinkId)> {
        let limit = self.inner.options.request_timeout + extra;
        let pending = self.send(frame).await?;
        let link = pending.live.as_ref().map_or(LinkId(0), |live| live.link);
        match tokio::time::timeout(limit, pending).await {
            Ok(reply) => reply.map(|reply| (reply, link)),
            Err(_) => Err(ClientError::Timeout(limit)),
        }
    }

    /// Sends a request and waits for its reply, up to the request timeout.
    pub async fn request(&self, frame: Frame) -> Result<Frame> {
        self.request_with_wait(frame, Duration::ZERO).await
    }

    /// Sends a frame that gets no reply. `Ok` means it was queued on a live connection, not
    /// that the peer received it.
    pub async fn send_oneway(&self, frame: Frame) -> Result<()> {
        let live = self.live().await?;
        live.queue(frame).await
    }

    /// Sends a frame that gets no reply over link `link` only, as
    /// [`send_on`](Connection::send_on) sends a request.
    pub(crate) async fn send_oneway_on(&self, link: LinkId, frame: Frame) -> Result<()> {
        self.live_on(link)?.queue(frame).await
    }

    /// Queues a frame that gets no reply over link `link` without waiting: `Ok(None)` once
    /// queued, `Ok(Some(frame))` when the queue is full (send it with
    /// [`send_oneway_on`](Connection::send_oneway_on)), an error once that link has closed.
    /// With a `burst`, the frame is fed to it, to leave at its flush.
    pub(crate) fn try_send_oneway_on(
        &self,
        link: LinkId,
        frame: Frame,
        burst: Option<&mut Burst>,
    ) -> Result<Option<Frame>> {
        let live = self.live_on(link)?;
        match live.tx.try_send_in(frame, burst) {
            Ok(()) => Ok(None),
            Err(mpsc::error::TrySendError::Full(frame)) => Ok(Some(frame)),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(live.disconnected()),
        }
    }

    /// The protocol version the server said in the handshake of link `link`; `None` once
    /// that link has closed.
    pub(crate) fn link_protocol(&self, link: LinkId) -> Option<u32> {
        let live = self.inner.live.load();
        // The server's `Hello` reply is stored before its link goes live, and replaced only
        // by the next link's.
        (live.as_ref()?.link == link)
            .then(|| self.inner.server.load().as_ref().map_or(1, |s| s.protocol))
    }

    /// Closes the current link, if any: its pending requests fail with
    /// [`ClientError::Disconnected`] (in doubt: they may have taken effect) and the next
    /// request connects again. For a peer known to be gone before the link notices.
    pub(crate) fn drop_link(&self) -> bool {
        let Some(live) = self.inner.live.swap(None) else {
            return false;
        };
        live.close();
        true
    }

    async fn live(&self) -> Result<Arc<Live>> {
        if let Some(live) = self.inner.live.load_full() {
            return Ok(live);
        }
        // Boxed so the connect loop's large state is not part of every request's future
        // (it is copied, and allocated with it, on every send).
        Box::pin(self.reconnect()).await
    }

    /// Connects (or waits for another caller's connect) within the connect deadline.
    async fn reconnect(&self) -> Result<Arc<Live>> {
        let _one_at_a_time = self.inner.connecting.lock().await;
        if let Some(live) = self.inner.live.load_full() {
            return Ok(live);
        }
        let started = Instant::now();
        let deadline = started + self.inner.options.connect_timeout;
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(2));
        loop {
            let (reason, permanent) = match tokio::time::timeout_at(deadline, self.open()).await {
                Ok(Ok(live)) => return Ok(live),
                // The same credentials would be refused again.
                Ok(Err(OpenError {
                    refusal: Some(e), ..
                })) => return Err(e),
                Ok(Err(e)) => (e.reason, e.permanent),
                Err(_) => ("timed out".to_owned(), false),
            };
            let jittered = backoff.next_wait();
            if permanent || Instant::now() + jittered >= deadline {
                return Err(ClientError::Connect {
                    addr: self.addr(),
                    waited: started.elapsed(),
                    reason,
                });
            }
            tracing::debug!(addr = %self.addr(), %reason, retry_in = ?jittered, "connect failed");
            tokio::time::sleep(jittered).await;
        }
    }

    /// Opens a link, shakes hands and starts the dispatcher.
    async fn open(&self) -> std::result::Result<Arc<Live>, OpenError> {
        let link = self
            .inner
            .connector
            .connect()
            .await
            .map_err(|e| OpenError::from_io(&e))?;
        let live = Arc::new(Live {
            link: LinkId(self.inner.next_link.fetch_add(1, Ordering::Relaxed)),
            tx: link.tx,
            pending: Mutex::new(Some(HashMap::new())),
            closed: self.inner.shutdown.child_token(),
            addr: self.addr(),
            ended: OnceLock::new(),
        });
        tokio::spawn(dispatch(
            live.clone(),
            link.rx,
            self.inner.options.heartbeat,
            Arc::downgrade(&self.inner),
        ));
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut hello = Header::request(Command::Hello, None);
        hello.id = id;
        let retry = OpenError::from;
        let rx = live.register(id).map_err(|e| retry(e.to_string()))?;
        let body = hello_body(self.inner.options.credentials.clone()).map_err(retry)?;
        live.tx
            .send(Frame::with_body(hello, body.into()))
            .await
            .map_err(|_| retry("closed during handshake".to_owned()))?;
        let reply = PendingReply {
            rx,
            live: Some(live.clone()),
            id,
        }
        .await
        .map_err(|e| handshake_failed(&live, e))?;
        let info: ServerInfo = rmp_serde::from_slice(&reply.body)
            .map_err(|e| retry(format!("handshake reply is not from a qbus server: {e}")))?;
        self.inner.server.store(Some(Arc::new(info)));
        let repeated = self
            .inner
            .on_connect
            .lock()
            .expect("repeat list poisoned")
            .clone();
        for mut request in repeated {
            request.id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            live.tx
                .send(Frame::new(request))
                .await
                .map_err(|_| retry("closed during handshake".to_owned()))?;
        }
        self.inner.live.store(Some(live.clone()));
        Ok(live)
    }
}

/// Why the handshake on `live` failed with `e`: the error the stream ended with when there
/// was one, since the reply's loss only says the link closed.
fn handshake_failed(live: &Live, e: ClientError) -> OpenError {
    if let Some(ended) = live.ended.get() {
        return OpenError {
            reason: format!("handshake failed: {}", ended.reason),
            permanent: ended.permanent,
            refusal: None,
        };
    }
    // A server that refuses the handshake (a plain-text client on a TLS port, say) refuses
    // it again; only a busy one is worth another try.
    let status = e.status();
    let permanent =
        status.is_some_and(|s| (400..500).contains(&s.code()) && s != Status::Overloaded);
    let credentials = matches!(status, Some(Status::Unauthorized | Status::Forbidden));
    OpenError {
        reason: format!("handshake failed: {e}"),
        permanent,
        refusal: credentials.then_some(e),
    }
}

/// The body of a client's `Hello`: what it speaks and, if any, its credentials.
pub(crate) fn hello_body(credentials: Option<Credentials>) -> std::result::Result<Vec<u8>, String> {
    rmp_serde::to_vec_named(&ServerInfo {
        protocol: PROTOCOL_VERSION,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        max_frame: 0,
        credentials,
        identity: None,
    })
    .map_err(|e| e.to_string())
}

/// Routes replies to their waiters until the link ends, then fails whatever is left.
async fn dispatch(live: Arc<Live>, mut rx: FrameStream, heartbeat: Duration, inner: Weak<Inner>) {
    // Made once, not per frame: each fresh wait would register with the token again.
    let closed = live.closed.clone();
    let closed = closed.cancelled();
    tokio::pin!(closed);
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    // Set per frame and turned into `last_heard` at the next tick: reading the clock for
    // every reply would cost more than the frame's own handling.
    let mut heard = false;
    loop {
        tokio::select! {
            item = rx.next() => match item {
                Some(Ok(frame)) => {
                    heard = true;
                    if frame.header.id != 0 {
                        live.complete(frame);
                    } else if !frame.header.is_reply() {
                        if let Some(inner) = inner.upgrade() {
                            inner.push(frame);
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(addr = %live.addr, error = %e, "closing connection");
                    let ended = match &e {
                        WireError::Io(io) => OpenError::from_io(io),
                        other => OpenError::from(other.to_string()),
                    };
                    let _ = live.ended.set(ended);
                    break;
                }
                None => break,
            },
            _ = ticker.tick() => {
                if std::mem::take(&mut heard) {
                    last_heard = Instant::now();
                }
                let silent = last_heard.elapsed();
                if silent >= heartbeat * 3 {
                    tracing::warn!(addr = %live.addr, ?silent, "peer silent, closing connection");
                    break;
                }
                if silent >= heartbeat {
                    let _ = live.tx.try_send(Frame::new(Header::request(Command::Heartbeat, None)));
                }
            }
            _ = &mut closed => break,
        }
    }
    live.close();
    if let Some(inner) = inner.upgrade() {
        let current = inner.live.load();
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &live)) {
            inner.live.store(None);
        }
    }
}

/// A [`Connection`] that does not keep it open (see [`Connection::downgrade`]).
#[derive(Clone)]
pub(crate) struct WeakConnection(Weak<Inner>);

impl WeakConnection {
    /// The connection, while some [`Connection`] still holds it.
    pub(crate) fn upgrade(&self) -> Option<Connection> {
        self.0.upgrade().map(|inner| Connection { inner })
    }

    /// True when this is a handle on `connection` (not on another one to the same peer).
    pub(crate) fn is(&self, connection: &Connection) -> bool {
        std::ptr::eq(self.0.as_ptr(), Arc::as_ptr(&connection.inner))
    }
}

/// What [`Connection::try_send`] made of a request.
enum Attempt {
    /// Sent, or failed for good.
    Done(Result<PendingReply>),
    /// Not connected, or the queue is full: send it the waiting way.
    Wait(Box<Frame>),
}

/// The reply to one request; resolves to an error for error statuses and lost connections.
/// Dropping it forgets the request.
pub struct PendingReply {
    rx: oneshot::Receiver<Frame>,
    live: Option<Arc<Live>>,
    id: u64,
}

impl std::fmt::Debug for PendingReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingReply")
            .field("id", &self.id)
            .finish()
    }
}

impl Future for PendingReply {
    type Output = Result<Frame>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let outcome = match Pin::new(&mut self.rx).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(outcome) => outcome,
        };
        let live = self.live.take();
        Poll::Ready(match outcome {
            Ok(frame) => check_status(frame),
            Err(_) => Err(match live {
                Some(live) => live.disconnected(),
                None => ClientError::Closed,
            }),
        })
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        if let Some(live) = self.live.take() {
            live.forget(self.id);
        }
    }
}

/// Turns an error reply into [`ClientError::Server`].
pub(crate) fn check_status(frame: Frame) -> Result<Frame> {
    let status = Status::from_code(frame.header.status);
    if status == Status::Ok {
        Ok(frame)
    } else {
        Err(ClientError::Server {
            status,
            message: frame.header.error.unwrap_or_default(),
        })
    }
}
