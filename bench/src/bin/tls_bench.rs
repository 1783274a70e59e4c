//! What TLS costs keyfort (issue 9, "Measure"): plaintext and TLS 1.3 side by side, in one
//! run, through the same load generator with the same seed and workload.
//!
//! `--reps` repetitions; repetition `r` runs plain then TLS when `r` is even, TLS then plain
//! when it is odd (so neither always goes first on a machine that warms or tires). Each
//! (repetition, security) is a fresh local cluster of 3 `keyfortd` processes (`--shards`
//! shards, one partition each): `Security::InsecureLoopback` (plaintext on 127.0.0.1) or
//! `Security::Tls` (TLS 1.3 on the client *and* the peer protocol, node certificates from the
//! cluster CA made at init; the target's connections verify the node's certificate and share
//! one rustls config, so sessions resume). On it, after `--preload` keys (and a ciphertext
//! each) and an unrecorded settling run (`--settle` s of the rate-search workload at
//! `--encrypt-rate`):
//!
//! (a) **create-only** open loop at `--create-rate` and **encrypt-only** open loop at
//!     `--encrypt-rate` (every operation the generator draws becomes a create, or an encrypt
//!     of a preloaded key chosen by the workload's Zipf law): p50/p99/p99.9;
//! (b) the highest rate at p99 ≤ `--p99-ms` of `--workload` (use-heavy: 90 % encrypt/decrypt)
//!     over the `--rates` ladder (`loadgen::max_rate_at_p99`: a failing rate is tried twice,
//!     the climb stops after a rate that failed both);
//! (c) handshakes: the connections the target opened (once, before the runs: it never
//!     reconnects) and how many TLS sessions were resumed, against the requests sent over them.
//!
//! Prints every run, a side-by-side table of medians over the repetitions, and writes `--out`
//! (JSON: the medians and goals at top level — `throughput_ratio_tls_vs_plain`,
//! `encrypt_latency_us_p99_tls`, ... — and every repetition's raw runs, `machine`, `command`,
//! `date`).
//!
//! ```sh
//! cargo build --release --locked -p keyfort-tools -p keyfort-bench
//! ./target/release/tls_bench --reps 3 --duration 5 --warmup 1 --preload 2000
//! ./target/release/tls_bench --reps 1 --duration 2 --warmup 0.5 --preload 500 --out target/tls.json
//! ```

use keyfort_bench::keyfort_target::{
    start_local_cluster_with, Handshakes, KeyfortOptions, KeyfortTarget,
};
use keyfort_bench::loadgen::{max_rate_at_p99, run, Mode, Percentiles, RunOptions, RunResult};
use keyfort_bench::local_cluster::{binaries_beside_exe, Security};
use keyfort_bench::target::{Op, Target, Ticket};
use keyfort_bench::workload::Workload;
use keyfort_bench::{machine, median, write_json};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

#[derive(clap::Parser, Debug)]
struct Args {
    /// Repetitions; each runs both securities, alternating which goes first.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// The create-only run's offered rate, per second.
    #[arg(long, default_value_t = 500.0)]
    create_rate: f64,
    /// The encrypt-only run's offered rate, per second (also the settling run's).
    #[arg(long, default_value_t = 2000.0)]
    encrypt_rate: f64,
    /// The rate search's workload.
    #[arg(long, default_value = "use-heavy")]
    workload: Workload,
    /// The rate search's ladder, offered operations per second, climbed in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,2000,2500,3000,3500,4000,5000,6000,8000"
    )]
    rates: Vec<f64>,
    /// Seconds of the unrecorded settling run after the preload (0: none).
    #[arg(long, default_value_t = 5.0)]
    settle: f64,
    /// Each run's options (duration, warm-up, preload, connections, value size, seed, p99 bound).
    #[command(flatten)]
    run: RunOptions,
    /// Shards of each cluster (one partition each).
    #[arg(long, default_value_t = 2)]
    shards: u32,
    /// Raft tick of the nodes.
    #[arg(long, default_value_t = 25)]
    tick_ms: u64,
    /// Scratch directory (clusters; removed first and after).
    #[arg(long, default_value = "target/tls-bench")]
    dir: PathBuf,
    /// Writes the results here as JSON.
    #[arg(long, default_value = "docs/bench/tls.json")]
    out: PathBuf,
}

const NODES: u64 = 3;
/// The issue's goals: TLS keeps at least this fraction of plaintext's highest rate ...
const GOAL_THROUGHPUT_RATIO: f64 = 0.85;
/// ... and adds at most this much to the encrypt p99, in µs.
const GOAL_P99_COST_US: f64 = 100.0;
/// Create-only runs number their keys from here (far above the workload's own numbers, so
/// they never meet the keys the rate search creates).
const CREATE_ONLY_BASE: u64 = 1 << 48;

fn say(msg: impl AsRef<str>) {
    eprintln!("tls_bench: {}", msg.as_ref());
}

fn name(s: Security) -> &'static str {
    match s {
        Security::Tls => "tls",
        Security::InsecureLoopback => "plain",
    }
}

/// What a run over [`Counted`] turns every drawn operation into.
#[derive(Clone, Copy, Debug)]
enum Only {
    /// A create of a fresh key.
    Create,
    /// An encrypt under preloaded key `drawn % preloaded` (the workload's key choice kept).
    Encrypt,
    /// The operation as drawn.
    Drawn,
}

/// The keyfort target, counting the requests started on it, optionally turning every
/// operation into one kind ([`Only`]).
struct Counted<'a> {
    inner: &'a KeyfortTarget,
    only: Only,
    preloaded: u64,
    next_create: &'a AtomicU64,
    started: &'a AtomicU64,
}

impl Target for Counted<'_> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn connections(&self) -> usize {
        self.inner.connections()
    }

    fn preload(&self, keys: u64) -> Result<(), String> {
        self.inner.preload(keys)
    }

    fn start(&self, conn: usize, op: Op) -> Result<Box<dyn Ticket>, String> {
        let drawn = match op {
            Op::Create { key } | Op::Encrypt { key } | Op::Decrypt { key } | Op::Delete { key } => {
                key
            }
        };
        let op = match self.only {
            Only::Create => Op::Create {
                key: CREATE_ONLY_BASE + self.next_create.fetch_add(1, Ordering::Relaxed),
            },
            Only::Encrypt => Op::Encrypt {
                key: drawn % self.preloaded.max(1),
            },
            Only::Drawn => op,
        };
        let t = self.inner.start(conn, op)?;
        self.started.fetch_add(1, Ordering::Relaxed);
        Ok(t)
    }
}

/// One (repetition, security): a fresh cluster and its runs.
struct Side {
    security: Security,
    rep: usize,
    /// 0: ran first in its repetition, 1: second.
    order: usize,
    ready_s: f64,
    preload_s: f64,
    settle: Option<RunResult>,
    create: RunResult,
    encrypt: RunResult,
    ladder: Vec<RunResult>,
    max_rate: f64,
    handshakes: Handshakes,
    /// Requests sent over the target's connections: the preload's and every run's.
    requests: u64,
    closed_connections: usize,
}

impl Side {
    fn figures(&self) -> Figures {
        Figures {
            max_rate: self.max_rate,
            encrypt: self.encrypt.overall,
            create: self.create.overall,
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "security": name(self.security),
            "rep": self.rep,
            "order_in_rep": self.order,
            "cluster_ready_s": self.ready_s,
            "preload_s": self.preload_s,
            "figures": self.figures().to_json(),
            "handshakes": {
                "connections_opened": self.handshakes.opened,
                "tls": self.handshakes.tls,
                "resumed": self.handshakes.resumed,
                "full": self.handshakes.full(),
                "requests_sent": self.requests,
                "requests_per_connection": self.requests as f64 / self.handshakes.opened.max(1) as f64,
                "connections_closed_at_end": self.closed_connections,
            },
            "settle": self.settle.as_ref().map(RunResult::to_json),
            "create_only": self.create.to_json(),
            "encrypt_only": self.encrypt.to_json(),
            "max_rate_at_p99": self.max_rate,
            "ladder": self.ladder.iter().map(RunResult::to_json).collect::<Vec<_>>(),
        })
    }
}

/// One side's headline figures (latencies of the fixed-rate runs, highest rate of the search).
#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    max_rate: f64,
    encrypt: Percentiles,
    create: Percentiles,
}

fn us(ms: f64) -> f64 {
    (ms * 1000.0 * 10.0).round() / 10.0
}

impl Figures {
    fn to_json(self) -> Value {
        json!({
            "max_rate_per_s": self.max_rate,
            "encrypt_us_p50": us(self.encrypt.p50_ms),
            "encrypt_us_p99": us(self.encrypt.p99_ms),
            "encrypt_us_p999": us(self.encrypt.p999_ms),
            "create_us_p50": us(self.create.p50_ms),
            "create_us_p99": us(self.create.p99_ms),
            "create_us_p999": us(self.create.p999_ms),
        })
    }
}

/// Medians over the repetitions of each side, the TLS/plain ratio of the highest rates, the
/// p99 costs and the goals (see the module documentation).
fn summary(plain: &[Figures], tls: &[Figures]) -> Value {
    let med = |xs: &[Figures], f: fn(&Figures) -> f64| median(xs.iter().map(f).collect());
    let max_rate = |f: &Figures| f.max_rate;
    let enc_p50 = |f: &Figures| us(f.encrypt.p50_ms);
    let enc_p99 = |f: &Figures| us(f.encrypt.p99_ms);
    let enc_p999 = |f: &Figures| us(f.encrypt.p999_ms);
    let cr_p50 = |f: &Figures| us(f.create.p50_ms);
    let cr_p99 = |f: &Figures| us(f.create.p99_ms);
    let cr_p999 = |f: &Figures| us(f.create.p999_ms);
    let (rate_p, rate_t) = (med(plain, max_rate), med(tls, max_rate));
    let ratio = (rate_p > 0.0).then(|| rate_t / rate_p);
    let p99_cost = med(tls, enc_p99) - med(plain, enc_p99);
    // The same difference taken within each repetition (both sides ran minutes apart), then
    // the median of those.
    let paired =
        |f: fn(&Figures) -> f64| median(plain.iter().zip(tls).map(|(p, t)| f(t) - f(p)).collect());
    json!({
        "throughput_ratio_tls_vs_plain": ratio,
        "max_rate_per_s_plain": rate_p,
        "max_rate_per_s_tls": rate_t,
        "encrypt_latency_us_p50_plain": med(plain, enc_p50),
        "encrypt_latency_us_p50_tls": med(tls, enc_p50),
        "encrypt_latency_us_p99_plain": med(plain, enc_p99),
        "encrypt_latency_us_p99_tls": med(tls, enc_p99),
        "encrypt_latency_us_p999_plain": med(plain, enc_p999),
        "encrypt_latency_us_p999_tls": med(tls, enc_p999),
        "create_latency_us_p50_plain": med(plain, cr_p50),
        "create_latency_us_p50_tls": med(tls, cr_p50),
        "create_latency_us_p99_plain": med(plain, cr_p99),
        "create_latency_us_p99_tls": med(tls, cr_p99),
        "create_latency_us_p999_plain": med(plain, cr_p999),
        "create_latency_us_p999_tls": med(tls, cr_p999),
        "p99_cost_us": p99_cost,
        "p99_cost_us_paired_median": paired(enc_p99),
        "p50_cost_us": med(tls, enc_p50) - med(plain, enc_p50),
        "create_p99_cost_us": med(tls, cr_p99) - med(plain, cr_p99),
        "goals": {
            "throughput_cost_le_15pct": ratio.is_some_and(|r| r >= GOAL_THROUGHPUT_RATIO),
            "p99_cost_le_100us": p99_cost <= GOAL_P99_COST_US,
        },
    })
}

/// One fresh cluster of `security` and its runs.
fn measure(
    args: &Args,
    security: Security,
    rep: usize,
    order: usize,
    bins: &(PathBuf, PathBuf),
) -> Result<Side, String> {
    let dir = args.dir.join(format!("rep{rep}-{}", name(security)));
    let t = Instant::now();
    let (cluster, creds) = start_local_cluster_with(
        &dir,
        &bins.0,
        &bins.1,
        NODES,
        args.shards,
        args.tick_ms,
        security,
    )?;
    let ready_s = t.elapsed().as_secs_f64();
    let target = KeyfortTarget::connect_with(
        &cluster.client_addrs(),
        &creds,
        &KeyfortOptions {
            value_size: args.run.value_size,
            connections: args.run.connections,
        },
        cluster.client_tls()?,
    )?;
    let handshakes = target.handshakes();
    say(format!(
        "rep {rep} {}: {NODES} nodes, {} shards ready in {ready_s:.1} s; {} connections ({} TLS, {} resumed)",
        name(security),
        args.shards,
        handshakes.opened,
        handshakes.tls,
        handshakes.resumed
    ));
    let t = Instant::now();
    target.preload(args.run.preload)?;
    let preload_s = t.elapsed().as_secs_f64();
    let (next_create, started) = (AtomicU64::new(0), AtomicU64::new(0));
    let counted = |only| Counted {
        inner: &target,
        only,
        preloaded: args.run.preload,
        next_create: &next_create,
        started: &started,
    };
    let settle = (args.settle > 0.0).then(|| {
        let mut spec = args.run.spec(
            args.workload,
            Mode::Open {
                rate: args.encrypt_rate,
            },
        );
        spec.duration = std::time::Duration::from_secs_f64(args.settle);
        spec.warmup = std::time::Duration::ZERO;
        run(&counted(Only::Drawn), &spec)
    });
    let only_run = |only: Only, workload: Workload, rate: f64, label: &str, op: &str| {
        let mut r = run(
            &counted(only),
            &args.run.spec(workload, Mode::Open { rate }),
        );
        r.workload = label.to_string();
        r.per_op = [(op.to_string(), r.overall)].into_iter().collect();
        say(format!("rep {rep} {}: {}", name(security), r.line()));
        r
    };
    let create = only_run(
        Only::Create,
        Workload::CreateHeavy,
        args.create_rate,
        "create-only",
        "create",
    );
    let encrypt = only_run(
        Only::Encrypt,
        Workload::UseHeavy,
        args.encrypt_rate,
        "encrypt-only",
        "encrypt",
    );
    let spec = args.run.spec(args.workload, Mode::Open { rate: 0.0 });
    let (max_rate, ladder) =
        max_rate_at_p99(&counted(Only::Drawn), &spec, args.run.p99_ms, &args.rates);
    for r in &ladder {
        say(format!("rep {rep} {}: {}", name(security), r.line()));
    }
    say(format!(
        "rep {rep} {}: highest {} rate at p99 <= {} ms: {max_rate}/s",
        name(security),
        args.workload,
        args.run.p99_ms
    ));
    let closed_connections = target.closed_connections();
    let requests = 2 * args.run.preload + started.load(Ordering::Relaxed);
    drop(target);
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Side {
        security,
        rep,
        order,
        ready_s,
        preload_s,
        settle,
        create,
        encrypt,
        ladder,
        max_rate,
        handshakes,
        requests,
        closed_connections,
    })
}

fn date() -> String {
    std::process::Command::new("date")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() -> Result<(), String> {
    let args: Args = clap::Parser::parse();
    if args.reps == 0 {
        return Err("--reps must be at least 1".into());
    }
    if args.run.preload == 0 {
        return Err("--preload must be at least 1 (encrypt-only uses preloaded keys)".into());
    }
    let bins = binaries_beside_exe()?;
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir).map_err(|e| format!("{}: {e}", args.dir.display()))?;
    let started = Instant::now();
    let date_start = date();
    let mut sides: Vec<Side> = Vec::new();
    for rep in 0..args.reps {
        let order = if rep % 2 == 0 {
            [Security::InsecureLoopback, Security::Tls]
        } else {
            [Security::Tls, Security::InsecureLoopback]
        };
        for (i, &security) in order.iter().enumerate() {
            sides.push(measure(&args, security, rep, i, &bins)?);
        }
    }
    let _ = std::fs::remove_dir_all(&args.dir);

    let of = |s: Security| -> Vec<&Side> { sides.iter().filter(|x| x.security == s).collect() };
    let (plain, tls) = (of(Security::InsecureLoopback), of(Security::Tls));
    let figs = |xs: &[&Side]| xs.iter().map(|s| s.figures()).collect::<Vec<_>>();
    let sum = summary(&figs(&plain), &figs(&tls));

    // Per repetition, then the medians side by side.
    println!(
        "{:<4} {:<6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12} {:>10}",
        "rep",
        "sec",
        "enc p50",
        "enc p99",
        "enc p999",
        "cr p50",
        "cr p99",
        "cr p999",
        "max /s",
        "conns/resum",
        "requests"
    );
    for s in &sides {
        let f = s.figures();
        println!(
            "{:<4} {:<6} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>12} {:>10}",
            s.rep,
            name(s.security),
            us(f.encrypt.p50_ms),
            us(f.encrypt.p99_ms),
            us(f.encrypt.p999_ms),
            us(f.create.p50_ms),
            us(f.create.p99_ms),
            us(f.create.p999_ms),
            f.max_rate,
            format!("{}/{}", s.handshakes.opened, s.handshakes.resumed),
            s.requests
        );
    }
    let g = |k: &str| sum[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "\nmedians over {} reps (µs; rates /s)    {:>10} {:>10} {:>10}",
        args.reps, "plain", "tls", "tls-plain"
    );
    for (label, k) in [
        (
            format!("encrypt p50 at {}/s", args.encrypt_rate),
            "encrypt_latency_us_p50",
        ),
        (
            format!("encrypt p99 at {}/s", args.encrypt_rate),
            "encrypt_latency_us_p99",
        ),
        (
            format!("encrypt p99.9 at {}/s", args.encrypt_rate),
            "encrypt_latency_us_p999",
        ),
        (
            format!("create p50 at {}/s", args.create_rate),
            "create_latency_us_p50",
        ),
        (
            format!("create p99 at {}/s", args.create_rate),
            "create_latency_us_p99",
        ),
        (
            format!("create p99.9 at {}/s", args.create_rate),
            "create_latency_us_p999",
        ),
        (
            format!("{} max rate, p99 <= {} ms", args.workload, args.run.p99_ms),
            "max_rate_per_s",
        ),
    ] {
        let (p, t) = (g(&format!("{k}_plain")), g(&format!("{k}_tls")));
        println!("{label:<38} {p:>10.0} {t:>10.0} {:>10.0}", t - p);
    }
    println!(
        "throughput_ratio_tls_vs_plain {}  (goal >= {GOAL_THROUGHPUT_RATIO}: {})",
        sum["throughput_ratio_tls_vs_plain"], sum["goals"]["throughput_cost_le_15pct"]
    );
    println!(
        "p99_cost_us {:.0} (paired median {:.0})  (goal <= {GOAL_P99_COST_US}: {})",
        g("p99_cost_us"),
        g("p99_cost_us_paired_median"),
        sum["goals"]["p99_cost_le_100us"]
    );
    for s in &tls {
        println!(
            "rep {} tls: {} connections opened, {} resumed, {} full handshakes, {} requests ({:.0} per connection), {} closed at end",
            s.rep,
            s.handshakes.opened,
            s.handshakes.resumed,
            s.handshakes.full(),
            s.requests,
            s.requests as f64 / s.handshakes.opened.max(1) as f64,
            s.closed_connections
        );
    }

    let mut out = json!({
        "benchmark": "tls_bench",
        "machine": machine(),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "date": date_start,
        "reps": args.reps,
        "nodes": NODES,
        "shards": args.shards,
        "tick_ms": args.tick_ms,
        "connections": args.run.connections,
        "value_size": args.run.value_size,
        "preload": args.run.preload,
        "duration_s": args.run.duration,
        "warmup_s": args.run.warmup,
        "settle_s": args.settle,
        "seed": args.run.seed,
        "create_rate_per_s": args.create_rate,
        "encrypt_rate_per_s": args.encrypt_rate,
        "rate_search": { "workload": args.workload.name(), "rates": args.rates, "p99_bound_ms": args.run.p99_ms },
        "goal": { "throughput_ratio_min": GOAL_THROUGHPUT_RATIO, "p99_cost_us_max": GOAL_P99_COST_US },
        "runs": sides.iter().map(Side::to_json).collect::<Vec<_>>(),
        "total_s": started.elapsed().as_secs_f64(),
    });
    if let (Value::Object(o), Value::Object(s)) = (&mut out, sum) {
        o.extend(s);
    }
    write_json(&args.out, &out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    say(format!("wrote {}", args.out.display()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fig(max_rate: f64, enc_p99_ms: f64, cr_p99_ms: f64) -> Figures {
        let p = |p99_ms| Percentiles {
            count: 1,
            p50_ms: p99_ms / 2.0,
            p99_ms,
            ..Percentiles::default()
        };
        Figures {
            max_rate,
            encrypt: p(enc_p99_ms),
            create: p(cr_p99_ms),
        }
    }

    #[test]
    fn summary_takes_medians_ratio_and_goals() {
        let plain = [
            fig(4000.0, 2.0, 5.0),
            fig(3000.0, 2.2, 6.0),
            fig(4000.0, 9.0, 5.5),
        ];
        let tls = [
            fig(3500.0, 2.1, 5.2),
            fig(3500.0, 2.05, 5.9),
            fig(2000.0, 2.3, 9.0),
        ];
        let s = summary(&plain, &tls);
        assert_eq!(s["max_rate_per_s_plain"], 4000.0);
        assert_eq!(s["max_rate_per_s_tls"], 3500.0);
        assert_eq!(s["throughput_ratio_tls_vs_plain"], 0.875);
        assert_eq!(s["encrypt_latency_us_p99_plain"], 2200.0);
        assert_eq!(s["encrypt_latency_us_p99_tls"], 2100.0);
        assert_eq!(s["p99_cost_us"], -100.0);
        // Per repetition: +100, -150, -6700.
        assert_eq!(s["p99_cost_us_paired_median"], -150.0);
        assert_eq!(s["create_latency_us_p99_tls"], 5900.0);
        assert_eq!(s["goals"]["throughput_cost_le_15pct"], true);
        assert_eq!(s["goals"]["p99_cost_le_100us"], true);

        let slow = [fig(2000.0, 2.5, 5.0); 3];
        let s = summary(&plain, &slow);
        assert_eq!(s["throughput_ratio_tls_vs_plain"], 0.5);
        assert_eq!(s["p99_cost_us"], 300.0);
        assert_eq!(s["goals"]["throughput_cost_le_15pct"], false);
        assert_eq!(s["goals"]["p99_cost_le_100us"], false);

        // No plaintext rate passed: no ratio, goal not met.
        let none = [fig(0.0, 2.0, 5.0)];
        let s = summary(&none, &none);
        assert!(s["throughput_ratio_tls_vs_plain"].is_null());
        assert_eq!(s["goals"]["throughput_cost_le_15pct"], false);
    }
}
