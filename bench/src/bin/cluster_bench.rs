//! Cluster benchmark (the client tier): a local cluster of real `keyfortd` processes (3 nodes,
//! a SoftHSM card each) driven over the client protocol by the open-loop load generator
//! (`keyfort_bench::loadgen`).
//!
//! Measured, per run (a fresh cluster each):
//! * key create latency one at a time (closed loop) to the leader of the partition's shard;
//! * key create latency at offered 1,000, 5,000 and 10,000 creates/s (open loop, random
//!   idempotency ids, spread over partitions of every shard, each sent to its shard's leader);
//! * the highest offered create rate achieved at ≥ 95 % with p99 ≤ 10 ms (stepped, then
//!   bisected);
//! * encrypt of 4 KiB at offered 20,000/s over a few keys;
//! * the client-visible write gap when each shard's leader is SIGKILLed under a steady create
//!   load through the `Client` (which retries and re-routes), with the run's tick (default 25 ms,
//!   keyfortd's) and, for comparison, with another tick (default 100 ms) on a second cluster.
//!
//! `cargo build --release -p keyfort-tools -p keyfort-bench && ./target/release/cluster_bench --out docs/bench/cluster.json`

use keyfort_bench::loadgen::{error_name, run_closed_loop, run_open_loop, LoadResult, OpenLoop};
use keyfort_bench::local_cluster::{binaries_beside_exe, LocalCluster};
use keyfort_bench::{machine, median, utc_date, write_json, LatencySummary};
use keyfort_hsm::PartitionId;
use keyfort_net::client::{Client, ClientOptions, Connection, Credential};
use keyfort_net::client_proto::{Request, Response};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Parser)]
struct Args {
    /// Scratch directory (cards, data dirs).
    #[arg(long, default_value = "target/bench-cluster")]
    dir: PathBuf,
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    #[arg(long, default_value_t = 2)]
    shards: u32,
    /// Raft tick of the main cluster (elections after 10–20 ticks).
    #[arg(long, default_value_t = 25)]
    tick_ms: u64,
    /// Raft tick of a second cluster the failover is also measured on, for comparison (0:
    /// skip it). Default 100 ms: keyfortd's default tick before it became 25 ms.
    #[arg(long, default_value_t = 100)]
    other_tick_ms: u64,
    /// Partitions per shard the load is spread over.
    #[arg(long, default_value_t = 2)]
    partitions_per_shard: usize,
    /// Creates of the sequential (closed-loop) measurement.
    #[arg(long, default_value_t = 2000)]
    sequential: u64,
    /// Offered create rates measured in full.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
    rates: Vec<f64>,
    /// Measured seconds of each full rate (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    #[arg(long, default_value_t = 2.0)]
    warmup_s: f64,
    /// Steps of the search for the highest rate at p99 ≤ 10 ms.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,2000,3000,5000,7000,10000,15000"
    )]
    search_steps: Vec<f64>,
    /// Bisection probes after the steps.
    #[arg(long, default_value_t = 3)]
    bisect_probes: usize,
    /// Measured seconds of a search probe.
    #[arg(long, default_value_t = 5.0)]
    probe_s: f64,
    #[arg(long, default_value_t = 20_000.0)]
    encrypt_rate: f64,
    #[arg(long, default_value_t = 4096)]
    encrypt_bytes: usize,
    /// Keys per partition the encrypts go over.
    #[arg(long, default_value_t = 4)]
    encrypt_keys: usize,
    /// Creates/s per shard during the failover measurement.
    #[arg(long, default_value_t = 500.0)]
    failover_rate_per_shard: f64,
    /// Skip the failover measurement.
    #[arg(long)]
    no_failover: bool,
    /// Skip the rate search.
    #[arg(long)]
    no_search: bool,
    /// `perf record -g` on the leader of shard 0 during the full run at this offered rate
    /// (0: none); the report's top goes to `<dir>/perf-<rate>.txt` and the JSON.
    #[arg(long, default_value_t = 10_000.0)]
    perf_at: f64,
    /// Runs (a fresh cluster each); headline figures are medians over them.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    #[arg(long)]
    out: Option<PathBuf>,
}

/// p99 bound and achieved fraction of the rate search.
const SEARCH_P99_MS: f64 = 10.0;
const SEARCH_ACHIEVED_FRACTION: f64 = 0.95;
const LEADER_WAIT: Duration = Duration::from_secs(60);
const STATUS_MS: u64 = 50;
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Per-connection in-flight bound of the load's connections (the server's is 1024).
const CONN_MAX_IN_FLIGHT: usize = 4096;
/// Seconds of steady load before the first kill, after each kill before restarting the node,
/// and after the restart before the next kill.
const FAILOVER_BEFORE: Duration = Duration::from_secs(3);
const FAILOVER_DOWN: Duration = Duration::from_secs(4);
const FAILOVER_AFTER: Duration = Duration::from_secs(4);
/// Worker threads per shard of the failover load (blocking `Client` calls).
const FAILOVER_WORKERS: usize = 48;

/// A partition the load uses: its shard, credential and one connection per node.
struct Part {
    shard: u32,
    cred: Credential,
    conns: Vec<Arc<Connection>>,
}

struct Setup {
    c: LocalCluster,
    parts: Vec<Part>,
}

fn opts() -> ClientOptions {
    ClientOptions {
        request_timeout: CALL_TIMEOUT,
        max_in_flight: CONN_MAX_IN_FLIGHT,
        ..ClientOptions::default()
    }
}

fn start_cluster(
    args: &Args,
    dir: &Path,
    tick_ms: u64,
    parts_per_shard: usize,
) -> Result<Setup, String> {
    let (keyfort, keyfortd) = binaries_beside_exe()?;
    let _ = std::fs::remove_dir_all(dir);
    let mut c = LocalCluster::create(
        dir,
        &keyfort,
        &keyfortd,
        args.nodes,
        args.shards,
        0,
        tick_ms,
    )?;
    c.configure(|v| v["status_ms"] = json!(STATUS_MS))?;
    c.start_all()?;
    let shards = args.shards;
    if !c.wait_for(LEADER_WAIT, |c| (0..shards).all(|s| c.leader(s).is_some())) {
        return Err("no leader in every shard".into());
    }
    let admin = Credential::read_file(&c.admin_credential(&keyfort)?).map_err(|e| e.to_string())?;
    let admin = Client::connect(c.client_addrs(), admin, opts()).map_err(|e| e.to_string())?;
    let mut parts = Vec::new();
    for shard in 0..shards {
        for _ in 0..parts_per_shard {
            let id = loop {
                let p: [u8; 16] = rand::random();
                if keyfort_engine::cluster::shard_of(&PartitionId(p), shards) == shard {
                    break p;
                }
            };
            let (_, cred) = admin.create_partition(id).map_err(|e| e.to_string())?;
            let conns = c
                .client_addrs()
                .into_iter()
                .map(|a| Connection::open(a, &cred, &opts()).map(Arc::new))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            parts.push(Part { shard, cred, conns });
        }
    }
    Ok(Setup { c, parts })
}

/// Node index → node id is index + 1 in a fresh local cluster; the leaders by shard as the
/// answering node knows them (a `Route` call), as node indices.
fn leaders(s: &Setup) -> Result<Vec<usize>, String> {
    let r = s.parts[0].conns[0]
        .call(&Request::Route, CALL_TIMEOUT)
        .map_err(|e| e.to_string())?;
    match r {
        Response::Route { leaders, .. } => leaders
            .iter()
            .map(|&l| {
                s.parts[0]
                    .conns
                    .iter()
                    .position(|c| c.node_id() == l)
                    .ok_or_else(|| format!("leader {l} unknown"))
            })
            .collect(),
        other => Err(format!("unexpected route answer {other:?}")),
    }
}

/// Each partition's connection to its shard's leader.
fn leader_conns(s: &Setup) -> Result<Vec<Arc<Connection>>, String> {
    let l = leaders(s)?;
    Ok(s.parts
        .iter()
        .map(|p| p.conns[l[p.shard as usize]].clone())
        .collect())
}

fn create_req(_: u64) -> Request {
    Request::KeyCreate {
        idempotency_id: rand::random(),
        flags: 0,
        metadata: Vec::new(),
    }
}

fn is_written(r: &Response) -> bool {
    matches!(r, Response::KeyWritten(_))
}

fn ms(l: &LatencySummary) -> Value {
    json!({
        "count": l.count, "p50_ms": l.p50_us / 1e3, "p99_ms": l.p99_us / 1e3,
        "p999_ms": l.p999_us / 1e3, "max_ms": l.max_us / 1e3,
    })
}

fn open_loop_creates(
    s: &Setup,
    rate: f64,
    duration: f64,
    warmup: f64,
) -> Result<(LoadResult, Vec<f64>), String> {
    let conns = leader_conns(s)?;
    let cfg = OpenLoop::new(
        rate,
        Duration::from_secs_f64(duration),
        Duration::from_secs_f64(warmup),
    );
    let (c0, t) = (cpu_all(&s.c), Instant::now());
    let r = run_open_loop(&conns, &cfg, create_req, is_written);
    let secs = t.elapsed().as_secs_f64();
    let cores: Vec<f64> = cpu_all(&s.c)
        .iter()
        .zip(&c0)
        .map(|(b, a)| ((b - a) / secs * 100.0).round() / 100.0)
        .collect();
    // Let any backlog drain before the next measurement.
    std::thread::sleep(Duration::from_millis(500));
    Ok((r, cores))
}

fn passes(r: &LoadResult) -> bool {
    r.achieved_per_s >= SEARCH_ACHIEVED_FRACTION * r.offered_per_s
        && r.p99_ms <= SEARCH_P99_MS
        && r.error_count() == 0
}

/// CPU seconds (user + system) process `pid` has used (`/proc/<pid>/stat`).
fn cpu_s(pid: u32) -> f64 {
    let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = st.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}

/// CPU seconds of every node and of this process, in that order.
fn cpu_all(c: &LocalCluster) -> Vec<f64> {
    let mut v: Vec<f64> = c
        .nodes
        .iter()
        .map(|n| n.child.as_ref().map_or(0.0, |ch| cpu_s(ch.id())))
        .collect();
    v.push(cpu_s(std::process::id()));
    v
}

/// `perf record -g` of `pid` for `secs`, then the top of `perf report --no-children`.
fn perf_profile(pid: u32, secs: f64, dir: &Path, tag: &str) -> Option<String> {
    let data = dir.join(format!("perf-{tag}.data"));
    let st = std::process::Command::new("perf")
        .args(["record", "--call-graph", "dwarf,16384", "-F", "400", "-o"])
        .arg(&data)
        .args(["-p", &pid.to_string(), "--", "sleep", &format!("{secs}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .ok()?;
    if !st.success() {
        return None;
    }
    let out = std::process::Command::new("perf")
        .args(["report", "--no-children", "--stdio", "-i"])
        .arg(&data)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let _ = std::fs::write(dir.join(format!("perf-{tag}.txt")), &text);
    Some(text)
}

/// The flat top of a perf report: each symbol's self share, the first `n`.
fn perf_top(report: &str, n: usize) -> Vec<String> {
    report
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            t.chars().next().is_some_and(|c| c.is_ascii_digit()) && t.contains('%')
        })
        .take(n)
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// One failover measurement: steady create load through a `Client` per shard, the leader of
/// each shard SIGKILLed in turn (restarted after), the longest interval between consecutive
/// successful creates of each shard around each kill.
fn failover(args: &Args, s: &mut Setup, tick_ms: u64) -> Result<Value, String> {
    let shards = args.shards as usize;
    // One partition per shard.
    let mut per_shard: Vec<&Part> = Vec::new();
    for sh in 0..args.shards {
        per_shard.push(
            s.parts
                .iter()
                .find(|p| p.shard == sh)
                .ok_or("a shard without a partition")?,
        );
    }
    let clients: Vec<Client> = per_shard
        .iter()
        .map(|p| Client::connect(s.c.client_addrs(), p.cred.clone(), opts()))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let stop = AtomicBool::new(false);
    let completions: Vec<Mutex<Vec<Instant>>> = (0..shards).map(|_| Mutex::default()).collect();
    let errors: Mutex<BTreeMap<String, u64>> = Mutex::default();
    let next: Vec<AtomicU64> = (0..shards).map(|_| AtomicU64::new(0)).collect();
    let interval = Duration::from_secs_f64(1.0 / args.failover_rate_per_shard);
    let t0 = Instant::now() + Duration::from_millis(50);
    let mut events = Vec::new();
    std::thread::scope(|sc| -> Result<(), String> {
        for sh in 0..shards {
            for _ in 0..FAILOVER_WORKERS {
                let (client, stop, done, errors, next) =
                    (&clients[sh], &stop, &completions[sh], &errors, &next[sh]);
                sc.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let at = t0 + interval.mul_f64(i as f64);
                        let now = Instant::now();
                        if at > now {
                            std::thread::sleep(at - now);
                        }
                        match client.create_key(b"", false) {
                            Ok(_) => done.lock().expect("lock").push(Instant::now()),
                            Err(e) => {
                                *errors
                                    .lock()
                                    .expect("lock")
                                    .entry(error_name(&e))
                                    .or_default() += 1
                            }
                        }
                    }
                });
            }
        }
        let run = (|| -> Result<(), String> {
            std::thread::sleep(FAILOVER_BEFORE);
            for sh in 0..args.shards {
                let victim =
                    s.c.leader(sh)
                        .ok_or_else(|| format!("shard {sh} has no leader"))?;
                let kill_at = Instant::now();
                s.c.kill9(victim);
                let mut elected = None;
                s.c.wait_for(Duration::from_secs(30), |c| {
                    let l = c.leader(sh);
                    if l.is_some_and(|l| l != victim) {
                        elected.get_or_insert(kill_at.elapsed());
                        true
                    } else {
                        false
                    }
                });
                let down_left = FAILOVER_DOWN.saturating_sub(kill_at.elapsed());
                std::thread::sleep(down_left);
                s.c.start(victim)?;
                events.push((sh, victim, kill_at, elected));
                println!(
                    "  tick {tick_ms} ms: killed node {} (leader of shard {sh}); a new leader in status after {}",
                    victim + 1,
                    elected.map_or("-".into(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3))
                );
                std::thread::sleep(FAILOVER_AFTER);
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        run
    })?;
    let end = Instant::now();
    let mut kills = Vec::new();
    let mut worst: f64 = 0.0;
    let mut by_shard = vec![0.0f64; shards];
    let done: Vec<Vec<Instant>> = completions
        .into_iter()
        .map(|m| {
            let mut v = m.into_inner().expect("lock");
            v.sort();
            v
        })
        .collect();
    // Longest interval between consecutive completions of shard `x` that ends after `from`
    // and starts before `to`: (its length in ms, its start relative to `from` in ms).
    let gap = |x: usize, from: Instant, to: Instant| -> (f64, f64) {
        done[x]
            .windows(2)
            .filter(|w| w[1] > from && w[0] < to)
            .map(|w| {
                let rel = if w[0] >= from {
                    (w[0] - from).as_secs_f64()
                } else {
                    -(from - w[0]).as_secs_f64()
                };
                ((w[1] - w[0]).as_secs_f64() * 1e3, rel * 1e3)
            })
            .fold((0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a })
    };
    // Before the first kill: gaps wholly inside the steady period.
    let first_kill = events.first().map_or(end, |e| e.2);
    let baseline: Vec<f64> = (0..shards)
        .map(|x| {
            done[x]
                .windows(2)
                .filter(|w| w[0] > t0 + Duration::from_millis(500) && w[1] < first_kill)
                .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)
                .fold(0.0, f64::max)
        })
        .collect();
    for (sh, victim, kill_at, elected) in &events {
        // From the kill until halfway between the restart and the next kill.
        let to = *kill_at + FAILOVER_DOWN + FAILOVER_AFTER / 2;
        let gaps: Vec<(f64, f64)> = (0..shards).map(|x| gap(x, *kill_at, to)).collect();
        let (g, start) = gaps[*sh as usize];
        worst = worst.max(g);
        for (x, gx) in gaps.iter().enumerate() {
            by_shard[x] = by_shard[x].max(gx.0);
        }
        let lens: Vec<f64> = gaps.iter().map(|g| (g.0 * 10.0).round() / 10.0).collect();
        println!(
            "  tick {tick_ms} ms: kill of node {} (shard {sh} leader): write gap {g:.0} ms on shard {sh} (from {start:.0} ms after the kill); every shard {lens:?} ms",
            victim + 1
        );
        kills.push(json!({
            "shard": sh, "node_killed": victim + 1,
            "new_leader_in_status_ms": elected.map(|d| d.as_secs_f64() * 1e3),
            "gap_ms": g,
            "gap_starts_ms_after_kill": start,
            "gap_ms_by_shard": lens,
        }));
    }
    let created: Vec<usize> = done.iter().map(Vec::len).collect();
    let errs = errors.into_inner().expect("lock");
    println!(
        "  tick {tick_ms} ms: failover_gap_ms (worst) {worst:.0}; baseline gap {baseline:?} ms; creates {created:?}; errors {errs:?}"
    );
    Ok(json!({
        "tick_ms": tick_ms,
        "election_timeout": format!("10-20 ticks = {}-{} ms", 10 * tick_ms, 20 * tick_ms),
        "load": format!("{} creates/s per shard through keyfort_net::client::Client ({} blocking workers per shard)", args.failover_rate_per_shard, FAILOVER_WORKERS),
        "failover_gap_ms": worst,
        "gap_ms_worst_by_shard": by_shard,
        "baseline_gap_ms_by_shard": baseline,
        "kills": kills,
        "creates_by_shard": created,
        "errors": errs,
    }))
}

/// One full run on a fresh cluster.
fn one_run(args: &Args, run: usize) -> Result<Value, String> {
    let dir = args.dir.join(format!("run-{run}"));
    let t = Instant::now();
    let mut s = start_cluster(args, &dir, args.tick_ms, args.partitions_per_shard)?;
    println!(
        "run {run}: cluster of {} nodes, {} shards, tick {} ms up in {:.1} s; leaders {:?}",
        args.nodes,
        args.shards,
        args.tick_ms,
        t.elapsed().as_secs_f64(),
        leaders(&s)?
    );

    // Sequential creates.
    let conns = leader_conns(&s)?;
    let (seq, seq_err) = run_closed_loop(
        &conns,
        args.sequential,
        CALL_TIMEOUT,
        create_req,
        is_written,
    );
    println!(
        "sequential creates: {} ok, p50 {:.3} ms p99 {:.3} ms p999 {:.3} ms max {:.3} ms, errors {seq_err:?}",
        seq.count,
        seq.p50_us / 1e3,
        seq.p99_us / 1e3,
        seq.p999_us / 1e3,
        seq.max_us / 1e3
    );

    // Full rates.
    let mut rates = Vec::new();
    let mut probes: Vec<LoadResult> = Vec::new();
    let mut profile = None;
    for &rate in &args.rates {
        let perf = (args.perf_at > 0.0 && rate == args.perf_at).then(|| {
            let leader = leaders(&s).ok()?[0];
            let pid = s.c.nodes[leader].child.as_ref()?.id();
            let (d, secs) = (dir.clone(), args.duration_s.min(8.0));
            let delay = Duration::from_secs_f64(args.warmup_s + 1.0);
            Some((
                leader,
                std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    perf_profile(pid, secs, &d, &format!("{rate}"))
                }),
            ))
        });
        let (r, cores) = open_loop_creates(&s, rate, args.duration_s, args.warmup_s)?;
        println!("creates open loop: {}", r.line());
        println!(
            "  cpu cores used (node 1..{}, load generator): {cores:?}",
            s.c.nodes.len()
        );
        if let Some(Some((leader, h))) = perf {
            if let Ok(Some(report)) = h.join() {
                let top = perf_top(&report, 40);
                println!(
                    "perf of the shard-0 leader (node {}) at {rate}/s:",
                    leader + 1
                );
                for l in top.iter().take(25) {
                    println!("  {l}");
                }
                profile =
                    Some(json!({ "node": leader + 1, "offered_per_s": rate, "top_self": top }));
            }
        }
        let mut j = r.to_json();
        j["cpu_cores_used_by_node_then_loadgen"] = json!(cores);
        rates.push(j);
        probes.push(r);
    }

    // Rate search.
    let mut search = Vec::new();
    let mut max_rate = None;
    if !args.no_search {
        let probe = |rate: f64, probes: &mut Vec<LoadResult>| -> Result<LoadResult, String> {
            if let Some(r) = probes.iter().find(|r| r.offered_per_s == rate) {
                return Ok(r.clone());
            }
            let (r, _) = open_loop_creates(&s, rate, args.probe_s, 1.0)?;
            probes.push(r.clone());
            Ok(r)
        };
        let (mut pass, mut fail) = (None::<f64>, None::<f64>);
        for &rate in &args.search_steps {
            let r = probe(rate, &mut probes)?;
            let ok = passes(&r);
            println!("search {}: {}", if ok { "pass" } else { "FAIL" }, r.line());
            search.push(json!({ "offered_per_s": rate, "pass": ok, "p99_ms": r.p99_ms, "achieved_per_s": r.achieved_per_s, "errors": r.error_count() }));
            if ok {
                pass = Some(rate);
            } else {
                fail = Some(rate);
                break;
            }
        }
        if let (lo, Some(mut hi)) = (pass, fail) {
            // Below the first step when even it fails.
            let mut lo = lo.unwrap_or(0.0);
            for _ in 0..args.bisect_probes {
                let mid = ((lo + hi) / 2.0 / 100.0).round() * 100.0;
                if mid <= lo || mid >= hi {
                    break;
                }
                let r = probe(mid, &mut probes)?;
                let ok = passes(&r);
                println!("search {}: {}", if ok { "pass" } else { "FAIL" }, r.line());
                search.push(json!({ "offered_per_s": mid, "pass": ok, "p99_ms": r.p99_ms, "achieved_per_s": r.achieved_per_s, "errors": r.error_count() }));
                if ok {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            pass = Some(lo);
        }
        max_rate = pass;
        println!("creates_per_s_max_at_p99_10ms: {max_rate:?}");
    }

    // Encrypt.
    let conns = leader_conns(&s)?;
    let mut keys: Vec<Vec<[u8; 16]>> = Vec::new();
    for c in &conns {
        let mut ks = Vec::new();
        for i in 0..args.encrypt_keys {
            match c.call(&create_req(i as u64), CALL_TIMEOUT) {
                Ok(Response::KeyWritten(w)) => ks.push(w.key_id),
                other => return Err(format!("key create for encrypt: {other:?}")),
            }
        }
        keys.push(ks);
    }
    let plaintext = vec![0x5au8; args.encrypt_bytes];
    let n = conns.len() as u64;
    let cfg = OpenLoop::new(
        args.encrypt_rate,
        Duration::from_secs_f64(args.duration_s),
        Duration::from_secs_f64(args.warmup_s),
    );
    let enc = run_open_loop(
        &conns,
        &cfg,
        |i| {
            let ks = &keys[(i % n) as usize];
            Request::Encrypt {
                key_id: ks[((i / n) % ks.len() as u64) as usize],
                aad: Vec::new(),
                plaintext: plaintext.clone(),
            }
        },
        |r| matches!(r, Response::Encrypted { .. }),
    );
    println!("encrypt {} B open loop: {}", args.encrypt_bytes, enc.line());
    std::thread::sleep(Duration::from_millis(500));

    // Failover.
    let mut fo = Vec::new();
    if !args.no_failover {
        fo.push(failover(args, &mut s, args.tick_ms)?);
        drop(s);
        if args.other_tick_ms > 0 {
            let mut f = start_cluster(args, &dir.join("other-tick"), args.other_tick_ms, 1)?;
            fo.push(failover(args, &mut f, args.other_tick_ms)?);
        }
    } else {
        drop(s);
    }
    println!("run {run} took {:.0} s", t.elapsed().as_secs_f64());
    Ok(json!({
        "run": run,
        "seconds": t.elapsed().as_secs_f64(),
        "sequential_creates": { "latency": ms(&seq), "errors": seq_err },
        "create_latency_ms_p50_sequential": seq.p50_us / 1e3,
        "create_latency_ms_p99_sequential": seq.p99_us / 1e3,
        "create_latency_ms_p999_sequential": seq.p999_us / 1e3,
        "creates_open_loop": rates,
        "rate_search": search,
        "creates_per_s_max_at_p99_10ms": max_rate,
        "encrypt": enc.to_json(),
        "encrypt_latency_us_p50_at_20k": enc.p50_ms * 1e3,
        "encrypt_latency_us_p99_at_20k": enc.p99_ms * 1e3,
        "encrypt_latency_us_p999_at_20k": enc.p999_ms * 1e3,
        "encrypt_achieved_per_s_at_20k": enc.achieved_per_s,
        "failover": fo,
        "profile": profile,
    }))
}

fn main() -> Result<(), String> {
    let args: Args = clap::Parser::parse();
    let t = Instant::now();
    let mut runs = Vec::new();
    for run in 0..args.runs {
        runs.push(one_run(&args, run)?);
    }
    let med = |f: &dyn Fn(&Value) -> Option<f64>| -> Option<f64> {
        let xs: Vec<f64> = runs.iter().filter_map(f).collect();
        (!xs.is_empty()).then(|| median(xs))
    };
    let key = |k: &'static str| med(&move |r: &Value| r[k].as_f64());
    let at_rate = |rate: f64, k: &'static str| {
        med(&move |r: &Value| {
            r["creates_open_loop"]
                .as_array()?
                .iter()
                .find(|x| x["offered_per_s"].as_f64() == Some(rate))?[k]
                .as_f64()
        })
    };
    let creates_by_rate: Vec<Value> = args
        .rates
        .iter()
        .map(|&rate| {
            json!({
                "offered_per_s": rate,
                "achieved_per_s": at_rate(rate, "achieved_per_s"),
                "p50_ms": at_rate(rate, "p50_ms"),
                "p99_ms": at_rate(rate, "p99_ms"),
                "p999_ms": at_rate(rate, "p999_ms"),
            })
        })
        .collect();
    let fo = |i: usize, k: &'static str| med(&move |r: &Value| r["failover"].get(i)?[k].as_f64());
    let result = json!({
        "benchmark": "cluster",
        "command": format!(
            "cargo build --release -p keyfort-tools -p keyfort-bench && ./target/release/cluster_bench {}",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
        "date": utc_date(),
        "machine": machine(),
        "config": {
            "nodes": args.nodes, "shards": args.shards, "tick_ms": args.tick_ms,
            "other_tick_ms": args.other_tick_ms, "partitions_per_shard": args.partitions_per_shard,
            "status_ms": STATUS_MS, "runs": args.runs,
            "load": "open loop (keyfort_bench::loadgen): request i intended at t0 + i/rate, sent on the connection to its partition's shard leader, latency = answer arrival (client reader thread) − intended send time; warm-up not recorded; errors counted by code, not as latencies",
            "duration_s": args.duration_s, "warmup_s": args.warmup_s, "probe_s": args.probe_s,
            "search_rule": format!("achieved ≥ {SEARCH_ACHIEVED_FRACTION} × offered, p99 ≤ {SEARCH_P99_MS} ms, no errors"),
            "encrypt_bytes": args.encrypt_bytes, "encrypt_keys_per_partition": args.encrypt_keys,
            "everything_on_one_machine": "the nodes, their SoftHSM cards and the load generator share the machine's cores",
        },
        "medians_over_runs": args.runs,
        "create_latency_ms_p50_sequential": key("create_latency_ms_p50_sequential"),
        "create_latency_ms_p99_sequential": key("create_latency_ms_p99_sequential"),
        "create_latency_ms_p999_sequential": key("create_latency_ms_p999_sequential"),
        "creates_open_loop": creates_by_rate,
        "creates_per_s_max_at_p99_10ms": key("creates_per_s_max_at_p99_10ms"),
        "encrypt_latency_us_p50_at_20k": key("encrypt_latency_us_p50_at_20k"),
        "encrypt_latency_us_p99_at_20k": key("encrypt_latency_us_p99_at_20k"),
        "encrypt_latency_us_p999_at_20k": key("encrypt_latency_us_p999_at_20k"),
        "encrypt_achieved_per_s_at_20k": key("encrypt_achieved_per_s_at_20k"),
        "failover_gap_ms": fo(0, "failover_gap_ms"),
        "failover_gap_ms_tick": args.tick_ms,
        "failover_gap_ms_other_tick": fo(1, "failover_gap_ms"),
        "failover_other_tick_ms": args.other_tick_ms,
        "total_seconds": t.elapsed().as_secs_f64(),
        "runs": runs,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "create_latency_ms_p99_sequential": result["create_latency_ms_p99_sequential"],
            "creates_open_loop": result["creates_open_loop"],
            "creates_per_s_max_at_p99_10ms": result["creates_per_s_max_at_p99_10ms"],
            "encrypt_latency_us_p99_at_20k": result["encrypt_latency_us_p99_at_20k"],
            "failover_gap_ms": result["failover_gap_ms"],
            "failover_gap_ms_other_tick": result["failover_gap_ms_other_tick"],
        }))
        .map_err(|e| e.to_string())?
    );
    if let Some(out) = &args.out {
        write_json(out, &result).map_err(|e| e.to_string())?;
    }
    Ok(())
}
