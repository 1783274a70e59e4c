//! The client library (`keyfort_net::client`) against an in-test fake node: a std TcpListener
//! thread that authenticates like a node (hello, challenge, proof checked with
//! `keyfort_hsm::client_answer`), answers Route with configured leaders, records every request
//! payload and answers the rest as each test's handler says (at once, deferred to answer out
//! of order, never, or by dropping the connection).

use keyfort_net::client::{Client, ClientError, ClientOptions, Connection, Credential};
use keyfort_net::client_proto::{
    op, proof_context, ErrorCode, ErrorReply, KeyWritten, Request, Response, Scope,
};
use keyfort_net::frame::{self, flags, FrameHeader};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CLUSTER: [u8; 16] = [7; 16];
const SECRET: [u8; 32] = [42; 32];
const PARTITION: [u8; 16] = [3; 16];

fn cred() -> Credential {
    Credential {
        scope: Scope::Partition(PARTITION),
        client_id: [9; 16],
        secret: SECRET,
    }
}

fn opts() -> ClientOptions {
    ClientOptions {
        request_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_millis(500),
        max_in_flight: 16,
        tls: None,
    }
}

/// What the fake does with one (authenticated) request.
enum Reply {
    Answer(Response),
    Error(ErrorReply),
    /// Keep the answer; it goes out, with the others kept, in reverse order on the next Flush.
    Defer(Response),
    /// Answer this, then every deferred answer, newest first.
    Flush(Response),
    /// Never answer.
    Silent,
    /// Close the connection without answering.
    Drop,
}

/// (connection number, opcode, payload) of each request.
type Log = Mutex<Vec<(usize, u16, Vec<u8>)>>;

/// (connection number, request number on the fake, request).
type Handler = dyn Fn(usize, u64, &Request) -> Reply + Send + Sync;

struct Fake {
    addr: SocketAddr,
    /// (connection number, opcode, payload) of every request after the handshake, Route
    /// included.
    log: Arc<Log>,
    connections: Arc<AtomicUsize>,
}

impl Fake {
    fn start(node_id: u64, leaders: Vec<u64>, handler: Arc<Handler>) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let log: Arc<Log> = Arc::default();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = Arc::new(AtomicU64::new(0));
        let (l, c) = (log.clone(), connections.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let n = c.fetch_add(1, Ordering::SeqCst);
                let (l, h, leaders, counter) =
                    (l.clone(), handler.clone(), leaders.clone(), counter.clone());
                std::thread::spawn(move || {
                    serve(stream, n, node_id, &leaders, &*h, &l, &counter);
                });
            }
        });
        Fake {
            addr,
            log,
            connections,
        }
    }

    /// Payloads of requests with `opcode`.
    fn requests(&self, opcode: u16) -> Vec<(usize, Vec<u8>)> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, o, _)| *o == opcode)
            .map(|(c, _, p)| (*c, p.clone()))
            .collect()
    }
}

fn send(s: &mut TcpStream, h: FrameHeader, payload: &[u8]) -> std::io::Result<()> {
    let mut b = Vec::new();
    frame::encode(h, payload, &mut b).unwrap();
    s.write_all(&b)
}

fn answer_header(h: FrameHeader, error: bool) -> FrameHeader {
    FrameHeader {
        flags: flags::RESPONSE | if error { flags::ERROR } else { 0 },
        ..h
    }
}

fn serve(
    mut s: TcpStream,
    conn: usize,
    node_id: u64,
    leaders: &[u64],
    handler: &Handler,
    log: &Log,
    counter: &AtomicU64,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut challenge = None;
    let mut authenticated = false;
    let mut deferred: Vec<(FrameHeader, Vec<u8>)> = Vec::new();
    loop {
        let got = match frame::decode(&buf) {
            Ok(Some((f, n))) => Some((f.header, f.payload.to_vec(), n)),
            Ok(None) => None,
            Err(_) => return,
        };
        let Some((h, payload, n)) = got else {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
            continue;
        };
        buf.drain(..n);
        let req = Request::decode(h.opcode, &payload).expect("client sent a decodable request");
        let ok = |r: &Response| (answer_header(h, false), r.encode());
        let out = match &req {
            Request::Hello {
                scope, client_id, ..
            } => {
                assert_eq!(h.request_id, 1, "hello is request 1");
                let c: [u8; 32] = rand::random();
                challenge = Some((c, *scope, *client_id));
                ok(&Response::Challenge {
                    challenge: c,
                    cluster_id: CLUSTER,
                    node_id,
                })
            }
            Request::Proof { response } => {
                assert_eq!(h.request_id, 2, "proof is request 2");
                let (c, scope, client_id) = challenge.expect("hello first");
                let want = keyfort_hsm::client_answer(
                    &SECRET,
                    &c,
                    &proof_context(&CLUSTER, node_id, &scope, &client_id),
                );
                if *response != want {
                    let e = ErrorReply::new(ErrorCode::Unauthenticated, "wrong proof");
                    let _ = send(&mut s, answer_header(h, true), &e.encode());
                    return;
                }
                authenticated = true;
                ok(&Response::Accepted)
            }
            _ if !authenticated => return,
            _ => {
                log.lock().unwrap().push((conn, h.opcode, payload.clone()));
                if let Request::Route = req {
                    ok(&Response::Route {
                        node_id,
                        leaders: leaders.to_vec(),
                    })
                } else {
                    let k = counter.fetch_add(1, Ordering::SeqCst);
                    match handler(conn, k, &req) {
                        Reply::Answer(r) => ok(&r),
                        Reply::Error(e) => (answer_header(h, true), e.encode()),
                        Reply::Defer(r) => {
                            deferred.push(ok(&r));
                            continue;
                        }
                        Reply::Flush(r) => {
                            let (fh, fp) = ok(&r);
                            if send(&mut s, fh, &fp).is_err() {
                                return;
                            }
                            while let Some((dh, dp)) = deferred.pop() {
                                if send(&mut s, dh, &dp).is_err() {
                                    return;
                                }
                            }
                            continue;
                        }
                        Reply::Silent => continue,
                        Reply::Drop => return,
                    }
                }
            }
        };
        if send(&mut s, out.0, &out.1).is_err() {
            return;
        }
    }
}

fn written(key_id: [u8; 16]) -> Response {
    Response::KeyWritten(KeyWritten {
        key_id,
        version: 1,
        lsn: 10,
        duplicate: false,
        backup: Vec::new(),
    })
}

/// Echoes an encrypt's plaintext as its envelope, so each answer names its request.
fn echo(req: &Request) -> Response {
    match req {
        Request::Encrypt { plaintext, .. } => Response::Encrypted {
            version: 1,
            envelope: plaintext.clone(),
        },
        Request::KeyCreate { .. } | Request::KeyDelete { .. } => written([5; 16]),
        other => panic!("unexpected request {other:?}"),
    }
}

fn encrypt(p: &[u8]) -> Request {
    Request::Encrypt {
        key_id: [1; 16],
        aad: Vec::new(),
        plaintext: p.to_vec(),
    }
}

#[test]
fn authenticates_and_learns_the_node() {
    let fake = Fake::start(4, vec![4], Arc::new(|_, _, r| Reply::Answer(echo(r))));
    let c = Connection::open(fake.addr, &cred(), &opts()).expect("open");
    assert_eq!(c.node_id(), 4);
    assert_eq!(c.cluster_id(), CLUSTER);
    assert_eq!(c.addr(), fake.addr);
    let r = c.call(&Request::Route, Duration::from_secs(2)).unwrap();
    assert_eq!(
        r,
        Response::Route {
            node_id: 4,
            leaders: vec![4]
        }
    );
    assert!(!c.is_closed());
    drop(c);

    let client = Client::connect(vec![fake.addr], cred(), opts()).expect("client");
    assert_eq!(client.nodes(), &[fake.addr]);
    assert_eq!(
        client.encrypt([1; 16], b"", b"hi").unwrap(),
        (1, b"hi".to_vec())
    );
}

#[test]
fn wrong_secret_is_unauthenticated() {
    let fake = Fake::start(1, vec![1], Arc::new(|_, _, r| Reply::Answer(echo(r))));
    let mut bad = cred();
    bad.secret[0] ^= 1;
    let e = Connection::open(fake.addr, &bad, &opts()).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unauthenticated), "{e:?}");
    assert!(matches!(e, ClientError::Server(_)));
    let e = Client::connect(vec![fake.addr], bad, opts()).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unauthenticated), "{e:?}");
}

#[test]
fn pipelined_answers_out_of_order() {
    // The first two encrypts are answered only after the third, newest first.
    let fake = Fake::start(
        1,
        vec![1],
        Arc::new(|_, k, r| match k {
            0 | 1 => Reply::Defer(echo(r)),
            _ => Reply::Flush(echo(r)),
        }),
    );
    let c = Connection::open(fake.addr, &cred(), &opts()).unwrap();
    let p: Vec<_> = [b"one", b"two", b"six"]
        .iter()
        .map(|m| c.start(&encrypt(&m[..])).unwrap())
        .collect();
    let ids: Vec<u64> = p.iter().map(|p| p.request_id()).collect();
    assert_eq!(ids, vec![3, 4, 5], "ids after the handshake's 1 and 2");
    let got: Vec<Response> = p
        .into_iter()
        .map(|p| p.wait(Duration::from_secs(2)).unwrap())
        .collect();
    for (r, m) in got.iter().zip([b"one", b"two", b"six"]) {
        assert_eq!(
            *r,
            Response::Encrypted {
                version: 1,
                envelope: m.to_vec()
            }
        );
    }
}

#[test]
fn max_in_flight_refuses_locally() {
    let fake = Fake::start(1, vec![1], Arc::new(|_, _, _| Reply::Silent));
    let o = ClientOptions {
        max_in_flight: 2,
        ..opts()
    };
    let c = Connection::open(fake.addr, &cred(), &o).unwrap();
    let a = c.start(&encrypt(b"a")).unwrap();
    let _b = c.start(&encrypt(b"b")).unwrap();
    let e = c.start(&encrypt(b"c")).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Overloaded));
    // Giving one up frees its place; only two requests ever reached the node.
    drop(a);
    let _c = c.start(&encrypt(b"c")).unwrap();
    let t = Instant::now();
    while fake.requests(op::ENCRYPT).len() < 3 {
        assert!(t.elapsed() < Duration::from_secs(2));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(fake.requests(op::ENCRYPT).len(), 3);
}

#[test]
fn retry_error_is_retried_with_identical_bytes() {
    let fake = Fake::start(
        1,
        vec![1],
        Arc::new(|_, k, r| {
            if k == 0 {
                let mut e = ErrorReply::new(ErrorCode::Retry, "leader changed");
                e.leader = 1;
                Reply::Error(e)
            } else {
                Reply::Answer(echo(r))
            }
        }),
    );
    let client = Client::connect(vec![fake.addr], cred(), opts()).unwrap();
    let w = client.create_key(b"meta", false).unwrap();
    assert_eq!(w.key_id, [5; 16]);
    let creates = fake.requests(op::KEY_CREATE);
    assert_eq!(creates.len(), 2);
    assert_eq!(creates[0].1, creates[1].1, "same idempotency id and bytes");
    // The Retry error made the client refresh its route.
    assert!(fake.requests(op::ROUTE).len() >= 2);
}

#[test]
fn non_retryable_error_is_returned_at_once() {
    let fake = Fake::start(
        1,
        vec![1],
        Arc::new(|_, _, _| Reply::Error(ErrorReply::new(ErrorCode::NotFound, "no key"))),
    );
    let client = Client::connect(vec![fake.addr], cred(), opts()).unwrap();
    let e = client.delete_key([1; 16]).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound));
    assert_eq!(fake.requests(op::KEY_DELETE).len(), 1);
}

#[test]
fn lost_connection_reconnects_and_retries() {
    let fake = Fake::start(
        1,
        vec![1],
        Arc::new(|_, k, r| {
            if k == 0 {
                Reply::Drop
            } else {
                Reply::Answer(echo(r))
            }
        }),
    );
    let client = Client::connect(vec![fake.addr], cred(), opts()).unwrap();
    client.delete_key([2; 16]).unwrap();
    let deletes = fake.requests(op::KEY_DELETE);
    assert_eq!(deletes.len(), 2);
    assert_ne!(
        deletes[0].0, deletes[1].0,
        "the retry went on a new connection"
    );
    assert_eq!(deletes[0].1, deletes[1].1, "same idempotency id and bytes");
    assert_eq!(fake.connections.load(Ordering::SeqCst), 2);
}

#[test]
fn closed_connection_fails_outstanding_requests() {
    let fake = Fake::start(1, vec![1], Arc::new(|_, _, _| Reply::Drop));
    let c = Connection::open(fake.addr, &cred(), &opts()).unwrap();
    let e = c.call(&encrypt(b"x"), Duration::from_secs(2)).unwrap_err();
    assert!(
        matches!(e, ClientError::Closed | ClientError::Io(_)),
        "{e:?}"
    );
    let t = Instant::now();
    while !c.is_closed() {
        assert!(t.elapsed() < Duration::from_secs(2));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(matches!(c.start(&encrypt(b"y")), Err(ClientError::Closed)));
}

#[test]
fn timeouts() {
    let fake = Fake::start(1, vec![1], Arc::new(|_, _, _| Reply::Silent));
    let c = Connection::open(fake.addr, &cred(), &opts()).unwrap();
    let t = Instant::now();
    let e = c
        .call(&encrypt(b"x"), Duration::from_millis(100))
        .unwrap_err();
    assert!(matches!(e, ClientError::Timeout(d) if d == Duration::from_millis(100)));
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(!c.is_closed(), "a timeout leaves the connection open");

    let o = ClientOptions {
        request_timeout: Duration::from_millis(200),
        ..opts()
    };
    let client = Client::connect(vec![fake.addr], cred(), o).unwrap();
    let t = Instant::now();
    let e = client.encrypt([1; 16], b"", b"x").unwrap_err();
    assert!(matches!(e, ClientError::Timeout(_)), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(1));
}

#[test]
fn routes_to_the_shard_leader() {
    // Node 1 says node 2 leads the (one) shard: the client connects to node 1 first, then
    // finds node 2 and sends key operations there.
    let h: Arc<Handler> = Arc::new(|_, _, r| Reply::Answer(echo(r)));
    let n1 = Fake::start(1, vec![2], h.clone());
    let n2 = Fake::start(2, vec![2], h);
    let client = Client::connect(vec![n1.addr, n2.addr], cred(), opts()).unwrap();
    for _ in 0..3 {
        client.encrypt([1; 16], b"", b"x").unwrap();
    }
    assert_eq!(n1.requests(op::ENCRYPT).len(), 0);
    assert_eq!(n2.requests(op::ENCRYPT).len(), 3);
}

#[test]
fn pending_is_a_future() {
    let fake = Fake::start(
        1,
        vec![1],
        Arc::new(|_, k, r| {
            if k == 0 {
                Reply::Defer(echo(r))
            } else {
                Reply::Flush(echo(r))
            }
        }),
    );
    let c = Arc::new(Connection::open(fake.addr, &cred(), &opts()).unwrap());
    let first = c.start(&encrypt(b"first")).unwrap();
    // The answer comes only after a second request, sent from another thread while this one
    // is parked in the executor.
    let c2 = c.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        c2.call(&encrypt(b"second"), Duration::from_secs(2))
            .unwrap()
    });
    let r = futures_lite::future::block_on(first).unwrap();
    assert_eq!(
        r,
        Response::Encrypted {
            version: 1,
            envelope: b"first".to_vec()
        }
    );
    t.join().unwrap();
}

#[test]
fn credential_text_round_trip() {
    let mut secret = [0u8; 32];
    for (i, b) in secret.iter_mut().enumerate() {
        *b = i as u8 * 7;
    }
    for scope in [Scope::Admin, Scope::Partition([0xab; 16])] {
        let c = Credential {
            scope,
            client_id: [0x1f; 16],
            secret,
        };
        let text = c.to_text();
        assert_eq!(Credential::from_text(&text).unwrap(), c);
        assert!(
            !format!("{c:?}").contains("070e15"),
            "Debug shows no secret"
        );
    }
    let c = cred();
    assert_eq!(
        c.to_text(),
        format!(
            "scope=partition:{}\nclient_id={}\nsecret={}\n",
            "03".repeat(16),
            "09".repeat(16),
            "2a".repeat(32)
        )
    );
    // Comments and blank lines are fine.
    let commented = format!("# a credential\n\n{}", c.to_text());
    assert_eq!(Credential::from_text(&commented).unwrap(), c);
}

#[test]
fn bad_credential_text_is_a_typed_error() {
    let good = cred().to_text();
    let lines: Vec<&str> = good.lines().collect();
    let cases = [
        String::new(),
        "garbage".to_string(),
        lines[..2].join("\n"),
        format!("{good}{}\n", lines[0]),
        good.replace("scope=partition:", "scope=tenant:"),
        good.replace("client_id=0909", "client_id=09"),
        good.replace("secret=2a", "secret=zz"),
        good.replace("client_id", "clientid"),
        format!("{good}extra=1\n"),
        "scope=partition:é\nclient_id=\nsecret=".to_string(),
    ];
    for t in cases {
        match Credential::from_text(&t) {
            Err(ClientError::Credential(_)) => {}
            other => panic!("{t:?} gave {other:?}"),
        }
    }
}

#[test]
fn credential_file_is_private() {
    let dir = std::env::temp_dir().join(format!("keyfort-client-lib-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cred");
    let c = cred();
    c.write_file(&path).unwrap();
    assert_eq!(Credential::read_file(&path).unwrap(), c);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // Overwriting replaces it; nothing temporary is left beside it.
    let admin = Credential {
        scope: Scope::Admin,
        ..c
    };
    admin.write_file(&path).unwrap();
    assert_eq!(Credential::read_file(&path).unwrap(), admin);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    assert!(matches!(
        Credential::read_file(&dir.join("missing")),
        Err(ClientError::Credential(_))
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A node whose handshake refuses every client with `Unauthenticated` (a node that has not
/// applied the partition yet looks like this).
fn refusing_node() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                let mut have = 0;
                loop {
                    match frame::decode(&buf[..have]) {
                        Ok(Some((f, _))) => {
                            let e = ErrorReply::new(ErrorCode::Unauthenticated, "not here");
                            let _ = send(&mut s, answer_header(f.header, true), &e.encode());
                            return;
                        }
                        Ok(None) => {}
                        Err(_) => return,
                    }
                    match s.read(&mut buf[have..]) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => have += n,
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn a_node_refusing_the_handshake_is_skipped_for_the_others() {
    let fake = Fake::start(2, vec![2], Arc::new(|_, _, r| Reply::Answer(echo(r))));
    let refuser = refusing_node();
    let c = Client::connect(vec![refuser, fake.addr], cred(), opts()).unwrap();
    for _ in 0..3 {
        c.encrypt([1; 16], b"", b"hi").unwrap();
    }
    // Refused everywhere: the refusal is the answer.
    let e = Client::connect(vec![refuser, refusing_node()], cred(), opts()).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unauthenticated), "{e:?}");
}
