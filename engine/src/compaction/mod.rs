//! Rolling compaction of one shard: previous snapshot + the WBL records since its LSN → a new
//! snapshot at the target LSN. It rebuilds from files and never touches the live state, so the
//! foreground keeps applying while it runs in the background task queue ("no global pause").
//! The WBL is then released only below the *previous* snapshot's LSN, so a bad newest snapshot
//! can still fall back to the previous one plus the log.
//!
//! Known limit: the snapshot file itself is written with blocking `std::fs` calls from the
//! executor thread (tens of ms per 64 MiB here); moving the write to DMA files or a blocking
//! pool is a later step.

use crate::recovery::{newest_usable, replay, RecoveryError, Skipped};
use crate::snapshot::{self, FooterMac, SnapshotMeta, WriteOptions};
use crate::wbl::Wbl;
use std::path::{Path, PathBuf};
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

#[derive(Debug)]
pub struct CompactionReport {
    pub path: PathBuf,
    pub lsn: u64,
    /// LSN of the snapshot compacted from (0: the empty state).
    pub lsn_previous: u64,
    pub records_applied: u64,
    /// First LSN of the log after the release.
    pub wbl_first_lsn: u64,
    pub snapshots_removed: Vec<PathBuf>,
    pub skipped: Vec<Skipped>,
    pub duration: Duration,
}

/// Compacts into `dir` up to `lsn_target` (≤ the durable log; with raft, the applied LSN).
/// `voters`/`learners` are raft's ConfState at that LSN.
pub async fn compact(
    dir: &Path,
    wbl: &Wbl,
    lsn_target: u64,
    voters: Vec<u64>,
    learners: Vec<u64>,
    mac: &dyn FooterMac,
    cfg: &CompactionConfig,
) -> Result<CompactionReport, RecoveryError> {
    let t = Instant::now();
    if lsn_target > wbl.durable_lsn() {
        return Err(RecoveryError::Invalid(format!(
            "compaction target {lsn_target} is beyond the durable log ({})",
            wbl.durable_lsn()
        )));
    }
    let base = newest_usable(dir, wbl, mac, cfg.idempotency_window_lsns)?;
    let mut state = base.state;
    let lsn_previous = state.lsn_applied();
    if lsn_target < lsn_previous {
        return Err(RecoveryError::Invalid(format!(
            "compaction target {lsn_target} is below the newest snapshot {lsn_previous}"
        )));
    }
    let records_applied = replay(wbl, &mut state, lsn_target).await?;
    let term = wbl.term(lsn_target).unwrap_or(0);
    let chain_head = wbl.chain_at(lsn_target).ok_or_else(|| {
        RecoveryError::Invalid(format!("the log no longer holds lsn {lsn_target}"))
    })?;
    let meta = SnapshotMeta {
        lsn: lsn_target,
        term,
        chain_head,
        voters,
        learners,
    };
    let path = snapshot::write_with(dir, &state, &meta, mac, &cfg.write)?;
    // Below the previous snapshot only: falling back to it needs the log after its LSN.
    let wbl_first_lsn = if lsn_previous > 0 {
        wbl.release_prefix(lsn_previous).await?
    } else {
        wbl.first_lsn()
    };
    let snapshots_removed = remove_old(dir)?;
    tracing::info!(
        file = %path.display(),
        lsn = lsn_target,
        lsn_previous,
        records_applied,
        wbl_first_lsn,
        "compaction"
    );
    Ok(CompactionReport {
        path,
        lsn: lsn_target,
        lsn_previous,
        records_applied,
        wbl_first_lsn,
        snapshots_removed,
        skipped: base.skipped,
        duration: t.elapsed(),
    })
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
