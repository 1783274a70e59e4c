//! The log archive (DESIGN.md "Rolling snapshots and the snapshot manager", docs/format.md
//! §9.3): while a node leads a shard, it uploads the shard's committed log to the durable store
//! in sealed ranges, so a restore after total loss reaches seconds behind the last commit, not
//! back to the newest snapshot.
//!
//! A range is sealed once it holds [`ARCHIVE_SEAL_BYTES`] of payload, or once its oldest record
//! has waited [`ARCHIVE_SEAL_INTERVAL`]; it is MACed in the card, uploaded with a conditional
//! create under a name carrying its hash, and then the leader proposes an `ArchiveMark` naming
//! its last LSN: the replicated watermark. Every replica applies it, and with the archive on a
//! replica releases its log only below the watermark (`Replica::gate_release_on_archive`), so a
//! new leader still holds what its predecessor had not archived; it resumes from the watermark.
//!
//! Marks are log records too: a range is sealed only when it holds a record other than marks and
//! raft no-ops, so an idle shard uploads nothing.
//!
//! The RPO this gives, reported per shard in `status.json` (`rpo_ms`): the age of the oldest
//! committed record not yet archived — bounded by the seal interval plus one upload while the
//! store answers.

use crate::durable::{DurableStore, PutOutcome};
use keyfort_engine::archive::{
    parse_range_object, range_object, range_prefix, ArchivedRecord, LogRange, ARCHIVE_RECORDS_MAX,
};
use keyfort_engine::raft::Replica;
use keyfort_engine::snapshot::FooterMac;
use keyfort_engine::state::Op;
use keyfort_engine::wbl::RecordKind;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// A range is sealed once it holds this many payload bytes.
pub const ARCHIVE_SEAL_BYTES: usize = 4 << 20;
/// ... or once its oldest record waited this long.
pub const ARCHIVE_SEAL_INTERVAL: Duration = Duration::from_millis(500);
/// How often the archiver looks at the commit index.
pub const ARCHIVE_POLL: Duration = Duration::from_millis(50);
/// Pause after a failed upload or mark before the next try.
pub const ARCHIVE_RETRY: Duration = Duration::from_millis(500);
/// Bytes of payload asked of the log per read while sealing a range.
const READ_BYTES: usize = 1 << 20;

/// One shard's archive progress, for `status.json`.
#[derive(Clone, Debug, Default)]
pub struct ArchiveStatus {
    /// The watermark this node's state applied.
    pub archived_lsn: u64,
    /// On the leader: since when committed records have been waiting to be archived.
    pub pending_since: Option<Instant>,
    pub ranges: u64,
    pub bytes: u64,
    pub error: Option<String>,
}

impl ArchiveStatus {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "archived_lsn": self.archived_lsn,
            "rpo_ms": self.pending_since.map_or(0, |t| t.elapsed().as_millis() as u64),
            "ranges": self.ranges,
            "bytes": self.bytes,
            "error": self.error,
        })
    }
}

/// Whether a record alone is worth a range: marks and no-ops are archived only along with data.
fn is_data(kind: RecordKind) -> bool {
    !matches!(kind, RecordKind::ArchiveMark | RecordKind::RaftNoop)
}

pub struct Archiver {
    pub cluster_id: [u8; 16],
    pub replica: Rc<Replica>,
    pub store: DurableStore,
    pub mac: Rc<dyn FooterMac>,
    pub status: Rc<RefCell<ArchiveStatus>>,
}

impl Archiver {
    /// Runs for the life of the node.
    pub async fn run(self: Rc<Self>) {
        // The next LSN to archive while this node leads (None: not leading, or not yet known).
        let mut next: Option<u64> = None;
        // The last LSN found to hold nothing worth a range (marks and no-ops only): nothing
        // is pending until the commit passes it.
        let mut idle_upto = 0;
        while self.replica.failed().is_none() {
            glommio::timer::sleep(ARCHIVE_POLL).await;
            let (leader, commit, archived, first) = self.replica.with_core(|c| {
                (
                    c.is_leader(),
                    c.commit_index(),
                    c.state_machine().archived_lsn(),
                    c.store().wbl().first_lsn(),
                )
            });
            self.status.borrow_mut().archived_lsn = archived;
            if !leader {
                next = None;
                self.status.borrow_mut().pending_since = None;
                continue;
            }
            // Resume after the watermark; a log released past it (the archive fell behind
            // the most-kept bound) resumes at its first LSN, leaving a gap the manifests skip.
            // No watermark known (a start from a snapshot with no mark applied since): resume
            // after the furthest range the store lists, not from the whole retained log.
            let known = match next {
                Some(n) => n,
                None if archived == 0 => self.listed_to().await + 1,
                None => archived + 1,
            };
            let from = known.max(archived + 1).max(first);
            next = Some(from);
            let durable = self.replica.with_core(|c| c.store().wbl().durable_lsn());
            let upto = commit.min(durable);
            if upto < from || upto <= idle_upto {
                self.status.borrow_mut().pending_since = None;
                continue;
            }
            let since = *self
                .status
                .borrow_mut()
                .pending_since
                .get_or_insert_with(Instant::now);
            let pending_bytes = self.pending_payload_estimate(from, upto);
            if pending_bytes < ARCHIVE_SEAL_BYTES && since.elapsed() < ARCHIVE_SEAL_INTERVAL {
                continue;
            }
            match self.seal(from, upto).await {
                Ok(Some(to)) => {
                    next = Some(to + 1);
                    let mut st = self.status.borrow_mut();
                    st.error = None;
                    st.pending_since = (to < upto).then_some(since);
                }
                Ok(None) => {
                    // Only marks and no-ops: nothing worth a range; wait for data.
                    idle_upto = upto;
                    self.status.borrow_mut().pending_since = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "log archive: range not sealed; retried");
                    self.status.borrow_mut().error = Some(e);
                    glommio::timer::sleep(ARCHIVE_RETRY).await;
                }
            }
        }
    }

    /// The last LSN of the furthest range of this shard the store lists (0: none, or the
    /// store did not answer).
    async fn listed_to(&self) -> u64 {
        let shard = self.replica.with_core(|c| c.shard());
        match self
            .store
            .list(&range_prefix(&self.cluster_id, shard))
            .await
        {
            Ok(l) => l
                .iter()
                .filter_map(|(n, _)| parse_range_object(n).map(|r| r.2))
                .max()
                .unwrap_or(0),
            Err(_) => 0,
        }
    }

    /// Payload bytes the log holds in `[from, upto]`, estimated by record count (the log keeps
    /// no byte index): a seal by size is a throughput bound, the interval the latency bound.
    fn pending_payload_estimate(&self, from: u64, upto: u64) -> usize {
        /// A key put's payload, the common record.
        const TYPICAL_RECORD_BYTES: usize = 256;
        ((upto - from + 1) as usize).saturating_mul(TYPICAL_RECORD_BYTES)
    }

    /// Reads `[from, ..=upto]` (at most [`ARCHIVE_SEAL_BYTES`] of it), uploads it as a range
    /// and proposes its mark. `Ok(None)`: the records hold no data worth a range.
    async fn seal(&self, from: u64, upto: u64) -> Result<Option<u64>, String> {
        let (wbl, shard) = self
            .replica
            .with_core(|c| (c.store().wbl().clone(), c.shard()));
        let base_chain = wbl
            .chain_at(from - 1)
            .ok_or_else(|| format!("shard {shard}: the log no longer holds lsn {}", from - 1))?;
        let mut records = Vec::new();
        let mut bytes = 0;
        let mut lsn = from;
        while lsn <= upto && bytes < ARCHIVE_SEAL_BYTES && records.len() < ARCHIVE_RECORDS_MAX {
            let batch = wbl.read(lsn, READ_BYTES).await.map_err(|e| e.to_string())?;
            if batch.is_empty() {
                break;
            }
            let room = ARCHIVE_RECORDS_MAX - records.len();
            for r in batch.into_iter().take_while(|r| r.lsn <= upto).take(room) {
                bytes += r.payload.len();
                lsn = r.lsn + 1;
                records.push(ArchivedRecord {
                    kind: r.kind,
                    term: r.term,
                    payload: r.payload,
                });
            }
        }
        if !records.iter().any(|r| is_data(r.kind)) {
            return Ok(None);
        }
        let range = LogRange {
            cluster_id: self.cluster_id,
            shard,
            from,
            base_chain,
            records,
        };
        let to = range.to();
        let encoded = range.encode(&*self.mac).map_err(|e| e.to_string())?;
        let size = encoded.len() as u64;
        let hash = xxhash_rust::xxh3::xxh3_64(&encoded);
        let object = range_object(&self.cluster_id, shard, from, to, hash);
        let created = self
            .store
            .put_bytes_create(&object, encoded)
            .await
            .map_err(|e| e.to_string())?;
        {
            let mut st = self.status.borrow_mut();
            st.ranges += 1;
            if created == PutOutcome::Created {
                st.bytes += size;
            }
        }
        let mark = Op::ArchiveMark { to };
        self.replica
            .propose(mark.kind(), &mark.encode())
            .await
            .map_err(|e| format!("archive mark {to}: {e}"))?;
        tracing::debug!(shard, from, to, size, "log range archived");
        Ok(Some(to))
    }
}
