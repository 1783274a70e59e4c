//! The client service of real `keyfortd` processes on 127.0.0.1 (3 nodes, 2 shards, 50 ms
//! ticks, each node with its own SoftHSM card), driven through the client library and raw
//! sockets (docs/format.md §8):
//!
//! * concurrent clients create, rotate, delete and use keys while nodes — shard leaders and
//!   followers — are SIGKILLed and restarted; afterwards every acknowledged write is there on
//!   every node (each node's own state and card decrypts every envelope), no idempotency id made
//!   two keys, no acknowledged delete or superseded version can still encrypt, and every node's
//!   state digest agrees, at a checkpoint mid-run and at the end;
//! * bad clients (wrong secrets, other scopes, requests before authentication, bad and oversized
//!   frames, malformed payloads, unknown opcodes, a connection flood) get typed errors or a
//!   closed connection, and a good client beside them sees no error;
//! * SIGTERM stops a node cleanly (exit 0) while the others keep serving, and it catches up.
//!
//! The tests run one at a time (each starts three nodes; the machine may have two cores).
//! `KEYFORT_SOAK=1` makes the kill test run more rounds.

mod common;

use keyfort_bench::local_cluster::LocalCluster;
use keyfort_engine::cluster::shard_of;
use keyfort_hsm::PartitionId;
use keyfort_net::client::{Client, ClientError, ClientOptions, Connection, Credential};
use keyfort_net::client_proto::{
    op, proof_context, ErrorCode, ErrorReply, KeyWritten, Request, Response, Scope, ShardStatus,
    CLIENT_MAX_FRAME_PAYLOAD, CLIENT_PROTOCOL_VERSION, MAX_PLAINTEXT_BYTES,
};
use keyfort_net::frame::{self, flags, FrameHeader, FRAME_HEADER_BYTES};
use keyfort_tools::service::derived_key_id;
use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const SHARDS: u32 = 2;
/// Generous: two cores run three nodes, their cards and the test.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(30);
/// A client call's time, its own retries included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Tries of one write (each a whole client call with its retries) before its outcome is
/// called unknown.
const WRITE_TRIES: usize = 3;
/// Kill rounds of the kill test (more with `KEYFORT_SOAK=1`).
const ROUNDS: usize = 6;
const SOAK_ROUNDS: usize = 30;
/// How long a killed node stays down while the clients go on.
const DOWN_FOR: Duration = Duration::from_millis(1500);
/// Client threads of the kill test (two per partition).
const WORKERS: usize = 4;
/// Envelopes kept per key version for the final checks.
const ENVELOPES_PER_VERSION: usize = 2;

/// One test at a time: each runs three nodes.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

use keyfort_bench::local_cluster::keep_failed as keep;

/// 3 `keyfortd` nodes with 50 ms ticks, [`SHARDS`] shards, no synthetic load.
fn local(root: &Path) -> LocalCluster {
    LocalCluster::create(
        root,
        env!("CARGO_BIN_EXE_keyfort").as_ref(),
        env!("CARGO_BIN_EXE_keyfortd").as_ref(),
        3,
        SHARDS,
        0,
        50,
    )
    .unwrap()
}

fn opts() -> ClientOptions {
    ClientOptions {
        request_timeout: REQUEST_TIMEOUT,
        ..ClientOptions::default()
    }
}

/// A client of `cred` over every node, retried until the nodes listen.
fn connect(c: &LocalCluster, cred: &Credential) -> Client {
    common::connect(c, cred, &opts(), PROGRESS_TIMEOUT)
}

/// A started cluster with a leader per shard and an admin client.
fn up(root: &Path) -> (LocalCluster, Client) {
    let mut c = local(root);
    c.start_all().unwrap();
    assert!(
        c.wait_for(PROGRESS_TIMEOUT, |c| (0..SHARDS)
            .all(|s| c.leader(s).is_some())),
        "no leader for every shard (kept in {})",
        keep(root)
    );
    let cred = Credential::read_file(
        &c.admin_credential(env!("CARGO_BIN_EXE_keyfort").as_ref())
            .unwrap(),
    )
    .unwrap();
    let admin = connect(&c, &cred);
    (c, admin)
}

/// A new partition on `shard` (ids drawn until one lands there) and its first credential.
fn partition_on(admin: &Client, shard: u32) -> ([u8; 16], Credential) {
    common::partition_on(admin, shard, SHARDS)
}

/// Every node's status (admin `cluster_status`), or why some node did not answer.
fn statuses(admin: &Client) -> Result<Vec<Vec<ShardStatus>>, String> {
    admin
        .cluster_status()
        .into_iter()
        .map(|(addr, r)| r.map(|(_, s)| s).map_err(|e| format!("{addr}: {e}")))
        .collect()
}

/// Waits until every node answers and reports the same `applied` on each shard, then checks
/// their digests are equal. A shard whose nodes agree on `applied` is compared at once (a
/// state at one log position is the same on every node), whatever the other shards do.
fn digests_agree(admin: &Client, timeout: Duration) -> Result<Vec<u64>, String> {
    let t = Instant::now();
    loop {
        let last = match statuses(admin) {
            Ok(all) => {
                let mut settled = Vec::new();
                // A node still opening its shards reports fewer of them: not settled yet.
                let shards = if all.iter().all(|n| n.len() == SHARDS as usize) {
                    SHARDS as usize
                } else {
                    0
                };
                for s in 0..shards {
                    let first = &all[0][s];
                    if all.iter().all(|n| n[s].applied == first.applied) {
                        if let Some(n) = all.iter().find(|n| n[s].digest != first.digest) {
                            return Err(format!(
                                "shard {s}: digests differ at applied {}: {:x?} vs {:x?} \
                                 (all: {all:?})",
                                first.applied, first.digest, n[s].digest
                            ));
                        }
                        settled.push(first.applied);
                    }
                }
                if settled.len() == SHARDS as usize {
                    return Ok(settled);
                }
                format!(
                    "applied per node: {:?}",
                    all.iter()
                        .map(|n| n.iter().map(|s| s.applied).collect::<Vec<_>>())
                        .collect::<Vec<_>>()
                )
            }
            Err(e) => e,
        };
        if t.elapsed() > timeout {
            return Err(format!(
                "the nodes never settled on one applied index: {last}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until node `i` answers (admin status) having applied `target[s]` of every shard.
fn caught_up(admin: &Client, i: usize, target: &[u64], timeout: Duration) -> Result<(), String> {
    let t = Instant::now();
    loop {
        let last = match &admin.cluster_status()[i].1 {
            Ok((_, st))
                if st.len() == target.len()
                    && st.iter().zip(target).all(|(s, t)| s.applied >= *t) =>
            {
                return Ok(())
            }
            Ok((_, st)) => format!(
                "applied {:?} of {target:?}",
                st.iter().map(|s| s.applied).collect::<Vec<_>>()
            ),
            Err(e) => e.to_string(),
        };
        if t.elapsed() > timeout {
            return Err(format!("node index {i} did not catch up: {last}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The highest commit index of every shard among the nodes that answer.
fn commits(admin: &Client) -> Vec<u64> {
    let mut out = vec![0; SHARDS as usize];
    for (_, r) in admin.cluster_status() {
        if let Ok((_, st)) = r {
            for s in st {
                let o = &mut out[s.shard as usize];
                *o = (*o).max(s.commit);
            }
        }
    }
    out
}

/// An error a write may meet while nodes die: its outcome is unknown, and trying again (the
/// same request) is right.
fn transient(e: &ClientError) -> bool {
    match e {
        ClientError::Server(r) => r.code.is_retryable(),
        ClientError::Timeout(_)
        | ClientError::Io(_)
        | ClientError::Closed
        | ClientError::NoNodes => true,
        ClientError::Protocol(_)
        | ClientError::Credential(_)
        | ClientError::Tls(_)
        | ClientError::TlsConfig(_)
        | ClientError::Insecure(_) => false,
    }
}

fn code_of(r: Result<Response, ClientError>) -> Option<ErrorCode> {
    r.err().and_then(|e| e.code())
}

// ---- the kill test's clients ----

/// One encryption a client made, kept to be decrypted at the end.
#[derive(Clone, Debug)]
struct Sealed {
    version: u32,
    envelope: Vec<u8>,
    plaintext: Vec<u8>,
    aad: Vec<u8>,
}

/// A key whose create was acknowledged.
#[derive(Debug)]
struct KeyRec {
    id: [u8; 16],
    /// The newest version acknowledged (create: 1, then every acknowledged rotate).
    version: u32,
    sealed: Vec<Sealed>,
    /// Its delete was acknowledged.
    deleted: bool,
    /// A rotate of unknown outcome: the newest version is `version` or `version + 1`.
    rotate_unknown: bool,
    /// A delete of unknown outcome: the key may be gone.
    delete_unknown: bool,
}

impl KeyRec {
    /// Whether the client still uses the key (every outcome on it known, not deleted).
    fn live(&self) -> bool {
        !self.deleted && !self.rotate_unknown && !self.delete_unknown
    }
}

#[derive(Default, Debug)]
struct Counts {
    creates: u64,
    rotates: u64,
    deletes: u64,
    encrypts: u64,
    decrypts: u64,
    duplicates: u64,
    transient_errors: u64,
    unknown_outcomes: u64,
}

/// What one client thread did.
struct WorkerLog {
    partition: [u8; 16],
    /// Every idempotency id a create went out with (acknowledged or not).
    create_idems: Vec<[u8; 16]>,
    keys: Vec<KeyRec>,
    counts: Counts,
    /// What should never happen (checked at the end, so the cluster dir can be kept).
    anomalies: Vec<String>,
}

/// Asks the client threads to stop between two operations and wait (for a digest checkpoint).
#[derive(Default)]
struct Pause {
    asked: AtomicBool,
    parked: AtomicUsize,
}

impl Pause {
    fn park_if_asked(&self, stop: &AtomicBool) {
        if !self.asked.load(Ordering::SeqCst) {
            return;
        }
        self.parked.fetch_add(1, Ordering::SeqCst);
        while self.asked.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.parked.fetch_sub(1, Ordering::SeqCst);
    }

    /// Asks every one of `n` threads to park and waits until they have.
    fn hold(&self, n: usize, timeout: Duration) -> bool {
        self.asked.store(true, Ordering::SeqCst);
        let t = Instant::now();
        while self.parked.load(Ordering::SeqCst) < n {
            if t.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    fn release(&self) {
        self.asked.store(false, Ordering::SeqCst);
    }
}

struct Worker {
    client: Client,
    log: WorkerLog,
    progress: Arc<AtomicU64>,
}

impl Worker {
    /// A write, tried again (the same request, so the same idempotency id) while its errors
    /// are transient: `Ok(Ok(w))` acknowledged, `Ok(Err(e))` refused for good, `Err(e)`
    /// unknown outcome.
    fn write(&mut self, req: &Request) -> Result<Result<KeyWritten, ClientError>, ClientError> {
        let mut last = None;
        for _ in 0..WRITE_TRIES {
            match self.client.call(req) {
                Ok(Response::KeyWritten(w)) => {
                    if w.duplicate {
                        self.log.counts.duplicates += 1;
                    }
                    self.progress.fetch_add(1, Ordering::Relaxed);
                    return Ok(Ok(w));
                }
                Ok(other) => {
                    return Ok(Err(ClientError::Protocol(format!(
                        "answer {other:?} to a write"
                    ))))
                }
                Err(e) if transient(&e) => {
                    self.log.counts.transient_errors += 1;
                    last = Some(e);
                }
                Err(e) => return Ok(Err(e)),
            }
        }
        self.log.counts.unknown_outcomes += 1;
        Err(last.expect("at least one try"))
    }

    fn anomaly(&mut self, what: String) {
        eprintln!("ANOMALY: {what}");
        self.log.anomalies.push(what);
    }

    fn create(&mut self) {
        let idem: [u8; 16] = rand::random();
        self.log.create_idems.push(idem);
        let req = Request::KeyCreate {
            idempotency_id: idem,
            flags: 0,
            metadata: b"service_procs".to_vec(),
        };
        match self.write(&req) {
            Ok(Ok(w)) => {
                let want = derived_key_id(&PartitionId(self.log.partition), &idem).0;
                if w.key_id != want || w.version != 1 {
                    self.anomaly(format!(
                        "create {idem:02x?} acknowledged as key {:02x?} version {} (want \
                         {want:02x?} version 1)",
                        w.key_id, w.version
                    ));
                }
                self.log.counts.creates += 1;
                self.log.keys.push(KeyRec {
                    id: w.key_id,
                    version: 1,
                    sealed: Vec::new(),
                    deleted: false,
                    rotate_unknown: false,
                    delete_unknown: false,
                });
            }
            Ok(Err(e)) => self.anomaly(format!("create {idem:02x?} refused: {e}")),
            Err(_) => {} // unknown: the key may exist; its idempotency id is recorded
        }
    }

    fn rotate(&mut self, k: usize) {
        let (id, current) = (self.log.keys[k].id, self.log.keys[k].version);
        let req = Request::KeyRotate {
            idempotency_id: rand::random(),
            key_id: id,
            replaces: current,
        };
        match self.write(&req) {
            Ok(Ok(w)) => {
                if w.version != current + 1 || w.key_id != id {
                    self.anomaly(format!(
                        "rotate of {id:02x?} from {current} acknowledged as {:02x?} version {}",
                        w.key_id, w.version
                    ));
                }
                self.log.counts.rotates += 1;
                self.log.keys[k].version = current + 1;
                // Linearizable: the next encrypt uses the new version.
                self.encrypt(k);
            }
            Ok(Err(e)) => {
                self.anomaly(format!("rotate of {id:02x?} from {current} refused: {e}"));
                self.log.keys[k].rotate_unknown = true;
            }
            Err(_) => self.log.keys[k].rotate_unknown = true,
        }
    }

    fn delete(&mut self, k: usize) {
        let (id, current) = (self.log.keys[k].id, self.log.keys[k].version);
        let req = Request::KeyDelete {
            idempotency_id: rand::random(),
            key_id: id,
        };
        match self.write(&req) {
            Ok(Ok(w)) => {
                if w.version != current {
                    self.anomaly(format!(
                        "delete of {id:02x?} (newest version {current}) removed {} versions",
                        w.version
                    ));
                }
                self.log.counts.deletes += 1;
                self.log.keys[k].deleted = true;
                // Linearizable: the key no longer encrypts anywhere.
                match self.client.encrypt(id, b"", b"after delete") {
                    Err(ClientError::Server(e)) if e.code == ErrorCode::NotFound => {}
                    Err(e) if transient(&e) => self.log.counts.transient_errors += 1,
                    r => self.anomaly(format!("encrypt after the delete of {id:02x?}: {r:?}")),
                }
            }
            Ok(Err(e)) => {
                self.anomaly(format!("delete of {id:02x?} refused: {e}"));
                self.log.keys[k].delete_unknown = true;
            }
            Err(_) => self.log.keys[k].delete_unknown = true,
        }
    }

    fn encrypt(&mut self, k: usize) {
        let mut rng = rand::thread_rng();
        let plaintext: Vec<u8> = (0..rng.gen_range(1..200)).map(|_| rng.gen()).collect();
        let aad: Vec<u8> = (0..rng.gen_range(0..24)).map(|_| rng.gen()).collect();
        let (id, current) = (self.log.keys[k].id, self.log.keys[k].version);
        match self.client.encrypt(id, &aad, &plaintext) {
            Ok((version, envelope)) => {
                self.progress.fetch_add(1, Ordering::Relaxed);
                self.log.counts.encrypts += 1;
                if version != current {
                    self.anomaly(format!(
                        "encrypt with {id:02x?} used version {version}, the newest acknowledged \
                         is {current}"
                    ));
                }
                let key = &mut self.log.keys[k];
                let n = key.sealed.iter().filter(|s| s.version == version).count();
                if n < ENVELOPES_PER_VERSION {
                    key.sealed.push(Sealed {
                        version,
                        envelope,
                        plaintext,
                        aad,
                    });
                }
            }
            Err(e) if transient(&e) => self.log.counts.transient_errors += 1,
            Err(e) => self.anomaly(format!("encrypt with {id:02x?} (version {current}): {e}")),
        }
    }

    fn decrypt(&mut self, k: usize) {
        let key = &self.log.keys[k];
        if key.sealed.is_empty() {
            return self.encrypt(k);
        }
        let s = key.sealed[rand::thread_rng().gen_range(0..key.sealed.len())].clone();
        let id = key.id;
        match self.client.decrypt(id, &s.aad, &s.envelope) {
            Ok(p) if p == s.plaintext => {
                self.progress.fetch_add(1, Ordering::Relaxed);
                self.log.counts.decrypts += 1;
            }
            Err(e) if transient(&e) => self.log.counts.transient_errors += 1,
            r => self.anomaly(format!(
                "decrypt with {id:02x?} of a version {} envelope: {r:?}",
                s.version
            )),
        }
    }

    fn run(mut self, stop: &AtomicBool, pause: &Pause) -> WorkerLog {
        let mut rng = rand::thread_rng();
        while !stop.load(Ordering::SeqCst) {
            pause.park_if_asked(stop);
            let live: Vec<usize> = (0..self.log.keys.len())
                .filter(|&k| self.log.keys[k].live())
                .collect();
            let dice = rng.gen_range(0..100);
            if live.len() < 4 || dice < 20 {
                self.create();
                continue;
            }
            let k = live[rng.gen_range(0..live.len())];
            match dice {
                20..=34 => self.rotate(k),
                35..=42 => self.delete(k),
                43..=74 => self.encrypt(k),
                _ => self.decrypt(k),
            }
        }
        self.log
    }
}

/// Checks what the client threads of one partition recorded against the cluster, every node
/// on its own (`call_on`): returns what failed.
fn verify_partition(client: &Client, nodes: usize, logs: &[&WorkerLog]) -> Vec<String> {
    let mut bad = Vec::new();
    let p = logs[0].partition;
    let call_on = |i: usize, req: &Request| client.call_on(i, req);
    // Every key of the partition, paged.
    let mut listed: Vec<([u8; 16], u32)> = Vec::new();
    let mut after = None;
    loop {
        match client.list_keys(after, 97) {
            Ok((keys, more)) => {
                if let (Some(a), Some(f)) = (after, keys.first()) {
                    if f.0 <= a {
                        bad.push(format!("list page after {a:02x?} starts at {:02x?}", f.0));
                    }
                }
                listed.extend(&keys);
                after = keys.last().map(|k| k.0);
                if !more || keys.is_empty() {
                    break;
                }
            }
            Err(e) => {
                bad.push(format!("list keys after {after:02x?}: {e}"));
                return bad;
            }
        }
    }
    let mut seen = HashSet::new();
    let derived: HashMap<[u8; 16], [u8; 16]> = logs
        .iter()
        .flat_map(|l| l.create_idems.iter())
        .map(|idem| (derived_key_id(&PartitionId(p), idem).0, *idem))
        .collect();
    for (k, _) in &listed {
        if !seen.insert(*k) {
            bad.push(format!("key {k:02x?} listed twice"));
        }
        if !derived.contains_key(k) {
            bad.push(format!(
                "listed key {k:02x?} is derived from no idempotency id a create used"
            ));
        }
    }
    let listed: HashMap<[u8; 16], u32> = listed.into_iter().collect();
    for key in logs.iter().flat_map(|l| l.keys.iter()) {
        let id = key.id;
        if key.deleted {
            if listed.contains_key(&id) {
                bad.push(format!("deleted key {id:02x?} is still listed"));
            }
            for i in 0..nodes {
                let enc = Request::Encrypt {
                    key_id: id,
                    aad: Vec::new(),
                    plaintext: b"x".to_vec(),
                };
                let c = code_of(call_on(i, &enc));
                if c != Some(ErrorCode::NotFound) {
                    bad.push(format!(
                        "node index {i}: encrypt with deleted {id:02x?}: {c:?}"
                    ));
                }
                for s in &key.sealed {
                    let dec = Request::Decrypt {
                        key_id: id,
                        aad: s.aad.clone(),
                        envelope: s.envelope.clone(),
                    };
                    let c = code_of(call_on(i, &dec));
                    if c != Some(ErrorCode::NotFound) {
                        bad.push(format!(
                            "node index {i}: decrypt with deleted {id:02x?} (version {}): {c:?}",
                            s.version
                        ));
                    }
                }
            }
            continue;
        }
        if key.delete_unknown {
            continue;
        }
        match listed.get(&id) {
            None => bad.push(format!("acknowledged key {id:02x?} is not listed")),
            Some(&v) if v != key.version && !(key.rotate_unknown && v == key.version + 1) => bad
                .push(format!(
                    "key {id:02x?} listed at version {v}, acknowledged {}",
                    key.version
                )),
            Some(_) => {}
        }
        match client.describe_key(id) {
            Ok(vs) => {
                let got: Vec<u32> = vs.iter().map(|v| v.version).collect();
                let newest = got.last().copied().unwrap_or(0);
                let ok_newest =
                    newest == key.version || (key.rotate_unknown && newest == key.version + 1);
                if !ok_newest || got != (1..=newest).collect::<Vec<_>>() {
                    bad.push(format!(
                        "key {id:02x?} describes versions {got:?}, acknowledged {}",
                        key.version
                    ));
                }
            }
            Err(e) => bad.push(format!("describe acknowledged key {id:02x?}: {e}")),
        }
        for i in 0..nodes {
            for s in &key.sealed {
                let dec = Request::Decrypt {
                    key_id: id,
                    aad: s.aad.clone(),
                    envelope: s.envelope.clone(),
                };
                match call_on(i, &dec) {
                    Ok(Response::Decrypted { plaintext }) if plaintext == s.plaintext => {}
                    r => bad.push(format!(
                        "node index {i}: decrypt with {id:02x?} of a version {} envelope \
                         (newest {}): {r:?}",
                        s.version, key.version
                    )),
                }
            }
            if !key.rotate_unknown {
                // The newest version encrypts; a superseded one never does again.
                let enc = Request::Encrypt {
                    key_id: id,
                    aad: Vec::new(),
                    plaintext: b"newest".to_vec(),
                };
                match call_on(i, &enc) {
                    Ok(Response::Encrypted { version, .. }) if version == key.version => {}
                    r => bad.push(format!(
                        "node index {i}: encrypt with {id:02x?} (newest version {}): {r:?}",
                        key.version
                    )),
                }
            }
        }
    }
    bad
}

#[test]
fn keys_survive_kill_9_of_any_node_under_concurrent_clients() {
    let _serial = serial();
    let started = Instant::now();
    let root = tempfile::tempdir().unwrap();
    let (mut c, admin) = up(root.path());
    let fail = |what: String| -> ! { panic!("{what} (cluster kept in {})", keep(root.path())) };
    // One partition per shard; each has two clients, one of the first credential, one of an
    // issued one.
    let parts: Vec<([u8; 16], Credential)> = (0..SHARDS).map(|s| partition_on(&admin, s)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let pause = Arc::new(Pause::default());
    let progress = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (p, first) = &parts[w % parts.len()];
            let cred = if w < parts.len() {
                first.clone()
            } else {
                admin.issue_credential(*p).expect("credential issue")
            };
            let worker = Worker {
                client: connect(&c, &cred),
                log: WorkerLog {
                    partition: *p,
                    create_idems: Vec::new(),
                    keys: Vec::new(),
                    counts: Counts::default(),
                    anomalies: Vec::new(),
                },
                progress: progress.clone(),
            };
            let (stop, pause) = (stop.clone(), pause.clone());
            std::thread::Builder::new()
                .name(format!("client-{w}"))
                .spawn(move || worker.run(&stop, &pause))
                .unwrap()
        })
        .collect();
    let wait_progress = |from: u64, n: u64| {
        let t = Instant::now();
        while progress.load(Ordering::Relaxed) < from + n {
            if t.elapsed() > PROGRESS_TIMEOUT {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    };
    if !wait_progress(0, 20) {
        fail("the clients made no progress".into());
    }
    let rounds = if std::env::var("KEYFORT_SOAK").is_ok_and(|v| v == "1") {
        SOAK_ROUNDS
    } else {
        ROUNDS
    };
    let mut checkpoints = 0;
    for round in 0..rounds {
        let leader_of = |s: u32| {
            let mut l = None;
            c.wait_for(PROGRESS_TIMEOUT, |c| {
                l = c.leader(s);
                l.is_some()
            });
            l
        };
        // Leader of shard 0, a follower, leader of shard 1, a follower, ...
        let victim = match round % 4 {
            0 | 2 => leader_of(round as u32 / 2 % SHARDS)
                .unwrap_or_else(|| fail(format!("round {round}: no leader"))),
            _ => {
                let leaders: Vec<Option<usize>> = (0..SHARDS).map(leader_of).collect();
                (0..c.nodes.len())
                    .find(|i| !leaders.contains(&Some(*i)))
                    .unwrap_or((round + 1) % c.nodes.len())
            }
        };
        let before = progress.load(Ordering::Relaxed);
        c.kill9(victim);
        std::thread::sleep(DOWN_FOR);
        if !wait_progress(before, 10) {
            fail(format!(
                "round {round}: the cluster stopped serving without node {}",
                c.nodes[victim].id
            ));
        }
        let target = commits(&admin);
        c.start(victim).unwrap();
        if let Err(e) = caught_up(&admin, victim, &target, PROGRESS_TIMEOUT) {
            fail(format!("round {round}: {e}"));
        }
        for i in 0..c.nodes.len() {
            if let Some(st) = c.exited(i) {
                fail(format!("node {} exited by itself: {st}", c.nodes[i].id));
            }
        }
        eprintln!(
            "round {round}: killed and restarted node {} ({} acknowledged operations so far, \
             {:.1} s)",
            c.nodes[victim].id,
            progress.load(Ordering::Relaxed),
            started.elapsed().as_secs_f64()
        );
        if round == rounds / 2 || round % 10 == 9 {
            // A checkpoint: the clients pause, every node settles, the digests agree.
            if !pause.hold(WORKERS, 2 * WRITE_TRIES as u32 * REQUEST_TIMEOUT) {
                fail("the clients did not pause".into());
            }
            let r = digests_agree(&admin, PROGRESS_TIMEOUT);
            pause.release();
            match r {
                Ok(applied) => {
                    eprintln!("checkpoint after round {round}: digests agree at {applied:?}")
                }
                Err(e) => fail(format!("checkpoint after round {round}: {e}")),
            }
            checkpoints += 1;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let logs: Vec<WorkerLog> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let chaos = started.elapsed();
    for (w, l) in logs.iter().enumerate() {
        eprintln!("client {w}: {:?}, {} keys", l.counts, l.keys.len());
    }
    let anomalies: Vec<&String> = logs.iter().flat_map(|l| &l.anomalies).collect();
    if !anomalies.is_empty() {
        fail(format!(
            "the clients saw {} anomalies: {anomalies:#?}",
            anomalies.len()
        ));
    }
    // Every node up: the final checks.
    let settled = digests_agree(&admin, PROGRESS_TIMEOUT).unwrap_or_else(|e| fail(e));
    eprintln!("at the end: digests agree at {settled:?}");
    // One checker per partition, at once.
    let bad: Vec<String> = std::thread::scope(|scope| {
        let checkers: Vec<_> = parts
            .iter()
            .map(|(p, cred)| {
                let client = connect(&c, cred);
                let mine: Vec<&WorkerLog> = logs.iter().filter(|l| l.partition == *p).collect();
                let nodes = c.nodes.len();
                scope.spawn(move || verify_partition(&client, nodes, &mine))
            })
            .collect();
        checkers
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    if !bad.is_empty() {
        fail(format!("{} failed checks: {bad:#?}", bad.len()));
    }
    let total = |f: fn(&Counts) -> u64| logs.iter().map(|l| f(&l.counts)).sum::<u64>();
    let keys = logs.iter().flat_map(|l| &l.keys);
    let superseded = keys
        .clone()
        .filter(|k| k.live() && k.sealed.iter().any(|s| s.version < k.version))
        .count();
    let deleted_sealed = keys
        .clone()
        .filter(|k| k.deleted && !k.sealed.is_empty())
        .count();
    eprintln!(
        "{} creates, {} rotates, {} deletes, {} encrypts, {} decrypts; {} keys with envelopes \
         of superseded versions, {} deleted keys with envelopes; {checkpoints} checkpoints; \
         chaos {:.1} s, total {:.1} s",
        total(|c| c.creates),
        total(|c| c.rotates),
        total(|c| c.deletes),
        total(|c| c.encrypts),
        total(|c| c.decrypts),
        superseded,
        deleted_sealed,
        chaos.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert!(total(|c| c.creates) >= 20, "too few creates to mean much");
    assert!(
        superseded > 0,
        "no envelope of a superseded version was checked"
    );
    assert!(
        deleted_sealed > 0,
        "no envelope of a deleted key was checked"
    );
    c.kill_all();
}

// ---- raw sockets ----

/// A raw client socket with its read buffer.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

/// A frame read from a [`Raw`], or the end of the connection.
#[derive(Debug)]
enum Got {
    Frame(FrameHeader, Vec<u8>),
    Closed,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
        s.set_nodelay(true).unwrap();
        Raw { s, buf: Vec::new() }
    }

    fn send(&mut self, opcode: u16, request_id: u64, payload: &[u8]) {
        let b = frame_bytes(0, opcode, request_id, payload);
        self.s.write_all(&b).unwrap();
    }

    fn send_req(&mut self, request_id: u64, req: &Request) {
        self.send(req.opcode(), request_id, &req.encode());
    }

    /// The next frame, or `Closed` (end of stream or a reset), within `timeout`.
    fn next(&mut self, timeout: Duration) -> Got {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.buf.is_empty() {
                match frame::decode(&self.buf) {
                    Ok(Some((f, n))) => {
                        let got = Got::Frame(f.header, f.payload.to_vec());
                        self.buf.drain(..n);
                        return got;
                    }
                    Ok(None) => {}
                    Err(e) => panic!("the node sent a bad frame: {e}"),
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "nothing from the node within {timeout:?}");
            self.s.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 4096];
            match self.s.read(&mut chunk) {
                Ok(0) => return Got::Closed,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Got::Closed,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// The next frame, which must be an error answer: its header and reply.
    fn error(&mut self) -> (FrameHeader, ErrorReply) {
        match self.next(PROGRESS_TIMEOUT) {
            Got::Frame(h, p) if h.flags == flags::RESPONSE | flags::ERROR => {
                (h, ErrorReply::decode(&p).expect("an error reply"))
            }
            other => panic!("expected an error answer, got {other:?}"),
        }
    }

    /// The next frame, which must be a successful answer to `opcode`.
    fn answer(&mut self, request_id: u64, opcode: u16) -> Response {
        match self.next(PROGRESS_TIMEOUT) {
            Got::Frame(h, p) if h.flags == flags::RESPONSE => {
                assert_eq!((h.request_id, h.opcode), (request_id, opcode));
                Response::decode(opcode, &p).expect("a decodable answer")
            }
            Got::Frame(h, p) => panic!(
                "expected an answer to request {request_id}, got {h:?}: {:?}",
                ErrorReply::decode(&p)
            ),
            Got::Closed => panic!("closed instead of answering request {request_id}"),
        }
    }

    /// The connection closes within `timeout`, maybe after one error answer, whose code must
    /// then be `code`.
    fn closes(&mut self, code: ErrorCode, timeout: Duration) {
        match self.next(timeout) {
            Got::Closed => {}
            Got::Frame(h, p) => {
                assert_eq!(
                    h.flags,
                    flags::RESPONSE | flags::ERROR,
                    "not an error: {h:?}"
                );
                let e = ErrorReply::decode(&p).unwrap();
                assert_eq!(e.code, code, "{e}");
                match self.next(timeout) {
                    Got::Closed => {}
                    other => panic!("still open after {e}: {other:?}"),
                }
            }
        }
    }

    /// Hello, challenge, proof by hand.
    fn authenticated(addr: SocketAddr, cred: &Credential) -> Raw {
        let mut r = Raw::connect(addr);
        r.send_req(
            1,
            &Request::Hello {
                version: CLIENT_PROTOCOL_VERSION,
                scope: cred.scope,
                client_id: cred.client_id,
            },
        );
        let Response::Challenge {
            challenge,
            cluster_id,
            node_id,
        } = r.answer(1, op::HELLO)
        else {
            panic!("no challenge")
        };
        let context = proof_context(&cluster_id, node_id, &cred.scope, &cred.client_id);
        let response = keyfort_hsm::client_answer(&cred.secret, &challenge, &context);
        r.send_req(2, &Request::Proof { response });
        assert_eq!(r.answer(2, op::PROOF), Response::Accepted);
        r
    }
}

/// A client that encrypts and decrypts under one key until stopped; any error is a failure.
struct Good {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Vec<String>>,
}

impl Good {
    fn start(client: Client) -> Good {
        let key = client.create_key(b"good", false).expect("good key").key_id;
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let (s, o) = (stop.clone(), ops.clone());
        let thread = std::thread::spawn(move || {
            let mut errors = Vec::new();
            let mut n = 0u64;
            while !s.load(Ordering::SeqCst) {
                let pt = n.to_le_bytes();
                let r = client
                    .encrypt(key, b"good", &pt)
                    .and_then(|(_, env)| client.decrypt(key, b"good", &env));
                match r {
                    Ok(p) if p == pt => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    r => errors.push(format!("op {n}: {r:?}")),
                }
                n += 1;
            }
            errors
        });
        Good { stop, ops, thread }
    }

    /// Waits until it did `n` more operations.
    fn progresses(&self, n: u64) -> bool {
        let from = self.ops.load(Ordering::Relaxed);
        let t = Instant::now();
        while self.ops.load(Ordering::Relaxed) < from + n {
            if t.elapsed() > PROGRESS_TIMEOUT {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let errors = self.thread.join().unwrap();
        (self.ops.load(Ordering::Relaxed), errors)
    }
}

/// The soft limit of open files of this process.
fn fd_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 1024;
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
    let limit = r.rlim_cur as u64;
    limit
}

#[test]
fn bad_clients_get_typed_errors_and_do_not_disturb_others() {
    let _serial = serial();
    let started = Instant::now();
    let root = tempfile::tempdir().unwrap();
    let (mut c, admin) = up(root.path());
    let (pa, cred_a) = partition_on(&admin, 0);
    let (pb, cred_b) = partition_on(&admin, 1);
    let client_a = connect(&c, &cred_a);
    let client_b = connect(&c, &cred_b);
    let good = Good::start(connect(&c, &cred_a));
    assert!(good.progresses(5), "the good client made no progress");
    let addrs = c.client_addrs();
    let unauth = |cred: &Credential| {
        let r = Client::connect(addrs.clone(), cred.clone(), opts());
        let e = r.expect_err("connected with a bad credential");
        assert_eq!(e.code(), Some(ErrorCode::Unauthenticated), "{e}");
        for &a in &addrs {
            let e = Connection::open(a, cred, &opts()).expect_err("a connection opened");
            assert_eq!(e.code(), Some(ErrorCode::Unauthenticated), "{a}: {e}");
        }
    };

    // A wrong secret, and a partition credential presented for another partition.
    let mut wrong = cred_a.clone();
    wrong.secret[0] ^= 1;
    unauth(&wrong);
    let mut other_scope = cred_a.clone();
    other_scope.scope = Scope::Partition(pb);
    unauth(&other_scope);
    // A partition that does not exist, and an admin secret that is not one.
    let mut nowhere = cred_a.clone();
    nowhere.scope = Scope::Partition(rand::random());
    unauth(&nowhere);
    let mut not_admin = cred_a.clone();
    not_admin.scope = Scope::Admin;
    unauth(&not_admin);

    // Partition A's client never reaches partition B's keys.
    let kb = client_b.create_key(b"b", false).unwrap().key_id;
    let (vb, env_b) = client_b.encrypt(kb, b"aad", b"secret of b").unwrap();
    let not_found = |r: Result<Response, ClientError>, what: &str| {
        assert_eq!(code_of(r), Some(ErrorCode::NotFound), "{what}");
    };
    not_found(
        client_a.call(&Request::KeyDescribe { key_id: kb }),
        "describe",
    );
    not_found(
        client_a.call(&Request::Encrypt {
            key_id: kb,
            aad: b"aad".to_vec(),
            plaintext: b"x".to_vec(),
        }),
        "encrypt",
    );
    not_found(
        client_a.call(&Request::KeyRotate {
            idempotency_id: rand::random(),
            key_id: kb,
            replaces: vb,
        }),
        "rotate",
    );
    not_found(
        client_a.call(&Request::KeyDelete {
            idempotency_id: rand::random(),
            key_id: kb,
        }),
        "delete",
    );
    // B's envelope names B's partition: refused before any key is looked up.
    let e = client_a.decrypt(kb, b"aad", &env_b).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadEnvelope), "{e}");
    let (listed, _) = client_a.list_keys(None, 1000).unwrap();
    assert!(listed.iter().all(|(k, _)| *k != kb), "A lists B's key");
    // B's key is untouched.
    assert_eq!(client_b.describe_key(kb).unwrap().len(), 1);
    assert_eq!(
        client_b.decrypt(kb, b"aad", &env_b).unwrap(),
        b"secret of b".to_vec()
    );

    // Scopes: an admin runs no key operation, a partition client no administration.
    for req in [
        Request::KeyDescribe { key_id: kb },
        Request::Encrypt {
            key_id: kb,
            aad: Vec::new(),
            plaintext: b"x".to_vec(),
        },
        Request::KeyCreate {
            idempotency_id: rand::random(),
            flags: 0,
            metadata: Vec::new(),
        },
    ] {
        let e = admin.call(&req).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Forbidden), "admin {req:?}: {e}");
    }
    for req in [
        Request::PartitionCreate {
            partition: rand::random(),
            flags: 0,
        },
        Request::PartitionDelete { partition: pb },
        Request::CredentialIssue { partition: pa },
        Request::ClusterStatus,
    ] {
        let e = client_a.call(&req).unwrap_err();
        assert_eq!(
            e.code(),
            Some(ErrorCode::Forbidden),
            "partition {req:?}: {e}"
        );
    }
    let e = client_a.create_partition(rand::random()).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Forbidden), "{e}");

    let node = addrs[0];
    // A request before authentication: Unauthenticated, then the connection closes.
    let mut r = Raw::connect(node);
    r.send_req(7, &Request::KeyDescribe { key_id: kb });
    let (h, e) = r.error();
    assert_eq!(
        (e.code, h.request_id),
        (ErrorCode::Unauthenticated, 7),
        "{e}"
    );
    r.closes(ErrorCode::Unauthenticated, PROGRESS_TIMEOUT);
    // A hello of another protocol version.
    let mut r = Raw::connect(node);
    r.send_req(
        1,
        &Request::Hello {
            version: CLIENT_PROTOCOL_VERSION + 1,
            scope: cred_a.scope,
            client_id: cred_a.client_id,
        },
    );
    let (_, e) = r.error();
    assert_eq!(e.code, ErrorCode::UnsupportedVersion, "{e}");
    r.closes(ErrorCode::UnsupportedVersion, PROGRESS_TIMEOUT);

    // Bad frames after authentication close the connection (a BadRequest may come first).
    let mut r = Raw::authenticated(node, &cred_a);
    r.s.write_all(b"GET / HTTP/1.1\r\nHost: keyfort\r\n\r\n")
        .unwrap();
    r.closes(ErrorCode::BadRequest, PROGRESS_TIMEOUT);
    let mut r = Raw::authenticated(node, &cred_a);
    let describe = Request::KeyDescribe { key_id: kb }.encode();
    let mut b = frame_bytes(0, op::KEY_DESCRIBE, 3, &describe);
    let last = b.len() - 1;
    b[last] ^= 0xff; // the payload no longer matches its crc
    r.s.write_all(&b).unwrap();
    r.closes(ErrorCode::BadRequest, PROGRESS_TIMEOUT);
    // A header whose crc does not match.
    let mut r = Raw::authenticated(node, &cred_a);
    let mut b = frame_bytes(0, op::KEY_DESCRIBE, 3, &describe);
    b[10] ^= 1;
    r.s.write_all(&b).unwrap();
    r.closes(ErrorCode::BadRequest, PROGRESS_TIMEOUT);

    // A frame announcing more than the client frame limit: TooLarge naming its request id,
    // from the header alone, then the connection closes.
    let mut r = Raw::authenticated(node, &cred_a);
    let mut b = frame_bytes(0, op::ENCRYPT, 42, &[]);
    b[16..20].copy_from_slice(&(CLIENT_MAX_FRAME_PAYLOAD as u32 + 1).to_le_bytes());
    let crc = crc32c::crc32c(&b[0..20]);
    b[20..24].copy_from_slice(&crc.to_le_bytes());
    r.s.write_all(&b[..FRAME_HEADER_BYTES]).unwrap();
    let (h, e) = r.error();
    assert_eq!((e.code, h.request_id), (ErrorCode::TooLarge, 42), "{e}");
    r.closes(ErrorCode::TooLarge, PROGRESS_TIMEOUT);

    // A plaintext over MAX_PLAINTEXT_BYTES in a frame under the limit: refused by the decoder
    // (TooLong → TooLarge), and the connection stays usable.
    let conn = Connection::open(node, &cred_a, &opts()).unwrap();
    let big = Request::Encrypt {
        key_id: good_key(&client_a),
        aad: Vec::new(),
        plaintext: vec![7; MAX_PLAINTEXT_BYTES + 1],
    };
    assert!(big.encode().len() <= CLIENT_MAX_FRAME_PAYLOAD);
    let e = conn.call(&big, REQUEST_TIMEOUT).unwrap_err();
    assert!(
        matches!(e.code(), Some(ErrorCode::TooLarge | ErrorCode::BadRequest)),
        "{e}"
    );
    eprintln!("plaintext over the limit: {e}");
    let ok = conn.call(
        &Request::KeyList {
            after: None,
            limit: 1,
        },
        REQUEST_TIMEOUT,
    );
    assert!(matches!(ok, Ok(Response::Listed { .. })), "{ok:?}");
    assert!(!conn.is_closed());
    drop(conn);

    // A truncated payload, an unknown opcode and a request with response flags: typed errors
    // and the connection goes on.
    let mut r = Raw::authenticated(node, &cred_a);
    let create = Request::KeyCreate {
        idempotency_id: rand::random(),
        flags: 0,
        metadata: b"metadata".to_vec(),
    }
    .encode();
    r.send(op::KEY_CREATE, 3, &create[..create.len() - 3]);
    let (h, e) = r.error();
    assert_eq!((e.code, h.request_id), (ErrorCode::BadRequest, 3), "{e}");
    r.send(0x00ee, 4, b"");
    let (h, e) = r.error();
    assert_eq!((e.code, h.request_id), (ErrorCode::UnknownOpcode, 4), "{e}");
    let b = frame_bytes(flags::RESPONSE, op::ROUTE, 5, &[]);
    r.s.write_all(&b).unwrap();
    let (h, e) = r.error();
    assert_eq!((e.code, h.request_id), (ErrorCode::BadRequest, 5), "{e}");
    r.send_req(6, &Request::Proof { response: [0; 32] });
    let (h, e) = r.error();
    assert_eq!((e.code, h.request_id), (ErrorCode::BadRequest, 6), "{e}");
    r.send_req(7, &Request::KeyDescribe { key_id: kb });
    let (h, e) = r.error();
    assert_eq!((e.code, h.request_id), (ErrorCode::NotFound, 7), "{e}");
    r.send_req(8, &Request::Route);
    assert!(matches!(r.answer(8, op::ROUTE), Response::Route { .. }));
    drop(r);

    // A flood on the node leading partition A's shard (the good client's): idle connections
    // that never authenticate and connections that send garbage.
    let target = c.leader(shard_of(&PartitionId(pa), SHARDS)).unwrap_or(0);
    let flood_addr = addrs[target];
    let limit = fd_limit();
    let (idle_n, garbage_n) = if limit >= 2000 {
        (300, 200)
    } else {
        let n = limit.saturating_sub(200) as usize / 2;
        (n * 3 / 5, n * 2 / 5)
    };
    let flood_start = Instant::now();
    let ops_before = good.ops.load(Ordering::Relaxed);
    let idle: Vec<TcpStream> = (0..idle_n)
        .map(|_| TcpStream::connect(flood_addr).unwrap())
        .collect();
    let mut garbage: Vec<TcpStream> = (0..garbage_n)
        .map(|i| {
            let mut s = TcpStream::connect(flood_addr).unwrap();
            let junk: Vec<u8> = (0..64 + i % 512).map(|_| rand::random()).collect();
            let _ = s.write_all(&junk);
            s
        })
        .collect();
    assert!(
        good.progresses(20),
        "the good client stalled under the flood"
    );
    // The garbage connections are closed by the node (maybe after a BadRequest).
    let mut closed = 0;
    for s in &mut garbage {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut sink = [0u8; 256];
        loop {
            match s.read(&mut sink) {
                Ok(0) => break closed += 1,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break closed += 1,
                Err(e) => panic!("a garbage connection was not closed: {e}"),
            }
        }
    }
    assert_eq!(closed, garbage_n);
    // A new client authenticates on the flooded node while the idle connections are open.
    let fresh = Connection::open(flood_addr, &cred_a, &opts()).expect("authenticate under flood");
    let ok = fresh.call(&Request::Route, REQUEST_TIMEOUT);
    assert!(matches!(ok, Ok(Response::Route { .. })), "{ok:?}");
    // The idle ones are dropped once the authentication time is up.
    let mut timed_out = 0;
    for mut s in idle {
        let left = Duration::from_secs(15).saturating_sub(flood_start.elapsed());
        s.set_read_timeout(Some(left.max(Duration::from_millis(100))))
            .unwrap();
        let mut sink = [0u8; 256];
        match s.read(&mut sink) {
            Ok(0) => timed_out += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => timed_out += 1,
            Ok(n) => {
                // An error answer (the authentication timed out) before the close.
                let _ = n;
                timed_out += 1;
            }
            Err(e) => panic!("an idle connection outlived the authentication timeout: {e}"),
        }
    }
    assert_eq!(timed_out, idle_n);
    eprintln!(
        "flood of {idle_n} idle and {garbage_n} garbage connections: all closed by the node in \
         {:.1} s; the good client did {} operations meanwhile",
        flood_start.elapsed().as_secs_f64(),
        good.ops.load(Ordering::Relaxed) - ops_before
    );
    // After the flood: a new authenticated connection and the good client still work.
    let after = Connection::open(flood_addr, &cred_a, &opts()).expect("authenticate after flood");
    let ok = after.call(
        &Request::KeyList {
            after: None,
            limit: 1,
        },
        REQUEST_TIMEOUT,
    );
    assert!(matches!(ok, Ok(Response::Listed { .. })), "{ok:?}");
    assert!(
        good.progresses(5),
        "the good client stalled after the flood"
    );
    let (ops, errors) = good.finish();
    assert!(errors.is_empty(), "the good client saw errors: {errors:#?}");
    for i in 0..c.nodes.len() {
        assert!(c.exited(i).is_none(), "node {} exited", c.nodes[i].id);
    }
    eprintln!(
        "good client: {ops} operations, no error; {:.1} s",
        started.elapsed().as_secs_f64()
    );
    c.kill_all();
}

/// Some key of the partition of `client` (made if there is none).
fn good_key(client: &Client) -> [u8; 16] {
    match client.list_keys(None, 1).unwrap().0.first() {
        Some((k, _)) => *k,
        None => client.create_key(b"", false).unwrap().key_id,
    }
}

/// The bytes of one frame (`frame::encode`), for tests that send them as they are or damage
/// them first.
fn frame_bytes(flags: u8, opcode: u16, request_id: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    frame::encode(
        FrameHeader {
            flags,
            opcode,
            request_id,
        },
        payload,
        &mut b,
    )
    .unwrap();
    b
}

#[test]
fn sigterm_stops_a_node_cleanly() {
    let _serial = serial();
    let started = Instant::now();
    let root = tempfile::tempdir().unwrap();
    let (mut c, admin) = up(root.path());
    let (pa, cred) = partition_on(&admin, 0);
    let good = Good::start(connect(&c, &cred));
    assert!(good.progresses(10), "the good client made no progress");
    // The node the good client talks to: its shard's leader.
    let victim = c.leader(shard_of(&PartitionId(pa), SHARDS)).unwrap_or(0);
    let t = Instant::now();
    let st = c.sigterm(victim, Duration::from_secs(10));
    let st = st.unwrap_or_else(|| {
        panic!(
            "node {} ignored SIGTERM (kept in {})",
            c.nodes[victim].id,
            keep(root.path())
        )
    });
    assert!(st.success(), "node {} exited with {st}", c.nodes[victim].id);
    eprintln!(
        "node {} stopped on SIGTERM in {:.2} s",
        c.nodes[victim].id,
        t.elapsed().as_secs_f64()
    );
    assert!(
        good.progresses(20),
        "the cluster stopped serving without node {victim}"
    );
    let target = commits(&admin);
    c.start(victim).unwrap();
    caught_up(&admin, victim, &target, PROGRESS_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e} (kept in {})", keep(root.path())));
    assert!(
        good.progresses(10),
        "the good client stalled after the restart"
    );
    let (ops, errors) = good.finish();
    assert!(errors.is_empty(), "the good client saw errors: {errors:#?}");
    // The restarted node serves the partition from its own state and card.
    let client = connect(&c, &cred);
    let key = good_key(&client);
    let (_, env) = client.encrypt(key, b"", b"after sigterm").unwrap();
    match client.call_on(
        victim,
        &Request::Decrypt {
            key_id: key,
            aad: Vec::new(),
            envelope: env,
        },
    ) {
        Ok(Response::Decrypted { plaintext }) => assert_eq!(plaintext, b"after sigterm"),
        r => panic!("the restarted node: {r:?}"),
    }
    digests_agree(&admin, PROGRESS_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e} (kept in {})", keep(root.path())));
    eprintln!(
        "good client: {ops} operations, no error; {:.1} s",
        started.elapsed().as_secs_f64()
    );
    c.kill_all();
}

/// A partition deleted and created again under the same id — through another node, whose card
/// makes new partition keys — is served with its new keys on every node, including those whose
/// card still held the old ones; the old partition's credential no longer authenticates.
#[test]
fn a_partition_created_again_under_its_id_is_served_with_its_new_keys_everywhere() {
    let _serial = serial();
    let root = tempfile::tempdir().unwrap();
    let (c, admin) = up(root.path());
    let (p, old_cred) = partition_on(&admin, 0);
    let nodes = c.nodes.len();
    let encrypt_on = |client: &Client, i: usize, key: [u8; 16]| {
        client.call_on(
            i,
            &Request::Encrypt {
                key_id: key,
                aad: Vec::new(),
                plaintext: b"again".to_vec(),
            },
        )
    };
    // Every node loads the first partition's keys into its card.
    let client = connect(&c, &old_cred);
    let k = client.create_key(b"", false).unwrap().key_id;
    for i in 0..nodes {
        assert!(
            matches!(encrypt_on(&client, i, k), Ok(Response::Encrypted { .. })),
            "node {i}"
        );
    }
    client.delete_key(k).unwrap();
    admin.delete_partition(p).unwrap();
    let leader = c.leader(shard_of(&PartitionId(p), SHARDS)).unwrap_or(0);
    let other = (leader + 1) % nodes;
    let (client_id, secret) = match admin.call_on(
        other,
        &Request::PartitionCreate {
            partition: p,
            flags: 0,
        },
    ) {
        Ok(Response::PartitionCreated {
            client_id,
            credential,
            ..
        }) => (client_id, credential),
        other => panic!("partition created again: {other:?}"),
    };
    let cred = Credential {
        scope: Scope::Partition(p),
        client_id,
        secret,
    };
    let client = connect(&c, &cred);
    let k = client.create_key(b"", false).unwrap().key_id;
    for i in 0..nodes {
        match encrypt_on(&client, i, k) {
            Ok(Response::Encrypted { envelope, .. }) => {
                let r = client.call_on(
                    i,
                    &Request::Decrypt {
                        key_id: k,
                        aad: Vec::new(),
                        envelope,
                    },
                );
                assert!(
                    matches!(&r, Ok(Response::Decrypted { plaintext }) if plaintext == b"again"),
                    "node {i}: {r:?}"
                );
            }
            other => panic!("node {i} (kept in {}): {other:?}", keep(root.path())),
        }
    }
    let e = Client::connect(c.client_addrs(), old_cred, opts()).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unauthenticated), "{e:?}");
}
