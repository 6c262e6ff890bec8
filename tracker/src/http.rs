//! HTTP/1.1 on the tracker port, for people and scripts: `GET /topology` answers the
//! current snapshot as JSON. A connection is HTTP when its first byte is a capital letter
//! (the start of a method); a binary frame starts with a length byte below 0x41.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::table::Table;

/// How long a new or idle keep-alive connection may stay silent.
const TIMEOUT: Duration = Duration::from_secs(30);

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
    let service = service_fn(move |request| {
        let table = table.clone();
        async move { Ok::<_, Infallible>(route(&table, &request)) }
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

fn route(table: &Table, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path().trim_end_matches('/');
    let known = matches!(path, "" | "/topology");
    if !known {
        return text(StatusCode::NOT_FOUND, "not found: try GET /topology\n");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    if path.is_empty() {
        return text(
            StatusCode::OK,
            "qbus-tracker: GET /topology for the live topology as JSON\n",
        );
    }
    match serde_json::to_vec_pretty(&table.snapshot()) {
        Ok(json) => {
            let mut response = Response::new(Full::new(Bytes::from(json)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot encode the topology: {e}\n"),
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
