//! Arbitrary bytes as a snapshot file: opening it (every check but the card MAC, which needs a
//! card) answers a typed error or a snapshot whose lookups work, never a panic. The file lives
//! in /dev/shm so each input costs microseconds.
#![no_main]

use keyfort_engine::snapshot::Snapshot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::PathBuf::from(format!(
        "/dev/shm/keyfort-fuzz-snapshot-{}",
        std::process::id()
    ));
    std::fs::write(&path, data).expect("write input file");
    if let Ok(s) = Snapshot::open_without_mac(&path) {
        for e in s.index().to_vec() {
            let _ = s.get(e.first);
        }
    }
});
