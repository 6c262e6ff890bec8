//! Headless Chromium, to load a monitor page as a browser does and dump its DOM or take a
//! screenshot.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The headless Chromium to drive: `$CHROMIUM`, or `chromium` on the `PATH`.
pub fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("chromium"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "headless Chromium is needed for the monitor page tests and is not installed: \
                 run `apt-get install -y chromium` (scripts/test.sh installs it when missing) \
                 or set CHROMIUM to its path"
            )
        })
}

/// Runs headless Chromium on `url` with `action` (`--dump-dom` or `--screenshot=...`) in a
/// window of `width` x `height` pixels, letting the page run for three seconds of virtual
/// time; returns its standard output. Fails the test after 60 s (a cold start on a loaded
/// 2-core machine has taken over 15).
pub async fn run_chromium(url: &str, action: &str, (width, height): (u32, u32)) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut profile_arg = std::ffi::OsString::from("--user-data-dir=");
    profile_arg.push(profile.path());
    let run = tokio::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--window-size={width},{height}"))
        .arg(profile_arg)
        .arg(action)
        .arg(url)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("chromium finished within 60 s")
        .expect("chromium runs");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Takes a screenshot of `url` in a window of `window` pixels into `path` (replacing an
/// older one), and checks it holds a picture (over 10 kB).
pub async fn screenshot(url: &str, path: &Path, window: (u32, u32)) {
    let _ = std::fs::remove_file(path);
    run_chromium(url, &format!("--screenshot={}", path.display()), window).await;
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "screenshot {} is {size} bytes",
        path.display()
    );
}
