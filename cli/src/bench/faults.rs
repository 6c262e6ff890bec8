//! `qbus bench faults`: replicas through several faults, black box. Starts its own cluster
//! on loopback (two `qbus-tracker`s, three `qbus-broker`s, temp stores), creates an MQ with
//! `replicas: 2` (receipts `replicated`), and runs four `tracker://` producers of numbered
//! messages at a steady rate and one `tracker://` consumer group throughout, while:
//!
//! 1. the consumer pauses (unsubscribes) `--pause` seconds, so that a backlog builds;
//! 2. broker #1 is killed (`kill -9`) and its store deleted; the consumer resumes;
//! 3. after `--outage` seconds broker #1 restarts on an empty store (and restores its copy
//!    from its follower);
//! 4. `--freeze-after` seconds after it holds the MQ again, broker #2 is frozen (SIGSTOP)
//!    for `--freeze` seconds, then goes on (SIGCONT);
//! 5. producing goes on for `--tail` seconds, then the consumer reads until it has seen
//!    every confirmed message (or `--drain` seconds pass without a new one).
//!
//! It fails unless: every send was answered (confirmed or failed) within 30 s; every
//! confirmed message was delivered (none lost); the killed broker
//! had a backlog, and its follower's copy of it was read to its end during the outage;
//! the duplicates stay within the bound below. The bound: each of the two faults may
//! deliver again what was in flight (each producer's window of sends, resent elsewhere,
//! and the consumer's batch), plus what the consumer acknowledged on the lost broker within
//! the last 2 s before it went (a follower copies its leader's cursors every second).
//!
//! One machine-readable line: `RESULT system=qbus scenario=faults size=.. confirmed=..
//! failed=.. unanswered=.. lost=.. delivered=.. duplicates=.. duplicate_bound=.. outage_backlog=..
//! outage_copy_end=.. outage_copy_read=.. outage_delivered=.. freeze_delivered=..`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use qbus_client::{Broker, Message, MqOptions};
use qbus_wire::topology::copy_name;

use super::args::secs;
use super::cluster::{wait_for, wait_until, Cluster, ClusterArgs, Shape};
use crate::error::CliError;

#[derive(Debug, Args)]
pub struct FaultsBench {
    /// Seconds of producing before broker #1 is killed
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    kill_after: f64,
    /// Seconds the consumer pauses just before the kill (the killed broker's backlog)
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    pause: f64,
    /// Seconds before the killed broker restarts on an empty store
    #[arg(long, default_value_t = 20.0, value_name = "SECS")]
    outage: f64,
    /// Seconds after it holds the MQ again before broker #2 is frozen
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    freeze_after: f64,
    /// Seconds broker #2 stays frozen (SIGSTOP)
    #[arg(long, default_value_t = 20.0, value_name = "SECS")]
    freeze: f64,
    /// Seconds of producing after broker #2 goes on
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    tail: f64,
    /// Most seconds the consumer reads on without a new message after producing stops
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    drain: f64,
    /// Messages per second, all producers together
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(4..))]
    rate: u32,
    /// `tracker://` producers, each with its own handle
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    producers: u32,
    /// Sends awaiting confirmation at once, per producer
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    in_flight: u32,
    /// Payload bytes per message (at least the number it carries)
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// How often the brokers report to the trackers, e.g. 500ms
    #[arg(long, default_value = "500ms", value_name = "DURATION")]
    report_interval: String,
    #[command(flatten)]
    cluster: ClusterArgs,
}

const MQ: &str = "faults-bench";
const GROUP: &str = "faults";
/// Messages the consumer fetches at once.
const CONSUMER_BATCH: u32 = 256;
/// The broker killed and wiped, and the one frozen.
const KILLED: usize = 1;
const FROZEN: usize = 2;

/// The timings, checked.
struct Plan {
    kill_after: Duration,
    pause: Duration,
    outage: Duration,
    freeze_after: Duration,
    freeze: Duration,
    tail: Duration,
    drain: Duration,
}

pub async fn run(args: FaultsBench) -> Result<(), CliError> {
    let plan = Plan {
        kill_after: secs("--kill-after", args.kill_after)?,
        pause: secs("--pause", args.pause)?,
        outage: secs("--outage", args.outage)?,
        freeze_after: secs("--freeze-after", args.freeze_after)?,
        freeze: secs("--freeze", args.freeze)?,
        tail: secs("--tail", args.tail)?,
        drain: secs("--drain", args.drain)?,
    };
    if plan.pause >= plan.kill_after {
        return Err(CliError::Usage(
            "--pause must be less than --kill-after".into(),
        ));
    }
    let shape = Shape {
        name: "faults",
        trackers: 2,
        brokers: 3,
        report_interval: &args.report_interval,
    };
    let mut cluster = Cluster::start(&args.cluster, shape).await?;
    let outcome = measure(&args, &plan, &mut cluster).await;
    cluster.stop();
    outcome
}

/// What the consumer saw: deliveries per message, and when.
#[derive(Default)]
struct Seen {
    counts: HashMap<(u32, u64), u32>,
    delivered: u64,
    /// Deliveries within each window of [`Windows`].
    in_window: [u64; 2],
}

/// The outage and the freeze, while they last (for counting what was read meanwhile).
#[derive(Default)]
struct Windows {
    outage: AtomicBool,
    freeze: AtomicBool,
}

async fn measure(args: &FaultsBench, plan: &Plan, cluster: &mut Cluster) -> Result<(), CliError> {
    let url = cluster.tracker_url();
    let admin = Broker::connect_ha(&url, Default::default()).await?;
    wait_until("every broker in both trackers' topology", || {
        admin.topology().is_some_and(|t| t.len() == cluster.len())
    })
    .await?;
    let options = MqOptions {
        replicas: Some(2),
        ..MqOptions::default()
    };
    admin.create_mq(MQ, options).await?;
    wait_until("the MQ on every broker", || {
        admin
            .topology()
            .is_some_and(|t| t.holders(MQ).len() == cluster.len())
    })
    .await?;
    println!(
        "faults: 2 trackers, 3 brokers, replicas 2; {} producers at {} msg/s in all, {} in flight each, {} B; \
         broker #{KILLED} killed and wiped after {:?}, back after {:?}; broker #{FROZEN} frozen {:?}",
        args.producers, args.rate, args.in_flight, args.size, plan.kill_after, plan.outage, plan.freeze
    );

    let producing = Arc::new(AtomicBool::new(true));
    let mut producers = Vec::new();
    for p in 0..args.producers {
        let client = Broker::connect_ha(&url, Default::default()).await?;
        let every = Duration::from_secs_f64(f64::from(args.producers) / f64::from(args.rate));
        producers.push(tokio::spawn(produce(
            client,
            p,
            every,
            args.in_flight as usize,
            args.size,
            producing.clone(),
        )));
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let paused = Arc::new(AtomicBool::new(false));
    let consuming = Arc::new(AtomicBool::new(true));
    let windows = Arc::new(Windows::default());
    let consumer = tokio::spawn(consume(
        Broker::connect_ha(&url, Default::default()).await?,
        seen.clone(),
        paused.clone(),
        consuming.clone(),
        windows.clone(),
    ));
    let started = Instant::now();

    tokio::time::sleep(plan.kill_after - plan.pause).await;
    paused.store(true, Ordering::Relaxed);
    tokio::time::sleep(plan.pause).await;
    let killed = Broker::connect(&cluster.addr(KILLED)).await?;
    let info = killed.query_mq(MQ).await?;
    let committed = info
        .groups
        .iter()
        .find(|g| g.name == GROUP)
        .map_or(info.first_offset, |g| g.committed);
    let backlog = info.next_offset.saturating_sub(committed);
    cluster.kill(KILLED)?;
    cluster.wipe(KILLED)?;
    drop(killed);
    windows.outage.store(true, Ordering::Relaxed);
    paused.store(false, Ordering::Relaxed);
    println!(
        "  {:.1?}: broker #{KILLED} killed with {backlog} unread records, store deleted",
        started.elapsed()
    );
    tokio::time::sleep(plan.outage).await;
    let (copy_end, copy_read) = read_of_copy(cluster).await?;
    windows.outage.store(false, Ordering::Relaxed);
    cluster.restart(KILLED).await?;
    println!(
        "  {:.1?}: broker #{KILLED} restarted empty; its copy was read to {copy_read} of {copy_end}",
        started.elapsed()
    );
    let restored = cluster.addr(KILLED);
    wait_for(
        "the restarted broker holding the MQ again",
        Duration::from_secs(60),
        || {
            admin
                .topology()
                .is_some_and(|t| t.holders(MQ).iter().any(|h| *h.id == *restored))
        },
    )
    .await?;
    println!(
        "  {:.1?}: broker #{KILLED} holds the MQ again",
        started.elapsed()
    );
    tokio::time::sleep(plan.freeze_after).await;
    cluster.signal(FROZEN, "-STOP")?;
    windows.freeze.store(true, Ordering::Relaxed);
    println!("  {:.1?}: broker #{FROZEN} frozen", started.elapsed());
    tokio::time::sleep(plan.freeze).await;
    cluster.signal(FROZEN, "-CONT")?;
    windows.freeze.store(false, Ordering::Relaxed);
    println!("  {:.1?}: broker #{FROZEN} goes on", started.elapsed());
    tokio::time::sleep(plan.tail).await;
    producing.store(false, Ordering::Relaxed);

    let mut confirmed = Vec::new();
    let (mut failed, mut unanswered) = (0u64, 0u64);
    for producer in producers {
        let sent = producer
            .await
            .map_err(|e| CliError::Failed(format!("producer: {e}")))??;
        confirmed.extend(sent.confirmed);
        failed += sent.failed;
        unanswered += sent.unanswered;
    }
    println!(
        "  {:.1?}: producing stopped: {} confirmed, {failed} failed, {unanswered} without an answer within {RECEIPT_LIMIT:?}",
        started.elapsed(),
        confirmed.len()
    );
    // Read until every confirmed message came, or nothing new came for `drain`.
    let mut last = (0, Instant::now());
    loop {
        let (missing, delivered) = {
            let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            let missing = confirmed
                .iter()
                .filter(|id| !seen.counts.contains_key(id))
                .count();
            (missing, seen.delivered)
        };
        if missing == 0 {
            break;
        }
        if delivered != last.0 {
            last = (delivered, Instant::now());
        } else if last.1.elapsed() > plan.drain {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    consuming.store(false, Ordering::Relaxed);
    consumer
        .await
        .map_err(|e| CliError::Failed(format!("consumer: {e}")))??;

    let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    let lost = confirmed
        .iter()
        .filter(|id| !seen.counts.contains_key(id))
        .count();
    let duplicates: u64 = seen
        .counts
        .values()
        .map(|&n| u64::from(n.saturating_sub(1)))
        .sum();
    let window = u64::from(args.producers) * u64::from(args.in_flight);
    let bound = 2 * (window + u64::from(CONSUMER_BATCH)) + 2 * u64::from(args.rate);
    println!(
        "  {} delivered ({} different, {duplicates} again; bound {bound}), {lost} confirmed messages never delivered",
        seen.delivered,
        seen.counts.len()
    );
    println!(
        "  during the outage {} delivered, during the freeze {}",
        seen.in_window[0], seen.in_window[1]
    );
    println!(
        "RESULT system=qbus scenario=faults size={} confirmed={} failed={failed} unanswered={unanswered} lost={lost} delivered={} \
         duplicates={duplicates} duplicate_bound={bound} outage_backlog={backlog} outage_copy_end={copy_end} \
         outage_copy_read={copy_read} outage_delivered={} freeze_delivered={}",
        args.size,
        confirmed.len(),
        seen.delivered,
        seen.in_window[0],
        seen.in_window[1]
    );
    let mut wrong = Vec::new();
    if lost > 0 {
        wrong.push(format!("{lost} confirmed messages were never delivered"));
    }
    if backlog == 0 {
        wrong.push("the killed broker had no backlog (raise --pause or --rate)".to_owned());
    }
    if copy_read < copy_end {
        wrong.push(format!(
            "the killed broker's copy was read to offset {copy_read} of {copy_end} during the outage"
        ));
    }
    if unanswered > 0 {
        wrong.push(format!(
            "{unanswered} sends had neither a receipt nor an error within {RECEIPT_LIMIT:?}"
        ));
    }
    if duplicates > bound {
        wrong.push(format!("{duplicates} duplicates, more than {bound}"));
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(CliError::Failed(wrong.join("; ")))
    }
}

/// The killed broker's copy on its follower: (its end, its group's cursor).
async fn read_of_copy(cluster: &Cluster) -> Result<(u64, u64), CliError> {
    let copy = copy_name(MQ, &cluster.addr(KILLED));
    for i in (0..cluster.len()).filter(|&i| i != KILLED) {
        let follower = Broker::connect(&cluster.addr(i)).await?;
        let Ok(info) = follower.query_mq(&copy).await else {
            continue;
        };
        let read = info
            .groups
            .iter()
            .find(|g| g.name == GROUP)
            .map_or(info.first_offset, |g| g.committed);
        return Ok((info.next_offset, read));
    }
    Err(CliError::Failed(format!(
        "no broker holds {copy:?}, the killed broker's copy"
    )))
}

/// What a producer's sends came to.
#[derive(Default)]
struct Sent {
    /// The ids of the messages confirmed.
    confirmed: Vec<(u32, u64)>,
    /// Sends that failed.
    failed: u64,
    /// Sends neither sent and confirmed nor failed within [`RECEIPT_LIMIT`].
    unanswered: u64,
}

/// How long a send may wait for its receipt: an HA send fails over within seconds (a
/// silent broker's connection closes after about 1 s, a request unanswered for 10 s goes
/// to another broker), so one still waiting after this is stuck.
const RECEIPT_LIMIT: Duration = Duration::from_secs(30);

/// One producer: message `seq` of producer `p` every `every` while `producing`, at most
/// `window` unconfirmed.
async fn produce(
    client: Broker,
    p: u32,
    every: Duration,
    window: usize,
    size: usize,
    producing: Arc<AtomicBool>,
) -> Result<Sent, CliError> {
    let producer = &client.producer(MQ);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending = FuturesUnordered::new();
    let (mut sent, mut seq) = (Sent::default(), 0u64);
    loop {
        let open = producing.load(Ordering::Relaxed);
        if !open && pending.is_empty() {
            break;
        }
        tokio::select! {
            _ = ticks.tick(), if open && pending.len() < window => {
                let mut body = format!("{p}:{seq}:").into_bytes();
                body.resize(body.len().max(size), b'x');
                let id = (p, seq);
                seq += 1;
                let message = Message::new(Bytes::from(body));
                pending.push(async move {
                    let send = async { producer.send_async(message).await?.await };
                    (id, tokio::time::timeout(RECEIPT_LIMIT, send).await)
                });
            }
            Some((id, outcome)) = pending.next(), if !pending.is_empty() => match outcome {
                Ok(Ok(_)) => sent.confirmed.push(id),
                Ok(Err(_)) => sent.failed += 1,
                Err(_) => sent.unanswered += 1,
            },
            // Look at `producing` again now and then while the window is full.
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    Ok(sent)
}

/// The consumer group: reads and records every delivery (acknowledged as handed over)
/// while `consuming`. While `paused` it is unsubscribed, so that what it had fetched goes
/// back to the brokers unacknowledged and the records stay unread there.
async fn consume(
    client: Broker,
    seen: Arc<Mutex<Seen>>,
    paused: Arc<AtomicBool>,
    consuming: Arc<AtomicBool>,
    windows: Arc<Windows>,
) -> Result<(), CliError> {
    while consuming.load(Ordering::Relaxed) {
        let mut consumer = client
            .consumer(MQ)
            .group(GROUP)
            .batch(CONSUMER_BATCH)
            .auto_ack(true)
            .subscribe()
            .await?;
        while consuming.load(Ordering::Relaxed) && !paused.load(Ordering::Relaxed) {
            let next = tokio::time::timeout(Duration::from_millis(100), consumer.next()).await;
            let delivery = match next {
                Ok(Some(delivery)) => delivery,
                Ok(None) => return Ok(()),
                Err(_) => continue,
            };
            // A notice of records lost on a broker's disk is not a message: confirmed
            // messages among them show as lost.
            let Ok(delivery) = delivery else { continue };
            let Some(id) = message_id(&delivery.body) else {
                continue;
            };
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            *seen.counts.entry(id).or_default() += 1;
            seen.delivered += 1;
            if windows.outage.load(Ordering::Relaxed) {
                seen.in_window[0] += 1;
            }
            if windows.freeze.load(Ordering::Relaxed) {
                seen.in_window[1] += 1;
            }
        }
        drop(consumer);
        while paused.load(Ordering::Relaxed) && consuming.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(())
}

/// `(producer, seq)` from a body `P:SEQ:...`.
fn message_id(body: &[u8]) -> Option<(u32, u64)> {
    let text = std::str::from_utf8(body).ok()?;
    let mut parts = text.split(':');
    let p = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    Some((p, seq))
}
