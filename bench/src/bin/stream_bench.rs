//! Snapshot streaming benchmark (issue 5): two nodes on 127.0.0.1, each on its own executor
//! thread, with the real peer transport and handshake (a software HMAC stands in for the card).
//! The follower fetches a 1 GiB snapshot-sized file (pseudo-random bytes, written first to the
//! scratch directory) from the leader with `keyfort_net::snapshot_stream::fetch_snapshot` —
//! windowed 1 MiB chunks, crc-checked, written to a partial file, fdatasynced, renamed, the
//! directory synced — `--runs` times. Beside each run, the physical references: the disk's
//! O_DIRECT sequential read of the same file (`keyfort_bench::disk::sequential_read_gb_per_s`)
//! and its durable O_DIRECT sequential write of as many bytes the way the fetcher writes them
//! (1 MiB writes, 4 in flight, then fdatasync). Medians are reported; GB = 10^9 bytes.
//!
//! `cargo run --release -p keyfort-bench --bin stream_bench -- --out docs/bench/stream.json`

use keyfort_bench::{disk, machine, median, write_json};
use keyfort_engine::exec::{run_local, spawn_executor, ExecConfig};
use keyfort_hsm::softhsm::integrity_session;
use keyfort_net::peer::{PeerIdentity, CLUSTER_ID_LEN};
use keyfort_net::snapshot_stream::{
    fetch_snapshot, FetchReport, MAX_WRITES_IN_FLIGHT, STREAM_CHUNK_BYTES, STREAM_WINDOW_CHUNKS,
};
use keyfort_net::transport::PeerTransport;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Flags of `stream_bench`.
#[derive(clap::Parser)]
struct Args {
    /// Scratch directory for the source and fetched files (on the disk being measured).
    #[arg(long, default_value = "target/bench-stream")]
    dir: PathBuf,
    /// Where to write the JSON results.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Fetches (each beside a disk read of the same file); medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Size of the streamed file, in MiB.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
}

/// The cluster id both nodes share.
const CLUSTER: [u8; CLUSTER_ID_LEN] = [0x5b; CLUSTER_ID_LEN];
/// The software integrity key both nodes share.
const KEY: [u8; 32] = [0x42; 32];
/// The serving node.
const LEADER: u64 = 1;
/// The fetching node.
const FOLLOWER: u64 = 2;
/// The snapshot served: (shard, lsn, term).
const SNAP: (u32, u64, u64) = (0, 1_000_000, 3);
/// How often the leader's executor checks for the end of the benchmark.
const STOP_POLL: Duration = Duration::from_millis(10);
/// Bytes per write while filling the source file.
const FILL_BYTES: usize = 8 << 20;

fn transport(node: u64, peers: BTreeMap<u64, SocketAddr>) -> Rc<PeerTransport> {
    PeerTransport::new(
        PeerIdentity {
            cluster_id: CLUSTER,
            node_id: node,
        },
        Rc::new(integrity_session(&KEY).expect("fixture card")),
        peers,
        Rc::new(|_, _, _| {}),
    )
}

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Writes `bytes` of pseudo-random data (xorshift, no zero runs) to `path`, durably.
fn write_source(path: &Path, bytes: u64) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut buf = Vec::with_capacity(FILL_BYTES);
    let mut left = bytes;
    while left > 0 {
        buf.clear();
        let n = left.min(FILL_BYTES as u64) as usize;
        while buf.len() < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf.extend_from_slice(&x.to_le_bytes());
        }
        buf.truncate(n);
        f.write_all(&buf)?;
        left -= n as u64;
    }
    f.sync_all()
}

/// The disk's durable sequential write of `bytes` into a new file in `dir`, as the fetcher
/// writes: O_DIRECT 1 MiB writes, `MAX_WRITES_IN_FLIGHT` in flight, then fdatasync. Returns
/// (GB/s to the last write done, GB/s to durable).
fn sequential_write_gb_per_s(dir: &Path, bytes: u64) -> std::io::Result<(f64, f64)> {
    let path = dir.join("write-reference");
    run_local(dir, move |_q| async move {
        let file = Rc::new(glommio::io::DmaFile::create(&path).await?);
        let pattern: Vec<u8> = (0..STREAM_CHUNK_BYTES)
            .map(|i| (i * 31 + 7) as u8)
            .collect();
        let start = Instant::now();
        let mut writes = VecDeque::new();
        let mut at = 0u64;
        while at < bytes {
            let mut buf = file.alloc_dma_buffer(STREAM_CHUNK_BYTES);
            buf.as_bytes_mut().copy_from_slice(&pattern);
            let f = file.clone();
            writes.push_back(glommio::spawn_local(
                async move { f.write_at(buf, at).await },
            ));
            at += STREAM_CHUNK_BYTES as u64;
            while writes.len() > MAX_WRITES_IN_FLIGHT {
                if let Some(w) = writes.pop_front() {
                    w.await?;
                }
            }
        }
        for w in writes {
            w.await?;
        }
        let written = start.elapsed();
        file.fdatasync().await?;
        let durable = start.elapsed();
        file.remove().await?;
        let _ = file.close_rc().await;
        let gb = bytes as f64 / 1e9;
        Ok((gb / written.as_secs_f64(), gb / durable.as_secs_f64()))
    })?
}

/// Starts the leader on its own executor thread serving `src`; returns its address and the
/// thread's stop flag and handle.
fn start_leader(
    dir: &Path,
    src: PathBuf,
) -> (
    SocketAddr,
    Arc<AtomicBool>,
    glommio::ExecutorJoinHandle<std::io::Result<()>>,
) {
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let h = spawn_executor(ExecConfig::new(None, dir.join("leader")), move |_q| {
        async move {
            // The follower does not listen; the leader only needs it as a member.
            let t = transport(LEADER, BTreeMap::from([(FOLLOWER, localhost())]));
            let addr = t.listen(localhost()).expect("leader listen");
            t.serve_snapshots(Rc::new(move |shard, lsn, term| {
                ((shard, lsn, term) == SNAP).then(|| src.clone())
            }));
            tx.send(addr).expect("send leader address");
            while !stop2.load(Ordering::Relaxed) {
                glommio::timer::sleep(STOP_POLL).await;
            }
            t.close().await;
        }
    })
    .expect("leader executor");
    let addr = rx.recv().expect("leader address");
    (addr, stop, h)
}

/// One fetch of the snapshot into `dest` on a fresh follower executor thread.
fn fetch_once(dir: &Path, leader: SocketAddr, dest: PathBuf) -> FetchReport {
    let _ = std::fs::remove_file(&dest);
    let h = spawn_executor(
        ExecConfig::new(None, dir.join("follower")),
        move |_q| async move {
            let t = transport(FOLLOWER, BTreeMap::from([(LEADER, leader)]));
            let r = fetch_snapshot(&t, LEADER, SNAP.0, SNAP.1, SNAP.2, &dest).await;
            t.close().await;
            r
        },
    )
    .expect("follower executor");
    h.join()
        .expect("follower thread")
        .expect("follower executor")
        .expect("fetch")
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    std::fs::create_dir_all(&args.dir).expect("bench dir");
    let bytes = args.mib << 20;
    println!(
        "stream_bench: dir {} file {} MiB runs {} (chunks {} KiB, window {})",
        args.dir.display(),
        args.mib,
        args.runs,
        STREAM_CHUNK_BYTES >> 10,
        STREAM_WINDOW_CHUNKS
    );
    let src = args.dir.join("snapshot.src");
    let dest = args.dir.join("snapshot.fetched");
    write_source(&src, bytes).expect("write source file");
    let (addr, stop, leader) = start_leader(&args.dir, src.clone());

    println!(
        "{:>4} {:>12} {:>14} {:>9} {:>14} {:>15} {:>15}",
        "run",
        "stream GB/s",
        "transfer GB/s",
        "sync ms",
        "disk read GB/s",
        "disk write GB/s",
        "durable GB/s"
    );
    let mut runs = Vec::new();
    for i in 0..args.runs {
        let disk_gbps =
            disk::sequential_read_gb_per_s(std::slice::from_ref(&src)).expect("disk read");
        let (write_gbps, durable_gbps) =
            sequential_write_gb_per_s(&args.dir, bytes).expect("disk write");
        let r = fetch_once(&args.dir, addr, dest.clone());
        assert_eq!(r.bytes, bytes, "fetched size");
        let secs = r.elapsed.as_secs_f64();
        let stream_gbps = bytes as f64 / secs / 1e9;
        let transfer_gbps = bytes as f64 / (secs - r.sync.as_secs_f64()) / 1e9;
        println!(
            "{:>4} {:>12.2} {:>14.2} {:>9.0} {:>14.2} {:>15.2} {:>15.2}",
            i + 1,
            stream_gbps,
            transfer_gbps,
            r.sync.as_secs_f64() * 1e3,
            disk_gbps,
            write_gbps,
            durable_gbps
        );
        runs.push(json!({
            "stream_gb_per_s": stream_gbps,
            "transfer_gb_per_s": transfer_gbps,
            "elapsed_s": secs,
            "sync_ms": r.sync.as_secs_f64() * 1e3,
            "chunks": r.chunks,
            "resumes": r.resumes,
            "refetched_chunks": r.refetched_chunks,
            "disk_sequential_read_gb_per_s": disk_gbps,
            "disk_sequential_write_gb_per_s": write_gbps,
            "disk_sequential_write_durable_gb_per_s": durable_gbps,
        }));
    }
    stop.store(true, Ordering::Relaxed);
    leader
        .join()
        .expect("leader thread")
        .expect("leader executor");
    let _ = std::fs::remove_file(&dest);

    let med = |k: &str| median(runs.iter().filter_map(|r| r[k].as_f64()).collect());
    let stream = med("stream_gb_per_s");
    let transfer = med("transfer_gb_per_s");
    let sync_ms = med("sync_ms");
    let disk_gbps = med("disk_sequential_read_gb_per_s");
    let write_gbps = med("disk_sequential_write_gb_per_s");
    let durable_gbps = med("disk_sequential_write_durable_gb_per_s");
    println!(
        "median: stream {stream:.2} GB/s (transfer {transfer:.2} GB/s, final sync {sync_ms:.0} ms); disk sequential read {disk_gbps:.2} GB/s (stream/read {:.2}); disk sequential write {write_gbps:.2} GB/s, durable {durable_gbps:.2} GB/s (stream/durable write {:.2})",
        stream / disk_gbps,
        stream / durable_gbps
    );
    let result: Value = json!({
        "benchmark": "stream_bench",
        "command": "cargo run --release -p keyfort-bench --bin stream_bench -- --out docs/bench/stream.json",
        "machine": machine(),
        "file_bytes": bytes,
        "chunk_bytes": STREAM_CHUNK_BYTES,
        "window_chunks": STREAM_WINDOW_CHUNKS,
        "runs": args.runs,
        "stream_gb_per_s": stream,
        "stream_transfer_gb_per_s": transfer,
        "stream_final_sync_ms": sync_ms,
        "disk_sequential_read_gb_per_s": disk_gbps,
        "stream_over_disk_read": stream / disk_gbps,
        "disk_sequential_write_gb_per_s": write_gbps,
        "disk_sequential_write_durable_gb_per_s": durable_gbps,
        "stream_over_disk_durable_write": stream / durable_gbps,
        "per_run": runs,
        "notes": "stream: from the fetch call to the file durable at dest (fdatasync, rename, directory sync) over 127.0.0.1 with the peer handshake; transfer: the same without the final sync; disk read: O_DIRECT sequential read of the source file; disk write: O_DIRECT 1 MiB writes 4 in flight of as many bytes to a new file, to the last write done and to durable (fdatasync); both measured just before each fetch; GB = 1e9 bytes",
    });
    if let Some(out) = &args.out {
        write_json(out, &result).expect("write results");
        println!("wrote {}", out.display());
    }
}
