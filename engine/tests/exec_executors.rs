//! Thread-per-core executors: each runs its own log with the writer in the foreground queue
//! and segment preparation in the background queue.

mod common;
use common::*;
use keyfort_engine::exec::spawn_per_core;
use keyfort_engine::wbl::{Wbl, WblOptions};
use std::time::Duration;

/// Rounds of the two-executor scenario. A glommio lost wakeup (see `exec::make_queues`)
/// stalled about one round in 27 with a latency-sensitive queue; 40 rounds catch such a
/// regression most of the time in about 8 s.
const ROUNDS: usize = 40;
/// A round takes ~0.2 s; far beyond that an executor has stalled.
const ROUND_LIMIT: Duration = Duration::from_secs(60);

fn one_round() {
    let root = tempfile::tempdir().unwrap();
    let base = root.path().to_path_buf();
    let handles = spawn_per_core(&[None, None], root.path(), move |i, q| {
        let dir = base.join(format!("shard-{i}"));
        async move {
            let o = WblOptions {
                writer_queue: Some(q.foreground),
                background_queue: Some(q.background),
                ..opts()
            };
            let (wbl, _) = Wbl::open(&dir, o).await.unwrap();
            append_concurrently(&wbl, 8, 300, 5000).await;
            check_all(&wbl, 5000).await;
            wbl.close().await.unwrap();
            wbl.durable_lsn()
        }
    })
    .unwrap();
    for h in handles {
        let r = h.join().expect("executor thread");
        assert_eq!(r.expect("executor setup"), 300);
    }
}

#[test]
fn unbound_executors_each_run_their_own_log_on_their_queues() {
    for round in 0..ROUNDS {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            one_round();
            let _ = tx.send(());
        });
        match rx.recv_timeout(ROUND_LIMIT) {
            Ok(()) => t.join().expect("round thread"),
            // A panicking round drops the sender: join to surface its panic.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                t.join().expect("round panicked");
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("round {round}: an executor stalled for {ROUND_LIMIT:?} (lost wakeup?)")
            }
        }
    }
}
