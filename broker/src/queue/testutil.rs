//! Helpers shared by the queue engine's tests (and the core's, which drive it).

use std::thread::JoinHandle;

use bytes::BytesMut;
use qbus_wire::protocol::record::{encode_record, records};
use qbus_wire::protocol::DeliveryToken;

use super::group_commit::Committer;
use crate::config::FsyncPolicy;

/// A running commit thread; [`Commit::stop`] ends it.
pub(crate) struct Commit {
    pub(crate) committer: Committer,
    thread: JoinHandle<()>,
}

impl Commit {
    /// Starts a commit thread that fsyncs before every acknowledgement.
    pub(crate) fn start() -> Commit {
        let (committer, thread) = Committer::start(FsyncPolicy::Always).unwrap();
        Commit { committer, thread }
    }

    /// Ends the thread after it wrote and synced everything queued.
    pub(crate) async fn stop(self) {
        self.committer.stop().await;
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
    }
}

/// Unstamped records with these bodies, back to back, and how many.
pub(crate) fn produce(bodies: &[&str]) -> (BytesMut, u32) {
    let mut out = BytesMut::new();
    for body in bodies {
        encode_record(&mut out, 0, 0, None, None, body.as_bytes()).unwrap();
    }
    (out, bodies.len() as u32)
}

/// `(offset, body)` of records back to back.
pub(crate) fn read(records_: &[u8]) -> Vec<(u64, String)> {
    records(records_)
        .map(|r| {
            let r = r.unwrap();
            (r.offset, String::from_utf8(r.body.to_vec()).unwrap())
        })
        .collect()
}

/// The tokens acknowledging the records of a fetch, in order.
pub(crate) fn tokens(body: &[u8], attempts: &[u32]) -> Vec<DeliveryToken> {
    read(body)
        .into_iter()
        .zip(attempts)
        .map(|((offset, _), &attempt)| DeliveryToken { offset, attempt })
        .collect()
}
