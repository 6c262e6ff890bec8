//! HA DirectRPC, the server side: an [`RpcServer`](crate::RpcServer) started with tracker
//! addresses reports itself to each tracker as a node of kind `rpc` offering its modules as
//! services, the way a broker reports its MQs; [`HaInvoker`](crate::HaInvoker)s find it
//! there. Closing the reports (shutdown, or the process dying) makes the trackers drop it
//! at once.

use std::sync::Arc;
use std::time::Duration;

use qbus_client::protocol::Credentials;
use qbus_client::reporter::report;
use qbus_client::tls::ClientTls;
use qbus_client::topology::{NodeKind, NodeState};
use qbus_wire::now_ms;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Reports running in the background; stops when dropped.
pub(crate) struct Registration {
    /// Kept so the reporter keeps reporting: it stops when the sender goes.
    _state: watch::Sender<Arc<NodeState>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Registration {
    /// Starts reporting `addr` with `services` to every tracker (over TLS with `tls`),
    /// every `interval`.
    pub(crate) fn start(
        trackers: Vec<String>,
        tls: Option<ClientTls>,
        addr: String,
        services: Vec<String>,
        interval: Duration,
        credentials: Option<Credentials>,
    ) -> Registration {
        let epoch = now_ms();
        let state = NodeState {
            id: addr.clone(),
            addr,
            kind: NodeKind::RpcServer,
            epoch,
            seq: 1,
            report_interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            services,
            ..NodeState::default()
        };
        let (state, watch) = watch::channel(Arc::new(state));
        let stop = CancellationToken::new();
        let task = tokio::spawn(report(
            trackers,
            tls,
            credentials,
            watch,
            interval,
            stop.clone(),
        ));
        Registration {
            _state: state,
            stop,
            task,
        }
    }

    /// Closes the reports: the trackers drop this server at once.
    pub(crate) async fn stop(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}
