//! Serves the `Greeter` service (see `examples/src/greeter.rs`) over DirectRPC and MQ-RPC at
//! once, until Ctrl-C.
//!
//! ```text
//! cargo run -p qbus-examples --example rpc_server
//! cargo run -p qbus-examples --example rpc_client        # in another terminal
//! qbus call --direct 127.0.0.1:18000 Greeter.hello '["you"]'
//! qbus call --broker 127.0.0.1:15556 --mq greeter-rpc Greeter.strict_hello '[""]'
//! ```
//!
//! MQ-RPC needs a broker: `--broker ADDR` uses a running `qbus-broker`; without it, a broker
//! runs inside this process on `--broker-port` with a store in the temp directory. With
//! `--trackers`, the DirectRPC server registers there, so `HaInvoker`s (and
//! `qbus call --ha tracker://...`) find it.

use clap::Parser;
use qbus_client::Broker;
use qbus_examples::greeter::{GreetError, Greeter, GreeterServer};
use qbus_rpc::{MqRpcService, RpcProcessor, RpcServer, RpcServerOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Serve the Greeter over DirectRPC and MQ-RPC.
#[derive(Parser)]
struct Args {
    /// DirectRPC port (on 127.0.0.1)
    #[arg(long, default_value_t = 18000)]
    port: u16,
    /// Broker for MQ-RPC; without it a broker runs in this process on --broker-port
    #[arg(long, value_name = "ADDR")]
    broker: Option<String>,
    /// Port of the in-process broker (when no --broker is given)
    #[arg(long, default_value_t = 15556)]
    broker_port: u16,
    /// The MQ that MQ-RPC calls go through
    #[arg(long, default_value = "greeter-rpc")]
    mq: String,
    /// Trackers to register the DirectRPC server at, e.g. 127.0.0.1:16666,127.0.0.1:16667
    #[arg(long, value_delimiter = ',', value_name = "ADDR[,ADDR]")]
    trackers: Vec<String>,
}

/// The implementation: plain `async fn`s, the trait's futures are `Send` for free.
struct FriendlyGreeter;

impl Greeter for FriendlyGreeter {
    async fn hello(&self, name: String) -> String {
        format!("Hello, {name}!")
    }

    async fn strict_hello(&self, name: String) -> Result<String, GreetError> {
        match name.as_str() {
            "" => Err(GreetError::EmptyName),
            "Mallory" => Err(GreetError::Refused { name }),
            _ => Ok(format!("Good day, {name}.")),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    let mut processor = RpcProcessor::new();
    processor.add(GreeterServer::new(FriendlyGreeter));

    // DirectRPC: its own port, and the trackers if given.
    let options = RpcServerOptions::default().with_trackers(args.trackers.clone());
    let server = RpcServer::bind_with(
        &format!("127.0.0.1:{}", args.port),
        processor.clone(),
        options,
    )
    .await?;
    println!("DirectRPC on {}", server.local_addr());

    // MQ-RPC: through a broker, ours or one given.
    let stop_broker = CancellationToken::new();
    let (broker_addr, in_process) = match &args.broker {
        Some(addr) => (addr.clone(), None),
        None => {
            let (addr, task) = start_broker(args.broker_port, stop_broker.clone()).await?;
            (addr, Some(task))
        }
    };
    let broker = Broker::connect(&broker_addr).await?;
    let service = MqRpcService::start(&broker, &args.mq, processor).await?;
    println!("MQ-RPC on MQ {:?} of the broker at {broker_addr}", args.mq);
    if !args.trackers.is_empty() {
        println!("registered at tracker://{}", args.trackers.join(","));
    }
    println!("Ctrl-C to stop");

    tokio::signal::ctrl_c().await?;
    service.shutdown().await;
    server.shutdown().await;
    drop(broker);
    stop_broker.cancel();
    if let Some(task) = in_process {
        // The broker syncs its store before it stops.
        task.await?;
    }
    Ok(())
}

/// Runs a broker inside this process on `port`, with a fresh store in the temp directory,
/// until `stop`; the task ends once it has stopped.
async fn start_broker(
    port: u16,
    stop: CancellationToken,
) -> Result<(String, JoinHandle<()>), Error> {
    let store = std::env::temp_dir().join(format!("qbus-rpc-example-{}", std::process::id()));
    let mut config = qbus_broker::Config::with_store(&store);
    config.listen = format!("127.0.0.1:{port}").parse()?;
    let listener = qbus_broker::bind(&config).await?;
    let task = tokio::spawn(async move {
        if let Err(e) = qbus_broker::run(listener, config, stop).await {
            eprintln!("broker stopped: {e}");
        }
        let _ = std::fs::remove_dir_all(&store);
    });
    Ok((format!("127.0.0.1:{port}"), task))
}
