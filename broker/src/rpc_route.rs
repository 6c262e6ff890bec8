//! MQ-RPC on the broker: a `Call` is stored in its MQ like any message, and the reply a
//! responder sends with `Route` goes straight back to the caller's connection (no reply
//! queues). The wire side is in `docs/protocol.md`, "RPC commands".
//!
//! Between the two the broker remembers the caller in a bounded table keyed by (caller
//! connection, correlation id). An entry leaves the table when its reply is routed, when its
//! deadline passes (the caller then gets a `504`), or when its caller disconnects.
//!
//! Callers inside the broker (the HTTP gateway, `POST /rpc/{mq}`) take the same path through
//! [`call_once`]: the same checks, the same table and deadline, with the reply handed to the
//! waiting request instead of a connection.
//!
//! The stored request is an ordinary record: its **key** is the reply route (an opaque
//! token naming this broker process, the caller connection and the correlation id), its
//! **tag** the body's encoding as the caller sent it (none for MessagePack), its body the
//! caller's request envelope, untouched.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use qbus_client::protocol::record::encode_record;
use qbus_client::protocol::{Command, Frame, Header, RouteStats, Status, FLAG_ONEWAY};
use tokio::sync::{mpsc, oneshot};

use crate::error::BrokerError;
use crate::group_commit::{AppendWait, CommitBatch};
use crate::registry::Registry;

/// Most callers that may await a reply on one broker at once.
pub const MAX_PENDING: usize = 65_536;
/// Most callers one connection may have awaiting a reply at once.
pub const MAX_PENDING_PER_CONNECTION: usize = 16_384;
/// Deadline of a call whose header has no `timeout_ms`: the envelope's default, so a call
/// and its stored request agree.
pub const DEFAULT_TIMEOUT: Duration = qbus_client::protocol::rpc::DEFAULT_TIMEOUT;
/// Longest deadline a call may ask for; longer ones are cut to this.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// Status of the reply a caller gets when its deadline passes on the broker.
pub const STATUS_TIMEOUT: u16 = 504;
/// Longest reply route (`{instance:016x}.{conn}.{id}`, both ids `u64`), the key of a stored
/// call: what a call's record holds besides its body.
pub const MAX_ROUTE_LEN: usize = 16 + 1 + 20 + 1 + 20;

/// A call awaiting its reply.
struct Waiting {
    deadline: Instant,
    timeout: Duration,
}

/// Where a caller's replies go.
enum ReplyTo {
    /// A binary connection's outgoing frames: the replies of all its calls.
    Connection(mpsc::Sender<Frame>),
    /// A request inside the broker awaiting the reply of its one call ([`call_once`]);
    /// `None` once that reply is on its way.
    Once(Option<oneshot::Sender<Frame>>),
}

impl ReplyTo {
    /// Where the reply of one of this caller's calls goes; `None` when a one-call caller's
    /// reply was already taken.
    fn outlet(&mut self) -> Option<Outlet> {
        match self {
            ReplyTo::Connection(out) => Some(Outlet::Connection(out.clone())),
            ReplyTo::Once(once) => once.take().map(Outlet::Once),
        }
    }
}

/// Where one reply goes, taken from the table.
enum Outlet {
    Connection(mpsc::Sender<Frame>),
    Once(oneshot::Sender<Frame>),
}

impl Outlet {
    /// Passes `reply` on without waiting; false when the caller is gone. A caller reading
    /// slowly must not stall whoever sends (a responder's connection, the sweeper), so a
    /// full connection gets its reply from a task.
    fn send(self, reply: Frame) -> bool {
        match self {
            Outlet::Connection(out) => match out.try_send(reply) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(reply)) => {
                    tokio::spawn(async move {
                        let _ = out.send(reply).await;
                    });
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            },
            Outlet::Once(once) => once.send(reply).is_ok(),
        }
    }
}

/// One caller (a connection, or a request inside the broker) and its calls awaiting a reply.
struct Caller {
    reply_to: ReplyTo,
    waiting: HashMap<u64, Waiting>,
    /// Writes of this caller's calls, in order, to the task that reports a failed one;
    /// dropped with the caller, which ends that task.
    appends: Option<mpsc::UnboundedSender<(u64, AppendWait)>>,
}

#[derive(Default)]
struct Table {
    callers: HashMap<u64, Caller>,
    total: usize,
}

/// The table of MQ-RPC callers awaiting a reply, shared by every session of a broker.
pub struct Routes {
    /// Different in every broker process, so a route stored before a restart never names
    /// a caller that got the same connection and correlation ids afterwards.
    instance: u64,
    table: Mutex<Table>,
    routed: AtomicU64,
    expired: AtomicU64,
    abandoned: AtomicU64,
    unroutable: AtomicU64,
}

impl Default for Routes {
    fn default() -> Self {
        Routes::new()
    }
}

impl Routes {
    /// An empty table.
    pub fn new() -> Routes {
        Routes {
            instance: rand::random(),
            table: Mutex::new(Table::default()),
            routed: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            unroutable: AtomicU64::new(0),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().expect("route table poisoned")
    }

    /// Remembers call `id` of caller `conn` until `timeout` from now; returns its route.
    /// `reply_to` is called when this is the caller's first call awaiting a reply.
    fn register(
        &self,
        conn: u64,
        reply_to: impl FnOnce() -> ReplyTo,
        id: u64,
        timeout: Duration,
    ) -> Result<String, BrokerError> {
        let mut table = self.table();
        if table.total >= MAX_PENDING {
            return Err(BrokerError::Overloaded(format!(
                "{MAX_PENDING} MQ-RPC calls already await a reply on this broker; retry later"
            )));
        }
        let caller = table.callers.entry(conn).or_insert_with(|| Caller {
            reply_to: reply_to(),
            waiting: HashMap::new(),
            appends: None,
        });
        if caller.waiting.len() >= MAX_PENDING_PER_CONNECTION {
            return Err(BrokerError::Overloaded(format!(
                "{MAX_PENDING_PER_CONNECTION} MQ-RPC calls of this connection already await a \
                 reply; wait for some before sending more"
            )));
        }
        if caller.waiting.contains_key(&id) {
            return Err(BrokerError::BadRequest(format!(
                "correlation id {id} is already in use by a call awaiting its reply"
            )));
        }
        let deadline = Instant::now() + timeout;
        caller.waiting.insert(id, Waiting { deadline, timeout });
        table.total += 1;
        Ok(format!("{:016x}.{conn}.{id}", self.instance))
    }

    /// Hands the write of call `id` of `conn` to the task watching that caller's writes
    /// (started with its first call), which tells the caller if the write fails. One task
    /// per caller, not per call: writes complete in order, a batch at a time, so it wakes
    /// about once per batch.
    fn watch_append(self: &Arc<Self>, conn: u64, id: u64, wait: AppendWait) {
        let mut table = self.table();
        let Some(caller) = table.callers.get_mut(&conn) else {
            return; // the caller disconnected meanwhile
        };
        let appends = caller.appends.get_or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(watch_appends(Arc::downgrade(self), conn, rx));
            tx
        });
        let _ = appends.send((id, wait));
    }

    /// Drops call `id` of `conn`; false when it was not waiting.
    fn forget(&self, conn: u64, id: u64) -> bool {
        let mut table = self.table();
        let removed = table
            .callers
            .get_mut(&conn)
            .and_then(|caller| caller.waiting.remove(&id))
            .is_some();
        if removed {
            table.total -= 1;
        }
        removed
    }

    /// Takes call `id` of `conn` out of the table, with where its reply goes.
    fn take_call(&self, conn: u64, id: u64) -> Option<Outlet> {
        let mut table = self.table();
        let caller = table.callers.get_mut(&conn)?;
        caller.waiting.remove(&id)?;
        let outlet = caller.reply_to.outlet();
        table.total -= 1;
        outlet
    }

    /// Takes the call named by `route`: where its reply goes and its correlation id.
    fn take(&self, route: &str) -> Option<(Outlet, u64)> {
        let (instance, conn, id) = parse_route(route)?;
        if instance != self.instance {
            return None;
        }
        Some((self.take_call(conn, id)?, id))
    }

    /// Forgets every call of a closed connection.
    pub fn disconnect(&self, conn: u64) {
        let mut table = self.table();
        if let Some(caller) = table.callers.remove(&conn) {
            table.total -= caller.waiting.len();
            self.abandoned
                .fetch_add(caller.waiting.len() as u64, Ordering::Relaxed);
        }
    }

    /// Drops the calls whose deadline passed and tells their callers so (`504`).
    pub fn expire(&self, now: Instant) {
        let mut late = Vec::new();
        {
            let mut table = self.table();
            let mut dropped = 0;
            for caller in table.callers.values_mut() {
                let reply_to = &mut caller.reply_to;
                caller.waiting.retain(|&id, waiting| {
                    let keep = waiting.deadline > now;
                    if !keep {
                        dropped += 1;
                        late.extend(
                            reply_to
                                .outlet()
                                .map(|outlet| (outlet, id, waiting.timeout)),
                        );
                    }
                    keep
                });
            }
            table.total -= dropped;
            self.expired.fetch_add(dropped as u64, Ordering::Relaxed);
        }
        for (outlet, id, timeout) in late {
            // The caller's own timer fires at the same deadline; this reply spares callers
            // without one.
            outlet.send(Frame::new(deadline_passed(id, timeout)));
        }
    }

    /// The table's size and counters.
    pub fn stats(&self) -> RouteStats {
        let pending = self.table().total as u64;
        RouteStats {
            pending,
            capacity: MAX_PENDING as u64,
            per_connection: MAX_PENDING_PER_CONNECTION as u64,
            routed: self.routed.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            abandoned: self.abandoned.load(Ordering::Relaxed),
            unroutable: self.unroutable.load(Ordering::Relaxed),
        }
    }
}

/// Splits `"{instance:016x}.{conn}.{id}"`.
fn parse_route(route: &str) -> Option<(u64, u64, u64)> {
    let mut parts = route.split('.');
    let instance = u64::from_str_radix(parts.next()?, 16).ok()?;
    let conn = parts.next()?.parse().ok()?;
    let id = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((instance, conn, id))
}

/// The error reply of a call whose deadline of `timeout` passed with no reply routed.
fn deadline_passed(id: u64, timeout: Duration) -> Header {
    Header::error(
        Command::Call,
        id,
        Status::from_code(STATUS_TIMEOUT),
        format!("no responder routed a reply within the call's deadline of {timeout:?}"),
    )
}

/// Why an RPC command got no reply from a responder: the status and message of its error
/// reply.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    status: Status,
    message: String,
}

impl Refusal {
    fn new(status: Status, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
        }
    }

    /// The status of the error reply (`404` no such MQ, `503` no responders, `504` deadline
    /// passed, ...; see `docs/protocol.md`, "RPC commands").
    pub fn status(&self) -> Status {
        self.status
    }

    /// What went wrong, for a person.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The refusal an error reply frame carries.
    fn from_reply(header: Header) -> Refusal {
        Refusal::new(
            Status::from_code(header.status),
            header.error.unwrap_or_default(),
        )
    }
}

impl From<BrokerError> for Refusal {
    fn from(e: BrokerError) -> Self {
        Refusal::new(e.status(), e.to_string())
    }
}

/// Runs `Call`, `Route` and `QueryRoutes` for connection `conn`, whose outgoing frames go
/// to `out`; a call's record joins `batch`. Returns the reply to send now, if any: a stored
/// call is answered later, by its route or its deadline.
pub fn handle(
    registry: &Registry,
    conn: u64,
    out: &mpsc::Sender<Frame>,
    frame: Frame,
    batch: &mut CommitBatch,
) -> Option<Frame> {
    let (cmd, id, oneway) = (
        frame.header.cmd,
        frame.header.id,
        frame.header.has_flag(FLAG_ONEWAY),
    );
    let outcome = match cmd {
        Command::Call => {
            let reply_to = || ReplyTo::Connection(out.clone());
            call(registry, conn, reply_to, frame, batch).map(|()| None)
        }
        Command::Route => route(registry.routes(), frame),
        Command::QueryRoutes => query(registry.routes(), &frame.header).map(Some),
        other => Err(Refusal::new(
            Status::BadRequest,
            format!("{other:?} is not an RPC command"),
        )),
    };
    match outcome {
        Ok(reply) => reply,
        Err(refusal) if oneway => {
            tracing::debug!(?cmd, error = %refusal.message, "one-way RPC command refused");
            None
        }
        Err(refusal) => Some(Frame::new(Header::error(
            cmd,
            id,
            refusal.status,
            refusal.message,
        ))),
    }
}

/// The deadline of a call whose header asks for `timeout_ms`: [`DEFAULT_TIMEOUT`] when it
/// names none, at most [`MAX_TIMEOUT`].
pub fn call_timeout(timeout_ms: Option<u32>) -> Duration {
    timeout_ms
        .map_or(DEFAULT_TIMEOUT, |ms| Duration::from_millis(ms.into()))
        .min(MAX_TIMEOUT)
}

/// Adds a call to `batch` for its MQ and remembers its caller `conn`; `reply_to` says
/// where the caller's replies go, should this be its first call awaiting one.
fn call(
    registry: &Registry,
    conn: u64,
    reply_to: impl FnOnce() -> ReplyTo,
    frame: Frame,
    batch: &mut CommitBatch,
) -> Result<(), Refusal> {
    let Frame { header, body } = frame;
    let name = header.mq.as_deref().ok_or_else(|| {
        Refusal::new(
            Status::BadRequest,
            "a Call to a broker needs an mq (the MQ its responders consume); DirectRPC calls \
             go to an RPC server",
        )
    })?;
    let mq = registry.get(name)?;
    if !mq.has_consumers() {
        return Err(Refusal::new(
            Status::Unavailable,
            format!("no responders: nothing consumes MQ {name:?}; start an MQ-RPC service on it"),
        ));
    }
    let timeout = call_timeout(header.timeout_ms);
    let routes = registry.routes();
    let route = routes.register(conn, reply_to, header.id, timeout)?;
    let mut record = BytesMut::with_capacity(body.len() + route.len() + 64);
    let encoding = header.encoding.as_deref();
    if let Err(e) = encode_record(&mut record, 0, 0, encoding, Some(&route), &body) {
        routes.forget(conn, header.id);
        return Err(Refusal::new(Status::BadRequest, format!("bad call: {e}")));
    }
    let wait = mq.stage(batch, record, 1);
    // The caller hears nothing until the reply; only a failed write must reach it now.
    routes.watch_append(conn, header.id, wait);
    Ok(())
}

/// Makes one MQ-RPC call for a caller inside the broker (the HTTP gateway). `request` is a
/// `Call` frame (mq, timeout_ms, encoding; body: the request envelope), stored and routed
/// exactly as one from a connection. Resolves to the reply frame (status `200`, body the
/// responder's response envelope, in its `encoding`), or to why there is none: refused at
/// once (`404` no such MQ, `503` no responders, `429` table full, `400`), the write failed
/// (`500`), or no reply came within the deadline (`504`).
///
/// Dropping the future abandons the call, as closing a connection does.
pub async fn call_once(registry: &Registry, request: Frame) -> Result<Frame, Refusal> {
    let routes = registry.routes();
    // A caller of its own: its one call shares no table entry, and leaving drops it whole.
    let conn = registry.connection_id();
    let _leave = Leave { routes, conn };
    let id = request.header.id;
    let timeout = call_timeout(request.header.timeout_ms);
    let deadline = tokio::time::Instant::now() + timeout;
    let (tx, mut rx) = oneshot::channel();
    let mut batch = CommitBatch::default();
    call(
        registry,
        conn,
        move || ReplyTo::Once(Some(tx)),
        request,
        &mut batch,
    )?;
    // A failed submit fails the call's write, which the caller hears of as from the disk.
    let _ = registry.committer().submit(batch).await;
    let reply = match tokio::time::timeout_at(deadline, &mut rx).await {
        Ok(reply) => reply,
        // Answer at the deadline itself, not at the sweeper's next round.
        Err(_) if routes.forget(conn, id) => {
            routes.expired.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::from_reply(deadline_passed(id, timeout)));
        }
        // The reply left the table just as the deadline passed: it is in the channel.
        Err(_) => rx.await,
    };
    // The sender only goes unused if the table dropped the caller, which only `_leave` does.
    let reply = reply.map_err(|_| {
        Refusal::new(
            Status::Internal,
            "the call left the reply table without a reply",
        )
    })?;
    if reply.header.status == Status::Ok.code() {
        Ok(reply)
    } else {
        Err(Refusal::from_reply(reply.header))
    }
}

/// Takes a caller inside the broker out of the table however its call ends; a call still
/// waiting (its HTTP client went away) counts as abandoned, as a closed connection's do.
struct Leave<'a> {
    routes: &'a Routes,
    conn: u64,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.routes.disconnect(self.conn);
    }
}

/// Waits for the writes of one caller's calls in order; a call whose write failed is
/// dropped from the table and its caller told at once.
async fn watch_appends(
    routes: Weak<Routes>,
    conn: u64,
    mut appends: mpsc::UnboundedReceiver<(u64, AppendWait)>,
) {
    while let Some((id, wait)) = appends.recv().await {
        let Err(e) = wait.wait().await else { continue };
        let Some(routes) = routes.upgrade() else {
            return;
        };
        if let Some(outlet) = routes.take_call(conn, id) {
            let e = BrokerError::Store(e);
            outlet.send(Frame::new(Header::error(
                Command::Call,
                id,
                e.status(),
                e.to_string(),
            )));
        }
    }
}

/// Passes a responder's reply to the caller named by its route.
fn route(routes: &Routes, frame: Frame) -> Result<Option<Frame>, Refusal> {
    let Frame { header, body } = frame;
    let route = header.route.as_deref().ok_or_else(|| {
        Refusal::new(
            Status::BadRequest,
            "a Route needs a route (the key of the request record)",
        )
    })?;
    let gone = |why: &str| {
        routes.unroutable.fetch_add(1, Ordering::Relaxed);
        Refusal::new(
            Status::NotFound,
            format!("no caller awaits route {route:?}: {why}"),
        )
    };
    let Some((outlet, id)) = routes.take(route) else {
        return Err(gone(
            "its deadline passed, it disconnected, or the call was stored before this broker \
             restarted",
        ));
    };
    let reply = Header {
        cmd: Command::Call,
        id,
        status: Status::Ok.code(),
        encoding: header.encoding.clone(),
        ..Header::default()
    };
    if !outlet.send(Frame::with_body(reply, body)) {
        return Err(gone("it disconnected"));
    }
    routes.routed.fetch_add(1, Ordering::Relaxed);
    if header.has_flag(FLAG_ONEWAY) {
        return Ok(None);
    }
    Ok(Some(Frame::new(Header::reply_to(&header))))
}

/// The reply to `QueryRoutes`.
fn query(routes: &Routes, request: &Header) -> Result<Frame, Refusal> {
    let body = rmp_serde::to_vec_named(&routes.stats())
        .map_err(|e| Refusal::new(Status::Internal, format!("cannot encode the reply: {e}")))?;
    Ok(Frame::with_body(Header::reply_to(request), body.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel() -> (mpsc::Sender<Frame>, mpsc::Receiver<Frame>) {
        mpsc::channel(16)
    }

    /// Replies to the connection whose outgoing frames go to `out`.
    fn to(out: &mpsc::Sender<Frame>) -> impl FnOnce() -> ReplyTo + '_ {
        move || ReplyTo::Connection(out.clone())
    }

    #[test]
    fn a_route_names_one_call_of_one_broker_once() {
        let routes = Routes::new();
        let (out, _rx) = channel();
        let route = routes.register(7, to(&out), 42, DEFAULT_TIMEOUT).unwrap();
        assert_eq!(routes.stats().pending, 1);
        let other = Routes::new();
        assert!(other.take(&route).is_none(), "another broker instance");
        let (_, id) = routes.take(&route).unwrap();
        assert_eq!(id, 42);
        assert!(routes.take(&route).is_none(), "taken once");
        assert_eq!(routes.stats().pending, 0);
        for junk in ["", "x", "1.2", "zz.1.2", "1.2.3.4", "1.-2.3"] {
            assert!(routes.take(junk).is_none(), "{junk}");
        }
    }

    #[test]
    fn disconnect_frees_only_that_callers_entries() {
        let routes = Routes::new();
        let (out, _rx) = channel();
        for id in 0..3 {
            routes.register(1, to(&out), id, DEFAULT_TIMEOUT).unwrap();
        }
        let kept = routes.register(2, to(&out), 0, DEFAULT_TIMEOUT).unwrap();
        routes.disconnect(1);
        let stats = routes.stats();
        assert_eq!((stats.pending, stats.abandoned), (1, 3));
        assert!(routes.take(&kept).is_some());
    }

    #[test]
    fn expired_calls_are_dropped_and_their_callers_told() {
        let routes = Routes::new();
        let (out, mut rx) = channel();
        routes
            .register(1, to(&out), 5, Duration::from_millis(10))
            .unwrap();
        routes
            .register(1, to(&out), 6, Duration::from_secs(60))
            .unwrap();
        routes.expire(Instant::now() + Duration::from_secs(1));
        let stats = routes.stats();
        assert_eq!((stats.pending, stats.expired), (1, 1));
        let told = rx.try_recv().unwrap();
        assert_eq!(
            (told.header.cmd, told.header.id, told.header.status),
            (Command::Call, 5, STATUS_TIMEOUT)
        );
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_one_call_caller_gets_its_reply_or_its_timeout_once() {
        let routes = Routes::new();
        let (tx, mut rx) = oneshot::channel();
        let route = routes
            .register(1, move || ReplyTo::Once(Some(tx)), 0, DEFAULT_TIMEOUT)
            .unwrap();
        let (outlet, id) = routes.take(&route).unwrap();
        assert!(outlet.send(Frame::new(Header::reply_to(&Header::default()))));
        assert_eq!((id, rx.try_recv().unwrap().header.status), (0, 200));

        let (tx, mut rx) = oneshot::channel();
        routes
            .register(2, move || ReplyTo::Once(Some(tx)), 0, Duration::ZERO)
            .unwrap();
        routes.expire(Instant::now() + Duration::from_secs(1));
        assert_eq!(rx.try_recv().unwrap().header.status, STATUS_TIMEOUT);
        let stats = routes.stats();
        assert_eq!((stats.pending, stats.routed, stats.expired), (0, 0, 1));
    }

    #[test]
    fn routes_fit_their_length_bound() {
        let routes = Routes::new();
        let (out, _rx) = channel();
        let route = routes
            .register(u64::MAX, to(&out), u64::MAX, DEFAULT_TIMEOUT)
            .unwrap();
        assert_eq!(route.len(), MAX_ROUTE_LEN);
    }

    #[test]
    fn the_table_is_bounded_and_ids_are_unique() {
        let routes = Routes::new();
        let (out, _rx) = channel();
        routes.register(1, to(&out), 1, DEFAULT_TIMEOUT).unwrap();
        assert_eq!(
            routes
                .register(1, to(&out), 1, DEFAULT_TIMEOUT)
                .unwrap_err()
                .status(),
            Status::BadRequest
        );
        for id in 2..=MAX_PENDING_PER_CONNECTION as u64 {
            routes.register(1, to(&out), id, DEFAULT_TIMEOUT).unwrap();
        }
        assert_eq!(
            routes
                .register(1, to(&out), 0, DEFAULT_TIMEOUT)
                .unwrap_err()
                .status(),
            Status::Overloaded
        );
        assert!(routes.forget(1, 1));
        assert!(!routes.forget(1, 1));
    }
}
