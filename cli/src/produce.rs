//! `qbus produce`: send the given bodies, or one message per line of stdin as lines arrive.
//!
//! Sends are pipelined: up to [`WINDOW`] messages wait for their receipts at once, and
//! receipts are reported in send order (the broker confirms one connection's produces in
//! order). Every line is handed to the connection as soon as it is read, so an interactive
//! user sees each receipt right after pressing enter.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use qbus_client::{Broker, ClientError, Message, PendingReceipt, Producer, Receipt};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::error::CliError;

/// Most sends awaiting a receipt at once.
const WINDOW: usize = 1024;

#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// MQ to send to
    mq: String,
    /// Message bodies; without any, each line read from stdin is sent as one message
    #[arg(value_name = "BODY")]
    bodies: Vec<String>,
    /// Tag every message (consumers can filter on it)
    #[arg(long, value_name = "T")]
    tag: Option<String>,
    /// Key of every message
    #[arg(long, value_name = "K")]
    key: Option<String>,
    /// Deliver each message no sooner than this after it is sent: 500ms, 30s, 10m, 2h, 40d
    #[arg(long, value_name = "DURATION", value_parser = crate::mq_cmd::duration_ms)]
    delay: Option<u64>,
    /// Let each message expire this long after it may first be delivered
    #[arg(long, value_name = "DURATION", value_parser = crate::mq_cmd::duration_ms)]
    ttl: Option<u64>,
    /// Dedupe id: the broker stores a message whose id it stored within the MQ's window
    /// only once, so running the same command again stores nothing twice. With one BODY
    /// argument it is the message's id; otherwise message N (from 1) gets `ID-N`
    #[arg(long, value_name = "ID")]
    dedupe_id: Option<String>,
    /// Print only a final `sent N messages` line instead of one receipt per message
    #[arg(long, short)]
    quiet: bool,
}

type ReceiptFuture = <PendingReceipt as IntoFuture>::IntoFuture;

/// Sends in order and reports receipts in order.
struct Pipeline {
    producer: Producer,
    tag: Option<String>,
    key: Option<String>,
    delay: Option<Duration>,
    ttl: Option<Duration>,
    /// The dedupe id, and whether it gets the message's number.
    dedupe: Option<(String, bool)>,
    quiet: bool,
    pending: VecDeque<ReceiptFuture>,
    sent: u64,
    confirmed: u64,
}

pub async fn run(broker: &Broker, args: ProduceArgs) -> Result<(), CliError> {
    let mut pipeline = Pipeline {
        producer: broker.producer(&args.mq),
        tag: args.tag,
        key: args.key,
        delay: args.delay.map(Duration::from_millis),
        ttl: args.ttl.map(Duration::from_millis),
        dedupe: args.dedupe_id.map(|id| (id, args.bodies.len() != 1)),
        quiet: args.quiet,
        pending: VecDeque::new(),
        sent: 0,
        confirmed: 0,
    };
    if args.bodies.is_empty() {
        pipeline.send_stdin_lines().await?;
    } else {
        for body in args.bodies {
            pipeline.send(Bytes::from(body)).await?;
        }
    }
    while let Some(receipt) = next_receipt(&mut pipeline.pending).await {
        pipeline.confirm(receipt)?;
    }
    if pipeline.quiet {
        println!("sent {} messages", pipeline.confirmed);
    }
    Ok(())
}

impl Pipeline {
    /// Sends each line of stdin (without its line ending) as soon as it is read, while
    /// reporting receipts as they come.
    async fn send_stdin_lines(&mut self) -> Result<(), CliError> {
        let mut stdin = BufReader::new(tokio::io::stdin());
        let mut line = Vec::new();
        loop {
            tokio::select! {
                biased;
                receipt = next_receipt(&mut self.pending), if !self.pending.is_empty() => {
                    if let Some(receipt) = receipt {
                        self.confirm(receipt)?;
                    }
                }
                // Cancel safe: a partly read line stays in `line` for the next call.
                read = stdin.read_until(b'\n', &mut line), if self.pending.len() < WINDOW => {
                    if read? == 0 {
                        return Ok(());
                    }
                    if line.last() == Some(&b'\n') {
                        line.pop();
                        if line.last() == Some(&b'\r') {
                            line.pop();
                        }
                    }
                    let body = Bytes::from(std::mem::take(&mut line));
                    self.send(body).await?;
                }
            }
        }
    }

    /// Queues one message, first waiting for a receipt if the window is full.
    async fn send(&mut self, body: Bytes) -> Result<(), CliError> {
        if self.pending.len() >= WINDOW {
            if let Some(receipt) = next_receipt(&mut self.pending).await {
                self.confirm(receipt)?;
            }
        }
        let mut message = Message::new(body);
        message.tag.clone_from(&self.tag);
        message.key.clone_from(&self.key);
        if let Some(delay) = self.delay {
            message = message.with_delay(delay);
        }
        if let Some(ttl) = self.ttl {
            message = message.with_ttl(ttl);
        }
        message.dedupe_id = self.dedupe.as_ref().map(|(id, numbered)| {
            if *numbered {
                format!("{id}-{}", self.sent + 1)
            } else {
                id.clone()
            }
        });
        let pending = self
            .producer
            .send_async(message)
            .await
            .map_err(|e| self.failed(e))?;
        self.pending.push_back(pending.into_future());
        self.sent += 1;
        Ok(())
    }

    fn confirm(&mut self, receipt: Result<Receipt, ClientError>) -> Result<(), CliError> {
        let receipt = receipt.map_err(|e| self.failed(e))?;
        self.confirmed += 1;
        if !self.quiet {
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "offset={} durability={}{}",
                receipt.offset,
                receipt.durability,
                if receipt.duplicate() {
                    " duplicate (stored before, not again)"
                } else {
                    ""
                }
            )?;
            out.flush()?;
        }
        Ok(())
    }

    fn failed(&self, e: ClientError) -> CliError {
        CliError::Failed(format!(
            "message {} not confirmed: {e} ({} of {} sent messages confirmed)",
            self.confirmed + 1,
            self.confirmed,
            self.sent.max(self.confirmed + 1),
        ))
    }
}

/// Waits for the oldest pending receipt. Cancel safe: the receipt stays queued until it
/// resolves.
async fn next_receipt(
    pending: &mut VecDeque<ReceiptFuture>,
) -> Option<Result<Receipt, ClientError>> {
    let receipt = pending.front_mut()?.await;
    pending.pop_front();
    Some(receipt)
}
