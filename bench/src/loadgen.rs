//! The load generator: a [`Workload`]'s operations driven into any [`Target`] (keyfort, etcd),
//! open loop or closed loop, with HDR latency histograms overall and per operation.
//!
//! **Open loop** ([`Mode::Open`]): request `i` has an intended send time `t0 + i / rate`. A
//! sender thread starts it at (or as soon as possible after) that time with
//! [`Target::start`] on connection `i % connections`, and never waits for answers: a slow
//! system does not slow the arrivals, and when sending falls behind the lateness counts in the
//! latency. A completer thread waits on the answers in order and records
//! `latency = arrival instant (as the client's reader saw it, [`Ticket::wait`]) − intended send
//! time`, so a stall is charged to every request scheduled during it (coordinated omission
//! corrected). At most [`MAX_OUTSTANDING`] answers are awaited at once; a request that would
//! exceed it is counted as dropped (overload) and not sent, so the schedule never blocks.
//!
//! **Closed loop** ([`Mode::Closed`]): `workers` threads, worker `w` on connection
//! `w % connections`, each starting one operation and waiting for its answer before the next;
//! latency = arrival − start.
//!
//! Both: operations come from a seeded [`Chooser`] that learns each outcome (a key becomes
//! usable once its create answered); requests started (open loop: intended) before the
//! warm-up ends are run but not recorded; errors are counted by name, never recorded as
//! latencies. With [`RunSpec::progress`], a line on stderr, rewritten about once a second,
//! shows the elapsed time, the answers of the last second, the p99 so far and the errors.
//!
//! [`run_open_loop`] and [`run_closed_loop`] are the older entry points over raw keyfort
//! requests (`cluster_bench`), thin wrappers over the same machinery.

use crate::target::{Op, Target, Ticket};
use crate::workload::{Chooser, Workload, DEFAULT_ZIPF};
use crate::{latency_histogram, record_ns, LatencySummary};
use hdrhistogram::Histogram;
use keyfort_net::client::{ClientError, Connection, Pending};
use keyfort_net::client_proto::{Request, Response};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Most answers awaited at once; beyond it a request is dropped (overload), not sent.
pub const MAX_OUTSTANDING: usize = 16_384;
/// Default wait for one answer, from its intended send time.
pub const DEFAULT_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the progress line is rewritten.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// A rate passes [`max_rate_at_p99`] when at least this fraction of it was achieved.
pub const PASS_ACHIEVED_FRACTION: f64 = 0.95;
/// Runs of one rate in [`max_rate_at_p99`] before it counts as failed.
pub const RUNG_TRIES: usize = 2;
/// Pause between the runs of [`max_rate_at_p99`], letting any backlog drain.
pub const DRAIN_PAUSE: Duration = Duration::from_millis(500);
/// The sender sleeps when the next request is due further away than this, and otherwise
/// sends everything due (sleeping is coarse; batching what is due keeps the schedule).
const SLEEP_SLACK: Duration = Duration::from_micros(50);
/// The schedule starts this far ahead, so every thread is running when it does.
const START_AHEAD: Duration = Duration::from_millis(20);
/// How often the progress thread looks whether the run ended.
const PROGRESS_POLL: Duration = Duration::from_millis(50);

/// How operations arrive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// At a fixed offered rate (operations per second), whatever the answers do.
    Open { rate: f64 },
    /// `workers` threads, each starting one operation when its previous one answered.
    Closed { workers: usize },
}

impl Mode {
    /// "open" or "closed".
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Open { .. } => "open",
            Mode::Closed { .. } => "closed",
        }
    }
}

/// One run.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub workload: Workload,
    pub mode: Mode,
    /// Measured period (after the warm-up).
    pub duration: Duration,
    /// Period before it, loaded the same way, not recorded.
    pub warmup: Duration,
    /// Keys `0..preloaded` exist before the run: what [`Target::preload`] was given (the
    /// workload uses them from the start and numbers its creates from here).
    pub preloaded: u64,
    /// Zipf exponent of use-heavy key choice.
    pub zipf: f64,
    /// Seed of the operation chooser.
    pub seed: u64,
    /// Rewrite a progress line on stderr about once a second.
    pub progress: bool,
    /// Wait for one answer (open loop: from its intended send time).
    pub answer_timeout: Duration,
}

/// The run options `load` and `vs_etcd` share (`#[command(flatten)]` in each): how long each
/// run lasts, what is preloaded, how keys are chosen, the p99 bound of a rate search.
#[derive(clap::Args, Clone, Debug)]
pub struct RunOptions {
    /// Measured seconds of each run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds before each run's measurement, loaded the same way, not recorded.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Keys created before the runs (keyfort: with a ciphertext each).
    #[arg(long, default_value_t = 10_000)]
    pub preload: u64,
    /// Connections of the client (keyfort: spread over the partitions).
    #[arg(long, default_value_t = crate::keyfort_target::DEFAULT_CONNECTIONS)]
    pub connections: usize,
    /// Bytes of a keyfort encrypt's plaintext (and of an etcd value).
    #[arg(long, default_value_t = crate::keyfort_target::DEFAULT_VALUE_SIZE)]
    pub value_size: usize,
    /// Zipf exponent of use-heavy key choice.
    #[arg(long, default_value_t = DEFAULT_ZIPF)]
    pub zipf: f64,
    /// Seed of the operation chooser.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The p99 bound of a rate search, in ms.
    #[arg(long, default_value_t = 10.0)]
    pub p99_ms: f64,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl RunOptions {
    /// The spec of one run of `workload` in `mode` with these options.
    pub fn spec(&self, workload: Workload, mode: Mode) -> RunSpec {
        RunSpec {
            workload,
            mode,
            duration: Duration::from_secs_f64(self.duration),
            warmup: Duration::from_secs_f64(self.warmup),
            preloaded: self.preload,
            zipf: self.zipf,
            seed: self.seed,
            progress: !self.quiet,
            answer_timeout: DEFAULT_ANSWER_TIMEOUT,
        }
    }
}

impl RunSpec {
    /// A run with no warm-up, no preload, [`DEFAULT_ZIPF`], seed 1, no progress line and
    /// [`DEFAULT_ANSWER_TIMEOUT`]; set the other fields as needed.
    pub fn new(workload: Workload, mode: Mode, duration: Duration) -> RunSpec {
        RunSpec {
            workload,
            mode,
            duration,
            warmup: Duration::ZERO,
            preloaded: 0,
            zipf: DEFAULT_ZIPF,
            seed: 1,
            progress: false,
            answer_timeout: DEFAULT_ANSWER_TIMEOUT,
        }
    }
}

/// Percentiles of one HDR latency histogram, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub p9999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    /// Of a histogram of nanoseconds ([`latency_histogram`]); all zero when it is empty.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e6;
        Percentiles {
            count: h.len(),
            p50_ms: ms(0.50),
            p90_ms: ms(0.90),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            p9999_ms: ms(0.9999),
            max_ms: h.max() as f64 / 1e6,
        }
    }
}

/// What one run measured (the measured period only, unless said otherwise).
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    /// The target's name ("keyfort", "etcd").
    pub target: String,
    pub workload: String,
    /// "open" or "closed".
    pub mode: String,
    /// Open loop: the offered operations per second (closed loop: 0).
    pub offered_per_s: f64,
    /// Closed loop: the worker threads (open loop: 0).
    pub workers: usize,
    /// Connections the operations were spread over.
    pub connections: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub preloaded: u64,
    pub zipf: f64,
    pub seed: u64,
    /// Successful answers per second, over the measured period or until the last of them
    /// arrived, whichever is longer.
    pub achieved_per_s: f64,
    /// Operations scheduled (sent, refused or dropped).
    pub scheduled: u64,
    /// Operations answered successfully (the latency sample count).
    pub ok: u64,
    /// Operations that failed, by error name (server code, `Timeout`, `Closed`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Open loop: operations not sent because [`MAX_OUTSTANDING`] answers were outstanding.
    pub dropped_overload: u64,
    /// Latency of every successful answer.
    pub overall: Percentiles,
    /// Latency of successful answers by operation name (`create`, `encrypt`, ...).
    pub per_op: BTreeMap<String, Percentiles>,
    /// Open loop: how late the sender got behind the schedule at worst (in the latencies).
    pub max_send_lag_ms: f64,
    /// Most answers outstanding at once (warm-up included).
    pub max_outstanding: usize,
    /// Keys the workload could use at the end (preloaded and acknowledged, not deleted).
    pub live_keys_end: u64,
}

impl RunResult {
    /// Errors and dropped operations together.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum::<u64>() + self.dropped_overload
    }

    /// Whether an open-loop run kept up: p99 ≤ `p99_limit_ms`, at least
    /// [`PASS_ACHIEVED_FRACTION`] of the offered rate achieved, no errors.
    pub fn passes(&self, p99_limit_ms: f64) -> bool {
        self.overall.p99_ms <= p99_limit_ms
            && self.achieved_per_s >= PASS_ACHIEVED_FRACTION * self.offered_per_s
            && self.error_count() == 0
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a RunResult serializes")
    }

    /// One line for the console.
    pub fn line(&self) -> String {
        let o = &self.overall;
        format!(
            "{} {} {}: achieved {:.0}/s  p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  ok {} errors {:?} dropped {} lag {:.1} ms",
            self.target,
            self.workload,
            self.mode_label(),
            self.achieved_per_s,
            o.p50_ms,
            o.p99_ms,
            o.p999_ms,
            o.max_ms,
            self.ok,
            self.errors,
            self.dropped_overload,
            self.max_send_lag_ms,
        )
    }

    /// "open 1000/s" or "closed 16w".
    fn mode_label(&self) -> String {
        if self.mode == "open" {
            format!("open {:.0}/s", self.offered_per_s)
        } else {
            format!("closed {}w", self.workers)
        }
    }
}

/// An aligned console table, one row per result (latencies in ms).
pub fn table(results: &[RunResult]) -> String {
    let head = [
        "target",
        "workload",
        "mode",
        "achieved/s",
        "ok",
        "errors",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "p99.99",
        "max",
        "lag",
    ];
    let mut rows: Vec<Vec<String>> = vec![head.iter().map(|s| s.to_string()).collect()];
    for r in results {
        let o = &r.overall;
        let f = |x: f64| format!("{x:.3}");
        rows.push(vec![
            r.target.clone(),
            r.workload.clone(),
            r.mode_label(),
            format!("{:.0}", r.achieved_per_s),
            r.ok.to_string(),
            r.error_count().to_string(),
            f(o.p50_ms),
            f(o.p90_ms),
            f(o.p99_ms),
            f(o.p999_ms),
            f(o.p9999_ms),
            f(o.max_ms),
            format!("{:.1}", r.max_send_lag_ms),
        ]);
    }
    let widths: Vec<usize> = (0..head.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, w))| {
                // Names left-aligned, figures right-aligned.
                if c < 3 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Runs `spec` against `target` (preloaded with `spec.preloaded` keys beforehand).
pub fn run(target: &dyn Target, spec: &RunSpec) -> RunResult {
    let chooser = Mutex::new(Chooser::new(
        spec.workload,
        spec.preloaded,
        spec.zipf,
        spec.seed,
    ));
    let mut r = drive(target, spec, &chooser);
    r.live_keys_end = lock(&chooser).live_keys();
    r
}

/// Open-loop runs of `spec` at each rate in `rates`, in order, [`DRAIN_PAUSE`] apart;
/// returns the highest rate whose run [`RunResult::passes`] `p99_limit_ms` (0.0 if none)
/// and every run. A rate that fails is run again, up to [`RUNG_TRIES`] runs in all, and
/// passes if any of its runs passes: on a 2-vCPU VM shared by three nodes and the generator,
/// one stall of a few hundred ms (seen once in the first rung of otherwise passing ladders)
/// would otherwise end the search below rates that pass. Every run, failed tries included,
/// is returned. A rate above one that failed every try is not run (load only gets worse).
pub fn max_rate_at_p99(
    target: &dyn Target,
    spec: &RunSpec,
    p99_limit_ms: f64,
    rates: &[f64],
) -> (f64, Vec<RunResult>) {
    let mut best = 0.0f64;
    let mut runs = Vec::new();
    'rates: for &rate in rates {
        for _ in 0..RUNG_TRIES {
            if !runs.is_empty() {
                std::thread::sleep(DRAIN_PAUSE);
            }
            let r = run(
                target,
                &RunSpec {
                    mode: Mode::Open { rate },
                    ..spec.clone()
                },
            );
            let passed = r.passes(p99_limit_ms);
            runs.push(r);
            if passed {
                best = best.max(rate);
                continue 'rates;
            }
        }
        break;
    }
    (best, runs)
}

/// Where a run's operations come from, and whom their outcomes go to.
trait OpSource: Sync {
    /// Operation number `i` of the run (open loop: in order; closed loop: as workers ask).
    fn next(&self, i: u64) -> Op;
    /// The outcome of an operation `next` gave.
    fn answered(&self, op: Op, ok: bool);
}

impl OpSource for Mutex<Chooser> {
    fn next(&self, _: u64) -> Op {
        lock(self).next_op()
    }

    fn answered(&self, op: Op, ok: bool) {
        lock(self).answered(op, ok)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the threads of a run record, behind one lock.
struct Stats {
    overall: Histogram<u64>,
    per_op: BTreeMap<&'static str, Histogram<u64>>,
    errors: BTreeMap<String, u64>,
    /// Measured operations scheduled (sent or refused; the sender adds the dropped).
    scheduled: u64,
    /// Latest arrival of a measured success (at least the end of the measured period).
    last_ok: Instant,
    /// Successes and errors, warm-up included (for the progress line).
    answered_ok: u64,
    answered_err: u64,
}

/// The shared record of a run.
struct Recorder {
    stats: Mutex<Stats>,
    measure_from: Instant,
}

impl Recorder {
    fn new(measure_from: Instant, measure_to: Instant) -> Recorder {
        Recorder {
            stats: Mutex::new(Stats {
                overall: latency_histogram(),
                per_op: BTreeMap::new(),
                errors: BTreeMap::new(),
                scheduled: 0,
                last_ok: measure_to,
                answered_ok: 0,
                answered_err: 0,
            }),
            measure_from,
        }
    }

    /// One outcome: `from` is the intended (open loop) or actual (closed loop) start, `at`
    /// the arrival of the answer (`None`: now).
    fn outcome(
        &self,
        op: Op,
        measured: bool,
        result: Result<(), String>,
        from: Instant,
        at: Option<Instant>,
    ) {
        let mut s = lock(&self.stats);
        match result {
            Ok(()) => s.answered_ok += 1,
            Err(_) => s.answered_err += 1,
        }
        if !measured {
            return;
        }
        s.scheduled += 1;
        match result {
            Ok(()) => {
                let at = at.unwrap_or_else(Instant::now);
                let ns = at.saturating_duration_since(from).as_nanos() as u64;
                record_ns(&mut s.overall, ns);
                record_ns(
                    s.per_op.entry(op.name()).or_insert_with(latency_histogram),
                    ns,
                );
                s.last_ok = s.last_ok.max(at);
            }
            Err(why) => *s.errors.entry(why).or_default() += 1,
        }
    }
}

/// What the open loop's sender knows that the recorder does not.
#[derive(Default)]
struct SendStats {
    dropped: u64,
    max_lag: Duration,
    max_outstanding: usize,
}

/// Runs `spec` over `target` with operations from `src`; `live_keys_end` is left 0.
fn drive(target: &dyn Target, spec: &RunSpec, src: &dyn OpSource) -> RunResult {
    let conns = target.connections();
    assert!(conns > 0, "load over no connections");
    let t0 = Instant::now() + START_AHEAD;
    let measure_from = t0 + spec.warmup;
    let measure_to = measure_from + spec.duration;
    let rec = Recorder::new(measure_from, measure_to);
    let done = AtomicBool::new(false);
    let send = std::thread::scope(|s| {
        if spec.progress {
            s.spawn(|| progress(&rec, t0, spec.warmup, &done));
        }
        let send = match spec.mode {
            Mode::Open { rate } => open_loop(target, spec, src, &rec, rate, t0),
            Mode::Closed { workers } => closed_loop(target, spec, src, &rec, workers, t0),
        };
        done.store(true, Ordering::Relaxed);
        send
    });
    let s = rec.stats.into_inner().unwrap_or_else(|e| e.into_inner());
    let span = s
        .last_ok
        .saturating_duration_since(measure_from)
        .as_secs_f64();
    let (offered, workers) = match spec.mode {
        Mode::Open { rate } => (rate, 0),
        Mode::Closed { workers } => (0.0, workers),
    };
    RunResult {
        target: target.name().to_string(),
        workload: spec.workload.name().to_string(),
        mode: spec.mode.name().to_string(),
        offered_per_s: offered,
        workers,
        connections: conns,
        duration_s: spec.duration.as_secs_f64(),
        warmup_s: spec.warmup.as_secs_f64(),
        preloaded: spec.preloaded,
        zipf: spec.zipf,
        seed: spec.seed,
        achieved_per_s: if span > 0.0 {
            s.overall.len() as f64 / span
        } else {
            0.0
        },
        scheduled: s.scheduled + send.dropped,
        ok: s.overall.len(),
        errors: s.errors,
        dropped_overload: send.dropped,
        overall: Percentiles::of(&s.overall),
        per_op: s
            .per_op
            .iter()
            .map(|(k, h)| (k.to_string(), Percentiles::of(h)))
            .collect(),
        max_send_lag_ms: send.max_lag.as_secs_f64() * 1e3,
        max_outstanding: send.max_outstanding,
        live_keys_end: 0,
    }
}

/// The progress line, rewritten every [`PROGRESS_EVERY`] until `done`, then ended.
fn progress(rec: &Recorder, t0: Instant, warmup: Duration, done: &AtomicBool) {
    let mut last = (Instant::now(), 0u64);
    let mut next = Instant::now() + PROGRESS_EVERY;
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(PROGRESS_POLL);
        let now = Instant::now();
        if now < next {
            continue;
        }
        next += PROGRESS_EVERY;
        let (ok, err, p99) = {
            let s = lock(&rec.stats);
            let p99 = if s.overall.is_empty() {
                0.0
            } else {
                s.overall.value_at_quantile(0.99) as f64 / 1e6
            };
            (s.answered_ok, s.answered_err, p99)
        };
        let per_s = (ok - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
        last = (now, ok);
        let elapsed = now.saturating_duration_since(t0);
        let phase = if elapsed < warmup { " (warm-up)" } else { "" };
        eprint!(
            "\r{:6.1} s{phase}  {per_s:8.0} ops/s  p99 {p99:8.3} ms  errors {err}      ",
            elapsed.as_secs_f64()
        );
    }
    eprintln!();
}

/// What the open loop's sender hands the completer.
struct Sent {
    intended: Instant,
    measured: bool,
    op: Op,
    ticket: Result<Box<dyn Ticket>, String>,
}

fn open_loop(
    target: &dyn Target,
    spec: &RunSpec,
    src: &dyn OpSource,
    rec: &Recorder,
    rate: f64,
    t0: Instant,
) -> SendStats {
    assert!(rate > 0.0, "open loop at rate 0");
    let interval = Duration::from_secs_f64(1.0 / rate);
    let total = ((spec.warmup + spec.duration).as_secs_f64() * rate).round() as u64;
    let conns = target.connections() as u64;
    let outstanding = AtomicUsize::new(0);
    let (tx, rx) = mpsc::channel::<Sent>();
    let timeout = spec.answer_timeout;
    std::thread::scope(|s| {
        let out = &outstanding;
        let sender = s.spawn(move || {
            let mut st = SendStats::default();
            let mut i = 0u64;
            while i < total {
                let intended = t0 + interval.mul_f64(i as f64);
                let now = Instant::now();
                if intended > now + SLEEP_SLACK {
                    std::thread::sleep(intended - now);
                    continue;
                }
                st.max_lag = st.max_lag.max(now.saturating_duration_since(intended));
                let measured = intended >= rec.measure_from;
                let o = out.load(Ordering::Relaxed);
                st.max_outstanding = st.max_outstanding.max(o);
                if o >= MAX_OUTSTANDING {
                    // Not chosen, so the workload never waits for its answer.
                    st.dropped += u64::from(measured);
                    i += 1;
                    continue;
                }
                let op = src.next(i);
                out.fetch_add(1, Ordering::Relaxed);
                let ticket = target.start((i % conns) as usize, op);
                let sent = Sent {
                    intended,
                    measured,
                    op,
                    ticket,
                };
                if tx.send(sent).is_err() {
                    break;
                }
                i += 1;
            }
            st
        });
        for sent in rx {
            let (result, at) = match sent.ticket {
                Ok(t) => {
                    let left = (sent.intended + timeout).saturating_duration_since(Instant::now());
                    t.wait(left.max(Duration::from_micros(1)))
                }
                Err(why) => (Err(why), None),
            };
            outstanding.fetch_sub(1, Ordering::Relaxed);
            src.answered(sent.op, result.is_ok());
            rec.outcome(sent.op, sent.measured, result, sent.intended, at);
        }
        sender.join().expect("sender thread")
    })
}

/// Starts `op` on connection `conn` and waits for it: (outcome, start, arrival).
fn start_and_wait(
    target: &dyn Target,
    conn: usize,
    op: Op,
    timeout: Duration,
) -> (Result<(), String>, Instant, Option<Instant>) {
    let start = Instant::now();
    let (result, at) = match target.start(conn, op) {
        Ok(t) => t.wait(timeout),
        Err(why) => (Err(why), None),
    };
    (result, start, at)
}

fn closed_loop(
    target: &dyn Target,
    spec: &RunSpec,
    src: &dyn OpSource,
    rec: &Recorder,
    workers: usize,
    t0: Instant,
) -> SendStats {
    assert!(workers > 0, "closed loop with no workers");
    let end = rec.measure_from + spec.duration;
    let next = AtomicU64::new(0);
    let conns = target.connections();
    std::thread::scope(|s| {
        for w in 0..workers {
            let next = &next;
            s.spawn(move || {
                let now = Instant::now();
                if t0 > now {
                    std::thread::sleep(t0 - now);
                }
                while Instant::now() < end {
                    let op = src.next(next.fetch_add(1, Ordering::Relaxed));
                    let (result, start, at) =
                        start_and_wait(target, w % conns, op, spec.answer_timeout);
                    src.answered(op, result.is_ok());
                    rec.outcome(op, start >= rec.measure_from, result, start, at);
                }
            });
        }
    });
    SendStats {
        max_outstanding: workers,
        ..SendStats::default()
    }
}

// ---- raw keyfort requests (cluster_bench) ----

/// One open-loop run of [`run_open_loop`].
#[derive(Clone, Debug)]
pub struct OpenLoop {
    /// Offered requests per second.
    pub rate: f64,
    /// Measured period (after the warm-up).
    pub duration: Duration,
    /// Period before it, loaded at the same rate, not recorded.
    pub warmup: Duration,
    /// Wait for one answer, from its intended send time.
    pub answer_timeout: Duration,
}

impl OpenLoop {
    pub fn new(rate: f64, duration: Duration, warmup: Duration) -> Self {
        OpenLoop {
            rate,
            duration,
            warmup,
            answer_timeout: DEFAULT_ANSWER_TIMEOUT,
        }
    }
}

/// What one [`run_open_loop`] measured (the measured period only).
#[derive(Clone, Debug, Serialize)]
pub struct LoadResult {
    pub offered_per_s: f64,
    /// Successful answers of measured requests per second, over the measured period or until
    /// the last of them arrived, whichever is longer.
    pub achieved_per_s: f64,
    /// Measured requests scheduled (sent, dropped or refused).
    pub scheduled: u64,
    /// Measured requests answered successfully (the latency sample count).
    pub ok: u64,
    /// Measured requests that failed, by error (server code name, `Timeout`, `Closed`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Measured requests not sent because [`MAX_OUTSTANDING`] answers were outstanding.
    pub dropped_overload: u64,
    /// Latency of successful answers, in ms.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// How late the sender got behind the schedule at worst (included in the latencies).
    pub max_send_lag_ms: f64,
    /// Most answers outstanding at once.
    pub max_outstanding: usize,
}

impl LoadResult {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum::<u64>() + self.dropped_overload
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a LoadResult serializes")
    }

    /// One line for the console.
    pub fn line(&self) -> String {
        format!(
            "offered {:>7.0}/s achieved {:>7.0}/s  p50 {:>8.3} ms  p99 {:>8.3} ms  p999 {:>8.3} ms  max {:>8.3} ms  ok {} errors {:?} dropped {} lag {:.1} ms",
            self.offered_per_s,
            self.achieved_per_s,
            self.p50_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms,
            self.ok,
            self.errors,
            self.dropped_overload,
            self.max_send_lag_ms,
        )
    }
}

/// The name an error is counted under.
pub fn error_name(e: &ClientError) -> String {
    match e {
        ClientError::Server(r) => format!("{:?}", r.code),
        ClientError::Timeout(_) => "Timeout".into(),
        ClientError::Io(_) => "Io".into(),
        ClientError::Protocol(_) => "Protocol".into(),
        ClientError::Credential(_) => "Credential".into(),
        ClientError::NoNodes => "NoNodes".into(),
        ClientError::Closed => "Closed".into(),
        ClientError::Tls(_) => "Tls".into(),
        ClientError::TlsConfig(_) => "TlsConfig".into(),
        ClientError::Insecure(_) => "Insecure".into(),
    }
}

/// Waits for a keyfort request's answer: the response, or the error's name; and the instant
/// the client's reader saw it arrive.
pub fn wait_answer(p: Pending, timeout: Duration) -> (Result<Response, String>, Option<Instant>) {
    let (answer, at) = p.wait_timed(timeout);
    (answer.map_err(|e| error_name(&e)), at)
}

/// Raw requests as a [`Target`]: operation `Create { key: i }` is request `make(i)` on
/// `conns[conn % n]`, a success when `check` accepts the answer (else `UnexpectedAnswer`).
struct Requests<'a, M> {
    conns: &'a [Arc<Connection>],
    make: M,
    check: Arc<dyn Fn(&Response) -> bool + Send + Sync>,
}

struct CheckedTicket {
    pending: Pending,
    check: Arc<dyn Fn(&Response) -> bool + Send + Sync>,
}

impl Ticket for CheckedTicket {
    fn wait(self: Box<Self>, timeout: Duration) -> (Result<(), String>, Option<Instant>) {
        let (answer, at) = wait_answer(self.pending, timeout);
        let result = answer.and_then(|r| {
            (self.check)(&r)
                .then_some(())
                .ok_or_else(|| "UnexpectedAnswer".to_string())
        });
        (result, at)
    }
}

impl<M: Fn(u64) -> Request + Send + Sync> Target for Requests<'_, M> {
    fn name(&self) -> &str {
        "keyfort"
    }

    fn connections(&self) -> usize {
        self.conns.len()
    }

    fn preload(&self, _: u64) -> Result<(), String> {
        Ok(())
    }

    fn start(&self, conn: usize, op: Op) -> Result<Box<dyn Ticket>, String> {
        let i = match op {
            Op::Create { key } | Op::Encrypt { key } | Op::Decrypt { key } | Op::Delete { key } => {
                key
            }
        };
        let pending = self.conns[conn % self.conns.len()]
            .start(&(self.make)(i))
            .map_err(|e| error_name(&e))?;
        Ok(Box::new(CheckedTicket {
            pending,
            check: self.check.clone(),
        }))
    }
}

/// Request number `i`, for the raw-request runs.
struct Indexed;

impl OpSource for Indexed {
    fn next(&self, i: u64) -> Op {
        Op::Create { key: i }
    }

    fn answered(&self, _: Op, _: bool) {}
}

/// Runs `cfg` over `conns`, request `i` made by `make(i)` and sent on `conns[i % n]`.
/// `check` decides whether an answer counts as a success (for instance that it is the
/// expected response kind); a `false` is counted as error `UnexpectedAnswer`.
pub fn run_open_loop<M, C>(
    conns: &[Arc<Connection>],
    cfg: &OpenLoop,
    make: M,
    check: C,
) -> LoadResult
where
    M: Fn(u64) -> Request + Send + Sync,
    C: Fn(&Response) -> bool + Send + Sync + 'static,
{
    assert!(!conns.is_empty(), "open loop over no connections");
    let target = Requests {
        conns,
        make,
        check: Arc::new(check),
    };
    let spec = RunSpec {
        warmup: cfg.warmup,
        answer_timeout: cfg.answer_timeout,
        ..RunSpec::new(
            Workload::CreateHeavy,
            Mode::Open { rate: cfg.rate },
            cfg.duration,
        )
    };
    let r = drive(&target, &spec, &Indexed);
    LoadResult {
        offered_per_s: r.offered_per_s,
        achieved_per_s: r.achieved_per_s,
        scheduled: r.scheduled,
        ok: r.ok,
        errors: r.errors,
        dropped_overload: r.dropped_overload,
        p50_ms: r.overall.p50_ms,
        p99_ms: r.overall.p99_ms,
        p999_ms: r.overall.p999_ms,
        max_ms: r.overall.max_ms,
        max_send_lag_ms: r.max_send_lag_ms,
        max_outstanding: r.max_outstanding,
    }
}

/// Closed loop: `count` requests one at a time on `conns[i % n]` (each sent when the previous
/// answered); latency = answer arrival − send. Returns (latency summary in µs, errors).
pub fn run_closed_loop<M, C>(
    conns: &[Arc<Connection>],
    count: u64,
    timeout: Duration,
    make: M,
    check: C,
) -> (LatencySummary, BTreeMap<String, u64>)
where
    M: Fn(u64) -> Request + Send + Sync,
    C: Fn(&Response) -> bool + Send + Sync + 'static,
{
    let target = Requests {
        conns,
        make,
        check: Arc::new(check),
    };
    let mut h = latency_histogram();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..count {
        let (result, start, at) = start_and_wait(
            &target,
            (i % conns.len() as u64) as usize,
            Op::Create { key: i },
            timeout,
        );
        match result {
            Ok(()) => {
                let at = at.unwrap_or_else(Instant::now);
                record_ns(
                    &mut h,
                    at.saturating_duration_since(start).as_nanos() as u64,
                );
            }
            Err(why) => *errors.entry(why).or_default() += 1,
        }
    }
    (LatencySummary::of(&h), errors)
}
