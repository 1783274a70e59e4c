//! The frame codec: round trips, every prefix is "need more", every damaged byte is a typed
//! error (or, for a prefix-preserving change, still never a different frame), arbitrary bytes
//! never panic, and a hostile length is refused from the header alone.

use keyfort_net::frame::{
    decode, encode, flags, FrameError, FrameHeader, FRAME_HEADER_BYTES, MAX_FRAME_PAYLOAD_BYTES,
};
use proptest::prelude::*;

fn header() -> impl Strategy<Value = FrameHeader> {
    (0u8..=flags::KNOWN, any::<u16>(), any::<u64>()).prop_map(|(flags, opcode, request_id)| {
        FrameHeader {
            flags,
            opcode,
            request_id,
        }
    })
}

fn frame(h: FrameHeader, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode(h, payload, &mut out).unwrap();
    out
}

proptest! {
    #[test]
    fn frames_round_trip_back_to_back(
        frames in prop::collection::vec((header(), prop::collection::vec(any::<u8>(), 0..300)), 1..6)
    ) {
        let mut buf = Vec::new();
        for (h, p) in &frames {
            encode(*h, p, &mut buf).unwrap();
        }
        let mut at = 0;
        for (h, p) in &frames {
            let (f, n) = decode(&buf[at..]).unwrap().expect("whole frame");
            prop_assert_eq!(f.header, *h);
            prop_assert_eq!(f.payload, p.as_slice());
            prop_assert_eq!(n, FRAME_HEADER_BYTES + p.len());
            at += n;
        }
        prop_assert_eq!(at, buf.len());
    }

    #[test]
    fn every_proper_prefix_asks_for_more(h in header(), p in prop::collection::vec(any::<u8>(), 0..200)) {
        let f = frame(h, &p);
        for cut in 0..f.len() {
            prop_assert_eq!(decode(&f[..cut]), Ok(None), "prefix of {} bytes", cut);
        }
    }

    #[test]
    fn every_bit_flip_is_a_typed_error(
        h in header(), p in prop::collection::vec(any::<u8>(), 1..64), at in any::<prop::sample::Index>(), bit in 0u8..8,
    ) {
        let mut f = frame(h, &p);
        let i = at.index(f.len());
        f[i] ^= 1 << bit;
        prop_assert!(decode(&f).is_err(), "flip of bit {} in byte {} went undetected", bit, i);
    }

    #[test]
    fn arbitrary_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..128)) {
        let _ = decode(&b);
        let mut m = b.clone();
        if m.len() >= 4 {
            m[..4].copy_from_slice(b"KFRM");
        }
        let _ = decode(&m);
    }
}

#[test]
fn a_stranger_is_refused_from_its_first_byte() {
    assert!(matches!(decode(b"G"), Err(FrameError::BadMagic(_))));
    assert!(matches!(
        decode(b"GET / HTTP/1.1\r\n"),
        Err(FrameError::BadMagic(_))
    ));
    assert_eq!(decode(b""), Ok(None));
    assert_eq!(decode(b"KF"), Ok(None));
}

#[test]
fn a_length_over_the_limit_is_refused_from_the_header_alone() {
    let h = FrameHeader {
        flags: 0,
        opcode: 1,
        request_id: 7,
    };
    let mut f = frame(h, b"");
    // Rewrite the length and re-seal the header crc: a well-formed header asking for too much.
    f[16..20].copy_from_slice(&((MAX_FRAME_PAYLOAD_BYTES + 1) as u32).to_le_bytes());
    let crc = crc32c::crc32c(&f[0..20]);
    f[20..24].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(
        decode(&f[..FRAME_HEADER_BYTES]),
        Err(FrameError::TooLong {
            len: MAX_FRAME_PAYLOAD_BYTES + 1,
            max: MAX_FRAME_PAYLOAD_BYTES
        })
    );
    let mut out = Vec::new();
    assert!(matches!(
        encode(h, &vec![0; MAX_FRAME_PAYLOAD_BYTES + 1], &mut out),
        Err(FrameError::TooLong { .. })
    ));
    assert!(out.is_empty(), "nothing written for a refused frame");
}

#[test]
fn unknown_flags_and_versions_are_refused() {
    let h = FrameHeader {
        flags: 0x80,
        opcode: 1,
        request_id: 1,
    };
    assert_eq!(
        encode(h, b"", &mut Vec::new()),
        Err(FrameError::BadFlags(0x80))
    );
    let mut f = frame(
        FrameHeader {
            flags: 0,
            opcode: 1,
            request_id: 1,
        },
        b"x",
    );
    f[4] = 2;
    let crc = crc32c::crc32c(&f[0..20]);
    f[20..24].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(decode(&f), Err(FrameError::BadVersion(2)));
}
