//! Check-back (protocol 4): answering the broker's questions about a producer group's
//! transactions that stayed undecided past their timeout (a producer that crashed between
//! its local work and its commit, or lost the connection).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::connection::Connection;
use crate::error::Result;
use crate::protocol::{Command, Frame, Header, TxCheck};
use crate::transaction::Transaction;

/// Checks one connection keeps waiting for its checker before the broker's next ones are
/// missed (the broker asks again at the next interval).
const CHECKS_QUEUED: usize = 256;
/// How often a checker's connection, when down, is opened again: a connection otherwise
/// reconnects at its next request, and the broker checks only connections that are up.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// What a producer answers when the broker asks about an undecided transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckAnswer {
    /// The local work was done: make the messages visible.
    Commit,
    /// The local work was not done (or undone): discard the messages.
    Rollback,
    /// Not known yet: the broker asks again at its next check interval, and applies its
    /// policy once the checks are used up.
    Unknown,
}

/// Decides a producer group's undecided transactions when the broker asks, typically by
/// looking up in the local database whether the work the transaction stands for was done
/// (by this process or one before it that crashed). Register one with
/// [`Broker::register_checker`](crate::Broker::register_checker).
///
/// ```no_run
/// use qbus_client::{CheckAnswer, TransactionChecker, TxCheck};
///
/// struct Ledger;
///
/// impl TransactionChecker for Ledger {
///     async fn check(&self, check: &TxCheck) -> CheckAnswer {
///         // Say the producer put the order number in each message's key.
///         let order = check.messages.first().and_then(|m| m.key.clone());
///         match order {
///             Some(order) if order_was_saved(&order) => CheckAnswer::Commit,
///             Some(_) => CheckAnswer::Rollback,
///             None => CheckAnswer::Unknown,
///         }
///     }
/// }
/// # fn order_was_saved(_: &str) -> bool { true }
///
/// # async fn demo() -> Result<(), qbus_client::ClientError> {
/// let broker = qbus_client::Broker::connect("127.0.0.1:15555").await?;
/// broker.register_checker("billing", Ledger).await?;
/// # Ok(()) }
/// ```
pub trait TransactionChecker: Send + Sync + 'static {
    /// The decision for the transaction `check` describes (its id, MQs, and its messages'
    /// keys and tags).
    fn check(&self, check: &TxCheck) -> impl Future<Output = CheckAnswer> + Send;
}

/// Makes `connection` answer the checks of producer group `group` with `checker`, now and
/// after every reconnect, while the connection is open: fails, registering nothing, when
/// the broker cannot be reached or refuses.
pub(crate) async fn register<C: TransactionChecker>(
    connection: &Connection,
    group: &str,
    checker: Arc<C>,
) -> Result<()> {
    let stop = CancellationToken::new();
    let ready = attach(connection, group, checker, stop.clone());
    if let Err(e) = connection.request(Frame::new(ready.clone())).await {
        stop.cancel();
        connection.stop_repeating(&ready);
        return Err(e);
    }
    Ok(())
}

/// Starts answering the checks of `group` that arrive on `connection` with `checker`, and
/// has the connection tell its broker so on every link it opens from now on (the
/// connection is kept up: the broker checks only connections that are up), until `stop`
/// is cancelled or the connection dropped. Returns the `TxCheckerReady` request, for the
/// caller to send on the link open now, if any.
pub(crate) fn attach<C: TransactionChecker>(
    connection: &Connection,
    group: &str,
    checker: Arc<C>,
    stop: CancellationToken,
) -> Header {
    let mut ready = Header::request(Command::TxCheckerReady, None);
    ready.group = Some(group.to_owned());
    let (to, checks) = mpsc::channel(CHECKS_QUEUED);
    connection.subscribe_pushes(to);
    // Repeated from before the first request, so a reconnect in between is covered too.
    connection.repeat_on_connect(ready.clone());
    tokio::spawn(answer(
        connection.clone(),
        ready.clone(),
        checker,
        checks,
        stop,
    ));
    ready
}

/// Answers each check of `group` that arrives on `checks`, until the connection closes.
async fn answer<C: TransactionChecker>(
    connection: Connection,
    ready: Header,
    checker: Arc<C>,
    mut checks: mpsc::Receiver<Frame>,
    stop: CancellationToken,
) {
    let group = ready.group.clone().unwrap_or_default();
    // Held weakly: the connection's pushes feed `checks`, so this task must not keep it
    // open once the application dropped it.
    let weak = connection.downgrade();
    drop(connection);
    let mut tick = tokio::time::interval(RECONNECT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let frame = tokio::select! {
            _ = stop.cancelled() => {
                if let Some(connection) = weak.upgrade() {
                    connection.stop_repeating(&ready);
                }
                return;
            }
            frame = checks.recv() => match frame {
                Some(frame) => frame,
                None => return,
            },
            _ = tick.tick() => {
                let Some(connection) = weak.upgrade() else {
                    return;
                };
                // Its `TxCheckerReady` is repeated on the new link.
                if !connection.is_connected() {
                    if let Err(e) = connection.ensure_connected().await {
                        tracing::debug!(error = %e, "checker connection still down");
                    }
                }
                continue;
            }
        };
        if frame.header.cmd != Command::TxCheck {
            continue;
        }
        let check: TxCheck = match rmp_serde::from_slice(&frame.body) {
            Ok(check) => check,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable transaction check, ignored");
                continue;
            }
        };
        if check.txn.group.as_deref() != Some(group.as_str()) {
            continue;
        }
        let Some(connection) = weak.upgrade() else {
            return;
        };
        let checker = checker.clone();
        // One at a time would let a slow lookup hold up every other transaction's.
        tokio::spawn(async move {
            let id = check.txn.id;
            let tx = Transaction::attach(connection, id, None);
            let decided = match checker.check(&check).await {
                CheckAnswer::Commit => tx.commit().await,
                CheckAnswer::Rollback => tx.rollback().await,
                CheckAnswer::Unknown => return,
            };
            if let Err(e) = decided {
                tracing::warn!(txn = id, error = %e, "answering a transaction check failed");
            }
        });
    }
}
