//! The WBL record codec: pure, synchronous, allocation-free on decode. The scanner, the writer's
//! pair assertion, the offline tools and the fuzz target all go through this one place.

use super::{MAX_PAYLOAD_BYTES, RECORD_HEADER_BYTES, RECORD_TRAILER_BYTES};
use xxhash_rust::xxh3::Xxh3;

/// "KFWR" read as a little-endian u32.
pub const RECORD_MAGIC: u32 = 0x5257_464B;
pub const RECORD_VERSION: u8 = 1;

/// What a record carries. The WBL treats every payload as opaque bytes; the kind only lets
/// the layers above (raft storage, state machine, tools) interpret it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    RaftNoop = 1,
    RaftConfChange = 2,
    RaftConfChangeV2 = 3,
    /// An opaque raft entry whose data the state machine interprets.
    RaftNormal = 4,
    ClusterConfig = 16,
    PartitionCreate = 17,
    PartitionDelete = 18,
    /// Create, update or rotate: the sub-operation lives inside the payload.
    KeyPut = 19,
    /// Tombstone.
    KeyDelete = 20,
    /// Names the LSN it covers, the chain head and state digest there, and a MAC.
    Checkpoint = 21,
    /// The first record of a cluster restored from the durable store: its new cluster config
    /// (new cluster id and members), replacing the restored state's.
    ClusterRestore = 22,
    /// The shard's log is archived in the durable store up to the LSN it names (the archive
    /// watermark, docs/format.md §3.12).
    ArchiveMark = 23,
}

impl RecordKind {
    pub const ALL: [RecordKind; 12] = [
        RecordKind::RaftNoop,
        RecordKind::RaftConfChange,
        RecordKind::RaftConfChangeV2,
        RecordKind::RaftNormal,
        RecordKind::ClusterConfig,
        RecordKind::PartitionCreate,
        RecordKind::PartitionDelete,
        RecordKind::KeyPut,
        RecordKind::KeyDelete,
        RecordKind::Checkpoint,
        RecordKind::ClusterRestore,
        RecordKind::ArchiveMark,
    ];

    pub fn from_u8(v: u8) -> Option<RecordKind> {
        RecordKind::ALL.into_iter().find(|k| *k as u8 == v)
    }
}

/// Why a byte range is not a valid record. Every variant is an expected operating condition
/// (torn write, bit rot, stale bytes), never a panic.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("buffer holds {have} bytes, record needs {need}")]
    Truncated { have: usize, need: usize },
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    #[error("unsupported version {0}")]
    BadVersion(u8),
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("reserved field is not zero")]
    BadReserved,
    #[error("payload length {0} exceeds the maximum")]
    PayloadTooLong(u32),
    #[error("crc32c mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc { stored: u32, computed: u32 },
}

/// A decoded record borrowing its payload from the input buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub kind: RecordKind,
    pub epoch: u64,
    pub lsn: u64,
    pub term: u64,
    pub payload: &'a [u8],
    pub chain: u64,
}

/// An owned record, as returned by reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub kind: RecordKind,
    pub epoch: u64,
    pub lsn: u64,
    pub term: u64,
    pub payload: Vec<u8>,
    pub chain: u64,
}

impl RecordRef<'_> {
    pub fn to_owned(&self) -> Record {
        Record {
            kind: self.kind,
            epoch: self.epoch,
            lsn: self.lsn,
            term: self.term,
            payload: self.payload.to_vec(),
            chain: self.chain,
        }
    }
}

/// Bytes a record with `payload_len` bytes of payload occupies on disk.
pub const fn encoded_len(payload_len: usize) -> usize {
    RECORD_HEADER_BYTES + payload_len + RECORD_TRAILER_BYTES
}

/// The chain over the replicated fields only; the node-local epoch stays out so that every
/// replica computes the same chain.
pub fn chain_next(seed: u64, kind: RecordKind, lsn: u64, term: u64, payload: &[u8]) -> u64 {
    let mut h = Xxh3::with_seed(seed);
    h.update(&[kind as u8]);
    h.update(&lsn.to_le_bytes());
    h.update(&term.to_le_bytes());
    h.update(payload);
    h.digest()
}

/// Encodes one record into `out[..encoded_len(payload.len())]` and returns the length.
/// The caller guarantees the bounds (a programmer error otherwise).
pub fn encode_into(out: &mut [u8], r: &RecordRef<'_>) -> usize {
    assert!(r.payload.len() <= MAX_PAYLOAD_BYTES);
    let len = encoded_len(r.payload.len());
    assert!(out.len() >= len);
    let h = &mut out[..RECORD_HEADER_BYTES];
    h[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    h[4] = RECORD_VERSION;
    h[5] = r.kind as u8;
    h[6..8].copy_from_slice(&[0, 0]);
    h[8..16].copy_from_slice(&r.epoch.to_le_bytes());
    h[16..24].copy_from_slice(&r.lsn.to_le_bytes());
    h[24..32].copy_from_slice(&r.term.to_le_bytes());
    h[32..36].copy_from_slice(&(r.payload.len() as u32).to_le_bytes());
    h[36..40].copy_from_slice(&[0; 4]);
    let body_end = RECORD_HEADER_BYTES + r.payload.len();
    out[RECORD_HEADER_BYTES..body_end].copy_from_slice(r.payload);
    let crc = crc32c::crc32c(&out[..body_end]);
    out[body_end..body_end + 4].copy_from_slice(&crc.to_le_bytes());
    out[body_end + 4..len].copy_from_slice(&r.chain.to_le_bytes());
    len
}

/// Convenience for tests and tools: encodes into a fresh Vec.
pub fn encode(r: &RecordRef<'_>) -> Vec<u8> {
    let mut v = vec![0; encoded_len(r.payload.len())];
    encode_into(&mut v, r);
    v
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes the record at the start of `buf`, verifying everything but the chain (which needs
/// the previous record). Returns the record and the bytes it occupies.
pub fn decode_ref(buf: &[u8]) -> Result<(RecordRef<'_>, usize), DecodeError> {
    if buf.len() < RECORD_HEADER_BYTES {
        return Err(DecodeError::Truncated {
            have: buf.len(),
            need: RECORD_HEADER_BYTES,
        });
    }
    let magic = u32_at(buf, 0);
    if magic != RECORD_MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    if buf[4] != RECORD_VERSION {
        return Err(DecodeError::BadVersion(buf[4]));
    }
    let kind = RecordKind::from_u8(buf[5]).ok_or(DecodeError::UnknownKind(buf[5]))?;
    if buf[6] != 0 || buf[7] != 0 || u32_at(buf, 36) != 0 {
        return Err(DecodeError::BadReserved);
    }
    let payload_len = u32_at(buf, 32);
    if payload_len as usize > MAX_PAYLOAD_BYTES {
        return Err(DecodeError::PayloadTooLong(payload_len));
    }
    let len = encoded_len(payload_len as usize);
    if buf.len() < len {
        return Err(DecodeError::Truncated {
            have: buf.len(),
            need: len,
        });
    }
    let body_end = RECORD_HEADER_BYTES + payload_len as usize;
    let stored = u32_at(buf, body_end);
    let computed = crc32c::crc32c(&buf[..body_end]);
    if stored != computed {
        return Err(DecodeError::BadCrc { stored, computed });
    }
    let rec = RecordRef {
        kind,
        epoch: u64_at(buf, 8),
        lsn: u64_at(buf, 16),
        term: u64_at(buf, 24),
        payload: &buf[RECORD_HEADER_BYTES..body_end],
        chain: u64_at(buf, body_end + 4),
    };
    Ok((rec, len))
}

/// Owned variant of [`decode_ref`].
pub fn decode(buf: &[u8]) -> Result<(Record, usize), DecodeError> {
    decode_ref(buf).map(|(r, n)| (r.to_owned(), n))
}

pub(crate) fn get_u32(b: &[u8], at: usize) -> u32 {
    u32_at(b, at)
}

pub(crate) fn get_u64(b: &[u8], at: usize) -> u64 {
    u64_at(b, at)
}
