//! The backup manifest codec (docs/format.md §9.2): round trips, and arbitrary, truncated or
//! damaged bytes give typed errors, never panics; a manifest MACed under another key does not
//! verify.

mod state_common;

use keyfort_engine::cluster::{ClusterConfig, Member};
use keyfort_engine::manifest::{
    manifest_name, manifest_seq, valid_object_name, ArchivedRange, Manifest, ManifestError,
    ShardSnapshot,
};
use keyfort_engine::snapshot::FooterMac;
use keyfort_engine::state::StateDigest;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use state_common::SoftMac;

/// Another key: MACs that verify with [`SoftMac`] never verify with it.
struct OtherMac;

impl FooterMac for OtherMac {
    fn mac(&self, bytes: &[u8]) -> keyfort_hsm::Result<[u8; 32]> {
        let mut b = bytes.to_vec();
        b.push(1);
        SoftMac.mac(&b)
    }
    fn verify(&self, bytes: &[u8], mac: &[u8]) -> keyfort_hsm::Result<()> {
        let mut b = bytes.to_vec();
        b.push(1);
        SoftMac.verify(&b, mac)
    }
}

fn manifest() -> impl Strategy<Value = Manifest> {
    (
        1u32..5,
        any::<(u64, u64, u64)>(),
        prop::collection::vec((1u64..1 << 40, any::<u64>(), any::<u128>(), 0u8..4), 4),
        prop::collection::vec(0u64..3, 4),
    )
        .prop_map(|(shard_count, (seq, created, term), snaps, ranges)| {
            let cluster = ClusterConfig {
                cluster_id: [7; 16],
                shard_count,
                next_node_id: 4,
                members: (1..=3)
                    .map(|node_id| Member {
                        node_id,
                        peer_addr: format!("127.0.0.1:{}", 7000 + node_id),
                    })
                    .collect(),
                integrity_key_wrapped: vec![9; 109],
            };
            let shards: Vec<ShardSnapshot> = (0..shard_count)
                .map(|shard| {
                    let (lsn, x, digest, _) = snaps[shard as usize];
                    ShardSnapshot {
                        shard,
                        lsn,
                        term: x >> 8,
                        bytes: x,
                        digest: StateDigest(digest),
                        key_count: x >> 4,
                        file_hash: x.rotate_left(7),
                        object: format!("snapshots/shard-{shard}/{lsn:016x}-{x:016x}.ksnap"),
                    }
                })
                .collect();
            let mut archives = Vec::new();
            for s in &shards {
                let mut from = s.lsn + 1;
                for _ in 0..ranges[s.shard as usize] {
                    let to = from + 99;
                    archives.push(ArchivedRange {
                        shard: s.shard,
                        from,
                        to,
                        bytes: 4096,
                        file_hash: from ^ to,
                        object: format!("archive/shard-{}/{from:016x}-{to:016x}.karc", s.shard),
                    });
                    from = to + 1;
                }
            }
            Manifest {
                seq,
                created_unix_ms: created,
                shard0_term: term,
                cluster_config: cluster.encode().unwrap(),
                shards,
                archives,
            }
        })
}

proptest! {
    #[test]
    fn round_trips_and_refuses_damage(m in manifest(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let b = m.encode(&SoftMac).unwrap();
        prop_assert_eq!(Manifest::decode(&b, &SoftMac).unwrap(), m.clone());
        prop_assert!(matches!(Manifest::decode(&b, &OtherMac), Err(ManifestError::BadMac(_))));
        for cut in 0..b.len() {
            prop_assert!(Manifest::decode(&b[..cut], &SoftMac).is_err());
        }
        let mut d = b.clone();
        d[at.index(b.len())] ^= 1 << bit;
        prop_assert!(Manifest::decode(&d, &SoftMac).is_err());
        let mut t = b.clone();
        t.insert(b.len() - 32, 0);
        prop_assert!(Manifest::decode(&t, &SoftMac).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..1024)) {
        let _ = Manifest::decode_unverified(&b);
    }
}

#[test]
fn names() {
    assert_eq!(manifest_name(0x2a), "manifests/000000000000002a.kman");
    assert_eq!(manifest_seq(&manifest_name(u64::MAX)), Some(u64::MAX));
    for bad in [
        "manifests/2a.kman",
        "manifests/000000000000002a.ksnap",
        "x/000000000000002a.kman",
    ] {
        assert_eq!(manifest_seq(bad), None, "{bad}");
    }
    assert!(valid_object_name("snapshots/shard-0/0001-ab.ksnap"));
    for bad in [
        "",
        "/abs",
        "a//b",
        "a/../b",
        "./a",
        "a b",
        "a\\b",
        &"x".repeat(257),
    ] {
        assert!(!valid_object_name(bad), "{bad:?}");
    }
}

#[test]
fn refuses_inconsistent_manifests() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let m = manifest().new_tree(&mut runner).unwrap().current();
    let mut wrong_count = m.clone();
    wrong_count.shards.pop();
    assert!(wrong_count.encode(&SoftMac).is_err());
    let mut gap = m.clone();
    gap.archives = vec![ArchivedRange {
        shard: 0,
        from: m.shards[0].lsn + 2,
        to: m.shards[0].lsn + 9,
        bytes: 1,
        file_hash: 1,
        object: "archive/x".into(),
    }];
    assert!(gap.encode(&SoftMac).is_err());
    let mut escape = m;
    escape.shards[0].object = "../etc/passwd".into();
    assert!(escape.encode(&SoftMac).is_err());
}
