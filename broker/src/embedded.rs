//! The embedded broker: a full broker inside the application process, reached through the
//! same `Broker` handle as a remote one, with frames passed over channels instead of a socket.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use qbus_client::{Broker, ConnectionOptions};
use qbus_wire::link::{memory_link_pair, Connector, Link};

use crate::config::Config;
use crate::server::{Running, StartError};

/// A broker running in this process.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use qbus_broker::{Config, EmbeddedBroker};
/// let embedded = EmbeddedBroker::start(Config::with_store("./demo-store")).await?;
/// let broker = embedded.broker();
/// broker.create_mq("jobs", Default::default()).await?;
/// broker.producer("jobs").send("hello").await?;
/// embedded.shutdown().await;
/// # Ok(()) }
/// ```
pub struct EmbeddedBroker {
    running: Arc<Running>,
}

impl EmbeddedBroker {
    /// Opens the store in `config.store` and starts the broker (no listener).
    pub async fn start(config: Config) -> Result<EmbeddedBroker, StartError> {
        Ok(EmbeddedBroker {
            running: Arc::new(Running::start(config).await?),
        })
    }

    /// A client handle on this broker.
    pub fn broker(&self) -> Broker {
        Broker::from_connector(
            InProcess {
                running: self.running.clone(),
            },
            ConnectionOptions::default(),
        )
    }

    /// Stops the broker after syncing what it holds. Client handles fail afterwards.
    pub async fn shutdown(self) {
        self.running.shutdown().await;
    }
}

struct InProcess {
    running: Arc<Running>,
}

impl Connector for InProcess {
    fn connect(&self) -> Pin<Box<dyn Future<Output = std::io::Result<Link>> + Send + '_>> {
        Box::pin(async move {
            let (client, server) = memory_link_pair();
            self.running
                .serve(server, crate::auth::Peer::in_process())
                .await;
            Ok(client)
        })
    }

    fn addr(&self) -> String {
        "embedded".into()
    }
}
