//! HTTP/1.1 on the tracker port, for people and scripts (`docs/http.md`, section
//! "Tracker"):
//!
//! - `GET /`: the monitor page, one self-contained file (`monitor.html`) compiled in;
//! - `GET /api/stats`: the tracker, every node with its report age, and the DirectRPC
//!   services, as JSON ([`Stats`]); the page draws itself from it;
//! - `GET /metrics`: the same in the Prometheus text format ([`prometheus`]);
//! - `GET /topology`: the current snapshot as subscribers get it, as JSON.
//!
//! A connection is HTTP when its first byte is a capital letter (the start of a method); a
//! binary frame starts with a length byte below 0x41.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::prometheus;
use crate::stats::Stats;
use crate::table::Table;

/// How long a new or idle keep-alive connection may stay silent.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The monitor page. Self-contained (styles and script inline, nothing loaded from
/// elsewhere), so it works on a machine without internet access.
const PAGE: &str = include_str!("monitor.html");

/// What a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resource {
    Monitor,
    Stats,
    Metrics,
    Topology,
}

impl Resource {
    fn of(path: &str) -> Option<Resource> {
        match path.trim_end_matches('/') {
            "" => Some(Resource::Monitor),
            "/api/stats" => Some(Resource::Stats),
            "/metrics" => Some(Resource::Metrics),
            "/topology" => Some(Resource::Topology),
            _ => None,
        }
    }
}

/// True when the connection speaks HTTP, judged by its first byte (not consumed).
pub async fn sniff(stream: &TcpStream) -> std::io::Result<bool> {
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(TIMEOUT, stream.peek(&mut first))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("nothing sent within {TIMEOUT:?}"),
            )
        })??;
    if peeked == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before sending anything",
        ));
    }
    Ok(first[0].is_ascii_uppercase())
}

/// Serves HTTP on `stream` until the peer closes it, it idles out, or `shutdown` fires.
pub async fn serve(table: Arc<Table>, stream: TcpStream, shutdown: CancellationToken) {
    // Shown by the stats: the listen address may be 0.0.0.0, this is what the client reached.
    let local: Arc<str> = stream
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default()
        .into();
    let service = service_fn(move |request| {
        let (table, local) = (table.clone(), local.clone());
        async move { Ok::<_, Infallible>(route(&table, &local, &request)) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
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

fn route(table: &Table, local: &str, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    table.metrics().http_request();
    let Some(resource) = Resource::of(request.uri().path()) else {
        return text(
            StatusCode::NOT_FOUND,
            "not found: try GET / (the monitor page), /api/stats, /metrics or /topology\n",
        );
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let stats = || Stats::collect(table, local.to_owned(), Instant::now());
    match resource {
        Resource::Monitor => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            Bytes::from_static(PAGE.as_bytes()),
        ),
        Resource::Stats => json(&stats()),
        Resource::Metrics => reply(
            StatusCode::OK,
            prometheus::CONTENT_TYPE,
            prometheus::render(&stats()).into(),
        ),
        Resource::Topology => json(&table.snapshot()),
    }
}

/// A JSON response, indented for people reading it with `curl`.
fn json<T: serde::Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => reply(StatusCode::OK, "application/json", body.into()),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot encode the reply: {e}\n"),
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    reply(
        status,
        "text/plain; charset=utf-8",
        Bytes::from(body.to_owned()),
    )
}

/// A response with a body of the given type. Every reply describes live state, so none
/// may be cached.
fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_resources_with_or_without_a_trailing_slash() {
        assert_eq!(Resource::of("/"), Some(Resource::Monitor));
        assert_eq!(Resource::of("/api/stats/"), Some(Resource::Stats));
        assert_eq!(Resource::of("/metrics"), Some(Resource::Metrics));
        assert_eq!(Resource::of("/topology"), Some(Resource::Topology));
        assert_eq!(Resource::of("/api"), None);
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for external in ["http://", "https://", "//cdn", "src=\"//", "@import"] {
            assert!(!PAGE.contains(external), "monitor.html mentions {external}");
        }
        assert!(PAGE.contains("/api/stats"));
    }
}
