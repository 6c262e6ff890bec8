//! Calls the `Greeter` of the `rpc_server` example through each invoker: straight to the
//! server (DirectRPC), through the broker's MQ (MQ-RPC), and, with `--trackers`, to a server
//! found through the trackers (HA DirectRPC). The same generated `GreeterClient` works over
//! all of them; a dynamic call shows the same service without the trait.
//!
//! ```text
//! cargo run -p qbus-examples --example rpc_server    # first, in another terminal
//! cargo run -p qbus-examples --example rpc_client
//! ```

use std::time::Duration;

use clap::Parser;
use qbus_client::Broker;
use qbus_examples::greeter::GreeterClient;
use qbus_rpc::{DirectInvoker, HaInvoker, Invoker, MqInvoker, RpcClient, RpcError};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Call the Greeter through every invoker.
#[derive(Parser)]
struct Args {
    /// The DirectRPC server
    #[arg(long, default_value = "127.0.0.1:18000", value_name = "ADDR")]
    direct: String,
    /// The broker MQ-RPC goes through
    #[arg(long, default_value = "127.0.0.1:15556", value_name = "ADDR")]
    broker: String,
    /// The MQ that MQ-RPC calls go through
    #[arg(long, default_value = "greeter-rpc")]
    mq: String,
    /// Trackers the server registered at, e.g. 127.0.0.1:16666 (enables HA DirectRPC)
    #[arg(long, value_delimiter = ',', value_name = "ADDR[,ADDR]")]
    trackers: Vec<String>,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();

    let direct = DirectInvoker::connect(&args.direct).await?;
    greet("DirectRPC", direct).await?;

    let broker = Broker::connect(&args.broker).await?;
    greet("MQ-RPC", MqInvoker::new(broker, &args.mq)).await?;

    if !args.trackers.is_empty() {
        let ha = HaInvoker::connect(&format!("tracker://{}", args.trackers.join(","))).await?;
        greet("HA DirectRPC", ha).await?;
    }
    Ok(())
}

/// The same calls over any invoker.
async fn greet(label: &str, invoker: impl Invoker + Clone) -> Result<(), RpcError> {
    let greeter = GreeterClient::new(invoker.clone());

    // A typed call: `Result<String, RpcError>`.
    println!("{label}: {}", greeter.hello("world".into()).await?);

    // The method's own error arrives typed, inside `Ok`.
    match greeter.strict_hello("Mallory".into()).await? {
        Ok(greeting) => println!("{label}: {greeting}"),
        Err(refused) => println!("{label}: the service refused: {refused:?}"),
    }

    // A shorter deadline for one call.
    let quick = greeter.timeout(Duration::from_millis(500));
    println!("{label}: {}", quick.hello("in a hurry".into()).await?);

    // A dynamic call, for callers without the trait: JSON values in and out.
    let dynamic = RpcClient::new(invoker, "Greeter");
    let reply: serde_json::Value = dynamic
        .call("hello", &serde_json::json!(["dynamic"]))
        .await?;
    println!("{label}: {reply}");

    // Framework errors say what went wrong.
    if let Err(e) = dynamic.call::<_, serde_json::Value>("goodbye", &()).await {
        println!("{label}: {e}");
    }
    Ok(())
}
