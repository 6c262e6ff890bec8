//! HTTP/1.1 on the tracker port, for people and scripts (`docs/http.md`, section
//! "Tracker"):
//!
//! - `GET /`: the monitor page, one self-contained file (`monitor.html`) compiled in;
//! - `GET /api/stats`: the tracker, every node with its report age, and the DirectRPC
//!   services, as JSON ([`stats`]); the page draws itself from it;
//! - `GET /metrics`: the same in the Prometheus text format ([`prometheus`]);
//! - `GET /topology`: the current snapshot as subscribers get it, as JSON.
//!
//! A connection is HTTP when its first byte is a capital letter (the start of a method, see
//! `qbus_server_kit::sniff`); a binary frame starts with a length byte below 0x41.

use std::convert::Infallible;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW};
use hyper::service::service_fn;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use qbus_server_kit::http::{bytes, json_pretty, serve_connection, text, Reply};
use qbus_server_kit::page;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use self::stats::Stats;
use crate::table::Table;

mod prometheus;
mod stats;

/// How long a new or idle keep-alive connection may stay silent (and, before the first
/// byte tells HTTP from binary, any new connection).
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The monitor page. Self-contained (styles and script inline, nothing loaded from
/// elsewhere), so it works on a machine without internet access; the look the monitor
/// pages share is spliced in once.
static PAGE: LazyLock<Bytes> =
    LazyLock::new(|| Bytes::from(page::assemble(include_str!("monitor.html"))));

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

/// Serves HTTP on `stream` until the peer closes it, it idles out, or `shutdown` fires.
pub async fn serve<S>(table: Arc<Table>, stream: S, local: String, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let local: Arc<str> = local.into();
    let service = service_fn(move |request| {
        let (table, local) = (table.clone(), local.clone());
        async move { Ok::<_, Infallible>(route(&table, &local, &request)) }
    });
    serve_connection(TokioIo::new(stream), service, TIMEOUT, &shutdown).await;
}

fn route(table: &Table, local: &str, request: &Request<Incoming>) -> Reply {
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
        Resource::Monitor => bytes(StatusCode::OK, "text/html; charset=utf-8", PAGE.clone()),
        Resource::Stats => json_pretty(StatusCode::OK, &stats()),
        Resource::Metrics => bytes(
            StatusCode::OK,
            prometheus::CONTENT_TYPE,
            prometheus::render(&stats()).into(),
        ),
        Resource::Topology => json_pretty(StatusCode::OK, &table.snapshot()),
    }
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
    fn the_page_is_whole() {
        let page = std::str::from_utf8(&PAGE).unwrap();
        assert_eq!(page::flaws(page), Vec::<&str>::new());
        assert!(page.contains("/api/stats"));
    }
}
