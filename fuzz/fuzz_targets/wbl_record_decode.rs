//! Arbitrary bytes into every pure WBL decoder: record, segment header and footer, hard-state
//! slot. Any input must give a value or a typed error, never a panic; a decoded record must
//! re-encode to the same bytes.
#![no_main]

use keyfort_engine::wbl::hardstate::decode_slot;
use keyfort_engine::wbl::record::{decode_ref, encode};
use keyfort_engine::wbl::segment::{decode_footer, decode_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((r, n)) = decode_ref(data) {
        assert_eq!(encode(&r), &data[..n]);
    }
    let _ = decode_header(data);
    let _ = decode_footer(data);
    let _ = decode_slot(data);
});
