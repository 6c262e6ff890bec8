//! Reporting this broker to the trackers (`--tracker`): its advertised address, start epoch,
//! and every MQ with its depth and groups. A new report goes out within 100 ms of a change
//! (MQ created or removed, group created, consumer joined or left) and every
//! `--report-interval` (2 s by default) with fresh depths; the trackers drop the broker when
//! its connection closes or it misses its reports. The sending itself (one connection per
//! tracker, retried every interval) is the client crate's `qbus_client::reporter`.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qbus_client::ha::parse_trackers;
use qbus_client::reporter;
use qbus_client::topology::{BrokerState, GroupState, MqState, NodeKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::registry::Registry;

/// Default time between two reports without a change.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
/// Changes arriving together are reported together: the first one waits this long.
const DEBOUNCE: Duration = Duration::from_millis(40);

/// Where and how often to report; part of [`Config`](crate::Config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reporting {
    /// Tracker addresses.
    pub trackers: Vec<String>,
    /// `--advertise`, if given.
    pub advertise: Option<String>,
    /// Time between two reports without a change.
    pub interval: Duration,
}

impl Reporting {
    /// Checks the `tracker`, `advertise` and `report-interval` settings; `None` without
    /// trackers.
    ///
    /// ```
    /// use std::time::Duration;
    /// use qbus_broker::reporter::Reporting;
    /// let reporting = Reporting::resolve(Some("10.0.0.1:16666,10.0.0.2:16667".into()), None, None)
    ///     .unwrap()
    ///     .unwrap();
    /// assert_eq!(reporting.trackers.len(), 2);
    /// assert_eq!(reporting.interval, Duration::from_secs(2));
    /// assert!(Reporting::resolve(None, None, None).unwrap().is_none());
    /// ```
    pub fn resolve(
        tracker: Option<String>,
        advertise: Option<String>,
        interval: Option<Duration>,
    ) -> Result<Option<Reporting>, ConfigError> {
        let bad = |key: &str, message: String| ConfigError {
            key: key.into(),
            message,
        };
        if let Some(addr) = &advertise {
            let port = addr
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(p))) if !host.is_empty() && p > 0) {
                return Err(bad(
                    "advertise",
                    format!("{addr:?} is not HOST:PORT with a port from 1 to 65535"),
                ));
            }
        }
        let interval = interval.unwrap_or(DEFAULT_INTERVAL);
        if interval < Duration::from_millis(10) {
            return Err(bad("report-interval", "must be at least 10ms".into()));
        }
        let Some(tracker) = tracker else {
            return Ok(None);
        };
        let trackers = parse_trackers(&tracker).map_err(|e| bad("tracker", e.to_string()))?;
        Ok(Some(Reporting {
            trackers,
            advertise,
            interval,
        }))
    }

    /// The address clients should use: `--advertise`, else the listen address with its
    /// unspecified IP (0.0.0.0) replaced by the local address facing the first tracker.
    pub fn advertised(&self, listening: SocketAddr) -> String {
        if let Some(addr) = &self.advertise {
            return addr.clone();
        }
        let ip = if listening.ip().is_unspecified() {
            self.trackers
                .first()
                .and_then(|tracker| facing(tracker))
                .unwrap_or(IpAddr::from([127, 0, 0, 1]))
        } else {
            listening.ip()
        };
        SocketAddr::new(ip, listening.port()).to_string()
    }

    /// Reports `registry` as `addr` until `stop` fires (the trackers then drop the broker).
    pub async fn run(self, registry: Arc<Registry>, addr: String, stop: CancellationToken) {
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        tracing::info!(advertise = %addr, trackers = ?self.trackers, interval = ?self.interval, "reporting to trackers");
        let mut changes = registry.watch_changes();
        let (publish, state) = watch::channel(Arc::new(BrokerState {
            id: addr.clone(),
            addr,
            kind: NodeKind::Broker,
            epoch,
            seq: 1,
            report_interval_ms: self.interval.as_millis() as u64,
            mqs: mqs(&registry),
            services: Vec::new(),
        }));
        let sending = tokio::spawn(reporter::report(
            self.trackers,
            state,
            self.interval,
            stop.clone(),
        ));
        let mut tick = tokio::time::interval(self.interval);
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
            let now = mqs(&registry);
            if now != publish.borrow().mqs {
                publish.send_modify(|state| {
                    let state = Arc::make_mut(state);
                    state.seq += 1;
                    state.mqs = now;
                });
            }
        }
        drop(publish);
        let _ = sending.await;
    }
}

/// The local IP the OS would use to reach `tracker` (no packet is sent).
fn facing(tracker: &str) -> Option<IpAddr> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect(tracker).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

/// Every MQ as the trackers see it.
fn mqs(registry: &Registry) -> Vec<MqState> {
    registry
        .list()
        .iter()
        .map(|mq| {
            let info = mq.info();
            MqState {
                name: info.name.clone(),
                depth: info.depth(),
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
    fn settings_are_checked_with_their_key() {
        let err = Reporting::resolve(Some("nowhere".into()), None, None).unwrap_err();
        assert_eq!(err.key, "tracker");
        let err = Reporting::resolve(Some("a:1".into()), Some("host".into()), None).unwrap_err();
        assert_eq!(err.key, "advertise");
        let err = Reporting::resolve(Some("a:1".into()), None, Some(Duration::ZERO)).unwrap_err();
        assert_eq!(err.key, "report-interval");
    }

    #[test]
    fn advertised_address() {
        let reporting = Reporting::resolve(Some("127.0.0.1:16666".into()), None, None)
            .unwrap()
            .unwrap();
        assert_eq!(
            reporting.advertised("127.0.0.2:9".parse().unwrap()),
            "127.0.0.2:9"
        );
        // 0.0.0.0 becomes the address facing the tracker: loopback for a local tracker.
        assert_eq!(
            reporting.advertised("0.0.0.0:9".parse().unwrap()),
            "127.0.0.1:9"
        );
        let given = Reporting {
            advertise: Some("broker-1.example:15555".into()),
            ..reporting
        };
        assert_eq!(
            given.advertised("0.0.0.0:9".parse().unwrap()),
            "broker-1.example:15555"
        );
    }
}
