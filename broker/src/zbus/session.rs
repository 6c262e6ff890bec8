//! One zbus connection. Requests are read in order and each is answered when its answer is
//! ready, tagged with its `id`: a produce when its record is written, a consume when a
//! message comes (however long that takes), a call when its responder routes the reply.
//! So a waiting consume never holds back a produce sent after it on the same connection.
//!
//! How zbus commands map onto the core (`docs/zbus.md` has the table):
//!
//! - `produce` stages one record (`record::stored_key`) and replies once it is written,
//!   unless `ack: 0`; then it is an MQ-RPC call (`rpc::call::stage_call`) whose reply,
//!   routed by any responder, comes back with the produce's `id`.
//! - `consume` fetches one record for the MQ's default group (every zbus consumer of a
//!   plain MQ shares it, as zbus's do) or, on a PubSub MQ, for a group of this session
//!   alone, waiting until one comes; delivery is the ack (zbus consumers never ack). A new
//!   consume of the same MQ replaces a waiting one, as in zbus (clients re-send a consume
//!   after their own timeout, with a new `id`).
//! - `route` hands a reply to the reply table under the route in `recver`, its zbus RPC
//!   envelope as qbus's; replies to this session's calls get zbus's (`rpc_envelope`).
//! - `create_mq`, `query_mq`, `remove_mq` administer MQs; `heartbeat` gets no reply.
//!
//! Each request is checked like the other doors' (`crate::auth`): its `token` header is
//! the user's token (as zbus's `token`), no token the connection's peer. A `GET` or `HEAD`
//! whose `cmd` came from the URL's query, not a header, changes nothing: a foreign page can
//! make a browser fetch a URL, but not send a `cmd` header without a preflight the broker
//! does not grant.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use qbus_server_kit::auth::{Denied, Identity, Operation};
use qbus_wire::link::FrameSender;
use qbus_wire::protocol::record::{encode_record_meta, parse_record, RecordMeta};
use qbus_wire::protocol::{DeliveryToken, Frame, MqOptions, Status};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::codec::{CodecError, Message, StartLine, ZbusCodec};
use super::modes::{mode, Zbus};
use super::record::{call_encoding, delivery, is_ack, mq_info, stored_key};
use super::rpc_envelope;
use crate::auth::Peer;
use crate::core::{Core, FetchRequest, MAX_WAIT};
use crate::error::BrokerError;
use crate::http::api::{body_limit, BODY_LIMIT};
use crate::http::fields::parse_query;
use crate::http::io::WriteDeadline;
use crate::metrics::Protocol;
use crate::queue::group::Start;
use crate::queue::group_commit::CommitBatch;
use crate::queue::key_filter::Removal;
use crate::rpc::call::{call_timeout, stage_call, CallWrites, StagedCall, Staging};
use crate::rpc::reply_table::ReplyTo;

/// Replies queued for the socket; more make their senders wait.
const OUT_QUEUE: usize = 1024;
/// Requests of one connection being answered at once (produces awaiting the disk, admin
/// commands); more make the reader wait, so a peer cannot grow the task set.
const MAX_IN_FLIGHT: usize = 1024;
/// MQs one connection may have a consume waiting on at once.
const MAX_CONSUMES: usize = 64;
/// How long a closed session's PubSub groups are kept before they are removed: a group
/// counts its consumer as attached for 2 s after the last fetch.
const SUBSCRIPTION_LINGER: Duration = Duration::from_secs(3);

/// Serves one zbus connection until the peer closes it, it stays idle for `zbus-idle`
/// with no consume waiting, or `shutdown` fires.
pub async fn serve<S>(
    stream: S,
    peer: Peer,
    core: Arc<Core>,
    zbus: Arc<Zbus>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let conn = core.connection_id();
    let span = tracing::info_span!("zbus", conn, peer = %peer.addr);
    run(stream, conn, peer, core, zbus, shutdown)
        .instrument(span)
        .await
}

/// What the tasks of one session share.
struct Shared {
    core: Arc<Core>,
    zbus: Arc<Zbus>,
    conn: u64,
    out: mpsc::Sender<Message>,
    /// The zbus `id` of each call awaiting its reply, by the call's id in the reply table.
    calls: Mutex<HashMap<u64, String>>,
}

struct Session {
    shared: Arc<Shared>,
    /// Where the reply table sends this connection's call replies.
    call_replies: FrameSender,
    next_call: u64,
    in_flight: Arc<tokio::sync::Semaphore>,
    tasks: JoinSet<()>,
    /// The waiting consume of each MQ, cancelled when a newer one replaces it.
    consumes: HashMap<String, CancellationToken>,
    /// The PubSub MQs this session subscribed to, with its topics on each.
    subscriptions: HashMap<String, Arc<Mutex<HashSet<String>>>>,
    consumed: bool,
    peer: Peer,
    /// The last token this connection sent and whose it is, so a client that sends its
    /// token with every message is looked up once.
    token: Option<(String, Identity)>,
}

async fn run<S>(
    stream: S,
    conn: u64,
    peer: Peer,
    core: Arc<Core>,
    zbus: Arc<Zbus>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    tracing::debug!("zbus session opened");
    let _open = core.metrics().connection(Protocol::Zbus);
    let config = core.config();
    let (idle, write_limit) = (config.zbus_idle, config.http_timeout);
    // The body alone must fit; `produce` checks it again with the record's tag and key.
    let codec = ZbusCodec::new(body_limit(config.max_frame, 0));
    let (read, write) = tokio::io::split(stream);
    let mut requests = FramedRead::new(read, codec.clone());
    let (out, outgoing) = mpsc::channel(OUT_QUEUE);
    let writer = tokio::spawn(write_replies(
        FramedWrite::new(WriteDeadline::new(write, write_limit), codec),
        outgoing,
    ));
    let (call_replies, frames) = mpsc::channel(OUT_QUEUE);
    let call_replies = FrameSender::from_channel(call_replies);
    let shared = Arc::new(Shared {
        core: core.clone(),
        zbus,
        conn,
        out,
        calls: Mutex::new(HashMap::new()),
    });
    let translator = tokio::spawn(translate_call_replies(shared.clone(), frames));
    let mut session = Session {
        shared,
        call_replies,
        next_call: 1,
        in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
        tasks: JoinSet::new(),
        consumes: HashMap::new(),
        subscriptions: HashMap::new(),
        consumed: false,
        peer,
        token: None,
    };
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(idle, requests.next()) => next,
            _ = shutdown.cancelled() => break,
        };
        match next {
            Ok(Some(Ok(request))) => session.handle(request).await,
            Ok(Some(Err(e))) => {
                session.refuse_stream(&e).await;
                break;
            }
            Ok(None) => break,
            // A consumer waiting for a message sends nothing meanwhile; that is not idle.
            Err(_) if session.consumes.values().any(|c| !c.is_cancelled()) => {}
            Err(_) => {
                tracing::debug!(?idle, "idle zbus connection closed (zbus-idle)");
                break;
            }
        }
        while session.tasks.try_join_next().is_some() {}
    }
    session.close().await;
    translator.abort();
    let _ = writer.await;
    tracing::debug!("zbus session closed");
}

/// Writes replies as they come, flushing when no more are queued.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut sink: FramedWrite<W, ZbusCodec>,
    mut outgoing: mpsc::Receiver<Message>,
) {
    while let Some(message) = outgoing.recv().await {
        if sink.feed(message).await.is_err() {
            return;
        }
        while let Ok(message) = outgoing.try_recv() {
            if sink.feed(message).await.is_err() {
                return;
            }
        }
        if let Err(e) = sink.flush().await {
            tracing::debug!(error = %e, "zbus write failed");
            return;
        }
    }
}

/// Passes the reply table's replies to this connection's calls on as zbus replies carrying
/// each call's own `id`, their envelopes as zbus's (`rpc_envelope`).
async fn translate_call_replies(shared: Arc<Shared>, mut frames: mpsc::Receiver<Frame>) {
    while let Some(frame) = frames.recv().await {
        let Some(id) = shared.lock_calls().remove(&frame.header.id) else {
            continue;
        };
        let mut reply = rpc_envelope::to_zbus(frame);
        reply.set("id", id);
        if shared.out.send(reply).await.is_err() {
            return;
        }
    }
}

impl Shared {
    fn lock_calls(&self) -> std::sync::MutexGuard<'_, HashMap<u64, String>> {
        self.calls.lock().expect("zbus call table poisoned")
    }

    async fn send(&self, message: Message) {
        let _ = self.out.send(message).await;
    }
}

/// A reply to `request` with `status` and a text body, as zbus's `ReplyKit` builds them.
fn reply_to(request: &Message, status: u16, body: impl Into<bytes::Bytes>) -> Message {
    let mut reply = Message::reply(status).with_body(body);
    if let Some(id) = request.get("id") {
        reply.set("id", id);
    }
    if let Some(mq) = request.get("mq") {
        reply.set("mq", mq);
    }
    reply
}

/// zbus's acknowledgement body: the time of the reply in milliseconds.
fn now_ms() -> String {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
        .to_string()
}

/// The error reply for `e`, with the texts zbus clients look for where zbus has one.
fn error_reply(request: &Message, mq: &str, e: &BrokerError) -> Message {
    match e {
        BrokerError::NoSuchMq(_) => reply_to(request, 404, format!("MQ({mq}) Not Found")),
        other => reply_to(request, other.status().code(), other.to_string()),
    }
}

impl Session {
    async fn handle(&mut self, mut request: Message) {
        let cmd_in_header = request.get("cmd").is_some();
        // zbus reads control fields from the URL's query too when no header gives them.
        if let StartLine::Request { url, .. } = &request.start {
            let query = url.split_once('?').map_or("", |(_, q)| q);
            for (name, value) in parse_query(query).unwrap_or_default() {
                if request.get(&name).is_none() {
                    request.headers.push((name, value));
                }
            }
        }
        let cmd = request.get("cmd").unwrap_or_default().to_ascii_lowercase();
        let who = match self.permit(&cmd, cmd_in_header, &request).await {
            Ok(who) => who,
            Err(denied) => {
                self.shared
                    .core
                    .metrics()
                    .denied(Protocol::Zbus, denied.code());
                let reply = reply_to(&request, denied.code(), denied.to_string());
                return self.shared.send(reply).await;
            }
        };
        match cmd.as_str() {
            "produce" => self.produce(request).await,
            "consume" => self.consume(request).await,
            "route" => self.route(request),
            // `create`, `query`, `remove`, `list`: the names of qbus's old header form.
            "create_mq" | "create" | "query_mq" | "query" | "list" | "remove_mq" | "remove" => {
                self.admin(cmd, request, who).await
            }
            "add_key" | "remove_key" => self.key_command(&cmd, request).await,
            "heartbeat" => {}
            _ => {
                let text = format!("Bad format: command({cmd}) not support");
                self.shared.send(reply_to(&request, 400, text)).await;
            }
        }
    }

    /// Who sent `request` and whether it may run `cmd`: the identity, for lists to be
    /// filtered by.
    async fn permit(
        &mut self,
        cmd: &str,
        cmd_in_header: bool,
        request: &Message,
    ) -> Result<Option<Identity>, Denied> {
        let access = self.shared.core.config().access.clone();
        let who = match request
            .get("token")
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            Some(token) => match &self.token {
                Some((known, who)) if known == token => Some(who.clone()),
                _ => {
                    let who = access.login_token(self.peer.ip, token).await?;
                    self.token = Some((token.to_owned(), who.clone()));
                    Some(who)
                }
            },
            None => self.peer.identity(&access)?,
        };
        let named = |header: &str| request.get(header).map(str::trim).filter(|n| !n.is_empty());
        let mq = named("mq").unwrap_or_default();
        let (op, mq) = match cmd {
            "produce" if !is_ack(request.get("ack")) => (Operation::RpcCall, mq),
            "produce" | "add_key" | "remove_key" => (Operation::Produce, mq),
            "consume" => (Operation::Consume, mq),
            "route" => {
                access.check_some(who.as_ref(), Operation::RpcServe)?;
                (Operation::RpcServe, "")
            }
            "create_mq" | "create" | "remove_mq" | "remove" => (
                Operation::Admin,
                named("mq_name").or(named("mq")).unwrap_or_default(),
            ),
            "query_mq" | "query" | "list" if !mq.is_empty() => (Operation::Read, mq),
            "query_mq" | "query" | "list" => {
                return access.check_lists(who.as_ref()).map(|()| who);
            }
            _ => return Ok(who),
        };
        let read_only = matches!(&request.start, StartLine::Request { method, .. }
            if method.eq_ignore_ascii_case("GET") || method.eq_ignore_ascii_case("HEAD"));
        if op != Operation::Read && read_only && !cmd_in_header {
            return Err(Denied::Forbidden(format!(
                "cmd {cmd} came in the URL of a GET: a URL any page can make a browser fetch \
                 never changes state; send cmd as a header (as zbus clients do) or use POST"
            )));
        }
        if op != Operation::RpcServe {
            let group = (op == Operation::Consume).then_some(mq);
            access.check(who.as_ref(), op, mq, group)?;
        }
        Ok(who)
    }

    /// Answers a request that broke the stream, then the connection closes: after a bad
    /// head or an oversized body the next message cannot be found.
    async fn refuse_stream(&self, e: &CodecError) {
        tracing::info!(error = %e, "bad zbus message; closing");
        let status = match e {
            CodecError::BodyTooLarge { .. } | CodecError::HeadTooLarge { .. } => 413,
            CodecError::Io(_) => return,
            CodecError::BadHead(_) => 400,
        };
        self.shared
            .send(Message::reply(status).with_body(e.to_string()))
            .await;
    }

    /// Runs `work` in the session's task set, holding one of its in-flight permits.
    async fn spawn(&mut self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
            return;
        };
        self.tasks.spawn(async move {
            let _permit = permit;
            work.await
        });
    }

    async fn produce(&mut self, mut request: Message) {
        let core = &self.shared.core;
        let name = request.get("mq").unwrap_or_default().to_owned();
        let mq = match core.registry().get(&name) {
            Ok(mq) => mq,
            Err(e) => return self.shared.send(error_reply(&request, &name, &e)).await,
        };
        if self.shared.zbus.mode(&name) & mode::RPC != 0 && !mq.has_consumers() {
            let text = format!("MQ({name}) Service Down");
            return self.shared.send(reply_to(&request, 404, text)).await;
        }
        let sender = format!("{:016x}.{}", self.shared.zbus.instance, self.shared.conn);
        request.set("sender", sender);
        let mut batch = CommitBatch::default();
        if !is_ack(request.get("ack")) {
            return self.call(request, &mq, batch).await;
        }
        // zbus's duplicate filter: a message whose `key` is present in its `key_group` is
        // refused with 406; otherwise the key is added before the message is stored (as
        // zbus did, a produce that then fails leaves its key present).
        if let Some(key) = request.get("key").filter(|k| !k.is_empty()) {
            let group = request.get("key_group").unwrap_or_default().to_owned();
            match mq.keys().add(group, key.to_owned()).await {
                Ok(true) => {}
                Ok(false) => {
                    return self.shared.send(reply_to(&request, 406, now_ms())).await;
                }
                Err(e) => return self.shared.send(error_reply(&request, &name, &e)).await,
            }
        }
        let key = stored_key(&request);
        let topic = request.get("topic").filter(|t| !t.is_empty());
        let limit = body_limit(
            core.config().max_frame,
            key.len() + topic.map_or(0, str::len),
        );
        if request.body.len() > limit {
            let text = format!(
                "body of {} bytes exceeds the limit of {limit} bytes ({BODY_LIMIT})",
                request.body.len()
            );
            return self.shared.send(reply_to(&request, 413, text)).await;
        }
        // zbus's `delay` and `ttl` headers, in ms, on the broker's clock.
        let ms = |name: &str| request.get(name).and_then(|v| v.trim().parse::<u64>().ok());
        let now = qbus_wire::now_ms();
        let deliver_at = ms("delay").map(|delay| now.saturating_add(delay.min(u64::MAX >> 2)));
        let meta = RecordMeta {
            tag: topic,
            key: Some(&key),
            deliver_at,
            expires_at: ms("ttl").map(|ttl| deliver_at.unwrap_or(now).saturating_add(ttl)),
            ..RecordMeta::default()
        };
        let mut record = BytesMut::with_capacity(request.body.len() + key.len() + 64);
        if let Err(e) = encode_record_meta(&mut record, 0, 0, &meta, &request.body) {
            let text = format!("Bad format: {e}");
            return self.shared.send(reply_to(&request, 400, text)).await;
        }
        if deliver_at.is_some() {
            if let Err(e) = core.registry().enable_delays(&mq).await {
                return self.shared.send(error_reply(&request, &name, &e)).await;
            }
        }
        let wait = mq.stage(&mut batch, record, 1);
        let _ = core.committer().submit(batch).await;
        let shared = self.shared.clone();
        self.spawn(async move {
            let reply = match wait.wait().await {
                Ok(_) => reply_to(&request, 200, now_ms()),
                Err(e) => error_reply(&request, &name, &BrokerError::Store(e)),
            };
            shared.send(reply).await;
        })
        .await;
    }

    /// zbus's `add_key` (`key` into `key_group`) and `remove_key` (the `key` of
    /// `key_group`; without `key`, the group's keys; without either, every key of the MQ).
    /// With `ack` (the default) the reply's body is how many keys were added or removed.
    async fn key_command(&mut self, cmd: &str, request: Message) {
        let name = request.get("mq").unwrap_or_default().to_owned();
        let mq = match self.shared.core.registry().get(&name) {
            Ok(mq) => mq,
            Err(e) => return self.shared.send(error_reply(&request, &name, &e)).await,
        };
        let key = request
            .get("key")
            .filter(|k| !k.is_empty())
            .map(str::to_owned);
        let group = request.get("key_group").map(str::to_owned);
        let outcome = match (cmd, key, group) {
            ("add_key", Some(key), group) => mq
                .keys()
                .add(group.unwrap_or_default(), key)
                .await
                .map(u64::from),
            ("add_key", None, _) => Err(BrokerError::BadRequest("add_key needs a key".into())),
            (_, Some(key), group) => {
                let group = group.unwrap_or_default();
                mq.keys().remove(Removal::Key { group, key }).await
            }
            (_, None, Some(group)) => mq.keys().remove(Removal::Group(group)).await,
            (_, None, None) => mq.keys().remove(Removal::All).await,
        };
        if !is_ack(request.get("ack")) {
            return;
        }
        let reply = match outcome {
            Ok(count) => reply_to(&request, 200, count.to_string()),
            Err(e) => error_reply(&request, &name, &e),
        };
        self.shared.send(reply).await;
    }

    /// A one-way produce: an MQ-RPC call whose reply comes back with the produce's `id`.
    async fn call(&mut self, request: Message, mq: &crate::queue::mq::Mq, mut batch: CommitBatch) {
        let id = self.next_call;
        self.next_call += 1;
        let out = self.call_replies.clone();
        let call = StagedCall {
            conn: self.shared.conn,
            id,
            timeout: call_timeout(None),
            encoding: call_encoding(&request),
        };
        let replies = self.shared.core.replies();
        // Known before the call is staged: a failed write is reported through the table.
        let zbus_id = request.get("id").unwrap_or_default().to_owned();
        self.shared.lock_calls().insert(id, zbus_id);
        let mut writes = CallWrites::default();
        let staged = Staging {
            batch: &mut batch,
            writes: &mut writes,
            burst: None,
        };
        let staged = stage_call(
            replies,
            mq,
            || ReplyTo::Connection(out),
            call,
            &request.body,
            staged,
        );
        match staged {
            Ok(_) => {
                let _ = self.shared.core.committer().submit(batch).await;
                writes.settle(replies);
            }
            Err(refusal) => {
                self.shared.lock_calls().remove(&id);
                let reply = reply_to(
                    &request,
                    refusal.status().code(),
                    refusal.message().to_owned(),
                );
                self.shared.send(reply).await;
            }
        }
    }

    async fn consume(&mut self, request: Message) {
        let name = request.get("mq").unwrap_or_default().to_owned();
        if let Err(e) = self.shared.core.registry().get(&name) {
            return self.shared.send(error_reply(&request, &name, &e)).await;
        }
        self.consumes.retain(|_, waiting| !waiting.is_cancelled());
        if let Some(earlier) = self.consumes.remove(&name) {
            earlier.cancel();
        } else if self.consumes.len() >= MAX_CONSUMES {
            let text =
                format!("more than {MAX_CONSUMES} MQs with a consume waiting on one connection");
            return self.shared.send(reply_to(&request, 429, text)).await;
        }
        let topics = (self.shared.zbus.mode(&name) & mode::PUBSUB != 0).then(|| {
            let topics = self.subscriptions.entry(name.clone()).or_default().clone();
            if let Some(list) = request.get("topic") {
                let mut set = topics.lock().expect("topics poisoned");
                set.clear();
                set.extend(
                    list.split(',')
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .map(str::to_owned),
                );
            }
            topics
        });
        if !self.consumed {
            self.consumed = true;
            self.shared.core.changed();
        }
        let cancel = CancellationToken::new();
        self.consumes.insert(name.clone(), cancel.clone());
        let shared = self.shared.clone();
        let group = match topics {
            Some(_) => self.subscription_group(&name),
            None => name.clone(),
        };
        self.tasks.spawn(async move {
            let delivered = deliver(&shared, &request, &name, &group, topics, &cancel).await;
            cancel.cancel();
            if let Err(e) = delivered {
                shared.send(error_reply(&request, &name, &e)).await;
            }
        });
    }

    /// The group of this session's subscription to PubSub MQ `mq`.
    fn subscription_group(&self, mq: &str) -> String {
        format!(
            "{mq}.zbus-sub.{:x}.{}",
            self.shared.zbus.instance, self.shared.conn
        )
    }

    fn route(&mut self, request: Message) {
        let Some(recver) = request.get("recver") else {
            return; // zbus ignores a route without a receiver
        };
        let status = request
            .get("reply_code")
            .and_then(|code| code.trim().parse().ok())
            .unwrap_or(Status::Ok.code());
        let encoding = call_encoding(&request);
        let body = request.body.clone();
        let routed = self.shared.core.replies().route_reply(
            recver,
            |id| rpc_envelope::from_zbus(id, status, encoding, body),
            None,
        );
        if let Err(why) = routed {
            // zbus drops a reply whose receiver is gone; so does this door.
            tracing::debug!(recver, ?why, "zbus route reached no caller");
        }
    }

    async fn admin(&mut self, cmd: String, request: Message, who: Option<Identity>) {
        let shared = self.shared.clone();
        self.spawn(async move {
            let reply = admin(&shared, &cmd, &request, who.as_ref()).await;
            shared.send(reply).await;
        })
        .await;
    }

    /// Ends the session: stops its consumes, releases what it was delivered, forgets its
    /// calls, and drops its PubSub groups.
    async fn close(mut self) {
        for waiting in self.consumes.values() {
            waiting.cancel();
        }
        self.tasks.shutdown().await;
        let core = &self.shared.core;
        if self.consumed {
            core.disconnect(self.shared.conn);
        }
        core.replies().disconnect(self.shared.conn);
        let groups: Vec<(String, String)> = self
            .subscriptions
            .keys()
            .map(|mq| (mq.clone(), self.subscription_group(mq)))
            .collect();
        if !groups.is_empty() {
            let core = core.clone();
            tokio::spawn(async move {
                tokio::time::sleep(SUBSCRIPTION_LINGER).await;
                for (mq, group) in groups {
                    if let Err(e) = core.remove_group(&mq, &group).await {
                        tracing::debug!(mq, group, error = %e, "subscription group kept");
                    }
                }
            });
        }
    }
}

/// Waits for a record of `group` on `mq` (matching `topics` on a PubSub MQ), delivers it
/// as the reply to `request`, then acknowledges it: zbus consumers never ack, delivery is
/// the ack. Should the connection close before the ack, the record is redelivered.
/// `replaced` stops the wait, never a delivery under way (that would deliver it twice).
async fn deliver(
    shared: &Shared,
    request: &Message,
    mq: &str,
    group: &str,
    topics: Option<Arc<Mutex<HashSet<String>>>>,
    replaced: &CancellationToken,
) -> Result<(), BrokerError> {
    let core = &shared.core;
    let fetch = FetchRequest {
        mq,
        group: Some(group),
        tag: None,
        start: if topics.is_some() {
            Start::Latest
        } else {
            Start::Earliest
        },
        count: 1,
        wait: MAX_WAIT,
        // zbus has no message for it; the loss is in the log and the stats.
        report_loss: false,
    };
    loop {
        let fetched = tokio::select! {
            fetched = core.fetch(shared.conn, &fetch) => fetched?,
            _ = replaced.cancelled() => return Ok(()),
        };
        let Some(&attempt) = fetched.attempts.first() else {
            continue; // waited MAX_WAIT: zbus consumes wait on
        };
        let record = parse_record(&fetched.body)
            .map_err(|e| BrokerError::Internal(format!("stored record unreadable: {e}")))?;
        let token = DeliveryToken {
            offset: record.offset,
            attempt,
        };
        let wanted = topics.as_ref().is_none_or(|topics| {
            let topics = topics.lock().expect("topics poisoned");
            // zbus matches `*` or the message's topic; a subscriber naming no topic gets
            // every message here (zbus would give it none; documented).
            topics.is_empty()
                || topics.contains("*")
                || record.tag.is_some_and(|t| topics.contains(t))
        });
        if wanted {
            let mut message = delivery(&record, mq);
            if let Some(id) = request.get("id") {
                message.set("id", id);
            }
            shared.send(message).await;
        }
        core.registry().ack(mq, Some(group), &[token]).await?;
        if wanted {
            return Ok(());
        }
    }
}

/// `create_mq`, `query_mq` and `remove_mq` (and their old qbus names).
async fn admin(shared: &Shared, cmd: &str, request: &Message, who: Option<&Identity>) -> Message {
    let core = &shared.core;
    let access = &core.config().access;
    let named = |header: &str| {
        request
            .get(header)
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(str::to_owned)
    };
    match cmd {
        "create_mq" | "create" => {
            let Some(name) = named("mq_name").or_else(|| named("mq")) else {
                return reply_to(request, 400, "Missing mq_name");
            };
            let mode = match request.get("mq_mode").map(str::trim) {
                None | Some("") => mode::MQ,
                Some(text) => match text.parse() {
                    Ok(mode) => mode,
                    Err(_) => return reply_to(request, 400, "mq_mode invalid"),
                },
            };
            match core.create(&name, MqOptions::default()).await {
                Ok(_) => {
                    shared.zbus.declare(&name, mode);
                    reply_to(request, 200, now_ms())
                }
                Err(e) => error_reply(request, &name, &e),
            }
        }
        "remove_mq" | "remove" => {
            let Some(name) = named("mq_name").or_else(|| named("mq")) else {
                return reply_to(request, 400, "Missing mq_name");
            };
            match core.remove(&name).await {
                Ok(()) => {
                    shared.zbus.forget(&name);
                    reply_to(request, 200, now_ms())
                }
                Err(e) => error_reply(request, &name, &e),
            }
        }
        _ => {
            let body = match named("mq") {
                Some(name) => match core.registry().get(&name) {
                    Ok(mq) => mq_info(&mq.info(), shared.zbus.mode(&name)),
                    Err(e) => return error_reply(request, &name, &e),
                },
                None => {
                    let table: serde_json::Map<String, serde_json::Value> = core
                        .registry()
                        .list()
                        .iter()
                        .filter(|mq| access.allows(who, Operation::Read, mq.name()))
                        .map(|mq| {
                            let info = mq_info(&mq.info(), shared.zbus.mode(mq.name()));
                            (mq.name().to_owned(), info)
                        })
                        .collect();
                    serde_json::json!({
                        "broker": core.config().listen.to_string(),
                        "lastUpdatedTime": now_ms().parse::<u64>().unwrap_or_default(),
                        "mqTable": table,
                    })
                }
            };
            let mut reply = reply_to(request, 200, body.to_string());
            reply.set("content-type", "application/json");
            reply
        }
    }
}
