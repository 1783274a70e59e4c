//! Thread-per-core executors: each runs its own log with the writer in the foreground queue
//! and segment preparation in the background queue.

mod common;
use common::*;
use keyfort_engine::exec::spawn_per_core;
use keyfort_engine::wbl::{Wbl, WblOptions};

#[test]
fn unbound_executors_each_run_their_own_log_on_their_queues() {
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
