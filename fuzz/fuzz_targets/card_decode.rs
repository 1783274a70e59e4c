//! Arbitrary bytes into every pure card-format decoder (key header, masked blob, partition
//! config, wrapped integrity key, envelope): a value or a typed error, never a panic; whatever
//! decodes re-encodes to the same bytes.
#![no_main]

use keyfort_hsm::format::{Envelope, WrappedIntegrityKey};
use keyfort_hsm::{KeyHeader, MaskedBlob, PartitionConfig};
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
    }
    if let Ok(k) = WrappedIntegrityKey::decode(data) {
        assert_eq!(k.encode(), data);
    }
    let _ = Envelope::decode(data);
});
