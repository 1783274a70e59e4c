//! `keyfort cluster ...`: make a cluster (its id, shard count, members and the integrity key
//! made in a card) and bootstrap each node's data dir with it.
//!
//! `init` writes the cluster config file once; `bootstrap` is run on every initial member and
//! writes that node's identity (the raft id `init` gave it), a copy of the config, and each
//! shard's log starting with the cluster config record at LSN 1 (term 1, committed), so every
//! replica of every shard starts from the same first entry.

use crate::card::CardAt;
use clap::Subcommand;
use keyfort_engine::cluster::{
    read_cluster_config, write_durable, ClusterConfig, Identity, Member, CLUSTER_CONFIG_FILE,
    IDENTITY_FILE,
};
use keyfort_engine::state::Op;
use keyfort_engine::wbl::{HardState, Wbl, WblOptions};
use std::path::{Path, PathBuf};

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Make a cluster: id, shard count, members; the integrity key is made in this card.
    Init {
        #[command(flatten)]
        card: CardAt,
        /// Shards (fixed for the life of the cluster).
        #[arg(long)]
        shards: u32,
        /// `ID=HOST:PORT` of each initial member's peer listener (ids 1, 2, 3, ...).
        #[arg(long = "member", required = true)]
        members: Vec<String>,
        #[arg(long)]
        out: PathBuf,
        /// The cluster's TLS directory to make (the CA, made in this card; `crate::pki`).
        /// Default: `tls` beside `--out`.
        #[arg(long)]
        tls_dir: Option<PathBuf>,
    },
    /// Prepare an initial member's data dir from the cluster config.
    Bootstrap {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        node_id: u64,
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Issue an operator (admin) credential, made in this card of the cluster's realm.
    AdminCredential {
        #[command(flatten)]
        card: CardAt,
        /// The cluster config file (`init --out`, or a node's `<data dir>/cluster-config`).
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Every node's view of every shard: role, term, leader, commit, applied, snapshot, digest.
    Status {
        #[command(flatten)]
        conn: crate::client_cmd::Conn,
        #[arg(long)]
        json: bool,
    },
    /// Start a local cluster of N nodes with their own SoftHSM cards (runs until SIGINT).
    Up {
        nodes: u64,
        #[arg(long, default_value_t = 2)]
        shards: u32,
        #[arg(long)]
        dir: PathBuf,
        /// Plaintext on 127.0.0.1 instead of TLS (tests and measurements only).
        #[arg(long)]
        insecure_loopback: bool,
    },
}

pub fn run(cmd: ClusterCmd) -> crate::CmdResult {
    match cmd {
        ClusterCmd::Init {
            card,
            shards,
            members,
            out,
            tls_dir,
        } => init(&card, shards, &members, &out, tls_dir),
        ClusterCmd::Bootstrap {
            config,
            node_id,
            data_dir,
        } => bootstrap(&config, node_id, &data_dir),
        ClusterCmd::AdminCredential { card, config, out } => {
            crate::client_cmd::admin_credential(&card, &config, &out)
        }
        ClusterCmd::Status { conn, json } => crate::client_cmd::status(&conn, json),
        ClusterCmd::Up {
            nodes,
            shards,
            dir,
            insecure_loopback,
        } => crate::client_cmd::up(nodes, shards, &dir, !insecure_loopback),
    }
}

fn parse_member(s: &str) -> Result<Member, String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("member {s:?}: expected ID=HOST:PORT"))?;
    let node_id = id
        .parse::<u64>()
        .map_err(|e| format!("member {s:?}: id: {e}"))?;
    addr.parse::<std::net::SocketAddr>()
        .map_err(|e| format!("member {s:?}: address: {e}"))?;
    Ok(Member {
        node_id,
        peer_addr: addr.to_string(),
    })
}

/// Where `cluster init --out FILE` puts the TLS directory by default: `tls` beside FILE.
pub fn default_tls_dir(out: &Path) -> PathBuf {
    out.parent().unwrap_or(Path::new(".")).join("tls")
}

fn init(
    card: &CardAt,
    shards: u32,
    members: &[String],
    out: &Path,
    tls_dir: Option<PathBuf>,
) -> crate::CmdResult {
    let mut members = members
        .iter()
        .map(|m| parse_member(m))
        .collect::<Result<Vec<_>, _>>()?;
    members.sort_by_key(|m| m.node_id);
    let mut session = card.session_without_integrity_key()?;
    let integrity_key_wrapped = session.create_integrity_key().map_err(|e| e.to_string())?;
    let cfg = ClusterConfig {
        cluster_id: rand::random(),
        shard_count: shards,
        next_node_id: members.last().map_or(1, |m| m.node_id + 1),
        members,
        integrity_key_wrapped,
    };
    let bytes = cfg.encode().map_err(|e| e.to_string())?;
    let dir = out.parent().unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .ok_or_else(|| format!("{}: not a file path", out.display()))?
        .to_string_lossy();
    let tls_dir = tls_dir.unwrap_or_else(|| default_tls_dir(out));
    crate::pki::TlsDir::create(&tls_dir, &session, cfg.cluster_id)?;
    write_durable(dir, &name, &bytes).map_err(|e| e.to_string())?;
    println!(
        "cluster {} made: {} shards, {} members, integrity key and TLS CA made in card {}; \
         config written to {}, TLS directory to {}",
        hex(&cfg.cluster_id),
        cfg.shard_count,
        cfg.members.len(),
        card.label(),
        out.display(),
        tls_dir.display()
    );
    Ok(())
}

/// A shard's log directory in a node's data dir.
pub fn shard_wbl_dir(data_dir: &Path, shard: u32) -> PathBuf {
    data_dir.join(format!("shard-{shard}")).join("wbl")
}

/// A shard's snapshot directory in a node's data dir.
pub fn shard_snapshot_dir(data_dir: &Path, shard: u32) -> PathBuf {
    data_dir.join(format!("shard-{shard}")).join("snap")
}

fn bootstrap(config: &Path, node_id: u64, data_dir: &Path) -> crate::CmdResult {
    let bytes = std::fs::read(config).map_err(|e| format!("{}: {e}", config.display()))?;
    let cfg = ClusterConfig::decode(&bytes).map_err(|e| format!("{}: {e}", config.display()))?;
    if cfg.member(node_id).is_none() {
        return Err(format!(
            "node {node_id} is not an initial member of cluster {}",
            hex(&cfg.cluster_id)
        ));
    }
    if data_dir.join(IDENTITY_FILE).exists() {
        return Err(format!(
            "{}: already holds a node identity; a data dir is bootstrapped once",
            data_dir.display()
        ));
    }
    let s = |e: keyfort_engine::cluster::ClusterError| e.to_string();
    write_durable(data_dir, CLUSTER_CONFIG_FILE, &bytes).map_err(s)?;
    let record = Op::ClusterConfig {
        config: bytes.clone(),
    }
    .encode();
    for shard in 0..cfg.shard_count {
        let wdir = shard_wbl_dir(data_dir, shard);
        std::fs::create_dir_all(shard_snapshot_dir(data_dir, shard))
            .map_err(|e| format!("{}: {e}", data_dir.display()))?;
        let record = record.clone();
        keyfort_engine::exec::run_local(data_dir, |_| async move {
            let (wbl, _) = Wbl::open(&wdir, WblOptions::default()).await?;
            if wbl.last_lsn() != 0 {
                return Err(keyfort_engine::wbl::WblError::BadOptions(format!(
                    "{}: log not empty",
                    wdir.display()
                )));
            }
            wbl.append(Op::ClusterConfig { config: vec![] }.kind(), 1, 1, record)?
                .await?;
            wbl.set_hard_state(HardState {
                term: 1,
                vote: 0,
                commit: 1,
            })?
            .await?;
            wbl.close().await
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    }
    // The identity last: a data dir with an identity is complete.
    let id = Identity {
        cluster_id: cfg.cluster_id,
        node_id,
    };
    write_durable(data_dir, IDENTITY_FILE, &id.encode()).map_err(s)?;
    let _ = read_cluster_config(data_dir).map_err(s)?;
    println!(
        "node {node_id} of cluster {} bootstrapped in {}: {} shards",
        hex(&cfg.cluster_id),
        data_dir.display(),
        cfg.shard_count
    );
    Ok(())
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
