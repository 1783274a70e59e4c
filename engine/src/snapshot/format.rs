//! Byte layout of a snapshot file (docs/format.md §4): sections, footer, tail; the sequential
//! verifying reader and the writer. Every section is `body ‖ crc32c(body)`; the chain runs over
//! all sections in file order.

use super::{read_exact_or_corrupt, write_all, Contents, SnapshotError, CONF_MEMBERS_MAX};
use crate::state::payload::{put_bytes32, PayloadError, Reader};
use crate::state::{
    digest_cluster, digest_idempotency, digest_key_bytes, digest_partition, IdempotencyEntry,
    KeyEntry, KeySlot, StateDigest, BLOB_BYTES_MAX, CLUSTER_CONFIG_BYTES_MAX,
    IDEMPOTENCY_ENTRY_BYTES, METADATA_BYTES_MAX, PARTITION_CONFIG_BYTES_MAX,
};
use keyfort_hsm::format::MAC_LEN;
use keyfort_hsm::{KeyId, PartitionId};
use std::io::{Read, Write};
use std::path::Path;
use xxhash_rust::xxh3::Xxh3;

pub const SNAPSHOT_VERSION: u8 = 1;
/// First 8 bytes of every snapshot file: "KFSN", version, 3 reserved zero bytes.
pub const FILE_HEADER: [u8; 8] = [b'K', b'F', b'S', b'N', SNAPSHOT_VERSION, 0, 0, 0];
/// "KFSF": first bytes of the footer.
const FOOTER_MAGIC: &[u8; 4] = b"KFSF";
/// "KFSE": last bytes of the file.
const TAIL_MAGIC: &[u8; 4] = b"KFSE";
/// Data blocks close once they reach this size: large enough for sequential reads at disk
/// speed, small enough that a point lookup reads and checks little.
pub const BLOCK_BYTES_TARGET: usize = 16 * 1024;
/// Footer bytes before the member lists.
pub const FOOTER_FIXED_BYTES: usize = 136;
/// Tail: footer length (u32) and magic.
pub const TAIL_BYTES: usize = 8;
/// Largest encoded key entry, and so the most a block exceeds its target by.
const ENTRY_BYTES_MAX: usize = 1 + 39 + 1 + 8 + 2 + METADATA_BYTES_MAX + 2 + BLOB_BYTES_MAX;
const INDEX_ENTRY_BYTES: usize = 52;
const _: () = assert!(ENTRY_BYTES_MAX <= u16::MAX as usize);

/// The footer (§4.6). Everything here is covered by its crc32c and by the MAC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    pub lsn: u64,
    pub term: u64,
    pub chain_head: u64,
    pub digest: StateDigest,
    pub idempotency_window_lsns: u64,
    pub key_count: u64,
    pub block_count: u32,
    pub partition_count: u32,
    pub idempotency_count: u32,
    pub index_offset: u64,
    pub partitions_offset: u64,
    pub idempotency_offset: u64,
    pub cluster_offset: u64,
    pub footer_offset: u64,
    /// xxh3-64 chain over every section (data blocks, index, partitions, idempotency, cluster
    /// config) in file order, each hash seeded with the previous; the first with 0.
    pub sections_chain: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

impl Footer {
    /// Footer bytes including the trailing crc32c: what the MAC covers.
    pub fn encode_body(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(FOOTER_FIXED_BYTES + 8 * (self.voters.len() + 4));
        w.extend_from_slice(FOOTER_MAGIC);
        w.extend_from_slice(&[SNAPSHOT_VERSION, 0, 0, 0]);
        for v in [self.lsn, self.term, self.chain_head] {
            w.extend_from_slice(&v.to_le_bytes());
        }
        w.extend_from_slice(&self.digest.to_bytes());
        w.extend_from_slice(&self.idempotency_window_lsns.to_le_bytes());
        w.extend_from_slice(&self.key_count.to_le_bytes());
        for v in [
            self.block_count,
            self.partition_count,
            self.idempotency_count,
        ] {
            w.extend_from_slice(&v.to_le_bytes());
        }
        w.extend_from_slice(&[0; 4]);
        for v in [
            self.index_offset,
            self.partitions_offset,
            self.idempotency_offset,
            self.cluster_offset,
            self.footer_offset,
            self.sections_chain,
        ] {
            w.extend_from_slice(&v.to_le_bytes());
        }
        w.extend_from_slice(&(self.voters.len() as u32).to_le_bytes());
        w.extend_from_slice(&(self.learners.len() as u32).to_le_bytes());
        debug_assert_eq!(w.len(), FOOTER_FIXED_BYTES);
        for v in self.voters.iter().chain(&self.learners) {
            w.extend_from_slice(&v.to_le_bytes());
        }
        let crc = crc32c::crc32c(&w);
        w.extend_from_slice(&crc.to_le_bytes());
        w
    }

    fn decode_body(b: &[u8]) -> Result<Footer, PayloadError> {
        let mut r = Reader::new(b, "footer");
        if &r.array::<4>("magic")? != FOOTER_MAGIC {
            return Err(r.bad("magic", 0));
        }
        match r.u8("version")? {
            SNAPSHOT_VERSION => {}
            version => {
                return Err(PayloadError::BadVersion {
                    what: "footer",
                    version,
                })
            }
        }
        if r.array::<3>("reserved")? != [0; 3] {
            return Err(r.bad("reserved", 0));
        }
        let lsn = r.u64("lsn")?;
        let term = r.u64("term")?;
        let chain_head = r.u64("chain head")?;
        let digest = StateDigest::from_bytes(r.array("digest")?);
        let idempotency_window_lsns = r.u64("idempotency window")?;
        if idempotency_window_lsns == 0 {
            return Err(r.bad("idempotency window", 0));
        }
        let key_count = r.u64("key count")?;
        let block_count = r.u32("block count")?;
        let partition_count = r.u32("partition count")?;
        let idempotency_count = r.u32("idempotency count")?;
        if r.u32("reserved")? != 0 {
            return Err(r.bad("reserved", 1));
        }
        let index_offset = r.u64("index offset")?;
        let partitions_offset = r.u64("partitions offset")?;
        let idempotency_offset = r.u64("idempotency offset")?;
        let cluster_offset = r.u64("cluster offset")?;
        let footer_offset = r.u64("footer offset")?;
        let sections_chain = r.u64("sections chain")?;
        let voters_n = r.u32("voter count")? as usize;
        let learners_n = r.u32("learner count")? as usize;
        if voters_n + learners_n > CONF_MEMBERS_MAX {
            return Err(r.bad("member count", (voters_n + learners_n) as u64));
        }
        let mut members = Vec::with_capacity(voters_n + learners_n);
        for _ in 0..voters_n + learners_n {
            members.push(r.u64("member")?);
        }
        r.u32("crc")?;
        r.finish()?;
        let learners = members.split_off(voters_n);
        let offsets = [
            FILE_HEADER.len() as u64,
            index_offset,
            partitions_offset,
            idempotency_offset,
            cluster_offset,
            footer_offset,
        ];
        // Every section holds at least its crc and a count.
        if offsets.windows(2).enumerate().any(|(i, w)| {
            let min = if i == 0 { 0 } else { 5 };
            w[1] < w[0].saturating_add(min)
        }) {
            return Err(r.bad("section offsets", index_offset));
        }
        Ok(Footer {
            lsn,
            term,
            chain_head,
            digest,
            idempotency_window_lsns,
            key_count,
            block_count,
            partition_count,
            idempotency_count,
            index_offset,
            partitions_offset,
            idempotency_offset,
            cluster_offset,
            footer_offset,
            sections_chain,
            voters: members,
            learners,
        })
    }
}

/// One block index entry (§4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockIndexEntry {
    /// Key of the block's first entry.
    pub first: KeySlot,
    pub offset: u64,
    /// Bytes of the block including its crc.
    pub len: u32,
    pub entries: u32,
}

pub(crate) fn encode_tail(footer_bytes: usize) -> [u8; TAIL_BYTES] {
    let mut t = [0u8; TAIL_BYTES];
    t[0..4].copy_from_slice(&(footer_bytes as u32).to_le_bytes());
    t[4..8].copy_from_slice(TAIL_MAGIC);
    t
}

/// Reads and checks the footer from the end of the file: returns it, its bytes (what the MAC
/// covers) and the MAC.
pub(crate) fn read_footer(
    path: &Path,
    file: &std::fs::File,
    file_bytes: u64,
) -> Result<(Footer, Vec<u8>, [u8; MAC_LEN]), SnapshotError> {
    use std::os::unix::fs::FileExt;
    let min = (FILE_HEADER.len() + FOOTER_FIXED_BYTES + 4 + MAC_LEN + TAIL_BYTES) as u64;
    if file_bytes < min {
        return Err(SnapshotError::corrupt(
            path,
            file_bytes,
            format!("file of {file_bytes} bytes is shorter than the smallest snapshot ({min})"),
        ));
    }
    let io = |e| SnapshotError::io(path, e);
    let tail_offset = file_bytes - TAIL_BYTES as u64;
    let mut tail = [0u8; TAIL_BYTES];
    file.read_exact_at(&mut tail, tail_offset).map_err(io)?;
    if &tail[4..8] != TAIL_MAGIC {
        return Err(SnapshotError::corrupt(
            path,
            tail_offset + 4,
            "bad tail magic",
        ));
    }
    let body_len = u32::from_le_bytes(tail[0..4].try_into().expect("4 bytes")) as usize;
    let body_max = FOOTER_FIXED_BYTES + 8 * CONF_MEMBERS_MAX + 4;
    let start = tail_offset
        .checked_sub((body_len + MAC_LEN) as u64)
        .filter(|s| *s >= FILE_HEADER.len() as u64);
    let start = match start {
        Some(s) if (FOOTER_FIXED_BYTES + 4..=body_max).contains(&body_len) => s,
        _ => {
            return Err(SnapshotError::corrupt(
                path,
                tail_offset,
                format!("footer length {body_len} out of range"),
            ))
        }
    };
    let mut buf = vec![0u8; body_len + MAC_LEN];
    file.read_exact_at(&mut buf, start).map_err(io)?;
    let mac: [u8; MAC_LEN] = buf[body_len..].try_into().expect("MAC_LEN bytes");
    buf.truncate(body_len);
    let crc = u32::from_le_bytes(buf[body_len - 4..].try_into().expect("4 bytes"));
    if crc32c::crc32c(&buf[..body_len - 4]) != crc {
        return Err(SnapshotError::corrupt(
            path,
            start,
            "footer crc32c mismatch",
        ));
    }
    let footer = Footer::decode_body(&buf)
        .map_err(|e| SnapshotError::corrupt(path, start, e.to_string()))?;
    if footer.footer_offset != start {
        return Err(SnapshotError::corrupt(
            path,
            start,
            format!("footer says it starts at {}", footer.footer_offset),
        ));
    }
    Ok((footer, buf, mac))
}

/// Accumulates one data block's body: `count u32 ‖ (len u16 ‖ key entry)*`.
#[derive(Default)]
pub(crate) struct BlockBuilder {
    body: Vec<u8>,
    count: u32,
    first: Option<KeySlot>,
}

impl BlockBuilder {
    /// Appends one entry's canonical bytes (§3.7); `slot` is its slot.
    pub(crate) fn push(&mut self, slot: KeySlot, b: &[u8]) {
        if self.body.is_empty() {
            self.body.extend_from_slice(&[0; 4]);
            self.first = Some(slot);
        }
        self.body.extend_from_slice(&(b.len() as u16).to_le_bytes());
        self.body.extend_from_slice(b);
        self.count += 1;
    }
    pub(crate) fn bytes(&self) -> usize {
        self.body.len()
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Writes sections, keeping the offset and the chain.
pub(crate) struct SectionWriter<W: Write> {
    w: W,
    offset: u64,
    chain: u64,
}

impl<W: Write> SectionWriter<W> {
    pub(crate) fn new(w: W) -> Self {
        SectionWriter {
            w,
            offset: 0,
            chain: 0,
        }
    }
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }
    pub(crate) fn chain(&self) -> u64 {
        self.chain
    }
    pub(crate) fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }
    pub(crate) fn raw(&mut self, b: &[u8]) -> std::io::Result<()> {
        write_all(&mut self.w, b)?;
        self.offset += b.len() as u64;
        Ok(())
    }
    /// Writes `body ‖ crc32c(body)`; returns the section's length.
    pub(crate) fn section(&mut self, body: &[u8]) -> std::io::Result<u32> {
        let crc = crc32c::crc32c(body).to_le_bytes();
        self.chain = chain_section(self.chain, body, &crc);
        self.raw(body)?;
        self.raw(&crc)?;
        Ok((body.len() + 4) as u32)
    }
    pub(crate) fn block(&mut self, b: &mut BlockBuilder) -> std::io::Result<BlockIndexEntry> {
        let mut done = std::mem::take(b);
        done.body[0..4].copy_from_slice(&done.count.to_le_bytes());
        let offset = self.offset;
        let len = self.section(&done.body)?;
        Ok(BlockIndexEntry {
            first: done
                .first
                .expect("a block is written only when it holds entries"),
            offset,
            len,
            entries: done.count,
        })
    }
}

fn chain_section(seed: u64, body: &[u8], crc: &[u8; 4]) -> u64 {
    let mut h = Xxh3::with_seed(seed);
    h.update(body);
    h.update(crc);
    h.digest()
}

fn put_slot(w: &mut Vec<u8>, s: &KeySlot) {
    w.extend_from_slice(&s.0 .0);
    w.extend_from_slice(&s.1 .0);
    w.extend_from_slice(&s.2.to_le_bytes());
}

pub(crate) fn encode_index(index: &[BlockIndexEntry]) -> Vec<u8> {
    let mut w = Vec::with_capacity(4 + index.len() * INDEX_ENTRY_BYTES);
    w.extend_from_slice(&(index.len() as u32).to_le_bytes());
    for e in index {
        put_slot(&mut w, &e.first);
        w.extend_from_slice(&e.offset.to_le_bytes());
        w.extend_from_slice(&e.len.to_le_bytes());
        w.extend_from_slice(&e.entries.to_le_bytes());
    }
    w
}

pub(crate) fn encode_partitions<'a>(
    partitions: impl Iterator<Item = (&'a PartitionId, &'a Vec<u8>)>,
) -> Vec<u8> {
    let mut w = vec![0u8; 4];
    let mut n = 0u32;
    for (p, c) in partitions {
        w.extend_from_slice(&p.0);
        put_bytes32(&mut w, c, PARTITION_CONFIG_BYTES_MAX);
        n += 1;
    }
    w[0..4].copy_from_slice(&n.to_le_bytes());
    w
}

pub(crate) fn encode_idempotency(entries: &[IdempotencyEntry]) -> Vec<u8> {
    let mut w = vec![0u8; 4];
    let mut n = 0u32;
    for e in entries {
        w.extend_from_slice(&e.encode());
        n += 1;
    }
    w[0..4].copy_from_slice(&n.to_le_bytes());
    w
}

pub(crate) fn encode_cluster(c: Option<&[u8]>) -> Vec<u8> {
    let mut w = Vec::new();
    match c {
        None => w.push(0),
        Some(c) => {
            w.push(1);
            put_bytes32(&mut w, c, CLUSTER_CONFIG_BYTES_MAX);
        }
    }
    w
}

/// Checks one data block read from disk (`buf` = body ‖ crc): crc first, then its entry count
/// against the index. Returns the body.
pub(crate) fn check_block<'b>(
    path: &Path,
    entry: &BlockIndexEntry,
    buf: &'b [u8],
) -> Result<&'b [u8], SnapshotError> {
    let corrupt = |what: String| SnapshotError::corrupt(path, entry.offset, what);
    let Some(body_len) = buf.len().checked_sub(4) else {
        return Err(corrupt("block shorter than its crc".into()));
    };
    let crc = u32::from_le_bytes(buf[body_len..].try_into().expect("4 bytes"));
    if crc32c::crc32c(&buf[..body_len]) != crc {
        return Err(corrupt("data block crc32c mismatch".into()));
    }
    let body = &buf[..body_len];
    let count = body
        .get(0..4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
    if count != Some(entry.entries) {
        return Err(corrupt(format!(
            "block holds {count:?} entries, index says {}",
            entry.entries
        )));
    }
    Ok(body)
}

/// The key entries of a checked block body, in order, each with its slot read from its bytes
/// (`KeyEntry::slot_of`) and not decoded further. A length running past the body, or an entry
/// too short for a slot, is corruption (a block can only get here with a good crc, so that takes
/// a deliberate edit).
pub(crate) fn block_entries<'b>(
    path: &'b Path,
    entry: &'b BlockIndexEntry,
    body: &'b [u8],
) -> impl Iterator<Item = Result<(KeySlot, &'b [u8]), SnapshotError>> + 'b {
    let mut at = 4usize;
    let mut left = entry.entries;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        left -= 1;
        let bad = |what: &str| SnapshotError::corrupt(path, entry.offset, what);
        let e = body
            .get(at..at + 2)
            .map(|len| 2 + u16::from_le_bytes([len[0], len[1]]) as usize)
            .and_then(|n| body.get(at + 2..at + n));
        let Some(e) = e else {
            left = 0;
            return Some(Err(bad("entry runs past its block")));
        };
        at += 2 + e.len();
        match KeyEntry::slot_of(e) {
            Some(slot) => Some(Ok((slot, e))),
            None => {
                left = 0;
                Some(Err(bad("short key entry")))
            }
        }
    })
}

/// The single sequential verifying pass over the sections of a file.
pub(crate) struct SectionReader<'a, R: Read> {
    path: &'a Path,
    r: R,
    footer: &'a Footer,
    pos: u64,
    chain: u64,
    digest: StateDigest,
    /// Reused between data blocks: body bytes and (offset, length) of each entry.
    block_buf: Vec<u8>,
    spans: Vec<(usize, usize)>,
}

impl<'a, R: Read> SectionReader<'a, R> {
    pub(crate) fn new(path: &'a Path, r: R, footer: &'a Footer) -> Self {
        SectionReader {
            path,
            r,
            footer,
            pos: 0,
            chain: 0,
            digest: StateDigest::default(),
            block_buf: Vec::new(),
            spans: Vec::new(),
        }
    }

    fn corrupt(&self, offset: u64, what: impl Into<String>) -> SnapshotError {
        SnapshotError::corrupt(self.path, offset, what)
    }

    /// Reads `n` bytes of the section region, never past `limit`.
    fn read(&mut self, n: usize, limit: u64, what: &str) -> Result<Vec<u8>, SnapshotError> {
        let mut buf = Vec::new();
        self.read_into(&mut buf, n, limit, what)?;
        Ok(buf)
    }

    fn crc_and_chain(
        &mut self,
        start: u64,
        body: &[u8],
        limit: u64,
        what: &str,
    ) -> Result<(), SnapshotError> {
        let crc: [u8; 4] = self.read(4, limit, what)?.try_into().expect("4 bytes");
        if crc32c::crc32c(body) != u32::from_le_bytes(crc) {
            return Err(self.corrupt(start, format!("{what} crc32c mismatch")));
        }
        self.chain = chain_section(self.chain, body, &crc);
        Ok(())
    }

    pub(crate) fn read_all(mut self) -> Result<Contents, SnapshotError> {
        let f = self.footer;
        let header = self.read(FILE_HEADER.len(), f.index_offset, "file header")?;
        if header != FILE_HEADER {
            return Err(self.corrupt(0, "bad file header (magic, version or reserved)"));
        }
        let mut blocks = Vec::new();
        let mut last: Option<KeySlot> = None;
        let mut key_count = 0u64;
        while self.pos < f.index_offset {
            let b = self.read_block(&mut last)?;
            key_count += b.entries as u64;
            blocks.push(b);
        }
        if blocks.len() as u64 != f.block_count as u64 || key_count != f.key_count {
            return Err(self.corrupt(
                f.footer_offset,
                format!(
                    "{} blocks with {key_count} keys, footer says {} with {}",
                    blocks.len(),
                    f.block_count,
                    f.key_count
                ),
            ));
        }
        let index = self.read_index(&blocks)?;
        let partitions = self.read_partitions()?;
        let idempotency = self.read_idempotency()?;
        let cluster_config = self.read_cluster()?;
        if self.chain != f.sections_chain {
            return Err(self.corrupt(f.footer_offset, "sections chain mismatch"));
        }
        if self.digest != f.digest {
            return Err(self.corrupt(
                f.footer_offset,
                format!(
                    "state digest {} differs from the footer's {}",
                    self.digest, f.digest
                ),
            ));
        }
        let mut by_lsn: Vec<(u64, u32)> = idempotency
            .iter()
            .enumerate()
            .map(|(i, e)| (e.lsn, i as u32))
            .collect();
        by_lsn.sort_unstable();
        let idempotency_by_lsn = by_lsn.into_iter().map(|(_, i)| i).collect();
        Ok(Contents {
            index,
            partitions,
            idempotency,
            idempotency_by_lsn,
            cluster_config,
        })
    }

    /// Appends `n` bytes of the section region to `buf`, never reading past `limit`.
    fn read_into(
        &mut self,
        buf: &mut Vec<u8>,
        n: usize,
        limit: u64,
        what: &str,
    ) -> Result<(), SnapshotError> {
        if self.pos + n as u64 > limit {
            return Err(self.corrupt(self.pos, format!("{what} runs past offset {limit}")));
        }
        let at = buf.len();
        buf.resize(at + n, 0);
        read_exact_or_corrupt(self.path, &mut self.r, &mut buf[at..], self.pos, what)?;
        self.pos += n as u64;
        Ok(())
    }

    fn read_block(&mut self, last: &mut Option<KeySlot>) -> Result<BlockIndexEntry, SnapshotError> {
        let limit = self.footer.index_offset;
        let start = self.pos;
        let mut body = std::mem::take(&mut self.block_buf);
        body.clear();
        self.read_into(&mut body, 4, limit, "data block entry count")?;
        let count = u32::from_le_bytes(body[0..4].try_into().expect("4 bytes"));
        let mut spans = std::mem::take(&mut self.spans);
        spans.clear();
        for _ in 0..count {
            self.read_into(&mut body, 2, limit, "data block entry length")?;
            let len = u16::from_le_bytes([body[body.len() - 2], body[body.len() - 1]]) as usize;
            spans.push((body.len(), len));
            self.read_into(&mut body, len, limit, "data block entry")?;
        }
        self.crc_and_chain(start, &body, limit, "data block")?;
        let mut first = None;
        for &(at, len) in &spans {
            let offset = start + at as u64;
            let b = &body[at..at + len];
            let e = KeyEntry::decode_ref(b).map_err(|e| self.corrupt(offset, e.to_string()))?;
            let slot = e.slot();
            if last.is_some_and(|l| l >= slot) {
                return Err(self.corrupt(offset, "key entries out of order"));
            }
            *last = Some(slot);
            first.get_or_insert(slot);
            self.digest.0 = self.digest.0.wrapping_add(digest_key_bytes(b));
        }
        self.spans = spans;
        self.block_buf = body;
        let Some(first) = first else {
            return Err(self.corrupt(start, "empty data block"));
        };
        Ok(BlockIndexEntry {
            first,
            offset: start,
            len: (self.pos - start) as u32,
            entries: count,
        })
    }

    /// Reads the body and crc of the section spanning `[self.pos, end)`.
    fn section(&mut self, end: u64, what: &str) -> Result<(u64, Vec<u8>), SnapshotError> {
        let start = self.pos;
        if end < start + 4 {
            return Err(self.corrupt(start, format!("{what} section too short")));
        }
        let body = self.read((end - start - 4) as usize, end, what)?;
        self.crc_and_chain(start, &body, end, what)?;
        Ok((start, body))
    }

    fn read_index(
        &mut self,
        blocks: &[BlockIndexEntry],
    ) -> Result<Vec<BlockIndexEntry>, SnapshotError> {
        let (start, body) = self.section(self.footer.partitions_offset, "block index")?;
        let corrupt = |e: PayloadError| SnapshotError::corrupt(self.path, start, e.to_string());
        let mut r = Reader::new(&body, "block index");
        let n = r.u32("count").map_err(corrupt)? as usize;
        let mut index = Vec::with_capacity(n.min(blocks.len()));
        for _ in 0..n {
            let e = BlockIndexEntry {
                first: (
                    PartitionId(r.array("partition id").map_err(corrupt)?),
                    KeyId(r.array("key id").map_err(corrupt)?),
                    r.u32("version").map_err(corrupt)?,
                ),
                offset: r.u64("offset").map_err(corrupt)?,
                len: r.u32("length").map_err(corrupt)?,
                entries: r.u32("entries").map_err(corrupt)?,
            };
            index.push(e);
        }
        r.finish().map_err(corrupt)?;
        if index != blocks {
            return Err(self.corrupt(start, "block index does not match the data blocks"));
        }
        Ok(index)
    }

    fn read_partitions(&mut self) -> Result<Vec<(PartitionId, Vec<u8>)>, SnapshotError> {
        let (start, body) = self.section(self.footer.idempotency_offset, "partitions")?;
        let corrupt = |e: PayloadError| SnapshotError::corrupt(self.path, start, e.to_string());
        let mut r = Reader::new(&body, "partitions");
        let n = r.u32("count").map_err(corrupt)?;
        let mut out: Vec<(PartitionId, Vec<u8>)> = Vec::new();
        for _ in 0..n {
            let p = PartitionId(r.array("partition id").map_err(corrupt)?);
            let c = r
                .bytes32("config", PARTITION_CONFIG_BYTES_MAX)
                .map_err(corrupt)?;
            if out.last().is_some_and(|(l, _)| *l >= p) {
                return Err(self.corrupt(start, "partitions out of order"));
            }
            self.digest.0 = self.digest.0.wrapping_add(digest_partition(&p, &c));
            out.push((p, c));
        }
        r.finish().map_err(corrupt)?;
        if n != self.footer.partition_count {
            return Err(self.corrupt(start, "partition count differs from the footer's"));
        }
        Ok(out)
    }

    fn read_idempotency(&mut self) -> Result<Vec<IdempotencyEntry>, SnapshotError> {
        let (start, body) = self.section(self.footer.cluster_offset, "idempotency table")?;
        let corrupt = |e: PayloadError| SnapshotError::corrupt(self.path, start, e.to_string());
        let mut r = Reader::new(&body, "idempotency table");
        let n = r.u32("count").map_err(corrupt)?;
        let mut out: Vec<IdempotencyEntry> = Vec::new();
        let f = self.footer;
        for _ in 0..n {
            let b = r.take(IDEMPOTENCY_ENTRY_BYTES, "entry").map_err(corrupt)?;
            let e = IdempotencyEntry::decode(b).map_err(corrupt)?;
            if out
                .last()
                .is_some_and(|l| (l.partition, l.id) >= (e.partition, e.id))
            {
                return Err(self.corrupt(start, "idempotency entries out of order"));
            }
            // Only live entries are stored: made at or below the LSN, not yet expired there.
            if e.lsn > f.lsn || e.lsn.saturating_add(f.idempotency_window_lsns) <= f.lsn {
                return Err(self.corrupt(
                    start,
                    format!("idempotency entry of lsn {} not live", e.lsn),
                ));
            }
            self.digest.0 = self.digest.0.wrapping_add(digest_idempotency(&e));
            out.push(e);
        }
        r.finish().map_err(corrupt)?;
        if n != f.idempotency_count {
            return Err(self.corrupt(start, "idempotency count differs from the footer's"));
        }
        Ok(out)
    }

    fn read_cluster(&mut self) -> Result<Option<Vec<u8>>, SnapshotError> {
        let (start, body) = self.section(self.footer.footer_offset, "cluster config")?;
        let corrupt = |e: PayloadError| SnapshotError::corrupt(self.path, start, e.to_string());
        let mut r = Reader::new(&body, "cluster config");
        let c = match r.u8("present").map_err(corrupt)? {
            0 => None,
            1 => Some(
                r.bytes32("config", CLUSTER_CONFIG_BYTES_MAX)
                    .map_err(corrupt)?,
            ),
            v => return Err(corrupt(r.bad("present", v as u64))),
        };
        r.finish().map_err(corrupt)?;
        if let Some(c) = &c {
            self.digest.0 = self.digest.0.wrapping_add(digest_cluster(c));
        }
        Ok(c)
    }
}
