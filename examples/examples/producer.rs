//! Sends messages to a running broker.
//!
//! ```text
//! cargo run -p qbus-examples --example producer -- [ADDR] [MQ] [COUNT]
//! ```
//! Defaults: `127.0.0.1:15555`, `demo`, 10.

use qbus_client::{Broker, Message, MqOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:15555".into());
    let mq = args.next().unwrap_or_else(|| "demo".into());
    let count: u32 = args.next().map_or(Ok(10), |n| n.parse())?;

    let broker = Broker::connect(&addr).await?;
    broker.create_mq(&mq, MqOptions::default()).await?;
    let producer = broker.producer(&mq);

    // Pipelined: queue every send first, then collect the receipts.
    let mut receipts = Vec::new();
    for i in 0..count {
        let message = Message::new(format!("message {i}")).with_key(format!("k{}", i % 4));
        receipts.push(producer.send_async(message).await?);
    }
    for receipt in receipts {
        let receipt = receipt.await?;
        println!(
            "stored at offset {} ({})",
            receipt.offset, receipt.durability
        );
    }
    Ok(())
}
