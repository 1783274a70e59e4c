//! A packet capture of loopback traffic (`tcpdump -i lo`, installed by scripts/install-deps.sh;
//! the test runs as root like CI) while a client encrypts a known plaintext and asks for a
//! data key, on every client and peer port of a 3-node cluster:
//!
//! - a TLS cluster: neither the plaintext nor the data key is anywhere in the capture (client
//!   connections, raft traffic between the nodes, everything on those ports);
//! - the same on a plaintext (`insecure_loopback`) cluster, as the control: the plaintext *is*
//!   in its capture, so the capture sees payload bytes and the first check means something.
//!
//! Behaviour only, no timings.

mod common;

use keyfort_bench::local_cluster::{keep_failed as keep, LocalCluster, Security};
use keyfort_net::client::{ClientOptions, Credential};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(30);

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// tcpdump on `lo` for `ports`, writing `file`; returns once it is listening.
fn start_capture(ports: &[u16], file: &Path) -> Child {
    let filter = ports
        .iter()
        .map(|p| format!("port {p}"))
        .collect::<Vec<_>>()
        .join(" or ");
    let mut child = Command::new("tcpdump")
        // A 64 MiB capture buffer, so nothing is dropped while other tests run.
        .args(["-i", "lo", "-U", "-B", "65536", "-s", "0", "-w"])
        .arg(file)
        .arg(format!("tcp and ({filter})"))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("tcpdump (scripts/install-deps.sh installs it; capturing needs root)");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("listening on"), "tcpdump: {line}");
    std::thread::spawn(move || {
        let mut rest = String::new();
        while err.read_line(&mut rest).unwrap_or(0) > 0 {}
    });
    child
}

/// Stops tcpdump once it has written everything it received: SIGTERM makes it drop the packets
/// it has not processed yet (on a loaded machine, most of them), so wait until the file stops
/// growing first.
fn stop_capture(mut child: Child, file: &Path) {
    let size = || std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    let t = std::time::Instant::now();
    let mut last = size();
    let mut still = 0;
    while still < 3 && t.elapsed() < TIMEOUT {
        std::thread::sleep(Duration::from_millis(300));
        let now = size();
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
}

/// Runs encrypt and generate-data-key on a fresh cluster of `security` under a capture;
/// returns (capture bytes, plaintext, data key).
fn captured(root: &Path, security: Security) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let mut c = LocalCluster::create_with(
        root,
        env!("CARGO_BIN_EXE_keyfort").as_ref(),
        env!("CARGO_BIN_EXE_keyfortd").as_ref(),
        3,
        1,
        0,
        50,
        security,
    )
    .unwrap();
    let mut ports: Vec<u16> = c.client_addrs().iter().map(|a| a.port()).collect();
    ports.extend(
        c.nodes
            .iter()
            .map(|n| n.peer_addr.parse::<std::net::SocketAddr>().unwrap().port()),
    );
    let file = root.join("lo.pcap");
    let cap = start_capture(&ports, &file);
    c.start_all().unwrap();
    assert!(
        c.wait_for(TIMEOUT, |c| c.leader(0).is_some()),
        "no leader (kept in {})",
        keep(root)
    );
    let opts = ClientOptions {
        request_timeout: Duration::from_secs(10),
        tls: c.client_tls().unwrap(),
        ..ClientOptions::default()
    };
    let admin = Credential::read_file(
        &c.admin_credential(env!("CARGO_BIN_EXE_keyfort").as_ref())
            .unwrap(),
    )
    .unwrap();
    let admin = common::connect(&c, &admin, &opts, TIMEOUT);
    let (_, cred) = common::partition_on(&admin, 0, 1);
    let client = common::connect(&c, &cred, &opts, TIMEOUT);
    let key = client
        .create_key(b"captured", false)
        .expect("create")
        .key_id;
    let plaintext: Vec<u8> = b"capture-me-if-you-can-"
        .iter()
        .cycle()
        .take(2048)
        .copied()
        .collect();
    let (_, envelope) = client.encrypt(key, b"aad", &plaintext).expect("encrypt");
    assert_eq!(
        client.decrypt(key, b"aad", &envelope).expect("decrypt"),
        plaintext
    );
    let (_, data_key, _) = client.generate_data_key(key, 32, b"aad").expect("data key");
    // Raft heartbeats and the nodes' own traffic go on meanwhile.
    std::thread::sleep(Duration::from_millis(500));
    drop((client, admin));
    c.kill_all();
    stop_capture(cap, &file);
    let bytes = std::fs::read(&file).unwrap();
    (bytes, plaintext, data_key)
}

#[test]
fn loopback_capture_holds_no_plaintext_or_data_key_under_tls() {
    let root = tempfile::tempdir().unwrap();
    let (pcap, plaintext, data_key) = captured(&root.path().join("tls"), Security::Tls);
    assert!(pcap.len() > 20_000, "capture of {} bytes", pcap.len());
    assert!(
        !contains(&pcap, &plaintext[..32]),
        "plaintext on the wire (kept in {})",
        keep(root.path())
    );
    assert!(
        !contains(&pcap, b"capture-me-if-you-can"),
        "plaintext on the wire"
    );
    assert!(!contains(&pcap, &data_key[..16]), "data key on the wire");

    // The control: the same on plaintext shows the capture sees what crosses.
    let (pcap, plaintext, data_key) =
        captured(&root.path().join("plain"), Security::InsecureLoopback);
    assert!(
        contains(&pcap, &plaintext[..32]),
        "the control capture did not see the plaintext: the capture is blind"
    );
    assert!(
        contains(&pcap, &data_key[..16]),
        "the control capture missed the data key"
    );
}
