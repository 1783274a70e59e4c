//! Arbitrary bytes as a connection's read buffer: decoding frames back to back answers frames,
//! "need more" or a typed error, never a panic, never a frame longer than the buffer.
#![no_main]

use keyfort_net::frame::decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while let Ok(Some((f, n))) = decode(&data[at..]) {
        assert!(n >= f.payload.len() && at + n <= data.len());
        at += n;
    }
});
