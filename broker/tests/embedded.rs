//! The embedded broker passes the same client scenarios as the real process.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::sync::Arc;

use qbus_broker::{Config, EmbeddedBroker};
use support::scenarios::{self, Connect};

/// An embedded broker with a temp store (both kept while it is held) and a [`Connect`] to it.
async fn embedded() -> ((Arc<EmbeddedBroker>, tempfile::TempDir), Connect) {
    let dir = tempfile::tempdir().unwrap();
    let broker = Arc::new(
        EmbeddedBroker::start(Config::with_store(dir.path()))
            .await
            .unwrap(),
    );
    let for_connect = broker.clone();
    let connect: Connect = Box::new(move || {
        let broker = for_connect.broker();
        Box::pin(async move { broker })
    });
    ((broker, dir), connect)
}

scenarios::scenario_tests!(
    embedded:
    round_trip,
    two_groups_each_get_everything,
    one_group_splits_messages,
    closed_consumer_is_redelivered,
    stopped_consumer_gives_back_unseen,
    removed_group_starts_afresh,
    ack_timeout_and_dead_letters,
    start_at_end,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_an_embedded_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first = EmbeddedBroker::start(Config::with_store(dir.path()))
        .await
        .unwrap();
    let broker = first.broker();
    broker.create_mq("keep", Default::default()).await.unwrap();
    broker.producer("keep").send("kept").await.unwrap();
    drop(broker);
    first.shutdown().await;

    let second = EmbeddedBroker::start(Config::with_store(dir.path()))
        .await
        .unwrap();
    let info = second.broker().query_mq("keep").await.unwrap();
    assert_eq!(info.depth(), 1);
    second.shutdown().await;
}
