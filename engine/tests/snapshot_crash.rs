//! SIGKILL during compaction: a child process compacts a committed log again and again; the
//! parent kills it at random moments, then local recovery must rebuild exactly the committed
//! state from whatever snapshots, temporary files and log the child left.
//!
//! Child and parent are separate processes and cannot share the test fixture's SoftHSM card, so
//! the footer MAC here is a keyed software stand-in; the card's MAC is covered by the other
//! snapshot tests.

mod state_common;

use keyfort_engine::compaction::{compact, CompactionConfig, CompactionContext};
use keyfort_engine::recovery::{newest_usable, recover_local, replay};
use keyfort_engine::snapshot::WriteOptions;
use keyfort_engine::state::{StateMachine, IDEMPOTENCY_WINDOW_LSNS};
use keyfort_engine::wbl::{HardState, RecordKind, Wbl, WblOptions};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use rand::Rng;
use state_common::{log, SoftMac};
use std::cell::RefCell;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const CHILD_ENV: &str = "KEYFORT_SNAPSHOT_CRASH_CHILD";
const READY_LINE: &str = "crash-child: compacting";
const RECORDS: u64 = 3000;
/// Records per compaction: small, so the child spends its life compacting and a kill lands in
/// one.
const STEP: u64 = 25;
/// A child that is never killed stops by itself, so a broken parent cannot leak it for long.
const CHILD_LIFETIME: Duration = Duration::from_secs(20);

fn fixed_log() -> Vec<(RecordKind, Vec<u8>)> {
    let rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    let mut out = Vec::new();
    while (out.len() as u64) < RECORDS {
        out.extend(log(200).new_tree(&mut runner).unwrap().current());
    }
    out.truncate(RECORDS as usize);
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
            block_bytes_target: 512,
            ..WriteOptions::default()
        },
        ..CompactionConfig::default()
    }
}

#[test]
fn crash_child_entry() {
    if let Ok(root) = std::env::var(CHILD_ENV) {
        let root = Path::new(&root);
        keyfort_engine::exec::run_local(root, |_| async move {
            let (wbl, _) = Wbl::open(root.join("wbl"), opts()).await.unwrap();
            // Continue from where the previous (killed) child got.
            let snaps = root.join("snap");
            // The newest usable snapshot only (not replayed to the commit): the child then
            // steps through the log, compacting every STEP records.
            let base = newest_usable(&snaps, &wbl, &SoftMac, IDEMPOTENCY_WINDOW_LSNS).unwrap();
            let state = RefCell::new(base.state);
            // Tells the parent the child is about to compact (the test harness prints its own
            // lines on stdout too; the parent looks for this one).
            println!("{READY_LINE}");
            let started = std::time::Instant::now();
            while started.elapsed() < CHILD_LIFETIME {
                let mut s = state.replace(StateMachine::new());
                if s.lsn_applied() >= RECORDS {
                    // Everything compacted (a second file at the same LSN is refused): wait to
                    // be killed.
                    state.replace(s);
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                let target = (s.lsn_applied() + STEP).min(RECORDS);
                replay(&wbl, &mut s, target).await.unwrap();
                state.replace(s);
                compact(
                    &snaps,
                    &state,
                    &wbl,
                    CompactionContext {
                        voters: vec![1],
                        ..Default::default()
                    },
                    &SoftMac,
                    &cfg(),
                )
                .await
                .unwrap();
                eprintln!(
                    "crash-child: snapshot at lsn {target} ({:?})",
                    started.elapsed()
                );
            }
        })
        .unwrap();
    }
}

#[test]
fn sigkill_during_compaction_never_loses_the_committed_state() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    std::fs::create_dir_all(root.join("snap")).unwrap();
    let log = fixed_log();
    keyfort_engine::exec::run_local(root, |_| async {
        let (wbl, _) = Wbl::open(root.join("wbl"), opts()).await.unwrap();
        let mut pending = Vec::new();
        for (i, (k, p)) in log.iter().enumerate() {
            pending.push(wbl.append(*k, i as u64 + 1, 1, p.clone()).unwrap());
        }
        for d in pending {
            d.await.unwrap();
        }
        let hs = HardState {
            term: 1,
            vote: 1,
            commit: RECORDS,
        };
        wbl.set_hard_state(hs).unwrap().await.unwrap();
        wbl.close().await.unwrap();
    })
    .unwrap();
    let mut want = StateMachine::new();
    for (i, (k, p)) in log.iter().enumerate() {
        want.apply(i as u64 + 1, *k, p).unwrap();
    }
    let mut rng = rand::thread_rng();
    for i in 0..8 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "crash_child_entry",
                "--exact",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CHILD_ENV, root)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Kill only once the child compacts (its start-up time varies, a debug build's a lot),
        // at a random moment of its compactions.
        let out = child.stdout.take().unwrap();
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(out));
        assert!(
            lines.any(|l| l.is_ok_and(|l| l.ends_with(READY_LINE))),
            "the child ended before compacting"
        );
        std::thread::spawn(move || lines.for_each(drop));
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..150)));
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child failed on its own"
        );
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let got = keyfort_engine::exec::run_local(root, |_| async {
            let (wbl, _) = Wbl::open(root.join("wbl"), opts()).await.unwrap();
            let r =
                recover_local(&root.join("snap"), &wbl, &SoftMac, IDEMPOTENCY_WINDOW_LSNS).await;
            wbl.close().await.unwrap();
            r.unwrap()
        })
        .unwrap();
        eprintln!(
            "iteration {i}: snapshot lsn {}, replayed {}",
            got.lsn_snapshot, got.records_replayed
        );
        assert!(got.skipped.is_empty(), "{:?}", got.skipped);
        assert_eq!(got.state, want, "iteration {i}");
    }
}
