//! The partition policy trailer (docs/format.md §2.3): `config(245) ‖ "KFPP" ‖ format(1) ‖
//! flags(1) ‖ HMAC-SHA256(partition HMAC key, config HMAC ‖ "KFPP" ‖ 1 ‖ flags)`. Made and
//! checked in real SoftHSM cards: a config without flags is the 245 bytes it always was; a
//! trailer travels to every card of the realm with its policy; any altered, truncated or
//! re-flagged trailer is a typed refusal (`BadMac` or `Corrupt`), never a panic. The pure
//! decoder is fuzzed here too.

use keyfort_hsm::format::{
    policy_flags, MAC_LEN, MAGIC_POLICY, PARTITION_CONFIG_LEN, PARTITION_CONFIG_WITH_POLICY_LEN,
    POLICY_FORMAT_VERSION, POLICY_TRAILER_LEN,
};
use keyfort_hsm::softhsm::fixture;
use keyfort_hsm::*;
use proptest::prelude::*;
use std::sync::{Mutex, OnceLock};

const REQUIRE: PartitionPolicy = PartitionPolicy {
    require_client_cert: true,
};

struct Fixed {
    /// The creating card's session.
    s1: Mutex<CoreSession>,
    /// Another card of the same realm.
    s2: Mutex<CoreSession>,
    /// A config with the REQUIRE_CLIENT_CERT trailer.
    with: Vec<u8>,
    pid: PartitionId,
}

fn fixed() -> &'static Fixed {
    static F: OnceLock<Fixed> = OnceLock::new();
    F.get_or_init(|| {
        let f = fixture();
        let mut s1 = f.new_card("policy", "realm").unwrap().session().unwrap();
        let s2 = f.new_card("policy", "realm").unwrap().session().unwrap();
        let pid = PartitionId(rand::random());
        let with = s1.create_partition_with(pid, REQUIRE).unwrap();
        Fixed {
            s1: Mutex::new(s1),
            s2: Mutex::new(s2),
            with,
            pid,
        }
    })
}

fn refused_as_typed(e: &CardError) -> bool {
    matches!(e, CardError::BadMac { .. } | CardError::Corrupt { .. })
}

#[test]
fn layout_and_constants() {
    assert_eq!(PARTITION_CONFIG_LEN, 245);
    assert_eq!(POLICY_TRAILER_LEN, 38);
    assert_eq!(PARTITION_CONFIG_WITH_POLICY_LEN, 283);
    assert_eq!(MAGIC_POLICY, b"KFPP");
    assert_eq!(POLICY_FORMAT_VERSION, 1);
    assert_eq!(policy_flags::REQUIRE_CLIENT_CERT, 1);
    assert_eq!(policy_flags::KNOWN, 1);
    let f = fixed();
    assert_eq!(f.with.len(), 283);
    let c = PartitionConfig::decode(&f.with).unwrap();
    let t = c.policy.clone().unwrap();
    assert_eq!(&f.with[245..249], b"KFPP");
    assert_eq!(f.with[249], 1);
    assert_eq!(f.with[250], policy_flags::REQUIRE_CLIENT_CERT);
    assert_eq!(&f.with[251..], &t.mac[..]);
    assert_eq!(c.policy(), REQUIRE);
    assert_eq!(c.encode(), f.with);
    // The trailer's MAC covers the config's MAC: recomputable as HMAC over those bytes.
    let covered = PolicyTrailer::authenticated(&c.mac, 1);
    assert_eq!(covered.len(), MAC_LEN + 6);
    assert_eq!(&covered[..MAC_LEN], &f.with[245 - MAC_LEN..245]);
    assert_eq!(&covered[MAC_LEN..], b"KFPP\x01\x01");
}

#[test]
fn no_flags_is_the_old_config_byte_for_byte() {
    let f = fixed();
    let mut s = f.s1.lock().unwrap();
    let p = PartitionId(rand::random());
    let plain = s.create_partition(p).unwrap();
    assert_eq!(plain.len(), PARTITION_CONFIG_LEN);
    assert_eq!(s.partition_policy(&p), Some(PartitionPolicy::default()));
    let q = PartitionId(rand::random());
    let none = s
        .create_partition_with(q, PartitionPolicy::default())
        .unwrap();
    assert_eq!(none.len(), PARTITION_CONFIG_LEN, "no flags: no trailer");
    assert!(PartitionConfig::decode(&none).unwrap().policy.is_none());
    assert_eq!(s.partition_policy(&q), Some(PartitionPolicy::default()));
    assert_eq!(s.partition_policy(&PartitionId([0xEE; 16])), None);
    s.drop_partition(&p);
    s.drop_partition(&q);
}

#[test]
fn the_policy_travels_to_every_card_of_the_realm() {
    let f = fixed();
    assert_eq!(f.s1.lock().unwrap().partition_policy(&f.pid), Some(REQUIRE));
    let mut s2 = f.s2.lock().unwrap();
    assert_eq!(s2.import_partition(&f.with).unwrap(), f.pid);
    assert_eq!(s2.partition_policy(&f.pid), Some(REQUIRE));
    // Keys made on one card work on the other.
    let blob =
        f.s1.lock()
            .unwrap()
            .create_key(&KeyHeader::aes(f.pid, KeyId(rand::random()), 1))
            .unwrap();
    let env = s2.encrypt(&blob, b"policy", b"").unwrap();
    assert_eq!(
        f.s1.lock().unwrap().decrypt(&blob, &env, b"").unwrap(),
        b"policy"
    );
    // Re-importing the config without its trailer loads it with no flags: the trailer's
    // absence is the old format (what the replicated state holds decides).
    s2.import_partition(&f.with[..PARTITION_CONFIG_LEN])
        .unwrap();
    assert_eq!(
        s2.partition_policy(&f.pid),
        Some(PartitionPolicy::default())
    );
    s2.import_partition(&f.with).unwrap();
    assert_eq!(s2.partition_policy(&f.pid), Some(REQUIRE));
}

#[test]
fn a_trailer_of_another_config_or_other_flags_is_refused_in_the_card() {
    let f = fixed();
    let mut s2 = f.s2.lock().unwrap();
    // Flags cleared with the MAC kept: the card refuses the MAC.
    let mut cleared = f.with.clone();
    cleared[250] = 0;
    assert!(
        matches!(
            s2.import_partition(&cleared),
            Err(CardError::BadMac {
                what: "partition policy",
                ..
            })
        ),
        "{:?}",
        s2.import_partition(&cleared)
    );
    // An unknown flag bit: refused before the card.
    let mut unknown = f.with.clone();
    unknown[250] |= 0x80;
    assert!(matches!(
        s2.import_partition(&unknown),
        Err(CardError::Corrupt { .. })
    ));
    // Another partition's trailer after this config.
    let other =
        f.s1.lock()
            .unwrap()
            .create_partition_with(PartitionId(rand::random()), REQUIRE)
            .unwrap();
    let mut spliced = f.with[..PARTITION_CONFIG_LEN].to_vec();
    spliced.extend_from_slice(&other[PARTITION_CONFIG_LEN..]);
    assert!(matches!(
        s2.import_partition(&spliced),
        Err(CardError::BadMac { .. })
    ));
    // Every length but 245 and 283.
    for n in [0, 1, 244, 246, 282, 284, 400] {
        let mut b = f.with.clone();
        b.resize(n, 0);
        assert!(matches!(
            s2.import_partition(&b),
            Err(CardError::Corrupt { .. })
        ));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Pure decoders: arbitrary trailers (any magic, version, flags, MAC) and arbitrary
    /// configs of any length never panic; what decodes re-encodes to its bytes and has known
    /// flags only.
    #[test]
    fn trailer_decode_never_panics(b in prop::collection::vec(any::<u8>(), 0..64),
                                   head in prop::sample::select(vec![0usize, 4, 5, 6])) {
        // Bias towards the real magic and version so flag checks are reached.
        let mut b = b;
        let real = [b'K', b'F', b'P', b'P', POLICY_FORMAT_VERSION];
        for (i, r) in real.iter().enumerate().take(head.min(5)) {
            if i < b.len() { b[i] = *r; }
        }
        match PolicyTrailer::decode(&b) {
            Ok(t) => {
                prop_assert_eq!(&t.encode()[..], &b[..]);
                prop_assert_eq!(t.flags & !policy_flags::KNOWN, 0);
                prop_assert_eq!(t.policy().flags(), t.flags);
            }
            Err(e) => prop_assert!(matches!(e, CardError::Corrupt { .. }), "{e:?}"),
        }
        match PartitionPolicy::from_flags(b.first().copied().unwrap_or(0)) {
            Ok(p) => prop_assert_eq!(Some(p.flags()), b.first().copied().or(Some(0))),
            Err(e) => prop_assert!(matches!(e, CardError::Corrupt { .. }), "{e:?}"),
        }
    }

    #[test]
    fn config_with_arbitrary_trailer_decodes_or_is_corrupt(tail in prop::collection::vec(any::<u8>(), 0..80)) {
        let base = &fixed().with[..PARTITION_CONFIG_LEN];
        let mut b = base.to_vec();
        b.extend_from_slice(&tail);
        match PartitionConfig::decode(&b) {
            Ok(c) => {
                prop_assert!(tail.is_empty() || tail.len() == POLICY_TRAILER_LEN);
                prop_assert_eq!(c.encode(), b);
            }
            Err(e) => prop_assert!(matches!(e, CardError::Corrupt { .. }), "{e:?}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// In the card: every single-bit change and every truncation of a config with a trailer is
    /// a typed refusal; nothing loads with another policy.
    #[test]
    fn mutated_or_truncated_trailers_are_typed_refusals(bit in 0usize..(POLICY_TRAILER_LEN * 8),
                                                        cut in 0usize..PARTITION_CONFIG_WITH_POLICY_LEN) {
        let f = fixed();
        let mut s2 = f.s2.lock().unwrap();
        let mut b = f.with.clone();
        b[PARTITION_CONFIG_LEN + bit / 8] ^= 1 << (bit % 8);
        let e = s2.import_partition(&b).unwrap_err();
        prop_assert!(refused_as_typed(&e), "{e:?}");
        if cut != PARTITION_CONFIG_LEN {
            let e = s2.import_partition(&f.with[..cut]).unwrap_err();
            prop_assert!(refused_as_typed(&e), "{e:?}");
        }
        // A refused import leaves a loaded partition's policy as it was.
        if s2.partition_loaded(&f.pid) {
            let p = s2.partition_policy(&f.pid);
            prop_assert!(p.is_some());
        }
    }
}
