//! keyfort as a load [`Target`]: key operations over the client protocol
//! (`keyfort_net::client::Connection`s, pipelined), each partition's connections to the node
//! that leads the partition's shard (key operations route by partition).
//!
//! * [`Op::Create`]: `KeyCreate` (a fresh idempotency id) on the partition of the connection
//!   the generator chose; when it answers, the key's number is mapped to the id it got.
//! * [`Op::Encrypt`]: `Encrypt` of a plaintext of the value size under the key.
//! * [`Op::Decrypt`]: `Decrypt` of the ciphertext made under the key in [`Target::preload`]
//!   (only preloaded keys have one; the workloads decrypt only those).
//! * [`Op::Delete`]: `KeyDelete` of the key.
//!
//! Key numbers → key ids: preloaded keys in a vector filled by `preload`, keys created during
//! a run in a `Mutex<HashMap>` filled by the create's ticket before its answer is reported.
//! The generator's chooser only picks keys whose create was acknowledged (see
//! [`crate::workload`]), so an operation never names a key whose id is not mapped yet; if one
//! did, it is refused with `UnknownKey`. A key's operations go to its own partition's
//! connections, whatever connection the generator chose (that choice spreads them over the
//! partition's connections).
//!
//! TLS: [`KeyfortTarget::connect_with`] takes the cluster's [`ClientTls`] (one rustls config
//! shared by every connection, so sessions resume across them); [`KeyfortTarget::connect`] is
//! plaintext (loopback only). The target opens its connections once, in `connect`, and never
//! again: every request of every run rides on them, so there is no handshake per request.
//! [`KeyfortTarget::handshakes`] counts the connections opened and how many resumed a session.

use crate::loadgen::{error_name, wait_answer};
use crate::target::{Op, Target, Ticket};
use keyfort_engine::cluster::shard_of;
use keyfort_hsm::PartitionId;
use keyfort_net::client::{ClientError, ClientOptions, ClientTls, Connection, Credential, Pending};
use keyfort_net::client_proto::{Request, Response, Scope};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Plaintext bytes of an encrypt unless told otherwise (the etcd target's value size too).
pub const DEFAULT_VALUE_SIZE: usize = 4096;
/// Connections unless told otherwise.
pub const DEFAULT_CONNECTIONS: usize = 8;
/// Most answers outstanding on one of the target's connections (the server's bound is 1024
/// per connection; beyond this the client refuses locally with `Overloaded`).
pub const CONN_MAX_IN_FLIGHT: usize = 4096;
/// Requests in flight at once while preloading.
pub const PRELOAD_IN_FLIGHT: usize = 256;
/// Wait for one answer while preloading, and for the handshake and a route answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `connect` waits for the partitions' shards to have a known leader.
pub const LEADER_WAIT: Duration = Duration::from_secs(30);
const LEADER_POLL: Duration = Duration::from_millis(100);

/// How a [`KeyfortTarget`] loads the cluster.
#[derive(Clone, Debug)]
pub struct KeyfortOptions {
    /// Plaintext bytes of each encrypt.
    pub value_size: usize,
    /// Connections in all, spread round-robin over the partitions (at least one each).
    pub connections: usize,
}

impl Default for KeyfortOptions {
    fn default() -> Self {
        KeyfortOptions {
            value_size: DEFAULT_VALUE_SIZE,
            connections: DEFAULT_CONNECTIONS,
        }
    }
}

/// The client options of the target's connections: plaintext (loopback only).
pub fn client_options() -> ClientOptions {
    client_options_with(None)
}

/// The client options of the target's connections, TLS with `tls` (`None`: plaintext).
pub fn client_options_with(tls: Option<ClientTls>) -> ClientOptions {
    ClientOptions {
        request_timeout: CALL_TIMEOUT,
        max_in_flight: CONN_MAX_IN_FLIGHT,
        tls,
        ..ClientOptions::default()
    }
}

/// The connections a [`KeyfortTarget`] opened in `connect` (the leader probes included), and
/// what their handshakes were.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Handshakes {
    /// Connections opened (each one TCP connect + authentication; TLS: one handshake).
    pub opened: u64,
    /// Of those, TLS connections.
    pub tls: u64,
    /// Of the TLS ones, sessions resumed from an earlier connection's (no certificate
    /// exchange); the rest made a full handshake.
    pub resumed: u64,
}

impl Handshakes {
    fn count(&mut self, c: &Connection) {
        self.opened += 1;
        self.tls += u64::from(c.is_tls());
        self.resumed += u64::from(c.resumed());
    }

    /// TLS handshakes that were full (not resumed).
    pub fn full(&self) -> u64 {
        self.tls - self.resumed
    }
}

/// A key the target knows: its id and its partition (index into the target's partitions).
#[derive(Clone, Copy, Debug)]
struct Key {
    id: [u8; 16],
    part: usize,
}

/// A preloaded key and a ciphertext under it.
struct Preloaded {
    key: Key,
    envelope: Vec<u8>,
}

type Created = Arc<Mutex<HashMap<u64, Key>>>;

/// keyfort under load. See the module documentation.
pub struct KeyfortTarget {
    /// Per partition, its connections (all to its shard's leader when `connect` ran).
    parts: Vec<Vec<Arc<Connection>>>,
    /// Connection `c` of the generator: (partition, index into its connections).
    conns: Vec<(usize, usize)>,
    plaintext: Vec<u8>,
    preloaded: RwLock<Vec<Preloaded>>,
    created: Created,
    handshakes: Handshakes,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The node (index into `addrs`) that leads `partition`'s shard as the node at `addrs[0]`
/// knows it, waiting up to [`LEADER_WAIT`] for one to be known; the first node when the
/// leader is not among `addrs`.
fn leader_of(probes: &[Connection], partition: [u8; 16]) -> Result<(usize, u32), String> {
    let t = Instant::now();
    loop {
        let r = probes[0]
            .call(&Request::Route, CALL_TIMEOUT)
            .map_err(|e| format!("route: {e}"))?;
        let Response::Route { leaders, .. } = r else {
            return Err(format!("unexpected route answer {r:?}"));
        };
        let shard = shard_of(&PartitionId(partition), leaders.len() as u32);
        let leader = leaders.get(shard as usize).copied().unwrap_or(0);
        if leader != 0 {
            let node = probes.iter().position(|c| c.node_id() == leader);
            return Ok((node.unwrap_or(0), shard));
        }
        if t.elapsed() > LEADER_WAIT {
            return Err(format!("shard {shard} has no leader"));
        }
        std::thread::sleep(LEADER_POLL);
    }
}

impl KeyfortTarget {
    /// Connects to the cluster whose nodes listen at `addrs` with one partition credential
    /// per partition to load: each partition's connections go to its shard's leader
    /// (`Route`; the first address when the leader is not among `addrs`). Plaintext
    /// ([`Self::connect_with`] for TLS).
    pub fn connect(
        addrs: &[SocketAddr],
        creds: &[Credential],
        opts: &KeyfortOptions,
    ) -> Result<KeyfortTarget, String> {
        Self::connect_with(addrs, creds, opts, None)
    }

    /// [`Self::connect`] over TLS with `tls` (`None`: plaintext, loopback only).
    pub fn connect_with(
        addrs: &[SocketAddr],
        creds: &[Credential],
        opts: &KeyfortOptions,
        tls: Option<ClientTls>,
    ) -> Result<KeyfortTarget, String> {
        if addrs.is_empty() || creds.is_empty() {
            return Err("a keyfort target needs node addresses and a partition credential".into());
        }
        let copts = client_options_with(tls);
        let mut handshakes = Handshakes::default();
        let mut parts = Vec::new();
        for cred in creds {
            let Scope::Partition(p) = cred.scope else {
                return Err("a keyfort target needs partition credentials, not admin".into());
            };
            let probes = addrs
                .iter()
                .map(|&a| Connection::open(a, cred, &copts))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("connect: {e}"))?;
            probes.iter().for_each(|c| handshakes.count(c));
            let (node, _shard) = leader_of(&probes, p)?;
            parts.push((addrs[node], cred));
        }
        let n = opts.connections.max(parts.len());
        let mut conns_of: Vec<Vec<Arc<Connection>>> = vec![Vec::new(); parts.len()];
        let mut conns = Vec::with_capacity(n);
        for c in 0..n {
            let p = c % parts.len();
            let (addr, cred) = parts[p];
            let conn = Connection::open(addr, cred, &copts).map_err(|e| format!("{addr}: {e}"))?;
            handshakes.count(&conn);
            conns.push((p, conns_of[p].len()));
            conns_of[p].push(Arc::new(conn));
        }
        Ok(KeyfortTarget {
            parts: conns_of,
            conns,
            plaintext: vec![0x5a; opts.value_size],
            preloaded: RwLock::new(Vec::new()),
            created: Arc::default(),
            handshakes,
        })
    }

    /// The connections `connect` opened and their handshakes (the target opens no other).
    pub fn handshakes(&self) -> Handshakes {
        self.handshakes
    }

    /// Of the connections the runs use, how many are closed now (a closed one is never
    /// reopened: its requests fail with `Closed`).
    pub fn closed_connections(&self) -> usize {
        self.parts
            .iter()
            .flatten()
            .filter(|c| c.is_closed())
            .count()
    }

    /// Partitions loaded.
    pub fn partitions(&self) -> usize {
        self.parts.len()
    }

    /// Key `key`: preloaded, or created during a run and acknowledged.
    fn key(&self, key: u64) -> Option<Key> {
        let pre = self.preloaded.read().unwrap_or_else(|e| e.into_inner());
        match pre.get(key as usize) {
            Some(p) => Some(p.key),
            None => lock(&self.created).get(&key).copied(),
        }
    }

    /// A connection of partition `part`, chosen by the generator's connection number.
    fn conn_of(&self, part: usize, conn: usize) -> &Connection {
        let cs = &self.parts[part];
        &cs[(conn / self.parts.len()) % cs.len()]
    }

    fn encrypt_req(&self, id: [u8; 16]) -> Request {
        Request::Encrypt {
            key_id: id,
            aad: Vec::new(),
            plaintext: self.plaintext.clone(),
        }
    }
}

fn create_req() -> Request {
    Request::KeyCreate {
        idempotency_id: rand::random(),
        flags: 0,
        metadata: Vec::new(),
    }
}

/// Runs `n` requests with at most [`PRELOAD_IN_FLIGHT`] outstanding: `start(i)` starts
/// request `i`, `done(i, answer)` takes its answer; the first error ends it.
fn pipelined(
    n: u64,
    start: impl Fn(u64) -> Result<Pending, ClientError>,
    mut done: impl FnMut(u64, Response) -> Result<(), String>,
) -> Result<(), String> {
    let mut q: VecDeque<(u64, Pending)> = VecDeque::new();
    let mut finish = |(i, p): (u64, Pending)| -> Result<(), String> {
        let (answer, _) = wait_answer(p, CALL_TIMEOUT);
        done(i, answer.map_err(|e| format!("preload request {i}: {e}"))?)
    };
    for i in 0..n {
        if q.len() >= PRELOAD_IN_FLIGHT {
            finish(q.pop_front().expect("queue is full"))?;
        }
        q.push_back((
            i,
            start(i).map_err(|e| format!("preload request {i}: {e}"))?,
        ));
    }
    q.into_iter().try_for_each(finish)
}

impl Target for KeyfortTarget {
    fn name(&self) -> &str {
        "keyfort"
    }

    fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Creates keys `0..keys` (key `k` in partition `k % partitions`), then encrypts one
    /// plaintext of the value size under each for [`Op::Decrypt`]. Replaces any earlier
    /// preload.
    fn preload(&self, keys: u64) -> Result<(), String> {
        let nparts = self.parts.len();
        let mut made: Vec<Key> = Vec::with_capacity(keys as usize);
        pipelined(
            keys,
            |k| {
                self.conn_of(k as usize % nparts, k as usize)
                    .start(&create_req())
            },
            |k, r| match r {
                Response::KeyWritten(w) => {
                    made.push(Key {
                        id: w.key_id,
                        part: k as usize % nparts,
                    });
                    Ok(())
                }
                other => Err(format!("preload create {k}: unexpected {other:?}")),
            },
        )?;
        let mut envelopes: Vec<Vec<u8>> = Vec::with_capacity(keys as usize);
        pipelined(
            keys,
            |k| {
                let key = made[k as usize];
                self.conn_of(key.part, k as usize)
                    .start(&self.encrypt_req(key.id))
            },
            |k, r| match r {
                Response::Encrypted { envelope, .. } => {
                    envelopes.push(envelope);
                    Ok(())
                }
                other => Err(format!("preload encrypt {k}: unexpected {other:?}")),
            },
        )?;
        *self.preloaded.write().unwrap_or_else(|e| e.into_inner()) = made
            .into_iter()
            .zip(envelopes)
            .map(|(key, envelope)| Preloaded { key, envelope })
            .collect();
        Ok(())
    }

    fn start(&self, conn: usize, op: Op) -> Result<Box<dyn Ticket>, String> {
        let (part, req, kind) = match op {
            Op::Create { key } => {
                let (part, _) = self.conns[conn % self.conns.len()];
                let kind = Kind::Create {
                    key,
                    part,
                    created: self.created.clone(),
                };
                (part, create_req(), kind)
            }
            Op::Encrypt { key } => {
                let k = self.key(key).ok_or("UnknownKey")?;
                (k.part, self.encrypt_req(k.id), Kind::Encrypt)
            }
            Op::Decrypt { key } => {
                let pre = self.preloaded.read().unwrap_or_else(|e| e.into_inner());
                let p = pre.get(key as usize).ok_or("NoCiphertext")?;
                let req = Request::Decrypt {
                    key_id: p.key.id,
                    aad: Vec::new(),
                    envelope: p.envelope.clone(),
                };
                (p.key.part, req, Kind::Decrypt)
            }
            Op::Delete { key } => {
                let k = self.key(key).ok_or("UnknownKey")?;
                // The chooser never names a deleted key again.
                lock(&self.created).remove(&key);
                let req = Request::KeyDelete {
                    idempotency_id: rand::random(),
                    key_id: k.id,
                };
                (k.part, req, Kind::Delete)
            }
        };
        let pending = self
            .conn_of(part, conn)
            .start(&req)
            .map_err(|e| error_name(&e))?;
        Ok(Box::new(KeyfortTicket { pending, kind }))
    }
}

/// What a ticket expects, and for a create where to file the id it got.
enum Kind {
    Create {
        key: u64,
        part: usize,
        created: Created,
    },
    Encrypt,
    Decrypt,
    Delete,
}

struct KeyfortTicket {
    pending: Pending,
    kind: Kind,
}

impl Ticket for KeyfortTicket {
    fn wait(self: Box<Self>, timeout: Duration) -> (Result<(), String>, Option<Instant>) {
        let KeyfortTicket { pending, kind } = *self;
        let (answer, at) = wait_answer(pending, timeout);
        let result = answer.and_then(|r| match (kind, r) {
            (Kind::Create { key, part, created }, Response::KeyWritten(w)) => {
                lock(&created).insert(key, Key { id: w.key_id, part });
                Ok(())
            }
            (Kind::Encrypt, Response::Encrypted { .. })
            | (Kind::Decrypt, Response::Decrypted { .. })
            | (Kind::Delete, Response::KeyWritten(_)) => Ok(()),
            _ => Err("UnexpectedAnswer".to_string()),
        });
        (result, at)
    }
}

/// Status file period of the nodes of [`start_local_cluster`] (leaders are found from it).
const LOCAL_STATUS_MS: u64 = 50;

/// Builds and starts a fresh local cluster of `nodes` `keyfortd` processes with `shards`
/// shards and raft tick `tick_ms` in `dir` (removed first), waits for every shard's leader,
/// and creates one partition on each shard through an admin client; returns the cluster
/// (stopped when dropped) and the partitions' credentials, ready for
/// [`KeyfortTarget::connect`] to its `client_addrs()`. Plaintext on loopback
/// ([`start_local_cluster_with`] for TLS).
pub fn start_local_cluster(
    dir: &std::path::Path,
    keyfort: &std::path::Path,
    keyfortd: &std::path::Path,
    nodes: u64,
    shards: u32,
    tick_ms: u64,
) -> Result<(crate::local_cluster::LocalCluster, Vec<Credential>), String> {
    start_local_cluster_with(
        dir,
        keyfort,
        keyfortd,
        nodes,
        shards,
        tick_ms,
        crate::local_cluster::Security::InsecureLoopback,
    )
}

/// [`start_local_cluster`] with the nodes' `security`: [`Security::Tls`] runs both the client
/// and the peer protocol over TLS (the cluster CA made at init); connect to it with
/// [`KeyfortTarget::connect_with`] and the cluster's `client_tls()`.
///
/// [`Security::Tls`]: crate::local_cluster::Security::Tls
pub fn start_local_cluster_with(
    dir: &std::path::Path,
    keyfort: &std::path::Path,
    keyfortd: &std::path::Path,
    nodes: u64,
    shards: u32,
    tick_ms: u64,
    security: crate::local_cluster::Security,
) -> Result<(crate::local_cluster::LocalCluster, Vec<Credential>), String> {
    use crate::local_cluster::LocalCluster;
    use keyfort_net::client::Client;
    let _ = std::fs::remove_dir_all(dir);
    let mut c =
        LocalCluster::create_with(dir, keyfort, keyfortd, nodes, shards, 0, tick_ms, security)?;
    c.configure(|v| v["status_ms"] = serde_json::json!(LOCAL_STATUS_MS))?;
    c.start_all()?;
    if !c.wait_for(LEADER_WAIT, |c| (0..shards).all(|s| c.leader(s).is_some())) {
        return Err("no leader in every shard".into());
    }
    let admin = Credential::read_file(&c.admin_credential(keyfort)?).map_err(|e| e.to_string())?;
    let admin_opts = client_options_with(c.client_tls()?);
    let t = Instant::now();
    let admin = loop {
        match Client::connect(c.client_addrs(), admin.clone(), admin_opts.clone()) {
            Ok(a) => break a,
            Err(_) if t.elapsed() < LEADER_WAIT => std::thread::sleep(LEADER_POLL),
            Err(e) => return Err(format!("admin client: {e}")),
        }
    };
    let mut creds = Vec::new();
    for shard in 0..shards {
        let id = loop {
            let p: [u8; 16] = rand::random();
            if shard_of(&PartitionId(p), shards) == shard {
                break p;
            }
        };
        let (_, cred) = admin
            .create_partition(id)
            .map_err(|e| format!("partition create: {e}"))?;
        creds.push(cred);
    }
    Ok((c, creds))
}
