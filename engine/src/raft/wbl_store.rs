//! The raft log on the WBL: entries are WBL records (raft index = LSN), the hard state is the
//! WBL's two-slot file, both staged by the group-commit writer and reported durable when its
//! batch write completes.
//!
//! raft-rs asks synchronously for terms (answered from the WBL's in-memory index) and for
//! entries. Entries above the applied index stay in a memory cache (raft needs them
//! synchronously to apply and to campaign), older ones are evicted above
//! [`ENTRY_CACHE_BYTES`]; a request for evicted entries to send to a follower answers
//! `LogTemporarilyUnavailable`, is queued, and the shard driver reads them from the WBL and
//! calls `on_entries_fetched`.

use super::entry::{collect_within, entry_of, entry_size, record_of};
use super::snapshot::SnapshotDescriptor;
use super::store::{LogStore, StoreError};
use crate::wbl::{Durable, HardState as WblHardState, Wbl};
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};

/// Bytes of applied entries kept in memory for followers that lag a little.
pub const ENTRY_CACHE_BYTES: u64 = 16 << 20;
/// Most payload bytes read from the WBL for one asynchronous fetch.
pub const FETCH_BYTES_MAX: usize = 4 << 20;
/// Most fetched entries kept for raft to take.
pub const FETCHED_ENTRIES_MAX: usize = 65536;

pub struct WblStore {
    wbl: Wbl,
    hs: HardState,
    cs: ConfState,
    /// raft's "snapshot" position: the LSN and term just below the first entry it may ask for.
    base: (u64, u64),
    /// Contiguous entries ending at the last index.
    cache: VecDeque<Entry>,
    cache_bytes: u64,
    applied: u64,
    /// Entries read for asynchronous requests, until raft took them.
    fetched: BTreeMap<u64, Entry>,
    fetch_requests: RefCell<Vec<(u64, u64, GetEntriesContext)>>,
    pending: VecDeque<(u64, Durable)>,
    /// The newest snapshot file a follower may be sent, with the membership in its footer.
    snapshot: Option<(SnapshotDescriptor, ConfState)>,
}

fn to_raft(h: WblHardState) -> HardState {
    HardState {
        term: h.term,
        vote: h.vote,
        commit: h.commit,
        ..Default::default()
    }
}

impl WblStore {
    /// A store over `wbl` whose state machine holds everything up to the persisted commit
    /// (local recovery's replay) with membership `cs` there. `base` is the (LSN, term) of the
    /// snapshot under the state, or (0, 0) for a log that starts at 1. Reads the uncommitted
    /// tail into the cache: raft may need it synchronously.
    pub async fn open(wbl: Wbl, base: (u64, u64), cs: ConfState) -> Result<WblStore, StoreError> {
        let mut hs = to_raft(wbl.hard_state());
        // A snapshot holds committed state only: its LSN is committed even when the persisted
        // commit (written lazily, `Wbl::note_commit`) lags behind it.
        hs.commit = hs.commit.max(base.0);
        let applied = hs.commit;
        let mut s = WblStore {
            hs,
            cs,
            base,
            cache: VecDeque::new(),
            cache_bytes: 0,
            applied,
            fetched: BTreeMap::new(),
            fetch_requests: RefCell::new(Vec::new()),
            pending: VecDeque::new(),
            snapshot: None,
            wbl,
        };
        let first = s.first();
        if first > s.wbl.last_lsn() {
            return Ok(s);
        }
        let from = (applied + 1).max(first);
        let mut next = from;
        while next <= s.wbl.last_lsn() {
            for r in s.wbl.read(next, FETCH_BYTES_MAX).await? {
                let e = entry_of(r.kind, r.lsn, r.term, &r.payload)?;
                s.cache_bytes += entry_size(&e);
                s.cache.push_back(e);
                next = r.lsn + 1;
            }
        }
        Ok(s)
    }

    pub fn wbl(&self) -> &Wbl {
        &self.wbl
    }

    /// The oldest staged Ready whose durability the driver has not awaited yet: await the
    /// `Durable`, then call `ShardCore::on_persisted(number)`.
    pub fn take_pending(&mut self) -> Option<(u64, Durable)> {
        self.pending.pop_front()
    }

    /// Asynchronous entry requests raft made since the last call.
    pub fn take_fetch_requests(&mut self) -> Vec<(u64, u64, GetEntriesContext)> {
        std::mem::take(self.fetch_requests.get_mut())
    }

    /// Reads `[low, high)` from the WBL into the fetched set (up to [`FETCH_BYTES_MAX`]).
    pub async fn fetch(wbl: &Wbl, low: u64, high: u64) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        for r in wbl.read(low, FETCH_BYTES_MAX).await? {
            if r.lsn >= high {
                break;
            }
            out.push(entry_of(r.kind, r.lsn, r.term, &r.payload)?);
        }
        Ok(out)
    }

    /// Keeps fetched entries until raft asks again (then `on_entries_fetched`). At most
    /// [`FETCHED_ENTRIES_MAX`] are kept; older fetches are dropped first (raft asks again).
    pub fn add_fetched(&mut self, entries: Vec<Entry>) {
        if self.fetched.len() + entries.len() > FETCHED_ENTRIES_MAX {
            self.fetched.clear();
        }
        for e in entries {
            self.fetched.insert(e.index, e);
        }
    }

    /// The newest snapshot file of the shard (after a compaction or an install): what raft
    /// sends a follower the log no longer covers.
    pub fn set_snapshot(&mut self, desc: SnapshotDescriptor, cs: ConfState) {
        self.snapshot = Some((desc, cs));
    }

    pub fn snapshot_descriptor(&self) -> Option<SnapshotDescriptor> {
        self.snapshot.as_ref().map(|(d, _)| *d)
    }

    /// The log was reset to start after an installed snapshot at (`lsn`, `term`).
    pub fn installed(&mut self, lsn: u64, term: u64, cs: ConfState) {
        self.base = (lsn, term);
        self.cache.clear();
        self.cache_bytes = 0;
        self.fetched.clear();
        self.applied = lsn;
        self.cs = cs;
    }

    /// After a release of the log's prefix (compaction): raft's log now starts where the WBL
    /// does when the term below it is known, else stays at the last known base.
    pub fn on_released(&mut self) {
        let first = self.wbl.first_lsn();
        if let Some(t) = self.wbl.base_term() {
            if first > self.base.0 + 1 {
                self.base = (first - 1, t);
            }
        }
        self.fetched.retain(|&i, _| i >= first);
    }

    fn first(&self) -> u64 {
        (self.base.0 + 1).max(self.wbl.first_lsn())
    }

    fn cache_first(&self) -> u64 {
        self.cache
            .front()
            .map_or(self.wbl.last_lsn() + 1, |e| e.index)
    }

    fn evict(&mut self) {
        while self.cache_bytes > ENTRY_CACHE_BYTES
            && self.cache.front().is_some_and(|e| e.index <= self.applied)
        {
            let e = self.cache.pop_front().expect("front exists");
            self.cache_bytes -= entry_size(&e);
        }
    }
}

impl raft::Storage for WblStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hs.clone(),
            conf_state: self.cs.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.wbl.last_lsn() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let cache_first = self.cache_first();
        let can_async = context.can_async();
        // Moved into the fetch request of the first missing entry (the walk stops there).
        let mut context = Some(context);
        collect_within(low, high, max_size.into(), |i| {
            if i >= cache_first {
                Ok(self.cache[(i - cache_first) as usize].clone())
            } else if let Some(e) = self.fetched.get(&i) {
                Ok(e.clone())
            } else if let Some(context) = context.take().filter(|_| can_async) {
                self.fetch_requests.borrow_mut().push((i, high, context));
                Err(raft::Error::Store(StorageError::LogTemporarilyUnavailable))
            } else {
                // The cache keeps everything above the applied index, which is all raft asks
                // for synchronously.
                tracing::error!(
                    low,
                    high,
                    index = i,
                    "raft asked synchronously for an evicted entry"
                );
                Err(raft::Error::Store(StorageError::Unavailable))
            }
        })
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.base.0 {
            return Ok(self.base.1);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.wbl
            .term(idx)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.wbl.last_lsn().max(self.base.0))
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // The message carries the descriptor; the follower fetches the file itself.
        match &self.snapshot {
            Some((d, cs)) if d.lsn >= request_index => {
                let mut s = Snapshot {
                    data: d.encode().to_vec().into(),
                    ..Default::default()
                };
                let m = s.mut_metadata();
                m.index = d.lsn;
                m.term = d.term;
                m.set_conf_state(cs.clone());
                Ok(s)
            }
            _ => Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            )),
        }
    }
}

impl LogStore for WblStore {
    fn stage(
        &mut self,
        entries: &[Entry],
        hs: Option<&HardState>,
        number: u64,
    ) -> Result<bool, StoreError> {
        let mut last = None;
        let mut hard = None;
        if let Some(first) = entries.first() {
            let cache_first = self.cache_first();
            if first.index < cache_first {
                self.cache.clear();
                self.cache_bytes = 0;
            } else {
                while self.cache.back().is_some_and(|e| e.index >= first.index) {
                    let e = self.cache.pop_back().expect("back exists");
                    self.cache_bytes -= entry_size(&e);
                }
            }
            for e in entries {
                let (kind, payload) = record_of(e)?;
                last = Some(self.wbl.append(kind, e.index, e.term, payload.to_vec())?);
                self.cache_bytes += entry_size(e);
                self.cache.push_back(e.clone());
            }
            self.fetched.retain(|&i, _| i < first.index);
        }
        if let Some(hs) = hs {
            // Term and vote must be durable before raft acts on them (a vote, an append
            // response); a commit advance alone need not be (raft relearns it from its
            // leader), so it is noted and persisted lazily (`Wbl::note_commit`): not a second
            // durable write behind every batch.
            let promise = hs.term != self.hs.term || hs.vote != self.hs.vote;
            self.hs = hs.clone();
            if promise {
                hard = Some(self.wbl.set_hard_state(WblHardState {
                    term: hs.term,
                    vote: hs.vote,
                    commit: hs.commit,
                })?);
            } else {
                self.wbl.note_commit(hs.commit);
            }
        }
        // Both are waited for: a hard state can be written in a writer cycle before the last
        // of this Ready's entries (a batch holds at most MAX_BATCH_RECORDS).
        let mut wait = false;
        for d in [last, hard].into_iter().flatten() {
            self.pending.push_back((number, d));
            wait = true;
        }
        self.evict();
        Ok(wait)
    }

    fn set_conf_state(&mut self, _index: u64, cs: ConfState) {
        self.cs = cs;
    }

    fn set_applied(&mut self, index: u64) {
        self.applied = index;
        self.evict();
    }

    fn chain_at(&self, lsn: u64) -> Option<u64> {
        self.wbl.chain_at(lsn)
    }
}
