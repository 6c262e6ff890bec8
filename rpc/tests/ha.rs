//! HA: DirectRPC servers registered at a real `qbus-tracker`, called through an `HaInvoker`;
//! and MQ-RPC over an HA broker handle (a `qbus-broker` reporting to the tracker).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use qbus_client::Broker;
use qbus_rpc::{
    HaInvoker, Invoker, MqInvoker, MqRpcService, RpcClient, RpcError, RpcServer, RpcServerOptions,
};
use support::greeter::{self, GreeterClient, Probe};
use support::{broker_reporting_to, scenarios, tracker, wait_for, BrokerProcess, TrackerProcess};

const WAIT: Duration = Duration::from_secs(10);

/// An RPC server in this process, registered at `tracker`.
async fn registered(tracker: &TrackerProcess, name: &str) -> (RpcServer, Probe) {
    let (processor, probe) = greeter::processor(name);
    let options = RpcServerOptions::default().with_trackers([tracker.addr()]);
    let server = RpcServer::bind_with("127.0.0.1:0", processor, options)
        .await
        .unwrap();
    (server, probe)
}

async fn ha_invoker(tracker: &TrackerProcess, servers: usize) -> HaInvoker {
    let invoker = HaInvoker::connect(&format!("tracker://{}", tracker.addr()))
        .await
        .unwrap();
    let watching = invoker.clone();
    wait_for("the servers to register", WAIT, move || {
        (watching.servers("Greeter").len() == servers).then_some(())
    })
    .await;
    invoker
}

struct Direct {
    _tracker: TrackerProcess,
    _server: RpcServer,
    invoker: Arc<dyn Invoker>,
    probe: Probe,
}

async fn direct() -> Direct {
    let tracker = tracker();
    let (server, probe) = registered(&tracker, "only").await;
    let invoker = ha_invoker(&tracker, 1).await;
    Direct {
        _tracker: tracker,
        _server: server,
        invoker: Arc::new(invoker),
        probe,
    }
}

struct Mq {
    _tracker: TrackerProcess,
    _broker: BrokerProcess,
    _service: MqRpcService,
    invoker: Arc<dyn Invoker>,
    probe: Probe,
}

async fn mq() -> Mq {
    let tracker = tracker();
    let broker = broker_reporting_to(&tracker);
    let cluster = format!("tracker://{}", tracker.addr());
    let service_side = Broker::connect(&cluster).await.unwrap();
    let (processor, probe) = greeter::processor("mq");
    // The MQ is created through the HA handle; the trackers learn of it from the broker.
    let service = MqRpcService::start(&service_side, "greeter-rpc", processor)
        .await
        .unwrap();
    let caller_side = Broker::connect(&cluster).await.unwrap();
    let watching = caller_side.clone();
    wait_for("the MQ to reach the topology", WAIT, move || {
        let topology = watching.topology()?;
        (!topology.holders("greeter-rpc").is_empty()).then_some(())
    })
    .await;
    Mq {
        _tracker: tracker,
        _broker: broker,
        _service: service,
        invoker: Arc::new(MqInvoker::new(caller_side, "greeter-rpc")),
        probe,
    }
}

scenarios::scenarios_over!(direct: typed_and_dynamic, application_errors, unknown_method_and_bad_params, concurrent_calls);
scenarios::scenarios_over!(mq: typed_and_dynamic, application_errors, unknown_method_and_bad_params, concurrent_calls);

/// Calls spread over every registered server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_balanced_over_the_servers() {
    let tracker = tracker();
    let (_a, _) = registered(&tracker, "a").await;
    let (_b, _) = registered(&tracker, "b").await;
    let greeter = GreeterClient::new(ha_invoker(&tracker, 2).await);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..10 {
        seen.insert(greeter.whoami().await.unwrap());
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

/// A server killed mid-call: that call fails at once, and the next call goes to the
/// surviving server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_fails_its_call_and_the_next_goes_to_the_survivor() {
    let tracker = tracker();
    let (a, probe_a) = registered(&tracker, "a").await;
    let (b, probe_b) = registered(&tracker, "b").await;
    let greeter =
        GreeterClient::new(ha_invoker(&tracker, 2).await).timeout(Duration::from_secs(15));
    let call = tokio::spawn(greeter.slow(60_000));
    let mut a_started = probe_a.started.subscribe();
    let mut b_started = probe_b.started.subscribe();
    let (victim, survivor) = tokio::select! {
        _ = a_started.wait_for(|&n| n > 0) => (a, "b"),
        _ = b_started.wait_for(|&n| n > 0) => (b, "a"),
    };
    let killed = Instant::now();
    victim.abort();
    scenarios::fails_disconnected(call, killed).await;
    for _ in 0..5 {
        assert_eq!(greeter.whoami().await.unwrap(), survivor);
    }
}

/// With no server registered for a module, a call fails at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_registered_server_fails_fast() {
    let tracker = tracker();
    let invoker = ha_invoker(&tracker, 0).await;
    let started = Instant::now();
    match RpcClient::new(invoker, "Greeter")
        .call::<_, String>("hello", &("x",))
        .await
    {
        Err(RpcError::NoResponders { .. }) => {}
        other => panic!("expected no responders, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(1));
}
