//! Rolling compaction of one shard: the base snapshot + the memtable frozen at the applied LSN →
//! a new snapshot at that LSN, which then becomes the base. Freezing is O(1) and the merge, the
//! write and the verifying re-open run on glommio's blocking thread pool, so the foreground keeps
//! applying into a fresh memtable meanwhile ("no global pause"); only the footer MAC (one card
//! op) and the swap run on the executor. The WBL is then released only below the *previous*
//! snapshot's LSN, so a bad newest snapshot can still fall back to the previous one plus the log.

use crate::exec::spawn_background_blocking;
use crate::recovery::RecoveryError;
use crate::snapshot::{self, FooterMac, Snapshot, SnapshotError, SnapshotMeta, WriteOptions};
use crate::state::StateMachine;
use crate::wbl::Wbl;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Records since the last snapshot that make a compaction due. At ~200 B per record, 1 Mi records
/// ≈ 200 MiB of log: replay after a crash stays around a second.
pub const COMPACTION_RECORDS_THRESHOLD: u64 = 1 << 20;
/// Snapshot files kept per shard: the newest and the previous one (its fallback).
pub const SNAPSHOTS_KEPT: usize = 2;

/// When and how to compact; the default is production's.
#[derive(Clone, Debug)]
pub struct CompactionConfig {
    pub records_threshold: u64,
    pub write: WriteOptions,
    /// Idempotency window of an empty base state (a snapshot carries its own).
    pub idempotency_window_lsns: u64,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        CompactionConfig {
            records_threshold: COMPACTION_RECORDS_THRESHOLD,
            write: WriteOptions::default(),
            idempotency_window_lsns: crate::state::IDEMPOTENCY_WINDOW_LSNS,
        }
    }
}

/// Whether the log since the last snapshot passed the threshold.
pub fn compaction_due(lsn_applied: u64, lsn_snapshot: u64, cfg: &CompactionConfig) -> bool {
    lsn_applied.saturating_sub(lsn_snapshot) >= cfg.records_threshold
}

/// What the caller knows beyond the state: raft's ConfState at the applied LSN, and the lowest
/// LSN another holder (archive watermark, a lagging follower) still needs from the log.
#[derive(Clone, Debug, Default)]
pub struct CompactionContext {
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// `None`: no holder but the previous snapshot.
    pub retain_from: Option<u64>,
}

#[derive(Debug)]
pub struct CompactionReport {
    pub path: PathBuf,
    pub lsn: u64,
    /// LSN of the snapshot compacted from (0: the empty state).
    pub lsn_previous: u64,
    /// Key versions (live or deleted) the frozen memtable held.
    pub memtable_key_versions: u64,
    pub file_bytes: u64,
    /// First LSN of the log after the release.
    pub wbl_first_lsn: u64,
    pub snapshots_removed: Vec<PathBuf>,
    /// Merge and write of the file (blocking pool).
    pub write_duration: Duration,
    /// Verifying re-open of the new file (blocking pool).
    pub verify_duration: Duration,
    pub duration: Duration,
}

/// Compacts the shard `state` (applied from `wbl`) into `dir` at its applied LSN, then releases
/// the log below min(previous snapshot, `ctx.retain_from`). On failure the frozen memtable is put
/// back ([`StateMachine::thaw`]) and nothing changes on disk but a removed temporary file.
pub async fn compact(
    dir: &Path,
    state: &RefCell<StateMachine>,
    wbl: &Wbl,
    ctx: CompactionContext,
    mac: &dyn FooterMac,
    cfg: &CompactionConfig,
) -> Result<CompactionReport, RecoveryError> {
    let t = Instant::now();
    // LSN of the snapshot compacted from (0: the empty state).
    let lsn_previous = state.borrow().base().map_or(0, |b| b.lsn());
    if lsn_previous > 0 && state.borrow().lsn_applied() == lsn_previous {
        // A second file at the same LSN would replace the newest and leave no distinct
        // fallback, while the release below it would drop the log the previous one needs.
        return Err(RecoveryError::Invalid(format!(
            "nothing to compact: the newest snapshot is already at the applied lsn {lsn_previous}"
        )));
    }
    let frozen = state.borrow_mut().freeze()?;
    let lsn = frozen.lsn();
    let memtable_key_versions = frozen.memtable_key_versions() as u64;
    let retain_from = ctx.retain_from.unwrap_or(u64::MAX);
    let result = write_and_open(dir, frozen, wbl, ctx, mac, cfg).await;
    let (snap, write_duration, verify_duration) = match result {
        Ok(r) => r,
        Err(e) => {
            state.borrow_mut().thaw();
            return Err(e);
        }
    };
    let path = snap.path().to_path_buf();
    let file_bytes = snap.file_bytes();
    if let Err(e) = state.borrow_mut().install(Arc::new(snap)) {
        state.borrow_mut().thaw();
        return Err(e.into());
    }
    // Below the previous snapshot only: falling back to it needs the log after its LSN.
    let release_below = lsn_previous.min(retain_from);
    let wbl_first_lsn = if release_below > 1 {
        wbl.release_prefix(release_below).await?
    } else {
        wbl.first_lsn()
    };
    let d = dir.to_path_buf();
    let snapshots_removed = spawn_background_blocking(move || remove_old(&d)).await?;
    tracing::info!(
        file = %path.display(),
        lsn,
        lsn_previous,
        memtable_key_versions,
        file_bytes,
        wbl_first_lsn,
        write_ms = write_duration.as_secs_f64() * 1e3,
        verify_ms = verify_duration.as_secs_f64() * 1e3,
        "compaction"
    );
    Ok(CompactionReport {
        path,
        lsn,
        lsn_previous,
        memtable_key_versions,
        file_bytes,
        wbl_first_lsn,
        snapshots_removed,
        write_duration,
        verify_duration,
        duration: t.elapsed(),
    })
}

async fn write_and_open(
    dir: &Path,
    frozen: Arc<crate::state::Frozen>,
    wbl: &Wbl,
    ctx: CompactionContext,
    mac: &dyn FooterMac,
    cfg: &CompactionConfig,
) -> Result<(Snapshot, Duration, Duration), RecoveryError> {
    let lsn = frozen.lsn();
    let chain_head = wbl
        .chain_at(lsn)
        .ok_or_else(|| RecoveryError::Invalid(format!("the log no longer holds lsn {lsn}")))?;
    let meta = SnapshotMeta {
        lsn,
        term: wbl.term(lsn).unwrap_or(0),
        chain_head,
        voters: ctx.voters,
        learners: ctx.learners,
    };
    let t = Instant::now();
    let (d, opts) = (dir.to_path_buf(), cfg.write.clone());
    let pending =
        spawn_background_blocking(move || snapshot::begin(&d, &frozen.view(), &meta, &opts))
            .await?;
    let tag = mac
        .mac(pending.footer_body())
        .map_err(|e| SnapshotError::Card {
            file: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
    let path = spawn_background_blocking(move || pending.finish(&tag)).await?;
    let write_duration = t.elapsed();
    let t = Instant::now();
    let mut snap = spawn_background_blocking(move || Snapshot::open_without_mac(&path)).await?;
    snap.verify_mac(mac)?;
    Ok((snap, write_duration, t.elapsed()))
}

/// Removes all but the newest [`SNAPSHOTS_KEPT`] snapshot files.
fn remove_old(dir: &Path) -> Result<Vec<PathBuf>, RecoveryError> {
    let all = snapshot::list(dir)?;
    let old = all.len().saturating_sub(SNAPSHOTS_KEPT);
    let mut removed = Vec::new();
    for (_, path) in all.into_iter().take(old) {
        std::fs::remove_file(&path).map_err(|e| {
            RecoveryError::Snapshot(snapshot::SnapshotError::Io {
                file: path.clone(),
                reason: e.to_string(),
            })
        })?;
        removed.push(path);
    }
    Ok(removed)
}
