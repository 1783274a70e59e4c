//! Crash safety with real processes: a child appends with many concurrent appenders and prints
//! every acknowledged LSN; the parent SIGKILLs it at random moments, reopens the log and checks
//! that every acknowledged record is there, intact, in a contiguous prefix. Then the next child
//! continues the same log. `KEYFORT_SOAK=1` runs many more iterations.

mod common;
use common::*;
use keyfort_engine::wbl::{HardState, Wbl};
use rand::Rng;
use std::cell::Cell;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::mpsc;
use std::time::Duration;

const CHILD_ENV: &str = "KEYFORT_WBL_CRASH_CHILD";
const PAYLOAD_MAX: usize = 2000;
const APPENDERS: usize = 16;
/// A child that is never killed stops by itself, so a broken parent cannot leak it for long.
const CHILD_LIFETIME: Duration = Duration::from_secs(30);

/// Entry point of the child process; a no-op in a normal test run.
#[test]
fn crash_child_entry() {
    if let Ok(root) = std::env::var(CHILD_ENV) {
        child_main(Path::new(&root));
    }
}

fn child_main(root: &Path) {
    let dir = log_dir(root);
    run(root, || async move {
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        let next = Rc::new(Cell::new(wbl.last_lsn() + 1));
        let started = std::time::Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..APPENDERS {
            let (wbl, next) = (wbl.clone(), next.clone());
            tasks.push(glommio::spawn_local(async move {
                while started.elapsed() < CHILD_LIFETIME {
                    let lsn = next.get();
                    next.set(lsn + 1);
                    let d = wbl
                        .append(kind_of(lsn), lsn, 1, payload(lsn, PAYLOAD_MAX))
                        .unwrap();
                    d.await.unwrap();
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ACK {lsn}").unwrap();
                    out.flush().unwrap();
                    if lsn % 97 == 0 {
                        let hs = HardState {
                            term: 1,
                            vote: 1,
                            commit: lsn,
                        };
                        drop(wbl.set_hard_state(hs).unwrap());
                    }
                }
            }));
        }
        for t in tasks {
            t.await;
        }
    });
}

/// Runs one child until a random moment after its first acknowledgement; returns its acks.
fn one_child(root: &Path, rng: &mut impl Rng) -> Vec<u64> {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "crash_child_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, root)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut acks = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(n) = line.strip_prefix("ACK ") {
                acks.push(n.parse::<u64>().unwrap());
                let _ = tx.send(());
            }
        }
        acks
    });
    let first = rx.recv_timeout(Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(rng.gen_range(0..150)));
    let alive = child.try_wait().unwrap().is_none();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        first.is_ok() && alive,
        "child died on its own or never acknowledged"
    );
    reader.join().unwrap()
}

#[test]
fn acknowledged_appends_survive_sigkill() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let iterations = if std::env::var("KEYFORT_SOAK").is_ok() {
        200
    } else {
        20
    };
    let root = tempfile::tempdir().unwrap();
    let dir = log_dir(root.path());
    let mut rng = rand::thread_rng();
    let mut acked_max = 0;
    for i in 0..iterations {
        let started = std::time::Instant::now();
        let acks = one_child(root.path(), &mut rng);
        eprintln!(
            "iteration {i}: {} acks in {:?}",
            acks.len(),
            started.elapsed()
        );
        acked_max = acks.into_iter().max().unwrap_or(0).max(acked_max);
        run(root.path(), || async {
            let (wbl, report) = Wbl::open(&dir, opts()).await.unwrap();
            assert!(
                report.last_lsn >= acked_max,
                "iteration {i}: acknowledged {acked_max} but recovered {report:?}"
            );
            check_all(&wbl, PAYLOAD_MAX).await;
            // Keeps each reopen's scan bounded over a long soak, and releases under crashes.
            let keep_from = wbl.durable_lsn().saturating_sub(2000).max(1);
            assert!(wbl.release_prefix(keep_from).await.unwrap() <= keep_from);
            wbl.close().await.unwrap();
        });
    }
}
