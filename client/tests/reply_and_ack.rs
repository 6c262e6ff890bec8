//! `Delivery::reply_and_ack` on its slow paths, against a broker played by the test over an
//! in-memory link: one that stops reading (the link's queue fills), and one of protocol 3,
//! which takes the reply and the ack as two frames. No real broker can be made to do either
//! on cue; everything else about MQ-RPC replies is tested against real brokers in
//! `rpc/tests/mq.rs`.

use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use qbus_client::link::{memory_link_pair, Connector, Link, LINK_QUEUE};
use qbus_client::protocol::record::encode_record;
use qbus_client::protocol::{Command, Frame, Header, MqInfo, ServerInfo, FLAG_ROUTE_ACK};
use qbus_client::{Broker, ConnectionOptions, Delivery};

const WAIT: Duration = Duration::from_secs(10);

/// Hands out one link, then refuses: the test's broker never goes away.
struct OneLink(Mutex<Option<Link>>);

impl Connector for OneLink {
    fn connect(
        &self,
    ) -> Pin<Box<dyn std::future::Future<Output = std::io::Result<Link>> + Send + '_>> {
        let link = self.0.lock().expect("link lock").take();
        Box::pin(async move { link.ok_or_else(|| std::io::ErrorKind::ConnectionRefused.into()) })
    }

    fn addr(&self) -> String {
        "memory".into()
    }
}

/// The broker's end of the link.
struct FakeBroker {
    link: Link,
    protocol: u32,
}

impl FakeBroker {
    async fn next(&mut self) -> Frame {
        tokio::time::timeout(WAIT, self.link.rx.next())
            .await
            .expect("the client sends a frame")
            .expect("the link is open")
            .expect("a well-formed frame")
    }

    async fn answer(&mut self, request: &Header, body: Bytes) {
        let frame = Frame::with_body(Header::reply_to(request), body);
        self.link.tx.send(frame).await.expect("the client listens");
    }

    /// Serves the handshake and the consumer's setup up to its first fetch, which it
    /// answers with `calls` MQ-RPC calls (record `i` has key `route-i`).
    async fn hand_out(&mut self, calls: u64) {
        loop {
            let frame = self.next().await;
            match frame.header.cmd {
                Command::Hello => {
                    let info = ServerInfo {
                        protocol: self.protocol,
                        version: "test".into(),
                        max_frame: 1 << 20,
                        ..ServerInfo::default()
                    };
                    let body = rmp_serde::to_vec_named(&info).expect("encodes");
                    self.answer(&frame.header, body.into()).await;
                }
                Command::QueryMq => {
                    let info = MqInfo {
                        name: "rpc".into(),
                        ..MqInfo::default()
                    };
                    let body = rmp_serde::to_vec_named(&info).expect("encodes");
                    self.answer(&frame.header, body.into()).await;
                }
                Command::Fetch => {
                    let mut body = BytesMut::new();
                    for offset in 0..calls {
                        let key = format!("route-{offset}");
                        encode_record(&mut body, offset, 0, None, Some(&key), b"call")
                            .expect("a short key");
                    }
                    let mut header = Header::reply_to(&frame.header);
                    header.count = u32::try_from(calls).ok();
                    header.attempts = vec![1; calls as usize];
                    let reply = Frame::with_body(header, body.freeze());
                    self.link.tx.send(reply).await.expect("the client listens");
                    return;
                }
                other => panic!("unexpected {other:?} before the first fetch"),
            }
        }
    }

    /// The next frame that is not the consumer's next fetch (left unanswered: a long poll).
    async fn next_reply(&mut self) -> Frame {
        loop {
            let frame = self.next().await;
            if frame.header.cmd != Command::Fetch {
                return frame;
            }
        }
    }
}

async fn setup(protocol: u32, calls: u64) -> (Broker, Vec<Delivery>, FakeBroker) {
    let (client_end, broker_end) = memory_link_pair();
    let broker = Broker::from_connector(
        OneLink(Mutex::new(Some(client_end))),
        ConnectionOptions::default(),
    );
    let mut fake = FakeBroker {
        link: broker_end,
        protocol,
    };
    let subscribing = broker.consumer("rpc").group("g").batch(64).subscribe();
    let (consumer, ()) = tokio::join!(subscribing, fake.hand_out(calls));
    let mut consumer = consumer.expect("subscribed");
    let mut deliveries = Vec::new();
    while deliveries.len() < calls as usize {
        let batch = tokio::time::timeout(WAIT, consumer.recv_batch(usize::MAX))
            .await
            .expect("the calls arrive")
            .expect("deliveries");
        deliveries.extend(batch);
    }
    // The consumer may be dropped: deliveries keep their link.
    drop(consumer);
    (broker, deliveries, fake)
}

#[tokio::test]
async fn a_reply_waits_for_room_when_the_broker_stops_reading() {
    let calls = LINK_QUEUE as u64 + 8;
    let (_broker, deliveries, mut fake) = setup(4, calls).await;
    // The broker reads nothing now: replies queue on the link until it is full.
    let mut waiting = None;
    for (i, delivery) in deliveries.iter().enumerate() {
        let mut reply = delivery.reply_and_ack(Bytes::from(format!("reply-{i}")), None);
        if (&mut reply).now_or_never().is_none() {
            waiting = Some((i, reply));
            break;
        }
    }
    let (blocked, reply) = waiting.expect("a full link makes a reply wait");
    assert!(blocked < LINK_QUEUE, "a reply waited at {blocked}");
    let reply = tokio::spawn(reply);
    // Once the broker reads again every reply comes, in order, each with its ack.
    for i in 0..=blocked {
        let frame = fake.next_reply().await;
        assert_eq!(frame.header.cmd, Command::Route);
        assert!(frame.header.has_flag(FLAG_ROUTE_ACK));
        assert_eq!(frame.header.route.as_deref(), Some(&*format!("route-{i}")));
        assert_eq!(frame.header.tokens.len(), 1);
        assert_eq!(frame.header.tokens[0].offset, i as u64);
        assert_eq!(&frame.body[..], format!("reply-{i}").as_bytes());
    }
    tokio::time::timeout(WAIT, reply)
        .await
        .expect("the waiting reply finishes once it is queued")
        .expect("no panic")
        .expect("sent");
}

#[tokio::test]
async fn a_protocol_3_broker_gets_the_reply_then_an_ack_it_confirms() {
    let (_broker, deliveries, mut fake) = setup(3, 1).await;
    let reply = tokio::spawn(deliveries[0].reply_and_ack(Bytes::from_static(b"ok"), None));
    let route = fake.next_reply().await;
    assert_eq!(route.header.cmd, Command::Route);
    assert!(
        !route.header.has_flag(FLAG_ROUTE_ACK),
        "protocol 3 knows no ROUTE_ACK"
    );
    assert_eq!(route.header.route.as_deref(), Some("route-0"));
    let ack = fake.next_reply().await;
    assert_eq!(ack.header.cmd, Command::Ack);
    assert_eq!(ack.header.tokens[0].offset, 0);
    // Not done until the broker confirms the ack.
    tokio::task::yield_now().await;
    assert!(!reply.is_finished());
    fake.answer(&ack.header, Bytes::new()).await;
    tokio::time::timeout(WAIT, reply)
        .await
        .expect("the ack's confirmation ends the wait")
        .expect("no panic")
        .expect("acked");
}
