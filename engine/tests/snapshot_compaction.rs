//! Rolling compaction and local recovery: compaction racing with appends, recovery from the
//! newest snapshot that verifies (else the previous one) plus the log up to the persisted commit.

mod state_common;

use keyfort_engine::compaction::{compact, compaction_due, CompactionConfig, CompactionContext};
use keyfort_engine::recovery::{open_and_recover, recover_local};
use keyfort_engine::snapshot::{self, SnapshotMeta, WriteOptions};
use keyfort_engine::state::{StateMachine, IDEMPOTENCY_WINDOW_LSNS};
use keyfort_engine::wbl::{HardState, RecordKind, Wbl, WblOptions};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, TestRunner};
use state_common::*;
use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;

type Log = Vec<(RecordKind, Vec<u8>)>;

/// A fixed pseudo-random log of `n` records (seeded, so the test is deterministic).
fn fixed_log(n: usize) -> Log {
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        ),
    );
    let mut out = log(n).new_tree(&mut runner).unwrap().current();
    while out.len() < n {
        out.extend(log(n).new_tree(&mut runner).unwrap().current());
    }
    out.truncate(n);
    out
}

fn opts() -> WblOptions {
    WblOptions {
        segment_bytes: 512 * 1024,
        ..WblOptions::default()
    }
}

fn cfg() -> CompactionConfig {
    CompactionConfig {
        write: WriteOptions {
            block_bytes_target: 2048,
            ..WriteOptions::default()
        },
        ..CompactionConfig::default()
    }
}

fn ctx() -> CompactionContext {
    CompactionContext {
        voters: vec![1, 2, 3],
        ..Default::default()
    }
}

async fn append(wbl: &Wbl, log: &Log, from: u64, to: u64) {
    let mut pending = Vec::new();
    for lsn in from..=to {
        let (k, p) = &log[lsn as usize - 1];
        pending.push(wbl.append(*k, lsn, 1, p.clone()).unwrap());
    }
    for d in pending {
        d.await.unwrap();
    }
}

async fn commit(wbl: &Wbl, commit: u64) {
    wbl.set_hard_state(HardState {
        term: 1,
        vote: 1,
        commit,
    })
    .unwrap()
    .await
    .unwrap();
}

fn reference(log: &Log, to: u64) -> StateMachine {
    let mut s = StateMachine::new();
    for (i, (k, p)) in log.iter().enumerate().take(to as usize) {
        s.apply(i as u64 + 1, *k, p).unwrap();
    }
    s
}

/// Appends `from..=to` in chunks of 10 and applies each chunk once durable, yielding between
/// chunks so a compaction in the background queue runs meanwhile.
async fn append_apply(wbl: &Wbl, state: &RefCell<StateMachine>, log: &Log, from: u64, to: u64) {
    let mut lsn = from;
    while lsn <= to {
        let end = (lsn + 9).min(to);
        append(wbl, log, lsn, end).await;
        for l in lsn..=end {
            let (k, p) = &log[l as usize - 1];
            state.borrow_mut().apply(l, *k, p).unwrap();
        }
        lsn = end + 1;
        glommio::yield_if_needed().await;
    }
}

/// Builds: snapshots at 300 (made while 301..600 are appended and applied) and 600, log to 700,
/// commit 650.
fn build(root: &Path, log: &Log) {
    let snaps = root.join("snap");
    std::fs::create_dir_all(&snaps).unwrap();
    keyfort_engine::exec::run_local(root, |q| async move {
        let card = Rc::new(card::session());
        let state = Rc::new(RefCell::new(StateMachine::new()));
        let (wbl, _) = Wbl::open(root.join("wbl"), opts()).await.unwrap();
        append_apply(&wbl, &state, log, 1, 300).await;
        commit(&wbl, 300).await;
        let task = {
            let (wbl, card, snaps, state) =
                (wbl.clone(), card.clone(), snaps.clone(), state.clone());
            glommio::spawn_local_into(
                async move { compact(&snaps, &state, &wbl, ctx(), &*card, &cfg()).await },
                q.background,
            )
            .unwrap()
        };
        append_apply(&wbl, &state, log, 301, 600).await;
        let first = task.await.unwrap();
        assert_eq!((first.lsn, first.lsn_previous), (300, 0));
        assert_eq!(state.borrow().base().unwrap().lsn(), 300);
        assert_eq!(
            *state.borrow(),
            reference(log, 600),
            "compaction changed nothing logical"
        );
        commit(&wbl, 600).await;
        let second = compact(&snaps, &state, &wbl, ctx(), &*card, &cfg())
            .await
            .unwrap();
        assert_eq!((second.lsn, second.lsn_previous), (600, 300));
        assert_eq!(state.borrow().memtable_key_versions(), 0);
        assert!(
            second.wbl_first_lsn <= 300,
            "the log is released only below the previous snapshot"
        );
        append(&wbl, log, 601, 700).await;
        commit(&wbl, 650).await;
        wbl.close().await.unwrap();
    })
    .unwrap();
}

fn recover(root: &Path) -> keyfort_engine::recovery::LocalRecovery {
    keyfort_engine::exec::run_local(root, |_| async move {
        let card = card::session();
        let (wbl, _) = Wbl::open(root.join("wbl"), opts()).await.unwrap();
        let r = recover_local(&root.join("snap"), &wbl, &card, IDEMPOTENCY_WINDOW_LSNS)
            .await
            .unwrap();
        wbl.close().await.unwrap();
        r
    })
    .unwrap()
}

/// The node's start path: the newest snapshot verified on the blocking pool during the log scan.
fn start(root: &Path) -> keyfort_engine::recovery::LocalRecovery {
    keyfort_engine::exec::run_local(root, |_| async move {
        let card = card::session();
        let s = open_and_recover(
            &root.join("snap"),
            &root.join("wbl"),
            opts(),
            &card,
            IDEMPOTENCY_WINDOW_LSNS,
        )
        .await
        .unwrap();
        s.wbl.close().await.unwrap();
        s.local
    })
    .unwrap()
}

#[test]
fn compaction_racing_with_appends_then_recovery_reproduces_the_committed_state() {
    let root = tempfile::tempdir().unwrap();
    let log = fixed_log(700);
    build(root.path(), &log);
    let r = recover(root.path());
    assert_eq!(r.lsn_snapshot, 600);
    assert!(r.skipped.is_empty());
    assert_eq!(r.records_replayed, 50, "up to the persisted commit only");
    let want = reference(&log, 650);
    assert_eq!(r.state.digest(), want.digest());
    assert_eq!(r.state, want);
    let s = start(root.path());
    assert_eq!((s.lsn_snapshot, s.records_replayed), (600, 50));
    assert_eq!(s.state, want);
}

#[test]
fn a_corrupt_newest_snapshot_falls_back_to_the_previous_one_and_the_log() {
    let root = tempfile::tempdir().unwrap();
    let log = fixed_log(700);
    build(root.path(), &log);
    let newest = root.path().join("snap").join(snapshot::file_name(600));
    let mut bytes = std::fs::read(&newest).unwrap();
    bytes[100] ^= 4;
    std::fs::write(&newest, &bytes).unwrap();
    // A crash during a compaction leaves only a temporary file: never taken for a snapshot.
    std::fs::write(
        root.path()
            .join("snap")
            .join(".snap-00000000000002bc.ksnap.tmp"),
        b"partial",
    )
    .unwrap();
    let r = recover(root.path());
    assert_eq!(r.lsn_snapshot, 300);
    assert_eq!(r.skipped.len(), 1);
    assert_eq!(r.skipped[0].path, newest);
    assert!(
        r.skipped[0].reason.contains("offset"),
        "{}",
        r.skipped[0].reason
    );
    assert_eq!(r.records_replayed, 350);
    assert_eq!(r.state, reference(&log, 650));
    let s = start(root.path());
    assert_eq!((s.lsn_snapshot, s.skipped.len()), (300, 1));
    assert_eq!(s.skipped[0].reason, r.skipped[0].reason);
    assert_eq!(s.state, reference(&log, 650));
}

#[test]
fn a_snapshot_the_log_does_not_continue_is_skipped() {
    let root = tempfile::tempdir().unwrap();
    let log = fixed_log(700);
    build(root.path(), &log);
    // Same state at 650, but a chain head this log never had (another history).
    let s = reference(&log, 650);
    let meta = SnapshotMeta {
        lsn: 650,
        term: 1,
        chain_head: 12345,
        voters: vec![1],
        learners: vec![],
    };
    snapshot::write(&root.path().join("snap"), &s, &meta, &card::session()).unwrap();
    let r = recover(root.path());
    assert_eq!(r.lsn_snapshot, 600);
    assert!(
        r.skipped[0].reason.contains("chain head"),
        "{}",
        r.skipped[0].reason
    );
    assert_eq!(r.state, reference(&log, 650));
}

#[test]
fn compaction_is_due_once_the_log_since_the_snapshot_passes_the_threshold() {
    let cfg = CompactionConfig {
        records_threshold: 100,
        ..CompactionConfig::default()
    };
    assert!(!compaction_due(1099, 1000, &cfg));
    assert!(compaction_due(1100, 1000, &cfg));
}
