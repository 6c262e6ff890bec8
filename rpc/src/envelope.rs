//! The request and response envelopes: the body of a `Call` and of its reply, the same over
//! DirectRPC and MQ-RPC, in either [`Encoding`].
//!
//! ```text
//! request   {"module": "Greeter", "method": "hello", "params": ["world"], "timeout_ms": 10000}
//! success   {"result": "Hello, world!"}
//! failure   {"error": {"code": 404, "message": "...", "detail": "..."}}
//! ```
//!
//! The shapes, their fields and the error codes are specified with the protocol, in
//! [`qbus_client::protocol::rpc`] (the broker's HTTP gateway reads and writes envelopes too,
//! and the broker does not depend on this crate); this module re-exports them. A method's
//! own `Result<T, E>` is an ordinary result; `error` is for the framework:
//!
//! ```
//! use qbus_rpc::{Encoding, ErrorCode, RemoteError};
//! let error = RemoteError::new(ErrorCode::NotFound, "no method Greeter.bye")
//!     .with_detail("Greeter has: fail, hello");
//! let json = Encoding::Json.encode(&error).unwrap();
//! assert_eq!(
//!     String::from_utf8(json).unwrap(),
//!     r#"{"code":404,"message":"no method Greeter.bye","detail":"Greeter has: fail, hello"}"#
//! );
//! ```

pub use qbus_client::protocol::rpc::{ErrorCode, RemoteError, DEFAULT_TIMEOUT};
pub(crate) use qbus_client::protocol::rpc::{
    RequestHead, RequestOut, RequestParams, ResponseIn, ResponseOut,
};

use std::ops::Range;

use serde::de::DeserializeOwned;

use crate::codec::Encoding;

/// Reads a request's head. A MessagePack request in the form callers write is scanned in
/// one pass, which also gives where its params lie (for [`read_params`]); any other form
/// is decoded by serde, whose error is the one reported.
pub(crate) fn read_head(
    encoding: Encoding,
    body: &[u8],
) -> Result<(RequestHead<'_>, Option<Range<usize>>), String> {
    let scanned = match encoding {
        Encoding::MsgPack => RequestHead::scan_msgpack(body),
        Encoding::Json => None,
    };
    match scanned {
        Some((head, params)) => Ok((head, Some(params))),
        None => encoding.decode_borrowed(body).map(|head| (head, None)),
    }
}

/// Reads a request's params as `P`: from their range when [`read_head`] found one, else
/// from the whole envelope.
pub(crate) fn read_params<P: DeserializeOwned>(
    encoding: Encoding,
    body: &[u8],
    params: Option<&Range<usize>>,
) -> Result<P, String> {
    match params {
        // The range came from scanning this very body.
        Some(range) => encoding.decode(&body[range.clone()]),
        None => encoding
            .decode::<RequestParams<P>>(body)
            .map(|request| request.params),
    }
}

/// Encodes an error response; falls back to a bare message should encoding fail (it cannot
/// for this plain struct, but a reply must always go out).
pub(crate) fn error_body(encoding: Encoding, error: &RemoteError) -> Vec<u8> {
    encoding
        .encode(&ResponseOut::<()>::Error(error))
        .unwrap_or_else(|_| error.message.clone().into_bytes())
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    #[test]
    fn responses_are_single_key_maps_in_both_encodings() {
        let ok = Encoding::Json
            .encode(&ResponseOut::Result(&Some("hi")))
            .unwrap();
        assert_eq!(ok, br#"{"result":"hi"}"#);
        for encoding in [Encoding::MsgPack, Encoding::Json] {
            let none = encoding.encode(&ResponseOut::Result(&None::<u8>)).unwrap();
            match encoding.decode::<ResponseIn<Option<u8>>>(&none).unwrap() {
                ResponseIn::Result(value) => assert_eq!(value, None),
                ResponseIn::Error(e) => panic!("{e}"),
            }
            let error = RemoteError::new(ErrorCode::BadRequest, "bad").with_detail("why");
            let body = error_body(encoding, &error);
            match encoding.decode::<ResponseIn<String>>(&body).unwrap() {
                ResponseIn::Error(back) => assert_eq!(back, error),
                ResponseIn::Result(r) => panic!("{r}"),
            }
        }
    }

    #[test]
    fn the_head_ignores_params_and_borrows() {
        let body = Encoding::MsgPack
            .encode(&RequestOut {
                module: "M",
                method: "m",
                params: &("x", 1),
                timeout_ms: 5,
            })
            .unwrap();
        let head: RequestHead<'_> = Encoding::MsgPack.decode_borrowed(&body).unwrap();
        assert!(matches!(head.module, Cow::Borrowed("M")));
        assert_eq!((&*head.method, head.timeout_ms), ("m", Some(5)));
        let params: RequestParams<(String, u8)> = Encoding::MsgPack.decode(&body).unwrap();
        assert_eq!(params.params, ("x".to_string(), 1));
    }
}
