//! MQ administration across the brokers of an HA handle. An MQ lives on several brokers, so
//! its description is the sum of its copies: counts and sizes add up, and the offsets are
//! totals over brokers (so `depth()` is the total number of records retained).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;

use super::{affinity, pool::Node, Ha};
use crate::error::{decode_reply, ClientError, Result};
use crate::protocol::{Command, Frame, GroupInfo, Header, MqInfo, MqOptions, Status};
use crate::topology::Candidate;
use qbus_wire::topology::copy_name;

/// Longest wait after `create_mq` for the trackers to show the new MQ, so a producer made
/// right after it finds a broker.
const PROPAGATION_WAIT: Duration = Duration::from_secs(2);

impl Ha {
    /// Creates `mq` on every live broker (or `create_on` of them); succeeds when at least
    /// one broker has it.
    pub(crate) async fn create_mq(&self, mq: &str, options: &MqOptions) -> Result<MqInfo> {
        let body: Bytes = rmp_serde::to_vec_named(options)
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .into();
        let mut targets = self.some_live_brokers().await;
        if let Some(n) = self.shared.options.create_on {
            let candidates: Vec<Candidate> = targets
                .iter()
                .map(|node| Candidate {
                    id: node.addr.clone(),
                    addr: node.addr.clone(),
                    depth: 0,
                    lag: 0,
                    in_flight: 0,
                })
                .collect();
            let order = affinity::ranked(mq, &candidates);
            targets = order
                .into_iter()
                .take(n)
                .map(|i| targets[i].clone())
                .collect();
        }
        if targets.is_empty() {
            return Err(no_live_broker(mq));
        }
        let replies =
            request_all(&targets, Header::request(Command::CreateMq, Some(mq)), body).await;
        let (infos, errors) = split(replies);
        if infos.is_empty() {
            return Err(first_error(mq, errors));
        }
        for (addr, e) in &errors {
            tracing::warn!(broker = %addr, %mq, error = %e, "MQ not created on this broker");
        }
        let created: Vec<Arc<str>> = infos.iter().map(|(addr, _)| addr.clone()).collect();
        self.await_holders(mq, &created).await;
        Ok(combine(
            mq,
            infos.into_iter().map(|(addr, info)| led_by(&addr, info)),
        ))
    }

    /// Waits (bounded) until the topology shows `mq` on every broker in `created`, when a
    /// tracker is there to tell, so sends right after spread over all of them.
    async fn await_holders(&self, mq: &str, created: &[Arc<str>]) {
        if !self.shared.views().connected().contains(&true) {
            return;
        }
        let mut watch = self.watch();
        let seen = tokio::time::timeout(PROPAGATION_WAIT, async {
            loop {
                let shown = {
                    let topology = watch.borrow_and_update();
                    let holders = topology.holders(mq);
                    created
                        .iter()
                        .all(|addr| holders.iter().any(|c| c.addr == *addr))
                };
                if shown {
                    return;
                }
                if watch.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        if seen.is_err() {
            tracing::warn!(%mq, wait = ?PROPAGATION_WAIT, "the trackers do not show the new MQ yet");
        }
    }

    /// Describes `mq` summed over the brokers holding it, and over the follower copies
    /// standing in for leaders that do not hold it now (`Topology::stand_ins`).
    pub(crate) async fn query_mq(&self, mq: &str) -> Result<MqInfo> {
        let (holders, stand_ins): (Vec<Arc<Node>>, Vec<CopyTarget>) = {
            let topology = self.topology();
            let shared = &self.shared;
            let all = topology.holders(mq);
            // Skip brokers known to be down (asking them only waits to fail), unless that
            // is all of them.
            let live: Vec<_> = all
                .iter()
                .filter(|c| !shared.pool.avoid(shared, &c.addr))
                .collect();
            let chosen = if live.is_empty() {
                all.iter().collect()
            } else {
                live
            };
            let stand_ins = topology
                .stand_ins(mq)
                .into_iter()
                .map(|s| (shared.pool.node(&s.addr), s.copy))
                .collect();
            let holders = chosen
                .into_iter()
                .map(|c| shared.pool.node(&c.addr))
                .collect();
            (holders, stand_ins)
        };
        // The topology lags a creation by a report; ask everyone when it knows nothing.
        let targets = if holders.is_empty() && stand_ins.is_empty() {
            self.live_brokers()
        } else {
            holders
        };
        let mut replies = request_all(
            &targets,
            Header::request(Command::QueryMq, Some(mq)),
            Bytes::new(),
        )
        .await;
        let copies = join_all(stand_ins.iter().map(|(node, copy)| {
            let frame = Frame::new(Header::request(Command::QueryMq, Some(copy)));
            async move { (node.addr.clone(), node.conn.request(frame).await) }
        }))
        .await;
        replies.extend(copies);
        let (infos, errors) = split(replies);
        if infos.is_empty() {
            return Err(first_error(mq, errors));
        }
        Ok(combine(
            mq,
            infos.into_iter().map(|(addr, info)| led_by(&addr, info)),
        ))
    }

    /// Every MQ of every live broker, summed per name, sorted by name.
    pub(crate) async fn list_mqs(&self) -> Result<Vec<MqInfo>> {
        let targets = self.live_brokers();
        let replies = request_all(
            &targets,
            Header::request(Command::ListMq, None),
            Bytes::new(),
        )
        .await;
        let mut by_name: BTreeMap<String, Vec<MqInfo>> = BTreeMap::new();
        let mut answered = false;
        let mut last_error = None;
        for (addr, reply) in replies {
            match reply.and_then(|frame| decode_reply::<Vec<MqInfo>>(&frame.body)) {
                Ok(infos) => {
                    answered = true;
                    for info in infos {
                        let info = led_by(&addr, info);
                        by_name.entry(info.name.clone()).or_default().push(info);
                    }
                }
                Err(e) => {
                    tracing::warn!(broker = %addr, error = %e, "cannot list this broker's MQs");
                    last_error = Some(e);
                }
            }
        }
        if !answered {
            return Err(last_error.unwrap_or_else(|| no_live_broker("*")));
        }
        Ok(by_name
            .into_iter()
            .map(|(name, infos)| combine(&name, infos))
            .collect())
    }

    /// Deletes `mq` on every live broker that has it.
    pub(crate) async fn remove_mq(&self, mq: &str) -> Result<()> {
        self.remove_everywhere(mq, Header::request(Command::RemoveMq, Some(mq)))
            .await
    }

    /// Sends a removal of (something of) `mq` to every live broker. Succeeds when one of
    /// them removed it and every other lacked it; a broker that failed otherwise (a group
    /// with consumers there, a broker gone mid-request) fails the whole, so the caller
    /// knows something is left to remove.
    pub(crate) async fn remove_everywhere(&self, mq: &str, request: Header) -> Result<()> {
        let targets = self.live_brokers();
        if targets.is_empty() {
            return Err(no_live_broker(mq));
        }
        let what = request.cmd;
        let replies = request_all(&targets, request, Bytes::new()).await;
        let mut removed = false;
        let mut absent = None;
        let mut failed = None;
        for (addr, reply) in replies {
            match reply {
                Ok(_) => removed = true,
                Err(e) if e.status() == Some(Status::NotFound) => {
                    absent.get_or_insert(e);
                }
                Err(e) => {
                    tracing::warn!(broker = %addr, %mq, error = %e, "{what:?} failed on this broker");
                    failed = Some(e);
                }
            }
        }
        match (failed, removed, absent) {
            (Some(e), _, _) => Err(e),
            (None, true, _) => Ok(()),
            (None, false, Some(e)) => Err(e),
            (None, false, None) => Err(no_live_broker(mq)),
        }
    }

    /// The live brokers; when there are none yet, waits up to the first-topology wait for
    /// one to report, so a client started together with its cluster can create MQs.
    /// The open transactions of every live broker (asked at once), each row naming its
    /// broker; fails, naming it, when one of them cannot be asked.
    pub(crate) async fn transactions(&self) -> Result<Vec<crate::BrokerTx>> {
        let targets = self.some_live_brokers().await;
        let lists = join_all(
            targets
                .iter()
                .map(|node| crate::transaction::list(&node.conn, &node.addr)),
        )
        .await;
        let mut all = Vec::new();
        for (node, list) in targets.iter().zip(lists) {
            let list = list.map_err(|e| ClientError::TxList {
                broker: node.addr.to_string(),
                source: Box::new(e),
            })?;
            all.extend(list);
        }
        Ok(all)
    }

    async fn some_live_brokers(&self) -> Vec<Arc<Node>> {
        let deadline = tokio::time::Instant::now() + self.shared.options.first_topology;
        let mut changes = self.watch();
        loop {
            let live = self.live_brokers();
            if !live.is_empty() {
                return live;
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return live },
                _ = tokio::time::sleep_until(deadline) => return live,
            }
        }
    }

    /// Brokers in the topology that this client does not know to be down.
    /// Makes a follower's copy of `leader`'s `mq` an MQ of the follower's own, on the
    /// follower the topology says holds it (the one reaching furthest).
    pub(crate) async fn adopt_copy(&self, mq: &str, leader: &str) -> Result<MqInfo> {
        let node = {
            let topology = self.topology();
            let holder = topology
                .brokers()
                .filter(|b| b.is_broker())
                .filter_map(|b| {
                    let copy = b.copies.iter().find(|c| c.mq == mq && c.leader == leader)?;
                    Some((copy.end, b))
                })
                .max_by_key(|&(end, _)| end)
                .map(|(_, b)| b.addr.clone());
            let addr = holder.ok_or_else(|| ClientError::NoBroker {
                mq: copy_name(mq, leader),
                reason: format!("no live broker reports a copy of {leader}'s {mq}"),
            })?;
            self.shared.pool.node(&Arc::from(addr.as_str()))
        };
        let header = Header::request(Command::AdoptCopy, Some(&copy_name(mq, leader)));
        let reply = node.conn.request(Frame::new(header)).await?;
        decode_reply(&reply.body)
    }

    fn live_brokers(&self) -> Vec<Arc<Node>> {
        let topology = self.topology();
        let shared = &self.shared;
        topology
            .brokers()
            .filter(|b| b.is_broker() && !shared.pool.avoid(shared, &b.addr))
            .map(|b| shared.pool.node(&Arc::from(b.addr.as_str())))
            .collect()
    }
}

async fn request_all(
    targets: &[Arc<Node>],
    request: Header,
    body: Bytes,
) -> ByBroker<Result<Frame>> {
    join_all(targets.iter().map(|node| {
        let frame = Frame::with_body(request.clone(), body.clone());
        async move { (node.addr.clone(), node.conn.request(frame).await) }
    }))
    .await
}

/// Answers of several brokers, each with the broker's address.
type ByBroker<T> = Vec<(Arc<str>, T)>;

/// A follower broker and the name of the copy to ask it about (`MQ@LEADER`).
type CopyTarget = (Arc<Node>, String);

/// The brokers' answers: descriptions by broker, and errors by broker.
fn split(replies: ByBroker<Result<Frame>>) -> (ByBroker<MqInfo>, ByBroker<ClientError>) {
    let mut infos = Vec::new();
    let mut errors = Vec::new();
    for (addr, reply) in replies {
        match reply.and_then(|frame| decode_reply::<MqInfo>(&frame.body)) {
            Ok(info) => infos.push((addr, info)),
            Err(e) => errors.push((addr, e)),
        }
    }
    (infos, errors)
}

/// The most telling error: a broker's own answer (such as 404) before a transport failure.
fn first_error(mq: &str, errors: ByBroker<ClientError>) -> ClientError {
    let mut errors: Vec<ClientError> = errors.into_iter().map(|(_, e)| e).collect();
    match errors.iter().position(|e| e.status().is_some()) {
        Some(i) => errors.swap_remove(i),
        None => errors.pop().unwrap_or_else(|| no_live_broker(mq)),
    }
}

fn no_live_broker(mq: &str) -> ClientError {
    ClientError::NoBroker {
        mq: mq.to_owned(),
        reason: "no live broker in the topology (are the brokers started with --tracker?)".into(),
    }
}

/// `info` as broker `addr` gave it, its followers marked as following `addr`'s copy.
fn led_by(addr: &str, mut info: MqInfo) -> MqInfo {
    for follower in &mut info.followers {
        follower.leader = addr.to_owned();
    }
    info
}

/// The copies of one MQ summed into one description.
fn combine(name: &str, infos: impl IntoIterator<Item = MqInfo>) -> MqInfo {
    let mut total = MqInfo {
        name: name.to_owned(),
        ..MqInfo::default()
    };
    let mut groups: BTreeMap<String, GroupInfo> = BTreeMap::new();
    for info in infos {
        total.first_offset += info.first_offset;
        total.next_offset += info.next_offset;
        total.size_bytes += info.size_bytes;
        total.segments += info.segments;
        total.delayed += info.delayed;
        total.expired += info.expired;
        total.dropped += info.dropped;
        total.options = info.options;
        total.followers.extend(info.followers);
        for g in info.groups {
            let sum = groups.entry(g.name.clone()).or_insert_with(|| GroupInfo {
                name: g.name.clone(),
                ..GroupInfo::default()
            });
            sum.committed += g.committed;
            sum.next += g.next;
            sum.in_flight += g.in_flight;
            sum.lag += g.lag;
            sum.consumers += g.consumers;
            sum.dead_lettered += g.dead_lettered;
            sum.redelivered += g.redelivered;
            sum.dropped += g.dropped;
        }
    }
    total.groups = groups.into_values().collect();
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_add_up() {
        let copy = |first, next, lag| MqInfo {
            name: "q".into(),
            first_offset: first,
            next_offset: next,
            delayed: lag + 1,
            expired: lag,
            groups: vec![GroupInfo {
                name: "g".into(),
                lag,
                consumers: 1,
                ..GroupInfo::default()
            }],
            ..MqInfo::default()
        };
        let total = combine("q", vec![copy(0, 10, 3), copy(5, 7, 1)]);
        assert_eq!(total.depth(), 12);
        assert_eq!((total.groups[0].lag, total.groups[0].consumers), (4, 2));
        assert_eq!((total.delayed, total.expired), (6, 4));
    }
}
