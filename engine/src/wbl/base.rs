//! The base file (`base`): where a log starts after [`super::Wbl::reset_to`]. One block,
//! written atomically (temp file, fdatasync, rename, directory fsync) before the old segments
//! are removed, so that a reopen knows the new start even when no segment carries it yet.
//! The byte layout is in `docs/format.md`, section 1.7.

use super::record::get_u64;
use super::segment::{check_meta_block, MetaError};
use super::BLOCK;

/// "KFWB" little-endian.
pub const BASE_MAGIC: u32 = 0x4257_464B;
pub const BASE_VERSION: u8 = 1;
/// Name of the base file in the log directory.
pub const BASE_FILE: &str = "base";
/// Temporary name the base file is written under before its rename; a leftover is deleted on
/// a writable open.
pub const BASE_TMP_FILE: &str = "base.tmp";
/// Bytes of the base file: one block, so it is written and read with direct I/O.
pub const BASE_FILE_BYTES: usize = BLOCK;
const FIRST_LSN_AT: usize = 8;
const BASE_CHAIN_AT: usize = 16;
const BASE_TERM_AT: usize = 24;
const FIRST_SEQ_AT: usize = 32;
const EPOCH_FLOOR_AT: usize = 40;
const CRC_AT: usize = 48;

/// The start of a log that was reset to a snapshot position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BaseState {
    /// First LSN of the log; the log is empty below it.
    pub first_lsn: u64,
    /// Chain head at `first_lsn - 1` (the snapshot's): the seed of the record at `first_lsn`.
    pub base_chain: u64,
    /// Raft term at `first_lsn - 1` (the snapshot's).
    pub base_term: u64,
    /// Sequence number from which segment files belong to this log: every `seg-*` file with a
    /// lower one is a leftover of the log before the reset.
    pub first_seq: u64,
    /// Highest segment epoch used before the reset: new segments get higher epochs, so the
    /// stale records of a recycled file can never pass as live.
    pub epoch_floor: u64,
}

/// Writes `s` into the first block of `b` (the rest of the block is zeroed).
/// Panics if `b` is shorter than one block (a caller bug, never disk input).
pub fn encode_base(b: &mut [u8], s: &BaseState) {
    b[..BLOCK].fill(0);
    b[0..4].copy_from_slice(&BASE_MAGIC.to_le_bytes());
    b[4] = BASE_VERSION;
    b[FIRST_LSN_AT..FIRST_LSN_AT + 8].copy_from_slice(&s.first_lsn.to_le_bytes());
    b[BASE_CHAIN_AT..BASE_CHAIN_AT + 8].copy_from_slice(&s.base_chain.to_le_bytes());
    b[BASE_TERM_AT..BASE_TERM_AT + 8].copy_from_slice(&s.base_term.to_le_bytes());
    b[FIRST_SEQ_AT..FIRST_SEQ_AT + 8].copy_from_slice(&s.first_seq.to_le_bytes());
    b[EPOCH_FLOOR_AT..EPOCH_FLOOR_AT + 8].copy_from_slice(&s.epoch_floor.to_le_bytes());
    let crc = crc32c::crc32c(&b[..CRC_AT]);
    b[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes a base file image. Any input gives a value or a typed error, never a panic.
pub fn decode_base(b: &[u8]) -> Result<BaseState, MetaError> {
    check_meta_block(b, BASE_MAGIC, BASE_VERSION, 0, CRC_AT)?;
    let s = BaseState {
        first_lsn: get_u64(b, FIRST_LSN_AT),
        base_chain: get_u64(b, BASE_CHAIN_AT),
        base_term: get_u64(b, BASE_TERM_AT),
        first_seq: get_u64(b, FIRST_SEQ_AT),
        epoch_floor: get_u64(b, EPOCH_FLOOR_AT),
    };
    if s.first_lsn == 0 {
        return Err(MetaError::BadField("first_lsn 0"));
    }
    Ok(s)
}
