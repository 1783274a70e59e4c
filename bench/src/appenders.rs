//! Closed-loop WBL appenders: the one load every storage benchmark drives. Each task appends a
//! record, awaits its durability, records the latency from enqueue to durable, and repeats while
//! the caller's condition holds.

use crate::{latency_histogram, record_ns, LatencySummary};
use glommio::TaskQueueHandle;
use keyfort_engine::wbl::{RecordKind, Wbl};
use std::cell::Cell;
use std::rc::Rc;
use std::time::Instant;

/// What one closed-loop run did.
pub struct AppendLoad {
    pub lat: LatencySummary,
    pub records: u64,
    pub secs: f64,
}

impl AppendLoad {
    pub fn records_per_s(&self) -> f64 {
        self.records as f64 / self.secs
    }
}

/// `appenders` tasks on the current executor (in `queue`, or the current one), each appending
/// `payload`-byte records while `keep_going()` is true. LSNs are taken and enqueued before any
/// await, so concurrent tasks append in order.
pub async fn closed_loop(
    wbl: &Wbl,
    appenders: usize,
    payload: usize,
    queue: Option<TaskQueueHandle>,
    keep_going: impl Fn() -> bool + Clone + 'static,
) -> AppendLoad {
    let started = Instant::now();
    let done = Rc::new(Cell::new(0u64));
    let tasks: Vec<_> = (0..appenders)
        .map(|_| {
            let (wbl, done, keep_going) = (wbl.clone(), done.clone(), keep_going.clone());
            let task = async move {
                let mut h = latency_histogram();
                let body = vec![0x5Au8; payload];
                while keep_going() {
                    let t0 = Instant::now();
                    let lsn = wbl.last_lsn() + 1;
                    let d = wbl
                        .append(RecordKind::RaftNormal, lsn, 1, body.clone())
                        .expect("append");
                    d.await.expect("durable");
                    record_ns(&mut h, t0.elapsed().as_nanos() as u64);
                    done.set(done.get() + 1);
                }
                h
            };
            match queue {
                Some(q) => glommio::spawn_local_into(task, q).expect("task queue of this executor"),
                None => glommio::spawn_local(task),
            }
        })
        .collect();
    let mut all = latency_histogram();
    for t in tasks {
        all.add(t.await).expect("same histogram bounds");
    }
    AppendLoad {
        lat: LatencySummary::of(&all),
        records: done.get(),
        secs: started.elapsed().as_secs_f64(),
    }
}
