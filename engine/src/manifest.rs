//! Backup manifests (docs/format.md §9.2): what one upload round of the snapshot manager put in
//! the durable store, MACed with the cluster integrity key.
//!
//! A manifest names, for every shard, the snapshot object the round uploaded (LSN, term, size,
//! state digest, key count, xxh3-64 of the whole file) and the archived log ranges a restore
//! replays after it; it carries the cluster config (cluster id, members, shard count and the
//! wrapped integrity key, whose vendor and adapter fingerprints name the realm) and the shard-0
//! term of the manager that wrote it. It is the last object of a round, written with a
//! conditional create, so a round cut short leaves no manifest and a manifest's objects all
//! exist unless something deleted them — which a restore detects by size and hash.
//!
//! Manifests are named `manifests/{seq:016x}.kman` and numbered across the life of a backup
//! root: a cluster restored from a root continues its sequence, and the conditional create
//! makes two writers of one number impossible.

use crate::cluster::{ClusterConfig, ClusterError, Reader};
use crate::snapshot::FooterMac;
use crate::state::StateDigest;
use keyfort_hsm::format::MAC_LEN;

/// "KFMF".
pub const MANIFEST_MAGIC: [u8; 4] = *b"KFMF";
pub const MANIFEST_VERSION: u8 = 1;
/// Most bytes of an object name.
pub const OBJECT_NAME_BYTES_MAX: usize = 256;
/// Most archived log ranges one manifest names.
pub const ARCHIVES_MAX: usize = 1 << 16;
/// Most bytes of a manifest (its cluster config, shards and archive list bound it far below).
pub const MANIFEST_BYTES_MAX: usize = 16 << 20;
/// Folder of the manifests in a backup root.
pub const MANIFEST_DIR: &str = "manifests";

const WHAT: &str = "manifest";

/// One shard's snapshot object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardSnapshot {
    pub shard: u32,
    pub lsn: u64,
    pub term: u64,
    /// File size in bytes.
    pub bytes: u64,
    pub digest: StateDigest,
    pub key_count: u64,
    /// xxh3-64 of the whole file.
    pub file_hash: u64,
    /// Object name, relative to the backup root.
    pub object: String,
}

/// A sealed range `[from, to]` of one shard's committed log (the log archive, §9.3); it may
/// begin at or before the LSN after the previous range (or the snapshot): a restore skips what
/// it already has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchivedRange {
    pub shard: u32,
    pub from: u64,
    pub to: u64,
    pub bytes: u64,
    pub file_hash: u64,
    pub object: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub seq: u64,
    pub created_unix_ms: u64,
    /// The shard-0 term of the manager that wrote it (the fence of a deposed manager).
    pub shard0_term: u64,
    /// The encoded cluster config (§7.1) at the time of the round.
    pub cluster_config: Vec<u8>,
    /// One per shard, ascending shard.
    pub shards: Vec<ShardSnapshot>,
    /// Ascending (shard, from).
    pub archives: Vec<ArchivedRange>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error(transparent)]
    Format(#[from] ClusterError),
    #[error("manifest: MAC does not verify with the cluster integrity key: {0}")]
    BadMac(String),
    #[error("manifest: card error: {0}")]
    Card(String),
}

/// The object name of manifest `seq`.
pub fn manifest_name(seq: u64) -> String {
    format!("{MANIFEST_DIR}/{seq:016x}.kman")
}

/// The sequence number of a manifest object name (`None`: not a manifest's name).
pub fn manifest_seq(name: &str) -> Option<u64> {
    let hex = name
        .strip_prefix(MANIFEST_DIR)?
        .strip_prefix('/')?
        .strip_suffix(".kman")?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

/// An object name a manifest may carry: 1..=256 bytes of `[A-Za-z0-9._/-]`, no empty, `.` or
/// `..` segment, not absolute. A restore uses names as store keys, so no name escapes the root.
pub fn valid_object_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= OBJECT_NAME_BYTES_MAX
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
        && s.split('/').all(|seg| !matches!(seg, "" | "." | ".."))
}

fn invalid(field: &'static str) -> ClusterError {
    ClusterError::Invalid { what: WHAT, field }
}

fn out_of_range(field: &'static str, value: usize, max: usize) -> Result<(), ClusterError> {
    if value > max {
        return Err(ClusterError::OutOfRange {
            what: WHAT,
            field,
            value: value as u64,
            max: max as u64,
        });
    }
    Ok(())
}

fn put_name(w: &mut Vec<u8>, s: &str) {
    w.extend_from_slice(&(s.len() as u16).to_le_bytes());
    w.extend_from_slice(s.as_bytes());
}

fn name(r: &mut Reader<'_>) -> Result<String, ClusterError> {
    let len = r.u16()? as usize;
    out_of_range("object name length", len, OBJECT_NAME_BYTES_MAX)?;
    let s = std::str::from_utf8(r.take(len)?).map_err(|_| invalid("object name"))?;
    if !valid_object_name(s) {
        return Err(invalid("object name"));
    }
    Ok(s.to_string())
}

impl Manifest {
    /// Every object the manifest names (snapshots, then archived ranges).
    pub fn objects(&self) -> impl Iterator<Item = String> + '_ {
        self.shards
            .iter()
            .map(|s| s.object.clone())
            .chain(self.archives.iter().map(|a| a.object.clone()))
    }

    /// The decoded cluster config.
    pub fn cluster(&self) -> Result<ClusterConfig, ClusterError> {
        ClusterConfig::decode(&self.cluster_config)
    }

    /// Checks what `decode` checks of a decoded manifest: a valid cluster config whose shard
    /// count the shards match one each in order, names valid, archives ordered, in range and
    /// after their shard's snapshot.
    fn check(&self) -> Result<(), ClusterError> {
        let cluster = self.cluster()?;
        if self.shards.len() != cluster.shard_count as usize {
            return Err(invalid("shard count (not the cluster config's)"));
        }
        for (i, s) in self.shards.iter().enumerate() {
            if s.shard as usize != i {
                return Err(invalid("shard order"));
            }
            if !valid_object_name(&s.object) || s.lsn == 0 {
                return Err(invalid("shard snapshot"));
            }
        }
        out_of_range("archive count", self.archives.len(), ARCHIVES_MAX)?;
        let mut last: Option<(u32, u64)> = None;
        for a in &self.archives {
            let s = self
                .shards
                .get(a.shard as usize)
                .ok_or(invalid("archive shard"))?;
            // Ranges sealed by different leaders may overlap; each must reach past the one
            // before it (or the snapshot) and leave no LSN out.
            let prev = match last {
                Some((shard, to)) if shard == a.shard => to,
                _ => s.lsn,
            };
            let follows = a.from <= prev.saturating_add(1) && a.to > prev;
            if !follows || a.to < a.from || !valid_object_name(&a.object) {
                return Err(invalid(
                    "archived range (not contiguous after its snapshot)",
                ));
            }
            if last.is_some_and(|(shard, _)| shard > a.shard) {
                return Err(invalid("archive order"));
            }
            last = Some((a.shard, a.to));
        }
        Ok(())
    }

    /// The bytes the MAC covers (everything but the MAC; the crc32c last).
    fn body(&self) -> Result<Vec<u8>, ClusterError> {
        self.check()?;
        let mut w = Vec::with_capacity(256 + self.cluster_config.len());
        w.extend_from_slice(&MANIFEST_MAGIC);
        w.extend_from_slice(&[MANIFEST_VERSION, 0, 0, 0]);
        for v in [self.seq, self.created_unix_ms, self.shard0_term] {
            w.extend_from_slice(&v.to_le_bytes());
        }
        w.extend_from_slice(&(self.cluster_config.len() as u32).to_le_bytes());
        w.extend_from_slice(&self.cluster_config);
        w.extend_from_slice(&(self.shards.len() as u32).to_le_bytes());
        for s in &self.shards {
            w.extend_from_slice(&s.shard.to_le_bytes());
            for v in [s.lsn, s.term, s.bytes] {
                w.extend_from_slice(&v.to_le_bytes());
            }
            w.extend_from_slice(&s.digest.to_bytes());
            w.extend_from_slice(&s.key_count.to_le_bytes());
            w.extend_from_slice(&s.file_hash.to_le_bytes());
            put_name(&mut w, &s.object);
        }
        w.extend_from_slice(&(self.archives.len() as u32).to_le_bytes());
        for a in &self.archives {
            w.extend_from_slice(&a.shard.to_le_bytes());
            for v in [a.from, a.to, a.bytes, a.file_hash] {
                w.extend_from_slice(&v.to_le_bytes());
            }
            put_name(&mut w, &a.object);
        }
        let crc = crc32c::crc32c(&w);
        w.extend_from_slice(&crc.to_le_bytes());
        Ok(w)
    }

    /// The manifest's bytes, MACed in the card with the cluster integrity key.
    pub fn encode(&self, mac: &dyn FooterMac) -> Result<Vec<u8>, ManifestError> {
        let mut w = self.body()?;
        let tag = mac
            .mac(&w)
            .map_err(|e| ManifestError::Card(e.to_string()))?;
        w.extend_from_slice(&tag);
        Ok(w)
    }

    /// Decodes and checks everything but the MAC; returns the manifest and its MAC. Used to
    /// read the cluster config (and so the realm) before a card is asked to verify.
    pub fn decode_unverified(b: &[u8]) -> Result<(Manifest, [u8; MAC_LEN]), ClusterError> {
        out_of_range("size", b.len(), MANIFEST_BYTES_MAX)?;
        if b.len() < MAC_LEN + 4 {
            return Err(ClusterError::Truncated {
                what: WHAT,
                offset: b.len(),
            });
        }
        let (body, tag) = b.split_at(b.len() - MAC_LEN);
        let mut r = Reader::new(body, WHAT);
        if r.take(4)? != MANIFEST_MAGIC {
            return Err(ClusterError::BadMagic { what: WHAT });
        }
        let head = r.take(4)?;
        if head[0] != MANIFEST_VERSION {
            return Err(ClusterError::BadVersion {
                what: WHAT,
                version: head[0],
            });
        }
        if head[1..] != [0; 3] {
            return Err(invalid("reserved"));
        }
        let (seq, created_unix_ms, shard0_term) = (r.u64()?, r.u64()?, r.u64()?);
        let len = r.u32()? as usize;
        out_of_range(
            "cluster config length",
            len,
            crate::state::CLUSTER_CONFIG_BYTES_MAX,
        )?;
        let cluster_config = r.take(len)?.to_vec();
        let n = r.u32()? as usize;
        out_of_range("shard count", n, crate::cluster::SHARDS_MAX as usize)?;
        let mut shards = Vec::with_capacity(n);
        for _ in 0..n {
            let shard = r.u32()?;
            let (lsn, term, bytes) = (r.u64()?, r.u64()?, r.u64()?);
            let digest = StateDigest::from_bytes(r.take(16)?.try_into().expect("16 bytes"));
            let (key_count, file_hash) = (r.u64()?, r.u64()?);
            shards.push(ShardSnapshot {
                shard,
                lsn,
                term,
                bytes,
                digest,
                key_count,
                file_hash,
                object: name(&mut r)?,
            });
        }
        let n = r.u32()? as usize;
        out_of_range("archive count", n, ARCHIVES_MAX)?;
        let mut archives = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let shard = r.u32()?;
            let (from, to, bytes, file_hash) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
            archives.push(ArchivedRange {
                shard,
                from,
                to,
                bytes,
                file_hash,
                object: name(&mut r)?,
            });
        }
        let at = r.at();
        let crc = r.u32()?;
        if crc != crc32c::crc32c(&body[..at]) {
            return Err(ClusterError::BadChecksum { what: WHAT });
        }
        r.end()?;
        let m = Manifest {
            seq,
            created_unix_ms,
            shard0_term,
            cluster_config,
            shards,
            archives,
        };
        m.check()?;
        Ok((m, tag.try_into().expect("MAC_LEN bytes")))
    }

    /// Decodes, checks and verifies the MAC in the card (whose integrity key must be the
    /// cluster's: import it from [`Manifest::cluster`] first).
    pub fn decode(b: &[u8], mac: &dyn FooterMac) -> Result<Manifest, ManifestError> {
        let (m, tag) = Manifest::decode_unverified(b)?;
        mac.verify(&b[..b.len() - MAC_LEN], &tag)
            .map_err(|e| match e {
                keyfort_hsm::CardError::BadMac { .. } => ManifestError::BadMac(e.to_string()),
                e => ManifestError::Card(e.to_string()),
            })?;
        Ok(m)
    }
}
