//! Who an HTTP request comes from and whether it may do what its URL says: credentials in
//! `Authorization` (`Basic` user and password, `Bearer` token), else the connection's peer
//! (TLS certificate, or anonymous where its address is served without credentials); and
//! no state change from another site: a request other than `GET` or `HEAD` that a browser
//! marks as cross-site (`Sec-Fetch-Site: cross-site`, or an `Origin` that is not this
//! broker's own) is refused with 403, so a foreign page's form cannot remove an MQ or take
//! its messages, while `curl` and the monitor page (same origin) pass.

use base64::Engine;
use hyper::header::{AUTHORIZATION, HOST, ORIGIN};
use hyper::http::request::Parts;
use hyper::Method;
use qbus_server_kit::auth::{Denied, Identity, Operation};
use qbus_wire::protocol::Status;

use super::context::Context;
use super::reply::ApiError;
use crate::error::BrokerError;
use crate::metrics::Protocol;

/// The identity of the request's sender; bad credentials are a 401.
pub async fn identify(ctx: &Context, parts: &Parts) -> Result<Option<Identity>, ApiError> {
    let access = &ctx.core.config().access;
    let Some(value) = parts.headers.get(AUTHORIZATION) else {
        return Ok(ctx.peer.identity(access).unwrap_or(None));
    };
    let bad = |why: &str| {
        Denied::Unauthenticated(format!(
            "bad Authorization header: {why} (use Basic with user:password, or Bearer with a \
             token)"
        ))
    };
    let value = value.to_str().map_err(|_| bad("not text"));
    let login = match value.map(|v| v.split_once(' ')) {
        Ok(Some((scheme, basic))) if scheme.eq_ignore_ascii_case("basic") => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(basic.trim())
                .ok()
                .and_then(|raw| String::from_utf8(raw).ok());
            match decoded.as_deref().and_then(|text| text.split_once(':')) {
                Some((user, password)) => access.login_password(ctx.peer.ip, user, password).await,
                None => Err(bad("Basic credentials are not base64 of user:password")),
            }
        }
        Ok(Some((scheme, token))) if scheme.eq_ignore_ascii_case("bearer") => {
            access.login_token(ctx.peer.ip, token.trim()).await
        }
        Ok(_) => Err(bad("unknown scheme")),
        Err(e) => Err(e),
    };
    login.map(Some).map_err(|denied| refused(ctx, denied))
}

/// Checks `op` on `mq` (in `group`) for `who`.
pub fn permit(
    ctx: &Context,
    who: Option<&Identity>,
    op: Operation,
    mq: &str,
    group: Option<&str>,
) -> Result<(), ApiError> {
    let access = &ctx.core.config().access;
    let checked = if op == Operation::Consume {
        // An RPC server of the MQ takes its calls as a consumer does.
        access.check(who, op, mq, group).or_else(|denied| {
            access
                .check(who, Operation::RpcServe, mq, None)
                .map_err(|_| denied)
        })
    } else {
        access.check(who, op, mq, group)
    };
    checked.map_err(|denied| refused(ctx, denied))
}

/// Checks that the request has an identity at all (for lists filtered by it).
pub fn known(ctx: &Context, who: Option<&Identity>) -> Result<(), ApiError> {
    let access = &ctx.core.config().access;
    access
        .check_lists(who)
        .map_err(|denied| refused(ctx, denied))
}

/// Refuses a state-changing request a browser sent from another site.
pub fn same_site(ctx: &Context, parts: &Parts) -> Result<(), ApiError> {
    if parts.method == Method::GET || parts.method == Method::HEAD {
        return Ok(());
    }
    let header = |name| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let cross_site = header("sec-fetch-site").is_some_and(|s| s.eq_ignore_ascii_case("cross-site"));
    let foreign_origin = header(ORIGIN.as_str()).is_some_and(|origin| {
        let host = header(HOST.as_str()).unwrap_or_default();
        origin
            .split_once("://")
            .is_none_or(|(_, authority)| !authority.eq_ignore_ascii_case(host))
    });
    if cross_site || foreign_origin {
        ctx.core.metrics().denied(Protocol::Http, 403);
        return Err(ApiError::new(
            Status::Forbidden,
            format!(
                "{} {} refused: a browser sent it from another site (Origin {:?}); state \
                 changes are taken only from the broker's own pages and from clients that \
                 send no Origin, like curl",
                parts.method,
                parts.uri.path(),
                header(ORIGIN.as_str()).unwrap_or("none"),
            ),
        ));
    }
    Ok(())
}

fn refused(ctx: &Context, denied: Denied) -> ApiError {
    ctx.core.metrics().denied(Protocol::Http, denied.code());
    ApiError::from(BrokerError::Denied(denied))
}
