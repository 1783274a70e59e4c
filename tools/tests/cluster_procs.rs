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

use keyfort_bench::local_cluster::keep_failed as keep;

/// 3 `keyfortd` nodes with 50 ms ticks, `in_flight` synthetic proposals per shard leader.
fn local(root: &std::path::Path, shards: u32, in_flight: usize) -> LocalCluster {
    LocalCluster::create(
        root,
        env!("CARGO_BIN_EXE_keyfort").as_ref(),
        env!("CARGO_BIN_EXE_keyfortd").as_ref(),
        3,
        shards,
        in_flight,
        50,
    )
    .unwrap()
}

/// 3 nodes, [`SHARDS`] shards, 4 synthetic proposals in flight, 50 ms ticks, and compaction
/// every [`COMPACTION_RECORDS`] (small, so every node compacts — and is sometimes killed while
/// compacting — in the tests).
fn compacting_cluster(root: &std::path::Path) -> LocalCluster {
    let c = local(root, SHARDS, 4);
    c.configure(|v| v["compaction_records"] = serde_json::json!(COMPACTION_RECORDS))
        .unwrap();
    c
}

#[test]
fn a_three_node_cluster_keeps_committing_through_kill_9_of_any_node() {
    let root = tempfile::tempdir().unwrap();
    let mut c = compacting_cluster(root.path());
    c.start_all().unwrap();
    assert!(
        c.wait_for(PROGRESS_TIMEOUT, |c| (0..SHARDS)
            .all(|s| c.max_commit(s) > 20)),
        "the cluster never committed"
    );
    for round in 0..ROUNDS {
        let victim = if round % 2 == 0 {
            let mut leader = None;
            c.wait_for(PROGRESS_TIMEOUT, |c| {
                leader = c.leader(0);
                leader.is_some()
            });
            leader.expect("shard 0 has a leader")
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
        let acked = c
            .check_acked_in_majority(shard)
            .unwrap_or_else(|e| panic!("{e} (data dirs and logs kept in {})", keep(root.path())));
        assert!(
            acked > 100,
            "shard {shard}: only {acked} proposals acknowledged"
        );
        eprintln!("shard {shard}: {acked} acknowledged proposals, all in a majority of logs");
    }
    // Compaction ran under the kills (when a node compacts a shard depends on when it was
    // killed, on a 1 s check and on how fast two cores commit, so not every node nor every
    // shard need have).
    let compacted = c
        .nodes
        .iter()
        .flat_map(|n| (0..SHARDS).map(move |s| n.data_dir.join(format!("shard-{s}/snap"))))
        .filter(|d| std::fs::read_dir(d).map_or(0, |d| d.count()) > 0)
        .count();
    assert!(compacted > 0, "no node compacted any shard");
}

#[test]
fn a_node_down_past_the_kept_log_catches_up_from_a_streamed_snapshot() {
    let root = tempfile::tempdir().unwrap();
    let mut c = local(root.path(), 1, 8);
    // Compact often and keep almost no log: a node down for a while needs a snapshot.
    c.configure(|v| {
        v["compaction_records"] = serde_json::json!(COMPACTION_RECORDS);
        v["log_retention_entries"] = serde_json::json!([50, 50]);
        v["wbl_segment_bytes"] = serde_json::json!(512 * 1024);
    })
    .unwrap();
    c.start_all().unwrap();
    assert!(c.wait_for(PROGRESS_TIMEOUT, |c| c.max_commit(0) > 50));
    let mut leader = None;
    assert!(c.wait_for(PROGRESS_TIMEOUT, |c| {
        leader = c.leader(0);
        leader.is_some()
    }));
    let victim = (leader.expect("a leader") + 1) % 3;
    c.kill9(victim);
    let down_at = c.max_commit(0);
    // Compactions pass while it is down until every live node's log starts past where the
    // victim stopped: it can only catch up from a snapshot.
    assert!(
        c.wait_for(PROGRESS_TIMEOUT * 2, |c| (0..3)
            .filter(|&i| i != victim)
            .all(|i| c.status(i).is_some_and(|s| s[0].log_first > down_at + 1))),
        "the live nodes never released their logs past {down_at}"
    );
    let target = c.max_commit(0);
    let snap_dir = c.nodes[victim].data_dir.join("shard-0/snap");
    let before: Vec<_> = std::fs::read_dir(&snap_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    c.start(victim).unwrap();
    assert!(
        c.wait_for(PROGRESS_TIMEOUT, |c| c
            .status(victim)
            .is_some_and(|s| s[0].applied >= target)),
        "node {} did not catch up",
        c.nodes[victim].id
    );
    let after: Vec<_> = std::fs::read_dir(&snap_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        after.iter().any(|f| !before.contains(f)),
        "node {} caught up without a new snapshot file ({before:?} -> {after:?})",
        c.nodes[victim].id
    );
    let log = std::fs::read_to_string(
        c.nodes[victim]
            .data_dir
            .parent()
            .unwrap()
            .join("keyfortd.log"),
    )
    .unwrap_or_default();
    eprintln!(
        "{}",
        log.lines()
            .filter(|l| l.contains("snapshot"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    c.kill_all();
    assert!(c.check_acked_in_majority(0).unwrap() > 100);
}

/// Whether node `i` runs as raft id `id`, is a voter of every shard, and applied `target[s]`.
fn rejoined(c: &LocalCluster, i: usize, id: u64, old: u64, target: &[u64]) -> bool {
    c.node_id(i) == Some(id)
        && c.status(i).is_some_and(|st| {
            st.len() == target.len()
                && st.iter().zip(target).all(|(s, t)| {
                    s.voters.contains(&id)
                        && !s.voters.contains(&old)
                        && !s.learners.contains(&old)
                        && s.applied >= *t
                })
        })
}

#[test]
fn a_wiped_node_rejoins_as_a_new_member_from_a_peer_snapshot() {
    let root = tempfile::tempdir().unwrap();
    let mut c = compacting_cluster(root.path());
    c.start_all().unwrap();
    assert!(
        c.wait_for(PROGRESS_TIMEOUT, |c| (0..SHARDS)
            .all(|s| c.max_commit(s) > 2 * COMPACTION_RECORDS)),
        "the cluster never committed"
    );
    // The disk of node 3 is lost: it comes back empty, through its seed peers.
    let victim = 2;
    let old = c.nodes[victim].id;
    c.wipe(victim).unwrap();
    let target: Vec<u64> = (0..SHARDS).map(|s| c.max_commit(s)).collect();
    c.start(victim).unwrap();
    let new_id = 4; // cluster init gave 1..=3; ids are never reused
    assert!(
        c.wait_for(PROGRESS_TIMEOUT * 2, |c| rejoined(
            c, victim, new_id, old, &target
        )),
        "node at {} did not rejoin as node {new_id} (status {:?})",
        c.nodes[victim].peer_addr,
        c.status(victim)
    );
    // Every other node dropped the old id from every shard too, and commits go on.
    let now: Vec<u64> = (0..SHARDS).map(|s| c.max_commit(s)).collect();
    assert!(
        c.wait_for(PROGRESS_TIMEOUT, |c| (0..3).all(|i| c
            .status(i)
            .is_some_and(|st| st.iter().zip(&now).all(|(s, n)| s
                .voters
                .contains(&new_id)
                && !s.voters.contains(&old)
                && s.applied > *n)))),
        "the cluster did not settle on voters without node {old}"
    );
    for i in 0..3 {
        assert!(c.exited(i).is_none(), "node {i} exited by itself");
    }
    // Quiesce: all three restart without load and agree on every shard's state.
    c.kill_all();
    c.configure(|v| v["synthetic_in_flight"] = serde_json::json!(0))
        .unwrap();
    c.start_all().unwrap();
    assert!(
        c.wait_for(PROGRESS_TIMEOUT, |c| {
            let st: Vec<_> = (0..3).filter_map(|i| c.status(i)).collect();
            st.len() == 3
                && (0..SHARDS as usize).all(|s| {
                    st.iter()
                        .all(|n| n[s].applied == st[0][s].applied && n[s].digest == st[0][s].digest)
                        && st[0][s].applied >= now[s]
                })
        }),
        "digests disagree after the rejoin: {:?} (exited: {:?}; kept in {})",
        (0..3).map(|i| c.status(i)).collect::<Vec<_>>(),
        (0..3).map(|i| c.exited(i)).collect::<Vec<_>>(),
        keep(root.path())
    );
    assert_eq!(c.node_id(victim), Some(new_id));
    c.kill_all();
}

#[test]
fn a_node_with_a_card_of_another_realm_cannot_join() {
    let root = tempfile::tempdir().unwrap();
    let mut c = local(root.path(), 1, 0);
    c.start_all().unwrap();
    assert!(c.wait_for(PROGRESS_TIMEOUT, |c| c.leader(0).is_some()));
    // A card made by another realm's ceremony, on a node configured like a joiner.
    let r = root.path();
    let card = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyfort"))
            .arg("card")
            .args(args)
            .env("KEYFORT_PIN_FILE", r.join("user.pin"))
            .env("KEYFORT_SO_PIN_FILE", r.join("so.pin"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let kit = r.join("other-kit");
    let token_dir = r.join("intruder/card");
    card(&[
        "ceremony-kit",
        "--out",
        kit.to_str().unwrap(),
        "--realm",
        "other-realm",
    ]);
    card(&[
        "init",
        "--token-dir",
        token_dir.to_str().unwrap(),
        "--label",
        "intruder",
        "--kit",
        kit.to_str().unwrap(),
    ]);
    let port = keyfort_bench::local_cluster::free_ports(1).unwrap()[0];
    let data_dir = r.join("intruder/data");
    let config = r.join("intruder/keyfortd.json");
    let cfg = serde_json::json!({
        "data_dir": data_dir,
        "peer_listen": format!("127.0.0.1:{port}"),
        "card": { "token_dir": token_dir, "label": "intruder", "pin_file": r.join("user.pin") },
        "seed_peers": [c.nodes[0].peer_addr],
        "insecure_loopback": true,
    });
    std::fs::write(&config, cfg.to_string()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyfortd"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the intruder started: {err}");
    assert!(err.contains("another realm"), "unexpected error: {err}");
    assert!(
        !data_dir.join("identity").exists(),
        "the intruder got an identity"
    );
    // The cluster never saw a join: membership and the config are unchanged.
    let st = c.status(0).unwrap();
    assert_eq!(st[0].voters, vec![1, 2, 3]);
    assert!(st[0].learners.is_empty());
    c.kill_all();
}
