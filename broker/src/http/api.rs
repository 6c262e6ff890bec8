//! The HTTP messaging API (`docs/http.md`): produce, consume, ack, nack and MQ
//! administration by plain URLs, control fields in headers or query parameters, payload in
//! the body. Each URL names an [`Op`], which calls the same registry functions as the
//! binary protocol. (Requests naming a `cmd` speak zbus: `crate::zbus`.)

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::http::request::Parts;
use hyper::{Response, StatusCode};
use qbus_server_kit::auth::{Identity, Operation};
use qbus_wire::protocol::record::{encode_record_meta, parse_record, RecordMeta, RECORD_OVERHEAD};
use qbus_wire::protocol::{DeliveryToken, MqOptions, Status};
use serde::Serialize;

use super::body;
use super::context::Context;
use super::fields::Fields;
use super::reply::{json, ApiError, Reply};
use super::stats::MqStats;
use crate::core::FetchRequest;
use crate::error::BrokerError;
use crate::queue::group::Start;

/// Room left in `max-frame` for the binary frame header, so a message produced over HTTP can
/// also be fetched over the binary protocol.
const FRAME_HEADER_ROOM: usize = 512;
/// Largest JSON body of a create (MQ options are three small fields).
const MAX_OPTIONS_BODY: usize = 64 * 1024;
/// What [`body_limit`] is, as errors name it.
pub(crate) const BODY_LIMIT: &str = "max-frame less the record and frame headers";

/// Largest body of a message whose tag and key take `tag_and_key` bytes: `max-frame` less
/// the record header and room for the frame header, so the message can also be fetched
/// over the binary protocol.
pub(crate) fn body_limit(max_frame: usize, tag_and_key: usize) -> usize {
    max_frame.saturating_sub(FRAME_HEADER_ROOM + RECORD_OVERHEAD + tag_and_key)
}

/// A messaging operation, implied by the URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Append the body as one message.
    Produce,
    /// Take the next message for a group, waiting up to `timeout` ms.
    Consume,
    /// Acknowledge deliveries.
    Ack,
    /// Give deliveries back for immediate redelivery.
    Nack,
    /// Create an MQ (options in an optional JSON body).
    Create,
    /// Describe an MQ.
    Query,
    /// Delete an MQ and its data.
    Remove,
    /// Describe every MQ.
    List,
}

/// Runs `op` on `mq`, the MQ named in the URL (empty for [`Op::List`]).
pub async fn run(
    ctx: &Context,
    who: Option<&Identity>,
    op: Op,
    mq: &str,
    parts: &Parts,
    body: Incoming,
) -> Result<Reply, ApiError> {
    let fields = Fields::new(parts)?;
    match op {
        Op::Produce => produce(ctx, mq, &fields, parts, body).await,
        Op::Consume => consume(ctx, mq, &fields).await,
        Op::Ack => {
            let tokens = tokens(&fields)?;
            let (acked, durability) = ctx
                .core
                .registry()
                .ack(mq, fields.get("group")?, &tokens)
                .await?;
            Ok(json(
                StatusCode::OK,
                &Acked {
                    acked,
                    durability: durability.to_string(),
                },
            ))
        }
        Op::Nack => {
            let tokens = tokens(&fields)?;
            let released = ctx
                .core
                .registry()
                .nack(mq, fields.get("group")?, &tokens, false)?;
            Ok(json(StatusCode::OK, &Released { released }))
        }
        Op::Create => {
            let options = options(ctx, parts, body).await?;
            let created = ctx.core.create(mq, options).await?;
            Ok(json(StatusCode::OK, &MqStats::of(&created)))
        }
        Op::Query => {
            let found = ctx.core.registry().get(mq)?;
            Ok(json(StatusCode::OK, &MqStats::of(&found)))
        }
        Op::Remove => {
            ctx.core.remove(mq).await?;
            Ok(json(StatusCode::OK, &Removed { removed: mq }))
        }
        Op::List => {
            let access = &ctx.core.config().access;
            let all: Vec<MqStats> = ctx
                .core
                .registry()
                .list()
                .iter()
                .filter(|m| access.allows(who, Operation::Read, m.name()))
                .map(|m| MqStats::of(m))
                .collect();
            Ok(json(StatusCode::OK, &all))
        }
    }
}

/// Reply to a produce.
#[derive(Serialize)]
struct Receipt<'a> {
    mq: &'a str,
    offset: u64,
    count: u64,
    durability: String,
    /// The message repeated a dedupe id stored within the window: `offset` is the first's.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

#[derive(Serialize)]
struct Acked {
    acked: usize,
    durability: String,
}

#[derive(Serialize)]
struct Released {
    released: usize,
}

#[derive(Serialize)]
struct Removed<'a> {
    removed: &'a str,
}

/// Deletes consumer group `group` of `mq` (`DELETE /mq/{mq}/groups/{group}`).
pub async fn remove_group(ctx: &Context, mq: &str, group: &str) -> Result<Reply, ApiError> {
    ctx.core.remove_group(mq, group).await?;
    Ok(json(StatusCode::OK, &Removed { removed: group }))
}

async fn produce(
    ctx: &Context,
    mq_name: &str,
    fields: &Fields<'_>,
    parts: &Parts,
    body: Incoming,
) -> Result<Reply, ApiError> {
    let tag = fields.get("tag")?.filter(|t| !t.is_empty());
    let key = fields.get("key")?.filter(|k| !k.is_empty());
    let dedupe_id = fields.get("dedupe-id")?.filter(|d| !d.is_empty());
    // Before reading the body: an unknown MQ should not cost an upload.
    let mq = ctx.core.registry().get(mq_name)?;
    let replicated = mq.replicated_by_default();
    if replicated {
        mq.admit_replicated().map_err(BrokerError::from)?;
    }
    let (tag_len, key_len) = (
        tag.map_or(0, str::len),
        key.map_or(0, str::len) + dedupe_id.map_or(0, |d| d.len() + 1),
    );
    let limit = body_limit(ctx.core.config().max_frame, tag_len + key_len);
    let payload = body::read(
        parts,
        body,
        limit,
        BODY_LIMIT,
        ctx.core.config().http_timeout,
    )
    .await?;
    let (deliver_at, expires_at) = times(fields)?;
    let meta = RecordMeta {
        tag,
        key,
        deliver_at,
        expires_at,
        dedupe_id,
        ..RecordMeta::default()
    };
    let mut record =
        BytesMut::with_capacity(RECORD_OVERHEAD + 16 + tag_len + key_len + payload.len());
    encode_record_meta(&mut record, 0, 0, &meta, &payload)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if deliver_at.is_some() {
        ctx.core.registry().enable_delays(&mq).await?;
    }
    let receipt = mq
        .produce(
            ctx.core.committer(),
            record.freeze(),
            1,
            dedupe_id.is_some(),
        )
        .await?;
    let receipt = if replicated {
        mq.confirm_replicated(receipt).await?
    } else {
        receipt
    };
    Ok(json(
        StatusCode::OK,
        &Receipt {
            mq: mq_name,
            offset: receipt.first_offset,
            count: receipt.count,
            durability: receipt.durability.to_string(),
            duplicate: !receipt.offsets.is_empty(),
        },
    ))
}

/// The `deliver-at`/`delay` and `ttl` fields of a produce as record times (ms since the
/// epoch): a delay counts from now on the broker's clock, a TTL from when the message may
/// be delivered.
fn times(fields: &Fields<'_>) -> Result<(Option<u64>, Option<u64>), ApiError> {
    let duration = |name: &str| -> Result<Option<u64>, ApiError> {
        fields
            .get(name)?
            .filter(|v| !v.is_empty())
            .map(|v| {
                let ms = match v.parse::<u64>() {
                    Ok(ms) => Ok(std::time::Duration::from_millis(ms)),
                    Err(_) => qbus_server_kit::units::parse_duration(v),
                };
                ms.map(|d| d.as_millis().min(u128::from(u64::MAX >> 2)) as u64)
                    .map_err(|e| ApiError::bad_request(format!("{name}: {e}")))
            })
            .transpose()
    };
    let now = qbus_wire::now_ms();
    let at = fields.parse::<u64>("deliver-at", "a time in ms since the Unix epoch")?;
    let deliver_at = match (at, duration("delay")?) {
        (Some(at), _) => Some(at.min(u64::MAX >> 2)),
        (None, Some(delay)) => Some(now.saturating_add(delay)),
        (None, None) => None,
    };
    let expires_at = duration("ttl")?.map(|ttl| deliver_at.unwrap_or(now).saturating_add(ttl));
    Ok((deliver_at, expires_at))
}

async fn consume(ctx: &Context, mq: &str, fields: &Fields<'_>) -> Result<Reply, ApiError> {
    let wait_ms = fields
        .parse::<u64>("timeout", "a wait in milliseconds")?
        .unwrap_or(0);
    let start = match fields.get("start")? {
        None | Some("earliest") => Start::Earliest,
        Some("latest") => Start::Latest,
        Some(offset) => Start::Offset(offset.parse().map_err(|_| {
            ApiError::bad_request(format!(
                "start {offset:?} is not earliest, latest or an offset"
            ))
        })?),
    };
    let group = fields.get("group")?.filter(|g| !g.is_empty());
    let request = FetchRequest {
        mq,
        group,
        tag: fields.get("tag")?.filter(|t| !t.is_empty()),
        start,
        count: 1,
        wait: Duration::from_millis(wait_ms),
        // Told in /api/stats and the log; a plain HTTP fetch has no way to say it.
        report_loss: false,
    };
    let fetched = ctx.core.fetch(ctx.conn, &request).await?;
    let Some(&attempt) = fetched.attempts.first() else {
        let mut empty = Response::new(Full::new(Bytes::new()));
        *empty.status_mut() = StatusCode::NO_CONTENT;
        return Ok(empty);
    };
    let record = parse_record(&fetched.body)
        .map_err(|e| ApiError::new(Status::Internal, format!("stored record unreadable: {e}")))?;
    let mut reply = Response::new(Full::new(fetched.body.slice(record.body_range.clone())));
    let headers = reply.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    let token = DeliveryToken {
        offset: record.offset,
        attempt,
    };
    let mut set = |name: &'static str, value: &str| {
        headers.insert(HeaderName::from_static(name), header_value(value));
    };
    set("mq", mq);
    set("group", group.unwrap_or(mq));
    set("offset", &record.offset.to_string());
    set("attempt", &attempt.to_string());
    set("token", &format_token(token));
    set("timestamp", &record.timestamp_ms.to_string());
    if let Some(tag) = record.tag {
        set("tag", tag);
    }
    if let Some(key) = record.key {
        set("key", key);
    }
    if let Some(original) = record.copy_of() {
        set("delayed-from", &original.to_string());
    }
    if let Some(at) = record.expires_at {
        set("expires-at", &at.to_string());
    }
    if let Some(dedupe_id) = record.dedupe_id {
        set("dedupe-id", dedupe_id);
    }
    Ok(reply)
}

/// A header value for text that may hold anything UTF-8. Control characters cannot go in
/// a header, so they (and `%`, to keep the mapping reversible) are percent-encoded.
fn header_value(text: &str) -> HeaderValue {
    let needs_escape = |b: u8| (b < 0x20 && b != b'\t') || b == 0x7f || b == b'%';
    let escaped: String = if text.bytes().any(needs_escape) {
        text.chars()
            .map(|c| match u8::try_from(c) {
                Ok(b) if needs_escape(b) => format!("%{b:02X}"),
                _ => c.to_string(),
            })
            .collect()
    } else {
        text.to_owned()
    };
    HeaderValue::from_str(&escaped).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// A delivery token as text: `offset:attempt`.
fn format_token(token: DeliveryToken) -> String {
    format!("{}:{}", token.offset, token.attempt)
}

/// The `token` field: one or more `offset:attempt`, comma-separated.
fn tokens(fields: &Fields<'_>) -> Result<Vec<DeliveryToken>, ApiError> {
    parse_tokens(fields.required("token")?)
}

fn parse_tokens(list: &str) -> Result<Vec<DeliveryToken>, ApiError> {
    list.split(',')
        .map(|text| {
            let text = text.trim();
            text.split_once(':')
                .and_then(|(offset, attempt)| {
                    Some(DeliveryToken {
                        offset: offset.parse().ok()?,
                        attempt: attempt.parse().ok()?,
                    })
                })
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "token {text:?} is not offset:attempt (as in the token header of a \
                         consumed message)"
                    ))
                })
        })
        .collect()
}

/// MQ options from a JSON body; an empty body means the broker's defaults.
async fn options(ctx: &Context, parts: &Parts, body: Incoming) -> Result<MqOptions, ApiError> {
    let deadline = ctx.core.config().http_timeout;
    let raw = body::read(parts, body, MAX_OPTIONS_BODY, "MQ options", deadline).await?;
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Ok(MqOptions::default());
    }
    serde_json::from_slice(&raw).map_err(|e| {
        ApiError::bad_request(format!(
            "bad MQ options: {e} (expected JSON like {{\"ack_timeout_ms\": 30000, \
             \"max_deliveries\": 16, \"dead_letter_mq\": \"orders.DLQ\"}})"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_escape_control_characters_only() {
        assert_eq!(header_value("café tag").as_bytes(), "café tag".as_bytes());
        assert_eq!(header_value("a\nb%").as_bytes(), b"a%0Ab%25");
    }

    #[test]
    fn tokens_round_trip_as_text() {
        let token = |offset, attempt| DeliveryToken { offset, attempt };
        assert_eq!(format_token(token(41, 2)), "41:2");
        assert_eq!(
            parse_tokens("41:2, 7:1").unwrap(),
            vec![token(41, 2), token(7, 1)]
        );
        for bad in ["41", "41:", "x:1", "1:2:3", ""] {
            assert!(parse_tokens(bad).is_err(), "{bad:?}");
        }
    }
}
