//! The raft hard state (term, vote, commit) in a two-slot file: each write goes to the slot the
//! previous write did not use, so a torn write can only damage the newer copy and load falls
//! back to the older one.

use super::record::get_u64;
use super::segment::{check_meta_block, MetaError};
use super::BLOCK;

/// "KFHS" little-endian.
pub const HARDSTATE_MAGIC: u32 = 0x5348_464B;
pub const HARDSTATE_VERSION: u8 = 1;
pub const HARDSTATE_FILE: &str = "hardstate";
const CRC_AT: usize = 40;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    pub term: u64,
    pub vote: u64,
    pub commit: u64,
}

/// One slot: the hard state plus the write sequence number that orders the two slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HardStateSlot {
    pub seq: u64,
    pub state: HardState,
}

pub fn encode_slot(b: &mut [u8], s: &HardStateSlot) {
    b[..BLOCK].fill(0);
    b[0..4].copy_from_slice(&HARDSTATE_MAGIC.to_le_bytes());
    b[4] = HARDSTATE_VERSION;
    b[8..16].copy_from_slice(&s.seq.to_le_bytes());
    b[16..24].copy_from_slice(&s.state.term.to_le_bytes());
    b[24..32].copy_from_slice(&s.state.vote.to_le_bytes());
    b[32..40].copy_from_slice(&s.state.commit.to_le_bytes());
    let crc = crc32c::crc32c(&b[..CRC_AT]);
    b[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

pub fn decode_slot(b: &[u8]) -> Result<HardStateSlot, MetaError> {
    check_meta_block(b, HARDSTATE_MAGIC, HARDSTATE_VERSION, 0, CRC_AT)?;
    let state = HardState {
        term: get_u64(b, 16),
        vote: get_u64(b, 24),
        commit: get_u64(b, 32),
    };
    Ok(HardStateSlot {
        seq: get_u64(b, 8),
        state,
    })
}

/// Picks the newest valid slot of a two-block file image. `None` when both are invalid.
pub fn pick_slot(file: &[u8]) -> Option<HardStateSlot> {
    let a = file.get(..BLOCK).and_then(|b| decode_slot(b).ok());
    let b = file.get(BLOCK..2 * BLOCK).and_then(|b| decode_slot(b).ok());
    match (a, b) {
        (Some(a), Some(b)) => Some(if a.seq >= b.seq { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// Byte offset of the slot a write with sequence number `seq` goes to.
pub fn slot_offset(seq: u64) -> u64 {
    (seq % 2) * BLOCK as u64
}
