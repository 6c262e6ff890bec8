//! A tracker with users against strangers: reports only from users with the `register`
//! permission, a node's id and address held by the identity that registered it, and
//! clients that must log in; no forged node ever reaches a client's topology.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::time::Duration;

use qbus_client::ha::{query_tracker, HaOptions};
use qbus_client::link::TcpConnector;
use qbus_client::protocol::{Command, Credentials, Frame, Header, DEFAULT_MAX_FRAME};
use qbus_client::topology::{NodeKind, NodeState};
use qbus_client::{ClientError, Connection, ConnectionOptions};
use qbus_server_kit::auth::hash_secret;
use support::{wait_for_async, BrokerProcess, TrackerProcess, REPORT_INTERVAL, WARMUP};

fn settings() -> tempfile::NamedTempFile {
    let text = format!(
        r#"
[[users]]
name = "broker-a"
secret = "{a}"
allow = ["register *"]

[[users]]
name = "mallory"
secret = "{m}"
allow = ["register *"]

[[users]]
name = "client"
secret = "{c}"
allow = ["read *"]

[[users]]
name = "orders-app"
secret = "{c}"
allow = ["produce,consume orders.*"]
"#,
        a = hash_secret("a-pw").unwrap(),
        m = hash_secret("m-pw").unwrap(),
        c = hash_secret("c-pw").unwrap(),
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}

fn options(credentials: Option<Credentials>) -> ConnectionOptions {
    ConnectionOptions {
        connect_timeout: Duration::from_secs(3),
        credentials,
        ..ConnectionOptions::default()
    }
}

/// Reports `state` once as `credentials`; the status of the reply.
async fn report(tracker: &str, credentials: Option<Credentials>, state: &NodeState) -> u16 {
    let conn = Connection::new(
        TcpConnector::new(tracker, DEFAULT_MAX_FRAME),
        options(credentials),
    );
    let body = rmp_serde::to_vec_named(state).unwrap();
    let frame = Frame::with_body(Header::request(Command::Report, None), body.into());
    match conn.request(frame).await {
        Ok(reply) => reply.header.status,
        Err(ClientError::Server { status, .. }) => status.code(),
        Err(e) => panic!("no reply from the tracker: {e}"),
    }
}

fn client() -> Option<Credentials> {
    Some(Credentials::password("client", "c-pw"))
}

#[tokio::test]
async fn forged_registrations_are_refused_and_never_reach_clients() {
    let file = settings();
    let config = file.path().to_str().unwrap().to_owned();
    let tracker = TrackerProcess::start_with(WARMUP, &["--config", &config]);
    let interval = format!("{}ms", REPORT_INTERVAL.as_millis());
    let broker = BrokerProcess::start(&[
        "--tracker",
        &tracker.addr(),
        "--report-interval",
        &interval,
        "--tracker-user",
        "broker-a",
        "--tracker-password",
        "a-pw",
    ]);
    let t = tracker.addr();
    let listed = |view: &qbus_client::topology::TopologyUpdate| -> Vec<String> {
        view.brokers.iter().map(|b| b.addr.clone()).collect()
    };
    let view = wait_for_async(
        "the real broker to register",
        Duration::from_secs(10),
        || async {
            let now = query_tracker(&t, options(client())).await.ok()?;
            (listed(&now) == [broker.addr()]).then_some(now)
        },
    )
    .await;
    let real = view.brokers[0].clone();

    // A stranger without credentials: 401, whatever it claims.
    let fake = NodeState {
        id: "127.0.0.1:1".into(),
        addr: "127.0.0.1:1".into(),
        kind: NodeKind::Broker,
        epoch: 1,
        seq: 1,
        report_interval_ms: 60_000,
        ..NodeState::default()
    };
    assert_eq!(report(&t, None, &fake).await, 401);
    // A user without the register permission: 403.
    assert_eq!(report(&t, client(), &fake).await, 403);
    // Another identity taking over the real broker's id with a newer epoch: 403.
    let mallory = Some(Credentials::password("mallory", "m-pw"));
    let takeover = NodeState {
        epoch: real.epoch + 1,
        ..real.clone()
    };
    assert_eq!(report(&t, mallory.clone(), &takeover).await, 403);
    // Or its address under another id: 403.
    let same_addr = NodeState {
        id: "mallory-node".into(),
        ..fake.clone()
    };
    let same_addr = NodeState {
        addr: real.addr.clone(),
        ..same_addr
    };
    assert_eq!(report(&t, mallory, &same_addr).await, 403);

    // Clients must log in, and the logged-in client sees only the real broker, through
    // the HA handle as well.
    let anonymous = query_tracker(&t, options(None)).await.unwrap_err();
    assert!(
        matches!(&anonymous, ClientError::Server { status, .. } if status.code() == 401),
        "{anonymous}"
    );
    let url = format!("tracker://client:c-pw@{t}");
    let ha = qbus_client::Broker::connect_ha(&url, HaOptions::default())
        .await
        .unwrap();
    let topology = ha.topology().unwrap();
    let addrs: Vec<&str> = topology.brokers().map(|b| b.addr.as_str()).collect();
    assert_eq!(addrs, [broker.addr().as_str()]);
    let still = query_tracker(&t, options(client())).await.unwrap();
    assert_eq!(listed(&still), [broker.addr()]);
    assert_eq!(still.brokers[0].epoch, real.epoch);

    // The topology a client gets holds only the MQs it may use, in the snapshot and in
    // the changes pushed later.
    let narrow = Some(Credentials::password("orders-app", "c-pw"));
    let url = format!("tracker://orders-app:c-pw@{t}");
    let orders_app = qbus_client::Broker::connect_ha(&url, HaOptions::default())
        .await
        .unwrap();
    let direct = qbus_client::Broker::connect(&broker.addr()).await.unwrap();
    let mqs_of = |view: &qbus_client::topology::TopologyUpdate| -> Vec<String> {
        view.brokers[0].mqs.iter().map(|m| m.name.clone()).collect()
    };
    // payments first: once orders.eu reaches the client, the change that added payments
    // was pushed before it (pushes keep their order).
    direct
        .create_mq("payments", Default::default())
        .await
        .unwrap();
    wait_for_async(
        "payments in the full view",
        Duration::from_secs(10),
        || async {
            let view = query_tracker(&t, options(client())).await.ok()?;
            (mqs_of(&view) == ["payments"]).then_some(())
        },
    )
    .await;
    direct
        .create_mq("orders.eu", Default::default())
        .await
        .unwrap();
    wait_for_async(
        "orders.eu pushed to the client",
        Duration::from_secs(10),
        || async {
            let names = orders_app.topology()?.mq_names().join(",");
            (names.contains("orders.eu")).then_some(())
        },
    )
    .await;
    let view = query_tracker(&t, options(narrow)).await.unwrap();
    assert_eq!(mqs_of(&view), ["orders.eu"]);
    assert_eq!(orders_app.topology().unwrap().mq_names(), ["orders.eu"]);
}
