//! The client library over TLS (`ClientOptions::tls`, `ClientTls`): certificates made here with
//! rcgen, and an in-test TLS node — a std thread running a rustls `ServerConnection` (the
//! crate's own `tls::server_config`) that authenticates like a node (hello, challenge, proof)
//! and answers `Encrypt` with its plaintext as the envelope. Also the refusals: plaintext to a
//! non-loopback address, a node certificate of another CA or name, a missing client
//! certificate, and TLS on one side only (both ways), each typed and never retried.

use keyfort_net::client::{
    Client, ClientError, ClientOptions, ClientTls, Connection, Credential, Pending,
};
use keyfort_net::client_proto::{proof_context, Request, Response, Scope};
use keyfort_net::frame::{self, flags, FrameHeader};
use keyfort_net::tls::{self, TlsFailure, TlsIdentity, Trust};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use test_ca::Ca;

mod test_ca;

const CLUSTER: [u8; 16] = [7; 16];
const SECRET: [u8; 32] = [42; 32];
const NODE_ID: u64 = 1;

fn cred() -> Credential {
    Credential {
        scope: Scope::Partition([3; 16]),
        client_id: [9; 16],
        secret: SECRET,
    }
}

// ---- certificates ----

fn node_names() -> Vec<String> {
    vec![
        tls::node_name(&CLUSTER, NODE_ID),
        tls::cluster_name(&CLUSTER),
        "127.0.0.1".into(),
    ]
}

fn node_identity(ca: &Ca) -> TlsIdentity {
    let names = node_names();
    let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    ca.issue(&refs).0
}

/// A directory of its own under the system temp dir.
fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "keyfort-client-tls-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tls_opts(tls: ClientTls) -> ClientOptions {
    ClientOptions {
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        max_in_flight: 2048,
        tls: Some(tls),
    }
}

fn client_tls(ca: &Ca, identity: Option<TlsIdentity>, name: Option<String>) -> ClientTls {
    ClientTls::new(tls::client_config(&ca.trust(), identity).unwrap(), name)
}

// ---- the TLS node ----

struct TlsNode {
    addr: SocketAddr,
    /// Handshakes that resumed a session.
    resumed: Arc<AtomicUsize>,
    /// Requests answered after the handshake.
    answered: Arc<AtomicUsize>,
}

impl TlsNode {
    /// A node presenting `identity`; client certificates of `trust` required or optional.
    /// With `key_update_after`, the node updates its traffic keys (and asks the client to
    /// update its own) after that many requests on a connection.
    fn start(
        trust: &Trust,
        identity: TlsIdentity,
        require_client_cert: bool,
        key_update_after: Option<usize>,
    ) -> TlsNode {
        let config = tls::server_config(trust, identity, require_client_cert).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let resumed = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let (r, a) = (resumed.clone(), answered.clone());
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { return };
                let (config, r, a) = (config.clone(), r.clone(), a.clone());
                std::thread::spawn(move || serve_tls(tcp, config, key_update_after, &r, &a));
            }
        });
        TlsNode {
            addr,
            resumed,
            answered,
        }
    }
}

fn answer(h: FrameHeader, r: &Response, out: &mut Vec<u8>) {
    let h = FrameHeader {
        flags: flags::RESPONSE,
        ..h
    };
    frame::encode(h, &r.encode(), out).unwrap();
}

fn serve_tls(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    key_update_after: Option<usize>,
    resumed: &AtomicUsize,
    answered: &AtomicUsize,
) {
    let control = tcp.try_clone().unwrap();
    let conn = rustls::ServerConnection::new(config).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    let mut out = Vec::new();
    let mut challenge = None;
    let mut handshake_seen = false;
    let mut requests = 0usize;
    loop {
        let n = match s.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => n,
            Err(_) => {
                // A refused handshake: the alert is written; hang up without a reset (the
                // client reads the alert, not ECONNRESET).
                let _ = s.flush();
                let _ = control.shutdown(Shutdown::Write);
                let _ = control.set_read_timeout(Some(Duration::from_millis(500)));
                let mut sink = [0u8; 4096];
                while matches!(s.sock.read(&mut sink), Ok(k) if k > 0) {}
                return;
            }
        };
        if !handshake_seen {
            handshake_seen = true;
            if s.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                resumed.fetch_add(1, Ordering::SeqCst);
            }
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut used = 0;
        while let Some((f, len)) = frame::decode(&buf[used..]).expect("client frames decode") {
            used += len;
            let h = f.header;
            let req = Request::decode(h.opcode, f.payload).expect("decodable request");
            match req {
                Request::Hello {
                    scope, client_id, ..
                } => {
                    let c: [u8; 32] = rand::random();
                    challenge = Some((c, scope, client_id));
                    answer(
                        h,
                        &Response::Challenge {
                            challenge: c,
                            cluster_id: CLUSTER,
                            node_id: NODE_ID,
                        },
                        &mut out,
                    );
                }
                Request::Proof { response } => {
                    let (c, scope, client_id) = challenge.expect("hello first");
                    let want = keyfort_hsm::client_answer(
                        &SECRET,
                        &c,
                        &proof_context(&CLUSTER, NODE_ID, &scope, &client_id),
                    );
                    assert_eq!(response, want, "proof");
                    answer(h, &Response::Accepted, &mut out);
                }
                Request::Encrypt { plaintext, .. } => {
                    answer(
                        h,
                        &Response::Encrypted {
                            version: 1,
                            envelope: plaintext,
                        },
                        &mut out,
                    );
                    requests += 1;
                    answered.fetch_add(1, Ordering::SeqCst);
                    if key_update_after == Some(requests) {
                        // Writes what is answered so far under the old keys first.
                        if s.write_all(&out).is_err() {
                            return;
                        }
                        out.clear();
                        s.conn.refresh_traffic_keys().unwrap();
                    }
                }
                other => panic!("unexpected request {other:?}"),
            }
        }
        buf.drain(..used);
        if !out.is_empty() {
            if s.write_all(&out).and_then(|_| s.flush()).is_err() {
                return;
            }
            out.clear();
        }
    }
}

fn encrypt(i: u32) -> Request {
    Request::Encrypt {
        key_id: [1; 16],
        aad: Vec::new(),
        plaintext: i.to_le_bytes().to_vec(),
    }
}

fn tls_failure(e: ClientError) -> TlsFailure {
    match e {
        ClientError::Tls(f) => f,
        other => panic!("expected a TLS failure, got {other:?}"),
    }
}

// ---- tests ----

#[test]
fn plaintext_to_a_non_loopback_address_is_refused_before_connecting() {
    let addr: SocketAddr = "10.255.255.1:1".parse().unwrap();
    let t = Instant::now();
    let e = Connection::open(addr, &cred(), &ClientOptions::default()).unwrap_err();
    assert!(matches!(e, ClientError::Insecure(_)), "{e:?}");
    assert!(e.to_string().contains("loopback"), "{e}");
    // A Client refuses at once too (not retried until the request timeout).
    let e = Client::connect(vec![addr], cred(), ClientOptions::default()).unwrap_err();
    assert!(matches!(e, ClientError::Insecure(_)), "{e:?}");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // An IPv4-mapped loopback address is loopback.
    let mapped: SocketAddr = "[::ffff:127.0.0.1]:1".parse().unwrap();
    let e = Connection::open(mapped, &cred(), &ClientOptions::default()).unwrap_err();
    assert!(!matches!(e, ClientError::Insecure(_)), "{e:?}");
}

#[test]
fn pipelined_requests_over_tls_with_a_key_update_and_resumption() {
    let ca = Ca::new();
    let node = TlsNode::start(&ca.trust(), node_identity(&ca), false, Some(500));
    // Verified by the cluster name (every node's certificate carries it).
    let t = client_tls(&ca, None, Some(tls::cluster_name(&CLUSTER)));
    let c = Connection::open(node.addr, &cred(), &tls_opts(t.clone())).unwrap();
    assert!(c.is_tls());
    assert!(!c.resumed(), "first connection: a full handshake");
    assert_eq!(c.node_id(), NODE_ID);
    assert_eq!(c.cluster_id(), CLUSTER);
    let pending: Vec<Pending> = (0..1000).map(|i| c.start(&encrypt(i)).unwrap()).collect();
    for (i, p) in pending.into_iter().enumerate() {
        match p.wait(Duration::from_secs(10)).unwrap() {
            Response::Encrypted { envelope, .. } => {
                assert_eq!(envelope, (i as u32).to_le_bytes(), "answer {i}")
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(node.answered.load(Ordering::SeqCst), 1000);
    // After the key update the session still carries requests both ways.
    for i in 0..10 {
        c.call(&encrypt(i), Duration::from_secs(5)).unwrap();
    }
    assert!(!c.is_closed());

    // A second connection of the same ClientTls resumes the session.
    let c2 = Connection::open(node.addr, &cred(), &tls_opts(t.clone())).unwrap();
    assert!(c2.resumed(), "second connection resumed");
    assert_eq!(node.resumed.load(Ordering::SeqCst), 1);
    c2.call(&encrypt(7), Duration::from_secs(5)).unwrap();

    // One TLS connection written by many threads at once.
    let client = Connection::open(node.addr, &cred(), &tls_opts(t)).unwrap();
    let client = Arc::new(client);
    let threads: Vec<_> = (0..4)
        .map(|k| {
            let client = client.clone();
            std::thread::spawn(move || {
                let ps: Vec<Pending> = (0..200)
                    .map(|i| client.start(&encrypt(k * 1000 + i)).unwrap())
                    .collect();
                for (i, p) in ps.into_iter().enumerate() {
                    match p.wait(Duration::from_secs(10)).unwrap() {
                        Response::Encrypted { envelope, .. } => {
                            assert_eq!(envelope, (k * 1000 + i as u32).to_le_bytes())
                        }
                        other => panic!("{other:?}"),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn the_ip_address_dialed_is_verified_by_default_and_a_wrong_name_is_typed() {
    let ca = Ca::new();
    let node = TlsNode::start(&ca.trust(), node_identity(&ca), false, None);
    let c = Connection::open(node.addr, &cred(), &tls_opts(client_tls(&ca, None, None)))
        .expect("the certificate names 127.0.0.1");
    c.call(&encrypt(1), Duration::from_secs(5)).unwrap();
    let other = tls::node_name(&CLUSTER, 2);
    let e = Connection::open(
        node.addr,
        &cred(),
        &tls_opts(client_tls(&ca, None, Some(other.clone()))),
    )
    .unwrap_err();
    assert_eq!(
        tls_failure(e),
        TlsFailure::WrongName { expected: other },
        "a node certificate of another raft id"
    );
}

#[test]
fn a_node_certificate_of_another_ca_is_unknown_issuer() {
    let (ours, theirs) = (Ca::new(), Ca::new());
    let node = TlsNode::start(&theirs.trust(), node_identity(&theirs), false, None);
    let t = Instant::now();
    let e =
        Connection::open(node.addr, &cred(), &tls_opts(client_tls(&ours, None, None))).unwrap_err();
    assert_eq!(tls_failure(e), TlsFailure::UnknownIssuer);
    // Not retried by a Client: it fails at once, well within the request timeout.
    let e = Client::connect(
        vec![node.addr],
        cred(),
        tls_opts(client_tls(&ours, None, None)),
    )
    .unwrap_err();
    assert_eq!(tls_failure(e), TlsFailure::UnknownIssuer);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[test]
fn client_certificates_from_files_and_a_missing_one() {
    let ca = Ca::new();
    let node = TlsNode::start(&ca.trust(), node_identity(&ca), true, None);
    let dir = temp_dir("mtls");
    let (_, cert_pem, key_pem) = ca.issue(&[&tls::partition_name(&CLUSTER, &[3; 16])]);
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("client.pem"), cert_pem).unwrap();
    std::fs::write(dir.join("client.key"), key_pem).unwrap();
    let (ca_f, cert_f, key_f) = (
        dir.join("ca.pem"),
        dir.join("client.pem"),
        dir.join("client.key"),
    );

    let with_cert =
        ClientTls::from_files(&ca_f, Some(&cert_f), Some(&key_f), None).expect("from files");
    let c = Connection::open(node.addr, &cred(), &tls_opts(with_cert)).unwrap();
    c.call(&encrypt(3), Duration::from_secs(5)).unwrap();

    let without = ClientTls::from_files(&ca_f, None, None, None).unwrap();
    let e = Connection::open(node.addr, &cred(), &tls_opts(without)).unwrap_err();
    assert_eq!(tls_failure(e), TlsFailure::NoCertificate);

    // Bad material is a configuration error.
    let e = ClientTls::from_files(&ca_f, Some(&cert_f), None, None).unwrap_err();
    assert!(matches!(e, ClientError::TlsConfig(_)), "{e:?}");
    let e = ClientTls::from_files(&dir.join("missing.pem"), None, None, None).unwrap_err();
    assert!(matches!(e, ClientError::TlsConfig(_)), "{e:?}");
    let e = ClientTls::from_files(&key_f, None, None, None).unwrap_err();
    assert!(
        matches!(e, ClientError::TlsConfig(_)),
        "a key is no CA: {e:?}"
    );
    let e = ClientTls::from_files(&ca_f, None, None, Some("not a name!".into())).unwrap_err();
    assert!(matches!(e, ClientError::TlsConfig(_)), "{e:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A plain TCP listener: each connection reads what the client sends first, then `reply`s
/// (maybe nothing) and hangs up.
fn plain_listener(reply: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                let mut b = [0u8; 4096];
                let _ = s.read(&mut b);
                let _ = s.write_all(reply);
                let _ = s.shutdown(Shutdown::Write);
                // Reads the rest so the close is a FIN, not a reset.
                while matches!(s.read(&mut b), Ok(k) if k > 0) {}
            });
        }
    });
    addr
}

#[test]
fn tls_to_a_plaintext_port_is_not_tls() {
    let ca = Ca::new();
    let t = Instant::now();
    // A port that hangs up on the ClientHello (a keyfort node's plaintext port does).
    let closes = plain_listener(b"");
    let e = Connection::open(closes, &cred(), &tls_opts(client_tls(&ca, None, None))).unwrap_err();
    assert_eq!(tls_failure(e), TlsFailure::NotTls);
    // A port that answers something that is not TLS.
    let garbage = plain_listener(b"KFRM this is not a TLS record at all, not even close");
    let e = Connection::open(garbage, &cred(), &tls_opts(client_tls(&ca, None, None))).unwrap_err();
    assert_eq!(tls_failure(e), TlsFailure::NotTls);
    // Not retried by a Client.
    let e =
        Client::connect(vec![closes], cred(), tls_opts(client_tls(&ca, None, None))).unwrap_err();
    assert_eq!(tls_failure(e), TlsFailure::NotTls);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[test]
fn plaintext_to_a_tls_port_is_not_tls() {
    let opts = ClientOptions {
        request_timeout: Duration::from_secs(5),
        ..ClientOptions::default()
    };
    // A TLS node's answer to a frame: a fatal decode_error alert, then the close.
    let alert = plain_listener(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x0a]);
    let t = Instant::now();
    let e = Connection::open(alert, &cred(), &opts).unwrap_err();
    assert_eq!(tls_failure(e), TlsFailure::NotTls);
    let e = Client::connect(vec![alert], cred(), opts.clone()).unwrap_err();
    assert_eq!(tls_failure(e), TlsFailure::NotTls);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // And a real rustls server's answer to plaintext.
    let ca = Ca::new();
    let node = TlsNode::start(&ca.trust(), node_identity(&ca), false, None);
    let e = Connection::open(node.addr, &cred(), &opts).unwrap_err();
    assert_eq!(tls_failure(e), TlsFailure::NotTls);
}
