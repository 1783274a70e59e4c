//! Joining a cluster (DESIGN.md "Cluster life"): a node with no identity in its data dir — new,
//! or one whose state was lost — fetches the cluster config from a seed peer, imports the
//! integrity key into its card (only a card of the realm can), authenticates, and asks the
//! shard-0 leader to admit it. The leader gives it a fresh raft id through raft (a
//! `ClusterConfig` record in shard 0 made by `ClusterConfig::admit`, replacing the member at the
//! joiner's address), adds it as a learner in every shard and names a snapshot of each shard.
//! The joiner streams them, verifies them, starts each shard's log just after its snapshot, and
//! runs as a learner; once a shard has caught up, it proposes one joint conf change
//! (ConfChangeV2) that promotes it and removes every id the cluster config no longer names —
//! the one it replaces. A replaced id is gone from the config, so peers refuse it and no shard
//! counts it.

use crate::cluster_cmd::{hex, shard_snapshot_dir, shard_wbl_dir};
use crate::node::NodeConfig;
use keyfort_engine::cluster::{
    write_durable, ClusterConfig, Identity, CLUSTER_CONFIG_FILE, IDENTITY_FILE,
};
use keyfort_engine::compaction::CompactionConfig;
use keyfort_engine::raft::snapshot::{verify_fetched, SnapshotDescriptor};
use keyfort_engine::raft::Replica;
use keyfort_engine::snapshot as snap;
use keyfort_engine::state::{Op, OutcomeCode};
use keyfort_engine::wbl::{HardState, Wbl, WblOptions};
use keyfort_hsm::CoreSession;
use keyfort_net::join::{
    fetch_cluster_config_over, request_join_over, JoinError, JoinGrant, JoinRefusal, JoinRequest,
};
use keyfort_net::peer::{PeerIdentity, Prover};
use keyfort_net::snapshot_stream::fetch_snapshot;
use keyfort_net::tls::DialTls;
use keyfort_net::transport::PeerTransport;
use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Join requests a joiner sends before giving up (redirects to the leader, busy answers).
pub const JOIN_ATTEMPTS_MAX: u32 = 30;
/// Pause between join attempts after a busy or failed answer.
pub const JOIN_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// How long the admitting leader waits for the learner to be added in one shard.
pub const LEARNER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the admitting leader waits for a shard's snapshot to exist (one compaction).
pub const SNAPSHOT_WAIT: Duration = Duration::from_secs(120);
/// How often a learner checks whether it may ask for its promotion.
pub const PROMOTE_CHECK: Duration = Duration::from_millis(200);
/// Pause after proposing a promotion before proposing it again in the same shard.
pub const PROMOTE_RETRY: Duration = Duration::from_secs(2);

/// The peers to dial: every member of `cfg` but `me`.
pub fn peers_of(cfg: &ClusterConfig, me: u64) -> Result<BTreeMap<u64, SocketAddr>, String> {
    cfg.members
        .iter()
        .filter(|m| m.node_id != me)
        .map(|m| {
            m.peer_addr
                .parse()
                .map(|a| (m.node_id, a))
                .map_err(|e| format!("member {} address {:?}: {e}", m.node_id, m.peer_addr))
        })
        .collect()
}

/// The live cluster config: shard 0's applied `ClusterConfig` record.
pub fn current_config(shard0: &Replica) -> Option<ClusterConfig> {
    shard0.with_core(|c| {
        c.state_machine()
            .cluster_config()
            .and_then(|b| ClusterConfig::decode(b).ok())
    })
}

/// The card as the peer handshake's prover.
pub struct CardProver(pub Rc<CoreSession>);

impl Prover for CardProver {
    fn mac(&self, msg: &[u8]) -> Result<[u8; 32], String> {
        Prover::mac(&*self.0, msg)
    }
    fn verify(&self, msg: &[u8], mac: &[u8; 32]) -> Result<bool, String> {
        Prover::verify(&*self.0, msg, mac)
    }
}

// ---- the joiner ----

/// Joins the cluster its seed peers belong to and leaves the data dir ready for a normal start
/// (identity written last). Runs on a glommio executor.
pub async fn join(cfg: &NodeConfig) -> Result<Identity, String> {
    let t0 = Instant::now();
    clear_partial_join(&cfg.data_dir)?;
    let card = crate::card::open(&cfg.card.token_dir, &cfg.card.label)?;
    // Over TLS a joiner presents a `joiner.<cluster>` certificate it issues itself in its card
    // (only a card of the realm can), and checks the seeds carry the cluster's name.
    let dial_tls = match &cfg.tls {
        Some(t) => {
            let dir = crate::pki::TlsDir::open(&t.dir)?;
            let ca = dir.ca_in(card.session().map_err(|e| e.to_string())?)?;
            let id = ca.issue(
                &dir,
                &crate::pki::Subject::Joiner,
                crate::pki::Validity {
                    days: 1,
                    backdate_days: 0,
                },
            )?;
            drop(ca);
            let config = keyfort_net::tls::client_config(&dir.trust()?, Some(id))
                .map_err(|e| e.to_string())?;
            Some(DialTls {
                config,
                name: keyfort_net::tls::cluster_name(&dir.cluster_id),
            })
        }
        None => None,
    };
    let (cluster, seed) = fetch_config(&cfg.seed_peers, dial_tls.as_ref()).await?;
    let mut session = card.session().map_err(|e| e.to_string())?;
    session
        .import_integrity_key(&cluster.integrity_key_wrapped)
        .map_err(|e| {
            format!(
                "cluster {}: this card cannot import the cluster integrity key (a card of \
                 another realm cannot join): {e}",
                hex(&cluster.cluster_id)
            )
        })?;
    let session = Rc::new(session);
    let prover = CardProver(session.clone());
    let req = JoinRequest {
        peer_addr: cfg.peer_listen.to_string(),
    };
    let grant = ask(seed, &cluster, &prover, &req, dial_tls.as_ref()).await?;
    let granted = ClusterConfig::decode(&grant.config).map_err(|e| format!("join grant: {e}"))?;
    if granted.cluster_id != cluster.cluster_id
        || granted.member(grant.node_id).is_none()
        || grant.snapshots.len() != granted.shard_count as usize
    {
        return Err(format!(
            "join grant for node {} does not match cluster {} ({} shards, {} snapshots named)",
            grant.node_id,
            hex(&cluster.cluster_id),
            granted.shard_count,
            grant.snapshots.len()
        ));
    }
    tracing::info!(
        node = grant.node_id,
        replaces = grant.replaces,
        source = grant.source,
        ms = t0.elapsed().as_secs_f64() * 1e3,
        "admitted to the cluster"
    );
    let me = PeerIdentity {
        cluster_id: granted.cluster_id,
        node_id: grant.node_id,
    };
    let transport = PeerTransport::new(
        me,
        Rc::new(CardProver(session.clone())),
        peers_of(&granted, grant.node_id)?,
        Rc::new(|_, _, _| {}),
    );
    if let Some(t) = &cfg.tls {
        let subject = crate::pki::Subject::Node {
            node_id: grant.node_id,
            ips: crate::node::listen_ips(cfg),
        };
        transport.set_tls(crate::node::node_tls(
            t,
            &card,
            granted.cluster_id,
            subject,
        )?);
    }
    let r = seed_shards(cfg, &transport, &session, &grant).await;
    transport.close().await;
    r?;
    write_durable(&cfg.data_dir, CLUSTER_CONFIG_FILE, &grant.config).map_err(|e| e.to_string())?;
    let id = Identity {
        cluster_id: granted.cluster_id,
        node_id: grant.node_id,
    };
    write_durable(&cfg.data_dir, IDENTITY_FILE, &id.encode()).map_err(|e| e.to_string())?;
    println!(
        "joined cluster {} as node {}{} in {:.1} ms; {} shard snapshots from node {}",
        hex(&id.cluster_id),
        id.node_id,
        if grant.replaces != 0 {
            format!(" (replacing node {})", grant.replaces)
        } else {
            String::new()
        },
        t0.elapsed().as_secs_f64() * 1e3,
        grant.snapshots.len(),
        grant.source
    );
    Ok(id)
}

/// A data dir without an identity holds at most an unfinished join: its shard dirs and config
/// copy are removed (nothing else is touched).
fn clear_partial_join(dir: &Path) -> Result<(), String> {
    let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    for e in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let e = e.map_err(|e| io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let p = e.path();
        if name.starts_with("shard-") && p.is_dir() {
            std::fs::remove_dir_all(&p).map_err(|e| io(&p, e))?;
        } else if name == CLUSTER_CONFIG_FILE {
            std::fs::remove_file(&p).map_err(|e| io(&p, e))?;
        }
    }
    Ok(())
}

async fn fetch_config(
    seeds: &[SocketAddr],
    tls: Option<&DialTls>,
) -> Result<(ClusterConfig, SocketAddr), String> {
    let mut errors = Vec::new();
    for &seed in seeds {
        match fetch_cluster_config_over(seed, tls).await {
            Ok(c) => return Ok((c, seed)),
            Err(e) => errors.push(format!("{seed}: {e}")),
        }
    }
    Err(format!(
        "no seed peer gave the cluster config: {}",
        if errors.is_empty() {
            "no seed_peers configured".to_string()
        } else {
            errors.join("; ")
        }
    ))
}

/// Sends the join request, following redirects to the shard-0 leader and retrying busy answers.
async fn ask(
    seed: SocketAddr,
    cluster: &ClusterConfig,
    prover: &dyn Prover,
    req: &JoinRequest,
    tls: Option<&DialTls>,
) -> Result<JoinGrant, String> {
    let mut to = seed;
    let mut last = String::new();
    for _ in 0..JOIN_ATTEMPTS_MAX {
        match request_join_over(to, cluster.cluster_id, prover, req, tls).await {
            Ok(g) => return Ok(g),
            Err(JoinError::NotLeader {
                leader_addr: Some(a),
            }) if a.parse::<SocketAddr>().is_ok() => {
                to = a.parse().expect("checked");
                continue;
            }
            Err(e @ (JoinError::Peer(_) | JoinError::Config(_) | JoinError::Tls(_))) => {
                return Err(format!("join via {to}: {e}"));
            }
            Err(e) => last = format!("{to}: {e}"),
        }
        // Busy, no leader yet, or a failure: ask again (the seed, which redirects).
        to = seed;
        glommio::timer::sleep(JOIN_RETRY_PAUSE).await;
    }
    Err(format!(
        "not admitted after {JOIN_ATTEMPTS_MAX} attempts; last: {last}"
    ))
}

/// Streams every shard's snapshot from the grant's source (shards in parallel), verifies each
/// and starts the shard's log just after it.
async fn seed_shards(
    cfg: &NodeConfig,
    transport: &Rc<PeerTransport>,
    session: &Rc<CoreSession>,
    grant: &JoinGrant,
) -> Result<(), String> {
    let tasks: Vec<_> = grant
        .snapshots
        .iter()
        .enumerate()
        .map(|(shard, desc)| {
            let (t, s, d, data_dir) = (
                transport.clone(),
                session.clone(),
                *desc,
                cfg.data_dir.clone(),
            );
            let source = grant.source;
            glommio::spawn_local(async move {
                seed_shard(&data_dir, shard as u32, &t, &s, source, &d).await
            })
        })
        .collect();
    let mut errors = Vec::new();
    for t in tasks {
        if let Err(e) = t.await {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

async fn seed_shard(
    data_dir: &Path,
    shard: u32,
    transport: &Rc<PeerTransport>,
    session: &Rc<CoreSession>,
    source: u64,
    desc: &SnapshotDescriptor,
) -> Result<(), String> {
    let e = |what: &str, err: String| format!("shard {shard}: {what}: {err}");
    if desc.shard != shard {
        return Err(e("grant", format!("descriptor names shard {}", desc.shard)));
    }
    let snap_dir = shard_snapshot_dir(data_dir, shard);
    let wbl_dir = shard_wbl_dir(data_dir, shard);
    std::fs::create_dir_all(&snap_dir).map_err(|x| e("snapshot dir", x.to_string()))?;
    let dest = snap_dir.join(snap::file_name(desc.lsn));
    let tmp: PathBuf = snap_dir.join(format!("{}.fetch", snap::file_name(desc.lsn)));
    let t = Instant::now();
    let r = fetch_snapshot(transport, source, shard, desc.lsn, desc.term, &tmp)
        .await
        .map_err(|x| e("snapshot stream", x.to_string()))?;
    let fetched = t.elapsed();
    let file = verify_fetched(&tmp, desc, &**session)
        .await
        .map_err(|x| e("snapshot", x))?;
    let (chain, term) = (file.footer().chain_head, file.footer().term);
    drop(file);
    std::fs::rename(&tmp, &dest).map_err(|x| e("snapshot rename", x.to_string()))?;
    keyfort_engine::wbl::segment::sync_dir(&snap_dir).map_err(|x| e("sync", x.to_string()))?;
    let (wbl, _) = Wbl::open(&wbl_dir, WblOptions::default())
        .await
        .map_err(|x| e("log", x.to_string()))?;
    wbl.reset_to(desc.lsn + 1, chain, term)
        .await
        .map_err(|x| e("log reset", x.to_string()))?;
    wbl.set_hard_state(HardState {
        term,
        vote: 0,
        commit: desc.lsn,
    })
    .map_err(|x| e("hard state", x.to_string()))?
    .await
    .map_err(|x| e("hard state", x.to_string()))?;
    wbl.close().await.map_err(|x| e("log", x.to_string()))?;
    tracing::info!(
        shard,
        lsn = desc.lsn,
        bytes = r.bytes,
        resumes = r.resumes,
        fetch_ms = fetched.as_secs_f64() * 1e3,
        total_ms = t.elapsed().as_secs_f64() * 1e3,
        "shard seeded from a peer snapshot"
    );
    Ok(())
}

// ---- the admitting leader ----

/// What the shard-0 leader needs to admit joiners.
pub struct Admitter {
    pub me: u64,
    pub replicas: Rc<RefCell<Vec<Rc<Replica>>>>,
    pub transport: Rc<PeerTransport>,
    pub mac: Rc<CoreSession>,
    pub data_dir: PathBuf,
    pub compaction: CompactionConfig,
    pub busy: Cell<bool>,
}

struct NotBusy<'a>(&'a Cell<bool>);

impl Drop for NotBusy<'_> {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

impl Admitter {
    /// Answers one join request (one at a time; the others are told to retry).
    pub async fn admit(self: Rc<Self>, req: JoinRequest) -> Result<JoinGrant, JoinRefusal> {
        let shards: Vec<Rc<Replica>> = self.replicas.borrow().clone();
        let Some(r0) = shards.first().cloned() else {
            return Err(JoinRefusal::Failed("node still starting".into()));
        };
        let cfg = current_config(&r0)
            .ok_or_else(|| JoinRefusal::Failed("no cluster config applied yet".into()))?;
        if !r0.with_core(|c| c.is_leader()) {
            let leader = r0.with_core(|c| c.leader_id());
            return Err(JoinRefusal::NotLeader {
                leader_addr: leader
                    .and_then(|l| cfg.member(l))
                    .map(|m| m.peer_addr.clone()),
            });
        }
        if self.busy.replace(true) {
            return Err(JoinRefusal::Busy);
        }
        let _guard = NotBusy(&self.busy);
        let t0 = Instant::now();
        let failed = |what: &str, e: String| JoinRefusal::Failed(format!("{what}: {e}"));
        let (next, id, replaces) = cfg
            .admit(&req.peer_addr)
            .map_err(|e| failed("cluster config", e.to_string()))?;
        let bytes = next
            .encode()
            .map_err(|e| failed("cluster config", e.to_string()))?;
        let op = Op::ClusterConfig {
            config: bytes.clone(),
        };
        let c = r0
            .propose(op.kind(), &op.encode())
            .await
            .map_err(|e| failed("proposing the cluster config", e.to_string()))?;
        if c.result.outcome.code != OutcomeCode::ClusterConfigSet {
            return Err(failed(
                "cluster config",
                format!("{:?} (another admission won; retry)", c.result.outcome.code),
            ));
        }
        if let Ok(p) = peers_of(&next, self.me) {
            self.transport.set_peers(p);
        }
        tracing::info!(
            node = id,
            replaces,
            addr = %req.peer_addr,
            lsn = c.index,
            "join: raft id assigned"
        );
        for r in &shards {
            ensure_learner(r, id)
                .await
                .map_err(|e| failed("adding the learner", e))?;
        }
        let mut snapshots = Vec::with_capacity(shards.len());
        for (shard, r) in shards.iter().enumerate() {
            let d = self
                .snapshot_of(r, shard as u32)
                .await
                .map_err(|e| failed("snapshot", e))?;
            snapshots.push(d);
        }
        tracing::info!(
            node = id,
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "join: learner in every shard, snapshots named"
        );
        Ok(JoinGrant {
            node_id: id,
            replaces,
            source: self.me,
            config: bytes,
            snapshots,
        })
    }

    /// The newest snapshot of a shard here, made now if there is none yet.
    async fn snapshot_of(&self, r: &Rc<Replica>, shard: u32) -> Result<SnapshotDescriptor, String> {
        let deadline = Instant::now() + SNAPSHOT_WAIT;
        let dir = shard_snapshot_dir(&self.data_dir, shard);
        loop {
            let d = r.with_core(|c| {
                c.state_machine()
                    .base()
                    .map(|b| SnapshotDescriptor::of(shard, b))
            });
            if let Some(d) = d {
                return Ok(d);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "shard {shard}: no snapshot after {SNAPSHOT_WAIT:?}"
                ));
            }
            match r.compact(&dir, &*self.mac, &self.compaction).await {
                Ok(Some(_)) => {}
                Ok(None) => glommio::timer::sleep(Duration::from_millis(100)).await,
                Err(e) => return Err(format!("shard {shard}: compaction: {e}")),
            }
        }
    }
}

fn conf_change(changes: Vec<(ConfChangeType, u64)>) -> ConfChangeV2 {
    let mut cc = ConfChangeV2::default();
    cc.set_changes(
        changes
            .into_iter()
            .map(|(t, id)| {
                let mut c = ConfChangeSingle::default();
                c.set_change_type(t);
                c.node_id = id;
                c
            })
            .collect(),
    );
    cc
}

/// Adds `id` as a learner of the shard (on its leader, wherever that is) and waits until the
/// change is applied here.
async fn ensure_learner(r: &Rc<Replica>, id: u64) -> Result<(), String> {
    let deadline = Instant::now() + LEARNER_TIMEOUT;
    let cc = conf_change(vec![(ConfChangeType::AddLearnerNode, id)]);
    loop {
        let cs = r.with_core(|c| c.conf_state());
        if cs.learners.contains(&id) || cs.voters.contains(&id) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("node {id} not a learner after {LEARNER_TIMEOUT:?}"));
        }
        if r.with_core(|c| c.is_leader()) {
            if r.propose_conf_change(cc.clone()).await.is_err() {
                glommio::timer::sleep(Duration::from_millis(100)).await;
            }
        } else {
            let _ = r.propose_conf_change_anywhere(cc.clone());
            glommio::timer::sleep(Duration::from_millis(300)).await;
        }
    }
}

// ---- promotion ----

/// On every node: in each shard where this node is a caught-up learner named by the live
/// cluster config, proposes the one joint change that makes it a voter and removes every
/// member the config no longer names (the id it replaces, and learners of abandoned joins).
pub async fn run_promoter(me: u64, replicas: Rc<RefCell<Vec<Rc<Replica>>>>) {
    let mut last_try: BTreeMap<u32, Instant> = BTreeMap::new();
    loop {
        glommio::timer::sleep(PROMOTE_CHECK).await;
        let shards: Vec<Rc<Replica>> = replicas.borrow().clone();
        let Some(cfg) = shards.first().and_then(|r| current_config(r)) else {
            continue;
        };
        if cfg.member(me).is_none() {
            continue;
        }
        for r in &shards {
            if r.failed().is_some() {
                continue;
            }
            let (shard, ready, stale) = r.with_core(|c| {
                let cs = c.conf_state();
                let ready = cs.learners.contains(&me)
                    && cs.voters_outgoing.is_empty()
                    && c.leader_id().is_some()
                    && c.commit_index() > 0
                    && c.applied() >= c.commit_index();
                let stale: Vec<u64> = cs
                    .voters
                    .iter()
                    .chain(&cs.learners)
                    .copied()
                    .filter(|&x| x != me && cfg.member(x).is_none())
                    .collect();
                (c.shard(), ready, stale)
            });
            if !ready
                || last_try
                    .get(&shard)
                    .is_some_and(|t| t.elapsed() < PROMOTE_RETRY)
            {
                continue;
            }
            let mut changes = vec![(ConfChangeType::AddNode, me)];
            changes.extend(stale.iter().map(|&x| (ConfChangeType::RemoveNode, x)));
            let cc = conf_change(changes);
            last_try.insert(shard, Instant::now());
            match r.propose_conf_change_anywhere(cc) {
                Ok(()) => tracing::info!(shard, node = me, removes = ?stale, "promotion proposed"),
                Err(e) => tracing::debug!(shard, error = %e, "promotion not proposed"),
            }
        }
    }
}
