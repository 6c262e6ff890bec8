//! Consumes messages from a running broker, acknowledging each one.
//!
//! ```text
//! cargo run -p qbus-examples --example consumer -- [ADDR] [MQ] [GROUP] [COUNT]
//! ```
//! Defaults: `127.0.0.1:15555`, `demo`, `demo-readers`, 10. Stops after COUNT messages.

use futures_util::StreamExt;
use qbus_client::Broker;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:15555".into());
    let mq = args.next().unwrap_or_else(|| "demo".into());
    let group = args.next().unwrap_or_else(|| "demo-readers".into());
    let count: usize = args.next().map_or(Ok(10), |n| n.parse())?;

    let broker = Broker::connect(&addr).await?;
    let mut consumer = broker.consumer(&mq).group(&group).subscribe().await?;
    let mut handled = 0;
    while handled < count {
        let Some(delivery) = consumer.next().await else {
            break;
        };
        let delivery = delivery?;
        println!(
            "offset {} attempt {}: {}",
            delivery.offset,
            delivery.attempt,
            String::from_utf8_lossy(&delivery.body)
        );
        // Acknowledge only after handling: a crash before this line means redelivery.
        delivery.ack().await?;
        handled += 1;
    }
    println!("handled {handled} messages");
    Ok(())
}
