//! The request and response envelopes: the body of a `Call` and of its reply, the same over
//! DirectRPC and MQ-RPC, in either [`Encoding`].
//!
//! ```text
//! request   {"module": "Greeter", "method": "hello", "params": ["world"], "timeout_ms": 10000}
//! success   {"result": "Hello, world!"}
//! failure   {"error": {"code": 404, "message": "...", "detail": "..."}}
//! ```
//!
//! `params` is an array of the method's arguments in order; `timeout_ms` (optional, default
//! 10 000) is the deadline relative to when the server receives the call (for MQ-RPC, to when
//! the broker stored it). A method's own `Result<T, E>` is an ordinary result value:
//! `{"result": {"Ok": ...}}` or `{"result": {"Err": ...}}`. The `error` shape is reserved for
//! the framework: the call could not be decoded, routed or finished.

use std::borrow::Cow;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::codec::Encoding;

/// Deadline of a call that names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Stable codes of framework errors; the numbers follow HTTP where a meaning overlaps and
/// never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u16", into = "u16")]
pub enum ErrorCode {
    /// 400: the request could not be decoded, or its params do not fit the method.
    BadRequest,
    /// 404: no such module or method.
    NotFound,
    /// 415: the request names an encoding the server does not speak.
    UnsupportedEncoding,
    /// 429: the server has too many calls in flight.
    Overloaded,
    /// 500: the handler panicked or its result could not be encoded.
    Internal,
    /// 503: the server is shutting down.
    Unavailable,
    /// 504: the deadline passed before the handler finished; the server stopped it.
    DeadlineExceeded,
    /// A code this version does not know.
    Other(u16),
}

impl From<u16> for ErrorCode {
    fn from(code: u16) -> Self {
        match code {
            400 => ErrorCode::BadRequest,
            404 => ErrorCode::NotFound,
            415 => ErrorCode::UnsupportedEncoding,
            429 => ErrorCode::Overloaded,
            500 => ErrorCode::Internal,
            503 => ErrorCode::Unavailable,
            504 => ErrorCode::DeadlineExceeded,
            other => ErrorCode::Other(other),
        }
    }
}

impl From<ErrorCode> for u16 {
    fn from(code: ErrorCode) -> u16 {
        match code {
            ErrorCode::BadRequest => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::UnsupportedEncoding => 415,
            ErrorCode::Overloaded => 429,
            ErrorCode::Internal => 500,
            ErrorCode::Unavailable => 503,
            ErrorCode::DeadlineExceeded => 504,
            ErrorCode::Other(code) => code,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            ErrorCode::BadRequest => "bad request",
            ErrorCode::NotFound => "not found",
            ErrorCode::UnsupportedEncoding => "unsupported encoding",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Internal => "internal error",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::DeadlineExceeded => "deadline exceeded",
            ErrorCode::Other(_) => "error",
        };
        write!(f, "{} {name}", u16::from(*self))
    }
}

/// A framework error as the server reports it: the stable `error` shape of a response.
///
/// ```
/// use qbus_rpc::{Encoding, ErrorCode, RemoteError};
/// let error = RemoteError::new(ErrorCode::NotFound, "no method Greeter.bye")
///     .with_detail("Greeter has: fail, hello");
/// let json = Encoding::Json.encode(&error).unwrap();
/// assert_eq!(
///     String::from_utf8(json).unwrap(),
///     r#"{"code":404,"message":"no method Greeter.bye","detail":"Greeter has: fail, hello"}"#
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}{}", detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
pub struct RemoteError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// What went wrong, for a person.
    pub message: String,
    /// More about it (the decoder's complaint, the methods that exist), when there is more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl RemoteError {
    /// An error without detail.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> RemoteError {
        RemoteError {
            code,
            message: message.into(),
            detail: None,
        }
    }

    /// Adds a detail.
    pub fn with_detail(mut self, detail: impl Into<String>) -> RemoteError {
        self.detail = Some(detail.into());
        self
    }
}

/// A request as the client writes it.
#[derive(Serialize)]
pub(crate) struct RequestOut<'a, P: ?Sized> {
    pub module: &'a str,
    pub method: &'a str,
    pub params: &'a P,
    pub timeout_ms: u64,
}

/// The part of a request the server reads before it knows the method's parameter types.
#[derive(Deserialize)]
pub(crate) struct RequestHead<'a> {
    #[serde(borrow)]
    pub module: Cow<'a, str>,
    #[serde(borrow)]
    pub method: Cow<'a, str>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// The parameters of a request, read once the method is known.
#[derive(Deserialize)]
pub(crate) struct RequestParams<P> {
    pub params: P,
}

/// A response as the server writes it.
#[derive(Serialize)]
pub(crate) enum ResponseOut<'a, T: ?Sized> {
    #[serde(rename = "result")]
    Result(&'a T),
    #[serde(rename = "error")]
    Error(&'a RemoteError),
}

/// A response as the client reads it.
#[derive(Deserialize)]
pub(crate) enum ResponseIn<T> {
    #[serde(rename = "result")]
    Result(T),
    #[serde(rename = "error")]
    Error(RemoteError),
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
    use super::*;

    #[test]
    fn codes_round_trip() {
        for code in [400, 404, 415, 429, 500, 503, 504, 299] {
            assert_eq!(u16::from(ErrorCode::from(code)), code);
        }
        assert_eq!(ErrorCode::from(299), ErrorCode::Other(299));
    }

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
