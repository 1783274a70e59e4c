//! keyfortd's Prometheus endpoint (`metrics_listen`, docs/operations.md "Metrics") on real
//! processes: 3 nodes on 127.0.0.1, 2 shards, each node with its own SoftHSM card, a metrics
//! port and a directory as durable store. A non-loopback `metrics_listen` is refused at start
//! with a clear error; then a client creates a partition and a key and encrypts, and a plain
//! `std::net::TcpStream` scrape of every node shows the create and encrypt histograms counted
//! (on whichever nodes served them), every shard's commit, WBL bytes and archive RPO, the
//! recovery tier, a snapshot manager round, and `404`/`405` for other paths and methods.
//! Behaviour only, no timings.

mod common;

use keyfort_bench::local_cluster::{free_ports, keep_failed as keep, LocalCluster};
use keyfort_net::client::{ClientOptions, Credential};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

const SHARDS: u32 = 2;
const NODES: usize = 3;
/// Generous: two cores run three nodes, their cards and the test.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(30);

fn local(root: &Path) -> LocalCluster {
    LocalCluster::create(
        root,
        env!("CARGO_BIN_EXE_keyfort").as_ref(),
        env!("CARGO_BIN_EXE_keyfortd").as_ref(),
        NODES as u64,
        SHARDS,
        0,
        50,
    )
    .unwrap()
}

/// One HTTP/1.1 request over a plain socket: (status code, head, body).
fn http(addr: SocketAddr, request: &str) -> std::io::Result<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request.as_bytes())?;
    let mut text = String::new();
    // The node closes the connection after its answer.
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or_default();
    Ok((code, head.to_string(), body.to_string()))
}

fn scrape(addr: SocketAddr) -> String {
    let (code, head, body) = http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\n\r\n",
    )
    .unwrap_or_else(|e| panic!("scrape {addr}: {e}"));
    assert_eq!(code, 200, "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    body
}

/// The value of the sample `series` (name and labels exactly as written), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_endpoint_on_real_nodes() {
    let root = tempfile::tempdir().unwrap();
    let mut c = local(root.path());
    // Free ports the nodes' own listeners (chosen at create, not bound yet) do not use.
    let taken: Vec<String> = c
        .nodes
        .iter()
        .flat_map(|n| [n.peer_addr.clone(), n.client_addr.to_string()])
        .collect();
    let ports: Vec<u16> = free_ports(NODES + taken.len())
        .unwrap()
        .into_iter()
        .filter(|p| !taken.iter().any(|a| a.ends_with(&format!(":{p}"))))
        .take(NODES)
        .collect();
    let metrics: Vec<SocketAddr> = ports
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();

    // A metrics listener on every interface is refused at start, before anything opens.
    c.configure_node(0, |v| {
        v["metrics_listen"] = format!("0.0.0.0:{}", ports[0]).into()
    })
    .unwrap();
    c.start(0).unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(st) = c.exited(0) {
            break st;
        }
        assert!(
            t.elapsed() < PROGRESS_TIMEOUT,
            "a non-loopback metrics_listen was not refused (kept in {})",
            keep(root.path())
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(c.nodes[0].data_dir.parent().unwrap().join("keyfortd.log"))
        .unwrap();
    assert!(
        log.contains("metrics_listen 0.0.0.0:") && log.contains("not a loopback address"),
        "{log}"
    );
    c.nodes[0].child = None;

    for (i, addr) in metrics.iter().enumerate() {
        let store = root.path().join("durable").display().to_string();
        c.configure_node(i, |v| {
            v["metrics_listen"] = addr.to_string().into();
            v["durable_store"] = store.clone().into();
            v["backup_interval_ms"] = 200.into();
        })
        .unwrap();
    }
    c.start_all().unwrap();
    assert!(
        c.wait_for(PROGRESS_TIMEOUT, |c| (0..SHARDS)
            .all(|s| c.leader(s).is_some())),
        "no leader for every shard (kept in {})",
        keep(root.path())
    );
    let opts = ClientOptions {
        request_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    };
    let admin_cred = Credential::read_file(
        &c.admin_credential(env!("CARGO_BIN_EXE_keyfort").as_ref())
            .unwrap(),
    )
    .unwrap();
    let admin = common::connect(&c, &admin_cred, &opts, PROGRESS_TIMEOUT);
    let (_, cred) = common::partition_on(&admin, 0, SHARDS);
    let client = common::connect(&c, &cred, &opts, PROGRESS_TIMEOUT);
    let key = client.create_key(b"metrics", false).expect("create").key_id;
    client.encrypt(key, b"aad", b"scraped").expect("encrypt");

    // Each request was timed on the node that answered it: summed over the nodes, at least one
    // of each. The recovery report is in place once a node's shards opened; the snapshot
    // manager runs on shard 0's leader.
    let mut sums: BTreeMap<&str, f64> = BTreeMap::new();
    let t = Instant::now();
    let texts = loop {
        let texts: Vec<String> = metrics.iter().map(|a| scrape(*a)).collect();
        let rounds: f64 = texts
            .iter()
            .filter_map(|t| value(t, "keyfort_backup_rounds_total"))
            .sum();
        if rounds >= 1.0
            && texts
                .iter()
                .all(|t| value(t, "keyfort_recovery_tier{tier=\"local\"}").is_some())
            || t.elapsed() > PROGRESS_TIMEOUT
        {
            break texts;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for text in &texts {
        for op in ["partition_create", "key_create", "encrypt"] {
            let series = format!("keyfort_client_request_duration_seconds_count{{op=\"{op}\"}}");
            *sums.entry(op).or_default() += value(text, &series).unwrap_or(0.0);
            let inf = format!(
                "keyfort_client_request_duration_seconds_bucket{{op=\"{op}\",le=\"+Inf\"}}"
            );
            assert_eq!(value(text, &inf), value(text, &series), "{text}");
        }
        for shard in 0..SHARDS {
            let commit = value(
                text,
                &format!("keyfort_shard_commit_lsn{{shard=\"{shard}\"}}"),
            )
            .unwrap_or_else(|| panic!("no commit of shard {shard}:\n{text}"));
            assert!(commit > 0.0, "{text}");
            for with_value in ["keyfort_wbl_bytes", "keyfort_archive_rpo_seconds"] {
                let series = format!("{with_value}{{shard=\"{shard}\"}}");
                assert!(value(text, &series).is_some(), "no {series}:\n{text}");
            }
            assert!(
                value(text, &format!("keyfort_wbl_bytes{{shard=\"{shard}\"}}")) > Some(0.0),
                "{text}"
            );
        }
        assert_eq!(
            value(text, "keyfort_recovery_tier{tier=\"local\"}"),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            value(text, "keyfort_recovery_tier{tier=\"durable\"}"),
            Some(0.0),
            "{text}"
        );
        assert!(text.contains("# TYPE keyfort_client_request_duration_seconds histogram\n"));
        assert!(text.contains("# TYPE keyfort_card_cache_hits_total counter\n"));
    }
    let rounds: f64 = texts
        .iter()
        .filter_map(|t| value(t, "keyfort_backup_rounds_total"))
        .sum();
    assert!(rounds >= 1.0, "no snapshot manager round counted");
    for (op, n) in &sums {
        assert!(*n >= 1.0, "{op}: {n} requests counted over the nodes");
    }
    // The encrypt went through some node's key-operation card session.
    let lookups: f64 = texts
        .iter()
        .map(|t| {
            value(t, "keyfort_card_cache_hits_total").unwrap_or(0.0)
                + value(t, "keyfort_card_cache_misses_total").unwrap_or(0.0)
        })
        .sum();
    assert!(lookups >= 1.0, "no card cache lookup counted");

    // Only GET/HEAD /metrics.
    let (code, _, _) = http(metrics[0], "GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(code, 404);
    let (code, head, _) = http(metrics[0], "POST /metrics HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(code, 405, "{head}");
}
