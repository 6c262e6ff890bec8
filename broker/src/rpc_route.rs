//! MQ-RPC on the broker: a `Call` is stored in its MQ like any message, and the reply a
//! responder sends with `Route` goes straight back to the caller's connection (no reply
//! queues). The wire side is in `docs/protocol.md`, "RPC commands".
//!
//! Between the two the broker remembers the caller in a bounded table keyed by (caller
//! connection, correlation id). An entry leaves the table when its reply is routed, when its
//! deadline passes (the caller then gets a `504`), or when its caller disconnects.
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
use tokio::sync::mpsc;

use crate::error::BrokerError;
use crate::group_commit::AppendWait;
use crate::registry::Registry;

/// Most callers that may await a reply on one broker at once.
pub const MAX_PENDING: usize = 65_536;
/// Most callers one connection may have awaiting a reply at once.
pub const MAX_PENDING_PER_CONNECTION: usize = 16_384;
/// Deadline of a call whose header has no `timeout_ms`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest deadline a call may ask for; longer ones are cut to this.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// Status of the reply a caller gets when its deadline passes on the broker.
pub const STATUS_TIMEOUT: u16 = 504;

/// A call awaiting its reply.
struct Waiting {
    deadline: Instant,
    timeout: Duration,
}

/// One caller connection and its calls awaiting a reply.
struct Caller {
    /// The connection's outgoing frames: where its replies go.
    out: mpsc::Sender<Frame>,
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

    /// Remembers call `id` of connection `conn` until `timeout` from now; returns its route.
    fn register(
        &self,
        conn: u64,
        out: &mpsc::Sender<Frame>,
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
            out: out.clone(),
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
            tokio::spawn(watch_appends(
                Arc::downgrade(self),
                conn,
                caller.out.clone(),
                rx,
            ));
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

    /// Takes the caller named by `route`: its connection and its correlation id.
    fn take(&self, route: &str) -> Option<(mpsc::Sender<Frame>, u64)> {
        let (instance, conn, id) = parse_route(route)?;
        if instance != self.instance {
            return None;
        }
        let mut table = self.table();
        let caller = table.callers.get_mut(&conn)?;
        caller.waiting.remove(&id)?;
        let out = caller.out.clone();
        table.total -= 1;
        Some((out, id))
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
            for caller in table.callers.values_mut() {
                let out = &caller.out;
                caller.waiting.retain(|&id, waiting| {
                    let keep = waiting.deadline > now;
                    if !keep {
                        late.push((out.clone(), id, waiting.timeout));
                    }
                    keep
                });
            }
            table.total -= late.len();
        }
        self.expired.fetch_add(late.len() as u64, Ordering::Relaxed);
        for (out, id, timeout) in late {
            let header = Header::error(
                Command::Call,
                id,
                Status::from_code(STATUS_TIMEOUT),
                format!("no responder routed a reply within the call's deadline of {timeout:?}"),
            );
            // The caller's own timer fires at the same deadline; this reply only spares
            // callers without one, so it is not worth waiting for room.
            let _ = out.try_send(Frame::new(header));
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

/// Why an RPC command was refused: the status and message of its error reply.
#[derive(Debug)]
struct Refusal {
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
}

impl From<BrokerError> for Refusal {
    fn from(e: BrokerError) -> Self {
        Refusal::new(e.status(), e.to_string())
    }
}

/// Runs `Call`, `Route` and `QueryRoutes` for connection `conn`, whose outgoing frames go
/// to `out`. Returns the reply to send now, if any: a stored call is answered later, by its
/// route or its deadline.
pub async fn handle(
    registry: &Registry,
    conn: u64,
    out: &mpsc::Sender<Frame>,
    frame: Frame,
) -> Option<Frame> {
    let (cmd, id, oneway) = (
        frame.header.cmd,
        frame.header.id,
        frame.header.has_flag(FLAG_ONEWAY),
    );
    let outcome = match cmd {
        Command::Call => call(registry, conn, out, frame).await.map(|()| None),
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

/// Stores a call in its MQ and remembers its caller.
async fn call(
    registry: &Registry,
    conn: u64,
    out: &mpsc::Sender<Frame>,
    frame: Frame,
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
    let timeout = header
        .timeout_ms
        .map_or(DEFAULT_TIMEOUT, |ms| Duration::from_millis(ms.into()))
        .min(MAX_TIMEOUT);
    let routes = registry.routes();
    let route = routes.register(conn, out, header.id, timeout)?;
    let mut record = BytesMut::with_capacity(body.len() + route.len() + 64);
    let stored = match encode_record(
        &mut record,
        0,
        0,
        header.encoding.as_deref(),
        Some(&route),
        &body,
    ) {
        Ok(_) => mq
            .submit(registry.committer(), record, 1)
            .await
            .map_err(Refusal::from),
        Err(e) => Err(Refusal::new(Status::BadRequest, format!("bad call: {e}"))),
    };
    let wait = match stored {
        Ok(wait) => wait,
        Err(refusal) => {
            routes.forget(conn, header.id);
            return Err(refusal);
        }
    };
    // The caller hears nothing until the reply; only a failed write must reach it now.
    routes.watch_append(conn, header.id, wait);
    Ok(())
}

/// Waits for the writes of one caller's calls in order; a call whose write failed is
/// dropped from the table and its caller told at once.
async fn watch_appends(
    routes: Weak<Routes>,
    conn: u64,
    out: mpsc::Sender<Frame>,
    mut appends: mpsc::UnboundedReceiver<(u64, AppendWait)>,
) {
    while let Some((id, wait)) = appends.recv().await {
        let Err(e) = wait.wait().await else { continue };
        let Some(routes) = routes.upgrade() else {
            return;
        };
        if routes.forget(conn, id) {
            let e = BrokerError::Store(e);
            let reply = Header::error(Command::Call, id, e.status(), e.to_string());
            let _ = out.send(Frame::new(reply)).await;
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
    let Some((out, id)) = routes.take(route) else {
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
    match out.try_send(Frame::with_body(reply, body)) {
        Ok(()) => {}
        // A caller reading slowly must not stall the responder's connection.
        Err(mpsc::error::TrySendError::Full(reply)) => {
            tokio::spawn(async move {
                let _ = out.send(reply).await;
            });
        }
        Err(mpsc::error::TrySendError::Closed(_)) => return Err(gone("it disconnected")),
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

    #[test]
    fn a_route_names_one_call_of_one_broker_once() {
        let routes = Routes::new();
        let (out, _rx) = channel();
        let route = routes.register(7, &out, 42, DEFAULT_TIMEOUT).unwrap();
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
            routes.register(1, &out, id, DEFAULT_TIMEOUT).unwrap();
        }
        let kept = routes.register(2, &out, 0, DEFAULT_TIMEOUT).unwrap();
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
            .register(1, &out, 5, Duration::from_millis(10))
            .unwrap();
        routes
            .register(1, &out, 6, Duration::from_secs(60))
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
    fn the_table_is_bounded_and_ids_are_unique() {
        let routes = Routes::new();
        let (out, _rx) = channel();
        routes.register(1, &out, 1, DEFAULT_TIMEOUT).unwrap();
        assert_eq!(
            routes
                .register(1, &out, 1, DEFAULT_TIMEOUT)
                .unwrap_err()
                .status(),
            Status::BadRequest
        );
        for id in 2..=MAX_PENDING_PER_CONNECTION as u64 {
            routes.register(1, &out, id, DEFAULT_TIMEOUT).unwrap();
        }
        assert_eq!(
            routes
                .register(1, &out, 0, DEFAULT_TIMEOUT)
                .unwrap_err()
                .status(),
            Status::Overloaded
        );
        assert!(routes.forget(1, 1));
        assert!(!routes.forget(1, 1));
    }
}
