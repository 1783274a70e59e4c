//! The layers a shard's state is read through: the memtable (changes since the last freeze),
//! the frozen memtable a compaction is writing out (at most one), and the base snapshot file.
//! A lookup goes memtable → frozen → snapshot index → one block; the topmost layer that names a
//! key version decides (`None` there is a deletion). Idempotency entries are layered the same
//! way, each layer in LSN order so expiry walks them without a search.
//!
//! Layers never overlap in LSN: base ≤ frozen.lsn < memtable. That is what lets a compaction
//! write `base + frozen` on another thread while the foreground keeps applying into the memtable.

use super::{IdempotencyEntry, IdempotencyId, KeyEntry, KeySlot, StateDigest};
use crate::snapshot::{Snapshot, SnapshotError};
use keyfort_hsm::PartitionId;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// An idempotency id's scope: ids are unique per partition.
pub type Scope = (PartitionId, IdempotencyId);

/// The changes of one LSN range: key versions (`None`: deleted) and the idempotency entries made
/// in it, also kept in LSN order for expiry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layer {
    pub(crate) keys: BTreeMap<KeySlot, Option<KeyEntry>>,
    pub(crate) idem: BTreeMap<Scope, IdempotencyEntry>,
    pub(crate) idem_by_lsn: VecDeque<(u64, Scope)>,
}

impl Layer {
    pub fn key_versions(&self) -> usize {
        self.keys.len()
    }
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.idem.is_empty()
    }
}

/// A memtable frozen at `lsn` together with the base below it: everything the snapshot at `lsn`
/// is written from. Immutable and `Send`, so the write runs off the executor.
#[derive(Debug)]
pub struct Frozen {
    pub(crate) base: Option<Arc<Snapshot>>,
    pub(crate) layer: Layer,
    pub(crate) lsn: u64,
    pub(crate) window: u64,
    pub(crate) digest: StateDigest,
    pub(crate) key_count: u64,
    pub(crate) partitions: BTreeMap<PartitionId, Vec<u8>>,
    pub(crate) cluster: Option<Vec<u8>>,
}

impl Frozen {
    pub fn lsn(&self) -> u64 {
        self.lsn
    }
    pub fn digest(&self) -> StateDigest {
        self.digest
    }
    /// Key versions (live or deleted) the frozen memtable holds.
    pub fn memtable_key_versions(&self) -> usize {
        self.layer.keys.len()
    }
    pub fn view(&self) -> View<'_> {
        View {
            lsn: self.lsn,
            window: self.window,
            digest: self.digest,
            key_count: self.key_count,
            base: self.base.as_deref(),
            layers: vec![&self.layer],
            partitions: &self.partitions,
            cluster: self.cluster.as_deref(),
        }
    }
}

/// A read-only view of a whole state at one LSN, as the snapshot writer and comparisons see it.
pub struct View<'a> {
    pub lsn: u64,
    pub window: u64,
    pub digest: StateDigest,
    pub key_count: u64,
    pub(crate) base: Option<&'a Snapshot>,
    /// Oldest first: a later layer overrides an earlier one.
    pub(crate) layers: Vec<&'a Layer>,
    pub(crate) partitions: &'a BTreeMap<PartitionId, Vec<u8>>,
    pub(crate) cluster: Option<&'a [u8]>,
}

/// Whether an idempotency entry made at `entry_lsn` is still live once `lsn` is applied.
pub(crate) fn idem_live(entry_lsn: u64, window: u64, lsn: u64) -> bool {
    entry_lsn.saturating_add(window) > lsn
}

impl View<'_> {
    pub fn partitions(&self) -> impl Iterator<Item = (&PartitionId, &Vec<u8>)> {
        self.partitions.iter()
    }
    pub fn cluster_config(&self) -> Option<&[u8]> {
        self.cluster
    }

    /// Calls `f` with the slot and canonical bytes (§3.7) of every live key version in
    /// (partition, key id, version) order: the base file read block by block (its entries passed
    /// through undecoded), merged with the layers above it (encoded here).
    pub fn for_each_encoded(
        &self,
        mut f: impl FnMut(KeySlot, &[u8]) -> Result<(), SnapshotError>,
    ) -> Result<(), SnapshotError> {
        let mut over: BTreeMap<&KeySlot, Option<&KeyEntry>> = BTreeMap::new();
        for l in &self.layers {
            for (s, v) in &l.keys {
                over.insert(s, v.as_ref());
            }
        }
        let mut over = over.into_iter().peekable();
        if let Some(base) = self.base {
            for i in 0..base.index().len() {
                base.visit_block(i, &mut |slot, b| {
                    while let Some((s, v)) = over.next_if(|(s, _)| **s < slot) {
                        if let Some(e) = v {
                            f(*s, &e.encode())?;
                        }
                    }
                    match over.next_if(|(s, _)| **s == slot) {
                        Some((_, Some(e))) => f(slot, &e.encode()),
                        Some((_, None)) => Ok(()),
                        None => f(slot, b),
                    }
                })?;
            }
        }
        for (s, v) in over {
            if let Some(e) = v {
                f(*s, &e.encode())?;
            }
        }
        Ok(())
    }

    /// [`View::for_each_encoded`], decoded.
    pub fn for_each_key(
        &self,
        mut f: impl FnMut(&KeyEntry) -> Result<(), SnapshotError>,
    ) -> Result<(), SnapshotError> {
        self.for_each_encoded(|_, b| {
            let e = KeyEntry::decode(b).map_err(|e| SnapshotError::Invalid(e.to_string()))?;
            f(&e)
        })
    }

    /// Every live key version, in order (tests and tools; a snapshot streams instead).
    pub fn keys(&self) -> Result<Vec<KeyEntry>, SnapshotError> {
        let mut out = Vec::new();
        self.for_each_key(|e| {
            out.push(e.clone());
            Ok(())
        })?;
        Ok(out)
    }

    /// The idempotency entries live at `lsn`, in (partition, id) order.
    pub fn idempotency(&self) -> Vec<IdempotencyEntry> {
        let live = |e: &IdempotencyEntry| idem_live(e.lsn, self.window, self.lsn);
        let mut all: BTreeMap<Scope, IdempotencyEntry> = BTreeMap::new();
        if let Some(base) = self.base {
            for e in base.idempotency().iter().filter(|e| live(e)) {
                all.insert((e.partition, e.id), *e);
            }
        }
        for l in &self.layers {
            for (s, e) in l.idem.iter().filter(|(_, e)| live(e)) {
                all.insert(*s, *e);
            }
        }
        all.into_values().collect()
    }
}
