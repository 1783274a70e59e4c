//! The peer transport of one executor (docs/format.md §6.10): TCP connections to and from the
//! other nodes, driving the sans-IO handshake of [`crate::peer`] and carrying raft messages of
//! all this core's shards in `PEER_RAFT_BATCH` frames.
//!
//! **One connection per direction.** Node A dials B for A→B traffic and B dials A for B→A; a
//! connection carries raft batches from its dialer only (the listener sends nothing after
//! Accept). No tie-breaking is needed, and a dialer treats any byte or EOF from the listener as
//! a dead connection, so it notices a restarted peer at once. (Snapshot fetches use connections
//! of their own, request/answer: see *Inbound* and [`crate::snapshot_stream`].)
//!
//! **Outbound.** [`Transport::send`] never blocks: it encodes each message and appends it to the
//! bounded queue of its `to` node ([`PEER_QUEUE_MESSAGES`]; when full the message is dropped and
//! counted: raft retransmits), then wakes that peer's writer task. The writer dials (with
//! [`CONNECT_TIMEOUT`]), runs the handshake (within [`HANDSHAKE_TIMEOUT`]), then loops: takes
//! everything queued, up to [`MAX_RAFT_BATCH_MESSAGES`] messages and a frame's bytes, writes one
//! batch frame (within [`WRITE_TIMEOUT`]). On any error it drops the connection (the batch in
//! flight is lost and counted), backs off ([`RECONNECT_BACKOFF_MIN`] doubling to
//! [`RECONNECT_BACKOFF_MAX`], cut short when that peer connects to us) and redials; messages queued meanwhile stay, bounded.
//!
//! **Inbound.** Each accepted connection runs the listener handshake (a node id in the peer table
//! is a member; any other is refused). The first frame after the handshake fixes the
//! connection's *role* for its life:
//!
//! - `PEER_RAFT_BATCH`: a **raft connection**. A node whose raft connection starts while it
//!   already has one *replaces* it: the old one is closed (after authentication and the first
//!   batch only, so neither a stranger nor the same node's snapshot fetch can evict a peer),
//!   because the dialer reconnecting means its old connection is dead to it, even where this side
//!   has not noticed (a half-open TCP connection). Only `PEER_RAFT_BATCH` frames are accepted on
//!   it; a bad frame, an undecodable batch or message, a message whose `from` is not the
//!   authenticated node, or another opcode closes that connection (logged and counted) and
//!   nothing else.
//! - `PEER_SNAPSHOT_CHUNK_REQUEST`: a **snapshot connection** (docs/format.md §6.11,
//!   [`crate::snapshot_stream`]): only chunk requests are accepted on it, each answered in order
//!   by one `PEER_SNAPSHOT_CHUNK` (or an error frame); it replaces nothing, and any number of
//!   them may run beside the node's raft connection. Snapshots are served once
//!   [`PeerTransport::serve_snapshots`] installed a resolver.
//!
//! **Joining** (docs/format.md §6.12, [`crate::join`]). A connection whose first frame is
//! `PEER_CONFIG_REQUEST` (instead of a Hello) is answered with the cluster config
//! ([`PeerTransport::serve_config`]) or a Reject `NOT_SERVED`, and closed; it counts as a pending
//! handshake (limit and timeout). A Hello claiming [`JOINER_NODE_ID`] is admitted only once
//! [`PeerTransport::serve_joins`] installed a handler; after that handshake the first frame must
//! be `PEER_JOIN_REQUEST` (anything else closes the connection as a protocol error), the
//! handler's grant or refusal is written and the connection closed. A joiner never enters the
//! connection table and never carries raft or snapshot traffic.
//!
//! The read buffer holds at most one frame
//! ([`MAX_FRAME_PAYLOAD_BYTES`], checked from the header before the payload is read) plus one
//! read.
//!
//! Everything is single-threaded: a `PeerTransport` lives on one glommio executor, its tasks run
//! in the task queue current where they are spawned (`glommio::spawn_local`), and
//! [`PeerTransport::close`] must be awaited to stop them (they hold the transport).

pub use crate::frame::MAX_FRAME_PAYLOAD_BYTES;
use crate::frame::{self, Frame, FrameError, FrameHeader, FRAME_HEADER_BYTES};
use crate::join::{ConfigSource, JoinHandler};
pub use crate::peer::MAX_RAFT_BATCH_MESSAGES;
use crate::peer::{
    decode_raft_batch, encode_raft_batch, new_challenge, Admission, Dialer, Listener, PeerError,
    PeerIdentity, Prover, Step, JOINER_NODE_ID, PEER_CONFIG_REQUEST, PEER_RAFT_BATCH,
    PEER_SNAPSHOT_CHUNK_REQUEST, RAFT_BATCH_HEADER_LEN, RAFT_BATCH_MESSAGE_OVERHEAD,
};
use crate::snapshot_stream::{ServeFaults, SnapshotResolver, SnapshotServer};
use crate::tls::{cert_names, joiner_name, node_name, NodeTls, Stream, TlsFailure};
use futures_lite::future::{or, poll_fn};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use keyfort_engine::raft::Transport;
use protobuf::Message as _;
use raft::eraftpb::Message;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tracing::{debug, info, warn};

/// Most messages waiting for one peer. A full queue drops new messages (raft retransmits); at
/// about a tick's traffic of every shard this core leads, it rides out a reconnect.
pub const PEER_QUEUE_MESSAGES: usize = 4096;
/// Longest wait for a TCP connect to a peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest a handshake may take, on either side, from the connection to Accept.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest the write of one batch frame may take before the connection is deemed dead (a peer
/// that stops reading).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// First wait before redialing a peer after a failure.
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest wait between dials of an unreachable peer (the backoff doubles up to it).
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Most accepted connections still in their handshake; more are closed at once.
pub const MAX_INBOUND_HANDSHAKES: usize = 64;
/// Bytes asked of the socket per read.
pub const READ_CHUNK_BYTES: usize = 64 << 10;
/// Wait after a failed accept (e.g. out of descriptors) before accepting again.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// Largest encoded raft message that is sent: one that fits a batch frame alone. A larger one is
/// dropped and counted (snapshots travel as chunks, not in raft messages).
pub const MAX_RAFT_MESSAGE_BYTES: usize =
    MAX_FRAME_PAYLOAD_BYTES - RAFT_BATCH_HEADER_LEN - RAFT_BATCH_MESSAGE_OVERHEAD;

/// Called per inbound raft message: (authenticated sender node, shard, message).
pub type InboundHandler = Rc<dyn Fn(u64, u32, Message)>;

/// Counters of one transport (monotonic from its creation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Raft messages written to peers.
    pub sent_messages: u64,
    /// Batch frames written to peers.
    pub sent_batches: u64,
    /// Raft messages received and handed to the handler.
    pub received_messages: u64,
    /// Batch frames received.
    pub received_batches: u64,
    /// Messages dropped because their peer's queue was full.
    pub dropped_queue_full: u64,
    /// Messages dropped because their `to` node is not in the peer table.
    pub dropped_unknown_peer: u64,
    /// Messages lost because a connection failed while they were written, their peer left the
    /// table while they waited, or the transport was closed.
    pub dropped_disconnected: u64,
    /// Messages dropped because they are larger than [`MAX_RAFT_MESSAGE_BYTES`] (or failed to
    /// encode).
    pub dropped_too_large: u64,
    /// Handshakes that failed as the dialer (refused, bad proof, timeout, I/O).
    pub handshake_failures_outbound: u64,
    /// Handshakes that failed as the listener.
    pub handshake_failures_inbound: u64,
    /// Connections refused by TLS, either side (also counted as handshake failures): another
    /// CA, an expired or revoked certificate, a certificate naming another node, plaintext.
    pub tls_failures: u64,
    /// Outbound connections established.
    pub connects: u64,
    /// Outbound connections established after an earlier one to the same peer (or a failed
    /// dial).
    pub reconnects: u64,
    /// Dials that failed (connect error or timeout).
    pub dial_failures: u64,
    /// Established connections closed for a protocol violation (bad frame, bad batch or message,
    /// wrong opcode, spoofed sender).
    pub protocol_errors: u64,
    /// Inbound connections replaced by a newer authenticated one from the same node.
    pub replaced_connections: u64,
    /// Accepted connections closed at once because [`MAX_INBOUND_HANDSHAKES`] were pending.
    pub refused_connections: u64,
    /// Inbound connections that became snapshot connections (their first frame a chunk request).
    pub snapshot_connections: u64,
    /// `PEER_SNAPSHOT_CHUNK` frames served (error frames not included).
    pub snapshot_chunks_served: u64,
    /// Snapshot data bytes served.
    pub snapshot_bytes_served: u64,
    /// Chunk requests answered with an error frame (unknown snapshot, out of range, read error).
    pub snapshot_errors_served: u64,
    /// Config requests answered with the cluster config (not those answered `NOT_SERVED`).
    pub config_served: u64,
    /// Join requests answered by the join handler (granted or refused).
    pub joins_served: u64,
}

/// A one-shot event many tasks can wait for.
#[derive(Default)]
struct Signal {
    fired: Cell<bool>,
    next: Cell<u64>,
    wakers: RefCell<BTreeMap<u64, Waker>>,
}

impl Signal {
    fn fire(&self) {
        self.fired.set(true);
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        for w in wakers.into_values() {
            w.wake();
        }
    }

    fn wait(&self) -> SignalWait<'_> {
        let id = self.next.get();
        self.next.set(id + 1);
        SignalWait { signal: self, id }
    }
}

struct SignalWait<'a> {
    signal: &'a Signal,
    id: u64,
}

impl Future for SignalWait<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.fired.get() {
            return Poll::Ready(());
        }
        self.signal
            .wakers
            .borrow_mut()
            .insert(self.id, cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for SignalWait<'_> {
    fn drop(&mut self) {
        self.signal.wakers.borrow_mut().remove(&self.id);
    }
}

/// Messages waiting for one peer, and its writer's waker.
#[derive(Default)]
struct PeerQueue {
    msgs: VecDeque<(u32, Vec<u8>)>,
    waker: Option<Waker>,
    /// Set when the peer just connected to us: the writer ends its backoff and dials now.
    redial_now: bool,
    redial_waker: Option<Waker>,
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("connection closed by the peer")]
    Eof,
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("peer protocol: {0}")]
    Peer(#[from] PeerError),
    #[error("opcode {0:#06x} not allowed after the handshake")]
    Opcode(u16),
    #[error("undecodable raft message: {0}")]
    Message(String),
    #[error("message from node {from} on the connection of node {peer}")]
    Spoofed { from: u64, peer: u64 },
    #[error("the listener sent data or closed")]
    ListenerTalked,
    #[error("TLS: {0}")]
    Tls(#[from] TlsFailure),
}

impl From<glommio::GlommioError<()>> for ConnError {
    fn from(e: glommio::GlommioError<()>) -> Self {
        ConnError::Io(e.into())
    }
}

/// Reads frames off a socket into a buffer that holds at most one frame plus one read.
pub(crate) struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    consumed: usize,
    payload: (usize, usize),
    /// Largest payload accepted: a header announcing more is refused as soon as it has arrived.
    max_payload: usize,
}

impl FrameReader {
    pub(crate) fn new() -> Self {
        Self::with_max(frame::MAX_FRAME_PAYLOAD_BYTES)
    }

    /// A reader refusing (`FrameError::TooLong`, from the header alone) payloads over `max`.
    pub(crate) fn with_max(max_payload: usize) -> Self {
        FrameReader {
            buf: Vec::new(),
            start: 0,
            consumed: 0,
            payload: (0, 0),
            max_payload,
        }
    }

    /// The request id of the frame whose header has arrived but whose payload has not (the
    /// one an oversized-frame error was about): answers can name it.
    pub(crate) fn pending_request_id(&self) -> Option<u64> {
        let h = self.buf.get(self.start..self.start + FRAME_HEADER_BYTES)?;
        Some(u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")))
    }

    /// The next frame's header; its payload is [`FrameReader::payload`] until the next call.
    pub(crate) async fn next<S: futures_lite::AsyncRead + Unpin>(
        &mut self,
        s: &mut S,
    ) -> Result<FrameHeader, ConnError> {
        self.start += std::mem::take(&mut self.consumed);
        loop {
            let pending = &self.buf[self.start..];
            if pending.len() >= FRAME_HEADER_BYTES
                && self.max_payload < frame::MAX_FRAME_PAYLOAD_BYTES
            {
                // The header is checked (crc, version, flags) before its length is trusted.
                frame::decode(&pending[..FRAME_HEADER_BYTES])?;
                let len = u32::from_le_bytes(pending[16..20].try_into().expect("4 bytes")) as usize;
                if len > self.max_payload {
                    return Err(FrameError::TooLong {
                        len,
                        max: self.max_payload,
                    }
                    .into());
                }
            }
            match frame::decode(&self.buf[self.start..])? {
                Some((f, n)) => {
                    let p0 = self.start + FRAME_HEADER_BYTES;
                    self.payload = (p0, p0 + f.payload.len());
                    self.consumed = n;
                    return Ok(f.header);
                }
                None => {
                    if self.start > 0 {
                        self.buf.drain(..self.start);
                        self.start = 0;
                    }
                    let old = self.buf.len();
                    self.buf.resize(old + READ_CHUNK_BYTES, 0);
                    let r = s.read(&mut self.buf[old..]).await;
                    self.buf.truncate(old + *r.as_ref().unwrap_or(&0));
                    if r? == 0 {
                        return Err(ConnError::Eof);
                    }
                }
            }
        }
    }

    pub(crate) fn payload(&self) -> &[u8] {
        &self.buf[self.payload.0..self.payload.1]
    }
}

/// Runs `f`, failing with `Timeout(what)` after `d`.
pub(crate) async fn within<T>(
    d: Duration,
    what: &'static str,
    f: impl Future<Output = Result<T, ConnError>>,
) -> Result<T, ConnError> {
    or(f, async {
        glommio::timer::sleep(d).await;
        Err(ConnError::Timeout(what))
    })
    .await
}

pub(crate) async fn write_out(s: &mut Stream, out: &mut Vec<u8>) -> Result<(), ConnError> {
    if !out.is_empty() {
        s.write_all(out).await?;
        s.flush().await?;
        out.clear();
    }
    Ok(())
}

/// Decrements the live task count when a task ends (or is dropped).
struct Live(Rc<PeerTransport>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.set(self.0.live.get() - 1);
    }
}

/// The peer transport of one executor: one node, all its shards on this core.
pub struct PeerTransport {
    me: PeerIdentity,
    prover: Rc<dyn Prover>,
    handler: InboundHandler,
    this: Weak<PeerTransport>,
    peers: RefCell<BTreeMap<u64, SocketAddr>>,
    /// One per peer with a writer task (its presence means the writer runs).
    queues: RefCell<BTreeMap<u64, PeerQueue>>,
    /// Authenticated inbound connections: node → (connection id, its close signal).
    inbound: RefCell<BTreeMap<u64, (u64, Rc<Signal>)>>,
    next_conn: Cell<u64>,
    handshaking: Cell<usize>,
    live: Cell<usize>,
    closed: Cell<bool>,
    shutdown: Signal,
    stats: RefCell<TransportStats>,
    /// The snapshot-serving side (resolver and test faults).
    snapshots: SnapshotServer,
    /// The cluster config served to config requests (none: `NOT_SERVED`).
    config: RefCell<Option<ConfigSource>>,
    /// The join handler (none: `JOINER_NODE_ID` is not admitted).
    joins: RefCell<Option<JoinHandler>>,
    /// TLS on every connection (none: plaintext, the loopback-only insecure mode).
    tls: RefCell<Option<NodeTls>>,
}

impl PeerTransport {
    /// A transport for `me` proving with `prover`, dialing the nodes of `peers` (node id →
    /// address) and handing every inbound raft message to `handler`. Starts no task.
    pub fn new(
        me: PeerIdentity,
        prover: Rc<dyn Prover>,
        peers: BTreeMap<u64, SocketAddr>,
        handler: InboundHandler,
    ) -> Rc<PeerTransport> {
        Rc::new_cyclic(|this| PeerTransport {
            me,
            prover,
            handler,
            this: this.clone(),
            peers: RefCell::new(peers),
            queues: RefCell::new(BTreeMap::new()),
            inbound: RefCell::new(BTreeMap::new()),
            next_conn: Cell::new(0),
            handshaking: Cell::new(0),
            live: Cell::new(0),
            closed: Cell::new(false),
            shutdown: Signal::default(),
            stats: RefCell::new(TransportStats::default()),
            snapshots: SnapshotServer::default(),
            config: RefCell::new(None),
            joins: RefCell::new(None),
            tls: RefCell::new(None),
        })
    }

    /// Runs every connection from now on over TLS (module docs of [`crate::tls`]): set it
    /// before [`Self::listen`] and the first send.
    pub fn set_tls(&self, tls: NodeTls) {
        *self.tls.borrow_mut() = Some(tls);
    }

    /// The TLS of this transport, if on.
    pub fn tls(&self) -> Option<NodeTls> {
        self.tls.borrow().clone()
    }

    /// This node's identity.
    pub fn identity(&self) -> PeerIdentity {
        self.me
    }

    /// Replaces the peer table. Writers of nodes that left stop (their queued messages are
    /// dropped); writers of nodes whose address changed redial it. Nodes that left can no longer
    /// connect; their established inbound connections stay until they close.
    pub fn set_peers(&self, peers: BTreeMap<u64, SocketAddr>) {
        *self.peers.borrow_mut() = peers;
        for q in self.queues.borrow_mut().values_mut() {
            if let Some(w) = q.waker.take() {
                w.wake();
            }
        }
    }

    /// The current peer table.
    pub fn peers(&self) -> BTreeMap<u64, SocketAddr> {
        self.peers.borrow().clone()
    }

    /// The counters so far.
    pub fn stats(&self) -> TransportStats {
        *self.stats.borrow()
    }

    /// Serves snapshot files to authenticated peers from now on: a chunk request for (shard, lsn,
    /// term) reads the file `resolver` names (`None`: the snapshot is unknown, answered with
    /// [`crate::snapshot_stream::error_code::UNKNOWN_SNAPSHOT`]). Replaces an earlier resolver;
    /// until one is installed every chunk request is answered with `NOT_SERVING`. The file must
    /// stay in place (unchanged) while it may be fetched. See docs/format.md §6.11.
    pub fn serve_snapshots(&self, resolver: SnapshotResolver) {
        self.snapshots.set_resolver(resolver);
    }

    /// Answers chunk requests for [`crate::snapshot_stream::NEWEST_LSN`] from the file `r`
    /// names (the snapshot manager's poll); until installed they are answered `NOT_SERVING`.
    pub fn serve_newest_snapshots(&self, r: crate::snapshot_stream::NewestResolver) {
        self.snapshots.set_newest(r);
    }

    /// Serves the cluster config from now on: a connection whose first frame is
    /// `PEER_CONFIG_REQUEST` (before any Hello, unauthenticated) gets `PEER_CONFIG` with the
    /// bytes `f` returns (`None`, or more than [`crate::join::CONFIG_BYTES_MAX`]: a Reject
    /// `NOT_SERVED`) and is closed. Replaces an earlier source. See docs/format.md §6.12.
    pub fn serve_config(&self, f: Rc<dyn Fn() -> Option<Vec<u8>>>) {
        *self.config.borrow_mut() = Some(f);
    }

    /// Serves joins from now on: a Hello claiming [`JOINER_NODE_ID`] is admitted, and the one
    /// `PEER_JOIN_REQUEST` of such a connection is answered with what `h` returns (a grant, or
    /// a refusal as a Reject). Replaces an earlier handler. See docs/format.md §6.12.
    pub fn serve_joins(&self, h: JoinHandler) {
        *self.joins.borrow_mut() = Some(h);
    }

    /// **Test only**: faults the snapshot server injects (each once); see [`ServeFaults`].
    /// Replaces earlier faults, armed or not.
    pub fn set_serve_faults(&self, faults: ServeFaults) {
        self.snapshots.set_faults(faults);
    }

    pub(crate) fn bump(&self, f: impl FnOnce(&mut TransportStats)) {
        f(&mut self.stats.borrow_mut());
    }

    /// Binds `addr` and starts the accept loop; returns the bound address (for port 0).
    pub fn listen(self: &Rc<Self>, addr: SocketAddr) -> io::Result<SocketAddr> {
        if self.closed.get() {
            return Err(io::Error::other("transport closed"));
        }
        let listener = TcpListener::bind(addr).map_err(io::Error::from)?;
        let local = listener.local_addr().map_err(io::Error::from)?;
        let this = self.clone();
        self.spawn(async move { this.accept_loop(listener).await });
        info!(node = self.me.node_id, %local, "peer transport listening");
        Ok(local)
    }

    /// Stops every task, closing the listening socket and all connections, and drops what is
    /// queued. Returns once every task has ended (so the port can be bound again).
    pub async fn close(&self) {
        if !self.closed.replace(true) {
            self.shutdown.fire();
            let dropped: usize = std::mem::take(&mut *self.queues.borrow_mut())
                .into_values()
                .map(|q| q.msgs.len())
                .sum();
            self.bump(|s| s.dropped_disconnected += dropped as u64);
        }
        while self.live.get() > 0 {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Spawns a task that ends at `close`.
    fn spawn(self: &Rc<Self>, f: impl Future<Output = ()> + 'static) {
        self.live.set(self.live.get() + 1);
        let guard = Live(self.clone());
        glommio::spawn_local(async move {
            or(f, guard.0.shutdown.wait()).await;
            drop(guard);
        })
        .detach();
    }

    // ---- inbound ----

    async fn accept_loop(self: Rc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    if self.handshaking.get() >= MAX_INBOUND_HANDSHAKES {
                        self.bump(|s| s.refused_connections += 1);
                        warn!(node = self.me.node_id, "too many pending peer handshakes");
                        continue;
                    }
                    self.handshaking.set(self.handshaking.get() + 1);
                    let id = self.next_conn.get();
                    self.next_conn.set(id + 1);
                    let this = self.clone();
                    self.spawn(async move { this.serve_inbound(stream, id).await });
                }
                Err(e) => {
                    warn!(node = self.me.node_id, error = %e, "peer accept failed");
                    glommio::timer::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            }
        }
    }

    async fn serve_inbound(self: Rc<Self>, tcp: TcpStream, conn: u64) {
        let remote = tcp.peer_addr().ok();
        let _ = tcp.set_nodelay(true);
        let mut reader = FrameReader::new();
        let tls = self.tls();
        let hs = within(HANDSHAKE_TIMEOUT, "inbound handshake", async {
            let mut stream = match &tls {
                Some(t) => Stream::accept(tcp, t.peer_server.clone()).await?,
                None => Stream::Plain(tcp),
            };
            let peer = self.listener_handshake(&mut stream, &mut reader).await?;
            Ok((stream, peer))
        })
        .await;
        self.handshaking.set(self.handshaking.get() - 1);
        let (mut stream, peer) = match hs {
            Ok((stream, Some(peer))) => (stream, peer),
            Ok((_, None)) => {
                debug!(node = self.me.node_id, ?remote, "config request answered");
                return;
            }
            Err(e) => {
                if matches!(e, ConnError::Tls(_)) {
                    self.bump(|s| s.tls_failures += 1);
                }
                self.bump(|s| s.handshake_failures_inbound += 1);
                warn!(node = self.me.node_id, ?remote, error = %e, "inbound peer handshake failed");
                return;
            }
        };
        debug!(
            node = self.me.node_id,
            peer,
            ?remote,
            "inbound peer connected"
        );
        if peer != JOINER_NODE_ID {
            self.redial(peer);
        }
        if peer == JOINER_NODE_ID {
            let handler = self.joins.borrow().clone();
            match crate::join::serve_join(&self, handler, &mut stream, &mut reader).await {
                Ok(answered) => {
                    if answered {
                        self.bump(|s| s.joins_served += 1);
                    }
                }
                Err(e @ (ConnError::Io(_) | ConnError::Timeout(_) | ConnError::Eof)) => {
                    debug!(node = self.me.node_id, ?remote, error = %e, "join connection failed")
                }
                Err(e) => {
                    self.bump(|s| s.protocol_errors += 1);
                    warn!(node = self.me.node_id, ?remote, error = %e, "closing join connection");
                }
            }
            return;
        }
        // The first frame fixes the connection's role (module docs).
        let first = match reader.next(&mut stream).await {
            Ok(h) => h,
            Err(e) => {
                debug!(node = self.me.node_id, peer, error = %e, "inbound peer closed before a frame");
                return;
            }
        };
        if first.opcode == PEER_SNAPSHOT_CHUNK_REQUEST {
            self.bump(|s| s.snapshot_connections += 1);
            let r = self
                .snapshots
                .serve(&self, &mut stream, &mut reader, peer, first)
                .await;
            match r {
                Ok(()) => debug!(node = self.me.node_id, peer, "snapshot connection ended"),
                Err(ConnError::Eof) => {
                    debug!(node = self.me.node_id, peer, "snapshot fetcher closed")
                }
                Err(e @ (ConnError::Io(_) | ConnError::Timeout(_))) => {
                    debug!(node = self.me.node_id, peer, error = %e, "snapshot connection failed")
                }
                Err(e) => {
                    self.bump(|s| s.protocol_errors += 1);
                    warn!(node = self.me.node_id, peer, error = %e, "closing snapshot connection");
                }
            }
            return;
        }
        let mine = Rc::new(Signal::default());
        let old = self.inbound.borrow_mut().insert(peer, (conn, mine.clone()));
        if let Some((_, old)) = old {
            self.bump(|s| s.replaced_connections += 1);
            old.fire();
        }
        let r = or(
            self.read_batches(&mut stream, &mut reader, peer, first),
            async {
                mine.wait().await;
                Ok(())
            },
        )
        .await;
        {
            let mut inbound = self.inbound.borrow_mut();
            if inbound.get(&peer).is_some_and(|(c, _)| *c == conn) {
                inbound.remove(&peer);
            }
        }
        match r {
            Ok(()) => debug!(node = self.me.node_id, peer, "inbound connection replaced"),
            Err(ConnError::Eof) => debug!(node = self.me.node_id, peer, "inbound peer closed"),
            Err(e @ (ConnError::Io(_) | ConnError::Timeout(_))) => {
                debug!(node = self.me.node_id, peer, error = %e, "inbound connection failed")
            }
            Err(e) => {
                self.bump(|s| s.protocol_errors += 1);
                warn!(node = self.me.node_id, peer, error = %e, "closing inbound peer connection");
            }
        }
    }

    /// TLS: the name the certificate of a peer claiming `node` must carry (`n<id>.<cluster>`;
    /// a joiner's `joiner.<cluster>`), so a certificate of another node, a removed one or a
    /// client is refused even though the cluster CA issued it.
    fn peer_cert_name(&self, node: u64) -> String {
        if node == JOINER_NODE_ID {
            joiner_name(&self.me.cluster_id)
        } else {
            node_name(&self.me.cluster_id, node)
        }
    }

    /// The authenticated peer, or `None` for a config request that was answered.
    async fn listener_handshake(
        &self,
        stream: &mut Stream,
        reader: &mut FrameReader,
    ) -> Result<Option<u64>, ConnError> {
        let mut hs = Listener::new(self.me, new_challenge(&mut rand::rngs::OsRng));
        // Over TLS the Hello's node id must be the one the certificate names: checked when the
        // Hello arrives, so a mismatch is refused (as an unknown node) before any Accept.
        let leaf = stream.peer_certificates().and_then(|c| c.first()).cloned();
        let tls = stream.is_tls();
        let mismatch: Cell<Option<String>> = Cell::new(None);
        let members = |node: u64| {
            if tls {
                let expected = self.peer_cert_name(node);
                if !leaf.as_ref().is_some_and(|c| cert_names(c, &expected)) {
                    mismatch.set(Some(expected));
                    return Admission::Unknown;
                }
            }
            if node == JOINER_NODE_ID {
                // Never `AlreadyConnected`: joiners are not in the connection table.
                if self.joins.borrow().is_some() {
                    Admission::Member
                } else {
                    Admission::Unknown
                }
            } else if self.peers.borrow().contains_key(&node) {
                Admission::Member
            } else {
                Admission::Unknown
            }
        };
        let mut out = Vec::new();
        let mut first = true;
        loop {
            let header = reader.next(stream).await?;
            if std::mem::take(&mut first) && header.opcode == PEER_CONFIG_REQUEST {
                // Over TLS only a joiner or a node (every node certificate carries the
                // cluster name) is served the config: not a partition client's certificate.
                if tls
                    && !leaf.as_ref().is_some_and(|c| {
                        cert_names(c, &joiner_name(&self.me.cluster_id))
                            || cert_names(c, &crate::tls::cluster_name(&self.me.cluster_id))
                    })
                {
                    return Err(ConnError::Tls(TlsFailure::WrongName {
                        expected: joiner_name(&self.me.cluster_id),
                    }));
                }
                let source = self.config.borrow().clone();
                let served = crate::join::answer_config(
                    source,
                    header.request_id,
                    reader.payload(),
                    &mut out,
                );
                let sent = write_out(stream, &mut out).await;
                if served? {
                    sent?;
                    self.bump(|s| s.config_served += 1);
                }
                return Ok(None);
            }
            let f = Frame {
                header,
                payload: reader.payload(),
            };
            let step = hs.on_frame(&f, &*self.prover, &members, &mut out);
            // The Accept, the Challenge or the Reject; a failed courtesy Reject changes nothing.
            let sent = write_out(stream, &mut out).await;
            if let Some(expected) = mismatch.take() {
                return Err(ConnError::Tls(TlsFailure::WrongName { expected }));
            }
            match step? {
                Step::Continue => sent?,
                Step::Established { peer } => {
                    sent?;
                    return Ok(Some(peer));
                }
            }
        }
    }

    async fn read_batches(
        &self,
        stream: &mut Stream,
        reader: &mut FrameReader,
        peer: u64,
        first: FrameHeader,
    ) -> Result<(), ConnError> {
        let mut next = Some(first);
        loop {
            let header = match next.take() {
                Some(h) => h,
                None => reader.next(stream).await?,
            };
            if header.opcode != PEER_RAFT_BATCH {
                return Err(ConnError::Opcode(header.opcode));
            }
            let batch = decode_raft_batch(reader.payload())?;
            let mut msgs = Vec::with_capacity(batch.len());
            for (shard, bytes) in batch {
                let m = Message::parse_from_bytes(bytes)
                    .map_err(|e| ConnError::Message(e.to_string()))?;
                if m.from != peer {
                    return Err(ConnError::Spoofed { from: m.from, peer });
                }
                msgs.push((shard, m));
            }
            self.bump(|s| {
                s.received_batches += 1;
                s.received_messages += msgs.len() as u64;
            });
            for (shard, m) in msgs {
                (self.handler)(peer, shard, m);
            }
        }
    }

    // ---- outbound ----

    fn enqueue(&self, peer: u64, shard: u32, bytes: Vec<u8>) {
        if self.closed.get() {
            self.bump(|s| s.dropped_disconnected += 1);
            return;
        }
        if !self.peers.borrow().contains_key(&peer) {
            self.bump(|s| s.dropped_unknown_peer += 1);
            return;
        }
        let mut queues = self.queues.borrow_mut();
        let q = queues.entry(peer).or_insert_with(|| {
            if let Some(this) = self.this.upgrade() {
                let t = this.clone();
                this.spawn(async move { t.run_writer(peer).await });
            }
            PeerQueue::default()
        });
        if q.msgs.len() >= PEER_QUEUE_MESSAGES {
            drop(queues);
            self.bump(|s| s.dropped_queue_full += 1);
            return;
        }
        q.msgs.push_back((shard, bytes));
        if let Some(w) = q.waker.take() {
            w.wake();
        }
    }

    /// Starts a writer for every peer in the table that has none, so each is dialed now (a
    /// starting node connects to its peers at once; they see it and redial it too).
    pub fn connect_all(&self) {
        let peers: Vec<u64> = self.peers.borrow().keys().copied().collect();
        for peer in peers {
            if self.closed.get() || self.queues.borrow().contains_key(&peer) {
                continue;
            }
            if let Some(this) = self.this.upgrade() {
                self.queues.borrow_mut().insert(peer, PeerQueue::default());
                let t = this.clone();
                this.spawn(async move { t.run_writer(peer).await });
            }
        }
    }

    /// `peer` just authenticated to us, so it is up: a writer backing off from it dials now.
    fn redial(&self, peer: u64) {
        if let Some(q) = self.queues.borrow_mut().get_mut(&peer) {
            q.redial_now = true;
            if let Some(w) = q.redial_waker.take() {
                w.wake();
            }
        }
    }

    /// Resolves when [`Self::redial`] was called for `peer` (or its queue is gone).
    async fn redial_wanted(&self, peer: u64) {
        poll_fn(|cx| {
            let mut queues = self.queues.borrow_mut();
            match queues.get_mut(&peer) {
                Some(q) if q.redial_now => {
                    q.redial_now = false;
                    Poll::Ready(())
                }
                Some(q) => {
                    q.redial_waker = Some(cx.waker().clone());
                    Poll::Pending
                }
                None => Poll::Ready(()),
            }
        })
        .await
    }

    /// Dials `peer` until it leaves the table (or the transport closes), carrying its queue.
    async fn run_writer(self: Rc<Self>, peer: u64) {
        let mut backoff = RECONNECT_BACKOFF_MIN;
        let mut again = false;
        loop {
            let Some(addr) = self.peers.borrow().get(&peer).copied() else {
                break;
            };
            match self.dial(peer, addr).await {
                Ok(mut stream) => {
                    self.bump(|s| {
                        s.connects += 1;
                        s.reconnects += u64::from(again);
                    });
                    debug!(node = self.me.node_id, peer, %addr, "outbound peer connected");
                    backoff = RECONNECT_BACKOFF_MIN;
                    let e = self.write_batches(peer, addr, &mut stream).await;
                    debug!(node = self.me.node_id, peer, error = %e, "outbound connection ended");
                }
                Err(e) => {
                    warn!(node = self.me.node_id, peer, %addr, error = %e, "dialing peer failed");
                }
            }
            again = true;
            if !self.peers.borrow().contains_key(&peer) {
                break;
            }
            or(glommio::timer::sleep(backoff), self.redial_wanted(peer)).await;
            backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
        }
        // Synchronously with the check above: a later send starts a new writer.
        if let Some(q) = self.queues.borrow_mut().remove(&peer) {
            self.bump(|s| s.dropped_disconnected += q.msgs.len() as u64);
        }
        debug!(
            node = self.me.node_id,
            peer, "peer left the table; writer stopped"
        );
    }

    /// Connects to `peer` at `addr` and runs the dialer handshake (counted in the stats).
    pub(crate) async fn dial(&self, peer: u64, addr: SocketAddr) -> Result<Stream, ConnError> {
        let tcp = match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT).await {
            Ok(s) => s,
            Err(e) => {
                self.bump(|s| s.dial_failures += 1);
                return Err(ConnError::Io(e.into()));
            }
        };
        let _ = tcp.set_nodelay(true);
        let tls = self.tls();
        let r = within(HANDSHAKE_TIMEOUT, "outbound handshake", async {
            // The dialed node is verified by name: its certificate must say `n<peer>`.
            let mut stream = match &tls {
                Some(t) => {
                    let name = node_name(&self.me.cluster_id, peer);
                    Stream::connect(tcp, t.peer_client.clone(), &name).await?
                }
                None => Stream::Plain(tcp),
            };
            self.dialer_handshake(peer, &mut stream).await?;
            Ok(stream)
        })
        .await;
        match r {
            Ok(stream) => Ok(stream),
            Err(e) => {
                if matches!(e, ConnError::Tls(_)) {
                    self.bump(|s| s.tls_failures += 1);
                }
                self.bump(|s| s.handshake_failures_outbound += 1);
                Err(e)
            }
        }
    }

    async fn dialer_handshake(&self, peer: u64, stream: &mut Stream) -> Result<(), ConnError> {
        let mut hs = Dialer::new(self.me, Some(peer), new_challenge(&mut rand::rngs::OsRng));
        let mut out = Vec::new();
        let mut reader = FrameReader::new();
        hs.start(&mut out)?;
        write_out(stream, &mut out).await?;
        loop {
            let header = reader.next(stream).await?;
            let f = Frame {
                header,
                payload: reader.payload(),
            };
            let step = hs.on_frame(&f, &*self.prover, &mut out);
            let sent = write_out(stream, &mut out).await;
            match step? {
                Step::Continue => sent?,
                Step::Established { .. } => return sent,
            }
        }
    }

    /// Writes batches until an error; returns why the connection ended.
    async fn write_batches(&self, peer: u64, addr: SocketAddr, stream: &mut Stream) -> ConnError {
        enum Wake {
            Work,
            Moved,
            Broken(ConnError),
        }
        let mut frame_buf = Vec::new();
        let mut payload = Vec::new();
        loop {
            let wake = or(
                poll_fn(|cx| {
                    if self.peers.borrow().get(&peer) != Some(&addr) {
                        return Poll::Ready(Wake::Moved);
                    }
                    let mut queues = self.queues.borrow_mut();
                    let Some(q) = queues.get_mut(&peer) else {
                        return Poll::Ready(Wake::Moved);
                    };
                    if q.msgs.is_empty() {
                        q.waker = Some(cx.waker().clone());
                        Poll::Pending
                    } else {
                        Poll::Ready(Wake::Work)
                    }
                }),
                async {
                    // The listener sends nothing after Accept: a byte or EOF means it is gone.
                    let mut b = [0u8; 1];
                    Wake::Broken(match stream.read(&mut b).await {
                        Ok(_) => ConnError::ListenerTalked,
                        Err(e) => ConnError::Io(e),
                    })
                },
            )
            .await;
            match wake {
                Wake::Work => {}
                Wake::Moved => return ConnError::Timeout("peer address changed"),
                Wake::Broken(e) => return e,
            }
            let batch = self.take_batch(peer);
            let refs: Vec<(u32, &[u8])> = batch.iter().map(|(s, m)| (*s, m.as_slice())).collect();
            payload.clear();
            frame_buf.clear();
            let encoded = encode_raft_batch(&refs, &mut payload)
                .map_err(ConnError::from)
                .and_then(|()| {
                    let h = FrameHeader {
                        flags: 0,
                        opcode: PEER_RAFT_BATCH,
                        request_id: 0,
                    };
                    frame::encode(h, &payload, &mut frame_buf).map_err(ConnError::from)
                });
            if let Err(e) = encoded {
                // Cannot happen: take_batch keeps within both limits.
                self.bump(|s| s.dropped_too_large += batch.len() as u64);
                warn!(node = self.me.node_id, peer, error = %e, "raft batch not encodable");
                continue;
            }
            let w = within(WRITE_TIMEOUT, "batch write", async {
                stream.write_all(&frame_buf).await?;
                stream.flush().await?;
                Ok(())
            })
            .await;
            if let Err(e) = w {
                self.bump(|s| s.dropped_disconnected += batch.len() as u64);
                return e;
            }
            self.bump(|s| {
                s.sent_batches += 1;
                s.sent_messages += batch.len() as u64;
            });
        }
    }

    /// Takes the oldest queued messages of `peer` that fit one batch frame.
    fn take_batch(&self, peer: u64) -> Vec<(u32, Vec<u8>)> {
        let mut queues = self.queues.borrow_mut();
        let Some(q) = queues.get_mut(&peer) else {
            return Vec::new();
        };
        let mut len = RAFT_BATCH_HEADER_LEN;
        let mut n = 0;
        for (_, m) in &q.msgs {
            let next = len + RAFT_BATCH_MESSAGE_OVERHEAD + m.len();
            if n == MAX_RAFT_BATCH_MESSAGES || next > MAX_FRAME_PAYLOAD_BYTES {
                break;
            }
            len = next;
            n += 1;
        }
        q.msgs.drain(..n).collect()
    }
}

impl Transport for PeerTransport {
    /// Queues each message for its `to` node; never blocks (see the module docs).
    fn send(&self, shard: u32, msgs: Vec<Message>) {
        for m in msgs {
            let to = m.to;
            if to == self.me.node_id {
                // raft never addresses itself; a peer table naming this node must not make the
                // transport dial itself (the handshake would refuse it forever).
                self.bump(|s| s.dropped_unknown_peer += 1);
                continue;
            }
            match m.write_to_bytes() {
                Ok(b) if b.len() <= MAX_RAFT_MESSAGE_BYTES => self.enqueue(to, shard, b),
                Ok(b) => {
                    self.bump(|s| s.dropped_too_large += 1);
                    warn!(
                        node = self.me.node_id,
                        to,
                        shard,
                        len = b.len(),
                        "raft message too large"
                    );
                }
                Err(e) => {
                    self.bump(|s| s.dropped_too_large += 1);
                    warn!(node = self.me.node_id, to, shard, error = %e, "raft message not encodable");
                }
            }
        }
    }
}
