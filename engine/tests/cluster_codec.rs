//! The cluster config, node identity and raft snapshot descriptor codecs: round trips, and
//! arbitrary or damaged bytes give typed errors, never panics.

use keyfort_engine::cluster::{ClusterConfig, ClusterError, Identity, Member};
use proptest::prelude::*;

fn config() -> impl Strategy<Value = ClusterConfig> {
    (
        any::<[u8; 16]>(),
        1u32..64,
        prop::collection::btree_set(1u64..1000, 0..8),
        prop::collection::vec(any::<u8>(), 0..200),
        1u64..1000,
    )
        .prop_map(|(cluster_id, shard_count, ids, key, gap)| ClusterConfig {
            cluster_id,
            shard_count,
            next_node_id: ids.iter().max().copied().unwrap_or(0) + gap,
            members: ids
                .into_iter()
                .map(|node_id| Member {
                    node_id,
                    peer_addr: format!("127.0.0.1:{}", 7000 + node_id),
                })
                .collect(),
            integrity_key_wrapped: key,
        })
}

proptest! {
    #[test]
    fn cluster_config_round_trips_and_refuses_damage(c in config(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let b = c.encode().unwrap();
        prop_assert_eq!(ClusterConfig::decode(&b).unwrap(), c);
        for cut in 0..b.len() {
            prop_assert!(ClusterConfig::decode(&b[..cut]).is_err());
        }
        let mut d = b.clone();
        d[at.index(b.len())] ^= 1 << bit;
        prop_assert!(ClusterConfig::decode(&d).is_err());
        let mut t = b.clone();
        t.push(0);
        prop_assert!(ClusterConfig::decode(&t).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = ClusterConfig::decode(&b);
        let _ = Identity::decode(&b);
    }

    #[test]
    fn identity_round_trips_and_refuses_damage(cluster_id in any::<[u8; 16]>(), node_id in 1u64.., at in 0usize..36, bit in 0u8..8) {
        let id = Identity { cluster_id, node_id };
        let b = id.encode();
        prop_assert_eq!(Identity::decode(&b).unwrap(), id);
        let mut d = b;
        d[at] ^= 1 << bit;
        prop_assert!(Identity::decode(&d).is_err());
    }
}

#[test]
fn members_must_be_ascending_and_nonzero() {
    let mut c = ClusterConfig {
        cluster_id: [1; 16],
        shard_count: 1,
        next_node_id: 3,
        members: vec![
            Member {
                node_id: 2,
                peer_addr: "a".into(),
            },
            Member {
                node_id: 1,
                peer_addr: "b".into(),
            },
        ],
        integrity_key_wrapped: vec![],
    };
    assert!(matches!(c.encode(), Err(ClusterError::Invalid { .. })));
    c.members[1].node_id = 0;
    assert!(matches!(c.encode(), Err(ClusterError::Invalid { .. })));
    c.members[1].node_id = 3;
    assert!(matches!(c.encode(), Err(ClusterError::Invalid { .. })));
    c.next_node_id = 4;
    assert!(c.encode().is_ok());
    c.members.clear();
    c.shard_count = 0;
    assert!(matches!(c.encode(), Err(ClusterError::Invalid { .. })));
}

#[test]
fn admitting_a_node_gives_a_fresh_id_and_replaces_the_member_at_its_address() {
    let member = |node_id: u64| Member {
        node_id,
        peer_addr: format!("127.0.0.1:{}", 7000 + node_id),
    };
    let c = ClusterConfig {
        cluster_id: [7; 16],
        shard_count: 2,
        next_node_id: 4,
        members: vec![member(1), member(2), member(3)],
        integrity_key_wrapped: vec![1, 2, 3],
    };
    // The node that was 3 comes back (same address): it gets 4, and 3 is gone for good.
    let (d, id, replaces) = c.admit("127.0.0.1:7003").unwrap();
    assert_eq!((id, replaces, d.next_node_id), (4, 3, 5));
    assert_eq!(
        d.members.iter().map(|m| m.node_id).collect::<Vec<_>>(),
        [1, 2, 4]
    );
    assert_eq!(d.member(4).unwrap().peer_addr, "127.0.0.1:7003");
    assert!(c.may_become(&d));
    assert!(!d.may_become(&c), "never back to an older config");
    // Two admissions made from the same config: only the first applied may take effect.
    let (e, id_e, replaces_e) = c.admit("127.0.0.1:7100").unwrap();
    assert_eq!((id_e, replaces_e), (4, 0));
    assert!(!d.may_become(&e));
    let mut other = d.clone();
    other.next_node_id = 9;
    other.cluster_id = [8; 16];
    assert!(
        !d.may_become(&other),
        "another cluster's config never replaces ours"
    );
}

mod descriptor {
    use keyfort_engine::raft::snapshot::{DescriptorError, SnapshotDescriptor, DESCRIPTOR_BYTES};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn snapshot_descriptor_round_trips_and_refuses_damage(
            shard in any::<u32>(), lsn in any::<u64>(), term in any::<u64>(), size in any::<u64>(),
            digest in any::<[u8; 16]>(), at in 0usize..DESCRIPTOR_BYTES, bit in 0u8..8,
        ) {
            let d = SnapshotDescriptor { shard, lsn, term, size, digest };
            let b = d.encode();
            prop_assert_eq!(SnapshotDescriptor::decode(&b).unwrap(), d);
            let mut x = b;
            x[at] ^= 1 << bit;
            prop_assert!(SnapshotDescriptor::decode(&x).is_err());
            prop_assert_eq!(
                SnapshotDescriptor::decode(&b[..DESCRIPTOR_BYTES - 1]),
                Err(DescriptorError::Length { len: DESCRIPTOR_BYTES - 1 })
            );
        }

        #[test]
        fn arbitrary_descriptor_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..128)) {
            let _ = SnapshotDescriptor::decode(&b);
        }
    }
}
