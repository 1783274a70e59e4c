//! The CLI's client side: `keyfort partition ...`, `keyfort key ...`, `keyfort encrypt`,
//! `decrypt`, `data-key`, and `keyfort cluster status/up/admin-credential`. Every operation
//! goes through the client library (`keyfort_net::client`) to a running cluster.
//!
//! Where to connect and as whom: `--nodes HOST:PORT,...` (or `KEYFORT_NODES`) and
//! `--credential FILE` (or `KEYFORT_CREDENTIAL`), a credential file written by `partition
//! create`, `partition credential` or `cluster admin-credential`.

use crate::card::CardAt;
use crate::cluster_cmd::hex;
use keyfort_engine::cluster::ClusterConfig;
use keyfort_net::client::{Client, ClientOptions, ClientTls, Credential};
use keyfort_net::client_proto::{KeyStateCode, KeyWritten, Scope};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the cluster is, which credential to use, and how to trust the nodes.
#[derive(Debug, clap::Args)]
pub struct Conn {
    /// Client addresses of the nodes, comma separated.
    #[arg(long, env = "KEYFORT_NODES", value_delimiter = ',')]
    nodes: Vec<SocketAddr>,
    /// Credential file.
    #[arg(long, env = "KEYFORT_CREDENTIAL")]
    credential: PathBuf,
    /// Per-request time limit in milliseconds (retries included).
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// The cluster CA's certificate (PEM, the cluster's ca.pem; revocation lists appended to
    /// it are honored): connect with TLS 1.3 and accept only nodes with certificates it
    /// issued.
    #[arg(long, env = "KEYFORT_CA")]
    ca: Option<PathBuf>,
    /// Client certificate (PEM) to present to the nodes; needs --key.
    #[arg(long, env = "KEYFORT_CERT")]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, env = "KEYFORT_KEY")]
    key: Option<PathBuf>,
    /// Name to verify in every node's certificate (e.g. the cluster name
    /// `<cluster id hex>.keyfort`); by default the IP address dialed.
    #[arg(long, env = "KEYFORT_SERVER_NAME")]
    server_name: Option<String>,
    /// Plaintext, without TLS: allowed only when every node is a loopback address
    /// (127.0.0.1, ::1), for a local test cluster.
    #[arg(long)]
    insecure_loopback: bool,
}

impl Conn {
    fn client(&self) -> Result<Client, String> {
        let cred = Credential::read_file(&self.credential)
            .map_err(|e| format!("{}: {e}", self.credential.display()))?;
        if self.nodes.is_empty() {
            return Err("no nodes: pass --nodes HOST:PORT,... or set KEYFORT_NODES".into());
        }
        let tls = match (&self.ca, self.insecure_loopback) {
            (Some(_), true) => {
                return Err("--ca and --insecure-loopback together: give one".into());
            }
            (Some(ca), false) => Some(
                ClientTls::from_files(
                    ca,
                    self.cert.as_deref(),
                    self.key.as_deref(),
                    self.server_name.clone(),
                )
                .map_err(|e| e.to_string())?,
            ),
            (None, true) => {
                if let Some(a) = self
                    .nodes
                    .iter()
                    .find(|a| !a.ip().to_canonical().is_loopback())
                {
                    return Err(format!(
                        "--insecure-loopback: {a} is not a loopback address; pass --ca FILE \
                         (the cluster's ca.pem) to use TLS"
                    ));
                }
                if self.cert.is_some() || self.key.is_some() || self.server_name.is_some() {
                    return Err(
                        "--cert, --key and --server-name are for TLS: they need --ca".into(),
                    );
                }
                None
            }
            (None, false) => {
                return Err(
                    "no CA: pass --ca FILE (the cluster's ca.pem) or --insecure-loopback \
                            for plaintext to 127.0.0.1"
                        .into(),
                );
            }
        };
        let opts = ClientOptions {
            request_timeout: Duration::from_millis(self.timeout_ms),
            tls,
            ..ClientOptions::default()
        };
        Client::connect(self.nodes.clone(), cred, opts).map_err(|e| e.to_string())
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum PartitionCmd {
    /// Create a partition (admin); writes its first client's credential to `--out`.
    Create {
        #[command(flatten)]
        conn: Conn,
        /// Partition id (32 hex digits); random when left out.
        #[arg(long)]
        partition: Option<String>,
        #[arg(long)]
        out: PathBuf,
        /// Policy REQUIRE_CLIENT_CERT: the partition's clients must also connect over TLS with
        /// a client certificate naming the partition (`keyfort tls issue-client --partition`);
        /// their connections are otherwise refused `ClientCertRequired`, even with a valid
        /// credential. Fixed at creation.
        #[arg(long)]
        require_client_cert: bool,
    },
    /// Issue another client credential of a partition (admin).
    Credential {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        partition: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Delete an empty partition (admin).
    Delete {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        partition: String,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum KeyCmd {
    /// Create a key in the credential's partition.
    Create {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, default_value = "")]
        metadata: String,
        /// Also write the key's single-key backup to this file.
        #[arg(long)]
        backup: Option<PathBuf>,
        /// Idempotency id (32 hex digits); random when left out. Reuse it to retry safely.
        #[arg(long)]
        idempotency_id: Option<String>,
    },
    /// Rotate a key: a new version replaces `--replaces` (older versions still decrypt).
    Rotate {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        key: String,
        #[arg(long)]
        replaces: u32,
    },
    /// Change a version's state and metadata (never its key material).
    Update {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        key: String,
        #[arg(long)]
        version: u32,
        /// enabled or disabled
        #[arg(long)]
        state: String,
        #[arg(long, default_value = "")]
        metadata: String,
    },
    /// Delete a key and every version of it.
    Delete {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        key: String,
    },
    /// Show a key's versions.
    Describe {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        key: String,
    },
    /// List the partition's keys.
    List {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, default_value_t = 100)]
        limit: u16,
    },
    /// Recreate a deleted key from its single-key backup.
    Restore {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        backup: PathBuf,
    },
}

/// Input and output files of a use (`-` = stdin/stdout).
#[derive(Debug, clap::Args)]
pub struct UseIo {
    #[command(flatten)]
    conn: Conn,
    #[arg(long)]
    key: String,
    #[arg(long, default_value = "")]
    aad: String,
    #[arg(long = "in", default_value = "-")]
    input: PathBuf,
    #[arg(long, default_value = "-")]
    out: PathBuf,
}

pub fn parse_id(s: &str, what: &str) -> Result<[u8; 16], String> {
    let s = s.trim();
    if s.len() != 32 || !s.is_ascii() {
        return Err(format!("{what} {s:?}: expected 32 hex digits"));
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("{what} {s:?}: expected 32 hex digits"))?;
    }
    Ok(out)
}

fn read_input(p: &Path) -> Result<Vec<u8>, String> {
    if p == Path::new("-") {
        let mut b = Vec::new();
        std::io::stdin()
            .read_to_end(&mut b)
            .map_err(|e| format!("stdin: {e}"))?;
        Ok(b)
    } else {
        std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))
    }
}

fn write_output(p: &Path, b: &[u8]) -> Result<(), String> {
    if p == Path::new("-") {
        std::io::stdout()
            .write_all(b)
            .map_err(|e| format!("stdout: {e}"))
    } else {
        std::fs::write(p, b).map_err(|e| format!("{}: {e}", p.display()))
    }
}

fn written(what: &str, w: &KeyWritten) {
    println!(
        "{what} key {} version {} at lsn {}{}",
        hex(&w.key_id),
        w.version,
        w.lsn,
        if w.duplicate {
            " (a retry: the first result)"
        } else {
            ""
        }
    );
}

pub fn partition(cmd: PartitionCmd) -> crate::CmdResult {
    match cmd {
        PartitionCmd::Create {
            conn,
            partition,
            out,
            require_client_cert,
        } => {
            let p = match partition {
                Some(p) => parse_id(&p, "partition")?,
                None => rand::random(),
            };
            let (lsn, cred) = conn
                .client()?
                .create_partition_with(p, require_client_cert)
                .map_err(|e| e.to_string())?;
            cred.write_file(&out)
                .map_err(|e| format!("{}: {e}", out.display()))?;
            println!(
                "partition {} created at lsn {lsn}{}; client credential written to {}",
                hex(&p),
                if require_client_cert {
                    " (clients need a certificate naming it: keyfort tls issue-client)"
                } else {
                    ""
                },
                out.display()
            );
            Ok(())
        }
        PartitionCmd::Credential {
            conn,
            partition,
            out,
        } => {
            let p = parse_id(&partition, "partition")?;
            let cred = conn
                .client()?
                .issue_credential(p)
                .map_err(|e| e.to_string())?;
            cred.write_file(&out)
                .map_err(|e| format!("{}: {e}", out.display()))?;
            println!("credential written to {}", out.display());
            Ok(())
        }
        PartitionCmd::Delete { conn, partition } => {
            let p = parse_id(&partition, "partition")?;
            let lsn = conn
                .client()?
                .delete_partition(p)
                .map_err(|e| e.to_string())?;
            println!("partition {} deleted at lsn {lsn}", hex(&p));
            Ok(())
        }
    }
}

pub fn key(cmd: KeyCmd) -> crate::CmdResult {
    let e = |e: keyfort_net::client::ClientError| e.to_string();
    match cmd {
        KeyCmd::Create {
            conn,
            metadata,
            backup,
            idempotency_id,
        } => {
            let c = conn.client()?;
            let w = match idempotency_id {
                None => c
                    .create_key(metadata.as_bytes(), backup.is_some())
                    .map_err(e)?,
                Some(id) => {
                    let req = keyfort_net::client_proto::Request::KeyCreate {
                        idempotency_id: parse_id(&id, "idempotency id")?,
                        flags: if backup.is_some() {
                            keyfort_net::client_proto::create_flags::BACKUP
                        } else {
                            0
                        },
                        metadata: metadata.into_bytes(),
                    };
                    match c.call(&req).map_err(e)? {
                        keyfort_net::client_proto::Response::KeyWritten(w) => w,
                        other => return Err(format!("unexpected answer {other:?}")),
                    }
                }
            };
            if let Some(path) = backup {
                if w.backup.is_empty() {
                    eprintln!("no backup: this was a retry of a create that already happened");
                } else {
                    std::fs::write(&path, &w.backup)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                }
            }
            written("created", &w);
            Ok(())
        }
        KeyCmd::Rotate {
            conn,
            key,
            replaces,
        } => {
            let w = conn
                .client()?
                .rotate_key(parse_id(&key, "key")?, replaces)
                .map_err(e)?;
            written("rotated", &w);
            Ok(())
        }
        KeyCmd::Update {
            conn,
            key,
            version,
            state,
            metadata,
        } => {
            let state = match state.as_str() {
                "enabled" => KeyStateCode::Enabled,
                "disabled" => KeyStateCode::Disabled,
                s => return Err(format!("state {s:?}: expected enabled or disabled")),
            };
            let w = conn
                .client()?
                .update_key(parse_id(&key, "key")?, version, state, metadata.as_bytes())
                .map_err(e)?;
            written("updated", &w);
            Ok(())
        }
        KeyCmd::Delete { conn, key } => {
            let w = conn
                .client()?
                .delete_key(parse_id(&key, "key")?)
                .map_err(e)?;
            println!(
                "deleted key {} ({} versions) at lsn {}",
                hex(&w.key_id),
                w.version,
                w.lsn
            );
            Ok(())
        }
        KeyCmd::Describe { conn, key } => {
            let vs = conn
                .client()?
                .describe_key(parse_id(&key, "key")?)
                .map_err(e)?;
            for v in vs {
                println!(
                    "version {} {:?} created at lsn {} metadata {:?}",
                    v.version,
                    v.state,
                    v.created_lsn,
                    String::from_utf8_lossy(&v.metadata)
                );
            }
            Ok(())
        }
        KeyCmd::List { conn, limit } => {
            let c = conn.client()?;
            let mut after = None;
            loop {
                let (keys, more) = c.list_keys(after, limit).map_err(e)?;
                for (k, v) in &keys {
                    println!("{} version {v}", hex(k));
                }
                after = keys.last().map(|(k, _)| *k);
                if !more || after.is_none() {
                    return Ok(());
                }
            }
        }
        KeyCmd::Restore { conn, backup } => {
            let b = std::fs::read(&backup).map_err(|e| format!("{}: {e}", backup.display()))?;
            let w = conn.client()?.restore_key(&b).map_err(e)?;
            written("restored", &w);
            Ok(())
        }
    }
}

pub fn encrypt(io: UseIo) -> crate::CmdResult {
    let pt = read_input(&io.input)?;
    let (version, env) = io
        .conn
        .client()?
        .encrypt(parse_id(&io.key, "key")?, io.aad.as_bytes(), &pt)
        .map_err(|e| e.to_string())?;
    write_output(&io.out, &env)?;
    eprintln!("encrypted with version {version}");
    Ok(())
}

pub fn decrypt(io: UseIo) -> crate::CmdResult {
    let env = read_input(&io.input)?;
    let pt = io
        .conn
        .client()?
        .decrypt(parse_id(&io.key, "key")?, io.aad.as_bytes(), &env)
        .map_err(|e| e.to_string())?;
    write_output(&io.out, &pt)
}

/// `keyfort data-key`: the plaintext data key (hex) on stdout, its envelope to `--out`.
pub fn data_key(io: UseIo, len: u8) -> crate::CmdResult {
    let (version, key, env) = io
        .conn
        .client()?
        .generate_data_key(parse_id(&io.key, "key")?, len, io.aad.as_bytes())
        .map_err(|e| e.to_string())?;
    if io.out == Path::new("-") {
        return Err("--out FILE: the envelope needs a file (the data key goes to stdout)".into());
    }
    write_output(&io.out, &env)?;
    println!("{}", hex(&key));
    eprintln!("data key sealed under version {version}");
    Ok(())
}

/// `keyfort cluster admin-credential`: an operator credential made in a card of the realm.
pub fn admin_credential(card: &CardAt, config: &Path, out: &Path) -> crate::CmdResult {
    let bytes = std::fs::read(config).map_err(|e| format!("{}: {e}", config.display()))?;
    let cfg = ClusterConfig::decode(&bytes).map_err(|e| format!("{}: {e}", config.display()))?;
    let mut session = card.session_without_integrity_key()?;
    session
        .import_integrity_key(&cfg.integrity_key_wrapped)
        .map_err(|e| format!("cluster integrity key: {e}"))?;
    let client_id: [u8; 16] = rand::random();
    let secret = crate::service::admin_secret(&session, &client_id).map_err(|e| e.to_string())?;
    Credential {
        scope: Scope::Admin,
        client_id,
        secret,
    }
    .write_file(out)
    .map_err(|e| format!("{}: {e}", out.display()))?;
    println!(
        "admin credential {} of cluster {} written to {}",
        hex(&client_id),
        hex(&cfg.cluster_id),
        out.display()
    );
    Ok(())
}

/// `keyfort cluster status`: every node's view of every shard.
pub fn status(conn: &Conn, json: bool) -> crate::CmdResult {
    let c = conn.client()?;
    let all = c.node_statuses();
    let mut rows = Vec::new();
    let mut nodes = Vec::new();
    for (addr, r) in &all {
        match r {
            Ok(n) => {
                let rc = &n.recovery;
                let phase =
                    |v: u32| (v != keyfort_net::client_proto::RECOVERY_PENDING).then_some(v);
                nodes.push(serde_json::json!({
                    "node": n.node_id, "addr": addr.to_string(),
                    "tier": crate::recovery_report::tier_name(rc.tier),
                    "fetch_ms": rc.fetch_ms, "verify_ms": rc.verify_ms, "open_ms": rc.open_ms,
                    "replay_ms": rc.replay_ms, "catch_up_ms": phase(rc.catch_up_ms),
                }));
                for s in &n.shards {
                    rows.push(serde_json::json!({
                        "node": n.node_id, "addr": addr.to_string(), "shard": s.shard,
                        "role": role_name(s.role), "term": s.term, "leader": s.leader,
                        "commit": s.commit, "applied": s.applied,
                        "snapshot_lsn": s.snapshot_lsn, "digest": format!("{:032x}", u128::from_le_bytes(s.digest)), "keys": s.keys,
                        "archived_lsn": s.archived_lsn, "rpo_ms": s.rpo_ms,
                    }));
                }
            }
            Err(e) => {
                rows.push(serde_json::json!({"addr": addr.to_string(), "error": e.to_string()}))
            }
        }
    }
    if json {
        println!("{}", serde_json::json!({"shards": rows, "nodes": nodes}));
        return Ok(());
    }
    println!(
        "{:<6} {:<22} {:>5} {:<10} {:>6} {:>6} {:>10} {:>10} {:>10} {:>10} {:>7} {:>9} digest",
        "node",
        "addr",
        "shard",
        "role",
        "term",
        "leader",
        "commit",
        "applied",
        "snapshot",
        "archived",
        "rpo_ms",
        "keys"
    );
    for r in rows {
        if let Some(e) = r.get("error") {
            println!(
                "{:<6} {:<22} unreachable: {}",
                "-",
                r["addr"].as_str().unwrap_or(""),
                e
            );
            continue;
        }
        let u = |k: &str| r[k].as_u64().unwrap_or(0);
        println!(
            "{:<6} {:<22} {:>5} {:<10} {:>6} {:>6} {:>10} {:>10} {:>10} {:>10} {:>7} {:>9} {}",
            u("node"),
            r["addr"].as_str().unwrap_or(""),
            u("shard"),
            r["role"].as_str().unwrap_or(""),
            u("term"),
            u("leader"),
            u("commit"),
            u("applied"),
            u("snapshot_lsn"),
            u("archived_lsn"),
            u("rpo_ms"),
            u("keys"),
            r["digest"].as_str().unwrap_or("")
        );
    }
    println!("recovery at each node's last start (ms):");
    for n in nodes {
        let u = |k: &str| {
            n[k].as_u64()
                .map_or("running".to_string(), |v| v.to_string())
        };
        println!(
            "  node {:<4} {:<8} fetch {} verify {} open {} replay {} catch-up {}",
            u("node"),
            n["tier"].as_str().unwrap_or(""),
            u("fetch_ms"),
            u("verify_ms"),
            u("open_ms"),
            u("replay_ms"),
            u("catch_up_ms")
        );
    }
    Ok(())
}

fn role_name(r: u8) -> &'static str {
    match r {
        1 => "follower",
        2 => "candidate",
        3 => "leader",
        4 => "precandidate",
        _ => "?",
    }
}

/// How long `cluster up` waits for every shard to elect a leader.
pub const UP_LEADER_WAIT: Duration = Duration::from_secs(60);

/// `keyfort cluster up N`: a local cluster of N keyfortd processes with their own SoftHSM
/// cards under `dir`, an admin credential, and the lines to export; runs until SIGINT/SIGTERM,
/// then stops every node with SIGTERM.
pub fn up(nodes: u64, shards: u32, dir: &Path, tls: bool) -> crate::CmdResult {
    let (keyfort, keyfortd) = keyfort_bench::local_cluster::binaries_beside_exe()?;
    if dir.exists() {
        return Err(format!(
            "{}: exists; `cluster up` makes a new cluster in a new directory",
            dir.display()
        ));
    }
    let t = Instant::now();
    let mut c = keyfort_bench::local_cluster::LocalCluster::create_with(
        dir,
        &keyfort,
        &keyfortd,
        nodes,
        shards,
        0,
        crate::node::DEFAULT_TICK_MS,
        if tls {
            keyfort_bench::local_cluster::Security::Tls
        } else {
            keyfort_bench::local_cluster::Security::InsecureLoopback
        },
    )?;
    c.start_all()?;
    let ready = c.wait_for(UP_LEADER_WAIT, |c| {
        (0..c.shards).all(|s| c.leader(s).is_some())
    });
    if !ready {
        return Err(format!(
            "no leader for every shard within {UP_LEADER_WAIT:?}; logs in {}/node-*/keyfortd.log",
            dir.display()
        ));
    }
    let cred = c.admin_credential(&keyfort)?;
    let addrs: Vec<String> = c.client_addrs().iter().map(|a| a.to_string()).collect();
    println!(
        "cluster up: {nodes} nodes, {shards} shards, in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    println!("export KEYFORT_NODES={}", addrs.join(","));
    println!("export KEYFORT_CREDENTIAL={}", cred.display());
    match c.ca_file() {
        Some(ca) => println!("export KEYFORT_CA={}", ca.display()),
        None => println!("(plaintext on 127.0.0.1: pass --insecure-loopback to keyfort)"),
    }
    println!("(SIGINT or SIGTERM stops every node)");
    crate::signals::install();
    while !crate::signals::terminate_requested() {
        for i in 0..c.nodes.len() {
            if let Some(st) = c.exited(i) {
                return Err(format!("node {} exited: {st}", i + 1));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for i in 0..c.nodes.len() {
        c.sigterm(i, Duration::from_secs(10));
    }
    println!("cluster stopped");
    Ok(())
}
