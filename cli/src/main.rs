//! `qbus`: the command-line tool for a qbus broker: manage MQs, produce, consume, benchmark.
//!
//! Every subcommand lives in its own module; this file parses the command line, connects,
//! dispatches and turns an error into one `qbus: <error>` line on stderr with exit status 1.

mod bench;
mod call;
mod consume;
mod error;
mod mq_cmd;
mod output;
mod produce;
mod tls;
mod topology;
mod tx_cmd;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use qbus_client::protocol::Credentials;
use qbus_client::{Broker, ConnectionOptions};

use crate::error::CliError;

/// Command-line tool for the qbus message broker.
#[derive(Debug, Parser)]
#[command(name = "qbus", version, about, propagate_version = true)]
struct Cli {
    /// Broker address: host:port, tcp://host:port, tls://host:port, or
    /// tracker://host:port[,host:port...] (tracker+tls:// over TLS) for the brokers the
    /// trackers know
    #[arg(
        long,
        global = true,
        env = "QBUS_BROKER",
        default_value = "127.0.0.1:15555",
        value_name = "ADDR",
        help_heading = "Global options"
    )]
    broker: String,
    /// Give up connecting after this many seconds
    #[arg(
        long,
        global = true,
        default_value_t = 5.0,
        value_name = "SECS",
        help_heading = "Global options"
    )]
    connect_timeout: f64,
    /// Runtime threads: 1 runs everything on the main thread (least overhead for one
    /// connection), more starts a multi-threaded runtime, 0 one thread per core
    #[arg(
        long,
        global = true,
        default_value_t = 1,
        value_name = "N",
        help_heading = "Global options"
    )]
    threads: usize,
    #[command(flatten)]
    tls: tls::TlsArgs,
    /// Log in as this user (with --password); an address may also lead with
    /// user:password@
    #[arg(
        long,
        global = true,
        env = "QBUS_USER",
        value_name = "NAME",
        help_heading = "Global options"
    )]
    user: Option<String>,
    /// The password of --user
    #[arg(
        long,
        global = true,
        env = "QBUS_PASSWORD",
        hide_env_values = true,
        value_name = "SECRET",
        help_heading = "Global options"
    )]
    password: Option<String>,
    /// Log in with a token instead of a user and password
    #[arg(
        long,
        global = true,
        env = "QBUS_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        conflicts_with_all = ["user", "password"],
        help_heading = "Global options"
    )]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list, describe and remove MQs
    #[command(subcommand)]
    Mq(mq_cmd::MqCommand),
    /// Send messages: the BODY arguments, or else one message per line of stdin
    Produce(produce::ProduceArgs),
    /// Receive and acknowledge messages, printing one body per line
    Consume(consume::ConsumeArgs),
    /// Measure produce or consume throughput and latency
    #[command(subcommand)]
    Bench(bench::BenchScenario),
    /// Print the brokers, MQs and services the trackers know
    Topology(topology::TopologyArgs),
    /// Call an RPC method with JSON arguments and print its JSON result
    Call(call::CallArgs),
    /// List open transactions; commit or roll one back by id
    #[command(subcommand)]
    Tx(tx_cmd::TxCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QBUS_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // Before the runtime: reading the PEM files blocks.
    if let Err(e) = cli.tls.install() {
        return fail(&e);
    }
    let mut builder = match cli.threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return fail(&CliError::Io(e)),
    };
    let outcome = runtime.block_on(run(cli));
    // Everything asked for has been awaited; do not wait for a blocking stdin read.
    runtime.shutdown_background();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &CliError) -> ExitCode {
    eprintln!("qbus: {e}");
    ExitCode::FAILURE
}

/// The credentials of `--user`/`--password` or `--token`, set once at start: every
/// connection the command opens (brokers, trackers) logs in with them.
static CREDENTIALS: std::sync::OnceLock<Option<Credentials>> = std::sync::OnceLock::new();

fn credentials(cli: &Cli) -> Result<Option<Credentials>, CliError> {
    match (&cli.user, &cli.password, &cli.token) {
        (_, _, Some(token)) => Ok(Some(Credentials::token(token))),
        (Some(user), Some(password), None) => Ok(Some(Credentials::password(user, password))),
        (Some(_), None, None) => Err(CliError::Usage(
            "--user needs --password (or QBUS_PASSWORD)".into(),
        )),
        (None, Some(_), None) => Err(CliError::Usage(
            "--password needs --user (or QBUS_USER)".into(),
        )),
        (None, None, None) => Ok(None),
    }
}

/// What [`ConnectionOptions`] of this command start from: the default, with its
/// credentials.
pub(crate) fn connection_options() -> ConnectionOptions {
    ConnectionOptions {
        credentials: CREDENTIALS.get().cloned().flatten(),
        ..ConnectionOptions::default()
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let _ = CREDENTIALS.set(credentials(&cli)?);
    // `topology` asks the trackers and `bench failover` runs its own cluster: neither
    // connects to --broker.
    let broker = || connect(&cli.broker, cli.connect_timeout);
    match cli.command {
        Command::Mq(cmd) => mq_cmd::run(&broker().await?, cmd).await,
        Command::Produce(args) => produce::run(&broker().await?, args).await,
        Command::Consume(args) => consume::run(&broker().await?, args).await,
        Command::Bench(scenario) => {
            bench::run(scenario, &cli.broker, cli.connect_timeout, &cli.tls).await
        }
        Command::Topology(args) => topology::run(args, timeout(cli.connect_timeout)?).await,
        Command::Call(args) => call::run(args, &cli.broker, cli.connect_timeout).await,
        Command::Tx(cmd) => tx_cmd::run(&broker().await?, cmd).await,
    }
}

fn timeout(secs: f64) -> Result<Duration, CliError> {
    Duration::try_from_secs_f64(secs)
        .map_err(|_| CliError::Usage(format!("bad --connect-timeout {secs}")))
}

async fn connect(addr: &str, timeout_secs: f64) -> Result<Broker, CliError> {
    let connect_timeout = timeout(timeout_secs)?;
    let options = ConnectionOptions {
        connect_timeout,
        ..connection_options()
    };
    Ok(Broker::connect_tls(addr, options, tls::client()).await?)
}
