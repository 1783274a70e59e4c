//! The shard replica's decisions: a sans-IO wrapper of `raft::RawNode`.
//!
//! The caller owns the I/O: it ticks the core on a clock, steps messages from peers into it,
//! sends the messages it returns, and tells it when staged writes became durable. The core
//! stages entries and hard state in its [`LogStore`], applies committed entries to the shard's
//! [`StateMachine`], applies conf changes, checks checkpoints against its digest history and
//! reports what happened as [`Event`]s. Persistence is asynchronous (raft-rs's
//! `advance_append_async` / `on_persist_ready`), so a leader sends appends to followers while
//! its own write is in flight, and messages that must follow persistence (votes, append
//! responses) are held until [`ShardCore::on_persisted`] releases them.

use super::conf::{decode_conf_change, ConfError};
use super::entry::{proposal_data, record_of, EntryError};
use super::store::{LogStore, StoreError};
use super::{
    raft_logger, APPEND_BACKLOG_MAX, DIGEST_HISTORY, ELECTION_TICKS, HEARTBEAT_TICKS,
    MAX_INFLIGHT_MSGS, MAX_SIZE_PER_MSG,
};
use crate::snapshot::SnapshotError;
use crate::state::{ApplyResult, Checkpoint, Op, StateDigest, StateMachine};
use crate::wbl::RecordKind;
use raft::eraftpb::{ConfChangeV2, ConfState, Message};
use raft::{Config, RawNode, ReadOnlyOption, StateRole};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// This replica's raft id (assigned by the cluster, kept in the data dir).
    pub id: u64,
    pub shard: u32,
    /// The LSN the state machine already holds (local recovery replays to the persisted
    /// commit); raft delivers committed entries after it.
    pub applied: u64,
    /// Election timeout exactly [`ELECTION_TICKS`] instead of raft-rs's random one in
    /// `[ELECTION_TICKS, 2 × ELECTION_TICKS)`: raft-rs draws it from the thread RNG, so the
    /// deterministic simulation fixes it and randomizes the ticks it delivers instead.
    pub fixed_election_timeout: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("log store: {0}")]
    Store(#[from] StoreError),
    #[error("entry: {0}")]
    Entry(#[from] EntryError),
    #[error("membership: {0}")]
    Conf(#[from] ConfError),
    #[error("state machine stopped: {0}")]
    State(#[from] SnapshotError),
    #[error("raft restored a snapshot at {index} that was not installed first")]
    SnapshotNotInstalled { index: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    #[error("proposal dropped: {0}")]
    Dropped(String),
}

/// What the core did, for the caller to act on (answer clients, serve reads, alert).
#[derive(Clone, Debug)]
pub enum Event {
    /// A committed entry was applied. A proposer matches `(index, term)` with what
    /// [`ShardCore::propose`] returned: the same index with another term means its entry lost.
    Applied {
        index: u64,
        term: u64,
        kind: RecordKind,
        result: ApplyResult,
        /// xxh3-64 of the entry's data (kind ‖ payload): how a follower recognizes a
        /// proposal it forwarded to the leader.
        data_hash: u64,
    },
    /// A conf change was applied; `conf` is the membership from now on.
    ConfChanged {
        index: u64,
        term: u64,
        conf: ConfState,
    },
    /// A read with context `ctx` is linearizable once the applied index reaches `index`.
    ReadIndex { ctx: Vec<u8>, index: u64 },
    /// Leader or role changed.
    Role {
        term: u64,
        leader: u64,
        role: StateRole,
    },
    /// A checkpoint's digest differs from this replica's digest at the LSN it covers: the
    /// replicas diverged. Reported loudly; the operator must rebuild this replica.
    DigestMismatch {
        lsn: u64,
        ours: StateDigest,
        theirs: StateDigest,
    },
    /// A checkpoint's chain head differs from this replica's log at the LSN it covers.
    ChainMismatch { lsn: u64, ours: u64, theirs: u64 },
}

/// One Ready's persistence: its number, whether it staged anything, and the messages that may
/// leave only once it is durable.
struct AfterPersist {
    number: u64,
    staged: bool,
    messages: Vec<Message>,
    /// The snapshot this Ready restored: applied once raft counts it persisted.
    snapshot_index: Option<u64>,
}

pub struct ShardCore<S: LogStore> {
    node: RawNode<S>,
    /// Shared with compaction, which freezes, installs and thaws layers between applies.
    sm: Rc<RefCell<StateMachine>>,
    shard: u32,
    after_persist: VecDeque<AfterPersist>,
    /// (lsn, digest after applying it), ascending, at most [`DIGEST_HISTORY`].
    digests: VecDeque<(u64, StateDigest)>,
    events: Vec<Event>,
    /// A Ready restoring a snapshot, held until the caller installed it.
    held: Option<raft::Ready>,
    appends_dropped: u64,
}

impl<S: LogStore> ShardCore<S> {
    pub fn new(cfg: &CoreConfig, store: S, sm: StateMachine) -> Result<ShardCore<S>, CoreError> {
        let mut c = Config {
            id: cfg.id,
            election_tick: ELECTION_TICKS,
            heartbeat_tick: HEARTBEAT_TICKS,
            applied: cfg.applied,
            max_size_per_msg: MAX_SIZE_PER_MSG,
            max_inflight_msgs: MAX_INFLIGHT_MSGS,
            check_quorum: true,
            pre_vote: true,
            read_only_option: ReadOnlyOption::Safe,
            ..Default::default()
        };
        if cfg.fixed_election_timeout {
            c.min_election_tick = ELECTION_TICKS;
            c.max_election_tick = ELECTION_TICKS + 1;
        }
        let node = RawNode::new(&c, store, &raft_logger(cfg.shard, cfg.id))?;
        let mut digests = VecDeque::new();
        digests.push_back((sm.lsn_applied(), sm.digest()));
        Ok(ShardCore {
            node,
            sm: Rc::new(RefCell::new(sm)),
            shard: cfg.shard,
            after_persist: VecDeque::new(),
            digests,
            events: Vec::new(),
            held: None,
            appends_dropped: 0,
        })
    }

    pub fn id(&self) -> u64 {
        self.node.raft.id
    }

    pub fn shard(&self) -> u32 {
        self.shard
    }

    pub fn term(&self) -> u64 {
        self.node.raft.term
    }

    pub fn leader_id(&self) -> Option<u64> {
        match self.node.raft.leader_id {
            raft::INVALID_ID => None,
            id => Some(id),
        }
    }

    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    pub fn role(&self) -> StateRole {
        self.node.raft.state
    }

    pub fn commit_index(&self) -> u64 {
        self.node.raft.raft_log.committed
    }

    pub fn applied(&self) -> u64 {
        self.sm.borrow().lsn_applied()
    }

    pub fn conf_state(&self) -> ConfState {
        self.node.raft.prs().conf().to_conf_state()
    }

    pub fn state_machine(&self) -> std::cell::Ref<'_, StateMachine> {
        self.sm.borrow()
    }

    /// The state machine itself, for compaction (`compaction::compact`).
    pub fn state_handle(&self) -> Rc<RefCell<StateMachine>> {
        self.sm.clone()
    }

    /// Replaces the state with one served from an installed snapshot (the log was reset to
    /// start after it); the digest history starts over there.
    pub fn replace_state(&mut self, sm: StateMachine) {
        self.digests.clear();
        self.digests.push_back((sm.lsn_applied(), sm.digest()));
        *self.sm.borrow_mut() = sm;
    }

    /// The raft-rs node, read-only (status, progress, diagnostics).
    pub fn raw_node(&self) -> &RawNode<S> {
        &self.node
    }

    pub fn store(&self) -> &S {
        self.node.store()
    }

    pub fn store_mut(&mut self) -> &mut S {
        self.node.mut_store()
    }

    /// Advances the logical clock one tick.
    pub fn tick(&mut self) -> bool {
        if self.held.is_some() {
            return false;
        }
        self.node.tick()
    }

    pub fn campaign(&mut self) -> Result<(), CoreError> {
        if self.held.is_some() {
            return Ok(());
        }
        Ok(self.node.campaign()?)
    }

    /// Steps a message from a peer. Messages for another group or stale ones are the caller's
    /// to filter; raft-rs drops what it must.
    pub fn step(&mut self, m: Message) -> Result<(), CoreError> {
        if self.held.is_some() {
            return Ok(());
        }
        if m.get_msg_type() == raft::eraftpb::MessageType::MsgAppend {
            // A follower far behind is sent up to MAX_INFLIGHT_MSGS × MAX_SIZE_PER_MSG of
            // entries at once; beyond the backlog its log can queue, the append is dropped
            // (raft probes and resends from what this replica has).
            let log = &self.node.raft.raft_log;
            let backlog = log.last_index().saturating_sub(log.persisted) as usize;
            if backlog > 0 && backlog + m.entries.len() > APPEND_BACKLOG_MAX {
                self.appends_dropped += 1;
                return Ok(());
            }
        }
        Ok(self.node.step(m)?)
    }

    /// Appends dropped because this replica's unpersisted backlog was full.
    pub fn appends_dropped(&self) -> u64 {
        self.appends_dropped
    }

    /// Proposes a state-machine record on the leader; returns the `(index, term)` it will be
    /// applied at if it commits.
    pub fn propose(
        &mut self,
        kind: RecordKind,
        payload: &[u8],
    ) -> Result<(u64, u64), ProposeError> {
        self.check_leader()?;
        self.node
            .propose(vec![], proposal_data(kind, payload))
            .map_err(|e| ProposeError::Dropped(e.to_string()))?;
        Ok(self.last_proposed())
    }

    /// Proposes a state-machine record from any replica: on the leader as [`Self::propose`];
    /// on a follower raft forwards it to the leader it knows, and the caller recognizes it by
    /// the xxh3-64 of its data in [`Event::Applied`] (returned here). A forwarded proposal may
    /// be lost without notice (leadership moves): callers time out and retry with the same
    /// idempotency id, which the state machine deduplicates.
    pub fn propose_anywhere(
        &mut self,
        kind: RecordKind,
        payload: &[u8],
    ) -> Result<u64, ProposeError> {
        if self.held.is_some() {
            return Err(ProposeError::Dropped("installing a snapshot".into()));
        }
        if self.leader_id().is_none() {
            return Err(ProposeError::NotLeader { leader: None });
        }
        let data = proposal_data(kind, payload);
        let hash = xxhash_rust::xxh3::xxh3_64(&data);
        self.node
            .propose(vec![], data)
            .map_err(|e| ProposeError::Dropped(e.to_string()))?;
        Ok(hash)
    }

    /// Proposes a membership change (one joint change for replacements).
    pub fn propose_conf_change(&mut self, cc: ConfChangeV2) -> Result<(u64, u64), ProposeError> {
        self.check_leader()?;
        self.node
            .propose_conf_change(vec![], cc)
            .map_err(|e| ProposeError::Dropped(e.to_string()))?;
        Ok(self.last_proposed())
    }

    /// Proposes a membership change from any replica: raft forwards it from a follower or a
    /// learner to the leader it knows. Not tracked: callers watch [`Self::conf_state`] and
    /// propose again (raft drops a change while another is pending).
    pub fn propose_conf_change_anywhere(&mut self, cc: ConfChangeV2) -> Result<(), ProposeError> {
        if self.held.is_some() {
            return Err(ProposeError::Dropped("installing a snapshot".into()));
        }
        if self.leader_id().is_none() {
            return Err(ProposeError::NotLeader { leader: None });
        }
        self.node
            .propose_conf_change(vec![], cc)
            .map_err(|e| ProposeError::Dropped(e.to_string()))
    }

    /// Proposes a checkpoint naming this leader's applied LSN, with its digest and chain head
    /// there; `mac` (the card, with the cluster integrity key) signs payload bytes 0..33.
    pub fn propose_checkpoint(
        &mut self,
        mac: impl FnOnce(&[u8]) -> [u8; 32],
    ) -> Result<(u64, u64), ProposeError> {
        self.check_leader()?;
        let lsn = self.sm.borrow().lsn_applied();
        let mut c = Checkpoint {
            lsn_covered: lsn,
            chain_head: self.node.store().chain_at(lsn).unwrap_or(0),
            digest: self.sm.borrow().digest().to_bytes(),
            mac: [0; 32],
        };
        let unsigned = Op::Checkpoint(c.clone()).encode();
        c.mac = mac(&unsigned[..CHECKPOINT_MAC_INPUT_BYTES]);
        self.propose(RecordKind::Checkpoint, &Op::Checkpoint(c).encode())
    }

    /// Starts a linearizable read; an [`Event::ReadIndex`] with the same context follows.
    pub fn read_index(&mut self, ctx: Vec<u8>) {
        if self.held.is_some() {
            return;
        }
        self.node.read_index(ctx);
    }

    /// Entries raft asked for asynchronously are now in the store.
    pub fn on_entries_fetched(&mut self, ctx: raft::GetEntriesContext) {
        if self.held.is_some() {
            return;
        }
        self.node.on_entries_fetched(ctx);
    }

    pub fn report_unreachable(&mut self, id: u64) {
        self.node.report_unreachable(id);
    }

    pub fn has_ready(&self) -> bool {
        self.held.is_none() && self.node.has_ready()
    }

    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Handles one raft Ready, if there is one: stages its entries and hard state, applies its
    /// committed entries and returns the messages to send now. Call until it returns `None`.
    pub fn process_ready(&mut self) -> Result<Option<Vec<Message>>, CoreError> {
        if self.held.is_some() || !self.node.has_ready() {
            return Ok(None);
        }
        let mut rd = self.node.ready();
        if !rd.snapshot().is_empty() {
            // The caller must install the snapshot (its log reset, its state replaced) before
            // the rest of this Ready (entries after it, hard state) is handled: hold it.
            let out = rd.take_messages();
            self.held = Some(rd);
            return Ok(Some(out));
        }
        self.finish_ready(rd).map(Some)
    }

    /// The snapshot raft restored and the caller must install before anything else happens:
    /// (index, term, membership). While it is pending the core takes no input (messages and
    /// ticks are dropped, raft resends; proposals are refused).
    pub fn snapshot_to_install(&self) -> Option<(u64, u64, ConfState)> {
        self.held.as_ref().map(|rd| {
            let m = rd.snapshot().get_metadata();
            (m.index, m.term, m.get_conf_state().clone())
        })
    }

    /// The snapshot [`Self::snapshot_to_install`] named is installed (state replaced with
    /// [`Self::replace_state`], log reset): handles the rest of its Ready.
    pub fn resume_after_install(&mut self) -> Result<Vec<Message>, CoreError> {
        match self.held.take() {
            Some(rd) => self.finish_ready(rd),
            None => Ok(Vec::new()),
        }
    }

    fn finish_ready(&mut self, mut rd: raft::Ready) -> Result<Vec<Message>, CoreError> {
        let number = rd.number();
        let mut snapshot_index = None;
        if !rd.snapshot().is_empty() {
            let index = rd.snapshot().get_metadata().index;
            if self.sm.borrow().lsn_applied() != index {
                return Err(CoreError::SnapshotNotInstalled { index });
            }
            snapshot_index = Some(index);
        }
        if let Some(ss) = rd.ss() {
            self.events.push(Event::Role {
                term: self.node.raft.term,
                leader: ss.leader_id,
                role: ss.raft_state,
            });
        }
        let mut out = rd.take_messages();
        let entries = rd.take_entries();
        let hs = rd.hs().cloned();
        let staged = if !entries.is_empty() || hs.is_some() {
            self.node.mut_store().stage(&entries, hs.as_ref(), number)?
        } else {
            false
        };
        for rs in rd.take_read_states() {
            self.events.push(Event::ReadIndex {
                ctx: rs.request_ctx,
                index: rs.index,
            });
        }
        let committed = rd.take_committed_entries();
        // raft-rs holds every message of a non-leader until its Ready is durable. Only the
        // answers that vouch for durable state (append, vote and pre-vote answers) must wait
        // (etcd raft's rule, raft thesis 3.8); the rest go now. Held heartbeat answers let a
        // slow follower fsync depose a healthy leader through check-quorum.
        let (messages, now): (Vec<Message>, Vec<Message>) = rd
            .take_persisted_messages()
            .into_iter()
            .partition(waits_for_persistence);
        out.extend(now);
        self.node.advance_append_async(rd);
        if let Some(last) = committed.last().map(|e| e.index) {
            for e in committed {
                self.apply_entry(e)?;
            }
            self.node.advance_apply_to(last);
            self.node.mut_store().set_applied(last);
        }
        self.after_persist.push_back(AfterPersist {
            number,
            staged,
            messages,
            snapshot_index,
        });
        out.extend(self.release_persisted(0));
        Ok(out)
    }

    /// Everything the store staged under Ready numbers ≤ `number` is durable: returns the
    /// messages that were waiting for it. Call [`Self::process_ready`] afterwards: new
    /// committed entries may be ready.
    pub fn on_persisted(&mut self, number: u64) -> Vec<Message> {
        self.release_persisted(number)
    }

    fn release_persisted(&mut self, durable: u64) -> Vec<Message> {
        let mut out = Vec::new();
        let mut last = None;
        let mut snapshot = None;
        while let Some(front) = self.after_persist.front() {
            if front.staged && front.number > durable {
                break;
            }
            let a = self.after_persist.pop_front().expect("front exists");
            last = Some(a.number);
            snapshot = a.snapshot_index.or(snapshot);
            out.extend(a.messages);
        }
        if let Some(n) = last {
            self.node.on_persist_ready(n);
        }
        if let Some(i) = snapshot {
            self.node.advance_apply_to(i);
        }
        out
    }

    fn check_leader(&self) -> Result<(), ProposeError> {
        if self.held.is_some() {
            return Err(ProposeError::Dropped("installing a snapshot".into()));
        }
        if self.is_leader() {
            Ok(())
        } else {
            Err(ProposeError::NotLeader {
                leader: self.leader_id(),
            })
        }
    }

    fn last_proposed(&self) -> (u64, u64) {
        (self.node.raft.raft_log.last_index(), self.node.raft.term)
    }

    fn apply_entry(&mut self, e: raft::eraftpb::Entry) -> Result<(), CoreError> {
        let (kind, payload) = record_of(&e)?;
        let index = e.index;
        match kind {
            RecordKind::RaftConfChange | RecordKind::RaftConfChangeV2 => {
                let cc = decode_conf_change(kind == RecordKind::RaftConfChangeV2, index, payload)?;
                let conf = self.node.apply_conf_change(&cc)?;
                self.node.mut_store().set_conf_state(index, conf.clone());
                self.sm.borrow_mut().apply(index, kind, payload)?;
                self.events.push(Event::ConfChanged {
                    index,
                    term: e.term,
                    conf,
                });
            }
            _ => {
                let result = self.sm.borrow_mut().apply(index, kind, payload)?;
                if kind == RecordKind::Checkpoint {
                    self.check_checkpoint(payload);
                }
                self.events.push(Event::Applied {
                    index,
                    term: e.term,
                    kind,
                    result,
                    data_hash: xxhash_rust::xxh3::xxh3_64(e.get_data()),
                });
            }
        }
        if self.digests.len() == DIGEST_HISTORY {
            self.digests.pop_front();
        }
        self.digests.push_back((index, self.sm.borrow().digest()));
        Ok(())
    }

    /// This replica's digest after applying `lsn`, while it is in the history.
    pub fn digest_at(&self, lsn: u64) -> Option<StateDigest> {
        let i = self.digests.partition_point(|(l, _)| *l < lsn);
        match self.digests.get(i) {
            Some((l, d)) if *l == lsn => Some(*d),
            // LSNs skipped by the history (none are today) carry the digest of the one before.
            Some(_) if i > 0 => Some(self.digests[i - 1].1),
            _ => None,
        }
    }

    fn check_checkpoint(&mut self, payload: &[u8]) {
        let Ok(Op::Checkpoint(c)) = Op::decode(RecordKind::Checkpoint, payload) else {
            return;
        };
        let theirs = StateDigest::from_bytes(c.digest);
        if let Some(ours) = self.digest_at(c.lsn_covered) {
            if ours != theirs {
                tracing::error!(
                    shard = self.shard,
                    node = self.id(),
                    lsn = c.lsn_covered,
                    "replica state diverged: checkpoint digest differs from ours"
                );
                self.events.push(Event::DigestMismatch {
                    lsn: c.lsn_covered,
                    ours,
                    theirs,
                });
            }
        }
        if let Some(ours) = self.node.store().chain_at(c.lsn_covered) {
            if ours != c.chain_head {
                tracing::error!(
                    shard = self.shard,
                    node = self.id(),
                    lsn = c.lsn_covered,
                    "replica log diverged: checkpoint chain head differs from ours"
                );
                self.events.push(Event::ChainMismatch {
                    lsn: c.lsn_covered,
                    ours,
                    theirs: c.chain_head,
                });
            }
        }
    }
}

/// Checkpoint payload bytes covered by its MAC (version, LSN, chain head, digest).
pub const CHECKPOINT_MAC_INPUT_BYTES: usize = 33;

/// Whether a non-leader's message must wait until its Ready is durable. Answers that vouch for
/// durable state wait: an append answer (the entries are stored), a vote or pre-vote answer
/// (the vote is remembered), and a candidate's vote requests (raft-rs counts the candidate's
/// own vote without a message, so its requests wait for that vote to be stored). Heartbeat
/// answers (liveness and read-index acknowledgements of the sender's current term), forwarded
/// proposals and forwarded read-index requests state nothing about the sender's disk and go at
/// once.
fn waits_for_persistence(m: &Message) -> bool {
    use raft::eraftpb::MessageType as T;
    !matches!(
        m.get_msg_type(),
        T::MsgHeartbeatResponse | T::MsgPropose | T::MsgReadIndex
    )
}
