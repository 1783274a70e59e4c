//! The peer transport (net/src/transport.rs) over real TCP on 127.0.0.1: batched delivery in
//! order to several peers, refusal of a node with another key or cluster, reconnect after the
//! receiver restarts on the same port, and raw clients sending garbage or out-of-turn frames
//! being cut off while the listener keeps serving its peers.

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use keyfort_engine::raft::Transport;
mod common;
use common::*;
use keyfort_net::frame::{self, FrameHeader};
use keyfort_net::peer::*;
use keyfort_net::transport::*;
use protobuf::Message as _;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Bound of every test body.
const TEST_LIMIT: Duration = Duration::from_secs(60);

/// Reads until EOF or error (the peer closed the connection); returns the bytes read.
async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
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

fn commits_per_shard(sink: &Sink, from: u64) -> BTreeMap<u32, Vec<u64>> {
    let mut m: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for (f, shard, msg) in sink.borrow().iter() {
        assert_eq!(*f, from);
        assert_eq!(msg.from, from);
        m.entry(*shard).or_default().push(msg.commit);
    }
    m
}

const SHARDS: u32 = 7;

/// Sends heartbeats with commits `range` from `t` to each of `to`, shard = commit % SHARDS,
/// `chunk` messages per peer between yields.
async fn send_range(t: &PeerTransport, to: &[u64], range: std::ops::Range<u64>) {
    for c in range {
        let from = t.identity().node_id;
        let msgs = to.iter().map(|&p| heartbeat(from, p, c)).collect();
        t.send((c % u64::from(SHARDS)) as u32, msgs);
        if c % 500 == 499 {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }
}

#[test]
fn ten_thousand_messages_reach_two_peers_in_order_and_batched() {
    run("batch", TEST_LIMIT, |_| async {
        let (t1, _s1) = node(1, CLUSTER, KEY);
        let (t2, s2) = node(2, CLUSTER, KEY);
        let (t3, s3) = node(3, CLUSTER, KEY);
        let mut table = BTreeMap::new();
        for (id, t) in [(1, &t1), (2, &t2), (3, &t3)] {
            table.insert(id, t.listen(localhost()).expect("listen"));
        }
        for t in [&t1, &t2, &t3] {
            t.set_peers(table.clone());
        }
        const N: u64 = 10_000;
        send_range(&t1, &[2, 3], 0..N).await;
        wait_until("all messages", || {
            s2.borrow().len() as u64 == N && s3.borrow().len() as u64 == N
        })
        .await;
        for s in [&s2, &s3] {
            let per = commits_per_shard(s, 1);
            assert_eq!(per.len(), SHARDS as usize);
            for (shard, commits) in per {
                let want: Vec<u64> = (0..N)
                    .filter(|c| c % u64::from(SHARDS) == u64::from(shard))
                    .collect();
                assert_eq!(commits, want, "shard {shard} out of order or incomplete");
            }
        }
        let st1 = t1.stats();
        assert_eq!(st1.sent_messages, 2 * N);
        assert_eq!(st1.dropped_queue_full + st1.dropped_unknown_peer, 0);
        assert_eq!(st1.connects, 2);
        for t in [&t2, &t3] {
            let st = t.stats();
            assert_eq!(st.received_messages, N);
            assert!(
                st.received_batches * 10 < N,
                "{} batches for {N} messages",
                st.received_batches
            );
            assert_eq!(st.handshake_failures_inbound + st.protocol_errors, 0);
        }
        // A node not in the table: dropped and counted.
        t1.send(0, vec![heartbeat(1, 99, 0)]);
        assert_eq!(t1.stats().dropped_unknown_peer, 1);
        for t in [&t1, &t2, &t3] {
            t.close().await;
        }
    });
}

/// `intruder` (node 3, in the receiver's table) holds another key or another cluster id.
fn refused(name: &str, cluster: [u8; CLUSTER_ID_LEN], key: [u8; 32]) {
    run(name, TEST_LIMIT, |_| async move {
        let (t2, s2) = node(2, CLUSTER, KEY);
        let (t3, s3) = node(3, cluster, key);
        let mut table = BTreeMap::new();
        table.insert(2, t2.listen(localhost()).expect("listen"));
        table.insert(3, t3.listen(localhost()).expect("listen"));
        t2.set_peers(table.clone());
        t3.set_peers(table);
        send_range(&t3, &[2], 0..100).await;
        t2.send(0, vec![heartbeat(2, 3, 0)]);
        wait_until("handshake failures on both sides", || {
            let (a, b) = (t2.stats(), t3.stats());
            a.handshake_failures_inbound >= 2
                && b.handshake_failures_outbound >= 2
                && a.handshake_failures_outbound >= 1
                && b.handshake_failures_inbound >= 1
        })
        .await;
        assert!(s2.borrow().is_empty(), "the intruder delivered messages");
        assert!(s3.borrow().is_empty(), "the intruder accepted messages");
        assert_eq!(t2.stats().received_batches + t3.stats().received_batches, 0);
        assert_eq!(t2.stats().connects + t3.stats().connects, 0);
        t2.close().await;
        t3.close().await;
    });
}

#[test]
fn another_key_cannot_deliver() {
    refused("key", CLUSTER, [43; 32]);
}

#[test]
fn another_cluster_cannot_deliver() {
    refused("cluster", [8; CLUSTER_ID_LEN], KEY);
}

/// Nodes 1 and 2 listening, each with a table of both and of `extra` nodes (at a dummy address):
/// (node 1, node 2, what node 2 receives, the table).
fn listening_pair(
    extra: &[u64],
) -> (
    Rc<PeerTransport>,
    Rc<PeerTransport>,
    Sink,
    BTreeMap<u64, SocketAddr>,
) {
    let (t1, _) = node(1, CLUSTER, KEY);
    let (t2, s2) = node(2, CLUSTER, KEY);
    let mut table = BTreeMap::new();
    table.insert(1, t1.listen(localhost()).expect("listen"));
    table.insert(2, t2.listen(localhost()).expect("listen"));
    for &id in extra {
        table.insert(id, localhost());
    }
    t1.set_peers(table.clone());
    t2.set_peers(table.clone());
    (t1, t2, s2, table)
}

#[test]
fn sender_reconnects_after_receiver_restarts_on_the_same_port() {
    run("reconnect", TEST_LIMIT, |_| async {
        let (t1, t2, s2, table) = listening_pair(&[]);
        let addr2 = table[&2];

        send_range(&t1, &[2], 0..1000).await;
        wait_until("first phase", || s2.borrow().len() == 1000).await;
        t2.close().await;

        // Sent while the receiver is down: queued (bounded), redialed with backoff.
        send_range(&t1, &[2], 1000..1500).await;
        glommio::timer::sleep(Duration::from_millis(300)).await;
        assert!(t1.stats().dial_failures >= 1, "{:?}", t1.stats());

        let (t2b, s2b) = node(2, CLUSTER, KEY);
        assert_eq!(t2b.listen(addr2).expect("listen again"), addr2);
        t2b.set_peers(table);
        send_range(&t1, &[2], 1500..2500).await;
        wait_until("messages after the restart", || {
            s2b.borrow()
                .iter()
                .filter(|(_, _, m)| m.commit >= 1500)
                .count()
                == 1000
        })
        .await;
        let got: Vec<u64> = s2b.borrow().iter().map(|(_, _, m)| m.commit).collect();
        // The queue survived the outage: what was sent meanwhile arrives too, first, in order.
        let want: Vec<u64> = (1000..2500).collect();
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, want);
        for (shard, commits) in commits_per_shard(&s2b, 1) {
            assert!(
                commits.windows(2).all(|w| w[0] < w[1]),
                "shard {shard} out of order"
            );
        }
        let st = t1.stats();
        assert!(st.reconnects >= 1 && st.connects >= 2, "{st:?}");
        t1.close().await;
        t2b.close().await;
    });
}

/// A raw client that runs the dialer handshake as node 3 against `addr`.
async fn handshaken_client(addr: SocketAddr) -> TcpStream {
    handshaken_as(addr, 3, Some(2)).await.0
}

fn batch_frame(opcode: u16, msgs: &[(u32, &[u8])]) -> Vec<u8> {
    let mut p = Vec::new();
    encode_raft_batch(msgs, &mut p).expect("batch");
    let mut f = Vec::new();
    let h = FrameHeader {
        flags: 0,
        opcode,
        request_id: 0,
    };
    frame::encode(h, &p, &mut f).expect("frame");
    f
}

#[test]
fn bad_clients_are_cut_off_and_peers_still_served() {
    run("garbage", TEST_LIMIT, |_| async {
        let (t1, t2, s2, table) = listening_pair(&[3]);
        let addr2 = table[&2];

        // An idle stranger holds a handshake slot but blocks nobody.
        let _idle = TcpStream::connect(addr2).await.expect("connect");

        // Garbage: closed without an answer.
        let mut g = TcpStream::connect(addr2).await.expect("connect");
        g.write_all(b"GET / HTTP/1.1\r\nHost: keyfort\r\n\r\n")
            .await
            .expect("write");
        assert!(read_to_close(&mut g).await.is_empty());

        // A valid frame, but a raft batch before the handshake: a Reject, then closed.
        let hb = heartbeat(3, 2, 1).write_to_bytes().expect("encode");
        let mut early = TcpStream::connect(addr2).await.expect("connect");
        early
            .write_all(&batch_frame(PEER_RAFT_BATCH, &[(0, &hb)]))
            .await
            .expect("write");
        let answer = read_to_close(&mut early).await;
        let (f, _) = frame::decode(&answer).expect("frame").expect("whole frame");
        assert_eq!(f.header.opcode, PEER_REJECT);
        assert_eq!(
            Reject::decode(f.payload).expect("reject").code,
            reject::PROTOCOL
        );

        // After a good handshake: a wrong opcode, a bad frame, an undecodable message and a
        // spoofed sender each close the connection.
        let spoofed = heartbeat(1, 2, 1).write_to_bytes().expect("encode");
        let bad_frames: Vec<Vec<u8>> = vec![
            batch_frame(PEER_SNAPSHOT_CHUNK, &[(0, &hb)]),
            b"KFRMxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx".to_vec(),
            batch_frame(PEER_RAFT_BATCH, &[(0, &[0xff, 0xff, 0xff])]),
            batch_frame(PEER_RAFT_BATCH, &[(0, &spoofed)]),
        ];
        for (i, bad) in bad_frames.iter().enumerate() {
            let mut c = handshaken_client(addr2).await;
            c.write_all(&batch_frame(PEER_RAFT_BATCH, &[(9, &hb)]))
                .await
                .expect("write");
            c.write_all(bad).await.expect("write");
            assert!(read_to_close(&mut c).await.is_empty(), "case {i}");
            wait_until("protocol error counted", || {
                t2.stats().protocol_errors == i as u64 + 1
            })
            .await;
        }
        // The good batch before each bad frame was delivered, nothing of the bad ones.
        assert_eq!(s2.borrow().len(), bad_frames.len());
        assert!(s2
            .borrow()
            .iter()
            .all(|(from, shard, _)| *from == 3 && *shard == 9));

        // The listener keeps serving its peers.
        send_range(&t1, &[2], 0..100).await;
        wait_until("peer traffic", || {
            s2.borrow().iter().filter(|(from, _, _)| *from == 1).count() == 100
        })
        .await;
        let st = t2.stats();
        assert_eq!(st.handshake_failures_inbound, 2, "{st:?}");
        t1.close().await;
        t2.close().await;
    });
}
