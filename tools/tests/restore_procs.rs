//! The durable tier on real processes: 3 `keyfortd` nodes (own SoftHSM cards, 2 shards) back up
//! to a real `keyfort-s3` server on 127.0.0.1 (snapshots, manifests and the log archive) while
//! clients write and the manager's node is SIGKILLed; then every node and disk is lost and
//! `keyfort restore` brings a new cluster back:
//!
//! * only node 3 makes snapshots: the manager, on another node, polls every node for its
//!   newest and fetches node 3's over the snapshot stream;
//! * the snapshot maker then dies; with no write after the last acknowledged one, the log
//!   archive alone brings a manifest to it, and the restore replays archived records;
//! * every acknowledged key is there on the new cluster and decrypts its envelope; every node
//!   reaches the digest the restore announced, under a new raft id, reports the durable tier
//!   with its phases (also through `keyfort cluster status`); a write works; the old cluster
//!   is fenced; the new cluster writes its own manifests, continuing the sequence;
//! * every manifest the killed managers left behind is complete (`restore --list`, which needs
//!   no `--node`);
//! * a card of another realm is refused before any snapshot byte is fetched;
//! * an older manifest named with `--manifest` restores to exactly its LSNs; `--cluster-id` of
//!   another cluster finds nothing to restore;
//! * a snapshot object altered in the bucket is refused, naming the object, and the failed
//!   restore leaves no data dir behind.

mod common;

use keyfort_bench::local_cluster::{keep_failed as keep, LocalCluster};
use keyfort_bench::s3_server::S3Server;
use keyfort_net::client::{Client, ClientOptions, Credential};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const SHARDS: u32 = 2;
/// Generous: two cores run three nodes, their cards, the S3 server and the test.
const TIMEOUT: Duration = Duration::from_secs(60);
/// Keys created (and one envelope each kept) per partition before the backup point.
const KEYS_PER_PARTITION: usize = 60;
const AAD: &[u8] = b"restore test";
const PREFIX: &str = "dr";
/// The node (index) that alone makes snapshots.
const SNAPSHOT_MAKER: usize = 2;
/// Keys per partition written once the manager runs away from the snapshot maker: enough for
/// it to compact (every 50 records) again.
const FILLER_KEYS: usize = 60;
/// Keys per partition written once no node makes snapshots any more.
const TAIL_KEYS: usize = 10;

fn keyfort() -> &'static Path {
    env!("CARGO_BIN_EXE_keyfort").as_ref()
}

fn connect(c: &LocalCluster, cred: &Credential) -> Client {
    let opts = ClientOptions {
        request_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    };
    common::connect(c, cred, &opts, TIMEOUT)
}

fn partition_on(admin: &Client, shard: u32) -> ([u8; 16], Credential) {
    common::partition_on(admin, shard, SHARDS)
}

/// Per shard, the highest commit any node reports.
fn commits(admin: &Client) -> Vec<u64> {
    let mut out = vec![0; SHARDS as usize];
    for (_, r) in admin.cluster_status() {
        if let Ok((_, shards)) = r {
            for s in shards {
                out[s.shard as usize] = out[s.shard as usize].max(s.commit);
            }
        }
    }
    out
}

/// The newest manifest any running node's manager reports: (seq, per-shard LSNs).
fn newest_backup(c: &LocalCluster) -> Option<(u64, Vec<u64>)> {
    (0..c.nodes.len())
        .filter_map(|i| {
            let b = c.status_json(i)?["backup"].clone();
            let lsns = b["restorable_lsns"]
                .as_array()?
                .iter()
                .filter_map(|x| x.as_u64())
                .collect();
            Some((b["seq"].as_u64()?, lsns))
        })
        .max()
}

fn restore(
    c: &LocalCluster,
    s3: &S3Server,
    card: &Path,
    label: &str,
    args: &[&str],
    dirs: &[PathBuf],
) -> Output {
    let mut cmd = Command::new(keyfort());
    cmd.args(["restore", "--from", &s3.url(PREFIX), "--token-dir"])
        .arg(card)
        .args(["--label", label])
        .args(args)
        .env("KEYFORT_PIN_FILE", c.pin_file())
        .envs(s3.env());
    for (n, d) in c.nodes.iter().zip(dirs) {
        cmd.arg("--node")
            .arg(format!("{}={}", n.peer_addr, d.display()));
    }
    cmd.output().unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn lsns(v: &serde_json::Value) -> Vec<u64> {
    v["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["lsn"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_cluster_lost_whole_comes_back_from_s3_with_every_backed_up_key() {
    let root = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(
        env!("CARGO_BIN_EXE_keyfort-s3").as_ref(),
        &root.path().join("s3"),
        "backups",
        &[],
    )
    .unwrap();
    for (k, v) in s3.env() {
        std::env::set_var(k, v); // the nodes inherit it
    }
    let mut c = LocalCluster::create(
        &root.path().join("cluster"),
        keyfort(),
        env!("CARGO_BIN_EXE_keyfortd").as_ref(),
        3,
        SHARDS,
        0,
        50,
    )
    .unwrap();
    let url = s3.url(PREFIX);
    c.configure(|v| {
        v["durable_store"] = url.clone().into();
        v["backup_interval_ms"] = 100.into();
        v["compaction_records"] = 1_000_000.into();
        v["manifests_kept"] = 4.into();
    })
    .unwrap();
    // Only node 3 makes snapshots: a manager elsewhere must poll it and fetch them.
    c.configure_node(SNAPSHOT_MAKER, |v| v["compaction_records"] = 50.into())
        .unwrap();
    c.start_all().unwrap();
    let croot = c.root.clone();
    assert!(
        c.wait_for(TIMEOUT, |c| (0..SHARDS).all(|s| c.leader(s).is_some())),
        "no leaders (kept in {})",
        keep(&croot)
    );
    let admin_cred = Credential::read_file(&c.admin_credential(keyfort()).unwrap()).unwrap();
    let admin = connect(&c, &admin_cred);
    let parts: Vec<_> = (0..SHARDS).map(|s| partition_on(&admin, s)).collect();
    let clients: Vec<Client> = parts.iter().map(|(_, cred)| connect(&c, cred)).collect();

    // Keys and envelopes; the manager (shard 0's leader) is SIGKILLed twice meanwhile.
    let mut written = Vec::new(); // (partition index, key id, plaintext, envelope)
    for i in 0..KEYS_PER_PARTITION {
        if i % 20 == 10 {
            if let Some(l) = c.leader(0) {
                c.kill9(l);
                c.start(l).unwrap();
            }
        }
        for (p, client) in clients.iter().enumerate() {
            let k = client.create_key(b"", false).expect("create").key_id;
            let plain = format!("key {i} of partition {p}").into_bytes();
            let (_, env) = client.encrypt(k, AAD, &plain).expect("encrypt");
            written.push((p, k, plain, env));
        }
    }
    // The manager moves off the snapshot maker, which then compacts again: the manager's
    // manifests must carry snapshots it polled for and fetched from node 3.
    // Node 3 starts again only once another node leads: restarted at once it could win the
    // election again (its log is as long as anyone's) and keep shard 0.
    if c.leader(0) == Some(SNAPSHOT_MAKER) {
        c.kill9(SNAPSHOT_MAKER);
        assert!(
            c.wait_for(TIMEOUT, |c| c
                .leader(0)
                .is_some_and(|l| l != SNAPSHOT_MAKER)),
            "no new leader of shard 0 without node 3 (kept in {})",
            keep(&croot)
        );
        c.start(SNAPSHOT_MAKER).unwrap();
    }
    assert!(
        c.wait_for(TIMEOUT, |c| c
            .leader(0)
            .is_some_and(|l| l != SNAPSHOT_MAKER)),
        "shard 0 has no leader besides node 3 (kept in {})",
        keep(&croot)
    );
    let manager = c.leader(0).unwrap();
    for _ in 0..FILLER_KEYS {
        for client in &clients {
            client.create_key(b"filler", false).expect("filler");
        }
    }
    // The manager polled node 3, found its newer snapshot and fetched it.
    assert!(
        c.wait_for(TIMEOUT, |c| c
            .status_json(manager)
            .is_some_and(|v| v["backup"]["fetched_from_peers"]
                .as_u64()
                .is_some_and(|n| n > 0))),
        "the manager (node {}) fetched no snapshot from node 3 (kept in {})",
        manager + 1,
        keep(&croot)
    );
    // The snapshot maker goes down for good: what follows reaches the backup only through the
    // log archive.
    c.kill9(SNAPSHOT_MAKER);
    for i in 0..TAIL_KEYS {
        for (p, client) in clients.iter().enumerate() {
            let k = client
                .create_key(b"tail", false)
                .expect("tail create")
                .key_id;
            let plain = format!("tail key {i} of partition {p}").into_bytes();
            let (_, env) = client.encrypt(k, AAD, &plain).expect("encrypt");
            written.push((p, k, plain, env));
        }
    }
    let target = commits(&admin);
    // No more writes: the log archive alone must bring a manifest to every acknowledged key
    // within seconds (snapshots are made every 50 records, so the newest one lags).
    let t = Instant::now();
    let first_seq = loop {
        if let Some((seq, l)) = newest_backup(&c) {
            if l.len() == target.len() && l.iter().zip(&target).all(|(a, b)| a >= b) {
                break seq;
            }
        }
        assert!(
            t.elapsed() < TIMEOUT,
            "no manifest reaches {target:?} (kept in {})",
            keep(&croot)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "manifest {first_seq} reaches {target:?} {:.1} s after the last write",
        t.elapsed().as_secs_f64()
    );
    c.kill_all();
    for n in &c.nodes {
        std::fs::remove_dir_all(&n.data_dir).unwrap();
    }
    let dirs: Vec<PathBuf> = c.nodes.iter().map(|n| n.data_dir.clone()).collect();

    // Every manifest left behind by managers killed mid-round is complete.
    let out = restore(
        &c,
        &s3,
        &croot.join("node-1/card"),
        "node-1",
        &["--list"],
        &[],
    );
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(listing.lines().count() >= 2, "{listing}");
    assert!(
        listing.lines().all(|l| l.ends_with(": complete")),
        "{listing}"
    );

    // A card of another realm: refused before any snapshot byte is fetched.
    let pins = [
        ("KEYFORT_PIN_FILE", c.pin_file()),
        ("KEYFORT_SO_PIN_FILE", croot.join("so.pin")),
    ];
    let card = |args: &[&str]| {
        let st = Command::new(keyfort())
            .arg("card")
            .args(args)
            .envs(pins.clone())
            .status()
            .unwrap();
        assert!(st.success(), "keyfort card {args:?}");
    };
    let other = root.path().join("other");
    let s = |p: PathBuf| p.to_string_lossy().into_owned();
    card(&[
        "ceremony-kit",
        "--out",
        &s(other.join("kit")),
        "--realm",
        "another-realm",
        "--same-vendor-as",
        &s(croot.join("kit")),
    ]);
    card(&[
        "init",
        "--token-dir",
        &s(other.join("card")),
        "--label",
        "other",
        "--kit",
        &s(other.join("kit")),
    ]);
    let out = restore(&c, &s3, &other.join("card"), "other", &[], &dirs);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("realm") && err.contains("nothing was fetched"),
        "{err}"
    );
    let staged = dirs[0].join(keyfort_tools::restore::RESTORE_STAGING_DIR);
    assert!(
        std::fs::read_dir(&staged).map_or(true, |mut d| d.next().is_none()),
        "fetched into {}",
        staged.display()
    );
    assert!(dirs.iter().all(|d| !d.join("identity").exists()));
    let _ = std::fs::remove_dir_all(&dirs[0]);

    // The restore.
    let r = json(&restore(
        &c,
        &s3,
        &croot.join("node-1/card"),
        "node-1",
        &["--json"],
        &dirs,
    ));
    let seq = r["seq"].as_u64().unwrap();
    let shards = r["shards"].as_array().unwrap().clone();
    let field = |k: &str| -> Vec<u64> { shards.iter().map(|s| s[k].as_u64().unwrap()).collect() };
    let restored = field("restored_lsn");
    assert!(seq >= first_seq);
    assert!(
        restored.iter().zip(&target).all(|(a, b)| a >= b),
        "{restored:?} < {target:?}"
    );
    assert!(
        field("records_replayed").iter().sum::<u64>() > 0,
        "nothing came from the log archive: {r}"
    );
    let new_ids: Vec<u64> = r["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_id"].as_u64().unwrap())
        .collect();
    assert!(
        new_ids.iter().all(|&id| id > 3),
        "new raft ids: {new_ids:?}"
    );
    let store = keyfort_tools::durable::DurableStore::open(&s3.url(PREFIX)).unwrap();
    let manifests =
        futures_lite::future::block_on(keyfort_tools::backup::list_manifests(&store)).unwrap();

    // An older manifest, named: exactly its LSNs (before the restored cluster's retention).
    let (older, _) = manifests
        .iter()
        .find(|(s, _)| *s < seq)
        .expect("an older manifest kept");
    let scratch = |what: &str| -> Vec<PathBuf> {
        (1..=3)
            .map(|i| root.path().join(format!("{what}/n{i}")))
            .collect()
    };
    let o = json(&restore(
        &c,
        &s3,
        &croot.join("node-2/card"),
        "node-2",
        &["--json", "--manifest", &older.to_string()],
        &scratch("older"),
    ));
    assert_eq!(o["seq"].as_u64(), Some(*older));
    assert!(lsns(&o).iter().zip(&restored).all(|(a, b)| a <= b));
    // Pinned to another cluster: refused.
    let out = restore(
        &c,
        &s3,
        &croot.join("node-2/card"),
        "node-2",
        &["--cluster-id", &"ab".repeat(16)],
        &scratch("pinned"),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not the one asked for"));

    // A snapshot object altered in the bucket: refused, naming it; nothing left behind.
    let object = shards[1]["object"].as_str().unwrap().to_string();
    let file = root.path().join("s3/backups").join(PREFIX).join(&object);
    let pristine = std::fs::read(&file).unwrap();
    let mut b = pristine.clone();
    let mid = b.len() / 2;
    b[mid] ^= 0x40;
    std::fs::write(&file, &b).unwrap();
    let bad = scratch("bad");
    let out = restore(
        &c,
        &s3,
        &croot.join("node-3/card"),
        "node-3",
        &["--manifest", &seq.to_string()],
        &bad,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&object) && err.contains("altered or damaged"),
        "{err}"
    );
    assert!(
        bad.iter().all(|d| !d.exists()),
        "a failed restore left data dirs"
    );
    std::fs::write(&file, &pristine).unwrap();

    // The restored cluster.
    c.start_all().unwrap();
    assert!(
        c.wait_for(TIMEOUT, |c| (0..SHARDS).all(|s| c.leader(s).is_some())),
        "restored cluster elects no leaders (kept in {})",
        keep(&croot)
    );
    let admin = connect(&c, &admin_cred);
    let clients: Vec<Client> = parts.iter().map(|(_, cred)| connect(&c, cred)).collect();
    for (p, k, plain, env) in &written {
        let got = clients[*p].decrypt(*k, AAD, env).unwrap_or_else(|e| {
            panic!(
                "key {} of partition {p}: {e} (kept in {})",
                hex(k),
                keep(&croot)
            )
        });
        assert_eq!(&got, plain);
    }
    // Every node reaches the digest the restore announced, under its new id.
    let expected: Vec<String> = shards
        .iter()
        .map(|s| s["new_digest"].as_str().unwrap().to_string())
        .collect();
    assert!(
        c.wait_for(TIMEOUT, |_| {
            let st = admin.cluster_status();
            let ok: Vec<_> = st.iter().filter_map(|(_, r)| r.as_ref().ok()).collect();
            ok.len() == 3
                && ok.iter().all(|(id, sh)| {
                    new_ids.contains(id)
                        && sh.iter().all(|s| {
                            // Past the restore record only no-ops and archive marks, which
                            // leave the digest as it is, until the write below.
                            s.applied > restored[s.shard as usize]
                                && format!("{:032x}", u128::from_le_bytes(s.digest))
                                    == expected[s.shard as usize]
                        })
                })
        }),
        "nodes did not reach the restored state {expected:?} of {restored:?}: {:?} (kept in {})",
        admin
            .cluster_status()
            .into_iter()
            .map(|(_, r)| r.map(|(id, sh)| (
                id,
                sh.iter()
                    .map(|s| (s.applied, hex(&s.digest)))
                    .collect::<Vec<_>>()
            )))
            .collect::<Vec<_>>(),
        keep(&croot)
    );
    let fresh = clients[0]
        .create_key(b"after restore", false)
        .expect("write after restore");
    let (_, env) = clients[0].encrypt(fresh.key_id, AAD, b"new").unwrap();
    assert_eq!(clients[0].decrypt(fresh.key_id, AAD, &env).unwrap(), b"new");
    assert!(
        c.wait_for(TIMEOUT, |_| {
            let st = admin.cluster_status();
            let ok: Vec<_> = st.iter().filter_map(|(_, r)| r.as_ref().ok()).collect();
            ok.len() == 3
                && (0..SHARDS as usize).all(|s| {
                    ok.iter().all(|(_, sh)| {
                        sh[s].digest == ok[0].1[s].digest && sh[s].applied == ok[0].1[s].applied
                    })
                })
        }),
        "digests differ after restore (kept in {})",
        keep(&croot)
    );
    // Every node reports how it recovered: the durable tier, each phase, catch-up done; so
    // does `keyfort cluster status`.
    assert!(
        c.wait_for(TIMEOUT, |_| admin.node_statuses().iter().all(|(_, r)| {
            r.as_ref().is_ok_and(|n| {
                n.recovery.tier == 3
                    && n.recovery.catch_up_ms != keyfort_net::client_proto::RECOVERY_PENDING
            })
        })),
        "recovery not reported (kept in {})",
        keep(&croot)
    );
    let nodes_arg: Vec<String> = c.client_addrs().iter().map(|a| a.to_string()).collect();
    let out = Command::new(keyfort())
        .args(["cluster", "status", "--nodes", &nodes_arg.join(",")])
        .args(c.conn_args())
        .arg("--credential")
        .arg(croot.join("admin.cred"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert_eq!(text.matches(" durable ").count(), 3, "{text}");
    let fences = futures_lite::future::block_on(store.list("fences/")).unwrap();
    assert_eq!(fences.len(), 1, "{fences:?}");
    // The restored cluster backs itself up, continuing the root's manifest sequence.
    assert!(
        c.wait_for(TIMEOUT, |c| newest_backup(c).is_some_and(|(s, _)| s > seq)),
        "the restored cluster writes no manifest (kept in {})",
        keep(&croot)
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
