//! Messages as a producer sends them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};

use crate::error::Result;
use crate::protocol::record::{encode_record_meta, RecordMeta, RECORD_OVERHEAD};

/// A message to produce: a body plus optional tag (consumers filter on it) and key.
///
/// ```
/// use qbus_client::Message;
/// let msg = Message::new("order #1").with_tag("eu").with_key("customer-7");
/// assert_eq!(msg.body.as_ref(), b"order #1");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// The payload, never parsed by the broker.
    pub body: Bytes,
    /// Tag for consumer-side filtering (at most 255 bytes).
    pub tag: Option<String>,
    /// Key (at most 65535 bytes).
    pub key: Option<String>,
    /// Message id for deduplication by consumers. Sends through an HA handle get a random
    /// one when none is set, so a resend after failover can be recognised.
    pub id: Option<u128>,
    /// When it may be delivered, ms since the Unix epoch (protocol 3 brokers): stored at once,
    /// handed to no consumer before then. See [`Message::with_delay`].
    pub deliver_at: Option<u64>,
    /// When it expires, ms since the Unix epoch (protocol 3 brokers): never delivered from
    /// then on. See [`Message::with_ttl`].
    pub expires_at: Option<u64>,
    /// Time to live from when the message may be delivered; turned into `expires_at` when
    /// it is encoded.
    ttl: Option<Duration>,
    /// Dedupe id (1 to 255 bytes): the broker stores a message with a dedupe id it stored
    /// within the MQ's window (default 2 minutes) only once, and answers the repeat with the
    /// first one's offset ([`Receipt::duplicate`](crate::Receipt::duplicate)). Needs a
    /// protocol 3 broker.
    pub dedupe_id: Option<String>,
}

/// This machine's time in ms since the Unix epoch.
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Message {
    /// A message with `body` and no tag or key.
    pub fn new(body: impl Into<Bytes>) -> Message {
        Message {
            body: body.into(),
            tag: None,
            key: None,
            id: None,
            deliver_at: None,
            expires_at: None,
            ttl: None,
            dedupe_id: None,
        }
    }

    /// Sets the tag.
    pub fn with_tag(mut self, tag: impl Into<String>) -> Message {
        self.tag = Some(tag.into());
        self
    }

    /// Sets the key.
    pub fn with_key(mut self, key: impl Into<String>) -> Message {
        self.key = Some(key.into());
        self
    }

    /// Sets the message id.
    pub fn with_id(mut self, id: u128) -> Message {
        self.id = Some(id);
        self
    }

    /// Delivers the message no sooner than `delay` from now (this machine's clock, read
    /// here): the broker stores it at once, with the same receipt as any message, and no
    /// consumer sees it before then, across broker restarts too. Delays of months work.
    ///
    /// ```
    /// use std::time::Duration;
    /// use qbus_client::Message;
    /// let reminder = Message::new("call back").with_delay(Duration::from_secs(30));
    /// assert!(reminder.deliver_at.is_some());
    /// ```
    pub fn with_delay(self, delay: Duration) -> Message {
        let at = wall_ms().saturating_add(delay.as_millis().min(u128::from(u64::MAX >> 2)) as u64);
        self.with_deliver_at(at)
    }

    /// Delivers the message no sooner than `at_ms` (ms since the Unix epoch, as the broker's
    /// clock reads it). A time already past means at once.
    pub fn with_deliver_at(mut self, at_ms: u64) -> Message {
        // The top bit marks the broker's own copies; no real time has it.
        self.deliver_at = Some(at_ms.min(u64::MAX >> 2));
        self
    }

    /// Lets the message expire `ttl` after it may first be delivered (its `deliver_at`, or
    /// when it is sent): the broker never delivers it later, and drops it or moves it to
    /// the dead-letter MQ as the MQ's options say.
    pub fn with_ttl(mut self, ttl: Duration) -> Message {
        self.ttl = Some(ttl);
        self
    }

    /// Expires the message at `at_ms` (ms since the Unix epoch); overrides [`with_ttl`](Self::with_ttl).
    pub fn with_expires_at(mut self, at_ms: u64) -> Message {
        self.expires_at = Some(at_ms);
        self.ttl = None;
        self
    }

    fn expiry(&self) -> Option<u64> {
        self.expires_at.or_else(|| {
            let ttl = self.ttl?;
            let from = self.deliver_at.unwrap_or_else(wall_ms);
            Some(from.saturating_add(ttl.as_millis().min(u128::from(u64::MAX)) as u64))
        })
    }

    /// Sets the dedupe id: a send that repeats it within the MQ's window (a retry after a
    /// lost reply, a restarted producer sending again) is not stored twice on a broker.
    ///
    /// ```
    /// use qbus_client::Message;
    /// let msg = Message::new("debit 10").with_dedupe_id("payment-4711");
    /// assert_eq!(msg.dedupe_id.as_deref(), Some("payment-4711"));
    /// ```
    pub fn with_dedupe_id(mut self, dedupe_id: impl Into<String>) -> Message {
        self.dedupe_id = Some(dedupe_id.into());
        self
    }

    pub(crate) fn encoded_len(&self) -> usize {
        RECORD_OVERHEAD
            + if self.id.is_some() { 16 } else { 0 }
            + if self.deliver_at.is_some() { 8 } else { 0 }
            + if self.expires_at.is_some() || self.ttl.is_some() {
                8
            } else {
                0
            }
            + self.dedupe_id.as_ref().map_or(0, |d| 1 + d.len())
            + self.body.len()
            + self.tag.as_ref().map_or(0, String::len)
            + self.key.as_ref().map_or(0, String::len)
    }

    /// Appends this message as a record (offset and time are set by the broker).
    pub(crate) fn encode(&self, dst: &mut BytesMut) -> Result<()> {
        self.encode_with_id(self.id, dst)
    }

    /// Encodes the record as [`encode`](Message::encode) does, with `id` as its message id.
    pub(crate) fn encode_with_id(&self, id: Option<u128>, dst: &mut BytesMut) -> Result<()> {
        let meta = RecordMeta {
            tag: self.tag.as_deref(),
            key: self.key.as_deref(),
            id,
            deliver_at: self.deliver_at,
            expires_at: self.expiry(),
            dedupe_id: self.dedupe_id.as_deref(),
        };
        encode_record_meta(dst, 0, 0, &meta, &self.body)?;
        Ok(())
    }
}

impl From<&'static str> for Message {
    fn from(body: &'static str) -> Self {
        Message::new(body)
    }
}

impl From<String> for Message {
    fn from(body: String) -> Self {
        Message::new(body)
    }
}

impl From<Vec<u8>> for Message {
    fn from(body: Vec<u8>) -> Self {
        Message::new(body)
    }
}

impl From<Bytes> for Message {
    fn from(body: Bytes) -> Self {
        Message::new(body)
    }
}
