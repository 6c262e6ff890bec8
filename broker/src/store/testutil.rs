//! Helpers shared by the store's tests.

use qbus_wire::protocol::record::{encode_record, records};

use super::fsio::{FsRef, OsFs};
use super::log::LogConfig;
use super::reader::ReadBatch;

/// A store directory on a simulated disk whose own name is durable (the registry makes it
/// so before anything is written in it).
pub(crate) fn sim_store(disk: &super::simdisk::SimDisk) -> &'static std::path::Path {
    let store = std::path::Path::new("/store");
    disk.fs().create_dir_all(store).unwrap();
    disk.fs().sync_dir(std::path::Path::new("/")).unwrap();
    store
}

/// The operating system's file system, for tests on temporary directories.
pub(crate) fn os() -> FsRef {
    OsFs::shared()
}

/// Default settings but for a segment size of `segment_bytes`.
pub(crate) fn config(segment_bytes: u64) -> LogConfig {
    LogConfig {
        segment_bytes,
        ..LogConfig::default()
    }
}

/// The body of the test record with number `n`: its size varies with `n`.
pub(crate) fn body(n: u64) -> Vec<u8> {
    format!("message {n} {}", "x".repeat((n % 7) as usize * 10)).into_bytes()
}

/// Records numbered `from..to` back to back, unstamped.
pub(crate) fn batch(from: u64, to: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    for n in from..to {
        encode_record(&mut buf, 0, 0, Some("t"), None, &body(n)).unwrap();
    }
    buf
}

/// `(offset, body)` of every record of a batch.
pub(crate) fn decode(batch: &ReadBatch) -> Vec<(u64, Vec<u8>)> {
    let out: Vec<_> = records(&batch.data)
        .map(|r| {
            let r = r.unwrap();
            (r.offset, r.body.to_vec())
        })
        .collect();
    assert_eq!(out.len(), batch.count);
    out
}
