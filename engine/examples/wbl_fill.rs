//! Fills a write-behind log with N records of small payloads (for trying `keyfort wbl`).
//! `cargo run -p keyfort-engine --example wbl_fill DIR N`

use keyfort_engine::wbl::{RecordKind, Wbl, WblOptions};
use std::path::PathBuf;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("DIR"));
    let n: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let root = dir.parent().unwrap_or(&dir).to_path_buf();
    keyfort_engine::exec::run_local(&root, |_| async move {
        let (wbl, report) = Wbl::open(&dir, WblOptions::default()).await.unwrap();
        println!("{report:?}");
        let from = wbl.last_lsn() + 1;
        let mut last = None;
        for lsn in from..from + n {
            let payload = format!("record {lsn}").into_bytes();
            let d = wbl.append(RecordKind::KeyPut, lsn, 1, payload);
            match d {
                Ok(d) => last = Some(d),
                Err(e) => panic!("append {lsn}: {e}"),
            }
        }
        if let Some(d) = last {
            d.await.unwrap();
        }
        wbl.close().await.unwrap();
        println!("appended {from}..={}", from + n - 1);
    })
    .unwrap();
}
