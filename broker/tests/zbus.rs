//! The zbus 7.x protocol on the broker port, against the real `qbus-broker` binary. The
//! client here is written for these tests from the protocol: it sends the byte shapes the
//! zbus 7.2.2 Python and Node.js clients send (`GET / HTTP/1.1`, lowercase headers, a
//! `content-length`, an `id` per request) and reads replies the way they do, by `id`.
//!
//! `real_python_client_round_trip` also runs the zbus Python client itself when
//! `ZBUS_PYTHON_CLIENT` names its directory (`api/python` of zbus `legacy-7.2.2`); nothing
//! is fetched.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use hyper::Method;
use qbus_rpc::{Encoding, ErrorCode, MqInvoker, MqRpcService, RpcClient, RpcError};
use qbus_testkit::greeter;
use qbus_testkit::http::once;
use serde_json::json;
use support::BrokerProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on every wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

/// A zbus message as the test reads it.
#[derive(Debug, Clone)]
struct Msg {
    status: Option<u16>,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Msg {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One zbus connection.
struct Conn {
    stream: TcpStream,
    read: Vec<u8>,
}

impl Conn {
    async fn open(addr: &str) -> Conn {
        Conn {
            stream: TcpStream::connect(addr).await.unwrap(),
            read: Vec::new(),
        }
    }

    /// Sends a request as the Python client encodes it: request line, headers,
    /// `content-length`, blank line, body.
    async fn send(&mut self, headers: &[(&str, &str)], body: &str) {
        let mut wire = String::from("GET / HTTP/1.1\r\n");
        for (name, value) in headers {
            wire.push_str(&format!("{name}: {value}\r\n"));
        }
        wire.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
        self.stream.write_all(wire.as_bytes()).await.unwrap();
    }

    /// The next message, or `None` when the broker closed the connection.
    async fn next(&mut self) -> Option<Msg> {
        tokio::time::timeout(WAIT, self.next_unbounded())
            .await
            .expect("a zbus message within the wait")
    }

    async fn next_unbounded(&mut self) -> Option<Msg> {
        loop {
            if let Some(end) = self.read.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(self.read[..end].to_vec()).unwrap();
                let mut lines = head.split("\r\n");
                let start = lines.next().unwrap();
                let status = start
                    .starts_with("HTTP/")
                    .then(|| start.split(' ').nth(1).unwrap().parse().unwrap());
                let headers: HashMap<String, String> = lines
                    .map(|l| {
                        let (k, v) = l.split_once(':').unwrap();
                        (k.trim().to_owned(), v.trim().to_owned())
                    })
                    .collect();
                let len: usize = headers["content-length"].parse().unwrap();
                if self.read.len() >= end + 4 + len {
                    let body = self.read[end + 4..end + 4 + len].to_vec();
                    self.read.drain(..end + 4 + len);
                    return Some(Msg {
                        status,
                        headers,
                        body,
                    });
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            self.read.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends a request and returns its reply, matched by `id`.
    async fn invoke(&mut self, headers: &[(&str, &str)], body: &str) -> Msg {
        let id = headers.iter().find(|(k, _)| *k == "id").unwrap().1;
        self.send(headers, body).await;
        let reply = self.next().await.expect("a reply");
        assert_eq!(reply.get("id"), Some(id), "{reply:?}");
        reply
    }
}

/// `create_mq` as the Python `Consumer.createMQ` sends it.
async fn create(conn: &mut Conn, mq: &str, mode: &str) {
    let id = format!("create-{mq}");
    let headers = [
        ("cmd", "create_mq"),
        ("mq_name", mq),
        ("mq_mode", mode),
        ("id", &id),
    ];
    let reply = conn.invoke(&headers, "").await;
    assert_eq!(reply.status, Some(200), "{}", reply.text());
}

/// Waits until `mq` counts `n` consumers in `query_mq`, polling for at most [`WAIT`].
async fn until_consumers(conn: &mut Conn, mq: &str, n: u64) {
    let give_up = std::time::Instant::now() + WAIT;
    loop {
        let reply = conn
            .invoke(&[("cmd", "query_mq"), ("mq", mq), ("id", "q")], "")
            .await;
        let info: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        if info["consumerCount"].as_u64().unwrap() >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < give_up,
            "{n} consumers of {mq}: {info}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_consume_does_not_hold_back_a_produce_and_the_whole_message_returns() {
    let broker = BrokerProcess::start(&[]);
    let mut conn = Conn::open(&broker.addr()).await;
    let missing = conn
        .invoke(&[("cmd", "consume"), ("mq", "MyMQ"), ("id", "c0")], "")
        .await;
    assert_eq!(
        (missing.status, missing.text()),
        (Some(404), "MQ(MyMQ) Not Found".into())
    );
    create(&mut conn, "MyMQ", "1").await;

    // A consume on an empty MQ waits; a produce sent after it is answered first.
    conn.send(&[("cmd", "consume"), ("mq", "MyMQ"), ("id", "c1")], "")
        .await;
    let produce = [
        ("cmd", "produce"),
        ("mq", "MyMQ"),
        ("id", "p1"),
        ("topic", "news"),
        ("content-type", "text/plain"),
        ("encoding", "utf8"),
        ("app_header", "kept"),
        ("token", "secret"),
    ];
    conn.send(&produce, "hello").await;
    let first = conn.next().await.unwrap();
    let second = conn.next().await.unwrap();
    let (receipt, delivered) = if first.get("id") == Some("p1") {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(receipt.status, Some(200));
    assert!(
        receipt.text().parse::<u64>().is_ok(),
        "zbus acks with the time"
    );
    assert_eq!(delivered.get("id"), Some("c1"));
    assert_eq!(delivered.status, Some(200));
    assert_eq!(delivered.get("rawid"), Some("p1"));
    assert_eq!(delivered.get("topic"), Some("news"));
    assert_eq!(delivered.get("content-type"), Some("text/plain"));
    assert_eq!(delivered.get("encoding"), Some("utf8"));
    assert_eq!(delivered.get("app_header"), Some("kept"));
    assert_eq!(delivered.get("mq"), Some("MyMQ"));
    assert_eq!(delivered.get("token"), None, "credentials are never stored");
    assert!(delivered.get("sender").is_some_and(|s| !s.is_empty()));
    assert_eq!(delivered.text(), "hello");

    // Delivery was the ack: nothing is left.
    let info = conn
        .invoke(&[("cmd", "query_mq"), ("mq", "MyMQ"), ("id", "q")], "")
        .await;
    let info: serde_json::Value = serde_json::from_slice(&info.body).unwrap();
    assert_eq!(info["unconsumedMsgCount"], 0, "{info}");

    let removed = conn
        .invoke(
            &[("cmd", "remove_mq"), ("mq_name", "MyMQ"), ("id", "r")],
            "",
        )
        .await;
    assert_eq!(removed.status, Some(200));
    let gone = conn
        .invoke(&[("cmd", "query_mq"), ("mq", "MyMQ"), ("id", "q2")], "")
        .await;
    assert_eq!(gone.status, Some(404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_consume_replaces_a_waiting_one_as_in_zbus() {
    // The Python client re-sends its consume with a new id after its own 10 s timeout;
    // the message must go to the new id, not to the abandoned one.
    let broker = BrokerProcess::start(&[]);
    let mut conn = Conn::open(&broker.addr()).await;
    create(&mut conn, "jobs", "1").await;
    conn.send(&[("cmd", "consume"), ("mq", "jobs"), ("id", "old")], "")
        .await;
    conn.send(&[("cmd", "consume"), ("mq", "jobs"), ("id", "new")], "")
        .await;
    // Requests are read in order: once this is answered, the newer consume is in place.
    let seen = conn
        .invoke(&[("cmd", "query_mq"), ("mq", "jobs"), ("id", "q")], "")
        .await;
    assert_eq!(seen.status, Some(200));
    let mut producer = Conn::open(&broker.addr()).await;
    let sent = producer
        .invoke(&[("cmd", "produce"), ("mq", "jobs"), ("id", "p")], "job")
        .await;
    assert_eq!(sent.status, Some(200));
    let delivered = conn.next().await.unwrap();
    assert_eq!(
        (delivered.get("id"), delivered.text()),
        (Some("new"), "job".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_get_no_reply_and_idle_connections_last_the_zbus_limit() {
    // The HTTP idle limit is 1 s and the zbus one 3 s: a zbus connection idle for longer
    // than the first stays open, and closes after the second. (Idling is what is tested,
    // so these waits are sleeps.)
    let broker = BrokerProcess::start(&["--http-timeout", "1s", "--zbus-idle", "3s"]);
    let mut conn = Conn::open(&broker.addr()).await;
    conn.send(&[("cmd", "heartbeat"), ("id", "h")], "").await;
    let reply = conn
        .invoke(&[("cmd", "query_mq"), ("id", "after-heartbeat")], "")
        .await;
    assert_eq!(
        reply.status,
        Some(200),
        "the heartbeat got no reply of its own"
    );
    let info: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert!(info["mqTable"].is_object(), "{info}");
    // Counted as a zbus connection, not as HTTP.
    let stats = once(&broker.addr(), Method::GET, "/api/stats", &[], "").await;
    let stats: serde_json::Value = serde_json::from_str(&stats.text()).unwrap();
    assert_eq!(stats["broker"]["connections"]["zbus"], 1, "{stats}");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let still = conn
        .invoke(&[("cmd", "query_mq"), ("id", "still-open")], "")
        .await;
    assert_eq!(still.status, Some(200));

    let closed_at = std::time::Instant::now();
    assert!(conn.next().await.is_none(), "closed after zbus-idle");
    let idle = closed_at.elapsed();
    assert!(idle >= Duration::from_millis(2500), "closed after {idle:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_fans_out_to_every_subscriber_of_the_topic() {
    let broker = BrokerProcess::start(&[]);
    let addr = broker.addr();
    let mut admin = Conn::open(&addr).await;
    create(&mut admin, "MyPubSub", "2").await;
    let mut subscribers = Vec::new();
    for (i, topic) in ["zbus", "zbus,other", "other"].into_iter().enumerate() {
        let mut sub = Conn::open(&addr).await;
        let id = format!("s{i}");
        let headers = [
            ("cmd", "consume"),
            ("mq", "MyPubSub"),
            ("topic", topic),
            ("id", &id),
        ];
        sub.send(&headers, "").await;
        subscribers.push(sub);
    }
    until_consumers(&mut admin, "MyPubSub", 3).await;
    for (topic, body) in [("zbus", "to zbus"), ("other", "to other")] {
        let headers = [
            ("cmd", "produce"),
            ("mq", "MyPubSub"),
            ("topic", topic),
            ("id", "pub"),
        ];
        assert_eq!(admin.invoke(&headers, body).await.status, Some(200));
    }
    let got: Vec<String> = futures_util::future::join_all(
        subscribers
            .iter_mut()
            .map(|sub| async { sub.next().await.unwrap().text() }),
    )
    .await;
    assert_eq!(got, ["to zbus", "to zbus", "to other"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_returns_the_reply_to_the_caller_and_a_lone_rpc_mq_is_service_down() {
    let broker = BrokerProcess::start(&[]);
    let addr = broker.addr();
    let mut caller = Conn::open(&addr).await;
    create(&mut caller, "MyRpc", "8").await;
    let request = r#"{"module": "", "method": "plus", "params": [1, 2]}"#;
    let call = [
        ("cmd", "produce"),
        ("mq", "MyRpc"),
        ("ack", "0"),
        ("content-type", "application/json"),
        ("id", "call-1"),
    ];
    let down = caller.invoke(&call, request).await;
    assert_eq!(
        (down.status, down.text()),
        (Some(404), "MQ(MyRpc) Service Down".into())
    );

    // The service: consume, then route the answer to the request's sender, as the Python
    // `WorkerThread` and the JS `RpcProcessor` do.
    let mut service = Conn::open(&addr).await;
    service
        .send(&[("cmd", "consume"), ("mq", "MyRpc"), ("id", "s1")], "")
        .await;
    until_consumers(&mut caller, "MyRpc", 1).await;
    caller.send(&call, request).await;
    let got = service.next().await.unwrap();
    assert_eq!(got.text(), request);
    let sender = got.get("sender").unwrap().to_owned();
    let rawid = got.get("rawid").unwrap().to_owned();
    let route = [
        ("cmd", "route"),
        ("recver", &sender),
        ("id", &rawid),
        ("reply_code", "200"),
        ("ack", "0"),
        ("content-type", "application/json"),
    ];
    service.send(&route, r#"{"result": 3}"#).await;
    let reply = caller.next().await.unwrap();
    assert_eq!(reply.get("id"), Some("call-1"));
    assert_eq!(reply.status, Some(200));
    assert_eq!(reply.get("content-type"), Some("application/json"));
    assert_eq!(reply.text(), r#"{"result": 3}"#);
}

/// A zbus RPC call as the Python `Rpc` sends it: a one-way produce with a JSON body.
fn rpc_call<'a>(mq: &'a str, id: &'a str) -> [(&'a str, &'a str); 5] {
    [
        ("cmd", "produce"),
        ("mq", mq),
        ("ack", "0"),
        ("content-type", "application/json"),
        ("id", id),
    ]
}

fn json(msg: &Msg) -> serde_json::Value {
    assert_eq!(msg.get("content-type"), Some("application/json"), "{msg:?}");
    serde_json::from_slice(&msg.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zbus_caller_calls_a_rust_service_and_reads_zbus_envelopes() {
    let broker = BrokerProcess::start(&[]);
    let client = qbus_client::Broker::connect(&broker.addr()).await.unwrap();
    let (processor, _probe) = greeter::processor("zbus");
    let _service = MqRpcService::start(&client, "GreeterRpc", processor)
        .await
        .unwrap();
    let mut caller = Conn::open(&broker.addr()).await;

    let hello = r#"{"module": "Greeter", "method": "hello", "params": ["zbus"]}"#;
    let ok = caller.invoke(&rpc_call("GreeterRpc", "c1"), hello).await;
    assert_eq!(ok.status, Some(200));
    assert_eq!(json(&ok), json!({"result": "Hello, zbus!"}));

    // The method's own error is a result, in zbus as in qbus.
    let check = r#"{"module": "Greeter", "method": "check", "params": [""]}"#;
    let rejected = caller.invoke(&rpc_call("GreeterRpc", "c2"), check).await;
    assert_eq!(rejected.status, Some(200));
    assert_eq!(
        json(&rejected),
        json!({"result": {"Err": {"Rejected": {"reason": "empty name"}}}})
    );

    // A framework error is a failed status with zbus's `error` and `stackTrace`; the JS
    // `RpcInvoker` sends its body without a content type.
    let bye = r#"{"module": "Greeter", "method": "bye", "params": []}"#;
    let js = [
        ("cmd", "produce"),
        ("mq", "GreeterRpc"),
        ("ack", "false"),
        ("id", "c3"),
    ];
    let missing = caller.invoke(&js, bye).await;
    assert_eq!(missing.status, Some(404), "{}", missing.text());
    let body = json(&missing);
    let (error, trace) = (
        body["error"].as_str().unwrap(),
        body["stackTrace"].as_str().unwrap(),
    );
    assert!(error.contains("bye"), "{body}");
    assert!(
        trace.starts_with("404 not found: ") && trace.contains("bye"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_invoker_calls_a_zbus_service_and_reads_qbus_envelopes() {
    let broker = BrokerProcess::start(&[]);
    let addr = broker.addr();
    let mut admin = Conn::open(&addr).await;
    create(&mut admin, "PyRpc", "1").await;
    let client = qbus_client::Broker::connect(&addr).await.unwrap();
    let rpc = RpcClient::new(MqInvoker::new(client, "PyRpc"), "").encoding(Encoding::Json);
    let mut service = Conn::open(&addr).await;

    // Serves `call` (made once the service consumes) as the Python `WorkerThread` does:
    // consume, then route `answer` to the request's `sender` with `reply_code`. Returns the
    // request the service got and the call's outcome.
    async fn serve_one<T: Send + 'static>(
        service: &mut Conn,
        admin: &mut Conn,
        call: impl std::future::Future<Output = T> + Send + 'static,
        reply_code: &str,
        answer: &str,
    ) -> (serde_json::Value, T) {
        service
            .send(&[("cmd", "consume"), ("mq", "PyRpc"), ("id", "s")], "")
            .await;
        until_consumers(admin, "PyRpc", 1).await;
        let call = tokio::spawn(call);
        let got = service.next().await.unwrap();
        assert_eq!(got.get("id"), Some("s"));
        let sender = got.get("sender").unwrap().to_owned();
        let rawid = got.get("rawid").unwrap().to_owned();
        let route = [
            ("cmd", "route"),
            ("recver", &sender),
            ("id", &rawid),
            ("reply_code", reply_code),
            ("ack", "0"),
            ("content-type", "application/json"),
        ];
        service.send(&route, answer).await;
        let outcome = tokio::time::timeout(WAIT, call).await.unwrap().unwrap();
        (json(&got), outcome)
    }

    let plus = rpc.call::<_, i64>("plus", &(1, 2));
    let (request, sum) = serve_one(&mut service, &mut admin, plus, "200", r#"{"result": 3}"#).await;
    assert_eq!(request["module"], "");
    assert_eq!(request["method"], "plus");
    assert_eq!(request["params"], json!([1, 2]));
    assert_eq!(sum.unwrap(), 3);

    // The Python service's error: status 400, `error` and `stack_trace`.
    let python = r#"{"error": ":bye method not found", "stack_trace": ":bye method not found"}"#;
    let bye = rpc.call::<_, i64>("bye", &());
    match serve_one(&mut service, &mut admin, bye, "400", python)
        .await
        .1
    {
        Err(RpcError::Remote(e)) => {
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert_eq!(e.message, ":bye method not found");
        }
        other => panic!("{other:?}"),
    }

    // The JS `RpcProcessor`'s error: status 200 with an `error`.
    let js = r#"{"error": "method(:bye) not found"}"#;
    let bye = rpc.call::<_, i64>("bye", &());
    match serve_one(&mut service, &mut admin, bye, "200", js).await.1 {
        Err(RpcError::Remote(e)) => {
            assert_eq!(e.code, ErrorCode::Internal);
            assert_eq!(e.message, "method(:bye) not found");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_plain_http_still_works() {
    let broker = BrokerProcess::start(&["--max-frame", "64KiB"]);
    let addr = broker.addr();
    let mut conn = Conn::open(&addr).await;
    let unknown = conn.invoke(&[("cmd", "explode"), ("id", "x")], "").await;
    assert_eq!(
        (unknown.status, unknown.text()),
        (Some(400), "Bad format: command(explode) not support".into())
    );
    let missing = conn
        .invoke(&[("cmd", "produce"), ("mq", "ghost"), ("id", "p")], "x")
        .await;
    assert_eq!(
        (missing.status, missing.text()),
        (Some(404), "MQ(ghost) Not Found".into())
    );
    let nameless = conn.invoke(&[("cmd", "create_mq"), ("id", "c")], "").await;
    assert_eq!(
        (nameless.status, nameless.text()),
        (Some(400), "Missing mq_name".into())
    );

    // An announced body over the limit is refused before it is read, then the connection
    // closes: what follows cannot be framed.
    conn.stream
        .write_all(b"GET / HTTP/1.1\r\ncmd: produce\r\nmq: a\r\ncontent-length: 999999999\r\n\r\n")
        .await
        .unwrap();
    let refused = conn.next().await.unwrap();
    assert_eq!(refused.status, Some(413), "{}", refused.text());
    assert!(refused.text().contains("max-frame"), "{}", refused.text());
    assert!(conn.next().await.is_none());

    // The same port still serves the plain HTTP API and the binary protocol.
    let stats = once(&addr, Method::GET, "/api/stats", &[], Bytes::new()).await;
    assert_eq!(stats.status, 200);
    let client = broker.client().await;
    assert!(client.list_mqs().await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_python_client_round_trip() {
    let Ok(client_dir) = std::env::var("ZBUS_PYTHON_CLIENT") else {
        eprintln!(
            "skipped: set ZBUS_PYTHON_CLIENT to zbus 7.2.2's api/python directory (and \
             ZBUS_PYTHON to a Python 2.7 interpreter, default python2) to run it"
        );
        return;
    };
    let python = std::env::var("ZBUS_PYTHON").unwrap_or_else(|_| "python2".into());
    let broker = BrokerProcess::start(&[]);
    let script = format!(
        r#"
import threading, time
from zbus import SingleBroker, Producer, Consumer, Message
broker = SingleBroker(host='127.0.0.1', port={port})
consumer = Consumer(broker=broker, mq='PyMQ')
msg = consumer.recv(1)  # 404, creates the MQ, then waits 1 s for nothing
assert msg is None, msg
def produce():
    time.sleep(0.5)  # while the next consume waits
    p = Producer(broker=broker, mq='PyMQ')
    m = Message()
    m.set_body('hello from python')
    m.set_head('app', 'x')
    assert p.send(m).is_status200()
threading.Thread(target=produce).start()
got = consumer.recv(5)
assert got.body == 'hello from python', got
assert got.get_head('app') == 'x', got
print('ok')
"#,
        port = broker.port()
    );
    let out = tokio::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .env("PYTHONPATH", client_dir)
        .output();
    let out = tokio::time::timeout(WAIT, out).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ok"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_and_ttl_headers_are_kept_in_the_log() {
    let broker = BrokerProcess::start(&[]);
    let mut conn = Conn::open(&broker.addr()).await;
    create(&mut conn, "later", "1").await;
    let sent = std::time::Instant::now();
    let headers = [
        ("cmd", "produce"),
        ("mq", "later"),
        ("id", "p"),
        ("delay", "700"),
        ("ttl", "600000"),
    ];
    assert_eq!(conn.invoke(&headers, "soon").await.status, Some(200));
    let client = broker.client().await;
    qbus_testkit::wait_for_async("the timer to note it", WAIT, || async {
        (client.query_mq("later").await.unwrap().delayed == 1).then_some(())
    })
    .await;
    let mut consumer = client.consumer("later").subscribe().await.unwrap();
    let delivery = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut consumer))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        sent.elapsed() >= Duration::from_millis(700),
        "not before its time"
    );
    assert_eq!(&delivery.body[..], b"soon");
    assert!(delivery.expires_at.is_some() && delivery.delayed_from == Some(0));
}

/// Produces `body` with `key` in `group`, and returns the reply's status.
async fn produce_keyed(conn: &mut Conn, id: &str, key: &str, group: &str, body: &str) -> u16 {
    let headers = [
        ("cmd", "produce"),
        ("mq", "Keyed"),
        ("id", id),
        ("key", key),
        ("key_group", group),
    ];
    conn.invoke(&headers, body).await.status.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_refuse_duplicates_until_removed_and_survive_a_kill() {
    let mut broker = BrokerProcess::start(&[]);
    let mut conn = Conn::open(&broker.addr()).await;
    create(&mut conn, "Keyed", "1").await;

    // A produce adds its key; a second one with the same key in the same group is 406.
    assert_eq!(
        produce_keyed(&mut conn, "p1", "order-1", "orders", "a").await,
        200
    );
    assert_eq!(
        produce_keyed(&mut conn, "p2", "order-1", "orders", "b").await,
        406
    );
    assert_eq!(
        produce_keyed(&mut conn, "p3", "order-1", "other", "c").await,
        200
    );
    // add_key answers how many it added.
    let add = [
        ("cmd", "add_key"),
        ("mq", "Keyed"),
        ("id", "a1"),
        ("key", "order-2"),
        ("key_group", "orders"),
    ];
    let added = conn.invoke(&add, "").await;
    assert_eq!((added.status, added.text()), (Some(200), "1".into()));
    let again = conn.invoke(&add, "").await;
    assert_eq!(again.text(), "0", "present already");
    assert_eq!(
        produce_keyed(&mut conn, "p4", "order-2", "orders", "d").await,
        406
    );

    // The keys are durable: a broker killed -9 still refuses them.
    broker.kill9();
    broker.restart();
    let mut conn = Conn::open(&broker.addr()).await;
    assert_eq!(
        produce_keyed(&mut conn, "p5", "order-1", "orders", "e").await,
        406
    );
    assert_eq!(
        produce_keyed(&mut conn, "p6", "order-2", "orders", "f").await,
        406
    );

    // remove_key of one key, then of a whole group.
    let remove = [
        ("cmd", "remove_key"),
        ("mq", "Keyed"),
        ("id", "r1"),
        ("key", "order-1"),
        ("key_group", "orders"),
    ];
    assert_eq!(conn.invoke(&remove, "").await.text(), "1");
    assert_eq!(
        produce_keyed(&mut conn, "p7", "order-1", "orders", "g").await,
        200
    );
    let group = [
        ("cmd", "remove_key"),
        ("mq", "Keyed"),
        ("id", "r2"),
        ("key_group", "orders"),
    ];
    assert_eq!(
        conn.invoke(&group, "").await.text(),
        "2",
        "order-1 and order-2"
    );
    assert_eq!(
        produce_keyed(&mut conn, "p8", "order-2", "orders", "h").await,
        200
    );
    assert_eq!(
        produce_keyed(&mut conn, "p9", "order-1", "other", "i").await,
        406
    );

    // Exactly the accepted messages were stored, in order.
    let mut bodies = Vec::new();
    for n in 0..4 {
        let id = format!("c{n}");
        let msg = conn
            .invoke(&[("cmd", "consume"), ("mq", "Keyed"), ("id", &id)], "")
            .await;
        bodies.push(msg.text());
    }
    assert_eq!(bodies, ["a", "c", "g", "h"]);

    let bad = conn
        .invoke(&[("cmd", "add_key"), ("mq", "Keyed"), ("id", "a2")], "")
        .await;
    assert_eq!(bad.status, Some(400), "{}", bad.text());
}
