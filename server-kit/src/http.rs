//! HTTP/1.1 next to the binary protocol: serving one connection until it ends or the server
//! shuts down, and building replies. Every reply describes live state, so none may be cached.

use std::error::Error as StdError;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Incoming};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::HttpService;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioTimer;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// Every response body is built whole before it is sent.
pub type Reply = Response<Full<Bytes>>;

/// Content type of JSON replies.
pub const JSON: &str = "application/json";

/// Content type of plain-text replies.
pub const TEXT: &str = "text/plain; charset=utf-8";

/// Serves HTTP/1.1 on `io` with `service` until the peer closes it, `timeout` passes without
/// a request head (which also closes an idle keep-alive connection), or `shutdown` fires;
/// then the request in progress is finished and the connection closed.
pub async fn serve_connection<I, S, B>(
    io: I,
    service: S,
    timeout: Duration,
    shutdown: &CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .serve_connection(io, service);
    tokio::pin!(connection);
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "http connection ended");
    }
}

/// A response with a body of the given type, marked `Cache-Control: no-store`.
pub fn bytes(status: StatusCode, content_type: &'static str, body: Bytes) -> Reply {
    let mut reply = Response::new(Full::new(body));
    *reply.status_mut() = status;
    let headers = reply.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    reply
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<String>) -> Reply {
    bytes(status, TEXT, Bytes::from(body.into()))
}

/// A compact JSON response.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Reply {
    encoded(status, serde_json::to_vec(value))
}

/// An indented JSON response, for people reading it with `curl`.
pub fn json_pretty<T: Serialize>(status: StatusCode, value: &T) -> Reply {
    encoded(status, serde_json::to_vec_pretty(value))
}

fn encoded(status: StatusCode, body: serde_json::Result<Vec<u8>>) -> Reply {
    match body {
        Ok(body) => bytes(status, JSON, Bytes::from(body)),
        // Reply types are plain structs with string keys; this cannot happen, but a broken
        // reply must not take the connection down.
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the reply: {e}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_typed_and_never_cached() {
        let reply = json_pretty(StatusCode::OK, &[1, 2]);
        assert_eq!(reply.headers()[CONTENT_TYPE], JSON);
        assert_eq!(reply.headers()[CACHE_CONTROL], "no-store");
        let reply = text(StatusCode::NOT_FOUND, "no\n");
        assert_eq!(reply.status(), StatusCode::NOT_FOUND);
        assert_eq!(reply.headers()[CONTENT_TYPE], TEXT);
    }
}
