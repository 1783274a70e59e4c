//! Helpers shared by the multi-process tests (`service_procs`, `restore_procs`,
//! `metrics_procs`, the TLS tests).
#![allow(dead_code)]

use keyfort_bench::local_cluster::LocalCluster;
use keyfort_engine::cluster::shard_of;
use keyfort_hsm::PartitionId;
use keyfort_net::client::{Client, ClientOptions, Credential};
use keyfort_net::client_proto::Scope;
use std::time::{Duration, Instant};

/// A client of `cred` over every node of `c`, retried until the nodes listen or `timeout`.
pub fn connect(
    c: &LocalCluster,
    cred: &Credential,
    opts: &ClientOptions,
    timeout: Duration,
) -> Client {
    let t = Instant::now();
    loop {
        match Client::connect(c.client_addrs(), cred.clone(), opts.clone()) {
            Ok(client) => return client,
            Err(e) if t.elapsed() < timeout => {
                eprintln!("connect: {e}; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("no node accepts {:?}: {e}", cred.scope),
        }
    }
}

/// A new partition on `shard` of `shards` (ids drawn until one lands there) and its first
/// credential.
pub fn partition_on(admin: &Client, shard: u32, shards: u32) -> ([u8; 16], Credential) {
    let p = loop {
        let p: [u8; 16] = rand::random();
        if shard_of(&PartitionId(p), shards) == shard {
            break p;
        }
    };
    let (_, cred) = admin.create_partition(p).expect("partition create");
    assert_eq!(cred.scope, Scope::Partition(p));
    (p, cred)
}

/// `keyfort tls <args>` with node 2's card (any card of the realm can use the cluster CA's key);
/// panics with its stderr when it fails.
pub fn keyfort_tls(c: &LocalCluster, args: &[&str]) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyfort"))
        .arg("tls")
        .args(args)
        .arg("--token-dir")
        .arg(c.root.join("node-2/card"))
        .args(["--label", "node-2"])
        .env("KEYFORT_PIN_FILE", c.pin_file())
        .output()
        .expect("run keyfort tls");
    assert!(
        out.status.success(),
        "keyfort tls {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
