//! Delayed reminders that survive a broker restart: schedule three reminders a second or two
//! ahead, stop the broker before any is due, start it again on the same store, and get each
//! at its time (as attempt 1: a delayed message is no redelivery). The same works across a
//! `kill -9` of a `qbus-broker` process (`broker/tests/timing.rs`) and for delays of weeks.
//!
//! ```text
//! cargo run -p qbus-examples --example reminders
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use qbus_broker::{Config, EmbeddedBroker};
use qbus_client::{Message, MqOptions};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store = std::env::temp_dir().join(format!("qbus-reminders-{}", std::process::id()));
    let embedded = EmbeddedBroker::start(Config::with_store(&store)).await?;
    let broker = embedded.broker();
    broker.create_mq("reminders", MqOptions::default()).await?;

    let producer = broker.producer("reminders");
    let start = now_ms();
    let plan = [
        ("stand up and stretch", 1_500),
        ("drink some water", 1_000),
        ("check the oven", 2_000),
    ];
    for (text, delay_ms) in plan {
        let receipt = producer
            .send(
                Message::new(text)
                    .with_delay(Duration::from_millis(delay_ms))
                    // Not worth having once it is a minute late.
                    .with_ttl(Duration::from_secs(60)),
            )
            .await?;
        println!(
            "scheduled {text:?} in {delay_ms} ms (offset {}, {})",
            receipt.offset, receipt.durability
        );
    }
    println!("restarting the broker before any is due");
    // The broker handle shares the embedded broker: let go of it, so the store is free.
    drop((producer, broker));
    embedded.shutdown().await;

    // A new broker on the same store: the reminders are on its disk, not in memory.
    let embedded = EmbeddedBroker::start(Config::with_store(&store)).await?;
    let broker = embedded.broker();
    let info = broker.query_mq("reminders").await?;
    println!("after the restart: {} reminders pending", info.delayed);
    let mut consumer = broker.consumer("reminders").group("me").subscribe().await?;
    let mut late_ms = Vec::new();
    for _ in 0..plan.len() {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await?
            .ok_or("consumer ended")??;
        let text = String::from_utf8_lossy(&delivery.body).into_owned();
        let delay = plan.iter().find(|(t, _)| *t == text).map_or(0, |&(_, d)| d);
        let at = now_ms() - start;
        println!(
            "at +{at} ms: {text:?} (due at +{delay} ms, attempt {})",
            delivery.attempt
        );
        if at < delay {
            return Err(format!("{text:?} came {} ms early", delay - at).into());
        }
        late_ms.push(at - delay);
        delivery.ack().await?;
    }
    println!("every reminder on time (late by {late_ms:?} ms)");
    drop((consumer, broker));
    embedded.shutdown().await;
    std::fs::remove_dir_all(&store)?;
    Ok(())
}
