//! `qbus bench rpc`: RPC latency and throughput, DirectRPC (`--direct`) or MQ-RPC (`--mq`,
//! through `--broker`). Unless told to use a running server (`--direct ADDR`, or
//! `--external` for MQ-RPC), it starts the service itself, in one of two shapes:
//!
//! - by default as a child process (`qbus bench rpc-serve`), so caller, service and broker
//!   each have a process of their own;
//! - with `--in-process`, in this process, on the same runtime as the caller (its size is
//!   `--threads`) and on a connection of its own: the shape in which systems such as NATS
//!   request/reply are usually measured.
//!
//! For each payload size (default `16`) and concurrency level (default `1,64`) it keeps that
//! many calls in flight for `--duration` seconds after a warm-up, timing every call, and
//! prints a summary and one machine-readable line in the format of the other benchmarks:
//! `RESULT system=qbus scenario=rpc-latency|rpc-throughput size=.. count=.. window=..
//! msgs_per_s=.. mb_per_s=.. p50_us=.. p99_us=.. p999_us=.. concurrency=.. transport=..
//! encoding=.. shape=separate|in-process` (`msgs_per_s` counts calls; `rpc-latency` is the
//! run at concurrency 1).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::{ArgGroup, Args};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use qbus_rpc::{
    service, DirectInvoker, Encoding, Invoker, MqInvoker, MqRpcService, MqServiceOptions,
    RpcProcessor, RpcServer, RpcServerOptions,
};

use qbus_client::tls::ServerTls;
use qbus_client::ConnectionOptions;

use super::args::secs;
use super::histogram::Latencies;
use crate::error::CliError;
use crate::tls::TlsArgs;

/// The service the benchmark calls: the payload straight back.
#[service(name = "Bench")]
trait Echo {
    /// Returns `payload`.
    async fn echo(&self, payload: String) -> String;
}

struct Echoer;

impl Echo for Echoer {
    async fn echo(&self, payload: String) -> String {
        payload
    }
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("transport").required(true).args(["direct", "mq"])))]
pub struct RpcBench {
    /// DirectRPC: call the server at ADDR (one running `qbus bench rpc-serve --listen`),
    /// or, with no ADDR, a server this benchmark starts
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "ADDR")]
    direct: Option<String>,
    /// MQ-RPC through --broker, on this MQ
    #[arg(long, num_args = 0..=1, default_missing_value = "bench-rpc", value_name = "MQ")]
    mq: Option<String>,
    /// MQ-RPC: a service already consumes the MQ (`qbus bench rpc-serve --mq`); start none
    #[arg(long, conflicts_with = "in_process")]
    external: bool,
    /// Run the service in this process, on the caller's runtime (`--threads`) with its own
    /// connection, instead of in a child process
    #[arg(long)]
    in_process: bool,
    /// Calls in flight, one run per value
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,64",
        value_name = "N[,N...]"
    )]
    concurrency: Vec<usize>,
    /// Seconds of measured calls per run
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    duration: f64,
    /// Seconds of calls before each run, not measured
    #[arg(long, default_value_t = 1.0, value_name = "SECS")]
    warmup: f64,
    /// Bytes of the string argument (echoed back), one run per value
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "16",
        value_name = "B[,B...]"
    )]
    size: Vec<usize>,
    /// Encoding of calls and replies: msgpack or json
    #[arg(long, default_value = "msgpack")]
    encoding: String,
    /// Runtime threads of the server this benchmark starts as a child process
    #[arg(long, default_value_t = 1, value_name = "N")]
    server_threads: usize,
    #[command(flatten)]
    server_tls: ServerTlsArgs,
}

/// TLS of the DirectRPC server the benchmark starts; the caller verifies it with `--ca`.
#[derive(Debug, Args)]
pub struct ServerTlsArgs {
    /// DirectRPC: the server speaks TLS with this certificate chain (PEM)
    #[arg(long, requires = "tls_key", value_name = "PEM")]
    tls_cert: Option<std::path::PathBuf>,
    /// DirectRPC: the private key of --tls-cert (PEM)
    #[arg(long, requires = "tls_cert", value_name = "PEM")]
    tls_key: Option<std::path::PathBuf>,
}

impl ServerTlsArgs {
    fn load(&self) -> Result<Option<ServerTls>, CliError> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        ServerTls::from_pem_files(cert, key, None)
            .map(Some)
            .map_err(|e| CliError::Usage(e.to_string()))
    }

    /// The flags again, for the server's child process.
    fn child_args(&self) -> Vec<std::ffi::OsString> {
        let mut args = Vec::new();
        for (flag, value) in [("--tls-cert", &self.tls_cert), ("--tls-key", &self.tls_key)] {
            if let Some(path) = value {
                args.push(flag.into());
                args.push(path.into());
            }
        }
        args
    }
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("serve").required(true).args(["listen", "mq"])))]
pub struct RpcServe {
    /// Serve DirectRPC on this address (port 0 picks one); prints `LISTENING <addr>`
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Serve MQ-RPC on this MQ of --broker; prints `READY` once consuming
    #[arg(long, value_name = "MQ")]
    mq: Option<String>,
    /// MQ-RPC calls run at once
    #[arg(long, default_value_t = SERVICE_CONCURRENCY)]
    concurrency: usize,
    #[command(flatten)]
    tls: ServerTlsArgs,
}

fn processor() -> RpcProcessor {
    let mut processor = RpcProcessor::new();
    processor.add(EchoServer::new(Echoer));
    processor
}

/// The benchmark's service serving DirectRPC on `addr`.
async fn serve_direct(addr: &str, tls: &ServerTlsArgs) -> Result<RpcServer, CliError> {
    let options = RpcServerOptions {
        tls: tls.load()?,
        ..RpcServerOptions::default()
    };
    RpcServer::bind_with(addr, processor(), options)
        .await
        .map_err(|e| CliError::Failed(e.to_string()))
}

/// The benchmark's service consuming `mq` through its own connection to `broker`, running
/// up to `concurrency` calls at once.
async fn serve_mq(
    broker: &str,
    connect_timeout: f64,
    mq: &str,
    concurrency: usize,
) -> Result<MqRpcService, CliError> {
    let broker = crate::connect(broker, connect_timeout).await?;
    let options = MqServiceOptions::default().with_concurrency(concurrency);
    MqRpcService::start_with(&broker, mq, processor(), options)
        .await
        .map_err(|e| CliError::Failed(e.to_string()))
}

/// MQ-RPC calls the service runs at once unless told otherwise.
const SERVICE_CONCURRENCY: usize = 256;

/// `qbus bench rpc-serve`: serves the benchmark's service until killed.
pub async fn serve(args: RpcServe, broker: &str, connect_timeout: f64) -> Result<(), CliError> {
    let _running: (Option<RpcServer>, Option<MqRpcService>) = match (&args.listen, &args.mq) {
        (Some(addr), _) => {
            let server = serve_direct(addr, &args.tls).await?;
            println!("LISTENING {}", server.local_addr());
            (Some(server), None)
        }
        (_, Some(mq)) => {
            let service = serve_mq(broker, connect_timeout, mq, args.concurrency).await?;
            println!("READY");
            (None, Some(service))
        }
        _ => return Err(CliError::Usage("give --listen or --mq".into())),
    };
    // Serve until the parent kills this process (or stdin closes).
    let mut sink = tokio::io::sink();
    let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut sink).await;
    Ok(())
}

/// A server child process; killed when dropped.
struct ServerChild(Child);

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `qbus bench rpc-serve` and waits for its first line.
fn start_server(
    serve_args: &[std::ffi::OsString],
    broker: &str,
    threads: usize,
    tls: &TlsArgs,
) -> Result<(ServerChild, String), CliError> {
    let exe = std::env::current_exe()?;
    let child = Command::new(exe)
        .args(["--broker", broker, "--threads", &threads.to_string()])
        .args(tls.child_args())
        .args(["bench", "rpc-serve"])
        .args(serve_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut child = ServerChild(child);
    let stdout = child
        .0
        .stdout
        .take()
        .ok_or_else(|| CliError::Failed("no stdout from the server process".into()))?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim().is_empty() {
        let status = child.0.wait()?;
        return Err(CliError::Failed(format!(
            "the server process ended ({status}) before it was ready"
        )));
    }
    Ok((child, line.trim().to_owned()))
}

pub async fn run(
    args: RpcBench,
    broker: &str,
    connect_timeout: f64,
    tls: &TlsArgs,
) -> Result<(), CliError> {
    let duration = secs("--duration", args.duration)?;
    let warmup = secs("--warmup", args.warmup)?;
    let encoding =
        Encoding::from_header(Some(&args.encoding)).map_err(|e| CliError::Usage(e.to_string()))?;
    if args.concurrency.contains(&0) {
        return Err(CliError::Usage(
            "--concurrency values must be at least 1".into(),
        ));
    }
    // Whatever serves the calls, kept running until the benchmark ends.
    let mut _server = None;
    let mut _in_process: (Option<RpcServer>, Option<MqRpcService>) = (None, None);
    let (invoker, transport): (Box<dyn Invoker>, &str) = match (&args.direct, &args.mq) {
        (Some(addr), _) => {
            let addr = if addr.is_empty() && args.in_process {
                let server = serve_direct("127.0.0.1:0", &args.server_tls).await?;
                let addr = server.local_addr().to_string();
                _in_process.0 = Some(server);
                addr
            } else if addr.is_empty() {
                let mut serve = vec!["--listen".into(), "127.0.0.1:0".into()];
                serve.extend(args.server_tls.child_args());
                let (child, line) = start_server(&serve, broker, args.server_threads, tls)?;
                _server = Some(child);
                line.strip_prefix("LISTENING ")
                    .ok_or_else(|| CliError::Failed(format!("unexpected server output {line:?}")))?
                    .to_owned()
            } else {
                addr.clone()
            };
            let invoker =
                DirectInvoker::with_tls(&addr, ConnectionOptions::default(), crate::tls::client());
            (Box::new(invoker), "direct")
        }
        (_, Some(mq)) => {
            if args.in_process {
                let service = serve_mq(broker, connect_timeout, mq, SERVICE_CONCURRENCY).await?;
                _in_process.1 = Some(service);
            } else if !args.external {
                let serve = ["--mq".into(), mq.into()];
                let (child, _) = start_server(&serve, broker, args.server_threads, tls)?;
                _server = Some(child);
            }
            let broker = crate::connect(broker, connect_timeout).await?;
            (Box::new(MqInvoker::new(broker, mq)), "mq")
        }
        _ => return Err(CliError::Usage("give --direct or --mq".into())),
    };
    let client = EchoClient::new(invoker).encoding(encoding);
    let shape = if args.in_process {
        "in-process"
    } else {
        "separate"
    };
    for &size in &args.size {
        let payload = "x".repeat(size);
        for &concurrency in &args.concurrency {
            if !warmup.is_zero() {
                let mut ignored = Latencies::default();
                measure(&client, &payload, concurrency, warmup, &mut ignored).await?;
            }
            let mut latencies = Latencies::with_capacity(1 << 20);
            let (calls, elapsed) =
                measure(&client, &payload, concurrency, duration, &mut latencies).await?;
            let run = Run {
                transport,
                shape,
                encoding,
                size,
                concurrency,
            };
            report(&run, calls, elapsed, latencies);
        }
    }
    Ok(())
}

/// Keeps `concurrency` calls in flight for `duration`; returns the calls made and the time
/// they took.
async fn measure(
    client: &EchoClient,
    payload: &str,
    concurrency: usize,
    duration: Duration,
    latencies: &mut Latencies,
) -> Result<(u64, Duration), CliError> {
    let started = Instant::now();
    let end = started + duration;
    let mut in_flight = FuturesUnordered::new();
    let call = |sent: Instant| {
        let reply = client.echo(payload.to_owned());
        async move { (sent, reply.await) }
    };
    for _ in 0..concurrency {
        in_flight.push(call(Instant::now()));
    }
    let mut calls = 0u64;
    while let Some((sent, reply)) = in_flight.next().await {
        let now = Instant::now();
        let echoed = reply.map_err(|e| CliError::Failed(format!("call failed: {e}")))?;
        if echoed.len() != payload.len() {
            return Err(CliError::Failed("the echo came back altered".into()));
        }
        latencies.record(now - sent);
        calls += 1;
        if now < end {
            in_flight.push(call(now));
        }
    }
    Ok((calls, started.elapsed()))
}

/// What one measured run was.
struct Run<'a> {
    transport: &'a str,
    shape: &'a str,
    encoding: Encoding,
    size: usize,
    concurrency: usize,
}

fn report(run: &Run<'_>, calls: u64, elapsed: Duration, latencies: Latencies) {
    let Run {
        transport,
        shape,
        encoding,
        size,
        concurrency,
    } = *run;
    let secs = elapsed.as_secs_f64().max(1e-9);
    let rate = calls as f64 / secs;
    let mb = rate * size as f64 / 1e6;
    let lat = latencies.summarize();
    let scenario = if concurrency == 1 {
        "rpc-latency"
    } else {
        "rpc-throughput"
    };
    println!(
        "rpc {transport} ({shape}): {calls} calls of {size} B ({encoding}) with {concurrency} in flight in {secs:.3} s: {rate:.0} calls/s"
    );
    println!(
        "  call latency, us: min {} mean {} p50 {} p99 {} p99.9 {} max {}",
        lat.min, lat.mean, lat.p50, lat.p99, lat.p999, lat.max
    );
    println!(
        "RESULT system=qbus scenario={scenario} size={size} count={calls} window={concurrency} \
         msgs_per_s={rate:.0} mb_per_s={mb:.2} p50_us={} p99_us={} p999_us={} \
         concurrency={concurrency} transport={transport} encoding={encoding} shape={shape}",
        lat.p50, lat.p99, lat.p999
    );
}
