//! Snapshot benchmark (issue 4) on one node, one shard, one executor: the churn mix (1,000
//! partitions; 2×keys creates with real SoftHSM masked blobs, 2×keys metadata updates, 1×keys
//! deletes → `keys` live keys) appended through the WBL and applied to a `StateMachine`; then
//! snapshot size vs log size, the full-state snapshot write with the card MAC, append latency idle
//! vs while a full compaction runs in the background queue of the same executor, and restart
//! with a snapshot (WBL scan + `recover_local`) vs a full replay from LSN 1, phase by phase.
//!
//! `cargo run --release -p keyfort-bench --bin snapshot_bench -- --out docs/bench/snapshot.json`

#![recursion_limit = "256"]

use keyfort_bench::appenders::closed_loop;
use keyfort_bench::{machine, utc_date, write_json, LatencySummary};
use keyfort_engine::compaction::{
    compact, compaction_due, CompactionConfig, CompactionContext, CompactionReport,
};
use keyfort_engine::exec::{self, Queues};
use keyfort_engine::recovery::{open_and_recover, recover_local, replay};
use keyfort_engine::snapshot::{self, Snapshot};
use keyfort_engine::state::{
    IdempotencyId, KeyPut, KeyState, Op, PutOp, StateMachine, IDEMPOTENCY_WINDOW_LSNS,
};
use keyfort_engine::wbl::{record, Durable, HardState, RecordKind, Wbl, WblOptions};
use keyfort_hsm::softhsm::fixture;
use keyfort_hsm::{Card, CoreSession, KeyHeader, KeyId, PartitionId};
use serde_json::json;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

const PARTITIONS: usize = 1000;
/// Records between a key's create and its update, and between its update and its delete, so the
/// log interleaves the three kinds as a live workload would.
const LAG: usize = 1000;
const IN_FLIGHT: usize = 16_384;
const LAT_APPENDERS: usize = 64;
const LAT_PAYLOAD: usize = 128;
/// Compactions back to back (the appended records applied between them) while the appenders
/// measure: the "compacting" window is exactly their duration.
const COMPACTIONS_UNDER_LOAD: usize = 3;

/// Flags of `snapshot_bench`.
#[derive(clap::Parser)]
struct Args {
    /// Scratch directory for the log and snapshots.
    #[arg(long, default_value = "target/bench-snapshot")]
    dir: PathBuf,
    /// Where to write the JSON results.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Live keys at the end of the churn mix (2x creates, 2x updates, 1x deletes).
    #[arg(long, default_value_t = 1_000_000)]
    keys: usize,
    /// Seconds of each append-latency window.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Records between rolling compactions during the churn.
    #[arg(long, default_value_t = keyfort_engine::compaction::COMPACTION_RECORDS_THRESHOLD)]
    compact_records: u64,
}

fn key_id(i: u64) -> KeyId {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&i.to_le_bytes());
    k[8..].copy_from_slice(&(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes());
    KeyId(k)
}

fn partition_id(p: usize) -> PartitionId {
    let mut b = [0xbeu8; 16];
    b[..4].copy_from_slice(&(p as u32).to_le_bytes());
    PartitionId(b)
}

fn idem(lsn: u64) -> IdempotencyId {
    let mut b = [0x1du8; 16];
    b[..8].copy_from_slice(&lsn.to_le_bytes());
    IdempotencyId(b)
}

fn header(j: usize) -> KeyHeader {
    KeyHeader::aes(partition_id(j % PARTITIONS), key_id(j as u64), 1)
}

fn metadata(j: usize, gen: u8) -> Vec<u8> {
    format!("label=svc-{:08} owner=team-{:03} gen={gen}", j, j % 997).into_bytes()
}

/// The card, opened once per process; sessions are per thread.
struct CardSetup {
    card: &'static Card,
    configs: Vec<Vec<u8>>,
    ik: Vec<u8>,
}

fn session(c: &CardSetup) -> CoreSession {
    let mut s = c.card.session().expect("session");
    s.import_integrity_key(&c.ik).expect("integrity key");
    s
}

/// `n` real masked blobs for keys 0..n, made by 2 threads with one card session each.
fn create_blobs(c: &CardSetup, n: usize) -> (Vec<Vec<u8>>, f64) {
    const THREADS: usize = 2;
    let t = Instant::now();
    let parts: Vec<Vec<Vec<u8>>> = std::thread::scope(|scope| {
        let hs: Vec<_> = (0..THREADS)
            .map(|th| {
                scope.spawn(move || {
                    let mut s = c.card.session().expect("session");
                    for cfg in &c.configs {
                        s.import_partition(cfg).expect("import");
                    }
                    let mut out = Vec::with_capacity(n / THREADS + 1);
                    for j in (th..n).step_by(THREADS) {
                        out.push(s.create_key(&header(j)).expect("create"));
                        if th == 0 && j % 200_000 == 0 && j > 0 {
                            println!("  created {j} keys ({:.0} s)", t.elapsed().as_secs_f64());
                        }
                    }
                    out
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let mut iters: Vec<_> = parts.into_iter().map(|v| v.into_iter()).collect();
    let blobs = (0..n)
        .map(|j| iters[j % THREADS].next().expect("blob"))
        .collect();
    (blobs, t.elapsed().as_secs_f64())
}

/// The churn mix as (kind, payload) in log order, generated lazily (LSN = position + 1 +
/// `PARTITIONS`, after the partition creates).
struct Churn {
    keys: usize,
    blobs: Vec<Vec<u8>>,
    j: usize,
    pending: VecDeque<(RecordKind, Vec<u8>)>,
    lsn: u64,
}

impl Churn {
    fn next(&mut self) -> Option<(RecordKind, Vec<u8>)> {
        let n = 2 * self.keys;
        while self.pending.is_empty() {
            if self.j >= n + 2 * LAG {
                return None;
            }
            let j = self.j;
            self.j += 1;
            let mut lsn = self.lsn;
            fn push(lsn: &mut u64, op: Op, pending: &mut VecDeque<(RecordKind, Vec<u8>)>) {
                *lsn += 1;
                pending.push_back((op.kind(), op.encode()));
            }
            if j < n {
                let blob = std::mem::take(&mut self.blobs[j]);
                let op = Op::KeyPut(KeyPut {
                    op: PutOp::Create,
                    idempotency_id: idem(lsn + 1),
                    header: header(j),
                    version_replaced: 0,
                    state: KeyState::Enabled,
                    metadata: metadata(j, 0),
                    blob,
                });
                push(&mut lsn, op, &mut self.pending);
            }
            if j >= LAG && j - LAG < n {
                let k = j - LAG;
                let op = Op::KeyPut(KeyPut {
                    op: PutOp::Update,
                    idempotency_id: idem(lsn + 1),
                    header: header(k),
                    version_replaced: 0,
                    state: if k.is_multiple_of(7) {
                        KeyState::Disabled
                    } else {
                        KeyState::Enabled
                    },
                    metadata: metadata(k, 1),
                    blob: Vec::new(),
                });
                push(&mut lsn, op, &mut self.pending);
            }
            // Odd keys are deleted, so exactly `keys` (the even ones) remain.
            if j >= 2 * LAG && j - 2 * LAG < n && (j - 2 * LAG) % 2 == 1 {
                let k = j - 2 * LAG;
                let h = header(k);
                let op = Op::KeyDelete {
                    idempotency_id: idem(lsn + 1),
                    partition: h.partition,
                    key_id: h.key_id,
                };
                push(&mut lsn, op, &mut self.pending);
            }
            self.lsn = lsn;
        }
        self.pending.pop_front()
    }
}

fn wbl_opts(q: &Queues) -> WblOptions {
    WblOptions {
        writer_queue: Some(q.foreground),
        background_queue: Some(q.background),
        ..WblOptions::default()
    }
}

fn drop_caches() -> bool {
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

struct ChurnResult {
    records: u64,
    record_bytes: u64,
    append_s: f64,
    key_count: u64,
    idempotency_entries: usize,
    key_entry_bytes: u64,
    rejected: u64,
    state_rss_mib: f64,
    memtable_rss_mib_peak: f64,
    /// The rolling compactions during the churn, then the final one at its end.
    compactions: Vec<CompactionReport>,
}

fn compaction_ctx(retain_from: Option<u64>) -> CompactionContext {
    CompactionContext {
        voters: vec![1],
        learners: vec![],
        retain_from,
    }
}

/// Phase 1: partitions + churn through the WBL, applied to a state, with rolling compaction in
/// the background queue whenever `compaction_due` (as a node runs it), the log kept whole
/// (`retain_from` 1) for the full-replay baseline; then one final compaction at the end.
fn churn_phase(
    c: &'static CardSetup,
    dir: &Path,
    keys: usize,
    blobs: Vec<Vec<u8>>,
    cfg: CompactionConfig,
) -> ChurnResult {
    let d = dir.to_path_buf();
    exec::run_local(dir, move |q| async move {
        let (wbl, _) = Wbl::open(d.join("wbl"), wbl_opts(&q))
            .await
            .expect("open wbl");
        let snapdir = d.join("snapshots");
        std::fs::create_dir_all(&snapdir).expect("snapshot dir");
        let state = Rc::new(RefCell::new(StateMachine::new()));
        // The running rolling compaction's result slot (`Some(None)` while it runs).
        let running: Rc<RefCell<Option<Option<CompactionReport>>>> = Rc::new(RefCell::new(None));
        let mut compactions = Vec::new();
        let mut last_compacted = 0u64;
        let mut inflight = VecDeque::new();
        let (mut lsn, mut bytes, mut rejected) = (0u64, 0u64, 0u64);
        let mut memtable_rss_mib_peak = 0f64;
        let t = Instant::now();
        // As a node does: append, and apply each record once it is durable, in order.
        let mut append = |kind: RecordKind, payload: Vec<u8>| {
            lsn += 1;
            bytes += record::encoded_len(payload.len()) as u64;
            let d = wbl.append(kind, lsn, 1, payload.clone()).expect("append");
            (d, lsn, kind, payload)
        };
        let apply_one = |(d, lsn, kind, payload): (Durable, u64, RecordKind, Vec<u8>)| {
            let state = state.clone();
            async move {
                d.await.expect("durable");
                let r = state
                    .borrow_mut()
                    .apply(lsn, kind, &payload)
                    .expect("apply");
                r.outcome.code.is_rejected()
            }
        };
        for (p, config) in c.configs.iter().enumerate() {
            let op = Op::PartitionCreate {
                partition: partition_id(p),
                config: config.clone(),
            };
            inflight.push_back(append(op.kind(), op.encode()));
        }
        let mut churn = Churn {
            keys,
            blobs,
            j: 0,
            pending: VecDeque::new(),
            lsn: PARTITIONS as u64,
        };
        while let Some((kind, payload)) = churn.next() {
            inflight.push_back(append(kind, payload));
            if inflight.len() < IN_FLIGHT {
                continue;
            }
            rejected += apply_one(inflight.pop_front().expect("in flight")).await as u64;
            let finished = matches!(running.borrow().as_ref(), Some(Some(_)));
            if finished {
                let r = running.borrow_mut().take().flatten().expect("finished");
                compactions.push(r);
            }
            let applied = state.borrow().lsn_applied();
            if running.borrow().is_none() && compaction_due(applied, last_compacted, &cfg) {
                last_compacted = applied;
                memtable_rss_mib_peak = memtable_rss_mib_peak.max(rss_mib());
                *running.borrow_mut() = Some(None);
                let (wbl, state, snapdir, cfg, slot) = (
                    wbl.clone(),
                    state.clone(),
                    snapdir.clone(),
                    cfg.clone(),
                    running.clone(),
                );
                glommio::spawn_local_into(
                    async move {
                        let mac = session(c);
                        let r =
                            compact(&snapdir, &state, &wbl, compaction_ctx(Some(1)), &mac, &cfg)
                                .await
                                .expect("rolling compaction");
                        *slot.borrow_mut() = Some(Some(r));
                    },
                    q.background,
                )
                .expect("spawn compaction")
                .detach();
            }
        }
        while let Some(x) = inflight.pop_front() {
            rejected += apply_one(x).await as u64;
        }
        while matches!(running.borrow().as_ref(), Some(None)) {
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        if let Some(Some(r)) = running.borrow_mut().take() {
            compactions.push(r);
        }
        let append_s = t.elapsed().as_secs_f64();
        let records = lsn;
        wbl.set_hard_state(HardState {
            term: 1,
            vote: 1,
            commit: records,
        })
        .expect("hard state")
        .await
        .expect("durable");
        let state_rss_mib = rss_mib();
        let mac = session(c);
        let last = compact(&snapdir, &state, &wbl, compaction_ctx(Some(1)), &mac, &cfg)
            .await
            .expect("final compaction");
        compactions.push(last);
        let out = {
            let s = state.borrow();
            assert_eq!(
                s.key_count(),
                keys as u64,
                "churn leaves exactly `keys` keys"
            );
            let key_entry_bytes = s
                .keys()
                .expect("keys")
                .iter()
                .map(|e| e.encode().len() as u64)
                .sum();
            ChurnResult {
                records,
                record_bytes: bytes,
                append_s,
                key_count: s.key_count(),
                idempotency_entries: s.idempotency().len(),
                key_entry_bytes,
                rejected,
                state_rss_mib,
                memtable_rss_mib_peak,
                compactions,
            }
        };
        wbl.close().await.expect("close");
        out
    })
    .expect("executor")
}

struct LatencyResult {
    log_bytes_scanned: u64,
    idle: LatencySummary,
    idle_rps: f64,
    compacting: LatencySummary,
    compacting_rps: f64,
    compacting_window_s: f64,
    compactions: Vec<CompactionReport>,
    last_lsn: u64,
}

/// 64 appenders of 128 B for at least `seconds`, and until `busy` turns false; returns the
/// latencies, records/s and the seconds it ran.
async fn appenders(
    wbl: &Wbl,
    q: &Queues,
    seconds: f64,
    busy: Rc<Cell<bool>>,
) -> (LatencySummary, f64, f64) {
    let min_until = Instant::now() + Duration::from_secs_f64(seconds);
    let keep_going = move || Instant::now() < min_until || busy.get();
    let load = closed_loop(
        wbl,
        LAT_APPENDERS,
        LAT_PAYLOAD,
        Some(q.foreground),
        keep_going,
    )
    .await;
    (load.lat, load.records_per_s(), load.secs)
}

/// Phase 3: reopen the log and recover the state from the newest snapshot; 64×128 B appenders
/// idle, then the appended records applied and, while the appenders run again, a compaction of
/// the whole state (base file merged with the memtable, written and re-verified on the blocking
/// pool) in the background queue of the same executor. This compaction releases the churn log
/// below the previous snapshot. Sets the commit to the end of the log.
fn latency_phase(c: &'static CardSetup, dir: &Path, seconds: f64) -> LatencyResult {
    let d = dir.to_path_buf();
    exec::run_local(dir, move |q| async move {
        let (wbl, rep) = Wbl::open(d.join("wbl"), wbl_opts(&q))
            .await
            .expect("open wbl");
        let log_bytes_scanned = rep.bytes_scanned;
        let snapdir = d.join("snapshots");
        let mac = session(c);
        let r = recover_local(&snapdir, &wbl, &mac, IDEMPOTENCY_WINDOW_LSNS)
            .await
            .expect("recover");
        let state = Rc::new(RefCell::new(r.state));
        let never = Rc::new(Cell::new(false));
        let (idle, idle_rps, _) = appenders(&wbl, &q, seconds, never).await;
        let mut s = state.replace(StateMachine::new());
        replay(&wbl, &mut s, wbl.durable_lsn())
            .await
            .expect("apply");
        state.replace(s);
        let busy = Rc::new(Cell::new(true));
        let job = {
            let (wbl, busy, snapdir, state) =
                (wbl.clone(), busy.clone(), snapdir.clone(), state.clone());
            glommio::spawn_local_into(
                async move {
                    let mac = session(c);
                    let mut reports = Vec::new();
                    for i in 0..COMPACTIONS_UNDER_LOAD {
                        if i > 0 {
                            // Apply what the appenders wrote, as a node does, so the next
                            // compaction is at a new LSN.
                            let mut s = state.replace(StateMachine::new());
                            replay(&wbl, &mut s, wbl.durable_lsn())
                                .await
                                .expect("apply");
                            state.replace(s);
                        }
                        let r = compact(
                            &snapdir,
                            &state,
                            &wbl,
                            compaction_ctx(None),
                            &mac,
                            &CompactionConfig::default(),
                        )
                        .await
                        .expect("compact");
                        reports.push(r);
                    }
                    busy.set(false);
                    reports
                },
                q.background,
            )
            .expect("spawn compaction")
        };
        // The window is exactly the compactions: no minimum length.
        let (compacting, compacting_rps, compacting_window_s) =
            appenders(&wbl, &q, 0.0, busy).await;
        let compactions = job.await;
        let last_lsn = wbl.durable_lsn();
        wbl.set_hard_state(HardState {
            term: 1,
            vote: 1,
            commit: last_lsn,
        })
        .expect("hard state")
        .await
        .expect("durable");
        wbl.close().await.expect("close");
        LatencyResult {
            log_bytes_scanned,
            idle,
            idle_rps,
            compacting,
            compacting_rps,
            compacting_window_s,
            compactions,
            last_lsn,
        }
    })
    .expect("executor")
}

struct RestartResult {
    total_s: f64,
    card_session_s: f64,
    wbl_scan_s: f64,
    wbl_bytes_scanned: u64,
    snapshot_open_s: f64,
    replay_s: f64,
    records_replayed: u64,
    lsn_applied: u64,
    keys: u64,
}

/// A cold (page cache dropped) read + verify of the newest snapshot without building the state:
/// the I/O + check part of `open_state`.
fn snapshot_verify_only(c: &CardSetup, dir: &Path) -> f64 {
    let (_, path) = snapshot::list(&dir.join("snapshots"))
        .expect("list")
        .pop()
        .expect("a snapshot");
    let mac = session(c);
    drop_caches();
    let t = Instant::now();
    let s = Snapshot::open(&path, &mac).expect("open snapshot");
    assert!(s.mac_checked());
    t.elapsed().as_secs_f64()
}

/// Process-like start: card session, WBL open (recovery scan), then with `snapshot` the newest
/// snapshot + tail replay (`recover_local`), without it every record from LSN 1.
fn restart(c: &CardSetup, dir: &Path, with_snapshot: bool) -> RestartResult {
    drop_caches();
    let d = dir.to_path_buf();
    exec::run_local(dir, move |q| async move {
        let t0 = Instant::now();
        let mac = session(c);
        let card_session_s = t0.elapsed().as_secs_f64();
        let (wbl, rep, snapshot_open_s, replay_s, records_replayed, state) = if with_snapshot {
            // A node's start: the newest snapshot verifies on the blocking pool while the log
            // is scanned here.
            let s = open_and_recover(
                &d.join("snapshots"),
                &d.join("wbl"),
                wbl_opts(&q),
                &mac,
                IDEMPOTENCY_WINDOW_LSNS,
            )
            .await
            .expect("recover");
            let r = s.local;
            assert!(r.snapshot.is_some(), "recovery used a snapshot");
            let mut rep = s.wbl_report;
            rep.elapsed = s.wbl_open_duration;
            (
                s.wbl,
                rep,
                r.open_duration.as_secs_f64(),
                r.replay_duration.as_secs_f64(),
                r.records_replayed,
                r.state,
            )
        } else {
            let (wbl, rep) = Wbl::open(d.join("wbl"), wbl_opts(&q))
                .await
                .expect("open wbl");
            let mut state = StateMachine::new();
            let t = Instant::now();
            let n = replay(&wbl, &mut state, wbl.hard_state().commit)
                .await
                .expect("replay");
            (wbl, rep, 0.0, t.elapsed().as_secs_f64(), n, state)
        };
        let wbl_scan_s = rep.elapsed.as_secs_f64();
        let total_s = t0.elapsed().as_secs_f64();
        let out = RestartResult {
            total_s,
            card_session_s,
            wbl_scan_s,
            wbl_bytes_scanned: rep.bytes_scanned,
            snapshot_open_s,
            replay_s,
            records_replayed,
            lsn_applied: state.lsn_applied(),
            keys: state.key_count(),
        };
        wbl.close().await.expect("close");
        out
    })
    .expect("executor")
}

fn restart_json(r: &RestartResult) -> serde_json::Value {
    json!({
        "total_s": r.total_s,
        "card_session_s": r.card_session_s,
        "wbl_scan_s": r.wbl_scan_s,
        "wbl_bytes_scanned": r.wbl_bytes_scanned,
        "snapshot_open_after_wbl_s": r.snapshot_open_s,
        "replay_s": r.replay_s,
        "records_replayed": r.records_replayed,
        "lsn_applied": r.lsn_applied,
        "keys": r.keys,
    })
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir).expect("bench dir");
    let keys = args.keys;
    println!(
        "snapshot_bench: {keys} live keys, {PARTITIONS} partitions, dir {}",
        args.dir.display()
    );

    let card: &'static Card = Box::leak(Box::new(
        fixture().new_card("bench", "realm").expect("card"),
    ));
    let mut s = card.session().expect("session");
    let configs: Vec<Vec<u8>> = (0..PARTITIONS)
        .map(|p| s.create_partition(partition_id(p)).expect("partition"))
        .collect();
    let ik = s.create_integrity_key().expect("integrity key");
    drop(s);
    let setup: &'static CardSetup = Box::leak(Box::new(CardSetup { card, configs, ik }));

    println!("creating {} keys in the card (2 threads)...", 2 * keys);
    let (blobs, create_s) = create_blobs(setup, 2 * keys);
    let blob_bytes = blobs[0].len();
    println!(
        "  {} masked blobs of {blob_bytes} B in {create_s:.1} s ({:.1} us/key/thread)",
        blobs.len(),
        create_s * 2.0 * 1e6 / blobs.len() as f64
    );

    println!("appending and applying the churn mix with rolling compaction...");
    let cfg = CompactionConfig {
        records_threshold: args.compact_records,
        ..CompactionConfig::default()
    };
    let ch = churn_phase(setup, &args.dir, keys, blobs, cfg);
    println!(
        "  {} records, {:.1} MB of records in {:.1} s ({:.0} records/s); {} rejected; {} compactions",
        ch.records,
        ch.record_bytes as f64 / 1e6,
        ch.append_s,
        ch.records as f64 / ch.append_s,
        ch.rejected,
        ch.compactions.len()
    );
    let fin = ch.compactions.last().expect("final compaction");
    let snapshot_bytes = fin.file_bytes;
    println!("restart by full replay (the whole churn log)...");
    let full = restart(setup, &args.dir, false);
    println!("append latency idle, then while a compaction runs...");
    let lat = latency_phase(setup, &args.dir, args.seconds);
    let verify_only_s = snapshot_verify_only(setup, &args.dir);
    println!("restart with the snapshot...");
    let with = restart(setup, &args.dir, true);
    assert_eq!(with.keys, full.keys);

    let wbl_bytes = ch.record_bytes;
    let ratio = wbl_bytes as f64 / snapshot_bytes as f64;
    let mbps = |r: &CompactionReport| r.file_bytes as f64 / r.write_duration.as_secs_f64() / 1e6;
    let restart_ratio = full.total_s / with.total_s;
    let p99_ratio = lat.compacting.p99_us / lat.idle.p99_us;

    println!("{:<44} {:>16}", "figure", "value");
    let row = |k: &str, v: String| println!("{k:<44} {v:>16}");
    row("keys_live", format!("{}", ch.key_count));
    row("records_total (churn)", format!("{}", ch.records));
    row("wbl_bytes (encoded record bytes)", format!("{wbl_bytes}"));
    row(
        "snapshot key entry bytes",
        format!("{}", ch.key_entry_bytes),
    );
    row(
        "snapshot idempotency entries",
        format!("{}", ch.idempotency_entries),
    );
    row("snapshot_bytes", format!("{snapshot_bytes}"));
    row("ratio wbl/snapshot", format!("{ratio:.2}"));
    for (i, r) in ch.compactions.iter().enumerate() {
        row(
            &format!("compaction {i} at lsn {}", r.lsn),
            format!("{:.2} s {:.0} MB/s", r.duration.as_secs_f64(), mbps(r)),
        );
    }
    row(
        "state RSS MiB after churn",
        format!("{:.0}", ch.state_rss_mib),
    );
    row("restart_with_snapshot_s", format!("{:.3}", with.total_s));
    row("  card session", format!("{:.3}", with.card_session_s));
    row(
        "  wbl scan",
        format!("{:.3} ({} B)", with.wbl_scan_s, with.wbl_bytes_scanned),
    );
    row(
        "  snapshot verify (cold, alone)",
        format!("{verify_only_s:.3}"),
    );
    row(
        "  snapshot ready after the wbl scan",
        format!("{:.3}", with.snapshot_open_s),
    );
    row(
        "  replay tail",
        format!("{:.3} ({} rec)", with.replay_s, with.records_replayed),
    );
    row("restart_full_replay_s", format!("{:.3}", full.total_s));
    row("  wbl scan", format!("{:.3}", full.wbl_scan_s));
    row(
        "  replay all",
        format!("{:.3} ({} rec)", full.replay_s, full.records_replayed),
    );
    row("full/with-snapshot", format!("{restart_ratio:.2}"));
    row("append p99 us idle", format!("{:.0}", lat.idle.p99_us));
    row(
        "append p99 us compacting",
        format!("{:.0}", lat.compacting.p99_us),
    );
    row(
        "append max us compacting",
        format!("{:.0}", lat.compacting.max_us),
    );
    row("p99 compacting/idle", format!("{p99_ratio:.2}"));
    for r in &lat.compactions {
        row(
            "compaction under append load s",
            format!("{:.3}", r.duration.as_secs_f64()),
        );
    }
    row(
        "compacting window s",
        format!("{:.3}", lat.compacting_window_s),
    );

    let compaction_json = |r: &CompactionReport| {
        json!({
            "lsn": r.lsn,
            "lsn_previous": r.lsn_previous,
            "memtable_key_versions": r.memtable_key_versions,
            "file_bytes": r.file_bytes,
            "write_s": r.write_duration.as_secs_f64(),
            "verify_s": r.verify_duration.as_secs_f64(),
            "total_s": r.duration.as_secs_f64(),
            "write_mb_per_s": mbps(r),
            "wbl_first_lsn_after": r.wbl_first_lsn,
        })
    };
    let result = json!({
        "benchmark": "snapshot_bench",
        "keys_requested": keys,
        "keys_live": ch.key_count,
        "partitions": PARTITIONS,
        "mix": {
            "creates": 2 * keys, "updates": 2 * keys, "deletes": keys,
            "partition_creates": PARTITIONS,
            "idempotency_ids": "every key record carries one",
            "metadata_bytes_approx": metadata(0, 0).len(),
            "masked_blob_bytes": blob_bytes,
        },
        "card_create_s": create_s,
        "records_total": ch.records,
        "churn_append_apply_s": ch.append_s,
        "churn_records_per_s": ch.records as f64 / ch.append_s,
        "rejected_records": ch.rejected,
        "wbl_bytes": wbl_bytes,
        "wbl_bytes_meaning": "sum of encoded record bytes (header + payload + trailer) of the churn log; batch padding and segment headers excluded",
        "snapshot_bytes": snapshot_bytes,
        "ratio_wbl_over_snapshot": ratio,
        "snapshot_key_entry_bytes": ch.key_entry_bytes,
        "idempotency_entries_in_snapshot": ch.idempotency_entries,
        "idempotency_entry_bytes_in_snapshot": ch.idempotency_entries * keyfort_engine::state::IDEMPOTENCY_ENTRY_BYTES,
        "state_rss_mib_after_churn": ch.state_rss_mib,
        "rss_mib_peak_at_compaction_start": ch.memtable_rss_mib_peak,
        "compaction_records_threshold": args.compact_records,
        "compactions_during_churn": ch.compactions.iter().map(compaction_json).collect::<Vec<_>>(),
        "compaction_s": fin.duration.as_secs_f64(),
        "compaction_mb_per_s": mbps(fin),
        "compactions_under_append_load": lat.compactions.iter().map(compaction_json).collect::<Vec<_>>(),
        "restart_with_snapshot_s": with.total_s,
        "restart_full_replay_s": full.total_s,
        "restart_speedup": restart_ratio,
        "restart_with_snapshot": restart_json(&with),
        "restart_full_replay": restart_json(&full),
        "snapshot_read_verify_cold_s": verify_only_s,
        "page_cache_dropped_before_restarts": drop_caches(),
        "append_latency_us_p99_idle": lat.idle.p99_us,
        "append_latency_us_p99_compacting": lat.compacting.p99_us,
        "append_p99_ratio": p99_ratio,
        "append_idle": lat.idle,
        "append_idle_records_per_s": lat.idle_rps,
        "append_compacting": lat.compacting,
        "append_compacting_records_per_s": lat.compacting_rps,
        "append_compacting_window_s": lat.compacting_window_s,
        "appenders": LAT_APPENDERS,
        "append_payload_bytes": LAT_PAYLOAD,
        "wbl_bytes_scanned_at_latency_phase_open": lat.log_bytes_scanned,
        "last_lsn": lat.last_lsn,
        "machine": machine(),
        "loadavg_at_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "date": utc_date(),
        "command": format!("cargo run --release -p keyfort-bench --bin snapshot_bench -- --out docs/bench/snapshot.json --keys {keys}"),
    });
    if let Some(out) = &args.out {
        write_json(out, &result).expect("write json");
        println!("wrote {}", out.display());
    }
    if std::env::var_os("KEYFORT_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&args.dir);
    }
}
