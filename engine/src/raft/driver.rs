//! A shard replica on its executor: the [`ShardCore`] over the WBL, driven by a ticker, the
//! peers' messages and the WBL writer's completions, with proposals and reads that resolve
//! when applied.

use super::core::{CoreError, Event, ProposeError, ShardCore};
use super::snapshot::{SnapshotDescriptor, SnapshotSource};
use super::wbl_store::WblStore;
use crate::state::ApplyResult;
use crate::wbl::RecordKind;
use raft::eraftpb::{ConfChangeV2, ConfState, Message, MessageType};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// Interval of the raft logical clock: elections after 10–20 ticks, heartbeats every 2.
pub const TICK: Duration = Duration::from_millis(100);
/// Most proposals of one replica waiting for their apply.
pub const MAX_PENDING_PROPOSALS: usize = 65536;
/// Log entries always kept below the applied index at a compaction (followers a little behind
/// catch up from the log).
pub const RETAIN_LOG_ENTRIES_MIN: u64 = 10_000;
/// Most log entries kept for a lagging follower; beyond, it needs a snapshot.
pub const RETAIN_LOG_ENTRIES_MAX: u64 = 1_000_000;
/// How often the compactor checks how far the state is past its snapshot.
pub const COMPACTION_CHECK: Duration = Duration::from_secs(1);
/// A ReadIndex round not answered within this is started again (raft drops a read it cannot
/// serve: no leader, or leadership moved).
pub const READ_ROUND_RETRY: Duration = Duration::from_secs(1);
/// How long a follower waits for a proposal it forwarded to be applied.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// Most reads of one replica waiting for their read index.
pub const MAX_PENDING_READS: usize = 65536;
/// A durable write of the log (one or more Readies' entries and hard state) slower than this
/// is counted in [`Stalls`] and logged: a follower's append answers and a leader's commits
/// waited for it.
pub const SLOW_PERSIST: Duration = Duration::from_millis(100);
/// A tick later than its interval by more than this is counted in [`Stalls`] and logged: the
/// executor (or the whole process) did not run, and raft's clock stood still meanwhile.
pub const LATE_TICK: Duration = Duration::from_millis(100);
/// At most one warning of each kind per replica per this interval (the counters count all).
pub const STALL_WARN_EVERY: Duration = Duration::from_secs(1);

/// Slow disk writes and late ticks a replica saw since it started (status.json, metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stalls {
    /// Durable writes slower than [`SLOW_PERSIST`].
    pub slow_persists: u64,
    /// The slowest durable write.
    pub worst_persist: Duration,
    /// Ticks later than their interval by more than [`LATE_TICK`].
    pub late_ticks: u64,
    /// The longest time between two ticks.
    pub worst_tick_gap: Duration,
}

/// Where a replica's outgoing raft messages go (the peer transport, or a test network).
pub trait Transport {
    /// Sends messages of `shard` to the peers named in their `to`; best effort (raft
    /// retransmits).
    fn send(&self, shard: u32, msgs: Vec<Message>);
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Propose(#[from] ProposeError),
    #[error("the entry was replaced by another leader's: the proposal did not commit")]
    Lost,
    #[error("a proposal forwarded to the leader was not applied within {0:?}; it may or may not commit: retry with the same idempotency id")]
    ForwardTimeout(Duration),
    #[error("too many requests waiting ({max})")]
    Busy { max: usize },
    #[error("the replica stopped: {0}")]
    Stopped(String),
}

/// A committed and applied proposal: where it landed and what it did.
#[derive(Clone, Copy, Debug)]
pub struct Committed {
    pub index: u64,
    pub term: u64,
    pub result: ApplyResult,
}

/// What an applied proposal produced.
#[derive(Clone, Debug)]
pub enum Applied {
    Record(ApplyResult),
    Conf(ConfState),
}

struct SlotInner<T> {
    value: Option<T>,
    waker: Option<Waker>,
}

/// A one-shot value a task waits for.
struct Slot<T>(Rc<RefCell<SlotInner<T>>>);

impl<T> Clone for Slot<T> {
    fn clone(&self) -> Self {
        Slot(self.0.clone())
    }
}

impl<T> Slot<T> {
    fn new() -> Slot<T> {
        Slot(Rc::new(RefCell::new(SlotInner {
            value: None,
            waker: None,
        })))
    }

    fn set(&self, v: T) {
        let mut s = self.0.borrow_mut();
        s.value = Some(v);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    }
}

impl<T> Future for Slot<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut s = self.0.borrow_mut();
        match s.value.take() {
            Some(v) => Poll::Ready(v),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

type ProposalSlot = Slot<Result<Applied, ReplicaError>>;
type ReadSlot = Slot<Result<u64, ReplicaError>>;
type ForwardSlot = Slot<Result<Committed, ReplicaError>>;
/// A ReadIndex round: when it started and the reads it serves.
type ReadRound = (std::time::Instant, Vec<ReadSlot>);

pub struct Replica {
    core: RefCell<ShardCore<WblStore>>,
    transport: Rc<dyn Transport>,
    persisting: Cell<bool>,
    /// By index: the term the proposal was given and its slot.
    proposals: RefCell<BTreeMap<u64, (u64, ProposalSlot)>>,
    /// ReadIndex rounds in flight: context → (started, the reads it serves).
    reads: RefCell<BTreeMap<Vec<u8>, ReadRound>>,
    /// Reads waiting for the next round (one round in flight at a time: reads arriving meanwhile
    /// share the next one).
    read_batch: RefCell<Vec<ReadSlot>>,
    read_rounds: Cell<u64>,
    /// Proposals this follower forwarded to the leader, by the hash of their data.
    forwarded: RefCell<std::collections::HashMap<u64, Vec<(std::time::Instant, ForwardSlot)>>>,
    /// Reads whose index is known, waiting for the applied index to reach it.
    read_waits: RefCell<Vec<(u64, ReadSlot)>>,
    read_seq: Cell<u64>,
    failed: RefCell<Option<String>>,
    events: RefCell<Vec<Event>>,
    keep_events: bool,
    snapshots: RefCell<Option<SnapshotSetup>>,
    installing: Cell<bool>,
    /// A fetched and verified snapshot file, for raft's restore of it.
    verified: RefCell<Option<crate::snapshot::Snapshot>>,
    compacting: Cell<bool>,
    /// (min, max) log entries kept below the applied index at a compaction.
    retention: Cell<(u64, u64)>,
    /// Release the log only below the archive watermark (`StateMachine::archived_lsn`).
    archive_gate: Cell<bool>,
    /// The last snapshot fetched from a peer: how long the transfer and the verification took.
    last_fetch: Cell<Option<(Duration, Duration)>>,
    stalls: Cell<Stalls>,
    /// When a slow write and a late tick were last logged.
    stall_warned: Cell<[Option<std::time::Instant>; 2]>,
}

/// Where a follower fetches snapshot files from, where it keeps them, and the card that
/// verifies their footer MAC.
pub struct SnapshotSetup {
    pub source: Rc<dyn SnapshotSource>,
    pub dir: std::path::PathBuf,
    pub mac: Rc<dyn crate::snapshot::FooterMac>,
}

impl Replica {
    /// `keep_events` keeps every event for [`Replica::take_events`] (tests, tools).
    pub fn new(
        core: ShardCore<WblStore>,
        transport: Rc<dyn Transport>,
        keep_events: bool,
    ) -> Rc<Replica> {
        Rc::new(Replica {
            core: RefCell::new(core),
            transport,
            persisting: Cell::new(false),
            proposals: RefCell::new(BTreeMap::new()),
            reads: RefCell::new(BTreeMap::new()),
            read_batch: RefCell::new(Vec::new()),
            read_rounds: Cell::new(0),
            forwarded: RefCell::new(std::collections::HashMap::new()),
            read_waits: RefCell::new(Vec::new()),
            read_seq: Cell::new(0),
            failed: RefCell::new(None),
            events: RefCell::new(Vec::new()),
            keep_events,
            snapshots: RefCell::new(None),
            installing: Cell::new(false),
            verified: RefCell::new(None),
            compacting: Cell::new(false),
            retention: Cell::new((RETAIN_LOG_ENTRIES_MIN, RETAIN_LOG_ENTRIES_MAX)),
            archive_gate: Cell::new(false),
            last_fetch: Cell::new(None),
            stalls: Cell::new(Stalls::default()),
            stall_warned: Cell::new([None, None]),
        })
    }

    /// The replica of shard `shard` with raft id `id` on a log and state just recovered
    /// (`recovery::open_and_recover`); `bootstrap` is the membership `cluster init` gave.
    pub async fn open(
        id: u64,
        shard: u32,
        start: crate::recovery::Start,
        bootstrap: &ConfState,
        transport: Rc<dyn Transport>,
        keep_events: bool,
    ) -> Result<Rc<Replica>, CoreError> {
        let local = start.local;
        let cs = super::conf::membership_at_commit(&local, bootstrap)?;
        let store =
            WblStore::open(start.wbl, (local.lsn_snapshot, local.snapshot_term), cs).await?;
        let cfg = super::core::CoreConfig {
            id,
            shard,
            applied: local.state.lsn_applied(),
            fixed_election_timeout: false,
        };
        let mut store = store;
        if let Some(b) = local.state.base() {
            let f = b.footer();
            let cs = ConfState {
                voters: f.voters.clone(),
                learners: f.learners.clone(),
                ..Default::default()
            };
            store.set_snapshot(SnapshotDescriptor::of(shard, b), cs);
        }
        let core = ShardCore::new(&cfg, store, local.state)?;
        Ok(Replica::new(core, transport, keep_events))
    }

    /// Compacts the shard into a new snapshot file in `dir` (rolling compaction: the memtable is
    /// frozen, merged with the base file off the executor, MACed in the card, installed) and
    /// releases the log below what raft may still need: at least [`RETAIN_LOG_ENTRIES_MIN`]
    /// entries, and on the leader everything a follower still lacks, up to
    /// [`RETAIN_LOG_ENTRIES_MAX`] (beyond it a follower needs a snapshot). Skipped in a joint
    /// configuration (a footer names no outgoing voters).
    pub async fn compact(
        self: &Rc<Self>,
        dir: &std::path::Path,
        mac: &dyn crate::snapshot::FooterMac,
        cfg: &crate::compaction::CompactionConfig,
    ) -> Result<Option<crate::compaction::CompactionReport>, crate::recovery::RecoveryError> {
        let (state, wbl, ctx) = {
            let c = self.core.borrow();
            let conf = c.conf_state();
            if !conf.voters_outgoing.is_empty() {
                return Ok(None);
            }
            let applied = c.applied();
            let (keep_min, keep_max) = self.retention.get();
            let floor = applied.saturating_sub(keep_max);
            let mut retain = applied.saturating_sub(keep_min);
            if c.is_leader() {
                for (id, pr) in c.raw_node().raft.prs().iter() {
                    if *id != c.id() {
                        retain = retain.min(pr.matched + 1);
                    }
                }
            }
            if self.archive_gate.get() {
                // Not yet archived: kept, up to the same most-kept bound (`floor`) as for a
                // lagging follower, so a store that stays down cannot fill the disk; beyond it
                // the archive has a gap and the RPO falls back to the manifests' snapshots.
                retain = retain.min(c.state_machine().archived_lsn() + 1);
            }
            let ctx = crate::compaction::CompactionContext {
                voters: conf.voters.clone(),
                learners: conf.learners.clone(),
                retain_from: Some(retain.max(floor).max(1)),
            };
            (c.state_handle(), c.store().wbl().clone(), ctx)
        };
        if self.installing.get() || self.compacting.replace(true) {
            return Ok(None);
        }
        let cs = ConfState {
            voters: ctx.voters.clone(),
            learners: ctx.learners.clone(),
            ..Default::default()
        };
        let report = crate::compaction::compact(dir, &state, &wbl, ctx, mac, cfg).await;
        self.compacting.set(false);
        let report = report?;
        let mut core = self.core.borrow_mut();
        let shard = core.shard();
        let desc = core
            .state_machine()
            .base()
            .map(|b| SnapshotDescriptor::of(shard, b));
        let store = core.store_mut();
        store.on_released();
        if let Some(d) = desc {
            store.set_snapshot(d, cs);
        }
        Ok(Some(report))
    }

    /// Compacts whenever [`Self::applied`] is `cfg.records_threshold` past the newest snapshot;
    /// a failed compaction is logged and retried at the next check (the state is unchanged).
    pub async fn run_compactor(
        self: Rc<Self>,
        dir: std::path::PathBuf,
        mac: Rc<dyn crate::snapshot::FooterMac>,
        cfg: crate::compaction::CompactionConfig,
    ) {
        while self.failed().is_none() {
            glommio::timer::sleep(COMPACTION_CHECK).await;
            let (applied, base) = self.with_core(|c| {
                let base = c.state_machine().base().map_or(0, |b| b.lsn());
                (c.applied(), base)
            });
            if applied < base + cfg.records_threshold {
                continue;
            }
            match self.compact(&dir, &*mac, &cfg).await {
                Ok(Some(r)) => tracing::info!(
                    shard = self.with_core(|c| c.shard()),
                    lsn = r.lsn,
                    wbl_first_lsn = r.wbl_first_lsn,
                    ms = r.duration.as_secs_f64() * 1e3,
                    "shard compacted"
                ),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "compaction failed; retried later"),
            }
        }
    }

    /// Lets this replica install snapshots from its leader (without it a snapshot message is
    /// dropped and the follower stays behind).
    pub fn enable_snapshots(&self, setup: SnapshotSetup) {
        *self.snapshots.borrow_mut() = Some(setup);
    }

    /// Releases the log at a compaction only below the archive watermark (the durable store's
    /// log archive is on), within the most-kept bound of [`Self::set_log_retention`].
    pub fn gate_release_on_archive(&self, on: bool) {
        self.archive_gate.set(on);
    }

    /// Log entries kept below the applied index at a compaction: at least `min`, and on the
    /// leader what lagging followers still lack up to `max`.
    pub fn set_log_retention(&self, min: u64, max: u64) {
        self.retention.set((min, max.max(min)));
    }

    /// A snapshot message: fetch the file it names, verify it, reset the log and the state to
    /// it, and only then step the message into raft. One install at a time; raft resends.
    fn receive_snapshot(self: &Rc<Self>, m: Message) {
        if self.installing.get() || self.compacting.get() || self.failed().is_some() {
            return;
        }
        let Some((source, dir, mac)) = self
            .snapshots
            .borrow()
            .as_ref()
            .map(|s| (s.source.clone(), s.dir.clone(), s.mac.clone()))
        else {
            tracing::warn!("snapshot message dropped: this replica fetches no snapshots");
            return;
        };
        let desc = match SnapshotDescriptor::decode(m.get_snapshot().get_data()) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, from = m.from, "snapshot message refused");
                return;
            }
        };
        let meta = m.get_snapshot().get_metadata();
        let shard = self.core.borrow().shard();
        if desc.lsn != meta.index || desc.term != meta.term || desc.shard != shard {
            tracing::warn!(
                from = m.from,
                "snapshot descriptor disagrees with its message"
            );
            return;
        }
        if !self.snapshot_wanted(&m, &desc) {
            // Stale, or our log already holds it: raft decides (it fast-forwards or ignores).
            let _ = self.core.borrow_mut().step(m);
            self.pump();
            return;
        }
        self.installing.set(true);
        let me = self.clone();
        glommio::spawn_local(async move {
            let r = me.fetch_snapshot(&*source, &dir, &*mac, &m, &desc).await;
            me.installing.set(false);
            match r {
                Ok(file) => {
                    // raft restores it into its unstable log; the Ready that follows is held
                    // until `install_held_snapshot` reset the log and the state to it.
                    *me.verified.borrow_mut() = Some(file);
                    let _ = me.core.borrow_mut().step(m);
                    me.pump();
                }
                Err(e) => {
                    tracing::warn!(error = %e, lsn = desc.lsn, "snapshot fetch failed; raft will resend")
                }
            }
        })
        .detach();
    }

    /// Whether `m` asks for a snapshot this replica must install: from a current leader, past
    /// everything this replica knows committed, and not already in its log.
    fn snapshot_wanted(&self, m: &Message, desc: &SnapshotDescriptor) -> bool {
        let c = self.core.borrow();
        let known = raft::Storage::term(c.store(), desc.lsn).ok() == Some(desc.term);
        m.term >= c.term() && desc.lsn > c.commit_index() && !known
    }

    /// Fetches the file `desc` names into the snapshot directory and verifies it (every check,
    /// then the footer MAC in the card) and that it is the file the descriptor names.
    async fn fetch_snapshot(
        self: &Rc<Self>,
        source: &dyn SnapshotSource,
        dir: &std::path::Path,
        mac: &dyn crate::snapshot::FooterMac,
        m: &Message,
        desc: &SnapshotDescriptor,
    ) -> Result<crate::snapshot::Snapshot, String> {
        use crate::snapshot as snap;
        let dest = dir.join(snap::file_name(desc.lsn));
        let tmp = dir.join(format!("{}.fetch", snap::file_name(desc.lsn)));
        let t = std::time::Instant::now();
        source.fetch(m.from, desc, &tmp).await?;
        let fetched = t.elapsed();
        // Renamed before it is verified: a crash in between leaves a file recovery verifies
        // (and skips when bad) like any other; a failed verification removes it.
        let (t, d, dd) = (tmp, dest.clone(), dir.to_path_buf());
        crate::exec::spawn_background_blocking(move || {
            std::fs::rename(&t, &d)?;
            crate::wbl::segment::sync_dir(&dd)
        })
        .await
        .map_err(|e| e.to_string())?;
        let t = std::time::Instant::now();
        let checked = super::snapshot::verify_fetched(&dest, desc, mac).await;
        if checked.is_err() {
            let _ = std::fs::remove_file(&dest);
        } else {
            self.last_fetch.set(Some((fetched, t.elapsed())));
        }
        checked
    }

    /// The last snapshot this replica fetched from a peer and verified: (transfer, verify).
    pub fn last_snapshot_fetch(&self) -> Option<(Duration, Duration)> {
        self.last_fetch.get()
    }

    /// raft restored a snapshot: reset the log to start after it and serve the state from the
    /// verified file, then let the core finish the held Ready.
    fn install_held_snapshot(self: &Rc<Self>) {
        let Some((index, term, cs)) = self.core.borrow().snapshot_to_install() else {
            return;
        };
        if self.installing.replace(true) {
            return;
        }
        let file = self.verified.borrow_mut().take();
        let me = self.clone();
        glommio::spawn_local(async move {
            let r: Result<(), String> = async {
                let file = file
                    .filter(|f| f.lsn() == index && f.footer().term == term)
                    .ok_or_else(|| {
                        format!("raft restored snapshot {index} that was not fetched")
                    })?;
                let chain = file.footer().chain_head;
                let shard = me.core.borrow().shard();
                let desc = SnapshotDescriptor::of(shard, &file);
                let wbl = me.core.borrow().store().wbl().clone();
                wbl.reset_to(index + 1, chain, term)
                    .await
                    .map_err(|e| e.to_string())?;
                let state = crate::state::StateMachine::from_snapshot(std::sync::Arc::new(file));
                let mut c = me.core.borrow_mut();
                c.replace_state(state);
                let store = c.store_mut();
                store.installed(index, term, cs.clone());
                store.set_snapshot(desc, cs);
                Ok(())
            }
            .await;
            me.installing.set(false);
            match r {
                Ok(()) => {
                    tracing::info!(lsn = index, "snapshot installed");
                    let msgs = me.core.borrow_mut().resume_after_install();
                    match msgs {
                        Ok(msgs) => {
                            let shard = me.core.borrow().shard();
                            if !msgs.is_empty() {
                                me.transport.send(shard, msgs);
                            }
                            me.pump();
                        }
                        Err(e) => me.fail(&e),
                    }
                }
                Err(e) => me.fail(&format!("snapshot install at {index}: {e}")),
            }
        })
        .detach();
    }

    /// Stops the replica (waiters get `Stopped`) and closes its log.
    pub async fn close(&self) -> Result<(), crate::wbl::WblError> {
        self.fail(&"closed");
        let wbl = self.core.borrow().store().wbl().clone();
        wbl.close().await
    }

    /// Read access to the core (status, state machine).
    pub fn with_core<R>(&self, f: impl FnOnce(&ShardCore<WblStore>) -> R) -> R {
        f(&self.core.borrow())
    }

    pub fn take_events(&self) -> Vec<Event> {
        std::mem::take(&mut self.events.borrow_mut())
    }

    pub fn failed(&self) -> Option<String> {
        self.failed.borrow().clone()
    }

    /// A message from a peer.
    pub fn step(self: &Rc<Self>, m: Message) {
        if m.get_msg_type() == MessageType::MsgSnapshot {
            self.receive_snapshot(m);
            return;
        }
        // raft refuses stale and foreign messages itself; those errors are not failures.
        let _ = self.core.borrow_mut().step(m);
        self.pump();
    }

    /// One tick of the raft clock.
    pub fn tick(self: &Rc<Self>) {
        self.core.borrow_mut().tick();
        self.retry_stale_reads();
        self.expire_forwarded();
        self.pump();
    }

    pub fn campaign(self: &Rc<Self>) -> Result<(), ReplicaError> {
        self.core
            .borrow_mut()
            .campaign()
            .map_err(|e| ReplicaError::Stopped(e.to_string()))?;
        self.pump();
        Ok(())
    }

    /// Ticks every `interval` until the replica stops; a tick later than [`LATE_TICK`] past
    /// its interval is counted in [`Stalls`].
    pub async fn run_ticker(self: Rc<Self>, interval: Duration) {
        let mut last = std::time::Instant::now();
        while self.failed().is_none() {
            glommio::timer::sleep(interval).await;
            let gap = last.elapsed();
            last = std::time::Instant::now();
            self.note_tick_gap(interval, gap);
            self.tick();
        }
    }

    /// Slow disk writes and late ticks so far.
    pub fn stalls(&self) -> Stalls {
        self.stalls.get()
    }

    fn note_tick_gap(&self, interval: Duration, gap: Duration) {
        let late = self.record_stall(1, |s| {
            s.worst_tick_gap = s.worst_tick_gap.max(gap);
            let late = gap > interval + LATE_TICK;
            s.late_ticks += u64::from(late);
            late
        });
        if let Some((shard, node, s)) = late {
            tracing::warn!(
                shard,
                node,
                gap_ms = gap.as_millis() as u64,
                interval_ms = interval.as_millis() as u64,
                late_ticks = s.late_ticks,
                "raft tick late: the executor did not run meanwhile (CPU starved or blocked)"
            );
        }
    }

    fn note_persist(&self, took: Duration) {
        let slow = self.record_stall(0, |s| {
            s.worst_persist = s.worst_persist.max(took);
            let slow = took > SLOW_PERSIST;
            s.slow_persists += u64::from(slow);
            slow
        });
        if let Some((shard, node, s)) = slow {
            tracing::warn!(
                shard,
                node,
                took_ms = took.as_millis() as u64,
                slow_persists = s.slow_persists,
                "slow durable write of the raft log (append answers and commits waited)"
            );
        }
    }

    /// Updates the [`Stalls`] with `f`, which says whether this was a stall of warning `kind`;
    /// returns (shard, node, the counters) when that warning is due (at most one per kind per
    /// [`STALL_WARN_EVERY`]).
    fn record_stall(
        &self,
        kind: usize,
        f: impl FnOnce(&mut Stalls) -> bool,
    ) -> Option<(u32, u64, Stalls)> {
        let mut s = self.stalls.get();
        let stalled = f(&mut s);
        self.stalls.set(s);
        let mut w = self.stall_warned.get();
        let now = std::time::Instant::now();
        if !stalled || w[kind].is_some_and(|t| now.duration_since(t) < STALL_WARN_EVERY) {
            return None;
        }
        w[kind] = Some(now);
        self.stall_warned.set(w);
        let c = self.core.borrow();
        Some((c.shard(), c.id(), s))
    }

    /// Proposes a state-machine record on the leader and waits until it is applied here.
    pub async fn propose(
        self: &Rc<Self>,
        kind: RecordKind,
        payload: &[u8],
    ) -> Result<Committed, ReplicaError> {
        let mut at = (0, 0);
        let slot = self.submit(|c| {
            at = c.propose(kind, payload)?;
            Ok(at)
        })?;
        match slot.await? {
            Applied::Record(result) => Ok(Committed {
                index: at.0,
                term: at.1,
                result,
            }),
            Applied::Conf(_) => Err(ReplicaError::Lost),
        }
    }

    /// Proposes from any replica: on the leader as [`Self::propose`], on a follower forwarded
    /// to the leader and recognized when applied here (by its data); a forwarded proposal not
    /// applied within [`FORWARD_TIMEOUT`] fails with `ForwardTimeout` (it may still commit:
    /// idempotency ids make the retry safe).
    pub async fn propose_anywhere(
        self: &Rc<Self>,
        kind: RecordKind,
        payload: &[u8],
    ) -> Result<Committed, ReplicaError> {
        if self.with_core(|c| c.is_leader()) {
            return self.propose(kind, payload).await;
        }
        self.check_failed()?;
        let pending: usize = self.forwarded.borrow().values().map(Vec::len).sum();
        if pending >= MAX_PENDING_PROPOSALS {
            return Err(ReplicaError::Busy {
                max: MAX_PENDING_PROPOSALS,
            });
        }
        let hash = self.core.borrow_mut().propose_anywhere(kind, payload)?;
        let slot = Slot::new();
        self.forwarded
            .borrow_mut()
            .entry(hash)
            .or_default()
            .push((std::time::Instant::now(), slot.clone()));
        self.pump();
        slot.await
    }

    fn expire_forwarded(&self) {
        self.forwarded.borrow_mut().retain(|_, v| {
            v.retain(|(t, s)| {
                let expired = t.elapsed() >= FORWARD_TIMEOUT;
                if expired {
                    s.set(Err(ReplicaError::ForwardTimeout(FORWARD_TIMEOUT)));
                }
                !expired
            });
            !v.is_empty()
        });
    }

    /// Proposes a membership change and waits until it is applied here.
    pub async fn propose_conf_change(
        self: &Rc<Self>,
        cc: ConfChangeV2,
    ) -> Result<ConfState, ReplicaError> {
        match self.submit(|c| c.propose_conf_change(cc))?.await? {
            Applied::Conf(cs) => Ok(cs),
            Applied::Record(_) => Err(ReplicaError::Lost),
        }
    }

    /// Proposes a membership change from any replica, forwarded to the leader and not tracked
    /// (see `ShardCore::propose_conf_change_anywhere`): callers watch the conf state.
    pub fn propose_conf_change_anywhere(
        self: &Rc<Self>,
        cc: ConfChangeV2,
    ) -> Result<(), ReplicaError> {
        self.check_failed()?;
        self.core.borrow_mut().propose_conf_change_anywhere(cc)?;
        self.pump();
        Ok(())
    }

    /// A linearizable read point: resolves with an index once this replica applied through it.
    pub async fn read_index(self: &Rc<Self>) -> Result<u64, ReplicaError> {
        self.check_failed()?;
        let pending = self.read_batch.borrow().len()
            + self
                .reads
                .borrow()
                .values()
                .map(|r| r.1.len())
                .sum::<usize>();
        if pending >= MAX_PENDING_READS {
            return Err(ReplicaError::Busy {
                max: MAX_PENDING_READS,
            });
        }
        let slot = Slot::new();
        self.read_batch.borrow_mut().push(slot.clone());
        if self.reads.borrow().is_empty() {
            self.start_read_round();
            self.pump();
        }
        slot.await
    }

    /// ReadIndex rounds started so far (each serves every read batched into it).
    pub fn read_rounds(&self) -> u64 {
        self.read_rounds.get()
    }

    /// Starts one ReadIndex round for every read batched so far (no pump: callers pump).
    fn start_read_round(&self) {
        let batch = std::mem::take(&mut *self.read_batch.borrow_mut());
        if batch.is_empty() {
            return;
        }
        let seq = self.read_seq.get() + 1;
        self.read_seq.set(seq);
        let ctx = seq.to_le_bytes().to_vec();
        self.reads
            .borrow_mut()
            .insert(ctx.clone(), (std::time::Instant::now(), batch));
        self.read_rounds.set(self.read_rounds.get() + 1);
        self.core.borrow_mut().read_index(ctx);
    }

    /// A round raft dropped (no leader, leadership moved) is retried with the next one.
    fn retry_stale_reads(&self) {
        let stale: Vec<Vec<u8>> = self
            .reads
            .borrow()
            .iter()
            .filter(|(_, (t, _))| t.elapsed() >= READ_ROUND_RETRY)
            .map(|(ctx, _)| ctx.clone())
            .collect();
        if stale.is_empty() {
            return;
        }
        for ctx in stale {
            if let Some((_, slots)) = self.reads.borrow_mut().remove(&ctx) {
                self.read_batch.borrow_mut().extend(slots);
            }
        }
        if self.reads.borrow().is_empty() {
            self.start_read_round();
        }
    }

    fn submit(
        self: &Rc<Self>,
        f: impl FnOnce(&mut ShardCore<WblStore>) -> Result<(u64, u64), ProposeError>,
    ) -> Result<ProposalSlot, ReplicaError> {
        self.check_failed()?;
        if self.proposals.borrow().len() >= MAX_PENDING_PROPOSALS {
            return Err(ReplicaError::Busy {
                max: MAX_PENDING_PROPOSALS,
            });
        }
        let (index, term) = f(&mut self.core.borrow_mut())?;
        let slot = Slot::new();
        if let Some((_, old)) = self
            .proposals
            .borrow_mut()
            .insert(index, (term, slot.clone()))
        {
            old.set(Err(ReplicaError::Lost));
        }
        self.pump();
        Ok(slot)
    }

    fn check_failed(&self) -> Result<(), ReplicaError> {
        match self.failed() {
            Some(e) => Err(ReplicaError::Stopped(e)),
            None => Ok(()),
        }
    }

    fn fail(&self, e: &dyn std::fmt::Display) {
        let msg = e.to_string();
        tracing::error!(error = %msg, "shard replica stopped");
        *self.failed.borrow_mut() = Some(msg.clone());
        for (_, (_, s)) in std::mem::take(&mut *self.proposals.borrow_mut()) {
            s.set(Err(ReplicaError::Stopped(msg.clone())));
        }
        for (_, (_, slots)) in std::mem::take(&mut *self.reads.borrow_mut()) {
            for s in slots {
                s.set(Err(ReplicaError::Stopped(msg.clone())));
            }
        }
        for s in std::mem::take(&mut *self.read_batch.borrow_mut()) {
            s.set(Err(ReplicaError::Stopped(msg.clone())));
        }
        for (_, v) in std::mem::take(&mut *self.forwarded.borrow_mut()) {
            for (_, s) in v {
                s.set(Err(ReplicaError::Stopped(msg.clone())));
            }
        }
        for (_, s) in std::mem::take(&mut *self.read_waits.borrow_mut()) {
            s.set(Err(ReplicaError::Stopped(msg.clone())));
        }
    }

    /// Handles every ready, sends, resolves waiters, and starts the persistence and fetch
    /// tasks when there is work for them.
    pub fn pump(self: &Rc<Self>) {
        if self.failed.borrow().is_some() {
            return;
        }
        loop {
            let r = self.core.borrow_mut().process_ready();
            match r {
                Ok(Some(msgs)) => {
                    let shard = self.core.borrow().shard();
                    if !msgs.is_empty() {
                        self.transport.send(shard, msgs);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.fail(&e);
                    return;
                }
            }
            self.handle_events();
        }
        self.handle_events();
        self.install_held_snapshot();
        self.start_persisting();
        self.start_fetching();
    }

    fn handle_events(&self) {
        let events = self.core.borrow_mut().take_events();
        for ev in &events {
            match ev {
                Event::Applied {
                    index,
                    term,
                    result,
                    data_hash,
                    ..
                } => {
                    self.resolve(*index, *term, Applied::Record(*result));
                    let waiting = self.forwarded.borrow_mut().remove(data_hash);
                    for (_, slot) in waiting.unwrap_or_default() {
                        slot.set(Ok(Committed {
                            index: *index,
                            term: *term,
                            result: *result,
                        }));
                    }
                }
                Event::ConfChanged { index, term, conf } => {
                    self.resolve(*index, *term, Applied::Conf(conf.clone()))
                }
                Event::ReadIndex { ctx, index } => {
                    let round = self.reads.borrow_mut().remove(ctx);
                    if let Some((_, slots)) = round {
                        let mut w = self.read_waits.borrow_mut();
                        w.extend(slots.into_iter().map(|s| (*index, s)));
                    }
                    if self.reads.borrow().is_empty() {
                        self.start_read_round();
                    }
                }
                _ => {}
            }
        }
        let applied = self.core.borrow().applied();
        self.read_waits.borrow_mut().retain(|(i, s)| {
            if *i <= applied {
                s.set(Ok(*i));
                false
            } else {
                true
            }
        });
        if self.keep_events {
            self.events.borrow_mut().extend(events);
        }
    }

    fn resolve(&self, index: u64, term: u64, v: Applied) {
        let mut p = self.proposals.borrow_mut();
        while let Some(entry) = p.first_entry() {
            if *entry.key() > index {
                break;
            }
            let (i, (t, slot)) = entry.remove_entry();
            if i == index && t == term {
                slot.set(Ok(v.clone()));
            } else {
                slot.set(Err(ReplicaError::Lost));
            }
        }
    }

    fn start_persisting(self: &Rc<Self>) {
        if self.persisting.get() {
            return;
        }
        let Some(first) = self.core.borrow_mut().store_mut().take_pending() else {
            return;
        };
        self.persisting.set(true);
        let me = self.clone();
        glommio::spawn_local(async move {
            let mut next = Some(first);
            while let Some((number, durable)) = next {
                let t = std::time::Instant::now();
                if let Err(e) = durable.await {
                    me.fail(&e);
                    break;
                }
                me.note_persist(t.elapsed());
                let msgs = me.core.borrow_mut().on_persisted(number);
                if !msgs.is_empty() {
                    let shard = me.core.borrow().shard();
                    me.transport.send(shard, msgs);
                }
                // `pump` leaves new pending writes to this loop (`persisting` is set).
                me.pump();
                next = me.core.borrow_mut().store_mut().take_pending();
            }
            me.persisting.set(false);
        })
        .detach();
    }

    fn start_fetching(self: &Rc<Self>) {
        let reqs = self.core.borrow_mut().store_mut().take_fetch_requests();
        for (low, high, ctx) in reqs {
            let me = self.clone();
            let wbl = self.core.borrow().store().wbl().clone();
            glommio::spawn_local(async move {
                match WblStore::fetch(&wbl, low, high).await {
                    Ok(es) => {
                        me.core.borrow_mut().store_mut().add_fetched(es);
                        me.core.borrow_mut().on_entries_fetched(ctx);
                        me.pump();
                    }
                    Err(e) => me.fail(&CoreError::Store(e)),
                }
            })
            .detach();
        }
    }
}
