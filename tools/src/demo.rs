//! `keyfort demo`: the README's main job on the embedded defaults. It grows with every issue; today
//! it runs what exists:
//! 1. the card: a ceremony for three SoftHSM cards of one realm, a partition made on one card and
//!    imported on the others, masked keys created on one card and used on another;
//! 2. the WBL crash drill: a child process appends through the WBL on every core with many
//!    concurrent appenders, is SIGKILLed mid-flight, and every shard's log is reopened: the drill
//!    prints what recovery found and how long it took, and checks no acknowledged record was lost.

use keyfort_engine::exec;
use keyfort_engine::wbl::{RecordKind, Wbl, WblOptions};
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
/// How often the writer child reports its acknowledged LSNs.
const ACK_REPORT_EVERY: Duration = Duration::from_millis(5);

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
}

pub fn run(args: DemoArgs) -> crate::CmdResult {
    let shards = args
        .shards
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    cards_demo(&args.data_dir.join("cards"))?;
    wbl_crash_drill(&args.data_dir.join("wbl"), shards, args.seconds)
}

/// Nodes (one card each, each in its own token directory) in the card demo.
const DEMO_NODES: usize = 3;

/// Runs `keyfort card ARGS` as a child process (each card lives in its own process, as each
/// node's will) and returns its stdout; a failure carries the child's stderr.
fn card_cli(pins: &Path, args: &[&str]) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let out = Command::new(exe)
        .arg("card")
        .args(args)
        .env("KEYFORT_PIN_FILE", pins.join("user.pin"))
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
    std::fs::write(dir.join("user.pin"), random_pin()).map_err(io)?;
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
    let node = |n: usize| (p(&format!("node-{n}/card")), format!("node-{n}"));
    for n in 1..=DEMO_NODES {
        let (td, label) = node(n);
        step(
            &format!("card init {label} (SO loads both layers)"),
            dir,
            &["init", "--token-dir", &td, "--label", &label, "--kit", &kit],
        )?;
    }
    let cfg = p("partition.cfg");
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

fn shard_dir(dir: &Path, shard: usize) -> PathBuf {
    dir.join(format!("shard-{shard}"))
}

/// The parent side: start the writer, kill it, reopen, report.
fn wbl_crash_drill(dir: &Path, shards: usize, seconds: f64) -> crate::CmdResult {
    println!("== WBL crash drill: {shards} shard(s), one executor per core, {DRILL_APPENDERS} appenders each, {DRILL_PAYLOAD_BYTES} B records");
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let mut child = Command::new(exe)
        .args(["demo-wbl-writer", "--dir"])
        .arg(dir)
        .args(["--shards", &shards.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn writer: {e}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut acked = vec![0u64; shards];
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let mut it = line.split_whitespace();
            if let (Some("ack"), Some(s), Some(l)) = (it.next(), it.next(), it.next()) {
                if let (Ok(s), Ok(l)) = (s.parse::<usize>(), l.parse::<u64>()) {
                    acked[s] = acked[s].max(l);
                }
            }
        }
        acked
    });
    // A kill at a moment the writer cannot anticipate: the drill must not depend on luck.
    let jitter_ms = u64::from(std::process::id()) % 500;
    std::thread::sleep(Duration::from_secs_f64(seconds) + Duration::from_millis(jitter_ms));
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
    let acked = reader.join().expect("ack reader thread");
    println!(
        "writer SIGKILLed after {:.2} s; reopening every shard's log",
        seconds + jitter_ms as f64 / 1000.0
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
    let mut out = Vec::with_capacity(shards);
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
fn pin_plan(shards: usize) -> Vec<Option<usize>> {
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
