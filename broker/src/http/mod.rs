//! HTTP/1.1 on the broker port, next to the binary protocol (`docs/http.md`).
//!
//! - [`api`]: the messaging API by plain URLs; [`fields`]: its control fields;
//!   [`body`]: request bodies with a size limit and a deadline.
//! - [`stats`], [`prometheus`], [`monitor`]: `GET /api/stats`, `GET /metrics` and the
//!   monitor page at `GET /`.
//! - [`rpc_gateway`]: `POST /rpc/{mq}`, an MQ-RPC call with a JSON envelope.
//! - [`guard`]: who sent a request (`Authorization`, else the connection's peer), the
//!   permission check, and the refusal of cross-site state changes.
//! - [`reply`]: responses and JSON errors; [`io`]: the deadline on stalled writes;
//!   `context`: what the requests of one connection share.
//!
//! Every request runs the same core functions as the binary protocol; this module only
//! translates.

pub mod api;
pub mod body;
mod context;
pub mod fields;
pub mod guard;
pub mod io;
pub mod monitor;
pub mod prometheus;
pub mod reply;
pub mod rpc_gateway;
pub mod stats;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, WWW_AUTHENTICATE};
use hyper::http::request::Parts;
use hyper::service::service_fn;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use qbus_server_kit::auth::Operation;
use qbus_server_kit::http::serve_connection;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use self::api::Op;
use self::context::Context;
use self::fields::Fields;
use self::reply::{json, ApiError, Reply};
use crate::auth::Peer;
use crate::core::Core;
use crate::metrics::rates::RATE_HISTORY;
use crate::metrics::Protocol;

/// Serves HTTP/1.1 on `stream` until the peer closes it, a timeout ends it (`http-timeout`:
/// a request head or body that does not arrive, an idle keep-alive, a reply nobody reads),
/// or `shutdown` fires.
/// `local` is the address the client reached.
pub async fn serve<S>(
    stream: S,
    peer: Peer,
    local: String,
    core: Arc<Core>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = core.connection_id();
    let span = tracing::info_span!("http", conn, peer = %peer.addr);
    run(stream, conn, peer, local, core, shutdown)
        .instrument(span)
        .await
}

async fn run<S>(
    stream: S,
    conn: u64,
    peer: Peer,
    local: String,
    core: Arc<Core>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _open = core.metrics().connection(Protocol::Http);
    let timeout = core.config().http_timeout;
    let ctx = Arc::new(Context {
        peer,
        core: core.clone(),
        conn,
        local,
    });
    let service = service_fn(move |request| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(&ctx, request).await) }
    });
    let io = TokioIo::new(io::WriteDeadline::new(stream, timeout));
    // The header timeout also runs while a keep-alive connection waits for its next request,
    // so idle connections close after `timeout` too.
    serve_connection(io, service, timeout, &shutdown).await;
    // HTTP clients ack on later connections, so what this one took stays held until acked
    // or timed out; it just stops counting as a consumer.
    core.detach(conn);
}

async fn handle(ctx: &Context, request: Request<Incoming>) -> Reply {
    ctx.core.metrics().http_request();
    let (parts, body) = request.into_parts();
    let mut reply = match route(ctx, &parts, body).await {
        Ok(reply) => reply,
        Err(e) => e.into_reply(),
    };
    if reply.status() == StatusCode::UNAUTHORIZED {
        // So a browser asks for a user name and password.
        reply.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"qbus\", charset=\"UTF-8\""),
        );
    }
    reply
}

async fn route(ctx: &Context, parts: &Parts, body: Incoming) -> Result<Reply, ApiError> {
    let path = parts.uri.path();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = &parts.method;
    let allow = |allowed: &[Method]| -> Result<(), ApiError> {
        if allowed.contains(method) {
            Ok(())
        } else {
            Err(ApiError::not_allowed(parts, allowed))
        }
    };
    // /metrics stays open to scrapers (docs/http.md, "Security"); the page itself holds no
    // data, what it shows comes from /api/stats.
    let open = matches!(segments.as_slice(), [] | ["metrics"]);
    let who = if open {
        None
    } else {
        guard::same_site(ctx, parts)?;
        guard::identify(ctx, parts).await?
    };
    let who = who.as_ref();
    let permit = |op, mq: &str, group: Option<&str>| guard::permit(ctx, who, op, mq, group);
    match segments.as_slice() {
        [] => {
            if Fields::new(parts)?.get("cmd")?.is_some() {
                // The first request of a connection decides its door (`zbus::sniff`); this
                // one began as plain HTTP.
                return Err(ApiError::bad_request(
                    "a zbus command (cmd) must come first on its connection: open a new one \
                     for zbus (docs/zbus.md)",
                ));
            }
            allow(&[Method::GET, Method::HEAD])?;
            Ok(monitor::page())
        }
        ["api", "stats"] => {
            allow(&[Method::GET, Method::HEAD])?;
            let seconds = Fields::new(parts)?
                .parse::<usize>("history", "a number of seconds")?
                .unwrap_or(1)
                .min(RATE_HISTORY);
            guard::known(ctx, who)?;
            let mut stats = stats::collect(&ctx.core, ctx.local.clone(), seconds);
            let access = &ctx.core.config().access;
            stats
                .mqs
                .retain(|mq| access.allows(who, Operation::Read, &mq.info.name));
            for mq in &mut stats.mqs {
                mq.admin = Some(access.allows(who, Operation::Admin, &mq.info.name));
            }
            stats.broker.user = who.map(|who| who.name().to_owned());
            Ok(json(StatusCode::OK, &stats))
        }
        ["metrics"] => {
            allow(&[Method::GET, Method::HEAD])?;
            let stats = stats::collect(&ctx.core, ctx.local.clone(), 0);
            let text = Bytes::from(prometheus::render(&stats));
            Ok(reply::bytes(StatusCode::OK, prometheus::CONTENT_TYPE, text))
        }
        ["mq"] => {
            allow(&[Method::GET])?;
            guard::known(ctx, who)?;
            api::run(ctx, who, Op::List, "", parts, body).await
        }
        ["mq", mq] => {
            let (op, needs) = match *method {
                Method::GET => (Op::Query, Operation::Read),
                Method::PUT => (Op::Create, Operation::Admin),
                Method::POST => (Op::Produce, Operation::Produce),
                Method::DELETE => (Op::Remove, Operation::Admin),
                _ => {
                    let allowed = [Method::GET, Method::PUT, Method::POST, Method::DELETE];
                    return Err(ApiError::not_allowed(parts, &allowed));
                }
            };
            permit(needs, mq, None)?;
            api::run(ctx, who, op, mq, parts, body).await
        }
        ["mq", mq, action] => {
            let op = match *action {
                // A consume changes state (it takes the message), so never by GET: a page
                // could make a browser GET a URL with an <img> tag.
                "next" => Op::Consume,
                "ack" => Op::Ack,
                "nack" => Op::Nack,
                _ => return Err(ApiError::no_route(parts)),
            };
            allow(&[Method::POST])?;
            let fields = Fields::new(parts)?;
            let group = fields.get("group")?.filter(|g| !g.is_empty()).unwrap_or(mq);
            permit(Operation::Consume, mq, Some(group))?;
            api::run(ctx, who, op, mq, parts, body).await
        }
        ["mq", mq, "groups", group] => {
            allow(&[Method::DELETE])?;
            permit(Operation::Admin, mq, None)?;
            api::remove_group(ctx, mq, group).await
        }
        ["rpc", mq] => match permit(Operation::RpcCall, mq, None) {
            Ok(()) => Ok(rpc_gateway::call(ctx, mq, parts, body).await),
            Err(refused) => Ok(rpc_gateway::refused(refused)),
        },
        _ => Err(ApiError::no_route(parts)),
    }
}
