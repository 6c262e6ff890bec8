//! DirectRPC over TLS: an `RpcServer` in this process with a certificate from a CA made in
//! the test, called by a `DirectInvoker` that trusts that CA, and by an `HaInvoker` that
//! found the server through a TLS tracker; a caller in plain text, or trusting another CA,
//! is refused with a reason.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::time::Duration;

use qbus_client::ha::HaOptions;
use qbus_client::tls::ServerTls;
use qbus_client::{Broker, ConnectionOptions};
use qbus_rpc::{DirectInvoker, HaInvoker, RpcClient, RpcError, RpcServer, RpcServerOptions};
use qbus_testkit::tls::TestCa;
use support::greeter::{self, GreeterClient};
use support::{wait_for, TrackerProcess};

async fn tls_server(ca: &TestCa, options: RpcServerOptions) -> RpcServer {
    let issued = ca.issue("rpc");
    let tls = ServerTls::from_pem_files(&issued.cert, &issued.key, None).unwrap();
    let (processor, _) = greeter::processor("tls");
    RpcServer::bind_with("127.0.0.1:0", processor, options.with_tls(tls))
        .await
        .unwrap()
}

fn greeter(invoker: impl qbus_rpc::Invoker) -> GreeterClient {
    GreeterClient::from_rpc(RpcClient::new(invoker, "Greeter"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_calls_over_tls_and_refusals() {
    let ca = TestCa::new("qbus test CA");
    let server = tls_server(&ca, RpcServerOptions::default()).await;
    let addr = server.local_addr().to_string();
    let options = ConnectionOptions::default();
    let trusted = DirectInvoker::with_tls(&addr, options.clone(), Some(ca.client_tls()));
    let greeting = greeter(trusted).hello("tls".into()).await.unwrap();
    assert_eq!(greeting, "Hello, tls!");

    let stranger = TestCa::new("another CA");
    let untrusted = DirectInvoker::with_tls(&addr, options.clone(), Some(stranger.client_tls()));
    let err = greeter(untrusted).hello("x".into()).await.unwrap_err();
    assert!(
        matches!(&err, RpcError::Unreachable { reason, .. } if reason.contains("UnknownIssuer")),
        "{err}"
    );
    let plain = DirectInvoker::with_options(&addr, options);
    let err = greeter(plain).hello("x".into()).await.unwrap_err();
    assert!(err.to_string().contains("speaks TLS only"), "{err}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ha_invoker_reaches_tls_servers_through_a_tls_tracker() {
    let ca = TestCa::new("qbus test CA");
    let tracker_args = ca.issue("tracker").server_args();
    let tracker_args: Vec<&str> = tracker_args.iter().map(String::as_str).collect();
    let tracker = TrackerProcess::start_with(Duration::ZERO, &tracker_args);
    let options = RpcServerOptions::default()
        .with_trackers([tracker.addr()])
        .with_tracker_tls(ca.client_tls());
    let server = tls_server(&ca, options).await;
    let url = format!("tracker+tls://{}", tracker.addr());
    let cluster = Broker::connect_ha(&url, HaOptions::default().with_tls(ca.client_tls()))
        .await
        .unwrap();
    let invoker = HaInvoker::from_broker(cluster, ConnectionOptions::default()).unwrap();
    let listed = wait_for("the server at the tracker", Duration::from_secs(10), || {
        let servers = invoker.servers("Greeter");
        (!servers.is_empty()).then_some(servers)
    })
    .await;
    assert_eq!(listed, [server.local_addr().to_string()]);
    let greeting = greeter(invoker).hello("ha".into()).await.unwrap();
    assert_eq!(greeting, "Hello, ha!");
    server.shutdown().await;
}
