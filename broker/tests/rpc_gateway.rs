//! The broker's RPC gateway, `POST /rpc/{mq}`: an HTTP caller with a JSON envelope reaches
//! an `MqRpcService` through a real `qbus-broker` process, by the same reply table as a
//! binary `Call`.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use qbus_client::Broker;
use qbus_rpc::MqRpcService;
use qbus_testkit::greeter::{self, Probe};
use qbus_testkit::http::once;
use qbus_testkit::process::BrokerProcess;
use qbus_testkit::{wait_for, wait_for_async};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const MQ: &str = "greeter-rpc";
/// Bound on every HTTP exchange in these tests.
const WAIT: Duration = Duration::from_secs(20);

/// A broker process with the test `Greeter` served on [`MQ`].
struct Fixture {
    process: BrokerProcess,
    broker: Broker,
    _service: MqRpcService,
    probe: Probe,
}

async fn fixture() -> Fixture {
    let process = BrokerProcess::start(&[]);
    let broker = Broker::connect(&process.addr()).await.unwrap();
    let (processor, probe) = greeter::processor("http");
    let service = MqRpcService::start(&broker, MQ, processor).await.unwrap();
    Fixture {
        process,
        broker,
        _service: service,
        probe,
    }
}

/// One HTTP/1.1 connection to the broker port, and the task driving it (abort it to close
/// the connection).
async fn connect(addr: &str) -> (SendRequest<Full<Bytes>>, JoinHandle<()>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    (sender, task)
}

fn request(
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Request<Full<Bytes>> {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "qbus");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .unwrap()
}

/// One request on a fresh connection, the way `curl` makes it: the status and the JSON body.
async fn send(
    addr: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, Value) {
    let reply = once(
        addr,
        method,
        path,
        headers,
        Bytes::copy_from_slice(body.as_bytes()),
    )
    .await;
    let (status, body) = (reply.status, &reply.body);
    assert_eq!(
        reply
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json"),
        "{status}: {body:?}"
    );
    let json = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {body:?}"));
    (status, json)
}

async fn call(addr: &str, envelope: Value) -> (StatusCode, Value) {
    send(
        addr,
        Method::POST,
        &format!("/rpc/{MQ}"),
        &[],
        &envelope.to_string(),
    )
    .await
}

/// The error object of an error reply, after checking its code is the HTTP status.
fn error(status: StatusCode, body: &Value) -> &Value {
    let error = &body["error"];
    assert_eq!(error["code"], json!(status.as_u16()), "{body}");
    assert!(error["message"].is_string(), "{body}");
    error
}

/// Results, the method's own errors and framework errors, all as JSON; the calls go through
/// the broker's reply table like binary ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_calls_get_json_results_and_errors() {
    let fixture = fixture().await;
    let addr = fixture.process.addr();
    let hello = json!({"module": "Greeter", "method": "hello", "params": ["http"]});
    assert_eq!(
        call(&addr, hello).await,
        (StatusCode::OK, json!({"result": "Hello, http!"}))
    );
    let echo = json!({"module": "Greeter", "method": "echo", "params": [7, "x"]});
    assert_eq!(
        call(&addr, echo).await,
        (StatusCode::OK, json!({"result": [7, "x"]}))
    );
    // A method's own Err is its result, not a failed call.
    let check = json!({"module": "Greeter", "method": "check", "params": [""]});
    assert_eq!(
        call(&addr, check).await,
        (
            StatusCode::OK,
            json!({"result": {"Err": {"Rejected": {"reason": "empty name"}}}})
        )
    );

    let (status, body) = call(
        &addr,
        json!({"module": "Greeter", "method": "nope", "params": []}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let e = error(status, &body);
    assert!(
        e["message"].as_str().unwrap().contains("\"nope\""),
        "{body}"
    );
    assert_eq!(
        e["detail"],
        json!("methods: check, echo, hello, slow, whoami")
    );

    let (status, body) = call(
        &addr,
        json!({"module": "Greeter", "method": "hello", "params": [5]}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error(status, &body)["message"]
        .as_str()
        .unwrap()
        .starts_with("Greeter.hello: "));

    // Refused by the gateway itself: never stored, never routed.
    for bad in [
        "not json",
        r#"{"module": "Greeter", "params": []}"#,
        r#"{"module": "Greeter", "method": "hello"}"#,
    ] {
        let (status, body) = send(&addr, Method::POST, &format!("/rpc/{MQ}"), &[], bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(error(status, &body)["detail"].is_string(), "{body}");
    }
    let (status, body) = send(&addr, Method::GET, &format!("/rpc/{MQ}"), &[], "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    error(status, &body);
    let (status, body) = send(
        &addr,
        Method::POST,
        "/rpc/greeter-rpc?timeout=soon",
        &[],
        "{}",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    error(status, &body);

    // Five calls reached the service, each routed back through the table, none left in it.
    let stats = fixture.broker.route_stats(MQ).await.unwrap();
    assert_eq!((stats.pending, stats.routed, stats.abandoned), (0, 5, 0));
}

/// Nothing consuming the MQ, or no MQ at all: an error at once, not at the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_responders_fail_fast() {
    let (process, _broker) = BrokerProcess::with_idle_mq("idle").await;
    let envelope = json!({"module": "Greeter", "method": "hello", "params": ["x"]}).to_string();
    for (mq, expected) in [
        ("idle", StatusCode::SERVICE_UNAVAILABLE),
        ("missing", StatusCode::NOT_FOUND),
    ] {
        let started = Instant::now();
        let path = format!("/rpc/{mq}");
        let (status, body) = send(
            &process.addr(),
            Method::POST,
            &path,
            &[("timeout", "30000")],
            &envelope,
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{mq}: took {:?}",
            started.elapsed()
        );
        assert_eq!(status, expected, "{body}");
        let e = error(status, &body);
        assert!(e["message"].as_str().unwrap().contains(mq), "{body}");
        assert_eq!(
            e["detail"],
            json!("from the broker: no service ran the call")
        );
    }
}

/// The deadline bounds the wait and travels with the call, so the service stops the handler
/// too. It is the `timeout` field (ms, a query parameter or a header) if given, else the
/// envelope's `timeout_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_is_504_and_stops_the_handler() {
    let fixture = fixture().await;
    let slow = json!({"module": "Greeter", "method": "slow", "params": [60_000]});
    let with_own =
        json!({"module": "Greeter", "method": "slow", "params": [60_000], "timeout_ms": 300});
    let long_own =
        json!({"module": "Greeter", "method": "slow", "params": [60_000], "timeout_ms": 60_000});
    let path = format!("/rpc/{MQ}");
    let cases = [
        (format!("{path}?timeout=300"), None, slow),
        (path.clone(), None, with_own),
        (path.clone(), Some(("timeout", "300")), long_own),
    ];
    for (stopped, (path, header, envelope)) in (1..).zip(cases) {
        let started = Instant::now();
        let headers: Vec<_> = header.into_iter().collect();
        let (status, body) = send(
            &fixture.process.addr(),
            Method::POST,
            &path,
            &headers,
            &envelope.to_string(),
        )
        .await;
        let took = started.elapsed();
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{envelope}: {body}");
        error(status, &body);
        assert!(
            took >= Duration::from_millis(300),
            "{envelope}: answered early, after {took:?}"
        );
        assert!(
            took < Duration::from_secs(2),
            "{envelope}: answered late, after {took:?}"
        );
        let probe = fixture.probe.clone();
        wait_for(
            "the service to stop the handler",
            Duration::from_secs(5),
            || (probe.stopped() == stopped).then_some(()),
        )
        .await;
    }
    assert_eq!(fixture.probe.finished(), 0);
    let stats = fixture.broker.route_stats(MQ).await.unwrap();
    assert_eq!(stats.pending, 0);
}

/// An HTTP client that goes away mid-call frees its reply entry, counted as abandoned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_leaves_frees_its_entry() {
    let fixture = fixture().await;
    let (mut sender, connection) = connect(&fixture.process.addr()).await;
    let slow = json!({"module": "Greeter", "method": "slow", "params": [60_000]}).to_string();
    let pending = sender.send_request(request(
        Method::POST,
        &format!("/rpc/{MQ}"),
        &[("timeout", "60000")],
        &slow,
    ));
    let call = tokio::spawn(pending);
    fixture.probe.until_started(1).await;
    assert_eq!(fixture.broker.route_stats(MQ).await.unwrap().pending, 1);
    // Closing the socket is all the broker sees.
    connection.abort();
    call.abort();
    let stats = wait_for_async("the closed caller's entry to be freed", WAIT, || async {
        let stats = fixture.broker.route_stats(MQ).await.unwrap();
        (stats.pending == 0).then_some(stats)
    })
    .await;
    assert_eq!(stats.abandoned, 1);
}
