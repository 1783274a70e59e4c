//! Payload codecs of the state-machine record kinds (docs/format.md §3). Pure and strict: every
//! field is bounded, reserved bytes must be zero, trailing bytes are refused, so one logical
//! operation has exactly one encoding (the idempotency fingerprint relies on it). Decoders return
//! a typed [`PayloadError`] and never panic, whatever the bytes.

use super::{
    KeyState, BLOB_BYTES_MAX, CLUSTER_CONFIG_BYTES_MAX, METADATA_BYTES_MAX,
    PARTITION_CONFIG_BYTES_MAX,
};
use crate::wbl::RecordKind;
use keyfort_hsm::format::KEY_HEADER_LEN;
use keyfort_hsm::{KeyHeader, KeyId, PartitionId};

/// Format version of every payload in §3 (its first byte).
pub const PAYLOAD_VERSION: u8 = 1;

/// A client's idempotency id: random 128 bits scoped to a partition. All zeros = none given.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Debug)]
pub struct IdempotencyId(pub [u8; 16]);

impl IdempotencyId {
    pub const NONE: IdempotencyId = IdempotencyId([0; 16]);
    pub fn is_none(&self) -> bool {
        self.0 == [0; 16]
    }
}

/// Why a payload does not decode. Each names the structure (`what`) and the field or offset.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("{what}: truncated at offset {offset} reading {field}")]
    Truncated {
        what: &'static str,
        field: &'static str,
        offset: usize,
    },
    #[error("{what}: unsupported format version {version}")]
    BadVersion { what: &'static str, version: u8 },
    #[error("{what}: invalid {field} value {value}")]
    BadValue {
        what: &'static str,
        field: &'static str,
        value: u64,
    },
    #[error("{what}: {field} of {len} bytes exceeds the maximum of {max}")]
    TooLong {
        what: &'static str,
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what}: {bytes} trailing bytes")]
    Trailing { what: &'static str, bytes: usize },
    #[error("record kind {kind:?} carries no state-machine payload")]
    NotStateKind { kind: RecordKind },
}

/// Sub-operation of a `KeyPut` record. Stable wire values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PutOp {
    /// A new key at version 1, with its masked blob.
    Create = 1,
    /// Metadata and state of one existing version; never key material.
    Update = 2,
    /// A new version, conditional on `version_replaced` being the current one.
    Rotate = 3,
}

/// A `KeyPut` payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPut {
    pub op: PutOp,
    pub idempotency_id: IdempotencyId,
    /// For create and rotate the new version; for update the version changed.
    pub header: KeyHeader,
    /// Rotate: the version it replaces (must be current when applied). 0 for create and update.
    pub version_replaced: u32,
    pub state: KeyState,
    pub metadata: Vec<u8>,
    /// The masked blob (opaque card bytes): non-empty for create and rotate, empty for update.
    pub blob: Vec<u8>,
}

/// A `Checkpoint` payload: names the LSN it covers (a proposal cannot know its own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub lsn_covered: u64,
    pub chain_head: u64,
    pub digest: [u8; 16],
    /// HMAC-SHA256 with the cluster integrity key over payload bytes 0..33 (made in the card by
    /// the proposer; apply is pure and does not check it).
    pub mac: [u8; 32],
}

/// One decoded state-machine record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    ClusterConfig {
        config: Vec<u8>,
    },
    PartitionCreate {
        partition: PartitionId,
        config: Vec<u8>,
    },
    PartitionDelete {
        partition: PartitionId,
    },
    KeyPut(KeyPut),
    KeyDelete {
        idempotency_id: IdempotencyId,
        partition: PartitionId,
        key_id: KeyId,
    },
    Checkpoint(Checkpoint),
    /// A restored cluster's config (docs/format.md §3.11), written by `keyfort restore` at
    /// the LSN after the restored snapshot's, never proposed by a node.
    ClusterRestore {
        config: Vec<u8>,
    },
    /// The shard leader archived the committed log up to `to` (docs/format.md §3.12).
    ArchiveMark {
        to: u64,
    },
}

impl Op {
    pub fn kind(&self) -> RecordKind {
        match self {
            Op::ClusterConfig { .. } => RecordKind::ClusterConfig,
            Op::PartitionCreate { .. } => RecordKind::PartitionCreate,
            Op::PartitionDelete { .. } => RecordKind::PartitionDelete,
            Op::KeyPut(_) => RecordKind::KeyPut,
            Op::KeyDelete { .. } => RecordKind::KeyDelete,
            Op::Checkpoint(_) => RecordKind::Checkpoint,
            Op::ClusterRestore { .. } => RecordKind::ClusterRestore,
            Op::ArchiveMark { .. } => RecordKind::ArchiveMark,
        }
    }

    /// The canonical payload. Panics only on a programmer error: a field above its bound.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = vec![PAYLOAD_VERSION];
        match self {
            Op::ClusterConfig { config } | Op::ClusterRestore { config } => {
                put_bytes32(&mut w, config, CLUSTER_CONFIG_BYTES_MAX);
            }
            Op::PartitionCreate { partition, config } => {
                w.extend_from_slice(&partition.0);
                put_bytes32(&mut w, config, PARTITION_CONFIG_BYTES_MAX);
            }
            Op::PartitionDelete { partition } => w.extend_from_slice(&partition.0),
            Op::KeyPut(p) => {
                w.push(p.op as u8);
                w.extend_from_slice(&p.idempotency_id.0);
                w.extend_from_slice(&p.header.encode());
                w.extend_from_slice(&p.version_replaced.to_le_bytes());
                w.push(p.state as u8);
                put_bytes16(&mut w, &p.metadata, METADATA_BYTES_MAX);
                put_bytes16(&mut w, &p.blob, BLOB_BYTES_MAX);
            }
            Op::KeyDelete {
                idempotency_id,
                partition,
                key_id,
            } => {
                w.extend_from_slice(&idempotency_id.0);
                w.extend_from_slice(&partition.0);
                w.extend_from_slice(&key_id.0);
            }
            Op::ArchiveMark { to } => w.extend_from_slice(&to.to_le_bytes()),
            Op::Checkpoint(c) => {
                w.extend_from_slice(&c.lsn_covered.to_le_bytes());
                w.extend_from_slice(&c.chain_head.to_le_bytes());
                w.extend_from_slice(&c.digest);
                w.extend_from_slice(&c.mac);
            }
        }
        w
    }

    /// Decodes the payload of a record of `kind`.
    pub fn decode(kind: RecordKind, payload: &[u8]) -> Result<Op, PayloadError> {
        if matches!(
            kind,
            RecordKind::RaftNoop
                | RecordKind::RaftConfChange
                | RecordKind::RaftConfChangeV2
                | RecordKind::RaftNormal
        ) {
            return Err(PayloadError::NotStateKind { kind });
        }
        let mut r = Reader::new(payload, kind_name(kind));
        r.version()?;
        let op = match kind {
            RecordKind::ClusterConfig => Op::ClusterConfig {
                config: r.bytes32("config", CLUSTER_CONFIG_BYTES_MAX)?,
            },
            RecordKind::ClusterRestore => Op::ClusterRestore {
                config: r.bytes32("config", CLUSTER_CONFIG_BYTES_MAX)?,
            },
            RecordKind::ArchiveMark => Op::ArchiveMark {
                to: r.u64("archived to")?,
            },
            RecordKind::PartitionCreate => Op::PartitionCreate {
                partition: PartitionId(r.array("partition id")?),
                config: r.bytes32("config", PARTITION_CONFIG_BYTES_MAX)?,
            },
            RecordKind::PartitionDelete => Op::PartitionDelete {
                partition: PartitionId(r.array("partition id")?),
            },
            RecordKind::KeyPut => Op::KeyPut(decode_key_put(&mut r)?),
            RecordKind::KeyDelete => Op::KeyDelete {
                idempotency_id: IdempotencyId(r.array("idempotency id")?),
                partition: PartitionId(r.array("partition id")?),
                key_id: KeyId(r.array("key id")?),
            },
            RecordKind::Checkpoint => Op::Checkpoint(Checkpoint {
                lsn_covered: r.u64("lsn covered")?,
                chain_head: r.u64("chain head")?,
                digest: r.array("digest")?,
                mac: r.array("mac")?,
            }),
            RecordKind::RaftNoop
            | RecordKind::RaftConfChange
            | RecordKind::RaftConfChangeV2
            | RecordKind::RaftNormal => return Err(PayloadError::NotStateKind { kind }),
        };
        r.finish()?;
        Ok(op)
    }
}

fn decode_key_put(r: &mut Reader<'_>) -> Result<KeyPut, PayloadError> {
    let op = match r.u8("op")? {
        1 => PutOp::Create,
        2 => PutOp::Update,
        3 => PutOp::Rotate,
        v => return Err(r.bad("op", v as u64)),
    };
    let idempotency_id = IdempotencyId(r.array("idempotency id")?);
    let header = r.key_header()?;
    let version_replaced = r.u32("version replaced")?;
    let state = r.key_state()?;
    let metadata = r.bytes16("metadata", METADATA_BYTES_MAX)?;
    let blob = r.bytes16("blob", BLOB_BYTES_MAX)?;
    // One encoding per operation: fields a sub-op does not use must be zero / empty.
    match op {
        PutOp::Create | PutOp::Update if version_replaced != 0 => {
            return Err(r.bad("version replaced", version_replaced as u64))
        }
        PutOp::Create | PutOp::Rotate if blob.is_empty() => return Err(r.bad("blob length", 0)),
        PutOp::Update if !blob.is_empty() => return Err(r.bad("blob length", blob.len() as u64)),
        _ => {}
    }
    Ok(KeyPut {
        op,
        idempotency_id,
        header,
        version_replaced,
        state,
        metadata,
        blob,
    })
}

fn kind_name(kind: RecordKind) -> &'static str {
    match kind {
        RecordKind::ClusterConfig => "cluster config payload",
        RecordKind::PartitionCreate => "partition create payload",
        RecordKind::PartitionDelete => "partition delete payload",
        RecordKind::KeyPut => "key put payload",
        RecordKind::KeyDelete => "key delete payload",
        RecordKind::Checkpoint => "checkpoint payload",
        RecordKind::ClusterRestore => "cluster restore payload",
        RecordKind::ArchiveMark => "archive mark payload",
        _ => "raft payload",
    }
}

pub(crate) fn put_bytes16(w: &mut Vec<u8>, b: &[u8], max: usize) {
    assert!(
        b.len() <= max && max <= u16::MAX as usize,
        "field above its bound"
    );
    w.extend_from_slice(&(b.len() as u16).to_le_bytes());
    w.extend_from_slice(b);
}

pub(crate) fn put_bytes32(w: &mut Vec<u8>, b: &[u8], max: usize) {
    assert!(b.len() <= max, "field above its bound");
    w.extend_from_slice(&(b.len() as u32).to_le_bytes());
    w.extend_from_slice(b);
}

/// A bounds-checked little-endian reader: the one place decoders read bytes from.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, pos: 0, what }
    }

    pub(crate) fn bad(&self, field: &'static str, value: u64) -> PayloadError {
        PayloadError::BadValue {
            what: self.what,
            field,
            value,
        }
    }

    pub(crate) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], PayloadError> {
        if self.buf.len() - self.pos < n {
            return Err(PayloadError::Truncated {
                what: self.what,
                field,
                offset: self.pos,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], PayloadError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, PayloadError> {
        Ok(self.array::<1>(field)?[0])
    }
    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, PayloadError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, PayloadError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, PayloadError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn version(&mut self) -> Result<(), PayloadError> {
        match self.u8("version")? {
            PAYLOAD_VERSION => Ok(()),
            version => Err(PayloadError::BadVersion {
                what: self.what,
                version,
            }),
        }
    }

    fn bounded(
        &mut self,
        len: usize,
        field: &'static str,
        max: usize,
    ) -> Result<Vec<u8>, PayloadError> {
        Ok(self.bounded_ref(len, field, max)?.to_vec())
    }

    fn bounded_ref(
        &mut self,
        len: usize,
        field: &'static str,
        max: usize,
    ) -> Result<&'a [u8], PayloadError> {
        if len > max {
            return Err(PayloadError::TooLong {
                what: self.what,
                field,
                len,
                max,
            });
        }
        self.take(len, field)
    }

    pub(crate) fn bytes16(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<Vec<u8>, PayloadError> {
        Ok(self.bytes16_ref(field, max)?.to_vec())
    }

    pub(crate) fn bytes16_ref(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<&'a [u8], PayloadError> {
        let len = self.u16(field)? as usize;
        self.bounded_ref(len, field, max)
    }

    pub(crate) fn bytes32(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<Vec<u8>, PayloadError> {
        let len = self.u32(field)? as usize;
        self.bounded(len, field, max)
    }

    pub(crate) fn key_header(&mut self) -> Result<KeyHeader, PayloadError> {
        let b = self.take(KEY_HEADER_LEN, "key header")?;
        KeyHeader::decode(b).map_err(|_| self.bad("key header", b[0] as u64))
    }

    pub(crate) fn key_state(&mut self) -> Result<KeyState, PayloadError> {
        match self.u8("key state")? {
            1 => Ok(KeyState::Enabled),
            2 => Ok(KeyState::Disabled),
            v => Err(self.bad("key state", v as u64)),
        }
    }

    pub(crate) fn finish(&self) -> Result<(), PayloadError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            bytes => Err(PayloadError::Trailing {
                what: self.what,
                bytes,
            }),
        }
    }
}
