//! NATS core, measured the way `qbus bench` measures qbus: fan-out (below) and request/reply
//! ([`rpc`]).
//!
//! Fan-out: one unthrottled publisher and N subscribers of one subject, each on
//! its own connection, 16 B messages carrying their send time (µs since the Unix epoch,
//! big-endian, the first 8 bytes), the way `qbus bench fanout` does it. It speaks the NATS
//! text protocol itself (CONNECT, PUB, SUB, MSG, PING/PONG) with buffered writes, as the
//! NATS clients do, so that no client library sits between the two measurements.
//!
//! Usage: `nats-compare ADDR COUNT SUBSCRIBERS [SIZE]` (fan-out) or
//! `nats-compare rpc ADDR [SIZES] [CONCURRENCIES] [SECS]` (request/reply); each prints
//! `RESULT system=nats` lines. Runs on a 2-thread Tokio runtime, as `qbus --threads 2`.

mod rpc;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;

const SUBJECT: &str = "fanout";

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The buffered halves of one connection.
type Reader = BufReader<tokio::net::tcp::OwnedReadHalf>;
type Writer = BufWriter<tokio::net::tcp::OwnedWriteHalf>;

async fn connect(addr: &str) -> std::io::Result<(Reader, Writer)> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (read, write) = stream.into_split();
    let (mut read, mut write) = (
        BufReader::with_capacity(1 << 16, read),
        BufWriter::with_capacity(1 << 16, write),
    );
    let mut info = String::new();
    read.read_line(&mut info).await?;
    write
        .write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\nPING\r\n")
        .await?;
    write.flush().await?;
    wait_pong(&mut read, &mut write).await?;
    Ok((read, write))
}

async fn wait_pong(read: &mut Reader, write: &mut Writer) -> std::io::Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        if read.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line.starts_with("PONG") {
            return Ok(());
        }
        if line.starts_with("PING") {
            write.write_all(b"PONG\r\n").await?;
            write.flush().await?;
        }
    }
}

/// Receives until `count` messages or 2 s of silence: (received, last arrival, latencies µs).
async fn subscribe(
    addr: String,
    count: u64,
    ready: tokio::sync::oneshot::Sender<()>,
) -> std::io::Result<(u64, Instant, Vec<u64>)> {
    let (mut read, mut write) = connect(&addr).await?;
    write
        .write_all(format!("SUB {SUBJECT} 1\r\nPING\r\n").as_bytes())
        .await?;
    write.flush().await?;
    wait_pong(&mut read, &mut write).await?;
    let _ = ready.send(());
    let (mut received, mut last, mut latencies) =
        (0u64, Instant::now(), Vec::with_capacity(count as usize));
    let mut line = String::new();
    let mut payload = Vec::new();
    while received < count {
        line.clear();
        match tokio::time::timeout(Duration::from_secs(2), read.read_line(&mut line)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(r) => {
                r?;
            }
        }
        if line.starts_with("PING") {
            write.write_all(b"PONG\r\n").await?;
            write.flush().await?;
            continue;
        }
        let Some(size) = line
            .strip_prefix("MSG ")
            .and_then(|l| l.split_whitespace().last())
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        payload.resize(size + 2, 0);
        read.read_exact(&mut payload).await?;
        let now = now_us();
        let sent = payload
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map_or(now, u64::from_be_bytes);
        latencies.push(now.saturating_sub(sent));
        received += 1;
        last = Instant::now();
    }
    Ok((received, last, latencies))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("rpc") {
        return runtime.block_on(rpc::run(&args[2..]));
    }
    runtime.block_on(fanout(args))
}

async fn fanout(args: Vec<String>) -> std::io::Result<()> {
    let addr = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:4222".into());
    let count: u64 = args
        .get(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let subscribers: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(1);
    let size: usize = args
        .get(4)
        .and_then(|a| a.parse().ok())
        .unwrap_or(16)
        .max(8);
    let mut tasks = Vec::new();
    for _ in 0..subscribers {
        let (tx, rx) = tokio::sync::oneshot::channel();
        tasks.push(tokio::spawn(subscribe(addr.clone(), count, tx)));
        let _ = rx.await;
    }
    let (mut read, mut write) = connect(&addr).await?;
    let header = format!("PUB {SUBJECT} {size}\r\n");
    let mut body = vec![b'x'; size];
    let started = Instant::now();
    for _ in 0..count {
        body[..8].copy_from_slice(&now_us().to_be_bytes());
        write.write_all(header.as_bytes()).await?;
        write.write_all(&body).await?;
        write.write_all(b"\r\n").await?;
    }
    write.write_all(b"PING\r\n").await?;
    write.flush().await?;
    wait_pong(&mut read, &mut write).await?;
    let published = started.elapsed();
    let mut slowest: Option<(f64, u64, u64, u64)> = None;
    for (i, task) in tasks.into_iter().enumerate() {
        let (received, last, mut lat) = task.await.map_err(std::io::Error::other)??;
        lat.sort_unstable();
        let secs = last
            .saturating_duration_since(started)
            .as_secs_f64()
            .max(1e-9);
        let rate = received as f64 / secs;
        let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
        println!(
            "  subscriber {i}: {received} received, {rate:.0} msgs/s, p50 {p50} us, p99 {p99} us"
        );
        if slowest.is_none_or(|(r, ..)| rate < r) {
            slowest = Some((rate, p50, p99, received));
        }
    }
    let (rate, p50, p99, received) = slowest.unwrap_or_default();
    println!(
        "nats publish: {count} in {:.3} s ({:.0} msgs/s)",
        published.as_secs_f64(),
        count as f64 / published.as_secs_f64()
    );
    println!("RESULT system=nats scenario=fanout size={size} count={count} msgs_per_s={rate:.0} p50_us={p50} p99_us={p99} groups={subscribers} received={received}");
    Ok(())
}
