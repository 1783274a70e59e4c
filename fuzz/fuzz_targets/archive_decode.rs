//! Arbitrary bytes into the archived log range decoder (docs/format.md §9.3): a range or a typed
//! error, never a panic; what decodes holds one record per LSN of its range.
#![no_main]

use keyfort_engine::archive::LogRange;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((r, _mac)) = LogRange::decode_unverified(data) {
        assert!(r.to() >= r.from && !r.records.is_empty());
        assert_eq!(r.to() - r.from + 1, r.records.len() as u64);
    }
});
