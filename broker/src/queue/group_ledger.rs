//! The delivery state of one consumer group: its durable cursor, the deliveries awaiting an
//! ack, and what to redeliver. Pure bookkeeping, no I/O, so every rule is unit-tested here.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use qbus_wire::protocol::{DeliveryToken, GroupInfo};

use super::key_order::KeyOrder;
use super::offset_map::OffsetMap;

/// A delivery awaiting its ack.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    /// Deliveries so far, this one included; unique per delivery, so a token names one.
    attempt: u32,
    /// Deliveries given back unseen (see [`GroupLedger::nack`]): they do not count
    /// toward the delivery limit.
    unseen: u32,
    /// Connection holding it; `None` once released for redelivery.
    holder: Option<u64>,
}

/// What to deliver again, and what has had too many attempts.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Redeliveries {
    /// (offset, new attempt) to deliver now.
    pub deliver: Vec<(u64, u32)>,
    /// For each in `deliver`: its bytes where the group kept them (a record that was
    /// parked behind its key), `None` where they are to be read from the log.
    pub kept: Vec<Option<Bytes>>,
    /// Offsets that reached the delivery limit: move them to the dead-letter MQ.
    pub dead: Vec<u64>,
    /// (offset, deliveries counted toward the limit) of each in `deliver`, to be stored so
    /// that the count survives a restart.
    pub counted: Vec<(u64, u32)>,
}

/// Delivery state of one group of one MQ.
#[derive(Debug)]
pub struct GroupLedger {
    name: String,
    /// Next offset never delivered to this group.
    next: u64,
    /// Unacknowledged deliveries by offset; acknowledged ones are removed.
    in_flight: OffsetMap<InFlight>,
    /// Released deliveries waiting to go out again, oldest first.
    redeliver: VecDeque<u64>,
    /// Ack deadlines in delivery order (the timeout is the same for all, so this is sorted).
    deadlines: VecDeque<(Instant, u64, u32)>,
    /// Deliveries held per connection, for the in-flight cap and the consumer count.
    held: HashMap<u64, u32>,
    /// Connections consuming for this group (see [`GroupLedger::has_consumers`]).
    consumers: HashMap<u64, Presence>,
    /// Deliveries counted before a restart of records not yet delivered since (see
    /// [`GroupLedger::restore_counts`]).
    prior: BTreeMap<u64, u32>,
    dead_lettered: u64,
    redelivered: u64,
    /// Memory MQs: messages the ring dropped before this group read them.
    dropped: u64,
    /// Removed from its MQ: fetches still holding it return empty.
    retired: bool,
    /// One record per key out at a time (see [`KeyOrder`]), for MQs ordered by key.
    key_order: Option<KeyOrder>,
}

impl GroupLedger {
    /// A group whose every offset below `committed` is acknowledged.
    pub fn new(name: &str, committed: u64) -> GroupLedger {
        GroupLedger {
            name: name.to_owned(),
            next: committed,
            in_flight: OffsetMap::default(),
            redeliver: VecDeque::new(),
            deadlines: VecDeque::new(),
            held: HashMap::new(),
            consumers: HashMap::new(),
            prior: BTreeMap::new(),
            dead_lettered: 0,
            redelivered: 0,
            dropped: 0,
            retired: false,
            key_order: None,
        }
    }

    /// Delivers one record per key at a time from now on (see [`KeyOrder`]).
    pub fn order_by_key(&mut self) {
        self.key_order.get_or_insert_with(KeyOrder::default);
    }

    /// The key-order bookkeeping, when the group has it.
    pub fn key_order(&mut self) -> Option<&mut KeyOrder> {
        self.key_order.as_mut()
    }

    /// Holds new records `offsets` (parked behind their key) unacknowledged and not out:
    /// they go out when [`KeyOrder`] says they are ready. Call before
    /// [`deliver_new`](Self::deliver_new) of the read that found them.
    pub fn park(&mut self, offsets: &[u64]) {
        for &offset in offsets {
            let attempt = self.prior.remove(&offset).unwrap_or(0);
            self.in_flight.insert(
                offset,
                InFlight {
                    attempt,
                    unseen: 0,
                    holder: None,
                },
            );
        }
    }

    fn settled(&mut self, offset: u64) {
        if let Some(order) = &mut self.key_order {
            order.settled(offset);
        }
    }

    /// Every offset below this is acknowledged; this is what is persisted.
    pub fn committed(&self) -> u64 {
        self.in_flight.first_offset().unwrap_or(self.next)
    }

    /// Next offset never delivered.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Deliveries `conn` holds unacknowledged.
    pub fn held_by(&self, conn: u64) -> u32 {
        self.held.get(&conn).copied().unwrap_or(0)
    }

    /// True when released deliveries wait to go out again (or parked records came free).
    pub fn has_redeliveries(&self) -> bool {
        !self.redeliver.is_empty() || self.key_order.as_ref().is_some_and(KeyOrder::has_ready)
    }

    /// Takes the delivery counts stored before a restart (offset → deliveries counted
    /// toward the limit), for records the group will deliver again.
    pub fn restore_counts(&mut self, counts: BTreeMap<u64, u32>) {
        self.prior = counts;
    }

    /// Of `offsets` about to be delivered as new, those whose deliveries before a restart
    /// already reached `max_deliveries`: they are dead-lettered instead (and count as done).
    pub fn take_exhausted(&mut self, offsets: &[u64], max_deliveries: u32) -> Vec<u64> {
        if self.prior.is_empty() {
            return Vec::new();
        }
        let dead: Vec<u64> = offsets
            .iter()
            .copied()
            .filter(|o| self.prior.get(o).is_some_and(|&n| n >= max_deliveries))
            .collect();
        for offset in &dead {
            self.prior.remove(offset);
        }
        self.dead_lettered += dead.len() as u64;
        dead
    }

    /// Records that the records from `self.next()` up to `end` were read for `conn`;
    /// those in `delivered` (ascending) go out now, the rest (filtered away) count as done.
    /// Returns each delivery's attempt: 1, or one more than before a restart.
    pub fn deliver_new(
        &mut self,
        end: u64,
        delivered: &[u64],
        conn: u64,
        deadline: Instant,
    ) -> Vec<u32> {
        debug_assert!(delivered.iter().all(|&o| o >= self.next && o < end));
        let mut attempts = Vec::with_capacity(delivered.len());
        for &offset in delivered {
            let attempt = self.prior.remove(&offset).map_or(1, |n| n + 1);
            self.in_flight.insert(
                offset,
                InFlight {
                    attempt,
                    unseen: 0,
                    holder: Some(conn),
                },
            );
            self.deadlines.push_back((deadline, offset, attempt));
            attempts.push(attempt);
        }
        *self.held.entry(conn).or_default() += delivered.len() as u32;
        self.next = self.next.max(end);
        if !self.prior.is_empty() {
            // Counts of records passed over (filtered, lost) are of no more use.
            self.prior = self.prior.split_off(&self.next);
        }
        attempts
    }

    /// Takes up to `max` released deliveries for `conn`, raising their attempt. Those whose
    /// attempts would exceed `max_deliveries` are returned as dead instead (and forgotten).
    pub fn take_redeliveries(
        &mut self,
        max: usize,
        max_deliveries: u32,
        conn: u64,
        deadline: Instant,
    ) -> Redeliveries {
        let mut out = Redeliveries::default();
        // Parked records whose turn came: first deliveries, ahead of new records.
        while out.deliver.len() < max {
            let Some((offset, record)) = self.key_order.as_mut().and_then(KeyOrder::take_ready)
            else {
                break;
            };
            let Some(entry) = self.in_flight.get_mut(offset) else {
                continue;
            };
            if entry.attempt >= max_deliveries {
                // Counted out before a restart.
                self.in_flight.remove(offset);
                self.dead_lettered += 1;
                out.dead.push(offset);
                self.settled(offset);
                continue;
            }
            entry.attempt += 1;
            entry.holder = Some(conn);
            self.deadlines.push_back((deadline, offset, entry.attempt));
            out.deliver.push((offset, entry.attempt));
            out.kept.push(Some(record));
            if entry.attempt > 1 {
                out.counted.push((offset, entry.attempt));
            }
        }
        while out.deliver.len() < max {
            let Some(offset) = self.redeliver.pop_front() else {
                break;
            };
            let Some(entry) = self.in_flight.get_mut(offset) else {
                continue; // acknowledged after it was released
            };
            if entry.holder.is_some() {
                continue; // already out again
            }
            if entry.attempt - entry.unseen >= max_deliveries {
                self.in_flight.remove(offset);
                self.dead_lettered += 1;
                out.dead.push(offset);
                self.settled(offset);
                continue;
            }
            entry.attempt += 1;
            entry.holder = Some(conn);
            self.redelivered += 1;
            self.deadlines.push_back((deadline, offset, entry.attempt));
            out.deliver.push((offset, entry.attempt));
            out.kept.push(None);
            out.counted.push((offset, entry.attempt - entry.unseen));
        }
        *self.held.entry(conn).or_default() += out.deliver.len() as u32;
        out
    }

    /// Acknowledges deliveries; a token for an older attempt than the current one is
    /// ignored. Returns how many were acknowledged.
    pub fn ack(&mut self, tokens: &[DeliveryToken]) -> usize {
        let mut acked = 0;
        // An ack's deliveries are mostly one connection's: its count is lowered once per run.
        let mut run: Option<(u64, u32)> = None;
        for token in tokens {
            let current = self.in_flight.get(token.offset).copied();
            if let Some(entry) = current.filter(|e| e.attempt == token.attempt) {
                self.in_flight.remove(token.offset);
                self.settled(token.offset);
                if let Some(conn) = entry.holder {
                    match &mut run {
                        Some((held_by, n)) if *held_by == conn => *n += 1,
                        _ => {
                            if let Some((held_by, n)) = run.replace((conn, 1)) {
                                self.unhold(held_by, n);
                            }
                        }
                    }
                }
                acked += 1;
            }
        }
        if let Some((conn, n)) = run {
            self.unhold(conn, n);
        }
        self.trim_deadlines();
        acked
    }

    /// Drops deadlines of deliveries already settled from the front of the queue. Acks
    /// mostly arrive in delivery order, so this keeps the queue about as long as what is
    /// really in flight instead of holding every delivery of the last ack timeout.
    fn trim_deadlines(&mut self) {
        while let Some(&(_, offset, attempt)) = self.deadlines.front() {
            let live = self
                .in_flight
                .get(offset)
                .is_some_and(|e| e.attempt == attempt && e.holder.is_some());
            if live {
                break;
            }
            self.deadlines.pop_front();
        }
        if self.deadlines.capacity() > 1024 && self.deadlines.len() < self.deadlines.capacity() / 4
        {
            self.deadlines.shrink_to(self.deadlines.len() * 2);
        }
    }

    /// Releases deliveries for immediate redelivery. With `unseen` the consumer gives them
    /// back without having handed them to its application (it stopped with them prefetched),
    /// so they do not count toward the delivery limit. Returns how many were released.
    pub fn nack(&mut self, tokens: &[DeliveryToken], unseen: bool) -> usize {
        let mut released = 0;
        for token in tokens {
            if !self.release(token.offset, Some(token.attempt)) {
                continue;
            }
            released += 1;
            if unseen {
                if let Some(entry) = self.in_flight.get_mut(token.offset) {
                    entry.unseen += 1;
                }
            }
        }
        released
    }

    /// Releases deliveries whose ack deadline passed. Returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut released = 0;
        while let Some(&(deadline, offset, attempt)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            if self.release(offset, Some(attempt)) {
                released += 1;
            }
        }
        released
    }

    /// Marks the group removed from its MQ.
    pub fn retire(&mut self) {
        self.retired = true;
    }

    /// Whether the group was removed from its MQ.
    pub fn is_retired(&self) -> bool {
        self.retired
    }

    /// Marks `conn` as consuming: one more fetch of it waiting.
    pub fn join(&mut self, conn: u64) {
        self.consumers.entry(conn).or_default().fetching += 1;
    }

    /// One fetch of `conn` ended at `now`.
    pub fn fetch_ended(&mut self, conn: u64, now: Instant) {
        if let Some(presence) = self.consumers.get_mut(&conn) {
            presence.fetching = presence.fetching.saturating_sub(1);
            presence.last_fetch = Some(now);
        }
    }

    /// True while some connection consumes for this group: it has a fetch waiting, holds
    /// deliveries, or fetched within [`CONSUMER_GRACE`]. A consumer that stopped (an MQ-RPC
    /// service shut down) stops counting soon after, even if its connection stays open.
    pub fn has_consumers(&self, now: Instant) -> bool {
        self.consumers
            .iter()
            .any(|(&conn, presence)| self.is_present(conn, presence, now))
    }

    fn is_present(&self, conn: u64, presence: &Presence, now: Instant) -> bool {
        presence.fetching > 0
            || self.held_by(conn) > 0
            || presence
                .last_fetch
                .is_some_and(|at| now.saturating_duration_since(at) < CONSUMER_GRACE)
    }

    /// Releases every delivery `conn` holds and forgets it as a consumer. Returns how many
    /// deliveries were released.
    pub fn leave(&mut self, conn: u64) -> usize {
        self.consumers.remove(&conn);
        let held: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, e)| e.holder == Some(conn))
            .map(|(offset, _)| offset)
            .collect();
        for &offset in &held {
            self.release(offset, None);
        }
        held.len()
    }

    /// Forgets `conn` as a consumer but leaves its deliveries held until they are acked or
    /// time out: an HTTP client acks on a later connection than the one it fetched on.
    pub fn detach(&mut self, conn: u64) {
        self.consumers.remove(&conn);
    }

    /// Forgets records below `first` (deleted by retention).
    pub fn truncate_before(&mut self, first: u64) {
        self.next = self.next.max(first);
        for (offset, entry) in self.in_flight.remove_below(first) {
            self.settled(offset);
            if let Some(conn) = entry.holder {
                self.unhold(conn, 1);
            }
        }
    }

    /// A snapshot for `QueryMq`.
    pub fn info(&self, end: u64, now: Instant) -> GroupInfo {
        let committed = self.committed();
        GroupInfo {
            name: self.name.clone(),
            committed,
            next: self.next,
            in_flight: self.in_flight.len() as u64,
            lag: end
                .saturating_sub(committed)
                .saturating_sub(self.acked_between(committed)),
            consumers: self
                .consumers
                .iter()
                .filter(|&(&conn, presence)| self.is_present(conn, presence, now))
                .count() as u32,
            dead_lettered: self.dead_lettered,
            redelivered: self.redelivered,
            dropped: self.dropped,
        }
    }

    /// Counts `count` messages a memory MQ's ring dropped before this group got them.
    pub fn count_dropped(&mut self, count: u64) {
        self.dropped += count;
    }

    /// Offsets in `[committed, next)` already acknowledged (acked out of order).
    fn acked_between(&self, committed: u64) -> u64 {
        (self.next - committed).saturating_sub(self.in_flight.len() as u64)
    }

    fn release(&mut self, offset: u64, attempt: Option<u32>) -> bool {
        let Some(entry) = self.in_flight.get_mut(offset) else {
            return false;
        };
        if attempt.is_some_and(|a| a != entry.attempt) {
            return false;
        }
        let Some(conn) = entry.holder.take() else {
            return false;
        };
        self.unhold(conn, 1);
        self.redeliver.push_back(offset);
        true
    }

    fn unhold(&mut self, conn: u64, n: u32) {
        if let Some(count) = self.held.get_mut(&conn) {
            *count = count.saturating_sub(n);
            if *count == 0 {
                self.held.remove(&conn);
            }
        }
    }
}

/// A connection's fetches of one group, for telling whether it still consumes.
#[derive(Debug, Default)]
struct Presence {
    /// Fetches waiting now.
    fetching: u32,
    /// When its last fetch ended.
    last_fetch: Option<Instant>,
}

/// How long a connection still counts as a consumer after its last fetch ended, when it
/// has none waiting and holds nothing: longer than a consumer takes between two fetches.
pub const CONSUMER_GRACE: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    fn token(offset: u64, attempt: u32) -> DeliveryToken {
        DeliveryToken { offset, attempt }
    }

    #[test]
    fn acks_advance_the_committed_cursor_in_order() {
        let now = Instant::now();
        let mut g = GroupLedger::new("g", 0);
        g.deliver_new(3, &[0, 1, 2], 7, now);
        assert_eq!((g.committed(), g.next(), g.held_by(7)), (0, 3, 3));
        assert_eq!(g.ack(&[token(1, 1)]), 1);
        assert_eq!(g.committed(), 0, "a gap at 0 holds the cursor");
        assert_eq!(g.ack(&[token(0, 1)]), 1);
        assert_eq!(g.committed(), 2);
        g.ack(&[token(2, 1)]);
        assert_eq!((g.committed(), g.held_by(7)), (3, 0));
    }

    #[test]
    fn parked_records_go_out_in_key_order_and_hold_the_cursor() {
        let now = Instant::now();
        let mut g = GroupLedger::new("g", 0);
        g.order_by_key();
        let order = g.key_order().unwrap();
        assert!(order.admit(0, "k", b"zero"));
        assert!(!order.admit(1, "k", b"one"));
        g.park(&[1]);
        g.deliver_new(2, &[0], 7, now);
        assert!(!g.has_redeliveries());
        // Its consumer leaves: 0 goes out again first, 1 still waits.
        assert_eq!(g.leave(7), 1);
        let again = g.take_redeliveries(10, 16, 8, now);
        assert_eq!((again.deliver, again.kept), (vec![(0, 2)], vec![None]));
        assert_eq!(g.committed(), 0);
        g.ack(&[token(0, 2)]);
        assert_eq!(g.committed(), 1, "the parked record holds the cursor");
        let next = g.take_redeliveries(10, 16, 8, now);
        assert_eq!(next.deliver, vec![(1, 1)], "a first delivery");
        assert_eq!(
            next.kept,
            vec![Some(Bytes::from_static(b"one"))],
            "from memory"
        );
        assert_eq!(g.info(2, now).redelivered, 1);
        g.ack(&[token(1, 1)]);
        assert_eq!(g.committed(), 2);
    }

    #[test]
    fn filtered_records_count_as_done() {
        let mut g = GroupLedger::new("g", 10);
        g.deliver_new(20, &[12], 1, Instant::now());
        assert_eq!(g.committed(), 12);
        g.ack(&[token(12, 1)]);
        assert_eq!(g.committed(), 20);
    }

    #[test]
    fn late_ack_of_an_earlier_attempt_is_ignored() {
        let now = Instant::now();
        let mut g = GroupLedger::new("g", 0);
        g.deliver_new(1, &[0], 1, now);
        assert_eq!(g.expire(now), 1);
        let again = g.take_redeliveries(10, 16, 2, now);
        assert_eq!(again.deliver, vec![(0, 2)]);
        assert_eq!(g.ack(&[token(0, 1)]), 0, "stale attempt");
        assert_eq!(g.committed(), 0);
        assert_eq!(g.ack(&[token(0, 2)]), 1);
        assert_eq!(g.committed(), 1);
    }

    #[test]
    fn a_closed_connection_releases_its_deliveries_only() {
        let now = Instant::now();
        let mut g = GroupLedger::new("g", 0);
        g.deliver_new(2, &[0, 1], 1, now);
        g.deliver_new(4, &[2, 3], 2, now);
        g.join(1);
        g.join(2);
        assert_eq!(g.leave(1), 2);
        assert_eq!(g.info(4, now).consumers, 1);
        let again = g.take_redeliveries(10, 16, 2, now);
        assert_eq!(again.deliver, vec![(0, 2), (1, 2)]);
        assert_eq!(g.held_by(2), 4);
    }

    #[test]
    fn delivery_counts_restored_after_a_restart_keep_counting() {
        let now = Instant::now();
        let mut g = GroupLedger::new("g", 10);
        g.restore_counts(BTreeMap::from([(10, 3), (11, 1), (13, 2), (40, 2)]));
        // With a limit of 3, offset 10 is done; 11 goes out as its second delivery.
        assert_eq!(g.take_exhausted(&[10, 11, 12, 13], 3), vec![10]);
        assert_eq!(g.deliver_new(13, &[11, 12], 1, now), vec![2, 1]);
        assert_eq!(g.info(13, now).dead_lettered, 1);
        assert_eq!(g.committed(), 11, "10 counts as done");
        // 13 was passed over (filtered): its count is dropped; 40's is kept.
        assert_eq!(g.deliver_new(14, &[], 1, now), Vec::<u32>::new());
        assert_eq!(g.prior.keys().copied().collect::<Vec<_>>(), vec![40]);
        assert_eq!(g.expire(now), 2);
        let again = g.take_redeliveries(10, 5, 1, now);
        assert_eq!(again.deliver, vec![(11, 3), (12, 2)]);
        assert_eq!(
            again.counted, again.deliver,
            "nothing was given back unseen"
        );
    }

    #[test]
    fn deliveries_given_back_unseen_do_not_count() {
        let now = Instant::now();
        let mut g = GroupLedger::new("g", 0);
        g.deliver_new(1, &[0], 1, now);
        assert_eq!(g.nack(&[token(0, 1)], true), 1);
        // With a limit of one delivery, the record still goes out again: to the consumer it
        // is a redelivery (attempt 2), to the limit still its first.
        let again = g.take_redeliveries(10, 1, 2, now);
        assert_eq!((again.deliver, again.dead), (vec![(0, 2)], vec![]));
        assert_eq!(
            g.expire(now),
            1,
            "only the current attempt's deadline releases it"
        );
        assert_eq!(g.take_redeliveries(10, 1, 2, now).dead, vec![0]);
    }

    #[test]
    fn a_consumer_counts_while_fetching_holding_or_just_fetched() {
        let now = Instant::now();
        let later = now + CONSUMER_GRACE;
        let mut g = GroupLedger::new("g", 0);
        assert!(!g.has_consumers(now));
        g.join(1);
        assert!(g.has_consumers(later), "a fetch waiting");
        g.fetch_ended(1, now);
        assert!(g.has_consumers(now), "between two fetches");
        assert!(!g.has_consumers(later), "gone quiet");
        assert_eq!(g.info(0, later).consumers, 0);
        g.deliver_new(1, &[0], 1, now);
        assert!(g.has_consumers(later), "holding a delivery");
        assert_eq!(g.ack(&[token(0, 1)]), 1);
        assert!(!g.has_consumers(later));
        g.fetch_ended(2, now);
        assert_eq!(
            g.info(0, now).consumers,
            1,
            "a fetch ending never adds a consumer"
        );
    }

    #[test]
    fn deliveries_past_the_limit_go_dead() {
        let now = Instant::now();
        let mut g = GroupLedger::new("g", 0);
        g.deliver_new(1, &[0], 1, now);
        for attempt in 2..=3 {
            g.nack(&[token(0, attempt - 1)], false);
            assert_eq!(
                g.take_redeliveries(1, 3, 1, now).deliver,
                vec![(0, attempt)]
            );
        }
        g.nack(&[token(0, 3)], false);
        let out = g.take_redeliveries(1, 3, 1, now);
        assert_eq!((out.deliver.len(), out.dead), (0, vec![0]));
        assert_eq!(g.committed(), 1);
        assert_eq!(g.info(1, now).dead_lettered, 1);
    }

    #[test]
    fn acked_deliveries_do_not_pile_up_deadlines() {
        let now = Instant::now();
        let mut g = GroupLedger::new("g", 0);
        for round in 0..100u64 {
            let offsets: Vec<u64> = (round * 100..round * 100 + 100).collect();
            g.deliver_new(round * 100 + 100, &offsets, 1, now);
            let tokens: Vec<_> = offsets.iter().map(|&o| token(o, 1)).collect();
            g.ack(&tokens);
        }
        assert_eq!(g.deadlines.len(), 0);
        assert!(g.deadlines.capacity() <= 1024);
    }

    #[test]
    fn expiry_respects_deadlines() {
        let now = Instant::now();
        let mut g = GroupLedger::new("g", 0);
        g.deliver_new(1, &[0], 1, now + Duration::from_secs(5));
        assert_eq!(g.expire(now), 0);
        assert_eq!(g.expire(now + Duration::from_secs(6)), 1);
        assert!(g.has_redeliveries());
    }

    #[test]
    fn retention_drops_deleted_records() {
        let now = Instant::now();
        let mut g = GroupLedger::new("g", 0);
        g.deliver_new(5, &[0, 4], 1, now);
        g.truncate_before(3);
        assert_eq!((g.committed(), g.held_by(1)), (4, 1));
        let info = g.info(5, Instant::now());
        assert_eq!((info.in_flight, info.lag), (1, 1));
    }
}
