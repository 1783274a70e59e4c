//! The shard state machine: `reduce(log)`. Owns the keys by (partition, key id, version), the
//! partition configs, the cluster config and the idempotency table, and an order-independent
//! digest of all of it kept up to date on every apply. Apply is pure (no card, no I/O) and
//! deterministic: every replica applying the same records reaches the same bytes and digest.
//! Payload and entry encodings: docs/format.md §3.

mod layers;
pub mod payload;

pub use layers::{Frozen, Layer, Scope, View};
pub use payload::{Checkpoint, IdempotencyId, KeyPut, Op, PayloadError, PutOp};

use crate::snapshot::{Snapshot, SnapshotError};
use crate::wbl::RecordKind;
use keyfort_hsm::{KeyHeader, KeyId, PartitionId};
use layers::idem_live;
use payload::{put_bytes16, Reader};
use std::collections::BTreeMap;
use std::sync::Arc;
use xxhash_rust::xxh3::xxh3_128;

/// Largest masked blob a key version may hold. The card's masked blob is 117 bytes today
/// (docs/format.md §2.2); the margin admits other key kinds without a format change.
pub const BLOB_BYTES_MAX: usize = 512;
/// Largest client metadata per key version: labels and descriptions, not data.
pub const METADATA_BYTES_MAX: usize = 1024;
/// Largest partition config (245 bytes, 283 with a policy trailer, §2.3).
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

    /// The slot of an encoded entry, read without decoding the rest (lookups scan blocks with
    /// it). `None` if the bytes are too short to hold one.
    pub fn slot_of(b: &[u8]) -> Option<KeySlot> {
        // entry version (1) ‖ header: format (1) ‖ partition (16) ‖ key id (16) ‖ version (4)
        let b = b.get(2..38)?;
        Some((
            PartitionId(b[0..16].try_into().expect("16 bytes")),
            KeyId(b[16..32].try_into().expect("16 bytes")),
            u32::from_le_bytes(b[32..36].try_into().expect("4 bytes")),
        ))
    }

    pub fn decode(b: &[u8]) -> Result<KeyEntry, PayloadError> {
        KeyEntry::decode_ref(b).map(|r| r.to_owned())
    }

    /// Decodes without copying metadata and blob (checks that need no owned entry).
    pub fn decode_ref(b: &[u8]) -> Result<KeyEntryRef<'_>, PayloadError> {
        let mut r = Reader::new(b, "key entry");
        r.version()?;
        let header = r.key_header()?;
        let state = r.key_state()?;
        let lsn_created = r.u64("lsn created")?;
        let metadata = r.bytes16_ref("metadata", METADATA_BYTES_MAX)?;
        let blob = r.bytes16_ref("blob", BLOB_BYTES_MAX)?;
        r.finish()?;
        Ok(KeyEntryRef {
            header,
            state,
            lsn_created,
            metadata,
            blob,
        })
    }
}

/// A [`KeyEntry`] borrowing metadata and blob from its encoded bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyEntryRef<'a> {
    pub header: KeyHeader,
    pub state: KeyState,
    pub lsn_created: u64,
    pub metadata: &'a [u8],
    pub blob: &'a [u8],
}

impl KeyEntryRef<'_> {
    pub fn slot(&self) -> KeySlot {
        (
            self.header.partition,
            self.header.key_id,
            self.header.version,
        )
    }
    pub fn to_owned(&self) -> KeyEntry {
        KeyEntry {
            header: self.header,
            state: self.state,
            lsn_created: self.lsn_created,
            metadata: self.metadata.to_vec(),
            blob: self.blob.to_vec(),
        }
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
    /// An archive watermark was noted (`StateMachine::archived_lsn`).
    ArchiveMarked = 11,
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
    /// A cluster config that may not replace the current one (`ClusterConfig::may_become`:
    /// another cluster, shard count or integrity key, or not a newer admission).
    ClusterConfigRefused = 73,
}

impl OutcomeCode {
    const ALL: [OutcomeCode; 21] = [
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
        OutcomeCode::ArchiveMarked,
        OutcomeCode::KeyExists,
        OutcomeCode::NoSuchKey,
        OutcomeCode::NoSuchPartition,
        OutcomeCode::PartitionExists,
        OutcomeCode::StaleVersion,
        OutcomeCode::InvalidVersion,
        OutcomeCode::IdempotencyConflict,
        OutcomeCode::PartitionNotEmpty,
        OutcomeCode::BadPayload,
        OutcomeCode::ClusterConfigRefused,
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
        /// Items up to this size are hashed from a stack buffer (typical key entries, every
        /// idempotency entry); small, because the buffer is zeroed on every call.
        const STACK_BYTES: usize = 384;
        let len = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
        if len <= STACK_BYTES {
            let mut buf = [0u8; STACK_BYTES];
            buf[0] = tag;
            let mut at = 1;
            for p in parts {
                buf[at..at + p.len()].copy_from_slice(p);
                at += p.len();
            }
            return xxh3_128(&buf[..len]);
        }
        let mut buf = Vec::with_capacity(len);
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
    digest_key_bytes(&e.encode())
}
/// [`digest_key`] of an entry from its canonical bytes (what snapshot blocks hold).
pub(crate) fn digest_key_bytes(encoded: &[u8]) -> u128 {
    StateDigest::item(TAG_KEY, &[encoded])
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

/// The state of one shard at `lsn_applied`, read through its layers (`layers.rs`): the memtable,
/// at most one frozen memtable being compacted, and the base snapshot. Only the memtable changes;
/// [`StateMachine::freeze`] and [`StateMachine::install`] move the layers down.
pub struct StateMachine {
    base: Option<Arc<Snapshot>>,
    /// How many of the base's idempotency entries (in LSN order) have expired.
    base_idem_expired: usize,
    frozen: Option<Arc<Frozen>>,
    /// How many of the frozen layer's idempotency entries (in LSN order) have expired.
    frozen_idem_expired: usize,
    mem: Layer,
    key_count: u64,
    partitions: BTreeMap<PartitionId, Vec<u8>>,
    cluster_config: Option<Vec<u8>>,
    idempotency_window_lsns: u64,
    lsn_applied: u64,
    digest: StateDigest,
    /// The archive watermark applied so far (docs/format.md §3.12): node-local knowledge, not
    /// part of the digest nor of snapshots (0 after a start from a snapshot, until the next
    /// mark is applied — the safe direction: the log is kept).
    archived_lsn: u64,
}

impl std::fmt::Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine")
            .field("lsn_applied", &self.lsn_applied)
            .field("digest", &self.digest)
            .field("key_count", &self.key_count)
            .field("base", &self.base.as_ref().map(|b| b.lsn()))
            .field("frozen", &self.frozen.as_ref().map(|f| f.lsn))
            .field("memtable_key_versions", &self.mem.keys.len())
            .finish()
    }
}

/// Equal logical contents: LSN, window, digest, every key version, partition, cluster config
/// and live idempotency entry, whatever layers hold them. Reads the base files (tests, tools).
impl PartialEq for StateMachine {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.view(), other.view());
        a.lsn == b.lsn
            && a.window == b.window
            && a.digest == b.digest
            && a.key_count == b.key_count
            && a.partitions == b.partitions
            && a.cluster == b.cluster
            && a.idempotency() == b.idempotency()
            && a.keys().expect("base readable") == b.keys().expect("base readable")
    }
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
            base: None,
            base_idem_expired: 0,
            frozen: None,
            frozen_idem_expired: 0,
            mem: Layer::default(),
            key_count: 0,
            partitions: BTreeMap::new(),
            cluster_config: None,
            idempotency_window_lsns: window_lsns,
            lsn_applied: 0,
            digest: StateDigest::default(),
            archived_lsn: 0,
        }
    }

    /// The state a verified snapshot holds, served from the file: nothing but its partitions,
    /// cluster config and idempotency table is loaded; keys are read through its index.
    pub fn from_snapshot(snap: Arc<Snapshot>) -> StateMachine {
        let f = snap.footer();
        let mut s = StateMachine::with_idempotency_window(f.idempotency_window_lsns.max(1));
        s.lsn_applied = f.lsn;
        s.digest = f.digest;
        s.key_count = f.key_count;
        s.partitions = snap.partitions().iter().cloned().collect();
        s.cluster_config = snap.cluster_config().map(<[u8]>::to_vec);
        s.base = Some(snap);
        s
    }

    pub fn lsn_applied(&self) -> u64 {
        self.lsn_applied
    }
    /// The highest LSN an applied `ArchiveMark` says the durable store holds (0: none known).
    pub fn archived_lsn(&self) -> u64 {
        self.archived_lsn
    }
    pub fn digest(&self) -> StateDigest {
        self.digest
    }
    pub fn idempotency_window_lsns(&self) -> u64 {
        self.idempotency_window_lsns
    }
    /// Live key versions.
    pub fn key_count(&self) -> u64 {
        self.key_count
    }
    /// The snapshot the state is served from, if any.
    pub fn base(&self) -> Option<&Arc<Snapshot>> {
        self.base.as_ref()
    }
    /// The memtable being compacted, if a compaction runs.
    pub fn frozen(&self) -> Option<&Arc<Frozen>> {
        self.frozen.as_ref()
    }
    /// Key versions (live or deleted) held in the memtable.
    pub fn memtable_key_versions(&self) -> usize {
        self.mem.keys.len()
    }

    /// The whole state as one read-only view.
    pub fn view(&self) -> View<'_> {
        let mut layers = Vec::with_capacity(2);
        if let Some(f) = &self.frozen {
            layers.push(&f.layer);
        }
        layers.push(&self.mem);
        View {
            lsn: self.lsn_applied,
            window: self.idempotency_window_lsns,
            digest: self.digest,
            key_count: self.key_count,
            base: self.base.as_deref(),
            layers,
            partitions: &self.partitions,
            cluster: self.cluster_config.as_deref(),
        }
    }

    /// Every key version in (partition, key id, version) order (reads the whole base).
    pub fn keys(&self) -> Result<Vec<KeyEntry>, SnapshotError> {
        self.view().keys()
    }
    pub fn partitions(&self) -> impl Iterator<Item = (&PartitionId, &Vec<u8>)> {
        self.partitions.iter()
    }
    /// One partition's config, if the partition exists.
    pub fn partition(&self, p: &PartitionId) -> Option<&[u8]> {
        self.partitions.get(p).map(Vec::as_slice)
    }
    pub fn cluster_config(&self) -> Option<&[u8]> {
        self.cluster_config.as_deref()
    }
    /// Live idempotency entries in (partition, id) order.
    pub fn idempotency(&self) -> Vec<IdempotencyEntry> {
        self.view().idempotency()
    }

    /// The topmost layer's word on a key version: `Some(None)` = deleted there.
    fn top(&self, slot: &KeySlot) -> Option<&Option<KeyEntry>> {
        self.mem
            .keys
            .get(slot)
            .or_else(|| self.frozen.as_ref().and_then(|f| f.layer.keys.get(slot)))
    }

    /// One key version: memtable → frozen → snapshot index → one block.
    pub fn get(
        &self,
        partition: PartitionId,
        key_id: KeyId,
        version: u32,
    ) -> Result<Option<KeyEntry>, SnapshotError> {
        let slot = (partition, key_id, version);
        if let Some(v) = self.top(&slot) {
            return Ok(v.clone());
        }
        match &self.base {
            Some(b) => b.get(slot),
            None => Ok(None),
        }
    }

    /// Every version of one key, oldest first.
    pub fn versions(
        &self,
        partition: PartitionId,
        key_id: KeyId,
    ) -> Result<Vec<KeyEntry>, SnapshotError> {
        let lo = (partition, key_id, 0);
        let hi = (partition, key_id, u32::MAX);
        let mut out: BTreeMap<u32, KeyEntry> = BTreeMap::new();
        if let Some(b) = &self.base {
            b.scan(lo, hi, &mut |e| {
                out.insert(e.header.version, e);
                true
            })?;
        }
        let frozen = self.frozen.as_ref().map(|f| &f.layer);
        for l in frozen.into_iter().chain(std::iter::once(&self.mem)) {
            for ((_, _, v), e) in l.keys.range(lo..=hi) {
                match e {
                    Some(e) => out.insert(*v, e.clone()),
                    None => out.remove(v),
                };
            }
        }
        Ok(out.into_values().collect())
    }

    /// The newest version of a key: the only one that encrypts.
    pub fn current(
        &self,
        partition: PartitionId,
        key_id: KeyId,
    ) -> Result<Option<KeyEntry>, SnapshotError> {
        Ok(self.versions(partition, key_id)?.pop())
    }

    /// Up to `limit` keys of `partition` after `after` (exclusive) in key id order, each with
    /// its newest live version, and whether more follow. Reads the base from the start of the
    /// range only until `limit + 1` keys are seen, then merges the layers up to that point.
    pub fn list_keys(
        &self,
        partition: PartitionId,
        after: Option<KeyId>,
        limit: usize,
    ) -> Result<(Vec<(KeyId, u32)>, bool), SnapshotError> {
        let lo = match after {
            Some(k) => (partition, k, u32::MAX),
            None => (partition, KeyId([0; 16]), 0),
        };
        let hi = (partition, KeyId([0xff; 16]), u32::MAX);
        // key id → version → live
        let mut seen: BTreeMap<KeyId, BTreeMap<u32, bool>> = BTreeMap::new();
        let mut cut: Option<KeyId> = None;
        if let Some(b) = &self.base {
            b.scan(lo, hi, &mut |e| {
                if after == Some(e.header.key_id) || matches!(self.top(&e.slot()), Some(None)) {
                    return true;
                }
                if !seen.contains_key(&e.header.key_id) && seen.len() > limit {
                    cut = Some(e.header.key_id);
                    return false;
                }
                seen.entry(e.header.key_id)
                    .or_default()
                    .insert(e.header.version, true);
                true
            })?;
        }
        let frozen = self.frozen.as_ref().map(|f| &f.layer);
        for l in frozen.into_iter().chain(std::iter::once(&self.mem)) {
            for ((_, k, v), e) in l.keys.range(lo..=hi) {
                if after == Some(*k) || cut.is_some_and(|c| *k >= c) {
                    continue;
                }
                seen.entry(*k).or_default().insert(*v, e.is_some());
            }
        }
        let mut live = seen.into_iter().filter_map(|(k, vs)| {
            vs.into_iter()
                .filter(|(_, l)| *l)
                .map(|(v, _)| v)
                .max()
                .map(|v| (k, v))
        });
        let keys: Vec<(KeyId, u32)> = live.by_ref().take(limit).collect();
        let more = live.next().is_some() || cut.is_some();
        Ok((keys, more))
    }

    /// Whether any live key version of `partition` exists in any layer.
    fn partition_has_keys(&self, partition: PartitionId) -> Result<bool, SnapshotError> {
        let lo = (partition, KeyId([0; 16]), 0);
        let hi = (partition, KeyId([0xff; 16]), u32::MAX);
        let frozen = self.frozen.as_ref().map(|f| &f.layer);
        for l in frozen.into_iter().chain(std::iter::once(&self.mem)) {
            for (s, e) in l.keys.range(lo..=hi) {
                if e.is_some() && matches!(self.top(s), Some(Some(_))) {
                    return Ok(true);
                }
            }
        }
        let mut found = false;
        if let Some(b) = &self.base {
            b.scan(lo, hi, &mut |e| {
                found = !matches!(self.top(&e.slot()), Some(None));
                !found
            })?;
        }
        Ok(found)
    }

    /// Recomputes the digest from every item; equals [`Self::digest`] unless a bug broke the
    /// incremental upkeep (tests and snapshot verification compare the two).
    pub fn digest_recomputed(&self) -> Result<StateDigest, SnapshotError> {
        let v = self.view();
        let mut d = StateDigest::default();
        v.for_each_encoded(|_, b| {
            d.add(digest_key_bytes(b));
            Ok(())
        })?;
        v.partitions()
            .for_each(|(p, c)| d.add(digest_partition(p, c)));
        if let Some(c) = v.cluster_config() {
            d.add(digest_cluster(c));
        }
        v.idempotency()
            .iter()
            .for_each(|e| d.add(digest_idempotency(e)));
        Ok(d)
    }

    /// Freezes the memtable at the applied LSN for a compaction: O(1), the foreground goes on
    /// applying into a fresh memtable. One compaction at a time.
    pub fn freeze(&mut self) -> Result<Arc<Frozen>, SnapshotError> {
        if self.frozen.is_some() {
            return Err(SnapshotError::Invalid(
                "a compaction is already running (a frozen memtable exists)".into(),
            ));
        }
        let f = Arc::new(Frozen {
            base: self.base.clone(),
            layer: std::mem::take(&mut self.mem),
            lsn: self.lsn_applied,
            window: self.idempotency_window_lsns,
            digest: self.digest,
            key_count: self.key_count,
            partitions: self.partitions.clone(),
            cluster: self.cluster_config.clone(),
        });
        self.frozen = Some(f.clone());
        self.frozen_idem_expired = 0;
        Ok(f)
    }

    /// Replaces base + frozen with `snap`, the verified snapshot written from the frozen layer.
    pub fn install(&mut self, snap: Arc<Snapshot>) -> Result<(), SnapshotError> {
        let Some(f) = &self.frozen else {
            return Err(SnapshotError::Invalid(
                "no frozen memtable to install".into(),
            ));
        };
        if snap.lsn() != f.lsn || snap.digest() != f.digest {
            return Err(SnapshotError::Invalid(format!(
                "snapshot {} (lsn {}, digest {}) is not the frozen state (lsn {}, digest {})",
                snap.path().display(),
                snap.lsn(),
                snap.digest(),
                f.lsn,
                f.digest
            )));
        }
        let (window, lsn) = (self.idempotency_window_lsns, self.lsn_applied);
        let entries = snap.idempotency();
        self.base_idem_expired = snap
            .idempotency_by_lsn()
            .partition_point(|&i| !idem_live(entries[i as usize].lsn, window, lsn));
        self.base = Some(snap);
        self.frozen = None;
        self.frozen_idem_expired = 0;
        Ok(())
    }

    /// Undoes [`Self::freeze`] after a failed compaction: the frozen changes go back under the
    /// memtable.
    pub fn thaw(&mut self) {
        let Some(f) = self.frozen.take() else { return };
        let mut layer = f.layer.clone();
        for _ in 0..self.frozen_idem_expired {
            let (_, scope) = layer.idem_by_lsn.pop_front().expect("counted");
            layer.idem.remove(&scope);
        }
        let mem = std::mem::take(&mut self.mem);
        layer.keys.extend(mem.keys);
        layer.idem.extend(mem.idem);
        layer.idem_by_lsn.extend(mem.idem_by_lsn);
        self.mem = layer;
        self.frozen_idem_expired = 0;
    }

    /// Applies the record at `lsn`. Records at or below the applied LSN are replays and change
    /// nothing (`AlreadyApplied`); LSNs may skip (raft entries applied elsewhere). An error is
    /// not an outcome: the snapshot under the state failed a read after it had verified, so the
    /// state may be half-changed and the shard must stop and recover.
    pub fn apply(
        &mut self,
        lsn: u64,
        kind: RecordKind,
        payload: &[u8],
    ) -> Result<ApplyResult, SnapshotError> {
        if lsn <= self.lsn_applied {
            return Ok(done(Outcome::of(OutcomeCode::AlreadyApplied)));
        }
        self.lsn_applied = lsn;
        self.expire_idempotency(lsn);
        let op = match Op::decode(kind, payload) {
            Ok(op) => op,
            Err(PayloadError::NotStateKind { .. }) => {
                return Ok(done(Outcome::of(OutcomeCode::Ignored)))
            }
            Err(_) => return Ok(done(Outcome::of(OutcomeCode::BadPayload))),
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
            return Ok(done(self.execute(lsn, op)?));
        };
        let fingerprint = fingerprint(kind, payload);
        if let Some(e) = self.idempotency_get(&scope) {
            if e.fingerprint == fingerprint {
                return Ok(ApplyResult {
                    outcome: e.first,
                    duplicate_of_lsn: Some(e.lsn),
                });
            }
            return Ok(done(Outcome::of(OutcomeCode::IdempotencyConflict)));
        }
        let first = self.execute(lsn, op)?;
        self.insert_idempotency(IdempotencyEntry {
            partition: scope.0,
            id: scope.1,
            fingerprint,
            first,
            lsn,
        });
        Ok(done(first))
    }

    fn execute(&mut self, lsn: u64, op: Op) -> Result<Outcome, SnapshotError> {
        let restore = matches!(op, Op::ClusterRestore { .. });
        Ok(match op {
            Op::ClusterConfig { config } | Op::ClusterRestore { config } => {
                if let Some(old) = &self.cluster_config {
                    use crate::cluster::ClusterConfig;
                    let ok = match (ClusterConfig::decode(old), ClusterConfig::decode(&config)) {
                        (Ok(old), Ok(new)) if restore => old.may_be_restored_as(&new),
                        (Ok(old), Ok(new)) => old.may_become(&new),
                        _ => false,
                    };
                    if !ok {
                        return Ok(Outcome::of(OutcomeCode::ClusterConfigRefused));
                    }
                }
                if let Some(old) = self.cluster_config.take() {
                    self.digest.sub(digest_cluster(&old));
                }
                self.digest.add(digest_cluster(&config));
                self.cluster_config = Some(config);
                Outcome::of(OutcomeCode::ClusterConfigSet)
            }
            Op::PartitionCreate { partition, config } => {
                if self.partitions.contains_key(&partition) {
                    return Ok(Outcome::of(OutcomeCode::PartitionExists));
                }
                self.digest.add(digest_partition(&partition, &config));
                self.partitions.insert(partition, config);
                Outcome::of(OutcomeCode::PartitionCreated)
            }
            Op::PartitionDelete { partition } => self.delete_partition(partition)?,
            Op::ArchiveMark { to } => {
                // A mark never names more than the log holds where it stands.
                self.archived_lsn = self.archived_lsn.max(to.min(lsn));
                Outcome::of(OutcomeCode::ArchiveMarked)
            }
            Op::KeyPut(p) => self.key_put(lsn, p)?,
            Op::KeyDelete {
                partition, key_id, ..
            } => self.key_delete(partition, key_id)?,
            Op::Checkpoint(_) => Outcome::of(OutcomeCode::CheckpointNoted),
        })
    }

    /// A partition with keys is refused: deleting a tenant's keys takes explicit key deletes.
    fn delete_partition(&mut self, partition: PartitionId) -> Result<Outcome, SnapshotError> {
        if !self.partitions.contains_key(&partition) {
            return Ok(Outcome::of(OutcomeCode::NoSuchPartition));
        }
        if self.partition_has_keys(partition)? {
            return Ok(Outcome::of(OutcomeCode::PartitionNotEmpty));
        }
        let config = self.partitions.remove(&partition).expect("checked above");
        self.digest.sub(digest_partition(&partition, &config));
        Ok(Outcome::of(OutcomeCode::PartitionDeleted))
    }

    fn key_put(&mut self, lsn: u64, p: KeyPut) -> Result<Outcome, SnapshotError> {
        let h = p.header;
        if !self.partitions.contains_key(&h.partition) {
            return Ok(Outcome::of(OutcomeCode::NoSuchPartition));
        }
        if let PutOp::Update = p.op {
            let Some(old) = self.get(h.partition, h.key_id, h.version)? else {
                return Ok(Outcome::of(OutcomeCode::NoSuchKey));
            };
            // Header, blob and creation LSN stay: an update never touches key material.
            let new = KeyEntry {
                state: p.state,
                metadata: p.metadata,
                ..old.clone()
            };
            self.replace_key(Some(&old), new);
            return Ok(Outcome {
                code: OutcomeCode::Updated,
                version: h.version,
            });
        }
        let current = self
            .current(h.partition, h.key_id)?
            .map(|e| e.header.version);
        match p.op {
            PutOp::Create => {
                if current.is_some() {
                    return Ok(Outcome::of(OutcomeCode::KeyExists));
                }
                if h.version != 1 {
                    return Ok(Outcome::of(OutcomeCode::InvalidVersion));
                }
            }
            PutOp::Rotate => {
                let Some(current) = current else {
                    return Ok(Outcome::of(OutcomeCode::NoSuchKey));
                };
                if p.version_replaced != current {
                    return Ok(Outcome {
                        code: OutcomeCode::StaleVersion,
                        version: current,
                    });
                }
                if current.checked_add(1) != Some(h.version) {
                    return Ok(Outcome::of(OutcomeCode::InvalidVersion));
                }
            }
            PutOp::Update => unreachable!("handled above"),
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
        Ok(Outcome {
            code,
            version: h.version,
        })
    }

    fn replace_key(&mut self, old: Option<&KeyEntry>, new: KeyEntry) {
        match old {
            Some(old) => self.digest.sub(digest_key(old)),
            None => self.key_count += 1,
        }
        self.digest.add(digest_key(&new));
        self.mem.keys.insert(new.slot(), Some(new));
    }

    /// Whether a layer below the memtable may hold key versions (then a deletion needs a
    /// tombstone in the memtable; else the memtable entry just goes).
    fn has_lower_layers(&self) -> bool {
        self.base.is_some() || self.frozen.is_some()
    }

    /// A tombstone: every version goes. A later create with the same key id starts a new key.
    fn key_delete(
        &mut self,
        partition: PartitionId,
        key_id: KeyId,
    ) -> Result<Outcome, SnapshotError> {
        let versions = self.versions(partition, key_id)?;
        if versions.is_empty() {
            return Ok(Outcome::of(OutcomeCode::NoSuchKey));
        }
        let lower = self.has_lower_layers();
        for e in &versions {
            self.digest.sub(digest_key(e));
            if lower {
                self.mem.keys.insert(e.slot(), None);
            } else {
                self.mem.keys.remove(&e.slot());
            }
        }
        self.key_count -= versions.len() as u64;
        Ok(Outcome {
            code: OutcomeCode::Deleted,
            version: versions.len() as u32,
        })
    }

    /// The live idempotency entry of `scope`: memtable → frozen → base.
    fn idempotency_get(&self, scope: &Scope) -> Option<IdempotencyEntry> {
        let live = |e: &&IdempotencyEntry| {
            idem_live(e.lsn, self.idempotency_window_lsns, self.lsn_applied)
        };
        if let Some(e) = self.mem.idem.get(scope).filter(live) {
            return Some(*e);
        }
        if let Some(e) = self
            .frozen
            .as_ref()
            .and_then(|f| f.layer.idem.get(scope))
            .filter(live)
        {
            return Some(*e);
        }
        let base = self.base.as_ref()?.idempotency();
        let i = base
            .binary_search_by(|e| (e.partition, e.id).cmp(scope))
            .ok()?;
        Some(base[i]).filter(|e| live(&e))
    }

    fn insert_idempotency(&mut self, e: IdempotencyEntry) {
        self.digest.add(digest_idempotency(&e));
        let scope = (e.partition, e.id);
        self.mem.idem_by_lsn.push_back((e.lsn, scope));
        self.mem.idem.insert(scope, e);
    }

    /// Drops the entries that expire at `lsn`, oldest layer first (layers are LSN-ordered).
    fn expire_idempotency(&mut self, lsn: u64) {
        let w = self.idempotency_window_lsns;
        if let Some(b) = &self.base {
            let (entries, by_lsn) = (b.idempotency(), b.idempotency_by_lsn());
            while let Some(&i) = by_lsn.get(self.base_idem_expired) {
                let e = &entries[i as usize];
                if idem_live(e.lsn, w, lsn) {
                    break;
                }
                self.digest.sub(digest_idempotency(e));
                self.base_idem_expired += 1;
            }
        }
        if let Some(f) = &self.frozen {
            while let Some((l, scope)) = f.layer.idem_by_lsn.get(self.frozen_idem_expired) {
                if idem_live(*l, w, lsn) {
                    break;
                }
                self.digest.sub(digest_idempotency(&f.layer.idem[scope]));
                self.frozen_idem_expired += 1;
            }
        }
        while let Some(&(l, scope)) = self.mem.idem_by_lsn.front() {
            if idem_live(l, w, lsn) {
                break;
            }
            self.mem.idem_by_lsn.pop_front();
            let e = self
                .mem
                .idem
                .remove(&scope)
                .expect("both indexes hold the same entries");
            self.digest.sub(digest_idempotency(&e));
        }
    }
}

fn done(outcome: Outcome) -> ApplyResult {
    ApplyResult {
        outcome,
        duplicate_of_lsn: None,
    }
}

/// The operation an idempotency id belongs to: the record's kind and its canonical payload —
/// for a key put without its masked blob (format.md §3.8). The blob is fresh key material made
/// by whichever node took the try, so a retry of the same create or rotate through another node
/// carries another blob yet is the same operation; everything the client asked for (key id,
/// versions, state, metadata) is covered.
fn fingerprint(kind: RecordKind, payload: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&[kind as u8]);
    h.update(&payload[..fingerprinted_len(kind, payload)]);
    h.digest()
}

/// Bytes of `payload` the fingerprint covers: a decoded key put up to its blob length field
/// (offset 64 + metadata length, §3.4); every other payload whole.
fn fingerprinted_len(kind: RecordKind, payload: &[u8]) -> usize {
    if kind != RecordKind::KeyPut || payload.len() < 64 {
        return payload.len();
    }
    let m = u16::from_le_bytes([payload[62], payload[63]]) as usize;
    (64 + m).min(payload.len())
}
