//! The snapshot manager (DESIGN.md "Rolling snapshots and the snapshot manager", docs/format.md
//! §9): runs on every node and acts only while the node leads shard 0, so it moves with that
//! leadership.
//!
//! Every [`BackupConfig::interval`] the acting manager polls every node for its newest snapshot
//! of every shard (a chunk request for `NEWEST_LSN` over the snapshot stream: LSN and size),
//! takes the highest-LSN one — its own, or fetched from that node over the snapshot stream
//! (checked chunks, resumed) — checks it (crc of every section, chain, digest and the footer MAC
//! in the card), and uploads the ones newer than the last manifest's with a conditional create
//! under a name carrying the file's xxh3-64 (`snapshots/shard-S/{lsn:016x}-{hash:016x}.ksnap`:
//! one name, one content) — in a task of its own, so that rounds go on meanwhile. Each round
//! writes a manifest, when anything changed, naming the newest uploaded snapshot of every shard
//! and the archived log ranges that continue them, MACed in the card, again with a conditional
//! create, as the round's last object. A manager killed mid-round leaves at most objects no manifest names (a restore never
//! sees them); never a manifest naming an object that is not complete — an object becomes
//! visible only once whole.
//!
//! Fences: the manifest carries the manager's shard-0 term; a manager that finds a newer
//! manifest of a higher term (it was deposed) skips its round. A restored cluster writes
//! `fences/<old cluster id>`; the old cluster's manager, finding it, stops for good.
//!
//! Retention keeps the newest [`BackupConfig::manifests_kept`] manifests; an older manifest is
//! deleted first, then the objects it named that no kept manifest names. Objects no manifest
//! ever named (a round cut short) are left for the operator (`docs/operations.md`).
//!
//! A node that does not answer the poll is passed over for that round.

use crate::cluster_cmd::{hex, shard_snapshot_dir};
use crate::durable::{DurableStore, PutOutcome, StoreError};
use keyfort_engine::archive::{parse_range_object, range_prefix, LogRange};
use keyfort_engine::manifest::{
    manifest_name, manifest_seq, ArchivedRange, Manifest, ShardSnapshot, MANIFEST_DIR,
};
use keyfort_engine::raft::Replica;
use keyfort_engine::snapshot::{self, FooterMac, Snapshot};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Default time between two rounds of the manager.
pub const BACKUP_INTERVAL_DEFAULT: Duration = Duration::from_secs(1);
/// Default number of manifests kept by retention.
pub const MANIFESTS_KEPT_DEFAULT: usize = 8;
/// Fewest manifests retention may keep (a restore always has one to fall back to).
pub const MANIFESTS_KEPT_MIN: usize = 2;
/// Most range names a manager remembers as checked (then it forgets them all and checks again).
pub const CHECKED_RANGES_MAX: usize = 1 << 16;
/// Manifests a round reads back, newest first, looking for one that verifies.
pub const MANIFEST_READ_BACK: usize = 8;
/// Folder of the snapshot objects in a backup root.
pub const SNAPSHOT_DIR: &str = "snapshots";
/// Folder of the fence objects in a backup root.
pub const FENCE_DIR: &str = "fences";
/// Folder, in the data dir, where the manager hard-links a snapshot while it uploads it (a
/// compaction may delete the original meanwhile).
pub const STAGING_DIR: &str = "backup-staging";

/// The object name of shard `shard`'s snapshot at `lsn` whose file hashes to `hash`.
pub fn snapshot_object(shard: u32, lsn: u64, hash: u64) -> String {
    format!("{SNAPSHOT_DIR}/shard-{shard}/{lsn:016x}-{hash:016x}.ksnap")
}

/// The fence object of cluster `cluster_id`: present once a restore replaced that cluster.
pub fn fence_object(cluster_id: &[u8; 16]) -> String {
    format!("{FENCE_DIR}/{}", hex(cluster_id))
}

/// xxh3-64 of a whole file (blocking; 1 MiB reads).
pub fn file_hash(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            return Ok((h.digest(), n));
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
}

/// The manifests in `store`, ascending sequence number, with their object names.
pub async fn list_manifests(store: &DurableStore) -> Result<Vec<(u64, String)>, StoreError> {
    let mut out: Vec<(u64, String)> = store
        .list(&format!("{MANIFEST_DIR}/"))
        .await?
        .into_iter()
        .filter_map(|(k, _)| Some((manifest_seq(&k)?, k)))
        .collect();
    out.sort();
    Ok(out)
}

#[derive(Clone, Debug)]
pub struct BackupConfig {
    pub interval: Duration,
    pub manifests_kept: usize,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            interval: BACKUP_INTERVAL_DEFAULT,
            manifests_kept: MANIFESTS_KEPT_DEFAULT,
        }
    }
}

/// A manifest a round wrote.
#[derive(Clone, Debug)]
pub struct Written {
    pub seq: u64,
    pub name: String,
    /// Per shard, the snapshot's LSN.
    pub lsns: Vec<u64>,
    /// Per shard, the LSN a restore from it reaches (the last archived range's, else the
    /// snapshot's).
    pub restorable: Vec<u64>,
    pub unix_ms: u64,
}

/// What the manager last did, for `status.json` and `keyfort cluster status`.
#[derive(Clone, Debug, Default)]
pub struct BackupStatus {
    /// The newest manifest this node wrote.
    pub last: Option<Written>,
    /// The last round's error, if it failed.
    pub error: Option<String>,
    /// The backup root holds a fence for this cluster: a restore replaced it.
    pub fenced: bool,
    pub rounds: u64,
    pub bytes_uploaded: u64,
    /// Snapshots fetched from other nodes because they were newer than this node's.
    pub fetched_from_peers: u64,
}

impl BackupStatus {
    pub fn to_json(&self) -> serde_json::Value {
        let w = self.last.as_ref();
        serde_json::json!({
            "seq": w.map(|w| w.seq),
            "manifest": w.map(|w| w.name.clone()),
            "lsns": w.map_or(Vec::new(), |w| w.lsns.clone()),
            "restorable_lsns": w.map_or(Vec::new(), |w| w.restorable.clone()),
            "uploaded_unix_ms": w.map(|w| w.unix_ms),
            "error": self.error,
            "fenced": self.fenced,
            "rounds": self.rounds,
            "bytes_uploaded": self.bytes_uploaded,
            "fetched_from_peers": self.fetched_from_peers,
        })
    }
}

/// The manager's inputs: the node's replicas, data dir, card and store.
pub struct Manager {
    pub cluster_id: [u8; 16],
    pub replicas: Rc<RefCell<Vec<Rc<Replica>>>>,
    pub data_dir: PathBuf,
    pub mac: Rc<dyn FooterMac>,
    pub store: DurableStore,
    pub config: BackupConfig,
    pub status: Rc<RefCell<BackupStatus>>,
    /// The node's peer transport: the poll and the fetch of other nodes' snapshots.
    pub peers: Rc<keyfort_net::transport::PeerTransport>,
    /// Snapshots this manager uploaded, per shard, for the next manifest.
    pub uploaded: RefCell<std::collections::HashMap<u32, ShardSnapshot>>,
    /// An upload task runs.
    pub uploading: std::cell::Cell<bool>,
    /// Names of the archived ranges this manager checked (`check_range`).
    pub checked_ranges: RefCell<std::collections::HashSet<String>>,
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Manager {
    /// Runs rounds for the life of the node (stops once fenced).
    pub async fn run(self: Rc<Self>) {
        loop {
            glommio::timer::sleep(self.config.interval).await;
            let leading = {
                let r = self.replicas.borrow();
                r.first().is_some_and(|r0| r0.with_core(|c| c.is_leader()))
            };
            if !leading {
                continue;
            }
            let t = Instant::now();
            let r = self.round().await;
            let mut st = self.status.borrow_mut();
            st.rounds += 1;
            match r {
                Ok(Some(w)) => {
                    tracing::info!(
                        seq = w.seq,
                        manifest = %w.name,
                        lsns = ?w.lsns,
                        restorable = ?w.restorable,
                        ms = t.elapsed().as_secs_f64() * 1e3,
                        "backup manifest written"
                    );
                    st.last = Some(w);
                    st.error = None;
                }
                Ok(None) => st.error = None,
                Err(Round::Fenced(by)) => {
                    tracing::error!(
                        fence = %by,
                        "this cluster was replaced by a restore from its backup root: the \
                         snapshot manager stops"
                    );
                    st.fenced = true;
                    st.error = Some(format!("fenced by {by}"));
                    return;
                }
                Err(Round::Failed(e)) => {
                    tracing::warn!(error = %e, "backup round failed; retried next round");
                    st.error = Some(e);
                }
            }
        }
    }

    /// One round: what it wrote, if it wrote a manifest.
    async fn round(self: &Rc<Self>) -> Result<Option<Written>, Round> {
        let f = |e: StoreError| Round::Failed(e.to_string());
        let fence = fence_object(&self.cluster_id);
        if self.store.head(&fence).await.map_err(f)?.is_some() {
            return Err(Round::Fenced(fence));
        }
        let replicas = self.replicas.borrow().clone();
        let term = replicas[0].with_core(|c| c.term());
        let Some(cluster_config) =
            replicas[0].with_core(|c| c.state_machine().cluster_config().map(<[u8]>::to_vec))
        else {
            return Ok(None);
        };
        let manifests = list_manifests(&self.store).await.map_err(f)?;
        // The newest manifest that verifies. Of this cluster and a higher term, it says this
        // manager was deposed; of this cluster otherwise, its entries are kept where nothing
        // newer exists here. Another cluster's (the one this cluster was restored from, whose
        // sequence this one continues) lends nothing: this cluster's own snapshots, which the
        // restore put in every data dir, and its own archive stand on their own.
        let mut newest_valid = None;
        for (seq, name) in manifests.iter().rev().take(MANIFEST_READ_BACK) {
            let b = self.store.get_bytes(name).await.map_err(f)?;
            match Manifest::decode(&b, &*self.mac) {
                Ok(m) if m.seq == *seq => {
                    newest_valid = Some(m);
                    break;
                }
                Ok(m) => tracing::warn!(
                    manifest = %name,
                    inside = m.seq,
                    "manifest passed over: a copy under another name"
                ),
                Err(e) => tracing::warn!(manifest = %name, error = %e, "manifest passed over"),
            }
        }
        let previous = match newest_valid {
            Some(m) if m.cluster().is_ok_and(|c| c.cluster_id == self.cluster_id) => {
                if m.shard0_term > term {
                    return Ok(None); // a newer manager wrote it: this one was deposed
                }
                Some(m)
            }
            _ => None,
        };
        // Per shard: the previous manifest's snapshot, or a newer one this manager has uploaded
        // since. Newer snapshots anywhere are uploaded by a task of their own: a 100 MB upload
        // takes seconds, and manifests naming the newest archived ranges keep coming meanwhile
        // (the RPO is the archive's, not an upload's).
        let mut shards = Vec::with_capacity(replicas.len());
        let mut changed = previous.is_none();
        let mut wanted = Vec::new();
        let mut missing = false;
        for shard in 0..replicas.len() as u32 {
            let prev = previous.as_ref().and_then(|m| {
                let cluster = m.cluster().ok()?;
                (cluster.shard_count as usize == replicas.len())
                    .then(|| m.shards[shard as usize].clone())
            });
            let done = self
                .uploaded
                .borrow()
                .get(&shard)
                .cloned()
                .filter(|u| prev.as_ref().is_none_or(|p| u.lsn > p.lsn));
            changed |= done.is_some();
            let base = done.or(prev);
            if !self.uploading.get() {
                let local = snapshot::list(&shard_snapshot_dir(&self.data_dir, shard))
                    .map_err(|e| Round::Failed(e.to_string()))?
                    .pop();
                if let Some((lsn, from)) = self.newest_anywhere(shard, local).await {
                    if base.as_ref().is_none_or(|b| lsn > b.lsn) {
                        wanted.push((shard, lsn, from));
                    }
                }
            }
            match base {
                Some(b) => shards.push(b),
                None => missing = true,
            }
        }
        if !wanted.is_empty() {
            self.uploading.set(true);
            glommio::spawn_local(self.clone().upload(wanted)).detach();
        }
        if missing {
            return Ok(None); // a shard with no snapshot uploaded yet
        }
        let mut archives = Vec::new();
        for s in &shards {
            let per_shard = keyfort_engine::manifest::ARCHIVES_MAX / shards.len().max(1);
            let ranges = self
                .archives_after(s.shard, s.lsn, per_shard)
                .await
                .map_err(f)?;
            let prev_to = previous.as_ref().and_then(|m| {
                m.archives
                    .iter()
                    .filter(|a| a.shard == s.shard)
                    .map(|a| a.to)
                    .max()
            });
            changed |= ranges.last().map(|a| a.to) != prev_to;
            archives.extend(ranges);
        }
        if !changed {
            return Ok(None);
        }
        let seq = match manifests.last() {
            None => 1,
            Some((s, name)) => s.checked_add(1).ok_or_else(|| {
                Round::Failed(format!(
                    "{name} holds the highest sequence number there is: no manifest can follow \
                     it (remove it if it was planted)"
                ))
            })?,
        };
        let m = Manifest {
            seq,
            created_unix_ms: now_unix_ms(),
            shard0_term: term,
            cluster_config,
            shards,
            archives,
        };
        let bytes = m
            .encode(&*self.mac)
            .map_err(|e| Round::Failed(e.to_string()))?;
        let name = manifest_name(seq);
        match self.store.put_bytes_create(&name, bytes).await.map_err(f)? {
            PutOutcome::Created => {}
            // Another manager took this number: the next round lists again.
            PutOutcome::AlreadyExists => return Ok(None),
        }
        self.retain(&manifests, &m).await.map_err(f)?;
        let restorable = m
            .shards
            .iter()
            .map(|s| {
                m.archives
                    .iter()
                    .filter(|a| a.shard == s.shard)
                    .map(|a| a.to)
                    .fold(s.lsn, u64::max)
            })
            .collect();
        Ok(Some(Written {
            seq,
            name,
            lsns: m.shards.iter().map(|s| s.lsn).collect(),
            restorable,
            unix_ms: m.created_unix_ms,
        }))
    }

    /// Uploads `wanted` snapshots (shard, LSN, where) one after another; each done is named by
    /// the next round's manifest. Stops at the first failure (the next round asks again).
    async fn upload(self: Rc<Self>, wanted: Vec<(u32, u64, Source)>) {
        for (shard, lsn, from) in wanted {
            let r = match from {
                Source::Here(path) => self.upload_snapshot(shard, lsn, &path).await,
                Source::Peer(node) => self.upload_from_peer(shard, lsn, node).await,
            };
            match r {
                Ok((entry, bytes)) => {
                    self.status.borrow_mut().bytes_uploaded += bytes;
                    self.uploaded.borrow_mut().insert(shard, entry);
                }
                Err(Round::Failed(e) | Round::Fenced(e)) => {
                    tracing::warn!(shard, lsn, error = %e, "snapshot upload failed; retried");
                    self.status.borrow_mut().error = Some(e);
                    break;
                }
            }
        }
        self.uploading.set(false);
    }

    /// The highest-LSN snapshot of `shard` on any node: this node's newest (`local`) or a
    /// peer's, found by asking every peer for its newest (`probe_newest`). A peer that does
    /// not answer is passed over (logged): the round goes on with what it has.
    async fn newest_anywhere(
        &self,
        shard: u32,
        local: Option<(u64, PathBuf)>,
    ) -> Option<(u64, Source)> {
        let mut best = local.map(|(lsn, p)| (lsn, Source::Here(p)));
        let peers: Vec<u64> = self.peers.peers().keys().copied().collect();
        for node in peers {
            match keyfort_net::snapshot_stream::probe_newest(&self.peers, node, shard).await {
                Ok(Some((lsn, _size))) if best.as_ref().is_none_or(|(b, _)| lsn > *b) => {
                    best = Some((lsn, Source::Peer(node)));
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(node, shard, error = %e, "snapshot poll: no answer"),
            }
        }
        best
    }

    /// Fetches node `node`'s snapshot of `shard` at `lsn` into [`STAGING_DIR`] over the
    /// snapshot stream (checked chunks, resumed), then uploads it as [`Self::upload_snapshot`]
    /// does a local one (every check and the MAC first).
    async fn upload_from_peer(
        &self,
        shard: u32,
        lsn: u64,
        node: u64,
    ) -> Result<(ShardSnapshot, u64), Round> {
        let staging = self.data_dir.join(STAGING_DIR);
        std::fs::create_dir_all(&staging)
            .map_err(|e| Round::Failed(format!("{}: {e}", staging.display())))?;
        let dest = staging.join(format!(
            "peer-{node}-shard-{shard}-{}",
            snapshot::file_name(lsn)
        ));
        let _unlink = Unlink(dest.clone());
        keyfort_net::snapshot_stream::fetch_snapshot(&self.peers, node, shard, lsn, 0, &dest)
            .await
            .map_err(|e| {
                Round::Failed(format!(
                    "shard {shard} snapshot at lsn {lsn} from node {node}: {e}"
                ))
            })?;
        self.status.borrow_mut().fetched_from_peers += 1;
        tracing::info!(
            node,
            shard,
            lsn,
            "snapshot manager: a peer's newer snapshot fetched"
        );
        self.upload_snapshot(shard, lsn, &dest).await
    }

    /// Verifies the snapshot at `path` (every check and the MAC), hashes it and uploads it
    /// unless an object of that name exists. Works on a hard link in [`STAGING_DIR`], so a
    /// compaction deleting the file meanwhile changes nothing.
    async fn upload_snapshot(
        &self,
        shard: u32,
        lsn: u64,
        path: &Path,
    ) -> Result<(ShardSnapshot, u64), Round> {
        let fail = |e: String| Round::Failed(format!("shard {shard} snapshot at lsn {lsn}: {e}"));
        let staging = self.data_dir.join(STAGING_DIR);
        std::fs::create_dir_all(&staging).map_err(|e| fail(e.to_string()))?;
        let link = staging.join(format!("shard-{shard}-{}", snapshot::file_name(lsn)));
        let _ = std::fs::remove_file(&link);
        std::fs::hard_link(path, &link).map_err(|e| fail(e.to_string()))?;
        let _unlink = Unlink(link.clone());
        let l = link.clone();
        let (snap, hashed) = glommio::executor()
            .spawn_blocking(move || (Snapshot::open_without_mac(&l), file_hash(&l)))
            .await;
        let mut snap = snap.map_err(|e| fail(e.to_string()))?;
        snap.verify_mac(&*self.mac)
            .map_err(|e| fail(e.to_string()))?;
        let (hash, bytes) = hashed.map_err(|e| fail(e.to_string()))?;
        let footer = snap.footer().clone();
        drop(snap);
        let object = snapshot_object(shard, lsn, hash);
        let sent = match self
            .store
            .put_file_create(&object, &link)
            .await
            .map_err(|e| fail(e.to_string()))?
        {
            PutOutcome::Created => bytes,
            PutOutcome::AlreadyExists => 0,
        };
        Ok((
            ShardSnapshot {
                shard,
                lsn,
                term: footer.term,
                bytes,
                digest: footer.digest,
                key_count: footer.key_count,
                file_hash: hash,
                object,
            },
            sent,
        ))
    }

    /// The archived ranges in the store that continue shard `shard`'s log after `lsn` without a
    /// gap, each reaching furthest among those that join (ranges of different leaders may
    /// overlap).
    async fn archives_after(
        &self,
        shard: u32,
        lsn: u64,
        max: usize,
    ) -> Result<Vec<ArchivedRange>, StoreError> {
        let listed = self
            .store
            .list(&range_prefix(&self.cluster_id, shard))
            .await?;
        let mut ranges: Vec<(u64, u64, u64, String, u64)> = listed
            .into_iter()
            .filter_map(|(name, size)| {
                let (s, from, to, hash) = parse_range_object(&name)?;
                (s == shard).then_some((from, to, hash, name, size))
            })
            .collect();
        let mut out = Vec::new();
        let mut at = lsn;
        while out.len() < max {
            let Some(i) = ranges
                .iter()
                .enumerate()
                .filter(|(_, r)| r.0 <= at.saturating_add(1) && r.1 > at)
                .max_by_key(|(_, r)| r.1)
                .map(|(i, _)| i)
            else {
                break;
            };
            let (from, to, hash, name, size) = ranges.swap_remove(i);
            if let Err(e) = self.check_range(shard, from, to, hash, &name, size).await {
                tracing::warn!(range = %name, error = %e, "archived range passed over");
                continue;
            }
            at = to;
            out.push(ArchivedRange {
                shard,
                from,
                to,
                bytes: size,
                file_hash: hash,
                object: name,
            });
        }
        Ok(out)
    }

    /// Checks a range before a manifest names it, once per manager: its bytes hash to the hash
    /// in its name, its MAC verifies, and it holds the shard and LSNs its name says, of this
    /// cluster. A planted or damaged object is passed over, never named.
    async fn check_range(
        &self,
        shard: u32,
        from: u64,
        to: u64,
        hash: u64,
        name: &str,
        size: u64,
    ) -> Result<(), String> {
        if self.checked_ranges.borrow().contains(name) {
            return Ok(());
        }
        let b = self
            .store
            .get_bytes(name)
            .await
            .map_err(|e| e.to_string())?;
        if b.len() as u64 != size || xxhash_rust::xxh3::xxh3_64(&b) != hash {
            return Err("its bytes do not hash to its name".into());
        }
        let r = LogRange::decode(&b, &*self.mac).map_err(|e| e.to_string())?;
        if (r.cluster_id, r.shard, r.from, r.to()) != (self.cluster_id, shard, from, to) {
            return Err("it holds other LSNs than its name says".into());
        }
        let mut checked = self.checked_ranges.borrow_mut();
        if checked.len() >= CHECKED_RANGES_MAX {
            checked.clear();
        }
        checked.insert(name.to_string());
        Ok(())
    }

    /// Deletes the manifests beyond the newest `manifests_kept` (counting `newest`, just
    /// written), then every object they named that no kept manifest names.
    async fn retain(&self, before: &[(u64, String)], newest: &Manifest) -> Result<(), StoreError> {
        let keep = self.config.manifests_kept.max(MANIFESTS_KEPT_MIN);
        if before.len() < keep {
            return Ok(());
        }
        let (old, kept) = before.split_at(before.len() + 1 - keep);
        let mut referenced: std::collections::HashSet<String> = newest.objects().collect();
        for (_, name) in kept {
            let b = self.store.get_bytes(name).await?;
            // A kept manifest that does not decode is no restore point and protects nothing:
            // its names are unknown, so objects it shares with a deleted manifest go.
            if let Ok((m, _)) = Manifest::decode_unverified(&b) {
                referenced.extend(m.objects());
            }
        }
        for (_, name) in old {
            let m = match self.store.get_bytes(name).await {
                Ok(b) => Manifest::decode_unverified(&b).ok().map(|(m, _)| m),
                Err(StoreError::NotFound { .. }) => None,
                Err(e) => return Err(e),
            };
            self.store.delete(name).await?;
            for o in m.iter().flat_map(|m| m.objects()) {
                if !referenced.contains(&o) {
                    self.store.delete(&o).await?;
                }
            }
        }
        Ok(())
    }
}

/// Where the newest snapshot of a shard is.
enum Source {
    Here(PathBuf),
    Peer(u64),
}

/// Why a round ended without a manifest.
enum Round {
    Fenced(String),
    Failed(String),
}

/// Removes a staging link when the upload is done or failed.
struct Unlink(PathBuf);

impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
