//! Blocking-pool mode for network HSMs whose calls take milliseconds: a small, bounded set of
//! threads, each with its own logged-in session, so a shard core hands work off instead of
//! stalling its executor. SoftHSM calls take microseconds (DESIGN), so inline is the default.

use crate::card::{Card, CoreSession};
use crate::error::Result;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

/// Upper bound on pool threads (each holds one card session).
pub const BLOCKING_POOL_THREADS_MAX: usize = 64;
/// Bound on queued jobs: callers block when the card is this far behind.
pub const BLOCKING_POOL_QUEUE_MAX: usize = 1024;

type Job = Box<dyn FnOnce(&mut CoreSession) + Send>;

/// Workers each own a queue; `run` deals jobs round-robin, `broadcast` sends one to each.
pub struct BlockingPool {
    queues: Vec<mpsc::SyncSender<Job>>,
    next: AtomicUsize,
    threads: Vec<JoinHandle<()>>,
}

impl BlockingPool {
    /// Starts `threads` workers, each opening its own session on `card`.
    pub fn new(card: &Card, threads: usize) -> Result<Self> {
        let threads = threads.clamp(1, BLOCKING_POOL_THREADS_MAX);
        let mut queues = vec![];
        let mut handles = vec![];
        for _ in 0..threads {
            let mut session = card.session()?;
            let (tx, rx) = mpsc::sync_channel::<Job>(BLOCKING_POOL_QUEUE_MAX / threads + 1);
            queues.push(tx);
            handles.push(std::thread::spawn(move || {
                while let Ok(job) = rx.recv() {
                    job(&mut session);
                }
            }));
        }
        Ok(BlockingPool {
            queues,
            next: AtomicUsize::new(0),
            threads: handles,
        })
    }

    fn submit<R: Send + 'static>(
        &self,
        worker: usize,
        f: impl FnOnce(&mut CoreSession) -> R + Send + 'static,
    ) -> mpsc::Receiver<R> {
        let (rtx, rrx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |s| {
            let _ = rtx.send(f(s));
        });
        self.queues[worker].send(job).expect("pool worker alive");
        rrx
    }

    /// Runs `f` on some worker's session and waits for its result.
    pub fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut CoreSession) -> R + Send + 'static,
    ) -> R {
        let w = self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len();
        self.submit(w, f).recv().expect("pool worker answered")
    }

    /// Runs `f` on every worker's session (partition and integrity key imports) and waits.
    pub fn broadcast<R: Send + 'static>(
        &self,
        f: impl Fn(&mut CoreSession) -> R + Send + Sync + 'static,
    ) -> Vec<R> {
        let f = Arc::new(f);
        let waits: Vec<_> = (0..self.queues.len())
            .map(|w| {
                let f = f.clone();
                self.submit(w, move |s| f(s))
            })
            .collect();
        waits
            .into_iter()
            .map(|r| r.recv().expect("pool worker answered"))
            .collect()
    }
}

impl Drop for BlockingPool {
    fn drop(&mut self) {
        self.queues.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
