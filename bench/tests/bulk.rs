//! The bulk loader on a one-node cluster of two shards: real WBLs in a temp dir, a real
//! SoftHSM card, each shard a single-voter raft group. Every key is acknowledged, routed by
//! `shard_of` and present in its shard's state (and only there).

use keyfort_bench::bulk::{
    bulk_idempotency_id, bulk_key_header, bulk_load, bulk_partition, BulkSpec, BULK_IN_FLIGHT_MAX,
};
use keyfort_engine::cluster::shard_of;
use keyfort_engine::raft::{Replica, Transport};
use keyfort_engine::recovery::open_and_recover;
use keyfort_engine::wbl::WblOptions;
use keyfort_hsm::softhsm::fixture;
use keyfort_hsm::Card;
use raft::eraftpb::{ConfState, Message};
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

const SHARDS: u32 = 2;
const TICK: Duration = Duration::from_millis(20);

/// One voter: nothing to send to.
struct Nowhere;

impl Transport for Nowhere {
    fn send(&self, _shard: u32, _msgs: Vec<Message>) {}
}

async fn open_shards(root: &Path, card: &'static Card, ik: &[u8]) -> Vec<Rc<Replica>> {
    let bootstrap = ConfState {
        voters: vec![1],
        ..Default::default()
    };
    let mut mac = card.session().unwrap();
    mac.import_integrity_key(ik).unwrap();
    let mut out = Vec::new();
    for shard in 0..SHARDS {
        let dir = root.join(format!("s{shard}"));
        std::fs::create_dir_all(dir.join("snap")).unwrap();
        let opts = WblOptions {
            segment_bytes: 4 << 20,
            ..WblOptions::default()
        };
        let start = open_and_recover(&dir.join("snap"), &dir.join("wbl"), opts, &mac, 1 << 20)
            .await
            .unwrap();
        let r = Replica::open(1, shard, start, &bootstrap, Rc::new(Nowhere), false)
            .await
            .unwrap();
        glommio::spawn_local(r.clone().run_ticker(TICK)).detach();
        r.campaign().unwrap();
        out.push(r);
    }
    for r in &out {
        let t = Instant::now();
        while !r.with_core(|c| c.is_leader()) {
            assert!(t.elapsed() < Duration::from_secs(10), "no leader");
            glommio::timer::sleep(TICK).await;
        }
    }
    out
}

#[test]
fn bulk_load_commits_every_key_on_its_shard() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().to_path_buf();
    let card: &'static Card = Box::leak(Box::new(
        fixture().new_card("bulkvendor", "bulkrealm").unwrap(),
    ));
    let ik = card.session().unwrap().create_integrity_key().unwrap();
    keyfort_engine::exec::run_local(root.path(), |_| async move {
        let rs = open_shards(&path, card, &ik).await;
        let spec = BulkSpec {
            keys: 3000,
            partitions: 8,
            in_flight: 64,
            card_threads: 2,
        };

        // Limits are enforced before anything is made.
        for bad in [
            BulkSpec {
                in_flight: 0,
                ..spec
            },
            BulkSpec {
                in_flight: BULK_IN_FLIGHT_MAX + 1,
                ..spec
            },
            BulkSpec {
                card_threads: 0,
                ..spec
            },
            BulkSpec {
                partitions: 0,
                ..spec
            },
        ] {
            assert!(bulk_load(rs.clone(), card, ik.clone(), bad).await.is_err());
        }

        let report = bulk_load(rs.clone(), card, ik.clone(), spec).await.unwrap();
        assert_eq!(report.keys, 3000);
        assert_eq!(report.partitions, 8);
        assert_eq!(report.last_index.len(), SHARDS as usize);
        assert!(report.total_s > 0.0 && report.keys_per_s > 0.0);
        assert!(report.card_s > 0.0 && report.card_s <= report.total_s);
        let json = report.to_json();
        assert_eq!(json["keys"], 3000);
        assert_eq!(json["last_index"].as_array().unwrap().len(), 2);

        // Per shard: its partitions, its keys, and an acknowledged index covering them.
        let mut per_shard = [(0u64, 0u64); SHARDS as usize];
        for p in 0..spec.partitions {
            per_shard[shard_of(&bulk_partition(p), SHARDS) as usize].0 += 1;
        }
        for j in 0..spec.keys {
            let h = bulk_key_header(j, spec.partitions);
            let shard = shard_of(&h.partition, SHARDS) as usize;
            per_shard[shard].1 += 1;
            for (s, r) in rs.iter().enumerate() {
                let e = r.with_core(|c| c.state_machine().get(h.partition, h.key_id, 1).unwrap());
                if s == shard {
                    let e = e.unwrap_or_else(|| panic!("key {j} missing on shard {s}"));
                    assert_eq!(e.header, h);
                    assert!(!e.blob.is_empty());
                    assert_eq!(e.metadata, format!("bulk key {j}").into_bytes());
                } else {
                    assert!(e.is_none(), "key {j} on shard {s}, routed to {shard}");
                }
            }
        }
        for (s, r) in rs.iter().enumerate() {
            let (parts, keys) = per_shard[s];
            r.with_core(|c| {
                let sm = c.state_machine();
                assert_eq!(sm.partitions().count() as u64, parts, "shard {s}");
                assert_eq!(sm.key_count(), keys, "shard {s}");
                assert!(c.applied() >= report.last_index[s]);
            });
            // One record per partition and key, beside the leader's no-op.
            assert!(report.last_index[s] >= parts + keys, "shard {s}");
        }
        assert!(
            per_shard.iter().all(|&(p, _)| p > 0),
            "8 partitions on both shards"
        );

        // A second load of the same keys would collide: its partitions already exist with other
        // configs (fresh ones from the card), and that is an error, not a silent success.
        let again = bulk_load(rs.clone(), card, ik.clone(), BulkSpec { keys: 10, ..spec }).await;
        let err = again.unwrap_err();
        assert!(err.contains("PartitionExists"), "{err}");
        assert_ne!(bulk_idempotency_id(0), bulk_idempotency_id(1));

        for r in &rs {
            r.close().await.unwrap();
        }
    })
    .unwrap();
}
