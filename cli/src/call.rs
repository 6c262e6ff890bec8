//! `qbus call`: call an RPC method with JSON arguments and print its JSON result, through a
//! broker MQ (MQ-RPC), straight to an RPC server (DirectRPC), or to a server found through
//! trackers (HA DirectRPC). grpcurl for qbus: no trait, no generated code.
//!
//! ```text
//! qbus call --broker 127.0.0.1:15555 --mq greeter-rpc Greeter.hello '["world"]'
//! qbus call --direct 127.0.0.1:18000 Greeter.hello '["world"]'
//! qbus call --ha tracker://127.0.0.1:16666 Greeter.hello '["world"]'
//! ```

use std::sync::Arc;
use std::time::Duration;

use clap::{ArgGroup, Args};
use qbus_client::ha::HaOptions;
use qbus_client::{Broker, ConnectionOptions};
use qbus_rpc::{DirectInvoker, Encoding, HaInvoker, Invoker, MqInvoker, RpcClient, RpcError};
use serde_json::Value;

use crate::error::CliError;

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("via").required(true).args(["mq", "direct", "ha"])))]
pub struct CallArgs {
    /// Call through this MQ of --broker (MQ-RPC)
    #[arg(long, value_name = "MQ")]
    mq: Option<String>,
    /// Call the RPC server at this address (DirectRPC)
    #[arg(long, value_name = "HOST:PORT")]
    direct: Option<String>,
    /// Call a server found through these trackers (HA DirectRPC)
    #[arg(long, value_name = "tracker://HOST:PORT[,HOST:PORT...]")]
    ha: Option<String>,
    /// The call's deadline in seconds
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    timeout: f64,
    /// Print the result on one line instead of indented
    #[arg(long)]
    compact: bool,
    /// The method, as MODULE.METHOD (the module may itself contain dots)
    method: String,
    /// The arguments as a JSON array; a value that is not an array is the only argument
    #[arg(default_value = "[]", value_name = "JSON-ARGS")]
    args: String,
}

pub async fn run(args: CallArgs, broker: &str, connect_timeout: f64) -> Result<(), CliError> {
    let (module, method) = args.method.rsplit_once('.').ok_or_else(|| {
        CliError::Usage(format!(
            "{:?} is not MODULE.METHOD, e.g. Greeter.hello",
            args.method
        ))
    })?;
    let params = parse_args(&args.args)?;
    let timeout = Duration::try_from_secs_f64(args.timeout)
        .ok()
        .filter(|t| !t.is_zero())
        .ok_or_else(|| CliError::Usage(format!("bad --timeout {}", args.timeout)))?;
    let invoker: Arc<dyn Invoker> = match (&args.mq, &args.direct, &args.ha) {
        (Some(mq), _, _) => Arc::new(MqInvoker::new(
            crate::connect(broker, connect_timeout).await?,
            mq,
        )),
        (_, Some(addr), _) => Arc::new(DirectInvoker::with_tls(
            addr,
            ConnectionOptions::default(),
            crate::tls::client(),
        )),
        (_, _, Some(trackers)) => {
            let options = HaOptions {
                tls: crate::tls::client(),
                ..HaOptions::default()
            };
            let connection = options.connection.clone();
            let cluster = Broker::connect_ha(trackers, options).await?;
            Arc::new(HaInvoker::from_broker(cluster, connection).map_err(failed)?)
        }
        _ => return Err(CliError::Usage("give --mq, --direct or --ha".into())),
    };
    let client = RpcClient::from_shared(invoker, module)
        .timeout(timeout)
        .encoding(Encoding::Json);
    let result: Value = client
        .call(method.to_owned(), &params)
        .await
        .map_err(failed)?;
    let text = if args.compact {
        serde_json::to_string(&result)
    } else {
        serde_json::to_string_pretty(&result)
    }
    .map_err(|e| CliError::Failed(format!("cannot print the result: {e}")))?;
    println!("{text}");
    Ok(())
}

/// The params array: JSON-ARGS itself when it is an array, else a one-element array.
fn parse_args(text: &str) -> Result<Value, CliError> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        CliError::Usage(format!(
            "JSON-ARGS is not JSON ({e}); give the arguments as an array, e.g. '[\"world\", 3]'"
        ))
    })?;
    Ok(match value {
        Value::Array(_) => value,
        single => Value::Array(vec![single]),
    })
}

fn failed(e: RpcError) -> CliError {
    CliError::Failed(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::parse_args;
    use serde_json::json;

    #[test]
    fn args_are_an_array() {
        assert_eq!(parse_args(r#"["a", 1]"#).unwrap(), json!(["a", 1]));
        assert_eq!(parse_args(r#""a""#).unwrap(), json!(["a"]));
        assert_eq!(parse_args("[]").unwrap(), json!([]));
        assert!(parse_args("[oops").is_err());
    }
}
