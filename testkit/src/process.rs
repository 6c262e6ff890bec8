//! The workspace's binaries as child processes: found next to the test executable, started
//! on a free loopback port, waited for until they listen, killed by PID when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

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

/// The binary `name` of the workspace package `package`, built first (once per test run,
/// in the test's own profile): cargo builds only the tested package's own binaries for its
/// tests.
pub fn built_binary(package: &str, name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let dir = binary_dir();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == name) {
        let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "--quiet", "-p", package, "--bin", name]);
        build.args(["--manifest-path", manifest]);
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

/// `binary` listening on `127.0.0.1:port` with its store in `store`, as `qbus-broker` takes
/// them; it logs warnings only and reads no stdin.
pub fn broker_command(binary: &Path, port: u16, store: &Path) -> Command {
    let mut cmd = server_command(binary, port);
    cmd.arg("--store").arg(store);
    cmd
}

/// `binary` listening on `127.0.0.1:port` with the given warm-up, as `qbus-tracker` takes
/// them; it logs warnings only and reads no stdin.
pub fn tracker_command(binary: &Path, port: u16, warmup: Duration) -> Command {
    let mut cmd = server_command(binary, port);
    cmd.args(["--warmup", &format!("{}ms", warmup.as_millis())]);
    cmd
}

fn server_command(binary: &Path, port: u16) -> Command {
    let mut cmd = Command::new(binary);
    cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    cmd
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
