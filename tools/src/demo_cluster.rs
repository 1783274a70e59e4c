//! The demo's cluster drill: three real `keyfortd` processes on 127.0.0.1, one SoftHSM card
//! each, a cluster made with `keyfort cluster init` (integrity key made in node-1's card) and
//! bootstrapped on every node, proposals kept in flight on every shard's leader. The leader of
//! shard 0 is SIGKILLed: the drill times until the survivors elect a new leader and commit again
//! (failover), then restarts the killed node from its own log and times its catch-up (the local
//! tier). Then a follower loses its disk (its data dir is removed; its card stays): started
//! again with nothing but its config, it joins through its seed peers as a new member — fresh
//! raft id, each shard's snapshot streamed from the leader, one joint conf change removing its
//! old id — and the drill times it until it has applied what the cluster had committed (the peer
//! tier). Finally every acknowledged proposal is checked to be in a majority of the logs.

use keyfort_bench::local_cluster::LocalCluster;
use std::path::Path;
use std::time::{Duration, Instant};

const NODES: u64 = 3;
const SHARDS: u32 = 2;
/// Proposals each shard leader keeps in flight during the drill.
const IN_FLIGHT: usize = 16;
const TICK_MS: u64 = 100;
/// Longest any drill step may take before the drill fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

fn timed(
    c: &LocalCluster,
    what: &str,
    f: impl FnMut(&LocalCluster) -> bool,
) -> Result<f64, String> {
    let t = Instant::now();
    if !c.wait_for(STEP_TIMEOUT, f) {
        return Err(format!(
            "cluster drill: {what}: not within {STEP_TIMEOUT:?}"
        ));
    }
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

pub fn cluster_drill(dir: &Path) -> crate::CmdResult {
    println!("== cluster drill: {NODES} keyfortd processes, {SHARDS} shards, one SoftHSM card each, {IN_FLIGHT} proposals in flight per leader");
    let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let keyfortd = exe.with_file_name("keyfortd");
    let t = Instant::now();
    let mut c = LocalCluster::create(dir, &exe, &keyfortd, NODES, SHARDS, IN_FLIGHT, TICK_MS)?;
    println!(
        "{:<52} {:>9.1} ms",
        "cards, cluster init, bootstrap of 3 data dirs",
        t.elapsed().as_secs_f64() * 1e3
    );
    c.start_all()?;
    let ms = timed(&c, "first commits", |c| {
        (0..SHARDS).all(|s| c.leader(s).is_some() && c.max_commit(s) > 50)
    })?;
    println!(
        "{:<52} {ms:>9.1} ms",
        "processes up, leaders elected, 50 commits per shard"
    );
    let victim = c.leader(0).ok_or("shard 0 lost its leader")?;
    let before: Vec<u64> = (0..SHARDS).map(|s| c.max_commit(s)).collect();
    c.kill9(victim);
    let ms = timed(&c, "new leader", |c| {
        c.leader(0).is_some_and(|l| l != victim) && c.max_commit(0) > before[0]
    })?;
    println!(
        "{:<52} {ms:>9.1} ms",
        format!(
            "kill -9 node-{} (leader): new leader, commits resume",
            c.nodes[victim].id
        )
    );
    let target: Vec<u64> = (0..SHARDS).map(|s| c.max_commit(s)).collect();
    c.start(victim)?;
    let ms = timed(&c, "catch-up", |c| {
        c.status(victim)
            .is_some_and(|st| st.iter().zip(&target).all(|(s, t)| s.applied >= *t))
    })?;
    println!(
        "{:<52} {ms:>9.1} ms",
        format!(
            "node-{} restarts from its own log, catches up",
            c.nodes[victim].id
        )
    );
    let victim = (0..c.nodes.len())
        .find(|&i| c.leader(0) != Some(i))
        .ok_or("no follower")?;
    let old = c.node_id(victim).ok_or("follower has no status")?;
    c.wipe(victim)?;
    let target: Vec<u64> = (0..SHARDS).map(|s| c.max_commit(s)).collect();
    c.start(victim)?;
    let ms = timed(&c, "rejoin", |c| {
        c.node_id(victim).is_some_and(|id| id != old)
            && c.status(victim)
                .is_some_and(|st| st.iter().zip(&target).all(|(s, t)| s.applied >= *t))
    })?;
    let new = c.node_id(victim).unwrap_or(0);
    println!(
        "{:<52} {ms:>9.1} ms",
        format!("node-{old}'s disk wiped: rejoins as node-{new}, caught up")
    );
    let ms = timed(&c, "promotion", |c| {
        c.status(victim).is_some_and(|st| {
            st.iter()
                .all(|s| s.voters.contains(&new) && !s.voters.contains(&old))
        })
    })?;
    println!(
        "{:<52} {ms:>9.1} ms",
        format!("then node-{new} a voter of every shard, node-{old} gone")
    );
    c.kill_all();
    let mut acked = 0;
    for shard in 0..SHARDS {
        acked += c.check_acked_in_majority(shard)?;
    }
    println!("{acked} acknowledged proposals, every one in a majority of the logs with its term");
    Ok(())
}
