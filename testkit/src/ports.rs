//! Loopback ports that parallel tests never share, even across test processes.
//!
//! Binding port 0 and dropping the listener races: between the drop and the server's own
//! bind, the OS may hand that port to another test's bind(0) or to an outgoing connection.
//! Instead, ports come from a range below Linux's ephemeral range (32768 and up), which the
//! OS never picks by itself, and each is claimed by an exclusive lock on a file named after
//! it in a directory every test process shares. The lock lives as long as the [`Port`]
//! (and dies with the process), so a server restarted on its port keeps it.

use std::fs::{File, OpenOptions, TryLockError};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// The ports handed out: below the ephemeral range, above the well-known services.
const RANGE: std::ops::Range<u32> = 20_000..32_000;

/// A loopback port reserved for the caller until dropped.
#[derive(Debug)]
pub struct Port {
    port: u16,
    _claim: File,
}

impl Port {
    /// The port number.
    pub fn get(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

fn claims_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("qbus-test-ports");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// Reserves a loopback port no other test holds and nothing listens on.
pub fn reserve_port() -> Port {
    // Processes start at different places so they rarely try the same files.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = claims_dir();
    let span = RANGE.end - RANGE.start;
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..span {
        let port = RANGE.start + (start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed))) % span;
        let port = u16::try_from(port).expect("the range fits u16");
        let path = dir.join(port.to_string());
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => continue,
            Err(TryLockError::Error(e)) => panic!("lock {}: {e}", path.display()),
        }
        // Something outside the tests may hold it; a listener we drop at once leaves no
        // connection behind, so the server's bind right after succeeds.
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Port { port, _claim: file };
        }
    }
    panic!("no free loopback port in {RANGE:?}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ports_are_distinct_until_dropped() {
        let ports: Vec<Port> = (0..50).map(|_| reserve_port()).collect();
        let mut numbers: Vec<u16> = ports.iter().map(Port::get).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), ports.len());
        assert!(numbers.iter().all(|&p| RANGE.contains(&u32::from(p))));
        // Another process (here: another open file description) cannot claim a held port.
        let held = &ports[0];
        let again = File::options()
            .write(true)
            .open(claims_dir().join(held.get().to_string()))
            .unwrap();
        assert!(matches!(again.try_lock(), Err(TryLockError::WouldBlock)));
    }
}
