//! The power-loss tier: the whole queue engine (MQ table, commit thread, logs, cursors) on
//! a simulated disk that keeps only what was synced (`store::simdisk`), cut at hundreds of
//! random points and reopened. Whatever was acknowledged before the cut must be there
//! after it: MQs with their options, `synced` records, group cursors, removals. And faults
//! injected into single writes and syncs (EIO, ENOSPC) must never let an acknowledgement
//! through for data that did not reach the disk.
//!
//! Each run prints its seed; `QBUS_CRASH_SEED=<seed>` replays it, `QBUS_CRASH_CUTS=<n>`
//! changes how many cuts the power-loss test makes (default 300).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use qbus_wire::protocol::{Durability, MqOptions};

use super::group::Start;
use super::group_commit::Committer;
use super::mq::Mq;
use super::registry::Registry;
use super::testutil::{produce, read, tokens, Commit};
use crate::config::Config;
use crate::error::BrokerError;
use crate::store::simdisk::{OpKind, Rng, SimDisk, ENOSPC};
use crate::store::StoreError;

const EIO: i32 = 5;
const STORE: &str = "/data/store";

/// The seed of this run: from `QBUS_CRASH_SEED`, else from the clock; printed either way.
fn seed(test: &str) -> u64 {
    let seed = std::env::var("QBUS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
    println!("{test}: QBUS_CRASH_SEED={seed}");
    seed
}

fn config() -> Config {
    let mut config = Config::with_store(STORE);
    // Small segments, so that cuts fall around new segments too.
    config.segment_size = 1_500;
    config
}

/// What the workload saw acknowledged, and what it tried.
#[derive(Debug, Default)]
struct Acked {
    /// Options of every MQ a create was attempted for (acknowledged or not).
    attempted: BTreeMap<String, MqOptions>,
    /// MQs whose creation was acknowledged and not removed since.
    mqs: BTreeSet<String>,
    /// MQs whose removal was acknowledged.
    removed: BTreeSet<String>,
    /// Records acknowledged `synced`, per MQ.
    records: BTreeMap<String, BTreeMap<u64, String>>,
    /// Groups acknowledged (created or acked `synced`), with their committed offset.
    groups: BTreeMap<(String, String), u64>,
    /// Groups whose removal was acknowledged.
    removed_groups: BTreeSet<(String, String)>,
}

fn random_options(rng: &mut Rng) -> MqOptions {
    MqOptions {
        ack_timeout_ms: Some(1_000 + rng.below(50_000)),
        max_deliveries: Some(1 + rng.below(20) as u32),
        dead_letter_mq: (rng.below(2) == 0).then(|| format!("dead-{}", rng.below(100))),
        // Mostly synced: only those acknowledgements promise anything.
        sync: Some(rng.below(4) != 0),
        replicas: Some(1 + rng.below(3) as u32),
        min_replicas: (rng.below(2) == 0).then_some(1),
        dedupe_window_ms: (rng.below(2) == 0).then(|| rng.below(300_000)),
        ..MqOptions::default()
    }
}

/// The store under test and its commit thread.
struct Db<'a> {
    registry: &'a Registry,
    committer: &'a Committer,
}

/// A random mix of creates, produces, consumes, acks and removals, stopping at the first
/// failure (the disk is gone, or a fault was injected).
async fn workload(db: &Db<'_>, rng: &mut Rng, acked: &mut Acked, steps: usize) {
    let first = MqOptions {
        sync: Some(true),
        ..random_options(rng)
    };
    if try_step(create(db, "orders", first, acked).await).is_none() {
        return;
    }
    let mut next_mq = 0;
    for _ in 0..steps {
        let names: Vec<String> = acked.mqs.iter().cloned().collect();
        let mq = names[rng.below(names.len() as u64) as usize].clone();
        let step = match rng.below(10) {
            0..=3 => produce_some(db, &mq, rng, acked).await,
            4 | 5 => consume_some(db, &mq, rng, acked).await,
            6 => {
                next_mq += 1;
                let options = random_options(rng);
                create(db, &format!("mq-{next_mq}"), options, acked).await
            }
            7 => remove_group(db, &mq, acked).await,
            8 if mq != "orders" => remove(db, &mq, acked).await,
            _ => produce_some(db, &mq, rng, acked).await,
        };
        if try_step(step).is_none() {
            return;
        }
    }
}

/// `Some` when the step succeeded; a failed step ends the workload.
fn try_step(step: Result<(), BrokerError>) -> Option<()> {
    step.ok()
}

async fn create(
    db: &Db<'_>,
    name: &str,
    options: MqOptions,
    acked: &mut Acked,
) -> Result<(), BrokerError> {
    acked.attempted.insert(name.to_owned(), options.clone());
    db.registry.create(name, options).await?;
    acked.mqs.insert(name.to_owned());
    acked.removed.remove(name);
    Ok(())
}

async fn remove(db: &Db<'_>, name: &str, acked: &mut Acked) -> Result<(), BrokerError> {
    // In doubt from here: a removal that fails midway may have happened or not.
    acked.mqs.remove(name);
    acked.records.remove(name);
    acked.groups.retain(|(mq, _), _| mq != name);
    acked.removed_groups.retain(|(mq, _)| mq != name);
    db.registry.remove(name).await?;
    acked.removed.insert(name.to_owned());
    Ok(())
}

async fn produce_some(
    db: &Db<'_>,
    name: &str,
    rng: &mut Rng,
    acked: &mut Acked,
) -> Result<(), BrokerError> {
    let mq = db.registry.get(name)?;
    let count = 1 + rng.below(12);
    let bodies: Vec<String> = (0..count)
        .map(|i| {
            format!(
                "{name}/{}/{i}{}",
                rng.next(),
                "x".repeat(rng.below(200) as usize)
            )
        })
        .collect();
    let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
    let (records, n) = produce(&refs);
    let (appended, durability) = mq.append(db.committer, records, n).await?;
    if durability == Durability::Synced {
        let kept = acked.records.entry(name.to_owned()).or_default();
        for (i, body) in bodies.into_iter().enumerate() {
            kept.insert(appended.first_offset + i as u64, body);
        }
    }
    Ok(())
}

async fn consume_some(
    db: &Db<'_>,
    name: &str,
    rng: &mut Rng,
    acked: &mut Acked,
) -> Result<(), BrokerError> {
    let mq = db.registry.get(name)?;
    let key = (name.to_owned(), "g".to_owned());
    // A removed group may be back from the attempt to create it on.
    acked.removed_groups.remove(&key);
    let group = mq.group(db.committer, "g", Start::Earliest).await?;
    if mq.wait_sync() {
        let committed = mq
            .info()
            .groups
            .iter()
            .find(|g| g.name == "g")
            .map_or(0, |g| g.committed);
        acked.groups.entry(key.clone()).or_insert(committed);
    }
    let count = 1 + rng.below(20) as usize;
    let fetched = mq.fetch(&group, 1, count, None, Duration::ZERO).await?;
    let (_, durability) = db
        .registry
        .ack(name, Some("g"), &tokens(&fetched.body, &fetched.attempts))
        .await?;
    if durability == Durability::Synced {
        let info = mq.info();
        let committed = info
            .groups
            .iter()
            .find(|g| g.name == "g")
            .map(|g| g.committed);
        acked.groups.insert(key, committed.unwrap_or(0));
    }
    Ok(())
}

async fn remove_group(db: &Db<'_>, name: &str, acked: &mut Acked) -> Result<(), BrokerError> {
    // The workload's one consumer (connection 1) goes away first, as a removal requires.
    db.registry.disconnect(1);
    let key = (name.to_owned(), "g".to_owned());
    // In doubt from here, as above.
    let had = acked.groups.remove(&key);
    match db.registry.remove_group(name, "g").await {
        Err(BrokerError::NoSuchGroup { .. }) => {
            acked.groups.extend(had.map(|committed| (key, committed)));
            return Ok(());
        }
        other => other?,
    }
    acked.removed_groups.insert(key);
    Ok(())
}

/// Reopens `disk` and checks every acknowledgement in `acked` against it.
async fn check(disk: &SimDisk, acked: &Acked, context: &str) {
    let commit = Commit::start();
    let registry = Registry::open_on(disk.fs(), config(), commit.committer.clone(), None)
        .unwrap_or_else(|e| panic!("{context}: the store does not reopen: {e}"));
    for mq in registry.list() {
        let name = mq.name().to_owned();
        let tried = acked
            .attempted
            .get(&name)
            .unwrap_or_else(|| panic!("{context}: MQ {name} was never created"));
        let have = mq.info().options;
        let same = (tried.ack_timeout_ms.is_none() || have.ack_timeout_ms == tried.ack_timeout_ms)
            && (tried.max_deliveries.is_none() || have.max_deliveries == tried.max_deliveries)
            && (tried.sync.is_none() || have.sync == tried.sync)
            && (tried.dedupe_window_ms.is_none()
                || have.dedupe_window_ms == tried.dedupe_window_ms)
            && (tried.dead_letter_mq.is_none() || have.dead_letter_mq == tried.dead_letter_mq);
        assert!(
            same,
            "{context}: options of {name} are {have:?}, created with {tried:?}"
        );
    }
    for name in &acked.mqs {
        assert!(
            registry.get(name).is_ok(),
            "{context}: acknowledged MQ {name} is gone"
        );
    }
    for name in &acked.removed {
        if !acked.mqs.contains(name) {
            assert!(
                registry.get(name).is_err(),
                "{context}: removed MQ {name} came back"
            );
        }
    }
    for (name, want) in &acked.records {
        let mq = registry.get(name).unwrap();
        let group = mq
            .group(&commit.committer, "verify", Start::Earliest)
            .await
            .unwrap();
        let mut have = BTreeMap::new();
        loop {
            let fetched = mq
                .fetch(&group, 9, 10_000, None, Duration::ZERO)
                .await
                .unwrap_or_else(|e| panic!("{context}: reading {name} failed: {e}"));
            if fetched.attempts.is_empty() {
                break;
            }
            have.extend(read(&fetched.body));
        }
        for (offset, body) in want {
            assert_eq!(
                have.get(offset),
                Some(body),
                "{context}: acknowledged record {offset} of {name} lost or changed"
            );
        }
    }
    for ((name, group), committed) in &acked.groups {
        let (_, live) = registry
            .existing_group(name, Some(group))
            .unwrap_or_else(|e| panic!("{context}: acknowledged group lost: {e}"));
        let have = live.state().committed();
        assert!(
            have >= *committed,
            "{context}: {name}/{group} cursor {have} < acked {committed}"
        );
    }
    for (name, group) in &acked.removed_groups {
        assert!(
            registry.existing_group(name, Some(group)).is_err(),
            "{context}: removed group {name}/{group} came back"
        );
    }
    // And the store takes writes again.
    if let Ok(mq) = registry.get("orders") {
        let end = mq.info().next_offset;
        let (records, n) = produce(&["after"]);
        let (appended, _) = mq.append(&commit.committer, records, n).await.unwrap();
        assert_eq!(appended.first_offset, end, "{context}");
    }
    drop(registry);
    commit.stop().await;
}

/// Runs the workload of `seed` on a fresh disk, with `fault` applied first; returns the
/// disk and what was acknowledged.
async fn run(seed: u64, fault: impl FnOnce(&SimDisk)) -> (SimDisk, Acked) {
    let disk = SimDisk::new();
    fault(&disk);
    let commit = Commit::start();
    let mut acked = Acked::default();
    if let Ok(registry) = Registry::open_on(disk.fs(), config(), commit.committer.clone(), None) {
        let db = Db {
            registry: &registry,
            committer: &commit.committer,
        };
        workload(&db, &mut Rng::new(seed), &mut acked, 16).await;
    }
    commit.stop().await;
    (disk, acked)
}

#[tokio::test]
async fn power_loss_at_random_points_keeps_every_acknowledgement() {
    let seed = seed("power_loss_at_random_points_keeps_every_acknowledgement");
    let cuts: u64 = std::env::var("QBUS_CRASH_CUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let mut rng = Rng::new(seed);
    for cut in 0..cuts {
        let run_seed = rng.next();
        // A dry run counts the workload's changes, so the cut falls anywhere in it.
        let (whole, _) = run(run_seed, |_| {}).await;
        let at = 1 + rng.below(whole.changes().max(1));
        let (disk, acked) = run(run_seed, |disk| disk.cut_after(at)).await;
        let context = format!("QBUS_CRASH_SEED={seed}, cut {cut} after change {at}");
        check(&disk.crash(&mut rng), &acked, &context).await;
    }
}

#[tokio::test]
async fn a_failed_write_or_sync_is_never_acknowledged() {
    let seed = seed("a_failed_write_or_sync_is_never_acknowledged");
    let mut rng = Rng::new(seed);
    for round in 0..120 {
        let run_seed = rng.next();
        let kind = if rng.below(2) == 0 {
            OpKind::Write
        } else {
            OpKind::Sync
        };
        let errno = if rng.below(2) == 0 { EIO } else { ENOSPC };
        let n = 1 + rng.below(60);
        let (disk, acked) = run(run_seed, |disk| disk.fail_nth(kind, n, errno)).await;
        let context =
            format!("QBUS_CRASH_SEED={seed}, round {round}: {kind:?} {n} fails with {errno}");
        // Power lost right after: only what was synced counts. A restart without power
        // loss (the process killed) must hold too.
        check(&disk.crash(&mut rng), &acked, &context).await;
        check(&disk.restart(), &acked, &context).await;
    }
}

/// A registry on `disk` with the MQ `orders` holding `a` and `b`, acknowledged.
async fn orders_holding_a_and_b(disk: &SimDisk, commit: &Commit) -> (Registry, Arc<Mq>) {
    let registry = Registry::open_on(disk.fs(), config(), commit.committer.clone(), None).unwrap();
    let (mq, _) = registry
        .create("orders", MqOptions::default())
        .await
        .unwrap();
    let (records, n) = produce(&["a", "b"]);
    mq.append(&commit.committer, records, n).await.unwrap();
    (registry, mq)
}

#[tokio::test]
async fn after_a_failed_fsync_the_store_refuses_writes_until_restarted() {
    let disk = SimDisk::new();
    let commit = Commit::start();
    let (registry, mq) = orders_holding_a_and_b(&disk, &commit).await;

    disk.fail_nth(OpKind::Sync, 1, EIO);
    let (records, n) = produce(&["lost"]);
    let failed = mq.append(&commit.committer, records, n).await.unwrap_err();
    assert!(failed.to_string().contains("i/o error"), "{failed}");
    assert_eq!(
        mq.info().next_offset,
        2,
        "a record whose sync failed is never shown"
    );
    // The fault is gone, but the store stays halted: the kernel may have dropped the pages.
    let (records, n) = produce(&["later"]);
    let halted = mq.append(&commit.committer, records, n).await.unwrap_err();
    assert!(
        matches!(halted, BrokerError::Store(StoreError::Halted { .. })),
        "{halted:?}"
    );
    assert_eq!(halted.status(), qbus_wire::protocol::Status::Unavailable);
    assert!(
        halted.to_string().contains("restart the broker"),
        "{halted}"
    );
    let create = registry.create("other", MqOptions::default()).await;
    assert!(
        create.is_ok(),
        "creating an MQ does not go through the commit thread"
    );
    let remove = registry.remove("orders").await.unwrap_err();
    assert_eq!(remove.status(), qbus_wire::protocol::Status::Unavailable);
    assert!(
        registry.get("orders").is_ok(),
        "a refused removal keeps the MQ"
    );
    drop((mq, registry));
    commit.stop().await;

    let acked = Acked {
        attempted: BTreeMap::from([
            ("orders".to_owned(), MqOptions::default()),
            ("other".to_owned(), MqOptions::default()),
        ]),
        mqs: BTreeSet::from(["orders".to_owned()]),
        records: BTreeMap::from([(
            "orders".to_owned(),
            BTreeMap::from([(0, "a".to_owned()), (1, "b".to_owned())]),
        )]),
        ..Acked::default()
    };
    check(&disk.restart(), &acked, "restart after a failed fsync").await;
}

#[tokio::test]
async fn a_full_disk_refuses_writes_with_507_and_the_broker_still_starts() {
    let disk = SimDisk::new();
    let commit = Commit::start();
    let (registry, mq) = orders_holding_a_and_b(&disk, &commit).await;
    disk.set_full(true);

    let (records, n) = produce(&["c"]);
    let full = mq.append(&commit.committer, records, n).await.unwrap_err();
    assert_eq!(
        full.status(),
        qbus_wire::protocol::Status::InsufficientStorage,
        "{full}"
    );
    let Err(create) = registry.create("more", MqOptions::default()).await else {
        panic!("an MQ was created on a full disk");
    };
    assert_eq!(
        create.status(),
        qbus_wire::protocol::Status::InsufficientStorage,
        "{create}"
    );
    drop((mq, registry));
    commit.stop().await;

    // Restarted on the still-full disk: it opens, serves what it has, refuses writes.
    let disk = disk.restart();
    disk.set_full(true);
    let commit = Commit::start();
    let registry = Registry::open_on(disk.fs(), config(), commit.committer.clone(), None)
        .expect("a broker starts on a full disk");
    assert_eq!(
        registry.list().len(),
        1,
        "the failed create left nothing behind"
    );
    let mq = registry.get("orders").unwrap();
    assert_eq!(mq.info().next_offset, 2);
    let (records, n) = produce(&["c"]);
    let full = mq.append(&commit.committer, records, n).await.unwrap_err();
    assert_eq!(
        full.status(),
        qbus_wire::protocol::Status::InsufficientStorage
    );
    // Space returns: writes work again, no restart needed.
    disk.set_full(false);
    let (records, n) = produce(&["c"]);
    let (appended, _) = mq.append(&commit.committer, records, n).await.unwrap();
    assert_eq!(appended.first_offset, 2);
    let leftovers: Vec<_> = SimDiskNames::of(&disk, Path::new(STORE));
    assert_eq!(
        leftovers,
        ["LOCK-free", "orders"].map(|s| s.to_owned())[1..]
    );
    drop((mq, registry));
    commit.stop().await;
}

/// Names in a directory of a simulated disk.
struct SimDiskNames;

impl SimDiskNames {
    fn of(disk: &SimDisk, dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = disk
            .fs()
            .list(dir)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        names.sort();
        names
    }
}
