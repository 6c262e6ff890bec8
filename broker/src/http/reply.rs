//! Building responses: JSON bodies, and errors as JSON carrying the binary protocol's
//! status codes so a client handles both transports the same way.

use hyper::http::request::Parts;
use hyper::{Method, StatusCode};
use qbus_wire::protocol::Status;
use serde::Serialize;

use crate::error::BrokerError;

// Every response body is built whole before it is sent (bounded by `max-frame`), and none
// may be cached: they describe live state.
pub use qbus_server_kit::http::{bytes, json, Reply, JSON};

/// Why a request failed: an HTTP status (the protocol's code where one applies) and a
/// message that says what to change.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

/// The JSON body of every error reply.
#[derive(Serialize)]
struct ErrorBody<'a> {
    status: u16,
    error: &'a str,
}

impl ApiError {
    /// `405` naming the methods `parts`' path allows.
    pub fn not_allowed(parts: &Parts, allowed: &[Method]) -> ApiError {
        let names: Vec<&str> = allowed.iter().map(Method::as_str).collect();
        ApiError::http(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "{} {} is not allowed: use {}",
                parts.method,
                parts.uri.path(),
                names.join(" or ")
            ),
        )
    }

    /// `404` for a path the API does not have.
    pub fn no_route(parts: &Parts) -> ApiError {
        ApiError::new(
            Status::NotFound,
            format!(
                "no route for {} {}: see docs/http.md for the API",
                parts.method,
                parts.uri.path()
            ),
        )
    }

    /// An error with a protocol status.
    pub fn new(status: Status, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::from_u16(status.code())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message: message.into(),
        }
    }

    /// A malformed request (400).
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(Status::BadRequest, message)
    }

    /// An error that only HTTP has (405 wrong method, 408 slow body).
    pub fn http(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// What went wrong and what to change.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The response for this error.
    pub fn into_reply(self) -> Reply {
        json(
            self.status,
            &ErrorBody {
                status: self.status.as_u16(),
                error: &self.message,
            },
        )
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> ApiError {
        ApiError::new(e.status(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn broker_errors_keep_their_protocol_status() {
        let reply = ApiError::from(BrokerError::NoSuchMq("orders".into())).into_reply();
        assert_eq!(reply.status(), StatusCode::NOT_FOUND);
        let body = reply.into_body().collect().await.unwrap().to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["status"], 404);
        assert_eq!(value["error"], "MQ \"orders\" does not exist");
    }
}
