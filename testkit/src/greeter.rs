//! `Greeter`, the RPC service the tests of every tree call, with counters a test can watch.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use qbus_rpc::{service, RpcProcessor};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The application's own error, carried in the method's `Result`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GreetError {
    Rejected { reason: String },
}

#[service]
pub trait Greeter {
    /// A greeting.
    async fn hello(&self, name: String) -> String;
    /// The name back, or an application error for an empty one.
    async fn check(&self, name: String) -> Result<String, GreetError>;
    /// Sleeps, then returns how long; counted in [`Probe`].
    async fn slow(&self, millis: u64) -> u64;
    /// Two arguments back.
    async fn echo(&self, n: u64, tag: String) -> (u64, String);
    /// Which server answered.
    async fn whoami(&self) -> String;
}

/// What the implementation saw: slow calls started, finished, and stopped before finishing.
#[derive(Debug, Clone)]
pub struct Probe {
    pub started: watch::Sender<usize>,
    pub finished: Arc<AtomicUsize>,
    pub stopped: Arc<AtomicUsize>,
    /// Slow calls running now, and the most that ever ran at once.
    pub running: Arc<AtomicUsize>,
    pub most_running: Arc<AtomicUsize>,
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            started: watch::channel(0).0,
            finished: Arc::new(AtomicUsize::new(0)),
            stopped: Arc::new(AtomicUsize::new(0)),
            running: Arc::new(AtomicUsize::new(0)),
            most_running: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl Probe {
    /// Waits until `n` slow calls have started.
    pub async fn until_started(&self, n: usize) {
        let mut started = self.started.subscribe();
        tokio::time::timeout(Duration::from_secs(10), started.wait_for(|&s| s >= n))
            .await
            .expect("slow call never started")
            .expect("probe closed");
    }

    pub fn stopped(&self) -> usize {
        self.stopped.load(Ordering::SeqCst)
    }

    pub fn finished(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }
}

pub struct Friendly {
    pub name: String,
    pub probe: Probe,
}

/// Counts a slow call as stopped if it is dropped before it finishes.
struct StopWatch<'a> {
    probe: &'a Probe,
    done: bool,
}

impl Drop for StopWatch<'_> {
    fn drop(&mut self) {
        self.probe.running.fetch_sub(1, Ordering::SeqCst);
        if !self.done {
            self.probe.stopped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Greeter for Friendly {
    async fn hello(&self, name: String) -> String {
        format!("Hello, {name}!")
    }

    async fn check(&self, name: String) -> Result<String, GreetError> {
        if name.is_empty() {
            Err(GreetError::Rejected {
                reason: "empty name".into(),
            })
        } else {
            Ok(name)
        }
    }

    async fn slow(&self, millis: u64) -> u64 {
        self.probe.started.send_modify(|n| *n += 1);
        let now = self.probe.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.probe.most_running.fetch_max(now, Ordering::SeqCst);
        let mut watch = StopWatch {
            probe: &self.probe,
            done: false,
        };
        tokio::time::sleep(Duration::from_millis(millis)).await;
        watch.done = true;
        self.probe.finished.fetch_add(1, Ordering::SeqCst);
        millis
    }

    async fn echo(&self, n: u64, tag: String) -> (u64, String) {
        (n, tag)
    }

    async fn whoami(&self) -> String {
        self.name.clone()
    }
}

/// A processor serving a `Friendly` greeter called `name`, and its probe.
pub fn processor(name: &str) -> (RpcProcessor, Probe) {
    let probe = Probe::default();
    let mut processor = RpcProcessor::new();
    processor.add(GreeterServer::new(Friendly {
        name: name.to_owned(),
        probe: probe.clone(),
    }));
    (processor, probe)
}
