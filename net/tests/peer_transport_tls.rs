//! The peer transport over mutual TLS (net/src/tls.rs, net/src/transport.rs), in process on
//! 127.0.0.1 with certificates made here by a test CA (rcgen; the real CA signs in a card,
//! tools/tests/tls_procs.rs): messages flow between nodes whose certificates name their raft
//! ids; a node whose certificate names another raft id than the one its HMAC handshake proves
//! is refused by the listener, a node with a certificate of another CA or none is refused, and
//! a plaintext node cannot reach a TLS one — each counted as a TLS failure, nothing delivered.

mod common;
mod test_ca;
use common::*;
use keyfort_engine::raft::Transport;
use keyfort_net::tls::{node_name, NodeTls, Trust};
use keyfort_net::transport::PeerTransport;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;
use test_ca::Ca;

const TEST_LIMIT: Duration = Duration::from_secs(60);

/// A node's TLS with a certificate of `ca` naming raft id `name_id` (and 127.0.0.1).
fn node_tls(ca: &Ca, trust: &Trust, name_id: u64) -> NodeTls {
    let name = node_name(&CLUSTER, name_id);
    NodeTls::new(CLUSTER, trust, ca.issue(&[&name, "127.0.0.1"]).0).unwrap()
}

/// Nodes 1 and 2 listening and knowing each other; node 1 with `tls1`, node 2 with `tls2`.
fn pair(
    tls1: Option<NodeTls>,
    tls2: Option<NodeTls>,
) -> (Rc<PeerTransport>, Rc<PeerTransport>, Sink, Sink) {
    let (t1, s1) = node(1, CLUSTER, KEY);
    let (t2, s2) = node(2, CLUSTER, KEY);
    if let Some(t) = tls1 {
        t1.set_tls(t);
    }
    if let Some(t) = tls2 {
        t2.set_tls(t);
    }
    let mut table = BTreeMap::new();
    table.insert(1, t1.listen(localhost()).expect("listen"));
    table.insert(2, t2.listen(localhost()).expect("listen"));
    t1.set_peers(table.clone());
    t2.set_peers(table);
    (t1, t2, s1, s2)
}

#[test]
fn nodes_with_their_certificates_exchange_messages() {
    run("tls-ok", TEST_LIMIT, |_| async {
        let ca = Ca::new();
        let trust = ca.trust();
        let (t1, t2, s1, s2) = pair(
            Some(node_tls(&ca, &trust, 1)),
            Some(node_tls(&ca, &trust, 2)),
        );
        for c in 0..500 {
            t1.send(0, vec![heartbeat(1, 2, c)]);
            t2.send(1, vec![heartbeat(2, 1, c)]);
        }
        wait_until("both directions", || {
            s1.borrow().len() == 500 && s2.borrow().len() == 500
        })
        .await;
        let commits: Vec<u64> = s2.borrow().iter().map(|(_, _, m)| m.commit).collect();
        assert_eq!(commits, (0..500).collect::<Vec<_>>());
        for t in [&t1, &t2] {
            assert_eq!(t.stats().tls_failures, 0);
            assert_eq!(t.stats().handshake_failures_inbound, 0);
        }
        t1.close().await;
        t2.close().await;
    });
}

/// Node 2 sends to node 1 with `tls2`; node 1 (a proper certificate) must refuse it.
fn refused_by_listener(name: &str, make: fn(&Ca, &Trust) -> Option<NodeTls>) {
    run(name, TEST_LIMIT, |_| async move {
        let ca = Ca::new();
        let trust = ca.trust();
        let (t1, t2, s1, _s2) = pair(Some(node_tls(&ca, &trust, 1)), make(&ca, &trust));
        for c in 0..50 {
            t2.send(0, vec![heartbeat(2, 1, c)]);
        }
        wait_until("node 1 refuses node 2", || {
            t1.stats().handshake_failures_inbound >= 2
                && t2.stats().handshake_failures_outbound >= 2
        })
        .await;
        assert!(s1.borrow().is_empty(), "a refused node delivered messages");
        assert_eq!(t1.stats().received_batches, 0);
        t1.close().await;
        t2.close().await;
    });
}

#[test]
fn a_certificate_naming_another_raft_id_is_refused() {
    // Node 2 proves raft id 2 in the HMAC handshake but presents n3's certificate.
    refused_by_listener("tls-wrong-id", |ca, trust| Some(node_tls(ca, trust, 3)));
}

#[test]
fn a_certificate_of_another_ca_is_refused() {
    refused_by_listener("tls-other-ca", |_, _| {
        let other = Ca::new();
        let trust = other.trust();
        Some(node_tls(&other, &trust, 2))
    });
}

#[test]
fn a_plaintext_node_cannot_reach_a_tls_node() {
    refused_by_listener("tls-plain", |_, _| None);
}

#[test]
fn the_listener_counts_the_wrong_name_as_a_tls_failure() {
    run("tls-count", TEST_LIMIT, |_| async {
        let ca = Ca::new();
        let trust = ca.trust();
        let (t1, t2, s1, _) = pair(
            Some(node_tls(&ca, &trust, 1)),
            Some(node_tls(&ca, &trust, 7)),
        );
        t2.send(0, vec![heartbeat(2, 1, 1)]);
        wait_until("a TLS failure on node 1", || t1.stats().tls_failures >= 1).await;
        assert!(s1.borrow().is_empty());
        t1.close().await;
        t2.close().await;
    });
}

#[test]
fn a_removed_or_replaced_raft_id_is_refused_despite_its_valid_certificate() {
    run("tls-removed", TEST_LIMIT, |_| async {
        let ca = Ca::new();
        let trust = ca.trust();
        // Node 1 knows only itself and node 2: raft id 3 was removed (or replaced by a new id).
        let (t1, s1) = node(1, CLUSTER, KEY);
        let (t3, _) = node(3, CLUSTER, KEY);
        t1.set_tls(node_tls(&ca, &trust, 1));
        t3.set_tls(node_tls(&ca, &trust, 3));
        let a1 = t1.listen(localhost()).expect("listen");
        let a3 = t3.listen(localhost()).expect("listen");
        t1.set_peers(BTreeMap::from([(1, a1), (2, localhost())]));
        t3.set_peers(BTreeMap::from([(1, a1), (3, a3)]));
        for c in 0..20 {
            t3.send(0, vec![heartbeat(3, 1, c)]);
        }
        wait_until("node 1 refuses raft id 3", || {
            t1.stats().handshake_failures_inbound >= 2
                && t3.stats().handshake_failures_outbound >= 2
        })
        .await;
        assert!(s1.borrow().is_empty(), "a removed node delivered messages");
        assert_eq!(
            t1.stats().tls_failures,
            0,
            "refused for membership, not TLS"
        );
        t1.close().await;
        t3.close().await;
    });
}
