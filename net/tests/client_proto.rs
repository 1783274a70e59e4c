//! The client protocol codec (docs/format.md §8): requests, responses and error replies of every
//! variant round trip; every strict prefix of an encoding and every appended byte is refused with
//! a typed error; arbitrary bytes under any opcode never panic and decode only canonical
//! encodings; every limit is enforced with the named error; unknown opcodes are `UnknownOpcode`;
//! the numbers of the opcodes, error codes and limits are pinned (renumbering fails here).

use keyfort_net::client_proto::*;
use proptest::collection::vec;
use proptest::prelude::*;

// ---- generators ----

/// Field sizes: `Big` reaches every limit (round trips), `Small` keeps encodings short enough to
/// decode every strict prefix of each case.
#[derive(Clone, Copy)]
enum Size {
    Big,
    Small,
}

impl Size {
    /// A length in `0..=max`, mostly short, sometimes anywhere up to `max`, sometimes `max`.
    fn len(self, max: usize) -> BoxedStrategy<usize> {
        match self {
            Size::Big => prop_oneof![
                4 => 0..=max.min(64),
                1 => 0..=max,
                1 => Just(max),
            ]
            .boxed(),
            Size::Small => (0..=max.min(48)).boxed(),
        }
    }

    fn bytes(self, max: usize) -> BoxedStrategy<Vec<u8>> {
        self.len(max).prop_flat_map(|n| vec(any::<u8>(), n)).boxed()
    }

    fn count(self, max: usize) -> BoxedStrategy<usize> {
        match self {
            Size::Big => self.len(max),
            Size::Small => (0..=max.min(6)).boxed(),
        }
    }
}

fn arb_id() -> impl Strategy<Value = [u8; 16]> {
    any::<[u8; 16]>()
}

fn arb_scope() -> impl Strategy<Value = Scope> {
    prop_oneof![arb_id().prop_map(Scope::Partition), Just(Scope::Admin)]
}

fn arb_state() -> impl Strategy<Value = KeyStateCode> {
    prop_oneof![Just(KeyStateCode::Enabled), Just(KeyStateCode::Disabled)]
}

fn arb_request(s: Size) -> impl Strategy<Value = Request> {
    prop_oneof![
        (any::<u8>(), arb_scope(), arb_id()).prop_map(|(version, scope, client_id)| {
            Request::Hello {
                version,
                scope,
                client_id,
            }
        }),
        any::<[u8; RESPONSE_LEN]>().prop_map(|response| Request::Proof { response }),
        Just(Request::Route),
        (arb_id(), 0..=partition_flags::KNOWN)
            .prop_map(|(partition, flags)| Request::PartitionCreate { partition, flags }),
        arb_id().prop_map(|partition| Request::PartitionDelete { partition }),
        arb_id().prop_map(|partition| Request::CredentialIssue { partition }),
        Just(Request::ClusterStatus),
        (
            arb_id(),
            0..=create_flags::KNOWN,
            s.bytes(MAX_METADATA_BYTES)
        )
            .prop_map(|(idempotency_id, flags, metadata)| Request::KeyCreate {
                idempotency_id,
                flags,
                metadata,
            }),
        (arb_id(), arb_id(), any::<u32>()).prop_map(|(idempotency_id, key_id, replaces)| {
            Request::KeyRotate {
                idempotency_id,
                key_id,
                replaces,
            }
        }),
        (
            arb_id(),
            arb_id(),
            any::<u32>(),
            arb_state(),
            s.bytes(MAX_METADATA_BYTES)
        )
            .prop_map(|(idempotency_id, key_id, version, state, metadata)| {
                Request::KeyUpdate {
                    idempotency_id,
                    key_id,
                    version,
                    state,
                    metadata,
                }
            }),
        (arb_id(), arb_id()).prop_map(|(idempotency_id, key_id)| Request::KeyDelete {
            idempotency_id,
            key_id,
        }),
        arb_id().prop_map(|key_id| Request::KeyDescribe { key_id }),
        (proptest::option::of(arb_id()), 1..=MAX_LIST_KEYS)
            .prop_map(|(after, limit)| Request::KeyList { after, limit }),
        (arb_id(), s.bytes(MAX_BACKUP_BYTES)).prop_map(|(idempotency_id, backup)| {
            Request::KeyRestore {
                idempotency_id,
                backup,
            }
        }),
        (
            arb_id(),
            s.bytes(MAX_AAD_BYTES),
            s.bytes(MAX_PLAINTEXT_BYTES)
        )
            .prop_map(|(key_id, aad, plaintext)| Request::Encrypt {
                key_id,
                aad,
                plaintext,
            }),
        (
            arb_id(),
            s.bytes(MAX_AAD_BYTES),
            s.bytes(MAX_ENVELOPE_BYTES)
        )
            .prop_map(|(key_id, aad, envelope)| Request::Decrypt {
                key_id,
                aad,
                envelope,
            }),
        (arb_id(), DATA_KEY_LEN_RANGE, s.bytes(MAX_AAD_BYTES))
            .prop_map(|(key_id, len, aad)| { Request::GenerateDataKey { key_id, len, aad } }),
    ]
}

fn arb_shard() -> impl Strategy<Value = ShardStatus> {
    (
        any::<u32>(),
        any::<u8>(),
        any::<[u64; 5]>(),
        arb_id(),
        any::<(u64, u64, u32)>(),
    )
        .prop_map(
            |(shard, role, v, digest, (keys, archived_lsn, rpo_ms))| ShardStatus {
                shard,
                role,
                term: v[0],
                leader: v[1],
                commit: v[2],
                applied: v[3],
                snapshot_lsn: v[4],
                digest,
                keys,
                archived_lsn,
                rpo_ms,
            },
        )
}

fn arb_version(s: Size) -> impl Strategy<Value = VersionInfo> {
    (
        any::<u32>(),
        arb_state(),
        any::<u64>(),
        s.bytes(MAX_METADATA_BYTES),
    )
        .prop_map(|(version, state, created_lsn, metadata)| VersionInfo {
            version,
            state,
            created_lsn,
            metadata,
        })
}

/// The opcodes whose answers are key writes.
const WRITE_OPS: [u16; 5] = [
    op::KEY_CREATE,
    op::KEY_ROTATE,
    op::KEY_UPDATE,
    op::KEY_DELETE,
    op::KEY_RESTORE,
];

/// A response with the opcode of the request it answers.
fn arb_response(s: Size) -> impl Strategy<Value = (u16, Response)> {
    prop_oneof![
        (any::<[u8; CHALLENGE_LEN]>(), arb_id(), any::<u64>()).prop_map(
            |(challenge, cluster_id, node_id)| (
                op::HELLO,
                Response::Challenge {
                    challenge,
                    cluster_id,
                    node_id,
                }
            )
        ),
        Just((op::PROOF, Response::Accepted)),
        (
            any::<u64>(),
            s.count(4096).prop_flat_map(|n| vec(any::<u64>(), n))
        )
            .prop_map(|(node_id, leaders)| (op::ROUTE, Response::Route { node_id, leaders })),
        (any::<u64>(), arb_id(), any::<[u8; CREDENTIAL_LEN]>()).prop_map(
            |(lsn, client_id, credential)| (
                op::PARTITION_CREATE,
                Response::PartitionCreated {
                    lsn,
                    client_id,
                    credential,
                }
            )
        ),
        any::<u64>().prop_map(|lsn| (op::PARTITION_DELETE, Response::PartitionDeleted { lsn })),
        (arb_id(), any::<[u8; CREDENTIAL_LEN]>()).prop_map(|(client_id, credential)| (
            op::CREDENTIAL_ISSUE,
            Response::Credential {
                client_id,
                credential,
            }
        )),
        (
            any::<u64>(),
            (any::<u8>(), any::<[u32; 5]>()),
            s.count(64).prop_flat_map(|n| vec(arb_shard(), n))
        )
            .prop_map(|(node_id, (tier, p), shards)| (
                op::CLUSTER_STATUS,
                Response::Status {
                    node_id,
                    recovery: RecoveryStatus {
                        tier,
                        fetch_ms: p[0],
                        verify_ms: p[1],
                        open_ms: p[2],
                        replay_ms: p[3],
                        catch_up_ms: p[4],
                    },
                    shards
                }
            )),
        (
            proptest::sample::select(WRITE_OPS.to_vec()),
            arb_id(),
            any::<u32>(),
            any::<u64>(),
            any::<bool>(),
            s.bytes(MAX_BACKUP_BYTES)
        )
            .prop_map(|(opcode, key_id, version, lsn, duplicate, backup)| (
                opcode,
                Response::KeyWritten(KeyWritten {
                    key_id,
                    version,
                    lsn,
                    duplicate,
                    backup,
                })
            )),
        (
            arb_id(),
            s.count(MAX_DESCRIBE_VERSIONS as usize)
                .prop_flat_map(move |n| vec(arb_version(s), n)),
            any::<bool>()
        )
            .prop_map(|(key_id, versions, truncated)| (
                op::KEY_DESCRIBE,
                Response::Described {
                    key_id,
                    versions,
                    truncated,
                }
            )),
        (
            s.count(MAX_LIST_KEYS as usize)
                .prop_flat_map(|n| vec((arb_id(), any::<u32>()), n)),
            any::<bool>()
        )
            .prop_map(|(keys, more)| (op::KEY_LIST, Response::Listed { keys, more })),
        (any::<u32>(), s.bytes(MAX_ENVELOPE_BYTES)).prop_map(|(version, envelope)| (
            op::ENCRYPT,
            Response::Encrypted { version, envelope }
        )),
        s.bytes(MAX_PLAINTEXT_BYTES)
            .prop_map(|plaintext| (op::DECRYPT, Response::Decrypted { plaintext })),
        (
            any::<u32>(),
            s.bytes(*DATA_KEY_LEN_RANGE.end() as usize),
            s.bytes(MAX_ENVELOPE_BYTES)
        )
            .prop_map(|(version, plaintext, envelope)| (
                op::GENERATE_DATA_KEY,
                Response::DataKey {
                    version,
                    plaintext,
                    envelope,
                }
            )),
    ]
}

fn arb_code() -> impl Strategy<Value = ErrorCode> {
    proptest::sample::select(ErrorCode::ALL.to_vec())
}

/// Messages up to ~2,400 bytes of any characters: `ErrorReply::new` cuts them at a character
/// boundary within the limit.
fn arb_error_reply() -> impl Strategy<Value = ErrorReply> {
    (arb_code(), any::<u64>(), any::<u32>(), "\\PC{0,600}").prop_map(
        |(code, leader, version, message)| {
            let mut e = ErrorReply::new(code, message);
            e.leader = leader;
            e.version = version;
            e
        },
    )
}

/// Opcodes: mostly client opcodes, sometimes any value.
fn arb_opcode() -> impl Strategy<Value = u16> {
    prop_oneof![
        3 => proptest::sample::select(op::ALL.to_vec()),
        1 => any::<u16>(),
    ]
}

// ---- checks shared by the properties ----

/// A strict prefix of a request or response encoding is `Truncated`, or for the counted lists
/// of route and status (whose counts are checked against the bytes left) `Malformed`.
fn assert_prefix_refused(opcode: u16, prefix_len: usize, e: &ProtoError) {
    let counted = matches!(opcode, op::ROUTE | op::CLUSTER_STATUS);
    let ok = match e {
        ProtoError::Truncated { .. } => true,
        ProtoError::Malformed { detail, .. } => {
            counted && *detail == "shard count exceeds the payload"
        }
        _ => false,
    };
    assert!(
        ok,
        "prefix of {prefix_len} bytes under {opcode:#06x}: unexpected {e:?}"
    );
}

fn assert_trailing(e: Result<impl std::fmt::Debug, ProtoError>) {
    match e {
        Err(ProtoError::TrailingBytes { extra: 1, .. }) => {}
        other => panic!("expected TrailingBytes {{ extra: 1 }}, got {other:?}"),
    }
}

/// Arbitrary bytes decode to a message or an error; a message re-encodes to the same bytes.
fn check_arbitrary(opcode: u16, payload: &[u8]) {
    let known = op::ALL.contains(&opcode);
    match Request::decode(opcode, payload) {
        Ok(q) => {
            assert!(known);
            assert_eq!(q.opcode(), opcode);
            assert_eq!(q.encode(), payload);
        }
        Err(e) => assert_eq!(known, e != ProtoError::UnknownOpcode(opcode)),
    }
    match Response::decode(opcode, payload) {
        Ok(r) => {
            assert!(known);
            assert_eq!(r.encode(), payload);
        }
        Err(e) => assert_eq!(known, e != ProtoError::UnknownOpcode(opcode)),
    }
    if let Ok(e) = ErrorReply::decode(payload) {
        assert_eq!(e.encode(), payload);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn request_round_trip(q in arb_request(Size::Big)) {
        let b = q.encode();
        prop_assert_eq!(Request::decode(q.opcode(), &b), Ok(q.clone()));
        // One encoding per message: the decoded message encodes to the same bytes.
        prop_assert_eq!(Request::decode(q.opcode(), &b).unwrap().encode(), b);
    }

    #[test]
    fn response_round_trip((opcode, r) in arb_response(Size::Big)) {
        let b = r.encode();
        prop_assert_eq!(Response::decode(opcode, &b), Ok(r.clone()));
        prop_assert_eq!(Response::decode(opcode, &b).unwrap().encode(), b);
    }

    #[test]
    fn error_reply_round_trip(e in arb_error_reply()) {
        prop_assert!(e.message.len() <= MAX_ERROR_MESSAGE_BYTES);
        let b = e.encode();
        prop_assert_eq!(b.len(), 16 + e.message.len());
        prop_assert_eq!(ErrorReply::decode(&b), Ok(e.clone()));
    }

    #[test]
    fn request_prefixes_and_trailing_bytes_refused(q in arb_request(Size::Small), extra: u8) {
        // A partition create's flags byte is optional (absent = no flags): its 16-byte prefix
        // is the same create without flags, and one byte after a create without flags is a
        // flags byte (`partition_create_flags_byte` covers both).
        let create_flags = match q {
            Request::PartitionCreate { flags, .. } => Some(flags),
            _ => None,
        };
        let b = q.encode();
        for n in 0..b.len() {
            if create_flags.is_some() && n == 16 {
                continue;
            }
            match Request::decode(q.opcode(), &b[..n]) {
                Ok(m) => panic!("prefix of {n} bytes decoded as {m:?}"),
                Err(e) => assert_prefix_refused(q.opcode(), n, &e),
            }
        }
        if create_flags != Some(0) {
            let mut long = b.clone();
            long.push(extra);
            assert_trailing(Request::decode(q.opcode(), &long));
        }
    }

    #[test]
    fn response_prefixes_and_trailing_bytes_refused(
        (opcode, r) in arb_response(Size::Small),
        extra: u8,
    ) {
        let b = r.encode();
        for n in 0..b.len() {
            match Response::decode(opcode, &b[..n]) {
                Ok(m) => panic!("prefix of {n} bytes decoded as {m:?}"),
                Err(e) => assert_prefix_refused(opcode, n, &e),
            }
        }
        let mut long = b.clone();
        long.push(extra);
        assert_trailing(Response::decode(opcode, &long));
    }

    #[test]
    fn error_reply_prefixes_and_trailing_bytes_refused(e in arb_error_reply(), extra: u8) {
        let b = e.encode();
        for n in 0..b.len() {
            match ErrorReply::decode(&b[..n]) {
                Err(ProtoError::Truncated { .. }) => {}
                other => panic!("prefix of {n} bytes: {other:?}"),
            }
        }
        let mut long = b.clone();
        long.push(extra);
        assert_trailing(ErrorReply::decode(&long));
    }

    #[test]
    fn arbitrary_bytes_never_panic(opcode in arb_opcode(), payload in vec(any::<u8>(), 0..600)) {
        check_arbitrary(opcode, &payload);
    }

    /// Arbitrary bytes after a valid encoding's first bytes reach the later fields' checks.
    #[test]
    fn mutated_encodings_never_panic(
        q in arb_request(Size::Small),
        (opcode, r) in arb_response(Size::Small),
        at: prop::sample::Index,
        flip: u8,
        cut: prop::sample::Index,
    ) {
        for (opcode, mut b) in [(q.opcode(), q.encode()), (opcode, r.encode())] {
            if !b.is_empty() {
                let i = at.index(b.len());
                b[i] ^= flip;
                let n = cut.index(b.len() + 1);
                check_arbitrary(opcode, &b[..n]);
                check_arbitrary(opcode, &b);
            }
        }
    }

    #[test]
    fn unknown_opcodes_refused(opcode: u16, payload in vec(any::<u8>(), 0..64)) {
        prop_assume!(!op::ALL.contains(&opcode));
        prop_assert_eq!(
            Request::decode(opcode, &payload),
            Err(ProtoError::UnknownOpcode(opcode))
        );
        prop_assert_eq!(
            Response::decode(opcode, &payload),
            Err(ProtoError::UnknownOpcode(opcode))
        );
    }

    /// `partition(16) [‖ flags u8]`: 16 bytes is a create without flags; a 17th byte is a
    /// non-zero flags byte of known bits (0 is refused: one encoding per request; unknown bits
    /// are refused); an 18th is trailing.
    #[test]
    fn partition_create_flags_byte(partition in arb_id(), flags: u8, extra: u8) {
        let plain = Request::PartitionCreate { partition, flags: 0 };
        prop_assert_eq!(plain.encode(), partition.to_vec());
        prop_assert_eq!(req(&plain), Ok(plain.clone()));
        let mut b = partition.to_vec();
        b.push(flags);
        let got = Request::decode(op::PARTITION_CREATE, &b);
        if flags == 0 {
            prop_assert_eq!(
                got,
                Err(ProtoError::Malformed {
                    what: "partition create",
                    detail: "a flags byte of 0 (leave it out)",
                })
            );
        } else if flags & !partition_flags::KNOWN != 0 {
            prop_assert_eq!(
                got,
                Err(ProtoError::Malformed {
                    what: "partition create",
                    detail: "unknown flag bits",
                })
            );
        } else {
            let q = Request::PartitionCreate { partition, flags };
            prop_assert_eq!(&got, &Ok(q.clone()));
            prop_assert_eq!(q.encode(), b.clone());
            b.push(extra);
            assert_trailing(Request::decode(op::PARTITION_CREATE, &b));
        }
    }

    #[test]
    fn unknown_create_flags_refused(flags: u8) {
        let b = Request::KeyCreate {
            idempotency_id: [1; 16],
            flags,
            metadata: vec![],
        }
        .encode();
        let got = Request::decode(op::KEY_CREATE, &b);
        if flags & !create_flags::KNOWN == 0 {
            prop_assert!(got.is_ok());
        } else {
            prop_assert_eq!(
                got,
                Err(ProtoError::Malformed {
                    what: "key create",
                    detail: "unknown flag bits",
                })
            );
        }
    }
}

// ---- limits ----

fn too_long(what: &'static str, len: usize, max: usize) -> ProtoError {
    ProtoError::TooLong { what, len, max }
}

fn req(q: &Request) -> Result<Request, ProtoError> {
    Request::decode(q.opcode(), &q.encode())
}

fn resp(opcode: u16, r: &Response) -> Result<Response, ProtoError> {
    Response::decode(opcode, &r.encode())
}

#[test]
fn metadata_limit() {
    for n in [
        MAX_METADATA_BYTES,
        MAX_METADATA_BYTES + 1,
        u16::MAX as usize,
    ] {
        let create = Request::KeyCreate {
            idempotency_id: [1; 16],
            flags: create_flags::KNOWN,
            metadata: vec![7; n],
        };
        let update = Request::KeyUpdate {
            idempotency_id: [1; 16],
            key_id: [2; 16],
            version: 3,
            state: KeyStateCode::Disabled,
            metadata: vec![7; n],
        };
        let described = Response::Described {
            key_id: [2; 16],
            versions: vec![VersionInfo {
                version: 1,
                state: KeyStateCode::Enabled,
                created_lsn: 9,
                metadata: vec![7; n],
            }],
            truncated: false,
        };
        if n <= MAX_METADATA_BYTES {
            assert_eq!(req(&create), Ok(create));
            assert_eq!(req(&update), Ok(update));
            assert_eq!(resp(op::KEY_DESCRIBE, &described), Ok(described));
        } else {
            let e = too_long("metadata", n, MAX_METADATA_BYTES);
            assert_eq!(req(&create), Err(e.clone()));
            assert_eq!(req(&update), Err(e.clone()));
            assert_eq!(resp(op::KEY_DESCRIBE, &described), Err(e));
        }
    }
}

#[test]
fn plaintext_aad_envelope_and_backup_limits() {
    let encrypt = |aad: usize, plaintext: usize| Request::Encrypt {
        key_id: [1; 16],
        aad: vec![1; aad],
        plaintext: vec![2; plaintext],
    };
    let decrypt = |aad: usize, envelope: usize| Request::Decrypt {
        key_id: [1; 16],
        aad: vec![1; aad],
        envelope: vec![2; envelope],
    };
    let gdk = |aad: usize| Request::GenerateDataKey {
        key_id: [1; 16],
        len: 32,
        aad: vec![1; aad],
    };
    let restore = |n: usize| Request::KeyRestore {
        idempotency_id: [1; 16],
        backup: vec![3; n],
    };
    for q in [
        encrypt(MAX_AAD_BYTES, MAX_PLAINTEXT_BYTES),
        decrypt(MAX_AAD_BYTES, MAX_ENVELOPE_BYTES),
        gdk(MAX_AAD_BYTES),
        restore(MAX_BACKUP_BYTES),
    ] {
        assert_eq!(req(&q), Ok(q.clone()));
        // The largest requests fit in a client frame.
        assert!(q.encode().len() <= CLIENT_MAX_FRAME_PAYLOAD);
    }
    let p = MAX_PLAINTEXT_BYTES;
    let v = MAX_ENVELOPE_BYTES;
    let a = MAX_AAD_BYTES;
    assert_eq!(
        req(&encrypt(0, p + 1)),
        Err(too_long("plaintext", p + 1, p))
    );
    assert_eq!(req(&encrypt(a + 1, 0)), Err(too_long("aad", a + 1, a)));
    assert_eq!(req(&decrypt(0, v + 1)), Err(too_long("envelope", v + 1, v)));
    assert_eq!(req(&decrypt(a + 1, 0)), Err(too_long("aad", a + 1, a)));
    assert_eq!(req(&gdk(a + 1)), Err(too_long("aad", a + 1, a)));
    let b = MAX_BACKUP_BYTES;
    assert_eq!(req(&restore(b + 1)), Err(too_long("backup", b + 1, b)));

    // A u32 length is checked before any byte of the field is read.
    let mut huge = Vec::new();
    huge.extend_from_slice(&[1; 16]);
    huge.extend_from_slice(&0u16.to_le_bytes());
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        Request::decode(op::ENCRYPT, &huge),
        Err(too_long("plaintext", u32::MAX as usize, p))
    );
    assert_eq!(
        Request::decode(op::DECRYPT, &huge),
        Err(too_long("envelope", u32::MAX as usize, v))
    );
    assert_eq!(
        Response::decode(op::DECRYPT, &u32::MAX.to_le_bytes()),
        Err(too_long("plaintext", u32::MAX as usize, p))
    );

    // Responses.
    let written = |n: usize| {
        Response::KeyWritten(KeyWritten {
            key_id: [1; 16],
            version: 1,
            lsn: 2,
            duplicate: false,
            backup: vec![4; n],
        })
    };
    for opcode in WRITE_OPS {
        assert!(resp(opcode, &written(b)).is_ok());
        assert_eq!(
            resp(opcode, &written(b + 1)),
            Err(too_long("backup", b + 1, b))
        );
    }
    let encrypted = Response::Encrypted {
        version: 1,
        envelope: vec![0; v + 1],
    };
    assert_eq!(
        resp(op::ENCRYPT, &encrypted),
        Err(too_long("envelope", v + 1, v))
    );
    let decrypted = Response::Decrypted {
        plaintext: vec![0; p + 1],
    };
    assert_eq!(
        resp(op::DECRYPT, &decrypted),
        Err(too_long("plaintext", p + 1, p))
    );
    let dk = |n: usize, e: usize| Response::DataKey {
        version: 1,
        plaintext: vec![5; n],
        envelope: vec![6; e],
    };
    let dmax = *DATA_KEY_LEN_RANGE.end() as usize;
    assert!(resp(op::GENERATE_DATA_KEY, &dk(dmax, v)).is_ok());
    assert_eq!(
        resp(op::GENERATE_DATA_KEY, &dk(dmax + 1, 0)),
        Err(too_long("data key", dmax + 1, dmax))
    );
    assert_eq!(
        resp(op::GENERATE_DATA_KEY, &dk(16, v + 1)),
        Err(too_long("envelope", v + 1, v))
    );
}

#[test]
fn list_limit() {
    let list = |limit| Request::KeyList {
        after: Some([9; 16]),
        limit,
    };
    for limit in [1, 2, MAX_LIST_KEYS - 1, MAX_LIST_KEYS] {
        assert_eq!(req(&list(limit)), Ok(list(limit)));
    }
    for limit in [0, MAX_LIST_KEYS + 1, u16::MAX] {
        assert_eq!(
            req(&list(limit)),
            Err(ProtoError::Malformed {
                what: "key list",
                detail: "limit not in 1..=MAX_LIST_KEYS",
            })
        );
    }
    // No 'after': its 16 bytes are zero; any other byte there is refused (one encoding).
    let none = Request::KeyList {
        after: None,
        limit: 5,
    };
    let mut b = none.encode();
    assert_eq!(b[..17], [0; 17]);
    assert_eq!(Request::decode(op::KEY_LIST, &b), Ok(none));
    b[16] = 1;
    assert_eq!(
        Request::decode(op::KEY_LIST, &b),
        Err(ProtoError::Malformed {
            what: "key list",
            detail: "an 'after' id without its flag",
        })
    );
    b[0] = 2;
    assert_eq!(
        Request::decode(op::KEY_LIST, &b),
        Err(ProtoError::Malformed {
            what: "key list",
            detail: "flag not 0 or 1",
        })
    );

    // Answers: at most MAX_LIST_KEYS keys, MAX_DESCRIBE_VERSIONS versions.
    let listed = |n: usize| Response::Listed {
        keys: (0..n).map(|i| ([i as u8; 16], i as u32)).collect(),
        more: true,
    };
    let m = MAX_LIST_KEYS as usize;
    assert!(resp(op::KEY_LIST, &listed(m)).is_ok());
    assert!(listed(m).encode().len() <= CLIENT_MAX_FRAME_PAYLOAD);
    assert_eq!(
        resp(op::KEY_LIST, &listed(m + 1)),
        Err(too_long("keys", m + 1, m))
    );
    // The count is checked before anything is read or allocated for it.
    assert_eq!(
        Response::decode(op::KEY_LIST, &[0, 0xFF, 0xFF]),
        Err(too_long("keys", 0xFFFF, m))
    );
    let described = |n: usize| Response::Described {
        key_id: [1; 16],
        versions: (0..n)
            .map(|i| VersionInfo {
                version: i as u32 + 1,
                state: KeyStateCode::Enabled,
                created_lsn: i as u64,
                metadata: vec![],
            })
            .collect(),
        truncated: true,
    };
    let d = MAX_DESCRIBE_VERSIONS as usize;
    assert!(resp(op::KEY_DESCRIBE, &described(d)).is_ok());
    assert_eq!(
        resp(op::KEY_DESCRIBE, &described(d + 1)),
        Err(too_long("versions", d + 1, d))
    );
}

#[test]
fn counted_lists_checked_against_the_payload() {
    // Route and status counts are bounded by the bytes that follow, before any allocation.
    let mut b = 7u64.to_le_bytes().to_vec();
    b.extend_from_slice(&u32::MAX.to_le_bytes());
    let refused = |what| ProtoError::Malformed {
        what,
        detail: "shard count exceeds the payload",
    };
    assert_eq!(Response::decode(op::ROUTE, &b), Err(refused("route")));
    // A status has its node's recovery report between the node id and the count.
    let mut st = 7u64.to_le_bytes().to_vec();
    st.extend_from_slice(&[0; RECOVERY_STATUS_BYTES]);
    st.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        Response::decode(op::CLUSTER_STATUS, &st),
        Err(refused("status"))
    );
    let route = Response::Route {
        node_id: 7,
        leaders: vec![0, 3, 2],
    };
    let mut b = route.encode();
    assert_eq!(b.len(), 12 + 3 * 8);
    b.truncate(b.len() - 1);
    assert_eq!(Response::decode(op::ROUTE, &b), Err(refused("route")));
}

#[test]
fn data_key_length_range() {
    for len in 0..=u8::MAX {
        let q = Request::GenerateDataKey {
            key_id: [1; 16],
            len,
            aad: vec![],
        };
        if DATA_KEY_LEN_RANGE.contains(&len) {
            assert_eq!(req(&q), Ok(q));
        } else {
            assert_eq!(
                req(&q),
                Err(ProtoError::Malformed {
                    what: "generate data key",
                    detail: "length not in 16..=64",
                }),
                "len {len}"
            );
        }
    }
    assert_eq!(DATA_KEY_LEN_RANGE, 16..=64);
}

#[test]
fn scope_and_state_codes() {
    let hello = Request::Hello {
        version: CLIENT_PROTOCOL_VERSION,
        scope: Scope::Partition([0xAB; 16]),
        client_id: [0xCD; 16],
    };
    let b = hello.encode();
    assert_eq!(b.len(), 34);
    assert_eq!(b[..2], [1, 1]);
    for scope in [0u8, 3, 4, 0xFF] {
        let mut bad = b.clone();
        bad[1] = scope;
        assert_eq!(
            Request::decode(op::HELLO, &bad),
            Err(ProtoError::Malformed {
                what: "hello",
                detail: "scope not 1 (partition) or 2 (admin)",
            })
        );
    }
    // Admin: scope 2 and a zero partition id; a partition id beside it is refused.
    let admin = Request::Hello {
        version: CLIENT_PROTOCOL_VERSION,
        scope: Scope::Admin,
        client_id: [0xCD; 16],
    };
    let a = admin.encode();
    assert_eq!(a[1], 2);
    assert_eq!(a[2..18], [0; 16]);
    assert_eq!(Request::decode(op::HELLO, &a), Ok(admin));
    let mut bad = b.clone();
    bad[1] = 2;
    assert_eq!(
        Request::decode(op::HELLO, &bad),
        Err(ProtoError::Malformed {
            what: "hello",
            detail: "admin scope with a partition id",
        })
    );
    // Any version decodes: the server answers UnsupportedVersion, not the codec.
    let mut v = b.clone();
    v[0] = 0xEE;
    assert!(Request::decode(op::HELLO, &v).is_ok());

    // Key states: 1 enabled, 2 disabled, nothing else.
    let update = Request::KeyUpdate {
        idempotency_id: [1; 16],
        key_id: [2; 16],
        version: 3,
        state: KeyStateCode::Enabled,
        metadata: vec![],
    };
    let mut u = update.encode();
    assert_eq!(u[36], 1);
    for s in [0u8, 3, 0xFF] {
        u[36] = s;
        assert_eq!(
            Request::decode(op::KEY_UPDATE, &u),
            Err(ProtoError::Malformed {
                what: "key state",
                detail: "not 1 (enabled) or 2 (disabled)",
            })
        );
    }
    // Response flags are 0 or 1.
    let w = Response::KeyWritten(KeyWritten {
        key_id: [1; 16],
        version: 1,
        lsn: 1,
        duplicate: true,
        backup: vec![],
    });
    let mut wb = w.encode();
    assert_eq!(wb[28], 1);
    wb[28] = 2;
    assert_eq!(
        Response::decode(op::KEY_CREATE, &wb),
        Err(ProtoError::Malformed {
            what: "key written",
            detail: "flag not 0 or 1",
        })
    );
}

#[test]
fn error_reply_limits() {
    let long = "é".repeat(MAX_ERROR_MESSAGE_BYTES); // 2 bytes a character
    let e = ErrorReply::new(ErrorCode::Internal, long);
    assert_eq!(e.message.len(), MAX_ERROR_MESSAGE_BYTES);
    let odd = format!("x{}", "é".repeat(MAX_ERROR_MESSAGE_BYTES));
    let e2 = ErrorReply::new(ErrorCode::Internal, odd);
    assert_eq!(e2.message.len(), MAX_ERROR_MESSAGE_BYTES - 1);
    assert_eq!(ErrorReply::decode(&e2.encode()), Ok(e2));

    // A message over the limit (built by hand) is refused.
    let over = ErrorReply {
        code: ErrorCode::Retry,
        leader: 3,
        version: 0,
        message: "x".repeat(MAX_ERROR_MESSAGE_BYTES + 1),
    };
    assert_eq!(
        ErrorReply::decode(&over.encode()),
        Err(too_long(
            "error message",
            MAX_ERROR_MESSAGE_BYTES + 1,
            MAX_ERROR_MESSAGE_BYTES
        ))
    );
    // Not UTF-8.
    let mut b = ErrorReply::new(ErrorCode::NotFound, "ab").encode();
    b[16] = 0xFF;
    assert_eq!(
        ErrorReply::decode(&b),
        Err(ProtoError::Malformed {
            what: "error message",
            detail: "not UTF-8",
        })
    );
    // Unknown codes.
    for code in [0u16, 23, 24, 0x100, u16::MAX] {
        let mut b = ErrorReply::new(ErrorCode::NotFound, "").encode();
        b[..2].copy_from_slice(&code.to_le_bytes());
        assert_eq!(
            ErrorReply::decode(&b),
            Err(ProtoError::Malformed {
                what: "error reply",
                detail: "unknown error code",
            })
        );
    }
}

#[test]
fn unknown_opcodes() {
    for opcode in [
        0u16,
        0x0004,
        0x000F,
        0x0014,
        0x0027,
        0x0033,
        0x00FF,
        0x0100,
        0x0101,
        u16::MAX,
    ] {
        assert_eq!(
            Request::decode(opcode, &[]),
            Err(ProtoError::UnknownOpcode(opcode))
        );
        assert_eq!(
            Response::decode(opcode, &[]),
            Err(ProtoError::UnknownOpcode(opcode))
        );
    }
}

// ---- pinned numbers ----

#[test]
fn error_code_from_u16() {
    for code in ErrorCode::ALL {
        assert_eq!(ErrorCode::from_u16(code as u16), Some(code));
    }
    assert_eq!(ErrorCode::from_u16(0), None);
    for v in 23..=u16::MAX {
        assert_eq!(ErrorCode::from_u16(v), None, "{v}");
    }
}

#[test]
fn error_codes_pinned() {
    use ErrorCode::*;
    // (code, number, retryable) — docs/format.md §8.4. Never renumbered.
    let table = [
        (BadRequest, 1, false),
        (Unauthenticated, 2, false),
        (Forbidden, 3, false),
        (WrongRealm, 4, false),
        (NotFound, 5, false),
        (NoSuchPartition, 6, false),
        (AlreadyExists, 7, false),
        (VersionConflict, 8, false),
        (InvalidVersion, 9, false),
        (IdempotencyConflict, 10, false),
        (Corrupt, 11, false),
        (Overloaded, 12, true),
        (Retry, 13, true),
        (TooLarge, 14, false),
        (UnknownOpcode, 15, false),
        (Internal, 16, false),
        (PartitionNotEmpty, 17, false),
        (Disabled, 18, false),
        (BadEnvelope, 19, false),
        (UnsupportedVersion, 20, false),
        (ShuttingDown, 21, true),
        (ClientCertRequired, 22, false),
    ];
    assert_eq!(table.len(), ErrorCode::ALL.len());
    for ((code, n, retryable), listed) in table.into_iter().zip(ErrorCode::ALL) {
        assert_eq!(code as u16, n, "{code:?}");
        assert_eq!(code, listed);
        assert_eq!(code.is_retryable(), retryable, "{code:?}");
    }
}

#[test]
fn opcodes_pinned() {
    let table = [
        (op::HELLO, 0x0001),
        (op::PROOF, 0x0002),
        (op::ROUTE, 0x0003),
        (op::PARTITION_CREATE, 0x0010),
        (op::PARTITION_DELETE, 0x0011),
        (op::CREDENTIAL_ISSUE, 0x0012),
        (op::CLUSTER_STATUS, 0x0013),
        (op::KEY_CREATE, 0x0020),
        (op::KEY_ROTATE, 0x0021),
        (op::KEY_UPDATE, 0x0022),
        (op::KEY_DELETE, 0x0023),
        (op::KEY_DESCRIBE, 0x0024),
        (op::KEY_LIST, 0x0025),
        (op::KEY_RESTORE, 0x0026),
        (op::ENCRYPT, 0x0030),
        (op::DECRYPT, 0x0031),
        (op::GENERATE_DATA_KEY, 0x0032),
    ];
    assert_eq!(table.len(), op::ALL.len());
    for ((opcode, n), listed) in table.into_iter().zip(op::ALL) {
        assert_eq!(opcode, n);
        assert_eq!(opcode, listed);
        // Client opcodes stay below the peer range (0x01xx).
        assert!((0x0001..=0x00FF).contains(&opcode));
    }
}

#[test]
fn constants_pinned() {
    assert_eq!(CLIENT_PROTOCOL_VERSION, 1);
    assert_eq!(CLIENT_MAX_FRAME_PAYLOAD, 81_920);
    assert_eq!(MAX_PLAINTEXT_BYTES, 65_536);
    assert_eq!(MAX_ENVELOPE_BYTES, 65_664);
    assert_eq!(MAX_AAD_BYTES, 4096);
    assert_eq!(MAX_METADATA_BYTES, 1024);
    assert_eq!(MAX_BACKUP_BYTES, 512);
    assert_eq!(MAX_LIST_KEYS, 1000);
    assert_eq!(MAX_DESCRIBE_VERSIONS, 256);
    assert_eq!(MAX_ERROR_MESSAGE_BYTES, 1024);
    assert_eq!((CHALLENGE_LEN, RESPONSE_LEN, CREDENTIAL_LEN), (32, 32, 32));
    assert_eq!(SHARD_STATUS_BYTES, 81);
    assert_eq!(RECOVERY_STATUS_BYTES, 21);
    assert_eq!(RECOVERY_PENDING, u32::MAX);
    assert_eq!(CLIENT_PROOF_DOMAIN, b"keyfort-client-proof-v1");
    assert_eq!(ADMIN_CREDENTIAL_DOMAIN, b"keyfort-admin-credential-v1");
    assert_eq!(create_flags::BACKUP, 1);
    assert_eq!(create_flags::DISABLED, 2);
    assert_eq!(create_flags::KNOWN, 3);
    assert_eq!(partition_flags::REQUIRE_CLIENT_CERT, 1);
    assert_eq!(partition_flags::KNOWN, 1);
    assert_eq!(KeyStateCode::Enabled as u8, 1);
    assert_eq!(KeyStateCode::Disabled as u8, 2);
}

/// The proof context layout of docs/format.md §8.2.
#[test]
fn proof_context_layout() {
    let cluster = [0xC1; 16];
    let client = [0xC7; 16];
    let p = proof_context(
        &cluster,
        0x0102_0304_0506_0708,
        &Scope::Partition([0xAA; 16]),
        &client,
    );
    assert_eq!(p.len(), 23 + 16 + 8 + 1 + 16 + 16);
    assert_eq!(&p[..23], b"keyfort-client-proof-v1");
    assert_eq!(p[23..39], cluster);
    assert_eq!(p[39..47], 0x0102_0304_0506_0708u64.to_le_bytes());
    assert_eq!(p[47], 1);
    assert_eq!(p[48..64], [0xAA; 16]);
    assert_eq!(p[64..80], client);
    let a = proof_context(&cluster, 1, &Scope::Admin, &client);
    assert_eq!(a[47], 2);
    assert_eq!(a[48..64], [0; 16]);
}

/// The sizes of the fixed-size payloads in docs/format.md §8.3.
#[test]
fn fixed_sizes() {
    let id = [1u8; 16];
    let sizes: [(Vec<u8>, usize); 15] = [
        (Request::Proof { response: [0; 32] }.encode(), 32),
        (Request::Route.encode(), 0),
        (Request::ClusterStatus.encode(), 0),
        (
            Request::PartitionCreate {
                partition: id,
                flags: 0,
            }
            .encode(),
            16,
        ),
        (
            Request::PartitionCreate {
                partition: id,
                flags: partition_flags::REQUIRE_CLIENT_CERT,
            }
            .encode(),
            17,
        ),
        (
            Request::KeyRotate {
                idempotency_id: id,
                key_id: id,
                replaces: 1,
            }
            .encode(),
            36,
        ),
        (
            Request::KeyDelete {
                idempotency_id: id,
                key_id: id,
            }
            .encode(),
            32,
        ),
        (Request::KeyDescribe { key_id: id }.encode(), 16),
        (
            Request::KeyList {
                after: None,
                limit: 1,
            }
            .encode(),
            19,
        ),
        (
            Response::Challenge {
                challenge: [0; 32],
                cluster_id: id,
                node_id: 1,
            }
            .encode(),
            56,
        ),
        (Response::Accepted.encode(), 0),
        (
            Response::PartitionCreated {
                lsn: 1,
                client_id: id,
                credential: [0; 32],
            }
            .encode(),
            56,
        ),
        (Response::PartitionDeleted { lsn: 1 }.encode(), 8),
        (
            Response::Credential {
                client_id: id,
                credential: [0; 32],
            }
            .encode(),
            48,
        ),
        (ErrorReply::new(ErrorCode::Retry, "").encode(), 16),
    ];
    for (i, (b, n)) in sizes.iter().enumerate() {
        assert_eq!(b.len(), *n, "entry {i}");
    }
}

#[test]
fn request_opcodes_and_writes() {
    let id = [1u8; 16];
    let writes = [
        Request::PartitionCreate {
            partition: id,
            flags: 0,
        },
        Request::PartitionDelete { partition: id },
        Request::KeyCreate {
            idempotency_id: id,
            flags: 0,
            metadata: vec![],
        },
        Request::KeyRotate {
            idempotency_id: id,
            key_id: id,
            replaces: 1,
        },
        Request::KeyUpdate {
            idempotency_id: id,
            key_id: id,
            version: 1,
            state: KeyStateCode::Enabled,
            metadata: vec![],
        },
        Request::KeyDelete {
            idempotency_id: id,
            key_id: id,
        },
        Request::KeyRestore {
            idempotency_id: id,
            backup: vec![],
        },
    ];
    for q in &writes {
        assert!(q.is_write(), "{q:?}");
    }
    let reads = [
        Request::Route,
        Request::ClusterStatus,
        Request::CredentialIssue { partition: id },
        Request::KeyDescribe { key_id: id },
        Request::Encrypt {
            key_id: id,
            aad: vec![],
            plaintext: vec![],
        },
    ];
    for q in &reads {
        assert!(!q.is_write(), "{q:?}");
    }
}
