//! Rejoin benchmark (the peer tier): a 3-node local cluster of real `keyfortd` processes holds
//! `--keys` real keys (made in node 1's card, proposed through raft by the bulk loader, compacted
//! into snapshots on every node); node 3's data dir is then wiped and the node started again
//! with only its card and its config. It joins as a new member (fresh raft id, learner in every
//! shard, each shard's snapshot streamed from the admitting leader and verified, log catch-up,
//! one joint conf change promoting it and removing its old id). Timed from the start of the
//! process until it has applied, in every shard, the commit index the cluster had at the fault
//! with the same state digest as the leader (`caught_up_s`, the figure the issue names), and
//! until it is a voter of every shard without its old id (`promoted_s`). Repeated `--runs`
//! times (each rejoin retires the id before it); medians reported.
//!
//! `cargo build --release -p keyfort-tools && cargo run --release -p keyfort-bench --bin rejoin_bench -- --out docs/bench/rejoin.json --raft-json docs/bench/raft.json`

use keyfort_bench::local_cluster::LocalCluster;
use keyfort_bench::{machine, median, write_json};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Parser)]
struct Args {
    /// Scratch directory (cards, data dirs) on the disk being measured.
    #[arg(long, default_value = "target/bench-rejoin")]
    dir: PathBuf,
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    #[arg(long, default_value_t = 2)]
    shards: u32,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Records past the snapshot that trigger a compaction (so snapshots exist after loading).
    #[arg(long, default_value_t = 200_000)]
    compaction_records: u64,
    #[arg(long)]
    out: Option<PathBuf>,
    /// raft.json to update with `rejoin_1m_keys_s` (the results file).
    #[arg(long)]
    raft_json: Option<PathBuf>,
}

const TICK_MS: u64 = 100;
const STATUS_MS: u64 = 10;
const LOAD_TIMEOUT: Duration = Duration::from_secs(1800);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(300);
const REJOIN_TIMEOUT: Duration = Duration::from_secs(300);
/// The node wiped and rejoined (index; node 1 loads).
const VICTIM: usize = 2;

fn main() -> Result<(), String> {
    let args: Args = clap::Parser::parse();
    let (keyfort, keyfortd) = keyfort_bench::local_cluster::binaries_beside_exe()?;
    // The nodes log their join phases (admission, each shard's snapshot, promotion).
    std::env::set_var(
        "RUST_LOG",
        "warn,keyfort_tools=info,keyfort_net=info,keyfort_engine=info",
    );
    let _ = std::fs::remove_dir_all(&args.dir);
    let mut c = LocalCluster::create(&args.dir, &keyfort, &keyfortd, 3, args.shards, 0, TICK_MS)?;
    c.configure(|v| {
        v["compaction_records"] = json!(args.compaction_records);
        v["status_ms"] = json!(STATUS_MS);
    })?;
    let loader = &c.nodes[0].config;
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(loader).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    v["bulk_load"] =
        json!({ "keys": args.keys, "partitions": 1000, "in_flight": 1024, "card_threads": 2 });
    std::fs::write(loader, v.to_string()).map_err(|e| e.to_string())?;
    c.start_all()?;
    println!("loading {} keys through raft...", args.keys);
    let report = c.nodes[0].data_dir.join("bulk-load.json");
    let error = c.nodes[0].data_dir.join("bulk-load.error");
    let t = Instant::now();
    while !report.exists() {
        if let Ok(e) = std::fs::read_to_string(&error) {
            return Err(format!("bulk load failed: {e}"));
        }
        if t.elapsed() > LOAD_TIMEOUT || c.exited(0).is_some() {
            return Err("bulk load did not finish".into());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let load: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    println!("loaded: {load}");
    // Quiescent, applied everywhere, and a snapshot of every shard on every node.
    let settled = c.wait_for(SETTLE_TIMEOUT, |c| {
        let st: Vec<_> = (0..3).filter_map(|i| c.status(i)).collect();
        st.len() == 3
            && (0..args.shards as usize).all(|s| {
                st.iter().all(|n| {
                    n[s].applied == st[0][s].applied
                        && n[s].digest == st[0][s].digest
                        && n[s].snapshot > 0
                })
            })
    });
    if !settled {
        return Err("the cluster did not settle after loading".into());
    }
    let mut runs = Vec::new();
    for run in 0..args.runs {
        let old = c.node_id(VICTIM).ok_or("victim has no status")?;
        let target: Vec<(u64, String)> = {
            let l = (0..3).find(|&i| i != VICTIM).expect("a live node");
            c.status(l)
                .ok_or("no status")?
                .iter()
                .map(|s| (s.applied, s.digest.clone()))
                .collect()
        };
        c.wipe(VICTIM)?;
        let t0 = Instant::now();
        c.start(VICTIM)?;
        let mut caught_up = None;
        let mut promoted = None;
        let done = c.wait_for(REJOIN_TIMEOUT, |c| {
            let id = c.node_id(VICTIM);
            let Some(st) = c.status(VICTIM).filter(|_| id.is_some_and(|i| i != old)) else {
                return false;
            };
            let id = id.expect("checked");
            if caught_up.is_none()
                && st
                    .iter()
                    .zip(&target)
                    .all(|(s, (a, d))| s.applied >= *a && (s.applied > *a || s.digest == *d))
            {
                caught_up = Some(t0.elapsed());
            }
            if promoted.is_none()
                && st
                    .iter()
                    .all(|s| s.voters.contains(&id) && !s.voters.contains(&old))
            {
                promoted = Some(t0.elapsed());
            }
            caught_up.is_some() && promoted.is_some()
        });
        if !done {
            return Err(format!(
                "run {run}: node did not rejoin (status {:?})",
                c.status(VICTIM)
            ));
        }
        let (cu, pr) = (
            caught_up.expect("set").as_secs_f64(),
            promoted.expect("set").as_secs_f64(),
        );
        let new_id = c.node_id(VICTIM).unwrap_or(0);
        println!("run {run}: node {old} → node {new_id}: caught up in {cu:.3} s, voter in every shard in {pr:.3} s");
        runs.push(json!({ "old_id": old, "new_id": new_id, "caught_up_s": cu, "promoted_s": pr }));
    }
    let log = std::fs::read_to_string(
        c.nodes[VICTIM]
            .data_dir
            .parent()
            .expect("node dir")
            .join("keyfortd.log"),
    )
    .unwrap_or_default();
    let seeded: Vec<String> = log
        .lines()
        .filter(|l| {
            l.contains("seeded from a peer snapshot") || l.contains("admitted to the cluster")
        })
        .map(strip_ansi)
        .collect();
    c.kill_all();
    let med = |k: &str| {
        median(
            runs.iter()
                .map(|r| r[k].as_f64().unwrap_or(f64::NAN))
                .collect(),
        )
    };
    let caught = med("caught_up_s");
    let result = json!({
        "benchmark": "rejoin",
        "command": format!(
            "cargo build --release -p keyfort-tools && cargo run --release -p keyfort-bench --bin rejoin_bench -- {}",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
        "machine": machine(),
        "setup": {
            "nodes": 3, "shards": args.shards, "keys": args.keys, "tick_ms": TICK_MS,
            "status_ms": STATUS_MS, "compaction_records": args.compaction_records,
            "fault": "kill -9 and rm -rf of node 3's data dir (its card kept)",
            "timed": "from starting the wiped node's process until it has applied, in every shard, the leader's applied index at the fault with the same digest (caught_up_s), and until it is a voter of every shard without its old id (promoted_s)",
        },
        "bulk_load": load,
        "runs": runs,
        "caught_up_s_median": caught,
        "promoted_s_median": med("promoted_s"),
        "rejoin_1m_keys_s": caught,
        "last_run_log": seeded,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&result).map_err(|e| e.to_string())?
    );
    if let Some(out) = &args.out {
        write_json(out, &result).map_err(|e| e.to_string())?;
    }
    if let Some(p) = &args.raft_json {
        if args.keys == 1_000_000 {
            let mut r: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?,
            )
            .map_err(|e| e.to_string())?;
            r["rejoin_1m_keys_s"] = json!(caught);
            r["rejoin_promoted_1m_keys_s"] = result["promoted_s_median"].clone();
            r["rejoin_source"] = json!("docs/bench/rejoin.json (rejoin_bench)");
            if let Some(o) = r.as_object_mut() {
                o.remove("not_measured");
            }
            write_json(p, &r).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// A log line without its terminal colour codes.
fn strip_ansi(l: &str) -> String {
    let mut out = String::with_capacity(l.len());
    let mut esc = false;
    for ch in l.chars() {
        match (esc, ch) {
            (false, '\u{1b}') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}
