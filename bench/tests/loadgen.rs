//! The load generator's behaviour (never its timings): the workload mixes and their key choice
//! from fixed seeds, the open loop charging a target's stall to latency (coordinated omission
//! corrected) over tiny in-test targets, and one short run against a real 3-node cluster.
//!
//! The cluster test runs the `keyfort` and `keyfortd` binaries beside this test's target dir
//! (`cargo nextest run --workspace` builds them; when they are missing it builds them with
//! `cargo build -p keyfort-tools --bins`).

use keyfort_bench::keyfort_target::{start_local_cluster, KeyfortOptions, KeyfortTarget};
use keyfort_bench::loadgen::{max_rate_at_p99, run, table, Mode, RunSpec, RUNG_TRIES};
use keyfort_bench::local_cluster::keep_failed;
use keyfort_bench::target::{Op, Target, Ticket};
use keyfort_bench::workload::{Chooser, Workload, Zipf, CHURN_WINDOW, DEFAULT_ZIPF};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const OPS: u64 = 100_000;
const SEED: u64 = 7;

/// Share of each operation kind in `OPS` operations, every create acknowledged at once.
fn shares(w: Workload, preloaded: u64) -> BTreeMap<&'static str, f64> {
    let mut c = Chooser::new(w, preloaded, DEFAULT_ZIPF, SEED);
    let mut n: BTreeMap<&'static str, u64> = BTreeMap::new();
    for _ in 0..OPS {
        let op = c.next_op();
        *n.entry(op.name()).or_default() += 1;
        c.answered(op, true);
    }
    n.into_iter()
        .map(|(k, v)| (k, v as f64 / OPS as f64))
        .collect()
}

fn assert_share(s: &BTreeMap<&str, f64>, op: &str, want: f64) {
    let got = s.get(op).copied().unwrap_or(0.0);
    assert!(
        (got - want).abs() < 0.01,
        "{op}: share {got:.4}, want {want} (all: {s:?})"
    );
}

#[test]
fn workload_mixes_have_their_proportions() {
    let s = shares(Workload::CreateHeavy, 1000);
    assert_share(&s, "create", 0.90);
    assert_share(&s, "encrypt", 0.05);
    assert_share(&s, "decrypt", 0.05);
    let s = shares(Workload::UseHeavy, 1000);
    assert_share(&s, "create", 0.10);
    assert_share(&s, "encrypt", 0.45);
    assert_share(&s, "decrypt", 0.45);
    let s = shares(Workload::Churn, 1000);
    assert_share(&s, "create", 0.45);
    assert_share(&s, "delete", 0.45);
    assert_share(&s, "encrypt", 0.10);
    for w in Workload::ALL {
        assert_eq!(w.name().parse::<Workload>(), Ok(w));
    }
    assert!("read-heavy".parse::<Workload>().is_err());
}

#[test]
fn same_seed_same_operations() {
    let ops = |seed| {
        let mut c = Chooser::new(Workload::UseHeavy, 100, DEFAULT_ZIPF, seed);
        (0..1000)
            .map(|_| {
                let op = c.next_op();
                c.answered(op, true);
                op
            })
            .collect::<Vec<Op>>()
    };
    assert_eq!(ops(3), ops(3));
    assert_ne!(ops(3), ops(4));
}

/// The probability of rank `k` of `n` under exponent `s`.
fn zipf_p(k: u64, n: u64, s: f64) -> f64 {
    let h: f64 = (1..=n).map(|i| (i as f64).powf(-s)).sum();
    (k as f64).powf(-s) / h
}

#[test]
fn zipf_sampler_follows_its_law() {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
    for (n, s) in [(1000u64, DEFAULT_ZIPF), (50, 1.2), (10, 0.0)] {
        let z = Zipf::new(n, s);
        let draws = 200_000u64;
        let mut hits = vec![0u64; n as usize + 1];
        for _ in 0..draws {
            let k = z.sample(&mut rng);
            assert!((1..=n).contains(&k), "rank {k} outside 1..={n}");
            hits[k as usize] += 1;
        }
        for k in [1u64, 2, 5, 10] {
            let want = zipf_p(k, n, s);
            let got = hits[k as usize] as f64 / draws as f64;
            assert!(
                (got - want).abs() < 0.1 * want + 0.002,
                "n {n} s {s} rank {k}: {got:.4}, want {want:.4}"
            );
        }
    }
}

#[test]
fn use_heavy_keys_are_zipf_skewed_oldest_hottest() {
    let preloaded = 10_000u64;
    let mut c = Chooser::new(Workload::UseHeavy, preloaded, DEFAULT_ZIPF, SEED);
    let mut hits: BTreeMap<u64, u64> = BTreeMap::new();
    let mut uses = 0u64;
    for _ in 0..OPS {
        let op = c.next_op();
        if let Op::Encrypt { key } | Op::Decrypt { key } = op {
            *hits.entry(key).or_default() += 1;
            uses += 1;
        }
        c.answered(op, true);
    }
    let share = |k: u64| hits.get(&k).copied().unwrap_or(0) as f64 / uses as f64;
    // Key 0 is rank 1 of a Zipf law over ≥ 10,000 keys (the live ones grow by the creates).
    let want = zipf_p(1, preloaded, DEFAULT_ZIPF);
    assert!(
        (share(0) - want).abs() < 0.15 * want,
        "key 0: {:.4}, want about {want:.4}",
        share(0)
    );
    assert!(share(0) > share(1) && share(1) > share(9) && share(9) > share(999));
    // The hottest 1 % of the keys take far more than 1 % of the uses.
    let top: f64 = (0..preloaded / 100).map(share).sum();
    assert!(top > 0.4, "top 1 % of keys: {top:.3} of the uses");
}

/// Drives churn with answers arriving `lag` operations late and every `fail_every`-th create
/// failing; checks that every key used or deleted is live, and returns the most live keys.
fn churn_live_max(preloaded: u64, lag: usize, fail_every: u64) -> u64 {
    let mut c = Chooser::new(Workload::Churn, preloaded, DEFAULT_ZIPF, SEED);
    let mut live: HashSet<u64> = (0..preloaded).collect();
    let mut in_flight: VecDeque<Op> = VecDeque::new();
    let mut failed: HashSet<u64> = HashSet::new();
    let mut most = 0u64;
    for i in 0..OPS {
        let op = c.next_op();
        match op {
            Op::Create { key } => assert!(!live.contains(&key) && !failed.contains(&key)),
            Op::Delete { key } => {
                assert!(live.remove(&key), "delete of key {key}, not live");
                assert!(key >= preloaded, "delete of preloaded key {key}");
            }
            Op::Encrypt { key } | Op::Decrypt { key } => {
                assert!(live.contains(&key), "{} of key {key}, not live", op.name())
            }
        }
        in_flight.push_back(op);
        while in_flight.len() > lag {
            let op = in_flight.pop_front().expect("in flight");
            let ok = !(fail_every > 0 && i % fail_every == 0);
            if let Op::Create { key } = op {
                if ok {
                    live.insert(key);
                } else {
                    failed.insert(key);
                }
            }
            c.answered(op, ok);
        }
        assert_eq!(c.live_keys(), live.len() as u64);
        most = most.max(live.len() as u64);
    }
    most
}

#[test]
fn churn_keeps_live_keys_bounded_and_deletes_only_live_keys() {
    for (preloaded, lag, fail_every) in [(1000, 0, 0), (1000, 200, 7), (0, 50, 0)] {
        let most = churn_live_max(preloaded, lag, fail_every);
        assert!(
            most <= preloaded + 2 * CHURN_WINDOW,
            "churn over {preloaded} keys reached {most} live keys"
        );
    }
}

/// A target whose tickets answer after `answer_after` (from their start), and whose
/// `start` blocks once for `start_stall` at the operation started `stall_at` into the run.
struct Sleepy {
    answer_after: Duration,
    start_stall: Duration,
    stall_at: Duration,
    first: Mutex<Option<Instant>>,
    stalled: Mutex<bool>,
    in_flight: Arc<AtomicUsize>,
    most_in_flight: AtomicUsize,
}

impl Sleepy {
    fn new(answer_after: Duration, start_stall: Duration, stall_at: Duration) -> Sleepy {
        Sleepy {
            answer_after,
            start_stall,
            stall_at,
            first: Mutex::new(None),
            stalled: Mutex::new(false),
            in_flight: Arc::default(),
            most_in_flight: AtomicUsize::new(0),
        }
    }
}

struct SleepyTicket {
    at: Instant,
    in_flight: Arc<AtomicUsize>,
}

impl Ticket for SleepyTicket {
    fn wait(self: Box<Self>, timeout: Duration) -> (Result<(), String>, Option<Instant>) {
        let now = Instant::now();
        let result = if self.at > now + timeout {
            std::thread::sleep(timeout);
            (Err("Timeout".to_string()), None)
        } else {
            std::thread::sleep(self.at.saturating_duration_since(now));
            (Ok(()), Some(self.at))
        };
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

impl Target for Sleepy {
    fn name(&self) -> &str {
        "sleepy"
    }

    fn connections(&self) -> usize {
        4
    }

    fn preload(&self, _: u64) -> Result<(), String> {
        Ok(())
    }

    fn start(&self, _conn: usize, _op: Op) -> Result<Box<dyn Ticket>, String> {
        let now = Instant::now();
        let first = *self.first.lock().unwrap().get_or_insert(now);
        if first.checked_add(self.stall_at).is_some_and(|at| now >= at) {
            let mut stalled = self.stalled.lock().unwrap();
            if !*stalled {
                *stalled = true;
                std::thread::sleep(self.start_stall);
            }
        }
        let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(n, Ordering::SeqCst);
        Ok(Box::new(SleepyTicket {
            at: Instant::now() + self.answer_after,
            in_flight: self.in_flight.clone(),
        }))
    }
}

#[test]
fn open_loop_charges_a_stalled_send_to_the_requests_behind_it() {
    // 1,000/s for 1 s; 300 ms into it, sending blocks for 300 ms (as on a full socket). The
    // ~300 requests due meanwhile go out late: measured from their intended send times, the
    // slowest waited almost the whole stall although each answered at once once sent.
    let stall = Duration::from_millis(300);
    let t = Sleepy::new(Duration::ZERO, stall, Duration::from_millis(300));
    let spec = RunSpec::new(
        Workload::CreateHeavy,
        Mode::Open { rate: 1000.0 },
        Duration::from_secs(1),
    );
    let r = run(&t, &spec);
    assert_eq!(r.ok, 1000, "{}", r.line());
    assert_eq!(r.error_count(), 0, "{}", r.line());
    assert!(r.max_send_lag_ms >= 290.0, "{}", r.line());
    assert!(r.overall.max_ms >= 290.0, "{}", r.line());
    // About 30 % of the requests were due during the stall; their latencies spread over it.
    assert!(r.overall.p90_ms >= 50.0, "{}", r.line());
    assert!(r.overall.p99_ms >= 250.0, "{}", r.line());
    let per_op: u64 = r.per_op.values().map(|p| p.count).sum();
    assert_eq!(per_op, r.ok);
    assert!(r.per_op.contains_key("create") && r.per_op.contains_key("encrypt"));
}

#[test]
fn open_loop_charges_slow_answers_and_never_slows_arrivals() {
    // Every answer takes 50 ms: the open loop keeps sending (about 50 outstanding at
    // 1,000/s), and every latency is at least 50 ms.
    let t = Sleepy::new(Duration::from_millis(50), Duration::ZERO, Duration::MAX);
    let spec = RunSpec {
        warmup: Duration::from_millis(200),
        ..RunSpec::new(
            Workload::UseHeavy,
            Mode::Open { rate: 1000.0 },
            Duration::from_millis(500),
        )
    };
    let r = run(&t, &spec);
    assert_eq!(r.ok, 500, "{}", r.line());
    assert!(r.overall.p50_ms >= 50.0, "{}", r.line());
    assert!(r.max_outstanding >= 20, "{}", r.line());
    assert!(t.most_in_flight.load(Ordering::SeqCst) >= 20);
}

#[test]
fn closed_loop_keeps_one_operation_per_worker() {
    let t = Sleepy::new(Duration::from_millis(2), Duration::ZERO, Duration::MAX);
    let spec = RunSpec {
        preloaded: 100,
        ..RunSpec::new(
            Workload::UseHeavy,
            Mode::Closed { workers: 3 },
            Duration::from_millis(300),
        )
    };
    let r = run(&t, &spec);
    assert!(r.ok > 0 && r.error_count() == 0, "{}", r.line());
    assert!(t.most_in_flight.load(Ordering::SeqCst) <= 3);
    assert!(r.overall.p50_ms >= 2.0, "{}", r.line());
    assert!(r.per_op.contains_key("encrypt") && r.per_op.contains_key("decrypt"));
    assert_eq!(r.mode, "closed");
    assert!(table(&[r.clone(), r]).lines().count() == 3);
}

#[test]
fn rate_search_reports_the_highest_passing_rate() {
    let t = Sleepy::new(Duration::from_millis(20), Duration::ZERO, Duration::MAX);
    let spec = RunSpec::new(
        Workload::CreateHeavy,
        Mode::Open { rate: 1.0 },
        Duration::from_millis(300),
    );
    // Every answer takes 20 ms: a 1 s p99 bound passes each rate, a 5 ms bound none (the
    // first rate is tried RUNG_TRIES times, and after it failed every try no higher rate runs).
    let (best, runs) = max_rate_at_p99(&t, &spec, 1000.0, &[100.0, 200.0]);
    assert_eq!((best, runs.len()), (200.0, 2));
    let (best, runs) = max_rate_at_p99(&t, &spec, 5.0, &[100.0, 200.0]);
    assert_eq!((best, runs.len()), (0.0, RUNG_TRIES));
}

/// `keyfort` and `keyfortd` of this build (target/<profile>/), built when missing.
fn binaries() -> (PathBuf, PathBuf) {
    let exe = std::env::current_exe().expect("test exe");
    // target/<profile>/deps/loadgen-<hash>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .to_path_buf();
    let (keyfort, keyfortd) = (dir.join("keyfort"), dir.join("keyfortd"));
    if !keyfort.exists() || !keyfortd.exists() {
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "keyfort-tools", "--bins"]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("cargo build");
        assert!(st.success(), "cargo build -p keyfort-tools failed");
    }
    (keyfort, keyfortd)
}

#[test]
fn real_cluster_answers_every_workload_and_fills_histograms() {
    const PRELOAD: u64 = 200;
    let (keyfort, keyfortd) = binaries();
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("cluster");
    let (c, creds) =
        start_local_cluster(&root, &keyfort, &keyfortd, 3, 2, 25).expect("local cluster");
    let fail = |what: String| -> ! { panic!("{what} (cluster kept in {})", keep_failed(&root)) };
    let opts = KeyfortOptions {
        value_size: 256,
        connections: 4,
    };
    let target = KeyfortTarget::connect(&c.client_addrs(), &creds, &opts)
        .unwrap_or_else(|e| fail(format!("connect: {e}")));
    assert_eq!((target.partitions(), target.connections()), (2, 4));
    target
        .preload(PRELOAD)
        .unwrap_or_else(|e| fail(format!("preload: {e}")));
    let runs = [
        (
            Workload::UseHeavy,
            Mode::Open { rate: 300.0 },
            &["create", "encrypt", "decrypt"][..],
        ),
        (
            Workload::Churn,
            Mode::Open { rate: 200.0 },
            &["create", "delete", "encrypt"][..],
        ),
        (
            Workload::CreateHeavy,
            Mode::Closed { workers: 4 },
            &["create"][..],
        ),
    ];
    for (workload, mode, ops) in runs {
        let spec = RunSpec {
            warmup: Duration::from_millis(200),
            preloaded: PRELOAD,
            ..RunSpec::new(workload, mode, Duration::from_millis(1000))
        };
        let r = run(&target, &spec);
        eprintln!("{}", r.line());
        if r.ok == 0 || r.error_count() > 0 {
            fail(format!("not every answer ok: {}", r.line()));
        }
        assert_eq!(r.target, "keyfort");
        for op in ops {
            let n = r.per_op.get(*op).map_or(0, |p| p.count);
            assert!(n > 0, "no {op} answered: {}", r.line());
        }
        let per_op: u64 = r.per_op.values().map(|p| p.count).sum();
        assert_eq!(per_op, r.ok);
        assert!(r.overall.max_ms >= r.overall.p99_ms && r.overall.p99_ms > 0.0);
    }
}
