//! Security end to end against real broker processes: the permission matrix (every
//! operation x allowed / denied / no credentials, on the binary protocol, HTTP and MQ-RPC,
//! deny winning over allow), logins (bad secrets refused at once and slowed down, old
//! clients told why), and protected mode (anonymous clients only from `anonymous-from`).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use hyper::Method;
use qbus_client::link::TcpConnector;
use qbus_client::protocol::record::encode_record;
use qbus_client::protocol::{
    Command, Credentials, DeliveryToken, Frame, Header, DEFAULT_MAX_FRAME,
};
use qbus_client::{ClientError, Connection, ConnectionOptions, MqOptions};
use qbus_server_kit::auth::{hash_secret, new_token};
use qbus_testkit::http::once;
use qbus_testkit::process::BrokerProcess;

/// A settings file with three users and the token of `app`.
struct Users {
    file: tempfile::NamedTempFile,
    app_token: String,
}

fn users() -> Users {
    let (app_token, app_token_digest) = new_token();
    let hash = |password: &str| hash_secret(password).unwrap();
    let text = format!(
        r#"
[[users]]
name = "root"
secret = "{root}"
allow = ["admin,read,produce,consume,rpc-call,rpc-serve *"]

[[users]]
name = "app"
secret = "{app}"
tokens = ["{app_token_digest}"]
allow = ["produce,read orders*", "consume orders* billing*", "rpc-call greeter"]
deny = ["produce orders.audit"]

[[users]]
name = "server"
secret = "{server}"
allow = ["rpc-serve greeter"]
"#,
        root = hash("root-pw"),
        app = hash("app-pw"),
        server = hash("server-pw"),
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    Users { file, app_token }
}

/// Who a row of the matrix is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Who {
    Root,
    App,
    AppToken,
    Server,
    Nobody,
}

/// What a row expects.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Not refused: any status but 401 and 403.
    Allowed,
    /// 403.
    Denied,
    /// 401.
    NoCredentials,
}

impl Expect {
    fn holds(self, status: u16) -> bool {
        match self {
            Expect::Allowed => status != 401 && status != 403,
            Expect::Denied => status == 403,
            Expect::NoCredentials => status == 401,
        }
    }
}

/// One operation of the matrix, on an MQ (and a group).
#[derive(Debug, Clone, Copy)]
enum Op {
    Produce,
    Fetch,
    Ack,
    Nack,
    Create,
    Query,
    Remove,
    RemoveGroup,
    Call,
    Route,
}

const MATRIX: &[(Op, &str, Option<&str>, Who, Expect)] = &[
    (Op::Produce, "orders", None, Who::App, Expect::Allowed),
    (Op::Produce, "orders", None, Who::AppToken, Expect::Allowed),
    (Op::Produce, "orders", None, Who::Root, Expect::Allowed),
    (
        Op::Produce,
        "orders",
        None,
        Who::Nobody,
        Expect::NoCredentials,
    ),
    (Op::Produce, "payments", None, Who::App, Expect::Denied),
    // Deny wins over the allow rule "produce orders*".
    (Op::Produce, "orders.audit", None, Who::App, Expect::Denied),
    (
        Op::Produce,
        "orders.audit",
        None,
        Who::Root,
        Expect::Allowed,
    ),
    (
        Op::Fetch,
        "orders",
        Some("billing"),
        Who::App,
        Expect::Allowed,
    ),
    (
        Op::Fetch,
        "orders",
        Some("shipping"),
        Who::App,
        Expect::Denied,
    ),
    (
        Op::Fetch,
        "payments",
        Some("billing"),
        Who::App,
        Expect::Denied,
    ),
    (
        Op::Fetch,
        "orders",
        Some("billing"),
        Who::Nobody,
        Expect::NoCredentials,
    ),
    (
        Op::Ack,
        "orders",
        Some("billing"),
        Who::App,
        Expect::Allowed,
    ),
    (
        Op::Ack,
        "orders",
        Some("shipping"),
        Who::App,
        Expect::Denied,
    ),
    (
        Op::Ack,
        "orders",
        Some("billing"),
        Who::Nobody,
        Expect::NoCredentials,
    ),
    (
        Op::Nack,
        "orders",
        Some("billing"),
        Who::App,
        Expect::Allowed,
    ),
    (
        Op::Nack,
        "payments",
        Some("billing"),
        Who::App,
        Expect::Denied,
    ),
    (
        Op::Nack,
        "orders",
        Some("billing"),
        Who::Nobody,
        Expect::NoCredentials,
    ),
    (Op::Query, "orders", None, Who::App, Expect::Allowed),
    (Op::Query, "payments", None, Who::App, Expect::Denied),
    (
        Op::Query,
        "orders",
        None,
        Who::Nobody,
        Expect::NoCredentials,
    ),
    (Op::Create, "orders.new", None, Who::App, Expect::Denied),
    (
        Op::Create,
        "orders.new",
        None,
        Who::Nobody,
        Expect::NoCredentials,
    ),
    (Op::Create, "orders.new", None, Who::Root, Expect::Allowed),
    (
        Op::RemoveGroup,
        "orders",
        Some("billing"),
        Who::App,
        Expect::Denied,
    ),
    (
        Op::RemoveGroup,
        "orders",
        Some("billing"),
        Who::Nobody,
        Expect::NoCredentials,
    ),
    (Op::Remove, "payments", None, Who::App, Expect::Denied),
    (Op::Remove, "payments", None, Who::Server, Expect::Denied),
    (
        Op::Remove,
        "payments",
        None,
        Who::Nobody,
        Expect::NoCredentials,
    ),
    (Op::Call, "greeter", None, Who::App, Expect::Allowed),
    (Op::Call, "greeter", None, Who::Server, Expect::Denied),
    (Op::Call, "payments", None, Who::App, Expect::Denied),
    (
        Op::Call,
        "greeter",
        None,
        Who::Nobody,
        Expect::NoCredentials,
    ),
    // Serving RPC: taking the calls (a fetch) and routing replies.
    (
        Op::Fetch,
        "greeter",
        Some("greeter"),
        Who::Server,
        Expect::Allowed,
    ),
    (
        Op::Fetch,
        "greeter",
        Some("greeter"),
        Who::App,
        Expect::Denied,
    ),
    (Op::Route, "greeter", None, Who::Server, Expect::Allowed),
    (Op::Route, "greeter", None, Who::App, Expect::Denied),
    (
        Op::Route,
        "greeter",
        None,
        Who::Nobody,
        Expect::NoCredentials,
    ),
    (Op::Remove, "orders.new", None, Who::Root, Expect::Allowed),
];

fn credentials(who: Who, users: &Users) -> Option<Credentials> {
    match who {
        Who::Root => Some(Credentials::password("root", "root-pw")),
        Who::App => Some(Credentials::password("app", "app-pw")),
        Who::AppToken => Some(Credentials::token(&users.app_token)),
        Who::Server => Some(Credentials::password("server", "server-pw")),
        Who::Nobody => None,
    }
}

async fn connection(addr: &str, credentials: Option<Credentials>) -> Connection {
    let options = ConnectionOptions {
        connect_timeout: Duration::from_secs(5),
        credentials,
        ..ConnectionOptions::default()
    };
    let connection = Connection::new(TcpConnector::new(addr, DEFAULT_MAX_FRAME), options);
    connection.ensure_connected().await.unwrap();
    connection
}

fn binary_request(op: Op, mq: &str, group: Option<&str>) -> Frame {
    let cmd = match op {
        Op::Produce => Command::Produce,
        Op::Fetch => Command::Fetch,
        Op::Ack => Command::Ack,
        Op::Nack => Command::Nack,
        Op::Create => Command::CreateMq,
        Op::Query => Command::QueryMq,
        Op::Remove => Command::RemoveMq,
        Op::RemoveGroup => Command::RemoveGroup,
        Op::Call => Command::Call,
        Op::Route => Command::Route,
    };
    let mut header = Header::request(cmd, (!matches!(op, Op::Route)).then_some(mq));
    header.group = group.map(str::to_owned);
    header.tokens = vec![DeliveryToken {
        offset: 0,
        attempt: 1,
    }];
    header.timeout_ms = Some(0);
    let mut body = BytesMut::new();
    match op {
        Op::Produce => {
            encode_record(&mut body, 0, 0, None, None, b"m").unwrap();
            header.count = Some(1);
        }
        Op::Call => {
            header.timeout_ms = Some(100);
            body.extend_from_slice(br#"{"module":"Greeter","method":"hello","params":["x"]}"#);
            header.encoding = Some("json".into());
        }
        Op::Route => header.route = Some("no-such-route".into()),
        _ => {}
    }
    Frame::with_body(header, body.freeze())
}

fn status_of(reply: Result<Frame, ClientError>) -> (u16, String) {
    match reply {
        Ok(frame) => (frame.header.status, String::new()),
        Err(ClientError::Server { status, message }) => (status.code(), message),
        Err(e) => panic!("not a server reply: {e}"),
    }
}

/// Sets up what the matrix works on: MQs orders, orders.audit, payments, greeter, and a
/// group billing on orders.
async fn seed(addr: &str) {
    let root = qbus_client::Broker::connect(&format!("root:root-pw@{addr}"))
        .await
        .unwrap();
    for mq in ["orders", "orders.audit", "payments", "greeter"] {
        root.create_mq(mq, MqOptions::default()).await.unwrap();
    }
    for i in 0..3 {
        root.producer("payments")
            .send(format!("payment {i}"))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn the_permission_matrix_holds_on_the_binary_protocol() {
    let users = users();
    let config = users.file.path().to_str().unwrap().to_owned();
    let broker = BrokerProcess::start(&["--config", &config]);
    let addr = broker.addr();
    seed(&addr).await;
    let mut failures = Vec::new();
    for &(op, mq, group, who, expect) in MATRIX {
        let conn = connection(&addr, credentials(who, &users)).await;
        let (status, message) = status_of(conn.request(binary_request(op, mq, group)).await);
        if !expect.holds(status) {
            failures.push(format!(
                "{op:?} {mq} {group:?} as {who:?}: {status} {message}"
            ));
        }
        if (status == 403 || status == 401) && !matches!(op, Op::Route) {
            assert!(
                message.contains(&format!("{mq:?}")),
                "a refusal names the MQ: {message}"
            );
        }
    }
    assert!(
        failures.is_empty(),
        "cells that do not hold:\n{}",
        failures.join("\n")
    );

    // Nothing the refused requests asked for happened: payments keeps its 3 messages.
    let root = qbus_client::Broker::connect(&format!("root:root-pw@{addr}"))
        .await
        .unwrap();
    assert_eq!(root.query_mq("payments").await.unwrap().depth(), 3);
    // Lists show only what the user may read.
    let app = qbus_client::Broker::connect(&format!("app:app-pw@{addr}"))
        .await
        .unwrap();
    let names: Vec<String> = app
        .list_mqs()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["orders", "orders.audit"]);
    // And the refusals are counted.
    let metrics = once(&addr, Method::GET, "/metrics", &[], "").await.text();
    let denied = |status: &str| {
        let key = format!("qbus_denied_total{{protocol=\"binary\",status=\"{status}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let expected = |e: Expect| MATRIX.iter().filter(|row| row.4 == e).count() as u64;
    assert_eq!(denied("401"), expected(Expect::NoCredentials), "{metrics}");
    assert_eq!(denied("403"), expected(Expect::Denied), "{metrics}");
}

fn http_request(op: Op, mq: &str, group: Option<&str>) -> (Method, String, &'static str) {
    let group = group.unwrap_or(mq);
    match op {
        Op::Produce => (Method::POST, format!("/mq/{mq}"), "m"),
        Op::Fetch => (Method::POST, format!("/mq/{mq}/next?group={group}"), ""),
        Op::Ack => (
            Method::POST,
            format!("/mq/{mq}/ack?group={group}&token=0:1"),
            "",
        ),
        Op::Nack => (
            Method::POST,
            format!("/mq/{mq}/nack?group={group}&token=0:1"),
            "",
        ),
        Op::Create => (Method::PUT, format!("/mq/{mq}"), ""),
        Op::Query => (Method::GET, format!("/mq/{mq}"), ""),
        Op::Remove => (Method::DELETE, format!("/mq/{mq}"), ""),
        Op::RemoveGroup => (Method::DELETE, format!("/mq/{mq}/groups/{group}"), ""),
        Op::Call => (
            Method::POST,
            format!("/rpc/{mq}?timeout=100"),
            r#"{"module":"Greeter","method":"hello","params":["x"]}"#,
        ),
        Op::Route => unreachable!("HTTP has no route"),
    }
}

fn authorization(who: Who, users: &Users) -> Option<String> {
    use base64::Engine;
    let basic = |pair: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    };
    match who {
        Who::Root => Some(basic("root:root-pw")),
        Who::App => Some(basic("app:app-pw")),
        Who::AppToken => Some(format!("Bearer {}", users.app_token)),
        Who::Server => Some(basic("server:server-pw")),
        Who::Nobody => None,
    }
}

#[tokio::test]
async fn the_permission_matrix_holds_over_http() {
    let users = users();
    let config = users.file.path().to_str().unwrap().to_owned();
    let broker = BrokerProcess::start(&["--config", &config]);
    let addr = broker.addr();
    seed(&addr).await;
    let mut failures = Vec::new();
    for &(op, mq, group, who, expect) in MATRIX {
        if matches!(op, Op::Route) {
            continue;
        }
        let (method, path, body) = http_request(op, mq, group);
        let auth = authorization(who, &users);
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        let reply = once(&addr, method.clone(), &path, &headers, body).await;
        let status = reply.status.as_u16();
        if !expect.holds(status) {
            failures.push(format!(
                "{method} {path} as {who:?}: {status} {}",
                reply.text()
            ));
        }
        if status == 401 {
            assert_eq!(
                reply.header("www-authenticate"),
                "Basic realm=\"qbus\", charset=\"UTF-8\""
            );
        }
    }
    assert!(
        failures.is_empty(),
        "cells that do not hold:\n{}",
        failures.join("\n")
    );

    let basic = authorization(Who::App, &users).unwrap();
    let app = [("authorization", basic.as_str())];
    // /api/stats lists what the user may read and names it; /metrics stays open.
    let stats = once(&addr, Method::GET, "/api/stats", &app, "")
        .await
        .json();
    assert_eq!(stats["broker"]["user"], "app");
    let names: Vec<&str> = stats["mqs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["orders", "orders.audit"]);
    // The monitor page hides the remove buttons of MQs the user may not administer.
    assert_eq!(stats["mqs"][0]["admin"], false);
    assert_eq!(
        once(&addr, Method::GET, "/metrics", &[], "").await.status,
        200
    );
    assert_eq!(
        once(&addr, Method::GET, "/api/stats", &[], "").await.status,
        401
    );

    // No state change by a GET, and none from another site.
    let get_next = once(
        &addr,
        Method::GET,
        "/mq/orders/next?group=billing",
        &app,
        "",
    )
    .await;
    assert_eq!(get_next.status, 405, "{}", get_next.text());
    let root = authorization(Who::Root, &users).unwrap();
    let foreign = [
        ("authorization", root.as_str()),
        ("origin", "http://evil.example"),
    ];
    let removed = once(&addr, Method::DELETE, "/mq/payments", &foreign, "").await;
    assert_eq!(removed.status, 403, "{}", removed.text());
    let cross = [
        ("authorization", root.as_str()),
        ("sec-fetch-site", "cross-site"),
    ];
    assert_eq!(
        once(&addr, Method::POST, "/mq/payments", &cross, "x")
            .await
            .status,
        403
    );
    let own = format!("http://{addr}");
    let same = [("authorization", root.as_str()), ("origin", own.as_str())];
    assert_eq!(
        once(&addr, Method::POST, "/mq/payments", &same, "x")
            .await
            .status,
        200
    );
    let depth = once(&addr, Method::GET, "/mq/payments", &same, "")
        .await
        .json()["depth"]
        .clone();
    assert_eq!(
        depth, 4,
        "3 seeded, 1 from the same origin, none from elsewhere"
    );
}

#[tokio::test]
async fn bad_secrets_fail_at_once_get_slower_and_old_clients_hear_why() {
    let users = users();
    let config = users.file.path().to_str().unwrap().to_owned();
    let broker = BrokerProcess::start(&["--config", &config]);
    let addr = broker.addr();

    // A bad password fails the connect at once with 401 (no retrying until the deadline).
    let started = Instant::now();
    let err = qbus_client::Broker::connect(&format!("app:wrong@{addr}"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Server { status, .. } if status.code() == 401),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // Each further failure from the address waits longer (50, 100, 200, 400 ms).
    let started = Instant::now();
    for _ in 0..4 {
        let options = ConnectionOptions {
            credentials: Some(Credentials::password("app", "wrong")),
            ..ConnectionOptions::default()
        };
        let conn = Connection::new(TcpConnector::new(addr.as_str(), DEFAULT_MAX_FRAME), options);
        assert!(conn.ensure_connected().await.is_err());
    }
    assert!(
        started.elapsed() >= Duration::from_millis(100 + 200 + 400),
        "{:?}",
        started.elapsed()
    );

    // A version 1 client (no credentials in its Hello) gets a clear 401 on its first
    // request, not a hang.
    let mut link = support::raw_link(&addr, 1, "an old client").await;
    let mut produce = binary_request(Op::Produce, "orders", None);
    produce.header.id = 2;
    link.tx.send(produce).await.unwrap();
    let replies = [
        support::reply_to(&mut link, 1).await.header,
        support::reply_to(&mut link, 2).await.header,
    ];
    assert_eq!(replies[0].status, 200);
    assert_eq!(replies[1].status, 401);
    let message = replies[1].error.clone().unwrap_or_default();
    assert!(
        message.contains("credentials required to produce"),
        "{message}"
    );
}

/// A TCP connection to `addr` from the local address `from`.
async fn connect_from(from: [u8; 4], addr: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::from((from, 0))).unwrap();
    socket.connect(addr.parse().unwrap()).await.unwrap()
}

#[tokio::test]
async fn protected_mode_serves_anonymous_clients_only_from_anonymous_from() {
    // No users: protected mode, with the addresses served without credentials narrowed
    // to 127.0.0.1 alone.
    let broker = BrokerProcess::start(&["--anonymous-from", "127.0.0.1/32"]);
    let addr = broker.addr();
    let local = qbus_client::Broker::connect(&addr).await.unwrap();
    local
        .create_mq("orders", MqOptions::default())
        .await
        .unwrap();

    // From 127.0.0.2 the binary protocol is refused with the way out in the message.
    let stream = connect_from([127, 0, 0, 2], &addr).await;
    let mut link = qbus_client::link::tcp_link(stream, 1 << 24);
    let mut remove = Header::request(Command::RemoveMq, Some("orders"));
    remove.id = 1;
    link.tx.send(Frame::new(remove)).await.unwrap();
    use futures_util::StreamExt;
    let reply = tokio::time::timeout(Duration::from_secs(5), link.rx.next())
        .await
        .expect("a reply within 5 s")
        .unwrap()
        .unwrap();
    assert_eq!(reply.header.status, 401);
    let message = reply.header.error.unwrap_or_default();
    for hint in [
        "protected mode",
        "127.0.0.1/32",
        "[[users]]",
        "--allow-anonymous",
    ] {
        assert!(message.contains(hint), "{hint:?} missing from: {message}");
    }

    // And so is HTTP from there.
    let stream = connect_from([127, 0, 0, 2], &addr).await;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method(Method::DELETE)
        .uri("/mq/orders")
        .header("host", &addr)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let reply = sender.send_request(request).await.unwrap();
    assert_eq!(reply.status(), 401);

    // Nothing was removed; 127.0.0.1 is still served.
    assert_eq!(local.query_mq("orders").await.unwrap().name, "orders");
}

/// One zbus request on a fresh connection (`head` without the blank line); the reply's
/// status and body.
async fn zbus_once(addr: &str, head: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let wire = format!("{head}\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    stream.write_all(wire.as_bytes()).await.unwrap();
    let mut read = Vec::new();
    let exchange = async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "closed before a reply: {}",
                String::from_utf8_lossy(&read)
            );
            read.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&read).into_owned();
            if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |n| n.trim().parse().unwrap());
                if rest.len() >= len {
                    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
                    return (status, rest[..len].to_owned());
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .expect("a zbus reply within 5 s")
}

#[tokio::test]
async fn the_zbus_token_header_is_a_users_token() {
    let users = users();
    let config = users.file.path().to_str().unwrap().to_owned();
    let broker = BrokerProcess::start(&["--config", &config]);
    let addr = broker.addr();
    seed(&addr).await;
    let token = &users.app_token;
    let produce = |mq: &str, token: Option<&str>| {
        let token = token.map_or(String::new(), |t| format!("\r\ntoken: {t}"));
        format!("GET / HTTP/1.1\r\ncmd: produce\r\nmq: {mq}\r\nid: 1{token}")
    };
    assert_eq!(
        zbus_once(&addr, &produce("orders", Some(token)), "x")
            .await
            .0,
        200
    );
    let (status, message) = zbus_once(&addr, &produce("payments", Some(token)), "x").await;
    assert_eq!(status, 403, "{message}");
    assert!(message.contains("user \"app\""), "{message}");
    assert_eq!(zbus_once(&addr, &produce("orders", None), "x").await.0, 401);
    assert_eq!(
        zbus_once(&addr, &produce("orders", Some("qbus_wrong")), "x")
            .await
            .0,
        401
    );
    // A state-changing cmd in the URL of a GET is refused, even with a good token.
    let in_url = format!("GET /?cmd=produce&mq=orders&id=2 HTTP/1.1\r\ntoken: {token}");
    let (status, message) = zbus_once(&addr, &in_url, "x").await;
    assert_eq!(status, 403, "{message}");
    let root = qbus_client::Broker::connect(&format!("root:root-pw@{addr}"))
        .await
        .unwrap();
    assert_eq!(root.query_mq("orders").await.unwrap().depth(), 1);
    assert_eq!(root.query_mq("payments").await.unwrap().depth(), 3);
}
