//! One binary-protocol connection to the tracker: a broker reporting, a client subscribed
//! to the topology, or a one-shot query. When the connection ends, the nodes that reported
//! on it are dropped at once.
//!
//! A peer logs in with the credentials of its `Hello` (or is anonymous where its address is
//! served without them). Reporting needs the `register` permission on the node's id, and
//! the table refuses a node whose id or address another identity registered; subscribing
//! and querying need a user (or an anonymous with some `read` rule), and what they get is
//! filtered to the MQs the user may use.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use qbus_server_kit::auth::{Access, Denied, Identity, Operation};
use qbus_wire::link::{FrameSender, Link};
use qbus_wire::protocol::{
    Command, Credentials, Frame, Header, ServerInfo, Status, DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};
use qbus_wire::serve::{hello_reply, next_frame};
use qbus_wire::topology::{NodeState, TopologyUpdate};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::table::{Published, ReportError, Table};

/// A connection silent this long is closed (reporters and subscribers heartbeat far more
/// often).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves one link until the peer closes it, it fails, or `shutdown` fires.
pub async fn serve(
    table: Arc<Table>,
    access: Arc<Access>,
    link: Link,
    conn: u64,
    peer: SocketAddr,
    certificate: Option<String>,
    shutdown: CancellationToken,
) {
    let span = tracing::info_span!("session", conn, %peer, certificate = certificate.as_deref());
    run(table, access, link, conn, peer.ip(), certificate, shutdown)
        .instrument(span)
        .await
}

async fn run(
    table: Arc<Table>,
    access: Arc<Access>,
    link: Link,
    conn: u64,
    ip: IpAddr,
    certificate: Option<String>,
    shutdown: CancellationToken,
) {
    let Link {
        tx: out,
        rx: mut inbound,
    } = link;
    let mut forwarder: Option<JoinHandle<()>> = None;
    // A verified client certificate names its user; one that names no user is served as
    // any peer from its address.
    let mut identity = certificate
        .and_then(|name| access.certificate(&name).ok())
        .or_else(|| access.anonymous(Some(ip)));
    while let Some(frame) = next_frame(&mut inbound, &out, IDLE_TIMEOUT, &shutdown).await {
        if frame.header.is_reply() {
            continue;
        }
        let request = &frame.header;
        let refused = |denied: Denied| {
            tracing::warn!(cmd = ?request.cmd, error = %denied, "refused");
            let status = Status::from_code(denied.code());
            Frame::new(Header::error(
                request.cmd,
                request.id,
                status,
                denied.to_string(),
            ))
        };
        let permitted = match request.cmd {
            Command::Hello => match hello(&access, ip, &frame).await {
                Ok(Some(who)) => {
                    identity = Some(who);
                    Ok(())
                }
                Ok(None) => Ok(()),
                Err(denied) => Err(denied),
            },
            Command::Subscribe | Command::QueryTopology => access.check_lists(identity.as_ref()),
            Command::Report => match rmp_serde::from_slice::<NodeState>(&frame.body) {
                Ok(state) => access.check(identity.as_ref(), Operation::Register, &state.id, None),
                // The handler says what is wrong with it.
                Err(_) => Ok(()),
            },
            _ => Ok(()),
        };
        if let Err(denied) = permitted {
            if out.send(refused(denied)).await.is_err() {
                break;
            }
            continue;
        }
        let owner = identity.as_ref().map_or("anonymous", Identity::name);
        let reply = match frame.header.cmd {
            Command::Hello => hello_reply(
                request,
                env!("CARGO_PKG_VERSION"),
                DEFAULT_MAX_FRAME,
                identity.as_ref().map(Identity::name),
            ),
            Command::Subscribe => {
                let (snapshot, updates) = table.subscribe();
                if let Some(old) = forwarder.take() {
                    old.abort();
                }
                let view = View::of(&access, identity.as_ref());
                let reply = snapshot_reply(&frame.header, snapshot.clone(), view.as_ref());
                // The snapshot reply is queued before the forwarder can queue a change.
                if out.send(reply).await.is_err() {
                    break;
                }
                forwarder = Some(tokio::spawn(forward(
                    table.clone(),
                    snapshot.seq,
                    updates,
                    out.clone(),
                    view,
                )));
                continue;
            }
            Command::QueryTopology => {
                let view = View::of(&access, identity.as_ref());
                snapshot_reply(request, table.snapshot(), view.as_ref())
            }
            _ => handle(&table, conn, owner, frame),
        };
        if out.send(reply).await.is_err() {
            break;
        }
    }
    if let Some(forwarder) = forwarder {
        forwarder.abort();
    }
    table.disconnect(conn);
}

/// Logs the peer in with the credentials of its `Hello`, if it gave any.
async fn hello(
    access: &Arc<Access>,
    ip: IpAddr,
    frame: &Frame,
) -> Result<Option<Identity>, Denied> {
    let credentials = rmp_serde::from_slice::<ServerInfo>(&frame.body)
        .ok()
        .and_then(|hello| hello.credentials);
    let ip = Some(ip);
    match credentials {
        None => Ok(None),
        Some(Credentials::Password { user, password }) => {
            access.login_password(ip, &user, &password).await.map(Some)
        }
        Some(Credentials::Token { token }) => access.login_token(ip, &token).await.map(Some),
    }
}

/// The reply to every request but `Hello` and `Subscribe`, from `owner`.
fn handle(table: &Table, conn: u64, owner: &str, frame: Frame) -> Frame {
    let request = &frame.header;
    let error = |status, message: String| {
        Frame::new(Header::error(request.cmd, request.id, status, message))
    };
    match request.cmd {
        Command::Heartbeat => Frame::new(Header::reply_to(request)),
        Command::Report => {
            table.metrics().report_received();
            match rmp_serde::from_slice::<NodeState>(&frame.body) {
                Ok(state) => match table.report(conn, state, Instant::now(), owner) {
                    Ok(()) => Frame::new(Header::reply_to(request)),
                    Err(e @ ReportError::Claimed { .. }) => {
                        tracing::warn!(identity = owner, error = %e, "report refused");
                        error(Status::Forbidden, e.to_string())
                    }
                    Err(e) => error(Status::BadRequest, e.to_string()),
                },
                Err(e) => error(
                    Status::BadRequest,
                    format!("report body is not a NodeState map: {e}"),
                ),
            }
        }
        Command::TopologyUpdate => error(
            Status::BadRequest,
            "TopologyUpdate is sent by trackers, not to them".into(),
        ),
        Command::Unknown(code) => error(
            Status::UnknownCommand,
            format!("unknown command {code} (this tracker speaks protocol {PROTOCOL_VERSION})"),
        ),
        other => error(
            Status::UnknownCommand,
            format!(
                "{other:?} is not a tracker command; this is a tracker (send it to a qbus-broker)"
            ),
        ),
    }
}

/// What one client may see of the topology: every node, each with only the MQs the
/// client may use. `None` on a tracker without users, where everyone sees everything.
struct View {
    access: Arc<Access>,
    who: Option<Identity>,
}

impl View {
    fn of(access: &Arc<Access>, who: Option<&Identity>) -> Option<View> {
        access.has_users().then(|| View {
            access: access.clone(),
            who: who.cloned(),
        })
    }

    fn filter(&self, update: &mut TopologyUpdate) {
        for node in &mut update.brokers {
            node.mqs
                .retain(|mq| self.access.may_use(self.who.as_ref(), &mq.name));
        }
    }

    /// A published change, filtered: decoded, filtered and encoded again.
    fn body(&self, body: Bytes) -> Result<Bytes, String> {
        let mut update: TopologyUpdate = rmp_serde::from_slice(&body).map_err(|e| e.to_string())?;
        self.filter(&mut update);
        rmp_serde::to_vec_named(&update)
            .map(Bytes::from)
            .map_err(|e| e.to_string())
    }
}

fn snapshot_reply(request: &Header, mut snapshot: TopologyUpdate, view: Option<&View>) -> Frame {
    if let Some(view) = view {
        view.filter(&mut snapshot);
    }
    match rmp_serde::to_vec_named(&snapshot) {
        Ok(body) => Frame::with_body(Header::reply_to(request), body.into()),
        Err(e) => Frame::new(Header::error(
            request.cmd,
            request.id,
            Status::Internal,
            e.to_string(),
        )),
    }
}

/// Pushes every change after `seq` to the subscriber; one that falls too far behind gets a
/// fresh snapshot instead of the changes it missed.
async fn forward(
    table: Arc<Table>,
    mut seq: u64,
    mut updates: broadcast::Receiver<Arc<Published>>,
    out: FrameSender,
    view: Option<View>,
) {
    loop {
        let body = match updates.recv().await {
            Ok(update) if update.seq <= seq => continue,
            Ok(update) => {
                seq = update.seq;
                update.body.clone()
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "subscriber fell behind; sending a snapshot");
                let (mut snapshot, fresh) = table.subscribe();
                updates = fresh;
                seq = snapshot.seq;
                if let Some(view) = &view {
                    view.filter(&mut snapshot);
                }
                match rmp_serde::to_vec_named(&snapshot) {
                    Ok(body) => body.into(),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot encode a snapshot");
                        return;
                    }
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let body = match &view {
            Some(view) => match view.body(body) {
                Ok(body) => body,
                Err(e) => {
                    tracing::error!(error = %e, "cannot filter a topology change");
                    return;
                }
            },
            None => body,
        };
        let push = Frame::with_body(Header::request(Command::TopologyUpdate, None), body);
        if out.send(push).await.is_err() {
            return;
        }
        table.metrics().update_pushed();
    }
}
