//! The demo's cluster drill: three real `keyfortd` processes on 127.0.0.1, one SoftHSM card
//! each, a cluster made with `keyfort cluster init` (integrity key made in node-1's card) and
//! bootstrapped on every node. Then what a user does: an operator's admin credential, a
//! partition, keys made in the receiving node's card and committed by quorum, encryptions —
//! all over the client protocol. While clients keep creating keys, the leader of shard 0 is
//! SIGKILLed: the drill reports the client-visible write gap (failover), then restarts the
//! killed node from its own log and times its catch-up (the local tier). Then a follower loses
//! its disk (its data dir is removed; its card stays): started again with nothing but its
//! config, it joins through its seed peers as a new member — fresh raft id, each shard's
//! snapshot streamed from the leader, one joint conf change removing its old id — and the drill
//! times it until it has applied what the cluster had committed (the peer tier). Finally every
//! acknowledged key is described and decrypts on every node, and every node's state digest
//! agrees.

use keyfort_bench::local_cluster::{LocalCluster, Security};
use keyfort_net::client::{Client, ClientOptions, Credential};
use keyfort_net::client_proto::{ErrorCode, Request, Response};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NODES: u64 = 3;
const SHARDS: u32 = 2;
/// Client threads creating keys during the drill.
const WRITERS: usize = 4;
/// Keys made before the failover.
const FIRST_KEYS: usize = 200;
const TICK_MS: u64 = crate::node::DEFAULT_TICK_MS;
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

fn line(what: impl AsRef<str>, ms: f64) {
    println!("{:<60} {ms:>9.1} ms", what.as_ref());
}

/// A key a writer made: its id and one envelope with the plaintext it seals.
struct Made {
    key_id: [u8; 16],
    envelope: Vec<u8>,
    plaintext: Vec<u8>,
}

/// What the writers share: keys made, and when each create was acknowledged.
#[derive(Default)]
struct Writes {
    made: Vec<Made>,
    acked_at: Vec<Instant>,
    errors: Vec<String>,
}

/// Keeps creating keys (and encrypting with each) until `stop`; retries go through the client
/// library with the same idempotency id.
fn writer(client: Client, stop: Arc<AtomicBool>, out: Arc<Mutex<Writes>>, n: usize) {
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let w = match client.create_key(format!("drill writer {n} key {i}").as_bytes(), false) {
            Ok(w) => w,
            Err(e) => {
                out.lock().unwrap().errors.push(format!("create: {e}"));
                continue;
            }
        };
        out.lock().unwrap().acked_at.push(Instant::now());
        let plaintext = format!("secret {n}/{i}").into_bytes();
        match client.encrypt(w.key_id, b"drill", &plaintext) {
            Ok((_, envelope)) => out.lock().unwrap().made.push(Made {
                key_id: w.key_id,
                envelope,
                plaintext,
            }),
            Err(e) => out.lock().unwrap().errors.push(format!("encrypt: {e}")),
        }
    }
}

/// The longest interval between consecutive acknowledgements within `[from, to]`.
fn longest_gap(acked: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut t: Vec<Instant> = acked
        .iter()
        .copied()
        .filter(|a| *a >= from && *a <= to)
        .collect();
    t.sort();
    t.insert(0, from);
    t.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
}

pub fn cluster_drill(dir: &Path) -> crate::CmdResult {
    println!(
        "== cluster drill: {NODES} keyfortd processes, {SHARDS} shards, one SoftHSM card each, \
         {WRITERS} clients creating keys over the client protocol"
    );
    let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let keyfortd = exe.with_file_name("keyfortd");
    let t = Instant::now();
    let mut c = LocalCluster::create_with(
        dir,
        &exe,
        &keyfortd,
        NODES,
        SHARDS,
        0,
        TICK_MS,
        Security::Tls,
    )?;
    line(
        "cards, cluster init, bootstrap of 3 data dirs",
        t.elapsed().as_secs_f64() * 1e3,
    );
    c.start_all()?;
    let ms = timed(&c, "leaders", |c| {
        (0..SHARDS).all(|s| c.leader(s).is_some())
    })?;
    line("processes up, a leader for every shard", ms);
    let admin_file = c.admin_credential(&exe)?;
    let admin = Credential::read_file(&admin_file).map_err(|e| e.to_string())?;
    let opts = ClientOptions {
        request_timeout: Duration::from_secs(15),
        tls: c.client_tls()?,
        ..ClientOptions::default()
    };
    let e = |e: keyfort_net::client::ClientError| e.to_string();
    let admin = Client::connect(c.client_addrs(), admin, opts.clone()).map_err(e)?;
    let t = Instant::now();
    let partition: [u8; 16] = rand::random();
    let (_, cred) = admin.create_partition(partition).map_err(e)?;
    line(
        format!(
            "partition {} made in a card, committed; credential issued",
            &crate::cluster_cmd::hex(&partition)[..8]
        ),
        t.elapsed().as_secs_f64() * 1e3,
    );
    let writes = Arc::new(Mutex::new(Writes::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let t = Instant::now();
    let threads: Vec<_> = (0..WRITERS)
        .map(|n| {
            let client = Client::connect(c.client_addrs(), cred.clone(), opts.clone());
            let (stop, writes) = (stop.clone(), writes.clone());
            std::thread::spawn(move || match client {
                Ok(client) => writer(client, stop, writes, n),
                Err(e) => writes.lock().unwrap().errors.push(format!("connect: {e}")),
            })
        })
        .collect();
    let waited = Instant::now();
    while writes.lock().unwrap().made.len() < FIRST_KEYS && waited.elapsed() < STEP_TIMEOUT {
        std::thread::sleep(Duration::from_millis(20));
    }
    let n = writes.lock().unwrap().made.len();
    if n < FIRST_KEYS {
        stop.store(true, Ordering::Relaxed);
        return Err(format!(
            "cluster drill: only {n} keys made in {STEP_TIMEOUT:?}: {:?}",
            writes.lock().unwrap().errors.first()
        ));
    }
    line(
        format!("{n} keys created (card → raft quorum) and used by {WRITERS} clients"),
        t.elapsed().as_secs_f64() * 1e3,
    );
    // The partition's keys live in one shard: its leader is the one killed.
    let shard = keyfort_engine::cluster::shard_of(&keyfort_hsm::PartitionId(partition), SHARDS);
    let victim = c
        .leader(shard)
        .ok_or("the partition's shard lost its leader")?;
    let killed_at = Instant::now();
    c.kill9(victim);
    let ms = timed(&c, "new leader", |c| {
        c.leader(shard).is_some_and(|l| l != victim)
    })?;
    line(
        format!(
            "kill -9 node-{} (leader of the partition's shard {shard}): new leader",
            c.nodes[victim].id
        ),
        ms,
    );
    // Let the clients write through the new leader for a while, then measure their gap.
    std::thread::sleep(Duration::from_secs(2));
    let gap = longest_gap(&writes.lock().unwrap().acked_at, killed_at, Instant::now());
    line(
        "client-visible write gap around the kill (longest)",
        gap.as_secs_f64() * 1e3,
    );
    let target: Vec<u64> = (0..SHARDS).map(|s| c.max_commit(s)).collect();
    c.start(victim)?;
    let ms = timed(&c, "catch-up", |c| {
        c.status(victim)
            .is_some_and(|st| st.iter().zip(&target).all(|(s, t)| s.applied >= *t))
    })?;
    line(
        format!(
            "node-{} restarts from its own log, catches up (local tier)",
            c.nodes[victim].id
        ),
        ms,
    );
    let victim = (0..c.nodes.len())
        .find(|&i| c.leader(0) != Some(i) && c.leader(1) != Some(i))
        .or_else(|| (0..c.nodes.len()).find(|&i| c.leader(0) != Some(i)))
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
    line(
        format!("node-{old}'s disk wiped: rejoins as node-{new}, caught up (peer tier)"),
        ms,
    );
    let ms = timed(&c, "promotion", |c| {
        c.status(victim).is_some_and(|st| {
            st.iter()
                .all(|s| s.voters.contains(&new) && !s.voters.contains(&old))
        })
    })?;
    line(
        format!("then node-{new} a voter of every shard, node-{old} gone"),
        ms,
    );
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let w = std::mem::take(&mut *writes.lock().unwrap());
    verify(&c, &cred, &opts, &w)
}

/// Every acknowledged key decrypts its envelope on every node; every node's digest agrees.
fn verify(
    c: &LocalCluster,
    cred: &Credential,
    opts: &ClientOptions,
    w: &Writes,
) -> crate::CmdResult {
    let t = Instant::now();
    let client =
        Client::connect(c.client_addrs(), cred.clone(), opts.clone()).map_err(|e| e.to_string())?;
    for node in 0..c.nodes.len() {
        for m in &w.made {
            let req = Request::Decrypt {
                key_id: m.key_id,
                aad: b"drill".to_vec(),
                envelope: m.envelope.clone(),
            };
            match client.call_on(node, &req) {
                Ok(Response::Decrypted { plaintext }) if plaintext == m.plaintext => {}
                other => {
                    return Err(format!(
                        "cluster drill: key {} on node {}: {other:?}",
                        crate::cluster_cmd::hex(&m.key_id),
                        node + 1
                    ))
                }
            }
        }
    }
    line(
        format!(
            "{} acknowledged keys decrypt on each of {} nodes",
            w.made.len(),
            c.nodes.len()
        ),
        t.elapsed().as_secs_f64() * 1e3,
    );
    let agreed = c.wait_for(STEP_TIMEOUT, |c| {
        (0..SHARDS as usize).all(|s| {
            let views: Vec<_> = (0..c.nodes.len())
                .filter_map(|i| c.status(i).map(|st| (st[s].applied, st[s].digest.clone())))
                .collect();
            views.len() == c.nodes.len() && views.windows(2).all(|v| v[0] == v[1])
        })
    });
    if !agreed {
        return Err("cluster drill: the nodes' state digests do not agree".into());
    }
    let retried = w
        .errors
        .iter()
        .filter(|e| !e.contains(&format!("{:?}", ErrorCode::Retry)))
        .count();
    println!(
        "every node applied the same log and holds the same state digest on every shard; \
         {} client errors after retries ({retried} not Retry)",
        w.errors.len()
    );
    Ok(())
}
