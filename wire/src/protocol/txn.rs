//! Bodies of the transaction commands (protocol 4): what `TxBegin` may ask for and what
//! `TxList` describes. MessagePack maps: fields may be added, older peers ignore them.

use serde::{Deserialize, Serialize};

/// Default time a transaction may stay undecided before the broker resolves it (as
/// RocketMQ's `transactionTimeOut`).
pub const DEFAULT_TX_TIMEOUT_MS: u64 = 6_000;
/// Default number of times an undecided transaction's timeout may pass before the broker
/// applies its policy (as RocketMQ's `transactionCheckMax`).
pub const DEFAULT_TX_MAX_CHECKS: u32 = 15;

/// `TxBegin` body: every field optional, defaults in the field docs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TxOptions {
    /// The producer group the transaction belongs to: the broker asks a connection of this
    /// group that sent `TxCheckerReady` when the transaction stays undecided.
    pub group: Option<String>,
    /// How long the transaction may stay undecided before its first check, ms (default
    /// [`DEFAULT_TX_TIMEOUT_MS`]).
    pub timeout_ms: Option<u64>,
    /// Time between later checks, ms (default: the timeout).
    pub check_interval_ms: Option<u64>,
    /// Checks before the broker applies `commit_unresolved` (default
    /// [`DEFAULT_TX_MAX_CHECKS`]).
    pub max_checks: Option<u32>,
    /// What the broker does once the checks are used up: commit when true, roll back when
    /// false (the default).
    pub commit_unresolved: Option<bool>,
}

/// Where a transaction stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TxState {
    /// Open: its messages are stored and invisible.
    Pending,
    /// Committed: its messages are (or are being made) visible.
    Committed,
    /// Rolled back: its messages are gone.
    RolledBack,
}

impl std::fmt::Display for TxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TxState::Pending => "pending",
            TxState::Committed => "committed",
            TxState::RolledBack => "rolled back",
        })
    }
}

/// One transaction as `TxList` (and HTTP `GET /tx`) describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxInfo {
    /// Its id, unique on its broker.
    pub id: u64,
    /// Its producer group, if it named one.
    pub group: Option<String>,
    /// Where it stands.
    pub state: TxState,
    /// The MQs its messages go to, each with its number of messages.
    pub mqs: Vec<(String, u32)>,
    /// How long ago it began, ms.
    pub age_ms: u64,
    /// How many times its timeout passed undecided.
    pub checks: u32,
}

/// `TxCheck` body: the transaction the broker asks about and what its messages say, so a
/// producer (perhaps a restarted one, without memory of it) can look it up locally.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxCheck {
    /// The transaction, as `TxList` describes it (`checks` counts this check).
    pub txn: TxInfo,
    /// Its messages in the order sent (at most [`MAX_CHECKED_MESSAGES`]).
    pub messages: Vec<CheckedMessage>,
}

/// Most messages a `TxCheck` describes (a transaction may hold more).
pub const MAX_CHECKED_MESSAGES: usize = 1_000;

/// One message of a checked transaction: where it goes and the fields that name it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CheckedMessage {
    /// Its MQ.
    pub mq: String,
    /// Its key, if it has one.
    pub key: Option<String>,
    /// Its tag, if it has one.
    pub tag: Option<String>,
}
