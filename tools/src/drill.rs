//! `keyfort drill` (issue 7): the disaster-recovery drill anyone can run. It builds a local
//! cluster of three real `keyfortd` processes (one SoftHSM card each, [`LocalCluster`]), loads
//! it, causes each tier's fault and times the recovery, then checks the keys after every step.
//!
//! 1. **Load.** Node 1's config carries `bulk_load` (`keyfort_bench::bulk`): `--keys` real keys
//!    made in its card and proposed through raft in batches (`in_flight` 1024), in `--partitions`
//!    partitions. The load is **create-only** for now: the snapshot issue's churn mix (updates
//!    and deletes beside the creates) would need a churn option in keyfortd's `bulk_load` config,
//!    which the loader does not have yet. Compaction is off while loading
//!    (`compaction_records` = [`NO_COMPACTION`]), so every node holds the whole log and no
//!    snapshot.
//! 2. **(d) full replay**, the old way: a node that leads no shard is SIGKILLed and started again;
//!    with no snapshot it replays its whole WBL. Timed like (a).
//! 3. Every node is stopped (SIGTERM) and started with compaction on (`--compaction-records`,
//!    default half a shard's keys) and the durable store set; the drill waits until every node
//!    holds a snapshot of every shard at or above the loaded LSN.
//! 4. **(a) local**: a node leading no shard is SIGKILLed and started again (snapshot + log).
//! 5. **(b) peer**: a node leading no shard is SIGKILLed and its data dir removed (its card and
//!    config stay); started again it joins as a new member with a new raft id.
//!
//!    (a), (b) and (d) are timed from the fault (just before the SIGKILL) until the node's
//!    `status.json` shows, on every shard, the commit index the cluster had before the fault
//!    applied with the same state digest as the cluster at that index, and the node itself
//!    answers a linearizable read (a key describe sent to its own client port).
//! 6. **(c) durable**: the snapshot manager (on the shard-0 leader, `durable_store` in the
//!    config) uploads snapshots and manifests, and the shard leaders archive committed log
//!    ranges, to a `keyfort-s3` server the drill runs on 127.0.0.1. Once the newest manifest
//!    covers the loaded LSN of every shard, a client creates keys one after another for
//!    [`WRITES_BEFORE_DISASTER`] and goes on while every node is SIGKILLed and every data dir
//!    removed (the cards stay). Timed from the start of `keyfort restore` (new data dirs at the
//!    same paths, so the old configs serve) through starting the three nodes until every node
//!    reports the digests the restore announced (snapshot + archived ranges), a linearizable
//!    read and a key create succeeded through the client protocol, and every node agrees. The
//!    restore's per-shard snapshot digest is compared with the old cluster's own snapshot file
//!    at that LSN, from any node, read before the disaster (`manifest_digest_match`: null when
//!    no node still held it).
//!
//!    `rpo_s` is measured on the writer's keys: the time from the first acknowledged key the
//!    restored cluster lacks to the disaster (0 when none is lost). The newest manifest's age
//!    at the disaster (`manifest_age_s`, what the RPO would be without the log archive) and the
//!    LSNs committed but not restored (`lsns_lost`) are reported beside it.
//! 7. **After every step** (timed separately, `verify_s`): every node's applied index and digest
//!    agree per shard; on the recovered node, every partition's keys are listed through the
//!    client protocol and every loaded key id (they are deterministic: `bulk_key_header`) must
//!    be there (`verified_keys` counts them); `--sample` keys spread over the partitions encrypt
//!    and then decrypt on that node (`used_keys`).
//!
//! Beside the tiers the same run measures the disk's sequential read bandwidth
//! (`keyfort_bench::disk`, O_DIRECT over io_uring, a fresh file of `--probe-mib`) and the S3
//! server's GET bandwidth (an object of `--probe-mib` fetched with the durable store), and
//! reports each restore's bytes per second against them. Goals (issue 7; reported, never
//! asserted): local ≤ 0.5 s, peer ≤ 1 s, durable ≤ 2 s, each ≥ 10× faster than the full replay,
//! RPO ≤ 5 s.

use keyfort_bench::bulk::{bulk_key_header, bulk_partition};
use keyfort_bench::local_cluster::{LocalCluster, Security};
use keyfort_net::client::{Client, ClientError, ClientOptions, Credential};
use keyfort_net::client_proto::{ErrorCode, Request, Response, MAX_LIST_KEYS};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, clap::Args)]
pub struct DrillArgs {
    /// Keys to load before the faults.
    #[arg(long, default_value_t = 1_000_000)]
    pub keys: u64,
    /// Scratch directory (cards, data dirs, the S3 server's files); removed first.
    #[arg(long, default_value = "target/drill")]
    pub dir: PathBuf,
    #[arg(long, default_value_t = 2)]
    pub shards: u32,
    /// Partitions the keys are spread over.
    #[arg(long, default_value_t = 100)]
    pub partitions: u32,
    /// Keys encrypted and decrypted on the recovered node after each step.
    #[arg(long, default_value_t = 1000)]
    pub sample: u64,
    /// Records past the newest snapshot that trigger a compaction once the load is done
    /// (default: half of one shard's keys, so one snapshot covers the load).
    #[arg(long)]
    pub compaction_records: Option<u64>,
    /// Size of the disk read and S3 GET probes, MiB.
    #[arg(long, default_value_t = 256)]
    pub probe_mib: u64,
    /// Plaintext on 127.0.0.1 instead of TLS between the nodes and to them.
    #[arg(long)]
    pub insecure_loopback: bool,
    /// Skip the durable tier (c) and the S3 server.
    #[arg(long)]
    pub no_durable: bool,
    /// Print the results as one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also write the results JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `compaction_records` while loading: no snapshot is made, the log keeps everything.
pub const NO_COMPACTION: u64 = 1 << 50;
const NODES: u64 = 3;
/// keyfortd's `status_ms` in the drill: recovery is read off `status.json`.
const STATUS_MS: u64 = 10;
/// Longest any step (a recovery, a settle, a verification) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest the load may take (1M keys take ~3 minutes on 2 cores).
const LOAD_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long the manager gets to upload a manifest covering the load.
const BACKUP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a client writes before the disaster (the RPO is measured on its keys).
const WRITES_BEFORE_DISASTER: Duration = Duration::from_secs(3);
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// S3 bucket and credentials of the drill's own `keyfort-s3` (127.0.0.1 only).
const BUCKET: &str = "keyfort-drill";
/// Prefix of every object the drill's cluster writes in the bucket.
const PREFIX: &str = "backups";
const AAD: &[u8] = b"keyfort drill";

fn say(msg: impl AsRef<str>) {
    eprintln!("drill: {}", msg.as_ref());
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn client_err(e: ClientError) -> String {
    e.to_string()
}

pub fn run(args: DrillArgs) -> crate::CmdResult {
    let result = drill(&args)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&result).map_err(|e| e.to_string())?
        );
    } else {
        print_table(&result);
    }
    if let Some(out) = &args.out {
        keyfort_bench::write_json(out, &result).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    Ok(())
}

/// The drill's own S3 server (`keyfort-s3` beside the `keyfort` executable); killed on drop.
struct S3Server {
    child: Child,
    url: String,
}

impl S3Server {
    fn start(exe: &Path, root: &Path) -> Result<S3Server, String> {
        let bin = exe.with_file_name("keyfort-s3");
        std::fs::create_dir_all(root).map_err(|e| format!("{}: {e}", root.display()))?;
        let (access, secret) = (
            format!("drill{:08x}", rand::random::<u32>()),
            crate::cluster_cmd::hex(&rand::random::<[u8; 16]>()),
        );
        let mut child = Command::new(&bin)
            .args(["--listen", "127.0.0.1:0", "--root"])
            .arg(root)
            .args([
                "--bucket",
                BUCKET,
                "--access-key",
                &access,
                "--secret-key",
                &secret,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!(
                    "{}: {e} (build it with `cargo build --release -p keyfort-tools`, or run the \
                     drill with --no-durable)",
                    bin.display()
                )
            })?;
        let stdout = child.stdout.take().ok_or("keyfort-s3: no stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| format!("keyfort-s3: {e}"))?;
        let Some(addr) = line.trim().strip_prefix("keyfort-s3 listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("keyfort-s3 did not start (said {:?})", line.trim()));
        };
        // The nodes and `keyfort restore` inherit these (their S3 client reads the env).
        std::env::set_var("AWS_ACCESS_KEY_ID", access);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", secret);
        Ok(S3Server {
            child,
            url: format!("s3://{BUCKET}/{PREFIX}?endpoint=http://{addr}"),
        })
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sequential read bandwidth of this disk: a fresh `mib` MiB file, written and synced, then
/// read with O_DIRECT (`keyfort_bench::disk`). Recently written, like the snapshots the
/// restores read (the VM's disk backend caches on the host: see `disk.rs`).
fn disk_read_gb_per_s(dir: &Path, mib: u64) -> Result<f64, String> {
    let path = dir.join("disk-probe.bin");
    let io = |e: std::io::Error| format!("{}: {e}", path.display());
    {
        let mut f = std::fs::File::create(&path).map_err(io)?;
        let block: Vec<u8> = (0..1 << 20).map(|_| rand::random::<u8>()).collect();
        for _ in 0..mib {
            f.write_all(&block).map_err(io)?;
        }
        f.sync_all().map_err(io)?;
    }
    let gbps =
        keyfort_bench::disk::sequential_read_gb_per_s(std::slice::from_ref(&path)).map_err(io)?;
    std::fs::remove_file(&path).map_err(io)?;
    Ok(gbps)
}

/// GET bandwidth of the S3 server: a `mib` MiB object put once, then fetched to a file with
/// the durable store the snapshot manager and `keyfort restore` use.
fn s3_get_gb_per_s(url: &str, dir: &Path, mib: u64) -> Result<f64, String> {
    use crate::durable::{DurableStore, FetchOptions};
    let src = dir.join("s3-probe.bin");
    let dest = dir.join("s3-probe.fetched");
    let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    {
        let mut f = std::fs::File::create(&src).map_err(|e| io(&src, e))?;
        let block: Vec<u8> = (0..1 << 20).map(|_| rand::random::<u8>()).collect();
        for _ in 0..mib {
            f.write_all(&block).map_err(|e| io(&src, e))?;
        }
    }
    let store = DurableStore::open(url).map_err(|e| format!("durable store {url}: {e}"))?;
    let key = format!("drill/probe-{:016x}", rand::random::<u64>());
    futures_lite::future::block_on(store.put_file_create(&key, &src))
        .map_err(|e| format!("S3 probe put: {e}"))?;
    let r = futures_lite::future::block_on(store.get_to_file(&key, &dest, FetchOptions::default()))
        .map_err(|e| format!("S3 probe get: {e}"))?;
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&dest);
    Ok(r.bytes as f64 / r.elapsed.as_secs_f64() / 1e9)
}

/// What one step's key check found.
struct Verified {
    seconds: f64,
    keys: u64,
    used: u64,
}

struct Drill {
    c: LocalCluster,
    keyfort: PathBuf,
    keys: u64,
    partitions: u32,
    sample: u64,
    opts: ClientOptions,
    /// One client per bulk partition (index = partition number).
    clients: Vec<Client>,
    /// Per shard, the raft index of the last loaded record.
    loaded: Vec<u64>,
}

/// Per shard (applied index, digest) of a settled node.
type Target = Vec<(u64, String)>;

impl Drill {
    fn wait(&self, what: &str, f: impl FnMut(&LocalCluster) -> bool) -> Result<(), String> {
        if self.c.wait_for(STEP_TIMEOUT, f) {
            Ok(())
        } else {
            Err(format!("drill: {what}: not within {STEP_TIMEOUT:?}"))
        }
    }

    /// Every running node applied the same index with the same digest on every shard, at
    /// least the loaded index; `snapshots`: and holds a snapshot at or above it.
    fn settled(&self, snapshots: bool) -> bool {
        let st: Vec<_> = (0..self.c.nodes.len())
            .filter(|&i| self.c.nodes[i].child.is_some())
            .map(|i| self.c.status(i))
            .collect();
        let Some(Some(first)) = st.first() else {
            return false;
        };
        st.iter().all(|s| {
            s.as_ref().is_some_and(|s| {
                s.iter().zip(first).zip(&self.loaded).all(|((a, b), l)| {
                    a.applied >= *l
                        && a.applied == b.applied
                        && a.digest == b.digest
                        && (!snapshots || a.snapshot >= *l)
                })
            })
        })
    }

    /// The settled state every node but `victim` agrees on, per shard.
    fn target(&self, victim: usize) -> Result<Target, String> {
        self.wait("settle before the fault", |_| self.settled(false))?;
        let other = (0..self.c.nodes.len())
            .find(|&i| i != victim)
            .ok_or("one node only")?;
        let st = self.c.status(other).ok_or("no status")?;
        Ok(st.iter().map(|s| (s.applied, s.digest.clone())).collect())
    }

    /// Whether `victim` applied the target on every shard with the digest the cluster has at
    /// the index it applied.
    fn caught_up(&self, victim: usize, target: &Target) -> bool {
        let Some(st) = self.c.status(victim) else {
            return false;
        };
        let others: Vec<_> = (0..self.c.nodes.len())
            .filter(|&i| i != victim)
            .filter_map(|i| self.c.status(i))
            .collect();
        st.iter().enumerate().all(|(s, v)| {
            let (lsn, digest) = &target[s];
            v.applied >= *lsn
                && if v.applied == *lsn {
                    v.digest == *digest
                } else {
                    others
                        .iter()
                        .any(|o| o[s].applied == v.applied && o[s].digest == v.digest)
                }
        })
    }

    /// A linearizable read answered by node `i` itself (a bulk key's describe on its port).
    fn read_on(&self, i: usize) -> Result<(), String> {
        let h = bulk_key_header(0, self.partitions);
        match self.clients[0].call_on(i, &Request::KeyDescribe { key_id: h.key_id.0 }) {
            Ok(Response::Described { versions, .. }) if !versions.is_empty() => Ok(()),
            other => Err(format!(
                "drill: read of key 0 on node {}: {other:?}",
                self.c.nodes[i].id
            )),
        }
    }

    /// Times a node's recovery: `fault` (a SIGKILL, with or without the disk) just after the
    /// clock starts, the node started again, until it caught up and answered a read itself.
    fn time_recovery(&mut self, victim: usize, wipe: bool) -> Result<(f64, Value), String> {
        let target = self.target(victim)?;
        let old_id = self.c.node_id(victim).unwrap_or(0);
        let t0 = Instant::now();
        if wipe {
            self.c.wipe(victim)?;
        } else {
            self.c.kill9(victim);
            // The dead process's last status must not read as the new one's.
            let status = self.c.nodes[victim].data_dir.join("status.json");
            std::fs::remove_file(&status).map_err(|e| format!("{}: {e}", status.display()))?;
        }
        self.c.start(victim)?;
        let caught = loop {
            if self.c.exited(victim).is_some() {
                return Err(format!(
                    "drill: node {} exited while recovering (see {})",
                    self.c.nodes[victim].id,
                    self.c.nodes[victim]
                        .data_dir
                        .with_file_name("keyfortd.log")
                        .display()
                ));
            }
            let renamed = !wipe || self.c.node_id(victim).is_some_and(|id| id != old_id);
            if renamed && self.caught_up(victim, &target) {
                break t0.elapsed();
            }
            if t0.elapsed() > STEP_TIMEOUT {
                return Err(format!("drill: recovery not within {STEP_TIMEOUT:?}"));
            }
            std::thread::sleep(keyfort_bench::local_cluster::STATUS_POLL / 10);
        };
        self.read_on(victim)?;
        let total = t0.elapsed();
        let st = self.c.status(victim).ok_or("no status")?;
        let snapshot_bytes = snapshot_bytes(&self.c.nodes[victim].data_dir, self.c.shards);
        Ok((
            secs(total),
            json!({
                "node": self.c.nodes[victim].id,
                "old_node_id": old_id,
                "new_node_id": self.c.node_id(victim),
                "target_lsns": target.iter().map(|t| t.0).collect::<Vec<_>>(),
                "caught_up_s": secs(caught),
                "read_answered_s": secs(total),
                "snapshot_lsns": st.iter().map(|s| s.snapshot).collect::<Vec<_>>(),
                "snapshot_bytes": snapshot_bytes,
            }),
        ))
    }

    /// Every node agrees; on node `i`, every loaded key is listed and the sample encrypts and
    /// decrypts.
    fn verify(&self, i: usize) -> Result<Verified, String> {
        let t = Instant::now();
        self.wait("digests agree after the step", |_| self.settled(false))?;
        let p = u64::from(self.partitions);
        let mut found = 0u64;
        for (part, client) in self.clients.iter().enumerate() {
            let mut want: HashSet<[u8; 16]> = (part as u64..self.keys)
                .step_by(p as usize)
                .map(|j| bulk_key_header(j, self.partitions).key_id.0)
                .collect();
            let n = want.len() as u64;
            let mut after = None;
            loop {
                let req = Request::KeyList {
                    after,
                    limit: MAX_LIST_KEYS,
                };
                let (keys, more) = match client.call_on(i, &req) {
                    Ok(Response::Listed { keys, more }) => (keys, more),
                    other => return Err(format!("drill: list partition {part}: {other:?}")),
                };
                for (id, _) in &keys {
                    want.remove(id);
                }
                after = keys.last().map(|k| k.0);
                if !more || after.is_none() {
                    break;
                }
            }
            if let Some(missing) = want.iter().next() {
                return Err(format!(
                    "drill: node {}: {} of partition {part}'s {n} keys not listed (e.g. {})",
                    self.c.nodes[i].id,
                    want.len(),
                    crate::cluster_cmd::hex(missing)
                ));
            }
            found += n;
        }
        let sample = self.sample.min(self.keys);
        let used: Result<Vec<u64>, String> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4u64)
                .map(|th| {
                    s.spawn(move || {
                        let mut n = 0;
                        for k in (th..sample).step_by(4) {
                            let j = k * self.keys / sample.max(1);
                            self.use_key(i, j)?;
                            n += 1;
                        }
                        Ok(n)
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().unwrap_or_else(|_| Err("a thread panicked".into())))
                .collect()
        });
        Ok(Verified {
            seconds: secs(t.elapsed()),
            keys: found,
            used: used?.iter().sum(),
        })
    }

    /// Bulk key `j` encrypts and its envelope decrypts, both on node `i`.
    fn use_key(&self, i: usize, j: u64) -> Result<(), String> {
        let h = bulk_key_header(j, self.partitions);
        let client = &self.clients[(j % u64::from(self.partitions)) as usize];
        let plaintext = format!("drill key {j}").into_bytes();
        let what = |r: &dyn std::fmt::Debug| {
            format!("drill: key {j} on node {}: {r:?}", self.c.nodes[i].id)
        };
        let envelope = match client.call_on(
            i,
            &Request::Encrypt {
                key_id: h.key_id.0,
                aad: AAD.to_vec(),
                plaintext: plaintext.clone(),
            },
        ) {
            Ok(Response::Encrypted { envelope, .. }) => envelope,
            other => return Err(what(&other)),
        };
        match client.call_on(
            i,
            &Request::Decrypt {
                key_id: h.key_id.0,
                aad: AAD.to_vec(),
                envelope,
            },
        ) {
            Ok(Response::Decrypted { plaintext: p }) if p == plaintext => Ok(()),
            other => Err(what(&other)),
        }
    }

    /// An admin client for the cluster whose config is `cluster_config`, and one client per
    /// bulk partition with a credential it issues.
    fn connect(&mut self, cluster_config: &Path) -> Result<(), String> {
        let cred_file = self.c.root.join("drill-admin.cred");
        self.c
            .admin_credential_for(&self.keyfort, cluster_config, &cred_file)?;
        let admin = Credential::read_file(&cred_file).map_err(client_err)?;
        let admin =
            Client::connect(self.c.client_addrs(), admin, self.opts.clone()).map_err(client_err)?;
        self.clients = (0..self.partitions)
            .map(|p| {
                let cred = admin
                    .issue_credential(bulk_partition(p).0)
                    .map_err(client_err)?;
                Client::connect(self.c.client_addrs(), cred, self.opts.clone()).map_err(client_err)
            })
            .collect::<Result<_, _>>()?;
        Ok(())
    }
}

/// A tier recovered by one node.
#[derive(Clone, Copy, PartialEq)]
enum Tier {
    FullReplay,
    Local,
    Peer,
}

impl Tier {
    fn name(self) -> &'static str {
        match self {
            Tier::FullReplay => "full_replay",
            Tier::Local => "local",
            Tier::Peer => "peer",
        }
    }

    fn fault(self) -> &'static str {
        match self {
            Tier::FullReplay => "kill -9, restart, whole WBL replayed (no snapshot)",
            Tier::Local => "kill -9, restart from snapshot + log",
            Tier::Peer => "kill -9, data dir removed, rejoin as a new member",
        }
    }
}

impl Drill {
    /// One node's fault and recovery on a node that leads no shard, then the key check;
    /// pushes the step's JSON and returns its seconds and the node's snapshot bytes after it.
    fn node_step(&mut self, steps: &mut Vec<Value>, tier: Tier) -> Result<(f64, u64), String> {
        let victim = self.c.follower().ok_or("no follower")?;
        say(format!(
            "{}: node {}: {}",
            tier.name(),
            self.c.nodes[victim].id,
            tier.fault()
        ));
        let (seconds, detail) = self.time_recovery(victim, tier == Tier::Peer)?;
        let snapshots = detail["snapshot_lsns"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if (tier == Tier::FullReplay) != snapshots.iter().all(|l| l.as_u64() == Some(0)) {
            return Err(format!(
                "drill: {} recovered over snapshots at {snapshots:?}",
                tier.name()
            ));
        }
        let v = self.verify(victim)?;
        say(format!(
            "{}: {seconds:.3} s; then {} keys listed and {} used in {:.1} s",
            tier.name(),
            v.keys,
            v.used,
            v.seconds
        ));
        let bytes = detail["snapshot_bytes"].as_u64().unwrap_or(0);
        steps.push(step_json(tier.name(), tier.fault(), seconds, detail, &v));
        Ok((seconds, bytes))
    }
}

/// Bytes of the newest snapshot file of every shard in `data_dir`.
fn snapshot_bytes(data_dir: &Path, shards: u32) -> u64 {
    (0..shards)
        .filter_map(|s| {
            std::fs::read_dir(crate::cluster_cmd::shard_snapshot_dir(data_dir, s))
                .ok()?
                .filter_map(|e| e.ok())
                .filter_map(|e| Some((e.file_name(), e.metadata().ok()?.len())))
                .max()
                .map(|(_, len)| len)
        })
        .sum()
}

fn step_json(tier: &str, fault: &str, seconds: f64, detail: Value, v: &Verified) -> Value {
    json!({
        "tier": tier,
        "fault": fault,
        "seconds": seconds,
        "detail": detail,
        "verify_s": v.seconds,
        "verified_keys": v.keys,
        "used_keys": v.used,
    })
}

fn drill(args: &DrillArgs) -> Result<Value, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let keyfortd = exe.with_file_name("keyfortd");
    if std::env::var_os("RUST_LOG").is_none() {
        // The nodes log their recovery, join and restore phases (node-N/keyfortd.log).
        std::env::set_var(
            "RUST_LOG",
            "warn,keyfort_tools=info,keyfort_net=info,keyfort_engine=info",
        );
    }
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir).map_err(|e| format!("{}: {e}", args.dir.display()))?;
    let started = Instant::now();
    let disk_gbps = disk_read_gb_per_s(&args.dir, args.probe_mib)?;
    say(format!("disk sequential read: {disk_gbps:.2} GB/s"));
    let s3 = if args.no_durable {
        None
    } else {
        Some(S3Server::start(&exe, &args.dir.join("s3"))?)
    };
    let s3_gbps = match &s3 {
        Some(s) => {
            let g = s3_get_gb_per_s(&s.url, &args.dir, args.probe_mib)?;
            say(format!("S3 GET: {g:.2} GB/s ({})", s.url));
            Some(g)
        }
        None => None,
    };

    let c = LocalCluster::create_with(
        &args.dir.join("cluster"),
        &exe,
        &keyfortd,
        NODES,
        args.shards,
        0,
        crate::node::DEFAULT_TICK_MS,
        if args.insecure_loopback {
            Security::InsecureLoopback
        } else {
            Security::Tls
        },
    )?;
    let tls = c.client_tls()?;
    c.configure(|v| {
        v["compaction_records"] = json!(NO_COMPACTION);
        v["status_ms"] = json!(STATUS_MS);
    })?;
    c.configure_node(0, |v| {
        v["bulk_load"] = json!({
            "keys": args.keys, "partitions": args.partitions,
            "in_flight": 1024, "card_threads": 2,
        });
    })?;
    let mut d = Drill {
        c,
        keyfort: exe.clone(),
        keys: args.keys,
        partitions: args.partitions,
        sample: args.sample,
        opts: ClientOptions {
            request_timeout: CLIENT_TIMEOUT,
            tls,
            ..ClientOptions::default()
        },
        clients: Vec::new(),
        loaded: Vec::new(),
    };
    d.c.start_all()?;
    let load = load(&mut d.c, args.keys)?;
    d.loaded = load["last_index"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    // A restart of node 1 must not load again.
    d.c.configure_node(0, |v| {
        if let Some(o) = v.as_object_mut() {
            o.remove("bulk_load");
        }
    })?;
    d.wait("every node applies the load", |_| d.settled(false))?;
    d.connect(&d.c.cluster_config_file())?;
    let mut steps = Vec::new();

    // (d) full replay: no snapshot anywhere yet.
    let (full_replay_s, _) = d.node_step(&mut steps, Tier::FullReplay)?;

    // Snapshots on: every node restarted with compaction (and the durable store).
    let per_shard = d.loaded.iter().copied().min().unwrap_or(1);
    let records = args.compaction_records.unwrap_or((per_shard / 2).max(1));
    let store = s3.as_ref().map(|s| s.url.clone());
    d.c.configure(|v| {
        v["compaction_records"] = json!(records);
        if let Some(url) = &store {
            v["durable_store"] = json!(url);
        }
    })?;
    let t = Instant::now();
    for i in 0..d.c.nodes.len() {
        if d.c.sigterm(i, Duration::from_secs(30)).is_none() {
            d.c.kill9(i);
        }
    }
    d.c.start_all()?;
    d.wait("a snapshot of every shard on every node", |_| {
        d.settled(true)
    })?;
    say(format!(
        "snapshots of every shard on every node ({records} records per compaction) after {:.1} s",
        secs(t.elapsed())
    ));

    let (local_s, local_bytes) = d.node_step(&mut steps, Tier::Local)?;
    let (peer_s, peer_bytes) = d.node_step(&mut steps, Tier::Peer)?;

    // (c) durable.
    let mut durable = None;
    if let Some(s3) = &s3 {
        let (s, rpo, detail, v) = durable_step(&mut d, &s3.url)?;
        say(format!(
            "(c) {s:.3} s; verified in {:.1} s; RPO {rpo:.3} s",
            v.seconds
        ));
        durable = Some((s, rpo, detail["fetched_bytes"].as_u64().unwrap_or(0)));
        steps.push(step_json(
            "durable",
            "every node killed and every data dir removed; keyfort restore from S3",
            s,
            detail,
            &v,
        ));
    }
    d.c.kill_all();

    let verified = steps
        .iter()
        .filter_map(|s| s["verified_keys"].as_u64())
        .min()
        .unwrap_or(0);
    let gbps = |bytes: u64, s: f64| (s > 0.0).then(|| bytes as f64 / s / 1e9);
    let speedup = |s: f64| (s > 0.0).then(|| full_replay_s / s);
    let (durable_s, rpo_s, durable_bytes) = match durable {
        Some((s, r, b)) => (Some(s), Some(r), b),
        None => (None, None, 0),
    };
    let (local_gbps, peer_gbps) = (gbps(local_bytes, local_s), gbps(peer_bytes, peer_s));
    let durable_gbps = durable_s.and_then(|s| gbps(durable_bytes, s));
    let ten_x = [local_s, peer_s, durable_s.unwrap_or(f64::INFINITY)]
        .iter()
        .all(|s| s * 10.0 <= full_replay_s);
    Ok(json!({
        "benchmark": "drill",
        "command": format!(
            "keyfort drill {}",
            std::env::args().skip(2).collect::<Vec<_>>().join(" ")
        ),
        "machine": keyfort_bench::machine(),
        "keys": args.keys,
        "load": {
            "mix": "create-only (no churn option in the bulk loader yet)",
            "partitions": args.partitions,
            "shards": args.shards,
            "nodes": NODES,
            "bulk_load": load,
            "compaction_records_after_load": records,
        },
        "local_s": local_s,
        "peer_s": peer_s,
        "durable_s": durable_s,
        "full_replay_s": full_replay_s,
        "rpo_s": rpo_s,
        "disk_read_gb_per_s": disk_gbps,
        "s3_get_gb_per_s": s3_gbps,
        "verified_keys": verified,
        // Snapshot bytes over the whole recovery time (not only its read or fetch phase).
        "throughput_gb_per_s": {
            "local_snapshot_read": local_gbps,
            "peer_snapshot_streamed": peer_gbps,
            "durable_fetched": durable_gbps,
        },
        "throughput_vs_reference": {
            "local_vs_disk_read": local_gbps.map(|g| g / disk_gbps),
            "peer_vs_disk_read": peer_gbps.map(|g| g / disk_gbps),
            "durable_vs_s3_get": durable_gbps.zip(s3_gbps).map(|(g, s)| g / s),
        },
        "speedup_vs_full_replay": {
            "local": speedup(local_s),
            "peer": speedup(peer_s),
            "durable": durable_s.and_then(speedup),
        },
        "goals": {
            "local_le_0_5_s": local_s <= 0.5,
            "peer_le_1_s": peer_s <= 1.0,
            "durable_le_2_s": durable_s.map(|s| s <= 2.0),
            "each_10x_faster_than_full_replay": ten_x,
            "rpo_le_5_s": rpo_s.map(|r| r <= 5.0),
        },
        "steps": steps,
        "drill_total_s": secs(started.elapsed()),
    }))
}

/// Waits for node 1's bulk load; returns its report.
fn load(c: &mut LocalCluster, keys: u64) -> Result<Value, String> {
    say(format!(
        "loading {keys} keys through raft (node 1's card, bulk loader)..."
    ));
    let dir = &c.nodes[0].data_dir;
    let (report, error) = (dir.join("bulk-load.json"), dir.join("bulk-load.error"));
    let t = Instant::now();
    let mut last = Instant::now();
    while !report.exists() {
        if let Ok(e) = std::fs::read_to_string(&error) {
            return Err(format!("drill: bulk load failed: {e}"));
        }
        if let Some(i) = (0..c.nodes.len()).find(|&i| c.exited(i).is_some()) {
            return Err(format!(
                "drill: node {} exited during the load",
                c.nodes[i].id
            ));
        }
        if t.elapsed() > LOAD_TIMEOUT {
            return Err(format!("drill: bulk load not done in {LOAD_TIMEOUT:?}"));
        }
        if last.elapsed() >= PROGRESS_EVERY {
            let commits: Vec<u64> = (0..c.shards).map(|s| c.max_commit(s)).collect();
            say(format!(
                "  {:.0} s: commit index per shard {commits:?}",
                secs(t.elapsed())
            ));
            last = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(&report).map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    say(format!(
        "loaded {keys} keys in {:.1} s ({:.0} keys/s)",
        v["total_s"].as_f64().unwrap_or(0.0),
        v["keys_per_s"].as_f64().unwrap_or(0.0)
    ));
    Ok(v)
}

/// The manager node's `backup` status (the newest manifest it uploaded), if any node has one.
fn backup_status(c: &LocalCluster) -> Option<Value> {
    (0..c.nodes.len())
        .filter_map(|i| c.status_json(i))
        .map(|v| v["backup"].clone())
        .filter(|b| b.is_object())
        .max_by_key(|b| b["seq"].as_u64().unwrap_or(0))
}

/// Per shard, the digest of every snapshot file any node of the old cluster holds, by LSN
/// (every check but the MAC): what the restored snapshots are compared with.
fn snapshot_digests(c: &LocalCluster, shards: u32) -> Vec<std::collections::BTreeMap<u64, String>> {
    use keyfort_engine::snapshot::{list, Snapshot};
    (0..shards)
        .map(|s| {
            let mut out = std::collections::BTreeMap::new();
            for n in &c.nodes {
                let dir = crate::cluster_cmd::shard_snapshot_dir(&n.data_dir, s);
                for (lsn, path) in list(&dir).unwrap_or_default() {
                    if let Ok(snap) = Snapshot::open_without_mac(&path) {
                        out.insert(lsn, snap.digest().to_string());
                    }
                }
            }
            out
        })
        .collect()
}

/// Keys a client acknowledged while the disaster came: (ack time in unix ms, key id).
type Acked = Vec<(u64, [u8; 16])>;

/// Creates keys one after another through partition `part`'s client until `stop`; returns
/// every acknowledged one with its acknowledgement time (errors are the disaster's: ignored).
fn writer(client: &Client, stop: &std::sync::atomic::AtomicBool) -> Acked {
    let mut acked = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if let Ok(w) = client.create_key(b"drill: written as the disaster comes", false) {
            acked.push((unix_ms(), w.key_id));
        }
    }
    acked
}

/// (c): waits for a manifest covering the load; a client then creates keys for
/// [`WRITES_BEFORE_DISASTER`] and goes on while every node is SIGKILLed and every data dir
/// removed; restores; times until the new cluster serves a read and a write with every node at
/// the restore's announced digests. The RPO is measured on the writer's keys: the time from the
/// first acknowledged key the restored cluster lacks to the disaster (0: none lost).
fn durable_step(d: &mut Drill, url: &str) -> Result<(f64, f64, Value, Verified), String> {
    say("(c) durable: waiting for a manifest covering the load");
    let covered = |b: &Value| {
        b["lsns"].as_array().is_some_and(|l| {
            l.len() == d.loaded.len()
                && l.iter()
                    .zip(&d.loaded)
                    .all(|(a, want)| a.as_u64() >= Some(*want))
        })
    };
    if !d.c.wait_for(BACKUP_TIMEOUT, |c| {
        backup_status(c).is_some_and(|b| covered(&b))
    }) {
        return Err(format!(
            "drill: (c) no manifest covering LSNs {:?} within {BACKUP_TIMEOUT:?} (last backup \
             status: {:?})",
            d.loaded,
            backup_status(&d.c)
        ));
    }
    d.wait("settle before the disaster", |_| d.settled(true))?;
    let backup = backup_status(&d.c).ok_or("no backup status")?;
    let old_digests = snapshot_digests(&d.c, d.c.shards);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (acked, disaster_ms, commits) = std::thread::scope(|sc| {
        let w = sc.spawn(|| writer(&d.clients[1 % d.clients.len()], &stop));
        std::thread::sleep(WRITES_BEFORE_DISASTER);
        let commits: Vec<u64> = (0..d.c.shards).map(|s| d.c.max_commit(s)).collect();
        let disaster_ms = unix_ms();
        d.c.kill_all();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (w.join().unwrap_or_default(), disaster_ms, commits)
    });
    let manifest_age_s =
        disaster_ms.saturating_sub(backup["uploaded_unix_ms"].as_u64().unwrap_or(0)) as f64 / 1e3;
    for n in &d.c.nodes {
        std::fs::remove_dir_all(&n.data_dir)
            .map_err(|e| format!("{}: {e}", n.data_dir.display()))?;
    }
    say(format!(
        "(c) a client wrote {} keys, then every node was killed and every data dir removed; \
         newest manifest {} (seq {}) {manifest_age_s:.3} s old",
        acked.len(),
        backup["manifest"],
        backup["seq"]
    ));

    let t0 = Instant::now();
    let mut restore = Command::new(&d.keyfort);
    restore
        .args(["restore", "--from", url, "--token-dir"])
        .arg(d.c.root.join("node-1/card"))
        .args(["--label", "node-1", "--json"])
        .env("KEYFORT_PIN_FILE", d.c.pin_file());
    if d.c.ca_file().is_some() {
        restore.arg("--tls-dir").arg(d.c.tls_dir());
    }
    for n in &d.c.nodes {
        restore
            .arg("--node")
            .arg(format!("{}={}", n.peer_addr, n.data_dir.display()));
    }
    let out = restore
        .output()
        .map_err(|e| format!("keyfort restore: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "drill: keyfort restore failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let restore_s = secs(t0.elapsed());
    let restored: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("keyfort restore --json: {e}"))?;
    let shards = restored["shards"].as_array().cloned().unwrap_or_default();
    let field = |k: &str| -> Vec<Value> { shards.iter().map(|s| s[k].clone()).collect() };
    let (restored_lsns, announced) = (field("restored_lsn"), field("new_digest"));
    d.c.start_all()?;
    // Every node reaches the digests the restore announced (before the drill writes).
    d.wait("restored nodes at the announced digests", |c| {
        (0..c.nodes.len()).all(|i| {
            c.status(i).is_some_and(|st| {
                st.iter()
                    .zip(&announced)
                    .zip(&restored_lsns)
                    .all(|((s, want), lsn)| {
                        Some(s.digest.as_str()) == want.as_str() && Some(s.applied) >= lsn.as_u64()
                    })
            })
        })
    })?;
    // The old credentials are tried first; they name partitions, not the cluster.
    let read_write = |d: &Drill| -> Result<(), ClientError> {
        let h = bulk_key_header(0, d.partitions);
        d.clients[0].describe_key(h.key_id.0)?;
        d.clients[0].create_key(b"drill: written after the restore", false)?;
        Ok(())
    };
    let mut reissued = false;
    if let Err(e) = read_write(d) {
        if e.code() != Some(ErrorCode::Unauthenticated) {
            return Err(format!("drill: (c) first read and write: {e}"));
        }
        let cfg = d.c.nodes[0].data_dir.join("cluster-config");
        d.connect(&cfg)?;
        read_write(d).map_err(|e| format!("drill: (c) first read and write: {e}"))?;
        reissued = true;
    }
    let served_s = secs(t0.elapsed());
    d.wait("restored nodes agree", |_| d.settled(false))?;
    let durable_s = secs(t0.elapsed());
    // The restored snapshot of each shard is the old cluster's own snapshot at that LSN: true
    // or false when a node held that file before the disaster, null when none still did
    // (each node keeps its two newest; the manager may have taken an older one's upload).
    let digest_match: Vec<Option<bool>> = shards
        .iter()
        .map(|s| {
            let i = s["shard"].as_u64().unwrap_or(u64::MAX) as usize;
            let known = old_digests.get(i)?.get(&s["lsn"].as_u64()?)?;
            Some(Some(known.as_str()) == s["digest"].as_str())
        })
        .collect();
    let restored_keys: u64 = shards.iter().filter_map(|s| s["keys"].as_u64()).sum();
    let v = d.verify(0)?;
    // RPO, measured: which of the writer's acknowledged keys the restored cluster holds.
    let client = &d.clients[1 % d.clients.len()];
    let mut first_lost = None;
    let mut lost = 0u64;
    for (at, id) in &acked {
        match client.describe_key(*id) {
            Ok(_) => {}
            Err(e) if e.code() == Some(ErrorCode::NotFound) => {
                lost += 1;
                first_lost = first_lost.or(Some(*at));
            }
            Err(e) => return Err(format!("drill: (c) describe of a written key: {e}")),
        }
    }
    let rpo_s = first_lost.map_or(0.0, |at| disaster_ms.saturating_sub(at) as f64 / 1e3);
    let lsns_lost: Vec<u64> = commits
        .iter()
        .zip(&restored_lsns)
        .map(|(c, r)| c.saturating_sub(r.as_u64().unwrap_or(0)))
        .collect();
    let detail = json!({
        "manifest": backup,
        "manifest_age_s": manifest_age_s,
        "written_during_disaster": acked.len(),
        "written_lost": lost,
        "commit_at_disaster": commits,
        "restored_lsns": restored_lsns,
        "lsns_lost": lsns_lost,
        "old_snapshot_digests": old_digests,
        "manifest_digest_match": digest_match,
        "restored_keys": restored_keys,
        "restore": restored,
        "restore_command_s": restore_s,
        "read_and_write_served_s": served_s,
        "credentials_reissued": reissued,
        "fetched_bytes": restored["fetched_bytes"],
    });
    Ok((durable_s, rpo_s, detail, v))
}

fn print_table(r: &Value) {
    let f = |k: &str| r[k].as_f64().map_or("—".to_string(), |x| format!("{x:.3}"));
    println!("keyfort drill: {} keys, 3 nodes", r["keys"]);
    println!(
        "{:<34} {:>10} {:>10} {:>12}",
        "tier", "seconds", "vs replay", "verified"
    );
    for s in r["steps"].as_array().into_iter().flatten() {
        let sec = s["seconds"].as_f64().unwrap_or(f64::NAN);
        let replay = r["full_replay_s"].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<34} {:>10.3} {:>9.1}x {:>12}",
            s["tier"].as_str().unwrap_or(""),
            sec,
            replay / sec,
            s["verified_keys"]
        );
    }
    println!(
        "RPO {} s; disk read {} GB/s; S3 GET {} GB/s; verified keys {}",
        f("rpo_s"),
        f("disk_read_gb_per_s"),
        f("s3_get_gb_per_s"),
        r["verified_keys"]
    );
    println!("throughput (GB/s): {}", r["throughput_gb_per_s"]);
    println!("goals: {}", r["goals"]);
}
