//! What zbus keeps per MQ beyond qbus's MQ: its `mq_mode`, shared by the door's connections.

use std::collections::HashMap;
use std::sync::Mutex;

/// zbus `mq_mode` bits (`org.zbus.mq.Protocol.MqMode`).
pub mod mode {
    /// A plain MQ: consumers share the messages.
    pub const MQ: u32 = 1;
    /// Publish/subscribe: every subscribed session gets each message whose topic it names.
    pub const PUBSUB: u32 = 1 << 1;
    // 1 << 2 is zbus's Memory bit: qbus MQs are always stored, so it is only remembered.
    /// An RPC service queue: a produce with no consumer attached answers "Service Down".
    pub const RPC: u32 = 1 << 3;
}

/// What the zbus door shares between its connections: the `mq_mode` of each MQ created
/// through it. Modes live in memory: after a restart an MQ is a plain MQ until a
/// `create_mq` names its mode again (documented in `docs/zbus.md`).
pub struct Zbus {
    /// Different in every broker process, so per-session subscription groups of an earlier
    /// run never match a session of this one.
    pub(super) instance: u64,
    modes: Mutex<HashMap<String, u32>>,
}

impl Default for Zbus {
    fn default() -> Zbus {
        Zbus {
            instance: rand::random(),
            modes: Mutex::new(HashMap::new()),
        }
    }
}

impl Zbus {
    fn modes(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.modes.lock().expect("zbus mode table poisoned")
    }

    /// The mode of `mq`: what `create_mq` said, a plain MQ otherwise.
    pub fn mode(&self, mq: &str) -> u32 {
        self.modes().get(mq).copied().unwrap_or(mode::MQ)
    }

    /// Remembers the mode of `mq` unless one is known already (zbus keeps the first).
    pub fn declare(&self, mq: &str, mode: u32) {
        self.modes().entry(mq.to_owned()).or_insert(mode);
    }

    /// Forgets the mode of a removed MQ.
    pub fn forget(&self, mq: &str) {
        self.modes().remove(mq);
    }
}
