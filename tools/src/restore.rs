//! `keyfort restore --from URL`: the durable tier (DESIGN.md "Recovery tiers", docs/operations.md
//! "Restoring a whole cluster").
//!
//! 1. **Manifest**: the newest manifest whose objects all exist with their sizes (or the one
//!    named by `--manifest`). Its cluster config's wrapped integrity key is imported into the
//!    card first: a card of another realm is refused (`WrongRealm`) before any snapshot byte is
//!    fetched; then the manifest's MAC is verified in the card.
//! 2. **Fetch**: every shard's snapshot object, in parallel, each with parallel ranged GETs that
//!    resume a broken part from where it stopped.
//! 3. **Verify**: each file's size and xxh3-64 against the manifest (a tampered or truncated
//!    object is named), then every check of a snapshot open (section crcs, chain, digest) and
//!    its footer MAC in the card, and its LSN, term, digest and key count against the manifest.
//! 4. **Write**: a new cluster — new cluster id, new raft ids (from the old cluster's
//!    `next_node_id` up, so no old id names a new member), the same shard count and integrity
//!    key. Each snapshot's footer gets the new members and is MACed again; every node's data dir
//!    gets its identity, the new cluster config, and per shard the snapshot (hard-linked) and a
//!    log reset to start after it, holding one `ClusterRestore` record (docs/format.md §3.11) at
//!    `lsn + 1`, committed. Every replica of a shard starts from the same bytes.
//! 5. **Fence**: `fences/<old cluster id>` is written to the backup root, so the old cluster's
//!    snapshot manager, should any of it still run, stops writing there.
//!
//! It prints what it restored: the manifest, and per shard the LSN, term, digest and key count.
//! Archived log ranges (the log archive) are not replayed yet: a manifest that names any is
//! refused rather than restored short of what it promises.

use crate::backup::{fence_object, list_manifests};
use crate::card::CardAt;
use crate::cluster_cmd::{hex, shard_snapshot_dir, shard_wbl_dir};
use crate::durable::{DurableStore, FetchOptions, PutOutcome, StoreError};
use keyfort_engine::archive::LogRange;
use keyfort_engine::cluster::{
    write_durable, ClusterConfig, Identity, Member, CLUSTER_CONFIG_FILE, IDENTITY_FILE,
};
use keyfort_engine::manifest::{manifest_name, manifest_seq, Manifest};
use keyfort_engine::snapshot::{self, Snapshot};
use keyfort_engine::state::{Op, StateDigest, StateMachine};
use keyfort_engine::wbl::record::chain_next;
use keyfort_engine::wbl::segment::PrepMethod;
use keyfort_engine::wbl::{HardState, RecordKind, Wbl, WblOptions};
use keyfort_hsm::CoreSession;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Folder, in the first node's data dir, where snapshots are fetched and verified (removed at
/// the end; its files are hard-linked into every node's data dir).
pub const RESTORE_STAGING_DIR: &str = "restore-staging";
/// Most nodes one restore makes (a cluster's member limit).
pub const RESTORE_NODES_MAX: usize = keyfort_engine::cluster::MEMBERS_MAX;

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// Durable store URL (`file:///dir`, a directory path, or `s3://bucket/prefix?endpoint=...`).
    #[arg(long)]
    pub from: String,
    /// A manifest to restore (its name, `manifests/<seq>.kman`, or its sequence number);
    /// default: the newest complete one.
    #[arg(long)]
    pub manifest: Option<String>,
    /// A card of the cluster's realm (user PIN from the environment).
    #[command(flatten)]
    pub card: CardAt,
    /// `HOST:PORT=DATA_DIR` of each member of the new cluster: its peer address (an IP
    /// literal) and a data dir that holds no node identity. Raft ids are given in this order.
    #[arg(long = "node")]
    pub nodes: Vec<String>,
    /// Restore only a manifest of this cluster (32 hex digits): another cluster's manifests,
    /// newer or not, are passed over before a card is asked anything.
    #[arg(long)]
    pub cluster_id: Option<String>,
    /// List the manifests in the store (sequence, time, term, LSN per shard, complete or not)
    /// and exit.
    #[arg(long)]
    pub list: bool,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// The old cluster's TLS directory: its CA carries on for the restored cluster (checked in
    /// this card), and the directory is bound to the new cluster id, so clients keep their
    /// `ca.pem` and a node of the old cluster started with it refuses to run.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// Profile the restore in process and write a flamegraph SVG here when it ends
    /// (perf/README.md).
    #[arg(long, value_name = "FILE")]
    pub profile_svg: Option<PathBuf>,
}

/// What a restore did.
#[derive(Debug)]
pub struct Restored {
    pub manifest: String,
    pub seq: u64,
    pub old_cluster_id: [u8; 16],
    pub cluster: ClusterConfig,
    pub data_dirs: Vec<PathBuf>,
    /// Per shard: the manifest's entry.
    pub shards: Vec<keyfort_engine::manifest::ShardSnapshot>,
    /// Per shard: what was restored beyond the snapshot.
    pub restored: Vec<RestoredShard>,
    /// Newer manifests passed over, and why.
    pub skipped: Vec<(String, String)>,
    pub fetched_bytes: u64,
    pub resumed_parts: u64,
    pub phases_ms: Vec<(&'static str, f64)>,
    pub total_ms: f64,
}

impl Restored {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "manifest": self.manifest,
            "seq": self.seq,
            "old_cluster_id": hex(&self.old_cluster_id),
            "cluster_id": hex(&self.cluster.cluster_id),
            "nodes": self.cluster.members.iter().zip(&self.data_dirs).map(|(m, d)| serde_json::json!({
                "node_id": m.node_id, "peer_addr": m.peer_addr, "data_dir": d,
            })).collect::<Vec<_>>(),
            "shards": self.shards.iter().zip(&self.restored).map(|(s, r)| serde_json::json!({
                "shard": s.shard, "lsn": s.lsn, "term": s.term,
                "digest": format!("{:032x}", s.digest.0), "keys": s.key_count, "bytes": s.bytes,
                "object": s.object,
                "restored_lsn": r.restored_lsn,
                "records_replayed": r.records_replayed,
                "new_digest": format!("{:032x}", r.digest.0),
            })).collect::<Vec<_>>(),
            "skipped": self.skipped.iter().map(|(m, why)| serde_json::json!({"manifest": m, "reason": why})).collect::<Vec<_>>(),
            "fetched_bytes": self.fetched_bytes,
            "resumed_parts": self.resumed_parts,
            "phases_ms": self.phases_ms.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
            "total_ms": self.total_ms,
        })
    }
}

fn parse_cluster_id(s: &str) -> Result<[u8; 16], String> {
    let bad = || format!("--cluster-id {s:?}: expected 32 hex digits");
    if s.len() != 32 {
        return Err(bad());
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(id)
}

fn parse_node(s: &str) -> Result<(String, PathBuf), String> {
    let (addr, dir) = s
        .split_once('=')
        .ok_or_else(|| format!("--node {s:?}: expected HOST:PORT=DATA_DIR"))?;
    addr.parse::<std::net::SocketAddr>()
        .map_err(|e| format!("--node {s:?}: address: {e}"))?;
    Ok((addr.to_string(), PathBuf::from(dir)))
}

pub fn run(args: RestoreArgs) -> crate::CmdResult {
    let svg = args.profile_svg.clone();
    keyfort_perf::run_profiled("keyfort restore", svg.as_deref(), false, || {
        run_restore(args)
    })?
}

fn run_restore(args: RestoreArgs) -> crate::CmdResult {
    let store = DurableStore::open(&args.from).map_err(|e| e.to_string())?;
    if args.list {
        return list(&store);
    }
    let nodes = args
        .nodes
        .iter()
        .map(|n| parse_node(n))
        .collect::<Result<Vec<_>, _>>()?;
    let cluster_id = match &args.cluster_id {
        Some(h) => Some(parse_cluster_id(h)?),
        None => None,
    };
    // A TLS directory that cannot serve is refused before anything is restored.
    if let Some(dir) = &args.tls_dir {
        let t = crate::pki::TlsDir::open(dir)?;
        if let Some(want) = &cluster_id {
            if t.cluster_id != *want {
                return Err(format!(
                    "{}: the TLS directory is of cluster {}, not {}",
                    dir.display(),
                    hex(&t.cluster_id),
                    hex(want)
                ));
            }
        }
        drop(t.ca_in(args.card.session_without_integrity_key()?)?);
    }
    let r = restore(
        &store,
        args.manifest.as_deref(),
        cluster_id.as_ref(),
        &args.card,
        &nodes,
    )?;
    if let Some(dir) = &args.tls_dir {
        crate::pki::TlsDir::rebind(
            dir,
            args.card.session_without_integrity_key()?,
            &r.old_cluster_id,
            r.cluster.cluster_id,
        )?;
        eprintln!(
            "TLS directory {} now serves cluster {}",
            dir.display(),
            hex(&r.cluster.cluster_id)
        );
    }
    if args.json {
        println!("{}", r.to_json());
        return Ok(());
    }
    println!(
        "restored manifest {} (seq {}) of cluster {} as cluster {} in {:.0} ms",
        r.manifest,
        r.seq,
        hex(&r.old_cluster_id),
        hex(&r.cluster.cluster_id),
        r.total_ms
    );
    for (m, why) in &r.skipped {
        println!("  passed over {m}: {why}");
    }
    for (s, x) in r.shards.iter().zip(&r.restored) {
        println!(
            "  shard {}: restored to lsn {} = snapshot at lsn {} ({} keys, digest {:032x}, {} \
             bytes) + {} archived records; the new cluster's first record is lsn {}, digest \
             {:032x} once applied",
            s.shard,
            x.restored_lsn,
            s.lsn,
            s.key_count,
            s.digest.0,
            s.bytes,
            x.records_replayed,
            x.restored_lsn + 1,
            x.digest.0
        );
    }
    for (m, d) in r.cluster.members.iter().zip(&r.data_dirs) {
        println!("  node {} at {}: {}", m.node_id, m.peer_addr, d.display());
    }
    let phases: Vec<String> = r
        .phases_ms
        .iter()
        .map(|(k, v)| format!("{k} {v:.0} ms"))
        .collect();
    println!(
        "  phases: {}; {} bytes fetched",
        phases.join(", "),
        r.fetched_bytes
    );
    Ok(())
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    futures_lite::future::block_on(f)
}

fn list(store: &DurableStore) -> crate::CmdResult {
    let s = |e: StoreError| e.to_string();
    let sizes: std::collections::HashMap<String, u64> =
        block_on(store.list("")).map_err(s)?.into_iter().collect();
    for (seq, name) in block_on(list_manifests(store)).map_err(s)? {
        let b = block_on(store.get_bytes(&name)).map_err(s)?;
        match Manifest::decode_unverified(&b) {
            Err(e) => println!("{seq:>6} {name}: does not decode: {e}"),
            Ok((m, _)) => {
                let missing = missing_object(&m, &sizes);
                let lsns: Vec<String> = m.shards.iter().map(|s| s.lsn.to_string()).collect();
                println!(
                    "{seq:>6} {name}: created {} ms, term {}, lsns [{}]: {}",
                    m.created_unix_ms,
                    m.shard0_term,
                    lsns.join(", "),
                    missing.map_or("complete".to_string(), |e| format!("incomplete: {e}"))
                );
            }
        }
    }
    Ok(())
}

/// The first object `m` names that the store lacks or holds with another size.
fn missing_object(m: &Manifest, sizes: &std::collections::HashMap<String, u64>) -> Option<String> {
    let want = m
        .shards
        .iter()
        .map(|s| (&s.object, s.bytes))
        .chain(m.archives.iter().map(|a| (&a.object, a.bytes)));
    for (o, bytes) in want {
        match sizes.get(o) {
            None => return Some(format!("object {o} is missing")),
            Some(&n) if n != bytes => {
                return Some(format!(
                    "object {o} is {n} bytes, the manifest says {bytes}"
                ))
            }
            _ => {}
        }
    }
    None
}

/// Runs the whole restore; see the module comment.
pub fn restore(
    store: &DurableStore,
    named: Option<&str>,
    cluster_id: Option<&[u8; 16]>,
    card: &CardAt,
    nodes: &[(String, PathBuf)],
) -> Result<Restored, String> {
    let t0 = Instant::now();
    if nodes.is_empty() || nodes.len() > RESTORE_NODES_MAX {
        return Err(format!("1..={RESTORE_NODES_MAX} --node needed"));
    }
    for (_, d) in nodes {
        if d.join(IDENTITY_FILE).exists() {
            return Err(format!(
                "{}: already holds a node identity; a restore writes only new data dirs",
                d.display()
            ));
        }
    }
    // A restore that fails leaves no data dir it made behind (a rerun starts clean); data
    // dirs that existed (empty, or with other files) are left as they are, but for the
    // staging folder.
    let fresh: Vec<PathBuf> = nodes
        .iter()
        .filter(|(_, d)| !d.exists())
        .map(|(_, d)| d.clone())
        .collect();
    let staging = nodes[0].1.join(RESTORE_STAGING_DIR);
    let r = restore_into(store, named, cluster_id, card, nodes, &staging, t0);
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
        for d in &fresh {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    r
}

fn restore_into(
    store: &DurableStore,
    named: Option<&str>,
    cluster_id: Option<&[u8; 16]>,
    card: &CardAt,
    nodes: &[(String, PathBuf)],
    staging: &Path,
    t0: Instant,
) -> Result<Restored, String> {
    std::fs::create_dir_all(staging).map_err(|e| format!("{}: {e}", staging.display()))?;
    let mut session = card.session_without_integrity_key()?;
    // Phase 1: the manifest (metadata only; no snapshot byte is fetched before the card
    // accepted the realm and the MAC verified).
    let s = |e: StoreError| e.to_string();
    let (m, name, old, skipped) = verified_manifest(store, named, cluster_id, &mut session)?;
    let manifest_ms = ms(t0);
    let session = Rc::new(session);
    let out = keyfort_engine::exec::run_local(staging, |_| {
        fetch_verify_write(store, &m, &old, &session, staging, nodes)
    })
    .map_err(|e| e.to_string())??;
    let _ = std::fs::remove_dir_all(staging);
    // Phase 5: the fence. The new cluster stands already; a fence that cannot be written is
    // reported, not a failure of the restore.
    let fence = fence_object(&old.cluster_id);
    let fenced = block_on(store.put_bytes_create(&fence, out.cluster.cluster_id.to_vec()));
    match fenced {
        Ok(PutOutcome::Created) | Ok(PutOutcome::AlreadyExists) => {}
        Err(e) => eprintln!(
            "keyfort restore: warning: the old cluster's fence {fence} was not written ({}); \
             write it before the old cluster could run again",
            s(e)
        ),
    }
    let mut phases_ms = vec![("manifest", manifest_ms)];
    phases_ms.extend(out.phases_ms);
    Ok(Restored {
        manifest: name,
        seq: out.manifest.seq,
        old_cluster_id: old.cluster_id,
        cluster: out.cluster,
        data_dirs: nodes.iter().map(|(_, d)| d.clone()).collect(),
        shards: out.manifest.shards,
        restored: out.restored,
        skipped,
        fetched_bytes: out.fetched_bytes,
        resumed_parts: out.resumed_parts,
        phases_ms,
        total_ms: ms(t0),
    })
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// The manifests a restore may use, best first: the named one, or every one whose objects all
/// exist with their sizes, newest first (incomplete ones are passed over, with the reason).
/// Returns `(name, bytes)` of each and the ones passed over.
#[allow(clippy::type_complexity)]
fn candidate_manifests(
    store: &DurableStore,
    named: Option<&str>,
) -> Result<(Vec<(String, Vec<u8>)>, Vec<(String, String)>), String> {
    let s = |e: StoreError| e.to_string();
    let sizes: std::collections::HashMap<String, u64> =
        block_on(store.list("")).map_err(s)?.into_iter().collect();
    let names: Vec<String> = match named {
        Some(n) => {
            let name = match n.parse::<u64>() {
                Ok(seq) => manifest_name(seq),
                Err(_) => n.to_string(),
            };
            if manifest_seq(&name).is_none() {
                return Err(format!(
                    "--manifest {n:?}: not a manifest name (manifests/<16 hex digits>.kman) or \
                     sequence number"
                ));
            }
            vec![name]
        }
        None => block_on(list_manifests(store))
            .map_err(s)?
            .into_iter()
            .rev()
            .map(|(_, n)| n)
            .collect(),
    };
    if names.is_empty() {
        return Err(format!("{}: no manifest in the store", store.url()));
    }
    let (mut complete, mut skipped) = (Vec::new(), Vec::new());
    for name in names {
        let bytes = match block_on(store.get_bytes(&name)) {
            Ok(b) => b,
            Err(e) if named.is_some() => return Err(e.to_string()),
            Err(e) => {
                skipped.push((name, e.to_string()));
                continue;
            }
        };
        let why = match Manifest::decode_unverified(&bytes) {
            Err(e) => e.to_string(),
            Ok((m, _)) if Some(m.seq) != manifest_seq(&name) => format!(
                "it says it is manifest {}: a copy under another name",
                m.seq
            ),
            Ok((m, _)) => match missing_object(&m, &sizes) {
                None => {
                    complete.push((name, bytes));
                    continue;
                }
                Some(why) => why,
            },
        };
        if named.is_some() {
            return Err(format!("{name}: {why}"));
        }
        skipped.push((name, why));
    }
    if complete.is_empty() {
        return Err(format!(
            "no complete manifest in {}: {}",
            store.url(),
            passed_over(&skipped)
        ));
    }
    Ok((complete, skipped))
}

/// Phase 1: the first candidate whose realm the card accepts (a card of another realm stops
/// the restore: nothing is fetched), whose MAC verifies and, with `--cluster-id`, of that
/// cluster. Returns the manifest, its name and every one passed over.
#[allow(clippy::type_complexity)]
fn verified_manifest(
    store: &DurableStore,
    named: Option<&str>,
    cluster_id: Option<&[u8; 16]>,
    session: &mut CoreSession,
) -> Result<(Manifest, String, ClusterConfig, Vec<(String, String)>), String> {
    let (candidates, mut skipped) = candidate_manifests(store, named)?;
    for (name, bytes) in candidates {
        let (m, _) = Manifest::decode_unverified(&bytes).map_err(|e| format!("{name}: {e}"))?;
        let old = m.cluster().map_err(|e| format!("{name}: {e}"))?;
        if cluster_id.is_some_and(|c| *c != old.cluster_id) {
            let why = format!("of cluster {}, not the one asked for", hex(&old.cluster_id));
            if named.is_some() {
                return Err(format!("{name}: {why}"));
            }
            skipped.push((name, why));
            continue;
        }
        session
            .import_integrity_key(&old.integrity_key_wrapped)
            .map_err(|e| {
                format!(
                    "{name}: the card refuses the cluster's integrity key, nothing was fetched: \
                     {e}"
                )
            })?;
        let why = match Manifest::decode(&bytes, &*session) {
            Err(e) => e.to_string(),
            Ok(_) if cluster_id.is_some_and(|c| *c != old.cluster_id) => {
                format!("of cluster {}, not the one asked for", hex(&old.cluster_id))
            }
            Ok(m) => return Ok((m, name, old, skipped)),
        };
        if named.is_some() {
            return Err(format!("{name}: {why}"));
        }
        skipped.push((name, why));
    }
    Err(format!(
        "no manifest in {} verifies: {}",
        store.url(),
        passed_over(&skipped)
    ))
}

/// The manifests passed over and why, for an error message.
fn passed_over(skipped: &[(String, String)]) -> String {
    skipped
        .iter()
        .map(|(m, w)| format!("{m}: {w}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// One shard of a restore beyond its snapshot.
#[derive(Clone, Debug)]
pub struct RestoredShard {
    /// The last LSN restored: the snapshot's, or the last archived one replayed after it.
    pub restored_lsn: u64,
    /// Its term.
    pub last_term: u64,
    /// Archived records written after the snapshot.
    pub records_replayed: u64,
    /// The state digest every node reports once it applied the restore record (at
    /// `restored_lsn + 1`).
    pub digest: StateDigest,
}

struct Written {
    manifest: Manifest,
    cluster: ClusterConfig,
    restored: Vec<RestoredShard>,
    fetched_bytes: u64,
    resumed_parts: u64,
    phases_ms: Vec<(&'static str, f64)>,
}

/// Phases 2–4 on a glommio executor (the logs are written through the WBL).
async fn fetch_verify_write(
    store: &DurableStore,
    m: &Manifest,
    old: &ClusterConfig,
    session: &Rc<CoreSession>,
    staging: &Path,
    nodes: &[(String, PathBuf)],
) -> Result<Written, String> {
    // Phase 2: fetch every shard in parallel.
    let t = Instant::now();
    let fetches: Vec<_> = m
        .shards
        .iter()
        .map(|s| {
            let (store, object) = (store.clone(), s.object.clone());
            let dest = staging.join(format!("shard-{}.ksnap", s.shard));
            glommio::spawn_local(async move {
                let r = store
                    .get_to_file(&object, &dest, FetchOptions::default())
                    .await;
                (dest, r.map_err(|e| format!("{object}: {e}")))
            })
        })
        .collect();
    let mut files = Vec::new();
    let (mut fetched_bytes, mut resumed_parts) = (0, 0);
    for f in fetches {
        let (dest, r) = f.await;
        let r = r?;
        fetched_bytes += r.bytes;
        resumed_parts += r.resumed_parts;
        files.push(dest);
    }
    let fetch_ms = ms(t);
    // Phase 3: verify (blocking threads, one per shard; MAC in the card). The manifest's
    // whole-file hash is taken from the snapshot open's own read (one pass over the file, of
    // the bytes it checked); only an open that fails hashes the file again on its own, so the
    // hash mismatch is still reported first.
    let t = Instant::now();
    let checks: Vec<_> = files
        .iter()
        .map(|p| {
            let p = p.clone();
            glommio::executor().spawn_blocking(move || {
                let mut hasher = xxhash_rust::xxh3::Xxh3::new();
                let mut bytes = 0u64;
                let opened = Snapshot::open_without_mac_observed(&p, &mut |b: &[u8]| {
                    hasher.update(b);
                    bytes += b.len() as u64;
                });
                let hashed = match &opened {
                    Ok(_) => Ok((hasher.digest(), bytes)),
                    Err(_) => crate::backup::file_hash(&p),
                };
                (hashed, opened)
            })
        })
        .collect();
    let mut snaps = Vec::new();
    for (s, check) in m.shards.iter().zip(checks) {
        let (hashed, opened) = check.await;
        let tampered = |what: String| {
            format!(
                "object {} (shard {}) does not match manifest {}: {what}; it was altered or \
                 damaged in the store",
                s.object,
                s.shard,
                manifest_name(m.seq)
            )
        };
        let (hash, bytes) = hashed.map_err(|e| format!("{}: {e}", s.object))?;
        if bytes != s.bytes || hash != s.file_hash {
            return Err(tampered(format!(
                "{bytes} bytes hashing to {hash:016x}, expected {} bytes hashing to {:016x}",
                s.bytes, s.file_hash
            )));
        }
        let mut snap = opened.map_err(|e| tampered(e.to_string()))?;
        snap.verify_mac(&**session)
            .map_err(|e| tampered(e.to_string()))?;
        let f = snap.footer();
        if (f.lsn, f.term, f.digest, f.key_count) != (s.lsn, s.term, s.digest, s.key_count) {
            return Err(tampered(format!(
                "its footer says lsn {} term {} digest {:032x} keys {}",
                f.lsn, f.term, f.digest.0, f.key_count
            )));
        }
        snaps.push(snap);
    }
    let verify_ms = ms(t);
    // Phase 3b: the archived ranges after each snapshot — fetched, checked (size, hash, MAC,
    // and that their chain links to the snapshot's and to each other), in LSN order.
    let t = Instant::now();
    let tails = archived_tails(store, m, &snaps, session).await?;
    fetched_bytes += m.archives.iter().map(|a| a.bytes).sum::<u64>();
    let archive_ms = ms(t);
    // Phase 4: the new cluster. Its ids start above every id the old cluster gave, counting
    // admissions in the archived ranges.
    let t = Instant::now();
    let mut next_node_id = old.next_node_id;
    for r in tails.iter().flatten() {
        if let (RecordKind::ClusterConfig, Ok(Op::ClusterConfig { config })) =
            (r.kind, Op::decode(r.kind, &r.payload))
        {
            if let Ok(c) = ClusterConfig::decode(&config) {
                next_node_id = next_node_id.max(c.next_node_id);
            }
        }
    }
    let members: Vec<Member> = nodes
        .iter()
        .zip(next_node_id..)
        .map(|((addr, _), node_id)| Member {
            node_id,
            peer_addr: addr.clone(),
        })
        .collect();
    let cluster = ClusterConfig {
        cluster_id: rand::random(),
        shard_count: old.shard_count,
        next_node_id: next_node_id + nodes.len() as u64,
        members,
        integrity_key_wrapped: old.integrity_key_wrapped.clone(),
    };
    let config = cluster.encode().map_err(|e| e.to_string())?;
    let voters: Vec<u64> = cluster.members.iter().map(|m| m.node_id).collect();
    let record = Op::ClusterRestore {
        config: config.clone(),
    };
    let mut footers = Vec::new();
    let mut restored = Vec::new();
    for (snap, tail) in snaps.into_iter().zip(&tails) {
        let f = snap.footer().clone();
        snapshot::rewrite_membership(&snap, &voters, &[], &**session).map_err(|e| e.to_string())?;
        // What every node will hold once it applied the restore record: the state after the
        // archived records and the record, from the snapshot (keys read through its index).
        let mut state = StateMachine::from_snapshot(std::sync::Arc::new(snap));
        for r in tail {
            let (kind, payload) = as_written(r);
            state
                .apply(r.lsn, kind, payload)
                .map_err(|e| format!("replaying archived lsn {}: {e}", r.lsn))?;
        }
        let last = tail.last().map_or((f.lsn, f.term), |r| (r.lsn, r.term));
        state
            .apply(last.0 + 1, record.kind(), &record.encode())
            .map_err(|e| e.to_string())?;
        restored.push(RestoredShard {
            restored_lsn: last.0,
            last_term: last.1,
            records_replayed: tail.len() as u64,
            digest: state.digest(),
        });
        footers.push(f);
    }
    let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    let s = |e: keyfort_engine::cluster::ClusterError| e.to_string();
    // Snapshots and config first (cheap: links), then every node's every shard log at once
    // (each log prepares its first segment: the writes overlap).
    let mut logs = Vec::new();
    for (_, dir) in nodes {
        write_durable(dir, CLUSTER_CONFIG_FILE, &config).map_err(s)?;
        for (shard, (file, f)) in files.iter().zip(&footers).enumerate() {
            let shard = shard as u32;
            let sdir = shard_snapshot_dir(dir, shard);
            std::fs::create_dir_all(&sdir).map_err(|e| io(&sdir, e))?;
            let dest = sdir.join(snapshot::file_name(f.lsn));
            if std::fs::hard_link(file, &dest).is_err() {
                std::fs::copy(file, &dest).map_err(|e| io(&dest, e))?;
                std::fs::File::open(&dest)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| io(&dest, e))?;
            }
            keyfort_engine::wbl::segment::sync_dir(&sdir).map_err(|e| io(&sdir, e))?;
            let (wdir, f, tail) = (
                shard_wbl_dir(dir, shard),
                f.clone(),
                tails[shard as usize].clone(),
            );
            let (rs, record) = (restored[shard as usize].clone(), record.clone());
            logs.push(glommio::spawn_local(async move {
                write_log(&wdir, &f, &tail, &rs, &record).await
            }));
        }
    }
    for log in logs {
        log.await?;
    }
    for ((_, dir), member) in nodes.iter().zip(&cluster.members) {
        crate::recovery_report::write_marker(
            dir,
            Duration::from_secs_f64((fetch_ms + archive_ms) / 1e3),
            Duration::from_secs_f64(verify_ms / 1e3),
        )?;
        // The identity last: a data dir with an identity is complete.
        let id = Identity {
            cluster_id: cluster.cluster_id,
            node_id: member.node_id,
        };
        write_durable(dir, IDENTITY_FILE, &id.encode()).map_err(s)?;
    }
    let write_ms = ms(t);
    Ok(Written {
        manifest: m.clone(),
        cluster,
        restored,
        fetched_bytes,
        resumed_parts,
        phases_ms: vec![
            ("fetch", fetch_ms),
            ("verify", verify_ms),
            ("archive", archive_ms),
            ("write", write_ms),
        ],
    })
}

/// One restored shard log: reset to start after the snapshot (footer `f`), the archived
/// records after it, the restore record, committed.
async fn write_log(
    wdir: &Path,
    f: &keyfort_engine::snapshot::Footer,
    tail: &[TailRecord],
    rs: &RestoredShard,
    record: &Op,
) -> Result<(), String> {
    // The first segment is only fallocated, not zero-filled: a restore writes every node's
    // every shard log at once, and zero-filling them (64 MiB each) took most of a second here;
    // the node's first appends into it pay the extent conversion instead (DESIGN.md, disk
    // facts), and it zero-fills its later segments as configured.
    let opts = WblOptions {
        prep_method: PrepMethod::Fallocate,
        ..WblOptions::default()
    };
    let (wbl, _) = Wbl::open(wdir, opts).await.map_err(|e| e.to_string())?;
    let w = |e: keyfort_engine::wbl::WblError| format!("{}: {e}", wdir.display());
    if wbl.last_lsn() != 0 {
        return Err(format!("{}: log not empty", wdir.display()));
    }
    wbl.reset_to(f.lsn + 1, f.chain_head, f.term)
        .await
        .map_err(w)?;
    for r in tail {
        // The old cluster's membership changes and archive marks are not the new cluster's:
        // each keeps its LSN and term as an empty entry.
        let (kind, payload) = as_written(r);
        // Durable with the restore record after them (one group commit).
        drop(
            wbl.append(kind, r.lsn, r.term, payload.to_vec())
                .map_err(w)?,
        );
    }
    let (at, term) = (rs.restored_lsn + 1, rs.last_term + 1);
    wbl.append(record.kind(), at, term, record.encode())
        .map_err(w)?
        .await
        .map_err(w)?;
    wbl.set_hard_state(HardState {
        term,
        vote: 0,
        commit: at,
    })
    .map_err(w)?
    .await
    .map_err(w)?;
    wbl.close().await.map_err(w)
}

/// Records of the old cluster that a restore writes as empty entries: its raft membership
/// changes (the new cluster has other members) and its archive marks (the new cluster archives
/// its own log, from its snapshots on).
fn old_cluster_only(kind: RecordKind) -> bool {
    matches!(
        kind,
        RecordKind::RaftConfChange | RecordKind::RaftConfChangeV2 | RecordKind::ArchiveMark
    )
}

/// The kind and payload a restore writes for an archived record ([`old_cluster_only`] ones
/// become empty `RaftNoop` entries at their LSN and term).
fn as_written(r: &TailRecord) -> (RecordKind, &[u8]) {
    if old_cluster_only(r.kind) {
        (RecordKind::RaftNoop, &[])
    } else {
        (r.kind, &r.payload)
    }
}

/// One archived record a restore writes after its shard's snapshot.
#[derive(Clone, Debug)]
pub struct TailRecord {
    pub lsn: u64,
    pub kind: RecordKind,
    pub term: u64,
    pub payload: Vec<u8>,
}

/// Fetches the manifest's archived ranges (in parallel) and checks each: size and hash, MAC,
/// the LSNs the manifest says, and the WBL chain: recomputed over its records it must meet the
/// snapshot's footer chain (or the previous range's) at the LSN they share. Returns, per shard,
/// the records after its snapshot in LSN order.
async fn archived_tails(
    store: &DurableStore,
    m: &Manifest,
    snaps: &[Snapshot],
    session: &Rc<CoreSession>,
) -> Result<Vec<Vec<TailRecord>>, String> {
    let fetches: Vec<_> = m
        .archives
        .iter()
        .map(|a| {
            let (store, object) = (store.clone(), a.object.clone());
            glommio::spawn_local(async move { store.get_bytes(&object).await })
        })
        .collect();
    let cluster_id = m.cluster().map_err(|e| e.to_string())?.cluster_id;
    let mut tails = vec![Vec::new(); m.shards.len()];
    let mut at: Vec<(u64, u64)> = snaps
        .iter()
        .map(|s| (s.footer().lsn, s.footer().chain_head))
        .collect();
    for (a, fetch) in m.archives.iter().zip(fetches) {
        let bad = |what: String| {
            format!(
                "archived range {} (shard {}) does not match manifest {}: {what}; it was \
                 altered or damaged in the store",
                a.object,
                a.shard,
                manifest_name(m.seq)
            )
        };
        let b = fetch.await.map_err(|e| format!("{}: {e}", a.object))?;
        let hash = xxhash_rust::xxh3::xxh3_64(&b);
        if b.len() as u64 != a.bytes || hash != a.file_hash {
            return Err(bad(format!(
                "{} bytes hashing to {hash:016x}, expected {} bytes hashing to {:016x}",
                b.len(),
                a.bytes,
                a.file_hash
            )));
        }
        let range = LogRange::decode(&b, &**session).map_err(|e| bad(e.to_string()))?;
        if (range.cluster_id, range.shard, range.from, range.to())
            != (cluster_id, a.shard, a.from, a.to)
        {
            return Err(bad(format!(
                "it holds shard {} lsns {}..={} of cluster {}",
                range.shard,
                range.from,
                range.to(),
                hex(&range.cluster_id)
            )));
        }
        let (lsn, chain) = &mut at[a.shard as usize];
        if range.from == *lsn + 1 && range.base_chain != *chain {
            return Err(bad(format!(
                "it does not continue the log before it (chain {:016x} at lsn {lsn}, it starts \
                 from {:016x})",
                *chain, range.base_chain
            )));
        }
        let mut c = range.base_chain;
        for (i, r) in range.records.into_iter().enumerate() {
            let l = range.from + i as u64;
            c = chain_next(c, r.kind, l, r.term, &r.payload);
            if l < *lsn {
                continue;
            }
            if l == *lsn {
                if c != *chain {
                    return Err(bad(format!(
                        "its chain at lsn {l} is {c:016x}, the log before it says {:016x}",
                        *chain
                    )));
                }
                continue;
            }
            tails[a.shard as usize].push(TailRecord {
                lsn: l,
                kind: r.kind,
                term: r.term,
                payload: r.payload,
            });
            (*lsn, *chain) = (l, c);
        }
    }
    Ok(tails)
}
