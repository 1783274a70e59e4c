//! Shared pieces of the peer transport and snapshot stream tests: nodes whose handshake proofs
//! are made in real SoftHSM cards, bounded executors and waits.
#![allow(dead_code)]

use futures_lite::future::or;
use keyfort_hsm::softhsm::integrity_session;
use keyfort_net::peer::{PeerIdentity, CLUSTER_ID_LEN};
use keyfort_net::transport::PeerTransport;
use raft::eraftpb::{Message, MessageType};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

pub const CLUSTER: [u8; CLUSTER_ID_LEN] = [7; CLUSTER_ID_LEN];
/// Names the cluster integrity key of the nodes' cards.
pub const KEY: [u8; 32] = [42; 32];
/// Bound of every wait for a condition.
pub const WAIT_LIMIT: Duration = Duration::from_secs(20);

/// What a node's inbound handler received: (from, shard, message).
pub type Sink = Rc<RefCell<Vec<(u64, u32, Message)>>>;

/// A transport for node `id` of `cluster` whose card holds the integrity key `key` names, with
/// an empty peer table, collecting what it receives.
pub fn node(id: u64, cluster: [u8; CLUSTER_ID_LEN], key: [u8; 32]) -> (Rc<PeerTransport>, Sink) {
    let sink: Sink = Rc::default();
    let s = sink.clone();
    let t = PeerTransport::new(
        PeerIdentity {
            cluster_id: cluster,
            node_id: id,
        },
        Rc::new(integrity_session(&key).expect("fixture card")),
        BTreeMap::new(),
        Rc::new(move |from, shard, m| s.borrow_mut().push((from, shard, m))),
    );
    (t, sink)
}

pub fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().expect("address")
}

pub fn heartbeat(from: u64, to: u64, commit: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgHeartbeat);
    m.from = from;
    m.to = to;
    m.term = 1;
    m.commit = commit;
    m
}

/// Runs `f(dir)` on a fresh executor with a scratch directory, failing after `limit`.
pub fn run<F, Fut>(name: &str, limit: Duration, f: F)
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = std::env::temp_dir().join(format!("keyfort-net-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let d = dir.clone();
    keyfort_engine::exec::run_local(&dir, |_queues| async move {
        or(f(d), async {
            glommio::timer::sleep(limit).await;
            panic!("test {name} ran past {limit:?}");
        })
        .await
    })
    .expect("executor");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits until `cond` holds, failing after `WAIT_LIMIT`.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT_LIMIT, "timed out waiting for {what}");
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

/// A raw client that completed the dialer handshake against `addr` as `node_id` with the
/// fixture cluster and key (`expect`: the listener id it insists on); returns the stream and
/// the listener's node id.
pub async fn handshaken_as(
    addr: SocketAddr,
    node_id: u64,
    expect: Option<u64>,
) -> (glommio::net::TcpStream, u64) {
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    use keyfort_net::frame;
    use keyfort_net::peer::{Dialer, Step, CHALLENGE_LEN};
    let mut s = glommio::net::TcpStream::connect(addr)
        .await
        .expect("connect");
    let me = PeerIdentity {
        cluster_id: CLUSTER,
        node_id,
    };
    let prover = integrity_session(&KEY).expect("fixture card");
    let mut d = Dialer::new(me, expect, [5; CHALLENGE_LEN]);
    let mut out = Vec::new();
    d.start(&mut out).expect("hello");
    let mut buf = Vec::new();
    loop {
        s.write_all(&out).await.expect("write");
        out.clear();
        let (step, n) = loop {
            if let Some((f, n)) = frame::decode(&buf).expect("frame") {
                break (d.on_frame(&f, &prover, &mut out).expect("handshake"), n);
            }
            let mut b = [0u8; 1024];
            let k = s.read(&mut b).await.expect("read");
            assert!(k > 0, "closed during the handshake");
            buf.extend_from_slice(&b[..k]);
        };
        buf.drain(..n);
        if let Step::Established { peer } = step {
            s.write_all(&out).await.expect("write");
            return (s, peer);
        }
    }
}
