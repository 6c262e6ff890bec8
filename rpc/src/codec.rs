//! The two body encodings of an RPC call: MessagePack (the default) and JSON.
//!
//! A request names its encoding in the frame header's `encoding` field (an MQ-RPC request
//! record in its tag); the reply comes back in the same encoding, so a caller in another
//! language can speak JSON and never touch MessagePack beyond the frame header.

use serde::{de::DeserializeOwned, Serialize};

/// How the body of a call and of its reply is encoded.
///
/// ```
/// use qbus_rpc::Encoding;
/// assert_eq!(Encoding::from_header(None).unwrap(), Encoding::MsgPack);
/// assert_eq!(Encoding::from_header(Some("json")).unwrap(), Encoding::Json);
/// assert!(Encoding::from_header(Some("xml")).is_err());
///
/// let bytes = Encoding::Json.encode(&("hello", 7)).unwrap();
/// assert_eq!(bytes, br#"["hello",7]"#);
/// let back: (String, u32) = Encoding::Json.decode(&bytes).unwrap();
/// assert_eq!(back, ("hello".to_string(), 7));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Encoding {
    /// MessagePack with structs as maps (field names on the wire), `"msgpack"`; the
    /// default when a request names none.
    #[default]
    MsgPack,
    /// JSON, `"json"`.
    Json,
}

/// A header named an encoding this version does not speak.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported encoding {0:?}: use \"msgpack\" (the default) or \"json\"")]
pub struct UnknownEncoding(pub String);

impl Encoding {
    /// The name carried in headers and tags.
    pub const fn name(self) -> &'static str {
        match self {
            Encoding::MsgPack => "msgpack",
            Encoding::Json => "json",
        }
    }

    /// The encoding a header (or tag) names; `None` means MessagePack. Names are matched
    /// without regard to case.
    pub fn from_header(value: Option<&str>) -> Result<Encoding, UnknownEncoding> {
        match value {
            None => Ok(Encoding::MsgPack),
            Some(name) if name.eq_ignore_ascii_case("msgpack") => Ok(Encoding::MsgPack),
            Some(name) if name.eq_ignore_ascii_case("json") => Ok(Encoding::Json),
            Some(other) => Err(UnknownEncoding(other.to_owned())),
        }
    }

    /// What to put in a header: nothing for MessagePack (the default), the name otherwise.
    pub fn header_value(self) -> Option<String> {
        match self {
            Encoding::MsgPack => None,
            other => Some(other.name().to_owned()),
        }
    }

    /// Encodes `value`; the error is a message naming the encoding.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>, String> {
        // Room for a typical envelope up front: growing from empty reallocates three or four
        // times per call.
        let mut out = Vec::with_capacity(ENVELOPE_CAPACITY);
        match self {
            Encoding::MsgPack => {
                rmp_serde::encode::write_named(&mut out, value).map_err(|e| e.to_string())?
            }
            Encoding::Json => serde_json::to_writer(&mut out, value).map_err(|e| e.to_string())?,
        }
        Ok(out)
    }

    /// Decodes a value from `bytes`; the error is the decoder's message.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, String> {
        self.decode_borrowed(bytes)
    }

    /// Decodes a value that may borrow from `bytes`.
    pub(crate) fn decode_borrowed<'a, T: serde::Deserialize<'a>>(
        self,
        bytes: &'a [u8],
    ) -> Result<T, String> {
        match self {
            Encoding::MsgPack => rmp_serde::from_slice(bytes).map_err(|e| e.to_string()),
            Encoding::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        }
    }
}

/// Bytes reserved for an encoded envelope: a call with a short argument fits.
const ENVELOPE_CAPACITY: usize = 128;

impl std::fmt::Display for Encoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Point {
        x: i32,
        y: i32,
    }

    #[test]
    fn names_round_trip_and_ignore_case() {
        for encoding in [Encoding::MsgPack, Encoding::Json] {
            assert_eq!(Encoding::from_header(Some(encoding.name())), Ok(encoding));
        }
        assert_eq!(Encoding::from_header(Some("JSON")), Ok(Encoding::Json));
        assert_eq!(Encoding::MsgPack.header_value(), None);
        assert_eq!(Encoding::Json.header_value().as_deref(), Some("json"));
    }

    #[test]
    fn msgpack_writes_structs_as_maps() {
        let bytes = Encoding::MsgPack.encode(&Point { x: 1, y: 2 }).unwrap();
        assert_eq!(bytes[0], 0x82, "a fixmap of two entries");
        let back: Point = Encoding::MsgPack.decode(&bytes).unwrap();
        assert_eq!(back, Point { x: 1, y: 2 });
    }
}
