//! Bulk loader: real masked keys proposed through the real raft path, in-process, on the node
//! that runs a shard's replicas (no client protocol exists yet).
//!
//! [`bulk_load`] creates `partitions` partitions in the card and proposes each as
//! `Op::PartitionCreate` to its shard (`cluster::shard_of`); then `card_threads` std threads,
//! each with its own card session, make one masked blob per key (`CoreSession::create_key`) and
//! stream them through a bounded channel ([`BULK_BLOB_QUEUE`]) to the executor, which proposes
//! each as a `KeyPut` create with `Replica::propose_anywhere`, at most `in_flight` at a time. A
//! failed proposal is retried with the same record (its idempotency id makes that safe) up to
//! [`BULK_PROPOSE_ATTEMPTS`] times. Every acknowledged key is then looked up in the local
//! replicas' state machines: the load fails naming the first key that is not there.
//!
//! Partition ids, key ids and idempotency ids are deterministic ([`bulk_partition`],
//! [`bulk_key_header`], [`bulk_idempotency_id`]) so a caller can find every loaded key again.
//! Key `j` lives in partition `j % partitions`.

use keyfort_engine::cluster::shard_of;
use keyfort_engine::raft::{Committed, Replica, ReplicaError};
use keyfort_engine::state::{IdempotencyId, KeyPut, KeyState, Op, OutcomeCode, PutOp};
use keyfort_hsm::{Card, KeyHeader, KeyId, PartitionId};
use serde_json::{json, Value};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most proposals in flight at once (`BulkSpec::in_flight` above it is refused): well under the
/// replica's `MAX_PENDING_PROPOSALS`, so a loader never makes the replica answer `Busy`.
pub const BULK_IN_FLIGHT_MAX: usize = 4096;
/// Attempts per record (the first included) before the load fails: enough to ride out a leader
/// election and a forwarded proposal's timeout.
pub const BULK_PROPOSE_ATTEMPTS: u32 = 20;
/// First pause before a retry; each further retry doubles it up to [`BULK_RETRY_MAX`] (20
/// attempts wait about 13 s in all, beside the proposals' own timeouts).
pub const BULK_RETRY_FIRST: Duration = Duration::from_millis(10);
/// Longest pause between two attempts of one record.
pub const BULK_RETRY_MAX: Duration = Duration::from_secs(1);
/// Most card threads (`BulkSpec::card_threads` above it is refused).
pub const BULK_CARD_THREADS_MAX: usize = 64;
/// Most partitions (`BulkSpec::partitions` above it is refused): every card thread imports each.
pub const BULK_PARTITIONS_MAX: u32 = 100_000;
/// Blobs made by the card threads and not yet taken by the executor: the card threads block
/// beyond it, so the loader never holds more than this many blobs besides those in flight.
pub const BULK_BLOB_QUEUE: usize = 8192;
/// How long the executor sleeps when no blob is ready (it never spins on the channel).
pub const BULK_IDLE_POLL: Duration = Duration::from_millis(1);
/// Interval of the progress line.
pub const BULK_PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Longest wait, after the last acknowledgement, for a local replica to apply what it
/// acknowledged before the keys are checked.
pub const BULK_APPLY_WAIT: Duration = Duration::from_secs(30);

/// What to load.
#[derive(Clone, Copy, Debug)]
pub struct BulkSpec {
    /// Keys to create (key `j` in partition `j % partitions`).
    pub keys: u64,
    /// Partitions to create first, 1..=[`BULK_PARTITIONS_MAX`].
    pub partitions: u32,
    /// Proposals in flight at once, 1..=[`BULK_IN_FLIGHT_MAX`].
    pub in_flight: usize,
    /// Threads making blobs in the card, one session each, 1..=[`BULK_CARD_THREADS_MAX`].
    pub card_threads: usize,
}

/// What a load did.
#[derive(Clone, Debug)]
pub struct BulkReport {
    pub keys: u64,
    pub partitions: u32,
    /// Wall-clock seconds spent in the card: making the partitions, then the busiest card
    /// thread's session setup, partition imports and key creation (not its waits on the full
    /// channel). Near `total_s` means the card was the bottleneck.
    pub card_s: f64,
    /// Seconds from the call to the last acknowledgement (partitions made and committed, keys
    /// made and committed); the final presence check is not counted.
    pub total_s: f64,
    /// `keys / total_s`.
    pub keys_per_s: f64,
    /// Per shard (index = shard), the highest raft index of an acknowledged proposal (0: none).
    pub last_index: Vec<u64>,
}

impl BulkReport {
    pub fn to_json(&self) -> Value {
        json!({
            "keys": self.keys,
            "partitions": self.partitions,
            "card_s": self.card_s,
            "total_s": self.total_s,
            "keys_per_s": self.keys_per_s,
            "last_index": self.last_index,
        })
    }
}

/// The id of bulk partition `p`.
pub fn bulk_partition(p: u32) -> PartitionId {
    let mut b = [0xb1u8; 16];
    b[..4].copy_from_slice(&p.to_le_bytes());
    b[4..8].copy_from_slice(b"bulk");
    PartitionId(b)
}

/// The header (partition, key id, version 1) of bulk key `j` of a load over `partitions`
/// partitions.
pub fn bulk_key_header(j: u64, partitions: u32) -> KeyHeader {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&j.to_le_bytes());
    k[8..].copy_from_slice(&(j.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x6b75_6c62).to_le_bytes());
    let p = (j % u64::from(partitions.max(1))) as u32;
    KeyHeader::aes(bulk_partition(p), KeyId(k), 1)
}

/// The idempotency id of bulk key `j`'s create (never `IdempotencyId::NONE`).
pub fn bulk_idempotency_id(j: u64) -> IdempotencyId {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&j.to_le_bytes());
    b[8..].copy_from_slice(b"bulkload");
    IdempotencyId(b)
}

fn key_name(j: u64, h: &KeyHeader) -> String {
    format!("key {j} (partition {}, key id {})", h.partition, h.key_id)
}

/// A blob made by a card thread, or why the thread stopped.
type Made = Result<(u64, Vec<u8>), String>;

/// What the key tasks share with the dispatcher.
struct Progress {
    acked: Cell<u64>,
    error: RefCell<Option<String>>,
    last_index: RefCell<Vec<u64>>,
}

impl Progress {
    fn fail(&self, e: String) {
        self.error.borrow_mut().get_or_insert(e);
    }

    fn ack(&self, shard: usize, c: &Committed) {
        let mut li = self.last_index.borrow_mut();
        li[shard] = li[shard].max(c.index);
    }

    fn failed(&self) -> bool {
        self.error.borrow().is_some()
    }
}

/// Loads `spec.keys` real masked keys in `spec.partitions` new partitions through raft.
/// `replicas[i]` is this node's replica of shard `i`; `card` is this node's card and
/// `integrity_key_wrapped` the cluster integrity key wrapped for it. Runs on the replicas'
/// executor.
pub async fn bulk_load(
    replicas: Vec<Rc<Replica>>,
    card: &'static Card,
    integrity_key_wrapped: Vec<u8>,
    spec: BulkSpec,
) -> Result<BulkReport, String> {
    check_spec(&replicas, &spec)?;
    let t0 = Instant::now();
    let progress = Rc::new(Progress {
        acked: Cell::new(0),
        error: RefCell::new(None),
        last_index: RefCell::new(vec![0; replicas.len()]),
    });

    // Partitions are made in the card off the executor (card calls block).
    let ik = integrity_key_wrapped.clone();
    let parts = spec.partitions;
    let made = std::thread::spawn(move || -> Result<(Vec<Vec<u8>>, f64), String> {
        let t = Instant::now();
        let mut s = card.session().map_err(|e| format!("card session: {e}"))?;
        s.import_integrity_key(&ik)
            .map_err(|e| format!("integrity key: {e}"))?;
        let configs = (0..parts)
            .map(|p| {
                s.create_partition(bulk_partition(p))
                    .map_err(|e| format!("partition {}: create: {e}", bulk_partition(p)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((configs, t.elapsed().as_secs_f64()))
    });
    let (configs, partitions_card_s) = join(made)
        .await
        .map_err(|_| "the partition-making thread panicked".to_string())??;
    let configs = Arc::new(configs);

    // The card threads start at once: they fill the channel while the partitions commit.
    let (tx, rx) = sync_channel::<Made>(BULK_BLOB_QUEUE);
    let threads: Vec<JoinHandle<f64>> = (0..spec.card_threads)
        .map(|th| {
            let tx = tx.clone();
            let configs = configs.clone();
            let ik = integrity_key_wrapped.clone();
            std::thread::spawn(move || make_blobs(card, &ik, &configs, th, spec, tx))
        })
        .collect();
    drop(tx);

    let loaded = async {
        create_partitions(&replicas, &configs, &spec, &progress).await?;
        load_keys(&replicas, rx, &spec, &progress, t0).await
    }
    .await;
    // On an error `rx` is gone: the card threads stop at their next send.
    let mut card_s: f64 = 0.0;
    for h in threads {
        match join(h).await {
            Ok(s) => card_s = card_s.max(s),
            Err(_) => progress.fail("a card thread panicked".to_string()),
        }
    }
    loaded?;
    if let Some(e) = progress.error.borrow_mut().take() {
        return Err(e);
    }
    let total_s = t0.elapsed().as_secs_f64();
    let last_index = progress.last_index.borrow().clone();

    verify(&replicas, &configs, &spec, &last_index).await?;
    Ok(BulkReport {
        keys: spec.keys,
        partitions: spec.partitions,
        card_s: card_s + partitions_card_s,
        total_s,
        keys_per_s: if total_s > 0.0 {
            spec.keys as f64 / total_s
        } else {
            0.0
        },
        last_index,
    })
}

fn check_spec(replicas: &[Rc<Replica>], spec: &BulkSpec) -> Result<(), String> {
    if replicas.is_empty() {
        return Err("bulk load: no replicas (one per shard expected)".into());
    }
    if !(1..=BULK_IN_FLIGHT_MAX).contains(&spec.in_flight) {
        return Err(format!(
            "bulk load: in_flight {} outside 1..={BULK_IN_FLIGHT_MAX}",
            spec.in_flight
        ));
    }
    if !(1..=BULK_CARD_THREADS_MAX).contains(&spec.card_threads) {
        return Err(format!(
            "bulk load: card_threads {} outside 1..={BULK_CARD_THREADS_MAX}",
            spec.card_threads
        ));
    }
    if !(1..=BULK_PARTITIONS_MAX).contains(&spec.partitions) {
        return Err(format!(
            "bulk load: partitions {} outside 1..={BULK_PARTITIONS_MAX}",
            spec.partitions
        ));
    }
    Ok(())
}

/// Waits for a std thread without blocking the executor.
async fn join<T>(h: JoinHandle<T>) -> std::thread::Result<T> {
    while !h.is_finished() {
        glommio::timer::sleep(BULK_IDLE_POLL).await;
    }
    h.join()
}

/// One card thread: keys `th, th + threads, ...`, each sent as soon as made. Returns the
/// seconds it spent in the card.
fn make_blobs(
    card: &'static Card,
    ik: &[u8],
    configs: &[Vec<u8>],
    th: usize,
    spec: BulkSpec,
    tx: SyncSender<Made>,
) -> f64 {
    let t = Instant::now();
    let session = (|| {
        let mut s = card.session()?;
        s.import_integrity_key(ik)?;
        for c in configs {
            s.import_partition(c)?;
        }
        Ok::<_, keyfort_hsm::CardError>(s)
    })();
    let mut busy = t.elapsed();
    let mut s = match session {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send(Err(format!("card thread {th}: session setup: {e}")));
            return busy.as_secs_f64();
        }
    };
    let mut j = th as u64;
    while j < spec.keys {
        let h = bulk_key_header(j, spec.partitions);
        let t = Instant::now();
        let made = s.create_key(&h);
        busy += t.elapsed();
        let sent = match made {
            Ok(blob) => tx.send(Ok((j, blob))),
            Err(e) => {
                let _ = tx.send(Err(format!("{}: card create: {e}", key_name(j, &h))));
                break;
            }
        };
        if sent.is_err() {
            break; // the loader stopped
        }
        j += spec.card_threads as u64;
    }
    busy.as_secs_f64()
}

/// Proposes `op` on `replica` (forwarded to the leader if need be) until it commits, at most
/// [`BULK_PROPOSE_ATTEMPTS`] times, pausing between attempts.
async fn propose_retrying(
    replica: &Rc<Replica>,
    op: &Op,
    what: impl Fn() -> String,
) -> Result<Committed, String> {
    let (kind, payload) = (op.kind(), op.encode());
    let mut pause = BULK_RETRY_FIRST;
    let mut last = String::new();
    for attempt in 1..=BULK_PROPOSE_ATTEMPTS {
        match replica.propose_anywhere(kind, &payload).await {
            Ok(c) => return Ok(c),
            Err(ReplicaError::Stopped(e)) => {
                return Err(format!("{}: the replica stopped: {e}", what()))
            }
            Err(e) => last = e.to_string(),
        }
        if attempt < BULK_PROPOSE_ATTEMPTS {
            glommio::timer::sleep(pause).await;
            pause = (pause * 2).min(BULK_RETRY_MAX);
        }
    }
    Err(format!(
        "{}: not committed after {BULK_PROPOSE_ATTEMPTS} attempts; last error: {last}",
        what()
    ))
}

/// Proposes every partition create, `in_flight` at a time. A partition create carries no
/// idempotency id, so `PartitionExists` is accepted only when this replica's state holds our
/// very config (an earlier attempt of ours committed): anything else is an error.
async fn create_partitions(
    replicas: &[Rc<Replica>],
    configs: &Arc<Vec<Vec<u8>>>,
    spec: &BulkSpec,
    progress: &Rc<Progress>,
) -> Result<(), String> {
    let shards = replicas.len() as u32;
    let all: Vec<u32> = (0..spec.partitions).collect();
    for chunk in all.chunks(spec.in_flight) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|&p| {
                let partition = bulk_partition(p);
                let shard = shard_of(&partition, shards) as usize;
                let replica = replicas[shard].clone();
                let config = configs[p as usize].clone();
                let progress = progress.clone();
                glommio::spawn_local(async move {
                    let op = Op::PartitionCreate {
                        partition,
                        config: config.clone(),
                    };
                    let what = || format!("partition {p} ({partition}) on shard {shard}");
                    let c = propose_retrying(&replica, &op, what).await?;
                    let ok = match c.result.outcome.code {
                        OutcomeCode::PartitionCreated => true,
                        OutcomeCode::PartitionExists => replica.with_core(|core| {
                            core.state_machine()
                                .partitions()
                                .any(|(id, cfg)| *id == partition && *cfg == config)
                        }),
                        _ => false,
                    };
                    if !ok {
                        return Err(format!(
                            "{}: applied as {:?}, not created",
                            what(),
                            c.result.outcome.code
                        ));
                    }
                    progress.ack(shard, &c);
                    Ok(())
                })
            })
            .collect();
        for t in tasks {
            t.await?;
        }
    }
    Ok(())
}

/// Takes blobs off the channel and proposes each key, `in_flight` at a time, until every card
/// thread is done (or a key fails).
async fn load_keys(
    replicas: &[Rc<Replica>],
    rx: Receiver<Made>,
    spec: &BulkSpec,
    progress: &Rc<Progress>,
    t0: Instant,
) -> Result<(), String> {
    let shards = replicas.len() as u32;
    let permits = Rc::new(glommio::sync::Semaphore::new(spec.in_flight as u64));
    let mut received = 0u64;
    let mut last_print = Instant::now();
    let print = |acked: u64| {
        let s = t0.elapsed().as_secs_f64();
        println!(
            "bulk: {acked}/{} keys, {:.0} keys/s",
            spec.keys,
            if s > 0.0 { acked as f64 / s } else { 0.0 }
        );
    };
    while !progress.failed() {
        if last_print.elapsed() >= BULK_PROGRESS_EVERY {
            print(progress.acked.get());
            last_print = Instant::now();
        }
        let permit = permits
            .acquire_static_permit(1)
            .await
            .map_err(|e| format!("bulk load: in-flight limit: {e}"))?;
        let (j, blob) = match rx.try_recv() {
            Ok(Ok(made)) => made,
            Ok(Err(e)) => {
                progress.fail(e);
                break;
            }
            Err(TryRecvError::Empty) => {
                drop(permit);
                glommio::timer::sleep(BULK_IDLE_POLL).await;
                continue;
            }
            Err(TryRecvError::Disconnected) => break,
        };
        received += 1;
        let header = bulk_key_header(j, spec.partitions);
        let shard = shard_of(&header.partition, shards) as usize;
        let replica = replicas[shard].clone();
        let progress = progress.clone();
        glommio::spawn_local(async move {
            let _permit = permit;
            let op = Op::KeyPut(KeyPut {
                op: PutOp::Create,
                idempotency_id: bulk_idempotency_id(j),
                header,
                version_replaced: 0,
                state: KeyState::Enabled,
                metadata: format!("bulk key {j}").into_bytes(),
                blob,
            });
            let what = || format!("{} on shard {shard}", key_name(j, &header));
            let r = match propose_retrying(&replica, &op, what).await {
                Ok(c) => check_created(&replica, &op, &c)
                    .map(|()| c)
                    .map_err(|e| format!("{}: {e}", what())),
                Err(e) => Err(e),
            };
            match r {
                Ok(c) => {
                    progress.ack(shard, &c);
                    progress.acked.set(progress.acked.get() + 1);
                }
                Err(e) => progress.fail(e),
            }
        })
        .detach();
        glommio::yield_if_needed().await;
    }
    drop(rx);
    // Every task returns its permit when done: holding them all means none is in flight.
    while permits.available() < spec.in_flight as u64 {
        if last_print.elapsed() >= BULK_PROGRESS_EVERY {
            print(progress.acked.get());
            last_print = Instant::now();
        }
        glommio::timer::sleep(BULK_IDLE_POLL).await;
    }
    if progress.failed() {
        return Ok(()); // the caller returns the error
    }
    if received != spec.keys {
        return Err(format!(
            "bulk load: the card threads made {received} of {} blobs",
            spec.keys
        ));
    }
    print(progress.acked.get());
    Ok(())
}

/// A key create's outcome is a success: created, the idempotency replay of our own create, or
/// (the idempotency entry expired) `KeyExists` with our very blob in this replica's state.
fn check_created(replica: &Rc<Replica>, op: &Op, c: &Committed) -> Result<(), String> {
    let Op::KeyPut(put) = op else {
        return Err("not a key put".into());
    };
    match c.result.outcome.code {
        OutcomeCode::Created => Ok(()),
        OutcomeCode::KeyExists => {
            let h = &put.header;
            let ours = replica.with_core(|core| {
                core.state_machine()
                    .get(h.partition, h.key_id, h.version)
                    .map(|e| e.is_some_and(|e| e.blob == put.blob))
            });
            match ours {
                Ok(true) => Ok(()),
                Ok(false) => Err("applied as KeyExists: another key holds that id".into()),
                Err(e) => Err(format!("applied as KeyExists and its lookup failed: {e}")),
            }
        }
        code => Err(format!(
            "applied as {code:?} (index {}), not created",
            c.index
        )),
    }
}

/// Once every local replica applied what it acknowledged, every partition and key must be in
/// the state machine of its shard's replica.
async fn verify(
    replicas: &[Rc<Replica>],
    configs: &[Vec<u8>],
    spec: &BulkSpec,
    last_index: &[u64],
) -> Result<(), String> {
    let shards = replicas.len() as u32;
    let deadline = Instant::now() + BULK_APPLY_WAIT;
    for (shard, r) in replicas.iter().enumerate() {
        while r.with_core(|c| c.applied()) < last_index[shard] {
            if Instant::now() >= deadline {
                return Err(format!(
                    "bulk load: shard {shard} applied {} < acknowledged {} after {BULK_APPLY_WAIT:?}",
                    r.with_core(|c| c.applied()),
                    last_index[shard]
                ));
            }
            glommio::timer::sleep(BULK_IDLE_POLL).await;
        }
    }
    for p in 0..spec.partitions {
        let partition = bulk_partition(p);
        let shard = shard_of(&partition, shards) as usize;
        let present = replicas[shard].with_core(|c| {
            c.state_machine()
                .partitions()
                .any(|(id, cfg)| *id == partition && *cfg == configs[p as usize])
        });
        if !present {
            return Err(format!(
                "bulk load: partition {p} ({partition}) acknowledged but not in shard {shard}'s state"
            ));
        }
    }
    for j in 0..spec.keys {
        let h = bulk_key_header(j, spec.partitions);
        let shard = shard_of(&h.partition, shards) as usize;
        let found = replicas[shard].with_core(|c| {
            c.state_machine()
                .get(h.partition, h.key_id, h.version)
                .map(|e| e.is_some())
        });
        match found {
            Ok(true) => {}
            Ok(false) => {
                return Err(format!(
                    "bulk load: {} acknowledged but not in shard {shard}'s state",
                    key_name(j, &h)
                ))
            }
            Err(e) => {
                return Err(format!(
                    "bulk load: {}: lookup in shard {shard}: {e}",
                    key_name(j, &h)
                ))
            }
        }
        if j % 1024 == 0 {
            glommio::yield_if_needed().await;
        }
    }
    Ok(())
}
