//! Snapshots are reduce(log[0..=lsn]): opening one and replaying the rest of the log reproduces
//! the state of applying the whole log, byte for byte.

mod state_common;

use keyfort_engine::snapshot::{self, Snapshot, SnapshotError, SnapshotMeta, WriteOptions};
use keyfort_engine::state::{Op, OutcomeCode, PutOp, StateMachine};
use keyfort_engine::wbl::RecordKind;
use proptest::prelude::*;
use state_common::*;

type Log = Vec<(RecordKind, Vec<u8>)>;

/// Small blocks so that even short logs span several blocks and the index matters.
fn small_blocks() -> WriteOptions {
    WriteOptions {
        block_bytes_target: 400,
        ..WriteOptions::default()
    }
}

fn meta(s: &StateMachine) -> SnapshotMeta {
    SnapshotMeta {
        lsn: s.lsn_applied(),
        term: 3,
        chain_head: 0xC0FFEE ^ s.lsn_applied(),
        voters: vec![1, 2, 3],
        learners: vec![7],
    }
}

fn apply_range(s: &mut StateMachine, log: &Log, from: usize, to: usize) {
    for (i, (k, p)) in log.iter().enumerate().take(to).skip(from) {
        s.apply(i as u64 + 1, *k, p).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn open_of_snapshot_n_plus_replay_of_the_rest_equals_applying_the_whole_log(
        log in log(120), cut in any::<prop::sample::Index>(), window in 5u64..60,
    ) {
        let card = card::session();
        let dir = tempfile::tempdir().unwrap();
        let n = cut.index(log.len() + 1);
        let mut whole = StateMachine::with_idempotency_window(window);
        apply_range(&mut whole, &log, 0, log.len());

        let mut prefix = StateMachine::with_idempotency_window(window);
        apply_range(&mut prefix, &log, 0, n);
        let path = snapshot::write_with(dir.path(), &prefix, &meta(&prefix), &card, &small_blocks()).unwrap();
        let (snap, mut loaded) = open_state(&path, &card);
        prop_assert_eq!(&loaded, &prefix);
        prop_assert_eq!(snap.digest(), prefix.digest());
        prop_assert_eq!(snap.footer().voters.clone(), vec![1, 2, 3]);
        for e in prefix.keys().unwrap() {
            prop_assert_eq!(snap.get(e.slot()).unwrap(), Some(e.clone()));
        }
        prop_assert_eq!(snap.get((partition(9), key(9), 1)).unwrap(), None);

        apply_range(&mut loaded, &log, n, log.len());
        prop_assert_eq!(loaded.digest(), whole.digest());
        prop_assert_eq!(&loaded, &whole);
    }

    /// The layers (base snapshot, frozen memtable, memtable) never change what apply sees:
    /// freezing at m1, writing and installing the frozen state while m1..m2 is applied (or
    /// thawing it instead), then applying the rest equals applying the whole log flat.
    #[test]
    fn freeze_install_and_thaw_never_change_the_state(
        log in log(150), cuts in any::<[prop::sample::Index; 3]>(), window in 5u64..60,
        thaw in any::<bool>(),
    ) {
        let card = card::session();
        let dir = tempfile::tempdir().unwrap();
        let mut c: Vec<usize> = cuts.iter().map(|i| i.index(log.len() + 1)).collect();
        c.sort();
        let (n, m1, m2) = (c[0], c[1], c[2]);
        let mut flat = StateMachine::with_idempotency_window(window);
        apply_range(&mut flat, &log, 0, n);
        let path = snapshot::write_with(dir.path(), &flat, &meta(&flat), &card, &small_blocks()).unwrap();
        let (_, mut layered) = open_state(&path, &card);
        apply_range(&mut flat, &log, n, m1);
        apply_range(&mut layered, &log, n, m1);
        prop_assert_eq!(&layered, &flat);
        let frozen = layered.freeze().unwrap();
        prop_assert!(layered.freeze().is_err(), "one compaction at a time");
        apply_range(&mut flat, &log, m1, m2);
        apply_range(&mut layered, &log, m1, m2);
        prop_assert_eq!(&layered, &flat);
        if thaw {
            layered.thaw();
            prop_assert!(layered.frozen().is_none());
        } else {
            let m = meta(&StateMachine::with_idempotency_window(window));
            let m = SnapshotMeta { lsn: frozen.lsn(), ..m };
            let pending = snapshot::begin(dir.path(), &frozen.view(), &m, &small_blocks()).unwrap();
            let tag = card.mac(pending.footer_body()).unwrap();
            let p = pending.finish(&tag).unwrap();
            let snap = std::sync::Arc::new(Snapshot::open(&p, &card).unwrap());
            prop_assert_eq!(snap.digest(), frozen.digest());
            layered.install(snap).unwrap();
        }
        prop_assert_eq!(&layered, &flat);
        prop_assert_eq!(layered.digest(), layered.digest_recomputed().unwrap());
        apply_range(&mut flat, &log, m2, log.len());
        apply_range(&mut layered, &log, m2, log.len());
        prop_assert_eq!(layered.digest(), flat.digest());
        prop_assert_eq!(&layered, &flat);
        prop_assert_eq!(layered.digest(), layered.digest_recomputed().unwrap());
    }

    #[test]
    fn a_deleted_key_is_absent_from_every_snapshot_at_or_after_the_delete(log in log(100)) {
        let card = card::session();
        let dir = tempfile::tempdir().unwrap();
        let mut s = StateMachine::new();
        // (lsn, partition, key) of successful deletes and creates.
        let mut deletes = Vec::new();
        let mut creates = Vec::new();
        let mut snaps = Vec::new();
        for (i, (k, p)) in log.iter().enumerate() {
            let lsn = i as u64 + 1;
            let r = s.apply(lsn, *k, p).unwrap();
            match (Op::decode(*k, p), r.outcome.code, r.duplicate_of_lsn) {
                (Ok(Op::KeyDelete { partition, key_id, .. }), OutcomeCode::Deleted, None) => {
                    deletes.push((lsn, partition, key_id))
                }
                (Ok(Op::KeyPut(put)), OutcomeCode::Created, None) if put.op == PutOp::Create => {
                    creates.push((lsn, put.header.partition, put.header.key_id))
                }
                _ => {}
            }
            if lsn.is_multiple_of(15) || lsn == log.len() as u64 {
                let path = snapshot::write_with(dir.path(), &s, &meta(&s), &card, &small_blocks()).unwrap();
                snaps.push((lsn, path));
            }
        }
        for (d, p, k) in &deletes {
            for (lsn, path) in snaps.iter().filter(|(lsn, _)| lsn >= d) {
                let recreated = creates.iter().any(|(c, cp, ck)| c > d && c <= lsn && cp == p && ck == k);
                if recreated {
                    continue;
                }
                let (snap, state) = open_state(path, &card);
                prop_assert_eq!(state.versions(*p, *k).unwrap().len(), 0);
                for v in 0..6 {
                    prop_assert_eq!(snap.get((*p, *k, v)).unwrap(), None);
                }
            }
        }
    }
}

#[test]
fn snapshots_are_listed_by_lsn_and_leave_no_temporary_file() {
    let card = card::session();
    let dir = tempfile::tempdir().unwrap();
    let mut s = StateMachine::new();
    for lsn in [1u64, 2, 300] {
        let op = Step::Cluster { c: lsn as u8 }.op().unwrap();
        s.apply(lsn, op.kind(), &op.encode()).unwrap();
        snapshot::write(dir.path(), &s, &meta(&s), &card).unwrap();
    }
    let lsns: Vec<u64> = snapshot::list(dir.path())
        .unwrap()
        .into_iter()
        .map(|(l, _)| l)
        .collect();
    assert_eq!(lsns, [1, 2, 300]);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
}

#[test]
fn an_empty_state_round_trips() {
    let card = card::session();
    let dir = tempfile::tempdir().unwrap();
    let s = StateMachine::new();
    let path = snapshot::write(dir.path(), &s, &meta(&s), &card).unwrap();
    let (snap, loaded) = open_state(&path, &card);
    assert_eq!(loaded, s);
    assert_eq!(snap.footer().block_count, 0);
}

#[test]
fn a_snapshot_whose_lsn_is_not_the_applied_lsn_is_refused() {
    let card = card::session();
    let dir = tempfile::tempdir().unwrap();
    let s = StateMachine::new();
    let mut m = meta(&s);
    m.lsn = 5;
    assert!(matches!(
        snapshot::write(dir.path(), &s, &m, &card),
        Err(SnapshotError::Invalid(_))
    ));
}

#[test]
fn a_footer_macd_by_another_realm_is_refused_as_bad_mac() {
    let dir = tempfile::tempdir().unwrap();
    let s = StateMachine::new();
    let path = snapshot::write(dir.path(), &s, &meta(&s), &card::other_realm_session()).unwrap();
    let err = Snapshot::open(&path, &card::session()).unwrap_err();
    assert!(matches!(err, SnapshotError::BadMac { .. }), "{err}");
    // Every other check still passes without a card.
    assert!(!Snapshot::open_without_mac(&path).unwrap().mac_checked());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    /// The durable tier's footer rewrite: new raft members, every section and the digest kept,
    /// the new footer MACed by the card and verified when opened again.
    #[test]
    fn rewrite_membership_keeps_the_state_and_remacs_the_footer(log in log(80), voters in prop::collection::vec(1u64..1000, 1..6)) {
        let card = card::session();
        let dir = tempfile::tempdir().unwrap();
        let mut s = StateMachine::with_idempotency_window(50);
        apply_range(&mut s, &log, 0, log.len());
        prop_assume!(s.lsn_applied() > 0);
        let path = snapshot::write_with(dir.path(), &s, &meta(&s), &card, &small_blocks()).unwrap();
        let before = std::fs::read(&path).unwrap();
        let unchecked = Snapshot::open_without_mac(&path).unwrap();
        prop_assert!(snapshot::rewrite_membership(&unchecked, &voters, &[], &card).is_err(), "unverified");
        drop(unchecked);
        let snap = Snapshot::open(&path, &card).unwrap();
        let footer_offset = snap.footer().footer_offset as usize;
        snapshot::rewrite_membership(&snap, &voters, &[], &card).unwrap();
        drop(snap);
        let after = std::fs::read(&path).unwrap();
        prop_assert_eq!(&before[..footer_offset], &after[..footer_offset]);
        let (snap, loaded) = open_state(&path, &card);
        prop_assert_eq!(snap.footer().voters.clone(), voters);
        prop_assert!(snap.footer().learners.is_empty());
        prop_assert_eq!(snap.digest(), s.digest());
        prop_assert_eq!(&loaded, &s);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// The restore's single pass: the observed open hands over exactly the file's bytes, in
    /// order, and checks what the plain open checks; a damaged file is refused the same way,
    /// having shown only a prefix of the file.
    #[test]
    fn the_observed_open_sees_every_byte_once_and_checks_the_same(log in log(80), flip in any::<prop::sample::Index>()) {
        let card = card::session();
        let dir = tempfile::tempdir().unwrap();
        let mut s = StateMachine::with_idempotency_window(50);
        apply_range(&mut s, &log, 0, log.len());
        let path = snapshot::write_with(dir.path(), &s, &meta(&s), &card, &small_blocks()).unwrap();
        let file = std::fs::read(&path).unwrap();
        let mut seen = Vec::new();
        let mut snap = Snapshot::open_without_mac_observed(&path, &mut |b: &[u8]| seen.extend_from_slice(b)).unwrap();
        prop_assert!(seen == file, "observed {} bytes of {}", seen.len(), file.len());
        snap.verify_mac(&card).unwrap();
        prop_assert_eq!(snap.digest(), s.digest());
        prop_assert_eq!(snap.file_bytes(), file.len() as u64);

        // One byte of a section changed: both opens refuse it; the observer saw a prefix.
        let at = flip.index(snap.footer().footer_offset as usize);
        drop(snap);
        let mut bad = file.clone();
        bad[at] ^= 0x40;
        std::fs::write(&path, &bad).unwrap();
        prop_assert!(Snapshot::open_without_mac(&path).is_err());
        let mut seen = Vec::new();
        prop_assert!(Snapshot::open_without_mac_observed(&path, &mut |b: &[u8]| seen.extend_from_slice(b)).is_err());
        prop_assert!(bad.starts_with(&seen));
    }
}
