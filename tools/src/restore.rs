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
use keyfort_engine::cluster::{
    write_durable, ClusterConfig, Identity, Member, CLUSTER_CONFIG_FILE, IDENTITY_FILE,
};
use keyfort_engine::manifest::{manifest_name, manifest_seq, Manifest};
use keyfort_engine::snapshot::{self, Snapshot};
use keyfort_engine::state::Op;
use keyfort_engine::wbl::{HardState, Wbl, WblOptions};
use keyfort_hsm::CoreSession;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

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
    /// `HOST:PORT=DATA_DIR` of each member of the new cluster: its peer address and a data dir
    /// that holds no node identity. Raft ids are given in this order.
    #[arg(long = "node", required = true)]
    pub nodes: Vec<String>,
    /// List the manifests in the store (sequence, time, term, LSN per shard, complete or not)
    /// and exit.
    #[arg(long)]
    pub list: bool,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
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
            "shards": self.shards.iter().map(|s| serde_json::json!({
                "shard": s.shard, "lsn": s.lsn, "term": s.term,
                "digest": format!("{:032x}", s.digest.0), "keys": s.key_count, "bytes": s.bytes,
                "object": s.object,
            })).collect::<Vec<_>>(),
            "skipped": self.skipped.iter().map(|(m, why)| serde_json::json!({"manifest": m, "reason": why})).collect::<Vec<_>>(),
            "fetched_bytes": self.fetched_bytes,
            "resumed_parts": self.resumed_parts,
            "phases_ms": self.phases_ms.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
            "total_ms": self.total_ms,
        })
    }
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
    let store = DurableStore::open(&args.from).map_err(|e| e.to_string())?;
    if args.list {
        return list(&store);
    }
    let nodes = args
        .nodes
        .iter()
        .map(|n| parse_node(n))
        .collect::<Result<Vec<_>, _>>()?;
    let r = restore(&store, args.manifest.as_deref(), &args.card, &nodes)?;
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
    for s in &r.shards {
        println!(
            "  shard {}: lsn {} (term {}), {} keys, digest {:032x}, {} bytes",
            s.shard, s.lsn, s.term, s.key_count, s.digest.0, s.bytes
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
    let staging = nodes[0].1.join(RESTORE_STAGING_DIR);
    std::fs::create_dir_all(&staging).map_err(|e| format!("{}: {e}", staging.display()))?;
    let mut session = card.session_without_integrity_key()?;
    // Phase 1: the manifest (metadata only; no snapshot byte is fetched before the card
    // accepted the realm and the MAC verified).
    let s = |e: StoreError| e.to_string();
    let (name, bytes, skipped) = choose_manifest(store, named)?;
    let (m, _) = Manifest::decode_unverified(&bytes).map_err(|e| format!("{name}: {e}"))?;
    let old = m.cluster().map_err(|e| format!("{name}: {e}"))?;
    session
        .import_integrity_key(&old.integrity_key_wrapped)
        .map_err(|e| {
            format!(
                "{name}: the card refuses the cluster's integrity key, nothing was fetched: {e}"
            )
        })?;
    let m = Manifest::decode(&bytes, &session).map_err(|e| format!("{name}: {e}"))?;
    if !m.archives.is_empty() {
        return Err(format!(
            "{name} names {} archived log ranges; this keyfort cannot replay archived ranges \
             yet and will not restore short of what the manifest promises",
            m.archives.len()
        ));
    }
    let manifest_ms = ms(t0);
    let session = Rc::new(session);
    let out = keyfort_engine::exec::run_local(&staging, |_| {
        fetch_verify_write(store, &m, &old, &session, &staging, nodes)
    })
    .map_err(|e| e.to_string())??;
    let _ = std::fs::remove_dir_all(&staging);
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

/// The manifest to restore: the named one, or the newest whose objects all exist with their
/// sizes (newer incomplete ones are passed over, with the reason). Returns its name, bytes
/// and the skipped ones.
#[allow(clippy::type_complexity)]
fn choose_manifest(
    store: &DurableStore,
    named: Option<&str>,
) -> Result<(String, Vec<u8>, Vec<(String, String)>), String> {
    let s = |e: StoreError| e.to_string();
    let sizes: std::collections::HashMap<String, u64> =
        block_on(store.list("")).map_err(s)?.into_iter().collect();
    let candidates: Vec<String> = match named {
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
    if candidates.is_empty() {
        return Err(format!("{}: no manifest in the store", store.url()));
    }
    let mut skipped = Vec::new();
    for name in candidates {
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
            Ok((m, _)) => match missing_object(&m, &sizes) {
                None => return Ok((name, bytes, skipped)),
                Some(why) => why,
            },
        };
        if named.is_some() {
            return Err(format!("{name}: {why}"));
        }
        skipped.push((name, why));
    }
    Err(format!(
        "no complete manifest in {}: {}",
        store.url(),
        skipped
            .iter()
            .map(|(m, w)| format!("{m}: {w}"))
            .collect::<Vec<_>>()
            .join("; ")
    ))
}

struct Written {
    manifest: Manifest,
    cluster: ClusterConfig,
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
    // Phase 3: verify (blocking threads: hash and snapshot open in parallel; MAC in the card).
    let t = Instant::now();
    let checks: Vec<_> = files
        .iter()
        .map(|p| {
            let p = p.clone();
            glommio::executor().spawn_blocking(move || {
                (crate::backup::file_hash(&p), Snapshot::open_without_mac(&p))
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
    // Phase 4: the new cluster.
    let t = Instant::now();
    let members: Vec<Member> = nodes
        .iter()
        .zip(old.next_node_id..)
        .map(|((addr, _), node_id)| Member {
            node_id,
            peer_addr: addr.clone(),
        })
        .collect();
    let cluster = ClusterConfig {
        cluster_id: rand::random(),
        shard_count: old.shard_count,
        next_node_id: old.next_node_id + nodes.len() as u64,
        members,
        integrity_key_wrapped: old.integrity_key_wrapped.clone(),
    };
    let config = cluster.encode().map_err(|e| e.to_string())?;
    let voters: Vec<u64> = cluster.members.iter().map(|m| m.node_id).collect();
    let mut footers = Vec::new();
    for snap in snaps {
        footers.push(snap.footer().clone());
        snapshot::rewrite_membership(snap, &voters, &[], &**session).map_err(|e| e.to_string())?;
    }
    let record = Op::ClusterRestore {
        config: config.clone(),
    };
    let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    for ((_, dir), member) in nodes.iter().zip(&cluster.members) {
        let s = |e: keyfort_engine::cluster::ClusterError| e.to_string();
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
            let wdir = shard_wbl_dir(dir, shard);
            let (wbl, _) = Wbl::open(&wdir, WblOptions::default())
                .await
                .map_err(|e| e.to_string())?;
            let w = |e: keyfort_engine::wbl::WblError| format!("{}: {e}", wdir.display());
            if wbl.last_lsn() != 0 {
                return Err(format!("{}: log not empty", wdir.display()));
            }
            wbl.reset_to(f.lsn + 1, f.chain_head, f.term)
                .await
                .map_err(w)?;
            wbl.append(record.kind(), f.lsn + 1, f.term + 1, record.encode())
                .map_err(w)?
                .await
                .map_err(w)?;
            wbl.set_hard_state(HardState {
                term: f.term + 1,
                vote: 0,
                commit: f.lsn + 1,
            })
            .map_err(w)?
            .await
            .map_err(w)?;
            wbl.close().await.map_err(w)?;
        }
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
        fetched_bytes,
        resumed_parts,
        phases_ms: vec![
            ("fetch", fetch_ms),
            ("verify", verify_ms),
            ("write", write_ms),
        ],
    })
}
