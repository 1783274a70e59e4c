//! Every byte of a snapshot file (data blocks, index, partitions, idempotency table, cluster
//! config, footer, MAC, tail) damaged in turn, and every truncation, is a typed error naming
//! the file; never a panic, never a silently different state.

mod state_common;

use keyfort_engine::snapshot::{self, Snapshot, SnapshotError, SnapshotMeta, WriteOptions};
use keyfort_engine::state::{PutOp, StateMachine};
use state_common::*;
use std::path::{Path, PathBuf};

/// A small state touching every section: several blocks, two partitions, idempotency entries
/// and a cluster config.
fn sample(dir: &Path, card: &keyfort_hsm::CoreSession) -> PathBuf {
    let mut s = StateMachine::new();
    let mut lsn = 0;
    let mut apply = |s: &mut StateMachine, op: keyfort_engine::state::Op| {
        lsn += 1;
        s.apply(lsn, op.kind(), &op.encode()).unwrap();
    };
    apply(&mut s, Step::Cluster { c: 7 }.op().unwrap());
    apply(&mut s, Step::PartitionCreate { p: 0 }.op().unwrap());
    apply(&mut s, Step::PartitionCreate { p: 1 }.op().unwrap());
    for k in 0..3 {
        apply(&mut s, put(PutOp::Create, idem(k + 1), 0, k, 1, 0, b"m"));
    }
    apply(&mut s, put(PutOp::Rotate, idem(0), 0, 0, 2, 1, b"r"));
    apply(&mut s, put(PutOp::Create, idem(1), 1, 3, 1, 0, b""));
    let meta = SnapshotMeta {
        lsn: s.lsn_applied(),
        term: 2,
        chain_head: 42,
        voters: vec![1, 2, 3],
        learners: vec![4],
    };
    let opts = WriteOptions {
        block_bytes_target: 300,
        ..WriteOptions::default()
    };
    snapshot::write_with(dir, &s, &meta, card, &opts).unwrap()
}

fn names_the_file(e: &SnapshotError, path: &Path) -> bool {
    match e {
        SnapshotError::Io { file, .. }
        | SnapshotError::Corrupt { file, .. }
        | SnapshotError::BadMac { file, .. }
        | SnapshotError::Card { file, .. } => file == path,
        SnapshotError::Invalid(_) => false,
    }
}

#[test]
fn every_damaged_byte_is_detected_with_a_typed_error() {
    let card = card::session();
    let dir = tempfile::tempdir().unwrap();
    let path = sample(dir.path(), &card);
    let good = std::fs::read(&path).unwrap();
    let snap = Snapshot::open(&path, &card).unwrap();
    assert!(
        snap.footer().block_count >= 3,
        "the sample spans several blocks"
    );
    drop(snap);
    for i in 0..good.len() {
        for flip in [0x01u8, 0x80] {
            let mut bad = good.clone();
            bad[i] ^= flip;
            std::fs::write(&path, &bad).unwrap();
            match Snapshot::open(&path, &card) {
                Ok(_) => panic!(
                    "byte {i} ^ {flip:#x} of {} bytes went undetected",
                    good.len()
                ),
                Err(e) => assert!(names_the_file(&e, &path), "byte {i}: {e}"),
            }
        }
    }
}

#[test]
fn every_truncation_is_detected() {
    let card = card::session();
    let dir = tempfile::tempdir().unwrap();
    let path = sample(dir.path(), &card);
    let good = std::fs::read(&path).unwrap();
    for len in 0..good.len() {
        std::fs::write(&path, &good[..len]).unwrap();
        let e = Snapshot::open(&path, &card).unwrap_err();
        assert!(names_the_file(&e, &path), "length {len}: {e}");
    }
}

#[test]
fn damage_in_the_mac_is_a_bad_mac_and_in_a_block_names_its_offset() {
    let card = card::session();
    let dir = tempfile::tempdir().unwrap();
    let path = sample(dir.path(), &card);
    let good = std::fs::read(&path).unwrap();
    let mac_at = good.len() - 8 - 32;
    let mut bad = good.clone();
    bad[mac_at] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    assert!(matches!(
        Snapshot::open(&path, &card),
        Err(SnapshotError::BadMac { .. })
    ));

    let mut bad = good.clone();
    bad[20] ^= 1; // inside the first data block, which starts after the 8-byte file header
    std::fs::write(&path, &bad).unwrap();
    match Snapshot::open(&path, &card) {
        Err(SnapshotError::Corrupt { offset, .. }) => assert_eq!(offset, 8),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_lookup_rechecks_the_block_crc() {
    let card = card::session();
    let dir = tempfile::tempdir().unwrap();
    let path = sample(dir.path(), &card);
    let snap = Snapshot::open(&path, &card).unwrap();
    let second = snap.index()[1];
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[second.offset as usize + 10] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let e = snap.get(second.first).unwrap_err();
    assert!(
        matches!(e, SnapshotError::Corrupt { offset, .. } if offset == second.offset),
        "{e}"
    );
}
