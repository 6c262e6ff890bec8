//! MQ-RPC on the broker: a `Call` is stored in its MQ like any message, and the reply a
//! responder sends with `Route` goes straight back to the caller's connection (no reply
//! queues). The wire side is in `docs/protocol.md`, "RPC commands".
//!
//! Between the two the broker remembers the caller in its reply table
//! ([`ReplyTable`]).
//!
//! Callers inside the broker (the HTTP gateway, `POST /rpc/{mq}`) take the same path through
//! [`call_once`]: the same checks, the same table and deadline, with the reply handed to the
//! waiting request instead of a connection.
//!
//! The stored request is an ordinary record: its **key** is the reply route (an opaque
//! token naming this broker process, the caller connection and the correlation id), its
//! **tag** the body's encoding as the caller sent it (none for MessagePack), its body the
//! caller's request envelope, untouched.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use qbus_wire::link::{Burst, FrameSender};
use qbus_wire::protocol::record::encode_record;
use qbus_wire::protocol::{Command, Frame, Header, Status, FLAG_ONEWAY};
use tokio::sync::oneshot;

use super::reply_table::{deadline_passed, ReplyTable, ReplyTo, Unroutable};
use crate::error::BrokerError;
use crate::queue::group_commit::{AppendWait, CommitBatch, Committer};
use crate::queue::mq::Mq;
use crate::queue::registry::Registry;

/// Deadline of a call whose header has no `timeout_ms`: the envelope's default, so a call
/// and its stored request agree.
pub const DEFAULT_TIMEOUT: Duration = qbus_wire::protocol::rpc::DEFAULT_TIMEOUT;
/// Longest deadline a call may ask for; longer ones are cut to this.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);
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
/// to `out`; a call's record joins `batch` and its write `writes`. Returns the reply to send
/// now, if any: a stored call is answered later, by its route or its deadline.
pub fn handle(
    registry: &Registry,
    replies: &Arc<ReplyTable>,
    conn: u64,
    out: &FrameSender,
    frame: Frame,
    staged: Staging<'_>,
) -> Option<Frame> {
    let (cmd, id, oneway) = (
        frame.header.cmd,
        frame.header.id,
        frame.header.has_flag(FLAG_ONEWAY),
    );
    let outcome = match cmd {
        Command::Call => {
            let reply_to = || ReplyTo::Connection(out.clone());
            call(registry, replies, conn, reply_to, frame, staged).map(|()| None)
        }
        Command::Route => route(replies, frame, staged.burst),
        Command::QueryRoutes => query(replies, &frame.header).map(Some),
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

/// Adds a call to the staged batch for its MQ and remembers its caller `conn`; `reply_to`
/// says where the caller's replies go, should this be its first call awaiting one.
fn call(
    registry: &Registry,
    replies: &Arc<ReplyTable>,
    conn: u64,
    reply_to: impl FnOnce() -> ReplyTo,
    frame: Frame,
    staged: Staging<'_>,
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
    let call = StagedCall {
        conn,
        id: header.id,
        timeout: call_timeout(header.timeout_ms),
        encoding: header.encoding.as_deref(),
    };
    stage_call(replies, &mq, reply_to, call, &body, staged).map(drop)
}

/// Where staged calls go: the batch their records join, and the list their writes join
/// until the batch is submitted.
pub struct Staging<'a> {
    /// The burst's batch for the commit thread.
    pub batch: &'a mut CommitBatch,
    /// The writes of the burst's calls.
    pub writes: &'a mut CallWrites,
    /// The links the burst's routed replies were fed to, written when it ends; `None`
    /// sends each reply through its link's writer.
    pub burst: Option<&'a mut Burst>,
}

/// The writes of the calls staged in one batch, looked at once it is submitted
/// ([`CallWrites::settle`]).
///
/// Most writes of `sync: false` MQs are done by then (written on the submitting task), and
/// nothing needs to watch them: only a write still on its way (queued for the commit thread)
/// is handed to its caller's watcher task, which tells the caller if it fails. Handing every
/// write over woke that task twice per burst for nothing.
#[derive(Default)]
pub struct CallWrites(Vec<(u64, u64, AppendWait)>);

impl CallWrites {
    /// After the batch holding these calls was submitted: forgets the writes that are done,
    /// fails the calls whose write failed (their callers hear of it now), and hands the
    /// rest to their callers' watcher tasks.
    pub fn settle(&mut self, replies: &Arc<ReplyTable>) {
        for (conn, id, wait) in self.0.drain(..) {
            match wait.done() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => replies.write_failed(conn, id, e),
                Err(wait) => replies.watch_append(conn, id, wait),
            }
        }
    }
}

/// One call to store, as [`stage_call`] takes it.
pub struct StagedCall<'a> {
    /// The caller's connection.
    pub conn: u64,
    /// The call's correlation id, unique among the caller's calls awaiting a reply.
    pub id: u64,
    /// Its deadline, from now.
    pub timeout: Duration,
    /// The body's encoding, stored as the record's tag (none for MessagePack).
    pub encoding: Option<&'a str>,
}

/// Remembers `call` in the reply table and adds its record to the staged batch for `mq`;
/// returns its reply route. Every door's calls take this path (the binary `Call`, the zbus
/// door's one-way produces), so a responder answers them all with the same `Route`.
pub fn stage_call(
    replies: &Arc<ReplyTable>,
    mq: &Mq,
    reply_to: impl FnOnce() -> ReplyTo,
    call: StagedCall<'_>,
    body: &[u8],
    staged: Staging<'_>,
) -> Result<String, Refusal> {
    let route = replies.register(call.conn, reply_to, call.id, call.timeout)?;
    let mut record = BytesMut::with_capacity(body.len() + route.len() + 64);
    if let Err(e) = encode_record(&mut record, 0, 0, call.encoding, Some(&route), body) {
        replies.forget(call.conn, call.id);
        return Err(Refusal::new(Status::BadRequest, format!("bad call: {e}")));
    }
    let wait = mq.stage(staged.batch, record, 1);
    // The caller hears nothing until the reply; only a failed write must reach it now.
    staged.writes.0.push((call.conn, call.id, wait));
    Ok(route)
}

/// Makes one MQ-RPC call for a caller inside the broker (the HTTP gateway). `request` is a
/// `Call` frame (mq, timeout_ms, encoding; body: the request envelope), stored and routed
/// exactly as one from a connection. Resolves to the reply frame (status `200`, body the
/// responder's response envelope, in its `encoding`), or to why there is none: refused at
/// once (`404` no such MQ, `503` no responders, `429` table full, `400`), the write failed
/// (`500`), or no reply came within the deadline (`504`).
///
/// `conn` is a connection id of its own: the call shares no table entry with another
/// caller, and leaving drops it whole. Dropping the future abandons the call, as closing a
/// connection does.
pub async fn call_once(
    registry: &Registry,
    replies: &Arc<ReplyTable>,
    committer: &Committer,
    conn: u64,
    request: Frame,
) -> Result<Frame, Refusal> {
    let _leave = Leave { replies, conn };
    let id = request.header.id;
    let timeout = call_timeout(request.header.timeout_ms);
    let deadline = tokio::time::Instant::now() + timeout;
    let (tx, mut rx) = oneshot::channel();
    let (mut batch, mut writes) = (CommitBatch::default(), CallWrites::default());
    let staged = Staging {
        batch: &mut batch,
        writes: &mut writes,
        burst: None,
    };
    call(
        registry,
        replies,
        conn,
        move || ReplyTo::Once(Some(tx)),
        request,
        staged,
    )?;
    // A failed submit fails the call's write, which the caller hears of as from the disk.
    let _ = committer.submit(batch).await;
    writes.settle(replies);
    let reply = match tokio::time::timeout_at(deadline, &mut rx).await {
        Ok(reply) => reply,
        // Answer at the deadline itself, not at the sweeper's next round.
        Err(_) if replies.expire_call(conn, id) => {
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
        Err(Refusal::from_reply(*reply.header))
    }
}

/// Takes a caller inside the broker out of the table however its call ends; a call still
/// waiting (its HTTP client went away) counts as abandoned, as a closed connection's do.
struct Leave<'a> {
    replies: &'a ReplyTable,
    conn: u64,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.replies.disconnect(self.conn);
    }
}

/// Passes a responder's reply to the caller named by its route.
fn route(
    replies: &ReplyTable,
    frame: Frame,
    burst: Option<&mut Burst>,
) -> Result<Option<Frame>, Refusal> {
    let Frame { header, body } = frame;
    let route = header.route.as_deref().ok_or_else(|| {
        Refusal::new(
            Status::BadRequest,
            "a Route needs a route (the key of the request record)",
        )
    })?;
    let reply = |id| {
        let reply = Header {
            cmd: Command::Call,
            id,
            status: Status::Ok.code(),
            encoding: header.encoding.clone(),
            ..Header::default()
        };
        Frame::with_body(reply, body)
    };
    if let Err(why) = replies.route_reply(route, reply, burst) {
        let why = match why {
            Unroutable::NoCaller => {
                "its deadline passed, it disconnected, or the call was stored before this \
                 broker restarted"
            }
            Unroutable::Disconnected => "it disconnected",
        };
        return Err(Refusal::new(
            Status::NotFound,
            format!("no caller awaits route {route:?}: {why}"),
        ));
    }
    if header.has_flag(FLAG_ONEWAY) {
        return Ok(None);
    }
    Ok(Some(Frame::new(Header::reply_to(&header))))
}

/// The reply to `QueryRoutes`.
fn query(replies: &ReplyTable, request: &Header) -> Result<Frame, Refusal> {
    let body = rmp_serde::to_vec_named(&replies.stats())
        .map_err(|e| Refusal::new(Status::Internal, format!("cannot encode the reply: {e}")))?;
    Ok(Frame::with_body(Header::reply_to(request), body.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::group_commit::{LogHandle, StoreWait};
    use crate::store::log::{Appended, LogConfig, MqLog};
    use crate::store::StoreError;
    use qbus_wire::protocol::Durability;

    fn failed_write() -> StoreError {
        StoreError::Io {
            path: "<test>".into(),
            source: std::io::Error::other("failed on purpose"),
        }
    }

    /// Calls 1 (written), 2 (failed) and 3 (still on its way) of connection 7: only 3 is
    /// handed to a watcher task, 2 is answered at once, 1 costs nothing more.
    #[tokio::test]
    async fn only_writes_still_on_their_way_are_watched() {
        let replies = Arc::new(ReplyTable::new());
        let (out, mut rx) = tokio::sync::mpsc::channel(4);
        let out = FrameSender::from_channel(out);
        for id in 1..=3 {
            let reply_to = || ReplyTo::Connection(out.clone());
            replies.register(7, reply_to, id, DEFAULT_TIMEOUT).unwrap();
        }
        let written = Appended {
            first_offset: 0,
            count: 1,
            next_offset: 1,
        };
        let dir = tempfile::tempdir().unwrap();
        let (log, _reader) = MqLog::open(
            &crate::store::OsFs::shared(),
            dir.path(),
            LogConfig::default(),
        )
        .unwrap();
        let log = LogHandle::new(log);
        let mut unsubmitted = CommitBatch::default();
        let mut record = BytesMut::new();
        encode_record(&mut record, 0, 0, None, None, b"call").unwrap();
        let on_its_way = unsubmitted.append(&log, record, 1, false);
        let mut writes = CallWrites(vec![
            (7, 1, StoreWait::ready((written, Durability::Written))),
            (7, 2, StoreWait::failed(failed_write())),
            (7, 3, on_its_way),
        ]);
        writes.settle(&replies);
        let told = rx.try_recv().unwrap();
        assert_eq!((told.header.id, told.header.status), (2, 500));
        assert!(
            rx.try_recv().is_err(),
            "call 1 was written, call 3 is on its way"
        );
        assert_eq!(replies.stats().pending, 2);
        assert!(replies.watches(7), "call 3 went to the watcher");

        // The batch is dropped unsubmitted: its write fails, and the watcher says so.
        drop(unsubmitted);
        let told = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(told.header.id, 3);
        assert_eq!(replies.stats().pending, 1);
    }

    #[tokio::test]
    async fn a_write_done_when_submitted_starts_no_watcher() {
        let replies = Arc::new(ReplyTable::new());
        let (out, _rx) = tokio::sync::mpsc::channel(4);
        let out = FrameSender::from_channel(out);
        replies
            .register(7, || ReplyTo::Connection(out), 1, DEFAULT_TIMEOUT)
            .unwrap();
        let written = Appended {
            first_offset: 0,
            count: 1,
            next_offset: 1,
        };
        let mut writes = CallWrites(vec![(
            7,
            1,
            StoreWait::ready((written, Durability::Written)),
        )]);
        writes.settle(&replies);
        assert!(!replies.watches(7));
    }
}
