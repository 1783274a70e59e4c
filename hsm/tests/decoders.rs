//! Every decoder of card bytes (key header, masked blob, partition config, wrapped integrity key,
//! encryption envelope) takes arbitrary input without panicking, answers a typed error for
//! garbage, and re-encodes whatever it accepts to the same bytes. No card needed: these are the
//! pure parsers that run before any byte reaches the card.

use keyfort_hsm::format::{Envelope, WrappedIntegrityKey};
use keyfort_hsm::{KeyHeader, MaskedBlob, PartitionConfig};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic_and_accepted_bytes_round_trip(b in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(h) = KeyHeader::decode(&b) {
            prop_assert_eq!(&h.encode()[..], &b[..h.encode().len()]);
        }
        if let Ok(m) = MaskedBlob::decode(&b) {
            prop_assert_eq!(m.encode(), b.clone());
        }
        if let Ok(c) = PartitionConfig::decode(&b) {
            prop_assert_eq!(c.encode(), b.clone());
        }
        if let Ok(k) = WrappedIntegrityKey::decode(&b) {
            prop_assert_eq!(k.encode(), b.clone());
        }
        let _ = Envelope::decode(&b);
    }

    #[test]
    fn every_truncation_of_a_valid_blob_is_a_typed_error(cut in 0usize..keyfort_hsm::format::MASKED_BLOB_LEN) {
        let header = KeyHeader::aes(keyfort_hsm::PartitionId([7; 16]), keyfort_hsm::KeyId([9; 16]), 3);
        let blob = MaskedBlob {
            header,
            under: keyfort_hsm::WrappedUnder::MaskingKey,
            wrapped: [0xAB; keyfort_hsm::format::WRAPPED_KEY_LEN],
            mac: [0xCD; 32],
        }
        .encode();
        prop_assert!(MaskedBlob::decode(&blob).is_ok());
        prop_assert!(MaskedBlob::decode(&blob[..cut.min(blob.len() - 1)]).is_err());
    }
}
