//! `qbus mq ...`: create, list, describe and remove MQs, and remove consumer groups.

use clap::{Args, Subcommand};
use qbus_client::{Broker, MqInfo, MqOptions};
use serde::Serialize;

use crate::error::CliError;
use crate::output::{human_bytes, table};

#[derive(Debug, Subcommand)]
pub enum MqCommand {
    /// Create an MQ (succeeds if it already exists with the same options)
    Create(CreateArgs),
    /// List every MQ: name, depth, size on disk, consumer groups
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Describe one MQ: offsets, depth, size, segments, options and each group's state
    Info {
        /// MQ name
        name: String,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Remove an MQ with its messages and groups
    #[command(alias = "rm")]
    Remove {
        /// MQ name
        name: String,
    },
    /// Make a follower's copy of a dead broker's MQ an ordinary, writable MQ on the
    /// follower's broker (for a broker that is never coming back; see docs/replication.md)
    Adopt {
        /// MQ name
        name: String,
        /// The broker whose copy to adopt (its id: its advertised address)
        #[arg(long, value_name = "BROKER")]
        from: String,
    },
    /// Remove a consumer group of an MQ: its place and its deliveries in flight (refused
    /// while a consumer of it is attached)
    RemoveGroup {
        /// MQ name
        name: String,
        /// Group name
        group: String,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// MQ name
    name: String,
    /// Redeliver a message not acknowledged within this many milliseconds [broker default]
    #[arg(long, value_name = "N")]
    ack_timeout_ms: Option<u64>,
    /// Deliveries of one message before it moves to the dead-letter MQ [broker default]
    #[arg(long, value_name = "N")]
    max_deliveries: Option<u32>,
    /// Dead-letter MQ [default: NAME.DLQ, after the MQ's name]
    #[arg(long, value_name = "MQ")]
    dead_letter: Option<String>,
    /// Acknowledge produces once written, without waiting for the broker's fsync (for
    /// messages worth less than an fsync, e.g. RPC requests)
    #[arg(long)]
    no_sync: bool,
    /// Messages expire this long after they are stored (or come due, if delayed) unless they
    /// carry their own TTL: 500ms, 30s, 10m, 2h, 7d [default: never]
    #[arg(long, value_name = "DURATION", value_parser = duration_ms)]
    ttl: Option<u64>,
    /// Move expired messages to the dead-letter MQ instead of dropping them
    #[arg(long)]
    expired_to_dead_letter: bool,
    /// Deliver one message per key at a time in every group, in log order: the next of a
    /// key once the previous is acknowledged (keys spread over the group's consumers)
    #[arg(long)]
    ordered_by_key: bool,
    /// Copies of each broker's log of the MQ: its own plus N-1 followers on other brokers
    /// (needs trackers); produces are then acknowledged at `replicated` [default: 1]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    replicas: Option<u32>,
    /// Followers that must hold a message before its `replicated` receipt [default: every
    /// follower in sync, at least one]
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u32).range(1..))]
    min_replicas: Option<u32>,
    /// Remember dedupe ids this many milliseconds (0: no deduplication) [default: 120000]
    #[arg(long, value_name = "N")]
    dedupe_window_ms: Option<u64>,
    /// Keep the messages in a bounded ring in memory, never on disk: fast, and lost when
    /// the broker stops (the MQ itself comes back, empty); receipts say `memory`
    #[arg(long)]
    memory: bool,
    /// With --memory: most messages the ring keeps [default: 1048576]
    #[arg(long, value_name = "N", requires = "memory", value_parser = clap::value_parser!(u64).range(1..))]
    max_messages: Option<u64>,
    /// With --memory: most bytes of messages the ring keeps [default: 67108864]
    #[arg(long, value_name = "N", requires = "memory", value_parser = clap::value_parser!(u64).range(1..))]
    max_bytes: Option<u64>,
    /// With --memory: messages older than this leave the ring: 500ms, 30s, 10m [default: 1m]
    #[arg(long, value_name = "DURATION", requires = "memory", value_parser = duration_ms)]
    max_age: Option<u64>,
}

/// A duration flag in ms.
pub fn duration_ms(s: &str) -> Result<u64, String> {
    qbus_server_kit::units::parse_duration(s).map(|d| d.as_millis() as u64)
}

pub async fn run(broker: &Broker, cmd: MqCommand) -> Result<(), CliError> {
    match cmd {
        MqCommand::Create(args) => create(broker, args).await,
        MqCommand::List { json } => list(broker, json).await,
        MqCommand::Info { name, json } => info(broker, &name, json).await,
        MqCommand::Remove { name } => {
            broker.remove_mq(&name).await?;
            println!("removed {name}");
            Ok(())
        }
        MqCommand::Adopt { name, from } => {
            let info = broker.adopt_copy(&name, &from).await?;
            println!(
                "adopted {from}'s {name}: offsets {}..{}, {} group(s)",
                info.first_offset,
                info.next_offset,
                info.groups.len()
            );
            Ok(())
        }
        MqCommand::RemoveGroup { name, group } => {
            broker.remove_group(&name, &group).await?;
            println!("removed group {group} of {name}");
            Ok(())
        }
    }
}

async fn create(broker: &Broker, args: CreateArgs) -> Result<(), CliError> {
    if args.max_deliveries == Some(0) {
        return Err(CliError::Usage(
            "--max-deliveries must be at least 1".into(),
        ));
    }
    let existed = broker.query_mq(&args.name).await.is_ok();
    let options = MqOptions {
        ack_timeout_ms: args.ack_timeout_ms,
        max_deliveries: args.max_deliveries,
        dead_letter_mq: args.dead_letter,
        sync: args.no_sync.then_some(false),
        ttl_ms: args.ttl,
        expired_to_dead_letter: args.expired_to_dead_letter.then_some(true),
        ordered_by_key: args.ordered_by_key.then_some(true),
        replicas: args.replicas,
        min_replicas: args.min_replicas,
        dedupe_window_ms: args.dedupe_window_ms,
        memory: args.memory.then_some(true),
        memory_max_messages: args.max_messages,
        memory_max_bytes: args.max_bytes,
        memory_max_age_ms: args.max_age,
    };
    let info = broker.create_mq(&args.name, options.clone()).await?;
    let differs = |asked: Option<String>, has: Option<String>| asked.is_some() && asked != has;
    let conflicts: Vec<String> = [
        (
            "ack-timeout-ms",
            options.ack_timeout_ms.map(|v| v.to_string()),
            info.options.ack_timeout_ms.map(|v| v.to_string()),
        ),
        (
            "max-deliveries",
            options.max_deliveries.map(|v| v.to_string()),
            info.options.max_deliveries.map(|v| v.to_string()),
        ),
        (
            "dead-letter",
            options.dead_letter_mq.clone(),
            info.options.dead_letter_mq.clone(),
        ),
        (
            "replicas",
            options.replicas.map(|v| v.to_string()),
            info.options.replicas.map(|v| v.to_string()),
        ),
        (
            "min-replicas",
            options.min_replicas.map(|v| v.to_string()),
            info.options.min_replicas.map(|v| v.to_string()),
        ),
        (
            "no-sync",
            options.sync.map(|v| (!v).to_string()),
            info.options.sync.map(|v| (!v).to_string()),
        ),
        (
            "ttl",
            options.ttl_ms.map(|v| format!("{v}ms")),
            info.options.ttl_ms.map(|v| format!("{v}ms")),
        ),
        (
            "ordered-by-key",
            options.ordered_by_key.map(|v| v.to_string()),
            info.options.ordered_by_key.map(|v| v.to_string()),
        ),
        (
            "expired-to-dead-letter",
            options.expired_to_dead_letter.map(|v| v.to_string()),
            info.options.expired_to_dead_letter.map(|v| v.to_string()),
        ),
        (
            "dedupe-window-ms",
            options.dedupe_window_ms.map(|v| v.to_string()),
            info.options.dedupe_window_ms.map(|v| v.to_string()),
        ),
        (
            "memory",
            options.memory.map(|v| v.to_string()),
            info.options.memory.map(|v| v.to_string()),
        ),
        (
            "max-messages",
            options.memory_max_messages.map(|v| v.to_string()),
            info.options.memory_max_messages.map(|v| v.to_string()),
        ),
        (
            "max-bytes",
            options.memory_max_bytes.map(|v| v.to_string()),
            info.options.memory_max_bytes.map(|v| v.to_string()),
        ),
        (
            "max-age",
            options.memory_max_age_ms.map(|v| format!("{v}ms")),
            info.options.memory_max_age_ms.map(|v| format!("{v}ms")),
        ),
    ]
    .into_iter()
    .filter(|(_, asked, has)| differs(asked.clone(), has.clone()))
    .map(|(key, asked, has)| {
        format!(
            "{key} is {} (asked {})",
            has.unwrap_or_else(|| "default".into()),
            asked.unwrap_or_default()
        )
    })
    .collect();
    if !conflicts.is_empty() {
        return Err(CliError::Failed(format!(
            "MQ {} already exists with other options: {}",
            info.name,
            conflicts.join(", ")
        )));
    }
    let verb = if existed { "exists" } else { "created" };
    println!("{verb} {} ({})", info.name, describe_options(&info.options));
    Ok(())
}

async fn list(broker: &Broker, json: bool) -> Result<(), CliError> {
    let mqs = broker.list_mqs().await?;
    if json {
        let all: Vec<MqJson> = mqs.iter().map(MqJson::from).collect();
        println!("{}", to_json(&all)?);
        return Ok(());
    }
    let mut rows = vec![vec![
        "NAME".to_owned(),
        "DEPTH".to_owned(),
        "SIZE".to_owned(),
        "GROUPS".to_owned(),
    ]];
    for mq in &mqs {
        let groups: Vec<&str> = mq.groups.iter().map(|g| g.name.as_str()).collect();
        rows.push(vec![
            mq.name.clone(),
            mq.depth().to_string(),
            human_bytes(mq.size_bytes),
            if groups.is_empty() {
                "-".to_owned()
            } else {
                groups.join(",")
            },
        ]);
    }
    print!("{}", table(&rows));
    Ok(())
}

async fn info(broker: &Broker, name: &str, json: bool) -> Result<(), CliError> {
    let mq = broker.query_mq(name).await?;
    if json {
        println!("{}", to_json(&MqJson::from(&mq))?);
        return Ok(());
    }
    let lines = [
        ("name", mq.name.clone()),
        (
            "offsets",
            format!("first {}, next {}", mq.first_offset, mq.next_offset),
        ),
        ("depth", mq.depth().to_string()),
        (
            "size",
            format!("{} ({} bytes)", human_bytes(mq.size_bytes), mq.size_bytes),
        ),
        ("segments", mq.segments.to_string()),
        ("options", describe_options(&mq.options)),
        ("delayed", format!("{} pending", mq.delayed)),
        ("expired", mq.expired.to_string()),
        (
            "dropped",
            format!("{} (memory ring limits, summed over groups)", mq.dropped),
        ),
    ];
    for (key, value) in lines {
        println!("{:<10}{value}", format!("{key}:"));
    }
    if mq.groups.is_empty() {
        println!("groups:   none");
        print_followers(&mq);
        return Ok(());
    }
    println!("groups:");
    let mut rows = vec![[
        "GROUP",
        "COMMITTED",
        "NEXT",
        "IN_FLIGHT",
        "LAG",
        "CONSUMERS",
        "DEAD_LETTERED",
        "REDELIVERED",
        "DROPPED",
    ]
    .map(str::to_owned)
    .to_vec()];
    for g in &mq.groups {
        rows.push(vec![
            g.name.clone(),
            g.committed.to_string(),
            g.next.to_string(),
            g.in_flight.to_string(),
            g.lag.to_string(),
            g.consumers.to_string(),
            g.dead_lettered.to_string(),
            g.redelivered.to_string(),
            g.dropped.to_string(),
        ]);
    }
    for line in table(&rows).lines() {
        println!("  {line}");
    }
    print_followers(&mq);
    Ok(())
}

/// The followers of each broker's copy (MQs with replicas), with their lag and state.
fn print_followers(mq: &MqInfo) {
    if mq.followers.is_empty() {
        return;
    }
    println!("followers:");
    let mut rows = vec![
        ["LEADER", "FOLLOWER", "ACKED", "LAG", "LAG_BYTES", "IN_SYNC"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for f in &mq.followers {
        rows.push(vec![
            if f.leader.is_empty() {
                "this broker".to_owned()
            } else {
                f.leader.clone()
            },
            f.id.clone(),
            f.acked.to_string(),
            f.lag.to_string(),
            f.lag_bytes.to_string(),
            if f.in_sync { "yes" } else { "no" }.to_owned(),
        ]);
    }
    for line in table(&rows).lines() {
        println!("  {line}");
    }
}

fn describe_options(options: &MqOptions) -> String {
    let or_default = |v: Option<String>| v.unwrap_or_else(|| "default".to_owned());
    let memory = if options.is_memory() {
        format!(
            "memory (ring: max_messages={} max_bytes={} max_age_ms={}) ",
            or_default(options.memory_max_messages.map(|v| v.to_string())),
            or_default(options.memory_max_bytes.map(|v| v.to_string())),
            or_default(options.memory_max_age_ms.map(|v| v.to_string())),
        )
    } else {
        String::new()
    };
    format!(
        "{memory}ack_timeout_ms={} max_deliveries={} dead_letter={} sync={} ttl={} expired={} ordered_by_key={} replicas={} min_replicas={} dedupe_window_ms={}",
        or_default(options.ack_timeout_ms.map(|v| v.to_string())),
        or_default(options.max_deliveries.map(|v| v.to_string())),
        or_default(options.dead_letter_mq.clone()),
        or_default(options.sync.map(|v| v.to_string())),
        options
            .ttl_ms
            .map_or_else(|| "none".to_owned(), |v| format!("{v}ms")),
        if options.expired_to_dead_letter == Some(true) {
            "dead-letter"
        } else {
            "drop"
        },
        options.ordered_by_key == Some(true),
        or_default(options.replicas.map(|v| v.to_string())),
        or_default(options.min_replicas.map(|v| v.to_string())),
        or_default(options.dedupe_window_ms.map(|v| v.to_string())),
    )
}

/// An MQ as `--json` prints it: what the broker described, and its depth.
#[derive(Serialize)]
struct MqJson<'a> {
    #[serde(flatten)]
    info: &'a MqInfo,
    depth: u64,
}

impl<'a> From<&'a MqInfo> for MqJson<'a> {
    fn from(info: &'a MqInfo) -> Self {
        MqJson {
            info,
            depth: info.depth(),
        }
    }
}

fn to_json(value: &impl Serialize) -> Result<String, CliError> {
    Ok(serde_json::to_string(value).map_err(std::io::Error::from)?)
}
