//! Snapshot streaming between nodes (docs/format.md §6.11): a follower fetches a keyfort snapshot
//! file from a peer in `PEER_SNAPSHOT_CHUNK` frames and stores it durably; verifying it
//! (`keyfort_engine::snapshot::Snapshot::open` with the card) and stepping it into raft are the
//! caller's.
//!
//! **Server.** [`PeerTransport::serve_snapshots`] installs a [`SnapshotResolver`] (shard, lsn,
//! term → file path). An authenticated inbound connection whose first frame is a
//! `PEER_SNAPSHOT_CHUNK_REQUEST` is a *snapshot connection* (see [`crate::transport`]): each
//! request is answered, in order, by one `PEER_SNAPSHOT_CHUNK` with the same request id and the
//! `RESPONSE` flag, holding `min(max_len, size - offset)` bytes at `offset`; or by an error frame
//! (flags `RESPONSE | ERROR`, opcode `PEER_SNAPSHOT_CHUNK`, payload [`StreamErrorPayload`]). The
//! range is read with glommio's io_uring ([`BufferedFile::read_at`]), never a blocking read on
//! the executor. A malformed request or another opcode closes the connection (a protocol error);
//! an idle one is closed after [`SNAPSHOT_IDLE_TIMEOUT`].
//!
//! **Fetcher.** [`fetch_snapshot`] dials the peer on its *own* connection (the transport's
//! handshake, prover and identity), asks for the first chunk (which tells the file size), then
//! keeps [`STREAM_WINDOW_CHUNKS`] requests of [`STREAM_CHUNK_BYTES`] in flight, writing each
//! verified chunk into `dest` + [`PARTIAL_SUFFIX`] with O_DIRECT (glommio `DmaFile`, at most
//! [`MAX_WRITES_IN_FLIGHT`] writes in flight while it goes on receiving; the last chunk is padded
//! to the alignment and the file truncated to its size at the end). Every chunk's crc32c, identity
//! (shard, lsn, term), offset, length and the file size are checked; a corrupt chunk is refused and
//! asked for again (at most [`MAX_CHUNK_RETRIES`] times per chunk). A broken connection (I/O error,
//! EOF, a frame that does not decode, no answer within [`CHUNK_RESPONSE_TIMEOUT`]) is redialed with
//! backoff ([`RESUME_BACKOFF_MIN`] doubling to [`RESUME_BACKOFF_MAX`]) and the transfer resumes
//! from the verified prefix (at most [`MAX_RESUMES`] times; at most [`MAX_DIAL_ATTEMPTS`] failed
//! dials in a row). At the end the partial file is fdatasynced, renamed to `dest`, and the
//! directory is synced. On any error the partial file is removed and `dest` is not touched.

use crate::frame::{self, flags, FrameHeader};
use crate::peer::{
    PeerError, SnapshotChunk, SnapshotChunkRequest, MAX_SNAPSHOT_CHUNK_BYTES, PEER_SNAPSHOT_CHUNK,
    PEER_SNAPSHOT_CHUNK_REQUEST, SNAPSHOT_CHUNK_HEADER_LEN,
};
use crate::tls::Stream;
use crate::transport::{within, write_out, ConnError, FrameReader, PeerTransport, WRITE_TIMEOUT};
use futures_lite::AsyncWriteExt;
use glommio::io::{BufferedFile, Directory, DmaFile};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tracing::{debug, warn};

/// Maps (shard, lsn, term) to the path of that snapshot file, or `None` when this node does not
/// have it.
pub type SnapshotResolver = Rc<dyn Fn(u32, u64, u64) -> Option<PathBuf>>;

/// Names a node's newest snapshot file of a shard and its LSN (`None`: it has none): what a
/// chunk request for [`NEWEST_LSN`] reads (the snapshot manager's poll, docs/format.md §6.11).
pub type NewestResolver = Rc<dyn Fn(u32) -> Option<(u64, PathBuf)>>;

/// The LSN a chunk request names to ask for the node's newest snapshot of the shard; the chunk
/// answering it carries that snapshot's LSN (and term 0: the asker fetches by LSN).
pub const NEWEST_LSN: u64 = u64::MAX;

/// Chunk requests the fetcher keeps in flight on its connection.
pub const STREAM_WINDOW_CHUNKS: usize = 4;
/// Bytes the fetcher asks for per chunk (the protocol's maximum).
pub const STREAM_CHUNK_BYTES: usize = MAX_SNAPSHOT_CHUNK_BYTES;
/// Most times one chunk is asked for again after arriving corrupt.
pub const MAX_CHUNK_RETRIES: u32 = 4;
/// Most times a transfer resumes after its connection broke.
pub const MAX_RESUMES: u32 = 8;
/// Most failed dials (connect or handshake I/O) in a row before the peer is unreachable.
pub const MAX_DIAL_ATTEMPTS: u32 = 5;
/// First wait before redialing after a failure.
pub const RESUME_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest wait between redials (the backoff doubles up to it).
pub const RESUME_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Longest the fetcher waits for the next answer before it deems the connection broken.
pub const CHUNK_RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a snapshot connection may sit without a request before the server closes it.
pub const SNAPSHOT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most chunk writes the fetcher keeps in flight to its disk while it goes on receiving.
pub const MAX_WRITES_IN_FLIGHT: usize = 4;
/// Appended to `dest` for the file being written.
pub const PARTIAL_SUFFIX: &str = ".partial";
/// Bytes of an error payload: code (u16 LE), detail (u64 LE).
pub const STREAM_ERROR_LEN: usize = 2 + 8;

/// Codes of the error payload (docs/format.md §6.11).
pub mod error_code {
    /// The node has no snapshot with this (shard, lsn, term). Detail 0.
    pub const UNKNOWN_SNAPSHOT: u16 = 1;
    /// The offset lies beyond the end of the file. Detail: the file size.
    pub const OUT_OF_RANGE: u16 = 2;
    /// The node could not read the file (I/O error, or it shrank). Detail 0.
    pub const READ_FAILED: u16 = 3;
    /// The node serves no snapshots (no resolver installed). Detail 0.
    pub const NOT_SERVING: u16 = 4;
}

/// The payload of an error answer to a chunk request: `code u16 LE ‖ detail u64 LE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamErrorPayload {
    /// One of [`error_code`].
    pub code: u16,
    /// Code-specific (see [`error_code`]).
    pub detail: u64,
}

impl StreamErrorPayload {
    /// Appends the payload to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.code.to_le_bytes());
        out.extend_from_slice(&self.detail.to_le_bytes());
    }

    /// Decodes a whole payload.
    pub fn decode(buf: &[u8]) -> Result<Self, PeerError> {
        if buf.len() < STREAM_ERROR_LEN {
            return Err(PeerError::Truncated {
                what: "snapshot stream error",
                need: STREAM_ERROR_LEN,
                have: buf.len(),
            });
        }
        if buf.len() > STREAM_ERROR_LEN {
            return Err(PeerError::TrailingBytes {
                what: "snapshot stream error",
                extra: buf.len() - STREAM_ERROR_LEN,
            });
        }
        let mut code = [0u8; 2];
        code.copy_from_slice(&buf[..2]);
        let mut detail = [0u8; 8];
        detail.copy_from_slice(&buf[2..STREAM_ERROR_LEN]);
        Ok(StreamErrorPayload {
            code: u16::from_le_bytes(code),
            detail: u64::from_le_bytes(detail),
        })
    }
}

/// **Test only.** Faults the snapshot server injects, each once (then it disarms itself).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServeFaults {
    /// Flips the first data byte of the chunk served at this offset *after* its crc32c was
    /// computed (the frame's own crc is computed over the corrupt bytes, so only the chunk crc
    /// catches it).
    pub corrupt_chunk_at: Option<u64>,
    /// Closes the connection right after the N-th chunk served (counted over all snapshot
    /// connections from when the faults were set).
    pub close_after_chunks: Option<u64>,
}

/// An open snapshot file of one snapshot connection.
struct OpenSnapshot {
    key: (u32, u64, u64),
    file: BufferedFile,
    size: u64,
}

/// The snapshot-serving state of a transport.
#[derive(Default)]
pub(crate) struct SnapshotServer {
    resolver: RefCell<Option<SnapshotResolver>>,
    newest: RefCell<Option<NewestResolver>>,
    faults: Cell<ServeFaults>,
    /// Chunks served since the faults were set.
    served: Cell<u64>,
}

fn stream_err(code: u16, detail: u64) -> StreamErrorPayload {
    StreamErrorPayload { code, detail }
}

impl SnapshotServer {
    pub(crate) fn set_resolver(&self, r: SnapshotResolver) {
        *self.resolver.borrow_mut() = Some(r);
    }

    pub(crate) fn set_newest(&self, r: NewestResolver) {
        *self.newest.borrow_mut() = Some(r);
    }

    pub(crate) fn set_faults(&self, f: ServeFaults) {
        self.faults.set(f);
        self.served.set(0);
    }

    /// Answers chunk requests on a snapshot connection, `first` being the first request's
    /// header (its payload still in `reader`). `Ok` when a fault closed the connection.
    pub(crate) async fn serve(
        &self,
        t: &PeerTransport,
        stream: &mut Stream,
        reader: &mut FrameReader,
        peer: u64,
        first: FrameHeader,
    ) -> Result<(), ConnError> {
        let mut open: Option<OpenSnapshot> = None;
        let mut next = Some(first);
        let mut payload = Vec::new();
        let mut out = Vec::new();
        let r = loop {
            let header = match next.take() {
                Some(h) => h,
                None => {
                    match within(
                        SNAPSHOT_IDLE_TIMEOUT,
                        "snapshot request",
                        reader.next(stream),
                    )
                    .await
                    {
                        Ok(h) => h,
                        Err(e) => break Err(e),
                    }
                }
            };
            if header.opcode != PEER_SNAPSHOT_CHUNK_REQUEST {
                break Err(ConnError::Opcode(header.opcode));
            }
            let req = match SnapshotChunkRequest::decode(reader.payload()) {
                Ok(q) => q,
                Err(e) => break Err(e.into()),
            };
            payload.clear();
            out.clear();
            let answer = self.chunk(&mut open, &req, &mut payload).await;
            let flags = match answer {
                Ok(_) => flags::RESPONSE,
                Err(e) => {
                    debug!(
                        node = t.identity().node_id,
                        peer,
                        code = e.code,
                        ?req,
                        "snapshot chunk refused"
                    );
                    payload.clear();
                    e.encode(&mut payload);
                    flags::RESPONSE | flags::ERROR
                }
            };
            let h = FrameHeader {
                flags,
                opcode: PEER_SNAPSHOT_CHUNK,
                request_id: header.request_id,
            };
            if let Err(e) = frame::encode(h, &payload, &mut out) {
                break Err(e.into());
            }
            if let Err(e) = within(WRITE_TIMEOUT, "snapshot chunk write", async {
                stream.write_all(&out).await?;
                stream.flush().await?;
                Ok(())
            })
            .await
            {
                break Err(e);
            }
            match answer {
                Ok(len) => {
                    t.bump(|s| {
                        s.snapshot_chunks_served += 1;
                        s.snapshot_bytes_served += len as u64;
                    });
                    let served = self.served.get() + 1;
                    self.served.set(served);
                    let mut f = self.faults.get();
                    if f.close_after_chunks == Some(served) {
                        f.close_after_chunks = None;
                        self.faults.set(f);
                        warn!(
                            node = t.identity().node_id,
                            peer, served, "test fault: closing snapshot connection"
                        );
                        break Ok(());
                    }
                }
                Err(_) => t.bump(|s| s.snapshot_errors_served += 1),
            }
        };
        if let Some(o) = open.take() {
            let _ = o.file.close().await;
        }
        r
    }

    /// Appends the chunk payload answering `req` to `payload`; returns its data length, or the
    /// error to answer with.
    async fn chunk(
        &self,
        open: &mut Option<OpenSnapshot>,
        req: &SnapshotChunkRequest,
        payload: &mut Vec<u8>,
    ) -> Result<usize, StreamErrorPayload> {
        // A request for the newest snapshot names it by its LSN in the answer.
        let newest = if req.lsn == NEWEST_LSN {
            let r = self
                .newest
                .borrow()
                .clone()
                .ok_or(stream_err(error_code::NOT_SERVING, 0))?;
            Some(r(req.shard).ok_or(stream_err(error_code::UNKNOWN_SNAPSHOT, 0))?)
        } else {
            None
        };
        let lsn = newest.as_ref().map_or(req.lsn, |(l, _)| *l);
        let key = (req.shard, lsn, req.term);
        if open.as_ref().map(|o| o.key) != Some(key) {
            if let Some(o) = open.take() {
                let _ = o.file.close().await;
            }
            let path = match newest {
                Some((_, path)) => path,
                None => {
                    let resolver = self
                        .resolver
                        .borrow()
                        .clone()
                        .ok_or(stream_err(error_code::NOT_SERVING, 0))?;
                    resolver(req.shard, req.lsn, req.term)
                        .ok_or(stream_err(error_code::UNKNOWN_SNAPSHOT, 0))?
                }
            };
            let file = BufferedFile::open(&path).await.map_err(|e| {
                let e = io::Error::from(e);
                if e.kind() == io::ErrorKind::NotFound {
                    stream_err(error_code::UNKNOWN_SNAPSHOT, 0)
                } else {
                    warn!(path = %path.display(), error = %e, "snapshot file not readable");
                    stream_err(error_code::READ_FAILED, 0)
                }
            })?;
            let size = match file.file_size().await {
                Ok(s) => s,
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "snapshot file size");
                    let _ = file.close().await;
                    return Err(stream_err(error_code::READ_FAILED, 0));
                }
            };
            *open = Some(OpenSnapshot { key, file, size });
        }
        let Some(o) = open.as_ref() else {
            return Err(stream_err(error_code::READ_FAILED, 0));
        };
        if req.offset > o.size {
            return Err(stream_err(error_code::OUT_OF_RANGE, o.size));
        }
        let len = (o.size - req.offset).min(u64::from(req.max_len)) as usize;
        let read_failed = |e: glommio::GlommioError<()>| {
            warn!(error = %e, "snapshot file read");
            stream_err(error_code::READ_FAILED, 0)
        };
        let first = o.file.read_at(req.offset, len).await.map_err(read_failed)?;
        let size = o.size;
        let encode = |data: &[u8], payload: &mut Vec<u8>| {
            SnapshotChunk {
                shard: req.shard,
                lsn,
                term: req.term,
                offset: req.offset,
                total_size: size,
                data,
            }
            .encode(payload)
        };
        let encoded = if first.len() >= len {
            encode(&first[..len], payload)
        } else {
            // A short read: gather the rest.
            let mut buf = first.to_vec();
            while buf.len() < len {
                let more = o
                    .file
                    .read_at(req.offset + buf.len() as u64, len - buf.len())
                    .await
                    .map_err(read_failed)?;
                if more.is_empty() {
                    // The file shrank under us.
                    return Err(stream_err(error_code::READ_FAILED, 0));
                }
                buf.extend_from_slice(&more);
            }
            encode(&buf, payload)
        };
        if encoded.is_err() {
            return Err(stream_err(error_code::READ_FAILED, 0));
        }
        let mut f = self.faults.get();
        if len > 0 && f.corrupt_chunk_at == Some(req.offset) {
            f.corrupt_chunk_at = None;
            self.faults.set(f);
            payload[SNAPSHOT_CHUNK_HEADER_LEN] ^= 0xff;
            warn!(offset = req.offset, "test fault: corrupting snapshot chunk");
        }
        Ok(len)
    }
}

// ---- fetcher ----

/// What a successful fetch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FetchReport {
    /// Bytes of the file.
    pub bytes: u64,
    /// Chunks accepted (verified and written).
    pub chunks: u64,
    /// Times the transfer resumed on a new connection after one broke.
    pub resumes: u32,
    /// Chunks asked for again because they arrived corrupt.
    pub refetched_chunks: u64,
    /// From the call to `dest` being durable.
    pub elapsed: Duration,
    /// Of `elapsed`, the final fdatasync, rename and directory sync.
    pub sync: Duration,
}

/// Why a fetch failed. The partial file is removed and `dest` untouched in every case.
#[derive(Debug, Error)]
pub enum StreamError {
    /// The node is not in the transport's peer table.
    #[error("node {0} is not in the peer table")]
    UnknownPeer(u64),
    /// The peer does not have that snapshot.
    #[error("node {peer} has no snapshot of shard {shard} at lsn {lsn}, term {term}")]
    UnknownSnapshot {
        peer: u64,
        shard: u32,
        lsn: u64,
        term: u64,
    },
    /// The peer serves no snapshots.
    #[error("node {0} serves no snapshots")]
    NotServing(u64),
    /// The peer answered with another error (out of range, read failure, an unknown code).
    #[error("node {peer} refused a chunk: code {code}, detail {detail}")]
    Refused { peer: u64, code: u16, detail: u64 },
    /// No connection could be made (connect or handshake I/O) `attempts` times in a row.
    #[error("node {peer} unreachable after {attempts} dials: {last}")]
    Unreachable {
        peer: u64,
        attempts: u32,
        last: String,
    },
    /// The handshake failed on its merits (wrong key, wrong cluster, rejected): not retried.
    #[error("handshake with node {peer} failed: {reason}")]
    Handshake { peer: u64, reason: String },
    /// One chunk arrived corrupt more than `MAX_CHUNK_RETRIES` times.
    #[error("chunk at offset {offset} arrived corrupt {times} times")]
    TooManyCorruptChunks { offset: u64, times: u32 },
    /// The connection broke more than `MAX_RESUMES` times.
    #[error("the transfer broke {resumes} times; last: {last}")]
    TooManyResumes { resumes: u32, last: String },
    /// The peer's file size changed during the transfer, or the written file is not that size.
    #[error("size mismatch: expected {expected} bytes, got {got}")]
    SizeMismatch { expected: u64, got: u64 },
    /// The peer broke the protocol (an unexpected frame, a chunk for another range or snapshot).
    #[error("protocol: {0}")]
    Protocol(String),
    /// Local file I/O failed.
    #[error("i/o on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// `dest` + [`PARTIAL_SUFFIX`].
pub fn partial_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(PARTIAL_SUFFIX);
    PathBuf::from(s)
}

/// How one connection of a transfer ended, short of success.
enum ConnEnd {
    /// Redial and resume.
    Broken(String),
    /// Give up.
    Fatal(StreamError),
}

/// The state of one transfer, across its connections.
struct Transfer<'a> {
    peer: u64,
    shard: u32,
    lsn: u64,
    term: u64,
    partial: &'a Path,
    file: &'a Rc<DmaFile>,
    /// Chunk writes in flight: (offset, bytes written with the padding, the write).
    writes: VecDeque<(u64, usize, glommio::Task<io::Result<usize>>)>,
    /// The file size, once the first chunk told it.
    total: Option<u64>,
    /// Bytes `[0, prefix)` are verified and written or being written (a failed write ends the
    /// transfer, so a resume never needs them again).
    prefix: u64,
    /// Verified chunks beyond the prefix: offset → length.
    ahead: BTreeMap<u64, u64>,
    /// Corrupt arrivals per chunk offset.
    corrupt: BTreeMap<u64, u32>,
    next_request_id: u64,
    report: FetchReport,
}

impl Transfer<'_> {
    fn io(&self, source: impl Into<io::Error>) -> StreamError {
        StreamError::Io {
            path: self.partial.to_path_buf(),
            source: source.into(),
        }
    }

    /// Waits for the oldest write in flight; a failed or short write is fatal.
    async fn reap_write(&mut self) -> Result<(), StreamError> {
        let Some((offset, len, task)) = self.writes.pop_front() else {
            return Ok(());
        };
        match task.await {
            Ok(n) if n == len => Ok(()),
            Ok(n) => Err(self.io(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write at {offset}: {n} of {len} bytes"),
            ))),
            Err(e) => Err(self.io(e)),
        }
    }

    /// Waits for every write in flight.
    async fn drain_writes(&mut self) -> Result<(), StreamError> {
        let mut first = Ok(());
        while !self.writes.is_empty() {
            let r = self.reap_write().await;
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    fn done(&self) -> bool {
        self.total == Some(self.prefix)
    }

    /// Runs the transfer on one established connection until done or it ends.
    async fn run(&mut self, stream: &mut Stream) -> Result<(), ConnEnd> {
        let mut reader = FrameReader::new();
        let mut in_flight: VecDeque<(u64, u64)> = VecDeque::new();
        let mut redo: VecDeque<u64> = VecDeque::new();
        let mut cursor = self.prefix;
        let mut out = Vec::new();
        let mut payload = Vec::new();
        while !self.done() {
            // Fill the window (one request until the size is known).
            let window = if self.total.is_some() {
                STREAM_WINDOW_CHUNKS
            } else {
                1
            };
            while in_flight.len() < window {
                let offset = if let Some(o) = redo.pop_front() {
                    o
                } else {
                    while self.ahead.contains_key(&cursor) {
                        cursor += STREAM_CHUNK_BYTES as u64;
                    }
                    let more = match self.total {
                        Some(t) => cursor < t,
                        None => in_flight.is_empty(),
                    };
                    if !more {
                        break;
                    }
                    let o = cursor;
                    cursor += STREAM_CHUNK_BYTES as u64;
                    o
                };
                let id = self.next_request_id;
                self.next_request_id += 1;
                payload.clear();
                SnapshotChunkRequest {
                    shard: self.shard,
                    lsn: self.lsn,
                    term: self.term,
                    offset,
                    max_len: STREAM_CHUNK_BYTES as u32,
                }
                .encode(&mut payload)
                .map_err(|e| ConnEnd::Fatal(StreamError::Protocol(e.to_string())))?;
                let h = FrameHeader {
                    flags: 0,
                    opcode: PEER_SNAPSHOT_CHUNK_REQUEST,
                    request_id: id,
                };
                frame::encode(h, &payload, &mut out)
                    .map_err(|e| ConnEnd::Fatal(StreamError::Protocol(e.to_string())))?;
                in_flight.push_back((id, offset));
            }
            within(WRITE_TIMEOUT, "chunk requests", write_out(stream, &mut out))
                .await
                .map_err(|e| ConnEnd::Broken(e.to_string()))?;
            if in_flight.is_empty() {
                return Err(ConnEnd::Fatal(StreamError::Protocol(
                    "nothing left to ask for, yet the file is incomplete".into(),
                )));
            }
            let header = within(
                CHUNK_RESPONSE_TIMEOUT,
                "snapshot chunk",
                reader.next(stream),
            )
            .await
            // A frame that does not decode (its crc included) leaves the stream out of step:
            // like a broken connection, redial and resume (bounded by MAX_RESUMES).
            .map_err(|e| ConnEnd::Broken(e.to_string()))?;
            self.on_answer(header, reader.payload(), &mut in_flight, &mut redo)
                .await?;
        }
        Ok(())
    }

    /// Handles one answer frame: verifies and writes a chunk, or queues its re-request.
    async fn on_answer(
        &mut self,
        header: FrameHeader,
        payload: &[u8],
        in_flight: &mut VecDeque<(u64, u64)>,
        redo: &mut VecDeque<u64>,
    ) -> Result<(), ConnEnd> {
        let fatal = |s: String| ConnEnd::Fatal(StreamError::Protocol(s));
        if header.opcode != PEER_SNAPSHOT_CHUNK {
            return Err(fatal(format!("unexpected opcode {:#06x}", header.opcode)));
        }
        let Some(pos) = in_flight
            .iter()
            .position(|(id, _)| *id == header.request_id)
        else {
            return Err(fatal(format!(
                "answer to unknown request {}",
                header.request_id
            )));
        };
        let Some((_, offset)) = in_flight.remove(pos) else {
            return Err(fatal("request vanished".into()));
        };
        if header.flags & flags::ERROR != 0 {
            let e = StreamErrorPayload::decode(payload).map_err(|e| fatal(e.to_string()))?;
            return Err(ConnEnd::Fatal(match e.code {
                error_code::UNKNOWN_SNAPSHOT => StreamError::UnknownSnapshot {
                    peer: self.peer,
                    shard: self.shard,
                    lsn: self.lsn,
                    term: self.term,
                },
                error_code::NOT_SERVING => StreamError::NotServing(self.peer),
                code => StreamError::Refused {
                    peer: self.peer,
                    code,
                    detail: e.detail,
                },
            }));
        }
        let c = match SnapshotChunk::decode(payload) {
            Ok(c) => c,
            Err(PeerError::ChunkCorrupt { stored, computed }) => {
                let times = self.corrupt.entry(offset).or_insert(0);
                *times += 1;
                let times = *times;
                warn!(
                    peer = self.peer,
                    offset, stored, computed, times, "corrupt snapshot chunk refused"
                );
                if times > MAX_CHUNK_RETRIES {
                    return Err(ConnEnd::Fatal(StreamError::TooManyCorruptChunks {
                        offset,
                        times,
                    }));
                }
                self.report.refetched_chunks += 1;
                redo.push_back(offset);
                return Ok(());
            }
            Err(e) => return Err(fatal(e.to_string())),
        };
        if (c.shard, c.lsn, c.term, c.offset) != (self.shard, self.lsn, self.term, offset) {
            return Err(fatal(format!(
                "chunk of shard {} lsn {} term {} at {} answers a request at {offset}",
                c.shard, c.lsn, c.term, c.offset
            )));
        }
        let total = *self.total.get_or_insert(c.total_size);
        if c.total_size != total {
            return Err(ConnEnd::Fatal(StreamError::SizeMismatch {
                expected: total,
                got: c.total_size,
            }));
        }
        let want = (total - offset).min(STREAM_CHUNK_BYTES as u64);
        if c.data.len() as u64 != want {
            return Err(fatal(format!(
                "chunk at {offset} holds {} bytes, expected {want}",
                c.data.len()
            )));
        }
        if want > 0 {
            // O_DIRECT from an aligned buffer (no page-cache copy): one copy out of the read
            // buffer; the last chunk is zero-padded to the alignment and the file truncated to
            // its size at the end.
            let padded = self.file.align_up(want) as usize;
            let mut buf = self.file.alloc_dma_buffer(padded);
            let bytes = buf.as_bytes_mut();
            bytes[..c.data.len()].copy_from_slice(c.data);
            bytes[c.data.len()..].fill(0);
            let f = self.file.clone();
            let task = glommio::spawn_local(async move {
                f.write_at(buf, offset).await.map_err(io::Error::from)
            });
            self.writes.push_back((offset, padded, task));
            while self.writes.len() > MAX_WRITES_IN_FLIGHT {
                self.reap_write().await.map_err(ConnEnd::Fatal)?;
            }
        }
        self.report.chunks += 1;
        if offset == self.prefix {
            self.prefix += want;
            while let Some(len) = self.ahead.remove(&self.prefix) {
                self.prefix += len;
            }
        } else if offset > self.prefix {
            self.ahead.insert(offset, want);
        }
        Ok(())
    }
}

/// Fetches the snapshot (shard, lsn, term) from node `from` into `dest` (module docs): own
/// connection, windowed chunk requests, every chunk verified, corrupt chunks re-fetched, broken
/// connections resumed; durable at `dest` when `Ok`. On `Err` the partial file is removed and
/// `dest` untouched. The file is *not* verified as a snapshot: the caller opens it with
/// `keyfort_engine::snapshot::Snapshot::open` and the card before using it.
pub async fn fetch_snapshot(
    transport: &Rc<PeerTransport>,
    from: u64,
    shard: u32,
    lsn: u64,
    term: u64,
    dest: &Path,
) -> Result<FetchReport, StreamError> {
    let start = Instant::now();
    let partial = partial_path(dest);
    let io_err = |path: &Path, e: io::Error| StreamError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let file = Rc::new(
        DmaFile::create(&partial)
            .await
            .map_err(|e| io_err(&partial, e.into()))?,
    );
    let mut t = Transfer {
        peer: from,
        shard,
        lsn,
        term,
        partial: &partial,
        file: &file,
        writes: VecDeque::new(),
        total: None,
        prefix: 0,
        ahead: BTreeMap::new(),
        corrupt: BTreeMap::new(),
        next_request_id: 1,
        report: FetchReport::default(),
    };
    let r = transfer(transport, &mut t).await;
    // Every write ends before the file is finished or removed.
    let drained = t.drain_writes().await;
    let r = r.and(drained);
    let mut report = t.report;
    let r = match r {
        Ok(()) => {
            let total = t.total.unwrap_or(0);
            let sync_start = Instant::now();
            let r = finish(&file, &partial, dest, total).await;
            report.sync = sync_start.elapsed();
            report.bytes = total;
            r
        }
        Err(e) => Err(e),
    };
    match r {
        Ok(()) => {
            let _ = file.close_rc().await;
            report.elapsed = start.elapsed();
            debug!(peer = from, shard, lsn, term, ?report, "snapshot fetched");
            Ok(report)
        }
        Err(e) => {
            if let Err(rm) = file.remove().await {
                warn!(path = %partial.display(), error = %rm, "removing the partial snapshot");
            }
            let _ = file.close_rc().await;
            Err(e)
        }
    }
}

/// Dials, runs and resumes the transfer until it completes or fails.
async fn transfer(transport: &Rc<PeerTransport>, t: &mut Transfer<'_>) -> Result<(), StreamError> {
    let mut backoff = RESUME_BACKOFF_MIN;
    let mut failed_dials = 0u32;
    loop {
        let addr = transport
            .peers()
            .get(&t.peer)
            .copied()
            .ok_or(StreamError::UnknownPeer(t.peer))?;
        match transport.dial(t.peer, addr).await {
            Ok(mut stream) => {
                failed_dials = 0;
                let before = t.prefix;
                match t.run(&mut stream).await {
                    Ok(()) => return Ok(()),
                    Err(ConnEnd::Fatal(e)) => return Err(e),
                    Err(ConnEnd::Broken(why)) => {
                        t.report.resumes += 1;
                        if t.report.resumes > MAX_RESUMES {
                            return Err(StreamError::TooManyResumes {
                                resumes: t.report.resumes,
                                last: why,
                            });
                        }
                        if t.prefix > before {
                            backoff = RESUME_BACKOFF_MIN;
                        }
                        debug!(
                            peer = t.peer,
                            prefix = t.prefix,
                            why,
                            "snapshot stream broke; resuming"
                        );
                    }
                }
            }
            Err(e @ (ConnError::Io(_) | ConnError::Timeout(_) | ConnError::Eof)) => {
                failed_dials += 1;
                if failed_dials >= MAX_DIAL_ATTEMPTS {
                    return Err(StreamError::Unreachable {
                        peer: t.peer,
                        attempts: failed_dials,
                        last: e.to_string(),
                    });
                }
            }
            Err(e) => {
                return Err(StreamError::Handshake {
                    peer: t.peer,
                    reason: e.to_string(),
                })
            }
        }
        glommio::timer::sleep(backoff).await;
        backoff = (backoff * 2).min(RESUME_BACKOFF_MAX);
    }
}

/// Makes the complete partial file durable as `dest`.
async fn finish(
    file: &DmaFile,
    partial: &Path,
    dest: &Path,
    total: u64,
) -> Result<(), StreamError> {
    let io_err = |path: &Path, e: io::Error| StreamError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    // Cut the last chunk's alignment padding.
    file.truncate(total)
        .await
        .map_err(|e| io_err(partial, e.into()))?;
    let size = file
        .file_size()
        .await
        .map_err(|e| io_err(partial, e.into()))?;
    if size != total {
        return Err(StreamError::SizeMismatch {
            expected: total,
            got: size,
        });
    }
    file.fdatasync()
        .await
        .map_err(|e| io_err(partial, e.into()))?;
    glommio::io::rename(partial, dest)
        .await
        .map_err(|e| io_err(dest, e.into()))?;
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Absolute: glommio 0.9 opens a relative directory path against fd -1 (EBADF).
    let dir = std::path::absolute(&dir).map_err(|e| io_err(&dir, e))?;
    let d = Directory::open(&dir)
        .await
        .map_err(|e| io_err(&dir, e.into()))?;
    let synced = d.sync().await;
    let _ = d.close().await;
    synced.map_err(|e| io_err(&dir, e.into()))
}

/// Asks node `from` which snapshot of `shard` is its newest (the snapshot manager's poll): one
/// chunk request for [`NEWEST_LSN`] on its own connection. `Some((lsn, size))`, or `None` when
/// the node has none. Fetch it afterwards with [`fetch_snapshot`] at that LSN (term 0).
pub async fn probe_newest(
    transport: &Rc<PeerTransport>,
    from: u64,
    shard: u32,
) -> Result<Option<(u64, u64)>, StreamError> {
    let addr = transport
        .peers()
        .get(&from)
        .copied()
        .ok_or(StreamError::UnknownPeer(from))?;
    let unreachable = |e: ConnError| StreamError::Unreachable {
        peer: from,
        attempts: 1,
        last: e.to_string(),
    };
    let mut stream = match transport.dial(from, addr).await {
        Ok(s) => s,
        Err(e @ (ConnError::Io(_) | ConnError::Timeout(_) | ConnError::Eof)) => {
            return Err(unreachable(e))
        }
        Err(e) => {
            return Err(StreamError::Handshake {
                peer: from,
                reason: e.to_string(),
            })
        }
    };
    let protocol = |e: String| StreamError::Protocol(e);
    let mut payload = Vec::new();
    SnapshotChunkRequest {
        shard,
        lsn: NEWEST_LSN,
        term: 0,
        offset: 0,
        max_len: 1,
    }
    .encode(&mut payload)
    .map_err(|e| protocol(e.to_string()))?;
    let mut out = Vec::new();
    let h = FrameHeader {
        flags: 0,
        opcode: PEER_SNAPSHOT_CHUNK_REQUEST,
        request_id: 1,
    };
    frame::encode(h, &payload, &mut out).map_err(|e| protocol(e.to_string()))?;
    within(
        WRITE_TIMEOUT,
        "newest snapshot probe",
        write_out(&mut stream, &mut out),
    )
    .await
    .map_err(unreachable)?;
    let mut reader = FrameReader::new();
    let header = within(
        CHUNK_RESPONSE_TIMEOUT,
        "newest snapshot answer",
        reader.next(&mut stream),
    )
    .await
    .map_err(unreachable)?;
    let _ = stream.close().await;
    if header.opcode != PEER_SNAPSHOT_CHUNK || header.request_id != 1 {
        return Err(protocol(format!(
            "unexpected answer {:#06x} to request {}",
            header.opcode, header.request_id
        )));
    }
    if header.flags & flags::ERROR != 0 {
        let e =
            StreamErrorPayload::decode(reader.payload()).map_err(|e| protocol(e.to_string()))?;
        return match e.code {
            error_code::UNKNOWN_SNAPSHOT => Ok(None),
            error_code::NOT_SERVING => Err(StreamError::NotServing(from)),
            code => Err(StreamError::Refused {
                peer: from,
                code,
                detail: e.detail,
            }),
        };
    }
    let c = SnapshotChunk::decode(reader.payload()).map_err(|e| protocol(e.to_string()))?;
    if c.shard != shard || c.lsn == NEWEST_LSN {
        return Err(protocol("the answer names another snapshot".into()));
    }
    Ok(Some((c.lsn, c.total_size)))
}
