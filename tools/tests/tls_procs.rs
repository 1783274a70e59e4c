//! Transport security on real processes (issue 9; docs/operations.md "TLS"): a 3-node TLS
//! cluster on 127.0.0.1 (one SoftHSM card each, the CA made in node 1's card at `cluster
//! init`), and what it must refuse, each with its typed reason:
//!
//! - a client without the CA (plaintext to the TLS port) → `Tls(NotTls)`;
//! - a client trusting another cluster's CA → `Tls(UnknownIssuer)`;
//! - a peer certificate of another cluster's CA → `UnknownIssuer`; an expired one → `Expired`;
//!   none → `NoCertificate`; a revoked one (after `keyfort tls revoke` and a restart) →
//!   `Revoked`; a dialer expecting another raft id → `WrongName`;
//! - a TLS 1.2-only offer (a downgrade) on either port → `ProtocolVersion`;
//! - plaintext bytes to the peer port → a TLS alert back, nothing else.
//!
//! And a recording proxy between a client and the leader captures every byte of an encrypt and
//! a generate-data-key: neither the plaintext nor the data key is in it.
//!
//! Refusals by a node's peer port are seen through `keyfort tls probe` (a real process).
//! Behaviour only, no timings.

mod common;

use keyfort_bench::local_cluster::{keep_failed as keep, LocalCluster, Security};
use keyfort_net::client::{ClientError, ClientOptions, ClientTls, Connection, Credential};
use keyfort_net::client_proto::{Request, Response};
use keyfort_net::tls::TlsFailure;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SHARDS: u32 = 1;
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(30);

fn keyfort() -> &'static Path {
    env!("CARGO_BIN_EXE_keyfort").as_ref()
}

fn local(root: &Path) -> LocalCluster {
    LocalCluster::create_with(
        root,
        keyfort(),
        env!("CARGO_BIN_EXE_keyfortd").as_ref(),
        3,
        SHARDS,
        0,
        50,
        Security::Tls,
    )
    .unwrap()
}

fn opts(tls: Option<ClientTls>) -> ClientOptions {
    ClientOptions {
        request_timeout: Duration::from_secs(10),
        tls,
        ..ClientOptions::default()
    }
}

fn peer_addr(c: &LocalCluster, i: usize) -> SocketAddr {
    c.nodes[i].peer_addr.parse().unwrap()
}

fn cluster_id(c: &LocalCluster) -> String {
    std::fs::read_to_string(c.tls_dir().join("cluster-id"))
        .unwrap()
        .trim()
        .to_string()
}

/// A node certificate issued by the CA of `tls_dir` into `<dir>/<name>.pem|.key`.
fn issue_node(
    c: &LocalCluster,
    tls_dir: &Path,
    dir: &Path,
    name: &str,
    node: u64,
    extra: &[&str],
) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    let mut args = vec![
        "issue-node".to_string(),
        "--tls-dir".into(),
        tls_dir.display().to_string(),
        "--node-id".into(),
        node.to_string(),
        "--out-cert".into(),
        cert.display().to_string(),
        "--out-key".into(),
        key.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    common::keyfort_tls(c, &refs);
    (cert, key)
}

/// `keyfort tls probe`: `Ok(())` accepted, `Err(typed)` the `Debug` of the refusal.
fn probe(
    addr: SocketAddr,
    ca: &Path,
    cert: Option<(&Path, &Path)>,
    name: Option<&str>,
    tls12_only: bool,
) -> Result<(), String> {
    let mut cmd = Command::new(keyfort());
    cmd.args(["tls", "probe", "--addr", &addr.to_string(), "--ca"])
        .arg(ca);
    if let Some((c, k)) = cert {
        cmd.arg("--cert").arg(c).arg("--key").arg(k);
    }
    if let Some(n) = name {
        cmd.args(["--name", n]);
    }
    if tls12_only {
        cmd.arg("--tls12-only");
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    match out.status.code() {
        Some(0) => Ok(()),
        Some(3) => Err(text
            .lines()
            .find_map(|l| l.strip_prefix("typed: "))
            .unwrap_or_default()
            .to_string()),
        _ => panic!(
            "probe {addr}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Another cluster made with node 1's card: its own id and CA, in `dir/tls`.
fn other_cluster(c: &LocalCluster, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let out = Command::new(keyfort())
        .args(["cluster", "init", "--token-dir"])
        .arg(c.root.join("node-1/card"))
        .args([
            "--label",
            "node-1",
            "--shards",
            "1",
            "--member",
            "1=127.0.0.1:1",
        ])
        .arg("--out")
        .arg(dir.join("cluster-config"))
        .env("KEYFORT_PIN_FILE", c.pin_file())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("tls")
}

/// A TCP relay on 127.0.0.1 to `target` that records every byte both ways.
fn recording_proxy(target: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = seen.clone();
    std::thread::spawn(move || {
        for client in l.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(target) else {
                return;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                let rec = rec.clone();
                std::thread::spawn(move || {
                    let mut b = [0u8; 16384];
                    loop {
                        match from.read(&mut b) {
                            Ok(0) | Err(_) => {
                                let _ = to.shutdown(std::net::Shutdown::Write);
                                return;
                            }
                            Ok(n) => {
                                rec.lock().unwrap().extend_from_slice(&b[..n]);
                                if to.write_all(&b[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        }
    });
    (addr, seen)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn tls_cluster_serves_and_refuses_with_typed_errors() {
    let root = tempfile::tempdir().unwrap();
    let mut c = local(root.path());
    c.start_all().unwrap();
    assert!(
        c.wait_for(PROGRESS_TIMEOUT, |c| (0..SHARDS)
            .all(|s| c.leader(s).is_some())),
        "no leader over mutual TLS (kept in {})",
        keep(root.path())
    );
    let ca = c.ca_file().unwrap();
    let tls = c.client_tls().unwrap();
    let admin_cred = Credential::read_file(&c.admin_credential(keyfort()).unwrap()).unwrap();
    let admin = common::connect(&c, &admin_cred, &opts(tls.clone()), PROGRESS_TIMEOUT);
    let (_, cred) = common::partition_on(&admin, 0, SHARDS);
    let client = common::connect(&c, &cred, &opts(tls.clone()), PROGRESS_TIMEOUT);
    let key = client.create_key(b"tls", false).expect("create").key_id;

    // --- no plaintext or key bytes on the wire: encrypt and generate-data-key through a relay
    let leader = c.leader(0).unwrap();
    let (relay, seen) = recording_proxy(c.nodes[leader].client_addr);
    let conn = Connection::open(relay, &cred, &opts(tls.clone())).expect("TLS through relay");
    let marker: Vec<u8> = b"keyfort-plaintext-marker-"
        .iter()
        .cycle()
        .take(4096)
        .copied()
        .collect();
    let answer = conn
        .call(
            &Request::Encrypt {
                key_id: key,
                aad: b"aad".to_vec(),
                plaintext: marker.clone(),
            },
            Duration::from_secs(10),
        )
        .expect("encrypt");
    assert!(matches!(answer, Response::Encrypted { .. }), "{answer:?}");
    let answer = conn
        .call(
            &Request::GenerateDataKey {
                key_id: key,
                len: 32,
                aad: b"aad".to_vec(),
            },
            Duration::from_secs(10),
        )
        .expect("generate data key");
    let data_key = match answer {
        Response::DataKey { plaintext, .. } => plaintext,
        other => panic!("{other:?}"),
    };
    drop(conn);
    std::thread::sleep(Duration::from_millis(200));
    let captured = seen.lock().unwrap().clone();
    assert!(
        captured.len() > marker.len(),
        "the relay saw {} bytes",
        captured.len()
    );
    assert_eq!(
        captured[0], 0x16,
        "the first byte is a TLS handshake record"
    );
    assert!(!contains(&captured, &marker[..64]), "plaintext on the wire");
    assert!(
        !contains(&captured, b"keyfort-plaintext"),
        "plaintext on the wire"
    );
    assert_eq!(data_key.len(), 32);
    assert!(
        !contains(&captured, &data_key[..16]),
        "data key on the wire"
    );

    // --- pipelining over TLS, and session resumption (one ClientTls: one ticket cache)
    let addr = c.nodes[leader].client_addr;
    let first = Connection::open(addr, &cred, &opts(tls.clone())).expect("TLS connection");
    assert!(first.is_tls());
    let pending: Vec<_> = (0..1000u32)
        .map(|i| {
            first
                .start(&Request::Encrypt {
                    key_id: key,
                    aad: Vec::new(),
                    plaintext: i.to_le_bytes().to_vec(),
                })
                .expect("pipelined start")
        })
        .collect();
    for p in pending {
        let r = p.wait(Duration::from_secs(30)).expect("pipelined answer");
        assert!(matches!(r, Response::Encrypted { .. }), "{r:?}");
    }
    let again = Connection::open(addr, &cred, &opts(tls.clone())).expect("second connection");
    assert!(
        again.resumed(),
        "the second connection resumed the first one's session"
    );
    drop((first, again));
    // Nodes sharing one IP (and so one server name) each resume their own sessions: the
    // client keeps a session cache per node address.
    let other = c.nodes[(leader + 1) % 3].client_addr;
    // A fresh ClientTls (its caches empty; the one above already met every node).
    let fresh = c.client_tls().unwrap();
    for (i, a) in [other, addr, other, addr].into_iter().enumerate() {
        let conn = Connection::open(a, &cred, &opts(fresh.clone())).expect("alternating");
        assert_eq!(conn.resumed(), i >= 2, "connection {i} to {a}: resumed?");
    }

    // --- clients that must be refused
    match Connection::open(addr, &cred, &opts(None)) {
        Err(ClientError::Tls(TlsFailure::NotTls)) => {}
        other => panic!("plaintext client to a TLS port: {other:?}"),
    }
    let other_tls = other_cluster(&c, &root.path().join("other"));
    let foreign = ClientTls::from_files(&other_tls.join("ca.pem"), None, None, None).unwrap();
    match Connection::open(addr, &cred, &opts(Some(foreign))) {
        Err(ClientError::Tls(TlsFailure::UnknownIssuer)) => {}
        other => panic!("client trusting another cluster's CA: {other:?}"),
    }
    assert_eq!(
        probe(addr, &ca, None, None, true),
        Err("ProtocolVersion".into()),
        "TLS 1.2 offered to the client port"
    );

    // --- peers
    let certs = root.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let id = cluster_id(&c);
    let n1 = format!("n1.{id}.keyfort");
    let p1 = peer_addr(&c, 0);
    let (good, good_key) = issue_node(&c, &c.tls_dir(), &certs, "n2", 2, &[]);
    assert_eq!(
        probe(p1, &ca, Some((&good, &good_key)), Some(&n1), false),
        Ok(())
    );
    assert_eq!(
        probe(p1, &ca, None, Some(&n1), false),
        Err("NoCertificate".into()),
        "peer port without a certificate"
    );
    let (alien, alien_key) = issue_node(&c, &other_tls, &certs, "alien", 2, &[]);
    assert_eq!(
        probe(p1, &ca, Some((&alien, &alien_key)), Some(&n1), false),
        Err("UnknownIssuer".into()),
        "a peer certificate of another cluster's CA"
    );
    let (old, old_key) = issue_node(
        &c,
        &c.tls_dir(),
        &certs,
        "expired",
        2,
        &["--days", "1", "--backdate-days", "3"],
    );
    assert_eq!(
        probe(p1, &ca, Some((&old, &old_key)), Some(&n1), false),
        Err("Expired".into()),
        "an expired peer certificate"
    );
    assert_eq!(
        probe(p1, &ca, Some((&good, &good_key)), None, true),
        Err("ProtocolVersion".into()),
        "TLS 1.2 offered to the peer port"
    );
    let n9 = format!("n9.{id}.keyfort");
    assert_eq!(
        probe(p1, &ca, Some((&good, &good_key)), Some(&n9), false),
        Err("WrongName { expected: \"n9.".to_string() + &id + ".keyfort\" }"),
        "a dialer expecting another raft id"
    );
    // Plaintext to the peer port: the node answers with a TLS alert and closes.
    let mut s = TcpStream::connect(p1).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&[0x4b, 0x46, 0x52, 0x4d, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        .unwrap();
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back);
    assert!(
        back.is_empty() || back[0] == 0x15,
        "plaintext answered with {back:?}"
    );

    // --- revocation: revoke n2.pem, restart node 1 (it reads the list at start).
    common::keyfort_tls(
        &c,
        &[
            "revoke",
            "--tls-dir",
            &c.tls_dir().display().to_string(),
            "--cert",
            &good.display().to_string(),
        ],
    );
    c.sigterm(0, Duration::from_secs(10));
    c.start(0).unwrap();
    let t = std::time::Instant::now();
    while TcpStream::connect(p1).is_err() {
        assert!(
            t.elapsed() < PROGRESS_TIMEOUT,
            "node 1 does not listen again"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let revoked = loop {
        match probe(p1, &ca, Some((&good, &good_key)), Some(&n1), false) {
            Err(e) if e.is_empty() && t.elapsed() < PROGRESS_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(200))
            }
            r => break r,
        }
    };
    assert_eq!(revoked, Err("Revoked".into()), "a revoked peer certificate");
    // The restarted node rejoined its peers over TLS with the list in force.
    assert!(
        c.wait_for(PROGRESS_TIMEOUT, |c| c.leader(0).is_some()),
        "kept in {}",
        keep(root.path())
    );
    client
        .encrypt(key, b"aad", b"after restart")
        .expect("encrypt after restart");
    c.kill_all();
}
