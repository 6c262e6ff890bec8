//! TLS on the broker port, against real `qbus-broker` (and `qbus-tracker`) processes with a
//! CA made in the test: the binary protocol and HTTP inside TLS, a tracker over TLS with a
//! `tracker+tls://` client (which refuses a reported broker its CA did not sign), a wrong
//! CA and a missing client certificate refused at once
//! with a reason, a plain-text client told that the port speaks TLS, and the name of a
//! verified client certificate.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use qbus_client::ha::HaOptions;
use qbus_client::tls::{ClientTls, ServerTls};
use qbus_client::{Broker, ClientError, ConnectionOptions, MqOptions};
use qbus_testkit::process::{BrokerProcess, TrackerProcess};
use qbus_testkit::tls::TestCa;
use qbus_testkit::wait_for;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A refusal must come at once, not at the end of this deadline (the connect deadline of
/// the clients below).
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

fn options() -> ConnectionOptions {
    ConnectionOptions {
        connect_timeout: CONNECT_DEADLINE,
        ..ConnectionOptions::default()
    }
}

fn start_broker(ca: &TestCa, extra: &[&str]) -> BrokerProcess {
    let args = ca.issue("broker").server_args();
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(extra);
    BrokerProcess::start(&args)
}

/// Sends one message to `mq` and reads it back with a fresh group.
async fn round_trip(broker: &Broker, mq: &str, body: &str) {
    broker.create_mq(mq, MqOptions::default()).await.unwrap();
    let receipt = broker.producer(mq).send(body.to_owned()).await.unwrap();
    assert_eq!(receipt.offset, 0);
    let mut consumer = broker.consumer(mq).group("g").subscribe().await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a delivery within 10 s")
        .expect("the stream is open")
        .unwrap();
    assert_eq!(&delivery.body[..], body.as_bytes());
    delivery.ack().await.unwrap();
}

/// The reason of a connect that must fail, checked to come well before the deadline.
async fn refused(
    connect: impl std::future::Future<Output = Result<Broker, ClientError>>,
) -> String {
    let started = Instant::now();
    let err = connect.await.expect_err("the connection must be refused");
    assert!(
        started.elapsed() < CONNECT_DEADLINE / 2,
        "refused only after {:?}: {err}",
        started.elapsed()
    );
    err.to_string()
}

#[tokio::test]
async fn produce_and_consume_over_tls() {
    let ca = TestCa::new("qbus test CA");
    let process = start_broker(&ca, &[]);
    let addr = format!("tls://{}", process.addr());
    let broker = Broker::connect_tls(&addr, options(), Some(ca.client_tls()))
        .await
        .unwrap();
    round_trip(&broker, "orders", "over TLS").await;
    // The same address by name: the certificate lists localhost too.
    let by_name = format!("tls://localhost:{}", process.port());
    let broker = Broker::connect_tls(&by_name, options(), Some(ca.client_tls()))
        .await
        .unwrap();
    assert_eq!(broker.query_mq("orders").await.unwrap().depth(), 1);
}

#[tokio::test]
async fn a_plain_client_is_told_the_port_speaks_tls() {
    let ca = TestCa::new("qbus test CA");
    let process = start_broker(&ca, &[]);
    let reason = refused(Broker::connect_with(&process.addr(), options())).await;
    assert!(reason.contains("speaks TLS only"), "{reason}");
    // HTTP in plain text gets a 400 that says so.
    let mut stream = tokio::net::TcpStream::connect(process.addr())
        .await
        .unwrap();
    stream
        .write_all(b"GET /api/stats HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("speaks TLS only"), "{reply}");
}

#[tokio::test]
async fn http_inside_tls() {
    let ca = TestCa::new("qbus test CA");
    let process = start_broker(&ca, &[]);
    let tcp = tokio::net::TcpStream::connect(process.addr())
        .await
        .unwrap();
    let mut stream = ca.client_tls().connect(tcp, &process.addr()).await.unwrap();
    stream
        .write_all(b"GET /api/stats HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    // A TLS server may close without close_notify after `connection: close`; what came
    // before is the reply.
    let _ = stream.read_to_end(&mut reply).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"mqs\""), "{reply}");
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_at_once() {
    let ca = TestCa::new("qbus test CA");
    let process = start_broker(&ca, &[]);
    let stranger = TestCa::new("another CA");
    let addr = format!("tls://{}", process.addr());
    let reason = refused(Broker::connect_tls(
        &addr,
        options(),
        Some(stranger.client_tls()),
    ))
    .await;
    assert!(reason.contains("UnknownIssuer"), "{reason}");
}

#[tokio::test]
async fn mtls_refuses_a_client_without_a_certificate_and_admits_one_with() {
    let ca = TestCa::new("qbus test CA");
    let ca_file = ca.ca().display().to_string();
    let process = start_broker(&ca, &["--tls-client-ca", &ca_file]);
    let addr = format!("tls://{}", process.addr());
    let reason = refused(Broker::connect_tls(&addr, options(), Some(ca.client_tls()))).await;
    assert!(reason.contains("CertificateRequired"), "{reason}");
    // A certificate from another CA is no better.
    let stranger = TestCa::new("another CA");
    let tls = ClientTls::from_pem_files(&ca.ca(), {
        let other = stranger.issue("mallory");
        Some((&other.cert.clone(), &other.key.clone()))
    })
    .unwrap();
    let reason = refused(Broker::connect_tls(&addr, options(), Some(tls))).await;
    assert!(reason.contains("handshake failed"), "{reason}");
    let alice = ca.issue("alice");
    let broker = Broker::connect_tls(&addr, options(), Some(ca.client_tls_as(&alice)))
        .await
        .unwrap();
    round_trip(&broker, "audited", "with a client certificate").await;
}

/// A TLS handshake in this process between `server` and `client` dialing `name`: what the
/// client got, and what the server accepted.
async fn handshake(
    server: &ServerTls,
    client: ClientTls,
    name: &str,
) -> (std::io::Result<()>, std::io::Result<Option<String>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let name = name.to_owned();
    let dial = tokio::spawn(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut stream = client.connect(tcp, &name).await?;
        // The server verifies a client certificate after the client's last flight.
        stream.write_all(b"x").await?;
        stream.flush().await?;
        Ok(stream)
    });
    let (tcp, _) = listener.accept().await.unwrap();
    let accepted = server.accept(tcp, Duration::from_secs(10)).await;
    let dialed = dial.await.unwrap().map(drop);
    (dialed, accepted.map(|a| a.identity))
}

#[tokio::test]
async fn a_verified_client_certificate_names_the_peer() {
    let ca = TestCa::new("qbus test CA");
    let issued = ca.issue("server");
    let server = ServerTls::from_pem_files(&issued.cert, &issued.key, Some(&ca.ca())).unwrap();
    assert!(server.requires_client_cert());
    let alice = ca.client_tls_as(&ca.issue("alice"));
    let (dialed, identity) = handshake(&server, alice.clone(), "127.0.0.1:1").await;
    dialed.unwrap();
    assert_eq!(identity.unwrap().as_deref(), Some("alice"));
    // A name the server's certificate does not carry is refused by the client.
    let (dialed, _) = handshake(&server, alice, "qbus.example:1").await;
    let err = dialed.unwrap_err().to_string();
    assert!(err.contains("not valid for name \"qbus.example\""), "{err}");
}

#[tokio::test]
async fn a_tracker_over_tls_leads_an_ha_client_to_tls_brokers() {
    let ca = TestCa::new("qbus test CA");
    let ca_file = ca.ca().display().to_string();
    let tracker_cert = ca.issue("tracker").server_args();
    let tracker_args: Vec<&str> = tracker_cert.iter().map(String::as_str).collect();
    let tracker = TrackerProcess::start_with(Duration::ZERO, &tracker_args);
    let broker = start_broker(
        &ca,
        &[
            "--tracker",
            &tracker.addr(),
            "--tracker-ca",
            &ca_file,
            "--report-interval",
            "200ms",
        ],
    );
    let url = format!("tracker+tls://{}", tracker.addr());
    let options = HaOptions::default().with_tls(ca.client_tls());
    let cluster = Broker::connect_ha(&url, options).await.unwrap();
    let listed = wait_for(
        "the broker in the topology",
        Duration::from_secs(10),
        || {
            let topology = cluster.topology()?;
            let listed: Vec<String> = topology.brokers().map(|b| b.addr.clone()).collect();
            (!listed.is_empty()).then_some(listed)
        },
    )
    .await;
    assert_eq!(listed, [broker.addr()]);
    round_trip(&cluster, "clustered", "through a TLS tracker").await;
    // The CA of QBUS_CA is not set here, so a tracker+tls:// address without TLS options
    // says what is missing instead of dialing in plain text.
    if std::env::var_os("QBUS_CA").is_none() {
        let err = Broker::connect(&url).await.unwrap_err().to_string();
        assert!(err.contains("QBUS_CA"), "{err}");
    }
}

#[tokio::test]
async fn an_ha_client_refuses_a_reported_broker_its_ca_did_not_sign() {
    let ca = TestCa::new("qbus test CA");
    let ca_file = ca.ca().display().to_string();
    let tracker_cert = ca.issue("tracker").server_args();
    let tracker_args: Vec<&str> = tracker_cert.iter().map(String::as_str).collect();
    let tracker = TrackerProcess::start_with(Duration::ZERO, &tracker_args);
    // It reports to the tracker as it should, but serves a certificate of another CA.
    let stranger = TestCa::new("another CA");
    let mut args = stranger.issue("impostor").server_args();
    args.extend([
        "--tracker".into(),
        tracker.addr(),
        "--tracker-ca".into(),
        ca_file,
    ]);
    args.extend(["--report-interval".into(), "200ms".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let impostor = BrokerProcess::start(&args);
    let url = format!("tracker+tls://{}", tracker.addr());
    let options = HaOptions::default().with_tls(ca.client_tls());
    let cluster = Broker::connect_ha(&url, options).await.unwrap();
    wait_for(
        "the broker in the topology",
        Duration::from_secs(10),
        || {
            let topology = cluster.topology()?;
            let listed = topology.brokers().any(|b| b.addr == impostor.addr());
            listed.then_some(())
        },
    )
    .await;
    let started = Instant::now();
    let err = cluster
        .create_mq("secrets", MqOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "{err}");
}
