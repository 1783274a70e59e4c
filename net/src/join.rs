//! Joining a cluster, peer side (docs/format.md §6.12): the frames a node without a raft id uses
//! to get the cluster config and then a raft id, their codecs, the two client calls and the
//! server halves the transport runs ([`crate::transport::PeerTransport::serve_config`],
//! [`crate::transport::PeerTransport::serve_joins`]).
//!
//! 1. **Config fetch, unauthenticated.** [`fetch_cluster_config`] connects to any node and sends
//!    `PEER_CONFIG_REQUEST` as its first frame instead of a Hello; the node answers `PEER_CONFIG`
//!    (the cluster config bytes, §7.1) or a Reject `NOT_SERVED`, and closes. The config holds the
//!    cluster integrity key wrapped under the realm's adapter KBK: only a card of the realm can
//!    import it (docs/threat-model.md, *Peers*).
//! 2. **Join, authenticated.** With the key imported in its card, the joiner runs the ordinary
//!    handshake (§6.1–6.4) claiming [`JOINER_NODE_ID`], so it proves it holds the integrity key
//!    before anything is served; then [`request_join`] sends one `PEER_JOIN_REQUEST` (the address
//!    it will listen on) and reads one `PEER_JOIN_GRANT` (its fresh raft id, the id it replaces,
//!    the node to fetch snapshots from, the config, a snapshot descriptor per shard) or a Reject
//!    (`JOIN_NOT_LEADER`, `JOIN_BUSY`, `JOIN_FAILED`). The node closes after answering; a joiner
//!    never becomes a raft or snapshot connection.
//!
//! What the grant means (allocating the id through raft, learners, the joint conf change) is the
//! engine's: the node's [`JoinHandler`] decides.

use crate::frame::{self, flags, Frame, FrameError, FrameHeader};
pub use crate::peer::JOINER_NODE_ID;
use crate::peer::{
    new_challenge, reject, Dialer, PeerError, PeerIdentity, Prover, Reader, Reject, Step,
    CLUSTER_ID_LEN, HANDSHAKE_REQUEST_ID, MAX_REJECT_REASON_BYTES, PEER_CONFIG,
    PEER_CONFIG_REQUEST, PEER_JOIN_GRANT, PEER_JOIN_REQUEST, PEER_REJECT,
};
use crate::tls::{DialTls, Stream, TlsFailure};
use crate::transport::{
    within, write_out, ConnError, FrameReader, PeerTransport, CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT,
    WRITE_TIMEOUT,
};
use futures_lite::future::or;
use glommio::net::TcpStream;
use keyfort_engine::cluster::{ClusterConfig, ClusterError, ADDR_BYTES_MAX, SHARDS_MAX};
use keyfort_engine::raft::snapshot::{DescriptorError, SnapshotDescriptor, DESCRIPTOR_BYTES};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;
use tracing::{info, warn};

/// Largest cluster config served or accepted (`PEER_CONFIG` payload and a grant's config). A
/// config within the cluster limits (64 members, 256-byte addresses, 4 KiB wrapped key) is
/// under 22 KiB.
pub const CONFIG_BYTES_MAX: usize = 64 << 10;
/// Longest [`fetch_cluster_config`] may take, connect included.
pub const CONFIG_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest [`request_join`] may take, connect and handshake included; the node's handler runs
/// under the same bound (allocating an id is a raft proposal, which may wait for an election).
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(120);
/// Request id of the join request (its answer echoes it).
pub const JOIN_REQUEST_ID: u64 = 1;
/// Bytes of a grant's fixed part before the config: node id, replaces, source, config length.
pub const JOIN_GRANT_FIXED_LEN: usize = 8 + 8 + 8 + 4;

/// Answers a join request: the grant, or why not (see [`JoinRefusal`]).
pub type JoinHandler =
    Rc<dyn Fn(JoinRequest) -> Pin<Box<dyn Future<Output = Result<JoinGrant, JoinRefusal>>>>>;

/// The cluster config bytes this node serves to config requests (`None`: none yet).
pub type ConfigSource = Rc<dyn Fn() -> Option<Vec<u8>>>;

/// `PEER_JOIN_REQUEST` payload: u16 length + UTF-8 address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinRequest {
    /// The peer address (`HOST:PORT`, a `SocketAddr`) the joiner will listen on; at most
    /// `ADDR_BYTES_MAX` bytes.
    pub peer_addr: String,
}

const JR: &str = "join request";
const JG: &str = "join grant";

impl JoinRequest {
    fn check(addr: &str) -> Result<(), PeerError> {
        if addr.len() > ADDR_BYTES_MAX {
            return Err(PeerError::Malformed {
                what: JR,
                detail: "address longer than ADDR_BYTES_MAX",
            });
        }
        if addr.parse::<SocketAddr>().is_err() {
            return Err(PeerError::Malformed {
                what: JR,
                detail: "address is not HOST:PORT (a socket address)",
            });
        }
        Ok(())
    }

    /// Appends the payload to `out`; refuses an address that is too long or does not parse
    /// (`out` is untouched then).
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), PeerError> {
        Self::check(&self.peer_addr)?;
        out.extend_from_slice(&(self.peer_addr.len() as u16).to_le_bytes());
        out.extend_from_slice(self.peer_addr.as_bytes());
        Ok(())
    }

    /// Decodes a whole payload.
    pub fn decode(buf: &[u8]) -> Result<Self, PeerError> {
        let mut r = Reader::new(buf, JR);
        let len = usize::from(r.u16()?);
        if len > ADDR_BYTES_MAX {
            return Err(PeerError::Malformed {
                what: JR,
                detail: "address longer than ADDR_BYTES_MAX",
            });
        }
        let addr = std::str::from_utf8(r.bytes(len)?).map_err(|_| PeerError::Malformed {
            what: JR,
            detail: "address is not UTF-8",
        })?;
        r.finish()?;
        Self::check(addr)?;
        Ok(JoinRequest {
            peer_addr: addr.to_owned(),
        })
    }
}

/// `PEER_JOIN_GRANT` payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinGrant {
    /// The joiner's fresh raft id: not 0, not [`JOINER_NODE_ID`].
    pub node_id: u64,
    /// The raft id this node replaces (0: none); not [`JOINER_NODE_ID`], not `node_id`.
    pub replaces: u64,
    /// The node to fetch snapshots from: not 0, not [`JOINER_NODE_ID`], not `node_id`.
    pub source: u64,
    /// The cluster config bytes (§7.1), at most [`CONFIG_BYTES_MAX`]; opaque to this codec (the
    /// joiner decodes them with `ClusterConfig::decode`).
    pub config: Vec<u8>,
    /// One descriptor per shard, in shard order (`snapshots[i].shard == i`), at most
    /// `SHARDS_MAX`.
    pub snapshots: Vec<SnapshotDescriptor>,
}

fn bad_grant(detail: &'static str) -> JoinError {
    JoinError::Peer(PeerError::Malformed { what: JG, detail })
}

impl JoinGrant {
    fn check_ids(node_id: u64, replaces: u64, source: u64) -> Result<(), JoinError> {
        if node_id == 0 || node_id == JOINER_NODE_ID {
            return Err(bad_grant("node id is 0 or the joiner id"));
        }
        if replaces == JOINER_NODE_ID || replaces == node_id {
            return Err(bad_grant("replaces the joiner id or the granted id"));
        }
        if source == 0 || source == JOINER_NODE_ID || source == node_id {
            return Err(bad_grant("source is 0, the joiner id or the granted id"));
        }
        Ok(())
    }

    fn check_config_len(len: usize) -> Result<(), JoinError> {
        if len > CONFIG_BYTES_MAX {
            return Err(JoinError::ConfigTooLarge {
                len,
                max: CONFIG_BYTES_MAX,
            });
        }
        Ok(())
    }

    fn check_count(count: usize) -> Result<(), JoinError> {
        if count > SHARDS_MAX as usize {
            return Err(JoinError::TooManySnapshots {
                count,
                max: SHARDS_MAX as usize,
            });
        }
        Ok(())
    }

    fn check_order(index: usize, d: &SnapshotDescriptor) -> Result<(), JoinError> {
        if d.shard as usize != index {
            return Err(JoinError::SnapshotOrder {
                index,
                shard: d.shard,
            });
        }
        Ok(())
    }

    /// Bytes of the payload.
    pub fn encoded_len(&self) -> usize {
        JOIN_GRANT_FIXED_LEN + self.config.len() + 4 + self.snapshots.len() * DESCRIPTOR_BYTES
    }

    /// Appends the payload to `out`; refuses a grant that would not decode (`out` is untouched
    /// then).
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), JoinError> {
        Self::check_ids(self.node_id, self.replaces, self.source)?;
        Self::check_config_len(self.config.len())?;
        Self::check_count(self.snapshots.len())?;
        for (i, d) in self.snapshots.iter().enumerate() {
            Self::check_order(i, d)?;
        }
        out.reserve(self.encoded_len());
        out.extend_from_slice(&self.node_id.to_le_bytes());
        out.extend_from_slice(&self.replaces.to_le_bytes());
        out.extend_from_slice(&self.source.to_le_bytes());
        out.extend_from_slice(&(self.config.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.config);
        out.extend_from_slice(&(self.snapshots.len() as u32).to_le_bytes());
        for d in &self.snapshots {
            out.extend_from_slice(&d.encode());
        }
        Ok(())
    }

    /// Decodes a whole payload. Lengths and counts are checked against their limits and the
    /// bytes present before anything is allocated; each descriptor must decode and be in its
    /// canonical encoding (reserved bytes zero), so a grant has one encoding.
    pub fn decode(buf: &[u8]) -> Result<Self, JoinError> {
        let mut r = Reader::new(buf, JG);
        let node_id = r.u64()?;
        let replaces = r.u64()?;
        let source = r.u64()?;
        Self::check_ids(node_id, replaces, source)?;
        let config_len = r.u32()? as usize;
        Self::check_config_len(config_len)?;
        let config = r.bytes(config_len)?.to_vec();
        let count = r.u32()? as usize;
        Self::check_count(count)?;
        let need = count * DESCRIPTOR_BYTES;
        if r.remaining() < need {
            return Err(JoinError::Peer(PeerError::Truncated {
                what: JG,
                need: buf.len() - r.remaining() + need,
                have: buf.len(),
            }));
        }
        let mut snapshots = Vec::with_capacity(count);
        for index in 0..count {
            let b = r.bytes(DESCRIPTOR_BYTES)?;
            let d = SnapshotDescriptor::decode(b)
                .map_err(|source| JoinError::Descriptor { index, source })?;
            if d.encode()[..] != *b {
                return Err(JoinError::NonCanonicalDescriptor { index });
            }
            Self::check_order(index, &d)?;
            snapshots.push(d);
        }
        r.finish()?;
        Ok(JoinGrant {
            node_id,
            replaces,
            source,
            config,
            snapshots,
        })
    }
}

/// Why a node's join handler refuses a join; sent as a Reject with a join code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinRefusal {
    /// Not the leader (code `JOIN_NOT_LEADER`; the reason is the leader's peer address, empty
    /// when unknown).
    NotLeader { leader_addr: Option<String> },
    /// Another join is in progress; retry (code `JOIN_BUSY`).
    Busy,
    /// The join failed (code `JOIN_FAILED`; the reason, cut to `MAX_REJECT_REASON_BYTES`).
    Failed(String),
}

impl JoinRefusal {
    /// The Reject this refusal is sent as.
    pub fn to_reject(&self) -> Reject {
        let (code, reason) = match self {
            JoinRefusal::NotLeader { leader_addr } => (
                reject::JOIN_NOT_LEADER,
                leader_addr.clone().unwrap_or_default(),
            ),
            JoinRefusal::Busy => (reject::JOIN_BUSY, "another join is in progress".to_owned()),
            JoinRefusal::Failed(why) => (reject::JOIN_FAILED, why.clone()),
        };
        Reject {
            code,
            reason: cut_reason(reason),
        }
    }
}

/// `reason` cut to `MAX_REJECT_REASON_BYTES` at a character boundary.
fn cut_reason(mut reason: String) -> String {
    if reason.len() > MAX_REJECT_REASON_BYTES {
        let mut cut = MAX_REJECT_REASON_BYTES;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    reason
}

/// Why a config fetch or a join did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// Connecting, reading or writing failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The step named did not finish in time.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The node closed the connection before it answered.
    #[error("connection closed by the peer before it answered")]
    Closed,
    /// The node's bytes are not a frame.
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    /// The handshake failed (`BadProof`, `WrongCluster`, `Rejected` with a handshake code, ...),
    /// or a payload or frame broke the protocol (`Truncated`, `Malformed`, `UnexpectedFrame`).
    #[error("peer protocol: {0}")]
    Peer(#[from] PeerError),
    /// The TLS handshake was refused (this node's certificate, or the dialed node's).
    #[error("TLS: {0}")]
    Tls(#[from] TlsFailure),
    /// The node is not the leader; the leader's address when it knows it.
    #[error("not the leader (leader at {leader_addr:?})")]
    NotLeader { leader_addr: Option<String> },
    /// Another join is in progress; retry later.
    #[error("another join is in progress; retry later")]
    Busy,
    /// The node could not make the joiner a member.
    #[error("join failed: {0}")]
    Failed(String),
    /// The node serves no cluster config, or no joins.
    #[error("the node serves no cluster config or no joins")]
    NotServed,
    /// The served config does not decode.
    #[error("cluster config: {0}")]
    Config(#[from] ClusterError),
    /// A config over `CONFIG_BYTES_MAX`.
    #[error("cluster config of {len} bytes exceeds the maximum of {max}")]
    ConfigTooLarge { len: usize, max: usize },
    /// A grant with more descriptors than `SHARDS_MAX`.
    #[error("join grant with {count} snapshot descriptors exceeds the maximum of {max}")]
    TooManySnapshots { count: usize, max: usize },
    /// A grant's descriptor that does not decode.
    #[error("join grant snapshot descriptor {index}: {source}")]
    Descriptor {
        index: usize,
        source: DescriptorError,
    },
    /// A grant's descriptor with non-zero reserved bytes.
    #[error("join grant snapshot descriptor {index} is not in its canonical encoding")]
    NonCanonicalDescriptor { index: usize },
    /// A grant's descriptors not one per shard in shard order.
    #[error("join grant snapshot descriptor {index} is of shard {shard}")]
    SnapshotOrder { index: usize, shard: u32 },
}

impl JoinError {
    /// The error a Reject carries: the join codes are typed, the others `Peer(Rejected)`.
    fn from_reject(r: Reject) -> JoinError {
        match r.code {
            reject::JOIN_NOT_LEADER => JoinError::NotLeader {
                leader_addr: (!r.reason.is_empty()).then_some(r.reason),
            },
            reject::JOIN_BUSY => JoinError::Busy,
            reject::JOIN_FAILED => JoinError::Failed(r.reason),
            reject::NOT_SERVED => JoinError::NotServed,
            code => JoinError::Peer(PeerError::Rejected {
                code,
                reason: r.reason,
            }),
        }
    }

    fn from_conn(e: ConnError) -> JoinError {
        match e {
            ConnError::Io(e) => JoinError::Io(e),
            ConnError::Eof => JoinError::Closed,
            ConnError::Timeout(what) => JoinError::Timeout(what),
            ConnError::Frame(e) => JoinError::Frame(e),
            ConnError::Peer(PeerError::Rejected { code, reason }) => {
                JoinError::from_reject(Reject { code, reason })
            }
            ConnError::Peer(e) => JoinError::Peer(e),
            ConnError::Tls(f) => JoinError::Tls(f),
            other => JoinError::Io(io::Error::other(other.to_string())),
        }
    }
}

// ---- client ----

/// Runs `f`, failing with `Timeout(what)` after `d`.
async fn bounded<T>(
    d: Duration,
    what: &'static str,
    f: impl Future<Output = Result<T, JoinError>>,
) -> Result<T, JoinError> {
    or(f, async {
        glommio::timer::sleep(d).await;
        Err(JoinError::Timeout(what))
    })
    .await
}

async fn connect(addr: SocketAddr, tls: Option<&DialTls>) -> Result<Stream, JoinError> {
    let s = TcpStream::connect_timeout(addr, CONNECT_TIMEOUT)
        .await
        .map_err(io::Error::from)?;
    let _ = s.set_nodelay(true);
    Ok(match tls {
        Some(t) => Stream::connect(s, t.config.clone(), &t.name).await?,
        None => Stream::Plain(s),
    })
}

/// Reads the answer frame; returns its header (payload in `reader`).
async fn answer(s: &mut Stream, reader: &mut FrameReader) -> Result<FrameHeader, JoinError> {
    reader.next(s).await.map_err(JoinError::from_conn)
}

/// Fetches the cluster config from the node at `addr`, unauthenticated (docs/format.md §6.12),
/// within [`CONFIG_FETCH_TIMEOUT`]. The config is whatever that node says: only the wrapped
/// integrity key's import in a card of the realm, and the handshake made with it afterwards,
/// show it is genuine.
pub async fn fetch_cluster_config(addr: SocketAddr) -> Result<ClusterConfig, JoinError> {
    fetch_cluster_config_over(addr, None).await
}

/// [`fetch_cluster_config`] over TLS when `tls` is given.
pub async fn fetch_cluster_config_over(
    addr: SocketAddr,
    tls: Option<&DialTls>,
) -> Result<ClusterConfig, JoinError> {
    bounded(CONFIG_FETCH_TIMEOUT, "cluster config fetch", async {
        let mut s = connect(addr, tls).await?;
        let mut out = Vec::new();
        let h = FrameHeader {
            flags: 0,
            opcode: PEER_CONFIG_REQUEST,
            request_id: HANDSHAKE_REQUEST_ID,
        };
        frame::encode(h, &[], &mut out)?;
        write_out(&mut s, &mut out)
            .await
            .map_err(JoinError::from_conn)?;
        let mut reader = FrameReader::new();
        let h = answer(&mut s, &mut reader).await?;
        let payload = reader.payload();
        match h.opcode {
            PEER_CONFIG => {
                JoinGrant::check_config_len(payload.len())?;
                Ok(ClusterConfig::decode(payload)?)
            }
            PEER_REJECT => Err(JoinError::from_reject(Reject::decode(payload)?)),
            opcode => Err(JoinError::Peer(PeerError::UnexpectedFrame {
                state: "awaiting cluster config",
                opcode,
            })),
        }
    })
    .await
}

/// Asks the node at `addr` to make this node a member (docs/format.md §6.12), within
/// [`JOIN_TIMEOUT`]: handshakes as [`JOINER_NODE_ID`] of `cluster_id` proving with `prover`
/// (the card holding the imported integrity key; the listener may be any member, its proof is
/// checked), sends `req` and returns the node's grant, or its refusal as `NotLeader`, `Busy`,
/// `Failed` or `NotServed`. A node that serves no joins refuses the handshake
/// (`Peer(Rejected { code: UNKNOWN_NODE })`); a key that is not the cluster's fails it
/// (`Peer(BadProof)` when the node's proof does not verify here, `Peer(Rejected { code:
/// BAD_PROOF })` when ours does not there).
pub async fn request_join(
    addr: SocketAddr,
    cluster_id: [u8; CLUSTER_ID_LEN],
    prover: &dyn Prover,
    req: &JoinRequest,
) -> Result<JoinGrant, JoinError> {
    request_join_over(addr, cluster_id, prover, req, None).await
}

/// [`request_join`] over TLS when `tls` is given (the joiner's certificate, `joiner.<cluster>`).
pub async fn request_join_over(
    addr: SocketAddr,
    cluster_id: [u8; CLUSTER_ID_LEN],
    prover: &dyn Prover,
    req: &JoinRequest,
    tls: Option<&DialTls>,
) -> Result<JoinGrant, JoinError> {
    let mut payload = Vec::new();
    req.encode(&mut payload)?;
    bounded(JOIN_TIMEOUT, "join", async {
        let mut s = connect(addr, tls).await?;
        let mut reader = FrameReader::new();
        let me = PeerIdentity {
            cluster_id,
            node_id: JOINER_NODE_ID,
        };
        bounded(
            HANDSHAKE_TIMEOUT,
            "join handshake",
            handshake(me, prover, &mut s, &mut reader),
        )
        .await?;
        let mut out = Vec::new();
        let h = FrameHeader {
            flags: 0,
            opcode: PEER_JOIN_REQUEST,
            request_id: JOIN_REQUEST_ID,
        };
        frame::encode(h, &payload, &mut out)?;
        write_out(&mut s, &mut out)
            .await
            .map_err(JoinError::from_conn)?;
        let h = answer(&mut s, &mut reader).await?;
        let payload = reader.payload();
        match h.opcode {
            PEER_JOIN_GRANT if h.request_id == JOIN_REQUEST_ID => JoinGrant::decode(payload),
            PEER_REJECT => Err(JoinError::from_reject(Reject::decode(payload)?)),
            opcode => Err(JoinError::Peer(PeerError::UnexpectedFrame {
                state: "awaiting join grant",
                opcode,
            })),
        }
    })
    .await
}

async fn handshake(
    me: PeerIdentity,
    prover: &dyn Prover,
    s: &mut Stream,
    reader: &mut FrameReader,
) -> Result<(), JoinError> {
    let mut hs = Dialer::new(me, None, new_challenge(&mut rand::rngs::OsRng));
    let mut out = Vec::new();
    hs.start(&mut out)?;
    write_out(s, &mut out).await.map_err(JoinError::from_conn)?;
    loop {
        let header = answer(s, reader).await?;
        let f = Frame {
            header,
            payload: reader.payload(),
        };
        let step = hs.on_frame(&f, prover, &mut out);
        // The Proof, or the courtesy Reject of a failed step.
        let sent = write_out(s, &mut out).await.map_err(JoinError::from_conn);
        match step {
            Ok(Step::Continue) => sent?,
            Ok(Step::Established { .. }) => return sent,
            Err(PeerError::Rejected { code, reason }) => {
                return Err(JoinError::from_reject(Reject { code, reason }))
            }
            Err(e) => return Err(JoinError::Peer(e)),
        }
    }
}

// ---- server (driven by the transport) ----

/// Appends a Reject frame of `code` and `reason` (cut to fit) with `request_id`.
fn push_reject(out: &mut Vec<u8>, request_id: u64, r: &Reject) {
    let r = Reject {
        code: r.code,
        reason: cut_reason(r.reason.clone()),
    };
    let mut p = Vec::new();
    if r.encode(&mut p).is_ok() {
        let h = FrameHeader {
            flags: flags::RESPONSE | flags::ERROR,
            opcode: PEER_REJECT,
            request_id,
        };
        // A reject is a few hundred bytes: it always fits a frame.
        let _ = frame::encode(h, &p, out);
    }
}

/// Answers a `PEER_CONFIG_REQUEST` (the connection's first frame, `request_id` and `payload`)
/// into `out`: the config from `source`, or a Reject `NOT_SERVED` when there is none (`Ok(false)`).
/// A payload that is not empty is a protocol error (Reject `PROTOCOL`, `Err`).
pub(crate) fn answer_config(
    source: Option<ConfigSource>,
    request_id: u64,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<bool, PeerError> {
    if !payload.is_empty() {
        let e = PeerError::TrailingBytes {
            what: "config request",
            extra: payload.len(),
        };
        push_reject(out, request_id, &Reject::for_error(reject::PROTOCOL, &e));
        return Err(e);
    }
    let not_served = |out: &mut Vec<u8>, why: &str| {
        let r = Reject {
            code: reject::NOT_SERVED,
            reason: why.to_owned(),
        };
        push_reject(out, request_id, &r);
        Ok(false)
    };
    let Some(config) = source.and_then(|f| f()) else {
        return not_served(out, "no cluster config served by this node");
    };
    if config.len() > CONFIG_BYTES_MAX {
        warn!(
            len = config.len(),
            "cluster config larger than CONFIG_BYTES_MAX not served"
        );
        return not_served(out, "cluster config larger than CONFIG_BYTES_MAX");
    }
    let h = FrameHeader {
        flags: flags::RESPONSE,
        opcode: PEER_CONFIG,
        request_id,
    };
    frame::encode(h, &config, out)?;
    Ok(true)
}

/// Serves the one join request of a connection authenticated as [`JOINER_NODE_ID`]: its first
/// frame must be `PEER_JOIN_REQUEST` (within `HANDSHAKE_TIMEOUT`), anything else is a protocol
/// error (Reject `PROTOCOL`, `Err`); the handler's answer (within [`JOIN_TIMEOUT`]) is written
/// and the connection is to be closed. `Ok(true)`: the handler answered (grant or refusal).
pub(crate) async fn serve_join(
    t: &PeerTransport,
    handler: Option<JoinHandler>,
    stream: &mut Stream,
    reader: &mut FrameReader,
) -> Result<bool, ConnError> {
    let h = within(HANDSHAKE_TIMEOUT, "join request", reader.next(stream)).await?;
    let mut out = Vec::new();
    let protocol = |out: &mut Vec<u8>, e: PeerError| {
        push_reject(out, h.request_id, &Reject::for_error(reject::PROTOCOL, &e));
        e
    };
    if h.opcode != PEER_JOIN_REQUEST {
        let e = protocol(
            &mut out,
            PeerError::UnexpectedFrame {
                state: "awaiting join request",
                opcode: h.opcode,
            },
        );
        let _ = within(WRITE_TIMEOUT, "reject write", write_out(stream, &mut out)).await;
        return Err(ConnError::Peer(e));
    }
    let req = match JoinRequest::decode(reader.payload()) {
        Ok(r) => r,
        Err(e) => {
            let e = protocol(&mut out, e);
            let _ = within(WRITE_TIMEOUT, "reject write", write_out(stream, &mut out)).await;
            return Err(ConnError::Peer(e));
        }
    };
    let node = t.identity().node_id;
    let answered = match handler {
        None => {
            let r = Reject {
                code: reject::NOT_SERVED,
                reason: "joins are not served by this node".to_owned(),
            };
            push_reject(&mut out, h.request_id, &r);
            false
        }
        Some(handler) => {
            info!(node, peer_addr = %req.peer_addr, "join requested");
            let r = or(handler(req), async {
                glommio::timer::sleep(JOIN_TIMEOUT).await;
                Err(JoinRefusal::Failed(
                    "the join timed out on the node".to_owned(),
                ))
            })
            .await;
            let r = r.and_then(|g| {
                let mut p = Vec::with_capacity(g.encoded_len());
                g.encode(&mut p).map(|()| (g, p)).map_err(|e| {
                    warn!(node, error = %e, "join grant not encodable");
                    JoinRefusal::Failed(format!("join grant not encodable: {e}"))
                })
            });
            match r {
                Ok((g, p)) => {
                    info!(
                        node,
                        granted = g.node_id,
                        replaces = g.replaces,
                        "join granted"
                    );
                    let gh = FrameHeader {
                        flags: flags::RESPONSE,
                        opcode: PEER_JOIN_GRANT,
                        request_id: h.request_id,
                    };
                    frame::encode(gh, &p, &mut out)?;
                }
                Err(refusal) => {
                    info!(node, ?refusal, "join refused");
                    push_reject(&mut out, h.request_id, &refusal.to_reject());
                }
            }
            true
        }
    };
    within(
        WRITE_TIMEOUT,
        "join answer write",
        write_out(stream, &mut out),
    )
    .await?;
    Ok(answered)
}
