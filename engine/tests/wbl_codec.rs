//! The record, segment and hard-state codecs: round trips, and every damaged byte is a typed
//! error, never a panic.

use keyfort_engine::wbl::hardstate::{decode_slot, encode_slot, HardStateSlot};
use keyfort_engine::wbl::record::{chain_next, decode, encode, DecodeError};
use keyfort_engine::wbl::segment::{
    decode_footer, decode_header, encode_footer, encode_header, SegmentFooter, SegmentHeader,
};
use keyfort_engine::wbl::{HardState, RecordKind, RecordRef, BLOCK};
use proptest::prelude::*;

fn kind() -> impl Strategy<Value = RecordKind> {
    proptest::sample::select(RecordKind::ALL.to_vec())
}

fn record_bytes(k: RecordKind, epoch: u64, lsn: u64, term: u64, payload: &[u8]) -> Vec<u8> {
    let chain = chain_next(7, k, lsn, term, payload);
    encode(&RecordRef {
        kind: k,
        epoch,
        lsn,
        term,
        payload,
        chain,
    })
}

proptest! {
    #[test]
    fn record_round_trips_for_every_kind(
        k in kind(), epoch: u64, lsn: u64, term: u64,
        payload in proptest::collection::vec(any::<u8>(), 0..2000),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut bytes = record_bytes(k, epoch, lsn, term, &payload);
        let len = bytes.len();
        bytes.extend_from_slice(&tail);
        let (r, n) = decode(&bytes).unwrap();
        prop_assert_eq!(n, len);
        prop_assert_eq!((r.kind, r.epoch, r.lsn, r.term), (k, epoch, lsn, term));
        prop_assert_eq!(&r.payload, &payload);
        prop_assert_eq!(r.chain, chain_next(7, k, lsn, term, &payload));
    }

    #[test]
    fn any_bit_flip_before_the_chain_is_a_typed_error(
        k in kind(), lsn: u64, payload in proptest::collection::vec(any::<u8>(), 0..300),
        bit in any::<proptest::sample::Index>(),
    ) {
        let mut bytes = record_bytes(k, 1, lsn, 2, &payload);
        let covered = bytes.len() - 8;
        let bit = bit.index(covered * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(decode(&bytes).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
        let _ = decode(&bytes);
        let _ = decode_header(&bytes);
        let _ = decode_footer(&bytes);
        let _ = decode_slot(&bytes);
    }

    #[test]
    fn segment_header_footer_and_slot_round_trip(a: u64, b: u64, c: u64, d: u64) {
        let mut blk = vec![0xAAu8; BLOCK];
        let h = SegmentHeader { epoch: a, seq: b, first_lsn: c, chain_seed: d, segment_bytes: a ^ d, recycled: c % 2 == 0 };
        encode_header(&mut blk, &h);
        prop_assert_eq!(decode_header(&blk).unwrap(), h);
        let f = SegmentFooter { epoch: a, last_lsn: b, chain_head: c };
        encode_footer(&mut blk, &f);
        prop_assert_eq!(decode_footer(&blk).unwrap(), f);
        let s = HardStateSlot { seq: a, state: HardState { term: b, vote: c, commit: d } };
        encode_slot(&mut blk, &s);
        prop_assert_eq!(decode_slot(&blk).unwrap(), s);
        blk[(a % 44) as usize] ^= 1 << (b % 8);
        prop_assert!(decode_slot(&blk).is_err());
    }
}

#[test]
fn every_bit_flip_in_a_sample_record_is_detected() {
    let bytes = record_bytes(RecordKind::KeyPut, 3, 42, 5, b"masked key blob");
    for bit in 0..(bytes.len() - 8) * 8 {
        let mut b = bytes.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        assert!(decode(&b).is_err(), "bit {bit} undetected");
    }
}

#[test]
fn unknown_kind_is_a_typed_error() {
    let mut bytes = record_bytes(RecordKind::KeyPut, 3, 42, 5, b"x");
    bytes[5] = 99;
    assert_eq!(decode(&bytes).unwrap_err(), DecodeError::UnknownKind(99));
    assert_eq!(RecordKind::from_u8(5), None);
}

#[test]
fn chain_ignores_the_epoch() {
    let a = decode(&record_bytes(RecordKind::KeyPut, 1, 9, 2, b"p"))
        .unwrap()
        .0;
    let b = decode(&record_bytes(RecordKind::KeyPut, 77, 9, 2, b"p"))
        .unwrap()
        .0;
    assert_eq!(a.chain, b.chain);
}
