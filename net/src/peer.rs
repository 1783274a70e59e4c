//! The peer protocol (docs/format.md §6), sans IO: opcodes, the mutual membership handshake as
//! two state machines ([`Dialer`], [`Listener`]) that consume decoded frames and append frames to
//! send, and the payload codecs of raft batches and snapshot chunks. Sockets, timers and
//! connection tables belong to the transport that drives these.
//!
//! **Handshake.** Both sides prove they hold the cluster integrity key (in their card) by an
//! HMAC-SHA256 over `domain tag ‖ challenge(32) ‖ cluster id(16) ‖ node id(u64 LE)`:
//!
//! ```text
//! dialer                                   listener
//!   Hello{cluster, node, version, c_d}  ->
//!                                       <-  Challenge{cluster, node, c_l, MAC(LISTENER_TAG ‖ c_d ‖ cluster ‖ listener node)}
//!   Proof{MAC(DIALER_TAG ‖ c_l ‖ cluster ‖ dialer node)}  ->
//!                                       <-  Accept  (or Reject{code, reason})
//! ```
//!
//! The tags differ by direction, so a proof one side makes can never be presented as the other
//! side's; each challenge is fresh per connection, so a proof cannot be replayed on another. No
//! frame but these is accepted before `Accept`. Without transport encryption (a later issue) the
//! handshake authenticates membership at connection start only; it does not protect the bytes
//! that follow from an active man in the middle.

use crate::frame::{self, flags, Frame, FrameError, FrameHeader, MAX_FRAME_PAYLOAD_BYTES};
use thiserror::Error;

// ---- opcodes (0x0100..=0x01FF; client opcodes use 0x0001..=0x00FF) ----

/// Dialer → listener: who I am and a challenge for you.
pub const PEER_HELLO: u16 = 0x0101;
/// Listener → dialer: who I am, my proof over your challenge, and a challenge for you.
pub const PEER_CHALLENGE: u16 = 0x0102;
/// Dialer → listener: my proof over your challenge.
pub const PEER_PROOF: u16 = 0x0103;
/// Listener → dialer: the handshake is complete; raft traffic may flow.
pub const PEER_ACCEPT: u16 = 0x0104;
/// Either side: the handshake failed (code and reason); the connection is closed after it.
pub const PEER_REJECT: u16 = 0x0105;
/// Raft messages for many shards from one node to one peer.
pub const PEER_RAFT_BATCH: u16 = 0x0110;
/// Asks for a byte range of a shard's snapshot file.
pub const PEER_SNAPSHOT_CHUNK_REQUEST: u16 = 0x0120;
/// A byte range of a shard's snapshot file.
pub const PEER_SNAPSHOT_CHUNK: u16 = 0x0121;
/// Joiner → any node, as the first frame instead of a Hello (no authentication): send me the
/// cluster config. Empty payload (docs/format.md §6.12).
pub const PEER_CONFIG_REQUEST: u16 = 0x0130;
/// Answer to `PEER_CONFIG_REQUEST`: the cluster config bytes; the connection is closed after it.
pub const PEER_CONFIG: u16 = 0x0131;
/// Joiner → node, the first frame after a handshake as [`JOINER_NODE_ID`]: let me join.
pub const PEER_JOIN_REQUEST: u16 = 0x0132;
/// Answer to `PEER_JOIN_REQUEST`: the raft id the cluster gave the joiner and where to catch up.
pub const PEER_JOIN_GRANT: u16 = 0x0133;
/// The join opcodes (docs/format.md §6.12). Kept apart from [`PEER_OPCODES`], whose users
/// (the handshake and codec tests) know only the handshake, raft and snapshot payloads.
pub const PEER_JOIN_OPCODES: [u16; 4] = [
    PEER_CONFIG_REQUEST,
    PEER_CONFIG,
    PEER_JOIN_REQUEST,
    PEER_JOIN_GRANT,
];
/// The peer opcodes of the handshake, raft and snapshot traffic; the join opcodes are in
/// [`PEER_JOIN_OPCODES`].
pub const PEER_OPCODES: [u16; 8] = [
    PEER_HELLO,
    PEER_CHALLENGE,
    PEER_PROOF,
    PEER_ACCEPT,
    PEER_REJECT,
    PEER_RAFT_BATCH,
    PEER_SNAPSHOT_CHUNK_REQUEST,
    PEER_SNAPSHOT_CHUNK,
];
/// The first opcode of the peer range.
pub const PEER_OPCODE_FIRST: u16 = 0x0100;
/// The last opcode of the peer range.
pub const PEER_OPCODE_LAST: u16 = 0x01FF;

/// The request id every handshake frame carries (the handshake is strictly sequential).
pub const HANDSHAKE_REQUEST_ID: u64 = 0;

// ---- handshake constants ----

/// Version of the peer protocol this build speaks (sent in Hello; the listener refuses others).
pub const PEER_PROTOCOL_VERSION: u16 = 1;
/// Bytes of a cluster id.
pub const CLUSTER_ID_LEN: usize = 16;
/// Bytes of a challenge.
pub const CHALLENGE_LEN: usize = 32;
/// Bytes of a proof (HMAC-SHA256).
pub const PROOF_LEN: usize = 32;
/// Domain tag of the proof the dialer makes (over the listener's challenge).
pub const DIALER_PROOF_TAG: &[u8] = b"keyfort.peer.v1.dialer-proof";
/// Domain tag of the proof the listener makes (over the dialer's challenge).
pub const LISTENER_PROOF_TAG: &[u8] = b"keyfort.peer.v1.listener-proof";
/// Longest reject reason, in bytes of UTF-8.
pub const MAX_REJECT_REASON_BYTES: usize = 256;
/// Raft's "no node" id; never a peer's id.
pub const INVALID_NODE_ID: u64 = 0;
/// The node id a joiner claims in its Hello before the cluster has given it a raft id
/// (docs/format.md §6.12). Admitted only by a node serving joins, and only for one join request;
/// never a raft id.
pub const JOINER_NODE_ID: u64 = u64::MAX;

/// Bytes of a Hello payload: cluster id, node id, version, challenge.
pub const HELLO_LEN: usize = CLUSTER_ID_LEN + 8 + 2 + CHALLENGE_LEN;
/// Bytes of a Challenge payload: cluster id, node id, challenge, proof.
pub const CHALLENGE_MSG_LEN: usize = CLUSTER_ID_LEN + 8 + CHALLENGE_LEN + PROOF_LEN;
/// Bytes of a Proof payload.
pub const PROOF_MSG_LEN: usize = PROOF_LEN;
/// Bytes of the fixed part of a Reject payload: code, reason length.
pub const REJECT_FIXED_LEN: usize = 4;

// ---- raft batch constants ----

/// Most raft messages in one `PEER_RAFT_BATCH`: a tick's worth for every shard with room (a
/// shard sends a few messages per peer per tick). A larger count is refused before anything is
/// allocated for it.
pub const MAX_RAFT_BATCH_MESSAGES: usize = 16_384;
/// Bytes of the batch's fixed part (the count).
pub const RAFT_BATCH_HEADER_LEN: usize = 4;
/// Bytes each message adds besides its own bytes (shard, length).
pub const RAFT_BATCH_MESSAGE_OVERHEAD: usize = 8;

// ---- snapshot chunk constants ----

/// Largest data of one snapshot chunk (and largest `max_len` a request may ask for).
pub const MAX_SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Bytes of a snapshot chunk request payload.
pub const SNAPSHOT_CHUNK_REQUEST_LEN: usize = 4 + 8 + 8 + 8 + 4;
/// Bytes of a snapshot chunk payload before its data.
pub const SNAPSHOT_CHUNK_HEADER_LEN: usize = 4 + 8 + 8 + 8 + 8 + 4 + 4;

/// Stable reject codes carried by `PEER_REJECT` (docs/format.md §6.6).
pub mod reject {
    /// The cluster id is not ours.
    pub const WRONG_CLUSTER: u16 = 1;
    /// The node id is not a member (or is the invalid id 0).
    pub const UNKNOWN_NODE: u16 = 2;
    /// The node id already has an authenticated connection, or is the receiver's own id.
    pub const DUPLICATE_NODE: u16 = 3;
    /// The proof did not verify with the cluster integrity key.
    pub const BAD_PROOF: u16 = 4;
    /// The peer protocol version is not one this build speaks.
    pub const BAD_VERSION: u16 = 5;
    /// A malformed payload or a frame not allowed at this step of the handshake.
    pub const PROTOCOL: u16 = 6;
    /// The listener is not the node the dialer meant to reach.
    pub const UNEXPECTED_PEER: u16 = 7;
    /// The card failed (not a verdict on the peer); retry later.
    pub const INTERNAL: u16 = 8;
    /// Join refused: this node is not the leader; the reason is the leader's peer address
    /// (empty when unknown).
    pub const JOIN_NOT_LEADER: u16 = 9;
    /// Join refused: another join is in progress; retry later.
    pub const JOIN_BUSY: u16 = 10;
    /// Join failed; the reason says why.
    pub const JOIN_FAILED: u16 = 11;
    /// This node serves no cluster config (or no joins).
    pub const NOT_SERVED: u16 = 12;
}

/// Everything the peer protocol refuses. Every decoder returns one of these on bad input and
/// never panics.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PeerError {
    /// Fewer bytes than the message needs.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
    /// Bytes after the end of the message.
    #[error("{extra} trailing bytes after {what}")]
    TrailingBytes { what: &'static str, extra: usize },
    /// A field out of its range (reason not UTF-8, max_len zero, ...).
    #[error("malformed {what}: {detail}")]
    Malformed {
        what: &'static str,
        detail: &'static str,
    },
    /// The peer belongs to another cluster.
    #[error("wrong cluster id {theirs:02x?} (ours is {ours:02x?})")]
    WrongCluster {
        ours: [u8; CLUSTER_ID_LEN],
        theirs: [u8; CLUSTER_ID_LEN],
    },
    /// The node id is not a member.
    #[error("unknown node id {0}")]
    UnknownNode(u64),
    /// The node id is already connected, or is our own.
    #[error("duplicate node id {0}")]
    DuplicateNode(u64),
    /// The listener is another node than the dialer meant to reach.
    #[error("expected peer node {expected}, the listener is node {got}")]
    UnexpectedPeer { expected: u64, got: u64 },
    /// The proof did not verify.
    #[error("peer proof did not verify")]
    BadProof,
    /// The peer speaks another protocol version.
    #[error("peer protocol version {theirs} (this build speaks {ours})")]
    BadVersion { ours: u16, theirs: u16 },
    /// A frame that is not allowed at this step of the handshake.
    #[error("opcode {opcode:#06x} not allowed while {state}")]
    UnexpectedFrame { state: &'static str, opcode: u16 },
    /// The handshake already ended (established or failed).
    #[error("the handshake is over")]
    HandshakeOver,
    /// The peer refused us.
    #[error("rejected by peer: code {code}: {reason}")]
    Rejected { code: u16, reason: String },
    /// The card could not make or check a MAC.
    #[error("card: {0}")]
    Prover(String),
    /// A raft batch with more messages than `MAX_RAFT_BATCH_MESSAGES`.
    #[error("raft batch of {count} messages exceeds the maximum of {max}")]
    TooManyMessages { count: usize, max: usize },
    /// A raft batch that would not fit one frame.
    #[error("raft batch of {len} bytes exceeds the maximum of {max}")]
    BatchTooLarge { len: usize, max: usize },
    /// A snapshot chunk (or requested length) above `MAX_SNAPSHOT_CHUNK_BYTES`.
    #[error("snapshot chunk of {len} bytes exceeds the maximum of {max}")]
    ChunkTooLarge { len: usize, max: usize },
    /// A snapshot chunk whose range is not inside the file.
    #[error("snapshot chunk at {offset} of {len} bytes lies outside the file of {total} bytes")]
    ChunkOutOfBounds { offset: u64, len: usize, total: u64 },
    /// A snapshot chunk whose data does not match its crc32c.
    #[error("snapshot chunk crc32c mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    ChunkCorrupt { stored: u32, computed: u32 },
    /// The frame layer refused (only on encode: a payload over the frame limit).
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
}

impl PeerError {
    /// The reject code this error is reported to the peer with, or `None` where no Reject is
    /// sent (the peer rejected us, or the handshake was already over).
    pub fn reject_code(&self) -> Option<u16> {
        Some(match self {
            PeerError::WrongCluster { .. } => reject::WRONG_CLUSTER,
            PeerError::UnknownNode(_) => reject::UNKNOWN_NODE,
            PeerError::DuplicateNode(_) => reject::DUPLICATE_NODE,
            PeerError::BadProof => reject::BAD_PROOF,
            PeerError::BadVersion { .. } => reject::BAD_VERSION,
            PeerError::UnexpectedPeer { .. } => reject::UNEXPECTED_PEER,
            PeerError::Prover(_) => reject::INTERNAL,
            PeerError::Rejected { .. } | PeerError::HandshakeOver => return None,
            _ => reject::PROTOCOL,
        })
    }
}

// ---- little reader ----

/// Reads fixed-size fields off a payload, refusing a short one with `Truncated` (the peer
/// and join codecs).
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, at: 0, what }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], PeerError> {
        let end = self.at.checked_add(n);
        match end.and_then(|end| self.buf.get(self.at..end)) {
            Some(s) => {
                self.at += n;
                Ok(s)
            }
            None => Err(PeerError::Truncated {
                what: self.what,
                need: self.at.saturating_add(n),
                have: self.buf.len(),
            }),
        }
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], PeerError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, PeerError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, PeerError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, PeerError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.at
    }

    /// Reads a whole message off `buf` with `read`, refusing bytes after it.
    pub(crate) fn whole<T>(
        buf: &'a [u8],
        what: &'static str,
        read: impl FnOnce(&mut Self) -> Result<T, PeerError>,
    ) -> Result<T, PeerError> {
        let mut r = Reader::new(buf, what);
        let v = read(&mut r)?;
        r.finish()?;
        Ok(v)
    }

    /// Refuses bytes after the message.
    pub(crate) fn finish(self) -> Result<(), PeerError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(PeerError::TrailingBytes {
                what: self.what,
                extra,
            }),
        }
    }
}

// ---- MAC operations ----

/// The MAC operations of the handshake: HMAC-SHA256 with the cluster integrity key. Production
/// passes the card ([`keyfort_hsm::CoreSession`]); tests a software HMAC.
pub trait Prover {
    /// The MAC of `msg`.
    fn mac(&self, msg: &[u8]) -> Result<[u8; PROOF_LEN], String>;
    /// `Ok(true)`: `mac` is the MAC of `msg`; `Ok(false)`: it is not; `Err`: the check could not
    /// be made (the card failed).
    fn verify(&self, msg: &[u8], mac: &[u8; PROOF_LEN]) -> Result<bool, String>;
}

impl Prover for keyfort_hsm::CoreSession {
    fn mac(&self, msg: &[u8]) -> Result<[u8; PROOF_LEN], String> {
        keyfort_hsm::CoreSession::mac(self, msg).map_err(|e| e.to_string())
    }

    fn verify(&self, msg: &[u8], mac: &[u8; PROOF_LEN]) -> Result<bool, String> {
        match keyfort_hsm::CoreSession::verify(self, msg, mac) {
            Ok(()) => Ok(true),
            Err(keyfort_hsm::CardError::BadMac { .. }) => Ok(false),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The bytes a proof is made over: `tag ‖ challenge ‖ cluster id ‖ node id (u64 LE)`.
pub fn proof_input(
    tag: &[u8],
    challenge: &[u8; CHALLENGE_LEN],
    cluster_id: &[u8; CLUSTER_ID_LEN],
    node_id: u64,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(tag.len() + CHALLENGE_LEN + CLUSTER_ID_LEN + 8);
    m.extend_from_slice(tag);
    m.extend_from_slice(challenge);
    m.extend_from_slice(cluster_id);
    m.extend_from_slice(&node_id.to_le_bytes());
    m
}

/// A fresh challenge from a cryptographic RNG (production: `rand::rngs::OsRng`).
pub fn new_challenge<R: rand::RngCore + rand::CryptoRng>(rng: &mut R) -> [u8; CHALLENGE_LEN] {
    let mut c = [0u8; CHALLENGE_LEN];
    rng.fill_bytes(&mut c);
    c
}

// ---- handshake messages ----

/// `PEER_HELLO` payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub cluster_id: [u8; CLUSTER_ID_LEN],
    pub node_id: u64,
    pub version: u16,
    /// For the listener to prove over.
    pub challenge: [u8; CHALLENGE_LEN],
}

impl Hello {
    /// Appends the payload to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.cluster_id);
        out.extend_from_slice(&self.node_id.to_le_bytes());
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.challenge);
    }

    /// Decodes a whole payload.
    pub fn decode(buf: &[u8]) -> Result<Self, PeerError> {
        Reader::whole(buf, "hello", |r| {
            Ok(Hello {
                cluster_id: r.array()?,
                node_id: r.u64()?,
                version: r.u16()?,
                challenge: r.array()?,
            })
        })
    }
}

/// `PEER_CHALLENGE` payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Challenge {
    pub cluster_id: [u8; CLUSTER_ID_LEN],
    /// The listener's node id.
    pub node_id: u64,
    /// For the dialer to prove over.
    pub challenge: [u8; CHALLENGE_LEN],
    /// MAC(`LISTENER_PROOF_TAG` ‖ the dialer's challenge ‖ cluster id ‖ listener node id).
    pub proof: [u8; PROOF_LEN],
}

impl Challenge {
    /// Appends the payload to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.cluster_id);
        out.extend_from_slice(&self.node_id.to_le_bytes());
        out.extend_from_slice(&self.challenge);
        out.extend_from_slice(&self.proof);
    }

    /// Decodes a whole payload.
    pub fn decode(buf: &[u8]) -> Result<Self, PeerError> {
        Reader::whole(buf, "challenge", |r| {
            Ok(Challenge {
                cluster_id: r.array()?,
                node_id: r.u64()?,
                challenge: r.array()?,
                proof: r.array()?,
            })
        })
    }
}

/// `PEER_PROOF` payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proof {
    /// MAC(`DIALER_PROOF_TAG` ‖ the listener's challenge ‖ cluster id ‖ dialer node id).
    pub proof: [u8; PROOF_LEN],
}

impl Proof {
    /// Appends the payload to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.proof);
    }

    /// Decodes a whole payload.
    pub fn decode(buf: &[u8]) -> Result<Self, PeerError> {
        Reader::whole(buf, "proof", |r| Ok(Proof { proof: r.array()? }))
    }
}

/// `PEER_ACCEPT` has an empty payload; anything else is refused.
pub fn decode_accept(buf: &[u8]) -> Result<(), PeerError> {
    Reader::new(buf, "accept").finish()
}

/// `PEER_REJECT` payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    /// One of [`reject`].
    pub code: u16,
    /// Human-readable, UTF-8, at most `MAX_REJECT_REASON_BYTES`.
    pub reason: String,
}

impl Reject {
    /// A Reject for `err`, with its message as the reason (cut at a character boundary to fit).
    pub fn for_error(code: u16, err: &PeerError) -> Self {
        let mut reason = err.to_string();
        if reason.len() > MAX_REJECT_REASON_BYTES {
            let mut cut = MAX_REJECT_REASON_BYTES;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        Reject { code, reason }
    }

    /// Appends the payload to `out`; refuses a reason over `MAX_REJECT_REASON_BYTES`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), PeerError> {
        if self.reason.len() > MAX_REJECT_REASON_BYTES {
            return Err(PeerError::Malformed {
                what: "reject",
                detail: "reason longer than MAX_REJECT_REASON_BYTES",
            });
        }
        out.extend_from_slice(&self.code.to_le_bytes());
        out.extend_from_slice(&(self.reason.len() as u16).to_le_bytes());
        out.extend_from_slice(self.reason.as_bytes());
        Ok(())
    }

    /// Decodes a whole payload.
    pub fn decode(buf: &[u8]) -> Result<Self, PeerError> {
        let mut r = Reader::new(buf, "reject");
        let code = r.u16()?;
        let len = usize::from(r.u16()?);
        if len > MAX_REJECT_REASON_BYTES {
            return Err(PeerError::Malformed {
                what: "reject",
                detail: "reason longer than MAX_REJECT_REASON_BYTES",
            });
        }
        let reason = std::str::from_utf8(r.bytes(len)?).map_err(|_| PeerError::Malformed {
            what: "reject",
            detail: "reason is not UTF-8",
        })?;
        let reason = reason.to_owned();
        r.finish()?;
        Ok(Reject { code, reason })
    }
}

// ---- handshake state machines ----

/// Who a node is, for the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    pub cluster_id: [u8; CLUSTER_ID_LEN],
    /// This node's raft id (never 0).
    pub node_id: u64,
}

/// What the listener's membership view says of a node id claimed in a Hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// A member without an authenticated connection: go on.
    Member,
    /// Not a member of the cluster.
    Unknown,
    /// A member that already has an authenticated connection to this node.
    AlreadyConnected,
}

/// The listener's membership view (the transport's connection table over the cluster config).
pub trait Members {
    /// What is known of `node_id`.
    fn admit(&self, node_id: u64) -> Admission;
}

impl<F: Fn(u64) -> Admission> Members for F {
    fn admit(&self, node_id: u64) -> Admission {
        self(node_id)
    }
}

/// What a handshake step led to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send what was appended to `out` and wait for the next frame.
    Continue,
    /// The peer is authenticated as `peer` (send what was appended to `out` first); the
    /// connection now carries peer traffic.
    Established { peer: u64 },
}

/// Appends a handshake frame.
fn send(out: &mut Vec<u8>, opcode: u16, frame_flags: u8, payload: &[u8]) -> Result<(), PeerError> {
    let header = FrameHeader {
        flags: frame_flags,
        opcode,
        request_id: HANDSHAKE_REQUEST_ID,
    };
    frame::encode(header, payload, out)?;
    Ok(())
}

/// Appends the Reject frame for `err`, if it has a code.
fn send_reject(out: &mut Vec<u8>, err: &PeerError) {
    if let Some(code) = err.reject_code() {
        let mut p = Vec::with_capacity(REJECT_FIXED_LEN + MAX_REJECT_REASON_BYTES);
        // `for_error` cuts the reason to fit, so neither encode can fail; a failure would only
        // lose the courtesy of telling the peer why.
        if Reject::for_error(code, err).encode(&mut p).is_ok() {
            let _ = send(out, PEER_REJECT, flags::RESPONSE | flags::ERROR, &p);
        }
    }
}

/// Ends a handshake step: records the peer once established; appends the Reject on an error.
fn conclude(
    r: Result<Step, PeerError>,
    peer: &mut Option<u64>,
    out: &mut Vec<u8>,
) -> Result<Step, PeerError> {
    match &r {
        Ok(Step::Continue) => {}
        Ok(Step::Established { peer: p }) => *peer = Some(*p),
        Err(e) => send_reject(out, e),
    }
    r
}

/// Refuses another cluster's id.
fn check_cluster(
    ours: &[u8; CLUSTER_ID_LEN],
    theirs: &[u8; CLUSTER_ID_LEN],
) -> Result<(), PeerError> {
    if ours != theirs {
        return Err(PeerError::WrongCluster {
            ours: *ours,
            theirs: *theirs,
        });
    }
    Ok(())
}

/// Refuses the invalid node id and our own as the other side's.
fn check_other_node(theirs: u64, ours: u64) -> Result<(), PeerError> {
    if theirs == INVALID_NODE_ID {
        return Err(PeerError::UnknownNode(theirs));
    }
    if theirs == ours {
        return Err(PeerError::DuplicateNode(theirs));
    }
    Ok(())
}

/// The Rejected error a Reject frame carries (or why it is not a Reject).
fn rejected(payload: &[u8]) -> PeerError {
    match Reject::decode(payload) {
        Ok(r) => PeerError::Rejected {
            code: r.code,
            reason: r.reason,
        },
        Err(e) => e,
    }
}

fn verify_proof(
    prover: &dyn Prover,
    tag: &[u8],
    challenge: &[u8; CHALLENGE_LEN],
    cluster_id: &[u8; CLUSTER_ID_LEN],
    node_id: u64,
    proof: &[u8; PROOF_LEN],
) -> Result<(), PeerError> {
    let msg = proof_input(tag, challenge, cluster_id, node_id);
    match prover.verify(&msg, proof) {
        Ok(true) => Ok(()),
        Ok(false) => Err(PeerError::BadProof),
        Err(e) => Err(PeerError::Prover(e)),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DialerState {
    Start,
    SentHello,
    SentProof { peer: u64 },
    Done,
}

/// The dialing side of the handshake. `start` appends the Hello; each frame received goes to
/// `on_frame` until it returns `Established` or an error. On an error the Reject to send (if
/// any) has been appended to `out`, and the connection is to be closed after sending it.
#[derive(Debug)]
pub struct Dialer {
    me: PeerIdentity,
    expect_peer: Option<u64>,
    challenge: [u8; CHALLENGE_LEN],
    state: DialerState,
    peer: Option<u64>,
}

impl Dialer {
    /// A dialer for `me`; `expect_peer`: the node id it means to reach, if known;
    /// `challenge`: fresh bytes for this connection (see [`new_challenge`]).
    pub fn new(me: PeerIdentity, expect_peer: Option<u64>, challenge: [u8; CHALLENGE_LEN]) -> Self {
        Dialer {
            me,
            expect_peer,
            challenge,
            state: DialerState::Start,
            peer: None,
        }
    }

    /// Appends the Hello frame. Once only.
    pub fn start(&mut self, out: &mut Vec<u8>) -> Result<(), PeerError> {
        if self.state != DialerState::Start {
            return Err(PeerError::HandshakeOver);
        }
        let mut p = Vec::with_capacity(HELLO_LEN);
        Hello {
            cluster_id: self.me.cluster_id,
            node_id: self.me.node_id,
            version: PEER_PROTOCOL_VERSION,
            challenge: self.challenge,
        }
        .encode(&mut p);
        send(out, PEER_HELLO, 0, &p)?;
        self.state = DialerState::SentHello;
        Ok(())
    }

    /// The authenticated peer, once established.
    pub fn peer(&self) -> Option<u64> {
        self.peer
    }

    /// Consumes one received frame; appends what to send to `out`.
    pub fn on_frame(
        &mut self,
        f: &Frame<'_>,
        prover: &dyn Prover,
        out: &mut Vec<u8>,
    ) -> Result<Step, PeerError> {
        let state = self.state;
        self.state = DialerState::Done;
        let r = self.step(state, f, prover, out);
        conclude(r, &mut self.peer, out)
    }

    fn step(
        &mut self,
        state: DialerState,
        f: &Frame<'_>,
        prover: &dyn Prover,
        out: &mut Vec<u8>,
    ) -> Result<Step, PeerError> {
        let op = f.header.opcode;
        match state {
            DialerState::Start | DialerState::Done => Err(PeerError::HandshakeOver),
            _ if op == PEER_REJECT => Err(rejected(f.payload)),
            DialerState::SentHello if op == PEER_CHALLENGE => {
                let c = Challenge::decode(f.payload)?;
                check_cluster(&self.me.cluster_id, &c.cluster_id)?;
                if let Some(expected) = self.expect_peer {
                    if c.node_id != expected {
                        return Err(PeerError::UnexpectedPeer {
                            expected,
                            got: c.node_id,
                        });
                    }
                }
                check_other_node(c.node_id, self.me.node_id)?;
                verify_proof(
                    prover,
                    LISTENER_PROOF_TAG,
                    &self.challenge,
                    &self.me.cluster_id,
                    c.node_id,
                    &c.proof,
                )?;
                let msg = proof_input(
                    DIALER_PROOF_TAG,
                    &c.challenge,
                    &self.me.cluster_id,
                    self.me.node_id,
                );
                let proof = prover.mac(&msg).map_err(PeerError::Prover)?;
                let mut p = Vec::with_capacity(PROOF_MSG_LEN);
                Proof { proof }.encode(&mut p);
                send(out, PEER_PROOF, 0, &p)?;
                self.state = DialerState::SentProof { peer: c.node_id };
                Ok(Step::Continue)
            }
            DialerState::SentProof { peer } if op == PEER_ACCEPT => {
                decode_accept(f.payload)?;
                Ok(Step::Established { peer })
            }
            DialerState::SentHello => Err(PeerError::UnexpectedFrame {
                state: "awaiting challenge",
                opcode: op,
            }),
            DialerState::SentProof { .. } => Err(PeerError::UnexpectedFrame {
                state: "awaiting accept",
                opcode: op,
            }),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ListenerState {
    AwaitHello,
    SentChallenge { peer: u64 },
    Done,
}

/// The listening side of the handshake: each frame received goes to `on_frame` until it
/// returns `Established` (the Accept has been appended to `out`) or an error (the Reject, if
/// any, has been appended; close the connection after sending it).
#[derive(Debug)]
pub struct Listener {
    me: PeerIdentity,
    challenge: [u8; CHALLENGE_LEN],
    state: ListenerState,
    peer: Option<u64>,
}

impl Listener {
    /// A listener for `me`; `challenge`: fresh bytes for this connection (see
    /// [`new_challenge`]).
    pub fn new(me: PeerIdentity, challenge: [u8; CHALLENGE_LEN]) -> Self {
        Listener {
            me,
            challenge,
            state: ListenerState::AwaitHello,
            peer: None,
        }
    }

    /// The authenticated peer, once established.
    pub fn peer(&self) -> Option<u64> {
        self.peer
    }

    /// Consumes one received frame; appends what to send to `out`. `members` is asked about the
    /// node id a Hello claims.
    pub fn on_frame(
        &mut self,
        f: &Frame<'_>,
        prover: &dyn Prover,
        members: &dyn Members,
        out: &mut Vec<u8>,
    ) -> Result<Step, PeerError> {
        let state = self.state;
        self.state = ListenerState::Done;
        let r = self.step(state, f, prover, members, out);
        conclude(r, &mut self.peer, out)
    }

    fn step(
        &mut self,
        state: ListenerState,
        f: &Frame<'_>,
        prover: &dyn Prover,
        members: &dyn Members,
        out: &mut Vec<u8>,
    ) -> Result<Step, PeerError> {
        let op = f.header.opcode;
        match state {
            ListenerState::Done => Err(PeerError::HandshakeOver),
            _ if op == PEER_REJECT => Err(rejected(f.payload)),
            ListenerState::AwaitHello if op == PEER_HELLO => {
                let h = Hello::decode(f.payload)?;
                if h.version != PEER_PROTOCOL_VERSION {
                    return Err(PeerError::BadVersion {
                        ours: PEER_PROTOCOL_VERSION,
                        theirs: h.version,
                    });
                }
                check_cluster(&self.me.cluster_id, &h.cluster_id)?;
                check_other_node(h.node_id, self.me.node_id)?;
                match members.admit(h.node_id) {
                    Admission::Member => {}
                    Admission::Unknown => return Err(PeerError::UnknownNode(h.node_id)),
                    Admission::AlreadyConnected => return Err(PeerError::DuplicateNode(h.node_id)),
                }
                let msg = proof_input(
                    LISTENER_PROOF_TAG,
                    &h.challenge,
                    &self.me.cluster_id,
                    self.me.node_id,
                );
                let proof = prover.mac(&msg).map_err(PeerError::Prover)?;
                let mut p = Vec::with_capacity(CHALLENGE_MSG_LEN);
                Challenge {
                    cluster_id: self.me.cluster_id,
                    node_id: self.me.node_id,
                    challenge: self.challenge,
                    proof,
                }
                .encode(&mut p);
                send(out, PEER_CHALLENGE, flags::RESPONSE, &p)?;
                self.state = ListenerState::SentChallenge { peer: h.node_id };
                Ok(Step::Continue)
            }
            ListenerState::SentChallenge { peer } if op == PEER_PROOF => {
                let p = Proof::decode(f.payload)?;
                verify_proof(
                    prover,
                    DIALER_PROOF_TAG,
                    &self.challenge,
                    &self.me.cluster_id,
                    peer,
                    &p.proof,
                )?;
                send(out, PEER_ACCEPT, flags::RESPONSE, &[])?;
                Ok(Step::Established { peer })
            }
            ListenerState::AwaitHello => Err(PeerError::UnexpectedFrame {
                state: "awaiting hello",
                opcode: op,
            }),
            ListenerState::SentChallenge { .. } => Err(PeerError::UnexpectedFrame {
                state: "awaiting proof",
                opcode: op,
            }),
        }
    }
}

// ---- raft batch ----

/// Bytes `msgs` take as a `PEER_RAFT_BATCH` payload (saturating; for splitting batches).
pub fn raft_batch_len(msgs: &[(u32, &[u8])]) -> usize {
    msgs.iter().fold(RAFT_BATCH_HEADER_LEN, |n, (_, m)| {
        n.saturating_add(RAFT_BATCH_MESSAGE_OVERHEAD)
            .saturating_add(m.len())
    })
}

/// Appends the `PEER_RAFT_BATCH` payload of `msgs` (shard, opaque raft message bytes) to `out`.
/// Refuses more than `MAX_RAFT_BATCH_MESSAGES` messages or more than a frame's worth of bytes;
/// `out` is untouched then.
pub fn encode_raft_batch(msgs: &[(u32, &[u8])], out: &mut Vec<u8>) -> Result<(), PeerError> {
    if msgs.len() > MAX_RAFT_BATCH_MESSAGES {
        return Err(PeerError::TooManyMessages {
            count: msgs.len(),
            max: MAX_RAFT_BATCH_MESSAGES,
        });
    }
    let len = raft_batch_len(msgs);
    if len > MAX_FRAME_PAYLOAD_BYTES {
        return Err(PeerError::BatchTooLarge {
            len,
            max: MAX_FRAME_PAYLOAD_BYTES,
        });
    }
    out.reserve(len);
    out.extend_from_slice(&(msgs.len() as u32).to_le_bytes());
    for (shard, m) in msgs {
        out.extend_from_slice(&shard.to_le_bytes());
        out.extend_from_slice(&(m.len() as u32).to_le_bytes());
        out.extend_from_slice(m);
    }
    Ok(())
}

/// Decodes a `PEER_RAFT_BATCH` payload into (shard, raft message bytes) borrowed from `buf`.
/// The count is checked against `MAX_RAFT_BATCH_MESSAGES` and against the bytes present before
/// anything is allocated for it.
pub fn decode_raft_batch(buf: &[u8]) -> Result<Vec<(u32, &[u8])>, PeerError> {
    if buf.len() > MAX_FRAME_PAYLOAD_BYTES {
        return Err(PeerError::BatchTooLarge {
            len: buf.len(),
            max: MAX_FRAME_PAYLOAD_BYTES,
        });
    }
    let mut r = Reader::new(buf, "raft batch");
    let count = r.u32()? as usize;
    if count > MAX_RAFT_BATCH_MESSAGES {
        return Err(PeerError::TooManyMessages {
            count,
            max: MAX_RAFT_BATCH_MESSAGES,
        });
    }
    let least = count * RAFT_BATCH_MESSAGE_OVERHEAD;
    if r.remaining() < least {
        return Err(PeerError::Truncated {
            what: "raft batch",
            need: RAFT_BATCH_HEADER_LEN + least,
            have: buf.len(),
        });
    }
    let mut msgs = Vec::with_capacity(count);
    for _ in 0..count {
        let shard = r.u32()?;
        let len = r.u32()? as usize;
        msgs.push((shard, r.bytes(len)?));
    }
    r.finish()?;
    Ok(msgs)
}

// ---- snapshot chunks ----

/// `PEER_SNAPSHOT_CHUNK_REQUEST` payload: a byte range of the snapshot of `shard` identified by
/// its (lsn, term).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotChunkRequest {
    pub shard: u32,
    pub lsn: u64,
    pub term: u64,
    pub offset: u64,
    /// 1..=`MAX_SNAPSHOT_CHUNK_BYTES`.
    pub max_len: u32,
}

impl SnapshotChunkRequest {
    fn check(&self) -> Result<(), PeerError> {
        if self.max_len == 0 {
            return Err(PeerError::Malformed {
                what: "snapshot chunk request",
                detail: "max_len is zero",
            });
        }
        if self.max_len as usize > MAX_SNAPSHOT_CHUNK_BYTES {
            return Err(PeerError::ChunkTooLarge {
                len: self.max_len as usize,
                max: MAX_SNAPSHOT_CHUNK_BYTES,
            });
        }
        Ok(())
    }

    /// Appends the payload to `out`; refuses a `max_len` out of range.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), PeerError> {
        self.check()?;
        out.extend_from_slice(&self.shard.to_le_bytes());
        out.extend_from_slice(&self.lsn.to_le_bytes());
        out.extend_from_slice(&self.term.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.max_len.to_le_bytes());
        Ok(())
    }

    /// Decodes a whole payload.
    pub fn decode(buf: &[u8]) -> Result<Self, PeerError> {
        let q = Reader::whole(buf, "snapshot chunk request", |r| {
            Ok(SnapshotChunkRequest {
                shard: r.u32()?,
                lsn: r.u64()?,
                term: r.u64()?,
                offset: r.u64()?,
                max_len: r.u32()?,
            })
        })?;
        q.check()?;
        Ok(q)
    }
}

/// `PEER_SNAPSHOT_CHUNK` payload: `data` is the file's bytes at `offset`; the file is
/// `total_size` bytes. The crc32c of `data` is computed on encode and checked on decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotChunk<'a> {
    pub shard: u32,
    pub lsn: u64,
    pub term: u64,
    pub offset: u64,
    pub total_size: u64,
    /// At most `MAX_SNAPSHOT_CHUNK_BYTES`; `offset + data.len() <= total_size`.
    pub data: &'a [u8],
}

impl<'a> SnapshotChunk<'a> {
    fn check(&self) -> Result<(), PeerError> {
        let len = self.data.len();
        if len > MAX_SNAPSHOT_CHUNK_BYTES {
            return Err(PeerError::ChunkTooLarge {
                len,
                max: MAX_SNAPSHOT_CHUNK_BYTES,
            });
        }
        match self.offset.checked_add(len as u64) {
            Some(end) if end <= self.total_size => Ok(()),
            _ => Err(PeerError::ChunkOutOfBounds {
                offset: self.offset,
                len,
                total: self.total_size,
            }),
        }
    }

    /// Appends the payload to `out`; refuses data over the limit or outside the file.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), PeerError> {
        self.check()?;
        out.reserve(SNAPSHOT_CHUNK_HEADER_LEN + self.data.len());
        out.extend_from_slice(&self.shard.to_le_bytes());
        out.extend_from_slice(&self.lsn.to_le_bytes());
        out.extend_from_slice(&self.term.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.total_size.to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(self.data).to_le_bytes());
        out.extend_from_slice(&(self.data.len() as u32).to_le_bytes());
        out.extend_from_slice(self.data);
        Ok(())
    }

    /// Decodes a whole payload, borrowing the data from `buf`: bounds first, then the crc.
    pub fn decode(buf: &'a [u8]) -> Result<Self, PeerError> {
        let mut r = Reader::new(buf, "snapshot chunk");
        let shard = r.u32()?;
        let lsn = r.u64()?;
        let term = r.u64()?;
        let offset = r.u64()?;
        let total_size = r.u64()?;
        let stored = r.u32()?;
        let len = r.u32()? as usize;
        if len > MAX_SNAPSHOT_CHUNK_BYTES {
            return Err(PeerError::ChunkTooLarge {
                len,
                max: MAX_SNAPSHOT_CHUNK_BYTES,
            });
        }
        let data = r.bytes(len)?;
        r.finish()?;
        let c = SnapshotChunk {
            shard,
            lsn,
            term,
            offset,
            total_size,
            data,
        };
        c.check()?;
        let computed = crc32c::crc32c(data);
        if computed != stored {
            return Err(PeerError::ChunkCorrupt { stored, computed });
        }
        Ok(c)
    }
}
