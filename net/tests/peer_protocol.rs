//! The peer protocol (docs/format.md §6): payload codecs round trip, refuse every truncation and
//! trailing byte, never panic on arbitrary bytes; the handshake between a Dialer and a Listener
//! holding the same key succeeds, and a wrong key, wrong cluster, unknown or duplicate node, wrong
//! version, reflected proof, replayed proof or early traffic fails with the right typed error and
//! reject code.

use hmac::{Hmac, Mac};
use keyfort_net::frame::{self, Frame, FrameHeader};
use keyfort_net::peer::*;
use proptest::prelude::*;
use sha2::Sha256;

/// A software HMAC in place of the card, for this sans-IO state-machine test only: its
/// property tests run thousands of handshakes with arbitrary keys. Every test that moves bytes
/// between processes or sockets (peer_transport, snapshot_stream, tools/tests/cluster_procs)
/// makes its proofs in real SoftHSM cards.
struct Soft([u8; 32]);

impl Prover for Soft {
    fn mac(&self, msg: &[u8]) -> Result<[u8; PROOF_LEN], String> {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).map_err(|e| e.to_string())?;
        m.update(msg);
        Ok(m.finalize().into_bytes().into())
    }

    fn verify(&self, msg: &[u8], mac: &[u8; PROOF_LEN]) -> Result<bool, String> {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).map_err(|e| e.to_string())?;
        m.update(msg);
        Ok(m.verify_slice(mac).is_ok())
    }
}

/// A card that fails every call.
struct Broken;

impl Prover for Broken {
    fn mac(&self, _: &[u8]) -> Result<[u8; PROOF_LEN], String> {
        Err("card gone".into())
    }

    fn verify(&self, _: &[u8], _: &[u8; PROOF_LEN]) -> Result<bool, String> {
        Err("card gone".into())
    }
}

const KEY: [u8; 32] = [7; 32];
const CLUSTER: [u8; CLUSTER_ID_LEN] = [0xC1; CLUSTER_ID_LEN];

fn id(node_id: u64) -> PeerIdentity {
    PeerIdentity {
        cluster_id: CLUSTER,
        node_id,
    }
}

fn members(n: u64) -> Admission {
    if (1..=5).contains(&n) {
        Admission::Member
    } else {
        Admission::Unknown
    }
}

/// The frames in `buf`, which must be whole.
fn split(buf: &[u8]) -> Vec<(FrameHeader, Vec<u8>)> {
    let mut v = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let (f, n) = frame::decode(&buf[at..]).unwrap().expect("whole frame");
        v.push((f.header, f.payload.to_vec()));
        at += n;
    }
    v
}

fn frame_of(opcode: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode(
        FrameHeader {
            flags: 0,
            opcode,
            request_id: 0,
        },
        payload,
        &mut out,
    )
    .unwrap();
    out
}

/// Feeds the frame `bytes` to the listener (members 1..=5); its answer and what it sent.
fn listen(l: &mut Listener, key: &dyn Prover, bytes: &[u8]) -> (Result<Step, PeerError>, Vec<u8>) {
    let (f, _) = frame::decode(bytes).unwrap().expect("whole frame");
    let mut out = Vec::new();
    let r = l.on_frame(&f, key, &members, &mut out);
    (r, out)
}

/// Feeds the frame `bytes` to the dialer; its answer and what it sent.
fn dial(d: &mut Dialer, key: &dyn Prover, bytes: &[u8]) -> (Result<Step, PeerError>, Vec<u8>) {
    let (f, _) = frame::decode(bytes).unwrap().expect("whole frame");
    let mut out = Vec::new();
    let r = d.on_frame(&f, key, &mut out);
    (r, out)
}

/// A Hello frame of the test cluster.
fn hello_frame(node_id: u64, version: u16, challenge: [u8; 32]) -> Vec<u8> {
    let mut p = Vec::new();
    Hello {
        cluster_id: CLUSTER,
        node_id,
        version,
        challenge,
    }
    .encode(&mut p);
    frame_of(PEER_HELLO, &p)
}

/// A Proof frame.
fn proof_frame(proof: [u8; PROOF_LEN]) -> Vec<u8> {
    let mut p = Vec::new();
    Proof { proof }.encode(&mut p);
    frame_of(PEER_PROOF, &p)
}

/// The Challenge that `out` holds (and nothing else).
fn challenge_of(out: &[u8]) -> Challenge {
    let f = split(out);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].0.opcode, PEER_CHALLENGE);
    Challenge::decode(&f[0].1).unwrap()
}

/// The code of the Reject that `out` holds (and nothing else).
fn reject_code(out: &[u8]) -> u16 {
    let f = split(out);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].0.opcode, PEER_REJECT);
    Reject::decode(&f[0].1).unwrap().code
}

type Ended = Option<Result<u64, PeerError>>;

fn record(r: Result<Step, PeerError>, end: &mut Ended) {
    match r {
        Ok(Step::Continue) => {}
        Ok(Step::Established { peer }) => *end = Some(Ok(peer)),
        Err(e) => *end = Some(Err(e)),
    }
}

/// Runs a whole handshake over bytes; the end of each side (None: still waiting).
fn pump(
    d: &mut Dialer,
    dp: &dyn Prover,
    l: &mut Listener,
    lp: &dyn Prover,
    m: &dyn Members,
) -> (Ended, Ended) {
    let mut to_l = Vec::new();
    d.start(&mut to_l).unwrap();
    let (mut dend, mut lend) = (None, None);
    for _ in 0..8 {
        let mut to_d = Vec::new();
        for (header, p) in split(&to_l) {
            if lend.is_none() {
                let f = Frame {
                    header,
                    payload: &p,
                };
                record(l.on_frame(&f, lp, m, &mut to_d), &mut lend);
            }
        }
        to_l.clear();
        for (header, p) in split(&to_d) {
            if dend.is_none() {
                let f = Frame {
                    header,
                    payload: &p,
                };
                record(d.on_frame(&f, dp, &mut to_l), &mut dend);
            }
        }
        if to_l.is_empty() {
            break;
        }
    }
    (dend, lend)
}

fn rejected(code: u16) -> impl Fn(&Ended) -> bool {
    move |e| matches!(e, Some(Err(PeerError::Rejected { code: c, .. })) if *c == code)
}

#[test]
fn handshake_with_the_same_key_succeeds() {
    let mut d = Dialer::new(id(1), Some(2), [0xD1; 32]);
    let mut l = Listener::new(id(2), [0x11; 32]);
    let (dend, lend) = pump(&mut d, &Soft(KEY), &mut l, &Soft(KEY), &members);
    assert_eq!(dend, Some(Ok(2)));
    assert_eq!(lend, Some(Ok(1)));
    assert_eq!(d.peer(), Some(2));
    assert_eq!(l.peer(), Some(1));
    // Over: nothing more is taken by the state machines.
    let f = frame_of(PEER_HELLO, &[]);
    let (f, _) = frame::decode(&f).unwrap().unwrap();
    let mut out = Vec::new();
    assert_eq!(
        l.on_frame(&f, &Soft(KEY), &members, &mut out),
        Err(PeerError::HandshakeOver)
    );
    assert_eq!(
        d.on_frame(&f, &Soft(KEY), &mut out),
        Err(PeerError::HandshakeOver)
    );
    assert!(out.is_empty());
    assert_eq!(d.start(&mut out), Err(PeerError::HandshakeOver));
}

#[test]
fn wrong_key_fails_on_the_dialer_and_the_listener_is_told() {
    let mut d = Dialer::new(id(1), None, [0xD1; 32]);
    let mut l = Listener::new(id(2), [0x11; 32]);
    let (dend, lend) = pump(&mut d, &Soft([8; 32]), &mut l, &Soft(KEY), &members);
    assert_eq!(dend, Some(Err(PeerError::BadProof)));
    assert!(rejected(reject::BAD_PROOF)(&lend), "{lend:?}");
    assert_eq!(l.peer(), None);
}

/// An impostor without the key as dialer: it cannot check the listener's proof, sends a proof
/// made with another key, and the listener refuses it.
#[test]
fn wrong_key_fails_on_the_listener() {
    let mut l = Listener::new(id(2), [0x11; 32]);
    let (r, out) = listen(
        &mut l,
        &Soft(KEY),
        &hello_frame(3, PEER_PROTOCOL_VERSION, [0xAA; 32]),
    );
    assert_eq!(r, Ok(Step::Continue));
    let c = challenge_of(&out);
    let forged = Soft([9; 32])
        .mac(&proof_input(DIALER_PROOF_TAG, &c.challenge, &CLUSTER, 3))
        .unwrap();
    let (r, out) = listen(&mut l, &Soft(KEY), &proof_frame(forged));
    assert_eq!(r, Err(PeerError::BadProof));
    assert_eq!(split(&out).len(), 1);
    assert_eq!(reject_code(&out), reject::BAD_PROOF);
    assert_eq!(l.peer(), None);
}

#[test]
fn wrong_cluster_is_refused_by_the_listener() {
    let other = PeerIdentity {
        cluster_id: [0xC2; CLUSTER_ID_LEN],
        node_id: 1,
    };
    let mut d = Dialer::new(other, None, [0xD1; 32]);
    let mut l = Listener::new(id(2), [0x11; 32]);
    let (dend, lend) = pump(&mut d, &Soft(KEY), &mut l, &Soft(KEY), &members);
    assert_eq!(
        lend,
        Some(Err(PeerError::WrongCluster {
            ours: CLUSTER,
            theirs: [0xC2; CLUSTER_ID_LEN]
        }))
    );
    assert!(rejected(reject::WRONG_CLUSTER)(&dend), "{dend:?}");
}

#[test]
fn unknown_duplicate_and_self_node_ids_are_refused() {
    for (node, admit, want, code) in [
        (
            9,
            Admission::Unknown,
            PeerError::UnknownNode(9),
            reject::UNKNOWN_NODE,
        ),
        (
            0,
            Admission::Member,
            PeerError::UnknownNode(0),
            reject::UNKNOWN_NODE,
        ),
        (
            3,
            Admission::AlreadyConnected,
            PeerError::DuplicateNode(3),
            reject::DUPLICATE_NODE,
        ),
        (
            2,
            Admission::Member,
            PeerError::DuplicateNode(2),
            reject::DUPLICATE_NODE,
        ),
    ] {
        let mut d = Dialer::new(id(node), None, [0xD1; 32]);
        let mut l = Listener::new(id(2), [0x11; 32]);
        let m = move |_| admit;
        let (dend, lend) = pump(&mut d, &Soft(KEY), &mut l, &Soft(KEY), &m);
        assert_eq!(lend, Some(Err(want)));
        assert!(rejected(code)(&dend), "{dend:?}");
    }
}

#[test]
fn the_dialer_refuses_a_listener_it_did_not_mean_to_reach() {
    let mut d = Dialer::new(id(1), Some(4), [0xD1; 32]);
    let mut l = Listener::new(id(2), [0x11; 32]);
    let (dend, lend) = pump(&mut d, &Soft(KEY), &mut l, &Soft(KEY), &members);
    assert_eq!(
        dend,
        Some(Err(PeerError::UnexpectedPeer {
            expected: 4,
            got: 2
        }))
    );
    assert!(rejected(reject::UNEXPECTED_PEER)(&lend), "{lend:?}");
}

#[test]
fn wrong_version_is_refused() {
    let mut l = Listener::new(id(2), [0x11; 32]);
    let v = PEER_PROTOCOL_VERSION + 1;
    let (r, out) = listen(&mut l, &Soft(KEY), &hello_frame(1, v, [0xAA; 32]));
    assert_eq!(
        r,
        Err(PeerError::BadVersion {
            ours: PEER_PROTOCOL_VERSION,
            theirs: v
        })
    );
    assert_eq!(reject_code(&out), reject::BAD_VERSION);
}

/// Node 2 (listener) is asked to prove over the challenge node 1 (listener) gave an attacker who
/// claims to be node 2; the listener proof node 2 makes is refused by node 1 as a dialer proof.
/// Only the domain tags tell the two apart: every other input is the same.
#[test]
fn a_reflected_proof_is_refused() {
    let key = Soft(KEY);
    let v = PEER_PROTOCOL_VERSION;
    // Attacker → node 1, claiming to be node 2.
    let mut l1 = Listener::new(id(1), [0x11; 32]);
    let (r, out1) = listen(&mut l1, &key, &hello_frame(2, v, [0xAA; 32]));
    assert_eq!(r, Ok(Step::Continue));
    let c1 = challenge_of(&out1);
    // Attacker → node 2, with node 1's challenge as its own.
    let mut l2 = Listener::new(id(2), [0x22; 32]);
    let (r, out2) = listen(&mut l2, &key, &hello_frame(3, v, c1.challenge));
    assert_eq!(r, Ok(Step::Continue));
    let c2 = challenge_of(&out2);
    // Node 2's proof covers (c1, cluster, node 2) — what node 1 wants, but under the other tag.
    assert_eq!(
        c2.proof,
        key.mac(&proof_input(LISTENER_PROOF_TAG, &c1.challenge, &CLUSTER, 2))
            .unwrap()
    );
    let (r, out) = listen(&mut l1, &key, &proof_frame(c2.proof));
    assert_eq!(r, Err(PeerError::BadProof));
    assert_eq!(reject_code(&out), reject::BAD_PROOF);
    assert_eq!(l1.peer(), None);
}

/// A Dialer and a Listener taken through Hello and Challenge: the dialer now awaits Accept and
/// the listener has the Proof frame (bytes) to take. Also the Hello frame.
fn up_to_proof(key: &Soft, l: &mut Listener) -> (Dialer, Vec<u8>, Vec<u8>) {
    let mut d = Dialer::new(id(1), None, [0xD1; 32]);
    let mut hello = Vec::new();
    d.start(&mut hello).unwrap();
    let (r, challenge) = listen(l, key, &hello);
    assert_eq!(r, Ok(Step::Continue));
    let (r, proof) = dial(&mut d, key, &challenge);
    assert_eq!(r, Ok(Step::Continue));
    (d, hello, proof)
}

/// A proof recorded from one connection is refused on another: the listener's challenge differs.
#[test]
fn a_replayed_proof_is_refused() {
    let key = Soft(KEY);
    let mut l = Listener::new(id(2), [0x11; 32]);
    let (_, hello, proof) = up_to_proof(&key, &mut l);
    let (r, _) = listen(&mut l, &key, &proof);
    assert_eq!(r, Ok(Step::Established { peer: 1 }));

    // The recording replayed to a fresh connection.
    let mut l2 = Listener::new(id(2), [0x12; 32]);
    assert_eq!(listen(&mut l2, &key, &hello).0, Ok(Step::Continue));
    let (r, out) = listen(&mut l2, &key, &proof);
    assert_eq!(r, Err(PeerError::BadProof));
    assert_eq!(reject_code(&out), reject::BAD_PROOF);
}

#[test]
fn nothing_but_the_handshake_is_taken_before_accept() {
    let key = Soft(KEY);
    let mut batch = Vec::new();
    encode_raft_batch(&[(0, b"msg")], &mut batch).unwrap();
    let raft = frame_of(PEER_RAFT_BATCH, &batch);
    let early = |r: &Result<Step, PeerError>| matches!(r, Err(PeerError::UnexpectedFrame { .. }));

    // Listener awaiting Hello; then it is over.
    let mut l = Listener::new(id(2), [0x11; 32]);
    let (r, out) = listen(&mut l, &key, &raft);
    assert_eq!(
        r,
        Err(PeerError::UnexpectedFrame {
            state: "awaiting hello",
            opcode: PEER_RAFT_BATCH
        })
    );
    assert_eq!(reject_code(&out), reject::PROTOCOL);
    assert_eq!(listen(&mut l, &key, &raft).0, Err(PeerError::HandshakeOver));

    // Listener awaiting Proof, dialer awaiting Accept.
    let mut l = Listener::new(id(2), [0x11; 32]);
    let (mut d, _, _) = up_to_proof(&key, &mut l);
    let (r, out) = listen(&mut l, &key, &raft);
    assert!(early(&r), "{r:?}");
    assert_eq!(reject_code(&out), reject::PROTOCOL);
    let (r, out) = dial(&mut d, &key, &raft);
    assert!(early(&r), "{r:?}");
    assert_eq!(reject_code(&out), reject::PROTOCOL);
    assert_eq!(d.peer(), None);
    assert_eq!(l.peer(), None);

    // Dialer awaiting Challenge.
    let mut d = Dialer::new(id(1), None, [0xD1; 32]);
    d.start(&mut Vec::new()).unwrap();
    assert!(early(&dial(&mut d, &key, &raft).0));
}

#[test]
fn a_card_failure_is_internal_not_a_verdict() {
    let mut d = Dialer::new(id(1), None, [0xD1; 32]);
    let mut l = Listener::new(id(2), [0x11; 32]);
    let (dend, lend) = pump(&mut d, &Soft(KEY), &mut l, &Broken, &members);
    assert_eq!(lend, Some(Err(PeerError::Prover("card gone".into()))));
    assert!(rejected(reject::INTERNAL)(&dend), "{dend:?}");
}

#[test]
fn reject_reasons_are_bounded_and_utf8() {
    let short = PeerError::Malformed {
        what: "x",
        detail: "y",
    };
    let r = Reject::for_error(reject::PROTOCOL, &short);
    let mut p = Vec::new();
    r.encode(&mut p).unwrap();
    assert_eq!(Reject::decode(&p).unwrap(), r);
    // A reason of multi-byte characters is cut at a character boundary.
    let r = Reject {
        code: 1,
        reason: "é".repeat(200),
    };
    assert!(r.encode(&mut Vec::new()).is_err());
    let cut = Reject::for_error(
        1,
        &PeerError::Rejected {
            code: 1,
            reason: "é".repeat(200),
        },
    );
    assert!(cut.reason.len() <= MAX_REJECT_REASON_BYTES);
    cut.encode(&mut Vec::new()).unwrap();
    // Over-long and non-UTF-8 reasons are refused on decode.
    let mut p = vec![1, 0];
    p.extend_from_slice(&(MAX_REJECT_REASON_BYTES as u16 + 1).to_le_bytes());
    p.extend(std::iter::repeat_n(b'a', MAX_REJECT_REASON_BYTES + 1));
    assert!(matches!(
        Reject::decode(&p),
        Err(PeerError::Malformed { .. })
    ));
    let p = [1, 0, 2, 0, 0xff, 0xfe];
    assert!(matches!(
        Reject::decode(&p),
        Err(PeerError::Malformed { .. })
    ));
}

#[test]
fn opcodes_are_distinct_and_in_the_peer_range() {
    let ops = PEER_OPCODES;
    for (i, a) in ops.iter().enumerate() {
        assert!((PEER_OPCODE_FIRST..=PEER_OPCODE_LAST).contains(a));
        assert!(ops[i + 1..].iter().all(|b| b != a));
    }
    assert_ne!(DIALER_PROOF_TAG, LISTENER_PROOF_TAG);
}

#[test]
fn raft_batch_limits() {
    let many: Vec<(u32, &[u8])> = vec![(0, &[]); MAX_RAFT_BATCH_MESSAGES + 1];
    let mut out = Vec::new();
    assert_eq!(
        encode_raft_batch(&many, &mut out),
        Err(PeerError::TooManyMessages {
            count: MAX_RAFT_BATCH_MESSAGES + 1,
            max: MAX_RAFT_BATCH_MESSAGES
        })
    );
    assert!(out.is_empty());
    encode_raft_batch(&many[1..], &mut out).unwrap();
    assert_eq!(
        decode_raft_batch(&out).unwrap().len(),
        MAX_RAFT_BATCH_MESSAGES
    );

    let big = vec![0u8; frame::MAX_FRAME_PAYLOAD_BYTES];
    assert!(matches!(
        encode_raft_batch(&[(1, &big)], &mut Vec::new()),
        Err(PeerError::BatchTooLarge { .. })
    ));
    // A hostile count is refused before anything is allocated for it.
    assert!(matches!(
        decode_raft_batch(&u32::MAX.to_le_bytes()),
        Err(PeerError::TooManyMessages { .. })
    ));
    assert!(matches!(
        decode_raft_batch(&(MAX_RAFT_BATCH_MESSAGES as u32).to_le_bytes()),
        Err(PeerError::Truncated { .. })
    ));
}

#[test]
fn snapshot_chunk_limits() {
    let data = vec![0u8; MAX_SNAPSHOT_CHUNK_BYTES + 1];
    let c = SnapshotChunk {
        shard: 0,
        lsn: 1,
        term: 1,
        offset: 0,
        total_size: u64::MAX,
        data: &data,
    };
    assert!(matches!(
        c.encode(&mut Vec::new()),
        Err(PeerError::ChunkTooLarge { .. })
    ));
    let c = SnapshotChunk {
        offset: u64::MAX,
        data: b"x",
        ..c
    };
    assert!(matches!(
        c.encode(&mut Vec::new()),
        Err(PeerError::ChunkOutOfBounds { .. })
    ));
    for max_len in [0, MAX_SNAPSHOT_CHUNK_BYTES as u32 + 1] {
        let q = SnapshotChunkRequest {
            shard: 0,
            lsn: 1,
            term: 1,
            offset: 0,
            max_len,
        };
        assert!(q.encode(&mut Vec::new()).is_err());
        let mut p = Vec::new();
        SnapshotChunkRequest { max_len: 1, ..q }
            .encode(&mut p)
            .unwrap();
        p[28..32].copy_from_slice(&max_len.to_le_bytes());
        assert!(SnapshotChunkRequest::decode(&p).is_err());
    }
}

// ---- properties ----

fn any_chunk() -> impl Strategy<Value = (u32, u64, u64, u64, u64, Vec<u8>)> {
    (
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        0u64..1 << 40,
        0u64..1 << 20,
        prop::collection::vec(any::<u8>(), 0..600),
    )
}

fn chunk_bytes(c: &(u32, u64, u64, u64, u64, Vec<u8>)) -> Vec<u8> {
    let mut p = Vec::new();
    SnapshotChunk {
        shard: c.0,
        lsn: c.1,
        term: c.2,
        offset: c.3,
        total_size: c.3 + c.5.len() as u64 + c.4,
        data: &c.5,
    }
    .encode(&mut p)
    .unwrap();
    p
}

/// Every handshake payload (what the state machines parse), encoded from arbitrary fields.
fn handshake_payloads(
    cluster_id: [u8; 16],
    node_id: u64,
    version: u16,
    ch: [u8; 32],
    reason: String,
) -> Vec<(u16, Vec<u8>)> {
    let mut v = Vec::new();
    let mut p = Vec::new();
    Hello {
        cluster_id,
        node_id,
        version,
        challenge: ch,
    }
    .encode(&mut p);
    v.push((PEER_HELLO, p));
    let mut p = Vec::new();
    Challenge {
        cluster_id,
        node_id,
        challenge: ch,
        proof: ch,
    }
    .encode(&mut p);
    v.push((PEER_CHALLENGE, p));
    let mut p = Vec::new();
    Proof { proof: ch }.encode(&mut p);
    v.push((PEER_PROOF, p));
    let mut p = Vec::new();
    Reject {
        code: version,
        reason,
    }
    .encode(&mut p)
    .unwrap();
    v.push((PEER_REJECT, p));
    v
}

/// Decodes `payload` as the message of `opcode`, re-encoded (to compare round trips).
fn decode_as(opcode: u16, payload: &[u8]) -> Result<Vec<u8>, PeerError> {
    let mut out = Vec::new();
    match opcode {
        PEER_HELLO => Hello::decode(payload)?.encode(&mut out),
        PEER_CHALLENGE => Challenge::decode(payload)?.encode(&mut out),
        PEER_PROOF => Proof::decode(payload)?.encode(&mut out),
        PEER_ACCEPT => decode_accept(payload)?,
        PEER_REJECT => Reject::decode(payload)?.encode(&mut out)?,
        PEER_RAFT_BATCH => encode_raft_batch(&decode_raft_batch(payload)?, &mut out)?,
        PEER_SNAPSHOT_CHUNK_REQUEST => SnapshotChunkRequest::decode(payload)?.encode(&mut out)?,
        PEER_SNAPSHOT_CHUNK => SnapshotChunk::decode(payload)?.encode(&mut out)?,
        _ => unreachable!(),
    }
    Ok(out)
}

proptest! {
    #[test]
    fn handshake_succeeds_for_any_members_and_key(
        key in any::<[u8; 32]>(),
        cluster in any::<[u8; 16]>(),
        a in 1u64..,
        b in 1u64..,
        cd in any::<[u8; 32]>(),
        cl in any::<[u8; 32]>(),
    ) {
        prop_assume!(a != b);
        let me = |n| PeerIdentity { cluster_id: cluster, node_id: n };
        let mut d = Dialer::new(me(a), Some(b), cd);
        let mut l = Listener::new(me(b), cl);
        let m = |_| Admission::Member;
        let (dend, lend) = pump(&mut d, &Soft(key), &mut l, &Soft(key), &m);
        prop_assert_eq!(dend, Some(Ok(b)));
        prop_assert_eq!(lend, Some(Ok(a)));
    }

    #[test]
    fn handshake_with_different_keys_never_establishes(
        k1 in any::<[u8; 32]>(),
        k2 in any::<[u8; 32]>(),
        cd in any::<[u8; 32]>(),
        cl in any::<[u8; 32]>(),
    ) {
        prop_assume!(k1 != k2);
        let mut d = Dialer::new(id(1), None, cd);
        let mut l = Listener::new(id(2), cl);
        let (dend, lend) = pump(&mut d, &Soft(k1), &mut l, &Soft(k2), &members);
        prop_assert_eq!(dend, Some(Err(PeerError::BadProof)));
        prop_assert!(rejected(reject::BAD_PROOF)(&lend));
        prop_assert_eq!(l.peer(), None);
        prop_assert_eq!(d.peer(), None);
    }

    #[test]
    fn handshake_messages_round_trip_and_refuse_truncation_and_trailing_bytes(
        cluster in any::<[u8; 16]>(),
        node in any::<u64>(),
        version in any::<u16>(),
        ch in any::<[u8; 32]>(),
        reason in "\\PC{0,80}",
        extra in 1usize..8,
    ) {
        prop_assume!(reason.len() <= MAX_REJECT_REASON_BYTES);
        for (op, p) in handshake_payloads(cluster, node, version, ch, reason) {
            prop_assert_eq!(decode_as(op, &p).unwrap(), p.clone());
            for cut in 0..p.len() {
                let is_truncated = matches!(decode_as(op, &p[..cut]), Err(PeerError::Truncated { .. }));
                prop_assert!(is_truncated, "op {:#x} cut {}", op, cut);
            }
            let mut longer = p.clone();
            longer.extend(std::iter::repeat_n(0, extra));
            let is_trailing = matches!(decode_as(op, &longer), Err(PeerError::TrailingBytes { .. }));
            prop_assert!(is_trailing);
        }
        prop_assert_eq!(decode_accept(&[]), Ok(()));
        let is_trailing = matches!(decode_accept(&[0]), Err(PeerError::TrailingBytes { .. }));
        prop_assert!(is_trailing);
    }

    #[test]
    fn raft_batches_round_trip_and_refuse_truncation(
        msgs in prop::collection::vec((any::<u32>(), prop::collection::vec(any::<u8>(), 0..200)), 0..20),
        extra in 1usize..8,
    ) {
        let refs: Vec<(u32, &[u8])> = msgs.iter().map(|(s, m)| (*s, m.as_slice())).collect();
        let mut p = Vec::new();
        encode_raft_batch(&refs, &mut p).unwrap();
        prop_assert_eq!(p.len(), raft_batch_len(&refs));
        prop_assert_eq!(decode_raft_batch(&p).unwrap(), refs);
        for cut in 0..p.len() {
            let is_truncated = matches!(decode_raft_batch(&p[..cut]), Err(PeerError::Truncated { .. }));
            prop_assert!(is_truncated, "cut {}", cut);
        }
        let mut longer = p.clone();
        longer.extend(std::iter::repeat_n(0, extra));
        let is_trailing = matches!(decode_raft_batch(&longer), Err(PeerError::TrailingBytes { .. }));
        prop_assert!(is_trailing);
    }

    #[test]
    fn snapshot_chunks_round_trip_and_refuse_truncation_and_damage(
        c in any_chunk(),
        q in (any::<u32>(), any::<u64>(), any::<u64>(), any::<u64>(), 1..=MAX_SNAPSHOT_CHUNK_BYTES as u32),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let p = chunk_bytes(&c);
        let d = SnapshotChunk::decode(&p).unwrap();
        prop_assert_eq!((d.shard, d.lsn, d.term, d.offset, d.data), (c.0, c.1, c.2, c.3, c.5.as_slice()));
        prop_assert_eq!(d.total_size, c.3 + c.5.len() as u64 + c.4);
        for cut in 0..p.len() {
            let is_truncated = matches!(SnapshotChunk::decode(&p[..cut]), Err(PeerError::Truncated { .. }));
            prop_assert!(is_truncated, "cut {}", cut);
        }
        // A damaged data byte or crc is ChunkCorrupt.
        let crc_at = SNAPSHOT_CHUNK_HEADER_LEN - 8;
        let mut at = flip.index(4 + c.5.len());
        at = if at < 4 { crc_at + at } else { SNAPSHOT_CHUNK_HEADER_LEN + at - 4 };
        let mut bad = p.clone();
        bad[at] ^= 1 << bit;
        let is_corrupt = matches!(SnapshotChunk::decode(&bad), Err(PeerError::ChunkCorrupt { .. }));
        prop_assert!(is_corrupt);

        let q = SnapshotChunkRequest { shard: q.0, lsn: q.1, term: q.2, offset: q.3, max_len: q.4 };
        let mut p = Vec::new();
        q.encode(&mut p).unwrap();
        prop_assert_eq!(p.len(), SNAPSHOT_CHUNK_REQUEST_LEN);
        prop_assert_eq!(SnapshotChunkRequest::decode(&p), Ok(q));
        for cut in 0..p.len() {
            let is_truncated = matches!(SnapshotChunkRequest::decode(&p[..cut]), Err(PeerError::Truncated { .. }));
            prop_assert!(is_truncated, "cut {}", cut);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(buf in prop::collection::vec(any::<u8>(), 0..400)) {
        for op in PEER_OPCODES {
            // Whatever decodes re-encodes to the same bytes: no two encodings of one message.
            if let Ok(again) = decode_as(op, &buf) {
                prop_assert_eq!(again, buf.clone());
            }
        }
    }

    /// Arbitrary frames (any peer opcode, any payload) never panic the state machines and never
    /// establish a connection without the key.
    #[test]
    fn arbitrary_frames_never_establish(
        frames in prop::collection::vec((prop::sample::select(PEER_OPCODES.to_vec()), prop::collection::vec(any::<u8>(), 0..120)), 1..5),
    ) {
        let key = Soft(KEY);
        let mut l = Listener::new(id(2), [0x11; 32]);
        let mut d = Dialer::new(id(1), None, [0xD1; 32]);
        d.start(&mut Vec::new()).unwrap();
        for (op, payload) in &frames {
            let bytes = frame_of(*op, payload);
            let (f, _) = frame::decode(&bytes).unwrap().unwrap();
            let lr = l.on_frame(&f, &key, &members, &mut Vec::new());
            let dr = d.on_frame(&f, &key, &mut Vec::new());
            let l_established = matches!(lr, Ok(Step::Established { .. }));
            let d_established = matches!(dr, Ok(Step::Established { .. }));
            prop_assert!(!l_established);
            prop_assert!(!d_established);
        }
    }
}
