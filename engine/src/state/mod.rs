//! The shard state machine: `reduce(log)`. Owns the keys by (partition, key id, version), the
//! partition configs, the cluster config and the idempotency table, and an order-independent
//! digest of all of it kept up to date on every apply. Apply is pure (no card, no I/O) and
//! deterministic: every replica applying the same records reaches the same bytes and digest.
//! Payload and entry encodings: docs/format.md §3.

pub mod payload;

pub use payload::{Checkpoint, IdempotencyId, KeyPut, Op, PayloadError, PutOp};

use crate::wbl::RecordKind;
use keyfort_hsm::{KeyHeader, KeyId, PartitionId};
use payload::{put_bytes16, Reader};
use std::collections::{BTreeMap, BTreeSet};
use xxhash_rust::xxh3::xxh3_128;

/// Largest masked blob a key version may hold. The card's masked blob is 117 bytes today
/// (docs/format.md §2.2); the margin admits other key kinds without a format change.
pub const BLOB_BYTES_MAX: usize = 512;
/// Largest client metadata per key version: labels and descriptions, not data.
pub const METADATA_BYTES_MAX: usize = 1024;
/// Largest partition config (245 bytes today, §2.3).
pub const PARTITION_CONFIG_BYTES_MAX: usize = 4096;
/// Largest cluster config record.
pub const CLUSTER_CONFIG_BYTES_MAX: usize = 16 * 1024;
/// Idempotency entries live this many LSNs: an entry made at LSN e is dropped when a record at
/// LSN ≥ e + window is applied. By log position, never by clock, so every replica drops the same
/// entries; it also bounds the table to one entry per LSN of the window. At ~10k writes/s this
/// covers ~100 s of client retries.
pub const IDEMPOTENCY_WINDOW_LSNS: u64 = 1 << 20;
/// Format version of key and idempotency entries (their first byte where they have one).
pub const ENTRY_VERSION: u8 = 1;

/// Position of one key version: the sort order of snapshot data blocks.
pub type KeySlot = (PartitionId, KeyId, u32);

/// Lifecycle state of a key version. Stable wire values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum KeyState {
    Enabled = 1,
    Disabled = 2,
}

/// One key version as the state holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyEntry {
    pub header: KeyHeader,
    pub state: KeyState,
    pub lsn_created: u64,
    pub metadata: Vec<u8>,
    pub blob: Vec<u8>,
}

impl KeyEntry {
    pub fn slot(&self) -> KeySlot {
        (
            self.header.partition,
            self.header.key_id,
            self.header.version,
        )
    }

    /// Canonical bytes (§3.7): what snapshot blocks store and the digest hashes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(56 + self.metadata.len() + self.blob.len());
        w.push(ENTRY_VERSION);
        w.extend_from_slice(&self.header.encode());
        w.push(self.state as u8);
        w.extend_from_slice(&self.lsn_created.to_le_bytes());
        put_bytes16(&mut w, &self.metadata, METADATA_BYTES_MAX);
        put_bytes16(&mut w, &self.blob, BLOB_BYTES_MAX);
        w
    }

    pub fn decode(b: &[u8]) -> Result<KeyEntry, PayloadError> {
        let mut r = Reader::new(b, "key entry");
        r.version()?;
        let header = r.key_header()?;
        let state = r.key_state()?;
        let lsn_created = r.u64("lsn created")?;
        let metadata = r.bytes16("metadata", METADATA_BYTES_MAX)?;
        let blob = r.bytes16("blob", BLOB_BYTES_MAX)?;
        r.finish()?;
        Ok(KeyEntry {
            header,
            state,
            lsn_created,
            metadata,
            blob,
        })
    }
}

/// What applying one record did. Stable wire values (stored in the idempotency table); codes
/// from 64 up are rejections: the record is in the log, the state did not change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OutcomeCode {
    Created = 1,
    Updated = 2,
    Rotated = 3,
    Deleted = 4,
    PartitionCreated = 5,
    PartitionDeleted = 6,
    ClusterConfigSet = 7,
    CheckpointNoted = 8,
    /// A raft entry the state machine does not interpret.
    Ignored = 9,
    /// LSN at or below the applied LSN: replay of a record already in the state; nothing done.
    AlreadyApplied = 10,
    KeyExists = 64,
    NoSuchKey = 65,
    NoSuchPartition = 66,
    PartitionExists = 67,
    /// A rotate naming a version that is no longer current; `version` = the current one.
    StaleVersion = 68,
    /// A create not at version 1, or a rotate not to current + 1.
    InvalidVersion = 69,
    /// The idempotency id was first used by a different operation.
    IdempotencyConflict = 70,
    PartitionNotEmpty = 71,
    /// The payload does not decode; deterministic, so every replica rejects it alike.
    BadPayload = 72,
}

impl OutcomeCode {
    const ALL: [OutcomeCode; 19] = [
        OutcomeCode::Created,
        OutcomeCode::Updated,
        OutcomeCode::Rotated,
        OutcomeCode::Deleted,
        OutcomeCode::PartitionCreated,
        OutcomeCode::PartitionDeleted,
        OutcomeCode::ClusterConfigSet,
        OutcomeCode::CheckpointNoted,
        OutcomeCode::Ignored,
        OutcomeCode::AlreadyApplied,
        OutcomeCode::KeyExists,
        OutcomeCode::NoSuchKey,
        OutcomeCode::NoSuchPartition,
        OutcomeCode::PartitionExists,
        OutcomeCode::StaleVersion,
        OutcomeCode::InvalidVersion,
        OutcomeCode::IdempotencyConflict,
        OutcomeCode::PartitionNotEmpty,
        OutcomeCode::BadPayload,
    ];

    pub fn from_u8(v: u8) -> Option<OutcomeCode> {
        OutcomeCode::ALL.into_iter().find(|c| *c as u8 == v)
    }

    pub fn is_rejected(self) -> bool {
        self as u8 >= 64
    }
}

/// The result of one record: a code and the key version it concerns (created/rotated version,
/// the current version for `StaleVersion`, the number of versions removed for `Deleted`, else 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Outcome {
    pub code: OutcomeCode,
    pub version: u32,
}

impl Outcome {
    fn of(code: OutcomeCode) -> Outcome {
        Outcome { code, version: 0 }
    }
}

/// What `apply` answers for one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApplyResult {
    pub outcome: Outcome,
    /// Set when the idempotency id was seen before for the same operation: `outcome` is then the
    /// first result, and this is the LSN that produced it.
    pub duplicate_of_lsn: Option<u64>,
}

/// One idempotency table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdempotencyEntry {
    pub partition: PartitionId,
    pub id: IdempotencyId,
    /// xxh3-64 of `kind ‖ payload`: the operation the id belongs to.
    pub fingerprint: u64,
    pub first: Outcome,
    pub lsn: u64,
}

/// Bytes of an encoded [`IdempotencyEntry`].
pub const IDEMPOTENCY_ENTRY_BYTES: usize = 53;

impl IdempotencyEntry {
    /// Canonical bytes (§3.8), fixed size.
    pub fn encode(&self) -> [u8; IDEMPOTENCY_ENTRY_BYTES] {
        let mut b = [0u8; IDEMPOTENCY_ENTRY_BYTES];
        b[0..16].copy_from_slice(&self.partition.0);
        b[16..32].copy_from_slice(&self.id.0);
        b[32..40].copy_from_slice(&self.fingerprint.to_le_bytes());
        b[40] = self.first.code as u8;
        b[41..45].copy_from_slice(&self.first.version.to_le_bytes());
        b[45..53].copy_from_slice(&self.lsn.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<IdempotencyEntry, PayloadError> {
        let mut r = Reader::new(b, "idempotency entry");
        let partition = PartitionId(r.array("partition id")?);
        let id = IdempotencyId(r.array("idempotency id")?);
        let fingerprint = r.u64("fingerprint")?;
        let code = r.u8("outcome code")?;
        let code = OutcomeCode::from_u8(code).ok_or(r.bad("outcome code", code as u64))?;
        let version = r.u32("outcome version")?;
        let lsn = r.u64("lsn")?;
        r.finish()?;
        Ok(IdempotencyEntry {
            partition,
            id,
            fingerprint,
            first: Outcome { code, version },
            lsn,
        })
    }
}

/// Order-independent digest of a whole state (§3.9): the sum modulo 2^128 of
/// xxh3-128(tag ‖ canonical bytes) over every live item. Insert adds, remove subtracts, so it is
/// kept incrementally and two states with the same items have the same digest however they were
/// reached. A sum, not a xor: two equal items do not cancel.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct StateDigest(pub u128);

impl StateDigest {
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_le_bytes()
    }
    pub fn from_bytes(b: [u8; 16]) -> StateDigest {
        StateDigest(u128::from_le_bytes(b))
    }
    fn item(tag: u8, parts: &[&[u8]]) -> u128 {
        let mut buf = Vec::with_capacity(1 + parts.iter().map(|p| p.len()).sum::<usize>());
        buf.push(tag);
        for p in parts {
            buf.extend_from_slice(p);
        }
        xxh3_128(&buf)
    }
    fn add(&mut self, h: u128) {
        self.0 = self.0.wrapping_add(h);
    }
    fn sub(&mut self, h: u128) {
        self.0 = self.0.wrapping_sub(h);
    }
}

impl std::fmt::Display for StateDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl std::fmt::Debug for StateDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StateDigest({self})")
    }
}

/// Digest tags: one per item type, so equal bytes of different types never collide.
const TAG_KEY: u8 = 1;
const TAG_PARTITION: u8 = 2;
const TAG_CLUSTER: u8 = 3;
const TAG_IDEMPOTENCY: u8 = 4;

pub(crate) fn digest_key(e: &KeyEntry) -> u128 {
    StateDigest::item(TAG_KEY, &[&e.encode()])
}
pub(crate) fn digest_partition(p: &PartitionId, config: &[u8]) -> u128 {
    StateDigest::item(TAG_PARTITION, &[&p.0, config])
}
pub(crate) fn digest_cluster(config: &[u8]) -> u128 {
    StateDigest::item(TAG_CLUSTER, &[config])
}
pub(crate) fn digest_idempotency(e: &IdempotencyEntry) -> u128 {
    StateDigest::item(TAG_IDEMPOTENCY, &[&e.encode()])
}

/// The state of one shard at `lsn_applied`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateMachine {
    keys: BTreeMap<KeySlot, KeyEntry>,
    partitions: BTreeMap<PartitionId, Vec<u8>>,
    cluster_config: Option<Vec<u8>>,
    idempotency: BTreeMap<(PartitionId, IdempotencyId), IdempotencyEntry>,
    /// The same entries by LSN, for expiry in log order.
    idempotency_by_lsn: BTreeSet<(u64, PartitionId, IdempotencyId)>,
    idempotency_window_lsns: u64,
    lsn_applied: u64,
    digest: StateDigest,
}

impl Default for StateMachine {
    fn default() -> Self {
        StateMachine::new()
    }
}

impl StateMachine {
    pub fn new() -> StateMachine {
        StateMachine::with_idempotency_window(IDEMPOTENCY_WINDOW_LSNS)
    }

    /// A state with another expiry window (tests). Every replica of a shard must use the same
    /// window; snapshots record it.
    pub fn with_idempotency_window(window_lsns: u64) -> StateMachine {
        assert!(window_lsns > 0, "idempotency window must be positive");
        StateMachine {
            keys: BTreeMap::new(),
            partitions: BTreeMap::new(),
            cluster_config: None,
            idempotency: BTreeMap::new(),
            idempotency_by_lsn: BTreeSet::new(),
            idempotency_window_lsns: window_lsns,
            lsn_applied: 0,
            digest: StateDigest::default(),
        }
    }

    pub fn lsn_applied(&self) -> u64 {
        self.lsn_applied
    }
    pub fn digest(&self) -> StateDigest {
        self.digest
    }
    pub fn idempotency_window_lsns(&self) -> u64 {
        self.idempotency_window_lsns
    }
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Every key version in (partition, key id, version) order.
    pub fn keys(&self) -> impl Iterator<Item = &KeyEntry> {
        self.keys.values()
    }
    pub fn partitions(&self) -> impl Iterator<Item = (&PartitionId, &Vec<u8>)> {
        self.partitions.iter()
    }
    pub fn cluster_config(&self) -> Option<&[u8]> {
        self.cluster_config.as_deref()
    }
    /// Idempotency entries in (partition, id) order.
    pub fn idempotency(&self) -> impl Iterator<Item = &IdempotencyEntry> {
        self.idempotency.values()
    }

    pub fn get(&self, partition: PartitionId, key_id: KeyId, version: u32) -> Option<&KeyEntry> {
        self.keys.get(&(partition, key_id, version))
    }

    /// Every version of one key, oldest first.
    pub fn versions(
        &self,
        partition: PartitionId,
        key_id: KeyId,
    ) -> impl Iterator<Item = &KeyEntry> {
        self.keys
            .range((partition, key_id, 0)..=(partition, key_id, u32::MAX))
            .map(|(_, e)| e)
    }

    /// The newest version of a key: the only one that encrypts.
    pub fn current(&self, partition: PartitionId, key_id: KeyId) -> Option<&KeyEntry> {
        self.versions(partition, key_id).last()
    }

    /// Recomputes the digest from every item; equals [`Self::digest`] unless a bug broke the
    /// incremental upkeep (tests and snapshot verification compare the two).
    pub fn digest_recomputed(&self) -> StateDigest {
        let mut d = StateDigest::default();
        self.keys.values().for_each(|e| d.add(digest_key(e)));
        self.partitions
            .iter()
            .for_each(|(p, c)| d.add(digest_partition(p, c)));
        if let Some(c) = &self.cluster_config {
            d.add(digest_cluster(c));
        }
        self.idempotency
            .values()
            .for_each(|e| d.add(digest_idempotency(e)));
        d
    }

    /// Applies the record at `lsn`. Records at or below the applied LSN are replays and change
    /// nothing (`AlreadyApplied`); LSNs may skip (raft entries applied elsewhere).
    pub fn apply(&mut self, lsn: u64, kind: RecordKind, payload: &[u8]) -> ApplyResult {
        if lsn <= self.lsn_applied {
            return done(Outcome::of(OutcomeCode::AlreadyApplied));
        }
        self.lsn_applied = lsn;
        self.expire_idempotency(lsn);
        let op = match Op::decode(kind, payload) {
            Ok(op) => op,
            Err(PayloadError::NotStateKind { .. }) => {
                return done(Outcome::of(OutcomeCode::Ignored))
            }
            Err(_) => return done(Outcome::of(OutcomeCode::BadPayload)),
        };
        let scope = match &op {
            Op::KeyPut(p) if !p.idempotency_id.is_none() => {
                Some((p.header.partition, p.idempotency_id))
            }
            Op::KeyDelete {
                idempotency_id,
                partition,
                ..
            } if !idempotency_id.is_none() => Some((*partition, *idempotency_id)),
            _ => None,
        };
        let Some(scope) = scope else {
            return done(self.execute(lsn, op));
        };
        let fingerprint = fingerprint(kind, payload);
        if let Some(e) = self.idempotency.get(&scope) {
            if e.fingerprint == fingerprint {
                return ApplyResult {
                    outcome: e.first,
                    duplicate_of_lsn: Some(e.lsn),
                };
            }
            return done(Outcome::of(OutcomeCode::IdempotencyConflict));
        }
        let first = self.execute(lsn, op);
        self.insert_idempotency(IdempotencyEntry {
            partition: scope.0,
            id: scope.1,
            fingerprint,
            first,
            lsn,
        });
        done(first)
    }

    fn execute(&mut self, lsn: u64, op: Op) -> Outcome {
        match op {
            Op::ClusterConfig { config } => {
                if let Some(old) = self.cluster_config.take() {
                    self.digest.sub(digest_cluster(&old));
                }
                self.digest.add(digest_cluster(&config));
                self.cluster_config = Some(config);
                Outcome::of(OutcomeCode::ClusterConfigSet)
            }
            Op::PartitionCreate { partition, config } => {
                if self.partitions.contains_key(&partition) {
                    return Outcome::of(OutcomeCode::PartitionExists);
                }
                self.digest.add(digest_partition(&partition, &config));
                self.partitions.insert(partition, config);
                Outcome::of(OutcomeCode::PartitionCreated)
            }
            Op::PartitionDelete { partition } => self.delete_partition(partition),
            Op::KeyPut(p) => self.key_put(lsn, p),
            Op::KeyDelete {
                partition, key_id, ..
            } => self.key_delete(partition, key_id),
            Op::Checkpoint(_) => Outcome::of(OutcomeCode::CheckpointNoted),
        }
    }

    /// A partition with keys is refused: deleting a tenant's keys takes explicit key deletes.
    fn delete_partition(&mut self, partition: PartitionId) -> Outcome {
        if !self.partitions.contains_key(&partition) {
            return Outcome::of(OutcomeCode::NoSuchPartition);
        }
        let lo = (partition, KeyId([0; 16]), 0);
        let hi = (partition, KeyId([0xff; 16]), u32::MAX);
        if self.keys.range(lo..=hi).next().is_some() {
            return Outcome::of(OutcomeCode::PartitionNotEmpty);
        }
        let config = self.partitions.remove(&partition).expect("checked above");
        self.digest.sub(digest_partition(&partition, &config));
        Outcome::of(OutcomeCode::PartitionDeleted)
    }

    fn key_put(&mut self, lsn: u64, p: KeyPut) -> Outcome {
        let h = p.header;
        if !self.partitions.contains_key(&h.partition) {
            return Outcome::of(OutcomeCode::NoSuchPartition);
        }
        let current = self
            .current(h.partition, h.key_id)
            .map(|e| e.header.version);
        match p.op {
            PutOp::Create => {
                if current.is_some() {
                    return Outcome::of(OutcomeCode::KeyExists);
                }
                if h.version != 1 {
                    return Outcome::of(OutcomeCode::InvalidVersion);
                }
            }
            PutOp::Rotate => {
                let Some(current) = current else {
                    return Outcome::of(OutcomeCode::NoSuchKey);
                };
                if p.version_replaced != current {
                    return Outcome {
                        code: OutcomeCode::StaleVersion,
                        version: current,
                    };
                }
                if current.checked_add(1) != Some(h.version) {
                    return Outcome::of(OutcomeCode::InvalidVersion);
                }
            }
            PutOp::Update => {
                let slot = (h.partition, h.key_id, h.version);
                let Some(old) = self.keys.get(&slot).cloned() else {
                    return Outcome::of(OutcomeCode::NoSuchKey);
                };
                // Header, blob and creation LSN stay: an update never touches key material.
                let new = KeyEntry {
                    state: p.state,
                    metadata: p.metadata,
                    ..old.clone()
                };
                self.replace_key(Some(&old), new);
                return Outcome {
                    code: OutcomeCode::Updated,
                    version: h.version,
                };
            }
        }
        let entry = KeyEntry {
            header: h,
            state: p.state,
            lsn_created: lsn,
            metadata: p.metadata,
            blob: p.blob,
        };
        self.replace_key(None, entry);
        let code = match p.op {
            PutOp::Create => OutcomeCode::Created,
            _ => OutcomeCode::Rotated,
        };
        Outcome {
            code,
            version: h.version,
        }
    }

    fn replace_key(&mut self, old: Option<&KeyEntry>, new: KeyEntry) {
        if let Some(old) = old {
            self.digest.sub(digest_key(old));
        }
        self.digest.add(digest_key(&new));
        self.keys.insert(new.slot(), new);
    }

    /// A tombstone: every version goes. A later create with the same key id starts a new key.
    fn key_delete(&mut self, partition: PartitionId, key_id: KeyId) -> Outcome {
        let slots: Vec<KeySlot> = self
            .versions(partition, key_id)
            .map(KeyEntry::slot)
            .collect();
        if slots.is_empty() {
            return Outcome::of(OutcomeCode::NoSuchKey);
        }
        for s in &slots {
            let e = self.keys.remove(s).expect("listed above");
            self.digest.sub(digest_key(&e));
        }
        Outcome {
            code: OutcomeCode::Deleted,
            version: slots.len() as u32,
        }
    }

    fn insert_idempotency(&mut self, e: IdempotencyEntry) {
        self.digest.add(digest_idempotency(&e));
        self.idempotency_by_lsn.insert((e.lsn, e.partition, e.id));
        self.idempotency.insert((e.partition, e.id), e);
    }

    fn expire_idempotency(&mut self, lsn: u64) {
        while let Some(&first) = self.idempotency_by_lsn.first() {
            if first.0.saturating_add(self.idempotency_window_lsns) > lsn {
                break;
            }
            self.idempotency_by_lsn.remove(&first);
            let e = self
                .idempotency
                .remove(&(first.1, first.2))
                .expect("both indexes hold the same entries");
            self.digest.sub(digest_idempotency(&e));
        }
    }

    /// Rebuilds a state from its parts (snapshot load). Items are trusted to be valid encodings;
    /// the caller compares the resulting digest with the one it expects.
    pub(crate) fn from_parts(
        lsn_applied: u64,
        idempotency_window_lsns: u64,
        keys: Vec<KeyEntry>,
        partitions: Vec<(PartitionId, Vec<u8>)>,
        cluster_config: Option<Vec<u8>>,
        idempotency: Vec<IdempotencyEntry>,
    ) -> StateMachine {
        let mut s = StateMachine::with_idempotency_window(idempotency_window_lsns.max(1));
        s.lsn_applied = lsn_applied;
        for e in keys {
            s.replace_key(None, e);
        }
        for (p, c) in partitions {
            s.digest.add(digest_partition(&p, &c));
            s.partitions.insert(p, c);
        }
        if let Some(c) = cluster_config {
            s.digest.add(digest_cluster(&c));
            s.cluster_config = Some(c);
        }
        for e in idempotency {
            s.insert_idempotency(e);
        }
        s
    }
}

fn done(outcome: Outcome) -> ApplyResult {
    ApplyResult {
        outcome,
        duplicate_of_lsn: None,
    }
}

/// The operation an idempotency id belongs to: the record's kind and its canonical payload.
fn fingerprint(kind: RecordKind, payload: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&[kind as u8]);
    h.update(payload);
    h.digest()
}
