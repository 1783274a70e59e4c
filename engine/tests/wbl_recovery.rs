//! Recovery of a healthy log: everything acknowledged comes back, across segments, releases,
//! suffix overwrites and hard-state slot fallbacks.

mod common;
use common::*;
use keyfort_engine::wbl::record::chain_next;
use keyfort_engine::wbl::{HardState, RecordKind, Wbl, WblError, MAX_PAYLOAD_BYTES};

#[test]
fn concurrent_appends_all_survive_reopen() {
    let root = tempfile::tempdir().unwrap();
    let dir = log_dir(root.path());
    run(root.path(), || async {
        let (wbl, report) = Wbl::open(&dir, opts()).await.unwrap();
        assert_eq!(report.records, 0);
        append_concurrently(&wbl, 16, 3000, 300).await;
        assert_eq!(wbl.durable_lsn(), 3000);
        wbl.close().await.unwrap();
    });
    run(root.path(), || async {
        let (wbl, report) = Wbl::open(&dir, opts()).await.unwrap();
        assert_eq!((report.first_lsn, report.last_lsn), (1, 3000));
        assert!(report.torn_tail.is_none());
        check_all(&wbl, 300).await;
        append_concurrently(&wbl, 4, 3100, 300).await;
        wbl.close().await.unwrap();
    });
    run(root.path(), || async {
        let (wbl, report) = Wbl::open(&dir, opts()).await.unwrap();
        assert_eq!(report.last_lsn, 3100);
        check_all(&wbl, 300).await;
    });
}

#[test]
fn log_rolls_across_segments_and_reopens() {
    let root = tempfile::tempdir().unwrap();
    let dir = log_dir(root.path());
    run(root.path(), || async {
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        append_concurrently(&wbl, 8, 400, 20_000).await;
        wbl.close().await.unwrap();
    });
    run(root.path(), || async {
        let (wbl, report) = Wbl::open(&dir, opts()).await.unwrap();
        assert!(report.segments >= 5, "{report:?}");
        assert_eq!(report.last_lsn, 400);
        check_all(&wbl, 20_000).await;
    });
}

#[test]
fn release_prefix_drops_whole_segments_only() {
    let root = tempfile::tempdir().unwrap();
    let dir = log_dir(root.path());
    let first = run(root.path(), || async {
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        append_concurrently(&wbl, 8, 400, 20_000).await;
        let first = wbl.release_prefix(200).await.unwrap();
        assert!(first > 1 && first <= 200, "first {first}");
        assert_eq!(wbl.first_lsn(), first);
        assert_eq!(wbl.term(first - 1), None);
        check_all(&wbl, 20_000).await;
        wbl.close().await.unwrap();
        first
    });
    run(root.path(), || async {
        let (wbl, report) = Wbl::open(&dir, opts()).await.unwrap();
        assert_eq!((report.first_lsn, report.last_lsn), (first, 400));
        check_all(&wbl, 20_000).await;
    });
}

#[test]
fn suffix_overwrite_survives_reopen_and_chains_verify() {
    let root = tempfile::tempdir().unwrap();
    let dir = log_dir(root.path());
    run(root.path(), || async {
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        append_batch(&wbl, 1, 50, 100).await;
        wbl.set_hard_state(HardState {
            term: 1,
            vote: 1,
            commit: 20,
        })
        .unwrap()
        .await
        .unwrap();
        let err = wbl
            .append(RecordKind::RaftNormal, 20, 2, vec![1])
            .unwrap_err();
        assert_eq!(
            err,
            WblError::TruncateCommitted {
                lsn: 20,
                commit: 20
            }
        );
        for lsn in 30..=35 {
            // Not awaited: the later append's durability covers these (one writer, in order).
            drop(
                wbl.append(RecordKind::RaftNormal, lsn, 2, vec![lsn as u8; 9])
                    .unwrap(),
            );
        }
        assert_eq!(wbl.last_lsn(), 35);
        assert_eq!(wbl.term(31), Some(2));
        let d = wbl
            .append(RecordKind::RaftNormal, 36, 2, vec![36; 9])
            .unwrap();
        d.await.unwrap();
        assert_eq!(wbl.durable_lsn(), 36);
        wbl.close().await.unwrap();
    });
    run(root.path(), || async {
        let (wbl, report) = Wbl::open(&dir, opts()).await.unwrap();
        assert_eq!(report.last_lsn, 36);
        assert_eq!(report.hard_state.commit, 20);
        assert_eq!(wbl.term(29), Some(1));
        assert_eq!(wbl.term(30), Some(2));
        let recs = wbl.read(1, usize::MAX).await.unwrap();
        assert_eq!(recs.len(), 36);
        let mut chain = 0;
        for r in &recs {
            chain = chain_next(chain, r.kind, r.lsn, r.term, &r.payload);
            assert_eq!(chain, r.chain, "lsn {}", r.lsn);
        }
        assert_eq!(recs[31].payload, vec![32u8; 9]);
    });
}

#[test]
fn hard_state_falls_back_to_older_slot_when_newer_is_corrupt() {
    let root = tempfile::tempdir().unwrap();
    let dir = log_dir(root.path());
    run(root.path(), || async {
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        append_batch(&wbl, 1, 10, 100).await;
        wbl.set_hard_state(HardState {
            term: 3,
            vote: 2,
            commit: 5,
        })
        .unwrap()
        .await
        .unwrap();
        wbl.set_hard_state(HardState {
            term: 4,
            vote: 2,
            commit: 7,
        })
        .unwrap()
        .await
        .unwrap();
        wbl.close().await.unwrap();
    });
    let hs = dir.join("hardstate");
    let mut img = std::fs::read(&hs).unwrap();
    // Two writes after creation: seq 1 went to slot 1, seq 2 (the newest) to slot 0.
    img[20] ^= 0x10;
    std::fs::write(&hs, &img).unwrap();
    run(root.path(), || async {
        let (wbl, report) = Wbl::open(&dir, opts()).await.unwrap();
        assert_eq!(
            report.hard_state,
            HardState {
                term: 3,
                vote: 2,
                commit: 5
            }
        );
        assert_eq!(wbl.hard_state().commit, 5);
    });
    img[4096 + 20] ^= 0x10;
    std::fs::write(&hs, &img).unwrap();
    run(root.path(), || async {
        let err = Wbl::open(&dir, opts()).await.err().expect("both slots bad");
        assert!(matches!(err, WblError::Corrupt { .. }), "{err}");
    });
}

#[test]
fn appends_are_bounded_and_checked() {
    let root = tempfile::tempdir().unwrap();
    let dir = log_dir(root.path());
    run(root.path(), || async {
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        let big = vec![0; MAX_PAYLOAD_BYTES + 1];
        let e = wbl.append(RecordKind::KeyPut, 1, 1, big).unwrap_err();
        assert!(matches!(e, WblError::PayloadTooLarge { .. }));
        let e = wbl.append(RecordKind::KeyPut, 2, 1, vec![]).unwrap_err();
        assert_eq!(
            e,
            WblError::LsnGap {
                lsn: 2,
                expected: 1
            }
        );
        let mut ds = Vec::new();
        let mut full = None;
        for lsn in 1..=keyfort_engine::wbl::MAX_PENDING_RECORDS as u64 + 10 {
            match wbl.append(RecordKind::KeyPut, lsn, 1, vec![]) {
                Ok(d) => ds.push(d),
                Err(e) => {
                    full = Some(e);
                    break;
                }
            }
        }
        assert!(matches!(full, Some(WblError::QueueFull { .. })), "{full:?}");
        for d in ds {
            d.await.unwrap();
        }
        let e = wbl.append(RecordKind::KeyPut, 0, 1, vec![]).unwrap_err();
        assert!(matches!(e, WblError::BelowFirst { .. }));
    });
}

#[test]
fn read_only_open_refuses_appends() {
    let root = tempfile::tempdir().unwrap();
    let dir = log_dir(root.path());
    run(root.path(), || async {
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        append_batch(&wbl, 1, 10, 100).await;
        wbl.close().await.unwrap();
        let (ro, report) = Wbl::open(&dir, ro_opts()).await.unwrap();
        assert_eq!(report.last_lsn, 10);
        assert_eq!(
            ro.append(RecordKind::KeyPut, 11, 1, vec![]).unwrap_err(),
            WblError::ReadOnly
        );
        check_all(&ro, 100).await;
    });
}

fn inodes(dir: &std::path::Path, prefix: &str) -> Vec<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.metadata().unwrap().ino())
        .collect()
}

#[test]
fn released_segments_are_recycled_and_their_stale_records_never_read_as_live() {
    let root = tempfile::tempdir().unwrap();
    let dir = log_dir(root.path());
    let mut freed = Vec::new();
    run(root.path(), || async {
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        for _ in 0..8 {
            let until = wbl.last_lsn() + 50;
            append_concurrently(&wbl, 4, until, 20_000).await;
            wbl.release_prefix(wbl.durable_lsn() - 30).await.unwrap();
            freed.extend(inodes(&dir, "free-"));
        }
        check_all(&wbl, 20_000).await;
        wbl.close().await.unwrap();
    });
    let live = inodes(&dir, "seg-");
    assert!(
        live.iter().any(|i| freed.contains(i)),
        "no segment was recycled"
    );
    run(root.path(), || async {
        let (wbl, report) = Wbl::open(&dir, opts()).await.unwrap();
        assert!(report.torn_tail.is_none(), "{report:?}");
        assert_eq!(report.last_lsn, 400);
        check_all(&wbl, 20_000).await;
        append_concurrently(&wbl, 4, 450, 20_000).await;
        wbl.close().await.unwrap();
        let (wbl, report) = Wbl::open(&dir, opts()).await.unwrap();
        assert!(report.torn_tail.is_none(), "{report:?}");
        check_all(&wbl, 20_000).await;
    });
}

/// A batch that ends 1, 2 or 3 bytes before a block boundary leaves that much zero padding;
/// the next batch's record starts at the boundary. The scan must skip the padding instead of
/// reading a magic across the boundary (found by cluster_bench: a SIGKILLed node refused to
/// restart with "bad magic 0x464b0000" two bytes before a block boundary).
#[test]
fn padding_of_one_to_three_bytes_before_a_block_boundary_is_skipped() {
    use keyfort_engine::wbl::{RECORD_HEADER_BYTES, RECORD_TRAILER_BYTES};
    for pad in 1..=3usize {
        let root = tempfile::tempdir().unwrap();
        let dir = log_dir(root.path());
        // One record per batch: each durable before the next is appended.
        let len = 4096 - pad - RECORD_HEADER_BYTES - RECORD_TRAILER_BYTES;
        run(root.path(), || async {
            let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
            for lsn in 1..=3u64 {
                wbl.append(RecordKind::KeyPut, lsn, 1, vec![lsn as u8; len])
                    .unwrap()
                    .await
                    .unwrap();
            }
            wbl.close().await.unwrap();
        });
        run(root.path(), || async {
            let (wbl, report) = Wbl::open(&dir, opts()).await.unwrap();
            assert_eq!((report.first_lsn, report.last_lsn), (1, 3), "pad {pad}");
            assert!(report.torn_tail.is_none(), "pad {pad}: {report:?}");
            let recs = wbl.read(1, 1 << 20).await.unwrap();
            assert_eq!(recs.len(), 3, "pad {pad}");
            for (i, r) in recs.iter().enumerate() {
                assert_eq!(r.payload, vec![i as u8 + 1; len]);
            }
        });
    }
}

/// A commit noted without waiting (`note_commit`) is persisted lazily: by the writer on its own
/// once `COMMIT_PERSIST_INTERVAL` has passed, and at the latest when the log closes; never past
/// the durable log.
#[test]
fn a_noted_commit_is_persisted_lazily_and_on_close() {
    let root = tempfile::tempdir().unwrap();
    let dir = log_dir(root.path());
    run(root.path(), || async {
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        append_batch(&wbl, 1, 20, 100).await;
        wbl.set_hard_state(HardState {
            term: 3,
            vote: 2,
            commit: 5,
        })
        .unwrap()
        .await
        .unwrap();
        wbl.note_commit(12);
        assert_eq!(wbl.hard_state().commit, 12, "visible at once");
        // Idle: the writer persists it by itself after the interval.
        glommio::timer::sleep(keyfort_engine::wbl::COMMIT_PERSIST_INTERVAL * 3).await;
        wbl.note_commit(17);
        wbl.close().await.unwrap();
    });
    run(root.path(), || async {
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        let hs = wbl.hard_state();
        assert_eq!((hs.term, hs.vote, hs.commit), (3, 2, 17));
        // A noted commit past the durable log is clamped to it when written.
        wbl.note_commit(1000);
        wbl.close().await.unwrap();
    });
    run(root.path(), || async {
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        assert_eq!(wbl.hard_state().commit, 20);
    });
}
