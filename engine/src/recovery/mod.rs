//! Local recovery: the newest snapshot that verifies (else the previous one, and so on) plus the
//! WBL after its LSN up to the persisted commit. Entries above the commit stay in the log for raft
//! to confirm or truncate. The peer and durable tiers are later issues.

use crate::snapshot::{self, FooterMac, Snapshot, SnapshotError};
use crate::state::StateMachine;
use crate::wbl::{RecordKind, Wbl, WblError, WblOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Records applied between two cooperative yields while replaying or compacting, so a long
/// replay in a background queue does not starve the foreground queue of its executor.
pub const APPLY_YIELD_RECORDS: u64 = 64;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Wbl(#[from] WblError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// No snapshot verifies and the log does not start at LSN 1: the state cannot be rebuilt
    /// locally (the peer tier takes over).
    #[error(
        "no usable snapshot in {dir} and the log starts at lsn {first_lsn}; skipped: {skipped}"
    )]
    NoUsableState {
        dir: PathBuf,
        first_lsn: u64,
        skipped: String,
    },
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// A snapshot that was not used, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// The base a state is rebuilt from: a verified snapshot, or the empty state when the log still
/// starts at LSN 1.
pub struct Base {
    pub state: StateMachine,
    /// `None`: the empty state.
    pub snapshot: Option<PathBuf>,
    /// Newer snapshots that failed a check, newest first.
    pub skipped: Vec<Skipped>,
}

/// Opens the newest snapshot in `dir` that verifies (MAC, blocks, chain, digest) and that the
/// log continues: the log holds the chain at its LSN (`wbl.chain_at`) and it equals the footer's
/// chain head. Older ones are tried in turn; with none, the empty state if the log starts at 1.
pub fn newest_usable(
    dir: &Path,
    wbl: &Wbl,
    mac: &dyn FooterMac,
    window_lsns: u64,
) -> Result<Base, RecoveryError> {
    newest_usable_with(dir, wbl, mac, window_lsns, None)
}

/// A snapshot file opened ahead (every check but the MAC), with the path it came from.
type Preopened = (PathBuf, Result<Snapshot, SnapshotError>);

fn newest_usable_with(
    dir: &Path,
    wbl: &Wbl,
    mac: &dyn FooterMac,
    window_lsns: u64,
    mut pre: Option<Preopened>,
) -> Result<Base, RecoveryError> {
    let mut skipped = Vec::new();
    for (lsn, path) in snapshot::list(dir)?.into_iter().rev() {
        let opened = match pre.take() {
            Some((p, r)) if p == path => r.and_then(|mut s| s.verify_mac(mac).map(|()| s)),
            _ => Snapshot::open(&path, mac),
        };
        let reason = match opened {
            Err(e) => e.to_string(),
            Ok(snap) => match wbl.chain_at(lsn) {
                Some(c) if c == snap.footer().chain_head => {
                    return Ok(Base {
                        state: StateMachine::from_snapshot(Arc::new(snap)),
                        snapshot: Some(path),
                        skipped,
                    })
                }
                Some(c) => format!(
                    "footer chain head {:016x} differs from the log's {c:016x} at lsn {lsn}",
                    snap.footer().chain_head
                ),
                None => format!(
                    "the log ({}..={}) does not continue lsn {lsn}",
                    wbl.first_lsn(),
                    wbl.last_lsn()
                ),
            },
        };
        tracing::warn!(file = %path.display(), %reason, "snapshot skipped");
        skipped.push(Skipped { path, reason });
    }
    if wbl.first_lsn() > 1 {
        return Err(RecoveryError::NoUsableState {
            dir: dir.to_path_buf(),
            first_lsn: wbl.first_lsn(),
            skipped: skipped
                .iter()
                .map(|s| format!("{}: {}", s.path.display(), s.reason))
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    Ok(Base {
        state: StateMachine::with_idempotency_window(window_lsns),
        snapshot: None,
        skipped,
    })
}

/// Applies the durable records `(state.lsn_applied(), to]` of `wbl` to `state`; returns how many.
/// The log re-verifies every record (crc, and chain against its index, whose chain at the base
/// LSN the caller compared with the snapshot footer), so the replayed chain continues it.
pub async fn replay(wbl: &Wbl, state: &mut StateMachine, to: u64) -> Result<u64, RecoveryError> {
    replay_collecting(wbl, state, to, &mut Vec::new()).await
}

/// A membership change met while replaying: its LSN, kind (`RaftConfChange` or
/// `RaftConfChangeV2`) and payload, for the raft layer to rebuild the membership.
pub type ConfRecord = (u64, RecordKind, Vec<u8>);

/// [`replay`], also collecting the membership changes it passes.
pub async fn replay_collecting(
    wbl: &Wbl,
    state: &mut StateMachine,
    to: u64,
    conf: &mut Vec<ConfRecord>,
) -> Result<u64, RecoveryError> {
    let mut n = 0;
    let mut reader = wbl.reader(state.lsn_applied() + 1);
    while state.lsn_applied() < to {
        let Some(r) = reader.next().await else {
            return Err(RecoveryError::Invalid(format!(
                "the durable log ends at {} before lsn {to}",
                state.lsn_applied()
            )));
        };
        let r = r?;
        state.apply(r.lsn, r.kind, &r.payload)?;
        if matches!(
            r.kind,
            RecordKind::RaftConfChange | RecordKind::RaftConfChangeV2
        ) {
            conf.push((r.lsn, r.kind, r.payload));
        }
        n += 1;
        if n % APPLY_YIELD_RECORDS == 0 {
            glommio::yield_if_needed().await;
        }
    }
    Ok(n)
}

/// What local recovery did: the path taken and each phase's duration.
#[derive(Debug)]
pub struct LocalRecovery {
    pub state: StateMachine,
    /// The snapshot used; `None` = rebuilt from the empty state.
    pub snapshot: Option<PathBuf>,
    pub skipped: Vec<Skipped>,
    pub lsn_snapshot: u64,
    /// The raft term at `lsn_snapshot` (0 without a snapshot).
    pub snapshot_term: u64,
    /// The membership in the snapshot footer (empty without a snapshot).
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Membership changes replayed after the snapshot, in log order.
    pub conf_changes: Vec<ConfRecord>,
    pub records_replayed: u64,
    /// Finding, verifying and loading the snapshot.
    pub open_duration: Duration,
    pub replay_duration: Duration,
}

/// Local recovery of one shard whose log `wbl` is open: base from [`newest_usable`], then the log
/// up to its persisted commit.
pub async fn recover_local(
    snapshot_dir: &Path,
    wbl: &Wbl,
    mac: &dyn FooterMac,
    window_lsns: u64,
) -> Result<LocalRecovery, RecoveryError> {
    let t = Instant::now();
    let base = newest_usable(snapshot_dir, wbl, mac, window_lsns)?;
    replay_to_commit(wbl, base, t.elapsed()).await
}

/// Applies the log after `base` up to the persisted commit, logs the path taken and reports.
async fn replay_to_commit(
    wbl: &Wbl,
    base: Base,
    open_duration: Duration,
) -> Result<LocalRecovery, RecoveryError> {
    let mut state = base.state;
    let lsn_snapshot = state.lsn_applied();
    let commit = wbl.hard_state().commit;
    let t = Instant::now();
    let mut conf_changes = Vec::new();
    let records_replayed = replay_collecting(wbl, &mut state, commit, &mut conf_changes).await?;
    let replay_duration = t.elapsed();
    let snapshot = base.snapshot;
    tracing::info!(
        path = match &snapshot {
            Some(p) => p.display().to_string(),
            None => "empty state".into(),
        },
        skipped = base.skipped.len(),
        lsn_snapshot,
        lsn_applied = state.lsn_applied(),
        records_replayed,
        open_ms = open_duration.as_secs_f64() * 1e3,
        replay_ms = replay_duration.as_secs_f64() * 1e3,
        "local recovery"
    );
    let (snapshot_term, voters, learners) = match state.base() {
        Some(b) => {
            let f = b.footer();
            (f.term, f.voters.clone(), f.learners.clone())
        }
        None => (0, Vec::new(), Vec::new()),
    };
    Ok(LocalRecovery {
        state,
        snapshot,
        snapshot_term,
        voters,
        learners,
        conf_changes,
        skipped: base.skipped,
        lsn_snapshot,
        records_replayed,
        open_duration,
        replay_duration,
    })
}

/// What [`open_and_recover`] did: the log's own recovery, the state's, and how long the start
/// took in all.
pub struct Start {
    pub wbl: Wbl,
    pub wbl_report: crate::wbl::RecoveryReport,
    /// Scanning and verifying the log (`Wbl::open`), the snapshot verifying meanwhile.
    pub wbl_open_duration: Duration,
    pub local: LocalRecovery,
    pub duration: Duration,
}

/// A shard's start: opens its log and recovers its state, verifying the newest snapshot file on
/// the blocking pool while the log is scanned on the executor (the two longest phases overlap;
/// the MAC is checked on the core afterwards). Falls back exactly as [`recover_local`].
pub async fn open_and_recover(
    snapshot_dir: &Path,
    wbl_dir: &Path,
    wbl_opts: WblOptions,
    mac: &dyn FooterMac,
    window_lsns: u64,
) -> Result<Start, RecoveryError> {
    let t0 = Instant::now();
    let pending = snapshot::list(snapshot_dir)?.pop().map(|(_, path)| {
        let p = path.clone();
        let task = glommio::executor().spawn_blocking(move || Snapshot::open_without_mac(&p));
        (path, task)
    });
    let opened = Wbl::open(wbl_dir, wbl_opts).await;
    let wbl_open_duration = t0.elapsed();
    // From here: waiting for the snapshot verification still running, then the MAC and the
    // chain check.
    let t = Instant::now();
    // Always collect the blocking open, even when the log failed to open.
    let pre = match pending {
        Some((path, task)) => Some((path, task.await)),
        None => None,
    };
    let (wbl, wbl_report) = opened?;
    let base = newest_usable_with(snapshot_dir, &wbl, mac, window_lsns, pre)?;
    let open_duration = t.elapsed();
    let local = replay_to_commit(&wbl, base, open_duration).await?;
    Ok(Start {
        wbl,
        wbl_report,
        wbl_open_duration,
        local,
        duration: t0.elapsed(),
    })
}
