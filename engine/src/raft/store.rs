//! What the shard core needs from a log beyond `raft::Storage`, and the in-memory log of the
//! deterministic simulation.

use super::entry::{collect_within, record_of, EntryError};
use crate::wbl::record::chain_next;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use std::collections::VecDeque;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Entry(#[from] EntryError),
    #[error(transparent)]
    Wbl(#[from] crate::wbl::WblError),
    #[error("entries out of order: {index} after last index {last}")]
    Gap { index: u64, last: u64 },
}

/// A raft log that stages writes now and reports them durable later.
pub trait LogStore: raft::Storage {
    /// Makes `entries` (replacing any conflicting suffix from the first one's index on) and `hs`
    /// visible to the `Storage` methods at once, and starts making them durable. The caller
    /// learns when everything staged under `number` (a raft Ready number) is durable from the
    /// store itself and then calls `ShardCore::on_persisted(number)`. Returns whether anything
    /// was staged that the caller must wait for: `false` (nothing to wait for, e.g. only a
    /// commit advance, which a store may persist lazily) lets raft go on at once.
    fn stage(
        &mut self,
        entries: &[Entry],
        hs: Option<&HardState>,
        number: u64,
    ) -> Result<bool, StoreError>;
    /// The membership after the conf change at `index` was applied (kept for snapshots and
    /// `initial_state`).
    fn set_conf_state(&mut self, index: u64, cs: ConfState);
    /// Everything through `index` is applied to the state machine (entries at or below it
    /// may leave memory).
    fn set_applied(&mut self, _index: u64) {}
    /// Chain head after `lsn`, when the log still holds it.
    fn chain_at(&self, lsn: u64) -> Option<u64>;
}

/// The log state that a crash leaves (durable) or that raft reads (visible).
#[derive(Clone, Debug, Default)]
struct MemState {
    hs: HardState,
    cs: ConfState,
    /// Entries from index 1, with the chain head after each.
    entries: Vec<(Entry, u64)>,
}

impl MemState {
    fn last_index(&self) -> u64 {
        self.entries.len() as u64
    }

    fn chain_at(&self, lsn: u64) -> Option<u64> {
        match lsn {
            0 => Some(0),
            l if l <= self.last_index() => Some(self.entries[l as usize - 1].1),
            _ => None,
        }
    }

    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        if first.index == 0 || first.index > self.last_index() + 1 {
            return Err(StoreError::Gap {
                index: first.index,
                last: self.last_index(),
            });
        }
        self.entries.truncate(first.index as usize - 1);
        for e in entries {
            let (kind, payload) = record_of(e)?;
            let seed = self.chain_at(e.index - 1).expect("contiguous");
            let chain = chain_next(seed, kind, e.index, e.term, payload);
            self.entries.push((e.clone(), chain));
        }
        Ok(())
    }
}

enum MemOp {
    Append(Vec<Entry>),
    Hard(HardState),
}

/// An in-memory raft log whose writes become durable only when the owner says so
/// ([`MemLog::persist_through`]); [`MemLog::after_crash`] keeps only what was durable. It keeps
/// every entry (no compaction) and the same chain heads the WBL computes.
pub struct MemLog {
    visible: MemState,
    durable: MemState,
    staged: VecDeque<(u64, MemOp)>,
}

impl MemLog {
    /// An empty log of a group bootstrapped with membership `cs`.
    pub fn new(cs: ConfState) -> MemLog {
        let st = MemState {
            cs,
            ..Default::default()
        };
        MemLog {
            visible: st.clone(),
            durable: st,
            staged: VecDeque::new(),
        }
    }

    /// Ready numbers staged and not yet durable, oldest first.
    pub fn staged_numbers(&self) -> impl Iterator<Item = u64> + '_ {
        self.staged.iter().map(|(n, _)| *n)
    }

    /// Makes everything staged under numbers ≤ `number` durable.
    pub fn persist_through(&mut self, number: u64) {
        while self.staged.front().is_some_and(|(n, _)| *n <= number) {
            let (_, op) = self.staged.pop_front().expect("front exists");
            match op {
                MemOp::Append(es) => self
                    .durable
                    .append(&es)
                    .expect("the same appends succeeded on the visible state"),
                MemOp::Hard(hs) => self.durable.hs = hs,
            }
        }
    }

    /// What a restart finds: the durable state only.
    pub fn after_crash(&self) -> MemLog {
        MemLog {
            visible: self.durable.clone(),
            durable: self.durable.clone(),
            staged: VecDeque::new(),
        }
    }

    pub fn hard_state(&self) -> &HardState {
        &self.visible.hs
    }

    pub fn durable_hard_state(&self) -> &HardState {
        &self.durable.hs
    }
}

impl raft::Storage for MemLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.visible.hs.clone(),
            conf_state: self.visible.cs.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < 1 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.visible.last_index() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        collect_within(low, high, max_size.into(), |i| {
            Ok(self.visible.entries[i as usize - 1].0.clone())
        })
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        match idx {
            0 => Ok(0),
            i if i <= self.visible.last_index() => Ok(self.visible.entries[i as usize - 1].0.term),
            _ => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.visible.last_index())
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // The whole log is kept, so raft never needs one from this store.
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}

impl LogStore for MemLog {
    fn stage(
        &mut self,
        entries: &[Entry],
        hs: Option<&HardState>,
        number: u64,
    ) -> Result<bool, StoreError> {
        if !entries.is_empty() {
            self.visible.append(entries)?;
            self.staged
                .push_back((number, MemOp::Append(entries.to_vec())));
        }
        if let Some(hs) = hs {
            self.visible.hs = hs.clone();
            self.staged.push_back((number, MemOp::Hard(hs.clone())));
        }
        Ok(!entries.is_empty() || hs.is_some())
    }

    fn set_conf_state(&mut self, _index: u64, _cs: ConfState) {
        // The whole log is kept and replayed from index 1 after a restart, so the membership is
        // always rebuilt from the bootstrap one; nothing to keep.
    }

    fn chain_at(&self, lsn: u64) -> Option<u64> {
        self.visible.chain_at(lsn)
    }
}
