//! DirectRPC: an `RpcServer` in this process (as an application runs it), called through a
//! `DirectInvoker` over loopback TCP.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use qbus_rpc::{DirectInvoker, Invoker, RpcClient, RpcServer};
use serde_json::json;
use support::greeter::{self, GreeterClient, Probe};
use support::{plain, scenarios};

async fn server() -> (RpcServer, Arc<dyn Invoker>, Probe) {
    let (processor, probe) = greeter::processor("direct");
    let server = RpcServer::bind("127.0.0.1:0", processor).await.unwrap();
    let invoker = DirectInvoker::new(&server.local_addr().to_string());
    (server, Arc::new(invoker), probe)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_and_dynamic() {
    let (_server, invoker, _) = server().await;
    scenarios::typed_and_dynamic(invoker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_errors() {
    let (_server, invoker, _) = server().await;
    scenarios::application_errors(invoker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_method_and_bad_params() {
    let (_server, invoker, _) = server().await;
    scenarios::unknown_method_and_bad_params(invoker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline() {
    let (_server, invoker, probe) = server().await;
    scenarios::deadline(invoker, &probe).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls() {
    let (_server, invoker, _) = server().await;
    scenarios::concurrent_calls(invoker).await;
}

/// A server that dies mid-call fails the call at once instead of leaving it hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_fails_the_call_in_flight() {
    let (server, invoker, probe) = server().await;
    let greeter = GreeterClient::from_rpc(RpcClient::from_shared(invoker, "Greeter"))
        .timeout(Duration::from_secs(15));
    let call = tokio::spawn(greeter.slow(60_000));
    probe.until_started(1).await;
    let killed = Instant::now();
    server.abort();
    scenarios::fails_disconnected(call, killed).await;
}

/// A caller in another language sends JSON with no SDK and gets JSON back, errors included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_json_client_gets_json_replies() {
    let (server, _, _) = server().await;
    let addr = server.local_addr().to_string();
    let request = json!({"module": "Greeter", "method": "hello", "params": ["plain"]});
    let (header, body) =
        tokio::task::spawn_blocking(move || plain::json_call(&addr, None, &request))
            .await
            .unwrap();
    plain::assert_json_reply(&header);
    let reply: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(reply, json!({"result": "Hello, plain!"}));

    let addr = server.local_addr().to_string();
    let (_, body) = tokio::task::spawn_blocking(move || {
        plain::json_call(
            &addr,
            None,
            &json!({"module": "Greeter", "method": "nope", "params": []}),
        )
    })
    .await
    .unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(reply["error"]["code"], json!(404), "{reply}");
}

/// Garbage instead of a request envelope gets an error reply, not silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_request_gets_an_error_reply() {
    let (server, _, _) = server().await;
    let addr = server.local_addr().to_string();
    let (header, body) = tokio::task::spawn_blocking(move || {
        plain::json_call(&addr, None, &json!(["not", "an", "envelope"]))
    })
    .await
    .unwrap();
    assert_eq!(header[2], json!(200));
    let reply: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(reply["error"]["code"], json!(400), "{reply}");
}

/// A clean shutdown lets the call in flight finish before the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_calls_in_flight() {
    let (server, invoker, probe) = server().await;
    let greeter = GreeterClient::from_rpc(RpcClient::from_shared(invoker, "Greeter"));
    let call = tokio::spawn(greeter.slow(200));
    probe.until_started(1).await;
    server.shutdown().await;
    assert_eq!(call.await.unwrap().unwrap(), 200);
}
