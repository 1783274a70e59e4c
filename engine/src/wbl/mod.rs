//! Write-behind log: one per shard. Records are appended with group commit (one aligned direct
//! write and one fdatasync per batch), indexed in memory for raft's synchronous queries, and
//! verified record by record (crc32c) and across records (xxh3 chain) on recovery.
//! The byte layout is documented in `docs/format.md`, section 1.

pub mod base;
pub mod hardstate;
mod log;
pub mod record;
mod scan;
pub mod segment;

pub use hardstate::HardState;
pub use log::{Durable, Wbl, WblReader, COMMIT_PERSIST_INTERVAL};
pub use record::{DecodeError, Record, RecordKind, RecordRef};
pub use scan::verify_dir;
pub use segment::PrepMethod;

use std::path::PathBuf;
use std::time::Duration;

/// Unit of every write and of alignment: direct I/O on ext4 needs 4 KiB.
pub const BLOCK: usize = 4096;
pub const RECORD_HEADER_BYTES: usize = 40;
/// crc32c (4 B) followed by the chain (8 B).
pub const RECORD_TRAILER_BYTES: usize = 12;
/// Largest payload one record may carry: a key record is a few hundred bytes; the bound keeps
/// one record well inside one batch and one read.
pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024;
/// Largest encoded record.
pub const MAX_RECORD_BYTES: usize = record::encoded_len(MAX_PAYLOAD_BYTES);
/// Largest group-commit write (records only). It bounds what a crash can tear, so it is also
/// the window of the torn-tail rule on recovery.
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Most records in one batch.
pub const MAX_BATCH_RECORDS: usize = 8192;
/// Append queue bound: an append beyond it fails with [`WblError::QueueFull`] at once, so a
/// slow disk pushes back on proposers instead of growing memory.
pub const MAX_PENDING_RECORDS: usize = 65536;
/// Default segment size: 64 MiB, so a segment prepares in the background in well under a second.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
/// A segment must hold its header block, one maximum record and the footer block.
pub const SEGMENT_BYTES_MIN: u64 = (2 * BLOCK + MAX_RECORD_BYTES.div_ceil(BLOCK) * BLOCK) as u64;
/// Released segment files kept for recycling; more are deleted.
pub const RECYCLE_POOL_MAX: usize = 2;
/// Scanner read size during recovery.
pub const SCAN_CHUNK_BYTES: usize = 1024 * 1024;
/// Chunks read ahead by the scanner while it verifies the current one.
pub const SCAN_READ_AHEAD: usize = 4;

const _: () = assert!(MAX_RECORD_BYTES <= MAX_BATCH_BYTES);

/// Options of one log.
#[derive(Clone, Debug)]
pub struct WblOptions {
    /// Size of every segment file; at least [`SEGMENT_BYTES_MIN`], a multiple of [`BLOCK`].
    pub segment_bytes: u64,
    /// How the next segment is prepared in the background.
    pub prep_method: PrepMethod,
    /// Keep released segments (up to [`RECYCLE_POOL_MAX`]) and reuse them as the next
    /// segment instead of zero-filling a new file.
    pub recycle: bool,
    /// Verify only: never zero a torn tail, delete or create a file, or accept appends.
    pub read_only: bool,
    /// Task queue of the writer (foreground); `None` = the caller's current queue.
    pub writer_queue: Option<glommio::TaskQueueHandle>,
    /// Task queue of segment preparation (background); `None` = the caller's current queue.
    pub background_queue: Option<glommio::TaskQueueHandle>,
}

impl Default for WblOptions {
    fn default() -> Self {
        WblOptions {
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            prep_method: PrepMethod::ZeroFill,
            recycle: true,
            read_only: false,
            writer_queue: None,
            background_queue: None,
        }
    }
}

/// Errors of the WBL. Clone, so one I/O failure can be handed to every waiting appender.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WblError {
    #[error("payload of {len} bytes exceeds the maximum of {max}")]
    PayloadTooLarge { len: usize, max: usize },
    #[error("append queue full ({max} records pending)")]
    QueueFull { max: usize },
    #[error("lsn {lsn} leaves a gap: next expected is {expected}")]
    LsnGap { lsn: u64, expected: u64 },
    #[error("lsn {lsn} would truncate at or below the persisted commit {commit}")]
    TruncateCommitted { lsn: u64, commit: u64 },
    #[error("lsn {lsn} is below the first lsn {first} of the log")]
    BelowFirst { lsn: u64, first: u64 },
    #[error("lsn {lsn} is not in the durable log")]
    NotAvailable { lsn: u64 },
    #[error("the log was opened read-only")]
    ReadOnly,
    #[error("a log cannot start at lsn {lsn}: the first lsn is at least 1")]
    BadFirstLsn { lsn: u64 },
    #[error("the log is being reset to a snapshot position; retry after reset_to returns")]
    Resetting,
    #[error("invalid options: {0}")]
    BadOptions(String),
    #[error("I/O error on {file}: {reason}")]
    Io { file: PathBuf, reason: String },
    #[error("corrupt log: {file} offset {offset} lsn {lsn}: {reason}")]
    Corrupt {
        file: PathBuf,
        offset: u64,
        lsn: u64,
        reason: String,
    },
    #[error("the log writer stopped after an earlier error: {0}")]
    Failed(String),
}

impl WblError {
    pub(crate) fn io(file: impl Into<PathBuf>, e: impl std::fmt::Display) -> WblError {
        WblError::Io {
            file: file.into(),
            reason: e.to_string(),
        }
    }
}

/// An unacknowledged tail cut on recovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    pub file: PathBuf,
    /// Byte offset of the first invalid position in `file`.
    pub offset: u64,
    /// LSN the log expected at that position.
    pub lsn: u64,
    /// Bytes from the cut to the end of the last non-zero block within one batch.
    pub bytes_discarded: u64,
    pub reason: String,
}

/// What recovery found.
#[derive(Clone, Debug)]
pub struct RecoveryReport {
    pub segments: usize,
    /// Records read and verified (overwritten suffixes included).
    pub records: u64,
    pub first_lsn: u64,
    /// `first_lsn - 1` for an empty log.
    pub last_lsn: u64,
    pub bytes_scanned: u64,
    pub torn_tail: Option<TornTail>,
    pub hard_state: HardState,
    pub elapsed: Duration,
}

/// One in-memory index entry, 24 bytes per record: raft asks for terms synchronously and
/// suffix overwrites need the chain at any LSN above the commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub term: u64,
    pub chain: u64,
    /// Low 32 bits of the segment sequence number.
    pub seg: u32,
    /// Byte offset of the record in its segment (segments are below 4 GiB).
    pub off: u32,
}

pub(crate) fn align_up(v: u64) -> u64 {
    v.div_ceil(BLOCK as u64) * BLOCK as u64
}

pub(crate) fn align_down(v: u64) -> u64 {
    v / BLOCK as u64 * BLOCK as u64
}
