//! Test harness: real `qbus-broker` processes (`qbus_testkit::process::BrokerProcess`), and
//! the client scenarios that every kind of broker (process or embedded) must pass.

#![allow(dead_code, unused_imports)] // each test binary uses a different part of the harness

pub mod scenarios;

pub use qbus_testkit::process::BrokerProcess;
pub use qbus_testkit::wait_for;

/// Most a test waits for one reply on a raw link.
const RAW_REPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A raw protocol link to `addr` whose `Hello` (id 1) said `protocol`; the Hello's reply is
/// left for [`reply_to`] to pass over.
pub async fn raw_link(addr: &str, protocol: u32, version: &str) -> qbus_wire::link::Link {
    use qbus_wire::protocol::{Command, Frame, Header, ServerInfo};
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let link = qbus_wire::link::tcp_link(stream, 1 << 24);
    let hello = rmp_serde::to_vec_named(&ServerInfo {
        protocol,
        version: version.into(),
        ..ServerInfo::default()
    })
    .unwrap();
    let mut request = Header::request(Command::Hello, None);
    request.id = 1;
    link.tx
        .send(Frame::with_body(request, hello.into()))
        .await
        .unwrap();
    link
}

/// Asserts that `reply` refuses a request with 400 naming the protocol version it needs.
pub fn assert_needs_protocol(reply: &qbus_wire::protocol::Header, version: u32) {
    assert_eq!(reply.status, 400, "{reply:?}");
    let needed = format!("protocol {version}");
    assert!(
        reply.error.as_deref().unwrap_or("").contains(&needed),
        "{reply:?}"
    );
}

/// The next frame on `link` answering request `id`, passing over others, within 10 s.
pub async fn reply_to(link: &mut qbus_wire::link::Link, id: u64) -> qbus_wire::protocol::Frame {
    use futures_util::StreamExt;
    loop {
        let reply = tokio::time::timeout(RAW_REPLY_WAIT, link.rx.next())
            .await
            .expect("a reply in time")
            .expect("the connection stays open")
            .unwrap();
        if reply.header.id == id {
            return reply;
        }
    }
}
