//! Messages and bytes through one MQ since the broker started.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Messages and bytes that went through one MQ since the broker started.
#[derive(Debug, Default)]
pub struct MqCounters {
    messages_in: AtomicU64,
    bytes_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_out: AtomicU64,
    acked: AtomicU64,
    lost: AtomicU64,
    expired: AtomicU64,
    duplicates: AtomicU64,
    dropped: AtomicU64,
}

/// A reading of [`MqCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MqTraffic {
    /// Records accepted for appending.
    pub messages_in: u64,
    /// Bytes of those records (record format, headers included).
    pub bytes_in: u64,
    /// Records delivered to consumers, redeliveries included.
    pub messages_out: u64,
    /// Bytes of those records.
    pub bytes_out: u64,
    /// Deliveries acknowledged.
    pub acked: u64,
    /// Offsets whose records were found damaged on disk and skipped by readers.
    pub lost: u64,
    /// Records a group met past their expiry time (TTL) and did not deliver, once per group.
    pub expired: u64,
    /// Records not stored because their dedupe id was stored within the MQ's window.
    pub duplicates: u64,
    /// Memory MQs: messages a group lost because the ring dropped them (its size or age
    /// limit) before the group read them, once per group.
    pub dropped: u64,
}

impl MqCounters {
    /// Counts records accepted for appending.
    pub fn produced(&self, messages: u64, bytes: u64) {
        self.messages_in.fetch_add(messages, Ordering::Relaxed);
        self.bytes_in.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts records handed to a consumer.
    pub fn delivered(&self, messages: u64, bytes: u64) {
        self.messages_out.fetch_add(messages, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts acknowledged deliveries.
    pub fn acked(&self, messages: u64) {
        self.acked.fetch_add(messages, Ordering::Relaxed);
    }

    /// Counts offsets skipped because their records are damaged on disk.
    pub fn lost(&self, messages: u64) {
        self.lost.fetch_add(messages, Ordering::Relaxed);
    }

    /// Counts records not delivered because they expired.
    pub fn expired(&self, messages: u64) {
        self.expired.fetch_add(messages, Ordering::Relaxed);
    }

    /// Counts records refused as repeats of a dedupe id.
    pub fn duplicates(&self, messages: u64) {
        self.duplicates.fetch_add(messages, Ordering::Relaxed);
    }

    /// Counts messages a group lost to a memory MQ's ring limits.
    pub fn dropped(&self, messages: u64) {
        self.dropped.fetch_add(messages, Ordering::Relaxed);
    }

    /// The current totals.
    pub fn read(&self) -> MqTraffic {
        MqTraffic {
            messages_in: self.messages_in.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            messages_out: self.messages_out.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mq_counters_add_up() {
        let c = MqCounters::default();
        c.produced(3, 300);
        c.delivered(2, 200);
        c.delivered(1, 100);
        c.acked(2);
        assert_eq!(
            c.read(),
            MqTraffic {
                messages_in: 3,
                bytes_in: 300,
                messages_out: 3,
                bytes_out: 300,
                acked: 2,
                lost: 0,
                expired: 0,
                duplicates: 0,
                dropped: 0,
            }
        );
    }
}
