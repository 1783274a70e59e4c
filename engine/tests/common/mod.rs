//! Shared helpers of the WBL integration tests.
#![allow(dead_code)]

use keyfort_engine::wbl::{RecordKind, Wbl, WblOptions};
use std::cell::Cell;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Small segments so that tests roll across several of them.
pub const TEST_SEGMENT_BYTES: u64 = 512 * 1024;

pub fn opts() -> WblOptions {
    WblOptions {
        segment_bytes: TEST_SEGMENT_BYTES,
        ..WblOptions::default()
    }
}

pub fn ro_opts() -> WblOptions {
    WblOptions {
        read_only: true,
        ..opts()
    }
}

/// Runs `f` on a fresh executor whose io probe file lives in `root`.
pub fn run<Fut: Future>(root: &Path, f: impl FnOnce() -> Fut) -> Fut::Output {
    keyfort_engine::exec::run_local(root, |_| f()).expect("executor")
}

pub fn log_dir(root: &Path) -> PathBuf {
    root.join("wbl")
}

/// Deterministic payload of `lsn`, so any reader can check what it got.
pub fn payload(lsn: u64, len_max: usize) -> Vec<u8> {
    let len = (lsn.wrapping_mul(2654435761) % len_max as u64) as usize + 1;
    (0..len).map(|i| (lsn as usize + i * 7) as u8).collect()
}

pub fn kind_of(lsn: u64) -> RecordKind {
    RecordKind::ALL[(lsn % RecordKind::ALL.len() as u64) as usize]
}

/// `tasks` concurrent appenders take LSNs from one counter until `until` (inclusive).
pub async fn append_concurrently(wbl: &Wbl, tasks: usize, until: u64, len_max: usize) {
    let next = Rc::new(Cell::new(wbl.last_lsn() + 1));
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (wbl, next) = (wbl.clone(), next.clone());
        handles.push(glommio::spawn_local(async move {
            loop {
                let lsn = next.get();
                if lsn > until {
                    return;
                }
                next.set(lsn + 1);
                let d = wbl
                    .append(kind_of(lsn), lsn, 1, payload(lsn, len_max))
                    .unwrap();
                d.await.unwrap();
            }
        }));
    }
    for h in handles {
        h.await;
    }
}

/// Appends `from..=to` as one batch and waits for it.
pub async fn append_batch(wbl: &Wbl, from: u64, to: u64, len_max: usize) {
    let mut ds = Vec::new();
    for lsn in from..=to {
        ds.push(
            wbl.append(kind_of(lsn), lsn, 1, payload(lsn, len_max))
                .unwrap(),
        );
    }
    for d in ds {
        d.await.unwrap();
    }
}

/// Every durable record present with the expected payload and a verifying chain.
pub async fn check_all(wbl: &Wbl, len_max: usize) {
    let mut r = wbl.reader(wbl.first_lsn());
    let mut expect = wbl.first_lsn();
    while let Some(rec) = r.next().await {
        let rec = rec.unwrap();
        assert_eq!(rec.lsn, expect);
        assert_eq!(
            rec.payload,
            payload(rec.lsn, len_max),
            "payload of lsn {}",
            rec.lsn
        );
        assert_eq!(Some(rec.chain), wbl.chain_at(rec.lsn));
        expect += 1;
    }
    assert_eq!(expect, wbl.durable_lsn() + 1);
}
