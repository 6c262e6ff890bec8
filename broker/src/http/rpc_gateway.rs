//! The RPC gateway, `POST /rpc/{mq}` (`docs/http.md`, "RPC gateway"): an HTTP caller's JSON
//! request envelope goes to the MQ-RPC service consuming `mq` by the path a binary `Call`
//! takes ([`call::call_once`]: the same checks, reply table and deadline), and the
//! service's JSON response envelope comes back as the reply.
//!
//! Every failure, the service's or the broker's, answers in the envelope's error shape,
//! `{"error": {"code": ..., "message": ..., "detail": ...}}`, with the code as the HTTP
//! status. A method's own `Err` is a result like any other (`200`, `{"result": {"Err": ...}}`).

use hyper::body::Incoming;
use hyper::http::request::Parts;
use hyper::{Method, StatusCode};
use qbus_wire::protocol::rpc::{
    ErrorCode, RemoteError, RequestHead, RequestOut, RequestParams, ResponseIn, ResponseOut,
};
use qbus_wire::protocol::{Command, Frame, Header, Status};
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use tracing::Instrument;

use super::context::Context;
use super::fields::Fields;
use super::reply::{self, ApiError, Reply, JSON};
use super::{api, body};
use crate::rpc::call::{self, Refusal};
use crate::rpc::reply_table::MAX_ROUTE_LEN;

/// The `encoding` of the calls the gateway makes (`docs/protocol.md`, "RPC commands").
const ENCODING: &str = "json";

/// Runs `POST /rpc/{mq}`: the call in the body, its deadline from the `timeout` field (ms),
/// else the envelope's `timeout_ms`, else 10 s.
pub async fn call(ctx: &Context, mq: &str, parts: &Parts, body: Incoming) -> Reply {
    let span = tracing::debug_span!("rpc_gateway", mq);
    match forward(ctx, mq, parts, body).instrument(span).await {
        Ok(reply) => reply,
        Err(error) => {
            tracing::debug!(mq, error = %error, "RPC gateway call failed");
            reply::json(http_status(error.code), &ResponseOut::<()>::Error(&error))
        }
    }
}

/// The reply to a call the permission check refused, in the envelope's error shape.
pub fn refused(refusal: ApiError) -> Reply {
    let error = RemoteError::from(refusal);
    reply::json(http_status(error.code), &ResponseOut::<()>::Error(&error))
}

async fn forward(
    ctx: &Context,
    mq: &str,
    parts: &Parts,
    body: Incoming,
) -> Result<Reply, RemoteError> {
    if parts.method != Method::POST {
        return Err(ApiError::not_allowed(parts, &[Method::POST]).into());
    }
    let asked = Fields::new(parts)?.parse::<u64>("timeout", "a deadline in milliseconds")?;
    let config = ctx.core.config();
    // The call is stored as a record tagged with its encoding and keyed by its reply route.
    let limit = api::body_limit(config.max_frame, ENCODING.len() + MAX_ROUTE_LEN);
    let raw = body::read(parts, body, limit, api::BODY_LIMIT, config.http_timeout).await?;

    // Head and params are read apart, as a service reads them; the params stay the JSON
    // text the caller wrote, for the service to decode against the method's types.
    let not_envelope = |e: serde_json::Error| {
        RemoteError::new(
            ErrorCode::BadRequest,
            "the body is not a JSON request envelope {\"module\", \"method\", \"params\"}",
        )
        .with_detail(e.to_string())
    };
    let head: RequestHead<'_> = serde_json::from_slice(&raw).map_err(not_envelope)?;
    let params: RequestParams<&RawValue> = serde_json::from_slice(&raw).map_err(not_envelope)?;
    let timeout = call::call_timeout(
        asked
            .or(head.timeout_ms)
            .map(|ms| u32::try_from(ms).unwrap_or(u32::MAX)),
    );
    // The deadline travels in the envelope too, so the service stops when the caller does.
    let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    let envelope = serde_json::to_vec(&RequestOut {
        module: &head.module,
        method: &head.method,
        params: params.params,
        timeout_ms: timeout_ms.into(),
    })
    .map_err(|e| {
        RemoteError::new(ErrorCode::Internal, "cannot re-encode the request envelope")
            .with_detail(e.to_string())
    })?;
    // Writing the deadline in may have grown the envelope past what the body could be.
    if envelope.len() > limit {
        return Err(RemoteError::new(
            ErrorCode::Other(StatusCode::PAYLOAD_TOO_LARGE.as_u16()),
            format!(
                "the request envelope of {} bytes with its timeout_ms exceeds the limit of \
                 {limit} bytes ({})",
                envelope.len(),
                api::BODY_LIMIT
            ),
        ));
    }

    let mut header = Header::request(Command::Call, Some(mq));
    header.timeout_ms = Some(timeout_ms);
    header.encoding = Some(ENCODING.to_owned());
    tracing::debug!(module = %head.module, method = %head.method, ?timeout, "calling");
    let core = &ctx.core;
    let reply = call::call_once(
        core.registry(),
        core.replies(),
        core.committer(),
        core.connection_id(),
        Frame::with_body(header, envelope.into()),
    )
    .await?;

    // The service's envelope goes back as it came; only its kind sets the status.
    let status = match serde_json::from_slice::<ResponseIn<IgnoredAny>>(&reply.body) {
        Ok(ResponseIn::Result(_)) => StatusCode::OK,
        Ok(ResponseIn::Error(error)) => http_status(error.code),
        Err(e) => {
            return Err(RemoteError::new(
                ErrorCode::Other(StatusCode::BAD_GATEWAY.as_u16()),
                format!("the responder on MQ {mq:?} did not reply with a JSON response envelope"),
            )
            .with_detail(e.to_string()))
        }
    };
    Ok(reply::bytes(status, JSON, reply.body))
}

/// The HTTP status of an error: its code, since the codes follow HTTP; `502` for a code
/// that is no HTTP error status (from a foreign responder), which the gateway cannot name.
fn http_status(code: ErrorCode) -> StatusCode {
    StatusCode::from_u16(code.into())
        .ok()
        .filter(|status| status.is_client_error() || status.is_server_error())
        .unwrap_or(StatusCode::BAD_GATEWAY)
}

impl From<Refusal> for RemoteError {
    /// The detail tells the caller the broker answered, not a service, and whether the call
    /// may have run: what it needs to know before retrying.
    fn from(refusal: Refusal) -> RemoteError {
        let detail = if refusal.status() == Status::DeadlineExceeded {
            "from the broker: no reply came back in time; a service may still have run the call"
        } else {
            "from the broker: no service ran the call"
        };
        RemoteError::new(refusal.status().code().into(), refusal.message()).with_detail(detail)
    }
}

impl From<ApiError> for RemoteError {
    fn from(error: ApiError) -> RemoteError {
        RemoteError::new(error.status().as_u16().into(), error.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_http_statuses_and_foreign_ones_are_502() {
        assert_eq!(http_status(ErrorCode::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(
            http_status(ErrorCode::DeadlineExceeded),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            http_status(ErrorCode::Other(413)),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        for foreign in [200, 299, 42, 1000] {
            assert_eq!(
                http_status(ErrorCode::Other(foreign)),
                StatusCode::BAD_GATEWAY
            );
        }
    }
}
