//! Joining (net/src/join.rs, docs/format.md §6.12) over real TCP on 127.0.0.1 with SoftHSM
//! cards: the unauthenticated config fetch, a join round trip and every refusal, a joiner with
//! another cluster's key refused before its request is served, a joiner connection that sends
//! raft traffic cut off, a node without a join handler refusing the joiner id; and property
//! tests of the join codecs.

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
mod common;
use common::*;
use keyfort_engine::cluster::{ClusterConfig, Member, SHARDS_MAX};
use keyfort_engine::raft::snapshot::{DescriptorError, SnapshotDescriptor, DESCRIPTOR_BYTES};
use keyfort_hsm::softhsm::integrity_session;
use keyfort_net::frame::{self, FrameHeader};
use keyfort_net::join::*;
use keyfort_net::peer::*;
use keyfort_net::transport::PeerTransport;
use proptest::prelude::*;
use protobuf::Message as _;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Bound of every test body.
const TEST_LIMIT: Duration = Duration::from_secs(60);
/// Another cluster's integrity key.
const OTHER_KEY: [u8; 32] = [43; 32];

fn config() -> ClusterConfig {
    ClusterConfig {
        cluster_id: CLUSTER,
        shard_count: 3,
        next_node_id: 5,
        members: vec![
            Member {
                node_id: 1,
                peer_addr: "127.0.0.1:7001".into(),
            },
            Member {
                node_id: 2,
                peer_addr: "127.0.0.1:7002".into(),
            },
        ],
        integrity_key_wrapped: vec![0xAB; 109],
    }
}

fn descriptor(shard: u32, lsn: u64) -> SnapshotDescriptor {
    SnapshotDescriptor {
        shard,
        lsn,
        term: 3,
        size: 4096 + lsn,
        digest: [shard as u8; 16],
    }
}

fn grant() -> JoinGrant {
    JoinGrant {
        node_id: 4,
        replaces: 3,
        source: 2,
        config: config().encode().expect("config"),
        snapshots: (0..3).map(|s| descriptor(s, 100 + u64::from(s))).collect(),
    }
}

/// Requests seen by a join handler.
type Calls = Rc<RefCell<Vec<JoinRequest>>>;

/// A join handler answering by the port asked for: 1001 not leader (leader known), 1002 not
/// leader (unknown), 1003 busy, 1004 failed, 1005 failed with a reason too long for a Reject;
/// any other port gets [`grant`].
fn handler(calls: &Calls) -> JoinHandler {
    let calls = calls.clone();
    Rc::new(move |req: JoinRequest| {
        calls.borrow_mut().push(req.clone());
        Box::pin(async move {
            let port = req.peer_addr.parse::<SocketAddr>().expect("addr").port();
            match port {
                1001 => Err(JoinRefusal::NotLeader {
                    leader_addr: Some("10.0.0.9:7000".into()),
                }),
                1002 => Err(JoinRefusal::NotLeader { leader_addr: None }),
                1003 => Err(JoinRefusal::Busy),
                1004 => Err(JoinRefusal::Failed("no quorum".into())),
                1005 => Err(JoinRefusal::Failed("é".repeat(200))),
                _ => Ok(grant()),
            }
        })
    })
}

fn req(port: u16) -> JoinRequest {
    JoinRequest {
        peer_addr: format!("127.0.0.1:{port}"),
    }
}

/// Node 2 listening, serving joins with [`handler`].
fn joinable() -> (Rc<PeerTransport>, Sink, SocketAddr, Calls) {
    let (t, sink) = node(2, CLUSTER, KEY);
    let addr = t.listen(localhost()).expect("listen");
    let calls = Calls::default();
    t.serve_joins(handler(&calls));
    (t, sink, addr, calls)
}

/// Reads until EOF or error (the peer closed the connection); returns the bytes read.
async fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut b = [0u8; 4096];
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < WAIT_LIMIT, "connection was not closed");
        match s.read(&mut b).await {
            Ok(0) | Err(_) => return all,
            Ok(n) => all.extend_from_slice(&b[..n]),
        }
    }
}

/// A raw client that completed the handshake as the joiner (with the cluster's key).
async fn joiner_client(addr: SocketAddr) -> TcpStream {
    let (s, peer) = handshaken_as(addr, JOINER_NODE_ID, None).await;
    assert_eq!(peer, 2);
    s
}

fn frame_of(opcode: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    let h = FrameHeader {
        flags: 0,
        opcode,
        request_id: 0,
    };
    frame::encode(h, payload, &mut f).expect("frame");
    f
}

/// The Reject code of the last frame in `bytes`.
fn reject_code(mut bytes: &[u8]) -> u16 {
    loop {
        let (f, n) = frame::decode(bytes).expect("frame").expect("a whole frame");
        if n == bytes.len() {
            assert_eq!(f.header.opcode, PEER_REJECT);
            return Reject::decode(f.payload).expect("reject").code;
        }
        bytes = &bytes[n..];
    }
}

#[test]
fn opcodes_and_codes_are_distinct() {
    let all: Vec<u16> = PEER_OPCODES
        .iter()
        .chain(&PEER_JOIN_OPCODES)
        .copied()
        .collect();
    for (i, a) in all.iter().enumerate() {
        assert!((PEER_OPCODE_FIRST..=PEER_OPCODE_LAST).contains(a));
        assert!(all[i + 1..].iter().all(|b| b != a), "opcode {a:#06x} twice");
    }
    let codes = [
        reject::WRONG_CLUSTER,
        reject::UNKNOWN_NODE,
        reject::DUPLICATE_NODE,
        reject::BAD_PROOF,
        reject::BAD_VERSION,
        reject::PROTOCOL,
        reject::UNEXPECTED_PEER,
        reject::INTERNAL,
        reject::JOIN_NOT_LEADER,
        reject::JOIN_BUSY,
        reject::JOIN_FAILED,
        reject::NOT_SERVED,
    ];
    assert_eq!(codes.to_vec(), (1..=12).collect::<Vec<u16>>());
    assert_ne!(JOINER_NODE_ID, INVALID_NODE_ID);
}

#[test]
fn config_fetch_returns_the_served_config_or_not_served() {
    run("join-config", TEST_LIMIT, |_| async {
        let (t, _s) = node(2, CLUSTER, KEY);
        let addr = t.listen(localhost()).expect("listen");
        // Nothing served yet: a typed refusal.
        assert!(matches!(
            fetch_cluster_config(addr).await,
            Err(JoinError::NotServed)
        ));
        let bytes = config().encode().expect("config");
        t.serve_config(Rc::new(move || Some(bytes.clone())));
        let got = fetch_cluster_config(addr).await.expect("config fetch");
        assert_eq!(got, config());
        assert_eq!(t.stats().config_served, 1);
        // A source that has nothing is the same refusal.
        t.serve_config(Rc::new(|| None));
        assert!(matches!(
            fetch_cluster_config(addr).await,
            Err(JoinError::NotServed)
        ));
        // Bytes that are not a config: the fetcher says so, typed.
        t.serve_config(Rc::new(|| Some(b"not a config".to_vec())));
        assert!(matches!(
            fetch_cluster_config(addr).await,
            Err(JoinError::Config(_))
        ));
        // A config request with a payload is a protocol error, not served.
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(&frame_of(PEER_CONFIG_REQUEST, b"x"))
            .await
            .expect("write");
        let got = read_until_closed(&mut s).await;
        assert_eq!(reject_code(&got), reject::PROTOCOL);
        assert_eq!(
            t.stats().config_served,
            2,
            "the good and the bad bytes were served"
        );
        // A config request after a Hello is not one (the handshake refuses it).
        t.set_peers([(9, "127.0.0.1:9".parse().expect("addr"))].into());
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let mut hello = Vec::new();
        Hello {
            cluster_id: CLUSTER,
            node_id: 9,
            version: PEER_PROTOCOL_VERSION,
            challenge: [1; CHALLENGE_LEN],
        }
        .encode(&mut hello);
        s.write_all(&frame_of(PEER_HELLO, &hello))
            .await
            .expect("write");
        s.write_all(&frame_of(PEER_CONFIG_REQUEST, &[]))
            .await
            .expect("write");
        let got = read_until_closed(&mut s).await;
        assert_eq!(reject_code(&got), reject::PROTOCOL);
        // Nothing listens: an I/O error.
        t.close().await;
        assert!(matches!(
            fetch_cluster_config(addr).await,
            Err(JoinError::Io(_))
        ));
    });
}

#[test]
fn join_round_trip_and_refusals() {
    run("join-round-trip", TEST_LIMIT, |_| async {
        let (t, sink, addr, calls) = joinable();
        let prover = integrity_session(&KEY).expect("fixture card");
        let g = request_join(addr, CLUSTER, &prover, &req(7004))
            .await
            .expect("join");
        assert_eq!(g, grant());
        assert_eq!(*calls.borrow(), vec![req(7004)]);
        assert_eq!(t.stats().joins_served, 1);

        let r = request_join(addr, CLUSTER, &prover, &req(1001)).await;
        assert!(
            matches!(&r, Err(JoinError::NotLeader { leader_addr: Some(a) }) if a == "10.0.0.9:7000"),
            "{r:?}"
        );
        let r = request_join(addr, CLUSTER, &prover, &req(1002)).await;
        assert!(
            matches!(&r, Err(JoinError::NotLeader { leader_addr: None })),
            "{r:?}"
        );
        let r = request_join(addr, CLUSTER, &prover, &req(1003)).await;
        assert!(matches!(&r, Err(JoinError::Busy)), "{r:?}");
        let r = request_join(addr, CLUSTER, &prover, &req(1004)).await;
        assert!(
            matches!(&r, Err(JoinError::Failed(w)) if w == "no quorum"),
            "{r:?}"
        );
        let r = request_join(addr, CLUSTER, &prover, &req(1005)).await;
        assert!(
            matches!(&r, Err(JoinError::Failed(w)) if *w == "é".repeat(128)),
            "{r:?}"
        );
        assert_eq!(calls.borrow().len(), 6);
        assert_eq!(t.stats().joins_served, 6);

        // The joiner is no raft peer: nothing reached the raft handler, and the node's own
        // traffic counters are untouched.
        assert!(sink.borrow().is_empty());
        let st = t.stats();
        assert_eq!(st.received_batches + st.protocol_errors, 0);
        assert_eq!(st.replaced_connections + st.snapshot_connections, 0);

        // A request the joiner cannot make is refused before dialing.
        let bad = JoinRequest {
            peer_addr: "not an address".into(),
        };
        assert!(matches!(
            request_join(addr, CLUSTER, &prover, &bad).await,
            Err(JoinError::Peer(PeerError::Malformed { .. }))
        ));
        // Another cluster id: the handshake refuses it.
        let r = request_join(addr, [8; CLUSTER_ID_LEN], &prover, &req(7004)).await;
        assert!(
            matches!(
                r,
                Err(JoinError::Peer(PeerError::Rejected {
                    code: reject::WRONG_CLUSTER,
                    ..
                }))
            ),
            "{r:?}"
        );
        assert_eq!(calls.borrow().len(), 6);
        t.close().await;
    });
}

/// A card of another cluster whose checks always pass: it gets past its own check of the
/// listener's proof, so the listener's check of its proof is what refuses it.
struct Liar(keyfort_hsm::CoreSession);

impl Prover for Liar {
    fn mac(&self, msg: &[u8]) -> Result<[u8; PROOF_LEN], String> {
        Prover::mac(&self.0, msg)
    }

    fn verify(&self, _: &[u8], _: &[u8; PROOF_LEN]) -> Result<bool, String> {
        Ok(true)
    }
}

#[test]
fn a_joiner_with_another_key_is_refused_before_its_request() {
    run("join-other-key", TEST_LIMIT, |_| async {
        let (t, sink, addr, calls) = joinable();
        let other = integrity_session(&OTHER_KEY).expect("fixture card");
        let r = request_join(addr, CLUSTER, &other, &req(7004)).await;
        assert!(
            matches!(r, Err(JoinError::Peer(PeerError::BadProof))),
            "{r:?}"
        );
        let liar = Liar(integrity_session(&OTHER_KEY).expect("fixture card"));
        let r = request_join(addr, CLUSTER, &liar, &req(7004)).await;
        assert!(
            matches!(
                r,
                Err(JoinError::Peer(PeerError::Rejected {
                    code: reject::BAD_PROOF,
                    ..
                }))
            ),
            "{r:?}"
        );
        wait_until("both handshake failures counted", || {
            t.stats().handshake_failures_inbound >= 2
        })
        .await;
        assert!(calls.borrow().is_empty(), "the handler was called");
        assert!(sink.borrow().is_empty());
        assert_eq!(t.stats().joins_served, 0);
        t.close().await;
    });
}

#[test]
fn a_joiner_sending_raft_traffic_is_cut_off() {
    run("join-raft", TEST_LIMIT, |_| async {
        let (t, sink, addr, calls) = joinable();
        // Node 1 is a member, so a batch from it would be delivered on a raft connection.
        t.set_peers([(1, "127.0.0.1:9".parse().expect("addr"))].into());
        let mut p = Vec::new();
        let hb = heartbeat(1, 2, 5).write_to_bytes().expect("message");
        encode_raft_batch(&[(0, &hb)], &mut p).expect("batch");
        let mut s = joiner_client(addr).await;
        s.write_all(&frame_of(PEER_RAFT_BATCH, &p))
            .await
            .expect("write");
        let got = read_until_closed(&mut s).await;
        assert_eq!(reject_code(&got), reject::PROTOCOL);
        // A snapshot chunk request: the same.
        let mut q = Vec::new();
        SnapshotChunkRequest {
            shard: 0,
            lsn: 1,
            term: 1,
            offset: 0,
            max_len: 1024,
        }
        .encode(&mut q)
        .expect("request");
        let mut s = joiner_client(addr).await;
        s.write_all(&frame_of(PEER_SNAPSHOT_CHUNK_REQUEST, &q))
            .await
            .expect("write");
        let got = read_until_closed(&mut s).await;
        assert_eq!(reject_code(&got), reject::PROTOCOL);
        // A malformed join request: the same.
        let mut s = joiner_client(addr).await;
        s.write_all(&frame_of(PEER_JOIN_REQUEST, &[3, 0, b'a', b'b', b'c']))
            .await
            .expect("write");
        let got = read_until_closed(&mut s).await;
        assert_eq!(reject_code(&got), reject::PROTOCOL);

        assert!(sink.borrow().is_empty(), "a joiner delivered raft messages");
        assert!(calls.borrow().is_empty(), "the handler was called");
        let st = t.stats();
        assert_eq!(st.protocol_errors, 3);
        assert_eq!(st.received_batches + st.snapshot_connections, 0);
        assert_eq!(st.joins_served, 0);
        // The node still serves joins afterwards.
        let prover = integrity_session(&KEY).expect("fixture card");
        let g = request_join(addr, CLUSTER, &prover, &req(7004)).await;
        assert_eq!(g.expect("join"), grant());
        t.close().await;
    });
}

#[test]
fn a_node_without_a_join_handler_refuses_the_joiner_id() {
    run("join-unserved", TEST_LIMIT, |_| async {
        let (t, _sink) = node(2, CLUSTER, KEY);
        let addr = t.listen(localhost()).expect("listen");
        let bytes = config().encode().expect("config");
        t.serve_config(Rc::new(move || Some(bytes.clone())));
        let prover = integrity_session(&KEY).expect("fixture card");
        let r = request_join(addr, CLUSTER, &prover, &req(7004)).await;
        assert!(
            matches!(
                r,
                Err(JoinError::Peer(PeerError::Rejected {
                    code: reject::UNKNOWN_NODE,
                    ..
                }))
            ),
            "{r:?}"
        );
        assert_eq!(t.stats().joins_served, 0);
        // Serving the config does not admit joiners; the config is still served.
        assert_eq!(fetch_cluster_config(addr).await.expect("config"), config());
        t.close().await;
    });
}

#[test]
fn grant_limits_are_typed() {
    let mut out = Vec::new();
    let mut g = grant();
    g.config = vec![0; CONFIG_BYTES_MAX + 1];
    assert!(matches!(
        g.encode(&mut out),
        Err(JoinError::ConfigTooLarge { .. })
    ));
    let mut g = grant();
    g.snapshots = (0..=SHARDS_MAX).map(|s| descriptor(s, 1)).collect();
    assert!(matches!(
        g.encode(&mut out),
        Err(JoinError::TooManySnapshots { .. })
    ));
    let mut g = grant();
    g.snapshots.swap(0, 1);
    assert!(matches!(
        g.encode(&mut out),
        Err(JoinError::SnapshotOrder { index: 0, shard: 1 })
    ));
    for (node_id, replaces, source) in [
        (0, 0, 2),
        (JOINER_NODE_ID, 0, 2),
        (4, 4, 2),
        (4, JOINER_NODE_ID, 2),
        (4, 0, 0),
        (4, 0, 4),
    ] {
        let g = JoinGrant {
            node_id,
            replaces,
            source,
            ..grant()
        };
        assert!(matches!(
            g.encode(&mut out),
            Err(JoinError::Peer(PeerError::Malformed { .. }))
        ));
    }
    assert!(out.is_empty());

    // Decode: the same limits from the bytes, before anything is allocated.
    grant().encode(&mut out).expect("grant");
    let config_at = 24;
    let mut big = out.clone();
    big[config_at..config_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        JoinGrant::decode(&big),
        Err(JoinError::ConfigTooLarge { .. })
    ));
    let count_at = 28 + grant().config.len();
    let mut many = out.clone();
    many[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        JoinGrant::decode(&many),
        Err(JoinError::TooManySnapshots { .. })
    ));
    let mut short = out.clone();
    short[count_at..count_at + 4].copy_from_slice(&4u32.to_le_bytes());
    assert!(matches!(
        JoinGrant::decode(&short),
        Err(JoinError::Peer(PeerError::Truncated { .. }))
    ));
    let mut corrupt = out.clone();
    let d1 = count_at + 4 + DESCRIPTOR_BYTES;
    corrupt[d1 + 12] ^= 1;
    assert!(matches!(
        JoinGrant::decode(&corrupt),
        Err(JoinError::Descriptor {
            index: 1,
            source: DescriptorError::BadChecksum
        })
    ));
    // Reserved bytes set, checksum fixed: decodes as a descriptor, but not canonical.
    let mut reserved = out.clone();
    reserved[d1 + 5] = 1;
    let crc = crc32c::crc32c(&reserved[d1..d1 + 60]);
    reserved[d1 + 60..d1 + 64].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        JoinGrant::decode(&reserved),
        Err(JoinError::NonCanonicalDescriptor { index: 1 })
    ));
}

fn any_grant() -> impl Strategy<Value = JoinGrant> {
    (
        1u64..JOINER_NODE_ID,
        any::<u64>(),
        1u64..JOINER_NODE_ID,
        prop::collection::vec(any::<u8>(), 0..300),
        prop::collection::vec(
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<[u8; 16]>()),
            0..12,
        ),
    )
        .prop_filter("ids distinct", |(n, r, s, _, _)| {
            n != s && n != r && *r != JOINER_NODE_ID
        })
        .prop_map(|(node_id, replaces, source, config, ds)| JoinGrant {
            node_id,
            replaces,
            source,
            config,
            snapshots: ds
                .into_iter()
                .enumerate()
                .map(|(i, (lsn, term, size, digest))| SnapshotDescriptor {
                    shard: i as u32,
                    lsn,
                    term,
                    size,
                    digest,
                })
                .collect(),
        })
}

proptest! {
    #[test]
    fn join_request_round_trips(addr in any::<SocketAddr>()) {
        let r = JoinRequest { peer_addr: addr.to_string() };
        let mut out = Vec::new();
        r.encode(&mut out).expect("request");
        prop_assert_eq!(JoinRequest::decode(&out).expect("decode"), r);
        for cut in 0..out.len() {
            prop_assert!(JoinRequest::decode(&out[..cut]).is_err(), "cut {}", cut);
        }
        out.push(0);
        let trailing = matches!(JoinRequest::decode(&out), Err(PeerError::TrailingBytes { .. }));
        prop_assert!(trailing);
    }

    #[test]
    fn join_grant_round_trips(g in any_grant()) {
        let mut out = Vec::new();
        g.encode(&mut out).expect("grant");
        prop_assert_eq!(out.len(), g.encoded_len());
        prop_assert_eq!(JoinGrant::decode(&out).expect("decode"), g);
        for cut in 0..out.len() {
            prop_assert!(JoinGrant::decode(&out[..cut]).is_err(), "cut {}", cut);
        }
        out.push(0);
        let trailing = matches!(
            JoinGrant::decode(&out),
            Err(JoinError::Peer(PeerError::TrailingBytes { .. }))
        );
        prop_assert!(trailing);
    }

    /// Arbitrary bytes never panic the decoders; whatever decodes re-encodes to the same bytes.
    #[test]
    fn arbitrary_bytes_never_panic_the_join_decoders(buf in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(r) = JoinRequest::decode(&buf) {
            let mut out = Vec::new();
            r.encode(&mut out).expect("a decoded request re-encodes");
            prop_assert_eq!(out, buf.clone());
        }
        if let Ok(g) = JoinGrant::decode(&buf) {
            let mut out = Vec::new();
            g.encode(&mut out).expect("a decoded grant re-encodes");
            prop_assert_eq!(out, buf.clone());
        }
    }

    /// Arbitrary short address bytes after a valid length prefix never panic.
    #[test]
    fn arbitrary_addresses_never_panic(addr in prop::collection::vec(any::<u8>(), 0..40)) {
        let mut p = (addr.len() as u16).to_le_bytes().to_vec();
        p.extend_from_slice(&addr);
        if let Ok(r) = JoinRequest::decode(&p) {
            prop_assert!(r.peer_addr.parse::<SocketAddr>().is_ok());
        }
    }
}
