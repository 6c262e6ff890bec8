//! MQ-RPC: calls through a broker MQ, to an `MqRpcService` in this process, over a real
//! `qbus-broker` process and over the embedded broker.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qbus_broker::{Config, EmbeddedBroker};
use qbus_client::Broker;
use qbus_rpc::{Invoker, MqInvoker, MqRpcService, MqServiceOptions, RpcClient, RpcError};
use serde_json::json;
use support::greeter::{self, GreeterClient, Probe};
use support::{plain, scenarios, wait_for_async, BrokerProcess, KillOnDrop};

const MQ: &str = "greeter-rpc";

/// A service on `service_broker` and an invoker on `caller_broker` (separate connections).
async fn serve(
    service_broker: &Broker,
    caller_broker: Broker,
) -> (MqRpcService, Arc<dyn Invoker>, Probe) {
    let (processor, probe) = greeter::processor("mq");
    let service = MqRpcService::start(service_broker, MQ, processor)
        .await
        .unwrap();
    (service, Arc::new(MqInvoker::new(caller_broker, MQ)), probe)
}

struct Single {
    broker: BrokerProcess,
    _service: MqRpcService,
    invoker: Arc<dyn Invoker>,
    probe: Probe,
}

async fn single() -> Single {
    let broker = BrokerProcess::start(&[]);
    let (service, invoker, probe) = serve(
        &Broker::connect(&broker.addr()).await.unwrap(),
        Broker::connect(&broker.addr()).await.unwrap(),
    )
    .await;
    Single {
        broker,
        _service: service,
        invoker,
        probe,
    }
}

struct Embedded {
    _broker: EmbeddedBroker,
    _service: MqRpcService,
    invoker: Arc<dyn Invoker>,
    probe: Probe,
    _dir: tempfile::TempDir,
}

async fn embedded() -> Embedded {
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start(Config::with_store(dir.path()))
        .await
        .unwrap();
    let (service, invoker, probe) = serve(&broker.broker(), broker.broker()).await;
    Embedded {
        _broker: broker,
        _service: service,
        invoker,
        probe,
        _dir: dir,
    }
}

scenarios::scenarios_over!(single: typed_and_dynamic, application_errors, unknown_method_and_bad_params, concurrent_calls);
scenarios::scenarios_over!(embedded: typed_and_dynamic, application_errors, unknown_method_and_bad_params, concurrent_calls);

/// Nobody consuming the MQ (or no MQ at all) fails a call at once, not at its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_responders_fail_fast() {
    let (process, broker) = BrokerProcess::with_idle_mq("idle").await;
    for mq in ["idle", "missing"] {
        let client = RpcClient::new(MqInvoker::new(broker.clone(), mq), "Greeter");
        let started = Instant::now();
        match client.call::<_, String>("hello", &("x",)).await {
            Err(RpcError::NoResponders { target, reason }) => {
                assert!(target.contains(mq), "{target}");
                assert!(!reason.is_empty());
            }
            other => panic!("expected no responders, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{mq}: took {:?}",
            started.elapsed()
        );
    }
    // A service shut down while its connection stays open (other users of the broker
    // handle keep it) stops counting once its last fetch ends; one whose connection closes
    // takes its responders with it at once.
    for close_connection in [false, true] {
        let service_broker = Broker::connect(&process.addr()).await.unwrap();
        let (processor, _) = greeter::processor("brief");
        let service = MqRpcService::start(&service_broker, "idle", processor)
            .await
            .unwrap();
        let client = RpcClient::new(MqInvoker::new(broker.clone(), "idle"), "Greeter");
        assert_eq!(
            client.call::<_, String>("hello", &("x",)).await.unwrap(),
            "Hello, x!"
        );
        service.shutdown().await;
        let kept_open = (!close_connection).then_some(service_broker);
        // Until the broker sees the service go, a call may still be stored: keep those
        // attempts short.
        let client = client.timeout(Duration::from_millis(200));
        let what = format!("no responders (connection closed: {close_connection})");
        wait_for_async(&what, Duration::from_secs(10), || async {
            match client.call::<_, String>("hello", &("x",)).await {
                Err(RpcError::NoResponders { .. }) => Some(()),
                _ => None,
            }
        })
        .await;
        drop(kept_open);
    }
}

/// A caller process killed while its call is pending: the broker frees its reply entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_caller_frees_its_pending_entry() {
    let fixture = single().await;
    let broker = Broker::connect(&fixture.broker.addr()).await.unwrap();
    assert_eq!(broker.route_stats(MQ).await.unwrap().pending, 0);
    let caller = Command::new(support::binary("qbus"))
        .args([
            "--broker",
            &fixture.broker.addr(),
            "call",
            "--mq",
            MQ,
            "--timeout",
            "60",
        ])
        .args(["Greeter.slow", "[60000]"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut caller = KillOnDrop(caller);
    fixture.probe.until_started(1).await;
    assert_eq!(broker.route_stats(MQ).await.unwrap().pending, 1);
    caller.0.kill().unwrap();
    caller.0.wait().unwrap();
    let stats = wait_for_async(
        "the killed caller's entry to be freed",
        Duration::from_secs(10),
        || async {
            let stats = broker.route_stats(MQ).await.unwrap();
            (stats.pending == 0).then_some(stats)
        },
    )
    .await;
    assert_eq!(stats.abandoned, 1);
}

/// A JSON call sent raw to the broker gets the responder's JSON reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_json_client_gets_json_replies() {
    let fixture = single().await;
    let addr = fixture.broker.addr();
    let request = json!({"module": "Greeter", "method": "echo", "params": [3, "raw"]});
    let (header, body) =
        tokio::task::spawn_blocking(move || plain::json_call(&addr, Some(MQ), &request))
            .await
            .unwrap();
    plain::assert_json_reply(&header);
    let reply: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(reply, json!({"result": [3, "raw"]}));
}

/// Calls answered through the broker leave no entry behind, and are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_replies_leave_the_table_empty() {
    let fixture = single().await;
    let greeter =
        GreeterClient::from_rpc(RpcClient::from_shared(fixture.invoker.clone(), "Greeter"));
    for i in 0..10 {
        assert_eq!(
            greeter.hello(format!("{i}")).await.unwrap(),
            format!("Hello, {i}!")
        );
    }
    let broker = Broker::connect(&fixture.broker.addr()).await.unwrap();
    let stats = broker.route_stats(MQ).await.unwrap();
    assert_eq!((stats.pending, stats.routed), (0, 10));
}

/// The service runs at most its concurrency limit of calls at once; the rest wait their
/// turn in the MQ and are all answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_limits_its_concurrency() {
    let process = BrokerProcess::start(&[]);
    let broker = Broker::connect(&process.addr()).await.unwrap();
    let (processor, probe) = greeter::processor("limited");
    let options = MqServiceOptions::default().with_concurrency(2);
    let _service = MqRpcService::start_with(&broker, MQ, processor, options)
        .await
        .unwrap();
    let greeter = GreeterClient::new(MqInvoker::new(broker, MQ));
    let calls = (0..6).map(|_| greeter.slow(100));
    let started = Instant::now();
    for reply in futures_util::future::join_all(calls).await {
        assert_eq!(reply.unwrap(), 100);
    }
    assert_eq!(
        probe.most_running.load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
}
