//! Per-partition policy REQUIRE_CLIENT_CERT on real processes (issue 9): a 3-node TLS cluster
//! (one SoftHSM card each, 1 shard). The admin creates partition A with the flag (`keyfort
//! partition create --require-client-cert`, the CLI) and B without (the library); client
//! certificates for A and for B come from `keyfort tls issue-client` with node 2's card.
//!
//! - A's credential without a client certificate → `Server(ClientCertRequired)` at connect, on
//!   every node (the policy is in the replicated config, checked by each node's card);
//! - A's credential with B's certificate (right CA, wrong name) → the same;
//! - A's credential with A's certificate → create, encrypt, decrypt work;
//! - B's credential without a certificate (and with A's) → works: B's policy has no flags.
//!
//! Behaviour only, no timings.

mod common;

use keyfort_bench::local_cluster::{keep_failed as keep, LocalCluster, Security};
use keyfort_net::client::{Client, ClientError, ClientOptions, ClientTls, Connection, Credential};
use keyfort_net::client_proto::ErrorCode;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const SHARDS: u32 = 1;
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(30);

fn keyfort() -> &'static Path {
    env!("CARGO_BIN_EXE_keyfort").as_ref()
}

fn opts(tls: ClientTls) -> ClientOptions {
    ClientOptions {
        request_timeout: Duration::from_secs(10),
        tls: Some(tls),
        ..ClientOptions::default()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `keyfort tls issue-client` with node 2's card: a client certificate naming `partition`.
fn issue_client(
    c: &LocalCluster,
    dir: &Path,
    name: &str,
    partition: &[u8; 16],
) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    let (tls_dir, part) = (c.tls_dir(), hex(partition));
    let path = |p: &'_ Path| p.to_str().expect("UTF-8 test path").to_string();
    let (tls_dir, cert_s, key_s) = (path(&tls_dir), path(&cert), path(&key));
    common::keyfort_tls(
        c,
        &[
            "issue-client",
            "--tls-dir",
            &tls_dir,
            "--partition",
            &part,
            "--out-cert",
            &cert_s,
            "--out-key",
            &key_s,
        ],
    );
    (cert, key)
}

/// `Client::connect`, retried while the answer is retryable (a node still starting, no
/// leader yet) or the nodes do not answer yet; any other answer is returned.
fn connect(
    c: &LocalCluster,
    cred: &Credential,
    opts: &ClientOptions,
) -> Result<Client, ClientError> {
    let t = Instant::now();
    loop {
        match Client::connect(c.client_addrs(), cred.clone(), opts.clone()) {
            Err(ClientError::Server(e))
                if e.code.is_retryable() && t.elapsed() < PROGRESS_TIMEOUT => {}
            Err(ClientError::Io(_) | ClientError::Timeout(_)) if t.elapsed() < PROGRESS_TIMEOUT => {
            }
            r => return r,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn assert_cert_required(
    r: Result<impl std::fmt::Debug, ClientError>,
    partition: &[u8; 16],
    what: &str,
) {
    match r {
        Err(ClientError::Server(e)) => {
            assert_eq!(e.code, ErrorCode::ClientCertRequired, "{what}: {e}");
            assert!(!e.code.is_retryable());
            assert!(
                e.message.contains(&format!("p-{}.", hex(partition)))
                    && e.message.contains("keyfort tls issue-client"),
                "{what}: {}",
                e.message
            );
        }
        other => panic!("{what}: expected ClientCertRequired, got {other:?}"),
    }
}

#[test]
fn a_partition_requiring_client_certs_admits_only_its_certificate() {
    let root = tempfile::tempdir().unwrap();
    let mut c = LocalCluster::create_with(
        root.path(),
        keyfort(),
        env!("CARGO_BIN_EXE_keyfortd").as_ref(),
        3,
        SHARDS,
        0,
        50,
        Security::Tls,
    )
    .unwrap();
    c.start_all().unwrap();
    assert!(
        c.wait_for(PROGRESS_TIMEOUT, |c| (0..SHARDS)
            .all(|s| c.leader(s).is_some())),
        "no leader (kept in {})",
        keep(root.path())
    );
    let ca = c.ca_file().unwrap();
    let server_only = c.client_tls().unwrap().unwrap();
    let admin_path = c.admin_credential(keyfort()).unwrap();
    let admin_cred = Credential::read_file(&admin_path).unwrap();
    let admin = common::connect(
        &c,
        &admin_cred,
        &opts(server_only.clone()),
        PROGRESS_TIMEOUT,
    );

    // A, with the flag, through the CLI.
    let a: [u8; 16] = rand::random();
    let a_cred_path = root.path().join("a.cred");
    let nodes = c
        .client_addrs()
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let out = Command::new(keyfort())
        .args(["partition", "create", "--nodes", &nodes, "--credential"])
        .arg(&admin_path)
        .args(c.conn_args())
        .args(["--timeout-ms", "20000", "--partition", &hex(&a), "--out"])
        .arg(&a_cred_path)
        .arg("--require-client-cert")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "keyfort partition create --require-client-cert: {} (kept in {})",
        String::from_utf8_lossy(&out.stderr),
        keep(root.path())
    );
    let a_cred = Credential::read_file(&a_cred_path).unwrap();
    // B, without, through the library.
    let b: [u8; 16] = rand::random();
    let (_, b_cred) = admin.create_partition_with(b, false).expect("create B");

    let certs = root.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let (a_cert, a_key) = issue_client(&c, &certs, "a", &a);
    let (b_cert, b_key) = issue_client(&c, &certs, "b", &b);
    let with = |cert: &Path, key: &Path| {
        opts(ClientTls::from_files(&ca, Some(cert), Some(key), None).unwrap())
    };

    // --- A without a client certificate: refused at connect, by every node.
    assert_cert_required(
        connect(&c, &a_cred, &opts(server_only.clone())),
        &a,
        "A's credential without a certificate",
    );
    for (i, addr) in c.client_addrs().into_iter().enumerate() {
        assert_cert_required(
            Connection::open(addr, &a_cred, &opts(server_only.clone())),
            &a,
            &format!("A's credential without a certificate on node {}", i + 1),
        );
    }
    // --- A with B's certificate (the cluster CA's, naming another partition): refused.
    assert_cert_required(
        connect(&c, &a_cred, &with(&b_cert, &b_key)),
        &a,
        "A's credential with B's certificate",
    );
    // A second credential of A is held to the same policy.
    let a_cred2 = admin.issue_credential(a).expect("issue A credential");
    assert_cert_required(
        connect(&c, &a_cred2, &opts(server_only.clone())),
        &a,
        "A's second credential without a certificate",
    );

    // --- A with A's certificate: works.
    let client_a = connect(&c, &a_cred, &with(&a_cert, &a_key)).unwrap_or_else(|e| {
        panic!(
            "A's credential with A's certificate: {e} (kept in {})",
            keep(root.path())
        )
    });
    let ka = client_a
        .create_key(b"a", false)
        .expect("create in A")
        .key_id;
    let env = client_a
        .encrypt(ka, b"aad", b"secret of A")
        .expect("encrypt in A");
    assert_eq!(
        client_a.decrypt(ka, b"aad", &env.1).expect("decrypt in A"),
        b"secret of A"
    );
    for (i, addr) in c.client_addrs().into_iter().enumerate() {
        Connection::open(addr, &a_cred, &with(&a_cert, &a_key))
            .unwrap_or_else(|e| panic!("A with A's certificate on node {}: {e}", i + 1));
    }

    // A resumed TLS session still carries A's certificate: the second connection of one
    // ClientTls resumes and is admitted under the policy.
    let shared = with(&a_cert, &a_key);
    let addr = c.client_addrs()[0];
    let first = Connection::open(addr, &a_cred, &shared).expect("A, first connection");
    let second = Connection::open(addr, &a_cred, &shared).expect("A, resumed connection");
    assert!(second.resumed(), "the second connection did not resume");
    drop((first, second));
    // ...and a resumed session without a certificate is still refused.
    let bare = opts(server_only.clone());
    let _ = Connection::open(addr, &b_cred, &bare).expect("B, first connection");
    assert_cert_required(
        Connection::open(addr, &a_cred, &bare),
        &a,
        "A's credential on a resumed session without a certificate",
    );

    // --- B: no flags, so no certificate needed (and any certificate of the CA is fine).
    let client_b = connect(&c, &b_cred, &opts(server_only.clone())).expect("B without a cert");
    let kb = client_b
        .create_key(b"b", false)
        .expect("create in B")
        .key_id;
    client_b
        .encrypt(kb, b"aad", b"secret of B")
        .expect("encrypt in B");
    connect(&c, &b_cred, &with(&a_cert, &a_key)).expect("B with A's certificate");

    // The admin scope is untouched by partition policies.
    connect(&c, &admin_cred, &opts(server_only)).expect("admin without a certificate");
    c.kill_all();
}
