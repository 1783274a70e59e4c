//! `keyfortd`: one keyfort node — its card, every shard's replica (raft over the WBL), the peer
//! transport. The client protocol comes with the service issue.
//!
//! The node runs one glommio executor holding all its shards (nodes of a local cluster share a
//! machine; one executor per core with shards spread over them comes with the service issue).
//! Every [`STATUS_INTERVAL`] it writes `status.json` in its data dir (role, term, leader,
//! commit, applied, digest per shard) for operators and tests.

use crate::cluster_cmd::{hex, shard_snapshot_dir, shard_wbl_dir};
use crate::join::{peers_of, run_promoter, Admitter, CardProver};
use keyfort_engine::cluster::{
    read_cluster_config, read_identity, ClusterConfig, Identity, IDENTITY_FILE,
};
use keyfort_engine::compaction::CompactionConfig;
use keyfort_engine::raft::snapshot::{SnapshotDescriptor, SnapshotSource};
use keyfort_engine::raft::{Replica, SnapshotSetup, Transport};
use keyfort_engine::recovery::open_and_recover;
use keyfort_engine::state::Op;
use keyfort_engine::wbl::WblOptions;
use keyfort_hsm::PartitionId;
use keyfort_net::peer::PeerIdentity;
use keyfort_net::snapshot_stream::fetch_snapshot;
use keyfort_net::transport::PeerTransport;
use raft::eraftpb::{ConfState, Message};
use serde::Deserialize;
use std::cell::{Cell, RefCell};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How often `status.json` is rewritten.
pub const STATUS_INTERVAL: Duration = Duration::from_millis(200);
/// Most synthetic proposals of one shard in flight.
pub const SYNTHETIC_IN_FLIGHT_MAX: usize = 1024;
/// Record payload bytes of a synthetic proposal (the issue's 128 B entries).
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
    /// Client listener (docs/format.md §8); none: this node serves no clients.
    #[serde(default)]
    pub client_listen: Option<SocketAddr>,
    /// Prometheus metrics listener (`GET /metrics`, `crate::metrics`; docs/operations.md
    /// "Metrics"); loopback addresses only. None: no metrics.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Durable store URL (`crate::durable::DurableStore::open`): the snapshot manager
    /// (`crate::backup`) uploads snapshots and manifests there while this node leads shard 0.
    /// None: no backups.
    #[serde(default)]
    pub durable_store: Option<String>,
    /// Milliseconds between two rounds of the snapshot manager (default
    /// `backup::BACKUP_INTERVAL_DEFAULT`).
    #[serde(default)]
    pub backup_interval_ms: Option<u64>,
    /// Manifests retention keeps in the durable store (default
    /// `backup::MANIFESTS_KEPT_DEFAULT`, at least `backup::MANIFESTS_KEPT_MIN`).
    #[serde(default)]
    pub manifests_kept: Option<usize>,
    pub card: CardConfig,
    /// Raft tick in milliseconds (elections after 10–20 ticks; default [`DEFAULT_TICK_MS`]).
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    /// Peers to join through when the data dir holds no identity (a new node, or one whose
    /// state was lost): the cluster config is fetched from the first that answers.
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
    /// Benchmark and drill load: once every shard has a leader, this node loads real keys
    /// through raft (`keyfort_bench::bulk`) and writes `bulk-load.json` in its data dir (or
    /// `bulk-load.error`). Set on one node of a fresh cluster.
    #[serde(default)]
    pub bulk_load: Option<BulkLoadConfig>,
    /// How often `status.json` is rewritten, in milliseconds (default [`STATUS_INTERVAL`];
    /// benchmarks that time recovery from it use less).
    #[serde(default)]
    pub status_ms: Option<u64>,
    /// TLS on both protocols (`crate::pki`): the cluster's TLS directory. Required unless
    /// `insecure_loopback` is set.
    #[serde(default)]
    pub tls: Option<NodeTlsConfig>,
    /// Plaintext on both protocols, allowed only when every address this node listens on,
    /// dials or joins through is a loopback address (a test or a one-machine demo). Never
    /// together with `tls`.
    #[serde(default)]
    pub insecure_loopback: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeTlsConfig {
    /// The cluster's TLS directory: `ca.pem`, `ca-key.kfca`, `cluster-id`, optional `crl.pem`
    /// (`keyfort cluster init` writes it; docs/operations.md "TLS").
    pub dir: PathBuf,
}

/// Refuses a config with neither TLS nor the insecure loopback mode, with both, or with the
/// insecure mode and an address that is not loopback.
pub fn check_transport_security(cfg: &NodeConfig) -> Result<(), String> {
    match (&cfg.tls, cfg.insecure_loopback) {
        (Some(_), true) => Err("both \"tls\" and \"insecure_loopback\" are set: choose one".into()),
        (None, false) => Err(
            "no transport security: set \"tls\": {\"dir\": ...} (the cluster's TLS \
             directory, made by `keyfort cluster init`), or \"insecure_loopback\": true for \
             plaintext on loopback addresses only"
                .into(),
        ),
        (Some(_), false) => Ok(()),
        (None, true) => {
            let addrs = std::iter::once(cfg.peer_listen)
                .chain(cfg.client_listen)
                .chain(cfg.seed_peers.iter().copied());
            check_loopback(addrs)
        }
    }
}

/// Every address loopback, or an error naming the first that is not.
pub fn check_loopback(addrs: impl IntoIterator<Item = SocketAddr>) -> Result<(), String> {
    for a in addrs {
        if !a.ip().to_canonical().is_loopback() {
            return Err(format!(
                "insecure_loopback: {a} is not a loopback address (plaintext is refused off \
                 this machine; configure \"tls\")"
            ));
        }
    }
    Ok(())
}

/// This node's TLS: its certificate issued now, in its card, for `node_id` (a new key in
/// memory for the life of the process), trusting the directory's CA and revocation list.
pub fn node_tls(
    t: &NodeTlsConfig,
    card: &keyfort_hsm::Card,
    cluster_id: [u8; 16],
    subject: crate::pki::Subject,
) -> Result<keyfort_net::tls::NodeTls, String> {
    let dir = crate::pki::TlsDir::open(&t.dir)?;
    if dir.cluster_id != cluster_id {
        return Err(format!(
            "{}: the TLS directory is of cluster {}, this node's cluster is {}",
            t.dir.display(),
            hex(&dir.cluster_id),
            hex(&cluster_id)
        ));
    }
    let ca = dir.ca_in(card.session().map_err(|e| e.to_string())?)?;
    let identity = ca.issue(
        &dir,
        &subject,
        crate::pki::Validity {
            days: crate::pki::NODE_CERT_DAYS,
            backdate_days: 0,
        },
    )?;
    drop(ca);
    keyfort_net::tls::NodeTls::new(cluster_id, &dir.trust()?, identity).map_err(|e| e.to_string())
}

/// The IP addresses a node's certificate names: those it listens on (not wildcards).
pub fn listen_ips(cfg: &NodeConfig) -> Vec<std::net::IpAddr> {
    let mut ips: Vec<std::net::IpAddr> = std::iter::once(cfg.peer_listen)
        .chain(cfg.client_listen)
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkLoadConfig {
    pub keys: u64,
    #[serde(default = "default_bulk_partitions")]
    pub partitions: u32,
    #[serde(default = "default_bulk_in_flight")]
    pub in_flight: usize,
    #[serde(default = "default_bulk_card_threads")]
    pub card_threads: usize,
}

fn default_bulk_partitions() -> u32 {
    100
}
fn default_bulk_in_flight() -> usize {
    1024
}
fn default_bulk_card_threads() -> usize {
    2
}

/// How long the bulk loader waits for every shard to have a leader.
pub const BULK_LEADER_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardConfig {
    pub token_dir: PathBuf,
    pub label: String,
    /// File holding the user PIN (never the PIN itself in the config).
    pub pin_file: PathBuf,
}

/// The default raft tick: 25 ms, so elections start after 250–500 ms without a leader (10–20
/// ticks) and a client's write gap at a leader's death stays near the 500 ms goal (measured
/// with `cluster_bench`: docs/benchmarks.md). Heartbeats every 50 ms cost nothing measurable;
/// check-quorum and pre-vote keep a slow but live leader from being deposed by one follower.
pub const DEFAULT_TICK_MS: u64 = 25;

fn default_tick_ms() -> u64 {
    DEFAULT_TICK_MS
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
    crate::metrics::check_listen(cfg.metrics_listen)?;
    check_transport_security(&cfg)?;
    let s = |e: keyfort_engine::cluster::ClusterError| e.to_string();
    std::env::set_var(keyfort_hsm::pin::USER_PIN_FILE_ENV, &cfg.card.pin_file);
    let started = Instant::now();
    let mut joined = None;
    if !cfg.data_dir.join(IDENTITY_FILE).exists() {
        if cfg.seed_peers.is_empty() {
            return Err(format!(
                "{}: no node identity, and no seed_peers to join through (bootstrap it with \
                 `keyfort cluster bootstrap`, or list seed_peers to join a running cluster)",
                cfg.data_dir.display()
            ));
        }
        let data_dir = cfg.data_dir.clone();
        std::fs::create_dir_all(&data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
        let cfg = &cfg;
        keyfort_engine::exec::run_local(&data_dir, |_| async move { crate::join::join(cfg).await })
            .map_err(|e| e.to_string())??;
        joined = Some(started.elapsed());
    }
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
    let data_dir = cfg.data_dir.clone();
    let start = Start { started, joined };
    keyfort_engine::exec::run_local(&data_dir, move |q| node(cfg, id, cluster, q, start))
        .map_err(|e| e.to_string())?
}

/// When the process started, and how long joining took when it joined (the peer tier).
struct Start {
    started: Instant,
    joined: Option<Duration>,
}

async fn node(
    cfg: NodeConfig,
    id: Identity,
    cluster: ClusterConfig,
    queues: keyfort_engine::exec::Queues,
    start: Start,
) -> crate::CmdResult {
    let t0 = Instant::now();
    // One card per process, for the life of the process (the bulk loader's threads share it).
    let card: &'static keyfort_hsm::Card = Box::leak(Box::new(crate::card::open(
        &cfg.card.token_dir,
        &cfg.card.label,
    )?));
    let mut session = card.session().map_err(|e| e.to_string())?;
    session
        .import_integrity_key(&cluster.integrity_key_wrapped)
        .map_err(|e| format!("cluster integrity key: {e}"))?;
    let session = Rc::new(session);
    let peers = peers_of(&cluster, id.node_id)?;
    let tls = match &cfg.tls {
        Some(t) => Some(node_tls(
            t,
            card,
            cluster.cluster_id,
            crate::pki::Subject::Node {
                node_id: id.node_id,
                ips: listen_ips(&cfg),
            },
        )?),
        None => {
            check_loopback(peers.values().copied())?;
            None
        }
    };
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
    if let Some(t) = &tls {
        transport.set_tls(t.clone());
    }
    let snap_root = cfg.data_dir.clone();
    transport.serve_snapshots(Rc::new(move |shard: u32, lsn: u64, _term: u64| {
        let p =
            shard_snapshot_dir(&snap_root, shard).join(keyfort_engine::snapshot::file_name(lsn));
        p.exists().then_some(p)
    }));
    let newest_root = cfg.data_dir.clone();
    transport.serve_newest_snapshots(Rc::new(move |shard: u32| {
        keyfort_engine::snapshot::list(&shard_snapshot_dir(&newest_root, shard))
            .ok()?
            .pop()
    }));
    let config_of = replicas.clone();
    transport.serve_config(Rc::new(move || {
        let r = config_of.borrow().first().cloned()?;
        r.with_core(|c| c.state_machine().cluster_config().map(<[u8]>::to_vec))
    }));
    let compaction = CompactionConfig {
        records_threshold: cfg
            .compaction_records
            .unwrap_or(CompactionConfig::default().records_threshold),
        ..CompactionConfig::default()
    };
    let admitter = Rc::new(Admitter {
        me: id.node_id,
        replicas: replicas.clone(),
        transport: transport.clone(),
        mac: session.clone(),
        data_dir: cfg.data_dir.clone(),
        compaction: compaction.clone(),
        busy: Cell::new(false),
    });
    transport.serve_joins(Rc::new(move |req| Box::pin(admitter.clone().admit(req))));
    let bound = transport
        .listen(cfg.peer_listen)
        .map_err(|e| format!("peer listener {}: {e}", cfg.peer_listen))?;
    let service = Rc::new(crate::service::Service {
        cluster_id: cluster.cluster_id,
        node_id: id.node_id,
        shard_count: cluster.shard_count,
        replicas: replicas.clone(),
        card: RefCell::new(card.session().map_err(|e| e.to_string())?),
        mac: session.clone(),
        loaded: RefCell::default(),
        stopping: Cell::new(false),
        recovery: RefCell::new(None),
        archives: RefCell::new(Vec::new()),
    });
    let client_server = keyfort_net::server::ClientServer::new(service.clone());
    if let Some(t) = &tls {
        client_server.set_tls(t.client_server.clone());
    }
    let client_bound = match cfg.client_listen {
        Some(addr) => Some(
            client_server
                .listen(addr)
                .map_err(|e| format!("client listener {addr}: {e}"))?,
        ),
        None => None,
    };
    let backup = Rc::new(RefCell::new(crate::backup::BackupStatus::default()));
    let metrics_bound = match cfg.metrics_listen {
        Some(addr) => Some(crate::metrics::serve(
            addr,
            Rc::new(crate::metrics::Sources {
                node: id.node_id,
                data_dir: cfg.data_dir.clone(),
                replicas: replicas.clone(),
                server: client_bound.map(|_| client_server.clone()),
                service: service.clone(),
                backup: cfg.durable_store.is_some().then(|| backup.clone()),
            }),
        )?),
        None => None,
    };
    let latency: Latency = Rc::new(RefCell::new(keyfort_bench::latency_histogram()));
    let bootstrap = ConfState {
        voters: cluster.members.iter().map(|m| m.node_id).collect(),
        ..Default::default()
    };
    // The live cluster config's bytes as last followed (`follow_config`).
    let mut live_config = Vec::new();
    // Every shard recovers at once (their snapshot checks run on the blocking pool meanwhile).
    let recoveries: Vec<_> = (0..cluster.shard_count)
        .map(|shard| {
            let (snap, wbl) = (
                shard_snapshot_dir(&cfg.data_dir, shard),
                shard_wbl_dir(&cfg.data_dir, shard),
            );
            let opts = WblOptions {
                segment_bytes: cfg
                    .wbl_segment_bytes
                    .unwrap_or(keyfort_engine::wbl::SEGMENT_BYTES_DEFAULT),
                writer_queue: Some(queues.foreground),
                background_queue: Some(queues.background),
                ..WblOptions::default()
            };
            let session = session.clone();
            glommio::spawn_local(async move {
                open_and_recover(&snap, &wbl, opts, &*session, IDEMPOTENCY_WINDOW_LSNS).await
            })
        })
        .collect();
    let marker = crate::recovery_report::take_marker(&cfg.data_dir);
    let mut phases = crate::recovery_report::Recovery {
        tier: match (&marker, start.joined) {
            (Some(_), _) => crate::recovery_report::Tier::Durable,
            (None, Some(_)) => crate::recovery_report::Tier::Peer,
            (None, None) => crate::recovery_report::Tier::Local,
        },
        fetch: marker.map_or(start.joined.unwrap_or_default(), |(f, _)| f),
        verify: Duration::ZERO,
        open: Duration::ZERO,
        replay: Duration::ZERO,
        catch_up: None,
    };
    let restore_verify = marker.map_or(Duration::ZERO, |(_, v)| v);
    for (shard, recovery) in (0..cluster.shard_count).zip(recoveries) {
        let opened = recovery.await.map_err(|e| format!("shard {shard}: {e}"))?;
        // The shards recovered concurrently: each phase is its slowest shard's.
        phases.open = phases.open.max(opened.wbl_open_duration);
        phases.verify = phases.verify.max(opened.local.open_duration);
        phases.replay = phases.replay.max(opened.local.replay_duration);
        let r = Replica::open(
            id.node_id,
            shard,
            opened,
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
        if shard == 0 {
            // Membership is shard 0's: a replaced id never starts again.
            live_config = follow_config(&r, id.node_id, &cluster, &transport)?;
        }
        let mac: Rc<dyn keyfort_engine::snapshot::FooterMac> = session.clone();
        glommio::spawn_local_into(
            r.clone().run_compactor(
                shard_snapshot_dir(&cfg.data_dir, shard),
                mac,
                compaction.clone(),
            ),
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
    // A restored node's snapshots were checked twice: by the restore and at this open.
    phases.verify += restore_verify;
    let report = Rc::new(RefCell::new(phases));
    *service.recovery.borrow_mut() = Some(report.clone());
    glommio::spawn_local(crate::recovery_report::watch_catch_up(
        report.clone(),
        replicas.borrow().clone(),
        start.started,
    ))
    .detach();
    let mut archives = Vec::new();
    if let Some(url) = &cfg.durable_store {
        let store = crate::durable::DurableStore::open(url).map_err(|e| e.to_string())?;
        for r in replicas.borrow().iter() {
            r.gate_release_on_archive(true);
            let status = Rc::new(RefCell::new(crate::archive::ArchiveStatus::default()));
            archives.push(status.clone());
            let archiver = Rc::new(crate::archive::Archiver {
                cluster_id: cluster.cluster_id,
                replica: r.clone(),
                store: store.clone(),
                mac: session.clone(),
                status,
            });
            glommio::spawn_local_into(archiver.run(), queues.background)
                .map_err(|e| e.to_string())?
                .detach();
        }
        let defaults = crate::backup::BackupConfig::default();
        let manager = Rc::new(crate::backup::Manager {
            cluster_id: cluster.cluster_id,
            replicas: replicas.clone(),
            data_dir: cfg.data_dir.clone(),
            mac: session.clone(),
            store,
            config: crate::backup::BackupConfig {
                interval: cfg
                    .backup_interval_ms
                    .map_or(defaults.interval, |ms| Duration::from_millis(ms.max(1))),
                manifests_kept: cfg.manifests_kept.unwrap_or(defaults.manifests_kept),
            },
            status: backup.clone(),
            peers: transport.clone(),
            uploaded: RefCell::default(),
            uploading: Cell::new(false),
            checked_ranges: RefCell::default(),
        });
        glommio::spawn_local_into(manager.run(), queues.background)
            .map_err(|e| e.to_string())?
            .detach();
    }
    *service.archives.borrow_mut() = archives.clone();
    // Dial every peer now: peers backing off from this node (it was down, or is new) see it
    // connect and redial it at once instead of at their next backoff step.
    transport.connect_all();
    glommio::spawn_local(run_promoter(id.node_id, replicas.clone())).detach();
    if let Some(b) = &cfg.bulk_load {
        let spec = keyfort_bench::bulk::BulkSpec {
            keys: b.keys,
            partitions: b.partitions,
            in_flight: b.in_flight,
            card_threads: b.card_threads,
        };
        glommio::spawn_local(bulk(
            replicas.borrow().clone(),
            card,
            cluster.integrity_key_wrapped.clone(),
            spec,
            cfg.data_dir.clone(),
        ))
        .detach();
    }
    println!(
        "keyfortd node {} of cluster {}: {} shards, peers on {bound}, clients on {}, metrics on \
         {}, started in {:.1} ms",
        id.node_id,
        hex(&cluster.cluster_id),
        cluster.shard_count,
        client_bound.map_or("-".to_string(), |a| a.to_string()),
        metrics_bound.map_or("-".to_string(), |a| a.to_string()),
        t0.elapsed().as_secs_f64() * 1e3
    );
    loop {
        if crate::signals::terminate_requested() {
            let all = replicas.borrow().clone();
            return shutdown(&service, &all, &transport).await;
        }
        glommio::timer::sleep(
            cfg.status_ms
                .map_or(STATUS_INTERVAL, |ms| Duration::from_millis(ms.max(1))),
        )
        .await;
        let r0 = replicas.borrow().first().cloned();
        if let Some(r0) = r0 {
            let changed = r0.with_core(|c| {
                c.state_machine()
                    .cluster_config()
                    .is_some_and(|b| b != live_config.as_slice())
            });
            if changed {
                live_config = follow_config(&r0, id.node_id, &cluster, &transport)?;
            }
        }
        write_status(
            &cfg.data_dir,
            id.node_id,
            client_bound,
            &replicas.borrow(),
            &latency.borrow(),
            &archives,
            serde_json::json!({
                "backup": cfg.durable_store.is_some().then(|| backup.borrow().to_json()),
                "recovery": report.borrow().to_json(),
            }),
        )?;
        if let Some(e) = replicas.borrow().iter().find_map(|r| r.failed()) {
            return Err(format!("a shard replica stopped: {e}"));
        }
    }
}

/// Follows shard 0's applied cluster config (the live membership): refuses to go on when it
/// says `me` was replaced, and points the transport at its members when it is at least as new
/// as the data dir's copy (`known`). Returns the config bytes it followed.
fn follow_config(
    shard0: &Replica,
    me: u64,
    known: &ClusterConfig,
    transport: &PeerTransport,
) -> Result<Vec<u8>, String> {
    let bytes = shard0.with_core(|c| {
        c.state_machine()
            .cluster_config()
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    });
    if let Ok(live) = ClusterConfig::decode(&bytes) {
        if replaced(&live, me) {
            return Err(format!(
                "node {me} is no longer a member of cluster {} (it was replaced by a new \
                 member); this data dir is retired: move it aside and start with seed_peers to \
                 join as a new member",
                hex(&live.cluster_id)
            ));
        }
        if live.next_node_id >= known.next_node_id {
            transport.set_peers(peers_of(&live, me)?);
        }
    }
    Ok(bytes)
}

/// Whether the live config says `me` was replaced: it was admitted after `me` (its next id is
/// above it) and does not name it. A config older than `me`'s admission (a joiner whose shard-0
/// snapshot predates the admission record) says nothing yet.
fn replaced(live: &ClusterConfig, me: u64) -> bool {
    live.next_node_id > me && live.member(me).is_none()
}

/// Runs the bulk loader once every shard has a leader; its report (or error) goes to the data dir.
async fn bulk(
    replicas: Vec<Rc<Replica>>,
    card: &'static keyfort_hsm::Card,
    integrity_key_wrapped: Vec<u8>,
    spec: keyfort_bench::bulk::BulkSpec,
    dir: PathBuf,
) {
    let t = Instant::now();
    while t.elapsed() < BULK_LEADER_WAIT
        && !replicas
            .iter()
            .all(|r| r.with_core(|c| c.leader_id().is_some()))
    {
        glommio::timer::sleep(Duration::from_millis(50)).await;
    }
    let r = keyfort_bench::bulk::bulk_load(replicas, card, integrity_key_wrapped, spec).await;
    let (name, text) = match r {
        Ok(rep) => ("bulk-load.json", rep.to_json().to_string()),
        Err(e) => ("bulk-load.error", e),
    };
    let tmp = dir.join(format!("{name}.tmp"));
    if let Err(e) = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, dir.join(name))) {
        tracing::error!(error = %e, "bulk load report not written");
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
                    // One write per line: `writeln!` on a File writes each formatted piece
                    // with its own syscall, and a SIGKILL between them tore lines ("239" +
                    // the restarted node's "384 7" read as entry 239384).
                    let line = format!("{} {}\n", c.index, c.term);
                    let _ = log.borrow_mut().write_all(line.as_bytes());
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

/// SIGTERM: new client requests are answered `ShuttingDown`, requests in flight get up to
/// [`SHUTDOWN_GRACE`] to finish, then every shard's WBL is closed (its writes flushed) and the
/// process exits 0.
async fn shutdown(
    service: &crate::service::Service,
    replicas: &[Rc<Replica>],
    transport: &PeerTransport,
) -> crate::CmdResult {
    println!("keyfortd node {}: SIGTERM, shutting down", service.node_id);
    service.stopping.set(true);
    glommio::timer::sleep(SHUTDOWN_GRACE).await;
    transport.close().await;
    for r in replicas {
        r.close().await.map_err(|e| e.to_string())?;
    }
    println!("keyfortd node {}: stopped", service.node_id);
    Ok(())
}

/// How long in-flight client requests get to finish after SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

fn write_status(
    dir: &Path,
    node: u64,
    client_addr: Option<SocketAddr>,
    replicas: &[Rc<Replica>],
    latency: &hdrhistogram::Histogram<u64>,
    archives: &[Rc<RefCell<crate::archive::ArchiveStatus>>],
    // Node-level sections beside the shards (backup, recovery).
    sections: serde_json::Value,
) -> crate::CmdResult {
    let shards: Vec<serde_json::Value> = replicas
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let archive = archives.get(i).map(|a| a.borrow().to_json());
            let stalls = r.stalls();
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
                    "voters": c.conf_state().voters,
                    "learners": c.conf_state().learners,
                    "appends_dropped": c.appends_dropped(),
                    "slow_persists": stalls.slow_persists,
                    "worst_persist_ms": stalls.worst_persist.as_secs_f64() * 1e3,
                    "late_ticks": stalls.late_ticks,
                    "worst_tick_gap_ms": stalls.worst_tick_gap.as_secs_f64() * 1e3,
                    "archive": archive,
                })
            })
        })
        .collect();
    let mut v = serde_json::json!({
        "node": node,
        "client_addr": client_addr.map(|a| a.to_string()),
        "shards": shards,
        "synthetic_commit_latency": keyfort_bench::LatencySummary::of(latency),
    });
    if let (Some(v), serde_json::Value::Object(extra)) = (v.as_object_mut(), sections) {
        v.extend(extra);
    }
    status_writer().publish(dir, v.to_string());
    Ok(())
}

/// Writes `status.json` files off the executor: a file write and a rename can wait on the
/// file system's journal for milliseconds, which the executor's raft and client work must not.
/// Only the newest status waiting is kept; a failed write is logged.
struct StatusWriter {
    tx: std::sync::mpsc::SyncSender<(PathBuf, String)>,
}

impl StatusWriter {
    fn publish(&self, dir: &Path, text: String) {
        // Full: the writer is behind; this status is dropped, the next one goes.
        let _ = self.tx.try_send((dir.to_path_buf(), text));
    }
}

fn status_writer() -> &'static StatusWriter {
    static W: std::sync::OnceLock<StatusWriter> = std::sync::OnceLock::new();
    W.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(PathBuf, String)>(1);
        std::thread::Builder::new()
            .name("status-writer".into())
            .spawn(move || {
                for (dir, text) in rx {
                    let tmp = dir.join("status.json.tmp");
                    if let Err(e) = std::fs::write(&tmp, text)
                        .and_then(|_| std::fs::rename(&tmp, dir.join("status.json")))
                    {
                        tracing::error!(file = %tmp.display(), error = %e, "status.json not written");
                    }
                }
            })
            .expect("spawn the status writer");
        StatusWriter { tx }
    })
}
