//! RPC envelopes between zbus 7.x and qbus. Inside the broker a routed reply is a qbus
//! response envelope (`docs/protocol.md`, "RPC commands"), whoever sent it; the zbus door
//! translates where a reply crosses between the worlds: [`from_zbus`] when a zbus service
//! routes a reply into the core, [`to_zbus`] when a reply leaves it for a zbus caller. So
//! every caller reads its own world's envelope whatever language answered, and no other
//! part of the broker needs to know which kind of caller awaits a reply.
//!
//! ```text
//! request   zbus {"module", "method", "params"}  =  qbus request (stored untouched;
//!           qbus's `timeout_ms` is optional, zbus services ignore it)
//! success   zbus reply_code 200, {"result": r}    ->  qbus {"result": r}
//!           (the JS RpcProcessor adds "error": null; a missing result is null)
//! failure   zbus reply_code s, {"error": e, "stackTrace" | "stack_trace": t}
//!                                                 ->  qbus {"error": {"code": s, "message": e, "detail": t}}
//!           (a non-null `error` under reply_code 200 is code 500)
//!           qbus {"result": r}                    ->  zbus 200, {"result": r}
//!           qbus {"error": {code, message, detail}}
//!                                                 ->  zbus status code, {"error": message, "stackTrace": "code name: message (detail)"}
//! ```
//!
//! A body that is no envelope (zbus's plain MQ-RPC: any body, any status) passes untouched
//! with its status both ways; a qbus caller reads a non-200 one as the call's refusal.

use bytes::Bytes;
use qbus_wire::protocol::rpc::{ErrorCode, RemoteError, ResponseIn, ResponseOut};
use qbus_wire::protocol::{Command, Frame, Header, Status};
use serde_json::{Map, Value};

use super::codec::Message;

/// The encoding tag of JSON bodies (`docs/protocol.md`, "RPC commands").
const JSON: &str = "json";

/// The reply frame to call `id` of what a zbus service routed: its `reply_code` `status`,
/// its body and that body's `encoding` tag (`record::call_encoding`).
pub fn from_zbus(id: u64, status: u16, encoding: Option<&str>, body: Bytes) -> Frame {
    let reply = |status, encoding: Option<&str>, body| {
        let header = Header {
            cmd: Command::Call,
            id,
            status,
            encoding: encoding.map(str::to_owned),
            ..Header::default()
        };
        Frame::with_body(header, body)
    };
    let ok = Status::Ok.code();
    let Some(mut envelope) = zbus_envelope(&body) else {
        let mut frame = reply(status, encoding, body);
        if status != ok {
            // A qbus caller reads a refusal's reason from the header, not the body.
            frame.header.error = Some(String::from_utf8_lossy(&frame.body).into_owned());
        }
        return frame;
    };
    // Already qbus's shape: the body goes on as it came.
    let qbus_shaped = envelope.len() == 1 && envelope.contains_key("result");
    let error = envelope.remove("error").filter(|e| !e.is_null());
    if status == ok && error.is_none() {
        if qbus_shaped {
            return reply(ok, Some(JSON), body);
        }
        let result = envelope.remove("result").unwrap_or(Value::Null);
        return reply(ok, Some(JSON), encode(&ResponseOut::Result(&result)));
    }
    let trace = ["stackTrace", "stack_trace"]
        .into_iter()
        .find_map(|name| envelope.remove(name))
        .filter(|t| !t.is_null())
        .map(text);
    let message = match error {
        Some(error) => text(error),
        None => trace
            .clone()
            .unwrap_or_else(|| format!("the zbus service answered status {status}")),
    };
    let code = if status == ok {
        Status::Internal.code()
    } else {
        status
    };
    let mut error = RemoteError::new(ErrorCode::from(code), message);
    error.detail = trace.filter(|t| *t != error.message);
    reply(ok, Some(JSON), encode(&ResponseOut::<Value>::Error(&error)))
}

/// The zbus reply to a zbus caller of what the reply table delivered: a responder's reply
/// (its envelope as zbus's) or the broker's own error reply (a deadline that passed, a
/// write that failed). The caller sets `id`.
pub fn to_zbus(frame: Frame) -> Message {
    let Frame { header, body } = frame;
    let json = header.encoding.as_deref() == Some(JSON);
    if header.status != Status::Ok.code() {
        if body.is_empty() {
            let error = header.error.unwrap_or_default();
            return zbus_error(header.status, &error, &error);
        }
        return raw(header.status, json, body);
    }
    let decoded = match header.encoding.as_deref() {
        Some(JSON) => serde_json::from_slice::<ResponseIn<Value>>(&body).ok(),
        None => rmp_serde::from_slice::<ResponseIn<Value>>(&body).ok(),
        Some(_) => None,
    };
    match decoded {
        None => raw(header.status, json, body),
        // zbus's success shape is qbus's: a JSON body goes on as it came.
        Some(ResponseIn::Result(_)) if json => raw(header.status, true, body),
        Some(ResponseIn::Result(result)) => {
            raw(header.status, true, encode(&ResponseOut::Result(&result)))
        }
        Some(ResponseIn::Error(error)) => {
            let status = u16::from(error.code);
            // zbus clients read any status but 200 as failure; keep the code when it is one.
            let status = if (400..600).contains(&status) {
                status
            } else {
                Status::Internal.code()
            };
            zbus_error(status, &error.message, &error.to_string())
        }
    }
}

/// `body` as a JSON object with a `result` or an `error`: zbus's RPC response.
fn zbus_envelope(body: &[u8]) -> Option<Map<String, Value>> {
    let envelope: Map<String, Value> = serde_json::from_slice(body).ok()?;
    (envelope.contains_key("result") || envelope.contains_key("error")).then_some(envelope)
}

/// An error as text: a string as it is, an object by its `message` (a serialized
/// exception), anything else as JSON.
fn text(value: Value) -> String {
    match value {
        Value::String(text) => text,
        Value::Object(mut object) => match object.remove("message") {
            Some(Value::String(message)) => message,
            _ => Value::Object(object).to_string(),
        },
        other => other.to_string(),
    }
}

/// zbus's error reply: the Python `Rpc` raises its `stackTrace` (else its `error`), the JS
/// `RpcInvoker` throws the body.
fn zbus_error(status: u16, error: &str, trace: &str) -> Message {
    let body = serde_json::json!({ "error": error, "stackTrace": trace });
    raw(status, true, body.to_string())
}

fn raw(status: u16, json: bool, body: impl Into<Bytes>) -> Message {
    let mut reply = Message::reply(status).with_body(body);
    if json {
        // The JS client parses a body only when it says it is JSON.
        reply.set("content-type", "application/json");
    }
    reply
}

fn encode<T: serde::Serialize + ?Sized>(response: &ResponseOut<'_, T>) -> Bytes {
    serde_json::to_vec(response)
        .expect("an envelope of JSON values and strings always serializes")
        .into()
}

#[cfg(test)]
mod tests {
    use super::super::codec::StartLine;
    use super::*;
    use serde_json::json;

    fn qbus(frame: &Frame) -> Value {
        assert_eq!(frame.header.status, 200);
        assert_eq!(frame.header.encoding.as_deref(), Some("json"));
        serde_json::from_slice(&frame.body).unwrap()
    }

    fn zbus(message: &Message) -> (u16, Value) {
        let StartLine::Status(status) = message.start else {
            panic!("not a reply: {message:?}");
        };
        assert_eq!(message.get("content-type"), Some("application/json"));
        (status, serde_json::from_slice(&message.body).unwrap())
    }

    #[test]
    fn zbus_results_reach_qbus_callers_as_results() {
        let python = from_zbus(7, 200, Some("json"), r#"{"result": 3}"#.into());
        assert_eq!(python.header.id, 7);
        assert_eq!(&python.body[..], br#"{"result": 3}"#, "passed untouched");
        let js = from_zbus(
            7,
            200,
            Some("json"),
            r#"{"error":null,"result":[1]}"#.into(),
        );
        assert_eq!(qbus(&js), json!({"result": [1]}));
        let undefined = from_zbus(7, 200, Some("json"), r#"{"error":null}"#.into());
        assert_eq!(qbus(&undefined), json!({"result": null}));
    }

    #[test]
    fn zbus_errors_reach_qbus_callers_as_framework_errors() {
        let python =
            r#"{"error": ":bye method not found", "stack_trace": ":bye method not found"}"#;
        let frame = from_zbus(1, 400, Some("json"), python.into());
        assert_eq!(
            qbus(&frame),
            json!({"error": {"code": 400, "message": ":bye method not found"}})
        );
        let java = r#"{"error": "boom", "stackTrace": "at Foo.bar"}"#;
        let frame = from_zbus(1, 500, Some("json"), java.into());
        assert_eq!(
            qbus(&frame),
            json!({"error": {"code": 500, "message": "boom", "detail": "at Foo.bar"}})
        );
        let js = r#"{"error": "method(:bye) not found"}"#;
        let frame = from_zbus(1, 200, Some("json"), js.into());
        assert_eq!(qbus(&frame)["error"]["code"], 500);
        let thrown = r#"{"error": {"message": "x is not defined", "name": "ReferenceError"}}"#;
        let frame = from_zbus(1, 200, Some("json"), thrown.into());
        assert_eq!(qbus(&frame)["error"]["message"], "x is not defined");
    }

    #[test]
    fn other_bodies_pass_with_their_status() {
        let text = from_zbus(2, 200, None, "hello server".into());
        assert_eq!(
            (text.header.status, &text.body[..]),
            (200, &b"hello server"[..])
        );
        let failed = from_zbus(2, 500, None, "it broke".into());
        assert_eq!(failed.header.status, 500);
        assert_eq!(failed.header.error.as_deref(), Some("it broke"));
        let back = to_zbus(failed);
        assert_eq!(back.start, StartLine::Status(500));
        assert_eq!(&back.body[..], b"it broke");
        let plain = to_zbus(text);
        assert_eq!(plain.start, StartLine::Status(200));
        assert_eq!(plain.get("content-type"), None);
    }

    #[test]
    fn qbus_replies_reach_zbus_callers_as_zbus_expects() {
        let reply = |status, encoding: Option<&str>, body: Bytes| {
            let header = Header {
                cmd: Command::Call,
                status,
                encoding: encoding.map(str::to_owned),
                ..Header::default()
            };
            Frame::with_body(header, body)
        };
        let ok = to_zbus(reply(
            200,
            Some("json"),
            r#"{"result":"Hello, zbus!"}"#.into(),
        ));
        assert_eq!(zbus(&ok), (200, json!({"result": "Hello, zbus!"})));

        let error = RemoteError::new(ErrorCode::NotFound, "no method bye").with_detail("hello");
        let body = encode(&ResponseOut::<Value>::Error(&error));
        let (status, body) = zbus(&to_zbus(reply(200, Some("json"), body)));
        assert_eq!(status, 404);
        assert_eq!(body["error"], "no method bye");
        assert_eq!(body["stackTrace"], "404 not found: no method bye (hello)");

        // A request that was not JSON gets the server's MessagePack answer, in JSON.
        let packed = rmp_serde::to_vec_named(&ResponseOut::<Value>::Error(&error)).unwrap();
        assert_eq!(zbus(&to_zbus(reply(200, None, packed.into()))).0, 404);

        let late = Frame::new(Header::error(
            Command::Call,
            3,
            Status::DeadlineExceeded,
            "no reply in 10s",
        ));
        let (status, body) = zbus(&to_zbus(late));
        assert_eq!(status, 504);
        assert_eq!(
            body,
            json!({"error": "no reply in 10s", "stackTrace": "no reply in 10s"})
        );
    }

    #[test]
    fn a_zbus_service_answers_a_zbus_caller_through_both_translations() {
        let python =
            r#"{"error": "plus() takes 3 arguments", "stack_trace": "plus() takes 3 arguments"}"#;
        let (status, body) = zbus(&to_zbus(from_zbus(1, 400, Some("json"), python.into())));
        assert_eq!(status, 400);
        assert_eq!(body["error"], "plus() takes 3 arguments");
        let ok = to_zbus(from_zbus(1, 200, Some("json"), r#"{"result": 3}"#.into()));
        assert_eq!(&ok.body[..], br#"{"result": 3}"#);
    }
}
