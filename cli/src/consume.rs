//! `qbus consume`: print message bodies one per line and acknowledge each.
//!
//! A message counts as consumed once printed and its ack settled; acks are kept in flight
//! concurrently (the SDK batches them), and every ack is settled before the command
//! returns. An ack that fails is fatal, except one lost with its broker (the connection
//! died, hung or left the topology before the broker confirmed it): that is a warning on
//! stderr, and the command goes on with the other brokers. The broker may then deliver
//! the message again (it does unless the ack reached it): within this run such a
//! redelivery, known by its message id, is acked without being printed or counted again;
//! after the run it goes to the group's next consumer.

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use clap::Args;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use qbus_client::{Broker, ClientError, Delivery, StartAt};

use crate::error::CliError;

/// Most messages fetched per request when no `--count` caps it.
const FETCH_BATCH: u32 = 256;

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// MQ to consume from
    mq: String,
    /// Consumer group [default: the MQ's name]
    #[arg(long, short, value_name = "G")]
    group: Option<String>,
    /// Stop after this many messages; exit 1 if fewer arrive
    #[arg(long, short = 'n', value_name = "N")]
    count: Option<u64>,
    /// Stop when no message came for this many seconds [default: wait forever]
    #[arg(long, short, value_name = "SECS")]
    timeout: Option<f64>,
    /// Only receive messages with this tag
    #[arg(long, value_name = "T")]
    tag: Option<String>,
    /// A group that does not exist yet starts at the end (only new messages)
    #[arg(long)]
    from_end: bool,
}

pub async fn run(broker: &Broker, args: ConsumeArgs) -> Result<(), CliError> {
    let idle = args
        .timeout
        .map(|secs| {
            Duration::try_from_secs_f64(secs)
                .map_err(|_| CliError::Usage(format!("bad --timeout {secs}")))
        })
        .transpose()?;
    if args.count == Some(0) {
        return Ok(());
    }
    // Fetch no more than asked for, so a small --count does not hold back other messages.
    let batch = args
        .count
        .map_or(FETCH_BATCH, |n| n.min(u64::from(FETCH_BATCH)) as u32);
    let mut builder = broker
        .consumer(&args.mq)
        .batch(batch)
        .start(if args.from_end {
            StartAt::Latest
        } else {
            StartAt::Earliest
        });
    if let Some(group) = &args.group {
        builder = builder.group(group.clone());
    }
    if let Some(tag) = &args.tag {
        builder = builder.tag(tag.clone());
    }
    let mut consumer = builder.subscribe().await?;

    let wanted = args.count.unwrap_or(u64::MAX);
    let mut received = 0u64;
    // Ids of messages whose ack was lost with their broker, which may deliver them again.
    let mut lost = LostAcks::default();
    let mut acks = FuturesUnordered::new();
    let mut stdout = std::io::stdout().lock();
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    // Ends with why it stopped early (`Ok(None)`: the count was reached) or the error.
    let stop: Result<Option<String>, CliError> = loop {
        if received >= wanted {
            break Ok(None);
        }
        let next = async {
            match idle {
                Some(idle) => tokio::time::timeout(idle, consumer.recv()).await.ok(),
                None => Some(consumer.recv().await),
            }
        };
        tokio::select! {
            Some(ack) = acks.next(), if !acks.is_empty() => if let Err(e) = settled(ack, &mut lost) {
                break Err(e);
            },
            delivery = next, if acks.len() < crate::bench::ACK_WINDOW => match delivery {
                None => break Ok(Some(format!("no message for {}s", fmt_secs(idle)))),
                Some(None) => break Ok(Some("the consumer stopped".to_owned())),
                // Damaged records the broker went past: say so, and read on after them.
                Some(Some(Err(lost @ ClientError::RecordsLost { .. }))) => eprintln!("qbus: {lost}"),
                Some(Some(Err(e))) => break Err(e.into()),
                Some(Some(Ok(delivery))) => {
                    let again = delivery.id.is_some_and(|id| lost.ids.remove(&id));
                    if !again {
                        let printed = stdout
                            .write_all(&delivery.body)
                            .and_then(|()| stdout.write_all(b"\n"))
                            .and_then(|()| stdout.flush());
                        if let Err(e) = printed {
                            break Err(e.into());
                        }
                        received += 1;
                    }
                    // Exempt from Tokio's cooperative budget: see `bench::consume`.
                    acks.push(tokio::task::unconstrained(ack(delivery)));
                }
            },
            _ = &mut interrupted => break Ok(Some("interrupted".to_owned())),
        }
    };
    drop(consumer);
    // Whatever happened, every message printed gets its ack settled (or reported).
    let mut ack_error = None;
    while let Some(ack) = acks.next().await {
        if let Err(e) = settled(ack, &mut lost) {
            ack_error.get_or_insert(e);
        }
    }
    if lost.count > lost.said.len() as u64 {
        eprintln!(
            "qbus: warning: {} acks in all were not confirmed; their messages may come again (to this group's next consumer)",
            lost.count
        );
    }
    let stop = stop?;
    if let Some(e) = ack_error {
        return Err(e);
    }
    match (args.count, stop) {
        (Some(n), Some(why)) if received < n => Err(CliError::Failed(format!(
            "received {received} of {n} messages: {why}"
        ))),
        _ => Ok(()),
    }
}

/// A failed ack: the message's offset and id, and why.
type AckFailure = (u64, Option<u128>, ClientError);

/// The ack of `delivery`.
async fn ack(delivery: Delivery) -> Result<(), AckFailure> {
    delivery
        .ack()
        .await
        .map_err(|e| (delivery.offset, delivery.id, e))
}

/// Settles an ack: one lost with its connection is reported and its message id kept in
/// `lost`; any other failure ends the command.
/// Acks that could not be confirmed because their broker went away: their messages may
/// come again, and are then acked but not printed twice.
#[derive(Default)]
struct LostAcks {
    ids: HashSet<u128>,
    count: u64,
    /// Each reason is said once (a lost broker fails every ack in flight to it).
    said: HashSet<String>,
}

impl LostAcks {
    fn add(&mut self, offset: u64, id: Option<u128>, e: &ClientError) {
        self.ids.extend(id);
        self.count += 1;
        if self.said.insert(e.to_string()) {
            eprintln!(
                "qbus: warning: ack of offset {offset} not confirmed ({e}); the broker may deliver it again"
            );
        }
    }
}

fn settled(ack: Result<(), AckFailure>, lost: &mut LostAcks) -> Result<(), CliError> {
    match ack {
        Ok(()) => Ok(()),
        Err((offset, id, e)) if e.is_transport() => {
            lost.add(offset, id, &e);
            Ok(())
        }
        Err((offset, _, e)) => Err(CliError::Failed(format!(
            "ack of offset {offset} not confirmed: {e}"
        ))),
    }
}

fn fmt_secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "?".to_owned(), |d| format!("{}", d.as_secs_f64()))
}
