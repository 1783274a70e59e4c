//! Arbitrary bytes as a peer payload: every peer decoder (the join request and grant included)
//! answers a message or a typed error, never a panic; whatever decodes re-encodes to the same
//! bytes (one encoding per message); and the handshake state machines, fed the bytes as frames of
//! every peer opcode (the join opcodes included), never panic and never establish a connection
//! without a valid proof.
#![no_main]

use keyfort_net::frame::{Frame, FrameHeader};
use keyfort_net::join::{JoinGrant, JoinRequest};
use keyfort_net::peer::*;
use libfuzzer_sys::fuzz_target;

/// A prover that never verifies: the fuzzer cannot forge a proof, and must not get through.
struct NoKey;

impl Prover for NoKey {
    fn mac(&self, _: &[u8]) -> Result<[u8; PROOF_LEN], String> {
        Ok([0x5a; PROOF_LEN])
    }

    fn verify(&self, _: &[u8], _: &[u8; PROOF_LEN]) -> Result<bool, String> {
        Ok(false)
    }
}

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    if let Ok(m) = Hello::decode(data) {
        m.encode(&mut out);
        assert_eq!(out, data);
    }
    out.clear();
    if let Ok(m) = Challenge::decode(data) {
        m.encode(&mut out);
        assert_eq!(out, data);
    }
    out.clear();
    if let Ok(m) = Proof::decode(data) {
        m.encode(&mut out);
        assert_eq!(out, data);
    }
    if decode_accept(data).is_ok() {
        assert!(data.is_empty());
    }
    out.clear();
    if let Ok(m) = Reject::decode(data) {
        m.encode(&mut out).expect("a decoded reject re-encodes");
        assert_eq!(out, data);
    }
    out.clear();
    if let Ok(msgs) = decode_raft_batch(data) {
        assert!(msgs.len() <= MAX_RAFT_BATCH_MESSAGES);
        encode_raft_batch(&msgs, &mut out).expect("a decoded batch re-encodes");
        assert_eq!(out, data);
    }
    out.clear();
    if let Ok(q) = SnapshotChunkRequest::decode(data) {
        q.encode(&mut out).expect("a decoded request re-encodes");
        assert_eq!(out, data);
    }
    out.clear();
    if let Ok(c) = SnapshotChunk::decode(data) {
        assert!(c.data.len() <= MAX_SNAPSHOT_CHUNK_BYTES);
        c.encode(&mut out).expect("a decoded chunk re-encodes");
        assert_eq!(out, data);
    }
    out.clear();
    if let Ok(r) = JoinRequest::decode(data) {
        r.encode(&mut out)
            .expect("a decoded join request re-encodes");
        assert_eq!(out, data);
    }
    out.clear();
    if let Ok(g) = JoinGrant::decode(data) {
        g.encode(&mut out).expect("a decoded join grant re-encodes");
        assert_eq!(out, data);
    }

    // The handshake: the same payload under every opcode, in turn, to both sides.
    let me = |node_id| PeerIdentity {
        cluster_id: [0xC1; CLUSTER_ID_LEN],
        node_id,
    };
    let members = |_| Admission::Member;
    let mut l = Listener::new(me(2), [0x11; CHALLENGE_LEN]);
    let mut d = Dialer::new(me(1), None, [0xD1; CHALLENGE_LEN]);
    let _ = d.start(&mut Vec::new());
    for opcode in PEER_OPCODES.into_iter().chain(PEER_JOIN_OPCODES) {
        let f = Frame {
            header: FrameHeader {
                flags: 0,
                opcode,
                request_id: HANDSHAKE_REQUEST_ID,
            },
            payload: data,
        };
        let lr = l.on_frame(&f, &NoKey, &members, &mut Vec::new());
        assert!(!matches!(lr, Ok(Step::Established { .. })));
        let dr = d.on_frame(&f, &NoKey, &mut Vec::new());
        assert!(!matches!(dr, Ok(Step::Established { .. })));
    }
});
