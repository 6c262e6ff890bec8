//! A zbus message as a qbus record, and back.
//!
//! zbus stores and returns the whole message, headers and all. A qbus record has a body,
//! a tag and a key, so a produced zbus message is kept as:
//!
//! - body: the message body, untouched (a qbus consumer of the same MQ reads it as is);
//! - tag: the `topic` header (so qbus tag filters and zbus PubSub topics agree);
//! - key: `zbus/1\n` then one `name: value\n` line per stored header (`id`, `sender`,
//!   `content-type`, `encoding` and every application header). Commands, hop-by-hop and
//!   security headers are not stored.
//!
//! A one-way produce (`ack: 0`, zbus's RPC request) is a call instead: its record is the
//! one every MQ-RPC call gets (`rpc::call::stage_call`: key the reply route, tag the body's
//! encoding), so qbus and zbus responders answer it alike.

use qbus_wire::protocol::record::RecordRef;
use qbus_wire::protocol::MqInfo;
use serde_json::json;

use super::codec::Message;
use crate::rpc::reply_table::is_route;

/// How a stored zbus head starts, telling it from any other record key.
pub const HEAD_MARK: &str = "zbus/1\n";

/// Headers a produce does not store: the command's own controls, hop-by-hop headers, and
/// credentials (`token`, `appid`: these must never reach consumers).
const NOT_STORED: &[&str] = &[
    "cmd",
    "ack",
    "mq",
    "topic",
    "recver",
    "reply_code",
    "connection",
    "keep-alive",
    "host",
    "token",
    "appid",
];

/// The record key holding `message`'s headers.
pub fn stored_key(message: &Message) -> String {
    let mut key = String::from(HEAD_MARK);
    for (name, value) in &message.headers {
        if NOT_STORED.contains(&name.as_str()) {
            continue;
        }
        key.push_str(name);
        key.push_str(": ");
        // A bare line feed inside a value would split its line.
        key.push_str(&value.replace(['\r', '\n'], " "));
        key.push('\n');
    }
    key
}

/// The encoding tag of a call whose body `message` carries: `json` when it says or looks
/// so (zbus RPC bodies are JSON, but the Node.js client sends them without a content
/// type), none otherwise.
pub fn call_encoding(message: &Message) -> Option<&'static str> {
    let declared = message
        .get("content-type")
        .is_some_and(|t| t.starts_with("application/json"));
    let looks = message
        .body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{' || *b == b'[');
    (declared || looks).then_some("json")
}

/// The reply to a consume that delivers `record` of `mq`: status 200 with the stored
/// headers, `rawid` the producer's `id`, and the body. The caller sets `id`.
pub fn delivery(record: &RecordRef<'_>, mq: &str) -> Message {
    let mut message = Message::reply(200).with_body(bytes::Bytes::copy_from_slice(record.body));
    let key = record.key.unwrap_or("");
    if let Some(head) = key.strip_prefix(HEAD_MARK) {
        for line in head.lines() {
            if let Some((name, value)) = line.split_once(": ") {
                let name = if name == "id" { "rawid" } else { name };
                message.headers.push((name.to_owned(), value.to_owned()));
            }
        }
        if let Some(topic) = record.tag {
            message.set("topic", topic);
        }
    } else if is_route(key) {
        // A call (from any door): the route is where the reply goes, and zbus services
        // route their reply to the request's `sender`.
        message.set("sender", key);
        if record.tag == Some("json") {
            message.set("content-type", "application/json");
        }
    } else {
        if !key.is_empty() {
            message.set("key", key);
        }
        if let Some(tag) = record.tag {
            message.set("topic", tag);
        }
    }
    if message.get("rawid").is_none() {
        message.set("rawid", record.offset.to_string());
    }
    message.set("mq", mq);
    message
}

/// `ack` as zbus reads it: true unless given and neither `1` nor `true`.
pub fn is_ack(value: Option<&str>) -> bool {
    value.is_none_or(|v| {
        let v = v.trim();
        v == "1" || v.eq_ignore_ascii_case("true")
    })
}

/// An MQ as zbus's `query_mq` describes it (`org.zbus.mq.Protocol.MqInfo`).
pub fn mq_info(info: &MqInfo, mode: u32) -> serde_json::Value {
    // A zbus MQ has one queue of unconsumed messages: its default group's lag, or every
    // retained record while nobody consumed yet.
    let default = info.groups.iter().find(|g| g.name == info.name);
    let unconsumed = default.map_or(info.depth(), |g| g.lag);
    let consumers: u32 = info.groups.iter().map(|g| g.consumers).sum();
    json!({
        "name": info.name,
        "mode": mode,
        "creator": "",
        "lastUpdateTime": 0,
        "consumerCount": consumers,
        "unconsumedMsgCount": unconsumed,
        "consumerInfoList": [],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zbus::codec::StartLine;
    use qbus_wire::protocol::record::{encode_record, parse_record};

    fn produced() -> Message {
        Message {
            start: StartLine::Request {
                method: "GET".into(),
                url: "/".into(),
            },
            headers: vec![
                ("cmd".into(), "produce".into()),
                ("mq".into(), "MyMQ".into()),
                ("id".into(), "f00".into()),
                ("token".into(), "secret".into()),
                ("content-type".into(), "text/plain".into()),
                ("app".into(), "x: y".into()),
            ],
            body: "hello".into(),
        }
    }

    #[test]
    fn a_stored_message_comes_back_whole_without_controls_or_credentials() {
        let key = stored_key(&produced());
        let mut buf = bytes::BytesMut::new();
        encode_record(&mut buf, 0, 0, Some("news"), Some(&key), b"hello").unwrap();
        let record = parse_record(&buf).unwrap();
        let out = delivery(&record, "MyMQ");
        assert_eq!(out.get("rawid"), Some("f00"));
        assert_eq!(out.get("content-type"), Some("text/plain"));
        assert_eq!(out.get("app"), Some("x: y"));
        assert_eq!(out.get("topic"), Some("news"));
        assert_eq!(out.get("mq"), Some("MyMQ"));
        assert_eq!(out.get("token"), None);
        assert_eq!(out.get("cmd"), None);
        assert_eq!(&out.body[..], b"hello");
    }

    #[test]
    fn ack_reads_as_zbus_reads_it() {
        assert!(is_ack(None));
        assert!(is_ack(Some("1")) && is_ack(Some("True")));
        assert!(!is_ack(Some("0")) && !is_ack(Some("False")));
    }
}
