//! Damage on disk: what recovery must call a torn tail (cut, report, keep everything before)
//! and what it must call corruption (typed error naming file, offset and LSN).

mod common;
use common::*;
use keyfort_engine::wbl::record::{decode, RECORD_MAGIC};
use keyfort_engine::wbl::{verify_dir, HardState, Wbl, WblError, WblOptions, BLOCK};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Segment files holding records (the prepared next segment holds none).
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wbl") && !records(p).is_empty())
        .collect();
    v.sort();
    v
}

/// (lsn, offset, length) of every record of a segment, walked like the scanner does.
fn records(seg: &Path) -> Vec<(u64, u64, usize)> {
    let img = std::fs::read(seg).unwrap();
    let mut out = Vec::new();
    let mut pos = BLOCK;
    while pos + 4 <= img.len() {
        let magic = u32::from_le_bytes(img[pos..pos + 4].try_into().unwrap());
        if magic == 0 && !pos.is_multiple_of(BLOCK) {
            pos = pos.div_ceil(BLOCK) * BLOCK;
            continue;
        }
        if magic != RECORD_MAGIC {
            break;
        }
        let (r, n) = decode(&img[pos..]).unwrap();
        out.push((r.lsn, pos as u64, n));
        pos += n;
    }
    out
}

fn find(seg: &Path, lsn: u64) -> (u64, usize) {
    let r = records(seg).into_iter().rev().find(|r| r.0 == lsn).unwrap();
    (r.1, r.2)
}

fn patch(path: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
    f.sync_all().unwrap();
}

fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut v, off)
        .unwrap();
    v
}

/// Builds a log of batches `(from, to, payload_len_max)` and an optional commit.
fn build(root: &Path, o: WblOptions, batches: &[(u64, u64, usize)], commit: u64) {
    let dir = log_dir(root);
    run(root, || async {
        let (wbl, _) = Wbl::open(&dir, o).await.unwrap();
        for (a, b, len) in batches {
            append_batch(&wbl, *a, *b, *len).await;
        }
        if commit > 0 {
            let hs = HardState {
                term: 1,
                vote: 1,
                commit,
            };
            wbl.set_hard_state(hs).unwrap().await.unwrap();
        }
        wbl.close().await.unwrap();
    });
}

fn big_segments() -> WblOptions {
    WblOptions {
        segment_bytes: 4 << 20,
        ..opts()
    }
}

fn verify(root: &Path) -> Result<keyfort_engine::wbl::RecoveryReport, WblError> {
    let dir = log_dir(root);
    run(root, || async { verify_dir(&dir).await })
}

fn assert_corrupt(
    r: Result<keyfort_engine::wbl::RecoveryReport, WblError>,
    seg: &Path,
    off: u64,
    lsn: u64,
) {
    match r {
        Err(WblError::Corrupt {
            file,
            offset,
            lsn: l,
            ..
        }) => {
            assert_eq!((file.as_path(), offset, l), (seg, off, lsn));
        }
        other => panic!("expected corruption at {off} lsn {lsn}, got {other:?}"),
    }
}

#[test]
fn bit_flip_in_an_earlier_committed_record_is_corruption() {
    let root = tempfile::tempdir().unwrap();
    build(root.path(), opts(), &[(1, 3, 16), (4, 20, 16)], 3);
    let seg = &segments(&log_dir(root.path()))[0];
    let (off, len) = find(seg, 2);
    let orig = read_at(seg, off, len);
    let dir = log_dir(root.path());
    run(root.path(), || async {
        for bit in 0..len * 8 {
            let mut b = orig.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            patch(seg, off, &b);
            assert_corrupt(verify_dir(&dir).await, seg, off, 2);
        }
    });
    patch(seg, off, &orig);
    assert_eq!(verify(root.path()).unwrap().last_lsn, 20);
}

#[test]
fn damaged_record_followed_by_more_than_one_batch_is_corruption() {
    let root = tempfile::tempdir().unwrap();
    build(
        root.path(),
        big_segments(),
        &[(1, 3, 16), (4, 60, 100_000)],
        0,
    );
    let seg = &segments(&log_dir(root.path()))[0];
    let (off, _) = find(seg, 2);
    let mut b = read_at(seg, off + 41, 1);
    b[0] ^= 4;
    patch(seg, off + 41, &b);
    assert_corrupt(verify(root.path()), seg, off, 2);
}

#[test]
fn bit_flip_in_the_last_batch_above_commit_is_a_torn_tail() {
    let root = tempfile::tempdir().unwrap();
    build(root.path(), opts(), &[(1, 10, 16), (11, 13, 16)], 10);
    let seg = &segments(&log_dir(root.path()))[0];
    let (off, len) = find(seg, 12);
    let orig = read_at(seg, off, len);
    let dir = log_dir(root.path());
    run(root.path(), || async {
        for bit in 0..len * 8 {
            let mut b = orig.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            patch(seg, off, &b);
            let r = verify_dir(&dir).await.unwrap();
            assert_eq!(r.last_lsn, 11, "bit {bit}");
            let t = r.torn_tail.expect("torn tail reported");
            assert_eq!((t.offset, t.lsn), (off, 12));
        }
    });
    // A writable open cuts and zeroes the tail; the log then grows and reopens clean.
    let dir = log_dir(root.path());
    run(root.path(), || async {
        let (wbl, r) = Wbl::open(&dir, opts()).await.unwrap();
        assert!(r.torn_tail.is_some());
        append_batch(&wbl, 12, 40, 16).await;
        wbl.close().await.unwrap();
        let (wbl, r) = Wbl::open(&dir, opts()).await.unwrap();
        assert!(r.torn_tail.is_none());
        assert_eq!(r.last_lsn, 40);
        assert_eq!(
            wbl.read(12, usize::MAX).await.unwrap()[0].payload,
            payload(12, 16)
        );
    });
}

#[test]
fn truncating_the_last_write_at_every_byte_keeps_all_earlier_records() {
    let root = tempfile::tempdir().unwrap();
    build(root.path(), opts(), &[(1, 10, 60), (11, 20, 60)], 10);
    let seg = &segments(&log_dir(root.path()))[0];
    let recs = records(seg);
    let start = recs.iter().find(|r| r.0 == 11).unwrap().1;
    let end = recs.last().map(|r| r.1 as usize + r.2).unwrap();
    let orig = read_at(seg, start, end - start as usize);
    let dir = log_dir(root.path());
    run(root.path(), || async {
        for cut in start..end as u64 {
            let mut b = orig.clone();
            b[(cut - start) as usize..].fill(0);
            patch(seg, start, &b);
            let r = verify_dir(&dir).await.unwrap();
            let kept = recs
                .iter()
                .filter(|x| x.0 > 10 && x.1 + x.2 as u64 <= cut)
                .count();
            assert_eq!(r.last_lsn, 10 + kept as u64, "cut at {cut}");
            if let Some(t) = r.torn_tail {
                assert_eq!(t.lsn, r.last_lsn + 1);
            }
        }
    });
}

fn damage_last_batch(how: &str) {
    let root = tempfile::tempdir().unwrap();
    build(root.path(), opts(), &[(1, 10, 1000), (11, 40, 1000)], 10);
    let seg = &segments(&log_dir(root.path()))[0];
    let start = records(seg).iter().find(|r| r.0 == 11).unwrap().1;
    let b0 = read_at(seg, start, BLOCK);
    let b1 = read_at(seg, start + BLOCK as u64, BLOCK);
    match how {
        "zero-middle" => patch(seg, start + BLOCK as u64, &[0; BLOCK]),
        "zero-first" => patch(seg, start, &[0; BLOCK]),
        "swap" => {
            patch(seg, start, &b1);
            patch(seg, start + BLOCK as u64, &b0);
        }
        _ => unreachable!(),
    }
    let r = verify(root.path()).unwrap();
    assert!(r.torn_tail.is_some(), "{how}: {r:?}");
    assert!((10..40).contains(&r.last_lsn), "{how}: {r:?}");
    let dir = log_dir(root.path());
    run(root.path(), || async {
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        check_all(&wbl, 1000).await;
        let next = wbl.last_lsn() + 1;
        append_batch(&wbl, next, next + 5, 1000).await;
        wbl.close().await.unwrap();
        let (_, r) = Wbl::open(&dir, opts()).await.unwrap();
        assert!(r.torn_tail.is_none(), "{how}: {r:?}");
        assert_eq!(r.last_lsn, next + 5);
    });
}

#[test]
fn zeroed_block_inside_the_last_batch_is_a_torn_tail() {
    damage_last_batch("zero-middle");
}

#[test]
fn dropped_first_block_of_the_last_batch_is_a_torn_tail() {
    damage_last_batch("zero-first");
}

#[test]
fn reordered_blocks_of_the_last_batch_are_a_torn_tail() {
    damage_last_batch("swap");
}

#[test]
fn bad_block_in_an_earlier_batch_is_corruption_naming_file_offset_and_lsn() {
    let root = tempfile::tempdir().unwrap();
    build(root.path(), opts(), &[(1, 20, 1000), (21, 30, 100)], 30);
    let seg = &segments(&log_dir(root.path()))[0];
    let bad = 2 * BLOCK as u64;
    let victim = records(seg)
        .into_iter()
        .find(|r| r.1 + r.2 as u64 > bad)
        .unwrap();
    patch(seg, bad, &[0xA5; BLOCK]);
    assert_corrupt(verify(root.path()), seg, victim.1, victim.0);
}

#[test]
fn torn_tail_at_or_below_the_persisted_commit_is_corruption() {
    let root = tempfile::tempdir().unwrap();
    build(root.path(), opts(), &[(1, 10, 16), (11, 20, 16)], 20);
    let seg = &segments(&log_dir(root.path()))[0];
    let (off, _) = find(seg, 20);
    let mut b = read_at(seg, off + 20, 1);
    b[0] ^= 1;
    patch(seg, off + 20, &b);
    assert_corrupt(verify(root.path()), seg, off, 20);
}

#[test]
fn sealed_segment_without_footer_is_corruption() {
    let root = tempfile::tempdir().unwrap();
    build(root.path(), opts(), &[(1, 40, 20_000), (41, 80, 20_000)], 0);
    let segs = segments(&log_dir(root.path()));
    assert!(segs.len() >= 2);
    let recs = records(&segs[0]);
    let last = recs.last().unwrap();
    let footer = (last.1 + last.2 as u64).div_ceil(BLOCK as u64) * BLOCK as u64;
    patch(&segs[0], footer, &[0; BLOCK]);
    match verify(root.path()) {
        Err(WblError::Corrupt { file, lsn, .. }) => {
            assert_eq!((file, lsn), (segs[0].clone(), last.0 + 1));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn stale_records_of_a_recycled_segment_are_never_read_as_live() {
    let root = tempfile::tempdir().unwrap();
    build(
        root.path(),
        opts(),
        &[(1, 40, 20_000), (41, 60, 20_000), (61, 62, 100)],
        0,
    );
    let segs = segments(&log_dir(root.path()));
    let (old, cur) = (&segs[0], segs.last().unwrap());
    let end = records(cur).last().map(|r| r.1 + r.2 as u64).unwrap();
    let end = end.div_ceil(BLOCK as u64) * BLOCK as u64;
    let room = 512 * 1024 - end as usize - BLOCK;
    // What a recycled file holds after its new header and batches: an older epoch's records.
    let stale = read_at(old, BLOCK as u64, room);
    patch(cur, end, &stale);
    let before = verify(root.path()).unwrap();
    assert_eq!(before.last_lsn, 62);
    assert!(before.torn_tail.is_none(), "{before:?}");
    let dir = log_dir(root.path());
    run(root.path(), || async {
        let (wbl, _) = Wbl::open(&dir, opts()).await.unwrap();
        assert_eq!(wbl.last_lsn(), 62);
        append_batch(&wbl, 63, 64, 100).await;
        wbl.close().await.unwrap();
        let (wbl, r) = Wbl::open(&dir, opts()).await.unwrap();
        assert_eq!(r.last_lsn, 64);
        assert_eq!(wbl.read(63, usize::MAX).await.unwrap().len(), 2);
    });
}
