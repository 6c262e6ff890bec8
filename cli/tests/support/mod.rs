//! Running a `qbus bench` scenario that checks its own outcome, as the black-box tests do.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a scenario printed, with its `RESULT` line.
pub struct BenchRun {
    pub stdout: String,
    line: String,
}

impl BenchRun {
    /// Runs `qbus bench ARGS` with the brokers and trackers of `bin_dir`, killing it after
    /// `limit`; panics unless it succeeds and prints a `RESULT` line.
    pub fn run(args: &[&str], bin_dir: &std::path::Path, limit: Duration) -> BenchRun {
        let mut child = Command::new(env!("CARGO_BIN_EXE_qbus"))
            .arg("bench")
            .args(args)
            .arg("--bin-dir")
            .arg(bin_dir)
            .env("QBUS_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qbus bench");
        let started = Instant::now();
        while child.try_wait().expect("wait").is_none() {
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!("qbus bench {args:?} took over {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = child.wait_with_output().expect("output");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        let line = stdout
            .lines()
            .find(|l| l.starts_with("RESULT "))
            .unwrap_or_else(|| panic!("no RESULT line: {stdout}"))
            .to_owned();
        BenchRun { stdout, line }
    }

    /// The number `key=` of the `RESULT` line.
    pub fn field(&self, key: &str) -> u64 {
        self.line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {}", self.line))
    }
}
