//! The workspace's binaries as child processes: built (or found) next to the test
//! executable, started on a reserved loopback port, waited for until they listen, killed by
//! PID when dropped. [`BrokerProcess`] and [`TrackerProcess`] are the one wrapper of each
//! server that every test tree uses.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use qbus_client::topology::TopologyUpdate;

use crate::ports::{reserve_port, Port};

/// The longest a server may take to listen after it is started.
const START_LIMIT: Duration = Duration::from_secs(20);

/// `target/<profile>`, where cargo puts the workspace's binaries; a test executable runs
/// from `target/<profile>/deps`.
fn binary_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("test executable in target/<profile>/deps")
        .to_path_buf()
}

/// A workspace binary next to the test executable (`target/<profile>/<name>`). `cargo test
/// --workspace` builds them all; for a binary of another package tested alone, see
/// [`built_binary`].
pub fn binary(name: &str) -> PathBuf {
    let path = binary_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p qbus-broker -p qbus-tracker -p qbus-cli` \
         (cargo test --workspace does)",
        path.display()
    );
    path
}

/// Set to `1` (by `scripts/test.sh`) when the workspace's binaries were just built with its
/// tests, so [`built_binary`] need not build them.
pub const PREBUILT: &str = "QBUS_TEST_PREBUILT";

/// The binary `name` of the workspace package `package`, built first (once per test run,
/// in the test's own profile) unless [`PREBUILT`] says it was: cargo builds only the
/// tested package's own binaries for its tests.
pub fn built_binary(package: &str, name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let dir = binary_dir();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    // scripts/test.sh builds every test and binary of the workspace in one cargo run first;
    // a second build with this package's features alone would compile them all again.
    // A binary that build did not make (its package has no tests of its own) is built here.
    let prebuilt = std::env::var_os(PREBUILT).is_some_and(|v| v == "1") && dir.join(name).exists();
    if !prebuilt && !built.iter().any(|b| b == name) {
        let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "--quiet", "-p", package, "--bin", name]);
        build.args(["--manifest-path", manifest]);
        // Cargo gives a test the variables of its own package; a build script that reads
        // one (ring's reads CARGO_MANIFEST_DIR) would see it change, and this build and
        // the next `cargo test` would rebuild TLS and everything above it in turn.
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(set_by_cargo_for_the_test) {
                build.env_remove(key);
            }
        }
        if profile == "release" {
            build.arg("--release");
        }
        let status = build
            .status()
            .unwrap_or_else(|e| panic!("run cargo build for {name}: {e}"));
        assert!(status.success(), "building {name} failed");
        built.push(name.to_owned());
    }
    dir.join(name)
}

/// Whether `key` is one of the variables cargo sets for the crate it runs (its package's
/// name, paths and version), as opposed to the user's own cargo configuration.
fn set_by_cargo_for_the_test(key: &str) -> bool {
    key.starts_with("CARGO_PKG_")
        || matches!(
            key,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
        )
}

/// `binary` listening on `127.0.0.1:port`, logging warnings only, reading no stdin.
fn server_command(binary: &Path, port: u16) -> Command {
    let mut cmd = Command::new(binary);
    cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    cmd
}

/// A `qbus-broker` child process on a reserved loopback port, with a temp store unless
/// given one; killed by PID when dropped.
///
/// ```no_run
/// use qbus_testkit::process::BrokerProcess;
/// let mut broker = BrokerProcess::start(&["--fsync", "never"]);
/// let addr = broker.addr(); // 127.0.0.1:<port>
/// broker.restart(); // kill -9, then the same port, store and flags
/// ```
#[derive(Debug)]
pub struct BrokerProcess {
    server: Option<ServerProcess>,
    port: Port,
    store: PathBuf,
    args: Vec<String>,
    _dir: Option<tempfile::TempDir>,
}

impl BrokerProcess {
    /// Starts a broker with a fresh temp store and `args` after the port and store flags.
    pub fn start(args: &[&str]) -> BrokerProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = dir.path().join("store");
        let mut broker = BrokerProcess::on_store(&store, args);
        broker._dir = Some(dir);
        broker
    }

    /// Starts a broker on the store directory `store`, which outlives it.
    pub fn on_store(store: &Path, args: &[&str]) -> BrokerProcess {
        let mut broker = BrokerProcess {
            server: None,
            port: reserve_port(),
            store: store.to_path_buf(),
            args: args.iter().map(|a| a.to_string()).collect(),
            _dir: None,
        };
        broker.spawn();
        broker
    }

    /// The command line of a broker on `port` and `store` with `args`, not started (for
    /// tests that watch it fail).
    pub fn command(port: u16, store: &Path, args: &[&str]) -> Command {
        let mut cmd = server_command(&broker_binary(), port);
        cmd.arg("--store").arg(store).args(args);
        cmd
    }

    fn spawn(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let command = BrokerProcess::command(self.port.get(), &self.store, &args);
        self.server = Some(ServerProcess::start(
            "qbus-broker",
            command,
            self.port.get(),
        ));
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port.get()
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        self.port.addr()
    }

    /// Its store directory.
    pub fn store(&self) -> &Path {
        &self.store
    }

    fn running(&self) -> &ServerProcess {
        self.server.as_ref().expect("broker not running")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.running().pid()
    }

    /// SIGKILL: no flush, no goodbye; waits for the exit.
    pub fn kill9(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.kill9();
        }
    }

    /// SIGTERM, and waits (at most 20 s) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.server.take().expect("broker not running").terminate()
    }

    /// SIGSTOP: the process (and its reports) freeze with its connections open.
    pub fn freeze(&self) {
        self.running().signal("-STOP");
    }

    /// SIGCONT after [`BrokerProcess::freeze`].
    pub fn thaw(&self) {
        self.running().signal("-CONT");
    }

    /// Kills it (if running) and starts it again on the same port, store and flags.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// A client of this broker alone.
    pub async fn client(&self) -> qbus_client::Broker {
        qbus_client::Broker::connect(&self.addr())
            .await
            .expect("connect to the broker")
    }

    /// A broker holding the MQ `mq`, which nothing consumes, and a client of it.
    pub async fn with_idle_mq(mq: &str) -> (BrokerProcess, qbus_client::Broker) {
        let process = BrokerProcess::start(&[]);
        let broker = process.client().await;
        broker
            .create_mq(mq, qbus_client::MqOptions::default())
            .await
            .expect("create the MQ");
        (process, broker)
    }
}

/// A `qbus-tracker` child process on a reserved loopback port; killed by PID when dropped.
///
/// ```no_run
/// use std::time::Duration;
/// use qbus_testkit::process::TrackerProcess;
/// let tracker = TrackerProcess::start(Duration::ZERO); // ready at once
/// let url = format!("tracker://{}", tracker.addr());
/// ```
#[derive(Debug)]
pub struct TrackerProcess {
    server: ServerProcess,
    port: Port,
    warmup: Duration,
    args: Vec<String>,
}

impl TrackerProcess {
    /// Starts a tracker whose view counts as complete after `warmup`.
    pub fn start(warmup: Duration) -> TrackerProcess {
        TrackerProcess::start_with(warmup, &[])
    }

    /// Starts a tracker with `args` after the port and warm-up flags.
    pub fn start_with(warmup: Duration, args: &[&str]) -> TrackerProcess {
        let port = reserve_port();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        TrackerProcess {
            server: TrackerProcess::spawn(port.get(), warmup, &args),
            port,
            warmup,
            args,
        }
    }

    fn spawn(port: u16, warmup: Duration, args: &[String]) -> ServerProcess {
        let binary = built_binary("qbus-tracker", "qbus-tracker");
        let mut cmd = server_command(&binary, port);
        cmd.args(["--warmup", &format!("{}ms", warmup.as_millis())]);
        cmd.args(args);
        ServerProcess::start("qbus-tracker", cmd, port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port.get()
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        self.port.addr()
    }

    /// SIGKILL: no goodbye.
    pub fn kill9(&mut self) {
        self.server.kill9();
    }

    /// Kills it and starts it again, empty, on the same port.
    pub fn restart(&mut self) {
        self.server.kill9();
        self.server = TrackerProcess::spawn(self.port.get(), self.warmup, &self.args);
    }

    /// The tracker's own view, by a one-shot `QueryTopology`.
    pub async fn query(&self) -> TopologyUpdate {
        qbus_client::ha::query_tracker(&self.addr(), Default::default())
            .await
            .expect("query the tracker")
    }

    /// Addresses of the nodes the tracker lists.
    pub async fn broker_addrs(&self) -> Vec<String> {
        self.query()
            .await
            .brokers
            .into_iter()
            .map(|b| b.addr)
            .collect()
    }
}

/// `qbus-broker`, built for this test run when its package is not the one under test.
fn broker_binary() -> PathBuf {
    built_binary("qbus-broker", "qbus-broker")
}

/// A server child process listening on a loopback port; killed when dropped.
#[derive(Debug)]
pub struct ServerProcess {
    child: Option<Child>,
    name: String,
    /// The port it listens on.
    pub port: u16,
}

impl ServerProcess {
    /// Starts `command` (logging warnings only, no stdin) and waits until it listens on
    /// `127.0.0.1:port`; fails the test if it exits first or takes longer than 20 s. `name`
    /// is for messages.
    pub fn start(name: &str, mut command: Command, port: u16) -> ServerProcess {
        command.env("RUST_LOG", "warn").stdin(Stdio::null());
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let mut process = ServerProcess {
            child: Some(child),
            name: name.to_owned(),
            port,
        };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(Ok(Some(status))) = process.child.as_mut().map(Child::try_wait) {
                panic!("{name} exited at start-up: {status}");
            }
            assert!(
                start.elapsed() < START_LIMIT,
                "{name} did not listen on port {port}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        process
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .unwrap_or_else(|| panic!("{} not running", self.name))
    }

    /// SIGKILL: no flush, no goodbye; waits for the exit.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`-STOP`, `-CONT`, ...) with `kill`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(
            status.success(),
            "kill {signal} {} ({})",
            self.pid(),
            self.name
        );
    }

    /// SIGTERM, and waits (at most 20 s) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("-TERM");
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("{} not running", self.name));
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                start.elapsed() < START_LIMIT,
                "{} ignored SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Kills a child when dropped (for processes a test starts itself).
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `qbus-tx-producer` child process (this crate's binary: a transactional producer or a
/// checker that tests kill with `kill -9`), its output read line by line; killed by PID
/// when dropped.
pub struct TxProducerProcess {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl TxProducerProcess {
    /// `qbus-tx-producer ADDR GROUP MODE` (`half` or `commit`).
    pub fn start(addr: &str, group: &str, mode: &str) -> TxProducerProcess {
        use std::io::BufRead;
        let binary = built_binary("qbus-testkit", "qbus-tx-producer");
        let mut child = Command::new(binary)
            .args([addr, group, mode])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (to, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if to.send(line).is_err() {
                    return;
                }
            }
        });
        TxProducerProcess { child, lines }
    }

    /// The rest of its next output line that starts with `prefix` (within 20 s).
    pub fn line(&self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.to_owned();
                    }
                }
                Err(e) => panic!("no line {prefix:?} from the producer process: {e}"),
            }
        }
    }

    /// `kill -9` (SIGKILL to its PID), and waits for it to be gone.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for TxProducerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
