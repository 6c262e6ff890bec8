//! Quick start: an embedded broker, a producer and a consumer in one process. No set-up.
//!
//! ```text
//! cargo run -p qbus-examples --example quickstart
//! ```

use futures_util::StreamExt;
use qbus_broker::{Config, EmbeddedBroker};
use qbus_client::{Message, MqOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store = std::env::temp_dir().join(format!("qbus-quickstart-{}", std::process::id()));
    let embedded = EmbeddedBroker::start(Config::with_store(&store)).await?;
    let broker = embedded.broker();

    broker.create_mq("greetings", MqOptions::default()).await?;
    let producer = broker.producer("greetings");
    for i in 1..=5 {
        let receipt = producer
            .send(Message::new(format!("hello #{i}")).with_tag("demo"))
            .await?;
        println!(
            "sent    hello #{i} -> offset {} ({})",
            receipt.offset, receipt.durability
        );
    }

    let mut consumer = broker
        .consumer("greetings")
        .group("readers")
        .subscribe()
        .await?;
    for _ in 0..5 {
        let Some(delivery) = consumer.next().await else {
            break;
        };
        let delivery = delivery?;
        println!(
            "got     {} (offset {}, tag {:?})",
            String::from_utf8_lossy(&delivery.body),
            delivery.offset,
            delivery.tag
        );
        delivery.ack().await?;
    }

    let info = broker.query_mq("greetings").await?;
    let group = &info.groups[0];
    println!(
        "MQ {} holds {} messages; group {} has {} unacknowledged",
        info.name,
        info.depth(),
        group.name,
        group.lag
    );
    drop(consumer);
    embedded.shutdown().await;
    std::fs::remove_dir_all(&store)?;
    Ok(())
}
