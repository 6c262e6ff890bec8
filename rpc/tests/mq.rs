//! MQ-RPC: calls through a broker MQ, to an `MqRpcService` in this process, over a real
//! `qbus-broker` process and over the embedded broker.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qbus_broker::{Config, EmbeddedBroker};
use qbus_client::protocol::record::records;
use qbus_client::protocol::{
    Command as Cmd, DeliveryToken, Frame, Header, FLAG_ONEWAY, FLAG_ROUTE_ACK,
};
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

/// A responder written against the frames alone, over raw TCP: says `protocol` in `Hello`,
/// then fetches and answers calls of one MQ frame by frame.
struct RawResponder {
    stream: std::net::TcpStream,
    mq: String,
}

impl RawResponder {
    fn connect(addr: &str, mq: &str, protocol: u32) -> RawResponder {
        let stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut responder = RawResponder {
            stream,
            mq: mq.to_owned(),
        };
        let hello = qbus_client::protocol::ServerInfo {
            protocol,
            version: "raw".into(),
            max_frame: 0,
            credentials: None,
            identity: None,
        };
        let body = rmp_serde::to_vec_named(&hello).unwrap();
        responder.send(Frame::with_body(request(Cmd::Hello, 1), body.into()));
        let reply = responder.receive();
        assert_eq!((reply.header.cmd, reply.header.status), (Cmd::Hello, 200));
        responder
    }

    fn send(&mut self, frame: Frame) {
        use std::io::Write;
        let mut bytes = bytes::BytesMut::new();
        qbus_client::protocol::encode(&frame, &mut bytes).unwrap();
        self.stream.write_all(&bytes).unwrap();
    }

    fn receive(&mut self) -> Frame {
        use std::io::Read;
        let mut frame = vec![0u8; 4];
        self.stream.read_exact(&mut frame).unwrap();
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        frame.resize(4 + len, 0);
        self.stream.read_exact(&mut frame[4..]).unwrap();
        qbus_client::protocol::decode(&frame, 1 << 20).unwrap().0
    }

    /// Sends a long-poll fetch of one call (its reply comes with the call).
    fn fetch(&mut self) {
        let mut header = request(Cmd::Fetch, 2);
        header.mq = Some(self.mq.clone());
        header.count = Some(1);
        header.timeout_ms = Some(10_000);
        self.send(Frame::new(header));
    }

    /// The route and delivery token of the call the fetch brought.
    fn call(&mut self) -> (String, DeliveryToken) {
        let reply = self.receive();
        assert_eq!((reply.header.cmd, reply.header.status), (Cmd::Fetch, 200));
        let record = records(&reply.body).next().unwrap().unwrap();
        let token = DeliveryToken {
            offset: record.offset,
            attempt: reply.header.attempts[0],
        };
        (record.key.unwrap().to_owned(), token)
    }

    /// A `Route` of `body` on `route`, with `flags`, acknowledging `token` when the flags
    /// say so.
    fn route(&mut self, id: u64, route: String, token: DeliveryToken, flags: u32) {
        let mut header = request(Cmd::Route, id);
        header.route = Some(route);
        header.flags = flags;
        header.mq = Some(self.mq.clone());
        header.tokens = vec![token];
        self.send(Frame::with_body(header, "routed".into()));
    }
}

fn request(cmd: Cmd, id: u64) -> Header {
    let mut header = Header::request(cmd, None);
    header.id = id;
    header
}

/// A raw responder of `protocol` on a fresh MQ, waiting for a call the caller sends.
async fn raw_call(
    protocol: u32,
) -> (
    BrokerProcess,
    Broker,
    RawResponder,
    qbus_client::PendingCall,
    (String, DeliveryToken),
) {
    let broker = BrokerProcess::start(&[]);
    let caller = Broker::connect(&broker.addr()).await.unwrap();
    let options = qbus_client::protocol::MqOptions {
        sync: Some(false),
        ..Default::default()
    };
    caller.create_mq("raw-rpc", options).await.unwrap();
    let mut responder = RawResponder::connect(&broker.addr(), "raw-rpc", protocol);
    responder.fetch();
    wait_for_async("the responder counted", Duration::from_secs(5), || async {
        let info = caller.query_mq("raw-rpc").await.unwrap();
        info.groups.iter().any(|g| g.consumers > 0).then_some(())
    })
    .await;
    let pending = caller
        .send_call("raw-rpc", "ping".into(), None, Duration::from_secs(10))
        .await
        .unwrap();
    let call = tokio::task::block_in_place(|| responder.call());
    (broker, caller, responder, pending, call)
}

async fn in_flight(caller: &Broker) -> u64 {
    let info = caller.query_mq("raw-rpc").await.unwrap();
    info.groups.iter().map(|g| g.in_flight).sum()
}

/// A version 4 responder's `Route` with `FLAG_ROUTE_ACK` both answers the caller and
/// records the ack, with no `Ack` frame; without `ONEWAY` its reply is the ack's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_with_the_ack_flag_records_the_ack() {
    let (_broker, caller, mut responder, pending, (route, token)) = raw_call(4).await;
    assert_eq!(in_flight(&caller).await, 1);
    responder.route(5, route, token, FLAG_ROUTE_ACK);
    let reply = tokio::task::block_in_place(|| responder.receive());
    assert_eq!(
        (reply.header.cmd, reply.header.id, reply.header.status),
        (Cmd::Ack, 5, 200)
    );
    assert_eq!(reply.header.count, Some(1));
    assert_eq!(pending.await.unwrap().body, "routed");
    assert_eq!(in_flight(&caller).await, 0);
    // One-way, the next call's reply and ack take one frame and get no answer at all.
    let pending = caller
        .send_call("raw-rpc", "ping".into(), None, Duration::from_secs(10))
        .await
        .unwrap();
    responder.fetch();
    let (route, token) = tokio::task::block_in_place(|| responder.call());
    responder.route(0, route, token, FLAG_ROUTE_ACK | FLAG_ONEWAY);
    assert_eq!(pending.await.unwrap().body, "routed");
    wait_for_async(
        "the one-way ack recorded",
        Duration::from_secs(5),
        || async { (in_flight(&caller).await == 0).then_some(()) },
    )
    .await;
}

/// A version 3 responder keeps working as before (a `Route`, then an `Ack`); the broker
/// ignores the ack flag from it, as a version 3 broker would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_3_responder_routes_and_acks_apart() {
    let (_broker, caller, mut responder, pending, (route, token)) = raw_call(3).await;
    responder.route(0, route, token, FLAG_ROUTE_ACK | FLAG_ONEWAY);
    assert_eq!(pending.await.unwrap().body, "routed");
    assert_eq!(in_flight(&caller).await, 1, "the ack flag is version 4");
    let mut ack = request(Cmd::Ack, 6);
    ack.mq = Some("raw-rpc".into());
    ack.tokens = vec![token];
    responder.send(Frame::new(ack));
    let reply = tokio::task::block_in_place(|| responder.receive());
    assert_eq!(
        (reply.header.cmd, reply.header.id, reply.header.count),
        (Cmd::Ack, 6, Some(1))
    );
    assert_eq!(in_flight(&caller).await, 0);
}

/// The SDK's service answers and acknowledges each call (in one frame, to this broker):
/// none stays in flight to come again after the ack timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_acknowledges_what_it_answers() {
    let fixture = single().await;
    let greeter =
        GreeterClient::from_rpc(RpcClient::from_shared(fixture.invoker.clone(), "Greeter"));
    for i in 0..20 {
        greeter.hello(format!("{i}")).await.unwrap();
    }
    let broker = Broker::connect(&fixture.broker.addr()).await.unwrap();
    wait_for_async(
        "every call acknowledged",
        Duration::from_secs(5),
        || async {
            let info = broker.query_mq(MQ).await.unwrap();
            let acked =
                |g: &qbus_client::protocol::GroupInfo| g.in_flight == 0 && g.committed == 20;
            info.groups.iter().all(acked).then_some(())
        },
    )
    .await;
}
