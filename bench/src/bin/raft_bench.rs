//! Raft benchmark: commit latency (propose → applied on the leader) of 128 B entries across a
//! 3-node local cluster of real `keyfortd` processes (each with its SoftHSM card, its WBL and the
//! authenticated peer transport on 127.0.0.1), with 1, 16 and 256 proposals kept in flight by
//! the leader's synthetic load. Every level runs `--runs` times on freshly started processes;
//! medians are reported. Beside it, in the same run, the disk's durable write latency (the floor
//! of a commit: leader and a follower each fdatasync once).
//!
//! `cargo build --release -p keyfort-tools && cargo run --release -p keyfort-bench --bin raft_bench -- --out docs/bench/raft.json`
//! (`stream_gb_per_s` is copied from `docs/bench/stream.json`: run `stream_bench` first).

use keyfort_bench::local_cluster::LocalCluster;
use keyfort_bench::{disk, machine, median, write_json, LatencySummary};
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Parser)]
struct Args {
    /// Scratch directory (cards, data dirs) on the disk being measured.
    #[arg(long, default_value = "target/bench-raft")]
    dir: PathBuf,
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Measured seconds per run (after a warm-up of `--warmup`).
    #[arg(long, default_value_t = 8.0)]
    seconds: f64,
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
}

const IN_FLIGHT: [usize; 3] = [1, 16, 256];
const TICK_MS: u64 = 100;
/// Where stream_bench writes its results.
const STREAM_JSON: &str = "docs/bench/stream.json";

fn main() -> Result<(), String> {
    let args: Args = clap::Parser::parse();
    let (keyfort, keyfortd) = keyfort_bench::local_cluster::binaries_beside_exe()?;
    let _ = std::fs::remove_dir_all(&args.dir);
    let mut c = LocalCluster::create(&args.dir, &keyfort, &keyfortd, 3, 1, 0, TICK_MS)?;
    std::fs::create_dir_all(args.dir.join("disk-probe")).map_err(|e| e.to_string())?;
    let floor =
        disk::raw_write_fdatasync(&args.dir.join("disk-probe"), 2000).map_err(|e| e.to_string())?;
    let mut levels = Vec::new();
    for n in IN_FLIGHT {
        let mut runs: Vec<(LatencySummary, f64)> = Vec::new();
        for run in 0..args.runs {
            c.configure(|v| {
                v["synthetic_in_flight"] = json!(n);
                v["synthetic_warmup_ms"] = json!((args.warmup * 1e3) as u64);
            })?;
            c.start_all()?;
            let until =
                std::time::Instant::now() + Duration::from_secs_f64(args.warmup + args.seconds);
            let mut leader = None;
            c.wait_for(Duration::from_secs(60), |c| {
                leader = c.leader(0);
                std::time::Instant::now() >= until && leader.is_some()
            });
            let l = leader.ok_or("no leader")?;
            let lat = c
                .synthetic_latency(l)
                .ok_or("no latency in the leader's status")?;
            let per_s = lat.count as f64 / args.seconds;
            println!(
                "in flight {n:>3} run {run}: {:>7} commits ({per_s:>8.0}/s) p50 {:>8.1} µs p99 {:>8.1} µs p99.9 {:>8.1} µs",
                lat.count, lat.p50_us, lat.p99_us, lat.p999_us
            );
            runs.push((lat, per_s));
            c.kill_all();
        }
        let med = |f: &dyn Fn(&(LatencySummary, f64)) -> f64| median(runs.iter().map(f).collect());
        levels.push(json!({
            "in_flight": n,
            "commits_per_s": med(&|r| r.1),
            "p50_us": med(&|r| r.0.p50_us),
            "p99_us": med(&|r| r.0.p99_us),
            "p999_us": med(&|r| r.0.p999_us),
            "runs": runs.iter().map(|r| json!({"summary": r.0, "commits_per_s": r.1})).collect::<Vec<_>>(),
        }));
    }
    let p = |i: usize, k: &str| levels[i][k].clone();
    // The stream figure is stream_bench's (run it first); copied so raft.json has the keys.
    let stream: serde_json::Value = std::fs::read_to_string(STREAM_JSON)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(json!({ "stream_gb_per_s": null }));
    let result = json!({
        "benchmark": "raft",
        "command": "cargo build --release -p keyfort-tools && cargo run --release -p keyfort-bench --bin raft_bench -- --out docs/bench/raft.json",
        "machine": machine(),
        "setup": {
            "nodes": 3, "shards": 1, "entry_bytes": 128, "tick_ms": TICK_MS,
            "processes": "3 keyfortd on 127.0.0.1, one SoftHSM card each, peer transport with card-HMAC handshake",
            "latency": "propose → applied on the leader (quorum persisted with O_DSYNC direct writes)",
            "runs": args.runs, "seconds": args.seconds, "warmup_s": args.warmup,
        },
        "disk_raw_write_fdatasync_4k": floor,
        "levels": levels,
        "commit_latency_us_p50_1_in_flight": p(0, "p50_us"),
        "commit_latency_us_p99_1_in_flight": p(0, "p99_us"),
        "commit_latency_us_p50_16_in_flight": p(1, "p50_us"),
        "commit_latency_us_p99_16_in_flight": p(1, "p99_us"),
        "commit_latency_us_p50_256_in_flight": p(2, "p50_us"),
        "commit_latency_us_p99_256_in_flight": p(2, "p99_us"),
        "commits_per_s_256_in_flight": p(2, "commits_per_s"),
        "stream_gb_per_s": stream["stream_gb_per_s"],
        "stream_source": "docs/bench/stream.json (stream_bench: 1 GiB snapshot file between two nodes, durable at the receiver; its disk's sequential read beside it)",
        "rejoin_1m_keys_s": null,
        "not_measured": "rejoin of a wiped node as a new member: joining (ConfChangeV2 replacement) is not built yet (issue 5 closing note)",
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&result).map_err(|e| e.to_string())?
    );
    if let Some(out) = args.out {
        write_json(&out, &result).map_err(|e| e.to_string())?;
    }
    Ok(())
}
