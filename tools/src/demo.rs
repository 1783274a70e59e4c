//! `keyfort demo`: the README's main job on the embedded defaults. It grows with every issue; today
//! it runs what exists:
//! 1. the card: a ceremony for three SoftHSM cards of one realm, a partition made on one card and
//!    imported on the others, masked keys created on one card and used on another;
//! 2. the WBL crash drill: a child process appends through the WBL on every core with many
//!    concurrent appenders, is SIGKILLed mid-flight, and every shard's log is reopened: the drill
//!    prints what recovery found and how long it took, and checks no acknowledged record was lost;
//! 3. the snapshot drill ([`crate::demo_snapshot`]): a child process runs every shard's write path
//!    (masked keys made in node-1's card, appended, applied once durable, the commit persisted,
//!    rolling snapshots compacted in the background), is SIGKILLed, and every shard recovers from
//!    its newest verified snapshot plus the log: the drill prints what each phase took and checks
//!    no reported commit was lost;
//! 4. the cluster drill ([`crate::demo_cluster`]): three `keyfortd` processes replicate two
//!    shards with raft over their logs; clients create partitions and keys and encrypt over the
//!    client protocol while the leader is SIGKILLed (the client-visible write gap is measured),
//!    the killed node restarts from its own log and catches up, a follower's disk is wiped and it
//!    rejoins from its peers; every acknowledged key then decrypts on every node.

use keyfort_engine::exec;
use keyfort_engine::wbl::{RecordKind, Wbl, WblOptions};
use keyfort_hsm::pin::USER_PIN_FILE_ENV;
use std::cell::Cell;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Concurrent appenders per shard in the crash drill.
const DRILL_APPENDERS: usize = 64;
/// Payload of each drill record (the size of a masked key record).
const DRILL_PAYLOAD_BYTES: usize = 128;
/// How often a writer child reports its acknowledged (or committed) LSNs.
pub(crate) const ACK_REPORT_EVERY: Duration = Duration::from_millis(5);

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Where the demo keeps its cards and logs (wiped first by scripts/demo.sh).
    #[arg(long, default_value = ".kf/demo")]
    pub data_dir: PathBuf,
    /// How long the writer appends before it is SIGKILLed.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Shards (one WBL each, one executor per shard); default: one per core.
    #[arg(long)]
    pub shards: Option<usize>,
    /// Run one part only: cards, wbl, snapshot or cluster.
    #[arg(long)]
    pub only: Option<String>,
}

pub fn run(args: DemoArgs) -> crate::CmdResult {
    let shards = args
        .shards
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let cards = args.data_dir.join("cards");
    // The card sessions of this process (the snapshot drill's recovery) and of its children use
    // the demo's PIN file; set once, before any thread of this process starts.
    std::env::set_var(USER_PIN_FILE_ENV, cards.join(USER_PIN_FILE));
    let part = |p: &str| args.only.as_deref().is_none_or(|o| o == p);
    if let Some(o) = args.only.as_deref() {
        if !["cards", "wbl", "snapshot", "cluster"].contains(&o) {
            return Err(format!(
                "--only {o:?}: expected cards, wbl, snapshot or cluster"
            ));
        }
    }
    if part("cards") || part("snapshot") {
        cards_demo(&cards)?;
    }
    if part("wbl") {
        wbl_crash_drill(&args.data_dir.join("wbl"), shards, args.seconds)?;
    }
    if part("snapshot") {
        crate::demo_snapshot::snapshot_drill(&args.data_dir, shards, args.seconds)?;
    }
    if part("cluster") {
        crate::demo_cluster::cluster_drill(&args.data_dir.join("cluster"))?;
    }
    Ok(())
}

/// Files of the card demo's directory that the snapshot drill uses.
pub(crate) const USER_PIN_FILE: &str = "user.pin";
pub(crate) const PARTITION_CONFIG_FILE: &str = "partition.cfg";
pub(crate) const INTEGRITY_KEY_FILE: &str = "integrity.key";

/// Node `n`'s card in the card demo's directory: its token directory and token label.
pub(crate) fn node_card(cards: &Path, n: usize) -> (PathBuf, String) {
    (cards.join(format!("node-{n}/card")), format!("node-{n}"))
}

/// Nodes (one card each, each in its own token directory) in the card demo.
const DEMO_NODES: usize = 3;

/// Runs `keyfort card ARGS` as a child process (each card lives in its own process, as each
/// node's will) and returns its stdout; a failure carries the child's stderr.
fn card_cli(pins: &Path, args: &[&str]) -> Result<String, String> {
    let out = keyfort_child("card")?
        .args(args)
        .env(USER_PIN_FILE_ENV, pins.join(USER_PIN_FILE))
        .env("KEYFORT_SO_PIN_FILE", pins.join("so.pin"))
        .output()
        .map_err(|e| format!("keyfort card {}: {e}", args[0]))?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// One timed demo step: prints what the card said and how long the whole process took.
fn step(what: &str, pins: &Path, args: &[&str]) -> Result<String, String> {
    let t = Instant::now();
    let out = card_cli(pins, args).map_err(|e| format!("{what}: {e}"))?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    println!(
        "{what:<44} {ms:>7.1} ms  {}",
        out.lines().last().unwrap_or("")
    );
    Ok(out)
}

/// The card: ceremony for three cards of one realm, a partition shared by all of them, a masked
/// key made on one card and used on the others, and a card of another realm refused.
fn cards_demo(dir: &Path) -> crate::CmdResult {
    println!("== cards: {DEMO_NODES} SoftHSM cards of one realm (times include process start and C_Initialize)");
    let io = |e: std::io::Error| format!("{}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(io)?;
    // Development PINs, in files only the demo reads: never on a command line or in a log.
    std::fs::write(dir.join(USER_PIN_FILE), random_pin()).map_err(io)?;
    std::fs::write(dir.join("so.pin"), random_pin()).map_err(io)?;
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let (kit, rogue_kit) = (p("kit"), p("kit-other-realm"));
    step(
        "ceremony kit (vendor KBK, adapter KBK)",
        dir,
        &["ceremony-kit", "--out", &kit, "--realm", "demo-realm"],
    )?;
    step(
        "ceremony kit of another realm, same vendor",
        dir,
        &[
            "ceremony-kit",
            "--out",
            &rogue_kit,
            "--realm",
            "other-realm",
            "--same-vendor-as",
            &kit,
        ],
    )?;
    let node = |n: usize| {
        let (td, label) = node_card(dir, n);
        (td.to_string_lossy().into_owned(), label)
    };
    for n in 1..=DEMO_NODES {
        let (td, label) = node(n);
        step(
            &format!("card init {label} (SO loads both layers)"),
            dir,
            &["init", "--token-dir", &td, "--label", &label, "--kit", &kit],
        )?;
    }
    let cfg = p(PARTITION_CONFIG_FILE);
    let (td1, l1) = node(1);
    step(
        "partition create on node-1",
        dir,
        &[
            "partition-create",
            "--token-dir",
            &td1,
            "--label",
            &l1,
            "--out",
            &cfg,
        ],
    )?;
    step(
        "cluster integrity key made on node-1",
        dir,
        &[
            "integrity-key",
            "--token-dir",
            &td1,
            "--label",
            &l1,
            "--out",
            &p(INTEGRITY_KEY_FILE),
        ],
    )?;
    for n in 2..=DEMO_NODES {
        let (td, label) = node(n);
        step(
            &format!("partition import on {label}"),
            dir,
            &[
                "partition-import",
                "--token-dir",
                &td,
                "--label",
                &label,
                "--config",
                &cfg,
            ],
        )?;
    }
    let (blob, msg, env, back) = (
        p("key.blob"),
        p("message.txt"),
        p("message.env"),
        p("message.out"),
    );
    let secret = b"keyfort demo: plaintext only the cards of one realm can recover";
    std::fs::write(&msg, secret).map_err(io)?;
    step(
        "masked key created on node-1",
        dir,
        &[
            "key-create",
            "--token-dir",
            &td1,
            "--label",
            &l1,
            "--config",
            &cfg,
            "--out",
            &blob,
        ],
    )?;
    let (td2, l2) = node(2);
    let (td3, l3) = node(DEMO_NODES);
    let kio = |i: &str, o: &str| {
        vec![
            "--config".to_string(),
            cfg.clone(),
            "--blob".into(),
            blob.clone(),
            "--in".into(),
            i.into(),
            "--out".into(),
            o.into(),
            "--aad".into(),
            "demo".into(),
        ]
    };
    let args = |op: &str, td: &str, l: &str, i: &str, o: &str| {
        let mut v = vec![
            op.to_string(),
            "--token-dir".into(),
            td.into(),
            "--label".into(),
            l.into(),
        ];
        v.extend(kio(i, o));
        v
    };
    let a = args("encrypt", &td2, &l2, &msg, &env);
    step(
        "encrypt on node-2 with node-1's key",
        dir,
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let a = args("decrypt", &td3, &l3, &env, &back);
    step(
        &format!("decrypt on node-{DEMO_NODES}"),
        dir,
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    if std::fs::read(&back).map_err(io)? != secret {
        return Err("decrypt on another card returned different bytes".into());
    }
    let rogue = p("rogue/card");
    step(
        "card init rogue (another realm)",
        dir,
        &[
            "init",
            "--token-dir",
            &rogue,
            "--label",
            "rogue",
            "--kit",
            &rogue_kit,
        ],
    )?;
    match card_cli(
        dir,
        &[
            "partition-import",
            "--token-dir",
            &rogue,
            "--label",
            "rogue",
            "--config",
            &cfg,
        ],
    ) {
        Ok(_) => return Err("a card of another realm imported the partition config".into()),
        Err(e) => println!("{:<44} refused: {e}", "partition import on the rogue card"),
    }
    println!("every card of the realm uses the shared key; the other realm's card is refused");
    Ok(())
}

/// A random development PIN (hex of 16 random bytes from the OS).
fn random_pin() -> String {
    let mut b = [0u8; 16];
    let f = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    f.expect("/dev/urandom is readable");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn shard_dir(dir: &Path, shard: usize) -> PathBuf {
    dir.join(format!("shard-{shard}"))
}

/// The parent side: start the writer, kill it, reopen, report.
fn wbl_crash_drill(dir: &Path, shards: usize, seconds: f64) -> crate::CmdResult {
    println!("== WBL crash drill: {shards} shard(s), one executor per core, {DRILL_APPENDERS} appenders each, {DRILL_PAYLOAD_BYTES} B records");
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut cmd = keyfort_child("demo-wbl-writer")?;
    cmd.arg("--dir")
        .arg(dir)
        .args(["--shards", &shards.to_string()]);
    let acked = |highest: &mut Vec<u64>, line: &str| {
        if let Some((s, l)) = shard_report(line, "ack") {
            if let Some(a) = highest.get_mut(s) {
                *a = (*a).max(l);
            }
        }
    };
    let run = run_then_kill(cmd, seconds, vec![0u64; shards], acked)?;
    let (acked, killed_at) = (run.seen, run.killed_at);
    println!(
        "writer SIGKILLed after {:.2} s; reopening every shard's log",
        run.ran_s
    );

    let t0 = Instant::now();
    let reports = reopen_all(dir, shards)?;
    let all_s = t0.elapsed().as_secs_f64();
    println!(
        "{:>5} {:>10} {:>10} {:>9} {:>8} {:>10} {:>9} {:>9}  torn tail",
        "shard", "acked lsn", "last lsn", "records", "segments", "scanned", "scan ms", "MB/s"
    );
    let mut lost = Vec::new();
    for (s, r) in reports.iter().enumerate() {
        let ms = r.elapsed.as_secs_f64() * 1e3;
        let torn = r.torn_tail.as_ref().map_or("none".to_string(), |t| {
            format!(
                "cut at lsn {} ({} bytes discarded: {})",
                t.lsn, t.bytes_discarded, t.reason
            )
        });
        println!(
            "{:>5} {:>10} {:>10} {:>9} {:>8} {:>8.1}MB {:>9.1} {:>9.0}  {torn}",
            s,
            acked[s],
            r.last_lsn,
            r.records,
            r.segments,
            r.bytes_scanned as f64 / 1e6,
            ms,
            r.bytes_scanned as f64 / 1e6 / r.elapsed.as_secs_f64().max(1e-9),
        );
        if r.last_lsn < acked[s] {
            lost.push(format!(
                "shard {s}: acked {} but recovered {}",
                acked[s], r.last_lsn
            ));
        }
    }
    println!(
        "recovered all {shards} shard(s) in {:.1} ms (in parallel, one executor each); {:.1} ms after the kill",
        all_s * 1e3,
        killed_at.elapsed().as_secs_f64() * 1e3
    );
    if lost.is_empty() {
        println!("every acknowledged record is present");
        Ok(())
    } else {
        Err(format!("acknowledged records lost: {}", lost.join("; ")))
    }
}

/// `keyfort SUBCOMMAND` as a child process of the demo: each card and each writer runs in its
/// own process, as each node's will, and a writer can be really SIGKILLed.
pub(crate) fn keyfort_child(subcommand: &str) -> Result<Command, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg(subcommand);
    Ok(cmd)
}

/// A `TAG SHARD LSN` report line of a writer child.
pub(crate) fn shard_report(line: &str, tag: &str) -> Option<(usize, u64)> {
    let mut it = line.split_whitespace();
    if it.next() != Some(tag) {
        return None;
    }
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// A writer child's run until its SIGKILL: what its stdout told and when it was killed.
pub(crate) struct KilledRun<T> {
    /// What `on_line` gathered from every stdout line the child wrote before it died.
    pub seen: T,
    /// Seconds between the start and the kill.
    pub ran_s: f64,
    pub killed_at: Instant,
}

/// Starts the writer `cmd`, feeds each of its stdout lines to `on_line`, and SIGKILLs it after
/// `seconds` plus a jitter it cannot anticipate. A writer that exits on its own (its error is on
/// stderr) fails the drill.
pub(crate) fn run_then_kill<T: Send + 'static>(
    mut cmd: Command,
    seconds: f64,
    mut seen: T,
    on_line: fn(&mut T, &str),
) -> Result<KilledRun<T>, String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn writer: {e}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            on_line(&mut seen, &line);
        }
        seen
    });
    // A kill at a moment the writer cannot anticipate: the drill must not depend on luck.
    let jitter_ms = u64::from(std::process::id()) % 500;
    let ran = Duration::from_secs_f64(seconds) + Duration::from_millis(jitter_ms);
    std::thread::sleep(ran);
    if let Ok(Some(status)) = child.try_wait() {
        let _ = reader.join();
        return Err(format!("the writer exited before the kill: {status}"));
    }
    // SAFETY: plain kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    if rc != 0 {
        return Err(format!(
            "kill -9 writer: {}",
            std::io::Error::last_os_error()
        ));
    }
    let killed_at = Instant::now();
    let _ = child.wait();
    let seen = reader.join().expect("report reader thread");
    Ok(KilledRun {
        seen,
        ran_s: ran.as_secs_f64(),
        killed_at,
    })
}

/// Waits for every shard's executor and returns the shards' results in shard order; the first
/// failure, named by its shard, is the error.
pub(crate) fn join_shards<T: Send, E: std::fmt::Display + Send>(
    handles: Vec<glommio::ExecutorJoinHandle<std::io::Result<Result<T, E>>>>,
) -> Result<Vec<T>, String> {
    let mut out = Vec::with_capacity(handles.len());
    for (s, h) in handles.into_iter().enumerate() {
        let r = h
            .join()
            .map_err(|e| format!("shard {s} executor: {e}"))?
            .map_err(|e| format!("shard {s} executor: {e}"))?
            .map_err(|e| format!("shard {s}: {e}"))?;
        out.push(r);
    }
    Ok(out)
}

/// Opens every shard's log on its own executor (as a node's start-up does) and returns the
/// recovery reports in shard order.
fn reopen_all(
    dir: &Path,
    shards: usize,
) -> Result<Vec<keyfort_engine::wbl::RecoveryReport>, String> {
    let cores: Vec<Option<usize>> = vec![None; shards];
    let base = dir.to_path_buf();
    let handles = exec::spawn_per_core(&cores, dir, move |shard, _q| {
        let sdir = shard_dir(&base, shard);
        async move {
            let (wbl, rep) = Wbl::open(sdir.join("wbl"), WblOptions::default()).await?;
            wbl.close().await?;
            Ok::<_, keyfort_engine::wbl::WblError>(rep)
        }
    })
    .map_err(|e| format!("executors: {e}"))?;
    join_shards(handles)
}

#[derive(Debug, clap::Args)]
pub struct WriterArgs {
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long)]
    pub shards: usize,
}

/// The child side: append on every shard until killed, reporting the highest acknowledged LSN.
pub fn writer(args: WriterArgs) -> crate::CmdResult {
    let cores: Vec<Option<usize>> = pin_plan(args.shards);
    let base = args.dir.clone();
    let handles = exec::spawn_per_core(&cores, &args.dir, move |shard, _q| {
        let sdir = shard_dir(&base, shard);
        async move { append_forever(shard, &sdir).await }
    })
    .map_err(|e| format!("executors: {e}"))?;
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// Pins shard k to core k when there are no more shards than cores (production placement);
/// otherwise leaves executors unbound.
pub(crate) fn pin_plan(shards: usize) -> Vec<Option<usize>> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (0..shards)
        .map(|s| (shards <= cores).then_some(s))
        .collect()
}

async fn append_forever(shard: usize, sdir: &Path) -> Result<(), String> {
    let (wbl, _) = Wbl::open(sdir.join("wbl"), WblOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let acked = Rc::new(Cell::new(0u64));
    for _ in 0..DRILL_APPENDERS {
        let (wbl, acked) = (wbl.clone(), acked.clone());
        glommio::spawn_local(async move {
            let mut body = vec![0u8; DRILL_PAYLOAD_BYTES];
            loop {
                let lsn = wbl.last_lsn() + 1;
                body[..8].copy_from_slice(&lsn.to_le_bytes());
                let Ok(d) = wbl.append(RecordKind::RaftNormal, lsn, 1, body.clone()) else {
                    glommio::timer::sleep(Duration::from_micros(100)).await;
                    continue;
                };
                if d.await.is_err() {
                    return;
                }
                acked.set(acked.get().max(lsn));
            }
        })
        .detach();
    }
    let mut out = std::io::stdout();
    loop {
        glommio::timer::sleep(ACK_REPORT_EVERY).await;
        // Only LSNs whose Durable resolved are reported: the drill's "acknowledged".
        let line = format!("ack {shard} {}\n", acked.get());
        if out
            .write_all(line.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            return Ok(());
        }
    }
}
