//! Cluster identity on disk and in the log (docs/format.md §7).
//!
//! - The **cluster config** is the payload of the `ClusterConfig` record at LSN 1 of every
//!   shard (and a copy in each node's data dir for starting before any log is read): the
//!   cluster id, the shard count (fixed at init), the members with their peer addresses, and
//!   the cluster integrity key wrapped under the realm's adapter KBK (only a card of the realm
//!   can load it).
//! - The **node identity** file says which cluster this data dir belongs to and the raft id the
//!   cluster gave it. It is written once, at init or join, and never taken from a config file.

use std::path::Path;

/// "KFCC".
pub const CLUSTER_CONFIG_MAGIC: [u8; 4] = *b"KFCC";
pub const CLUSTER_CONFIG_VERSION: u8 = 1;
/// Most members a cluster config names.
pub const MEMBERS_MAX: usize = 64;
/// Most bytes of a peer address.
pub const ADDR_BYTES_MAX: usize = 256;
/// Most bytes of the wrapped integrity key.
pub const WRAPPED_KEY_BYTES_MAX: usize = 4096;
/// Most shards a cluster has.
pub const SHARDS_MAX: u32 = 4096;
/// "KFID".
pub const IDENTITY_MAGIC: [u8; 4] = *b"KFID";
pub const IDENTITY_VERSION: u8 = 1;
pub const IDENTITY_FILE: &str = "identity";
pub const CLUSTER_CONFIG_FILE: &str = "cluster-config";
/// Identity file bytes: magic 4, version 1, reserved 3, cluster id 16, node id 8, crc32c 4.
pub const IDENTITY_BYTES: usize = 36;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    #[error("{what}: truncated at offset {offset}")]
    Truncated { what: &'static str, offset: usize },
    #[error("{what}: bad magic")]
    BadMagic { what: &'static str },
    #[error("{what}: unsupported version {version}")]
    BadVersion { what: &'static str, version: u8 },
    #[error("{what}: checksum mismatch")]
    BadChecksum { what: &'static str },
    #[error("{what}: {field} {value} out of range (max {max})")]
    OutOfRange {
        what: &'static str,
        field: &'static str,
        value: u64,
        max: u64,
    },
    #[error("{what}: {field} is not valid")]
    Invalid {
        what: &'static str,
        field: &'static str,
    },
    #[error("{what}: {bytes} trailing bytes")]
    Trailing { what: &'static str, bytes: usize },
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub node_id: u64,
    /// Peer listen address, `host:port`.
    pub peer_addr: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    pub cluster_id: [u8; 16],
    pub shard_count: u32,
    /// The raft id the next member to join gets; above every id ever given (ids are never
    /// reused: a replaced node's id could otherwise vote twice).
    pub next_node_id: u64,
    /// The current members, ascending node id: at `cluster init` the initial voters of every
    /// shard; a join replaces the member at the joiner's address (shard 0 carries the updates).
    pub members: Vec<Member>,
    /// `Card::create_integrity_key` output (docs/format.md §2.4).
    pub integrity_key_wrapped: Vec<u8>,
}

const CC: &str = "cluster config";

/// A cluster config `field` of `value` within its limit `max`, or the typed error.
fn range(field: &'static str, value: usize, max: usize) -> Result<(), ClusterError> {
    if value > max {
        Err(ClusterError::OutOfRange {
            what: CC,
            field,
            value: value as u64,
            max: max as u64,
        })
    } else {
        Ok(())
    }
}

impl ClusterConfig {
    /// Layout: magic 4, version 1, reserved 3, cluster id 16, shard count u32, next node id u64,
    /// member count u16,
    /// per member (node id u64, addr len u16, addr), wrapped key len u32, wrapped key, crc32c u32
    /// of everything before it. Little-endian.
    pub fn encode(&self) -> Result<Vec<u8>, ClusterError> {
        self.check()?;
        let mut w = Vec::new();
        w.extend_from_slice(&CLUSTER_CONFIG_MAGIC);
        w.extend_from_slice(&[CLUSTER_CONFIG_VERSION, 0, 0, 0]);
        w.extend_from_slice(&self.cluster_id);
        w.extend_from_slice(&self.shard_count.to_le_bytes());
        w.extend_from_slice(&self.next_node_id.to_le_bytes());
        w.extend_from_slice(&(self.members.len() as u16).to_le_bytes());
        for m in &self.members {
            w.extend_from_slice(&m.node_id.to_le_bytes());
            w.extend_from_slice(&(m.peer_addr.len() as u16).to_le_bytes());
            w.extend_from_slice(m.peer_addr.as_bytes());
        }
        w.extend_from_slice(&(self.integrity_key_wrapped.len() as u32).to_le_bytes());
        w.extend_from_slice(&self.integrity_key_wrapped);
        let crc = crc32c::crc32c(&w);
        w.extend_from_slice(&crc.to_le_bytes());
        Ok(w)
    }

    fn check(&self) -> Result<(), ClusterError> {
        if self.shard_count == 0 {
            return Err(ClusterError::Invalid {
                what: CC,
                field: "shard count",
            });
        }
        range(
            "shard count",
            self.shard_count as usize,
            SHARDS_MAX as usize,
        )?;
        range("member count", self.members.len(), MEMBERS_MAX)?;
        range(
            "wrapped key length",
            self.integrity_key_wrapped.len(),
            WRAPPED_KEY_BYTES_MAX,
        )?;
        let mut last = 0;
        for m in &self.members {
            range("address length", m.peer_addr.len(), ADDR_BYTES_MAX)?;
            if m.node_id <= last {
                return Err(ClusterError::Invalid {
                    what: CC,
                    field: "member ids (0, duplicate or not ascending)",
                });
            }
            last = m.node_id;
        }
        if self.next_node_id <= last || self.next_node_id == u64::MAX {
            return Err(ClusterError::Invalid {
                what: CC,
                field: "next node id (not above every member id, or u64::MAX)",
            });
        }
        Ok(())
    }

    pub fn decode(b: &[u8]) -> Result<ClusterConfig, ClusterError> {
        let mut r = Reader::new(b, CC);
        if r.take(4)? != CLUSTER_CONFIG_MAGIC {
            return Err(ClusterError::BadMagic { what: CC });
        }
        let version = r.take(4)?[0];
        if version != CLUSTER_CONFIG_VERSION {
            return Err(ClusterError::BadVersion { what: CC, version });
        }
        let cluster_id: [u8; 16] = r.take(16)?.try_into().expect("16 bytes");
        let shard_count = r.u32()?;
        let next_node_id = r.u64()?;
        let n = r.u16()? as usize;
        range("member count", n, MEMBERS_MAX)?;
        let mut members = Vec::with_capacity(n);
        for _ in 0..n {
            let node_id = r.u64()?;
            let len = r.u16()? as usize;
            let addr = std::str::from_utf8(r.take(len)?).map_err(|_| ClusterError::Invalid {
                what: CC,
                field: "address (not UTF-8)",
            })?;
            members.push(Member {
                node_id,
                peer_addr: addr.to_string(),
            });
        }
        let len = r.u32()? as usize;
        range("wrapped key length", len, WRAPPED_KEY_BYTES_MAX)?;
        let integrity_key_wrapped = r.take(len)?.to_vec();
        let body = r.at;
        let crc = r.u32()?;
        if crc != crc32c::crc32c(&b[..body]) {
            return Err(ClusterError::BadChecksum { what: CC });
        }
        r.end()?;
        let c = ClusterConfig {
            cluster_id,
            shard_count,
            next_node_id,
            members,
            integrity_key_wrapped,
        };
        c.check()?;
        Ok(c)
    }

    pub fn member(&self, node_id: u64) -> Option<&Member> {
        self.members.iter().find(|m| m.node_id == node_id)
    }

    /// The member listening on `addr`, if any (compared as socket addresses when both parse).
    pub fn member_at(&self, addr: &str) -> Option<&Member> {
        let want = addr.parse::<std::net::SocketAddr>().ok();
        self.members
            .iter()
            .find(|m| match (want, m.peer_addr.parse().ok()) {
                (Some(a), Some(b)) => a == b,
                _ => m.peer_addr == addr,
            })
    }

    /// The config after admitting a node at `peer_addr`: it gets [`Self::next_node_id`] and
    /// replaces the member at that address, if one is there. Returns the new config, the new id
    /// and the id replaced (0 = none).
    pub fn admit(&self, peer_addr: &str) -> Result<(ClusterConfig, u64, u64), ClusterError> {
        let mut next = self.clone();
        let id = self.next_node_id;
        let replaces = self.member_at(peer_addr).map_or(0, |m| m.node_id);
        next.members.retain(|m| m.node_id != replaces);
        next.members.push(Member {
            node_id: id,
            peer_addr: peer_addr.to_string(),
        });
        next.members.sort_by_key(|m| m.node_id);
        next.next_node_id = id + 1;
        next.check()?;
        Ok((next, id, replaces))
    }

    /// Whether `next` may replace this config in a shard's state: same cluster, shard count
    /// and integrity key, and a higher [`Self::next_node_id`] (a compare-and-set: of two
    /// configs made from the same one, only the first applied takes effect).
    pub fn may_become(&self, next: &ClusterConfig) -> bool {
        next.cluster_id == self.cluster_id
            && next.shard_count == self.shard_count
            && next.integrity_key_wrapped == self.integrity_key_wrapped
            && next.next_node_id > self.next_node_id
    }
}

impl ClusterConfig {
    /// Whether `next`, the config of a cluster restored from this one's backup, may replace it
    /// in a shard's state (the `ClusterRestore` record, docs/format.md §3.11): another cluster
    /// id; the same shard count and integrity key (the realm's key that MACs every snapshot and
    /// manifest); members all with ids this cluster never gave (at or above its
    /// [`Self::next_node_id`]), so no raft id of the old cluster names a new member.
    pub fn may_be_restored_as(&self, next: &ClusterConfig) -> bool {
        next.cluster_id != self.cluster_id
            && next.shard_count == self.shard_count
            && next.integrity_key_wrapped == self.integrity_key_wrapped
            && next.members.iter().all(|m| m.node_id >= self.next_node_id)
            && next.next_node_id > self.next_node_id
    }
}

/// The shard that owns `partition` in a cluster of `shard_count` shards: the xxh3-64 of the
/// partition id modulo the shard count (fixed at `cluster init`, so a partition never moves).
pub fn shard_of(partition: &keyfort_hsm::PartitionId, shard_count: u32) -> u32 {
    (xxhash_rust::xxh3::xxh3_64(&partition.0) % u64::from(shard_count.max(1))) as u32
}

/// Which cluster a data dir belongs to and its raft id there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub cluster_id: [u8; 16],
    pub node_id: u64,
}

const ID: &str = "node identity";

impl Identity {
    pub fn encode(&self) -> [u8; IDENTITY_BYTES] {
        let mut b = [0u8; IDENTITY_BYTES];
        b[0..4].copy_from_slice(&IDENTITY_MAGIC);
        b[4] = IDENTITY_VERSION;
        b[8..24].copy_from_slice(&self.cluster_id);
        b[24..32].copy_from_slice(&self.node_id.to_le_bytes());
        let crc = crc32c::crc32c(&b[..32]);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Identity, ClusterError> {
        if b.len() < IDENTITY_BYTES {
            return Err(ClusterError::Truncated {
                what: ID,
                offset: b.len(),
            });
        }
        if b.len() > IDENTITY_BYTES {
            return Err(ClusterError::Trailing {
                what: ID,
                bytes: b.len() - IDENTITY_BYTES,
            });
        }
        if b[0..4] != IDENTITY_MAGIC {
            return Err(ClusterError::BadMagic { what: ID });
        }
        if b[4] != IDENTITY_VERSION {
            return Err(ClusterError::BadVersion {
                what: ID,
                version: b[4],
            });
        }
        let crc = u32::from_le_bytes(b[32..36].try_into().expect("4 bytes"));
        if crc != crc32c::crc32c(&b[..32]) {
            return Err(ClusterError::BadChecksum { what: ID });
        }
        let node_id = u64::from_le_bytes(b[24..32].try_into().expect("8 bytes"));
        if node_id == 0 {
            return Err(ClusterError::Invalid {
                what: ID,
                field: "node id 0",
            });
        }
        Ok(Identity {
            cluster_id: b[8..24].try_into().expect("16 bytes"),
            node_id,
        })
    }
}

/// Writes `bytes` to `dir/name` durably (temp file, fsync, rename, directory fsync).
pub fn write_durable(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), ClusterError> {
    let io = |p: &Path, e: std::io::Error| ClusterError::Io {
        path: p.display().to_string(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(|e| io(&tmp, e))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
    crate::wbl::segment::sync_dir(dir).map_err(|e| io(dir, e))
}

/// Reads and decodes a data dir's identity.
pub fn read_identity(dir: &Path) -> Result<Identity, ClusterError> {
    let path = dir.join(IDENTITY_FILE);
    let b = std::fs::read(&path).map_err(|e| ClusterError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Identity::decode(&b)
}

/// Reads and decodes a data dir's copy of the cluster config.
pub fn read_cluster_config(dir: &Path) -> Result<ClusterConfig, ClusterError> {
    let path = dir.join(CLUSTER_CONFIG_FILE);
    let b = std::fs::read(&path).map_err(|e| ClusterError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    ClusterConfig::decode(&b)
}

/// A little-endian reader over one encoded item whose errors name it (`what`).
pub(crate) struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(b: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { b, at: 0, what }
    }
    /// Bytes read so far.
    pub(crate) fn at(&self) -> usize {
        self.at
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], ClusterError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(ClusterError::Truncated {
                what: self.what,
                offset: self.at,
            })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    pub(crate) fn u16(&mut self) -> Result<u16, ClusterError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, ClusterError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, ClusterError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    pub(crate) fn end(&self) -> Result<(), ClusterError> {
        if self.at == self.b.len() {
            Ok(())
        } else {
            Err(ClusterError::Trailing {
                what: self.what,
                bytes: self.b.len() - self.at,
            })
        }
    }
}
