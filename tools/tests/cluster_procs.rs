//! Real `keyfortd` processes on 127.0.0.1, each with its own SoftHSM card, talking over the
//! authenticated peer transport: a 3-node cluster keeps committing through SIGKILL of any node,
//! the leader included, again and again; every acknowledged proposal is in a majority of the
//! logs at the end, with the term it was acknowledged in. Every node compacts its shards into
//! snapshots meanwhile (and is sometimes killed mid-compaction) and restarts from them.

use keyfort_bench::local_cluster::LocalCluster;
use std::time::Duration;

const SHARDS: u32 = 2;
const ROUNDS: usize = 6;
/// Records past the snapshot that trigger a compaction on every node.
const COMPACTION_RECORDS: u64 = 300;
/// Generous: two cores run three nodes, their cards and the test.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn a_three_node_cluster_keeps_committing_through_kill_9_of_any_node() {
    let root = tempfile::tempdir().unwrap();
    let mut c = LocalCluster::create(
        root.path(),
        env!("CARGO_BIN_EXE_keyfort").as_ref(),
        env!("CARGO_BIN_EXE_keyfortd").as_ref(),
        3,
        SHARDS,
        4,
        50,
    )
    .unwrap();
    // Small, so every node compacts (and is sometimes killed while compacting) in the test.
    c.configure(|v| v["compaction_records"] = serde_json::json!(COMPACTION_RECORDS))
        .unwrap();
    c.start_all().unwrap();
    assert!(
        c.wait_for(PROGRESS_TIMEOUT, |c| (0..SHARDS)
            .all(|s| c.max_commit(s) > 20)),
        "the cluster never committed"
    );
    for round in 0..ROUNDS {
        let victim = if round % 2 == 0 {
            c.leader(0).expect("shard 0 has a leader")
        } else {
            round % 3
        };
        let before: Vec<u64> = (0..SHARDS).map(|s| c.max_commit(s)).collect();
        c.kill9(victim);
        assert!(
            c.wait_for(PROGRESS_TIMEOUT, |c| (0..SHARDS)
                .all(|s| c.max_commit(s) > before[s as usize] + 10)),
            "round {round}: no progress without node {}",
            c.nodes[victim].id
        );
        c.start(victim).unwrap();
        assert!(
            c.wait_for(PROGRESS_TIMEOUT, |c| c.status(victim).is_some_and(|st| st
                .iter()
                .zip(&before)
                .all(|(s, b)| s.applied >= *b))),
            "round {round}: node {} did not catch up",
            c.nodes[victim].id
        );
        for i in 0..c.nodes.len() {
            assert!(
                c.exited(i).is_none(),
                "node {} exited by itself",
                c.nodes[i].id
            );
        }
    }
    c.kill_all();
    for shard in 0..SHARDS {
        let acked = c.check_acked_in_majority(shard).unwrap();
        assert!(
            acked > 100,
            "shard {shard}: only {acked} proposals acknowledged"
        );
        eprintln!("shard {shard}: {acked} acknowledged proposals, all in a majority of logs");
        for n in &c.nodes {
            let snaps = std::fs::read_dir(n.data_dir.join(format!("shard-{shard}/snap")))
                .unwrap()
                .count();
            assert!(snaps > 0, "node {} never compacted shard {shard}", n.id);
        }
    }
}
