//! Arbitrary bytes into every pure card-format decoder (key header, masked blob, partition
//! config with or without its policy trailer, policy trailer, wrapped integrity key, envelope):
//! a value or a typed error, never a panic; whatever decodes re-encodes to the same bytes.
#![no_main]

use keyfort_hsm::format::policy_flags;
use keyfort_hsm::format::{Envelope, WrappedIntegrityKey};
use keyfort_hsm::{KeyHeader, MaskedBlob, PartitionConfig, PolicyTrailer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = KeyHeader::decode(data) {
        let e = h.encode();
        assert_eq!(&e[..], &data[..e.len()]);
    }
    if let Ok(m) = MaskedBlob::decode(data) {
        assert_eq!(m.encode(), data);
    }
    if let Ok(c) = PartitionConfig::decode(data) {
        assert_eq!(c.encode(), data);
        assert_eq!(c.policy().flags() & !policy_flags::KNOWN, 0);
    }
    if let Ok(t) = PolicyTrailer::decode(data) {
        assert_eq!(&t.encode()[..], data);
        assert_eq!(t.flags & !policy_flags::KNOWN, 0);
    }
    if let Ok(k) = WrappedIntegrityKey::decode(data) {
        assert_eq!(k.encode(), data);
    }
    let _ = Envelope::decode(data);
});
