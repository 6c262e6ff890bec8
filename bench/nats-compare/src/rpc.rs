//! NATS core request/reply in the shape `qbus bench rpc --in-process` measures MQ-RPC: the
//! caller and the responder in one process on a 2-thread Tokio runtime, each on its own
//! connection, an echo of SIZE bytes, CONCURRENCY requests kept in flight for DURATION
//! seconds after a 1 s warm-up, every call timed from its send to its reply.
//!
//! As the NATS clients do it: the caller subscribes to one inbox wildcard
//! (`_INBOX.bench.*`) and sends each request with a reply subject of its own under it; the
//! responder subscribes to the service subject and publishes each reply to the request's
//! reply subject. Writes are buffered and flushed once per read of replies (or requests),
//! as a client's writer task flushes when it has nothing more queued.

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::{connect, percentile, Reader, Writer};

const SERVICE: &str = "bench.echo";
const INBOX: &str = "_INBOX.bench";

/// One `MSG` frame: its subject, reply subject and payload (read into `payload`).
/// `None` at the end of the stream; PINGs are answered on the way.
async fn next_msg(
    read: &mut Reader,
    write: &mut Writer,
    line: &mut String,
    payload: &mut Vec<u8>,
) -> std::io::Result<Option<(String, Option<String>)>> {
    loop {
        line.clear();
        if read.read_line(line).await? == 0 {
            return Ok(None);
        }
        if line.starts_with("PING") {
            write.write_all(b"PONG\r\n").await?;
            write.flush().await?;
            continue;
        }
        let Some(rest) = line.strip_prefix("MSG ") else {
            continue;
        };
        // MSG <subject> <sid> [reply-to] <#bytes>
        let parts: Vec<&str> = rest.split_whitespace().collect();
        let (subject, reply, size) = match parts.as_slice() {
            [subject, _sid, size] => (*subject, None, *size),
            [subject, _sid, reply, size] => (*subject, Some(reply.to_string()), *size),
            _ => continue,
        };
        let size: usize = size
            .parse()
            .map_err(|_| std::io::Error::other(format!("bad MSG line {line:?}")))?;
        let subject = subject.to_owned();
        payload.resize(size + 2, 0);
        read.read_exact(payload).await?;
        payload.truncate(size);
        return Ok(Some((subject, reply)));
    }
}

/// Echoes every request on its own connection until the connection ends.
async fn respond(mut read: Reader, mut write: Writer) -> std::io::Result<()> {
    let (mut line, mut payload) = (String::new(), Vec::new());
    while let Some((_, reply)) = next_msg(&mut read, &mut write, &mut line, &mut payload).await? {
        let Some(reply) = reply else { continue };
        write
            .write_all(format!("PUB {reply} {}\r\n", payload.len()).as_bytes())
            .await?;
        write.write_all(&payload).await?;
        write.write_all(b"\r\n").await?;
        if read.buffer().is_empty() {
            write.flush().await?;
        }
    }
    Ok(())
}

/// Writes request `slot` (its reply subject names the slot).
async fn request(write: &mut Writer, slot: usize, body: &[u8]) -> std::io::Result<()> {
    let header = format!("PUB {SERVICE} {INBOX}.{slot} {}\r\n", body.len());
    write.write_all(header.as_bytes()).await?;
    write.write_all(body).await?;
    write.write_all(b"\r\n").await
}

/// Keeps `concurrency` requests in flight for `duration`: (calls, elapsed, latencies µs).
async fn measure(
    read: &mut Reader,
    write: &mut Writer,
    body: &[u8],
    concurrency: usize,
    duration: Duration,
) -> std::io::Result<(u64, Duration, Vec<u64>)> {
    let started = Instant::now();
    let end = started + duration;
    let mut sent = vec![started; concurrency];
    for (slot, at) in sent.iter_mut().enumerate() {
        *at = Instant::now();
        request(write, slot, body).await?;
    }
    write.flush().await?;
    let (mut line, mut payload) = (String::new(), Vec::new());
    let (mut calls, mut in_flight) = (0u64, concurrency);
    let mut latencies = Vec::with_capacity(1 << 20);
    while in_flight > 0 {
        let Some((subject, _)) = next_msg(read, write, &mut line, &mut payload).await? else {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        };
        let slot: usize = subject
            .rsplit('.')
            .next()
            .and_then(|n| n.parse().ok())
            .filter(|&n| n < concurrency)
            .ok_or_else(|| {
                std::io::Error::other(format!("reply to an unknown subject {subject:?}"))
            })?;
        if payload.len() != body.len() {
            return Err(std::io::Error::other("the echo came back altered"));
        }
        let now = Instant::now();
        latencies.push((now - sent[slot]).as_micros() as u64);
        calls += 1;
        if now < end {
            sent[slot] = now;
            request(write, slot, body).await?;
        } else {
            in_flight -= 1;
        }
        if read.buffer().is_empty() {
            write.flush().await?;
        }
    }
    Ok((calls, started.elapsed(), latencies))
}

/// `nats-compare rpc ADDR [SIZES] [CONCURRENCIES] [SECS]` (lists comma-separated; default
/// `16`, `1,64`, `5`): one `RESULT system=nats` line per size and concurrency.
pub async fn run(args: &[String]) -> std::io::Result<()> {
    let addr = args
        .first()
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:4222".into());
    let list = |at: usize, default: &str| -> Vec<usize> {
        args.get(at)
            .map_or(default, String::as_str)
            .split(',')
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    let (sizes, concurrencies) = (list(1, "16"), list(2, "1,64"));
    let secs: f64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(5.0);
    let (mut rread, mut rwrite) = connect(&addr).await?;
    rwrite
        .write_all(format!("SUB {SERVICE} 1\r\nPING\r\n").as_bytes())
        .await?;
    rwrite.flush().await?;
    crate::wait_pong(&mut rread, &mut rwrite).await?;
    let responder = tokio::spawn(respond(rread, rwrite));
    let (mut read, mut write) = connect(&addr).await?;
    write
        .write_all(format!("SUB {INBOX}.* 1\r\nPING\r\n").as_bytes())
        .await?;
    write.flush().await?;
    crate::wait_pong(&mut read, &mut write).await?;
    for &size in &sizes {
        let body = vec![b'x'; size];
        for &concurrency in &concurrencies {
            let concurrency = concurrency.max(1);
            measure(
                &mut read,
                &mut write,
                &body,
                concurrency,
                Duration::from_secs(1),
            )
            .await?;
            let duration = Duration::from_secs_f64(secs);
            let (calls, elapsed, mut lat) =
                measure(&mut read, &mut write, &body, concurrency, duration).await?;
            lat.sort_unstable();
            let rate = calls as f64 / elapsed.as_secs_f64().max(1e-9);
            let (p50, p99, p999) = (
                percentile(&lat, 0.5),
                percentile(&lat, 0.99),
                percentile(&lat, 0.999),
            );
            let scenario = if concurrency == 1 {
                "rpc-latency"
            } else {
                "rpc-throughput"
            };
            println!(
                "nats request/reply: {calls} calls of {size} B with {concurrency} in flight in {:.3} s: {rate:.0} calls/s, p50 {p50} us, p99 {p99} us, p99.9 {p999} us",
                elapsed.as_secs_f64()
            );
            println!(
                "RESULT system=nats scenario={scenario} size={size} count={calls} window={concurrency} msgs_per_s={rate:.0} p50_us={p50} p99_us={p99} p999_us={p999} concurrency={concurrency} shape=in-process"
            );
        }
    }
    responder.abort();
    Ok(())
}
