//! Snapshot files: `reduce(log[0..=lsn])` of one shard as one sorted, indexed, checksummed,
//! card-MACed file (docs/format.md §4). This module owns the file: writing it atomically
//! (write, fsync, rename, fsync dir), verifying it in one sequential pass on open, and point
//! lookups through the block index and a bounded block cache. It holds no card: the footer MAC is
//! made and checked through [`FooterMac`], which a card session implements.
//!
//! I/O is plain buffered `std::fs` for now (1 MiB sequential reads on open, `pread` per block on
//! lookup): correct and simple; direct reads on the executor at disk speed are a later step.

mod format;

pub use format::{
    BlockIndexEntry, Footer, BLOCK_BYTES_TARGET, FILE_HEADER, FOOTER_FIXED_BYTES, SNAPSHOT_VERSION,
    TAIL_BYTES,
};

use crate::state::{IdempotencyEntry, KeyEntry, KeySlot, StateDigest, StateMachine, View};
use format::{SectionReader, SectionWriter};
use keyfort_hsm::format::MAC_LEN;
use keyfort_hsm::{CardError, CoreSession};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Data blocks one open snapshot keeps for lookups: 1024 × 16 KiB ≈ 16 MiB per shard.
pub const BLOCK_CACHE_BLOCKS_MAX: usize = 1024;
/// Most raft members (voters + learners) a footer may name.
pub const CONF_MEMBERS_MAX: usize = 64;
/// Sequential read size when verifying a file on open.
pub const OPEN_READ_BYTES: usize = 1024 * 1024;

/// Makes and checks the footer MAC with the cluster integrity key. A card session implements
/// it; the snapshot code never holds a card itself.
pub trait FooterMac {
    fn mac(&self, bytes: &[u8]) -> keyfort_hsm::Result<[u8; MAC_LEN]>;
    fn verify(&self, bytes: &[u8], mac: &[u8]) -> keyfort_hsm::Result<()>;
}

impl FooterMac for CoreSession {
    fn mac(&self, bytes: &[u8]) -> keyfort_hsm::Result<[u8; MAC_LEN]> {
        CoreSession::mac(self, bytes)
    }
    fn verify(&self, bytes: &[u8], mac: &[u8]) -> keyfort_hsm::Result<()> {
        CoreSession::verify(self, bytes, mac)
    }
}

/// Errors of snapshot files. Every one names the file; corruption names the offset and check.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("I/O error on {file}: {reason}")]
    Io { file: PathBuf, reason: String },
    #[error("corrupt snapshot {file} at offset {offset}: {what}")]
    Corrupt {
        file: PathBuf,
        offset: u64,
        what: String,
    },
    #[error(
        "snapshot {file}: footer MAC does not verify with the cluster integrity key: {reason}"
    )]
    BadMac { file: PathBuf, reason: String },
    #[error("snapshot {file}: card error: {reason}")]
    Card { file: PathBuf, reason: String },
    #[error("invalid snapshot request: {0}")]
    Invalid(String),
}

impl SnapshotError {
    fn io(file: &Path, e: impl std::fmt::Display) -> SnapshotError {
        SnapshotError::Io {
            file: file.to_path_buf(),
            reason: e.to_string(),
        }
    }
    fn corrupt(file: &Path, offset: u64, what: impl Into<String>) -> SnapshotError {
        SnapshotError::Corrupt {
            file: file.to_path_buf(),
            offset,
            what: what.into(),
        }
    }
    fn card(file: &Path, e: CardError) -> SnapshotError {
        match e {
            CardError::BadMac { .. } => SnapshotError::BadMac {
                file: file.to_path_buf(),
                reason: e.to_string(),
            },
            _ => SnapshotError::Card {
                file: file.to_path_buf(),
                reason: e.to_string(),
            },
        }
    }
}

/// What the caller knows about the LSN a snapshot covers, beyond the state itself. Before raft
/// exists, tests supply term and ConfState.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub lsn: u64,
    pub term: u64,
    /// The WBL chain at `lsn` (`Wbl::chain_at`): recovery checks the replayed log continues it.
    pub chain_head: u64,
    /// Raft ConfState.
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

/// Writer options; the default is the production layout.
#[derive(Clone, Debug)]
pub struct WriteOptions {
    /// A data block is closed once it holds at least this many bytes.
    pub block_bytes_target: usize,
    /// Most bytes per second the writer puts on the disk (`None`: no limit), so the log's
    /// synchronous writes do not queue behind a snapshot's.
    pub max_bytes_per_s: Option<u64>,
}

/// Default write rate of snapshot files: a 267 MB file (1M keys) takes ~2 s.
pub const WRITE_BYTES_PER_S_DEFAULT: u64 = 128 << 20;

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            block_bytes_target: BLOCK_BYTES_TARGET,
            max_bytes_per_s: Some(WRITE_BYTES_PER_S_DEFAULT),
        }
    }
}

/// `snap-{lsn:016x}.ksnap`: sorts by LSN.
pub fn file_name(lsn: u64) -> String {
    format!("snap-{lsn:016x}.ksnap")
}

/// The snapshot files in `dir`, by LSN ascending (temporary files are ignored).
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SnapshotError> {
    let rd = std::fs::read_dir(dir).map_err(|e| SnapshotError::io(dir, e))?;
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(hex) = name
            .strip_prefix("snap-")
            .and_then(|r| r.strip_suffix(".ksnap"))
        else {
            continue;
        };
        if let Ok(lsn) = u64::from_str_radix(hex, 16) {
            out.push((lsn, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Writes the snapshot of `state` into `dir` atomically and returns its path.
pub fn write(
    dir: &Path,
    state: &StateMachine,
    meta: &SnapshotMeta,
    mac: &dyn FooterMac,
) -> Result<PathBuf, SnapshotError> {
    write_with(dir, state, meta, mac, &WriteOptions::default())
}

/// [`write`] with explicit options.
pub fn write_with(
    dir: &Path,
    state: &StateMachine,
    meta: &SnapshotMeta,
    mac: &dyn FooterMac,
    opts: &WriteOptions,
) -> Result<PathBuf, SnapshotError> {
    let pending = begin(dir, &state.view(), meta, opts)?;
    let tag = mac
        .mac(pending.footer_body())
        .map_err(|e| SnapshotError::card(&pending.tmp, e))?;
    pending.finish(&tag)
}

/// Replaces the raft membership in the footer of the verified snapshot `snap`, in place: the
/// file is cut at its footer and a new footer naming `voters` and `learners`, MACed with `mac`,
/// is written and fsynced. The sections (and so the chain over them, the digest and every
/// count) are untouched. The durable tier uses it: a restored cluster's members have new raft
/// ids. `snap` stays usable for reads (its sections did not move); its in-memory footer is the
/// old one: open the file again to see the new.
pub fn rewrite_membership(
    snap: &Snapshot,
    voters: &[u64],
    learners: &[u64],
    mac: &dyn FooterMac,
) -> Result<PathBuf, SnapshotError> {
    if !snap.mac_checked {
        return Err(SnapshotError::Invalid(
            "a footer is rewritten only on a snapshot whose MAC was checked".into(),
        ));
    }
    if voters.len() + learners.len() > CONF_MEMBERS_MAX {
        return Err(SnapshotError::Invalid(format!(
            "more than {CONF_MEMBERS_MAX} raft members"
        )));
    }
    let path = snap.path.clone();
    let io = |e: std::io::Error| SnapshotError::io(&path, e);
    let mut footer = snap.footer.clone();
    footer.voters = voters.to_vec();
    footer.learners = learners.to_vec();
    let body = footer.encode_body();
    let tag = mac.mac(&body).map_err(|e| SnapshotError::card(&path, e))?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(io)?;
    f.set_len(footer.footer_offset).map_err(io)?;
    let mut at = footer.footer_offset;
    for part in [&body[..], &tag[..], &format::encode_tail(body.len())[..]] {
        f.write_all_at(part, at).map_err(io)?;
        at += part.len() as u64;
    }
    f.sync_all().map_err(io)?;
    Ok(path)
}

/// A snapshot file written up to its footer body, waiting for the footer MAC. The split lets
/// the bulk of the write run on a blocking thread while the card (per-core) makes the MAC.
pub struct Pending {
    dir: PathBuf,
    tmp: PathBuf,
    path: PathBuf,
    w: SectionWriter<BufWriter<File>>,
    body: Vec<u8>,
}

impl Pending {
    /// The footer bytes the MAC covers.
    pub fn footer_body(&self) -> &[u8] {
        &self.body
    }

    /// Writes body, MAC and tail; fsyncs the file, renames it into place and fsyncs the
    /// directory. Returns the final path.
    pub fn finish(mut self, tag: &[u8; MAC_LEN]) -> Result<PathBuf, SnapshotError> {
        let r = self.finish_file(tag);
        if let Err(e) = r {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(e);
        }
        std::fs::rename(&self.tmp, &self.path).map_err(|e| SnapshotError::io(&self.path, e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| SnapshotError::io(&self.dir, e))?;
        Ok(self.path)
    }

    fn finish_file(&mut self, tag: &[u8; MAC_LEN]) -> Result<(), SnapshotError> {
        let tmp = self.tmp.clone();
        let io = |e: std::io::Error| SnapshotError::io(&tmp, e);
        let body = std::mem::take(&mut self.body);
        self.w.raw(&body).map_err(io)?;
        self.w.raw(tag).map_err(io)?;
        self.w.raw(&format::encode_tail(body.len())).map_err(io)?;
        self.w.get_mut().flush().map_err(io)?;
        self.w.get_mut().get_ref().sync_all().map_err(io)
    }
}

/// Writes everything of the snapshot of `view` but the footer MAC and tail into a temporary
/// file in `dir`. Blocking; reads the view's base file sequentially.
pub fn begin(
    dir: &Path,
    view: &View<'_>,
    meta: &SnapshotMeta,
    opts: &WriteOptions,
) -> Result<Pending, SnapshotError> {
    if meta.lsn != view.lsn {
        return Err(SnapshotError::Invalid(format!(
            "meta lsn {} differs from the state's applied lsn {}",
            meta.lsn, view.lsn
        )));
    }
    if meta.voters.len() + meta.learners.len() > CONF_MEMBERS_MAX {
        return Err(SnapshotError::Invalid(format!(
            "more than {CONF_MEMBERS_MAX} raft members"
        )));
    }
    if opts.block_bytes_target == 0 || opts.block_bytes_target > u32::MAX as usize / 2 {
        return Err(SnapshotError::Invalid(
            "block_bytes_target out of range".into(),
        ));
    }
    let path = dir.join(file_name(meta.lsn));
    let tmp = dir.join(format!(".{}.tmp", file_name(meta.lsn)));
    match write_body(&tmp, view, meta, opts) {
        Ok((w, body)) => Ok(Pending {
            dir: dir.to_path_buf(),
            tmp,
            path,
            w,
            body,
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

type FileWriter = SectionWriter<BufWriter<File>>;

/// Written bytes after which a snapshot write starts the kernel's writeback of them, so the
/// final fsync does not flush the whole file in one burst that the log's own writes queue
/// behind (the idea of RocksDB's `bytes_per_sync`).
pub const WRITEBACK_BYTES: u64 = 8 << 20;

/// Flushes the buffer and asks the kernel to start writing `[from, to)` back, without waiting.
fn start_writeback(w: &mut BufWriter<File>, from: u64, to: u64) -> std::io::Result<()> {
    w.flush()?;
    // SAFETY: sync_file_range on an fd the writer owns; no memory is passed.
    let rc = unsafe {
        libc::sync_file_range(
            w.get_ref().as_raw_fd(),
            from as libc::off64_t,
            (to - from) as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn write_body(
    tmp: &Path,
    view: &View<'_>,
    meta: &SnapshotMeta,
    opts: &WriteOptions,
) -> Result<(FileWriter, Vec<u8>), SnapshotError> {
    let f = File::create(tmp).map_err(|e| SnapshotError::io(tmp, e))?;
    let mut w = SectionWriter::new(BufWriter::with_capacity(OPEN_READ_BYTES, f));
    let io = |e: std::io::Error| SnapshotError::io(tmp, e);
    w.raw(&FILE_HEADER).map_err(io)?;
    let mut index = Vec::new();
    let mut block = format::BlockBuilder::default();
    let mut key_count = 0u64;
    let mut synced = 0u64;
    let started = std::time::Instant::now();
    view.for_each_encoded(|slot, e| {
        key_count += 1;
        block.push(slot, e);
        if block.bytes() >= opts.block_bytes_target {
            index.push(w.block(&mut block).map_err(io)?);
            let at = w.offset();
            if at - synced >= WRITEBACK_BYTES {
                start_writeback(w.get_mut(), synced, at).map_err(io)?;
                synced = at;
                if let Some(rate) = opts.max_bytes_per_s.filter(|r| *r > 0) {
                    let due = std::time::Duration::from_secs_f64(at as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            }
        }
        Ok(())
    })?;
    if !block.is_empty() {
        index.push(w.block(&mut block).map_err(io)?);
    }
    if key_count != view.key_count {
        return Err(SnapshotError::Invalid(format!(
            "the state counts {} key versions but holds {key_count}",
            view.key_count
        )));
    }
    let idempotency = view.idempotency();
    let index_offset = w.offset();
    w.section(&format::encode_index(&index)).map_err(io)?;
    let partitions_offset = w.offset();
    w.section(&format::encode_partitions(view.partitions()))
        .map_err(io)?;
    let idempotency_offset = w.offset();
    w.section(&format::encode_idempotency(&idempotency))
        .map_err(io)?;
    let cluster_offset = w.offset();
    w.section(&format::encode_cluster(view.cluster_config()))
        .map_err(io)?;
    let footer = Footer {
        lsn: meta.lsn,
        term: meta.term,
        chain_head: meta.chain_head,
        digest: view.digest,
        idempotency_window_lsns: view.window,
        key_count,
        block_count: index.len() as u32,
        partition_count: view.partitions().count() as u32,
        idempotency_count: idempotency.len() as u32,
        index_offset,
        partitions_offset,
        idempotency_offset,
        cluster_offset,
        footer_offset: w.offset(),
        sections_chain: w.chain(),
        voters: meta.voters.clone(),
        learners: meta.learners.clone(),
    };
    Ok((w, footer.encode_body()))
}

/// What an open pass read besides the footer.
struct Contents {
    index: Vec<BlockIndexEntry>,
    partitions: Vec<(keyfort_hsm::PartitionId, Vec<u8>)>,
    idempotency: Vec<IdempotencyEntry>,
    /// Indices into `idempotency` in LSN order, for expiry.
    idempotency_by_lsn: Vec<u32>,
    cluster_config: Option<Vec<u8>>,
}

/// An open, verified snapshot file.
pub struct Snapshot {
    path: PathBuf,
    file: File,
    footer: Footer,
    /// The footer body and MAC as read: what `verify_mac` checks.
    footer_mac_input: (Vec<u8>, [u8; MAC_LEN]),
    mac_checked: bool,
    file_bytes: u64,
    contents: Contents,
    cache: Mutex<BlockCache>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("path", &self.path)
            .field("lsn", &self.footer.lsn)
            .finish()
    }
}

/// What [`Snapshot::open_without_mac_observed`] hands the file's bytes to.
type Observer<'a> = &'a mut dyn FnMut(&[u8]);

/// A reader that hands every byte it reads to `observe` and counts them.
struct Observed<'a, R: Read> {
    inner: R,
    observe: &'a mut dyn FnMut(&[u8]),
    seen: &'a mut u64,
}

impl<R: Read> Read for Observed<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.observe)(&buf[..n]);
        *self.seen += n as u64;
        Ok(n)
    }
}

impl Snapshot {
    /// Opens `path`: checks the footer (crc, then MAC in the card), then reads the whole file
    /// once in order, checking every section's crc32c, the chain over all sections, the order
    /// and decoding of every entry, the counts and the state digest.
    pub fn open(path: &Path, mac: &dyn FooterMac) -> Result<Snapshot, SnapshotError> {
        Self::open_inner(path, Some(mac), None)
    }

    /// Every check of [`Snapshot::open`] except the MAC (offline inspection without a card, or
    /// a blocking thread that leaves the MAC to [`Snapshot::verify_mac`] on the card's core).
    pub fn open_without_mac(path: &Path) -> Result<Snapshot, SnapshotError> {
        Self::open_inner(path, None, None)
    }

    /// [`Snapshot::open_without_mac`] that also hands every byte of the file, from the first
    /// to the end of the file and in order, to `observe` — the bytes the verifying pass reads,
    /// then the rest of the file after the last section (the footer). A caller that also needs
    /// a whole-file hash (the restore checks the manifest's) gets it from the same single read,
    /// of the very bytes that were checked. On an error, `observe` has seen only a prefix.
    pub fn open_without_mac_observed(
        path: &Path,
        observe: &mut dyn FnMut(&[u8]),
    ) -> Result<Snapshot, SnapshotError> {
        Self::open_inner(path, None, Some(observe))
    }

    /// Checks the footer MAC of a file opened without it (over the footer bytes the open read:
    /// no I/O, so it can run on the card's core).
    pub fn verify_mac(&mut self, mac: &dyn FooterMac) -> Result<(), SnapshotError> {
        let (body, tag) = &self.footer_mac_input;
        mac.verify(body, tag)
            .map_err(|e| SnapshotError::card(&self.path, e))?;
        self.mac_checked = true;
        Ok(())
    }

    fn open_inner(
        path: &Path,
        mac: Option<&dyn FooterMac>,
        observe: Option<Observer<'_>>,
    ) -> Result<Snapshot, SnapshotError> {
        let mut file = File::open(path).map_err(|e| SnapshotError::io(path, e))?;
        let file_bytes = file
            .metadata()
            .map_err(|e| SnapshotError::io(path, e))?
            .len();
        // The verifying pass reads the whole file once, in order: ask for deeper read-ahead.
        // Advice only; a failure changes nothing.
        // SAFETY: posix_fadvise on an fd this function owns; no memory is passed.
        let _ = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
        let (footer, body, tag) = format::read_footer(path, &file, file_bytes)?;
        let footer_mac_input = (body, tag);
        if let Some(m) = mac {
            m.verify(&footer_mac_input.0, &footer_mac_input.1)
                .map_err(|e| SnapshotError::card(path, e))?;
        }
        file.seek(SeekFrom::Start(0))
            .map_err(|e| SnapshotError::io(path, e))?;
        let contents = match observe {
            None => {
                let reader = BufReader::with_capacity(OPEN_READ_BYTES, &mut file);
                SectionReader::new(path, reader, &footer).read_all()?
            }
            Some(observe) => {
                let mut seen = 0u64;
                let contents = {
                    let observed = Observed {
                        inner: &mut file,
                        observe: &mut *observe,
                        seen: &mut seen,
                    };
                    let reader = BufReader::with_capacity(OPEN_READ_BYTES, observed);
                    SectionReader::new(path, reader, &footer).read_all()?
                };
                // The file's offset is where the observed reads stopped: the rest (the footer,
                // whatever read-ahead did not reach) to the end.
                let mut rest = Observed {
                    inner: &mut file,
                    observe,
                    seen: &mut seen,
                };
                std::io::copy(&mut rest, &mut std::io::sink())
                    .map_err(|e| SnapshotError::io(path, e))?;
                if seen != file_bytes {
                    return Err(SnapshotError::corrupt(
                        path,
                        seen,
                        format!("{seen} bytes read, the file had {file_bytes} when opened"),
                    ));
                }
                contents
            }
        };
        Ok(Snapshot {
            path: path.to_path_buf(),
            file,
            footer,
            footer_mac_input,
            mac_checked: mac.is_some(),
            file_bytes,
            contents,
            cache: Mutex::new(BlockCache::default()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn footer(&self) -> &Footer {
        &self.footer
    }
    pub fn lsn(&self) -> u64 {
        self.footer.lsn
    }
    pub fn digest(&self) -> StateDigest {
        self.footer.digest
    }
    pub fn mac_checked(&self) -> bool {
        self.mac_checked
    }
    pub fn file_bytes(&self) -> u64 {
        self.file_bytes
    }
    pub fn index(&self) -> &[BlockIndexEntry] {
        &self.contents.index
    }
    pub fn partitions(&self) -> &[(keyfort_hsm::PartitionId, Vec<u8>)] {
        &self.contents.partitions
    }
    /// Idempotency entries in (partition, id) order.
    pub fn idempotency(&self) -> &[IdempotencyEntry] {
        &self.contents.idempotency
    }
    /// Indices into [`Snapshot::idempotency`] in LSN order.
    pub fn idempotency_by_lsn(&self) -> &[u32] {
        &self.contents.idempotency_by_lsn
    }
    pub fn cluster_config(&self) -> Option<&[u8]> {
        self.contents.cluster_config.as_deref()
    }

    /// One key version: index → one block (from the cache, or read and crc-checked); only the
    /// matching entry is decoded.
    pub fn get(&self, slot: KeySlot) -> Result<Option<KeyEntry>, SnapshotError> {
        let mut found = None;
        self.scan(slot, slot, &mut |e| {
            found = Some(e);
            false
        })?;
        Ok(found)
    }

    /// Calls `f` with the key versions in `lo..=hi` in order until it returns false. Entries
    /// are compared by their slot bytes; only those in range are decoded.
    pub fn scan(
        &self,
        lo: KeySlot,
        hi: KeySlot,
        f: &mut dyn FnMut(KeyEntry) -> bool,
    ) -> Result<(), SnapshotError> {
        let index = &self.contents.index;
        let mut i = index.partition_point(|b| b.first <= lo).saturating_sub(1);
        while i < index.len() && index[i].first <= hi {
            let entry = &index[i];
            let body = self.block(i)?;
            for r in format::block_entries(&self.path, entry, &body) {
                let (slot, b) = r?;
                if slot < lo {
                    continue;
                }
                if slot > hi {
                    return Ok(());
                }
                let e = KeyEntry::decode(b)
                    .map_err(|e| SnapshotError::corrupt(&self.path, entry.offset, e.to_string()))?;
                if !f(e) {
                    return Ok(());
                }
            }
            i += 1;
        }
        Ok(())
    }

    /// The checked body of data block `i`, from the cache or read with `pread`.
    fn block(&self, i: usize) -> Result<Arc<[u8]>, SnapshotError> {
        if let Some(b) = self.cache.lock().expect("block cache").get(i) {
            return Ok(b);
        }
        let body: Arc<[u8]> = self.read_block(i)?.into();
        self.cache.lock().expect("block cache").put(i, body.clone());
        Ok(body)
    }

    /// Reads data block `i` with `pread` and checks it; returns its body (without the crc).
    fn read_block(&self, i: usize) -> Result<Vec<u8>, SnapshotError> {
        let entry = &self.contents.index[i];
        let mut buf = vec![0u8; entry.len as usize];
        self.file
            .read_exact_at(&mut buf, entry.offset)
            .map_err(|e| SnapshotError::io(&self.path, e))?;
        let body_len = format::check_block(&self.path, entry, &buf)?.len();
        buf.truncate(body_len);
        Ok(buf)
    }

    /// Reads and checks data block `i`, bypassing the cache, and calls `f` with the slot and
    /// canonical bytes of each entry in order (sequential merges).
    pub(crate) fn visit_block(
        &self,
        i: usize,
        f: &mut EntryVisitor<'_>,
    ) -> Result<(), SnapshotError> {
        let body = self.read_block(i)?;
        for r in format::block_entries(&self.path, &self.contents.index[i], &body) {
            let (slot, b) = r?;
            f(slot, b)?;
        }
        Ok(())
    }
}

/// What [`Snapshot::visit_block`] calls with each entry's slot and canonical bytes.
pub(crate) type EntryVisitor<'a> = dyn FnMut(KeySlot, &[u8]) -> Result<(), SnapshotError> + 'a;

/// Checked block bodies, at most [`BLOCK_CACHE_BLOCKS_MAX`], evicted by CLOCK (second chance):
/// a hit only sets a bit, a miss advances the hand past recently used blocks.
#[derive(Default)]
struct BlockCache {
    slot_of: HashMap<usize, usize>,
    /// (block number, body, used since the hand last passed).
    slots: Vec<(usize, Arc<[u8]>, bool)>,
    hand: usize,
}

impl BlockCache {
    fn get(&mut self, i: usize) -> Option<Arc<[u8]>> {
        let s = &mut self.slots[*self.slot_of.get(&i)?];
        s.2 = true;
        Some(s.1.clone())
    }
    fn put(&mut self, i: usize, b: Arc<[u8]>) {
        if self.slot_of.contains_key(&i) {
            return;
        }
        if self.slots.len() < BLOCK_CACHE_BLOCKS_MAX {
            self.slot_of.insert(i, self.slots.len());
            self.slots.push((i, b, true));
            return;
        }
        loop {
            let hand = self.hand;
            self.hand = (hand + 1) % self.slots.len();
            let s = &mut self.slots[hand];
            if s.2 {
                s.2 = false;
                continue;
            }
            self.slot_of.remove(&s.0);
            *s = (i, b, true);
            self.slot_of.insert(i, hand);
            return;
        }
    }
}

/// Reads `n` bytes at the reader's position or fails as corruption naming `offset`.
pub(crate) fn read_exact_or_corrupt(
    path: &Path,
    r: &mut impl Read,
    buf: &mut [u8],
    offset: u64,
    what: &str,
) -> Result<(), SnapshotError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            SnapshotError::corrupt(path, offset, format!("{what}: file ends early"))
        } else {
            SnapshotError::io(path, e)
        }
    })
}

pub(crate) fn write_all(w: &mut impl Write, b: &[u8]) -> std::io::Result<()> {
    w.write_all(b)
}
