//! The client protocol (docs/format.md §8): what services, operators and the `keyfort` CLI say
//! to a node, in §5 frames. Sans IO: [`Request`] and [`Response`] encode to and decode from
//! frame payloads; the server (`crate::server`) and the client library (`crate::client`) own
//! the sockets.
//!
//! A connection authenticates once, for one *scope*: a partition (its clients' credentials) or
//! the cluster's operators (an admin credential). Key operations name no partition: they act
//! on the connection's, so one partition's credentials can never reach another's keys.
//!
//! Every decoder takes the whole payload, refuses short payloads, trailing bytes and fields out
//! of range with a typed [`ProtoError`], never panics and never allocates from an unchecked
//! count (fuzz target `client_proto_decode`, property tests `net/tests/client_proto.rs`).

use crate::peer::{PeerError, Reader};
use thiserror::Error;

/// Version of the client protocol, sent in [`Request::Hello`].
pub const CLIENT_PROTOCOL_VERSION: u8 = 1;
/// Largest payload of a client frame (either direction). A request frame announcing more is
/// refused from its header alone with [`ErrorCode::TooLarge`] and the connection closed.
pub const CLIENT_MAX_FRAME_PAYLOAD: usize = 80 << 10;
/// Largest plaintext of one encrypt.
pub const MAX_PLAINTEXT_BYTES: usize = 64 << 10;
/// Largest caller AAD of an encrypt, decrypt or data key.
pub const MAX_AAD_BYTES: usize = 4096;
/// Largest key metadata (the state machine's `METADATA_BYTES_MAX`).
pub const MAX_METADATA_BYTES: usize = keyfort_engine::state::METADATA_BYTES_MAX;
/// Largest single-key backup blob accepted (the state machine's `BLOB_BYTES_MAX`).
pub const MAX_BACKUP_BYTES: usize = keyfort_engine::state::BLOB_BYTES_MAX;
/// Most keys one list answer carries.
pub const MAX_LIST_KEYS: u16 = 1000;
/// Most versions one describe answer carries (older ones are left out; `truncated` says so).
pub const MAX_DESCRIBE_VERSIONS: u16 = 256;
/// Largest error message.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;
/// Data key lengths a client may ask for.
pub const DATA_KEY_LEN_RANGE: std::ops::RangeInclusive<u8> = 16..=64;
/// Bytes of a challenge, a response and a credential.
pub const CHALLENGE_LEN: usize = 32;
pub const RESPONSE_LEN: usize = 32;
pub const CREDENTIAL_LEN: usize = 32;
/// Domain tag that starts the MAC context of a client proof (§8.2).
pub const CLIENT_PROOF_DOMAIN: &[u8] = b"keyfort-client-proof-v1";
/// Domain tag of an admin credential: `secret = HMAC(integrity key, tag ‖ client id)` (§8.2).
pub const ADMIN_CREDENTIAL_DOMAIN: &[u8] = b"keyfort-admin-credential-v1";

/// Client opcodes (`0x0001`–`0x00FF`; the peer protocol uses `0x01xx`).
pub mod op {
    pub const HELLO: u16 = 0x0001;
    pub const PROOF: u16 = 0x0002;
    pub const ROUTE: u16 = 0x0003;
    pub const PARTITION_CREATE: u16 = 0x0010;
    pub const PARTITION_DELETE: u16 = 0x0011;
    pub const CREDENTIAL_ISSUE: u16 = 0x0012;
    pub const CLUSTER_STATUS: u16 = 0x0013;
    pub const KEY_CREATE: u16 = 0x0020;
    pub const KEY_ROTATE: u16 = 0x0021;
    pub const KEY_UPDATE: u16 = 0x0022;
    pub const KEY_DELETE: u16 = 0x0023;
    pub const KEY_DESCRIBE: u16 = 0x0024;
    pub const KEY_LIST: u16 = 0x0025;
    pub const KEY_RESTORE: u16 = 0x0026;
    pub const ENCRYPT: u16 = 0x0030;
    pub const DECRYPT: u16 = 0x0031;
    pub const GENERATE_DATA_KEY: u16 = 0x0032;
    /// Every client opcode.
    pub const ALL: [u16; 17] = [
        HELLO,
        PROOF,
        ROUTE,
        PARTITION_CREATE,
        PARTITION_DELETE,
        CREDENTIAL_ISSUE,
        CLUSTER_STATUS,
        KEY_CREATE,
        KEY_ROTATE,
        KEY_UPDATE,
        KEY_DELETE,
        KEY_DESCRIBE,
        KEY_LIST,
        KEY_RESTORE,
        ENCRYPT,
        DECRYPT,
        GENERATE_DATA_KEY,
    ];
}

/// Why a payload is not a client message.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ProtoError {
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("{extra} trailing bytes after {what}")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("malformed {what}: {detail}")]
    Malformed {
        what: &'static str,
        detail: &'static str,
    },
    #[error("unknown client opcode {0:#06x}")]
    UnknownOpcode(u16),
    #[error("{what} of {len} bytes exceeds the maximum of {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
}

impl From<PeerError> for ProtoError {
    fn from(e: PeerError) -> Self {
        match e {
            PeerError::Truncated { what, need, have } => ProtoError::Truncated { what, need, have },
            PeerError::TrailingBytes { what, extra } => ProtoError::TrailingBytes { what, extra },
            PeerError::Malformed { what, detail } => ProtoError::Malformed { what, detail },
            _ => ProtoError::Malformed {
                what: "client message",
                detail: "unexpected decoder error",
            },
        }
    }
}

/// What a connection authenticates as (§8.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// A partition's client: key operations on that partition only.
    Partition([u8; 16]),
    /// An operator: partitions, credentials, cluster status.
    Admin,
}

impl Scope {
    fn code(&self) -> u8 {
        match self {
            Scope::Partition(_) => 1,
            Scope::Admin => 2,
        }
    }
    fn partition_bytes(&self) -> [u8; 16] {
        match self {
            Scope::Partition(p) => *p,
            Scope::Admin => [0; 16],
        }
    }
}

/// The bytes a client's proof MACs after the challenge (§8.2): the domain tag, then the
/// cluster id, node id, scope and client id the challenge was made for, so a proof answers one
/// challenge of one node for one scope.
pub fn proof_context(
    cluster_id: &[u8; 16],
    node_id: u64,
    scope: &Scope,
    client_id: &[u8; 16],
) -> Vec<u8> {
    let mut c = Vec::with_capacity(CLIENT_PROOF_DOMAIN.len() + 16 + 8 + 1 + 16 + 16);
    c.extend_from_slice(CLIENT_PROOF_DOMAIN);
    c.extend_from_slice(cluster_id);
    c.extend_from_slice(&node_id.to_le_bytes());
    c.push(scope.code());
    c.extend_from_slice(&scope.partition_bytes());
    c.extend_from_slice(client_id);
    c
}

/// Key state as the client sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyStateCode {
    Enabled = 1,
    Disabled = 2,
}

impl From<KeyStateCode> for keyfort_engine::state::KeyState {
    fn from(s: KeyStateCode) -> Self {
        match s {
            KeyStateCode::Enabled => keyfort_engine::state::KeyState::Enabled,
            KeyStateCode::Disabled => keyfort_engine::state::KeyState::Disabled,
        }
    }
}

impl From<keyfort_engine::state::KeyState> for KeyStateCode {
    fn from(s: keyfort_engine::state::KeyState) -> Self {
        match s {
            keyfort_engine::state::KeyState::Enabled => KeyStateCode::Enabled,
            keyfort_engine::state::KeyState::Disabled => KeyStateCode::Disabled,
        }
    }
}

impl KeyStateCode {
    fn from_u8(v: u8) -> Result<KeyStateCode, ProtoError> {
        match v {
            1 => Ok(KeyStateCode::Enabled),
            2 => Ok(KeyStateCode::Disabled),
            _ => Err(ProtoError::Malformed {
                what: "key state",
                detail: "not 1 (enabled) or 2 (disabled)",
            }),
        }
    }
}

/// Flags of a key create.
pub mod create_flags {
    /// Also return a single-key backup (wrapped under the partition backup KBK).
    pub const BACKUP: u8 = 1 << 0;
    /// Create the key disabled.
    pub const DISABLED: u8 = 1 << 1;
    pub const KNOWN: u8 = BACKUP | DISABLED;
}

/// Flag bits of [`Request::PartitionCreate`] (the partition's policy, kept in its config by
/// the card: `keyfort_hsm::format::policy_flags`, same values).
pub mod partition_flags {
    /// The partition's clients must also present a TLS client certificate (of the cluster CA)
    /// naming the partition (`p-<partition hex>.<cluster hex>.keyfort`); a connection without
    /// one is refused [`super::ErrorCode::ClientCertRequired`] after its proof.
    pub const REQUIRE_CLIENT_CERT: u8 = 1 << 0;
    pub const KNOWN: u8 = REQUIRE_CLIENT_CERT;
}

/// A client request (the payload of a request frame with the opcode [`Request::opcode`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Hello {
        version: u8,
        scope: Scope,
        client_id: [u8; 16],
    },
    Proof {
        response: [u8; RESPONSE_LEN],
    },
    Route,
    /// `partition(16) [‖ flags u8]`: the flags byte ([`partition_flags`]) is present only when
    /// non-zero, so a create without flags is the 16 bytes it always was.
    PartitionCreate {
        partition: [u8; 16],
        flags: u8,
    },
    PartitionDelete {
        partition: [u8; 16],
    },
    CredentialIssue {
        partition: [u8; 16],
    },
    ClusterStatus,
    KeyCreate {
        idempotency_id: [u8; 16],
        flags: u8,
        metadata: Vec<u8>,
    },
    KeyRotate {
        idempotency_id: [u8; 16],
        key_id: [u8; 16],
        replaces: u32,
    },
    KeyUpdate {
        idempotency_id: [u8; 16],
        key_id: [u8; 16],
        version: u32,
        state: KeyStateCode,
        metadata: Vec<u8>,
    },
    KeyDelete {
        idempotency_id: [u8; 16],
        key_id: [u8; 16],
    },
    KeyDescribe {
        key_id: [u8; 16],
    },
    KeyList {
        /// List keys after this id (exclusive); `None` starts at the first.
        after: Option<[u8; 16]>,
        limit: u16,
    },
    KeyRestore {
        idempotency_id: [u8; 16],
        backup: Vec<u8>,
    },
    Encrypt {
        key_id: [u8; 16],
        aad: Vec<u8>,
        plaintext: Vec<u8>,
    },
    Decrypt {
        key_id: [u8; 16],
        aad: Vec<u8>,
        envelope: Vec<u8>,
    },
    GenerateDataKey {
        key_id: [u8; 16],
        len: u8,
        aad: Vec<u8>,
    },
}

/// The result of a key write (create, rotate, update, delete, restore).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyWritten {
    pub key_id: [u8; 16],
    /// Create/restore/rotate: the new version; update: the version updated; delete: the number
    /// of versions removed.
    pub version: u32,
    /// Log position of the record that did it (the first one, for a retried idempotency id).
    pub lsn: u64,
    /// The idempotency id had already been used for this operation: this is its first result.
    pub duplicate: bool,
    /// Create with [`create_flags::BACKUP`] that was not a duplicate: the single-key backup.
    pub backup: Vec<u8>,
}

/// One version of a key, as described.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionInfo {
    pub version: u32,
    pub state: KeyStateCode,
    pub created_lsn: u64,
    pub metadata: Vec<u8>,
}

/// One shard as one node sees it (cluster status).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardStatus {
    pub shard: u32,
    /// 1 follower, 2 candidate, 3 leader, 4 pre-candidate.
    pub role: u8,
    pub term: u64,
    pub leader: u64,
    pub commit: u64,
    pub applied: u64,
    pub snapshot_lsn: u64,
    pub digest: [u8; 16],
    pub keys: u64,
    /// The archive watermark this node applied (0: no log archive, or none known yet).
    pub archived_lsn: u64,
    /// On the shard's leader with the log archive on: milliseconds the oldest committed record
    /// not yet archived has waited (the shard's RPO now); 0 elsewhere.
    pub rpo_ms: u32,
}

/// How a node's last start recovered (docs/format.md §8.3, Status): its tier and each phase's
/// milliseconds. [`RECOVERY_PENDING`] in a phase: not finished yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecoveryStatus {
    /// 1 local (own log and snapshots), 2 peer (joined as a new member), 3 durable (restored
    /// from the durable store); 0 unknown.
    pub tier: u8,
    pub fetch_ms: u32,
    pub verify_ms: u32,
    pub open_ms: u32,
    pub replay_ms: u32,
    pub catch_up_ms: u32,
}

/// A recovery phase still running.
pub const RECOVERY_PENDING: u32 = u32::MAX;
/// Bytes of [`RecoveryStatus`] on the wire: tier 1, five phases of 4.
pub const RECOVERY_STATUS_BYTES: usize = 1 + 4 * 5;

/// A successful answer (the payload of a `RESPONSE` frame; its opcode is the request's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    Challenge {
        challenge: [u8; CHALLENGE_LEN],
        cluster_id: [u8; 16],
        node_id: u64,
    },
    Accepted,
    Route {
        node_id: u64,
        /// Leader node id of every shard as this node knows it (0: none known).
        leaders: Vec<u64>,
    },
    PartitionCreated {
        lsn: u64,
        client_id: [u8; 16],
        credential: [u8; CREDENTIAL_LEN],
    },
    PartitionDeleted {
        lsn: u64,
    },
    Credential {
        client_id: [u8; 16],
        credential: [u8; CREDENTIAL_LEN],
    },
    Status {
        node_id: u64,
        recovery: RecoveryStatus,
        shards: Vec<ShardStatus>,
    },
    KeyWritten(KeyWritten),
    Described {
        key_id: [u8; 16],
        /// Oldest first.
        versions: Vec<VersionInfo>,
        truncated: bool,
    },
    Listed {
        /// (key id, newest version), in key id order.
        keys: Vec<([u8; 16], u32)>,
        more: bool,
    },
    Encrypted {
        version: u32,
        envelope: Vec<u8>,
    },
    Decrypted {
        plaintext: Vec<u8>,
    },
    DataKey {
        version: u32,
        plaintext: Vec<u8>,
        envelope: Vec<u8>,
    },
}

/// Stable error codes (§8.4). Never renumbered; new ones get new numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The payload does not decode, or a field is out of range.
    BadRequest = 1,
    /// Not authenticated (a request before the proof), or the proof was wrong.
    Unauthenticated = 2,
    /// The operation is not allowed in the connection's scope.
    Forbidden = 3,
    /// The material names another realm (a backup or envelope of another card realm).
    WrongRealm = 4,
    /// No such key (or version).
    NotFound = 5,
    /// No such partition.
    NoSuchPartition = 6,
    /// The key or partition already exists.
    AlreadyExists = 7,
    /// A rotate named a version that is no longer current (`version` = the current one).
    VersionConflict = 8,
    /// A version out of sequence.
    InvalidVersion = 9,
    /// The idempotency id was first used by another operation.
    IdempotencyConflict = 10,
    /// Stored material failed its check (a masked blob's MAC, a backup's MAC).
    Corrupt = 11,
    /// The node has too much in flight: back off and retry.
    Overloaded = 12,
    /// Not applied here in time, no leader, or the leader changed: retry (same idempotency id);
    /// `leader` names the leader node when known.
    Retry = 13,
    /// A frame or field over its limit.
    TooLarge = 14,
    /// An opcode this node does not know.
    UnknownOpcode = 15,
    /// A fault in this node (the card, the disk): the request may be retried elsewhere.
    Internal = 16,
    /// A partition still holding keys cannot be deleted.
    PartitionNotEmpty = 17,
    /// The key's current version is disabled: it neither encrypts nor decrypts.
    Disabled = 18,
    /// An envelope that does not open: tampered, wrong AAD, or made by another key.
    BadEnvelope = 19,
    /// The protocol version of the hello is not spoken here.
    UnsupportedVersion = 20,
    /// The node is shutting down: retry on another.
    ShuttingDown = 21,
    /// The partition's policy requires a TLS client certificate naming it
    /// (`p-<partition hex>.<cluster hex>.keyfort`, `keyfort tls issue-client`), and the
    /// connection presented none (or plaintext, or one naming something else). The answer to
    /// the proof; not retryable.
    ClientCertRequired = 22,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 22] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthenticated,
        ErrorCode::Forbidden,
        ErrorCode::WrongRealm,
        ErrorCode::NotFound,
        ErrorCode::NoSuchPartition,
        ErrorCode::AlreadyExists,
        ErrorCode::VersionConflict,
        ErrorCode::InvalidVersion,
        ErrorCode::IdempotencyConflict,
        ErrorCode::Corrupt,
        ErrorCode::Overloaded,
        ErrorCode::Retry,
        ErrorCode::TooLarge,
        ErrorCode::UnknownOpcode,
        ErrorCode::Internal,
        ErrorCode::PartitionNotEmpty,
        ErrorCode::Disabled,
        ErrorCode::BadEnvelope,
        ErrorCode::UnsupportedVersion,
        ErrorCode::ShuttingDown,
        ErrorCode::ClientCertRequired,
    ];

    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| *c as u16 == v)
    }

    /// Whether a client should retry the request (the same request id and idempotency id)
    /// on the same or another node.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Overloaded | ErrorCode::Retry | ErrorCode::ShuttingDown
        )
    }
}

/// A typed error answer (the payload of a `RESPONSE | ERROR` frame).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("{code:?}: {message}")]
pub struct ErrorReply {
    pub code: ErrorCode,
    /// Retry: the leader node id when known (else 0).
    pub leader: u64,
    /// VersionConflict: the current version (else 0).
    pub version: u32,
    pub message: String,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
        let mut message: String = message.into();
        if message.len() > MAX_ERROR_MESSAGE_BYTES {
            let mut end = MAX_ERROR_MESSAGE_BYTES;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        ErrorReply {
            code,
            leader: 0,
            version: 0,
            message,
        }
    }

    /// `code u16 ‖ leader u64 ‖ version u32 ‖ message length u16 ‖ message (UTF-8)`.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(16 + self.message.len());
        b.extend_from_slice(&(self.code as u16).to_le_bytes());
        b.extend_from_slice(&self.leader.to_le_bytes());
        b.extend_from_slice(&self.version.to_le_bytes());
        put_bytes16(&mut b, self.message.as_bytes());
        b
    }

    pub fn decode(payload: &[u8]) -> Result<ErrorReply, ProtoError> {
        whole(payload, "error reply", |r| {
            let code = r.u16()?;
            let code = ErrorCode::from_u16(code).ok_or(ProtoError::Malformed {
                what: "error reply",
                detail: "unknown error code",
            })?;
            let leader = r.u64()?;
            let version = r.u32()?;
            let msg = bytes16(r, "error message", MAX_ERROR_MESSAGE_BYTES)?;
            let message = String::from_utf8(msg.to_vec()).map_err(|_| ProtoError::Malformed {
                what: "error message",
                detail: "not UTF-8",
            })?;
            Ok(ErrorReply {
                code,
                leader,
                version,
                message,
            })
        })
    }
}

// ---- encoding helpers ----

fn put_bytes16(b: &mut Vec<u8>, v: &[u8]) {
    debug_assert!(v.len() <= u16::MAX as usize);
    b.extend_from_slice(&(v.len() as u16).to_le_bytes());
    b.extend_from_slice(v);
}

fn put_bytes32(b: &mut Vec<u8>, v: &[u8]) {
    b.extend_from_slice(&(v.len() as u32).to_le_bytes());
    b.extend_from_slice(v);
}

fn whole<T>(
    payload: &[u8],
    what: &'static str,
    read: impl FnOnce(&mut Reader<'_>) -> Result<T, ProtoError>,
) -> Result<T, ProtoError> {
    let mut r = Reader::new(payload, what);
    let v = read(&mut r)?;
    r.finish()?;
    Ok(v)
}

fn checked_len(what: &'static str, len: usize, max: usize) -> Result<(), ProtoError> {
    if len > max {
        return Err(ProtoError::TooLong { what, len, max });
    }
    Ok(())
}

/// A u16-length-prefixed field of at most `max` bytes.
fn bytes16<'a>(r: &mut Reader<'a>, what: &'static str, max: usize) -> Result<&'a [u8], ProtoError> {
    let n = r.u16()? as usize;
    checked_len(what, n, max)?;
    Ok(r.bytes(n)?)
}

/// A u32-length-prefixed field of at most `max` bytes (checked before anything is read).
fn bytes32<'a>(r: &mut Reader<'a>, what: &'static str, max: usize) -> Result<&'a [u8], ProtoError> {
    let n = r.u32()? as usize;
    checked_len(what, n, max)?;
    Ok(r.bytes(n)?)
}

/// A u16 count of at most `max` items (checked before anything is allocated for them).
fn count16(r: &mut Reader<'_>, what: &'static str, max: u16) -> Result<u16, ProtoError> {
    let n = r.u16()?;
    checked_len(what, n as usize, max as usize)?;
    Ok(n)
}

fn id(r: &mut Reader<'_>) -> Result<[u8; 16], ProtoError> {
    Ok(r.array::<16>()?)
}

fn u8_(r: &mut Reader<'_>) -> Result<u8, ProtoError> {
    Ok(r.array::<1>()?[0])
}

fn bool_(r: &mut Reader<'_>, what: &'static str) -> Result<bool, ProtoError> {
    match u8_(r)? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(ProtoError::Malformed {
            what,
            detail: "flag not 0 or 1",
        }),
    }
}

/// Largest envelope a decrypt accepts: the header, the largest plaintext, the tag.
pub const MAX_ENVELOPE_BYTES: usize = MAX_PLAINTEXT_BYTES + 128;

impl Request {
    pub fn opcode(&self) -> u16 {
        match self {
            Request::Hello { .. } => op::HELLO,
            Request::Proof { .. } => op::PROOF,
            Request::Route => op::ROUTE,
            Request::PartitionCreate { .. } => op::PARTITION_CREATE,
            Request::PartitionDelete { .. } => op::PARTITION_DELETE,
            Request::CredentialIssue { .. } => op::CREDENTIAL_ISSUE,
            Request::ClusterStatus => op::CLUSTER_STATUS,
            Request::KeyCreate { .. } => op::KEY_CREATE,
            Request::KeyRotate { .. } => op::KEY_ROTATE,
            Request::KeyUpdate { .. } => op::KEY_UPDATE,
            Request::KeyDelete { .. } => op::KEY_DELETE,
            Request::KeyDescribe { .. } => op::KEY_DESCRIBE,
            Request::KeyList { .. } => op::KEY_LIST,
            Request::KeyRestore { .. } => op::KEY_RESTORE,
            Request::Encrypt { .. } => op::ENCRYPT,
            Request::Decrypt { .. } => op::DECRYPT,
            Request::GenerateDataKey { .. } => op::GENERATE_DATA_KEY,
        }
    }

    /// Whether the request writes (goes through raft); writes carry an idempotency id.
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Request::PartitionCreate { .. }
                | Request::PartitionDelete { .. }
                | Request::KeyCreate { .. }
                | Request::KeyRotate { .. }
                | Request::KeyUpdate { .. }
                | Request::KeyDelete { .. }
                | Request::KeyRestore { .. }
        )
    }

    /// The payload bytes (§8.3). Callers keep fields within their limits; the decoder enforces
    /// them.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            Request::Hello {
                version,
                scope,
                client_id,
            } => {
                b.push(*version);
                b.push(scope.code());
                b.extend_from_slice(&scope.partition_bytes());
                b.extend_from_slice(client_id);
            }
            Request::Proof { response } => b.extend_from_slice(response),
            Request::Route | Request::ClusterStatus => {}
            Request::PartitionCreate { partition, flags } => {
                b.extend_from_slice(partition);
                if *flags != 0 {
                    b.push(*flags);
                }
            }
            Request::PartitionDelete { partition } | Request::CredentialIssue { partition } => {
                b.extend_from_slice(partition)
            }
            Request::KeyCreate {
                idempotency_id,
                flags,
                metadata,
            } => {
                b.extend_from_slice(idempotency_id);
                b.push(*flags);
                put_bytes16(&mut b, metadata);
            }
            Request::KeyRotate {
                idempotency_id,
                key_id,
                replaces,
            } => {
                b.extend_from_slice(idempotency_id);
                b.extend_from_slice(key_id);
                b.extend_from_slice(&replaces.to_le_bytes());
            }
            Request::KeyUpdate {
                idempotency_id,
                key_id,
                version,
                state,
                metadata,
            } => {
                b.extend_from_slice(idempotency_id);
                b.extend_from_slice(key_id);
                b.extend_from_slice(&version.to_le_bytes());
                b.push(*state as u8);
                put_bytes16(&mut b, metadata);
            }
            Request::KeyDelete {
                idempotency_id,
                key_id,
            } => {
                b.extend_from_slice(idempotency_id);
                b.extend_from_slice(key_id);
            }
            Request::KeyDescribe { key_id } => b.extend_from_slice(key_id),
            Request::KeyList { after, limit } => {
                b.push(after.is_some() as u8);
                b.extend_from_slice(&after.unwrap_or_default());
                b.extend_from_slice(&limit.to_le_bytes());
            }
            Request::KeyRestore {
                idempotency_id,
                backup,
            } => {
                b.extend_from_slice(idempotency_id);
                put_bytes16(&mut b, backup);
            }
            Request::Encrypt {
                key_id,
                aad,
                plaintext,
            } => {
                b.extend_from_slice(key_id);
                put_bytes16(&mut b, aad);
                put_bytes32(&mut b, plaintext);
            }
            Request::Decrypt {
                key_id,
                aad,
                envelope,
            } => {
                b.extend_from_slice(key_id);
                put_bytes16(&mut b, aad);
                put_bytes32(&mut b, envelope);
            }
            Request::GenerateDataKey { key_id, len, aad } => {
                b.extend_from_slice(key_id);
                b.push(*len);
                put_bytes16(&mut b, aad);
            }
        }
        b
    }

    /// Decodes the payload of a request frame with `opcode`.
    pub fn decode(opcode: u16, payload: &[u8]) -> Result<Request, ProtoError> {
        match opcode {
            op::HELLO => whole(payload, "hello", |r| {
                let version = u8_(r)?;
                let scope_code = u8_(r)?;
                let partition = id(r)?;
                let client_id = id(r)?;
                let scope = match scope_code {
                    1 => Scope::Partition(partition),
                    2 if partition == [0; 16] => Scope::Admin,
                    2 => {
                        return Err(ProtoError::Malformed {
                            what: "hello",
                            detail: "admin scope with a partition id",
                        })
                    }
                    _ => {
                        return Err(ProtoError::Malformed {
                            what: "hello",
                            detail: "scope not 1 (partition) or 2 (admin)",
                        })
                    }
                };
                Ok(Request::Hello {
                    version,
                    scope,
                    client_id,
                })
            }),
            op::PROOF => whole(payload, "proof", |r| {
                Ok(Request::Proof {
                    response: r.array()?,
                })
            }),
            op::ROUTE => whole(payload, "route", |_| Ok(Request::Route)),
            op::CLUSTER_STATUS => whole(payload, "cluster status", |_| Ok(Request::ClusterStatus)),
            op::PARTITION_CREATE => whole(payload, "partition create", |r| {
                let partition = id(r)?;
                let flags = match r.remaining() {
                    0 => 0,
                    _ => match u8_(r)? {
                        // One encoding per request: no flags is no byte.
                        0 => {
                            return Err(ProtoError::Malformed {
                                what: "partition create",
                                detail: "a flags byte of 0 (leave it out)",
                            })
                        }
                        f if f & !partition_flags::KNOWN != 0 => {
                            return Err(ProtoError::Malformed {
                                what: "partition create",
                                detail: "unknown flag bits",
                            })
                        }
                        f => f,
                    },
                };
                Ok(Request::PartitionCreate { partition, flags })
            }),
            op::PARTITION_DELETE => whole(payload, "partition delete", |r| {
                Ok(Request::PartitionDelete { partition: id(r)? })
            }),
            op::CREDENTIAL_ISSUE => whole(payload, "credential issue", |r| {
                Ok(Request::CredentialIssue { partition: id(r)? })
            }),
            op::KEY_CREATE => whole(payload, "key create", |r| {
                let idempotency_id = id(r)?;
                let flags = u8_(r)?;
                if flags & !create_flags::KNOWN != 0 {
                    return Err(ProtoError::Malformed {
                        what: "key create",
                        detail: "unknown flag bits",
                    });
                }
                let metadata = bytes16(r, "metadata", MAX_METADATA_BYTES)?.to_vec();
                Ok(Request::KeyCreate {
                    idempotency_id,
                    flags,
                    metadata,
                })
            }),
            op::KEY_ROTATE => whole(payload, "key rotate", |r| {
                Ok(Request::KeyRotate {
                    idempotency_id: id(r)?,
                    key_id: id(r)?,
                    replaces: r.u32()?,
                })
            }),
            op::KEY_UPDATE => whole(payload, "key update", |r| {
                Ok(Request::KeyUpdate {
                    idempotency_id: id(r)?,
                    key_id: id(r)?,
                    version: r.u32()?,
                    state: KeyStateCode::from_u8(u8_(r)?)?,
                    metadata: bytes16(r, "metadata", MAX_METADATA_BYTES)?.to_vec(),
                })
            }),
            op::KEY_DELETE => whole(payload, "key delete", |r| {
                Ok(Request::KeyDelete {
                    idempotency_id: id(r)?,
                    key_id: id(r)?,
                })
            }),
            op::KEY_DESCRIBE => whole(payload, "key describe", |r| {
                Ok(Request::KeyDescribe { key_id: id(r)? })
            }),
            op::KEY_LIST => whole(payload, "key list", |r| {
                let has = bool_(r, "key list")?;
                let after = id(r)?;
                if !has && after != [0; 16] {
                    return Err(ProtoError::Malformed {
                        what: "key list",
                        detail: "an 'after' id without its flag",
                    });
                }
                let limit = r.u16()?;
                if limit == 0 || limit > MAX_LIST_KEYS {
                    return Err(ProtoError::Malformed {
                        what: "key list",
                        detail: "limit not in 1..=MAX_LIST_KEYS",
                    });
                }
                Ok(Request::KeyList {
                    after: has.then_some(after),
                    limit,
                })
            }),
            op::KEY_RESTORE => whole(payload, "key restore", |r| {
                Ok(Request::KeyRestore {
                    idempotency_id: id(r)?,
                    backup: bytes16(r, "backup", MAX_BACKUP_BYTES)?.to_vec(),
                })
            }),
            op::ENCRYPT => whole(payload, "encrypt", |r| {
                Ok(Request::Encrypt {
                    key_id: id(r)?,
                    aad: bytes16(r, "aad", MAX_AAD_BYTES)?.to_vec(),
                    plaintext: bytes32(r, "plaintext", MAX_PLAINTEXT_BYTES)?.to_vec(),
                })
            }),
            op::DECRYPT => whole(payload, "decrypt", |r| {
                Ok(Request::Decrypt {
                    key_id: id(r)?,
                    aad: bytes16(r, "aad", MAX_AAD_BYTES)?.to_vec(),
                    envelope: bytes32(r, "envelope", MAX_ENVELOPE_BYTES)?.to_vec(),
                })
            }),
            op::GENERATE_DATA_KEY => whole(payload, "generate data key", |r| {
                let key_id = id(r)?;
                let len = u8_(r)?;
                if !DATA_KEY_LEN_RANGE.contains(&len) {
                    return Err(ProtoError::Malformed {
                        what: "generate data key",
                        detail: "length not in 16..=64",
                    });
                }
                Ok(Request::GenerateDataKey {
                    key_id,
                    len,
                    aad: bytes16(r, "aad", MAX_AAD_BYTES)?.to_vec(),
                })
            }),
            other => Err(ProtoError::UnknownOpcode(other)),
        }
    }
}

impl Response {
    /// The payload bytes (§8.3).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            Response::Challenge {
                challenge,
                cluster_id,
                node_id,
            } => {
                b.extend_from_slice(challenge);
                b.extend_from_slice(cluster_id);
                b.extend_from_slice(&node_id.to_le_bytes());
            }
            Response::Accepted => {}
            Response::Route { node_id, leaders } => {
                b.extend_from_slice(&node_id.to_le_bytes());
                b.extend_from_slice(&(leaders.len() as u32).to_le_bytes());
                for l in leaders {
                    b.extend_from_slice(&l.to_le_bytes());
                }
            }
            Response::PartitionCreated {
                lsn,
                client_id,
                credential,
            } => {
                b.extend_from_slice(&lsn.to_le_bytes());
                b.extend_from_slice(client_id);
                b.extend_from_slice(credential);
            }
            Response::PartitionDeleted { lsn } => b.extend_from_slice(&lsn.to_le_bytes()),
            Response::Credential {
                client_id,
                credential,
            } => {
                b.extend_from_slice(client_id);
                b.extend_from_slice(credential);
            }
            Response::Status {
                node_id,
                recovery,
                shards,
            } => {
                b.extend_from_slice(&node_id.to_le_bytes());
                b.push(recovery.tier);
                for v in [
                    recovery.fetch_ms,
                    recovery.verify_ms,
                    recovery.open_ms,
                    recovery.replay_ms,
                    recovery.catch_up_ms,
                ] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                b.extend_from_slice(&(shards.len() as u32).to_le_bytes());
                for s in shards {
                    b.extend_from_slice(&s.shard.to_le_bytes());
                    b.push(s.role);
                    for v in [s.term, s.leader, s.commit, s.applied, s.snapshot_lsn] {
                        b.extend_from_slice(&v.to_le_bytes());
                    }
                    b.extend_from_slice(&s.digest);
                    b.extend_from_slice(&s.keys.to_le_bytes());
                    b.extend_from_slice(&s.archived_lsn.to_le_bytes());
                    b.extend_from_slice(&s.rpo_ms.to_le_bytes());
                }
            }
            Response::KeyWritten(w) => {
                b.extend_from_slice(&w.key_id);
                b.extend_from_slice(&w.version.to_le_bytes());
                b.extend_from_slice(&w.lsn.to_le_bytes());
                b.push(w.duplicate as u8);
                put_bytes16(&mut b, &w.backup);
            }
            Response::Described {
                key_id,
                versions,
                truncated,
            } => {
                b.extend_from_slice(key_id);
                b.push(*truncated as u8);
                b.extend_from_slice(&(versions.len() as u16).to_le_bytes());
                for v in versions {
                    b.extend_from_slice(&v.version.to_le_bytes());
                    b.push(v.state as u8);
                    b.extend_from_slice(&v.created_lsn.to_le_bytes());
                    put_bytes16(&mut b, &v.metadata);
                }
            }
            Response::Listed { keys, more } => {
                b.push(*more as u8);
                b.extend_from_slice(&(keys.len() as u16).to_le_bytes());
                for (k, v) in keys {
                    b.extend_from_slice(k);
                    b.extend_from_slice(&v.to_le_bytes());
                }
            }
            Response::Encrypted { version, envelope } => {
                b.extend_from_slice(&version.to_le_bytes());
                put_bytes32(&mut b, envelope);
            }
            Response::Decrypted { plaintext } => put_bytes32(&mut b, plaintext),
            Response::DataKey {
                version,
                plaintext,
                envelope,
            } => {
                b.extend_from_slice(&version.to_le_bytes());
                put_bytes16(&mut b, plaintext);
                put_bytes32(&mut b, envelope);
            }
        }
        b
    }

    /// Decodes the payload of a (non-error) response frame answering a request of `opcode`.
    pub fn decode(opcode: u16, payload: &[u8]) -> Result<Response, ProtoError> {
        match opcode {
            op::HELLO => whole(payload, "challenge", |r| {
                Ok(Response::Challenge {
                    challenge: r.array()?,
                    cluster_id: id(r)?,
                    node_id: r.u64()?,
                })
            }),
            op::PROOF => whole(payload, "accepted", |_| Ok(Response::Accepted)),
            op::ROUTE => whole(payload, "route", |r| {
                let node_id = r.u64()?;
                let n = r.u32()? as usize;
                // Each leader is 8 bytes: a count the payload cannot hold is refused before
                // anything is allocated for it.
                if n > r.remaining() / 8 {
                    return Err(ProtoError::Malformed {
                        what: "route",
                        detail: "shard count exceeds the payload",
                    });
                }
                let leaders = (0..n).map(|_| r.u64()).collect::<Result<_, _>>()?;
                Ok(Response::Route { node_id, leaders })
            }),
            op::PARTITION_CREATE => whole(payload, "partition created", |r| {
                Ok(Response::PartitionCreated {
                    lsn: r.u64()?,
                    client_id: id(r)?,
                    credential: r.array()?,
                })
            }),
            op::PARTITION_DELETE => whole(payload, "partition deleted", |r| {
                Ok(Response::PartitionDeleted { lsn: r.u64()? })
            }),
            op::CREDENTIAL_ISSUE => whole(payload, "credential", |r| {
                Ok(Response::Credential {
                    client_id: id(r)?,
                    credential: r.array()?,
                })
            }),
            op::CLUSTER_STATUS => whole(payload, "status", |r| {
                let node_id = r.u64()?;
                let recovery = RecoveryStatus {
                    tier: u8_(r)?,
                    fetch_ms: r.u32()?,
                    verify_ms: r.u32()?,
                    open_ms: r.u32()?,
                    replay_ms: r.u32()?,
                    catch_up_ms: r.u32()?,
                };
                let n = r.u32()? as usize;
                if n > r.remaining() / SHARD_STATUS_BYTES {
                    return Err(ProtoError::Malformed {
                        what: "status",
                        detail: "shard count exceeds the payload",
                    });
                }
                let mut shards = Vec::with_capacity(n);
                for _ in 0..n {
                    shards.push(ShardStatus {
                        shard: r.u32()?,
                        role: u8_(r)?,
                        term: r.u64()?,
                        leader: r.u64()?,
                        commit: r.u64()?,
                        applied: r.u64()?,
                        snapshot_lsn: r.u64()?,
                        digest: id(r)?,
                        keys: r.u64()?,
                        archived_lsn: r.u64()?,
                        rpo_ms: r.u32()?,
                    });
                }
                Ok(Response::Status {
                    node_id,
                    recovery,
                    shards,
                })
            }),
            op::KEY_CREATE | op::KEY_ROTATE | op::KEY_UPDATE | op::KEY_DELETE | op::KEY_RESTORE => {
                whole(payload, "key written", |r| {
                    Ok(Response::KeyWritten(KeyWritten {
                        key_id: id(r)?,
                        version: r.u32()?,
                        lsn: r.u64()?,
                        duplicate: bool_(r, "key written")?,
                        backup: bytes16(r, "backup", MAX_BACKUP_BYTES)?.to_vec(),
                    }))
                })
            }
            op::KEY_DESCRIBE => whole(payload, "described", |r| {
                let key_id = id(r)?;
                let truncated = bool_(r, "described")?;
                let n = count16(r, "versions", MAX_DESCRIBE_VERSIONS)?;
                let mut versions = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    versions.push(VersionInfo {
                        version: r.u32()?,
                        state: KeyStateCode::from_u8(u8_(r)?)?,
                        created_lsn: r.u64()?,
                        metadata: bytes16(r, "metadata", MAX_METADATA_BYTES)?.to_vec(),
                    });
                }
                Ok(Response::Described {
                    key_id,
                    versions,
                    truncated,
                })
            }),
            op::KEY_LIST => whole(payload, "listed", |r| {
                let more = bool_(r, "listed")?;
                let n = count16(r, "keys", MAX_LIST_KEYS)?;
                let mut keys = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    keys.push((id(r)?, r.u32()?));
                }
                Ok(Response::Listed { keys, more })
            }),
            op::ENCRYPT => whole(payload, "encrypted", |r| {
                Ok(Response::Encrypted {
                    version: r.u32()?,
                    envelope: bytes32(r, "envelope", MAX_ENVELOPE_BYTES)?.to_vec(),
                })
            }),
            op::DECRYPT => whole(payload, "decrypted", |r| {
                Ok(Response::Decrypted {
                    plaintext: bytes32(r, "plaintext", MAX_PLAINTEXT_BYTES)?.to_vec(),
                })
            }),
            op::GENERATE_DATA_KEY => whole(payload, "data key", |r| {
                Ok(Response::DataKey {
                    version: r.u32()?,
                    plaintext: bytes16(r, "data key", *DATA_KEY_LEN_RANGE.end() as usize)?.to_vec(),
                    envelope: bytes32(r, "envelope", MAX_ENVELOPE_BYTES)?.to_vec(),
                })
            }),
            other => Err(ProtoError::UnknownOpcode(other)),
        }
    }
}

/// Bytes of one shard in a status answer.
pub const SHARD_STATUS_BYTES: usize = 4 + 1 + 8 * 5 + 16 + 8 + 8 + 4;
