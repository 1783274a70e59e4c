//! `Wbl::reset_to`: starting a log over at a snapshot position, durably and crash-safely, and
//! the base file that records the new start.

mod common;
use common::*;
use futures_lite::future;
use keyfort_engine::wbl::base::{
    decode_base, encode_base, BaseState, BASE_FILE, BASE_FILE_BYTES, BASE_TMP_FILE,
};
use keyfort_engine::wbl::record::chain_next;
use keyfort_engine::wbl::segment::MetaError;
use keyfort_engine::wbl::{verify_dir, HardState, Wbl, WblError, BLOCK};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

/// Payloads large enough that the old log spans several test segments.
const LEN_MAX: usize = 20_000;
const OLD_END: u64 = 300;
const SNAP_CHAIN: u64 = 0x5eed_cafe_f00d_0001;
const SNAP_TERM: u64 = 7;

/// Appends `1..=OLD_END` and closes; returns the number of segment files.
fn build_old_log(root: &Path) -> usize {
    let dir = log_dir(root);
    run(root, || async {
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        append_concurrently(&wbl, 8, OLD_END, LEN_MAX).await;
        wbl.close().await.unwrap();
    });
    let segs = seg_files(&dir).len();
    assert!(segs >= 3, "old log has {segs} segments");
    segs
}

fn seg_files(dir: &Path) -> Vec<PathBuf> {
    files_with_prefix(dir, "seg-")
}

fn files_with_prefix(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    v.sort();
    v
}

/// Checks the empty reset log starting at `first`.
fn assert_reset_empty(wbl: &Wbl, first: u64) {
    assert_eq!(wbl.first_lsn(), first);
    assert_eq!(wbl.last_lsn(), first - 1);
    assert_eq!(wbl.durable_lsn(), first - 1);
    assert_eq!(wbl.chain_at(first - 1), Some(SNAP_CHAIN));
    assert_eq!(wbl.base_term(), Some(SNAP_TERM));
    assert_eq!(wbl.term(first), None);
}

/// Appends `from..=to` and checks the first record's chain is seeded with the snapshot's.
async fn append_after_reset(wbl: &Wbl, from: u64, to: u64) {
    append_batch(wbl, from, to, LEN_MAX).await;
    let seeded = chain_next(SNAP_CHAIN, kind_of(from), from, 1, &payload(from, LEN_MAX));
    assert_eq!(wbl.chain_at(from), Some(seeded));
}

#[test]
fn reset_beyond_end_then_append_and_reopen() {
    let root = tempfile::tempdir().unwrap();
    let dir = log_dir(root.path());
    build_old_log(root.path());
    let first = 1000;
    run(root.path(), || async {
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        assert_eq!(wbl.last_lsn(), OLD_END);
        wbl.reset_to(first, SNAP_CHAIN, SNAP_TERM).await.unwrap();
        assert_reset_empty(&wbl, first);
        assert!(seg_files(&dir).is_empty() || seg_files(&dir).len() == 1);
        assert!(matches!(
            wbl.read(first - 1, 1).await,
            Err(WblError::BelowFirst { .. })
        ));
        // The next append must be at `first`.
        assert_eq!(
            wbl.append(kind_of(5), 5, 1, vec![1]).err(),
            Some(WblError::BelowFirst { lsn: 5, first })
        );
        append_after_reset(&wbl, first, first + 99).await;
        check_all(&wbl, LEN_MAX).await;
        wbl.close().await.unwrap();
    });
    run(root.path(), || async {
        let (wbl, report) = Wbl::open(&dir, opts()).await.unwrap();
        assert_eq!((report.first_lsn, report.last_lsn), (first, first + 99));
        assert_eq!(wbl.chain_at(first - 1), Some(SNAP_CHAIN));
        assert_eq!(wbl.base_term(), Some(SNAP_TERM));
        check_all(&wbl, LEN_MAX).await;
        let r = wbl.read(first, 1).await.unwrap();
        assert_eq!(r[0].lsn, first);
        let report = verify_dir(&dir).await.unwrap();
        assert_eq!((report.first_lsn, report.last_lsn), (first, first + 99));
    });
}

#[test]
fn reset_then_reopen_without_append() {
    let root = tempfile::tempdir().unwrap();
    let dir = log_dir(root.path());
    build_old_log(root.path());
    let first = 5000;
    run(root.path(), || async {
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        wbl.reset_to(first, SNAP_CHAIN, SNAP_TERM).await.unwrap();
        wbl.close().await.unwrap();
    });
    run(root.path(), || async {
        let report = verify_dir(&dir).await.unwrap();
        assert_eq!((report.first_lsn, report.last_lsn), (first, first - 1));
        let (wbl, report) = Wbl::open(&dir, opts()).await.unwrap();
        assert_eq!((report.first_lsn, report.last_lsn), (first, first - 1));
        assert_reset_empty(&wbl, first);
        append_after_reset(&wbl, first, first + 20).await;
        wbl.close().await.unwrap();
    });
    run(root.path(), || async {
        let (wbl, report) = Wbl::open(&dir, opts()).await.unwrap();
        assert_eq!((report.first_lsn, report.last_lsn), (first, first + 20));
        check_all(&wbl, LEN_MAX).await;
    });
}

#[test]
fn reset_below_end_replaces_a_conflicting_log_and_lowers_commit() {
    let root = tempfile::tempdir().unwrap();
    let dir = log_dir(root.path());
    build_old_log(root.path());
    let first = 101;
    let old_chain = run(root.path(), || async {
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        let hs = HardState {
            term: 3,
            vote: 2,
            commit: 250,
        };
        wbl.set_hard_state(hs).unwrap().await.unwrap();
        let old_chain = wbl.chain_at(first).unwrap();
        wbl.reset_to(first, SNAP_CHAIN, SNAP_TERM).await.unwrap();
        assert_reset_empty(&wbl, first);
        let lowered = HardState {
            commit: first - 1,
            ..hs
        };
        assert_eq!(wbl.hard_state(), lowered);
        append_after_reset(&wbl, first, first + 49).await;
        assert_ne!(wbl.chain_at(first), Some(old_chain));
        wbl.close().await.unwrap();
        old_chain
    });
    run(root.path(), || async {
        let (wbl, report) = Wbl::open(&dir, opts()).await.unwrap();
        assert_eq!((report.first_lsn, report.last_lsn), (first, first + 49));
        assert_eq!(report.hard_state.commit, first - 1);
        assert_ne!(wbl.chain_at(first), Some(old_chain));
        check_all(&wbl, LEN_MAX).await;
        // The new entries are above the lowered commit: a conflict may overwrite them.
        append_batch(&wbl, first + 10, first + 12, LEN_MAX).await;
        assert_eq!(wbl.last_lsn(), first + 12);
    });
}

#[test]
fn reset_waits_for_enqueued_records_and_blocks_appends_meanwhile() {
    let root = tempfile::tempdir().unwrap();
    let dir = log_dir(root.path());
    run(root.path(), || async {
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        let pending: Vec<_> = (1..=50)
            .map(|lsn| wbl.append(kind_of(lsn), lsn, 1, payload(lsn, 100)).unwrap())
            .collect();
        let mut reset = Box::pin(wbl.reset_to(2000, SNAP_CHAIN, SNAP_TERM));
        if future::poll_once(&mut reset).await.is_none() {
            assert_eq!(
                wbl.append(kind_of(51), 51, 1, vec![0]).err(),
                Some(WblError::Resetting)
            );
            assert_eq!(
                wbl.set_hard_state(HardState::default()).err(),
                Some(WblError::Resetting)
            );
            assert_eq!(
                wbl.reset_to(3000, SNAP_CHAIN, SNAP_TERM).await,
                Err(WblError::Resetting)
            );
            reset.await.unwrap();
        }
        for d in pending {
            d.await.unwrap();
        }
        assert_reset_empty(&wbl, 2000);
        append_after_reset(&wbl, 2000, 2005).await;
        wbl.close().await.unwrap();
    });
}

#[test]
fn reset_is_refused_read_only_and_at_lsn_zero() {
    let root = tempfile::tempdir().unwrap();
    let dir = log_dir(root.path());
    build_old_log(root.path());
    run(root.path(), || async {
        let (ro, _) = Wbl::open(&dir, ro_opts()).await.unwrap();
        assert_eq!(ro.reset_to(10, 0, 0).await, Err(WblError::ReadOnly));
        assert_eq!(ro.last_lsn(), OLD_END);
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        assert_eq!(
            wbl.reset_to(0, 0, 0).await,
            Err(WblError::BadFirstLsn { lsn: 0 })
        );
        assert_eq!(wbl.last_lsn(), OLD_END);
        wbl.close().await.unwrap();
        assert!(!dir.join(BASE_FILE).exists());
    });
}

/// Crash after `base.tmp` was written, before its rename: the old log, tmp file removed.
#[test]
fn crash_before_base_rename_reopens_the_old_log() {
    let root = tempfile::tempdir().unwrap();
    let dir = log_dir(root.path());
    build_old_log(root.path());
    let base = BaseState {
        first_lsn: 1000,
        base_chain: SNAP_CHAIN,
        base_term: SNAP_TERM,
        first_seq: 1 << 40,
        epoch_floor: 1 << 40,
    };
    std::fs::write(dir.join(BASE_TMP_FILE), base_image(&base)).unwrap();
    run(root.path(), || async {
        let report = verify_dir(&dir).await.unwrap();
        assert_eq!((report.first_lsn, report.last_lsn), (1, OLD_END));
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        assert_eq!((wbl.first_lsn(), wbl.last_lsn()), (1, OLD_END));
        check_all(&wbl, LEN_MAX).await;
        wbl.close().await.unwrap();
    });
    assert!(!dir.join(BASE_TMP_FILE).exists());
}

/// Crash after the base file's rename but before (or while) the old segments were removed:
/// the reset log; the leftovers are ignored by verify and deleted by a writable open.
#[test]
fn crash_after_base_rename_reopens_the_reset_log() {
    let root = tempfile::tempdir().unwrap();
    let dir = log_dir(root.path());
    build_old_log(root.path());
    let saved = root.path().join("saved");
    std::fs::create_dir(&saved).unwrap();
    let old = seg_files(&dir);
    for p in &old {
        std::fs::copy(p, saved.join(p.file_name().unwrap())).unwrap();
    }
    let first = 800;
    run(root.path(), || async {
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        wbl.reset_to(first, SNAP_CHAIN, SNAP_TERM).await.unwrap();
        append_after_reset(&wbl, first, first + 30).await;
        wbl.close().await.unwrap();
    });
    // Put the old segments back, as if the removal never happened (all of them, or a part).
    for (i, p) in old.iter().enumerate() {
        if i % 2 == 0 || i + 1 == old.len() {
            std::fs::copy(saved.join(p.file_name().unwrap()), p).unwrap();
        }
    }
    run(root.path(), || async {
        let report = verify_dir(&dir).await.unwrap();
        assert_eq!((report.first_lsn, report.last_lsn), (first, first + 30));
        let (wbl, report) = Wbl::open(&dir, opts()).await.unwrap();
        assert_eq!((report.first_lsn, report.last_lsn), (first, first + 30));
        assert_eq!(wbl.chain_at(first - 1), Some(SNAP_CHAIN));
        assert_eq!(wbl.base_term(), Some(SNAP_TERM));
        check_all(&wbl, LEN_MAX).await;
        wbl.close().await.unwrap();
    });
    for p in &old {
        assert!(!p.exists(), "leftover {p:?} not removed");
    }
    // Same with no append after the reset: an empty reset log, all old segments leftovers.
    let (first2, chain2) = (900, 42);
    let saved2 = root.path().join("saved2");
    std::fs::create_dir(&saved2).unwrap();
    let before = seg_files(&dir);
    for p in &before {
        std::fs::copy(p, saved2.join(p.file_name().unwrap())).unwrap();
    }
    run(root.path(), || async {
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        wbl.reset_to(first2, chain2, SNAP_TERM).await.unwrap();
        wbl.close().await.unwrap();
    });
    for p in &before {
        std::fs::copy(saved2.join(p.file_name().unwrap()), p).unwrap();
    }
    run(root.path(), || async {
        let (wbl, report) = Wbl::open(&dir, opts()).await.unwrap();
        assert_eq!((report.first_lsn, report.last_lsn), (first2, first2 - 1));
        assert_eq!(wbl.chain_at(first2 - 1), Some(chain2));
        wbl.close().await.unwrap();
    });
}

fn base_image(base: &BaseState) -> Vec<u8> {
    let mut img = vec![0u8; BASE_FILE_BYTES];
    encode_base(&mut img, base);
    img
}

/// Verify and a writable open both refuse the log in `root` as corrupt.
fn assert_corrupt(root: &Path) {
    let dir = log_dir(root);
    run(root, || async {
        let err = verify_dir(&dir).await.unwrap_err();
        assert!(matches!(err, WblError::Corrupt { .. }), "{err:?}");
        let err = Wbl::open(&dir, opts()).await.err().unwrap();
        assert!(matches!(err, WblError::Corrupt { .. }), "{err:?}");
    });
}

/// A base file that the segments contradict is corruption, never silently taken.
#[test]
fn inconsistent_or_corrupt_base_file_is_corruption() {
    let root = tempfile::tempdir().unwrap();
    let dir = log_dir(root.path());
    build_old_log(root.path());
    // Claims the log starts at 100 while its first segment (seq >= first_seq) starts at 1.
    let base = BaseState {
        first_lsn: 100,
        base_chain: SNAP_CHAIN,
        base_term: SNAP_TERM,
        first_seq: 0,
        epoch_floor: 0,
    };
    std::fs::write(dir.join(BASE_FILE), base_image(&base)).unwrap();
    assert_corrupt(root.path());
    // Starts where the first segment starts but with another chain seed.
    let base = BaseState {
        first_lsn: 1,
        base_chain: 99,
        ..base
    };
    std::fs::write(dir.join(BASE_FILE), base_image(&base)).unwrap();
    assert_corrupt(root.path());
    // The real start (1, chain 0) is consistent.
    let base = BaseState {
        first_lsn: 1,
        base_chain: 0,
        ..base
    };
    let mut img = base_image(&base);
    std::fs::write(dir.join(BASE_FILE), &img).unwrap();
    run(root.path(), || async {
        let report = verify_dir(&dir).await.unwrap();
        assert_eq!((report.first_lsn, report.last_lsn), (1, OLD_END));
    });
    // A damaged or truncated base file.
    img[20] ^= 1;
    std::fs::write(dir.join(BASE_FILE), &img).unwrap();
    assert_corrupt(root.path());
    std::fs::write(dir.join(BASE_FILE), &img[..100]).unwrap();
    assert_corrupt(root.path());
}

/// After a reset, releasing the reset log's first segments moves the start above the base:
/// the first remaining segment wins, the base term is no longer known.
#[test]
fn release_after_reset_survives_reopen() {
    let root = tempfile::tempdir().unwrap();
    let dir = log_dir(root.path());
    let first = 10_000;
    let released = run(root.path(), || async {
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        append_batch(&wbl, 1, 10, 100).await;
        wbl.reset_to(first, SNAP_CHAIN, SNAP_TERM).await.unwrap();
        append_concurrently(&wbl, 8, first + 299, LEN_MAX).await;
        let released = wbl.release_prefix(first + 200).await.unwrap();
        assert!(released > first, "released to {released}");
        wbl.close().await.unwrap();
        released
    });
    run(root.path(), || async {
        let report = verify_dir(&dir).await.unwrap();
        assert_eq!((report.first_lsn, report.last_lsn), (released, first + 299));
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        assert_eq!(wbl.first_lsn(), released);
        assert_eq!(wbl.base_term(), None);
        check_all(&wbl, LEN_MAX).await;
        // A second reset supersedes the first base file.
        wbl.reset_to(50_000, SNAP_CHAIN, SNAP_TERM + 1)
            .await
            .unwrap();
        append_after_reset(&wbl, 50_000, 50_010).await;
        wbl.close().await.unwrap();
    });
    run(root.path(), || async {
        let (wbl, report) = Wbl::open(&dir, opts()).await.unwrap();
        assert_eq!((report.first_lsn, report.last_lsn), (50_000, 50_010));
        assert_eq!(wbl.base_term(), Some(SNAP_TERM + 1));
        check_all(&wbl, LEN_MAX).await;
    });
    assert!(files_with_prefix(&dir, "free-").len() <= 2);
}

fn arb_base() -> impl Strategy<Value = BaseState> {
    (
        1u64..,
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(first_lsn, base_chain, base_term, first_seq, epoch_floor)| BaseState {
                first_lsn,
                base_chain,
                base_term,
                first_seq,
                epoch_floor,
            },
        )
}

proptest! {
    #[test]
    fn base_roundtrips(b in arb_base()) {
        let mut img = vec![0u8; BASE_FILE_BYTES];
        encode_base(&mut img, &b);
        prop_assert_eq!(decode_base(&img), Ok(b));
    }

    #[test]
    fn base_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..BLOCK + 64)) {
        let _ = decode_base(&bytes);
    }

    #[test]
    fn damaged_base_gives_typed_errors(b in arb_base(), at in 0usize..52, bit in 0u8..8, cut in 0usize..BLOCK) {
        let mut img = vec![0u8; BASE_FILE_BYTES];
        encode_base(&mut img, &b);
        prop_assert_eq!(decode_base(&img[..cut]), Err(MetaError::Truncated(cut)));
        img[at] ^= 1 << bit;
        let err = decode_base(&img).unwrap_err();
        let expected = match at {
            0..=3 => matches!(err, MetaError::BadMagic(_)),
            4 => matches!(err, MetaError::BadVersion(_)),
            5..=7 => err == MetaError::BadReserved,
            _ => err == MetaError::BadCrc,
        };
        prop_assert!(expected, "flip at {} gave {:?}", at, err);
    }
}

#[test]
fn base_with_first_lsn_zero_is_refused() {
    let mut img = vec![0u8; BASE_FILE_BYTES];
    let b = BaseState {
        first_lsn: 0,
        base_chain: 1,
        base_term: 1,
        first_seq: 0,
        epoch_floor: 0,
    };
    encode_base(&mut img, &b);
    assert!(matches!(decode_base(&img), Err(MetaError::BadField(_))));
}
