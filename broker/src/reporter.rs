//! Reporting this broker to the trackers (`--tracker`): its advertised address, start epoch,
//! and every MQ with its depth and groups. A new report goes out within 100 ms of a change
//! (MQ created or removed, group created, consumer joined or left) and every
//! `--report-interval` (2 s by default) with fresh depths; the trackers drop the broker when
//! its connection closes or it misses its reports. The sending itself (one connection per
//! tracker, retried every interval) is the client crate's `qbus_client::reporter`.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use qbus_client::reporter;
use qbus_wire::now_ms;
use qbus_wire::topology::{CopyState, GroupState, MqState, NodeKind, NodeState};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Reporting;
use crate::core::Core;

/// Changes arriving together are reported together: the first one waits this long.
const DEBOUNCE: Duration = Duration::from_millis(40);

/// The address clients should use: `--advertise`, else the listen address with its
/// unspecified IP (0.0.0.0) replaced by the local address facing the first tracker.
pub fn advertised(reporting: &Reporting, listening: SocketAddr) -> String {
    if let Some(addr) = &reporting.advertise {
        return addr.clone();
    }
    let ip = if listening.ip().is_unspecified() {
        reporting
            .trackers
            .first()
            .and_then(|tracker| facing(tracker))
            .unwrap_or(IpAddr::from([127, 0, 0, 1]))
    } else {
        listening.ip()
    };
    SocketAddr::new(ip, listening.port()).to_string()
}

/// Reports `core`'s MQs as `addr` to the trackers of `reporting` until `stop` fires (the
/// trackers then drop the broker).
pub async fn run(reporting: Reporting, core: Arc<Core>, addr: String, stop: CancellationToken) {
    let epoch = now_ms();
    tracing::info!(advertise = %addr, trackers = ?reporting.trackers, interval = ?reporting.interval, "reporting to trackers");
    let mut changes = core.watch_changes();
    let (publish, state) = watch::channel(Arc::new(NodeState {
        id: addr.clone(),
        addr,
        kind: NodeKind::Broker,
        epoch,
        seq: 1,
        report_interval_ms: reporting.interval.as_millis() as u64,
        mqs: mqs(&core),
        services: Vec::new(),
        copies: copies(&core),
    }));
    let sending = tokio::spawn(reporter::report(
        reporting.trackers,
        core.config().tracker_tls.clone(),
        reporting.credentials,
        state,
        reporting.interval,
        stop.clone(),
    ));
    let mut tick = tokio::time::interval(reporting.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(DEBOUNCE) => {}
                    _ = stop.cancelled() => break,
                }
                changes.borrow_and_update();
            }
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        let (now, copies_now) = (mqs(&core), copies(&core));
        let changed = {
            let state = publish.borrow();
            now != state.mqs || copies_now != state.copies
        };
        if changed {
            publish.send_modify(|state| {
                let state = Arc::make_mut(state);
                state.seq += 1;
                state.mqs = now;
                state.copies = copies_now;
            });
        }
    }
    drop(publish);
    let _ = sending.await;
}

/// The local IP the OS would use to reach `tracker` (no packet is sent).
fn facing(tracker: &str) -> Option<IpAddr> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect(tracker).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

/// The follower copies this broker holds, as the trackers see them.
fn copies(core: &Core) -> Vec<CopyState> {
    core.registry()
        .copies()
        .list()
        .iter()
        .filter_map(|copy| {
            let (mq, leader) = copy.name().split_once('@')?;
            Some(CopyState {
                leader: leader.to_owned(),
                mq: mq.to_owned(),
                end: copy.reader().end_offset(),
            })
        })
        .collect()
}

/// Every MQ as the trackers see it.
fn mqs(core: &Core) -> Vec<MqState> {
    core.registry()
        .list()
        .iter()
        // One being restored takes no produce yet: producers must not pick this broker.
        .filter(|mq| !mq.is_copy())
        .map(|mq| {
            let info = mq.info();
            MqState {
                name: info.name.clone(),
                depth: info.depth(),
                replicas: mq.options().replica_count(),
                followers: info.followers.clone(),
                groups: info
                    .groups
                    .iter()
                    .map(|g| GroupState {
                        name: g.name.clone(),
                        consumers: g.consumers,
                        lag: g.lag,
                        in_flight: g.in_flight,
                    })
                    .collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_address() {
        let reporting = Reporting::resolve(Some("127.0.0.1:16666".into()), None, None)
            .unwrap()
            .unwrap();
        assert_eq!(
            advertised(&reporting, "127.0.0.2:9".parse().unwrap()),
            "127.0.0.2:9"
        );
        // 0.0.0.0 becomes the address facing the tracker: loopback for a local tracker.
        assert_eq!(
            advertised(&reporting, "0.0.0.0:9".parse().unwrap()),
            "127.0.0.1:9"
        );
        let given = Reporting {
            advertise: Some("broker-1.example:15555".into()),
            ..reporting
        };
        assert_eq!(
            advertised(&given, "0.0.0.0:9".parse().unwrap()),
            "broker-1.example:15555"
        );
    }
}
