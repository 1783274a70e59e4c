//! Recovery scan: streams every segment with large direct reads, verifies crc, chain, LSN
//! continuity and segment linkage, rebuilds the index and decides torn tail vs corruption.
//! It never writes: fixing a torn tail is the caller's job (and never done read-only).

use super::base::{decode_base, BaseState, BASE_FILE};
use super::hardstate::{pick_slot, HardState, HardStateSlot, HARDSTATE_FILE};
use super::record::{chain_next, decode_ref, get_u32, RECORD_MAGIC};
use super::segment::{
    self, decode_footer, decode_header, SegmentFooter, SegmentHeader, FOOTER_MAGIC,
};
use super::*;
use glommio::io::{DmaFile, DmaStreamReader, DmaStreamReaderBuilder};
use std::collections::VecDeque;
use std::path::Path;

/// A live segment (valid header, records verified).
#[derive(Clone, Debug)]
pub(crate) struct SegMeta {
    pub header: SegmentHeader,
    pub path: PathBuf,
    pub sealed: bool,
}

/// Cut to apply before appending: rewrite `[block, block + len)` with `prefix` then zeros.
#[derive(Clone, Debug)]
pub(crate) struct TornFix {
    pub seq: u64,
    pub block: u64,
    pub prefix: Vec<u8>,
    pub len: u64,
}

pub(crate) struct Recovered {
    pub segs: Vec<SegMeta>,
    pub first_lsn: u64,
    pub base_chain: u64,
    pub index: VecDeque<IndexEntry>,
    /// Next write position in the last live segment, when it is not sealed.
    pub active_pos: Option<u64>,
    pub max_epoch: u64,
    pub max_seq: Option<u64>,
    /// Segment files after the last live one (prepared, recycled or with a torn first write).
    pub unused: Vec<PathBuf>,
    /// Segment files of the log before a reset (sequence number below the base file's
    /// `first_seq`): left by a `reset_to` interrupted before it removed them.
    pub leftovers: Vec<PathBuf>,
    /// The base file, when the log was reset to a snapshot position.
    pub base: Option<BaseState>,
    /// Term at `first_lsn - 1`, known when the log still starts where the base file says.
    pub base_term: Option<u64>,
    pub hard: Option<HardStateSlot>,
    pub fix: Option<TornFix>,
    pub report: RecoveryReport,
}

/// The logical log rebuilt so far.
struct Chain {
    first_lsn: u64,
    base_chain: u64,
    index: VecDeque<IndexEntry>,
    records: u64,
}

impl Chain {
    fn last_lsn(&self) -> u64 {
        self.first_lsn + self.index.len() as u64 - 1
    }

    fn chain_at(&self, lsn: u64) -> Option<u64> {
        if lsn + 1 == self.first_lsn {
            return Some(self.base_chain);
        }
        let i = lsn.checked_sub(self.first_lsn)?;
        self.index.get(i as usize).map(|e| e.chain)
    }
}

/// Forward-only window over one segment, fed by a read-ahead stream of direct reads.
struct SegReader {
    stream: DmaStreamReader,
    buf: Vec<u8>,
    start: u64,
    eof: bool,
    bytes_read: u64,
}

impl SegReader {
    fn new(file: DmaFile) -> SegReader {
        let stream = DmaStreamReaderBuilder::new(file)
            .with_buffer_size(SCAN_CHUNK_BYTES)
            .with_read_ahead(SCAN_READ_AHEAD)
            .build();
        SegReader {
            stream,
            buf: Vec::new(),
            start: 0,
            eof: false,
            bytes_read: 0,
        }
    }

    /// Makes `[pos, pos + want)` available (less at end of file) and returns it.
    async fn get(&mut self, pos: u64, want: usize) -> std::io::Result<&[u8]> {
        assert!(pos >= self.start, "scanner moves forward only");
        let drop = align_down(pos - self.start) as usize;
        if drop >= SCAN_CHUNK_BYTES {
            self.buf.drain(..drop);
            self.start += drop as u64;
        }
        while !self.eof && self.start + (self.buf.len() as u64) < pos + want as u64 {
            let chunk = self
                .stream
                .get_buffer_aligned(SCAN_CHUNK_BYTES as u64)
                .await?;
            if chunk.is_empty() {
                self.eof = true;
            }
            self.bytes_read += chunk.len() as u64;
            self.buf.extend_from_slice(&chunk);
        }
        let from = ((pos - self.start) as usize).min(self.buf.len());
        let to = (from + want).min(self.buf.len());
        Ok(&self.buf[from..to])
    }

    async fn close(self) {
        let _ = self.stream.close().await;
    }
}

static ZERO_BLOCK: [u8; BLOCK] = [0; BLOCK];

enum Stop {
    Clean,
    Stale,
    Footer,
    Invalid(String),
}

fn corrupt(file: &Path, offset: u64, lsn: u64, reason: impl Into<String>) -> WblError {
    WblError::Corrupt {
        file: file.to_path_buf(),
        offset,
        lsn,
        reason: reason.into(),
    }
}

async fn read_all_direct(path: &Path) -> Result<Vec<u8>, WblError> {
    let f = DmaFile::open(path)
        .await
        .map_err(|e| WblError::io(path, e))?;
    let size = f.file_size().await.map_err(|e| WblError::io(path, e))?;
    let r = f
        .read_at(0, size as usize)
        .await
        .map_err(|e| WblError::io(path, e))?;
    let out = r.to_vec();
    let _ = f.close().await;
    Ok(out)
}

async fn load_hard_state(dir: &Path) -> Result<Option<HardStateSlot>, WblError> {
    let path = dir.join(HARDSTATE_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let img = read_all_direct(&path).await?;
    match pick_slot(&img) {
        Some(s) => Ok(Some(s)),
        None => Err(corrupt(&path, 0, 0, "no valid hard state slot")),
    }
}

/// Loads the base file. It is created by an atomic rename, so one that exists and does not
/// decode is corruption.
async fn load_base(dir: &Path) -> Result<Option<BaseState>, WblError> {
    let path = dir.join(BASE_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let img = read_all_direct(&path).await?;
    decode_base(&img)
        .map(Some)
        .map_err(|e| corrupt(&path, 0, 0, format!("base file: {e}")))
}

fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WblError> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| WblError::io(dir, e))? {
        let e = e.map_err(|e| WblError::io(dir, e))?;
        let name = e.file_name();
        if let Some(seq) = name.to_str().and_then(segment::parse_segment_file_name) {
            v.push((seq, e.path()));
        }
    }
    v.sort();
    Ok(v)
}

/// Scans the whole directory. Pure with respect to the disk: reads only.
pub(crate) async fn recover(dir: &Path) -> Result<Recovered, WblError> {
    let started = std::time::Instant::now();
    let hard = load_hard_state(dir).await?;
    let commit = hard.map_or(0, |h| h.state.commit);
    let base = load_base(dir).await?;
    let mut files = list_segments(dir)?;
    // Segments below the base's first sequence number belong to the log before a reset.
    let first_seq = base.map_or(0, |b| b.first_seq);
    let split = files.partition_point(|(seq, _)| *seq < first_seq);
    let leftovers: Vec<PathBuf> = files.drain(..split).map(|(_, p)| p).collect();
    let mut chain = Chain {
        first_lsn: base.map_or(1, |b| b.first_lsn),
        base_chain: base.map_or(0, |b| b.base_chain),
        index: VecDeque::new(),
        records: 0,
    };
    let mut segs: Vec<SegMeta> = Vec::new();
    let mut unused = Vec::new();
    let mut bytes_scanned = 0;
    let mut max_epoch = base.map_or(0, |b| b.epoch_floor);
    let mut active_pos = None;
    let mut fix = None;
    let mut torn_tail = None;
    let last_live = last_live_index(&files).await?;
    for (i, (seq, path)) in files.iter().enumerate() {
        if last_live.is_none_or(|l| i > l) {
            unused.push(path.clone());
            continue;
        }
        let is_last = Some(i) == last_live;
        let file = DmaFile::open(path)
            .await
            .map_err(|e| WblError::io(path, e))?;
        let mut rd = SegReader::new(file);
        let ctx = ScanCtx {
            prev: &segs,
            base: base.as_ref(),
            is_last,
            commit,
        };
        let out = scan_one(&mut rd, *seq, path, &mut chain, ctx).await;
        bytes_scanned += rd.bytes_read;
        rd.close().await;
        let out = out?;
        max_epoch = max_epoch.max(out.meta.header.epoch);
        if is_last && !out.meta.sealed {
            active_pos = Some(out.next_pos);
        }
        if out.fix.is_some() {
            fix = out.fix;
            torn_tail = out.torn;
        }
        segs.push(out.meta);
    }
    let last_lsn = chain.last_lsn();
    if last_lsn < commit {
        let file = segs.last().map_or(dir.to_path_buf(), |s| s.path.clone());
        return Err(corrupt(
            &file,
            0,
            last_lsn + 1,
            format!("log ends below commit {commit}"),
        ));
    }
    let report = RecoveryReport {
        segments: segs.len(),
        records: chain.records,
        first_lsn: chain.first_lsn,
        last_lsn,
        bytes_scanned,
        torn_tail,
        hard_state: hard.map(|h| h.state).unwrap_or_default(),
        elapsed: started.elapsed(),
    };
    let base_term = base
        .filter(|b| b.first_lsn == chain.first_lsn)
        .map(|b| b.base_term);
    let max_seq = files.last().map(|f| f.0);
    Ok(Recovered {
        segs,
        first_lsn: chain.first_lsn,
        base_chain: chain.base_chain,
        index: chain.index,
        active_pos,
        max_epoch,
        max_seq,
        unused,
        leftovers,
        base,
        base_term,
        hard,
        fix,
        report,
    })
}

async fn read_header(path: &Path) -> Result<Option<SegmentHeader>, WblError> {
    let f = DmaFile::open(path)
        .await
        .map_err(|e| WblError::io(path, e))?;
    let r = f
        .read_at_aligned(0, BLOCK)
        .await
        .map_err(|e| WblError::io(path, e))?;
    let h = decode_header(&r).ok();
    let _ = f.close().await;
    Ok(h)
}

/// Index of the last file with a valid header naming its own sequence number. Files before it
/// must all be live; files after it are unused.
async fn last_live_index(files: &[(u64, PathBuf)]) -> Result<Option<usize>, WblError> {
    let mut last = None;
    for (i, (seq, path)) in files.iter().enumerate().rev() {
        if read_header(path).await?.is_some_and(|h| h.seq == *seq) {
            last = Some(i);
            break;
        }
    }
    Ok(last)
}

struct SegOutcome {
    meta: SegMeta,
    next_pos: u64,
    fix: Option<TornFix>,
    torn: Option<TornTail>,
}

/// What one segment's scan needs to know about the rest of the log.
#[derive(Clone, Copy)]
struct ScanCtx<'a> {
    /// Live segments before this one.
    prev: &'a [SegMeta],
    base: Option<&'a BaseState>,
    is_last: bool,
    commit: u64,
}

async fn scan_one(
    rd: &mut SegReader,
    seq: u64,
    path: &Path,
    chain: &mut Chain,
    ctx: ScanCtx<'_>,
) -> Result<SegOutcome, WblError> {
    let ScanCtx {
        is_last, commit, ..
    } = ctx;
    let expected = chain.last_lsn() + 1;
    let header = match decode_header(rd.get(0, BLOCK).await.map_err(|e| WblError::io(path, e))?) {
        Ok(h) if h.seq == seq => h,
        Ok(_) => return Err(corrupt(path, 0, expected, "header names another segment")),
        Err(e) => return Err(corrupt(path, 0, expected, format!("segment header: {e}"))),
    };
    link_header(&header, path, chain, ctx.prev, ctx.base)?;
    let (stop, pos) = scan_records(rd, &header, path, chain).await?;
    let e = chain.last_lsn() + 1;
    let mut meta = SegMeta {
        header,
        path: path.to_path_buf(),
        sealed: false,
    };
    match stop {
        Stop::Footer => {
            meta.sealed = true;
            return Ok(SegOutcome {
                meta,
                next_pos: pos,
                fix: None,
                torn: None,
            });
        }
        Stop::Invalid(r) if !is_last => return Err(corrupt(path, pos, e, r)),
        _ if !is_last => return Err(corrupt(path, pos, e, "sealed segment has no footer")),
        _ => {}
    }
    let (fix, torn) = torn_window(rd, &header, path, pos, e, stop, commit).await?;
    Ok(SegOutcome {
        meta,
        next_pos: align_up(pos),
        fix: Some(fix),
        torn,
    })
}

/// Checks that a segment continues the log where the previous one left it.
/// The first live segment starts the log: after a reset (`base`), it either starts exactly at
/// the base (with its chain) or above it (the base's first segments were released since).
fn link_header(
    h: &SegmentHeader,
    path: &Path,
    chain: &mut Chain,
    prev: &[SegMeta],
    base: Option<&BaseState>,
) -> Result<(), WblError> {
    let expected = chain.last_lsn() + 1;
    if let Some(p) = prev.last() {
        if h.epoch <= p.header.epoch {
            return Err(corrupt(
                path,
                0,
                expected,
                "segment epoch does not increase",
            ));
        }
        let linked =
            h.first_lsn <= expected && chain.chain_at(h.first_lsn - 1) == Some(h.chain_seed);
        if !linked {
            return Err(corrupt(
                path,
                0,
                expected,
                "segment does not continue the previous one",
            ));
        }
    } else {
        if h.first_lsn == 0 {
            return Err(corrupt(path, 0, 0, "first lsn 0"));
        }
        if let Some(b) = base {
            if h.first_lsn < b.first_lsn {
                return Err(corrupt(
                    path,
                    0,
                    b.first_lsn,
                    "segment starts below the base",
                ));
            }
            if h.first_lsn == b.first_lsn && h.chain_seed != b.base_chain {
                return Err(corrupt(
                    path,
                    0,
                    b.first_lsn,
                    "segment chain seed differs from the base chain",
                ));
            }
        }
        chain.first_lsn = h.first_lsn;
        chain.base_chain = h.chain_seed;
    }
    Ok(())
}

async fn scan_records(
    rd: &mut SegReader,
    h: &SegmentHeader,
    path: &Path,
    chain: &mut Chain,
) -> Result<(Stop, u64), WblError> {
    let mut pos = BLOCK as u64;
    let mut first = true;
    loop {
        let bytes = rd
            .get(pos, MAX_RECORD_BYTES)
            .await
            .map_err(|e| WblError::io(path, e))?;
        if bytes.len() < 4 {
            return Ok((Stop::Invalid("segment ended without footer".into()), pos));
        }
        let magic = get_u32(bytes, 0);
        let aligned = pos.is_multiple_of(BLOCK as u64);
        if magic == 0 && aligned {
            return Ok((Stop::Clean, pos));
        }
        // Padding after a batch: zero bytes up to the block boundary. A batch can end 1–3
        // bytes before a boundary, so only the bytes before it are looked at (the next
        // batch's magic starts at the boundary); no record or footer magic starts with a
        // zero byte.
        let in_block = (align_up(pos) - pos) as usize;
        if !aligned && bytes[..in_block.min(4)].iter().all(|b| *b == 0) {
            pos = align_up(pos);
            continue;
        }
        if magic == FOOTER_MAGIC && aligned {
            return match decode_footer(bytes) {
                // A footer of an earlier use of a recycled file is stale, like its records.
                Ok(f) if f.epoch != h.epoch => Ok((Stop::Stale, pos)),
                Ok(f) => check_footer(&f, h, path, pos, chain).map(|()| (Stop::Footer, pos)),
                Err(err) => Ok((Stop::Invalid(format!("segment footer: {err}")), pos)),
            };
        }
        match accept_record(bytes, h, chain, first) {
            Ok(Some(n)) => {
                let e = chain.index.back_mut().expect("just pushed");
                e.seg = h.seq as u32;
                e.off = pos as u32;
                pos += n as u64;
                first = false;
            }
            Ok(None) => return Ok((Stop::Stale, pos)),
            Err(r) => return Ok((Stop::Invalid(r), pos)),
        }
    }
}

/// A footer with a valid crc that disagrees with the records is corruption, never a torn tail.
fn check_footer(
    f: &SegmentFooter,
    h: &SegmentHeader,
    path: &Path,
    pos: u64,
    chain: &Chain,
) -> Result<(), WblError> {
    let e = chain.last_lsn() + 1;
    let head = chain.chain_at(chain.last_lsn());
    if f.epoch != h.epoch || f.last_lsn != chain.last_lsn() || Some(f.chain_head) != head {
        return Err(corrupt(
            path,
            pos,
            e,
            "footer does not match the records before it",
        ));
    }
    Ok(())
}

/// Verifies one record against the chain and appends it to the index.
/// `Ok(None)` = a stale record from an earlier use of a recycled file.
fn accept_record(
    bytes: &[u8],
    h: &SegmentHeader,
    chain: &mut Chain,
    first: bool,
) -> Result<Option<usize>, String> {
    let (r, n) = decode_ref(bytes).map_err(|e| e.to_string())?;
    if r.epoch != h.epoch {
        return Ok(None);
    }
    let expected = chain.last_lsn() + 1;
    if r.lsn > expected || r.lsn < chain.first_lsn || (first && r.lsn != h.first_lsn) {
        return Err(format!(
            "lsn {} out of sequence (expected {expected})",
            r.lsn
        ));
    }
    let seed = chain.chain_at(r.lsn - 1).expect("lsn checked above");
    if chain_next(seed, r.kind, r.lsn, r.term, r.payload) != r.chain {
        return Err(format!("chain mismatch at lsn {}", r.lsn));
    }
    chain.index.truncate((r.lsn - chain.first_lsn) as usize);
    chain.index.push_back(IndexEntry {
        term: r.term,
        chain: r.chain,
        seg: 0,
        off: 0,
    });
    chain.records += 1;
    Ok(Some(n))
}

/// Applies the torn-tail rule at the end `pos` of the last segment: a live record more than
/// one batch beyond is corruption; otherwise the range up to the last non-zero block within
/// one batch is to be zeroed.
async fn torn_window(
    rd: &mut SegReader,
    h: &SegmentHeader,
    path: &Path,
    pos: u64,
    e: u64,
    stop: Stop,
    commit: u64,
) -> Result<(TornFix, Option<TornTail>), WblError> {
    let block = align_down(pos);
    let prefix = rd
        .get(block, (pos - block) as usize)
        .await
        .map_err(|er| WblError::io(path, er))?;
    let prefix = prefix.to_vec();
    let mut zero_end = align_up(pos);
    let mut live_in_window = false;
    let mut q = align_up(pos);
    loop {
        let b = rd
            .get(q, BLOCK)
            .await
            .map_err(|er| WblError::io(path, er))?;
        if b.len() < BLOCK {
            break;
        }
        let nonzero = b != &ZERO_BLOCK[..];
        let live = get_u32(b, 0) == RECORD_MAGIC && live_record_at(rd, q, h.epoch, path).await?;
        if q - pos > MAX_BATCH_BYTES as u64 {
            if live {
                let reason = format!("valid record at offset {q}, more than one batch beyond");
                return Err(corrupt(path, pos, e, reason));
            }
        } else if nonzero {
            zero_end = q + BLOCK as u64;
            live_in_window |= live;
        }
        q += BLOCK as u64;
    }
    let fix = TornFix {
        seq: h.seq,
        block,
        prefix,
        len: zero_end - block,
    };
    let reason = match stop {
        Stop::Invalid(r) => Some(r),
        // Stale bytes after a clean end are expected in a recycled file, not in a zeroed one.
        Stop::Clean if zero_end > align_up(pos) && !h.recycled => {
            Some("unwritten block inside the last batch".into())
        }
        _ if live_in_window => Some("records after a gap in the last batch".into()),
        _ => None,
    };
    let Some(reason) = reason else {
        return Ok((fix, None));
    };
    if e <= commit {
        return Err(corrupt(
            path,
            pos,
            e,
            format!("{reason} at or below commit {commit}"),
        ));
    }
    let bytes_discarded = zero_end - pos;
    let torn = TornTail {
        file: path.to_path_buf(),
        offset: pos,
        lsn: e,
        bytes_discarded,
        reason,
    };
    Ok((fix, Some(torn)))
}

async fn live_record_at(
    rd: &mut SegReader,
    q: u64,
    epoch: u64,
    path: &Path,
) -> Result<bool, WblError> {
    let b = rd
        .get(q, MAX_RECORD_BYTES)
        .await
        .map_err(|er| WblError::io(path, er))?;
    Ok(matches!(decode_ref(b), Ok((r, _)) if r.epoch == epoch))
}

/// Read-only verification of a log directory, for the offline tools.
pub async fn verify_dir(dir: &Path) -> Result<RecoveryReport, WblError> {
    recover(dir).await.map(|r| r.report)
}

pub(crate) fn hard_state_or_default(r: &Recovered) -> HardState {
    r.hard.map(|h| h.state).unwrap_or_default()
}
