//! Messages as a producer sends them.

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
    /// Dedupe id (1 to 255 bytes): the broker stores a message with a dedupe id it stored
    /// within the MQ's window (default 2 minutes) only once, and answers the repeat with the
    /// first one's offset ([`Receipt::duplicate`](crate::Receipt::duplicate)). Needs a
    /// protocol 3 broker.
    pub dedupe_id: Option<String>,
}

impl Message {
    /// A message with `body` and no tag or key.
    pub fn new(body: impl Into<Bytes>) -> Message {
        Message {
            body: body.into(),
            tag: None,
            key: None,
            id: None,
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
            + self.dedupe_id.as_ref().map_or(0, |d| 1 + d.len())
            + self.body.len()
            + self.tag.as_ref().map_or(0, String::len)
            + self.key.as_ref().map_or(0, String::len)
    }

    /// Appends this message as a record (offset and time are set by the broker).
    pub(crate) fn encode(&self, dst: &mut BytesMut) -> Result<()> {
        let meta = RecordMeta {
            tag: self.tag.as_deref(),
            key: self.key.as_deref(),
            id: self.id,
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
