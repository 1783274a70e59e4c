//! The etcd side of the side-by-side bench (`keyfort_bench::etcd`) against a real 3-member
//! etcd 3.4 cluster; skipped, with a message, where `/usr/bin/etcd` is not installed.

use keyfort_bench::etcd::{
    etcd_installed, etcd_restore_to_first_read, EtcdCluster, EtcdTarget, ETCD_MEMBERS,
};
use keyfort_bench::target::{Op, Target};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

fn skip() -> bool {
    if !etcd_installed() {
        eprintln!("skipped: etcd not installed (apt-get install etcd-server etcd-client)");
        return true;
    }
    false
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the pid exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

fn op(t: &EtcdTarget, conn: usize, op: Op) -> Result<(), String> {
    let (r, at) = t.start(conn, op)?.wait(WAIT);
    assert!(r.is_err() || at.is_some(), "an answer without its instant");
    r
}

#[test]
fn cluster_target_and_restore() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut c = EtcdCluster::start(&dir.path().join("c")).unwrap();
    let pids: Vec<u32> = c.members.iter().filter_map(|m| m.pid()).collect();
    assert_eq!(pids.len(), ETCD_MEMBERS);

    let t = EtcdTarget::connect(&c.endpoints(), 4, 100, 1).unwrap();
    assert_eq!((t.name(), t.connections()), ("etcd", 4));
    t.preload(300).unwrap();
    assert_eq!(t.count().unwrap(), 300);
    // Every connection (each member) answers reads of preloaded keys.
    for conn in 0..4 {
        op(&t, conn, Op::Encrypt { key: 299 }).unwrap();
        op(&t, conn, Op::Decrypt { key: 0 }).unwrap();
    }
    op(&t, 1, Op::Create { key: 300 }).unwrap();
    op(&t, 2, Op::Decrypt { key: 300 }).unwrap();
    op(&t, 0, Op::Delete { key: 300 }).unwrap();
    assert_eq!(op(&t, 1, Op::Encrypt { key: 300 }), Err("NotFound".into()));
    assert_eq!(op(&t, 2, Op::Delete { key: 300 }), Err("NotFound".into()));
    assert_eq!(t.count().unwrap(), 300);
    drop(t);

    assert!(c.stop().is_empty(), "a member needed SIGKILL");
    for p in pids {
        assert!(!alive(p), "etcd pid {p} left running");
    }

    let r = etcd_restore_to_first_read(&dir.path().join("r"), 1000, 256).unwrap();
    assert_eq!((r.keys, r.restored_keys), (1000, 1000));
    assert!(r.total_s >= r.restore_s && r.restore_s > 0.0, "{r:?}");
}
