//! `keyfortd`: one keyfort node — its card, every shard's replica (raft over the WBL), the peer
//! transport. The client protocol comes with the service issue.
//!
//! The node runs one glommio executor holding all its shards (nodes of a local cluster share a
//! machine; one executor per core with shards spread over them comes with the service issue).
//! Every [`STATUS_INTERVAL`] it writes `status.json` in its data dir (role, term, leader,
//! commit, applied, digest per shard) for operators and tests.

use crate::cluster_cmd::{hex, shard_snapshot_dir, shard_wbl_dir};
use keyfort_engine::cluster::{read_cluster_config, read_identity, ClusterConfig, Identity};
use keyfort_engine::compaction::CompactionConfig;
use keyfort_engine::raft::snapshot::{SnapshotDescriptor, SnapshotSource};
use keyfort_engine::raft::{Replica, SnapshotSetup, Transport};
use keyfort_engine::recovery::open_and_recover;
use keyfort_engine::state::Op;
use keyfort_engine::wbl::WblOptions;
use keyfort_hsm::{CoreSession, PartitionId};
use keyfort_net::peer::{PeerIdentity, Prover};
use keyfort_net::snapshot_stream::fetch_snapshot;
use keyfort_net::transport::PeerTransport;
use raft::eraftpb::{ConfState, Message};
use serde::Deserialize;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How often `status.json` is rewritten.
pub const STATUS_INTERVAL: Duration = Duration::from_millis(200);
/// Most synthetic proposals of one shard in flight.
pub const SYNTHETIC_IN_FLIGHT_MAX: usize = 1024;
/// Record payload bytes of a synthetic proposal (the 128 B entries).
pub const SYNTHETIC_ENTRY_BYTES: usize = 128;
/// Idempotency window of every shard, in LSNs.
pub const IDEMPOTENCY_WINDOW_LSNS: u64 = 1 << 20;

/// The config file (JSON). Identity, cluster id, members and shard count come from the data
/// dir (`keyfort cluster bootstrap`), never from here.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    /// Peer listener; must match this node's address in the cluster config.
    pub peer_listen: SocketAddr,
    pub card: CardConfig,
    /// Raft tick in milliseconds (elections after 10–20 ticks).
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    /// Peers to fetch the cluster config from when joining (the join issue uses them).
    #[serde(default)]
    pub seed_peers: Vec<SocketAddr>,
    /// Test and benchmark load: proposals kept in flight on every shard this node leads
    /// (closed loop; 0 = none). Each is a partition creation of [`SYNTHETIC_ENTRY_BYTES`].
    #[serde(default)]
    pub synthetic_in_flight: usize,
    /// Synthetic proposals completed in the first this-many milliseconds are not recorded.
    #[serde(default)]
    pub synthetic_warmup_ms: u64,
    /// Records applied past the newest snapshot that trigger a compaction (default
    /// `compaction::COMPACTION_RECORDS_THRESHOLD`).
    #[serde(default)]
    pub compaction_records: Option<u64>,
    /// `[min, max]` log entries kept below the applied index at a compaction (default
    /// `[10000, 1000000]`, `raft::driver::RETAIN_LOG_ENTRIES_*`): a follower further behind
    /// than the log kept is sent a snapshot file.
    #[serde(default)]
    pub log_retention_entries: Option<[u64; 2]>,
    /// WBL segment size in bytes (default `wbl::SEGMENT_BYTES_DEFAULT`; the log is released a
    /// whole segment at a time).
    #[serde(default)]
    pub wbl_segment_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardConfig {
    pub token_dir: PathBuf,
    pub label: String,
    /// File holding the user PIN (never the PIN itself in the config).
    pub pin_file: PathBuf,
}

fn default_tick_ms() -> u64 {
    100
}

/// The card as the peer handshake's prover.
struct CardProver(Rc<CoreSession>);

impl Prover for CardProver {
    fn mac(&self, msg: &[u8]) -> Result<[u8; 32], String> {
        Prover::mac(&*self.0, msg)
    }
    fn verify(&self, msg: &[u8], mac: &[u8; 32]) -> Result<bool, String> {
        Prover::verify(&*self.0, msg, mac)
    }
}

/// Fetches snapshot files from peers over the transport's snapshot stream.
struct StreamFrom(Rc<PeerTransport>);

impl SnapshotSource for StreamFrom {
    fn fetch<'a>(
        &'a self,
        from: u64,
        desc: &'a SnapshotDescriptor,
        dest: &'a Path,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + 'a>> {
        Box::pin(async move {
            let r = fetch_snapshot(&self.0, from, desc.shard, desc.lsn, desc.term, dest)
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(
                shard = desc.shard,
                lsn = desc.lsn,
                from,
                bytes = r.bytes,
                resumes = r.resumes,
                ms = r.elapsed.as_secs_f64() * 1e3,
                "snapshot fetched"
            );
            Ok(())
        })
    }
}

/// Routes a replica's messages through the node's peer transport.
struct ViaPeers(Rc<PeerTransport>);

impl Transport for ViaPeers {
    fn send(&self, shard: u32, msgs: Vec<Message>) {
        self.0.send(shard, msgs);
    }
}

pub fn run(config_path: &Path) -> crate::CmdResult {
    let text = std::fs::read_to_string(config_path)
        .map_err(|e| format!("{}: {e}", config_path.display()))?;
    let cfg: NodeConfig =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", config_path.display()))?;
    let s = |e: keyfort_engine::cluster::ClusterError| e.to_string();
    let id = read_identity(&cfg.data_dir).map_err(s)?;
    let cluster = read_cluster_config(&cfg.data_dir).map_err(s)?;
    if id.cluster_id != cluster.cluster_id {
        return Err(format!(
            "{}: identity names cluster {} but the config is of cluster {}",
            cfg.data_dir.display(),
            hex(&id.cluster_id),
            hex(&cluster.cluster_id)
        ));
    }
    std::env::set_var(keyfort_hsm::pin::USER_PIN_FILE_ENV, &cfg.card.pin_file);
    let data_dir = cfg.data_dir.clone();
    keyfort_engine::exec::run_local(&data_dir, move |q| node(cfg, id, cluster, q))
        .map_err(|e| e.to_string())?
}

async fn node(
    cfg: NodeConfig,
    id: Identity,
    cluster: ClusterConfig,
    queues: keyfort_engine::exec::Queues,
) -> crate::CmdResult {
    let t0 = Instant::now();
    let card = crate::card::open(&cfg.card.token_dir, &cfg.card.label)?;
    let mut session = card.session().map_err(|e| e.to_string())?;
    session
        .import_integrity_key(&cluster.integrity_key_wrapped)
        .map_err(|e| format!("cluster integrity key: {e}"))?;
    let session = Rc::new(session);
    let peers: BTreeMap<u64, SocketAddr> = cluster
        .members
        .iter()
        .filter(|m| m.node_id != id.node_id)
        .map(|m| {
            m.peer_addr
                .parse()
                .map(|a| (m.node_id, a))
                .map_err(|e| format!("member {} address: {e}", m.node_id))
        })
        .collect::<Result<_, _>>()?;
    let replicas: Rc<RefCell<Vec<Rc<Replica>>>> = Rc::new(RefCell::new(Vec::new()));
    let inbound = replicas.clone();
    let handler = Rc::new(move |_from: u64, shard: u32, m: Message| {
        let r = inbound.borrow().get(shard as usize).cloned();
        if let Some(r) = r {
            r.step(m);
        }
    });
    let transport = PeerTransport::new(
        PeerIdentity {
            cluster_id: cluster.cluster_id,
            node_id: id.node_id,
        },
        Rc::new(CardProver(session.clone())),
        peers,
        handler,
    );
    let snap_root = cfg.data_dir.clone();
    transport.serve_snapshots(Rc::new(move |shard: u32, lsn: u64, _term: u64| {
        let p =
            shard_snapshot_dir(&snap_root, shard).join(keyfort_engine::snapshot::file_name(lsn));
        p.exists().then_some(p)
    }));
    let bound = transport
        .listen(cfg.peer_listen)
        .map_err(|e| format!("peer listener {}: {e}", cfg.peer_listen))?;
    let latency: Latency = Rc::new(RefCell::new(keyfort_bench::latency_histogram()));
    let bootstrap = ConfState {
        voters: cluster.members.iter().map(|m| m.node_id).collect(),
        ..Default::default()
    };
    for shard in 0..cluster.shard_count {
        let start = open_and_recover(
            &shard_snapshot_dir(&cfg.data_dir, shard),
            &shard_wbl_dir(&cfg.data_dir, shard),
            WblOptions {
                segment_bytes: cfg
                    .wbl_segment_bytes
                    .unwrap_or(keyfort_engine::wbl::SEGMENT_BYTES_DEFAULT),
                writer_queue: Some(queues.foreground),
                background_queue: Some(queues.background),
                ..WblOptions::default()
            },
            &*session,
            IDEMPOTENCY_WINDOW_LSNS,
        )
        .await
        .map_err(|e| format!("shard {shard}: {e}"))?;
        let r = Replica::open(
            id.node_id,
            shard,
            start,
            &bootstrap,
            Rc::new(ViaPeers(transport.clone())),
            false,
        )
        .await
        .map_err(|e| format!("shard {shard}: {e}"))?;
        if let Some([min, max]) = cfg.log_retention_entries {
            r.set_log_retention(min, max);
        }
        r.enable_snapshots(SnapshotSetup {
            source: Rc::new(StreamFrom(transport.clone())),
            dir: shard_snapshot_dir(&cfg.data_dir, shard),
            mac: session.clone(),
        });
        replicas.borrow_mut().push(r.clone());
        glommio::spawn_local(r.clone().run_ticker(Duration::from_millis(cfg.tick_ms))).detach();
        let compaction = CompactionConfig {
            records_threshold: cfg
                .compaction_records
                .unwrap_or(CompactionConfig::default().records_threshold),
            ..CompactionConfig::default()
        };
        let mac: Rc<dyn keyfort_engine::snapshot::FooterMac> = session.clone();
        glommio::spawn_local_into(
            r.clone()
                .run_compactor(shard_snapshot_dir(&cfg.data_dir, shard), mac, compaction),
            queues.background,
        )
        .map_err(|e| e.to_string())?
        .detach();
        if cfg.synthetic_in_flight > 0 {
            glommio::spawn_local(synthetic_load(
                r,
                cfg.synthetic_in_flight,
                Duration::from_millis(cfg.synthetic_warmup_ms),
                cfg.data_dir.clone(),
                latency.clone(),
            ))
            .detach();
        }
    }
    println!(
        "keyfortd node {} of cluster {}: {} shards, peers on {bound}, started in {:.1} ms",
        id.node_id,
        hex(&cluster.cluster_id),
        cluster.shard_count,
        t0.elapsed().as_secs_f64() * 1e3
    );
    loop {
        glommio::timer::sleep(STATUS_INTERVAL).await;
        write_status(
            &cfg.data_dir,
            id.node_id,
            &replicas.borrow(),
            &latency.borrow(),
        )?;
        if let Some(e) = replicas.borrow().iter().find_map(|r| r.failed()) {
            return Err(format!("a shard replica stopped: {e}"));
        }
    }
}

/// Commit latency of synthetic proposals (propose → applied on this leader), per node.
type Latency = Rc<RefCell<hdrhistogram::Histogram<u64>>>;

/// Keeps `in_flight` partition creations proposed while this replica leads; records each one's
/// latency after the warm-up, and appends every acknowledged one to `acked-<shard>.log` as
/// `index term` (tests check none is ever lost).
async fn synthetic_load(
    r: Rc<Replica>,
    in_flight: usize,
    warmup: Duration,
    data_dir: PathBuf,
    latency: Latency,
) {
    let shard = r.with_core(|c| c.shard());
    let path = data_dir.join(format!("acked-{shard}.log"));
    let log = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        Ok(f) => Rc::new(RefCell::new(f)),
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "synthetic load disabled");
            return;
        }
    };
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..in_flight.min(SYNTHETIC_IN_FLIGHT_MAX) {
        let (r, log, latency) = (r.clone(), log.clone(), latency.clone());
        tasks.push(glommio::spawn_local(async move {
            while r.failed().is_none() {
                if !r.with_core(|c| c.is_leader()) {
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                let op = Op::PartitionCreate {
                    partition: PartitionId(rand::random()),
                    config: vec![0x5a; SYNTHETIC_ENTRY_BYTES - 1 - 16 - 4],
                };
                let t = Instant::now();
                if let Ok(c) = r.propose(op.kind(), &op.encode()).await {
                    if t0.elapsed() >= warmup {
                        keyfort_bench::record_ns(
                            &mut latency.borrow_mut(),
                            t.elapsed().as_nanos() as u64,
                        );
                    }
                    let _ = writeln!(log.borrow_mut(), "{} {}", c.index, c.term);
                } else {
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await;
    }
}

fn write_status(
    dir: &Path,
    node: u64,
    replicas: &[Rc<Replica>],
    latency: &hdrhistogram::Histogram<u64>,
) -> crate::CmdResult {
    let shards: Vec<serde_json::Value> = replicas
        .iter()
        .map(|r| {
            r.with_core(|c| {
                serde_json::json!({
                    "shard": c.shard(),
                    "role": format!("{:?}", c.role()),
                    "term": c.term(),
                    "leader": c.leader_id().unwrap_or(0),
                    "commit": c.commit_index(),
                    "applied": c.applied(),
                    "digest": format!("{:032x}", c.state_machine().digest().0),
                    "partitions": c.state_machine().partitions().count(),
                    "log_first": c.store().wbl().first_lsn(),
                    "snapshot": c.state_machine().base().map_or(0, |b| b.lsn()),
                })
            })
        })
        .collect();
    let v = serde_json::json!({
        "node": node,
        "shards": shards,
        "synthetic_commit_latency": keyfort_bench::LatencySummary::of(latency),
    });
    let tmp = dir.join("status.json.tmp");
    std::fs::write(&tmp, v.to_string()).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join("status.json")).map_err(|e| format!("status.json: {e}"))
}
