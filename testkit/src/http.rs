//! An HTTP/1.1 client connection, as `curl` or a script would use one.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The longest a reply may take (long polls included).
const REPLY_LIMIT: Duration = Duration::from_secs(20);

/// One HTTP/1.1 keep-alive connection.
pub struct Http {
    sender: SendRequest<Full<Bytes>>,
    addr: String,
}

/// A whole response.
#[derive(Debug)]
pub struct Reply {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Reply {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// A header that must be there.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
    }
}

impl Http {
    /// Connects to `addr` (`host:port`).
    pub async fn connect(addr: &str) -> Http {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP handshake");
        tokio::spawn(connection);
        Http {
            sender,
            addr: addr.to_owned(),
        }
    }

    /// Sends a request and reads the whole reply, which must come within 20 s.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.addr);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(body.into())).expect("request");
        self.sender.ready().await.expect("connection usable");
        let response = tokio::time::timeout(REPLY_LIMIT, self.sender.send_request(request))
            .await
            .expect("a reply in time")
            .expect("a reply");
        let (parts, body) = response.into_parts();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.expect("reply body").to_bytes(),
        }
    }

    /// `GET path`.
    pub async fn get(&mut self, path: &str) -> Reply {
        self.send(Method::GET, path, &[], Bytes::new()).await
    }

    /// `POST path` with `body`.
    pub async fn post(&mut self, path: &str, body: impl Into<Bytes>) -> Reply {
        self.send(Method::POST, path, &[], body).await
    }
}

/// One request on a fresh connection, the way `curl` does it.
pub async fn once(
    addr: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    Http::connect(addr)
        .await
        .send(method, path, headers, body)
        .await
}
