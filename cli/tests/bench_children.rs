//! The brokers and trackers a `qbus bench` scenario starts die with it, even when `qbus`
//! itself is killed with SIGKILL and runs no cleanup (Linux, through `setpriv
//! --pdeathsig`).

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qbus_testkit::ports::reserve_port;
use qbus_testkit::process::built_binary;

/// How long the cluster may take to listen, and its processes to go once `qbus` is gone.
const LIMIT: Duration = Duration::from_secs(30);

fn listening(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < LIMIT, "{what} within {LIMIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[cfg(target_os = "linux")]
fn a_killed_bench_leaves_no_brokers_or_trackers_behind() {
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("no setpriv on this machine: bench children are not tied to qbus");
        return;
    }
    let broker = built_binary("qbus-broker", "qbus-broker");
    built_binary("qbus-tracker", "qbus-tracker");
    let bin_dir = broker.parent().expect("target dir").to_path_buf();
    let reserved: Vec<_> = (0..4).map(|_| reserve_port()).collect();
    let ports: Vec<u16> = reserved.iter().map(|p| p.get()).collect();
    let listed: Vec<String> = ports.iter().map(u16::to_string).collect();
    // The stores go to a temp dir of the test's own, left behind by the killed `qbus`.
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut qbus = Command::new(env!("CARGO_BIN_EXE_qbus"))
        .args(["bench", "replicated", "--rounds", "1"])
        .args(["--count", "100000000"])
        .args(["--ports", &listed.join(",")])
        .arg("--bin-dir")
        .arg(&bin_dir)
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qbus bench replicated");
    wait_for("the tracker and three brokers listening", || {
        ports.iter().all(|&port| listening(port))
    });
    qbus.kill().expect("SIGKILL qbus");
    qbus.wait().expect("reap qbus");
    wait_for("every broker and tracker gone with qbus", || {
        ports.iter().all(|&port| !listening(port))
    });
}
