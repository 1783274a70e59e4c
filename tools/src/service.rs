//! What keyfortd does for a client request (docs/format.md §8.5): the write path and the use
//! path of DESIGN.md over this node's card and shard replicas.
//!
//! Writes: this node's card makes the key material (create, rotate) or the partition keys
//! (partition create); the record is proposed to the partition's shard from here (forwarded to
//! the leader when this node is not it) with the client's idempotency id; the answer comes
//! once the record is committed and applied here. Reads and uses: a ReadIndex round on the
//! shard (linearizable with rotate and delete), then the state, then the card.
//!
//! The service's card session is its own (`card`): it holds imported partitions and the
//! bounded handle cache. Partitions are imported from the replicated state on first use and
//! dropped when the state no longer has them.

use keyfort_engine::cluster::shard_of;
use keyfort_engine::raft::{Committed, ProposeError, Replica, ReplicaError};
use keyfort_engine::state::{IdempotencyId, KeyEntry, KeyPut, KeyState, Op, OutcomeCode, PutOp};
use keyfort_hsm::format::Envelope;
use keyfort_hsm::{
    CardError, CoreSession, KeyHeader, KeyId, MaskedBlob, PartitionId, PartitionPolicy,
    WrappedUnder,
};
use keyfort_net::client_proto::{
    create_flags, partition_flags, ErrorCode, ErrorReply, KeyWritten, Request, Response, Scope,
    ShardStatus, VersionInfo, ADMIN_CREDENTIAL_DOMAIN, CHALLENGE_LEN, CLIENT_MAX_FRAME_PAYLOAD,
    MAX_DESCRIBE_VERSIONS,
};
use keyfort_net::server::ClientService;
use rustls_pki_types::CertificateDer;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

/// Bytes of a describe answer besides its versions: key id, truncated flag, count.
const DESCRIBE_FIXED_BYTES: usize = 16 + 1 + 2;
/// Bytes of one described version besides its metadata.
const DESCRIBE_VERSION_BYTES: usize = 4 + 1 + 8 + 2;

/// Longest wait for a write forwarded from this node (a follower) to its shard's leader
/// before answering `Retry` (the engine's own forward timeout is longer).
pub const FORWARD_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// How often a forwarded write checks whether its shard's leader changed.
pub const FORWARD_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// Domain tag of key ids derived from idempotency ids (§8.5).
pub const KEY_ID_DOMAIN: &[u8] = b"keyfort-key-id-v1";

/// The key id a create with idempotency id `idem` in `partition` gets: derived, so every try
/// of the same create names the same key, whichever node's card makes its material.
pub fn derived_key_id(partition: &PartitionId, idem: &[u8; 16]) -> KeyId {
    let mut b = Vec::with_capacity(KEY_ID_DOMAIN.len() + 32);
    b.extend_from_slice(KEY_ID_DOMAIN);
    b.extend_from_slice(&partition.0);
    b.extend_from_slice(idem);
    KeyId(xxhash_rust::xxh3::xxh3_128(&b).to_le_bytes())
}

/// The admin secret of `client_id`: HMAC(integrity key, domain ‖ client id), made in a card of
/// the realm (`keyfort cluster admin-credential` issues it; the node recomputes it to check).
pub fn admin_secret(mac: &CoreSession, client_id: &[u8; 16]) -> Result<[u8; 32], CardError> {
    let mut b = ADMIN_CREDENTIAL_DOMAIN.to_vec();
    b.extend_from_slice(client_id);
    mac.mac(&b)
}

pub struct Service {
    pub cluster_id: [u8; 16],
    pub node_id: u64,
    /// Fixed at `cluster init`.
    pub shard_count: u32,
    pub replicas: Rc<RefCell<Vec<Rc<Replica>>>>,
    /// Key operations' card session (partitions, handle cache, IVs).
    pub card: RefCell<CoreSession>,
    /// The session holding the cluster integrity key (admin credentials).
    pub mac: Rc<CoreSession>,
    /// Fingerprint (xxh3-64) of the config each partition loaded in `card` was imported from.
    pub loaded: RefCell<std::collections::HashMap<PartitionId, u64>>,
    pub stopping: Cell<bool>,
    /// How this node's start recovered (set once the shards are open).
    pub recovery: RefCell<Option<Rc<RefCell<crate::recovery_report::Recovery>>>>,
    /// Per shard, the log archive's progress (empty without a durable store).
    pub archives: RefCell<Vec<Rc<RefCell<crate::archive::ArchiveStatus>>>>,
}

type Answer = Result<Response, ErrorReply>;

fn err(code: ErrorCode, msg: impl Into<String>) -> ErrorReply {
    ErrorReply::new(code, msg)
}

fn card_err(e: CardError) -> ErrorReply {
    let code = match &e {
        CardError::BadMac { .. } | CardError::Corrupt { .. } => ErrorCode::Corrupt,
        CardError::WrongRealm { .. } | CardError::WrongVendor { .. } => ErrorCode::WrongRealm,
        _ => ErrorCode::Internal,
    };
    err(code, format!("card: {e}"))
}

fn replica_err(e: ReplicaError) -> ErrorReply {
    match e {
        ReplicaError::Propose(ProposeError::NotLeader { leader }) => ErrorReply {
            leader: leader.unwrap_or(0),
            ..err(ErrorCode::Retry, "no leader for the shard yet")
        },
        ReplicaError::Busy { .. } => err(ErrorCode::Overloaded, e.to_string()),
        ReplicaError::Stopped(_) => err(ErrorCode::ShuttingDown, e.to_string()),
        _ => err(ErrorCode::Retry, e.to_string()),
    }
}

fn state_err(e: keyfort_engine::snapshot::SnapshotError) -> ErrorReply {
    err(ErrorCode::Internal, format!("state: {e}"))
}

/// A rejection outcome as the client's error.
fn outcome_err(code: OutcomeCode, version: u32) -> ErrorReply {
    let (c, msg) = match code {
        OutcomeCode::KeyExists => (ErrorCode::AlreadyExists, "the key exists"),
        OutcomeCode::PartitionExists => (ErrorCode::AlreadyExists, "the partition exists"),
        OutcomeCode::NoSuchKey => (ErrorCode::NotFound, "no such key or version"),
        OutcomeCode::NoSuchPartition => (ErrorCode::NoSuchPartition, "no such partition"),
        OutcomeCode::StaleVersion => (
            ErrorCode::VersionConflict,
            "the version named is no longer current",
        ),
        OutcomeCode::InvalidVersion => (ErrorCode::InvalidVersion, "version out of sequence"),
        OutcomeCode::IdempotencyConflict => (
            ErrorCode::IdempotencyConflict,
            "the idempotency id was first used by another operation",
        ),
        OutcomeCode::PartitionNotEmpty => (
            ErrorCode::PartitionNotEmpty,
            "the partition still holds keys",
        ),
        _ => (ErrorCode::Internal, "unexpected apply outcome"),
    };
    ErrorReply {
        version,
        ..err(c, format!("{msg} ({code:?})"))
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Service {
    /// The cluster's shard count once every shard's replica is open here, `None` before: the
    /// client listener starts before the replicas, which open one by one, and a partition must
    /// not be looked up in the wrong shard meanwhile.
    fn shard_count(&self) -> Option<u32> {
        (self.replicas.borrow().len() as u32 >= self.shard_count).then_some(self.shard_count)
    }

    fn replica_of(&self, p: &PartitionId) -> Result<Rc<Replica>, ErrorReply> {
        let starting = || err(ErrorCode::Retry, "the node is still starting");
        let n = self.shard_count().ok_or_else(starting)?;
        self.replicas
            .borrow()
            .get(shard_of(p, n) as usize)
            .cloned()
            .ok_or_else(starting)
    }

    /// A linearizable read point on the partition's shard.
    async fn read(&self, p: &PartitionId) -> Result<Rc<Replica>, ErrorReply> {
        let r = self.replica_of(p)?;
        r.read_index().await.map_err(replica_err)?;
        Ok(r)
    }

    /// Whether the partition exists in the replica's applied state.
    fn has_partition(r: &Replica, p: &PartitionId) -> bool {
        r.with_core(|c| c.state_machine().partition(p).is_some())
    }

    /// A partition not in this replica's state may be committed and not yet applied here: one
    /// read round before the caller goes on (and refuses it if it is still missing).
    async fn await_partition(r: &Rc<Replica>, p: &PartitionId) -> Result<(), ErrorReply> {
        if !Self::has_partition(r, p) {
            r.read_index().await.map_err(replica_err)?;
        }
        Ok(())
    }

    /// Loads the partition into the service's card session from the state (once); refuses a
    /// partition the state no longer has (and forgets it in the card).
    fn ensure_partition(&self, r: &Replica, p: &PartitionId) -> Result<(), ErrorReply> {
        // The fingerprint of the config the state holds now: a partition deleted and created
        // again under the same id (on another node) has other keys, and the card must not go
        // on using the old ones.
        let fp = r.with_core(|c| {
            c.state_machine()
                .partition(p)
                .map(xxhash_rust::xxh3::xxh3_64)
        });
        let Some(fp) = fp else {
            self.card.borrow_mut().drop_partition(p);
            self.loaded.borrow_mut().remove(p);
            return Err(err(ErrorCode::NoSuchPartition, format!("no partition {p}")));
        };
        if self.card.borrow().partition_loaded(p) {
            if self.loaded.borrow().get(p) == Some(&fp) {
                return Ok(());
            }
            self.card.borrow_mut().drop_partition(p);
        }
        let cfg = r.with_core(|c| c.state_machine().partition(p).map(<[u8]>::to_vec));
        let cfg =
            cfg.ok_or_else(|| err(ErrorCode::NoSuchPartition, format!("no partition {p}")))?;
        self.card
            .borrow_mut()
            .import_partition(&cfg)
            .map_err(card_err)?;
        self.loaded.borrow_mut().insert(*p, fp);
        Ok(())
    }

    /// Proposes `op` on the shard: on its leader directly; from a follower forwarded by raft to
    /// the leader, waiting at most [`FORWARD_WAIT`] — a leader that died meanwhile is not
    /// noticed before the election timeout, and the client does better retrying (same
    /// idempotency id) where the new leader will be than waiting here.
    async fn propose(&self, r: &Rc<Replica>, op: &Op) -> Result<Committed, ErrorReply> {
        let leader = r.with_core(|c| c.leader_id());
        let payload = op.encode();
        let fut = r.propose_anywhere(op.kind(), &payload);
        if r.with_core(|c| c.is_leader()) {
            return fut.await.map_err(replica_err);
        }
        let r2 = r.clone();
        futures_lite::future::or(async { fut.await.map_err(replica_err) }, async move {
            // Gives up at FORWARD_WAIT, or as soon as the shard's leader changes: a proposal
            // forwarded to a leader that died is lost, and the new leader is where to retry.
            let t = std::time::Instant::now();
            let mut now = leader;
            while t.elapsed() < FORWARD_WAIT && now == leader {
                glommio::timer::sleep(FORWARD_POLL).await;
                now = r2.with_core(|c| c.leader_id());
            }
            Err(ErrorReply {
                leader: now.unwrap_or(0),
                ..err(
                    ErrorCode::Retry,
                    if now == leader {
                        format!("forwarded to the leader, not applied here within {FORWARD_WAIT:?}")
                    } else {
                        "the shard's leader changed while the write was forwarded".to_string()
                    },
                )
            })
        })
        .await
    }

    fn key_written(
        c: &Committed,
        key_id: KeyId,
        backup: Option<Vec<u8>>,
    ) -> Result<Response, ErrorReply> {
        let o = c.result.outcome;
        if o.code.is_rejected() {
            return Err(outcome_err(o.code, o.version));
        }
        let duplicate = c.result.duplicate_of_lsn.is_some();
        Ok(Response::KeyWritten(KeyWritten {
            key_id: key_id.0,
            version: o.version,
            lsn: c.result.duplicate_of_lsn.unwrap_or(c.index),
            duplicate,
            // A duplicate's key material is not the key that exists: its backup is not given.
            backup: if duplicate {
                Vec::new()
            } else {
                backup.unwrap_or_default()
            },
        }))
    }

    async fn run(self: Rc<Self>, scope: Scope, req: Request) -> Answer {
        match (&scope, req) {
            (_, Request::Route) if self.shard_count().is_none() => {
                Err(err(ErrorCode::Retry, "the node is still starting"))
            }
            (_, Request::Route) => Ok(Response::Route {
                node_id: self.node_id,
                leaders: self
                    .replicas
                    .borrow()
                    .iter()
                    .map(|r| r.with_core(|c| c.leader_id().unwrap_or(0)))
                    .collect(),
            }),
            (Scope::Admin, Request::ClusterStatus) if self.shard_count().is_none() => {
                Err(err(ErrorCode::Retry, "the node is still starting"))
            }
            (Scope::Admin, Request::ClusterStatus) => Ok(self.status()),
            (Scope::Admin, Request::PartitionCreate { partition, flags }) => {
                let policy = PartitionPolicy {
                    require_client_cert: flags & partition_flags::REQUIRE_CLIENT_CERT != 0,
                };
                self.partition_create(PartitionId(partition), policy).await
            }
            (Scope::Admin, Request::PartitionDelete { partition }) => {
                let p = PartitionId(partition);
                let r = self.replica_of(&p)?;
                let c = self
                    .propose(&r, &Op::PartitionDelete { partition: p })
                    .await?;
                let o = c.result.outcome;
                if o.code.is_rejected() {
                    return Err(outcome_err(o.code, o.version));
                }
                self.card.borrow_mut().drop_partition(&p);
                Ok(Response::PartitionDeleted { lsn: c.index })
            }
            (Scope::Admin, Request::CredentialIssue { partition }) => {
                let p = PartitionId(partition);
                let r = self.read(&p).await?;
                let (client_id, credential) = self.issue_credential(&r, &p)?;
                Ok(Response::Credential {
                    client_id,
                    credential,
                })
            }
            (Scope::Partition(p), req) => self.key_op(PartitionId(*p), req).await,
            (Scope::Admin, _) => Err(err(
                ErrorCode::Forbidden,
                "key operations need a partition client's credential",
            )),
        }
    }

    /// A new client of partition `p`: a random client id and its credential, derived in the
    /// card from the partition's credential key (issued once; the node keeps nothing).
    fn issue_credential(
        &self,
        r: &Replica,
        p: &PartitionId,
    ) -> Result<([u8; 16], [u8; 32]), ErrorReply> {
        self.ensure_partition(r, p)?;
        let client_id: [u8; 16] = rand::random();
        let credential = self
            .card
            .borrow()
            .issue_client_credential(p, &client_id)
            .map_err(card_err)?;
        Ok((client_id, credential))
    }

    /// A policy with flags is stated in the config's trailer, made in the card (docs/format.md
    /// §2.3); without flags the config is the 245 bytes it always was.
    async fn partition_create(&self, p: PartitionId, policy: PartitionPolicy) -> Answer {
        let r = self.replica_of(&p)?;
        let config = self
            .card
            .borrow_mut()
            .create_partition_with(p, policy)
            .map_err(card_err)?;
        // The creating session now holds this try's keys; what commits may be another try's
        // (a retry, a race): the session reloads the partition from the state when used.
        self.card.borrow_mut().drop_partition(&p);
        let c = self
            .propose(
                &r,
                &Op::PartitionCreate {
                    partition: p,
                    config,
                },
            )
            .await?;
        let o = c.result.outcome;
        if o.code.is_rejected() {
            return Err(outcome_err(o.code, o.version));
        }
        let (client_id, credential) = self.issue_credential(&r, &p)?;
        Ok(Response::PartitionCreated {
            lsn: c.index,
            client_id,
            credential,
        })
    }

    /// The current version of a key for a use: enabled, or a typed refusal.
    fn current(r: &Replica, p: PartitionId, k: KeyId) -> Result<KeyEntry, ErrorReply> {
        let e = r
            .with_core(|c| c.state_machine().current(p, k))
            .map_err(state_err)?
            .ok_or_else(|| err(ErrorCode::NotFound, format!("no key {k}")))?;
        if e.state == KeyState::Disabled {
            return Err(err(
                ErrorCode::Disabled,
                format!("key {k} version {} is disabled", e.header.version),
            ));
        }
        Ok(e)
    }

    async fn key_op(&self, p: PartitionId, req: Request) -> Answer {
        match req {
            Request::KeyCreate {
                idempotency_id,
                flags,
                metadata,
            } => {
                let r = self.replica_of(&p)?;
                let key_id = if idempotency_id == [0; 16] {
                    KeyId(rand::random())
                } else {
                    derived_key_id(&p, &idempotency_id)
                };
                Self::await_partition(&r, &p).await?;
                self.ensure_partition(&r, &p)?;
                let header = KeyHeader::aes(p, key_id, 1);
                let made = {
                    let mut card = self.card.borrow_mut();
                    if flags & create_flags::BACKUP != 0 {
                        card.create_key_with_backup(&header)
                    } else {
                        card.create_key(&header)
                            .map(|blob| keyfort_hsm::CreatedKey { blob, backup: None })
                    }
                }
                .map_err(card_err)?;
                let op = Op::KeyPut(KeyPut {
                    op: PutOp::Create,
                    idempotency_id: IdempotencyId(idempotency_id),
                    header,
                    version_replaced: 0,
                    state: if flags & create_flags::DISABLED != 0 {
                        KeyState::Disabled
                    } else {
                        KeyState::Enabled
                    },
                    metadata,
                    blob: made.blob,
                });
                let c = self.propose(&r, &op).await?;
                Self::key_written(&c, key_id, made.backup)
            }
            Request::KeyRotate {
                idempotency_id,
                key_id,
                replaces,
            } => {
                let r = self.replica_of(&p)?;
                self.ensure_partition(&r, &p)?;
                let next = replaces
                    .checked_add(1)
                    .ok_or_else(|| err(ErrorCode::InvalidVersion, "no version after u32::MAX"))?;
                let header = KeyHeader::aes(p, KeyId(key_id), next);
                let blob = self
                    .card
                    .borrow_mut()
                    .create_key(&header)
                    .map_err(card_err)?;
                let op = Op::KeyPut(KeyPut {
                    op: PutOp::Rotate,
                    idempotency_id: IdempotencyId(idempotency_id),
                    header,
                    version_replaced: replaces,
                    state: KeyState::Enabled,
                    metadata: Vec::new(),
                    blob,
                });
                let c = self.propose(&r, &op).await?;
                Self::key_written(&c, KeyId(key_id), None)
            }
            Request::KeyUpdate {
                idempotency_id,
                key_id,
                version,
                state,
                metadata,
            } => {
                let r = self.replica_of(&p)?;
                let op = Op::KeyPut(KeyPut {
                    op: PutOp::Update,
                    idempotency_id: IdempotencyId(idempotency_id),
                    header: KeyHeader::aes(p, KeyId(key_id), version),
                    version_replaced: 0,
                    state: state.into(),
                    metadata,
                    blob: Vec::new(),
                });
                let c = self.propose(&r, &op).await?;
                Self::key_written(&c, KeyId(key_id), None)
            }
            Request::KeyDelete {
                idempotency_id,
                key_id,
            } => {
                let r = self.replica_of(&p)?;
                let op = Op::KeyDelete {
                    idempotency_id: IdempotencyId(idempotency_id),
                    partition: p,
                    key_id: KeyId(key_id),
                };
                let c = self.propose(&r, &op).await?;
                let out = Self::key_written(&c, KeyId(key_id), None)?;
                if let Response::KeyWritten(w) = &out {
                    let mut card = self.card.borrow_mut();
                    for v in 1..=w.version.min(MAX_DESCRIBE_VERSIONS as u32) {
                        card.forget_key(&keyfort_hsm::KeyRef {
                            partition: p,
                            key_id: KeyId(key_id),
                            version: v,
                        });
                    }
                }
                Ok(out)
            }
            Request::KeyRestore {
                idempotency_id,
                backup,
            } => {
                let b = MaskedBlob::decode(&backup).map_err(card_err)?;
                if b.header.partition != p {
                    return Err(err(
                        ErrorCode::Forbidden,
                        "the backup belongs to another partition",
                    ));
                }
                if b.under != WrappedUnder::BackupKbk {
                    return Err(err(ErrorCode::BadRequest, "not a single-key backup"));
                }
                if b.header.version != 1 {
                    return Err(err(
                        ErrorCode::InvalidVersion,
                        "only a key's first version has a backup (made at its creation)",
                    ));
                }
                let r = self.read(&p).await?;
                self.ensure_partition(&r, &p)?;
                // Checks the backup's MAC and that it unwraps, in the card.
                self.card
                    .borrow_mut()
                    .key_handle(&backup)
                    .map_err(card_err)?;
                let key_id = b.header.key_id;
                let op = Op::KeyPut(KeyPut {
                    op: PutOp::Create,
                    idempotency_id: IdempotencyId(idempotency_id),
                    header: b.header,
                    version_replaced: 0,
                    state: KeyState::Enabled,
                    metadata: Vec::new(),
                    blob: backup,
                });
                let c = self.propose(&r, &op).await?;
                Self::key_written(&c, key_id, None)
            }
            Request::KeyDescribe { key_id } => {
                let r = self.read(&p).await?;
                let vs = r
                    .with_core(|c| c.state_machine().versions(p, KeyId(key_id)))
                    .map_err(state_err)?;
                if vs.is_empty() {
                    return Err(err(
                        ErrorCode::NotFound,
                        format!("no key {}", KeyId(key_id)),
                    ));
                }
                // The newest versions that fit one answer: at most MAX_DESCRIBE_VERSIONS, and
                // within the frame limit (each costs 15 bytes and its metadata).
                let mut keep = 0;
                let mut bytes = DESCRIBE_FIXED_BYTES;
                for e in vs.iter().rev().take(MAX_DESCRIBE_VERSIONS as usize) {
                    bytes += DESCRIBE_VERSION_BYTES + e.metadata.len();
                    if bytes > CLIENT_MAX_FRAME_PAYLOAD {
                        break;
                    }
                    keep += 1;
                }
                let truncated = keep < vs.len();
                let versions = vs[vs.len() - keep..]
                    .iter()
                    .map(|e| VersionInfo {
                        version: e.header.version,
                        state: e.state.into(),
                        created_lsn: e.lsn_created,
                        metadata: e.metadata.clone(),
                    })
                    .collect();
                Ok(Response::Described {
                    key_id,
                    versions,
                    truncated,
                })
            }
            Request::KeyList { after, limit } => {
                let r = self.read(&p).await?;
                let (keys, more) = r
                    .with_core(|c| {
                        c.state_machine()
                            .list_keys(p, after.map(KeyId), limit as usize)
                    })
                    .map_err(state_err)?;
                Ok(Response::Listed {
                    keys: keys.into_iter().map(|(k, v)| (k.0, v)).collect(),
                    more,
                })
            }
            Request::Encrypt {
                key_id,
                aad,
                plaintext,
            } => {
                let r = self.read(&p).await?;
                let e = Self::current(&r, p, KeyId(key_id))?;
                self.ensure_partition(&r, &p)?;
                let envelope = self
                    .card
                    .borrow_mut()
                    .encrypt(&e.blob, &plaintext, &aad)
                    .map_err(card_err)?;
                Ok(Response::Encrypted {
                    version: e.header.version,
                    envelope,
                })
            }
            Request::GenerateDataKey { key_id, len, aad } => {
                let r = self.read(&p).await?;
                let e = Self::current(&r, p, KeyId(key_id))?;
                self.ensure_partition(&r, &p)?;
                let (plaintext, envelope) = self
                    .card
                    .borrow_mut()
                    .generate_data_key(&e.blob, len as usize, &aad)
                    .map_err(card_err)?;
                Ok(Response::DataKey {
                    version: e.header.version,
                    plaintext,
                    envelope,
                })
            }
            Request::Decrypt {
                key_id,
                aad,
                envelope,
            } => {
                let env = Envelope::decode(&envelope)
                    .map_err(|e| err(ErrorCode::BadEnvelope, e.to_string()))?;
                if env.key.partition != p || env.key.key_id != KeyId(key_id) {
                    return Err(err(
                        ErrorCode::BadEnvelope,
                        "the envelope was made by another key",
                    ));
                }
                let r = self.read(&p).await?;
                let e = r
                    .with_core(|c| c.state_machine().get(p, KeyId(key_id), env.key.version))
                    .map_err(state_err)?
                    .ok_or_else(|| {
                        err(
                            ErrorCode::NotFound,
                            format!("no key {} version {}", KeyId(key_id), env.key.version),
                        )
                    })?;
                if e.state == KeyState::Disabled {
                    return Err(err(ErrorCode::Disabled, "the key version is disabled"));
                }
                self.ensure_partition(&r, &p)?;
                let plaintext = self
                    .card
                    .borrow_mut()
                    .decrypt(&e.blob, &envelope, &aad)
                    .map_err(|e| match e {
                        CardError::BadMac { .. } => err(
                            ErrorCode::BadEnvelope,
                            "the envelope does not open (tampered, or another AAD)",
                        ),
                        e => card_err(e),
                    })?;
                Ok(Response::Decrypted { plaintext })
            }
            _ => Err(err(
                ErrorCode::Forbidden,
                "this operation needs an admin credential",
            )),
        }
    }

    fn status(&self) -> Response {
        let shards = self
            .replicas
            .borrow()
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let (archived_lsn, rpo_ms) = self.archives.borrow().get(i).map_or((0, 0), |a| {
                    let a = a.borrow();
                    let rpo = a.pending_since.map_or(0, |t| t.elapsed().as_millis());
                    (a.archived_lsn, rpo.min(u128::from(u32::MAX)) as u32)
                });
                r.with_core(|c| ShardStatus {
                    shard: c.shard(),
                    role: match c.role() {
                        raft::StateRole::Follower => 1,
                        raft::StateRole::Candidate => 2,
                        raft::StateRole::Leader => 3,
                        raft::StateRole::PreCandidate => 4,
                    },
                    term: c.term(),
                    leader: c.leader_id().unwrap_or(0),
                    commit: c.commit_index(),
                    applied: c.applied(),
                    snapshot_lsn: c.state_machine().base().map_or(0, |b| b.lsn()),
                    digest: c.state_machine().digest().to_bytes(),
                    keys: c.state_machine().key_count(),
                    archived_lsn,
                    rpo_ms,
                })
            })
            .collect();
        Response::Status {
            node_id: self.node_id,
            recovery: self
                .recovery
                .borrow()
                .as_ref()
                .map(|r| r.borrow().to_wire())
                .unwrap_or_default(),
            shards,
        }
    }
}

impl ClientService for Service {
    fn identity(&self) -> ([u8; 16], u64) {
        (self.cluster_id, self.node_id)
    }

    fn verify_proof<'a>(
        &'a self,
        scope: Scope,
        client_id: [u8; 16],
        challenge: [u8; CHALLENGE_LEN],
        context: Vec<u8>,
        response: [u8; 32],
    ) -> Pin<Box<dyn Future<Output = Result<bool, ErrorReply>> + 'a>> {
        Box::pin(async move {
            match scope {
                Scope::Admin => {
                    let secret = admin_secret(&self.mac, &client_id).map_err(card_err)?;
                    let want = keyfort_hsm::client_answer(&secret, &challenge, &context);
                    Ok(ct_eq(&want, &response))
                }
                Scope::Partition(p) => {
                    let p = PartitionId(p);
                    let r = self.replica_of(&p)?;
                    Self::await_partition(&r, &p).await?;
                    if self.ensure_partition(&r, &p).is_err() {
                        return Ok(false);
                    }
                    match self
                        .card
                        .borrow()
                        .verify_client_response(&p, &client_id, &challenge, &context, &response)
                    {
                        Ok(()) => Ok(true),
                        Err(CardError::BadMac { .. }) => Ok(false),
                        Err(e) => Err(card_err(e)),
                    }
                }
            }
        })
    }

    fn handle(
        self: Rc<Self>,
        scope: Scope,
        req: Request,
    ) -> Pin<Box<dyn Future<Output = Result<Response, ErrorReply>>>> {
        Box::pin(self.run(scope, req))
    }

    /// A partition whose policy requires a client certificate (its config's trailer, checked
    /// in the card at import) admits a connection only with a certificate naming
    /// `p-<partition>.<cluster>.keyfort`: rustls verified its chain against the cluster CA (and
    /// its CRL) in the handshake, the name is checked here. No certificate, another name, or
    /// plaintext (insecure loopback) is `ClientCertRequired`. Admin connections and partitions
    /// without the flag: any.
    fn check_client_cert(
        &self,
        scope: &Scope,
        cert: Option<&CertificateDer<'static>>,
    ) -> Result<(), ErrorReply> {
        let Scope::Partition(p) = scope else {
            return Ok(());
        };
        let pid = PartitionId(*p);
        // verify_proof loaded the partition just before; loaded again here should the state
        // have changed since (fails closed: no policy known, no connection).
        let r = self.replica_of(&pid)?;
        self.ensure_partition(&r, &pid)?;
        let policy = self.card.borrow().partition_policy(&pid).ok_or_else(|| {
            err(
                ErrorCode::Internal,
                format!("partition {pid} is not loaded on this node"),
            )
        })?;
        if !policy.require_client_cert {
            return Ok(());
        }
        let name = keyfort_net::tls::partition_name(&self.cluster_id, p);
        if cert.is_some_and(|c| keyfort_net::tls::cert_names(c, &name)) {
            return Ok(());
        }
        Err(err(
            ErrorCode::ClientCertRequired,
            format!(
                "partition {pid} requires a client certificate naming {name} (keyfort tls \
                 issue-client)"
            ),
        ))
    }

    fn shutting_down(&self) -> bool {
        self.stopping.get()
    }
}
