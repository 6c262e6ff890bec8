//! Following one copy: pulls a leader's records of one MQ into this broker's copy, and
//! its groups' cursors, until told to stop. A round starts from the copy's end (what the
//! commit thread has made durable and published), so a follower that restarts or loses
//! its leader for a while carries on from where it is; within a round, reads run ahead of
//! the disk and a task confirms each append to the leader once it is durable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use qbus_client::{ClientError, Connection};
use qbus_wire::protocol::{
    Command, Durability, EpochAnswer, Frame, Header, LeaderEpoch, MqInfo, Status,
    FLAG_LEADER_EPOCH, FLAG_READ_AHEAD,
};
use qbus_wire::Backoff;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::error::BrokerError;
use crate::queue::group_commit::AppendWait;
use crate::queue::mq::Mq;
use crate::store::{epochs, Appended};

/// How long a read waits at the leader for a record; a follower is heard at least this
/// often, well within `leader::REACHABLE`.
pub const POLL_WAIT: Duration = Duration::from_secs(1);
/// How often the leader's cursors are copied.
const CURSORS_EVERY: Duration = Duration::from_secs(1);

/// Which copy to follow, and from where.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Assignment {
    /// The leader broker's id.
    pub leader: String,
    /// Where it is reached.
    pub addr: String,
    /// The MQ.
    pub mq: String,
}

/// Why following stopped for good (until the topology changes).
#[derive(Debug, thiserror::Error)]
enum Stop {
    #[error("the leader holds fewer records ({leader_end}) than this copy ({copy_end}): it lost its store; the copy is kept for a restore or `adopt`")]
    LeaderBehind { leader_end: u64, copy_end: u64 },
}

/// Follows `assignment` for broker `me` until `stop` fires.
pub async fn follow(core: Arc<Core>, me: String, assignment: Assignment, stop: CancellationToken) {
    let connection = super::peer_connection(&core, &assignment.addr);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    tracing::info!(leader = %assignment.leader, mq = %assignment.mq, "following");
    loop {
        let started = Instant::now();
        let round = tokio::select! {
            round = pull(&core, &connection, &me, &assignment) => round,
            _ = stop.cancelled() => return,
        };
        match round {
            Ok(stop) => {
                tracing::error!(leader = %assignment.leader, mq = %assignment.mq, reason = %stop, "following stopped");
                return;
            }
            Err(e) => {
                tracing::warn!(leader = %assignment.leader, mq = %assignment.mq, error = %e, "following: retrying");
            }
        }
        if started.elapsed() > Duration::from_secs(10) {
            // It had been following fine: the first retry comes soon again.
            backoff.reset();
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_wait()) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Pulls until something fails.
async fn pull(
    core: &Core,
    connection: &Connection,
    me: &str,
    assignment: &Assignment,
) -> Result<Stop, PullError> {
    let copies = core.registry().copies();
    let (leader, name) = (assignment.leader.as_str(), assignment.mq.as_str());
    let info = query(connection, name).await?;
    let copy = copies
        .get_or_create(leader, name, &info.options, info.first_offset)
        .await?;
    // Before anything else (the copy's cursors included) the copy drops what a power loss
    // took from the leader since the copy last followed it.
    let (mut copy, epoch) = agree_epoch(core, connection, me, assignment, &info, copy).await?;
    sync_cursors(core, connection, &copy, &info).await?;
    let mut cursors_at = Instant::now();
    // Reads run ahead of the disk: the next read goes out while the previous records are
    // still being made durable, and a task confirms each append once it is.
    let mut confirming = Confirmer::start(connection, name, me, epoch);
    let mut next = copy.reader().end_offset();
    loop {
        if cursors_at.elapsed() >= CURSORS_EVERY {
            let info = query(connection, name).await?;
            sync_cursors(core, connection, &copy, &info).await?;
            cursors_at = Instant::now();
        }
        let ahead = Read {
            from: next,
            wait: POLL_WAIT,
            ahead: true,
            epoch,
        };
        let reply = match read(connection, name, me, ahead).await {
            Err(PullError::Leader(e)) if e.status() == Some(Status::Conflict) => {
                return Ok(Stop::LeaderBehind {
                    leader_end: info.next_offset,
                    copy_end: next,
                })
            }
            other => other?,
        };
        let first = reply.header.offset.unwrap_or(next);
        let count = reply.header.count.unwrap_or(0);
        if first > next {
            // The leader's retention deleted what this copy lacks: start again from its
            // oldest record, once the appends under way are done.
            confirming.finish().await?;
            tracing::warn!(
                leader,
                mq = name,
                copy_end = next,
                leader_first = first,
                "follower copy too far behind: resyncing"
            );
            copy = copies.reset(leader, name, &info.options, first).await?;
            if let Some(epoch) = epoch {
                follow_epoch(&copy, epoch).await?;
            }
            confirming = Confirmer::start(connection, name, me, epoch);
            next = first;
        } else if first < next {
            return Err(PullError::Protocol(format!(
                "asked for offset {next}, got records from {first}"
            )));
        }
        if count > 0 {
            let wait = copy.stage_copied(core.committer(), BytesMut::from(reply.body), count);
            next = first + u64::from(count);
            confirming.push(wait.await?).await?;
        } else {
            // Nothing new: confirm the copy's end once what is under way is durable, so
            // the leader knows an idle follower holds everything (and is in sync).
            let at_end = Appended {
                first_offset: next,
                count: 0,
                next_offset: next,
            };
            confirming
                .push(AppendWait::ready((at_end, Durability::Written)))
                .await?;
        }
    }
}

/// Agrees with the leader on its epoch now (`ReplicaEpoch`) and returns the copy to pull
/// into: `copy` itself, or a new empty one when it holds records from where the epoch it
/// last followed ended on the leader (a power loss took them from the leader, which may
/// have written others at their offsets since). The epoch is recorded with the copy
/// before any record of it is appended. `None`: the leader speaks no epochs (protocol 4,
/// or an MQ without them); the copy then takes only records the leader synced.
async fn agree_epoch(
    core: &Core,
    connection: &Connection,
    me: &str,
    assignment: &Assignment,
    info: &MqInfo,
    copy: Arc<Mq>,
) -> Result<(Arc<Mq>, Option<LeaderEpoch>), PullError> {
    let (leader, name) = (assignment.leader.as_str(), assignment.mq.as_str());
    let followed = {
        let copy = copy.clone();
        blocking(move || copy.followed_epoch()).await?
    };
    let mut header = Header::request(Command::ReplicaEpoch, Some(name));
    header.group = Some(me.to_owned());
    let body = match followed {
        Some(epoch) => encode(&epoch)?,
        None => Bytes::new(),
    };
    let answer: EpochAnswer = match connection.request(Frame::with_body(header, body)).await {
        Ok(reply) => rmp_serde::from_slice(&reply.body)
            .map_err(|e| PullError::Protocol(format!("unreadable epoch answer: {e}")))?,
        Err(e)
            if matches!(
                e.status(),
                Some(Status::UnknownCommand | Status::BadRequest)
            ) =>
        {
            tracing::info!(leader, mq = name, error = %e, "leader has no epochs: copying only records it synced");
            return Ok((copy, None));
        }
        Err(e) => return Err(e.into()),
    };
    let (first, end) = (copy.reader().first_offset(), copy.reader().end_offset());
    let keep = epochs::copy_is_leaders(followed, &answer, (first, end), info.next_offset);
    let copy = if keep {
        copy
    } else {
        tracing::warn!(
            leader,
            mq = name,
            copy_end = end,
            ended_at = ?answer.ended_at,
            "follower copy holds records its leader lost: resyncing"
        );
        core.registry()
            .copies()
            .reset(leader, name, &info.options, info.first_offset)
            .await?
    };
    follow_epoch(&copy, answer.current).await?;
    Ok((copy, Some(answer.current)))
}

/// Records durably that `copy` follows `epoch`.
async fn follow_epoch(copy: &Arc<Mq>, epoch: LeaderEpoch) -> Result<(), PullError> {
    let copy = copy.clone();
    blocking(move || copy.follow_epoch(epoch)).await
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, PullError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| PullError::Protocol(format!("copy epoch: {e}")))?
        .map_err(PullError::from)
}

fn encode(epoch: &LeaderEpoch) -> Result<Bytes, PullError> {
    rmp_serde::to_vec(epoch)
        .map(Bytes::from)
        .map_err(|e| PullError::Protocol(format!("leader epoch: {e}")))
}

/// Confirms the copy's appends to the leader in order, each once it is durable.
struct Confirmer {
    tx: mpsc::Sender<AppendWait>,
    task: tokio::task::JoinHandle<Result<(), PullError>>,
}

/// Appends read but not yet confirmed, at most (bounds the records held in memory); and
/// confirmations sent whose replies have not come, at most.
const PIPELINE: usize = 4;

impl Confirmer {
    fn start(
        connection: &Connection,
        name: &str,
        me: &str,
        epoch: Option<LeaderEpoch>,
    ) -> Confirmer {
        let (tx, mut rx) = mpsc::channel::<AppendWait>(PIPELINE);
        let (connection, name, me) = (connection.clone(), name.to_owned(), me.to_owned());
        let task = tokio::spawn(async move {
            let mut held = None;
            // A confirmation does not wait for the reply to the one before: the leader
            // answers them in line, in their order, so the next append made durable is
            // confirmed at once rather than a round trip later.
            let mut replies = FuturesUnordered::new();
            loop {
                let wait = match held.take() {
                    Some(wait) => wait,
                    None => tokio::select! {
                        Some(reply) = replies.next(), if !replies.is_empty() => {
                            reply?;
                            continue;
                        }
                        wait = rx.recv() => match wait {
                            Some(wait) => wait,
                            None => break,
                        },
                    },
                };
                let (mut appended, _) = wait.wait().await?;
                // A copy's appends become durable in order: later ones already durable are
                // confirmed by the same request (one round trip, one wake-up at the leader).
                while let Ok(next) = rx.try_recv() {
                    match next.done() {
                        Ok(done) => appended = done?.0,
                        Err(pending) => {
                            held = Some(pending);
                            break;
                        }
                    }
                }
                while replies.len() >= PIPELINE {
                    if let Some(reply) = replies.next().await {
                        reply?;
                    }
                }
                let confirm = Read {
                    from: appended.next_offset,
                    wait: Duration::ZERO,
                    ahead: false,
                    epoch,
                };
                replies.push(read_only(&connection, &name, &me, confirm).await?);
            }
            while let Some(reply) = replies.next().await {
                reply?;
            }
            Ok(())
        });
        Confirmer { tx, task }
    }

    /// Queues `wait`; fails when an earlier append or confirmation failed.
    async fn push(&mut self, wait: AppendWait) -> Result<(), PullError> {
        if self.tx.send(wait).await.is_err() {
            return self.finish_task().await;
        }
        Ok(())
    }

    /// Waits until every append queued is durable and confirmed.
    async fn finish(mut self) -> Result<(), PullError> {
        // Closing the queue ends the task once it has confirmed what it holds.
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, closed));
        let task = std::mem::replace(&mut self.task, tokio::spawn(async { Ok(()) }));
        join(task).await
    }

    async fn finish_task(&mut self) -> Result<(), PullError> {
        let task = std::mem::replace(&mut self.task, tokio::spawn(async { Ok(()) }));
        join(task).await?;
        Err(PullError::Protocol("confirmations stopped".into()))
    }
}

impl Drop for Confirmer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn join(task: tokio::task::JoinHandle<Result<(), PullError>>) -> Result<(), PullError> {
    task.await
        .map_err(|e| PullError::Protocol(format!("confirmation task: {e}")))?
}

/// One `ReplicaRead`: from where, how long the other end may wait for a record, whether
/// it is a read ahead (which confirms nothing), and the leader epoch agreed on (with one,
/// the leader refuses it in another epoch, and serves records it has not synced yet).
#[derive(Debug, Clone, Copy)]
pub(super) struct Read {
    pub(super) from: u64,
    pub(super) wait: Duration,
    pub(super) ahead: bool,
    pub(super) epoch: Option<LeaderEpoch>,
}

/// A confirmation: a `ReplicaRead` asking for no records, sent (queued on the connection,
/// so confirmations keep their order on the wire) before this returns; the future it
/// returns resolves with the reply, within the connection's request timeout.
async fn read_only(
    connection: &Connection,
    name: &str,
    me: &str,
    confirm: Read,
) -> Result<impl std::future::Future<Output = Result<(), PullError>>, PullError> {
    let mut frame = request(name, me, confirm)?;
    frame.header.count = Some(0);
    let limit = connection.options().request_timeout;
    let pending = connection.send(frame).await?;
    Ok(async move {
        match tokio::time::timeout(limit, pending).await {
            Ok(reply) => reply.map(drop).map_err(PullError::from),
            Err(_) => Err(PullError::Leader(ClientError::Timeout(limit))),
        }
    })
}

fn request(name: &str, me: &str, read: Read) -> Result<Frame, PullError> {
    let mut header = Header::request(Command::ReplicaRead, Some(name));
    header.group = Some(me.to_owned());
    header.offset = Some(read.from);
    header.timeout_ms = Some(read.wait.as_millis() as u32);
    if read.ahead {
        header.flags |= FLAG_READ_AHEAD;
    }
    let Some(epoch) = read.epoch else {
        return Ok(Frame::new(header));
    };
    header.flags |= FLAG_LEADER_EPOCH;
    Ok(Frame::with_body(header, encode(&epoch)?))
}

/// One `ReplicaRead` of `name` as follower `me`.
pub(super) async fn read(
    connection: &Connection,
    name: &str,
    me: &str,
    read: Read,
) -> Result<Frame, PullError> {
    Ok(connection
        .request_with_wait(request(name, me, read)?, read.wait)
        .await?)
}

/// Appends records read from a leader (or, restoring, from a follower) to `copy`, whose
/// log keeps them byte for byte, and waits until they are durable.
pub(super) async fn append(
    core: &Core,
    copy: &Mq,
    body: Bytes,
    count: u32,
) -> Result<(), BrokerError> {
    copy.append_copied(core.committer(), BytesMut::from(body), count)
        .await
}

/// Moves the copy's groups up to the leader's cursors (`info`), and hands the leader the
/// cursors of groups the copy has further on: consumers acknowledged records on the copy
/// while the leader was away.
async fn sync_cursors(
    core: &Core,
    connection: &Connection,
    copy: &Mq,
    info: &MqInfo,
) -> Result<(), PullError> {
    for group in &info.groups {
        copy.advance_group(core.committer(), &group.name, group.committed)
            .await?;
    }
    for group in copy.info().groups {
        let leader = info.groups.iter().find(|g| g.name == group.name);
        let leader_committed = leader.map_or(info.first_offset, |g| g.committed);
        if group.committed <= leader_committed {
            continue;
        }
        let mut header = Header::request(Command::ReplicaCursor, Some(&info.name));
        header.group = Some(group.name.clone());
        header.offset = Some(group.committed);
        connection.request(Frame::new(header)).await?;
        tracing::info!(mq = %info.name, group = %group.name, committed = group.committed, "acks taken on the copy handed to its leader");
    }
    Ok(())
}

/// `QueryMq` of `mq` at the other end.
pub(super) async fn query(connection: &Connection, mq: &str) -> Result<MqInfo, PullError> {
    let reply = connection
        .request(Frame::new(Header::request(Command::QueryMq, Some(mq))))
        .await?;
    rmp_serde::from_slice(&reply.body)
        .map_err(|e| PullError::Protocol(format!("unreadable MqInfo from the leader: {e}")))
}

/// A pull that failed; following retries.
#[derive(Debug, thiserror::Error)]
pub(super) enum PullError {
    #[error("leader: {0}")]
    Leader(#[from] ClientError),
    #[error("copy: {0}")]
    Copy(#[from] BrokerError),
    #[error("copy: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("leader: {0}")]
    Protocol(String),
}
