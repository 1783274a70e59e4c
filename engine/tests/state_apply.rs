//! The state machine's apply rules and its order-independent digest.

mod state_common;

use keyfort_engine::state::{IdempotencyId, KeyState, Op, OutcomeCode, PutOp, StateMachine};
use keyfort_engine::wbl::RecordKind;
use proptest::prelude::*;
use state_common::*;

fn apply(s: &mut StateMachine, lsn: u64, op: &Op) -> keyfort_engine::state::ApplyResult {
    s.apply(lsn, op.kind(), &op.encode()).unwrap()
}

fn with_partitions() -> StateMachine {
    let mut s = StateMachine::new();
    apply(&mut s, 1, &Step::PartitionCreate { p: 0 }.op().unwrap());
    apply(&mut s, 2, &Step::PartitionCreate { p: 1 }.op().unwrap());
    s
}

const NONE: IdempotencyId = IdempotencyId::NONE;

#[test]
fn rotate_naming_a_replaced_version_is_rejected_and_older_versions_stay() {
    let mut s = with_partitions();
    assert_eq!(
        apply(&mut s, 3, &put(PutOp::Create, NONE, 0, 0, 1, 0, b"a"))
            .outcome
            .code,
        OutcomeCode::Created
    );
    let r = apply(&mut s, 4, &put(PutOp::Rotate, NONE, 0, 0, 2, 1, b"b"));
    assert_eq!(
        (r.outcome.code, r.outcome.version),
        (OutcomeCode::Rotated, 2)
    );
    let digest = s.digest();
    // A second rotate racing from version 1 is stale: current is 2.
    let r = apply(&mut s, 5, &put(PutOp::Rotate, NONE, 0, 0, 2, 1, b"c"));
    assert_eq!(
        (r.outcome.code, r.outcome.version),
        (OutcomeCode::StaleVersion, 2)
    );
    assert_eq!(s.digest(), digest, "a rejected record changes no state");
    let versions: Vec<u32> = s
        .versions(partition(0), key(0))
        .unwrap()
        .iter()
        .map(|e| e.header.version)
        .collect();
    assert_eq!(versions, [1, 2]);
    assert_eq!(
        s.current(partition(0), key(0))
            .unwrap()
            .unwrap()
            .header
            .version,
        2
    );
}

#[test]
fn update_changes_metadata_and_state_never_key_material() {
    let mut s = with_partitions();
    apply(&mut s, 3, &put(PutOp::Create, NONE, 0, 0, 1, 0, b"a"));
    let before = s.get(partition(0), key(0), 1).unwrap().unwrap();
    let mut op = put(PutOp::Update, NONE, 0, 0, 1, 0, b"new");
    if let Op::KeyPut(p) = &mut op {
        p.state = KeyState::Disabled;
    }
    assert_eq!(apply(&mut s, 4, &op).outcome.code, OutcomeCode::Updated);
    let after = s.get(partition(0), key(0), 1).unwrap().unwrap();
    assert_eq!(after.blob, before.blob);
    assert_eq!(after.header, before.header);
    assert_eq!(after.lsn_created, 3);
    assert_eq!(
        (after.metadata.as_slice(), after.state),
        (&b"new"[..], KeyState::Disabled)
    );
}

#[test]
fn delete_removes_every_version_and_a_recreate_is_a_new_key() {
    let mut s = with_partitions();
    apply(&mut s, 3, &put(PutOp::Create, NONE, 0, 0, 1, 0, b"a"));
    apply(&mut s, 4, &put(PutOp::Rotate, NONE, 0, 0, 2, 1, b"a"));
    let empty = with_partitions().digest();
    let r = apply(
        &mut s,
        5,
        &Step::Delete {
            p: 0,
            k: 0,
            idem: 0,
        }
        .op()
        .unwrap(),
    );
    assert_eq!(
        (r.outcome.code, r.outcome.version),
        (OutcomeCode::Deleted, 2)
    );
    assert_eq!(s.key_count(), 0);
    assert_eq!(s.digest(), empty);
    assert_eq!(
        apply(&mut s, 6, &put(PutOp::Create, NONE, 0, 0, 1, 0, b"a"))
            .outcome
            .code,
        OutcomeCode::Created
    );
    assert_eq!(
        s.get(partition(0), key(0), 1).unwrap().unwrap().lsn_created,
        6
    );
}

#[test]
fn same_idempotency_id_returns_the_first_result_and_another_op_conflicts() {
    let mut s = with_partitions();
    let id = idem(1);
    let create = put(PutOp::Create, id, 0, 0, 1, 0, b"a");
    let first = apply(&mut s, 3, &create);
    assert_eq!(first.outcome.code, OutcomeCode::Created);
    let again = apply(&mut s, 4, &create);
    assert_eq!(
        (again.outcome, again.duplicate_of_lsn),
        (first.outcome, Some(3))
    );
    let other = apply(&mut s, 5, &put(PutOp::Create, id, 0, 1, 1, 0, b"a"));
    assert_eq!(other.outcome.code, OutcomeCode::IdempotencyConflict);
    assert!(s.get(partition(0), key(1), 1).unwrap().is_none());
    // Scoped to the partition: the same id in another partition is a new operation.
    let elsewhere = apply(&mut s, 6, &put(PutOp::Create, id, 1, 1, 1, 0, b"a"));
    assert_eq!(
        (elsewhere.outcome.code, elsewhere.duplicate_of_lsn),
        (OutcomeCode::Created, None)
    );
}

#[test]
fn a_retry_carrying_other_key_material_is_the_same_operation() {
    // A retried create reaches another node, whose card makes another key: the blob differs,
    // everything the client asked for is the same, so it gets the first result.
    let mut s = with_partitions();
    let id = idem(3);
    let first = put(PutOp::Create, id, 0, 0, 1, 0, b"a");
    let r = apply(&mut s, 3, &first);
    assert_eq!(r.outcome.code, OutcomeCode::Created);
    let Op::KeyPut(mut retry) = first.clone() else {
        unreachable!()
    };
    retry.blob = vec![0xee; retry.blob.len() + 3];
    let again = apply(&mut s, 4, &Op::KeyPut(retry.clone()));
    assert_eq!(
        (again.outcome, again.duplicate_of_lsn),
        (r.outcome, Some(3))
    );
    // The first key's material stays.
    let kept = s.get(partition(0), key(0), 1).unwrap().unwrap();
    let Op::KeyPut(orig) = first else {
        unreachable!()
    };
    assert_eq!(kept.blob, orig.blob);
    // Other metadata is another operation.
    retry.metadata = b"b".to_vec();
    let other = apply(&mut s, 5, &Op::KeyPut(retry));
    assert_eq!(other.outcome.code, OutcomeCode::IdempotencyConflict);
}

#[test]
fn a_rejected_first_result_is_what_a_retry_gets() {
    let mut s = with_partitions();
    apply(&mut s, 3, &put(PutOp::Create, NONE, 0, 0, 1, 0, b"a"));
    apply(&mut s, 4, &put(PutOp::Rotate, NONE, 0, 0, 2, 1, b"a"));
    let stale = put(PutOp::Rotate, idem(2), 0, 0, 2, 1, b"x");
    let r = apply(&mut s, 5, &stale);
    assert_eq!(r.outcome.code, OutcomeCode::StaleVersion);
    let retry = apply(&mut s, 6, &stale);
    assert_eq!(
        (retry.outcome.code, retry.duplicate_of_lsn),
        (OutcomeCode::StaleVersion, Some(5))
    );
}

#[test]
fn idempotency_entries_expire_by_log_position() {
    let mut s = StateMachine::with_idempotency_window(10);
    apply(&mut s, 1, &Step::PartitionCreate { p: 0 }.op().unwrap());
    let create = put(PutOp::Create, idem(1), 0, 0, 1, 0, b"a");
    apply(&mut s, 2, &create);
    assert_eq!(s.idempotency().len(), 1);
    // LSN 11 is still inside the window of the entry made at 2; 12 is not.
    assert_eq!(apply(&mut s, 11, &create).duplicate_of_lsn, Some(2));
    let after = apply(&mut s, 12, &create);
    assert_eq!(
        (after.outcome.code, after.duplicate_of_lsn),
        (OutcomeCode::KeyExists, None)
    );
    assert_eq!(s.idempotency()[0].lsn, 12);
    assert_eq!(s.digest(), s.digest_recomputed().unwrap());
}

#[test]
fn replayed_lsns_change_nothing() {
    let mut s = with_partitions();
    let d = s.digest();
    let r = apply(&mut s, 2, &put(PutOp::Create, NONE, 0, 0, 1, 0, b"a"));
    assert_eq!(r.outcome.code, OutcomeCode::AlreadyApplied);
    assert_eq!((s.digest(), s.lsn_applied()), (d, 2));
}

#[test]
fn keys_need_their_partition_and_a_partition_with_keys_is_not_deleted() {
    let mut s = StateMachine::new();
    assert_eq!(
        apply(&mut s, 1, &put(PutOp::Create, NONE, 0, 0, 1, 0, b""))
            .outcome
            .code,
        OutcomeCode::NoSuchPartition
    );
    apply(&mut s, 2, &Step::PartitionCreate { p: 0 }.op().unwrap());
    apply(&mut s, 3, &put(PutOp::Create, NONE, 0, 0, 1, 0, b""));
    let del = Step::PartitionDelete { p: 0 }.op().unwrap();
    assert_eq!(
        apply(&mut s, 4, &del).outcome.code,
        OutcomeCode::PartitionNotEmpty
    );
    apply(
        &mut s,
        5,
        &Step::Delete {
            p: 0,
            k: 0,
            idem: 0,
        }
        .op()
        .unwrap(),
    );
    assert_eq!(
        apply(&mut s, 6, &del).outcome.code,
        OutcomeCode::PartitionDeleted
    );
}

#[test]
fn undecodable_payloads_and_raft_entries_are_deterministic_no_ops() {
    let mut s = with_partitions();
    let d = s.digest();
    assert_eq!(
        s.apply(3, RecordKind::KeyPut, &[9, 9, 9])
            .unwrap()
            .outcome
            .code,
        OutcomeCode::BadPayload
    );
    assert_eq!(
        s.apply(4, RecordKind::RaftNormal, b"entry")
            .unwrap()
            .outcome
            .code,
        OutcomeCode::Ignored
    );
    assert_eq!(s.digest(), d);
}

fn run(log: &[(RecordKind, Vec<u8>)], window: u64) -> StateMachine {
    let mut s = StateMachine::with_idempotency_window(window);
    for (i, (k, p)) in log.iter().enumerate() {
        s.apply(i as u64 + 1, *k, p).unwrap();
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn incremental_digest_equals_the_digest_recomputed_from_the_state(l in log(60), w in 1u64..40) {
        let s = run(&l, w);
        prop_assert_eq!(s.digest(), s.digest_recomputed().unwrap());
    }

    #[test]
    fn apply_is_deterministic(l in log(60)) {
        prop_assert_eq!(run(&l, 16), run(&l, 16));
    }

    #[test]
    fn equal_states_have_equal_digests_and_different_states_different_ones(a in log(40), b in log(40)) {
        let (sa, sb) = (run(&a, 1000), run(&b, 1000));
        let same_items = sa.keys().unwrap() == sb.keys().unwrap()
            && sa.partitions().eq(sb.partitions())
            && sa.cluster_config() == sb.cluster_config()
            && sa.idempotency() == sb.idempotency();
        prop_assert_eq!(same_items, sa.digest() == sb.digest());
    }

    #[test]
    fn the_digest_does_not_depend_on_the_order_items_were_added(l in log(40)) {
        // The same items reached through differently ordered partition creates.
        let mut reordered = l.clone();
        reordered.swap(0, 1);
        let (a, b) = (run(&l, 1000), run(&reordered, 1000));
        if a.keys().unwrap() == b.keys().unwrap() && a.idempotency() == b.idempotency() {
            prop_assert_eq!(a.digest(), b.digest());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Paging through `list_keys` yields every key of the partition once, with its newest
    /// version, in key id order — with the state split between a frozen layer and the
    /// memtable at a random point.
    #[test]
    fn list_keys_pages_through_every_key_once(l in log(60), split in 0usize..60, limit in 1usize..5) {
        let mut s = StateMachine::with_idempotency_window(1000);
        for (i, (k, p)) in l.iter().enumerate() {
            if i == split {
                s.freeze().unwrap();
            }
            s.apply(i as u64 + 1, *k, p).unwrap();
        }
        for p in 0..2u8 {
            let mut want: std::collections::BTreeMap<_, u32> = Default::default();
            for e in s.keys().unwrap() {
                if e.header.partition == partition(p) {
                    let v = want.entry(e.header.key_id).or_default();
                    *v = (*v).max(e.header.version);
                }
            }
            let mut got = Vec::new();
            let mut after = None;
            loop {
                let (page, more) = s.list_keys(partition(p), after, limit).unwrap();
                prop_assert!(page.len() <= limit);
                after = page.last().map(|(k, _)| *k);
                got.extend(page);
                if !more {
                    break;
                }
                prop_assert!(after.is_some());
            }
            prop_assert_eq!(got, want.into_iter().collect::<Vec<_>>());
        }
    }
}

#[test]
fn a_cluster_restore_replaces_the_config_only_with_a_new_cluster_of_new_ids_and_the_same_key() {
    use keyfort_engine::cluster::{ClusterConfig, Member};
    let config = |id: u8, ids: &[u64], next: u64, key: u8| {
        ClusterConfig {
            cluster_id: [id; 16],
            shard_count: 2,
            next_node_id: next,
            members: ids
                .iter()
                .map(|&node_id| Member {
                    node_id,
                    peer_addr: format!("127.0.0.1:{}", 7000 + node_id),
                })
                .collect(),
            integrity_key_wrapped: vec![key; 109],
        }
        .encode()
        .unwrap()
    };
    let restore = |c: Vec<u8>| Op::ClusterRestore { config: c };
    let mut s = StateMachine::new();
    let old = config(1, &[1, 2, 3], 4, 9);
    apply(
        &mut s,
        1,
        &Op::ClusterConfig {
            config: old.clone(),
        },
    );
    let refused = [
        ("same cluster id", config(1, &[4, 5, 6], 7, 9)),
        ("an old raft id", config(2, &[3, 5, 6], 7, 9)),
        ("another integrity key", config(2, &[4, 5, 6], 7, 8)),
    ];
    for (lsn, (why, c)) in (2..).zip(refused) {
        let r = apply(&mut s, lsn, &restore(c));
        assert_eq!(r.outcome.code, OutcomeCode::ClusterConfigRefused, "{why}");
        assert_eq!(s.cluster_config(), Some(&old[..]), "{why}");
    }
    // A plain config change cannot change the cluster id either.
    let new = config(2, &[4, 5, 6], 7, 9);
    let r = apply(
        &mut s,
        5,
        &Op::ClusterConfig {
            config: new.clone(),
        },
    );
    assert_eq!(r.outcome.code, OutcomeCode::ClusterConfigRefused);
    let before = s.digest();
    let r = apply(&mut s, 6, &restore(new.clone()));
    assert_eq!(r.outcome.code, OutcomeCode::ClusterConfigSet);
    assert_eq!(s.cluster_config(), Some(&new[..]));
    assert_ne!(s.digest(), before);
    assert_eq!(s.digest(), s.digest_recomputed().unwrap());
}
