//! A caller in "another language": raw TCP, a frame built by hand (a MessagePack array for
//! the header, as `docs/protocol.md` describes it) and a JSON body. No SDK type is used.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

/// Sends one JSON `Call` (to `mq` on a broker, or to an RPC server when `None`) and returns
/// the reply's header fields and body.
pub fn json_call(addr: &str, mq: Option<&str>, body: &Value) -> (Vec<Value>, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    // cmd, id, status, mq, group, tag, offset, count, timeout_ms, flags, durability,
    // attempts, tokens, error, encoding
    let header = rmp_serde::to_vec(&(
        30u8,
        7u64,
        0u16,
        mq,
        None::<()>,
        None::<()>,
        None::<()>,
        None::<()>,
        Some(5000u32),
        0u32,
        None::<()>,
        Vec::<u32>::new(),
        Vec::<u32>::new(),
        None::<()>,
        "json",
    ))
    .expect("header");
    let body = serde_json::to_vec(body).expect("body");
    let mut frame = Vec::new();
    frame.extend_from_slice(&((4 + header.len() + body.len()) as u32).to_be_bytes());
    frame.extend_from_slice(&(header.len() as u32).to_be_bytes());
    frame.extend_from_slice(&header);
    frame.extend_from_slice(&body);
    stream.write_all(&frame).expect("write");

    let mut lengths = [0u8; 8];
    stream.read_exact(&mut lengths).expect("reply lengths");
    let frame_len = u32::from_be_bytes([lengths[0], lengths[1], lengths[2], lengths[3]]) as usize;
    let header_len = u32::from_be_bytes([lengths[4], lengths[5], lengths[6], lengths[7]]) as usize;
    let mut rest = vec![0u8; frame_len - 4];
    stream.read_exact(&mut rest).expect("reply frame");
    let header: Vec<Value> = rmp_serde::from_slice(&rest[..header_len]).expect("reply header");
    (header, rest[header_len..].to_vec())
}

/// Checks that `header` is the reply to [`json_call`]'s call (command 30, id 7), successful
/// (200) and with a JSON body.
pub fn assert_json_reply(header: &[Value]) {
    assert_eq!(
        (&header[0], &header[1], &header[2]),
        (
            &serde_json::json!(30),
            &serde_json::json!(7),
            &serde_json::json!(200)
        )
    );
    assert_eq!(header[14], serde_json::json!("json"));
}
