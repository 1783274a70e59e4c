//! keyfort and etcd side by side (issue 8), in one run, one system after the other (never both
//! running at once), through the same load generator with the same workload, value size,
//! connections, rates and durations:
//!
//! (a) the highest open-loop rate at p99 ≤ `--p99-ms` (10 ms): a ladder of `--rates`; a rate
//!     that fails (p99 over the bound, under 95 % of the rate achieved, or any error) is run
//!     once more, and climbing stops after a rate that failed both runs
//!     (`loadgen::max_rate_at_p99`, `RUNG_TRIES`);
//! (b) the p99 at `--latency-rate` (1,000/s): the ladder's first run at that rate when it ran,
//!     else a run of its own;
//! (c) restart to first read with `--restore-keys` (1,000,000) keys: keyfort's local tier (a
//!     loaded 3-node cluster, a node SIGKILLed and restarted over its snapshot until it caught
//!     up and answered a read itself; `etcd::keyfort_restart_to_first_read`, the drill's local
//!     tier) against etcd's `etcdctl snapshot restore` of every member plus the cluster's start
//!     until a linearizable read succeeds (`etcd::etcd_restore_to_first_read`).
//!
//! keyfort: a local cluster of 3 `keyfortd` processes (`--shards` shards, one partition each,
//! `KeyfortTarget`); etcd: a 3-member etcd 3.4 cluster (`EtcdCluster`, settings in
//! `keyfort_bench::etcd`) driven by `EtcdTarget`. Prints the runs and a side-by-side table,
//! and writes `--out` (JSON: `machine`, `command`, and `keyfort` and `etcd` objects each with
//! `throughput_per_s_at_p99_10ms`, `latency_ms_p99_at_1000_per_s`, `restore_1m_keys_s` and
//! their runs).
//!
//! ```sh
//! cargo build --release --locked -p keyfort-tools -p keyfort-bench
//! ./target/release/vs_etcd                       # the full comparison (1M-key restores)
//! ./target/release/vs_etcd --quick --restore-keys 20000 --out target/vs_etcd.json
//! ```

use keyfort_bench::etcd::{
    etcd_installed, etcd_restore_disk_estimate, etcd_restore_to_first_read, free_disk_bytes,
    keyfort_restart_to_first_read, EtcdCluster, EtcdTarget,
};
use keyfort_bench::keyfort_target::{start_local_cluster, KeyfortOptions, KeyfortTarget};
use keyfort_bench::loadgen::{max_rate_at_p99, run, table, Mode, RunOptions, RunResult, RunSpec};
use keyfort_bench::local_cluster::binaries_beside_exe;
use keyfort_bench::target::Target;
use keyfort_bench::workload::Workload;
use keyfort_bench::{machine, write_json};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Parser, Debug)]
struct Args {
    /// create-heavy, use-heavy or churn.
    #[arg(long, default_value = "use-heavy")]
    workload: Workload,
    /// Each system's runs (connections and value size alike for both; (a)'s p99 bound).
    #[command(flatten)]
    run: RunOptions,
    /// The rate ladder of (a), offered operations per second, climbed in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "250,500,1000,2000,4000,8000,16000"
    )]
    rates: Vec<f64>,
    /// The rate of (b), per second.
    #[arg(long, default_value_t = 1000.0)]
    latency_rate: f64,
    /// Keys of (c); 0 skips it.
    #[arg(long, default_value_t = 1_000_000)]
    restore_keys: u64,
    /// Bytes of each etcd value in (c). The default is what keyfort stores per key: a masked
    /// key record is about 240 B (a 1,000,000-key snapshot is 240 MB), so both systems restore
    /// about the same bytes. (4 KiB values would need ~35 GB of disk for etcd's restore.)
    #[arg(long, default_value_t = RESTORE_VALUE_SIZE)]
    restore_value_size: usize,
    /// Shards of the keyfort cluster (one partition each).
    #[arg(long, default_value_t = 2)]
    shards: u32,
    /// Threads of the etcd client's tokio runtime.
    #[arg(long, default_value_t = 2)]
    etcd_workers: usize,
    /// Small figures: 2 s runs after 0.5 s warm-up, 1,000 keys preloaded, rates up to 2,000/s,
    /// 20,000 restore keys (each unless given).
    #[arg(long)]
    quick: bool,
    /// Scratch directory (clusters, data dirs; removed first and after).
    #[arg(long, default_value = "target/vs-etcd")]
    dir: PathBuf,
    /// Writes the results here as JSON.
    #[arg(long, default_value = "docs/bench/vs_etcd.json")]
    out: PathBuf,
}

/// Bytes of an etcd value in the restore comparison (c): about what keyfort stores per key.
const RESTORE_VALUE_SIZE: usize = 256;

/// keyfort's raft tick in the comparison (keyfortd's default).
const TICK_MS: u64 = 25;
const NODES: u64 = 3;
/// The issue's goals: keyfort's throughput at the p99 bound ≥ this × etcd's ...
const GOAL_THROUGHPUT_X: f64 = 1.5;
/// ... and its restart to first read ≥ this × faster.
const GOAL_RESTORE_X: f64 = 5.0;

fn say(msg: impl AsRef<str>) {
    eprintln!("vs_etcd: {}", msg.as_ref());
}

/// What one system measured in (a) and (b).
struct Side {
    preload_s: f64,
    best: f64,
    ladder: Vec<RunResult>,
    latency: RunResult,
    latency_from_ladder: bool,
}

/// (a) and (b) against `target`, preloaded first.
fn measure(target: &dyn Target, args: &Args, spec: &RunSpec) -> Result<Side, String> {
    let t = Instant::now();
    target.preload(args.run.preload)?;
    let preload_s = t.elapsed().as_secs_f64();
    say(format!(
        "{}: preloaded {} keys in {preload_s:.1} s; rate ladder {:?}/s, p99 <= {} ms",
        target.name(),
        args.run.preload,
        args.rates,
        args.run.p99_ms
    ));
    let (best, ladder) = max_rate_at_p99(target, spec, args.run.p99_ms, &args.rates);
    for r in &ladder {
        say(r.line());
    }
    let at = |r: &&RunResult| (r.offered_per_s - args.latency_rate).abs() < 0.5;
    let (latency, latency_from_ladder) = match ladder.iter().find(at) {
        Some(r) => (r.clone(), true),
        None => {
            let r = run(
                target,
                &RunSpec {
                    mode: Mode::Open {
                        rate: args.latency_rate,
                    },
                    ..spec.clone()
                },
            );
            say(r.line());
            (r, false)
        }
    };
    say(format!(
        "{}: highest rate at p99 <= {} ms: {best}/s; p99 at {}/s: {:.3} ms",
        target.name(),
        args.run.p99_ms,
        args.latency_rate,
        latency.overall.p99_ms
    ));
    Ok(Side {
        preload_s,
        best,
        ladder,
        latency,
        latency_from_ladder,
    })
}

fn keyfort_side(
    args: &Args,
    spec: &RunSpec,
    keyfort: &Path,
    keyfortd: &Path,
) -> Result<Side, String> {
    let t = Instant::now();
    let (cluster, creds) = start_local_cluster(
        &args.dir.join("keyfort"),
        keyfort,
        keyfortd,
        NODES,
        args.shards,
        TICK_MS,
    )?;
    say(format!(
        "keyfort: {NODES} keyfortd processes, {} shards, ready in {:.1} s",
        args.shards,
        t.elapsed().as_secs_f64()
    ));
    let target = KeyfortTarget::connect(
        &cluster.client_addrs(),
        &creds,
        &KeyfortOptions {
            value_size: args.run.value_size,
            connections: args.run.connections,
        },
    )?;
    let side = measure(&target, args, spec);
    drop(target);
    drop(cluster); // every node stopped before etcd starts
    side
}

fn etcd_side(args: &Args, spec: &RunSpec) -> Result<Side, String> {
    let t = Instant::now();
    let mut cluster = EtcdCluster::start(&args.dir.join("etcd"))?;
    say(format!(
        "etcd: 3 members ready in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    let target = EtcdTarget::connect(
        &cluster.endpoints(),
        args.run.connections,
        args.run.value_size,
        args.etcd_workers,
    )?;
    let side = measure(&target, args, spec);
    drop(target);
    cluster.stop();
    side
}

fn side_json(side: &Side, restore: &Value, restore_s: Option<f64>, p99_ms: f64) -> Value {
    json!({
        "throughput_per_s_at_p99_10ms": side.best,
        "latency_ms_p99_at_1000_per_s": side.latency.overall.p99_ms,
        "restore_1m_keys_s": restore_s,
        "p99_bound_ms": p99_ms,
        "preload_s": side.preload_s,
        "rate_ladder": side.ladder.iter().map(RunResult::to_json).collect::<Vec<_>>(),
        "latency_run": side.latency.to_json(),
        "latency_run_from_ladder": side.latency_from_ladder,
        "restore": restore,
    })
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite() && b.is_finite()).then(|| a / b)
}

fn main() -> Result<(), String> {
    let mut args: Args = clap::Parser::parse();
    if args.quick {
        let given =
            |name: &str| std::env::args().any(|a| a == name || a.starts_with(&format!("{name}=")));
        if !given("--duration") {
            args.run.duration = 2.0;
        }
        if !given("--warmup") {
            args.run.warmup = 0.5;
        }
        if !given("--preload") {
            args.run.preload = 1000;
        }
        if !given("--rates") {
            args.rates = vec![250.0, 500.0, 1000.0, 2000.0];
        }
        if !given("--restore-keys") {
            args.restore_keys = 20_000;
        }
    }
    if !etcd_installed() {
        return Err(
            "etcd not installed: run scripts/vs-etcd.sh (apt-get install etcd-server etcd-client)"
                .into(),
        );
    }
    let (keyfort, keyfortd) = binaries_beside_exe()?;
    let restore_value_size = args.restore_value_size;
    let need = etcd_restore_disk_estimate(args.restore_keys, restore_value_size);
    match free_disk_bytes(&args.dir) {
        Some(free) if args.restore_keys > 0 && free < need => {
            return Err(format!(
                "etcd's restore of {} keys of {restore_value_size} B needs about {:.1} GB of \
                 disk under {} and {:.1} GB are free: use a bigger disk, fewer --restore-keys or \
                 a smaller --restore-value-size",
                args.restore_keys,
                need as f64 / 1e9,
                args.dir.display(),
                free as f64 / 1e9
            ))
        }
        _ => {}
    }
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir).map_err(|e| format!("{}: {e}", args.dir.display()))?;
    let started = Instant::now();
    let spec = args.run.spec(
        args.workload,
        Mode::Open {
            rate: args.latency_rate,
        },
    );

    let kf = keyfort_side(&args, &spec, &keyfort, &keyfortd)?;
    let et = etcd_side(&args, &spec)?;

    let (kf_restore, et_restore) = if args.restore_keys == 0 {
        (None, None)
    } else {
        say(format!(
            "keyfort: restart to first read, {} keys (bulk load, snapshots, kill -9, restart)",
            args.restore_keys
        ));
        let dir = args.dir.join("keyfort-restart");
        let k = keyfort_restart_to_first_read(&dir, &keyfort, &keyfortd, args.restore_keys)?;
        let _ = std::fs::remove_dir_all(&dir);
        say(format!("keyfort: {k:?}"));
        say(format!(
            "etcd: restore to first read, {} keys of {restore_value_size} B (load, snapshot save, \
             snapshot restore x3, start)",
            args.restore_keys
        ));
        let dir = args.dir.join("etcd-restore");
        let e = etcd_restore_to_first_read(&dir, args.restore_keys, restore_value_size)?;
        let _ = std::fs::remove_dir_all(&dir);
        say(format!("etcd: {e:?}"));
        (Some(k), Some(e))
    };
    let _ = std::fs::remove_dir_all(&args.dir);

    let mut runs: Vec<RunResult> = kf.ladder.clone();
    if !kf.latency_from_ladder {
        runs.push(kf.latency.clone());
    }
    runs.extend(et.ladder.iter().cloned());
    if !et.latency_from_ladder {
        runs.push(et.latency.clone());
    }
    print!("{}", table(&runs));
    let (kf_rs, et_rs) = (
        kf_restore.as_ref().map(|r| r.total_s),
        et_restore.as_ref().map(|r| r.total_s),
    );
    let fmt = |x: Option<f64>, d: usize| x.map_or("—".to_string(), |x| format!("{x:.d$}"));
    let rows = [
        (
            format!(
                "{} rate at p99 <= {} ms (/s)",
                args.workload, args.run.p99_ms
            ),
            Some(kf.best),
            Some(et.best),
            ratio(kf.best, et.best),
            0,
        ),
        (
            format!("{} p99 at {}/s (ms)", args.workload, args.latency_rate),
            Some(kf.latency.overall.p99_ms),
            Some(et.latency.overall.p99_ms),
            ratio(et.latency.overall.p99_ms, kf.latency.overall.p99_ms),
            3,
        ),
        (
            format!("restart to first read, {} keys (s)", args.restore_keys),
            kf_rs,
            et_rs,
            et_rs.zip(kf_rs).and_then(|(e, k)| ratio(e, k)),
            3,
        ),
    ];
    println!(
        "{:<44} {:>12} {:>12} {:>16}",
        "", "keyfort", "etcd", "keyfort better by"
    );
    for (name, k, e, x, d) in &rows {
        println!(
            "{name:<44} {:>12} {:>12} {:>16}",
            fmt(*k, *d),
            fmt(*e, *d),
            x.map_or("—".to_string(), |x| format!("{x:.2}x"))
        );
    }

    let out = json!({
        "benchmark": "vs_etcd",
        "machine": machine(),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "etcd_version": etcd_version(),
        "workload": args.workload.name(),
        "value_size": args.run.value_size,
        "connections": args.run.connections,
        "duration_s": args.run.duration,
        "warmup_s": args.run.warmup,
        "preload": args.run.preload,
        "rates": args.rates,
        "p99_bound_ms": args.run.p99_ms,
        "latency_rate_per_s": args.latency_rate,
        "restore_keys": args.restore_keys,
        "restore_value_size": restore_value_size,
        "keyfort": side_json(&kf, &json!(kf_restore), kf_rs, args.run.p99_ms),
        "etcd": side_json(&et, &json!(et_restore), et_rs, args.run.p99_ms),
        "goals": {
            "throughput_ge_1_5x_etcd": ratio(kf.best, et.best).map(|x| x >= GOAL_THROUGHPUT_X),
            "lower_p99_at_1000_per_s": kf.latency.overall.p99_ms < et.latency.overall.p99_ms,
            "restore_ge_5x_faster": et_rs.zip(kf_rs).and_then(|(e, k)| ratio(e, k)).map(|x| x >= GOAL_RESTORE_X),
        },
        "total_s": started.elapsed().as_secs_f64(),
    });
    write_json(&args.out, &out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    say(format!("wrote {}", args.out.display()));
    Ok(())
}

/// `etcd --version`'s first line.
fn etcd_version() -> String {
    std::process::Command::new(keyfort_bench::etcd::ETCD_BIN)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default()
}
