//! One producer's sends on their way out: consecutive sends that go the same way leave as
//! one produce frame.
//!
//! A producer that sends faster than a round trip (the common case: many sends in flight)
//! would otherwise pay a frame, a broker step and a receipt per message; NATS and Kafka
//! clients batch the same way. Nothing waits to fill a batch: a send queues its record and,
//! when no flush is under way, starts one; the flush takes whatever has queued by the time
//! it runs, so a lone send leaves at once and a burst leaves in a few frames. Order holds:
//! batches leave in the order their first send was queued, each through one
//! [`Transport::send`] after the one before.

use std::borrow::Borrow;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use tokio::sync::Notify;

use super::Receipt;
use crate::error::{ClientError, Result};
use crate::message::Message;
use crate::protocol::{Command, Durability, Frame, Header, FLAG_DUPLICATE};
use crate::transport::Transport;

/// Most messages in one produce frame.
const MAX_BATCH_MESSAGES: u32 = 1024;
/// Most record bytes in one produce frame when the broker's frame limit is not known yet
/// (half of the smallest limit a broker is likely to run with, 128 KiB).
const DEFAULT_BATCH_BYTES: usize = 64 << 10;
/// Most record bytes in one produce frame whatever the broker allows: larger frames only
/// delay the first receipts of a batch.
const MAX_BATCH_BYTES: usize = 256 << 10;
/// Record bytes queued and not yet handed to the connection before a send waits.
const MAX_QUEUED_BYTES: usize = 4 << 20;

/// The queue of one producer (shared by its clones).
#[derive(Debug)]
pub(super) struct SendQueue {
    state: Mutex<State>,
    /// Signalled when a flush takes batches off the queue.
    room: Notify,
}

#[derive(Debug, Default)]
struct State {
    batches: VecDeque<Batch>,
    queued_bytes: usize,
    /// A flush task is running and will take every batch queued before it stops.
    flushing: bool,
}

#[derive(Debug)]
struct Batch {
    body: BytesMut,
    count: u32,
    /// Most record bytes (see [`batch_bytes`]), fixed when the batch opened.
    limit: usize,
    /// Over several brokers: the key that picks the broker (its first message's).
    key: Option<String>,
    /// `FLAG_ACK_*` bits (every send of a producer has the same).
    flags: u32,
    done: Completion,
}

/// The receipt of a batch in the form its sends read it.
#[derive(Debug)]
struct BatchReceipt {
    /// Offset of the first record (when no record repeated a dedupe id).
    first: u64,
    durability: Durability,
    /// When some records repeated a dedupe id: each record's offset and whether this
    /// batch stored it.
    records: Vec<(u64, bool)>,
}

impl SendQueue {
    pub(super) fn new() -> SendQueue {
        SendQueue {
            state: Mutex::new(State::default()),
            room: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data that is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `messages` (at least one) as consecutive records and returns the handle on
    /// their receipt; starts a flush unless one is under way.
    pub(super) async fn push<M: Borrow<Message>>(
        self: &Arc<Self>,
        transport: &Transport,
        mq: &Arc<str>,
        flags: u32,
        messages: impl IntoIterator<Item = M>,
    ) -> Result<PendingReceipt> {
        let cluster = transport.is_cluster();
        let mut messages = messages.into_iter();
        let Some(first) = messages.next() else {
            return Err(ClientError::Protocol(
                "a batch needs at least one message".into(),
            ));
        };
        let key = if cluster {
            first.borrow().key.clone()
        } else {
            None
        };
        let messages = std::iter::once(first).chain(messages);
        let mut state = loop {
            let room = {
                let state = self.state();
                if state.queued_bytes < MAX_QUEUED_BYTES || state.batches.is_empty() {
                    break state;
                }
                // Made under the lock: a flush that takes a batch after it wakes it.
                self.room.notified()
            };
            room.await;
        };
        let pending = state.append(messages, cluster, key, flags, || batch_bytes(transport))?;
        if !state.flushing {
            state.flushing = true;
            tokio::spawn(flush(self.clone(), transport.clone(), mq.clone()));
        }
        Ok(pending)
    }

    /// Takes the oldest batch, or ends the flush when none is left.
    fn next_batch(&self) -> Option<Batch> {
        let mut state = self.state();
        let batch = state.batches.pop_front();
        match &batch {
            Some(batch) => state.queued_bytes -= batch.body.len(),
            None => state.flushing = false,
        }
        drop(state);
        self.room.notify_waiters();
        batch
    }
}

impl State {
    /// Encodes `messages` (at least one) straight into the newest batch when they go the
    /// same way and fit, else into a new batch.
    fn append<M: Borrow<Message>>(
        &mut self,
        messages: impl Iterator<Item = M>,
        cluster: bool,
        key: Option<String>,
        flags: u32,
        limit: impl FnOnce() -> usize,
    ) -> Result<PendingReceipt> {
        let joins = self.batches.back().is_some_and(|batch| {
            batch.key == key && batch.flags == flags && batch.body.len() < batch.limit
        });
        if !joins {
            self.batches.push_back(Batch {
                body: BytesMut::new(),
                count: 0,
                limit: limit(),
                key,
                flags,
                done: Completion::default(),
            });
        }
        let Some(batch) = self.batches.back_mut() else {
            return Err(ClientError::Protocol(
                "the producer's queue lost a batch".into(),
            ));
        };
        let start = batch.body.len();
        let first = batch.count;
        let mut count = 0u32;
        for message in messages {
            let message = message.borrow();
            // HA sends may be retried on another broker: give consumers a way to recognise
            // the second copy.
            let id = match message.id {
                None if cluster => Some(rand::random()),
                id => id,
            };
            batch.body.reserve(message.encoded_len() + 16);
            if let Err(e) = message.encode_with_id(id, &mut batch.body) {
                batch.body.truncate(start);
                self.drop_empty_batch();
                return Err(e);
            }
            count += 1;
        }
        let added = batch.body.len() - start;
        if first > 0 && (batch.body.len() > batch.limit || first + count > MAX_BATCH_MESSAGES) {
            // Too much for the batch it joined: these records start the next one (split
            // off in place, not copied).
            let records = batch.body.split_off(start);
            let (key, limit) = (batch.key.clone(), batch.limit);
            let done = Completion::default();
            let pending = PendingReceipt::new(&done, 0, count);
            self.batches.push_back(Batch {
                body: records,
                count,
                limit,
                key,
                flags,
                done,
            });
            self.queued_bytes += added;
            return Ok(pending);
        }
        batch.count += count;
        self.queued_bytes += added;
        Ok(PendingReceipt::new(&batch.done, first, count))
    }

    /// Removes the newest batch if a send that failed to encode opened it and left it empty.
    fn drop_empty_batch(&mut self) {
        if self.batches.back().is_some_and(|batch| batch.count == 0) {
            self.batches.pop_back();
        }
    }
}

/// Hands the queue's batches to the transport, one after the other, until none is left.
/// The last batch's reply is awaited here; earlier ones' on their own tasks, so the next
/// batch need not wait for them.
async fn flush(queue: Arc<SendQueue>, transport: Transport, mq: Arc<str>) {
    let Some(mut batch) = queue.next_batch() else {
        return;
    };
    loop {
        let mut header = Header::request(Command::Produce, Some(&mq));
        header.count = Some(batch.count);
        header.flags = batch.flags;
        let frame = Frame::with_body(header, batch.body.freeze());
        let sent = transport.send(&mq, batch.key, frame).await;
        let done = batch.done;
        let next = queue.next_batch();
        let outcome = async move {
            let outcome = match sent {
                Ok(reply) => reply
                    .wait()
                    .await
                    .and_then(|frame| BatchReceipt::read(&frame.header)),
                Err(e) => Err(e),
            };
            done.complete(outcome);
        };
        match next {
            Some(next) => {
                tokio::spawn(outcome);
                batch = next;
            }
            None => return outcome.await,
        }
    }
}

/// Record bytes per batch: half the broker's frame limit when known, within bounds.
fn batch_bytes(transport: &Transport) -> usize {
    transport
        .max_frame()
        .map_or(DEFAULT_BATCH_BYTES, |max| (max / 2) as usize)
        .clamp(1, MAX_BATCH_BYTES)
}

impl BatchReceipt {
    fn read(header: &Header) -> Result<BatchReceipt> {
        let (Some(first), Some(durability)) = (header.offset, header.durability) else {
            return Err(ClientError::Protocol(
                "produce reply without offset or durability".into(),
            ));
        };
        let records = if header.has_flag(FLAG_DUPLICATE) {
            stored_records(&header.offsets, header.count.unwrap_or(0))
        } else {
            Vec::new()
        };
        Ok(BatchReceipt {
            first,
            durability,
            records,
        })
    }

    /// The receipt of the `count` sends from record `first` of the batch.
    fn part(&self, first: u32, count: u32) -> Result<Receipt> {
        if self.records.is_empty() {
            return Ok(Receipt {
                offset: self.first + u64::from(first),
                count,
                durability: self.durability,
                offsets: Vec::new(),
            });
        }
        let part = self
            .records
            .get(first as usize..(first + count) as usize)
            .ok_or_else(|| {
                ClientError::Protocol("produce reply with fewer offsets than records".into())
            })?;
        let stored = part.iter().filter(|(_, stored)| *stored).count() as u32;
        let offsets: Vec<u64> = part.iter().map(|(offset, _)| *offset).collect();
        Ok(Receipt {
            offset: offsets[0],
            count: stored,
            durability: self.durability,
            // A part whose records were all stored reads as a plain receipt.
            offsets: if stored == count { Vec::new() } else { offsets },
        })
    }
}

/// Which records of a produce its broker stored, from the offsets of a reply with
/// `DUPLICATE`: the `stored` new records took the highest offsets, one after the other in
/// request order; every other record points at an earlier one (stored before, or repeated
/// within the request).
fn stored_records(offsets: &[u64], stored: u32) -> Vec<(u64, bool)> {
    let Some(&last) = offsets.iter().max() else {
        return Vec::new();
    };
    let first_new = (last + 1).saturating_sub(u64::from(stored));
    let mut highest = None;
    offsets
        .iter()
        .map(|&offset| {
            let new = stored > 0 && offset >= first_new && highest.is_none_or(|h| offset > h);
            if new {
                highest = Some(offset);
            }
            (offset, new)
        })
        .collect()
}

/// Where the outcome of one batch lands, read by the receipts of its sends.
///
/// A receipt per send is the producer's most frequent object, so this is a lock and a
/// list of wakers rather than a channel and a boxed future per send.
#[derive(Debug, Default)]
struct Outcome {
    state: Mutex<OutcomeState>,
}

#[derive(Debug, Default)]
struct OutcomeState {
    result: Option<Result<BatchReceipt>>,
    /// Receipts waiting for `result`; a receipt keeps the index of its own entry.
    wakers: Vec<Waker>,
}

impl Outcome {
    fn state(&self) -> MutexGuard<'_, OutcomeState> {
        // A panic while holding the lock leaves plain data that is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The writing end of a batch's [`Outcome`]: a batch dropped unanswered (its runtime shut
/// down) fails its receipts instead of leaving them waiting.
#[derive(Debug, Default)]
struct Completion(Arc<Outcome>);

impl Completion {
    fn complete(self, result: Result<BatchReceipt>) {
        self.set(result);
    }

    fn set(&self, result: Result<BatchReceipt>) {
        let mut state = self.0.state();
        if state.result.is_some() {
            return;
        }
        state.result = Some(result);
        let wakers = std::mem::take(&mut state.wakers);
        drop(state);
        wakers.into_iter().for_each(Waker::wake);
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.set(Err(dropped()));
    }
}

/// The receipt of a queued send; `.await` it. Over an HA handle the send goes again to
/// another broker if the first one fails before confirming, whether or not it is awaited.
#[derive(Debug)]
pub struct PendingReceipt {
    /// The outcome of the produce request carrying this send.
    outcome: Arc<Outcome>,
    /// This send's first message within that request, and its message count.
    first: u32,
    count: u32,
    /// This receipt's entry among the outcome's wakers, once it has waited.
    waker: Option<usize>,
}

impl PendingReceipt {
    fn new(done: &Completion, first: u32, count: u32) -> PendingReceipt {
        PendingReceipt {
            outcome: done.0.clone(),
            first,
            count,
            waker: None,
        }
    }
}

impl Future for PendingReceipt {
    type Output = Result<Receipt>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Receipt>> {
        let this = &mut *self;
        let mut state = this.outcome.state();
        match &state.result {
            Some(Ok(receipt)) => return Poll::Ready(receipt.part(this.first, this.count)),
            Some(Err(e)) => return Poll::Ready(Err(e.clone())),
            None => {}
        }
        match this.waker.and_then(|i| state.wakers.get_mut(i)) {
            Some(waker) => waker.clone_from(cx.waker()),
            None => {
                this.waker = Some(state.wakers.len());
                state.wakers.push(cx.waker().clone());
            }
        }
        Poll::Pending
    }
}

/// A send whose batch went away unanswered (its runtime shut down).
fn dropped() -> ClientError {
    ClientError::Protocol("the producer's send was dropped".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_told_apart_from_stored_records() {
        // Offsets 0..10 were stored before; this request stored 10 and 11, repeated 3, and
        // repeated its own first record.
        let records = stored_records(&[10, 3, 11, 10], 2);
        assert_eq!(
            records,
            vec![(10, true), (3, false), (11, true), (10, false)]
        );
        // All repeats.
        assert_eq!(stored_records(&[4, 5], 0), vec![(4, false), (5, false)]);
    }

    #[test]
    fn a_part_reads_its_own_offsets_and_count() {
        let receipt = BatchReceipt {
            first: 10,
            durability: Durability::Synced,
            records: stored_records(&[10, 3, 11, 10], 2),
        };
        let part = receipt.part(1, 2).unwrap();
        assert_eq!(
            (part.offset, part.count, part.offsets.clone()),
            (3, 1, vec![3, 11])
        );
        let part = receipt.part(2, 1).unwrap();
        assert_eq!((part.offset, part.count, part.duplicate()), (11, 1, false));
        assert!(receipt.part(3, 2).is_err());
        let plain = BatchReceipt {
            first: 7,
            durability: Durability::Synced,
            records: Vec::new(),
        };
        assert_eq!(plain.part(3, 2).unwrap().offset, 10);
    }

    #[tokio::test]
    async fn receipts_wake_when_their_batch_is_answered_or_dropped() {
        let done = Completion::default();
        let waiting = tokio::spawn(PendingReceipt::new(&done, 0, 2));
        let later = PendingReceipt::new(&done, 2, 1);
        // Let the first receipt wait before the answer comes.
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        done.complete(Ok(BatchReceipt {
            first: 5,
            durability: Durability::Written,
            records: Vec::new(),
        }));
        let waiting = waiting.await.unwrap().unwrap();
        assert_eq!((waiting.offset, waiting.count), (5, 2));
        assert_eq!(later.await.unwrap().offset, 7);

        let unanswered = PendingReceipt::new(&Completion::default(), 0, 1);
        let error = unanswered.await.unwrap_err();
        assert!(error.to_string().contains("dropped"), "{error}");
    }
}
