//! `qbus bench`: the benchmark scenarios, each in its own room.
//!
//! - `produce.rs`, `consume.rs`, `tx.rs` (transactions): load against a running broker (`--broker`).
//! - `delay.rs`: delayed delivery at scale against a broker it starts.
//! - `fanout.rs`: a memory MQ's fan-out to groups, publish-to-receive latency.
//! - `failover.rs`: starts a tracker and brokers on loopback and kills one mid-run.
//! - `replicated.rs`: `replicated` receipts next to `synced` ones on three brokers it starts.
//! - `faults.rs`: a replicated cluster it starts through a kill, a lost store and a hang.
//! - `txfaults.rs`: transactions through producer and broker kills (`kill -9`), its
//!   producers `tx_producer.rs` (each a process, `qbus bench tx-producer`).
//! - `cluster.rs`: the trackers and brokers those scenarios start.
//! - `rpc.rs`: DirectRPC and MQ-RPC calls against a service it starts.
//! - `report.rs`: the summary and `RESULT` line they print; `histogram.rs`: latencies;
//!   `args.rs`: argument checks the scenarios share.

use clap::Subcommand;

use crate::error::CliError;
use crate::tls::TlsArgs;

mod args;
mod cluster;
mod consume;
mod delay;
mod failover;
mod fanout;
mod faults;
mod histogram;
mod produce;
mod replicated;
mod report;
mod rpc;
mod tx;
mod tx_producer;
mod txfaults;

pub(crate) use consume::ACK_WINDOW;

/// Every `qbus bench` scenario: the load scenarios against a running broker, and those that
/// start their own servers (failover, RPC).
#[derive(Debug, Subcommand)]
pub enum BenchScenario {
    /// Send COUNT messages of SIZE bytes keeping IN_FLIGHT requests unconfirmed
    Produce(produce::ProduceBench),
    /// Consume COUNT messages with a fresh group (filling the MQ first if needed)
    Consume(consume::ConsumeBench),
    /// Fan-out of a memory MQ: one unthrottled producer, one subscriber per group (each on
    /// its own connection); delivery rate and publish-to-receive latency
    Fanout(fanout::FanoutBench),
    /// Kill a broker while producing through trackers: latency around the kill, longest
    /// gap, lost and duplicated messages (starts its own cluster on loopback)
    Failover(failover::FailoverBench),
    /// `replicated` receipts next to `synced` ones: throughput, latency and the followers'
    /// lag under load (starts its own tracker and three brokers on loopback)
    Replicated(replicated::ReplicatedBench),
    /// Faults under `replicated` load through trackers: a broker killed and its store
    /// deleted, restarted empty, another one frozen; checks that no confirmed message is
    /// lost and the dead broker's backlog is read meanwhile (starts its own cluster)
    Faults(faults::FaultsBench),
    /// Schedule COUNT delayed messages: produce rate, broker memory with them pending,
    /// delivery lateness (starts its own broker)
    Delay(delay::DelayBench),
    /// Transactions of MESSAGES messages of SIZE bytes, CONCURRENCY at once: throughput and
    /// begin-to-commit latency
    Tx(tx::TxBench),
    /// Transactions through faults: producers (processes) commit, roll back or abandon
    /// (killed with `kill -9`, restarted, resolved by check-back) while the broker is
    /// killed; checks that consumers see exactly the committed messages, each transaction
    /// whole, none twice (starts its own broker)
    Txfaults(txfaults::TxFaultsBench),
    /// One producer of `txfaults` (`qbus bench txfaults` starts them)
    #[command(hide = true)]
    TxProducer(tx_producer::TxProducer),
    /// RPC latency and throughput, DirectRPC or MQ-RPC (starts its own server)
    Rpc(rpc::RpcBench),
    /// Serve the RPC benchmark's service (`qbus bench rpc` starts it)
    #[command(hide = true)]
    RpcServe(rpc::RpcServe),
}

/// Runs `scenario`; those that need a broker connect to `broker` (the `--broker` address).
pub async fn run(
    scenario: BenchScenario,
    broker: &str,
    connect_timeout: f64,
    tls: &TlsArgs,
) -> Result<(), CliError> {
    match scenario {
        BenchScenario::Produce(args) => {
            produce::run(&crate::connect(broker, connect_timeout).await?, args).await
        }
        BenchScenario::Consume(args) => {
            consume::run(&crate::connect(broker, connect_timeout).await?, args).await
        }
        BenchScenario::Tx(args) => {
            tx::run(&crate::connect(broker, connect_timeout).await?, args).await
        }
        BenchScenario::Fanout(args) => fanout::run(broker, connect_timeout, args).await,
        BenchScenario::Failover(args) => failover::run(args).await,
        BenchScenario::Replicated(args) => replicated::run(args).await,
        BenchScenario::Faults(args) => faults::run(args).await,
        BenchScenario::Delay(args) => delay::run(args).await,
        BenchScenario::Txfaults(args) => txfaults::run(args).await,
        BenchScenario::TxProducer(args) => tx_producer::run(args, broker).await,
        BenchScenario::Rpc(args) => rpc::run(args, broker, connect_timeout, tls).await,
        BenchScenario::RpcServe(args) => rpc::serve(args, broker, connect_timeout).await,
    }
}
