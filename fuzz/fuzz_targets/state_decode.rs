//! Arbitrary bytes into every state-machine decoder (record payloads of every kind, key entries,
//! idempotency entries): a value or a typed error, never a panic; the strict codecs give each
//! value exactly one encoding, so whatever decodes re-encodes to the same bytes.
#![no_main]

use keyfort_engine::state::{IdempotencyEntry, KeyEntry, Op};
use keyfort_engine::wbl::RecordKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&k, payload)) = data.split_first() else {
        return;
    };
    if let Some(kind) = RecordKind::from_u8(k) {
        if let Ok(op) = Op::decode(kind, payload) {
            assert_eq!(op.kind(), kind);
            assert_eq!(op.encode(), payload);
        }
    }
    if let Ok(e) = KeyEntry::decode(data) {
        assert_eq!(e.encode(), data);
    }
    if let Ok(e) = IdempotencyEntry::decode(data) {
        assert_eq!(&e.encode()[..], data);
    }
});
