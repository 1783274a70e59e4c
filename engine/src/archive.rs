//! Archived log ranges (docs/format.md §9.3): a sealed range `[from, to]` of one shard's
//! committed log, as uploaded to the durable store by the shard's leader, MACed with the cluster
//! integrity key — a forged range could undelete a key or undo a rotation.
//!
//! A range carries every record of its LSNs verbatim (kind, term, payload; the LSN is implied by
//! the position) and the WBL chain (§1.1) before its first record and after its last: a restore
//! recomputes the chain over the records and checks it links to the snapshot's footer chain head
//! (or the previous range's end), so ranges from different leaders, cut at different LSNs, join
//! only where the log they copy is the same.

use crate::cluster::{ClusterError, Reader};
use crate::snapshot::FooterMac;
use crate::wbl::record::chain_next;
use crate::wbl::{RecordKind, MAX_PAYLOAD_BYTES};
use keyfort_hsm::format::MAC_LEN;

/// "KFAR".
pub const ARCHIVE_MAGIC: [u8; 4] = *b"KFAR";
pub const ARCHIVE_VERSION: u8 = 1;
/// Most records in one range.
pub const ARCHIVE_RECORDS_MAX: usize = 1 << 20;
/// Most bytes of one encoded range.
pub const ARCHIVE_BYTES_MAX: usize = 64 << 20;
/// Folder of the archived ranges in a backup root.
pub const ARCHIVE_DIR: &str = "archive";
/// Bytes before the records: magic 4, version 1, reserved 3, cluster id 16, shard 4, from 8,
/// to 8, base chain 8, end chain 8, record count 4.
pub const ARCHIVE_HEADER_BYTES: usize = 4 + 4 + 16 + 4 + 8 * 4 + 4;
/// Bytes per record besides its payload: kind 1, term 8, payload length 4.
pub const ARCHIVE_RECORD_OVERHEAD: usize = 1 + 8 + 4;

const WHAT: &str = "archived range";

/// One record of a range; its LSN is `from` + its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchivedRecord {
    pub kind: RecordKind,
    pub term: u64,
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRange {
    /// The cluster whose leader sealed it.
    pub cluster_id: [u8; 16],
    pub shard: u32,
    pub from: u64,
    /// The WBL chain at `from - 1`.
    pub base_chain: u64,
    pub records: Vec<ArchivedRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Format(#[from] ClusterError),
    #[error("archived range: MAC does not verify with the cluster integrity key: {0}")]
    BadMac(String),
    #[error("archived range: card error: {0}")]
    Card(String),
}

/// The folder of cluster `cluster_id`'s archived ranges of shard `shard`. Ranges live under
/// their cluster: a restored cluster rewrites its log's membership records as no-ops, so its
/// chain after the restore is its own and its ranges never mix with its predecessor's.
pub fn range_prefix(cluster_id: &[u8; 16], shard: u32) -> String {
    let hex: String = cluster_id.iter().map(|b| format!("{b:02x}")).collect();
    format!("{ARCHIVE_DIR}/{hex}/shard-{shard}/")
}

/// The object name of a range `[from, to]` whose encoded bytes hash (xxh3-64) to `hash`: one
/// name, one content.
pub fn range_object(cluster_id: &[u8; 16], shard: u32, from: u64, to: u64, hash: u64) -> String {
    format!(
        "{}{from:016x}-{to:016x}-{hash:016x}.karc",
        range_prefix(cluster_id, shard)
    )
}

/// `(shard, from, to, hash)` of a range's object name (`None`: not one).
pub fn parse_range_object(name: &str) -> Option<(u32, u64, u64, u64)> {
    let rest = name.strip_prefix(ARCHIVE_DIR)?.strip_prefix('/')?;
    let (cluster, rest) = rest.split_once('/')?;
    if cluster.len() != 32 || !cluster.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let (shard, file) = rest.strip_prefix("shard-")?.split_once('/')?;
    let mut parts = file.strip_suffix(".karc")?.split('-');
    let mut hex = || {
        let p = parts.next().filter(|p| p.len() == 16)?;
        u64::from_str_radix(p, 16).ok()
    };
    let (from, to, hash) = (hex()?, hex()?, hex()?);
    if parts.next().is_some() || from == 0 || to < from {
        return None;
    }
    Some((shard.parse().ok()?, from, to, hash))
}

fn invalid(field: &'static str) -> ClusterError {
    ClusterError::Invalid { what: WHAT, field }
}

impl LogRange {
    /// The last LSN (`from` when empty, which `encode` refuses).
    pub fn to(&self) -> u64 {
        self.from + self.records.len().max(1) as u64 - 1
    }

    /// The WBL chain after the last record.
    pub fn end_chain(&self) -> u64 {
        self.records
            .iter()
            .enumerate()
            .fold(self.base_chain, |c, (i, r)| {
                chain_next(c, r.kind, self.from + i as u64, r.term, &r.payload)
            })
    }

    fn check(&self) -> Result<(), ClusterError> {
        if self.from == 0 || self.records.is_empty() {
            return Err(invalid("range (empty, or starting at lsn 0)"));
        }
        if self.records.len() > ARCHIVE_RECORDS_MAX {
            return Err(ClusterError::OutOfRange {
                what: WHAT,
                field: "record count",
                value: self.records.len() as u64,
                max: ARCHIVE_RECORDS_MAX as u64,
            });
        }
        if self
            .records
            .iter()
            .any(|r| r.payload.len() > MAX_PAYLOAD_BYTES)
        {
            return Err(invalid("record payload (too long)"));
        }
        if self.records.windows(2).any(|w| w[1].term < w[0].term) {
            return Err(invalid("record terms (decreasing)"));
        }
        Ok(())
    }

    /// The encoded range, MACed in the card with the cluster integrity key.
    pub fn encode(&self, mac: &dyn FooterMac) -> Result<Vec<u8>, ArchiveError> {
        self.check()?;
        let size = ARCHIVE_HEADER_BYTES
            + self
                .records
                .iter()
                .map(|r| ARCHIVE_RECORD_OVERHEAD + r.payload.len())
                .sum::<usize>()
            + 4
            + MAC_LEN;
        if size > ARCHIVE_BYTES_MAX {
            return Err(ClusterError::OutOfRange {
                what: WHAT,
                field: "size",
                value: size as u64,
                max: ARCHIVE_BYTES_MAX as u64,
            }
            .into());
        }
        let mut w = Vec::with_capacity(size);
        w.extend_from_slice(&ARCHIVE_MAGIC);
        w.extend_from_slice(&[ARCHIVE_VERSION, 0, 0, 0]);
        w.extend_from_slice(&self.cluster_id);
        w.extend_from_slice(&self.shard.to_le_bytes());
        for v in [self.from, self.to(), self.base_chain, self.end_chain()] {
            w.extend_from_slice(&v.to_le_bytes());
        }
        w.extend_from_slice(&(self.records.len() as u32).to_le_bytes());
        for r in &self.records {
            w.push(r.kind as u8);
            w.extend_from_slice(&r.term.to_le_bytes());
            w.extend_from_slice(&(r.payload.len() as u32).to_le_bytes());
            w.extend_from_slice(&r.payload);
        }
        let crc = crc32c::crc32c(&w);
        w.extend_from_slice(&crc.to_le_bytes());
        let tag = mac.mac(&w).map_err(|e| ArchiveError::Card(e.to_string()))?;
        w.extend_from_slice(&tag);
        Ok(w)
    }

    /// Decodes and checks everything but the MAC: layout, crc, counts, kinds, terms, and that the
    /// chain over the records from the base chain is the stored end chain.
    pub fn decode_unverified(b: &[u8]) -> Result<(LogRange, [u8; MAC_LEN]), ClusterError> {
        if b.len() > ARCHIVE_BYTES_MAX {
            return Err(ClusterError::OutOfRange {
                what: WHAT,
                field: "size",
                value: b.len() as u64,
                max: ARCHIVE_BYTES_MAX as u64,
            });
        }
        if b.len() < ARCHIVE_HEADER_BYTES + 4 + MAC_LEN {
            return Err(ClusterError::Truncated {
                what: WHAT,
                offset: b.len(),
            });
        }
        let (body, tag) = b.split_at(b.len() - MAC_LEN);
        let mut r = Reader::new(body, WHAT);
        if r.take(4)? != ARCHIVE_MAGIC {
            return Err(ClusterError::BadMagic { what: WHAT });
        }
        let head = r.take(4)?;
        if head[0] != ARCHIVE_VERSION {
            return Err(ClusterError::BadVersion {
                what: WHAT,
                version: head[0],
            });
        }
        if head[1..] != [0; 3] {
            return Err(invalid("reserved"));
        }
        let cluster_id: [u8; 16] = r.take(16)?.try_into().expect("16 bytes");
        let shard = r.u32()?;
        let (from, to, base_chain, end_chain) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
        let n = r.u32()? as usize;
        if from == 0 || to < from || to - from + 1 != n as u64 || n > ARCHIVE_RECORDS_MAX {
            return Err(invalid("lsn range or record count"));
        }
        let mut records = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            let k = r.take(1)?[0];
            let kind = RecordKind::from_u8(k).ok_or(invalid("record kind"))?;
            let term = r.u64()?;
            let len = r.u32()? as usize;
            if len > MAX_PAYLOAD_BYTES {
                return Err(invalid("record payload (too long)"));
            }
            records.push(ArchivedRecord {
                kind,
                term,
                payload: r.take(len)?.to_vec(),
            });
        }
        let at = r.at();
        let crc = r.u32()?;
        if crc != crc32c::crc32c(&body[..at]) {
            return Err(ClusterError::BadChecksum { what: WHAT });
        }
        r.end()?;
        let range = LogRange {
            cluster_id,
            shard,
            from,
            base_chain,
            records,
        };
        range.check()?;
        if range.end_chain() != end_chain {
            return Err(invalid("end chain (the records do not hash to it)"));
        }
        Ok((range, tag.try_into().expect("MAC_LEN bytes")))
    }

    /// Decodes, checks and verifies the MAC in the card.
    pub fn decode(b: &[u8], mac: &dyn FooterMac) -> Result<LogRange, ArchiveError> {
        let (range, tag) = LogRange::decode_unverified(b)?;
        mac.verify(&b[..b.len() - MAC_LEN], &tag)
            .map_err(|e| match e {
                keyfort_hsm::CardError::BadMac { .. } => ArchiveError::BadMac(e.to_string()),
                e => ArchiveError::Card(e.to_string()),
            })?;
        Ok(range)
    }
}
