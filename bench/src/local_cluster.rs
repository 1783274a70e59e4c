//! A local cluster of real `keyfortd` processes on 127.0.0.1, each with its own SoftHSM card:
//! what the demo and the multi-process tests drive. Everything goes through the operator's
//! commands (`keyfort card ...`, `keyfort cluster init/bootstrap`) and the node's config file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long `wait_for` polls status files before giving up.
pub const STATUS_POLL: Duration = Duration::from_millis(50);

pub struct Node {
    pub id: u64,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub peer_addr: String,
    /// The node's client listener (docs/format.md §8).
    pub client_addr: std::net::SocketAddr,
    pub child: Option<Child>,
}

pub struct LocalCluster {
    pub root: PathBuf,
    pub keyfortd: PathBuf,
    pub nodes: Vec<Node>,
    pub shards: u32,
    pub security: Security,
}

/// How a local cluster's nodes talk: TLS (the cluster CA made at `cluster init`, in
/// `<root>/tls`), or plaintext on 127.0.0.1 (`insecure_loopback`: tests and measurements).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    Tls,
    InsecureLoopback,
}

/// One shard's line of a node's `status.json`.
#[derive(Clone, Debug, Default)]
pub struct ShardStatus {
    pub role: String,
    pub term: u64,
    pub leader: u64,
    pub commit: u64,
    pub applied: u64,
    pub digest: String,
    pub partitions: u64,
    /// First LSN the node's log still holds.
    pub log_first: u64,
    /// LSN of the snapshot under its state (0: none).
    pub snapshot: u64,
    /// The shard's raft membership as this node applied it.
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

fn run(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `keyfort` and `keyfortd` beside the running executable (a benchmark run by `cargo run
/// --release` finds the release binaries), or an error saying how to build them.
pub fn binaries_beside_exe() -> Result<(PathBuf, PathBuf), String> {
    let bin = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .parent()
        .ok_or("exe has no directory")?
        .to_path_buf();
    let (keyfort, keyfortd) = (bin.join("keyfort"), bin.join("keyfortd"));
    if !keyfortd.exists() || !keyfort.exists() {
        return Err(format!(
            "{} and keyfort not built: run `cargo build --release -p keyfort-tools` first",
            keyfortd.display()
        ));
    }
    Ok((keyfort, keyfortd))
}

/// Copies a failed test's cluster dir `root` (data dirs, node logs) to a fresh directory
/// under the temp dir, where it survives the test, and returns that path for the message.
pub fn keep_failed(root: &Path) -> String {
    let to = std::env::temp_dir().join(format!(
        "keyfort-failed-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let _ = Command::new("cp").arg("-a").arg(root).arg(&to).status();
    to.display().to_string()
}

/// Lowest port [`free_ports`] hands out.
pub const LISTEN_PORT_MIN: u16 = 10_000;
/// Ports tried per port wanted before [`free_ports`] gives up.
pub const LISTEN_PORT_TRIES: usize = 200;

/// The kernel's ephemeral port range (`ip_local_port_range`), Linux's default when unreadable.
fn ephemeral_ports() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|x| x.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// Free ports on 127.0.0.1 for node listeners, chosen *below* the ephemeral range: a port
/// from that range can be taken, while its node is down or restarting, by any outgoing
/// connection's automatic bind (a peer dialing at start), and the node then fails to listen
/// (`Address already in use`). Each is bound and released here; another process could still
/// take it meanwhile.
pub fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    let (low, _) = ephemeral_ports();
    let hi = low.max(LISTEN_PORT_MIN + 1000);
    let mut out: Vec<u16> = Vec::with_capacity(n);
    for _ in 0..n * LISTEN_PORT_TRIES {
        if out.len() == n {
            break;
        }
        let p = rand::Rng::gen_range(&mut rand::thread_rng(), LISTEN_PORT_MIN..hi);
        if !out.contains(&p) && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            out.push(p);
        }
    }
    if out.len() < n {
        return Err(format!(
            "no {n} free ports in {LISTEN_PORT_MIN}..{hi} after {} tries",
            n * LISTEN_PORT_TRIES
        ));
    }
    Ok(out)
}

impl LocalCluster {
    /// [`Self::create_with`] plaintext on loopback ([`Security::InsecureLoopback`]).
    pub fn create(
        root: &Path,
        keyfort: &Path,
        keyfortd: &Path,
        nodes: u64,
        shards: u32,
        synthetic_in_flight: usize,
        tick_ms: u64,
    ) -> Result<LocalCluster, String> {
        Self::create_with(
            root,
            keyfort,
            keyfortd,
            nodes,
            shards,
            synthetic_in_flight,
            tick_ms,
            Security::InsecureLoopback,
        )
    }

    /// Cards (one realm), the cluster (integrity key and TLS CA made on node 1's card), every
    /// node's data dir and config. `keyfort` and `keyfortd` are the binaries to run.
    #[allow(clippy::too_many_arguments)]
    pub fn create_with(
        root: &Path,
        keyfort: &Path,
        keyfortd: &Path,
        nodes: u64,
        shards: u32,
        synthetic_in_flight: usize,
        tick_ms: u64,
        security: Security,
    ) -> Result<LocalCluster, String> {
        let io = |e: std::io::Error| format!("{}: {e}", root.display());
        std::fs::create_dir_all(root).map_err(io)?;
        let pin = root.join("user.pin");
        let so_pin = root.join("so.pin");
        std::fs::write(&pin, hex_random()).map_err(io)?;
        std::fs::write(&so_pin, hex_random()).map_err(io)?;
        let card = |args: &[&str]| {
            run(
                Command::new(keyfort)
                    .arg("card")
                    .args(args)
                    .env("KEYFORT_PIN_FILE", &pin)
                    .env("KEYFORT_SO_PIN_FILE", &so_pin),
                &format!("keyfort card {}", args[0]),
            )
        };
        let s = |p: &Path| p.to_string_lossy().into_owned();
        let kit = root.join("kit");
        card(&["ceremony-kit", "--out", &s(&kit), "--realm", "local-realm"])?;
        let all = free_ports(2 * nodes as usize)?;
        let (ports, client_ports) = all.split_at(nodes as usize);
        let mut members = Vec::new();
        let mut out = Vec::new();
        for ((i, port), client_port) in (1..=nodes).zip(ports).zip(client_ports) {
            let dir = root.join(format!("node-{i}"));
            let token_dir = dir.join("card");
            let label = format!("node-{i}");
            card(&[
                "init",
                "--token-dir",
                &s(&token_dir),
                "--label",
                &label,
                "--kit",
                &s(&kit),
            ])?;
            let peer_addr = format!("127.0.0.1:{port}");
            members.push(format!("{i}={peer_addr}"));
            let seeds: Vec<String> = ports
                .iter()
                .filter(|p| *p != port)
                .map(|p| format!("127.0.0.1:{p}"))
                .collect();
            let data_dir = dir.join("data");
            let config = dir.join("keyfortd.json");
            let client_addr: std::net::SocketAddr = ([127, 0, 0, 1], *client_port).into();
            let mut cfg = serde_json::json!({
                "data_dir": data_dir,
                "peer_listen": peer_addr,
                "client_listen": client_addr,
                "card": { "token_dir": token_dir, "label": label, "pin_file": pin },
                "tick_ms": tick_ms,
                "synthetic_in_flight": synthetic_in_flight,
                "seed_peers": seeds,
            });
            match security {
                Security::Tls => cfg["tls"] = serde_json::json!({ "dir": root.join("tls") }),
                Security::InsecureLoopback => cfg["insecure_loopback"] = true.into(),
            }
            std::fs::write(&config, cfg.to_string()).map_err(io)?;
            out.push(Node {
                id: i,
                data_dir,
                config,
                peer_addr,
                client_addr,
                child: None,
            });
        }
        let cluster_cfg = root.join("cluster-config");
        let mut init = Command::new(keyfort);
        init.args(["cluster", "init", "--token-dir"])
            .arg(root.join("node-1/card"))
            .args([
                "--label",
                "node-1",
                "--shards",
                &shards.to_string(),
                "--out",
            ])
            .arg(&cluster_cfg)
            .env("KEYFORT_PIN_FILE", &pin);
        for m in &members {
            init.args(["--member", m]);
        }
        run(&mut init, "keyfort cluster init")?;
        for n in &out {
            run(
                Command::new(keyfort)
                    .args(["cluster", "bootstrap", "--config"])
                    .arg(&cluster_cfg)
                    .args(["--node-id", &n.id.to_string(), "--data-dir"])
                    .arg(&n.data_dir),
                "keyfort cluster bootstrap",
            )?;
        }
        Ok(LocalCluster {
            root: root.to_path_buf(),
            keyfortd: keyfortd.to_path_buf(),
            nodes: out,
            shards,
            security,
        })
    }

    /// The cluster's TLS directory (`cluster init` made it beside the cluster config).
    pub fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }

    /// The CA certificate clients trust, when the cluster runs TLS.
    pub fn ca_file(&self) -> Option<PathBuf> {
        (self.security == Security::Tls).then(|| self.tls_dir().join("ca.pem"))
    }

    /// What a client library user passes in `ClientOptions::tls` to reach this cluster: the
    /// cluster CA (server authentication), or none for the insecure loopback mode.
    pub fn client_tls(&self) -> Result<Option<keyfort_net::client::ClientTls>, String> {
        self.ca_file()
            .map(|ca| {
                keyfort_net::client::ClientTls::from_files(&ca, None, None, None)
                    .map_err(|e| e.to_string())
            })
            .transpose()
    }

    /// The `keyfort` flags that reach this cluster's nodes: `--ca <root>/tls/ca.pem`, or
    /// `--insecure-loopback`.
    pub fn conn_args(&self) -> Vec<std::ffi::OsString> {
        match self.ca_file() {
            Some(ca) => vec!["--ca".into(), ca.into()],
            None => vec!["--insecure-loopback".into()],
        }
    }

    /// Every node's client address.
    pub fn client_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.nodes.iter().map(|n| n.client_addr).collect()
    }

    /// The cluster config file `keyfort cluster init` wrote.
    pub fn cluster_config_file(&self) -> PathBuf {
        self.root.join("cluster-config")
    }

    /// Issues an admin credential with node 1's card (`keyfort cluster admin-credential`) into
    /// `<root>/admin.cred` and returns its path. `keyfort` is the CLI binary.
    pub fn admin_credential(&self, keyfort: &Path) -> Result<PathBuf, String> {
        let out = self.root.join("admin.cred");
        self.admin_credential_for(keyfort, &self.cluster_config_file(), &out)?;
        Ok(out)
    }

    /// Issues an admin credential with node 1's card for the cluster whose config is
    /// `cluster_config` (e.g. a restored cluster's `<data dir>/cluster-config`) into `out`.
    pub fn admin_credential_for(
        &self,
        keyfort: &Path,
        cluster_config: &Path,
        out: &Path,
    ) -> Result<(), String> {
        run(
            Command::new(keyfort)
                .args(["cluster", "admin-credential", "--token-dir"])
                .arg(self.root.join("node-1/card"))
                .args(["--label", "node-1", "--config"])
                .arg(cluster_config)
                .arg("--out")
                .arg(out)
                .env("KEYFORT_PIN_FILE", self.root.join("user.pin")),
            "keyfort cluster admin-credential",
        )
        .map(drop)
    }

    /// The file holding the cards' user PIN (`KEYFORT_PIN_FILE` for `keyfort` commands).
    pub fn pin_file(&self) -> PathBuf {
        self.root.join("user.pin")
    }

    /// SIGTERM to node `i`, then waits up to `timeout` for it to exit; returns its status.
    pub fn sigterm(&mut self, i: usize, timeout: Duration) -> Option<std::process::ExitStatus> {
        let c = self.nodes[i].child.as_mut()?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        let t = Instant::now();
        while t.elapsed() < timeout {
            if let Ok(Some(st)) = c.try_wait() {
                self.nodes[i].child = None;
                return Some(st);
            }
            std::thread::sleep(STATUS_POLL);
        }
        None
    }

    /// Starts node `i` (index into `nodes`), its stderr in `node-N/keyfortd.log`.
    pub fn start(&mut self, i: usize) -> Result<(), String> {
        let n = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(
                n.data_dir
                    .parent()
                    .unwrap_or(Path::new("."))
                    .join("keyfortd.log"),
            )
            .map_err(|e| e.to_string())?;
        let child = Command::new(&self.keyfortd)
            .arg("--config")
            .arg(&n.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("keyfortd: {e}"))?;
        n.child = Some(child);
        Ok(())
    }

    pub fn start_all(&mut self) -> Result<(), String> {
        (0..self.nodes.len()).try_for_each(|i| self.start(i))
    }

    /// SIGKILL: the node gets no chance to flush or close anything.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn kill_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill9(i);
        }
    }

    /// Whether node `i`'s process exited by itself (a crash), with its status.
    pub fn exited(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        self.nodes[i].child.as_mut()?.try_wait().ok()?
    }

    /// Node `i`'s `status.json` (None before its first write or while it is stopped).
    pub fn status_json(&self, i: usize) -> Option<serde_json::Value> {
        self.nodes[i].child.as_ref()?;
        let text = std::fs::read_to_string(self.nodes[i].data_dir.join("status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Node `i`'s status per shard (None before its first status write or while stopped).
    pub fn status(&self, i: usize) -> Option<Vec<ShardStatus>> {
        let v = self.status_json(i)?;
        let u = |s: &serde_json::Value, k: &str| s[k].as_u64().unwrap_or(0);
        let ids = |s: &serde_json::Value, k: &str| {
            s[k].as_array()
                .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
                .unwrap_or_default()
        };
        Some(
            v["shards"]
                .as_array()?
                .iter()
                .map(|s| ShardStatus {
                    role: s["role"].as_str().unwrap_or("").to_string(),
                    term: u(s, "term"),
                    leader: u(s, "leader"),
                    commit: u(s, "commit"),
                    applied: u(s, "applied"),
                    digest: s["digest"].as_str().unwrap_or("").to_string(),
                    partitions: u(s, "partitions"),
                    log_first: u(s, "log_first"),
                    snapshot: u(s, "snapshot"),
                    voters: ids(s, "voters"),
                    learners: ids(s, "learners"),
                })
                .collect(),
        )
    }

    /// The raft id node `i` runs under now (`status.json`; it changes when the node rejoins).
    pub fn node_id(&self, i: usize) -> Option<u64> {
        let v = self.status_json(i)?;
        v["node"].as_u64()
    }

    /// Loses node `i`'s disk: SIGKILL, then its whole data dir is removed (its card stays, as
    /// a card survives a disk). Started again, it joins through its seed peers as a new member.
    pub fn wipe(&mut self, i: usize) -> Result<(), String> {
        self.kill9(i);
        let d = &self.nodes[i].data_dir;
        std::fs::remove_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))
    }

    /// Node `i`'s commit latency summary of its synthetic load (`status.json`).
    pub fn synthetic_latency(&self, i: usize) -> Option<crate::LatencySummary> {
        let v = self.status_json(i)?;
        let l = &v["synthetic_commit_latency"];
        let f = |k: &str| l[k].as_f64().unwrap_or(0.0);
        Some(crate::LatencySummary {
            count: l["count"].as_u64()?,
            p50_us: f("p50_us"),
            p99_us: f("p99_us"),
            p999_us: f("p999_us"),
            max_us: f("max_us"),
        })
    }

    /// Changes every node's config file (takes effect at the next start).
    pub fn configure(&self, f: impl Fn(&mut serde_json::Value)) -> Result<(), String> {
        (0..self.nodes.len()).try_for_each(|i| self.configure_node(i, &f))
    }

    /// Changes node `i`'s config file (takes effect at its next start).
    pub fn configure_node(
        &self,
        i: usize,
        f: impl Fn(&mut serde_json::Value),
    ) -> Result<(), String> {
        let n = &self.nodes[i];
        let text = std::fs::read_to_string(&n.config).map_err(|e| e.to_string())?;
        let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        f(&mut v);
        std::fs::write(&n.config, v.to_string()).map_err(|e| e.to_string())
    }

    /// A running node that leads no shard (else one that does not lead shard 0), if any.
    pub fn follower(&self) -> Option<usize> {
        let leaders: Vec<Option<usize>> = (0..self.shards).map(|s| self.leader(s)).collect();
        let running = |i: &usize| self.nodes[*i].child.is_some();
        (0..self.nodes.len())
            .filter(running)
            .find(|i| !leaders.contains(&Some(*i)))
            .or_else(|| {
                (0..self.nodes.len())
                    .filter(running)
                    .find(|i| leaders.first() != Some(&Some(*i)))
            })
    }

    /// Checks, with every node stopped, that each proposal a node acknowledged on `shard`
    /// (`acked-<shard>.log`) is in a majority of the nodes' logs with the term it was
    /// acknowledged in (or below a log's first LSN: released under a snapshot); returns how
    /// many were checked.
    pub fn check_acked_in_majority(&self, shard: u32) -> Result<u64, String> {
        let logs = self
            .nodes
            .iter()
            .map(|n| log_terms(&n.data_dir.join(format!("shard-{shard}/wbl"))))
            .collect::<Result<Vec<_>, _>>()?;
        let mut checked = 0;
        for n in &self.nodes {
            let f = n.data_dir.join(format!("acked-{shard}.log"));
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            for line in text.lines() {
                let mut it = line.split_whitespace().map(str::parse::<u64>);
                let (Some(Ok(i)), Some(Ok(t))) = (it.next(), it.next()) else {
                    continue; // a line cut by SIGKILL
                };
                // A log released below its snapshot no longer holds the entry; its snapshot,
                // made of committed state only, covers it.
                let holders = logs
                    .iter()
                    .filter(|(first, l)| i < *first || l.get(&i) == Some(&t))
                    .count();
                if holders * 2 <= self.nodes.len() {
                    return Err(format!(
                        "shard {shard}: acknowledged entry {i} (term {t}) is in {holders} of {} logs",
                        self.nodes.len()
                    ));
                }
                checked += 1;
            }
        }
        Ok(checked)
    }

    /// The highest commit index of `shard` any running node reports.
    pub fn max_commit(&self, shard: u32) -> u64 {
        (0..self.nodes.len())
            .filter_map(|i| self.status(i).map(|s| s[shard as usize].commit))
            .max()
            .unwrap_or(0)
    }

    /// The index of the node that leads `shard` in the highest term any running node reports.
    pub fn leader(&self, shard: u32) -> Option<usize> {
        (0..self.nodes.len())
            .filter_map(|i| {
                let s = self.status(i)?.get(shard as usize)?.clone();
                (s.role == "Leader").then_some((s.term, i))
            })
            .max()
            .map(|(_, i)| i)
    }

    /// Polls until `f` holds or `timeout` passes.
    pub fn wait_for(&self, timeout: Duration, mut f: impl FnMut(&Self) -> bool) -> bool {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if f(self) {
                return true;
            }
            std::thread::sleep(STATUS_POLL);
        }
        f(self)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// The first LSN of a log and LSN → term of every durable record (opened read-only).
pub fn log_terms(dir: &Path) -> Result<(u64, std::collections::BTreeMap<u64, u64>), String> {
    use keyfort_engine::wbl::{Wbl, WblOptions};
    let probe_dir = dir.to_path_buf();
    let dir = dir.to_path_buf();
    keyfort_engine::exec::run_local(&probe_dir, |_| async move {
        let opts = WblOptions {
            read_only: true,
            ..WblOptions::default()
        };
        let (wbl, _) = Wbl::open(&dir, opts).await.map_err(|e| e.to_string())?;
        let mut r = wbl.reader(wbl.first_lsn());
        let mut out = std::collections::BTreeMap::new();
        while let Some(rec) = r.next().await {
            let rec = rec.map_err(|e| e.to_string())?;
            out.insert(rec.lsn, rec.term);
        }
        Ok((wbl.first_lsn(), out))
    })
    .map_err(|e| e.to_string())?
}

fn hex_random() -> String {
    let b: [u8; 16] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}
