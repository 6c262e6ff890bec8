//! `qbus topology`: what the trackers know, one query per tracker: each tracker's state,
//! then every broker (newest report among the trackers) with its MQs and groups, and which
//! trackers list it. (`curl http://TRACKER/topology` gives one tracker's view as JSON.)

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Args;
use futures_util::future::join_all;
use qbus_client::ha::{parse_trackers, query_tracker_with};
use qbus_client::topology::{MqState, NodeKind, NodeState, TopologyUpdate};
use qbus_client::ConnectionOptions;

use crate::error::CliError;
use crate::output::table;

#[derive(Debug, Args)]
pub struct TopologyArgs {
    /// Trackers to ask, HOST:PORT[,HOST:PORT...] (tracker:// optional)
    #[arg(
        long,
        env = "QBUS_TRACKER",
        default_value = "127.0.0.1:16666",
        value_name = "ADDR[,ADDR]"
    )]
    tracker: String,
}

pub async fn run(args: TopologyArgs, connect_timeout: Duration) -> Result<(), CliError> {
    let trackers = parse_trackers(&args.tracker)?;
    let answers = join_all(trackers.iter().map(|t| query(t, connect_timeout))).await;
    if answers.iter().all(Result::is_err) {
        let reasons: Vec<String> = trackers
            .iter()
            .zip(&answers)
            .filter_map(|(t, a)| a.as_ref().err().map(|e| format!("{t}: {e}")))
            .collect();
        return Err(CliError::Failed(format!(
            "no tracker answered ({})",
            reasons.join("; ")
        )));
    }
    print!("{}", render(&trackers, &answers));
    Ok(())
}

async fn query(tracker: &str, connect_timeout: Duration) -> Result<TopologyUpdate, CliError> {
    let options = ConnectionOptions {
        connect_timeout,
        ..crate::connection_options()
    };
    Ok(query_tracker_with(tracker, options, crate::tls::client()).await?)
}

/// The trackers' table, then the nodes' table.
fn render(trackers: &[String], answers: &[Result<TopologyUpdate, CliError>]) -> String {
    let mut rows = vec![vec![
        "TRACKER".to_owned(),
        "STATE".to_owned(),
        "NODES".to_owned(),
    ]];
    // Newest report per node, and the trackers listing it.
    let mut nodes: BTreeMap<String, (NodeState, Vec<usize>)> = BTreeMap::new();
    for (i, (tracker, answer)) in trackers.iter().zip(answers).enumerate() {
        match answer {
            Ok(view) => {
                let state = if view.ready { "ready" } else { "warming up" };
                rows.push(vec![
                    tracker.clone(),
                    state.into(),
                    view.brokers.len().to_string(),
                ]);
                for broker in &view.brokers {
                    let entry = nodes
                        .entry(broker.id.clone())
                        .or_insert_with(|| (broker.clone(), Vec::new()));
                    if broker.version() > entry.0.version() {
                        entry.0 = broker.clone();
                    }
                    entry.1.push(i + 1);
                }
            }
            Err(e) => rows.push(vec![
                tracker.clone(),
                format!("unreachable: {e}"),
                "-".into(),
            ]),
        }
    }
    let mut out = table(&rows);
    out.push('\n');
    if nodes.is_empty() {
        out.push_str("no broker has reported to these trackers\n");
        return out;
    }
    let mut rows = vec![[
        "NODE",
        "KIND",
        "VERSION",
        "TRACKERS",
        "MQ",
        "DEPTH",
        "GROUPS (consumers, lag)",
        "REPLICAS (follower lag records/bytes)",
    ]
    .map(String::from)
    .to_vec()];
    for (broker, seen_by) in nodes.values() {
        let kind = match &broker.kind {
            NodeKind::Broker => "broker".to_owned(),
            NodeKind::RpcServer => "rpc".to_owned(),
            NodeKind::Other(other) => other.clone(),
        };
        let seen: Vec<String> = seen_by.iter().map(|i| format!("#{i}")).collect();
        let head = vec![
            broker.addr.clone(),
            kind,
            format!("{}.{}", broker.epoch, broker.seq),
            seen.join(","),
        ];
        let blank = || vec![String::new(); head.len()];
        let mut lines: Vec<Vec<String>> = broker
            .mqs
            .iter()
            .map(|mq| {
                let groups: Vec<String> = mq
                    .groups
                    .iter()
                    .map(|g| format!("{} ({}, {})", g.name, g.consumers, g.lag))
                    .collect();
                vec![
                    mq.name.clone(),
                    mq.depth.to_string(),
                    groups.join(" "),
                    replicas(mq),
                ]
            })
            .collect();
        lines.extend(broker.copies.iter().map(|copy| {
            vec![
                format!("copy {}", copy.name()),
                String::new(),
                String::new(),
                format!("follows {} to offset {}", copy.leader, copy.end),
            ]
        }));
        lines.extend(broker.services.iter().map(|s| {
            vec![
                format!("service {s}"),
                String::new(),
                String::new(),
                String::new(),
            ]
        }));
        if lines.is_empty() {
            lines.push(vec![
                "-".into(),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
        for (n, line) in lines.into_iter().enumerate() {
            let mut row = if n == 0 { head.clone() } else { blank() };
            row.extend(line);
            rows.push(row);
        }
    }
    out.push_str(&table(&rows));
    out
}

/// An MQ's replicas as its leader reports them: `-` without followers configured, else
/// the count and each follower with its lag (records/bytes) and whether it is in sync.
fn replicas(mq: &MqState) -> String {
    if mq.replicas <= 1 {
        return "-".to_owned();
    }
    let mut out = format!("x{}", mq.replicas);
    if mq.followers.is_empty() {
        out.push_str(" no follower yet");
    }
    for f in &mq.followers {
        let state = if f.in_sync { "in sync" } else { "behind" };
        out.push_str(&format!(" {} {}/{}B {state};", f.id, f.lag, f.lag_bytes));
    }
    out.trim_end_matches(';').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use qbus_client::topology::{CopyState, GroupState};
    use qbus_wire::protocol::FollowerInfo;

    #[test]
    fn newest_report_wins_and_trackers_are_counted() {
        let broker = |seq, depth| NodeState {
            id: "b:1".into(),
            addr: "b:1".into(),
            epoch: 7,
            seq,
            mqs: vec![MqState {
                name: "orders".into(),
                depth,
                groups: vec![GroupState {
                    name: "billing".into(),
                    consumers: 2,
                    lag: 5,
                    in_flight: 0,
                }],
                replicas: 1,
                ..MqState::default()
            }],
            ..NodeState::default()
        };
        let view = |seq, depth| TopologyUpdate {
            ready: true,
            full: true,
            brokers: vec![broker(seq, depth)],
            ..TopologyUpdate::default()
        };
        let trackers = vec!["t:1".to_owned(), "t:2".to_owned(), "t:3".to_owned()];
        let answers = vec![
            Ok(view(1, 10)),
            Ok(view(2, 20)),
            Err(CliError::Failed("refused".into())),
        ];
        let text = render(&trackers, &answers);
        let lines: Vec<String> = text
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        assert!(
            lines.contains(&"t:3 unreachable: refused -".to_owned()),
            "{text}"
        );
        assert!(
            lines.contains(&"b:1 broker 7.2 #1,#2 orders 20 billing (2, 5) -".to_owned()),
            "{text}"
        );
    }

    #[test]
    fn followers_and_copies_are_shown() {
        let node = |id: &str, mqs, copies| NodeState {
            id: id.into(),
            addr: id.into(),
            epoch: 1,
            seq: 1,
            mqs,
            copies,
            ..NodeState::default()
        };
        let leader = node(
            "b:1",
            vec![MqState {
                name: "orders".into(),
                depth: 9,
                replicas: 3,
                followers: vec![
                    FollowerInfo {
                        id: "b:2".into(),
                        acked: 9,
                        in_sync: true,
                        ..FollowerInfo::default()
                    },
                    FollowerInfo {
                        id: "b:3".into(),
                        acked: 4,
                        lag: 5,
                        lag_bytes: 640,
                        ..FollowerInfo::default()
                    },
                ],
                ..MqState::default()
            }],
            Vec::new(),
        );
        let follower = node(
            "b:2",
            Vec::new(),
            vec![CopyState {
                leader: "b:1".into(),
                mq: "orders".into(),
                end: 9,
            }],
        );
        let answers = vec![Ok(TopologyUpdate {
            ready: true,
            full: true,
            brokers: vec![leader, follower],
            ..TopologyUpdate::default()
        })];
        let text = render(&["t:1".to_owned()], &answers);
        let lines: Vec<String> = text
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        let want = "b:1 broker 1.1 #1 orders 9 x3 b:2 0/0B in sync; b:3 5/640B behind";
        assert!(lines.contains(&want.to_owned()), "{text}");
        let want = "b:2 broker 1.1 #1 copy orders@b:1 follows b:1 to offset 9";
        assert!(lines.contains(&want.to_owned()), "{text}");
    }
}
