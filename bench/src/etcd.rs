//! etcd side by side (issue 8): a 3-member etcd 3.4 cluster on 127.0.0.1 ([`EtcdCluster`]), a
//! load-generator [`Target`] over the `etcd-client` crate ([`EtcdTarget`]), etcd's snapshot
//! restore timed to its first read ([`etcd_restore_to_first_read`]) and keyfort's counterpart,
//! a node's local-tier restart timed to its first read ([`keyfort_restart_to_first_read`]).
//!
//! **etcd settings.** Debian's `etcd-server` 3.4 (`/usr/bin/etcd`) with its defaults —
//! heartbeat 100 ms, election timeout 1 s, `--snapshot-count` 100,000, fsync of the WAL and the
//! backend on every commit (never `--unsafe-no-fsync`: keyfort fsyncs its log too), no
//! auto-compaction, `--max-txn-ops` 128, `--max-request-bytes` 1.5 MiB, `GOMAXPROCS` = every
//! core — except:
//! - `--quota-backend-bytes` [`QUOTA_BACKEND_BYTES`] (8 GiB, the most etcd recommends) instead
//!   of 2 GiB: a million 4 KiB values are over 4 GB, and the default quota would stop the load
//!   with `NOSPACE`; keyfort has no such cap, and the quota does not change etcd's speed.
//! - `--logger zap --log-level warn`: 3.4's non-deprecated logger, quiet, so logging a line per
//!   request or per snapshot costs neither side CPU (keyfortd logs at warn too).
//! - listeners and advertised URLs on 127.0.0.1 free ports ([`free_ports`]), a fresh cluster
//!   token per cluster, each member's stderr in `<root>/<name>.log`.
//!
//! Every member is a process of this one; [`EtcdCluster::stop`] (also on drop) sends SIGTERM,
//! waits [`STOP_GRACE`] and then kills what is left, so nothing outlives the cluster.

use crate::local_cluster::{free_ports, LocalCluster, STATUS_POLL};
use crate::target::{Op, Target, Ticket};
use etcd_client::{Client, ConnectOptions, GetOptions, KvClient, Txn, TxnOp};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The etcd server (Debian `etcd-server`).
pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// etcd's command-line client (Debian `etcd-client`), used for snapshot save and restore.
pub const ETCDCTL_BIN: &str = "/usr/bin/etcdctl";
/// Members of an [`EtcdCluster`] (keyfort's local clusters have three nodes too).
pub const ETCD_MEMBERS: usize = 3;
/// Backend quota of every member (see the module comment).
pub const QUOTA_BACKEND_BYTES: u64 = 8 << 30;
/// Prefix of every key the bench writes.
pub const KEY_PREFIX: &str = "kf/";
/// How long a cluster may take to answer a linearizable read on every member.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long [`EtcdCluster::stop`] waits after SIGTERM before it kills.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// Puts per transaction when loading (etcd's default `--max-txn-ops`).
pub const LOAD_TXN_OPS: u64 = 128;
/// Transactions in flight at once when loading.
pub const LOAD_IN_FLIGHT: usize = 16;
/// Longest one request may take before it counts as failed (readiness probes, loads).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Probe interval while waiting for a cluster or a restored member.
const PROBE_EVERY: Duration = Duration::from_millis(10);

/// The etcd key of the bench's key number `key`.
pub fn etcd_key(key: u64) -> String {
    format!("{KEY_PREFIX}{key:016x}")
}

/// Whether this machine has etcd and etcdctl (Debian `etcd-server` and `etcd-client`).
pub fn etcd_installed() -> bool {
    Path::new(ETCD_BIN).exists() && Path::new(ETCDCTL_BIN).exists()
}

fn rt(workers: usize) -> Result<tokio::runtime::Runtime, String> {
    let mut b = if workers == 0 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers).thread_name("etcd-client");
        b
    };
    b.enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))
}

/// The error's name as the load generator files it (`Unavailable`, `DeadlineExceeded`, ...).
pub fn error_name(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => format!("{:?}", s.code()),
        etcd_client::Error::TransportError(_) => "Unavailable".to_string(),
        etcd_client::Error::IoError(_) => "Io".to_string(),
        _ => "Error".to_string(),
    }
}

async fn connect(endpoint: &str) -> Result<KvClient, String> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(REQUEST_TIMEOUT);
    Client::connect([endpoint], Some(opts))
        .await
        .map(|c| c.kv_client())
        .map_err(|e| format!("etcd {endpoint}: {e}"))
}

/// One member: its name, data dir, ports and process.
pub struct EtcdMember {
    pub name: String,
    pub data_dir: PathBuf,
    pub client_port: u16,
    pub peer_port: u16,
    child: Option<Child>,
}

impl EtcdMember {
    pub fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// The member's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// A 3-member etcd cluster of child processes on 127.0.0.1 (see the module comment).
pub struct EtcdCluster {
    pub root: PathBuf,
    pub members: Vec<EtcdMember>,
    token: String,
}

impl EtcdCluster {
    /// Starts a new cluster with data dirs `<root>/m1..m3` and waits until every member
    /// answers a linearizable read.
    pub fn start(root: &Path) -> Result<EtcdCluster, String> {
        if !Path::new(ETCD_BIN).exists() {
            return Err(format!(
                "{ETCD_BIN} not found: apt-get install etcd-server etcd-client"
            ));
        }
        std::fs::create_dir_all(root).map_err(|e| format!("{}: {e}", root.display()))?;
        let ports = free_ports(2 * ETCD_MEMBERS)?;
        let members = (0..ETCD_MEMBERS)
            .map(|i| EtcdMember {
                name: format!("m{}", i + 1),
                data_dir: root.join(format!("m{}", i + 1)),
                client_port: ports[i],
                peer_port: ports[ETCD_MEMBERS + i],
                child: None,
            })
            .collect();
        let mut c = EtcdCluster {
            root: root.to_path_buf(),
            members,
            token: format!("kf-bench-{:08x}", rand::random::<u32>()),
        };
        c.spawn_all()?;
        c.wait_ready(START_TIMEOUT)?;
        Ok(c)
    }

    /// `m1=http://127.0.0.1:P1,...`: every member's peer URL.
    pub fn initial_cluster(&self) -> String {
        let m: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect();
        m.join(",")
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::client_url).collect()
    }

    /// Starts every member's process over its data dir (a new member when the dir is empty).
    pub fn spawn_all(&mut self) -> Result<(), String> {
        let initial = self.initial_cluster();
        for m in &mut self.members {
            let log_path = self.root.join(format!("{}.log", m.name));
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|e| format!("{}: {e}", log_path.display()))?;
            let (client, peer) = (m.client_url(), m.peer_url());
            let child = Command::new(ETCD_BIN)
                .args(["--name", &m.name, "--data-dir"])
                .arg(&m.data_dir)
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-token", &self.token])
                .args(["--initial-cluster-state", "new"])
                .args(["--quota-backend-bytes", &QUOTA_BACKEND_BYTES.to_string()])
                .args(["--logger", "zap", "--log-outputs", "stderr"])
                .args(["--log-level", "warn"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(|e| format!("{ETCD_BIN}: {e}"))?;
            m.child = Some(child);
        }
        Ok(())
    }

    /// Error naming the first member whose process exited by itself, if one did.
    fn check_alive(&mut self) -> Result<(), String> {
        for m in &mut self.members {
            if let Some(c) = m.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    m.child = None;
                    return Err(format!(
                        "etcd member {} exited ({st}); see {}",
                        m.name,
                        self.root.join(format!("{}.log", m.name)).display()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Waits until every member answers a linearizable read itself.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let rt = rt(0)?;
        let t = Instant::now();
        for ep in self.endpoints() {
            loop {
                self.check_alive()?;
                let ok = rt.block_on(async {
                    let mut kv = connect(&ep).await?;
                    kv.get(format!("{KEY_PREFIX}ready"), None)
                        .await
                        .map_err(|e| e.to_string())
                });
                match ok {
                    Ok(_) => break,
                    Err(e) if t.elapsed() > timeout => {
                        return Err(format!("etcd {ep} not ready within {timeout:?}: {e}"))
                    }
                    Err(_) => std::thread::sleep(PROBE_EVERY),
                }
            }
        }
        Ok(())
    }

    /// Stops the members one after another: SIGTERM, up to [`STOP_GRACE`] for it to exit, then
    /// SIGKILL; every process is waited for. One at a time because a leader given SIGTERM
    /// first hands its leadership to a follower, and waits up to 7 s when every follower is
    /// exiting too. Returns the members that had to be killed.
    pub fn stop(&mut self) -> Vec<String> {
        let mut killed = Vec::new();
        for m in &mut self.members {
            let Some(mut c) = m.child.take() else {
                continue;
            };
            // SAFETY: kill(2) on our own child's pid (not yet waited for, so not reused).
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
            let t = Instant::now();
            loop {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    break;
                }
                if t.elapsed() > STOP_GRACE {
                    let _ = c.kill();
                    let _ = c.wait();
                    killed.push(m.name.clone());
                    break;
                }
                std::thread::sleep(PROBE_EVERY);
            }
        }
        killed
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The load generator's [`Target`] over etcd: its own tokio runtime, `connections` gRPC
/// clients spread over the members (connection `i` talks to member `i % members`), and values
/// of `value_size` bytes.
pub struct EtcdTarget {
    rt: tokio::runtime::Runtime,
    clients: Vec<KvClient>,
    value: Arc<Vec<u8>>,
}

/// The answer of one started etcd request: the outcome and the instant the client saw it.
type Answer = (Result<(), String>, Instant);

struct EtcdTicket(Receiver<Answer>);

impl Ticket for EtcdTicket {
    fn wait(self: Box<Self>, timeout: Duration) -> (Result<(), String>, Option<Instant>) {
        match self.0.recv_timeout(timeout) {
            Ok((r, at)) => (r, Some(at)),
            Err(RecvTimeoutError::Timeout) => (Err("Timeout".to_string()), None),
            Err(RecvTimeoutError::Disconnected) => (Err("Closed".to_string()), None),
        }
    }
}

impl EtcdTarget {
    /// Connects `connections` clients over `endpoints` with a runtime of `workers` threads
    /// (1 or 2 on a 2-core machine: the servers need the cores too).
    pub fn connect(
        endpoints: &[String],
        connections: usize,
        value_size: usize,
        workers: usize,
    ) -> Result<EtcdTarget, String> {
        if endpoints.is_empty() || connections == 0 {
            return Err("etcd target: no endpoints or no connections".to_string());
        }
        let rt = rt(workers.max(1))?;
        let clients = rt.block_on(async {
            let mut out = Vec::with_capacity(connections);
            for i in 0..connections {
                out.push(connect(&endpoints[i % endpoints.len()]).await?);
            }
            Ok::<_, String>(out)
        })?;
        Ok(EtcdTarget {
            rt,
            clients,
            value: Arc::new(vec![0x6b; value_size]),
        })
    }

    /// Puts keys `range` with values of the target's size in transactions of
    /// [`LOAD_TXN_OPS`] puts, [`LOAD_IN_FLIGHT`] at once over every connection.
    pub fn load(&self, range: std::ops::Range<u64>) -> Result<(), String> {
        let batches: Vec<std::ops::Range<u64>> = range
            .clone()
            .step_by(LOAD_TXN_OPS as usize)
            .map(|s| s..(s + LOAD_TXN_OPS).min(range.end))
            .collect();
        self.rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for (i, b) in batches.into_iter().enumerate() {
                if set.len() >= LOAD_IN_FLIGHT {
                    set.join_next()
                        .await
                        .ok_or("no task")?
                        .map_err(|e| e.to_string())??;
                }
                let mut kv = self.clients[i % self.clients.len()].clone();
                let value = self.value.clone();
                set.spawn(async move {
                    let ops: Vec<TxnOp> = b
                        .clone()
                        .map(|k| TxnOp::put(etcd_key(k), value.as_slice(), None))
                        .collect();
                    kv.txn(Txn::new().and_then(ops))
                        .await
                        .map(drop)
                        .map_err(|e| format!("etcd load of keys {b:?}: {e}"))
                });
            }
            while let Some(r) = set.join_next().await {
                r.map_err(|e| e.to_string())??;
            }
            Ok(())
        })
    }

    /// How many keys under [`KEY_PREFIX`] the cluster holds (a linearizable count).
    pub fn count(&self) -> Result<u64, String> {
        let mut kv = self.clients[0].clone();
        self.rt.block_on(async {
            let opts = GetOptions::new().with_prefix().with_count_only();
            kv.get(KEY_PREFIX, Some(opts))
                .await
                .map(|r| r.count() as u64)
                .map_err(|e| format!("etcd count: {e}"))
        })
    }
}

impl Target for EtcdTarget {
    fn name(&self) -> &str {
        "etcd"
    }

    fn connections(&self) -> usize {
        self.clients.len()
    }

    fn preload(&self, keys: u64) -> Result<(), String> {
        self.load(0..keys)
    }

    fn start(&self, conn: usize, op: Op) -> Result<Box<dyn Ticket>, String> {
        let mut kv = self.clients[conn % self.clients.len()].clone();
        let value = self.value.clone();
        let (tx, rx) = sync_channel(1);
        self.rt.spawn(async move {
            let r = match op {
                Op::Create { key } => kv
                    .put(etcd_key(key), value.as_slice(), None)
                    .await
                    .map(drop),
                Op::Encrypt { key } | Op::Decrypt { key } => {
                    kv.get(etcd_key(key), None).await.and_then(|r| {
                        if r.kvs().is_empty() {
                            Err(etcd_client::Error::InvalidArgs("NotFound".into()))
                        } else {
                            Ok(())
                        }
                    })
                }
                Op::Delete { key } => kv.delete(etcd_key(key), None).await.and_then(|r| {
                    if r.deleted() == 0 {
                        Err(etcd_client::Error::InvalidArgs("NotFound".into()))
                    } else {
                        Ok(())
                    }
                }),
            };
            let at = Instant::now();
            let r = r.map_err(|e| match e {
                etcd_client::Error::InvalidArgs(name) => name,
                e => error_name(&e),
            });
            let _ = tx.send((r, at));
        });
        Ok(Box::new(EtcdTicket(rx)))
    }
}

fn run_etcdctl(args: &[&str], what: &str) -> Result<String, String> {
    let out = Command::new(ETCDCTL_BIN)
        .args(args)
        .env("ETCDCTL_API", "3")
        .output()
        .map_err(|e| format!("{ETCDCTL_BIN}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "etcdctl {what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Bytes `path` (a file, or a directory and everything under it) takes on disk (allocated
/// blocks: etcd preallocates its WAL files).
fn du(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    own + std::fs::read_dir(path)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| du(&e.path())).sum::<u64>())
        .unwrap_or(0)
}

/// Disk bytes [`etcd_restore_to_first_read`] needs at its peak (three members' backends and
/// WALs, then the snapshot beside them), estimated from a 20,000-key run with 4 KiB values:
/// 9.4 KB of member data and 6.2 KB of snapshot per key, i.e. about 8 × (value + 200 B) per
/// key in all; plus 1 GiB (preallocated WAL files, margin).
pub fn etcd_restore_disk_estimate(keys: u64, value_size: usize) -> u64 {
    keys.saturating_mul((value_size as u64 + 200) * 8)
        .saturating_add(1 << 30)
}

/// Bytes available to this user on the file system holding `path` (or its nearest existing
/// parent).
pub fn free_disk_bytes(path: &Path) -> Option<u64> {
    let dir = path.ancestors().find(|p| p.exists())?;
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs(3) fills the zeroed struct for a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0).then(|| st.f_bavail * st.f_frsize)
}

/// What [`etcd_restore_to_first_read`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct EtcdRestore {
    pub keys: u64,
    pub value_size: usize,
    /// Loading the keys (not part of the restore).
    pub load_s: f64,
    /// `etcdctl snapshot save` (not part of the restore) and the file's size.
    pub snapshot_save_s: f64,
    pub snapshot_bytes: u64,
    /// Bytes of one member's data dir before the snapshot (backend and WAL).
    pub member_data_bytes: u64,
    /// `etcdctl snapshot restore` of the three members, run at once (one per machine in a
    /// real cluster).
    pub restore_s: f64,
    /// From starting the three members to the first successful linearizable read of a known
    /// key (on member 1).
    pub start_to_first_read_s: f64,
    /// `restore_s + start_to_first_read_s`.
    pub total_s: f64,
    /// Keys the restored cluster holds (checked equal to `keys`).
    pub restored_keys: u64,
}

/// etcd's 1M-key restore: a cluster under `root` loaded with `keys` keys of `value_size` bytes,
/// `etcdctl snapshot save`, every member stopped and its data dir removed; then timed:
/// `etcdctl snapshot restore` for every member (new data dirs, the same initial cluster) and
/// the three members started until a linearizable read of key 0 succeeds. Checks that the
/// restored cluster holds exactly `keys` keys.
pub fn etcd_restore_to_first_read(
    root: &Path,
    keys: u64,
    value_size: usize,
) -> Result<EtcdRestore, String> {
    let _ = std::fs::remove_dir_all(root);
    let mut c = EtcdCluster::start(&root.join("load"))?;
    let target = EtcdTarget::connect(&c.endpoints(), ETCD_MEMBERS, value_size, 1)?;
    let t = Instant::now();
    target.load(0..keys)?;
    let load_s = t.elapsed().as_secs_f64();
    let snap = root.join("snapshot.db");
    let snap_s = snap.to_string_lossy().into_owned();
    let t = Instant::now();
    let endpoint = c.members[0].client_url();
    run_etcdctl(
        &["--endpoints", &endpoint, "snapshot", "save", &snap_s],
        "snapshot save",
    )?;
    let snapshot_save_s = t.elapsed().as_secs_f64();
    let snapshot_bytes = du(&snap);
    let member_data_bytes = du(&c.members[0].data_dir);
    drop(target);
    c.stop();
    for m in &mut c.members {
        std::fs::remove_dir_all(&m.data_dir)
            .map_err(|e| format!("{}: {e}", m.data_dir.display()))?;
        m.data_dir = root.join("restored").join(&m.name);
    }

    let t0 = Instant::now();
    let initial = c.initial_cluster();
    let restores: Vec<Child> = c
        .members
        .iter()
        .map(|m| {
            Command::new(ETCDCTL_BIN)
                .env("ETCDCTL_API", "3")
                .args(["snapshot", "restore", &snap_s, "--name", &m.name])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-token", &c.token])
                .args(["--initial-advertise-peer-urls", &m.peer_url()])
                .arg("--data-dir")
                .arg(&m.data_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("{ETCDCTL_BIN}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    for r in restores {
        let out = r.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "etcdctl snapshot restore: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    let restore_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    c.spawn_all()?;
    let rt = rt(0)?;
    let ep = c.members[0].client_url();
    loop {
        c.check_alive()?;
        let read = rt.block_on(async {
            let mut kv = connect(&ep).await?;
            kv.get(etcd_key(0), None).await.map_err(|e| e.to_string())
        });
        match read {
            Ok(r) if !r.kvs().is_empty() => break,
            Ok(_) => return Err("restored etcd: key 0 not found".to_string()),
            Err(e) if t1.elapsed() > START_TIMEOUT => {
                return Err(format!(
                    "restored etcd: no read within {START_TIMEOUT:?}: {e}"
                ))
            }
            Err(_) => std::thread::sleep(PROBE_EVERY),
        }
    }
    let start_to_first_read_s = t1.elapsed().as_secs_f64();
    let total_s = t0.elapsed().as_secs_f64();
    let restored_keys = EtcdTarget::connect(&c.endpoints(), 1, 0, 1)?.count()?;
    c.stop();
    if restored_keys != keys {
        return Err(format!(
            "restored etcd holds {restored_keys} keys, {keys} were loaded"
        ));
    }
    Ok(EtcdRestore {
        keys,
        value_size,
        load_s,
        snapshot_save_s,
        snapshot_bytes,
        member_data_bytes,
        restore_s,
        start_to_first_read_s,
        total_s,
        restored_keys,
    })
}

/// What [`keyfort_restart_to_first_read`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct KeyfortRestart {
    pub keys: u64,
    /// The bulk load (through raft and node 1's card), not part of the restart.
    pub load_s: f64,
    /// Per shard, the LSN of the snapshot the node restarted over.
    pub snapshot_lsns: Vec<u64>,
    /// From the SIGKILL until the node's status shows the pre-kill commit applied with the
    /// cluster's digest on every shard.
    pub caught_up_s: f64,
    /// From the SIGKILL until the node answered a read (a key describe) on its client port:
    /// the figure beside etcd's `total_s` (the drill's `local_s`).
    pub total_s: f64,
}

/// keyfortd's default raft tick (`tools::node::DEFAULT_TICK_MS`).
const KEYFORT_TICK_MS: u64 = 25;
/// keyfortd's `status_ms` here: the restart is read off `status.json`.
const KEYFORT_STATUS_MS: u64 = 10;
/// Longest the bulk load, a settle or the restart may take.
const KEYFORT_STEP_TIMEOUT: Duration = Duration::from_secs(3600);
const KEYFORT_SHARDS: u32 = 2;
const KEYFORT_PARTITIONS: u32 = 100;

/// Polls until `f` holds; fails when a node exits, the bulk load fails, or
/// [`KEYFORT_STEP_TIMEOUT`] passes.
fn wait_keyfort(
    c: &mut LocalCluster,
    what: &str,
    f: impl Fn(&LocalCluster) -> bool,
) -> Result<(), String> {
    let t = Instant::now();
    while !f(c) {
        let failed = c.nodes[0].data_dir.join("bulk-load.error").exists()
            || (0..c.nodes.len()).any(|i| c.exited(i).is_some());
        if failed || t.elapsed() > KEYFORT_STEP_TIMEOUT {
            return Err(format!(
                "keyfort: {what}: failed (see {})",
                c.root.display()
            ));
        }
        std::thread::sleep(STATUS_POLL);
    }
    Ok(())
}

/// keyfort's counterpart of [`etcd_restore_to_first_read`], the local tier of `keyfort drill`:
/// a 3-node cluster under `root` (binaries `keyfort`, `keyfortd`) loaded with `keys` real keys
/// by node 1's bulk loader with compaction off, then every node restarted with compaction on
/// (half a shard's keys) until each holds a snapshot of every shard at the loaded LSN; then
/// timed: a node leading no shard is SIGKILLed and started again, until it caught up with the
/// pre-kill commit and digest and answered a read on its own client port.
pub fn keyfort_restart_to_first_read(
    root: &Path,
    keyfort: &Path,
    keyfortd: &Path,
    keys: u64,
) -> Result<KeyfortRestart, String> {
    use crate::bulk::{bulk_key_header, bulk_partition};
    use keyfort_net::client::{Client, ClientOptions, Credential};
    use keyfort_net::client_proto::{Request, Response};
    let _ = std::fs::remove_dir_all(root);
    let mut c = LocalCluster::create(
        root,
        keyfort,
        keyfortd,
        3,
        KEYFORT_SHARDS,
        0,
        KEYFORT_TICK_MS,
    )?;
    c.configure(|v| {
        v["compaction_records"] = serde_json::json!(1u64 << 50);
        v["status_ms"] = serde_json::json!(KEYFORT_STATUS_MS);
    })?;
    c.configure_node(0, |v| {
        v["bulk_load"] = serde_json::json!({
            "keys": keys, "partitions": KEYFORT_PARTITIONS, "in_flight": 1024, "card_threads": 2,
        });
    })?;
    c.start_all()?;
    let report = c.nodes[0].data_dir.join("bulk-load.json");
    wait_keyfort(&mut c, "bulk load", |_| report.exists())?;
    let v: serde_json::Value = std::fs::read_to_string(&report)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .ok_or("keyfort: unreadable bulk-load.json")?;
    let load_s = v["total_s"].as_f64().unwrap_or(0.0);
    let loaded: Vec<u64> = v["last_index"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
        .unwrap_or_default();
    let records = (loaded.iter().copied().min().unwrap_or(1) / 2).max(1);
    c.configure_node(0, |v| {
        if let Some(o) = v.as_object_mut() {
            o.remove("bulk_load");
        }
    })?;
    c.configure(|v| v["compaction_records"] = serde_json::json!(records))?;
    for i in 0..c.nodes.len() {
        if c.sigterm(i, Duration::from_secs(30)).is_none() {
            c.kill9(i);
        }
    }
    c.start_all()?;
    // Every node applied the load with the same digests and holds a snapshot at it.
    let settled = |c: &LocalCluster| {
        let st: Vec<_> = (0..c.nodes.len()).filter_map(|i| c.status(i)).collect();
        st.len() == c.nodes.len()
            && st.iter().all(|s| {
                s.iter().zip(&st[0]).zip(&loaded).all(|((a, b), l)| {
                    a.applied >= *l
                        && a.snapshot >= *l
                        && (a.applied, &a.digest) == (b.applied, &b.digest)
                })
            })
    };
    wait_keyfort(&mut c, "snapshots on every node", settled)?;
    let victim = c.follower().ok_or("keyfort: no follower")?;
    let target: Vec<(u64, String)> = c
        .status((victim + 1) % c.nodes.len())
        .ok_or("keyfort: no status")?
        .into_iter()
        .map(|s| (s.applied, s.digest))
        .collect();
    let admin = Credential::read_file(&c.admin_credential(keyfort)?).map_err(|e| e.to_string())?;
    let opts = ClientOptions {
        request_timeout: Duration::from_secs(60),
        ..ClientOptions::default()
    };
    let admin =
        Client::connect(c.client_addrs(), admin, opts.clone()).map_err(|e| e.to_string())?;
    let cred = admin
        .issue_credential(bulk_partition(0).0)
        .map_err(|e| e.to_string())?;
    let client = Client::connect(c.client_addrs(), cred, opts).map_err(|e| e.to_string())?;
    let read = Request::KeyDescribe {
        key_id: bulk_key_header(0, KEYFORT_PARTITIONS).key_id.0,
    };

    let t0 = Instant::now();
    c.kill9(victim);
    // The dead process's last status must not read as the new one's.
    let _ = std::fs::remove_file(c.nodes[victim].data_dir.join("status.json"));
    c.start(victim)?;
    wait_keyfort(&mut c, "restarted node caught up", |c| {
        c.status(victim).is_some_and(|st| {
            st.iter().zip(&target).all(|(s, (lsn, digest))| {
                s.applied > *lsn || (s.applied == *lsn && s.digest == *digest)
            })
        })
    })?;
    let caught_up_s = t0.elapsed().as_secs_f64();
    match client.call_on(victim, &read) {
        Ok(Response::Described { versions, .. }) if !versions.is_empty() => {}
        other => return Err(format!("keyfort: read on the restarted node: {other:?}")),
    }
    let total_s = t0.elapsed().as_secs_f64();
    let snapshot_lsns = c
        .status(victim)
        .map(|st| st.iter().map(|s| s.snapshot).collect())
        .unwrap_or_default();
    c.kill_all();
    Ok(KeyfortRestart {
        keys,
        load_s,
        snapshot_lsns,
        caught_up_s,
        total_s,
    })
}
