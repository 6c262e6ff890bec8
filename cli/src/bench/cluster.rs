//! A cluster on loopback for the scenarios that start their own (`failover`, `replicated`,
//! `faults`): trackers and brokers as child processes of the binaries next to `qbus` (or
//! `--bin-dir`), each broker with its store in a temp directory, so each can be killed,
//! wiped, restarted or frozen by PID. Everything is killed and removed on
//! [`Cluster::stop`] or drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;

use crate::error::CliError;

/// Where a scenario's cluster comes from: the binaries, and optionally its ports.
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Directory holding qbus-broker and qbus-tracker [default: the one holding qbus]
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Loopback ports for the trackers then the brokers, comma-separated [default: free
    /// ports the OS picks]
    #[arg(long, value_name = "PORT,PORT...", value_delimiter = ',')]
    pub ports: Vec<u16>,
}

/// The cluster's shape: how many of each, and how the brokers run.
pub struct Shape<'a> {
    /// A name for the temp directory.
    pub name: &'a str,
    /// Trackers.
    pub trackers: usize,
    /// Brokers.
    pub brokers: usize,
    /// `--report-interval` of the brokers, e.g. `500ms`.
    pub report_interval: &'a str,
}

/// How long a process may take to listen, or a scenario to see a state it waits for.
pub const WAIT: Duration = Duration::from_secs(20);

/// Trackers and brokers on loopback, each a child process.
pub struct Cluster {
    dir: PathBuf,
    bin_dir: PathBuf,
    report_interval: String,
    trackers: Vec<(Child, u16)>,
    brokers: Vec<(Option<Child>, u16)>,
}

impl Cluster {
    /// Starts `shape` and waits until every process listens.
    pub async fn start(args: &ClusterArgs, shape: Shape<'_>) -> Result<Cluster, CliError> {
        let bin_dir = match args.bin_dir.clone() {
            Some(dir) => dir,
            None => std::env::current_exe()?
                .parent()
                .map(Path::to_path_buf)
                .ok_or_else(|| {
                    CliError::Usage("cannot tell where qbus lives; use --bin-dir".into())
                })?,
        };
        let wanted = shape.trackers + shape.brokers;
        let mut ports = args.ports.clone();
        if !ports.is_empty() && ports.len() != wanted {
            return Err(CliError::Usage(format!(
                "--ports needs {wanted} ports ({} trackers, then {} brokers), got {}",
                shape.trackers,
                shape.brokers,
                ports.len()
            )));
        }
        while ports.len() < wanted {
            ports.push(free_port()?);
        }
        let dir =
            std::env::temp_dir().join(format!("qbus-bench-{}-{}", shape.name, std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut cluster = Cluster {
            dir,
            bin_dir,
            report_interval: shape.report_interval.to_owned(),
            trackers: Vec::new(),
            brokers: Vec::new(),
        };
        for &port in &ports[..shape.trackers] {
            let mut tracker = child_command(&cluster.bin_dir.join("qbus-tracker"));
            tracker.args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--warmup",
                "0ms",
            ]);
            let child = spawn(tracker, "qbus-tracker", &cluster.bin_dir)?;
            cluster.trackers.push((child, port));
        }
        for &(_, port) in &cluster.trackers {
            listening(port).await?;
        }
        for (i, &port) in ports[shape.trackers..].iter().enumerate() {
            cluster.brokers.push((None, port));
            cluster.spawn_broker(i)?;
        }
        for &(_, port) in &cluster.brokers {
            listening(port).await?;
        }
        Ok(cluster)
    }

    /// `tracker://` and every tracker.
    pub fn tracker_url(&self) -> String {
        let addrs: Vec<String> = self
            .trackers
            .iter()
            .map(|(_, port)| format!("127.0.0.1:{port}"))
            .collect();
        format!("tracker://{}", addrs.join(","))
    }

    /// Brokers in the cluster, running or not.
    pub fn len(&self) -> usize {
        self.brokers.len()
    }

    /// Broker `i`'s address, which is also its broker id.
    pub fn addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.brokers[i].1)
    }

    /// The temp directory holding the stores (removed on [`Cluster::stop`]), where a
    /// scenario may keep files of its own.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn store(&self, i: usize) -> PathBuf {
        self.dir.join(format!("broker-{i}"))
    }

    fn spawn_broker(&mut self, i: usize) -> Result<(), CliError> {
        let port = self.brokers[i].1;
        let trackers: Vec<String> = self
            .trackers
            .iter()
            .map(|(_, port)| format!("127.0.0.1:{port}"))
            .collect();
        let mut broker = child_command(&self.bin_dir.join("qbus-broker"));
        broker
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .arg("--store")
            .arg(self.store(i));
        if !trackers.is_empty() {
            broker
                .args(["--tracker", &trackers.join(",")])
                .args(["--report-interval", &self.report_interval]);
        }
        self.brokers[i].0 = Some(spawn(broker, "qbus-broker", &self.bin_dir)?);
        Ok(())
    }

    /// Broker `i`'s process id, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.brokers[i].0.as_ref().map(Child::id)
    }

    /// SIGKILL to broker `i`.
    pub fn kill(&mut self, i: usize) -> Result<(), CliError> {
        if let Some(mut child) = self.brokers[i].0.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Deletes broker `i`'s store (its machine's disk is lost); kill it first.
    pub fn wipe(&mut self, i: usize) -> Result<(), CliError> {
        match std::fs::remove_dir_all(self.store(i)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Starts broker `i` again (after a kill) on its port and store.
    pub async fn restart(&mut self, i: usize) -> Result<(), CliError> {
        self.kill(i)?;
        self.spawn_broker(i)?;
        listening(self.brokers[i].1).await
    }

    /// Sends `signal` (`-STOP`, `-CONT`) to broker `i` with `kill`.
    pub fn signal(&self, i: usize, signal: &str) -> Result<(), CliError> {
        let pid = self
            .pid(i)
            .ok_or_else(|| CliError::Failed(format!("broker #{i} is not running")))?;
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
        if !status.success() {
            return Err(CliError::Failed(format!("kill {signal} {pid} failed")));
        }
        Ok(())
    }

    /// Kills everything and removes the stores.
    pub fn stop(&mut self) {
        for i in 0..self.brokers.len() {
            // A frozen broker dies of SIGKILL all the same.
            let _ = self.kill(i);
        }
        for (tracker, _) in &mut self.trackers {
            let _ = tracker.kill();
            let _ = tracker.wait();
        }
        self.trackers.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A command running `program` as a child that dies with `qbus`: on Linux, through
/// `setpriv --pdeathsig KILL` (util-linux), which asks the kernel to SIGKILL it when the
/// `qbus` thread that started it ends, then execs `program` in its place (same PID, so
/// kills and SIGSTOPs by PID reach it). So a `qbus bench` killed with SIGKILL, which runs
/// no cleanup, leaves no brokers or trackers behind. Without `setpriv` (other systems),
/// `program` runs directly and only the cleanup of a `qbus` that ends normally stops it.
pub(super) fn child_command(program: &Path) -> Command {
    static SETPRIV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let setpriv = *SETPRIV.get_or_init(|| {
        cfg!(target_os = "linux")
            && Command::new("setpriv")
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success())
    });
    if !setpriv {
        return Command::new(program);
    }
    let mut command = Command::new("setpriv");
    command.args(["--pdeathsig", "KILL", "--"]).arg(program);
    command
}

pub(super) fn spawn(mut command: Command, name: &str, bin_dir: &Path) -> Result<Child, CliError> {
    command
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| {
            CliError::Failed(format!(
                "cannot start {name} from {}: {e} (build it with `cargo build --release -p qbus-broker -p qbus-tracker`, or pass --bin-dir)",
                bin_dir.display()
            ))
        })
}

pub(super) fn free_port() -> Result<u16, CliError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something accepts connections on `port`.
pub(super) async fn listening(port: u16) -> Result<(), CliError> {
    wait_until(&format!("a server on port {port}"), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await
}

/// Polls `done` every 10 ms for up to [`WAIT`].
pub(super) async fn wait_until(what: &str, done: impl FnMut() -> bool) -> Result<(), CliError> {
    wait_for(what, WAIT, done).await
}

/// Polls `done` every 10 ms for up to `limit`.
pub(super) async fn wait_for(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> Result<(), CliError> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > limit {
            return Err(CliError::Failed(format!(
                "timed out after {limit:?} waiting for {what}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
