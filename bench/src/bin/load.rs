//! keyfort's load generator on the command line: workloads (create-heavy, use-heavy,
//! churn) driven open loop at a rate, closed loop with N workers, or through a series of
//! rates for the highest one at a p99 bound; an aligned table on stdout, JSON to a file.
//!
//! By default it builds its own local cluster (3 `keyfortd` processes on 127.0.0.1, a SoftHSM
//! card each, `--shards` shards, one partition per shard), loads it and stops it; with
//! `--addr` and `--credential` it loads a running cluster's partition instead.
//!
//! Plaintext on loopback by default; `--tls` runs the local cluster with TLS on both
//! protocols (the cluster CA made at init) and connects over TLS 1.3; with `--addr`, `--ca`
//! (the cluster CA's PEM) connects to a running cluster over TLS.
//!
//! ```sh
//! cargo build --release -p keyfort-tools -p keyfort-bench
//! ./target/release/load --workload use-heavy --rate 1000 --duration 10 --warmup 2 \
//!     --preload 10000 --connections 8 --shards 2 --json target/load.json
//! ./target/release/load --workload create-heavy --max-rate 1000,2000,4000,8000 --p99-ms 10
//! ./target/release/load --tls --workload use-heavy --rate 2000
//! ```

use keyfort_bench::keyfort_target::{start_local_cluster_with, KeyfortOptions, KeyfortTarget};
use keyfort_bench::loadgen::{max_rate_at_p99, run, table, Mode, RunOptions, RunResult};
use keyfort_bench::local_cluster::{binaries_beside_exe, Security};
use keyfort_bench::target::Target;
use keyfort_bench::workload::Workload;
use keyfort_bench::{machine, write_json};
use keyfort_net::client::{ClientTls, Credential};
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Parser, Debug)]
struct Args {
    /// create-heavy, use-heavy or churn; several (comma separated) run one after the other
    /// on the same cluster and share the table.
    #[arg(long, value_delimiter = ',', default_value = "use-heavy")]
    workload: Vec<Workload>,
    /// Offered operations per second (open loop).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Closed loop with this many workers instead of the open loop.
    #[arg(long)]
    closed: Option<usize>,
    /// Open-loop runs at each of these rates; reports the highest with p99 ≤ --p99-ms.
    #[arg(long, value_delimiter = ',')]
    max_rate: Vec<f64>,
    #[command(flatten)]
    run: RunOptions,
    /// Shards of the local cluster (one partition each).
    #[arg(long, default_value_t = 2)]
    shards: u32,
    /// Nodes of the local cluster.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Raft tick of the local cluster's nodes.
    #[arg(long, default_value_t = 25)]
    tick_ms: u64,
    /// Scratch directory of the local cluster (cards, data dirs; removed first).
    #[arg(long, default_value = "target/load-cluster")]
    dir: PathBuf,
    /// A running cluster's client addresses (host:port, comma separated) instead of a local
    /// cluster; needs --credential.
    #[arg(long, value_delimiter = ',')]
    addr: Vec<String>,
    /// A partition credential file of the running cluster (`keyfort` issues them).
    #[arg(long)]
    credential: Option<PathBuf>,
    /// The local cluster runs TLS on its client and peer protocols, and the load goes over
    /// TLS 1.3 (default: plaintext on loopback).
    #[arg(long)]
    tls: bool,
    /// With --addr: the running cluster's CA certificate (PEM); connects over TLS.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Writes the results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn resolve(addrs: &[String]) -> Result<Vec<SocketAddr>, String> {
    use std::net::ToSocketAddrs;
    addrs
        .iter()
        .map(|a| {
            a.to_socket_addrs()
                .map_err(|e| format!("{a}: {e}"))?
                .next()
                .ok_or_else(|| format!("{a}: no address"))
        })
        .collect()
}

fn main() -> Result<(), String> {
    let args: Args = clap::Parser::parse();
    // The local cluster lives until the end of main (dropped: every node is stopped).
    let (cluster, addrs, creds, tls) = if args.addr.is_empty() {
        let (keyfort, keyfortd) = binaries_beside_exe()?;
        let t = Instant::now();
        let security = if args.tls {
            Security::Tls
        } else {
            Security::InsecureLoopback
        };
        let (c, creds) = start_local_cluster_with(
            &args.dir,
            &keyfort,
            &keyfortd,
            args.nodes,
            args.shards,
            args.tick_ms,
            security,
        )?;
        eprintln!(
            "local cluster: {} nodes, {} shards, {security:?}, ready in {:.1} s",
            args.nodes,
            args.shards,
            t.elapsed().as_secs_f64()
        );
        let addrs = c.client_addrs();
        let tls = c.client_tls()?;
        (Some(c), addrs, creds, tls)
    } else {
        let file = args
            .credential
            .as_ref()
            .ok_or("--addr needs --credential (a partition credential file)")?;
        let cred = Credential::read_file(file).map_err(|e| e.to_string())?;
        let tls = args
            .ca
            .as_ref()
            .map(|ca| ClientTls::from_files(ca, None, None, None).map_err(|e| e.to_string()))
            .transpose()?;
        (None, resolve(&args.addr)?, vec![cred], tls)
    };
    let target = KeyfortTarget::connect_with(
        &addrs,
        &creds,
        &KeyfortOptions {
            value_size: args.run.value_size,
            connections: args.run.connections,
        },
        tls,
    )?;
    let handshakes = target.handshakes();
    eprintln!(
        "connections opened: {} ({} TLS, {} resumed)",
        handshakes.opened, handshakes.tls, handshakes.resumed
    );
    let t = Instant::now();
    target.preload(args.run.preload)?;
    let preload_s = t.elapsed().as_secs_f64();
    eprintln!(
        "preloaded {} keys (and a ciphertext each) in {preload_s:.1} s",
        args.run.preload
    );

    let mut results: Vec<RunResult> = Vec::new();
    let mut best: Vec<(Workload, f64)> = Vec::new();
    for &workload in &args.workload {
        let mode = match args.closed {
            Some(workers) => Mode::Closed { workers },
            None => Mode::Open { rate: args.rate },
        };
        let spec = args.run.spec(workload, mode);
        if args.max_rate.is_empty() {
            results.push(run(&target, &spec));
        } else {
            let (b, runs) = max_rate_at_p99(&target, &spec, args.run.p99_ms, &args.max_rate);
            results.extend(runs);
            best.push((workload, b));
        }
    }
    print!("{}", table(&results));
    for (workload, b) in &best {
        println!(
            "{} {workload}: highest rate with p99 <= {} ms: {b}/s",
            target.name(),
            args.run.p99_ms
        );
    }
    if let Some(path) = &args.json {
        let out = json!({
            "machine": machine(),
            "command": std::env::args().collect::<Vec<_>>(),
            "cluster": if cluster.is_some() {
                json!({ "local": true, "nodes": args.nodes, "shards": args.shards, "tick_ms": args.tick_ms })
            } else {
                json!({ "local": false, "addrs": args.addr })
            },
            "tls": handshakes.tls > 0,
            "handshakes": handshakes,
            "partitions": target.partitions(),
            "connections": target.connections(),
            "value_size": args.run.value_size,
            "preload": { "keys": args.run.preload, "seconds": preload_s },
            "results": results.iter().map(RunResult::to_json).collect::<Vec<_>>(),
            "max_rate_at_p99": best
                .iter()
                .map(|(w, b)| json!({ "workload": w.name(), "p99_ms": args.run.p99_ms, "rates": args.max_rate, "per_s": b }))
                .collect::<Vec<_>>(),
        });
        write_json(path, &out).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    drop(target);
    if let Some(mut c) = cluster {
        for i in 0..c.nodes.len() {
            c.sigterm(i, Duration::from_secs(10));
        }
    }
    Ok(())
}
