//! Snapshot streaming (net/src/snapshot_stream.rs) over real TCP on 127.0.0.1: a 64 MiB file
//! arrives byte-identical (beside the fetcher's own raft connection, which it does not evict); a
//! stream broken halfway resumes; a corrupted chunk is refused and re-fetched; odd sizes (empty,
//! not a chunk multiple) arrive whole; an unknown snapshot is a typed error that leaves no file;
//! a node with another key cannot fetch; a poll names the newest snapshot of a shard (or none).
//! Both nodes run on one executor.

mod common;
use common::*;
use keyfort_engine::raft::Transport;
use keyfort_net::snapshot_stream::*;
use keyfort_net::transport::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

/// Bound of every test body.
const TEST_LIMIT: Duration = Duration::from_secs(120);
/// The serving node.
const LEADER: u64 = 1;
/// The fetching node.
const FOLLOWER: u64 = 2;
/// The snapshot the leader serves: (shard, lsn, term).
const SNAP: (u32, u64, u64) = (3, 1000, 7);
/// Size of the big test file.
const BIG: usize = 64 << 20;

/// A leader serving `file` as `SNAP` and a follower (with `key`) that knows its address.
fn pair(file: &Path, key: [u8; 32]) -> (Rc<PeerTransport>, Sink, Rc<PeerTransport>) {
    let (leader, sink) = node(LEADER, CLUSTER, KEY);
    let (follower, _) = node(FOLLOWER, CLUSTER, key);
    let addr = leader.listen(localhost()).expect("listen");
    // The follower does not listen; the leader only needs it as a member.
    leader.set_peers(BTreeMap::from([(FOLLOWER, localhost())]));
    follower.set_peers(BTreeMap::from([(LEADER, addr)]));
    let path = file.to_path_buf();
    leader.serve_snapshots(Rc::new(move |shard, lsn, term| {
        ((shard, lsn, term) == SNAP).then(|| path.clone())
    }));
    (leader, sink, follower)
}

/// Writes `len` pseudo-random bytes (xorshift; no zero runs) to `path`.
fn write_file(path: &Path, len: usize) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    std::fs::write(path, v).expect("write source file");
}

fn assert_same(a: &Path, b: &Path) {
    let x = std::fs::read(a).expect("read source");
    let y = std::fs::read(b).expect("read fetched");
    assert_eq!(x.len(), y.len(), "sizes differ");
    assert!(x == y, "contents differ");
    assert!(!partial_path(b).exists(), "partial file left behind");
}

async fn fetch(follower: &Rc<PeerTransport>, dest: &Path) -> Result<FetchReport, StreamError> {
    fetch_snapshot(follower, LEADER, SNAP.0, SNAP.1, SNAP.2, dest).await
}

#[test]
fn a_64_mib_snapshot_arrives_byte_identical_beside_raft_traffic() {
    run("big", TEST_LIMIT, |dir| async move {
        let src = dir.join("snap.src");
        write_file(&src, BIG);
        let dest = dir.join("snap.fetched");
        let (leader, sink, follower) = pair(&src, KEY);

        // The follower's raft connection to the leader is up before the fetch...
        follower.send(0, vec![heartbeat(FOLLOWER, LEADER, 1)]);
        wait_until("first heartbeat", || sink.borrow().len() == 1).await;

        let report = fetch(&follower, &dest).await.expect("fetch");
        assert_eq!(report.bytes, BIG as u64);
        assert_eq!(report.chunks, (BIG / STREAM_CHUNK_BYTES) as u64);
        assert_eq!(report.resumes, 0);
        assert_eq!(report.refetched_chunks, 0);
        assert_same(&src, &dest);

        // ... and stays: the snapshot connection replaced nothing.
        follower.send(0, vec![heartbeat(FOLLOWER, LEADER, 2)]);
        wait_until("second heartbeat", || sink.borrow().len() == 2).await;
        let st = leader.stats();
        assert_eq!(st.replaced_connections, 0, "{st:?}");
        assert_eq!(st.snapshot_connections, 1, "{st:?}");
        assert_eq!(st.snapshot_chunks_served, report.chunks, "{st:?}");
        assert_eq!(st.snapshot_bytes_served, BIG as u64, "{st:?}");
        assert_eq!(st.protocol_errors, 0, "{st:?}");
        assert_eq!(follower.stats().reconnects, 0);
        leader.close().await;
        follower.close().await;
    });
}

/// Fetches a `BIG` file from a leader with `faults` armed; checks it arrived byte-identical.
async fn fetch_big_with(
    dir: &Path,
    faults: ServeFaults,
) -> (Rc<PeerTransport>, Rc<PeerTransport>, FetchReport) {
    let src = dir.join("snap.src");
    write_file(&src, BIG);
    let dest = dir.join("snap.fetched");
    let (leader, _sink, follower) = pair(&src, KEY);
    leader.set_serve_faults(faults);
    let report = fetch(&follower, &dest).await.expect("fetch");
    assert_eq!(report.bytes, BIG as u64);
    assert_same(&src, &dest);
    (leader, follower, report)
}

#[test]
fn a_stream_broken_halfway_resumes_from_the_verified_prefix() {
    run("resume", TEST_LIMIT, |dir| async move {
        let half = (BIG / STREAM_CHUNK_BYTES / 2) as u64;
        let faults = ServeFaults {
            corrupt_chunk_at: None,
            close_after_chunks: Some(half),
        };
        let (leader, follower, report) = fetch_big_with(&dir, faults).await;
        assert!(report.resumes >= 1, "{report:?}");
        let st = leader.stats();
        assert_eq!(st.snapshot_connections, 2, "{st:?}");
        // Resumed from the verified prefix: at most the window is served twice.
        assert!(
            st.snapshot_chunks_served <= report.chunks + STREAM_WINDOW_CHUNKS as u64,
            "{st:?} {report:?}"
        );
        leader.close().await;
        follower.close().await;
    });
}

#[test]
fn a_corrupted_chunk_is_refused_and_fetched_again() {
    run("corrupt", TEST_LIMIT, |dir| async move {
        let faults = ServeFaults {
            corrupt_chunk_at: Some(10 * STREAM_CHUNK_BYTES as u64),
            close_after_chunks: None,
        };
        let (leader, follower, report) = fetch_big_with(&dir, faults).await;
        assert_eq!(report.refetched_chunks, 1, "{report:?}");
        assert_eq!(report.resumes, 0, "{report:?}");
        assert_eq!(leader.stats().snapshot_chunks_served, report.chunks + 1);
        leader.close().await;
        follower.close().await;
    });
}

#[test]
fn odd_sizes_arrive_whole() {
    run("odd", TEST_LIMIT, |dir| async move {
        for len in [0, 1, STREAM_CHUNK_BYTES, 3 * STREAM_CHUNK_BYTES + 12_345] {
            let src = dir.join(format!("snap-{len}.src"));
            write_file(&src, len);
            let dest = dir.join(format!("snap-{len}.fetched"));
            let (leader, _sink, follower) = pair(&src, KEY);
            let report = fetch(&follower, &dest).await.expect("fetch");
            assert_eq!(report.bytes, len as u64);
            assert_eq!(
                report.chunks,
                len.div_ceil(STREAM_CHUNK_BYTES).max(1) as u64
            );
            assert_same(&src, &dest);
            leader.close().await;
            follower.close().await;
        }
    });
}

#[test]
fn an_unknown_snapshot_is_a_typed_error_and_leaves_no_file() {
    run("unknown", TEST_LIMIT, |dir| async move {
        let src = dir.join("snap.src");
        write_file(&src, 1 << 20);
        let dest = dir.join("snap.fetched");
        let (leader, _sink, follower) = pair(&src, KEY);
        let e = fetch_snapshot(&follower, LEADER, SNAP.0, SNAP.1 + 1, SNAP.2, &dest)
            .await
            .expect_err("unknown snapshot");
        assert!(
            matches!(e, StreamError::UnknownSnapshot { peer: LEADER, lsn, .. } if lsn == SNAP.1 + 1),
            "{e:?}"
        );
        assert!(!dest.exists());
        assert!(!partial_path(&dest).exists());
        assert_eq!(leader.stats().snapshot_errors_served, 1);
        // A node not in the table is refused before anything is created.
        let e = fetch_snapshot(&follower, 9, SNAP.0, SNAP.1, SNAP.2, &dest)
            .await
            .expect_err("unknown peer");
        assert!(matches!(e, StreamError::UnknownPeer(9)), "{e:?}");
        assert!(!dest.exists());
        assert!(!partial_path(&dest).exists());
        leader.close().await;
        follower.close().await;
    });
}

#[test]
fn a_node_with_another_key_cannot_fetch() {
    run("wrong-key", TEST_LIMIT, |dir| async move {
        let src = dir.join("snap.src");
        write_file(&src, 1 << 20);
        let dest = dir.join("snap.fetched");
        let (leader, _sink, follower) = pair(&src, [43; 32]);
        let e = fetch(&follower, &dest).await.expect_err("wrong key");
        assert!(
            matches!(e, StreamError::Handshake { peer: LEADER, .. }),
            "{e:?}"
        );
        assert!(!dest.exists());
        assert!(!partial_path(&dest).exists());
        let st = leader.stats();
        assert_eq!(st.snapshot_chunks_served, 0, "{st:?}");
        assert_eq!(st.snapshot_connections, 0, "{st:?}");
        leader.close().await;
        follower.close().await;
    });
}

#[test]
fn a_poll_names_the_newest_snapshot_which_then_fetches_by_its_lsn() {
    run("newest", TEST_LIMIT, |dir| async move {
        let src = dir.join("snap.src");
        write_file(&src, (1 << 20) + 17);
        let (leader, _sink, follower) = pair(&src, KEY);
        // No newest resolver yet: the node does not serve the poll.
        let e = probe_newest(&follower, LEADER, SNAP.0)
            .await
            .expect_err("not serving");
        assert!(matches!(e, StreamError::NotServing(LEADER)), "{e:?}");
        let path = src.clone();
        leader.serve_newest_snapshots(Rc::new(move |shard| {
            (shard == SNAP.0).then(|| (SNAP.1, path.clone()))
        }));
        let got = probe_newest(&follower, LEADER, SNAP.0).await.unwrap();
        assert_eq!(got, Some((SNAP.1, (1 << 20) + 17)));
        assert_eq!(
            probe_newest(&follower, LEADER, SNAP.0 + 1).await.unwrap(),
            None
        );
        // What the poll named is fetched by its LSN (the resolver above matches the term too).
        let dest = dir.join("snap.fetched");
        fetch(&follower, &dest).await.unwrap();
        assert_same(&src, &dest);
        leader.close().await;
        follower.close().await;
    });
}
