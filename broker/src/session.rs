//! One client session: reads request frames from a link, runs them, writes replies. The
//! same code serves TCP connections and in-process (embedded) clients.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use qbus_server_kit::auth::{Access, Denied, Identity, Operation};
use qbus_wire::link::{Burst, FrameSender, Link};
use qbus_wire::protocol::record::{records, without_v3_fields};
use qbus_wire::protocol::{
    Command, Credentials, DeliveryToken, Durability, Frame, Header, LostRange, MqOptions,
    ServerInfo, Status, TxOptions, FLAG_ACK_LOCAL, FLAG_ACK_REPLICATED, FLAG_DUPLICATE,
    FLAG_ONEWAY, FLAG_ROUTE_ACK, FLAG_START_AT_END, FLAG_START_AT_OFFSET, FLAG_TX_ALREADY,
    FLAG_UNSEEN, PROTOCOL_VERSION,
};
use qbus_wire::serve::{buffered_frame, hello_reply, next_frame};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::{self, Peer};
use crate::core::{Core, FetchRequest};
use crate::error::{required, BrokerError};
use crate::metrics::Protocol;
use crate::queue::dedupe::{ProduceWait, Receipt, Settled};
use crate::queue::group::Start;
use crate::queue::group_commit::CommitBatch;
use crate::queue::mq::Mq;
use crate::replica;
use crate::rpc;
use crate::rpc::call::{CallWrites, Staging};
use crate::txn::Decided;

/// Long polls one connection may have waiting at once.
const MAX_FETCHES: usize = 64;
/// Produce replies waiting for the disk per connection; more makes the reader wait.
const PRODUCE_PIPELINE: usize = 4096;
/// Most requests already received handled as one burst before their writes go to the
/// commit thread (well below `PRODUCE_PIPELINE`, whose receipts wait for those writes).
const MAX_BURST: usize = 256;
/// Most bytes of records a burst gathers before handing them over.
const MAX_BURST_BYTES: usize = 1 << 20;
/// A connection silent this long is closed (clients heartbeat every 5 s by default).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

struct Session {
    core: Arc<Core>,
    conn: u64,
    out: FrameSender,
    produced: mpsc::Sender<Produced>,
    /// Appends and cursor stores of the burst being handled, submitted together at its end.
    batch: CommitBatch,
    /// The writes of the burst's calls, looked at once the batch is submitted.
    call_writes: CallWrites,
    /// One-way acks that came with RPC replies in the burst (`FLAG_ROUTE_ACK`), by MQ and
    /// group: recorded together at its end, so a burst of replies takes each group's lock
    /// and wakes its waiting fetches once, as one `Ack` of many tokens would.
    route_acks: Vec<(String, Option<String>, Vec<DeliveryToken>)>,
    /// The links fed replies during the burst (this one, callers' for routed replies):
    /// each gets one write, from this task, when the burst ends.
    burst: Burst,
    fetches: Arc<Semaphore>,
    /// Long polls: stopped when the session closes (their deliveries are released with it).
    polls: JoinSet<()>,
    /// Replies waiting for the disk or an admin change: awaited when the session closes,
    /// so a graceful stop answers an ack it has recorded instead of leaving it in doubt.
    tasks: JoinSet<()>,
    /// MQs and groups this connection consumed from, to release its deliveries when it
    /// closes (and to tell the trackers when it starts consuming from a new one).
    consumed: HashSet<(String, String)>,
    /// The protocol version the peer said in `Hello` (1 when it said none): replies use
    /// nothing newer.
    peer_protocol: u32,
    peer: Peer,
    /// Who the peer is: set on connect (certificate, anonymous) and by a login in `Hello`;
    /// `None` while it has no identity.
    identity: Option<Identity>,
    /// (MQ, follower id) of the copies a follower pulls over this connection: when it
    /// closes, those followers stop counting for `replicated` receipts at once.
    following: HashSet<(String, String)>,
}

/// Serves one link until the peer closes it, it fails, or `shutdown` fires. The peer's
/// `certificate` is the name in its verified TLS client certificate, if it sent one.
pub async fn serve(core: Arc<Core>, link: Link, peer: Peer, shutdown: CancellationToken) {
    let conn = core.connection_id();
    let span = tracing::info_span!(
        "session",
        conn,
        peer = %peer.addr,
        certificate = peer.certificate.as_deref()
    );
    run(core, link, conn, peer, shutdown).instrument(span).await
}

async fn run(core: Arc<Core>, link: Link, conn: u64, peer: Peer, shutdown: CancellationToken) {
    tracing::debug!("session opened");
    let _open = core.metrics().connection(Protocol::Binary);
    let Link {
        tx: out,
        rx: mut inbound,
    } = link;
    let (produced, pending) = mpsc::channel(PRODUCE_PIPELINE);
    let identity = peer
        .identity(&core.config().access)
        .unwrap_or_else(|denied| {
            tracing::warn!(error = %denied, "client certificate refused");
            None
        });
    let mut session = Session {
        core: core.clone(),
        conn,
        out: out.clone(),
        produced,
        batch: CommitBatch::default(),
        call_writes: CallWrites::default(),
        route_acks: Vec::new(),
        burst: Burst::default(),
        fetches: Arc::new(Semaphore::new(MAX_FETCHES)),
        polls: JoinSet::new(),
        tasks: JoinSet::new(),
        consumed: HashSet::new(),
        peer_protocol: 1,
        peer,
        identity,
        following: HashSet::new(),
    };
    let replier = tokio::spawn(reply_in_order(pending, out.clone()));
    let mut open = true;
    while open {
        let Some(frame) = next_frame(&mut inbound, &out, IDLE_TIMEOUT, &shutdown).await else {
            break;
        };
        session.handle(frame).await;
        // The requests that arrived with it join its burst: however many small produces and
        // calls one read brought, the commit thread takes them with one wake-up.
        let mut handled = 1;
        while handled < MAX_BURST && session.batch.bytes() < MAX_BURST_BYTES {
            match buffered_frame(&mut inbound, &out).await {
                Some(Some(frame)) => session.handle(frame).await,
                Some(None) => {
                    open = false;
                    break;
                }
                None => break,
            }
            handled += 1;
        }
        // Replies first: the batch may wait for the disk.
        session.burst.flush();
        session.submit_batch().await;
        // Reap finished request tasks so the sets do not grow.
        while session.tasks.try_join_next().is_some() {}
        while session.polls.try_join_next().is_some() {}
    }
    core.txns().checker_gone(conn);
    session.polls.shutdown().await;
    while session.tasks.join_next().await.is_some() {}
    drop(session.produced);
    let _ = replier.await;
    if !session.consumed.is_empty() {
        core.disconnect(conn);
    }
    for (mq, follower) in &session.following {
        if let Ok(mq) = core.registry().own(mq) {
            mq.followers().gone(follower);
        }
    }
    core.replies().disconnect(conn);
    tracing::debug!("session closed");
}

/// A produce awaiting its receipt: the request, its append, and the MQ whose followers
/// must hold it too when it asked for (or its MQ defaults to) `replicated`.
/// Last, the protocol the peer said in `Hello`, for the receipt's durability.
type Produced = (Box<Header>, ProduceWait, Option<Arc<Mq>>, u32);

/// Sends produce receipts in the order the produces arrived, as the disk (and, for
/// `replicated` receipts, the followers) confirm them.
/// A receipt that waits for another produce's outcome (a repeated dedupe id whose first
/// send is still being stored) goes out when it can, without holding up the others. Every
/// wait is settled even after the peer went away: that records the dedupe ids the appends
/// stored, so that the peer's resend after reconnecting is recognised.
async fn reply_in_order(mut pending: mpsc::Receiver<Produced>, out: FrameSender) {
    let mut open = true;
    while let Some((request, wait, replicated, peer_protocol)) = pending.recv().await {
        let receipt = match wait.settle().await {
            Settled::Now(receipt) => confirmed(receipt, replicated.as_deref()).await,
            Settled::Later(later) => {
                let out = out.clone();
                tokio::spawn(async move {
                    let receipt = confirmed(later.await, replicated.as_deref()).await;
                    let header = produce_reply(&request, receipt, peer_protocol);
                    if !request.has_flag(FLAG_ONEWAY) {
                        let _ = out.send(Frame::new(header)).await;
                    }
                });
                continue;
            }
        };
        let header = produce_reply(&request, receipt, peer_protocol);
        if open && !request.has_flag(FLAG_ONEWAY) {
            open = out.send(Frame::new(header)).await.is_ok();
        }
    }
}

/// `receipt`, once the followers of `replicated` (when given) hold what it names.
async fn confirmed(
    receipt: Result<Receipt, BrokerError>,
    replicated: Option<&Mq>,
) -> Result<Receipt, BrokerError> {
    match (receipt, replicated) {
        (Ok(receipt), Some(mq)) => mq.confirm_replicated(receipt).await,
        (receipt, _) => receipt,
    }
}

fn produce_reply(
    request: &Header,
    receipt: Result<Receipt, BrokerError>,
    peer_protocol: u32,
) -> Header {
    match receipt {
        Ok(receipt) => {
            let mut header = Header::reply_to(request);
            header.offset = Some(receipt.first_offset);
            header.count = Some(receipt.count as u32);
            header.durability = Some(durability_for(receipt.durability, peer_protocol));
            if !receipt.offsets.is_empty() {
                header.flags |= FLAG_DUPLICATE;
                header.offsets = receipt.offsets;
            }
            header
        }
        Err(e) => {
            tracing::error!(error = %e, "append failed");
            error_header(request, &e)
        }
    }
}

/// `durability` as a peer of `peer_protocol` can read it: before version 4 `memory` (code 4)
/// would read as `replicated`, so such a peer gets `written`, the weakest it knows.
fn durability_for(durability: Durability, peer_protocol: u32) -> Durability {
    if durability == Durability::Memory && peer_protocol < 4 {
        Durability::Written
    } else {
        durability
    }
}

/// A request that failed: enough to address the error reply.
struct Failure {
    cmd: Command,
    id: u64,
    error: BrokerError,
}

impl Failure {
    fn new(request: &Header, error: BrokerError) -> Failure {
        Failure {
            cmd: request.cmd,
            id: request.id,
            error,
        }
    }
}

fn error_header(request: &Header, e: &BrokerError) -> Header {
    Header::error(request.cmd, request.id, e.status(), e.to_string())
}

impl Session {
    async fn handle(&mut self, frame: Frame) {
        let header = &frame.header;
        if header.is_reply() {
            tracing::debug!(cmd = ?header.cmd, "ignoring a reply frame from a client");
            return;
        }
        let access = &self.core.config().access;
        if let Err(denied) = auth::permit(access, self.identity.as_ref(), auth::needs(header)) {
            self.core.metrics().denied(Protocol::Binary, denied.code());
            if header.has_flag(FLAG_ONEWAY) {
                tracing::warn!(error = %denied, "dropping a refused one-way request");
                return;
            }
            let refused = error_header(header, &BrokerError::Denied(denied));
            let _ = self.out.send(Frame::new(refused)).await;
            return;
        }
        let result = match header.cmd {
            Command::Hello => self.hello(&frame).await,
            Command::Heartbeat => {
                self.reply(Frame::new(Header::reply_to(&frame.header)))
                    .await
            }
            Command::Produce => self.produce(frame).await,
            Command::Fetch => self.fetch(frame.header),
            Command::ReplicaRead if replica::serve::is_confirmation(&frame.header) => {
                self.replica_confirm(frame).await
            }
            Command::ReplicaRead => self.replica_read(frame),
            Command::ReplicaEpoch => self.replica_epoch(frame).await,
            Command::Ack | Command::Nack => self.settle(frame.header).await,
            Command::ReplicaCursor => {
                let (core, out) = (self.core.clone(), self.out.clone());
                self.tasks.spawn(async move {
                    let reply = match replica::serve::replica_cursor(&core, &frame.header).await {
                        Ok(frame) => frame,
                        Err(e) => Frame::new(error_header(&frame.header, &e)),
                    };
                    let _ = out.send(reply).await;
                });
                Ok(())
            }
            Command::CreateMq
            | Command::QueryMq
            | Command::ListMq
            | Command::RemoveMq
            | Command::RemoveGroup
            | Command::AdoptCopy => {
                self.admin(frame);
                Ok(())
            }
            Command::Route if header.has_flag(FLAG_ROUTE_ACK) && self.peer_protocol >= 4 => {
                self.route_and_ack(frame).await
            }
            Command::Call | Command::Route | Command::QueryRoutes => {
                let (core, out) = (&self.core, &self.out);
                let (registry, replies) = (core.registry(), core.replies());
                let staged = Staging {
                    batch: &mut self.batch,
                    writes: &mut self.call_writes,
                    burst: Some(&mut self.burst),
                };
                match rpc::call::handle(registry, replies, self.conn, out, frame, staged) {
                    Some(reply) => self.reply(reply).await,
                    None => Ok(()),
                }
            }
            Command::TxBegin
            | Command::TxProduce
            | Command::TxCommit
            | Command::TxRollback
            | Command::TxList => {
                let (core, out) = (self.core.clone(), self.out.clone());
                self.tasks.spawn(async move {
                    let reply = match transaction(&core, &frame).await {
                        Ok(frame) => frame,
                        Err(e) => Frame::new(error_header(&frame.header, &e)),
                    };
                    let _ = out.send(reply).await;
                });
                Ok(())
            }
            Command::TxCheckerReady => self.checker_ready(&frame.header).await,
            Command::TxCheck => {
                let header = Header::error(
                    header.cmd,
                    header.id,
                    Status::BadRequest,
                    "TxCheck is sent by the broker; a producer answers it with TxCommit or TxRollback",
                );
                self.reply(Frame::new(header)).await
            }
            Command::Unknown(code) => {
                let header = Header::error(
                    header.cmd,
                    header.id,
                    Status::UnknownCommand,
                    format!(
                        "unknown command {code} (this broker speaks protocol {PROTOCOL_VERSION})"
                    ),
                );
                self.reply(Frame::new(header)).await
            }
            Command::Report
            | Command::Subscribe
            | Command::TopologyUpdate
            | Command::QueryTopology => {
                let header = Header::error(
                    header.cmd,
                    header.id,
                    Status::UnknownCommand,
                    format!(
                        "{:?} is a tracker command; this is a broker (send it to qbus-tracker)",
                        header.cmd
                    ),
                );
                self.reply(Frame::new(header)).await
            }
        };
        if let Err(failure) = result {
            let header = Header::error(
                failure.cmd,
                failure.id,
                failure.error.status(),
                failure.error.to_string(),
            );
            let _ = self.out.send(Frame::new(header)).await;
        }
    }

    /// Queues `frame` for the burst's flush (waiting only while the link's queue is full).
    async fn reply(&mut self, frame: Frame) -> Result<(), Failure> {
        if let Err(TrySendError::Full(frame)) = self.burst.feed(&self.out, frame) {
            self.burst.flush();
            let _ = self.out.send(frame).await;
        }
        Ok(())
    }

    /// `TxCheckerReady`: this connection answers the checks of producer group `group`.
    async fn checker_ready(&mut self, request: &Header) -> Result<(), Failure> {
        let failed = |e| Failure::new(request, e);
        // A check is a protocol 4 push: never sent to a peer that could not read it.
        if self.peer_protocol < 4 {
            return Err(failed(BrokerError::BadRequest(
                "TxCheckerReady needs protocol 4 in Hello".into(),
            )));
        }
        let group = required(&request.group, "group").map_err(failed)?;
        self.core
            .txns()
            .checker_ready(group, self.conn, self.out.clone())
            .map_err(failed)?;
        self.reply(Frame::new(Header::reply_to(request))).await
    }

    async fn hello(&mut self, request: &Frame) -> Result<(), Failure> {
        // A peer that sends no readable ServerInfo is a version 1 peer.
        let hello = rmp_serde::from_slice::<ServerInfo>(&request.body).ok();
        self.peer_protocol = hello
            .as_ref()
            .map_or(1, |peer| peer.protocol.clamp(1, PROTOCOL_VERSION));
        if let Some(credentials) = hello.and_then(|hello| hello.credentials) {
            let access = self.core.config().access.clone();
            self.burst.flush();
            match login(&access, self.peer.ip, &credentials).await {
                Ok(identity) => {
                    tracing::debug!(user = identity.name(), "logged in");
                    self.identity = Some(identity);
                }
                Err(denied) => {
                    self.core.metrics().denied(Protocol::Binary, denied.code());
                    return Err(Failure::new(&request.header, denied.into()));
                }
            }
        }
        let max_frame = self.core.config().max_frame;
        let identity = self.identity.as_ref().map(Identity::name);
        self.reply(hello_reply(
            &request.header,
            env!("CARGO_PKG_VERSION"),
            max_frame,
            identity,
        ))
        .await
    }

    async fn produce(&mut self, frame: Frame) -> Result<(), Failure> {
        let Frame { header, body } = frame;
        let checked = (|| {
            let mq = self.core.registry().get(required(&header.mq, "mq")?)?;
            let (mut count, mut delayed, mut deduped) = (0u32, false, false);
            for record in records(&body) {
                let record = record
                    .map_err(|e| BrokerError::BadRequest(format!("bad record {count}: {e}")))?;
                delayed |= crate::queue::timer::check_produced(&record, count)?;
                deduped |= record.dedupe_id.is_some();
                count += 1;
            }
            if count == 0 {
                return Err(BrokerError::BadRequest("produce without records".into()));
            }
            if header.count.is_some_and(|c| c != count) {
                return Err(BrokerError::BadRequest(format!(
                    "header says {} records, body holds {count}",
                    header.count.unwrap_or_default()
                )));
            }
            Ok((mq, count, delayed, deduped))
        })();
        let (mq, count, delayed, deduped) = match checked {
            Ok(checked) => checked,
            Err(e) if header.has_flag(FLAG_ONEWAY) => {
                tracing::warn!(error = %e, "dropping bad one-way produce");
                return Ok(());
            }
            Err(e) => return Err(Failure::new(&header, e)),
        };
        if delayed {
            self.burst.flush();
            if let Err(e) = self.core.registry().enable_delays(&mq).await {
                return Err(Failure::new(&header, e));
            }
        }
        let replicated = !header.has_flag(FLAG_ONEWAY)
            && !header.has_flag(FLAG_ACK_LOCAL)
            && (header.has_flag(FLAG_ACK_REPLICATED) || mq.replicated_by_default());
        if replicated {
            mq.admit_replicated()
                .map_err(|e| Failure::new(&header, e.into()))?;
        }
        let wait = if deduped {
            self.burst.flush();
            match mq.stage_deduped(&mut self.batch, body, count).await {
                Ok(wait) => wait,
                Err(e) => return Err(Failure::new(&header, e)),
            }
        } else {
            ProduceWait::Plain(mq.stage(&mut self.batch, BytesMut::from(body), count))
        };
        let replicated = replicated.then_some(mq);
        let produced = (header, wait, replicated, self.peer_protocol);
        if let Err(mpsc::error::TrySendError::Full(produced)) = self.produced.try_send(produced) {
            // About to wait: what the burst answered so far goes out first.
            self.burst.flush();
            let _ = self.produced.send(produced).await;
        }
        Ok(())
    }

    /// Hands the burst's appends and cursor stores to the commit thread. Should it be gone
    /// (shutdown), each wait fails and its produce, call or ack is answered with the error.
    async fn submit_batch(&mut self) {
        for (mq, group, tokens) in std::mem::take(&mut self.route_acks) {
            let staged =
                self.core
                    .registry()
                    .stage_ack(&mut self.batch, &mq, group.as_deref(), &tokens);
            // Nobody awaits a one-way ack; a delivery it missed comes again after its ack
            // timeout.
            if let Err(e) = staged {
                tracing::debug!(%mq, error = %e, "one-way ack of RPC replies refused");
            }
        }
        let batch = std::mem::take(&mut self.batch);
        let _ = self.core.committer().submit(batch).await;
        self.call_writes.settle(self.core.replies());
    }

    fn fetch(&mut self, request: Box<Header>) -> Result<(), Failure> {
        let Ok(permit) = self.fetches.clone().try_acquire_owned() else {
            let e = BrokerError::Overloaded(format!(
                "more than {MAX_FETCHES} fetches waiting on one connection"
            ));
            return Err(Failure::new(&request, e));
        };
        let (mq, group) = match (required(&request.mq, "mq"), &request.group) {
            (Ok(mq), Some(group)) => (mq.to_owned(), group.clone()),
            (Ok(mq), None) => (mq.to_owned(), mq.to_owned()),
            (Err(e), _) => return Err(Failure::new(&request, e)),
        };
        if self.consumed.insert((mq.clone(), group.clone())) {
            // A consumer joined: the trackers hear of it within the reporter's debounce.
            self.core.changed();
        }
        let core = self.core.clone();
        let out = self.out.clone();
        let conn = self.conn;
        let peer_protocol = self.peer_protocol;
        self.polls.spawn(async move {
            let _permit = permit;
            let reply = match fetch(&core, conn, &request, &mq, &group, peer_protocol).await {
                Ok(frame) => frame,
                Err(e) => Frame::new(error_header(&request, &e)),
            };
            // Its own write: nothing else in this task would come with it.
            let _ = out.send_flushed(reply).await;
        });
        Ok(())
    }

    /// Checks that the peer can follow (records go out byte for byte as stored, version 3
    /// fields (delay, TTL) and all: only a peer that said protocol 3 in `Hello` can take
    /// them) and notes the copy it follows, so that it counts as gone when this connection
    /// closes.
    fn follower_of(&mut self, request: &Header) -> Result<(), Failure> {
        if self.peer_protocol < 3 {
            let e = BrokerError::BadRequest(format!(
                "ReplicaRead needs protocol 3; this connection said {} in Hello",
                self.peer_protocol
            ));
            return Err(Failure::new(request, e));
        }
        if let (Some(mq), Some(follower)) = (&request.mq, &request.group) {
            self.following.insert((mq.clone(), follower.clone()));
        }
        Ok(())
    }

    /// A follower's confirmation, answered in line (see [`replica::serve::replica_confirm`]).
    async fn replica_confirm(&mut self, request: Frame) -> Result<(), Failure> {
        self.follower_of(&request.header)?;
        let reply = replica::serve::replica_confirm(&self.core, &request)
            .unwrap_or_else(|e| Frame::new(error_header(&request.header, &e)));
        self.reply(reply).await
    }

    /// A follower asking for its leader epoch, answered in line (see
    /// [`replica::serve::replica_epoch`]).
    async fn replica_epoch(&mut self, request: Frame) -> Result<(), Failure> {
        self.follower_of(&request.header)?;
        let reply = replica::serve::replica_epoch(&self.core, &request)
            .unwrap_or_else(|e| Frame::new(error_header(&request.header, &e)));
        self.reply(reply).await
    }

    /// A follower's pull of this broker's records (a long poll, like a fetch).
    fn replica_read(&mut self, request: Frame) -> Result<(), Failure> {
        self.follower_of(&request.header)?;
        let Ok(permit) = self.fetches.clone().try_acquire_owned() else {
            let e = BrokerError::Overloaded(format!(
                "more than {MAX_FETCHES} fetches waiting on one connection"
            ));
            return Err(Failure::new(&request.header, e));
        };
        let (core, out) = (self.core.clone(), self.out.clone());
        self.polls.spawn(async move {
            let _permit = permit;
            let reply = match replica::serve::replica_read(&core, &request).await {
                Ok(frame) => frame,
                Err(e) => Frame::new(error_header(&request.header, &e)),
            };
            let _ = out.send(reply).await;
        });
        Ok(())
    }

    async fn settle(&mut self, request: Box<Header>) -> Result<(), Failure> {
        let failed = |e| Failure::new(&request, e);
        let mq = required(&request.mq, "mq").map_err(failed)?;
        let group = request.group.as_deref();
        let mut header = Header::reply_to(&request);
        if request.cmd == Command::Nack {
            let unseen = request.has_flag(FLAG_UNSEEN);
            let released = self
                .core
                .registry()
                .nack(mq, group, &request.tokens, unseen);
            header.count = Some(released.map_err(failed)? as u32);
            return self.reply(Frame::new(header)).await;
        }
        let registry = self.core.registry();
        let (acked, stored) = registry
            .stage_ack(&mut self.batch, mq, group, &request.tokens)
            .map_err(failed)?;
        let out = self.out.clone();
        let peer_protocol = self.peer_protocol;
        // The reply waits for the cursor's write, which goes with the burst's batch.
        self.tasks.spawn(async move {
            let reply = match stored.wait().await {
                Ok(durability) => {
                    header.count = Some(acked as u32);
                    header.durability = Some(durability_for(durability, peer_protocol));
                    Frame::new(header)
                }
                Err(e) => Frame::new(error_header(&request, &BrokerError::Store(e))),
            };
            let _ = out.send(reply).await;
        });
        Ok(())
    }

    /// A responder's reply that also acknowledges its call (`FLAG_ROUTE_ACK`, protocol 4):
    /// the reply is routed as a one-way `Route`, and the ack recorded as an `Ack` of the
    /// frame's mq, group and tokens: a one-way one with the burst's others (no reply), or
    /// else at once, its reply this frame's.
    async fn route_and_ack(&mut self, mut frame: Frame) -> Result<(), Failure> {
        let header = &mut frame.header;
        let (mq, group, tokens) = (
            header.mq.take(),
            header.group.take(),
            std::mem::take(&mut header.tokens),
        );
        let (id, oneway) = (header.id, header.has_flag(FLAG_ONEWAY));
        header.flags |= FLAG_ONEWAY;
        let (core, out) = (&self.core, &self.out);
        let (registry, replies) = (core.registry(), core.replies());
        // One-way, so it has no reply: an unroutable reply is only counted.
        let staged = Staging {
            batch: &mut self.batch,
            writes: &mut self.call_writes,
            burst: Some(&mut self.burst),
        };
        rpc::call::handle(registry, replies, self.conn, out, frame, staged);
        match mq {
            Some(mq) if oneway => {
                let same = |(m, g, _): &&mut (String, Option<String>, _)| *m == mq && *g == group;
                match self.route_acks.iter_mut().find(same) {
                    Some((_, _, staged)) => staged.extend(tokens),
                    None => self.route_acks.push((mq, group, tokens)),
                }
                Ok(())
            }
            mq => {
                let ack = Header {
                    cmd: Command::Ack,
                    id,
                    mq,
                    group,
                    tokens,
                    ..Header::default()
                };
                self.settle(Box::new(ack)).await
            }
        }
    }

    fn admin(&mut self, frame: Frame) {
        let core = self.core.clone();
        let out = self.out.clone();
        let identity = self.identity.clone();
        self.tasks.spawn(async move {
            let reply = match admin(&core, &frame, identity.as_ref()).await {
                Ok(frame) => frame,
                Err(e) => Frame::new(error_header(&frame.header, &e)),
            };
            let _ = out.send(reply).await;
        });
    }
}

async fn fetch(
    core: &Core,
    conn: u64,
    request: &Header,
    mq_name: &str,
    group_name: &str,
    peer_protocol: u32,
) -> Result<Frame, BrokerError> {
    let report_loss = peer_protocol >= 2;
    let start = if request.has_flag(FLAG_START_AT_END) {
        Start::Latest
    } else if request.has_flag(FLAG_START_AT_OFFSET) {
        Start::Offset(request.offset.unwrap_or(0))
    } else {
        Start::Earliest
    };
    let fetch = FetchRequest {
        mq: mq_name,
        group: Some(group_name),
        tag: request.tag.as_deref(),
        start,
        count: request.count.unwrap_or(1) as usize,
        wait: Duration::from_millis(request.timeout_ms.unwrap_or(0).into()),
        report_loss,
    };
    let fetched = core.fetch(conn, &fetch).await?;
    let mut header = Header::reply_to(request);
    header.count = Some(fetched.attempts.len() as u32);
    header.attempts = fetched.attempts;
    if let Some(lost) = fetched.lost {
        header.lost = Some(LostRange {
            first: lost.first,
            end: lost.end,
        });
        header.error = Some(format!(
            "offsets {}..{} of MQ {mq_name:?} are lost: damaged record in {} at byte {} ({})",
            lost.first,
            lost.end,
            lost.file.display(),
            lost.position,
            lost.reason
        ));
    }
    if let Some(dropped) = fetched.dropped {
        header.lost = Some(LostRange {
            first: dropped.start,
            end: dropped.end,
        });
        header.error = Some(format!(
            "offsets {}..{} of memory MQ {mq_name:?} are lost: its ring dropped them (size or age limit) before group {group_name:?} read them; it goes on from the oldest kept",
            dropped.start, dropped.end
        ));
    }
    let mut body = fetched.body;
    if peer_protocol < 3 {
        // Records of delayed, expiring or deduped messages carry fields a version 2 peer
        // refuses.
        if let Some(old) = without_v3_fields(&body)
            .map_err(|e| BrokerError::Internal(format!("re-encoding records: {e}")))?
        {
            body = old.into();
        }
    }
    Ok(Frame::with_body(header, body))
}

/// Logs a peer in with the credentials of its `Hello`.
pub(crate) async fn login(
    access: &Arc<Access>,
    ip: Option<std::net::IpAddr>,
    credentials: &Credentials,
) -> Result<Identity, Denied> {
    match credentials {
        Credentials::Password { user, password } => access.login_password(ip, user, password).await,
        Credentials::Token { token } => access.login_token(ip, token).await,
    }
}

async fn admin(
    core: &Core,
    frame: &Frame,
    identity: Option<&Identity>,
) -> Result<Frame, BrokerError> {
    let request = &frame.header;
    let body = match request.cmd {
        Command::CreateMq => {
            let options: MqOptions = if frame.body.is_empty() {
                MqOptions::default()
            } else {
                rmp_serde::from_slice(&frame.body)
                    .map_err(|e| BrokerError::BadRequest(format!("bad MQ options: {e}")))?
            };
            let mq = core.create(required(&request.mq, "mq")?, options).await?;
            encode_body(&mq.info())
        }
        Command::QueryMq => encode_body(&core.registry().get(required(&request.mq, "mq")?)?.info()),
        Command::ListMq => {
            let access = &core.config().access;
            let all: Vec<_> = core
                .registry()
                .list()
                .iter()
                .filter(|mq| access.allows(identity, Operation::Read, mq.name()))
                .map(|mq| mq.info())
                .collect();
            encode_body(&all)
        }
        Command::RemoveMq => {
            core.remove(required(&request.mq, "mq")?).await?;
            Vec::new()
        }
        Command::AdoptCopy => {
            let mq = core.registry().adopt(required(&request.mq, "mq")?).await?;
            core.changed();
            encode_body(&mq.info())
        }
        Command::RemoveGroup => {
            let mq = required(&request.mq, "mq")?;
            core.remove_group(mq, required(&request.group, "group")?)
                .await?;
            Vec::new()
        }
        other => {
            return Err(BrokerError::BadRequest(format!(
                "{other:?} is not an admin command"
            )))
        }
    };
    Ok(Frame::with_body(Header::reply_to(request), body.into()))
}

/// The transaction commands (protocol 4): the transaction id travels in `offset`.
async fn transaction(core: &Core, frame: &Frame) -> Result<Frame, BrokerError> {
    let request = &frame.header;
    let txns = core.txns();
    let id = || {
        request
            .offset
            .ok_or_else(|| BrokerError::BadRequest("missing offset (the transaction id)".into()))
    };
    let mut reply = Header::reply_to(request);
    let decided = match request.cmd {
        Command::TxBegin => {
            let options: TxOptions = if frame.body.is_empty() {
                TxOptions::default()
            } else {
                rmp_serde::from_slice(&frame.body)
                    .map_err(|e| BrokerError::BadRequest(format!("bad transaction options: {e}")))?
            };
            reply.offset = Some(txns.begin(options).await?);
            None
        }
        Command::TxProduce => {
            let mq = required(&request.mq, "mq")?;
            let mut count = 0u32;
            for record in records(&frame.body) {
                let record = record
                    .map_err(|e| BrokerError::BadRequest(format!("bad record {count}: {e}")))?;
                if crate::queue::timer::check_produced(&record, count)? {
                    return Err(BrokerError::BadRequest(format!(
                        "record {count} is delayed: delayed messages cannot be part of a transaction"
                    )));
                }
                count += 1;
            }
            if count == 0 || request.count.is_some_and(|c| c != count) {
                return Err(BrokerError::BadRequest(format!(
                    "the body holds {count} records, the header says {:?}",
                    request.count
                )));
            }
            txns.produce(core.registry(), id()?, mq, frame.body.clone(), count)
                .await?;
            reply.count = Some(count);
            None
        }
        Command::TxCommit => Some(
            txns.commit(core.registry(), core.committer(), id()?)
                .await?,
        ),
        Command::TxRollback => Some(txns.rollback(id()?).await?),
        Command::TxList => {
            let list = match request.offset {
                Some(id) => vec![txns.get(id)?],
                None => txns.list(),
            };
            return Ok(Frame::with_body(reply, encode_body(&list).into()));
        }
        other => {
            return Err(BrokerError::BadRequest(format!(
                "{other:?} is not a transaction command"
            )))
        }
    };
    if decided == Some(Decided::Already) {
        reply.flags |= FLAG_TX_ALREADY;
    }
    Ok(Frame::new(reply))
}

fn encode_body<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serialising our own plain structs cannot fail.
    rmp_serde::to_vec_named(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_receipts_read_as_written_before_version_4() {
        for old in 1..4 {
            assert_eq!(durability_for(Durability::Memory, old), Durability::Written);
            assert_eq!(durability_for(Durability::Synced, old), Durability::Synced);
        }
        assert_eq!(durability_for(Durability::Memory, 4), Durability::Memory);
        assert_eq!(
            Durability::from(u8::from(Durability::Memory)),
            Durability::Memory
        );
    }
}
