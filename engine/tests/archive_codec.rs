//! The archived log range codec (docs/format.md §9.3): round trips; truncated, damaged or
//! arbitrary bytes give typed errors, never panics; the chain over the records must be the one
//! stored and start from the stored base; another key's MAC does not verify.

mod state_common;

use keyfort_engine::archive::{
    parse_range_object, range_object, range_prefix, ArchiveError, ArchivedRecord, LogRange,
};
use keyfort_engine::snapshot::FooterMac;
use keyfort_engine::wbl::record::chain_next;
use keyfort_engine::wbl::RecordKind;
use proptest::prelude::*;
use state_common::SoftMac;

struct OtherMac;

impl FooterMac for OtherMac {
    fn mac(&self, bytes: &[u8]) -> keyfort_hsm::Result<[u8; 32]> {
        SoftMac.mac(&[bytes, b"other"].concat())
    }
    fn verify(&self, bytes: &[u8], mac: &[u8]) -> keyfort_hsm::Result<()> {
        SoftMac.verify(&[bytes, b"other"].concat(), mac)
    }
}

fn range() -> impl Strategy<Value = LogRange> {
    (
        1u64..1 << 40,
        any::<u64>(),
        0u32..8,
        prop::collection::vec(
            (
                prop::sample::select(RecordKind::ALL.to_vec()),
                0u64..3,
                prop::collection::vec(any::<u8>(), 0..64),
            ),
            1..24,
        ),
    )
        .prop_map(|(from, base_chain, shard, recs)| {
            let mut term = 5;
            LogRange {
                cluster_id: [3; 16],
                shard,
                from,
                base_chain,
                records: recs
                    .into_iter()
                    .map(|(kind, step, payload)| {
                        term += step;
                        ArchivedRecord {
                            kind,
                            term,
                            payload,
                        }
                    })
                    .collect(),
            }
        })
}

proptest! {
    #[test]
    fn round_trips_and_refuses_damage(r in range(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let b = r.encode(&SoftMac).unwrap();
        let back = LogRange::decode(&b, &SoftMac).unwrap();
        prop_assert_eq!(&back, &r);
        // The end chain is the WBL chain over the records from the base.
        let mut c = r.base_chain;
        for (i, x) in r.records.iter().enumerate() {
            c = chain_next(c, x.kind, r.from + i as u64, x.term, &x.payload);
        }
        prop_assert_eq!(back.end_chain(), c);
        prop_assert!(matches!(LogRange::decode(&b, &OtherMac), Err(ArchiveError::BadMac(_))));
        for cut in 0..b.len() {
            prop_assert!(LogRange::decode(&b[..cut], &SoftMac).is_err());
        }
        let mut d = b.clone();
        d[at.index(b.len())] ^= 1 << bit;
        prop_assert!(LogRange::decode(&d, &SoftMac).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = LogRange::decode_unverified(&b);
    }

    #[test]
    fn object_names_round_trip(shard in any::<u32>(), from in 1u64.., len in 0u64..1000, hash in any::<u64>()) {
        let to = from.saturating_add(len);
        let name = range_object(&[0xab; 16], shard, from, to, hash);
        prop_assert!(name.starts_with(&range_prefix(&[0xab; 16], shard)));
        prop_assert_eq!(parse_range_object(&name), Some((shard, from, to, hash)));
        prop_assert!(keyfort_engine::manifest::valid_object_name(&name));
    }
}

#[test]
fn refuses_inconsistent_ranges() {
    let rec = |term| ArchivedRecord {
        kind: RecordKind::KeyPut,
        term,
        payload: vec![1, 2, 3],
    };
    let mut r = LogRange {
        cluster_id: [1; 16],
        shard: 0,
        from: 10,
        base_chain: 7,
        records: vec![],
    };
    assert!(r.encode(&SoftMac).is_err(), "empty");
    r.records = vec![rec(3), rec(2)];
    assert!(r.encode(&SoftMac).is_err(), "terms decreasing");
    r.records = vec![rec(2), rec(3)];
    r.from = 0;
    assert!(r.encode(&SoftMac).is_err(), "lsn 0");
    for bad in [
        "archive/shard-0/000000000000000a-000000000000000b-0000000000000001.karc",
        "archive/zz/shard-0/000000000000000a-000000000000000b-0000000000000001.karc",
        "archive/01010101010101010101010101010101/shard-0/000000000000000b-000000000000000a-0000000000000001.karc",
    ] {
        assert_eq!(parse_range_object(bad), None, "{bad}");
    }
}
