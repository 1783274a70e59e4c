//! `keyfort demo`'s snapshot drill (issue 4): rolling snapshots and local recovery, with real
//! processes, a real card and a real SIGKILL.
//!
//! A child process (`keyfort demo-shard-writer`) runs every shard's write path as a node will, one
//! executor per core: masked keys made in node-1's card, records appended through the shard's WBL
//! and applied to its state machine once durable, the commit persisted every
//! `COMMIT_EVERY_RECORDS`, and a rolling compaction into a card-MACed snapshot file in the
//! background queue every `DRILL_COMPACTION_RECORDS`. It reports the commits it made durable and
//! each snapshot it wrote. The parent SIGKILLs it mid-flight, then recovers every shard on its own
//! executor (the newest snapshot that verifies in the card, then the log up to the persisted
//! commit), prints what each phase took, and fails if a shard recovered below a reported commit.

use crate::demo::{
    join_shards, keyfort_child, node_card, pin_plan, run_then_kill, shard_dir, shard_report,
    ACK_REPORT_EVERY, INTEGRITY_KEY_FILE, PARTITION_CONFIG_FILE, USER_PIN_FILE,
};
use crate::snapshot_cmd::session;
use glommio::TaskQueueHandle;
use keyfort_engine::compaction::{
    compact, compaction_due, CompactionConfig, CompactionContext, COMPACTION_RECORDS_THRESHOLD,
};
use keyfort_engine::exec::{self, Queues};
use keyfort_engine::recovery::open_and_recover;
use keyfort_engine::state::{
    IdempotencyId, KeyPut, KeyState, Op, PutOp, StateMachine, IDEMPOTENCY_WINDOW_LSNS,
};
use keyfort_engine::wbl::{Durable, HardState, RecordKind, Wbl, WblOptions};
use keyfort_hsm::pin::USER_PIN_FILE_ENV;
use keyfort_hsm::softhsm::open_token_dir;
use keyfort_hsm::{CoreSession, KeyHeader, KeyId, PartitionId};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Records since the last snapshot that make a compaction due in the drill. Production's
/// threshold ([`COMPACTION_RECORDS_THRESHOLD`], 2^20 records, ~200 MiB of log) takes minutes of
/// writes; this one rolls several snapshots per shard within the drill's seconds.
const DRILL_COMPACTION_RECORDS: u64 = 5_000;
/// The writer persists the commit (the hard state) every this many applied records.
const COMMIT_EVERY_RECORDS: u64 = 256;
/// Records appended per shard and not yet applied: the pipeline that keeps group commit busy.
const DRILL_IN_FLIGHT: usize = 1024;
/// Term of every drill record, and the shard's one voter (this node): with one voter a durable
/// record is committed.
const DRILL_TERM: u64 = 1;
const DRILL_NODE: u64 = 1;

/// One step of the drill's record mix.
#[derive(Clone, Copy, Debug)]
enum Step {
    Create,
    Update,
    Delete,
}

/// The record mix, repeated: per 8 records 4 key creates, 2 metadata updates and 2 deletes, so
/// the key count grows while every kind of key change reaches the log and the snapshots.
const MIX: [Step; 8] = [
    Step::Create,
    Step::Create,
    Step::Update,
    Step::Create,
    Step::Delete,
    Step::Create,
    Step::Update,
    Step::Delete,
];

/// The card every shard uses (node-1's in the demo): where it is, the cluster integrity key that
/// MACs snapshot footers, and the partition the keys are made under.
#[derive(Clone, Debug, clap::Args)]
pub struct DrillCard {
    #[arg(long)]
    pub token_dir: PathBuf,
    #[arg(long)]
    pub label: String,
    /// The wrapped cluster integrity key (`keyfort card integrity-key`).
    #[arg(long)]
    pub integrity_key: PathBuf,
    /// The partition config (`keyfort card partition-create`).
    #[arg(long)]
    pub partition_config: PathBuf,
}

impl DrillCard {
    /// Node-1's card of the card demo in `cards`.
    fn of_demo(cards: &Path) -> DrillCard {
        let (token_dir, label) = node_card(cards, 1);
        DrillCard {
            token_dir,
            label,
            integrity_key: cards.join(INTEGRITY_KEY_FILE),
            partition_config: cards.join(PARTITION_CONFIG_FILE),
        }
    }

    fn pass_to(&self, cmd: &mut Command) {
        cmd.arg("--token-dir")
            .arg(&self.token_dir)
            .args(["--label", &self.label])
            .arg("--integrity-key")
            .arg(&self.integrity_key)
            .arg("--partition-config")
            .arg(&self.partition_config);
    }

    /// A session on the card with the integrity key loaded.
    fn session(&self) -> Result<CoreSession, String> {
        session(&self.token_dir, &self.label, &self.integrity_key)
    }
}

#[derive(Debug, clap::Args)]
pub struct ShardWriterArgs {
    /// The drill's directory: `shard-N/wbl` and `shard-N/snapshots` per shard.
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long)]
    pub shards: usize,
    #[command(flatten)]
    pub card: DrillCard,
}

/// What the parent read from the writer's report lines, per shard.
struct Seen {
    /// Highest commit reported durable.
    commit: Vec<u64>,
    /// Snapshots written, and their total compaction time in ms.
    snapshots: Vec<u64>,
    compaction_ms: Vec<f64>,
}

impl Seen {
    fn new(shards: usize) -> Seen {
        Seen {
            commit: vec![0; shards],
            snapshots: vec![0; shards],
            compaction_ms: vec![0.0; shards],
        }
    }

    /// `commit SHARD LSN` or `snapshot SHARD LSN MS`.
    fn line(&mut self, line: &str) {
        if let Some((s, lsn)) = shard_report(line, "commit") {
            if let Some(c) = self.commit.get_mut(s) {
                *c = (*c).max(lsn);
            }
        } else if let Some((s, _)) = shard_report(line, "snapshot") {
            let ms = line
                .split_whitespace()
                .nth(3)
                .and_then(|m| m.parse::<f64>().ok());
            if let (Some(n), Some(t), Some(ms)) =
                (self.snapshots.get_mut(s), self.compaction_ms.get_mut(s), ms)
            {
                *n += 1;
                *t += ms;
            }
        }
    }
}

/// What recovering one shard found and how long each phase took.
struct Recovered {
    lsn_applied: u64,
    /// LSN of the snapshot used; `None`: rebuilt from the empty state.
    snapshot: Option<u64>,
    skipped: usize,
    replayed: u64,
    keys: u64,
    /// Card session with the integrity key loaded.
    card: Duration,
    /// WBL open: the recovery scan of every segment.
    wbl: Duration,
    /// Finding, verifying (card MAC included) and loading the snapshot.
    snapshot_open: Duration,
    replay: Duration,
    total: Duration,
}

/// The parent side: start the shard writer, kill it, recover every shard, report.
pub fn snapshot_drill(dir: &Path, shards: usize, seconds: f64) -> crate::CmdResult {
    let cards = dir.join("cards");
    let card = DrillCard::of_demo(&cards);
    let drill = dir.join("snapshot");
    println!(
        "== snapshot drill: {shards} shard(s), one executor per core; masked keys made in {}'s card, applied once durable, commit persisted every {COMMIT_EVERY_RECORDS} records, a rolling snapshot every {DRILL_COMPACTION_RECORDS} records (production: {COMPACTION_RECORDS_THRESHOLD})",
        card.label
    );
    // Every shard starts from the empty state: a drill directory left by an earlier run goes.
    match std::fs::remove_dir_all(&drill) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("{}: {e}", drill.display()))
        }
        _ => {}
    }
    std::fs::create_dir_all(&drill).map_err(|e| format!("{}: {e}", drill.display()))?;
    let mut cmd = keyfort_child("demo-shard-writer")?;
    cmd.arg("--dir")
        .arg(&drill)
        .args(["--shards", &shards.to_string()])
        .env(USER_PIN_FILE_ENV, cards.join(USER_PIN_FILE));
    card.pass_to(&mut cmd);
    let run = run_then_kill(cmd, seconds, Seen::new(shards), Seen::line)?;
    let seen = run.seen;
    let written: u64 = seen.snapshots.iter().sum();
    println!(
        "writer SIGKILLed after {:.2} s: {} records committed, {written} snapshots written (mean {:.1} ms each: merge and write, re-verify, card MAC); recovering every shard: newest snapshot that verifies in the card, then the log up to the persisted commit",
        run.ran_s,
        seen.commit.iter().sum::<u64>(),
        seen.compaction_ms.iter().sum::<f64>() / written.max(1) as f64,
    );

    let t0 = Instant::now();
    let recovered = recover_all(&drill, &card, shards)?;
    let all = t0.elapsed();
    println!(
        "{:>5} {:>9} {:>9} {:>9} {:>7} {:>8} {:>7} {:>5} {:>7} {:>7} {:>7} {:>9} {:>8}",
        "shard",
        "commit",
        "recovered",
        "snapshot",
        "skipped",
        "replayed",
        "keys",
        "snaps",
        "card ms",
        "wbl ms",
        "snap ms",
        "replay ms",
        "total ms"
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut lost = Vec::new();
    for (s, r) in recovered.iter().enumerate() {
        println!(
            "{:>5} {:>9} {:>9} {:>9} {:>7} {:>8} {:>7} {:>5} {:>7.1} {:>7.1} {:>7.1} {:>9.1} {:>8.1}",
            s,
            seen.commit[s],
            r.lsn_applied,
            r.snapshot.map_or("none".to_string(), |l| l.to_string()),
            r.skipped,
            r.replayed,
            r.keys,
            seen.snapshots[s],
            ms(r.card),
            ms(r.wbl),
            ms(r.snapshot_open),
            ms(r.replay),
            ms(r.total),
        );
        if r.lsn_applied < seen.commit[s] {
            lost.push(format!(
                "shard {s}: commit {} reported but recovered to {}",
                seen.commit[s], r.lsn_applied
            ));
        }
    }
    println!(
        "recovered all {shards} shard(s) in {:.1} ms (in parallel, one executor each); {:.1} ms after the kill",
        ms(all),
        ms(run.killed_at.elapsed())
    );
    if lost.is_empty() {
        println!("every reported commit is recovered");
        Ok(())
    } else {
        Err(format!("reported commits lost: {}", lost.join("; ")))
    }
}

/// Recovers every shard on its own executor (as a node's start-up does), in shard order.
fn recover_all(drill: &Path, card: &DrillCard, shards: usize) -> Result<Vec<Recovered>, String> {
    // This process's one C_Initialize, before any executor thread starts; each shard's session
    // then finds the module initialised.
    open_token_dir(&card.token_dir).map_err(|e| e.to_string())?;
    let cores: Vec<Option<usize>> = vec![None; shards];
    let (base, card) = (drill.to_path_buf(), card.clone());
    let handles = exec::spawn_per_core(&cores, drill, move |shard, _q| {
        let (sdir, card) = (shard_dir(&base, shard), card.clone());
        async move { recover_shard(&sdir, &card).await }
    })
    .map_err(|e| format!("executors: {e}"))?;
    join_shards(handles)
}

async fn recover_shard(sdir: &Path, card: &DrillCard) -> Result<Recovered, String> {
    let t = Instant::now();
    let mac = card.session()?;
    let card_open = t.elapsed();
    // The node's start path: the newest snapshot verifies on the blocking pool while the log
    // is scanned; "snapshot" below is what remained after the scan (wait, MAC, chain check).
    let start = open_and_recover(
        &sdir.join("snapshots"),
        &sdir.join("wbl"),
        WblOptions::default(),
        &mac,
        IDEMPOTENCY_WINDOW_LSNS,
    )
    .await
    .map_err(|e| e.to_string())?;
    let wbl_open = start.wbl_open_duration;
    let r = start.local;
    let total = t.elapsed();
    start.wbl.close().await.map_err(|e| e.to_string())?;
    Ok(Recovered {
        lsn_applied: r.state.lsn_applied(),
        snapshot: r.snapshot.is_some().then_some(r.lsn_snapshot),
        skipped: r.skipped.len(),
        replayed: r.records_replayed,
        keys: r.state.key_count(),
        card: card_open,
        wbl: wbl_open,
        snapshot_open: r.open_duration,
        replay: r.replay_duration,
        total,
    })
}

/// The child side: every shard writes until the process is killed (or its stdout closes). The
/// first shard to fail fails the process, its error on stderr.
pub fn shard_writer(args: ShardWriterArgs) -> crate::CmdResult {
    // This process's one C_Initialize, before any executor thread starts.
    open_token_dir(&args.card.token_dir).map_err(|e| e.to_string())?;
    let config = std::fs::read(&args.card.partition_config)
        .map_err(|e| format!("{}: {e}", args.card.partition_config.display()))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let (base, card) = (args.dir.clone(), args.card.clone());
    let _executors = exec::spawn_per_core(&pin_plan(args.shards), &args.dir, move |shard, q| {
        let (sdir, card, config, tx) = (
            shard_dir(&base, shard),
            card.clone(),
            config.clone(),
            tx.clone(),
        );
        async move {
            let r = write_shard(shard, &sdir, &card, config, q).await;
            let _ = tx.send((shard, r));
        }
    })
    .map_err(|e| format!("executors: {e}"))?;
    match rx.recv() {
        Ok((s, Err(e))) => Err(format!("shard {s}: {e}")),
        // Stdout closed: the demo is gone.
        _ => Ok(()),
    }
}

/// One shard's progress, shared by its write loop and its background tasks.
#[derive(Default)]
struct Progress {
    /// Highest commit whose hard state is durable.
    committed: Cell<u64>,
    compacting: Cell<bool>,
    /// A background compaction's error.
    failed: Cell<Option<String>>,
    /// Stdout is closed.
    stopped: Cell<bool>,
}

/// Writes one report line to stdout; false once stdout is closed.
fn say(line: &str) -> bool {
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes())
        .and_then(|()| out.flush())
        .is_ok()
}

/// The shard's write path: append, apply once durable, persist the commit, compact when due.
async fn write_shard(
    shard: usize,
    sdir: &Path,
    card: &DrillCard,
    config: Vec<u8>,
    q: Queues,
) -> Result<(), String> {
    let mut keys = card.session()?;
    let partition = keys
        .import_partition(&config)
        .map_err(|e| format!("{}: {e}", card.partition_config.display()))?;
    // Compaction MACs footers in a session of its own: its background task holds it across
    // awaits while this loop makes keys in `keys`.
    let mac = Rc::new(card.session()?);
    let opts = WblOptions {
        writer_queue: Some(q.foreground),
        background_queue: Some(q.background),
        ..WblOptions::default()
    };
    let (wbl, _) = Wbl::open(sdir.join("wbl"), opts)
        .await
        .map_err(|e| e.to_string())?;
    let snapdir = sdir.join("snapshots");
    std::fs::create_dir_all(&snapdir).map_err(|e| format!("{}: {e}", snapdir.display()))?;
    let progress = Rc::new(Progress::default());
    // Reports and commit waiters run in the foreground queue, so they keep up with the loop.
    glommio::spawn_local_into(report_commits(shard, progress.clone()), q.foreground)
        .map_err(|e| format!("spawn reporter: {e}"))?
        .detach();
    let state = Rc::new(RefCell::new(StateMachine::new()));
    let cfg = CompactionConfig {
        records_threshold: DRILL_COMPACTION_RECORDS,
        ..CompactionConfig::default()
    };
    let mut work = Workload::new(partition, config);
    let mut inflight: VecDeque<(Durable, u64, RecordKind, Vec<u8>)> = VecDeque::new();
    let mut last_compacted = 0u64;
    loop {
        let lsn = wbl.last_lsn() + 1;
        let op = work.next(&mut keys, lsn)?;
        let (kind, payload) = (op.kind(), op.encode());
        let d = wbl
            .append(kind, lsn, DRILL_TERM, payload.clone())
            .map_err(|e| e.to_string())?;
        inflight.push_back((d, lsn, kind, payload));
        if inflight.len() < DRILL_IN_FLIGHT {
            continue;
        }
        let (d, lsn, kind, payload) = inflight.pop_front().expect("a full pipeline");
        d.await.map_err(|e| e.to_string())?;
        // Applied only once durable: with one voter, durable is committed.
        let r = state
            .borrow_mut()
            .apply(lsn, kind, &payload)
            .map_err(|e| e.to_string())?;
        if r.outcome.code.is_rejected() {
            return Err(format!(
                "lsn {lsn}: {kind:?} rejected: {:?}",
                r.outcome.code
            ));
        }
        if lsn % COMMIT_EVERY_RECORDS == 0 {
            persist_commit(&wbl, lsn, &progress, q.foreground)?;
        }
        if let Some(e) = progress.failed.take() {
            return Err(e);
        }
        if progress.stopped.get() {
            return Ok(());
        }
        if !progress.compacting.get() && compaction_due(lsn, last_compacted, &cfg) {
            last_compacted = lsn;
            progress.compacting.set(true);
            let task = compact_in_background(
                shard,
                snapdir.clone(),
                state.clone(),
                wbl.clone(),
                mac.clone(),
                cfg.clone(),
                progress.clone(),
            );
            glommio::spawn_local_into(task, q.background)
                .map_err(|e| format!("spawn compaction: {e}"))?
                .detach();
        }
        glommio::yield_if_needed().await;
    }
}

/// Persists `commit` in the hard state; once that is durable, it is the shard's reported commit.
fn persist_commit(
    wbl: &Wbl,
    commit: u64,
    progress: &Rc<Progress>,
    queue: TaskQueueHandle,
) -> Result<(), String> {
    let d = wbl
        .set_hard_state(HardState {
            term: DRILL_TERM,
            vote: DRILL_NODE,
            commit,
        })
        .map_err(|e| e.to_string())?;
    let p = progress.clone();
    let wait = async move {
        if d.await.is_ok() {
            p.committed.set(p.committed.get().max(commit));
        }
    };
    glommio::spawn_local_into(wait, queue)
        .map_err(|e| format!("spawn commit waiter: {e}"))?
        .detach();
    Ok(())
}

/// Reports `commit SHARD LSN` whenever the durable commit moved (only commits whose hard state
/// is durable: the drill's "acknowledged").
async fn report_commits(shard: usize, progress: Rc<Progress>) {
    let mut reported = 0;
    while !progress.stopped.get() {
        glommio::timer::sleep(ACK_REPORT_EVERY).await;
        let c = progress.committed.get();
        if c > reported {
            reported = c;
            if !say(&format!("commit {shard} {c}\n")) {
                progress.stopped.set(true);
            }
        }
    }
}

/// One rolling compaction (the background queue); reports `snapshot SHARD LSN MS`.
async fn compact_in_background(
    shard: usize,
    snapdir: PathBuf,
    state: Rc<RefCell<StateMachine>>,
    wbl: Wbl,
    mac: Rc<CoreSession>,
    cfg: CompactionConfig,
    progress: Rc<Progress>,
) {
    let ctx = CompactionContext {
        voters: vec![DRILL_NODE],
        ..CompactionContext::default()
    };
    match compact(&snapdir, &state, &wbl, ctx, &*mac, &cfg).await {
        Ok(r) => {
            let ms = r.duration.as_secs_f64() * 1e3;
            if !say(&format!("snapshot {shard} {} {ms:.1}\n", r.lsn)) {
                progress.stopped.set(true);
            }
        }
        Err(e) => progress.failed.set(Some(format!("compaction: {e}"))),
    }
    progress.compacting.set(false);
}

/// The drill's records: the partition first, then [`MIX`] over keys with real masked blobs.
struct Workload {
    partition: PartitionId,
    /// The partition config, until the partition's record is made.
    config: Option<Vec<u8>>,
    /// Live keys, oldest first (deletes take the oldest).
    live: VecDeque<KeyId>,
    steps: usize,
}

impl Workload {
    fn new(partition: PartitionId, config: Vec<u8>) -> Workload {
        Workload {
            partition,
            config: Some(config),
            live: VecDeque::new(),
            steps: 0,
        }
    }

    /// The record at `lsn`; a create makes its key in the card (`keys`).
    fn next(&mut self, keys: &mut CoreSession, lsn: u64) -> Result<Op, String> {
        let partition = self.partition;
        if let Some(config) = self.config.take() {
            return Ok(Op::PartitionCreate { partition, config });
        }
        let step = MIX[self.steps % MIX.len()];
        self.steps += 1;
        let idempotency_id = idempotency_id(lsn);
        let metadata = format!("owner=team-{:03} gen={lsn}", lsn % 997).into_bytes();
        let put = |op, key_id, blob| {
            Op::KeyPut(KeyPut {
                op,
                idempotency_id,
                header: KeyHeader::aes(partition, key_id, 1),
                version_replaced: 0,
                state: KeyState::Enabled,
                metadata,
                blob,
            })
        };
        Ok(match step {
            Step::Update if !self.live.is_empty() => {
                let key_id = self.live[lsn as usize % self.live.len()];
                put(PutOp::Update, key_id, Vec::new())
            }
            Step::Delete if !self.live.is_empty() => {
                let key_id = self.live.pop_front().expect("not empty");
                Op::KeyDelete {
                    idempotency_id,
                    partition,
                    key_id,
                }
            }
            _ => {
                let key_id = KeyId::random();
                let blob = keys
                    .create_key(&KeyHeader::aes(partition, key_id, 1))
                    .map_err(|e| e.to_string())?;
                self.live.push_back(key_id);
                put(PutOp::Create, key_id, blob)
            }
        })
    }
}

/// A client's idempotency id for the record at `lsn`: unique in the shard, never all zeros.
fn idempotency_id(lsn: u64) -> IdempotencyId {
    let mut b = [0x1du8; 16];
    b[..8].copy_from_slice(&lsn.to_le_bytes());
    IdempotencyId(b)
}
