//! Reading a request body with a size limit and a deadline, so a large or slow upload can
//! neither grow memory past the limit nor hold its task forever.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::http::request::Parts;
use hyper::StatusCode;
use qbus_wire::protocol::Status;

use super::reply::ApiError;

/// Reads the whole body of a request: at most `limit` bytes (`why` names the limit in the
/// error), within `deadline`.
pub async fn read(
    parts: &Parts,
    body: Incoming,
    limit: usize,
    why: &str,
    deadline: Duration,
) -> Result<Bytes, ApiError> {
    let too_large = |size: String| {
        ApiError::new(
            Status::TooLarge,
            format!("body of {size} bytes exceeds the limit of {limit} bytes ({why})"),
        )
    };
    // Refuse a declared oversize body before reading any of it.
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(size) = declared.filter(|&size| size > limit as u64) {
        return Err(too_large(size.to_string()));
    }
    match tokio::time::timeout(deadline, Limited::new(body, limit).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(too_large(format!("more than {limit}")))
        }
        Ok(Err(e)) => Err(ApiError::bad_request(format!("cannot read the body: {e}"))),
        Err(_) => Err(ApiError::http(
            StatusCode::REQUEST_TIMEOUT,
            format!("the body did not arrive within {deadline:?} (http-timeout)"),
        )),
    }
}
