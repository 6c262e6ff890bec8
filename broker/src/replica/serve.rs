//! The leader's side of the follower commands: `ReplicaRead`, a follower's pull of this
//! broker's own records of an MQ; `ReplicaEpoch`, where the epoch a follower's copy last
//! followed ended; and `ReplicaCursor`, acks a follower's copy took while this broker was
//! away.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use qbus_wire::protocol::{Frame, Header, LeaderEpoch, FLAG_LEADER_EPOCH, FLAG_READ_AHEAD};

use crate::core::{Core, MAX_WAIT};
use crate::error::{required, BrokerError};
use crate::queue::mq::{Mq, MAX_FETCH_BYTES};
use crate::store::reader::{LogReader, ReadBatch};

/// Most records one pull may ask for.
const MAX_RECORDS: usize = 1 << 16;

/// Answers a follower's pull: records of this broker's own `mq` (or of its copy `MQ@LEADER`,
/// to the leader restoring it) from `offset` (or from the
/// oldest one retained, when `offset` is older: the reply's `offset` then says where the
/// records start, and the follower resyncs), byte for byte as stored and published. Waits
/// up to `timeout_ms` for a record when there is none yet. Unless it is a read ahead
/// (`FLAG_READ_AHEAD`), it confirms that the follower holds every record below `offset`;
/// with `count` 0 it is only that confirmation. With `FLAG_LEADER_EPOCH` (the follower
/// agreed on this MQ's epoch now) it also serves records written but not yet synced.
pub async fn replica_read(core: &Core, request: &Frame) -> Result<Frame, BrokerError> {
    let (mq, from) = heard_from(core, request)?;
    let request = &request.header;
    if request.count == Some(0) {
        return Ok(confirmed(request, from));
    }
    let reader = mq.reader().clone();
    let unsynced = request.has_flag(FLAG_LEADER_EPOCH);
    let wait = Duration::from_millis(request.timeout_ms.unwrap_or(0).into()).min(MAX_WAIT);
    let give_up = tokio::time::Instant::now() + wait;
    let end = if unsynced {
        reader.subscribe_written_end()
    } else {
        reader.subscribe_end()
    };
    wait_past(end, from, give_up).await;
    let start = from.max(reader.first_offset());
    let max = (request.count.unwrap_or(MAX_RECORDS as u32) as usize).clamp(1, MAX_RECORDS);
    // Published records first: one published while this looked is then found there.
    let written = || unsynced.then(|| reader.read_written(start, max, MAX_FETCH_BYTES));
    let batch = match reader
        .read_recent(start, max, MAX_FETCH_BYTES)
        .or_else(|| written().flatten())
        .or_else(|| reader.read_recent(start, max, MAX_FETCH_BYTES))
    {
        Some(batch) => batch,
        None if unsynced && start >= reader.end_offset() => {
            // Written records not kept in memory (more at once than the log keeps): they
            // are read once published.
            wait_past(reader.subscribe_end(), start, give_up).await;
            read_published(reader, start, max).await?
        }
        None => read_published(reader, start, max).await?,
    };
    let mut header = Header::reply_to(request);
    header.offset = Some(if batch.count == 0 {
        batch.next_offset
    } else {
        start
    });
    header.count = Some(batch.count as u32);
    let body: Bytes = batch.data;
    Ok(Frame::with_body(header, body))
}

/// Waits until `end` passes `from`, or until `give_up`.
async fn wait_past(
    mut end: tokio::sync::watch::Receiver<u64>,
    from: u64,
    give_up: tokio::time::Instant,
) {
    while *end.borrow_and_update() <= from {
        tokio::select! {
            changed = end.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep_until(give_up) => return,
        }
    }
}

/// Reads published records from the files (blocking, off the reactor).
async fn read_published(
    reader: LogReader,
    start: u64,
    max: usize,
) -> Result<ReadBatch, BrokerError> {
    Ok(
        tokio::task::spawn_blocking(move || reader.read(start, None, max, MAX_FETCH_BYTES))
            .await
            .map_err(|e| BrokerError::Internal(format!("replica read: {e}")))??,
    )
}

/// Answers a follower's confirmation (a `ReplicaRead` for no records, without
/// `READ_AHEAD`) at once: it waits for nothing, so the session answers it in line rather
/// than on a task of its own, and a follower's confirmations sent one after another, without
/// waiting for each reply, are taken in their order (a confirmed offset never seems to go
/// back).
pub fn replica_confirm(core: &Core, request: &Frame) -> Result<Frame, BrokerError> {
    let (_, from) = heard_from(core, request)?;
    Ok(confirmed(&request.header, from))
}

/// Answers a follower's `ReplicaEpoch`: this MQ's epoch now, and where the epoch the
/// follower's copy last followed (the body, if any) ended. Answered in line: the epochs
/// are in memory.
pub fn replica_epoch(core: &Core, request: &Frame) -> Result<Frame, BrokerError> {
    let name = required(&request.header.mq, "mq")?;
    let mq = core.registry().own(name)?;
    let epochs = mq.epochs().ok_or_else(|| {
        BrokerError::BadRequest(format!("MQ {name:?} has no leader epochs (no replicas)"))
    })?;
    let followed: Option<LeaderEpoch> = if request.body.is_empty() {
        None
    } else {
        rmp_serde::from_slice(&request.body)
            .map_err(|e| BrokerError::BadRequest(format!("bad leader epoch: {e}")))?
    };
    let answer = match followed {
        Some(followed) => epochs.answer(followed),
        None => epochs.answer(epochs.current()),
    };
    let body = rmp_serde::to_vec(&answer)
        .map_err(|e| BrokerError::Internal(format!("epoch answer: {e}")))?;
    Ok(Frame::with_body(
        Header::reply_to(&request.header),
        body.into(),
    ))
}

/// Whether `request` is a confirmation only (see [`replica_confirm`]).
pub fn is_confirmation(request: &Header) -> bool {
    request.count == Some(0) && !request.has_flag(FLAG_READ_AHEAD)
}

/// Records what a follower's `ReplicaRead` says (it is there; unless it reads ahead, it
/// holds every record below the request's offset) and returns the MQ and that offset.
/// One that names a leader epoch (`FLAG_LEADER_EPOCH`) is refused unless it is this MQ's
/// epoch now: its offsets may count records a power loss took from this broker.
fn heard_from(core: &Core, frame: &Frame) -> Result<(Arc<Mq>, u64), BrokerError> {
    let request = &frame.header;
    let name = required(&request.mq, "mq")?;
    let follower = required(&request.group, "group (the follower's id)")?;
    // A copy too: a leader that lost its store restores from it.
    let mq = core.registry().get(name)?;
    let from = request.offset.unwrap_or(0);
    let end = if request.has_flag(FLAG_LEADER_EPOCH) {
        let agreed: LeaderEpoch = rmp_serde::from_slice(&frame.body)
            .map_err(|e| BrokerError::BadRequest(format!("bad leader epoch: {e}")))?;
        let now = mq.epochs().map(|epochs| epochs.current());
        if now != Some(agreed) {
            return Err(BrokerError::Unavailable(format!(
                "MQ {name:?} is in leader epoch {now:?} here, not {agreed:?}: ask ReplicaEpoch again"
            )));
        }
        mq.reader().written_end()
    } else {
        mq.reader().end_offset()
    };
    if from > end {
        return Err(BrokerError::Conflict(format!(
            "follower {follower:?} holds MQ {name:?} up to offset {from}, this broker only up to {end}: this broker lost records it had"
        )));
    }
    if request.has_flag(FLAG_READ_AHEAD) {
        mq.followers().alive(follower, from, end);
    } else {
        mq.followers().heard(follower, from, end);
    }
    Ok((mq, from))
}

/// The reply to a confirmation.
fn confirmed(request: &Header, from: u64) -> Frame {
    let mut header = Header::reply_to(request);
    header.offset = Some(from);
    header.count = Some(0);
    Frame::new(header)
}

/// Takes the acks a follower's copy recorded while this broker was away: group `group` of
/// this broker's own `mq` moves up to `offset` (never back). At-least-once either way:
/// what was acknowledged on the copy is not delivered again here.
pub async fn replica_cursor(core: &Core, request: &Header) -> Result<Frame, BrokerError> {
    let name = required(&request.mq, "mq")?;
    let group = required(&request.group, "group")?;
    let offset = request
        .offset
        .ok_or_else(|| BrokerError::BadRequest("missing offset".into()))?;
    let mq = core.registry().own(name)?;
    let created = mq.existing_group(group).is_none();
    mq.advance_group(core.committer(), group, offset).await?;
    if created {
        core.changed();
    }
    tracing::info!(
        mq = name,
        group,
        offset,
        "group cursor taken from a follower's copy"
    );
    Ok(Frame::new(Header::reply_to(request)))
}
