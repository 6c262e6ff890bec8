//! The reply table of MQ-RPC: the callers awaiting a reply, keyed by (caller connection,
//! correlation id), bounded per broker and per connection. An entry leaves the table when
//! its reply is routed, when its deadline passes (the caller then gets a `504`), or when
//! its caller disconnects.
//!
//! A reply route (`{instance:016x}.{conn}.{id}`, the key of a stored call) names one entry
//! of one broker process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use qbus_wire::link::{Burst, FrameSender};
use qbus_wire::protocol::{Command, Frame, Header, RouteStats, Status};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

use crate::error::BrokerError;
use crate::queue::group_commit::AppendWait;
use crate::store::StoreError;

/// Most callers that may await a reply on one broker at once.
pub const MAX_PENDING: usize = 65_536;
/// Most callers one connection may have awaiting a reply at once.
pub const MAX_PENDING_PER_CONNECTION: usize = 16_384;
/// Longest reply route (`{instance:016x}.{conn}.{id}`, both ids `u64`), the key of a stored
/// call: what a call's record holds besides its body.
pub const MAX_ROUTE_LEN: usize = 16 + 1 + 20 + 1 + 20;

/// A call awaiting its reply.
struct Waiting {
    deadline: Instant,
    timeout: Duration,
}

/// Where a caller's replies go.
pub enum ReplyTo {
    /// A binary connection's outgoing frames: the replies of all its calls.
    Connection(FrameSender),
    /// A request inside the broker awaiting the reply of its one call (`rpc::call::call_once`);
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
    Connection(FrameSender),
    Once(oneshot::Sender<Frame>),
}

impl Outlet {
    /// Passes `reply` on without waiting; false when the caller is gone. A caller reading
    /// slowly must not stall whoever sends (a responder's connection, the sweeper), so a
    /// full connection gets its reply from a task. With a `burst`, the reply waits for the
    /// burst's flush; without, the link's writer sends it.
    fn send(self, reply: Frame, burst: Option<&mut Burst>) -> bool {
        match self {
            Outlet::Connection(out) => match out.try_send_in(reply, burst) {
                Ok(()) => true,
                Err(TrySendError::Full(reply)) => {
                    tokio::spawn(async move {
                        let _ = out.send(reply).await;
                    });
                    true
                }
                Err(TrySendError::Closed(_)) => false,
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
pub struct ReplyTable {
    /// Different in every broker process, so a route stored before a restart never names
    /// a caller that got the same connection and correlation ids afterwards.
    instance: u64,
    table: Mutex<Table>,
    routed: AtomicU64,
    expired: AtomicU64,
    abandoned: AtomicU64,
    unroutable: AtomicU64,
}

impl ReplyTable {
    /// An empty table.
    pub fn new() -> ReplyTable {
        ReplyTable {
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
    pub fn register(
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
        Ok(route(self.instance, conn, id))
    }

    /// Hands the write of call `id` of `conn`, still on its way, to the task watching that
    /// caller's writes (started with the first such call), which tells the caller if the
    /// write fails. One task per caller, not per call: writes complete in order, a batch at
    /// a time, so it wakes about once per batch.
    pub fn watch_append(self: &Arc<Self>, conn: u64, id: u64, wait: AppendWait) {
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

    /// Whether a task watches writes of caller `conn`.
    #[cfg(test)]
    pub fn watches(&self, conn: u64) -> bool {
        self.table()
            .callers
            .get(&conn)
            .is_some_and(|caller| caller.appends.is_some())
    }

    /// Fails call `id` of `conn`, whose write failed with `e`: it leaves the table and its
    /// caller is told at once.
    pub fn write_failed(&self, conn: u64, id: u64, e: StoreError) {
        if let Some(outlet) = self.take_call(conn, id) {
            let e = BrokerError::Store(e);
            outlet.send(
                Frame::new(Header::error(Command::Call, id, e.status(), e.to_string())),
                None,
            );
        }
    }

    /// Drops call `id` of `conn`; false when it was not waiting.
    pub fn forget(&self, conn: u64, id: u64) -> bool {
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

    /// Drops call `id` of `conn` because its deadline passed, counted as expired; false
    /// when it was not waiting (its reply left the table just before).
    pub fn expire_call(&self, conn: u64, id: u64) -> bool {
        let expired = self.forget(conn, id);
        if expired {
            self.expired.fetch_add(1, Ordering::Relaxed);
        }
        expired
    }

    /// Passes a responder's reply to the caller named by `route`; `reply` builds it for the
    /// call's correlation id. With a `burst`, the reply goes out at the burst's flush.
    pub fn route_reply(
        &self,
        route: &str,
        reply: impl FnOnce(u64) -> Frame,
        burst: Option<&mut Burst>,
    ) -> Result<(), Unroutable> {
        let sent = match self.take(route) {
            None => Err(Unroutable::NoCaller),
            Some((outlet, id)) => {
                if outlet.send(reply(id), burst) {
                    Ok(())
                } else {
                    Err(Unroutable::Disconnected)
                }
            }
        };
        let counter = if sent.is_ok() {
            &self.routed
        } else {
            &self.unroutable
        };
        counter.fetch_add(1, Ordering::Relaxed);
        sent
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
            outlet.send(Frame::new(deadline_passed(id, timeout)), None);
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

/// Why a responder's reply reached no caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unroutable {
    /// No call awaits the route: its deadline passed, its caller disconnected, or it was
    /// stored before this broker restarted.
    NoCaller,
    /// The call was waiting but its caller disconnected as the reply came.
    Disconnected,
}

/// True when `key` has the shape of a reply route (the key of a stored call).
pub fn is_route(key: &str) -> bool {
    parse_route(key).is_some()
}

/// Writes `"{instance:016x}.{conn}.{id}"`, which [`parse_route`] splits. Without `format!`:
/// it runs once per call, and `format!` was 4 % of the broker's CPU in MQ-RPC profiles.
fn route(instance: u64, conn: u64, id: u64) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut route = String::with_capacity(16 + 1 + 20 + 1 + 20);
    route.extend(
        (0..16)
            .rev()
            .map(|nibble| char::from(HEX[(instance >> (nibble * 4)) as usize & 0xf])),
    );
    let mut decimal = itoa::Buffer::new();
    for part in [conn, id] {
        route.push('.');
        route.push_str(decimal.format(part));
    }
    route
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
pub fn deadline_passed(id: u64, timeout: Duration) -> Header {
    Header::error(
        Command::Call,
        id,
        Status::DeadlineExceeded,
        format!("no responder routed a reply within the call's deadline of {timeout:?}"),
    )
}

/// Waits for the writes of one caller's calls in order; a call whose write failed is
/// dropped from the table and its caller told at once.
async fn watch_appends(
    replies: Weak<ReplyTable>,
    conn: u64,
    mut appends: mpsc::UnboundedReceiver<(u64, AppendWait)>,
) {
    while let Some((id, wait)) = appends.recv().await {
        let Err(e) = wait.wait().await else { continue };
        let Some(replies) = replies.upgrade() else {
            return;
        };
        replies.write_failed(conn, id, e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qbus_wire::protocol::rpc::DEFAULT_TIMEOUT;

    fn channel() -> (FrameSender, mpsc::Receiver<Frame>) {
        let (tx, rx) = mpsc::channel(16);
        (FrameSender::from_channel(tx), rx)
    }

    #[test]
    fn routes_are_written_as_format_would_and_parse_back() {
        for (instance, conn, id) in [(0, 0, 0), (0xab, 7, 42), (u64::MAX, u64::MAX, u64::MAX)] {
            let written = route(instance, conn, id);
            assert_eq!(written, format!("{instance:016x}.{conn}.{id}"));
            assert_eq!(parse_route(&written), Some((instance, conn, id)));
        }
    }

    /// Replies to the connection whose outgoing frames go to `out`.
    fn to(out: &FrameSender) -> impl FnOnce() -> ReplyTo + '_ {
        move || ReplyTo::Connection(out.clone())
    }

    #[test]
    fn a_route_names_one_call_of_one_broker_once() {
        let replies = ReplyTable::new();
        let (out, _rx) = channel();
        let route = replies.register(7, to(&out), 42, DEFAULT_TIMEOUT).unwrap();
        assert_eq!(replies.stats().pending, 1);
        let other = ReplyTable::new();
        assert!(other.take(&route).is_none(), "another broker instance");
        let (_, id) = replies.take(&route).unwrap();
        assert_eq!(id, 42);
        assert!(replies.take(&route).is_none(), "taken once");
        assert_eq!(replies.stats().pending, 0);
        for junk in ["", "x", "1.2", "zz.1.2", "1.2.3.4", "1.-2.3"] {
            assert!(replies.take(junk).is_none(), "{junk}");
        }
    }

    #[test]
    fn disconnect_frees_only_that_callers_entries() {
        let replies = ReplyTable::new();
        let (out, _rx) = channel();
        for id in 0..3 {
            replies.register(1, to(&out), id, DEFAULT_TIMEOUT).unwrap();
        }
        let kept = replies.register(2, to(&out), 0, DEFAULT_TIMEOUT).unwrap();
        replies.disconnect(1);
        let stats = replies.stats();
        assert_eq!((stats.pending, stats.abandoned), (1, 3));
        assert!(replies.take(&kept).is_some());
    }

    #[test]
    fn expired_calls_are_dropped_and_their_callers_told() {
        let replies = ReplyTable::new();
        let (out, mut rx) = channel();
        replies
            .register(1, to(&out), 5, Duration::from_millis(10))
            .unwrap();
        replies
            .register(1, to(&out), 6, Duration::from_secs(60))
            .unwrap();
        replies.expire(Instant::now() + Duration::from_secs(1));
        let stats = replies.stats();
        assert_eq!((stats.pending, stats.expired), (1, 1));
        let told = rx.try_recv().unwrap();
        assert_eq!(
            (told.header.cmd, told.header.id, told.header.status),
            (Command::Call, 5, Status::DeadlineExceeded.code())
        );
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_one_call_caller_gets_its_reply_or_its_timeout_once() {
        let replies = ReplyTable::new();
        let (tx, mut rx) = oneshot::channel();
        let route = replies
            .register(1, move || ReplyTo::Once(Some(tx)), 0, DEFAULT_TIMEOUT)
            .unwrap();
        let (outlet, id) = replies.take(&route).unwrap();
        assert!(outlet.send(Frame::new(Header::reply_to(&Header::default())), None));
        assert_eq!((id, rx.try_recv().unwrap().header.status), (0, 200));

        let (tx, mut rx) = oneshot::channel();
        replies
            .register(2, move || ReplyTo::Once(Some(tx)), 0, Duration::ZERO)
            .unwrap();
        replies.expire(Instant::now() + Duration::from_secs(1));
        assert_eq!(
            rx.try_recv().unwrap().header.status,
            Status::DeadlineExceeded.code()
        );
        let stats = replies.stats();
        assert_eq!((stats.pending, stats.routed, stats.expired), (0, 0, 1));
    }

    #[test]
    fn routes_fit_their_length_bound() {
        let replies = ReplyTable::new();
        let (out, _rx) = channel();
        let route = replies
            .register(u64::MAX, to(&out), u64::MAX, DEFAULT_TIMEOUT)
            .unwrap();
        assert_eq!(route.len(), MAX_ROUTE_LEN);
    }

    #[test]
    fn the_table_is_bounded_and_ids_are_unique() {
        let replies = ReplyTable::new();
        let (out, _rx) = channel();
        replies.register(1, to(&out), 1, DEFAULT_TIMEOUT).unwrap();
        assert_eq!(
            replies
                .register(1, to(&out), 1, DEFAULT_TIMEOUT)
                .unwrap_err()
                .status(),
            Status::BadRequest
        );
        for id in 2..=MAX_PENDING_PER_CONNECTION as u64 {
            replies.register(1, to(&out), id, DEFAULT_TIMEOUT).unwrap();
        }
        assert_eq!(
            replies
                .register(1, to(&out), 0, DEFAULT_TIMEOUT)
                .unwrap_err()
                .status(),
            Status::Overloaded
        );
        assert!(replies.forget(1, 1));
        assert!(!replies.forget(1, 1));
    }
}
