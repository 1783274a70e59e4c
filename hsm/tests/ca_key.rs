//! The cluster CA key on real SoftHSM2 tokens: made in one card, loaded in another card of the
//! realm, signing DER ECDSA signatures that ring verifies; refused by other realms and vendors,
//! when tampered, or when its public point is not its own.

use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use keyfort_hsm::ca::{ecdsa_raw_to_der, MAX_WRAPPED_CA_KEY_LEN};
use keyfort_hsm::softhsm::fixture;
use keyfort_hsm::*;
use proptest::prelude::*;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
use std::sync::OnceLock;

/// Two cards of one realm, one of another realm (same vendor), one of another vendor.
struct Cards {
    a1: Card,
    a2: Card,
    other_realm: Card,
    other_vendor: Card,
}

fn cards() -> &'static Cards {
    static C: OnceLock<Cards> = OnceLock::new();
    C.get_or_init(|| {
        let f = fixture();
        Cards {
            a1: f.new_card("ca-acme", "ca-realm-a").unwrap(),
            a2: f.new_card("ca-acme", "ca-realm-a").unwrap(),
            other_realm: f.new_card("ca-acme", "ca-realm-b").unwrap(),
            other_vendor: f.new_card("ca-globex", "ca-realm-a").unwrap(),
        }
    })
}

/// One CA key made on card a1 (shared by the tests that only read it).
fn wrapped() -> &'static WrappedCaKey {
    static W: OnceLock<WrappedCaKey> = OnceLock::new();
    W.get_or_init(|| cards().a1.session().unwrap().generate_ca_key().unwrap())
}

fn verify(point: &[u8; 65], msg: &[u8], der: &[u8]) -> bool {
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, point)
        .verify(msg, der)
        .is_ok()
}

/// The (r, s) INTEGER contents of a DER ECDSA-Sig-Value, checking its structure on the way.
fn der_integers(der: &[u8]) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(der[0], 0x30);
    assert_eq!(der[1] as usize, der.len() - 2);
    let mut at = 2;
    let mut ints = vec![];
    for _ in 0..2 {
        assert_eq!(der[at], 0x02);
        let len = der[at + 1] as usize;
        let v = der[at + 2..at + 2 + len].to_vec();
        // Minimal: no redundant leading zero, never negative.
        assert!(v[0] & 0x80 == 0);
        assert!(v.len() == 1 || v[0] != 0 || v[1] & 0x80 != 0);
        ints.push(v);
        at += 2 + len;
    }
    assert_eq!(at, der.len());
    (ints[0].clone(), ints[1].clone())
}

#[test]
fn softhsm_offers_ecdsa_and_aes_key_wrap_pad() {
    let s = cards().a1.session().unwrap();
    let slot = s.pkcs11_session().get_session_info().unwrap().slot_id();
    let mechs = fixture().hsm().ctx().get_mechanism_list(slot).unwrap();
    assert!(mechs.contains(&MechanismType::ECDSA));
    assert!(mechs.contains(&MechanismType::AES_KEY_WRAP_PAD));
    assert!(mechs.contains(&MechanismType::ECC_KEY_PAIR_GEN));
}

#[test]
fn made_on_one_card_signs_on_another_of_the_realm() {
    let c = cards();
    let w = wrapped();
    assert_eq!(w.public_point[0], 0x04);
    let b = c.a2.session().unwrap();
    let key = b.load_ca_key(w).unwrap();
    assert_eq!(key.public_point, w.public_point);
    let (mut r_high, mut s_high) = (0, 0);
    for i in 0u32..200 {
        let msg = format!("certificate to be signed #{i}").repeat(1 + i as usize % 7);
        let der = b.ca_sign(&key, msg.as_bytes()).unwrap();
        assert!(
            verify(&w.public_point, msg.as_bytes(), &der),
            "signature {i}"
        );
        assert!(!verify(&w.public_point, b"another message", &der));
        let (r, s) = der_integers(&der);
        r_high += (r.len() == 33) as u32;
        s_high += (s.len() == 33) as u32;
    }
    // About half of r and s have the high bit set; 200 signatures all missing it is ~2^-200.
    assert!(r_high > 0 && s_high > 0, "r {r_high} s {s_high}");
    b.forget_ca_key(key);

    // The making card loads it too.
    let a = c.a1.session().unwrap();
    let key = a.load_ca_key(w).unwrap();
    let der = a.ca_sign(&key, b"").unwrap();
    assert!(verify(&w.public_point, b"", &der));
    a.forget_ca_key(key);
}

#[test]
fn der_conversion_handles_zeros_leading_zeros_and_the_high_bit() {
    let mut r = [0u8; 32];
    let mut s = [0u8; 32];
    assert_eq!(ecdsa_raw_to_der(&r, &s), vec![0x30, 6, 2, 1, 0, 2, 1, 0]);
    r[31] = 0x7f;
    s[31] = 0x80;
    assert_eq!(
        ecdsa_raw_to_der(&r, &s),
        vec![0x30, 7, 2, 1, 0x7f, 2, 2, 0, 0x80]
    );
    r = [0xff; 32];
    s = [0x01; 32];
    s[0] = 0;
    s[1] = 0;
    let der = ecdsa_raw_to_der(&r, &s);
    let (ri, si) = der_integers(&der);
    assert_eq!(ri.len(), 33);
    assert_eq!(ri[0], 0);
    assert_eq!(&ri[1..], &r[..]);
    assert_eq!(si, s[2..].to_vec());
    assert_eq!(der.len(), 2 + 2 + 33 + 2 + 30);
}

#[test]
fn encode_decode_round_trip_and_bounds() {
    let w = wrapped();
    let bytes = w.encode();
    assert_eq!(&bytes[..4], b"KFCA");
    assert_eq!(bytes[4], 1);
    assert_eq!(&WrappedCaKey::decode(&bytes).unwrap(), w);
    assert!(w.wrapped.len() <= MAX_WRAPPED_CA_KEY_LEN);

    let corrupt = |b: &[u8]| matches!(WrappedCaKey::decode(b), Err(CardError::Corrupt { .. }));
    for cut in 0..bytes.len() {
        assert!(corrupt(&bytes[..cut]), "truncated at {cut}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(corrupt(&longer));
    let mut b = bytes.clone();
    b[0] ^= 1;
    assert!(corrupt(&b), "magic");
    let mut b = bytes.clone();
    b[4] = 2;
    assert!(corrupt(&b), "version");
    let mut b = bytes.clone();
    b[37] = 0x02;
    assert!(corrupt(&b), "compressed point");
    let len_at = 4 + 1 + 32 + 65 + 40;
    for bad_len in [0u16, 8, 81, (MAX_WRAPPED_CA_KEY_LEN + 8) as u16, u16::MAX] {
        let mut b = bytes[..len_at].to_vec();
        b.extend_from_slice(&bad_len.to_be_bytes());
        b.extend(std::iter::repeat_n(0u8, bad_len as usize));
        assert!(corrupt(&b), "length {bad_len}");
    }
    let big = WrappedCaKey {
        wrapped: vec![7; MAX_WRAPPED_CA_KEY_LEN],
        ..w.clone()
    };
    assert_eq!(WrappedCaKey::decode(&big.encode()).unwrap(), big);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn decode_never_panics_on_arbitrary_bytes(b in prop::collection::vec(any::<u8>(), 0..800)) {
        if let Ok(w) = WrappedCaKey::decode(&b) {
            prop_assert_eq!(w.encode(), b);
        }
    }

    #[test]
    fn decode_never_panics_on_a_mutated_valid_blob(at in 0usize..4096, v in any::<u8>(), cut in 0usize..4096) {
        let mut b = wrapped().encode();
        let n = b.len();
        b[at % n] = v;
        b.truncate(n - cut % (n + 1));
        if let Ok(w) = WrappedCaKey::decode(&b) {
            prop_assert_eq!(w.encode(), b);
        }
    }
}

#[test]
fn tampered_wrapped_bytes_are_bad_mac() {
    let s = cards().a2.session().unwrap();
    let baseline = s.session_object_count().unwrap();
    let w = wrapped();
    let bad_mac = |w: &WrappedCaKey| matches!(s.load_ca_key(w), Err(CardError::BadMac { .. }));
    for i in 0..w.wrapped.len() {
        let mut t = w.clone();
        t.wrapped[i] ^= 1 << (i % 8);
        assert!(bad_mac(&t), "private key byte {i}");
    }
    for i in 0..w.kek.len() {
        let mut t = w.clone();
        t.kek[i] ^= 0x80 >> (i % 8);
        assert!(bad_mac(&t), "KEK byte {i}");
    }
    let mut t = w.clone();
    t.wrapped.truncate(t.wrapped.len() - 8);
    assert!(bad_mac(&t), "shortened");
    // Through the byte format too.
    let mut bytes = w.encode();
    let n = bytes.len();
    bytes[n - 3] ^= 0x20;
    assert!(bad_mac(&WrappedCaKey::decode(&bytes).unwrap()));
    assert_eq!(s.session_object_count().unwrap(), baseline);
}

#[test]
fn a_public_point_that_is_not_the_keys_own_is_refused() {
    let c = cards();
    let s = c.a2.session().unwrap();
    let baseline = s.session_object_count().unwrap();
    let other = c.a1.session().unwrap().generate_ca_key().unwrap();
    assert_ne!(other.public_point, wrapped().public_point);
    let swapped = WrappedCaKey {
        public_point: other.public_point,
        ..wrapped().clone()
    };
    assert!(matches!(
        s.load_ca_key(&swapped),
        Err(CardError::BadMac { .. })
    ));
    // Not a point on the curve at all.
    let mut junk = wrapped().clone();
    junk.public_point[1..].fill(0x5a);
    assert!(matches!(
        s.load_ca_key(&junk),
        Err(CardError::BadMac { .. })
    ));
    assert_eq!(s.session_object_count().unwrap(), baseline);
}

#[test]
fn another_realm_or_vendor_refuses_the_ca_key() {
    let c = cards();
    let w = wrapped();
    match c.other_realm.session().unwrap().load_ca_key(w) {
        Err(CardError::WrongRealm { .. }) => {}
        other => panic!("expected WrongRealm, got {other:?}"),
    }
    match c.other_vendor.session().unwrap().load_ca_key(w) {
        Err(CardError::WrongVendor { .. }) => {}
        other => panic!("expected WrongVendor, got {other:?}"),
    }
    // Claiming the other realm's fingerprints does not help: its adapter KBK cannot unwrap.
    let o = c.other_realm.session().unwrap();
    let lied = WrappedCaKey {
        vendor: o.identity().vendor,
        adapter: o.identity().adapter,
        ..w.clone()
    };
    assert!(matches!(
        o.load_ca_key(&lied),
        Err(CardError::BadMac { .. })
    ));
}

#[test]
fn session_objects_return_to_the_baseline() {
    let card = fixture().new_card("ca-flat", "realm").unwrap();
    let s = card.session().unwrap();
    let baseline = s.session_object_count().unwrap();
    let w = s.generate_ca_key().unwrap();
    assert_eq!(s.session_object_count().unwrap(), baseline);
    for _ in 0..20 {
        let k = s.load_ca_key(&w).unwrap();
        assert_eq!(s.session_object_count().unwrap(), baseline + 1);
        s.ca_sign(&k, b"x").unwrap();
        s.forget_ca_key(k);
        assert_eq!(s.session_object_count().unwrap(), baseline);
    }
}

#[test]
fn the_loaded_ca_key_is_sensitive_sign_only_and_cannot_be_wrapped_out() {
    let s = cards().a2.session().unwrap();
    let key = s.load_ca_key(wrapped()).unwrap();
    let raw = s.pkcs11_session();
    let attrs = raw
        .get_attributes(
            key.handle(),
            &[
                AttributeType::Class,
                AttributeType::KeyType,
                AttributeType::Token,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Sign,
                AttributeType::Decrypt,
                AttributeType::SignRecover,
                AttributeType::Unwrap,
                AttributeType::Derive,
            ],
        )
        .unwrap();
    for a in [
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Token(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::SignRecover(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ] {
        assert!(attrs.contains(&a), "{a:?} in {attrs:?}");
    }
    let value = raw.get_attributes(key.handle(), &[AttributeType::Value]);
    assert!(value.map_or(true, |v| !v
        .iter()
        .any(|x| matches!(x, Attribute::Value(_)))));
    let mine = raw
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::ValueLen(32.into()),
                Attribute::Wrap(true),
            ],
        )
        .unwrap();
    assert!(raw
        .wrap_key(&Mechanism::AesKeyWrapPad, mine, key.handle())
        .is_err());
    assert!(raw
        .wrap_key(&Mechanism::AesKeyWrapPad, s.adapter_kbk(), key.handle())
        .is_err());
    raw.destroy_object(mine).unwrap();
    s.forget_ca_key(key);
}

/// Why the CA key needs a KEK: the adapter KBK's unwrap template forces `CKA_ENCRYPT=false`,
/// which SoftHSM 2.6.1 refuses on a private key; without it the template is inconsistent.
#[test]
fn softhsm_cannot_unwrap_a_private_key_under_the_adapter_kbk() {
    let s = cards().a1.session().unwrap();
    let raw = s.pkcs11_session();
    let p256 = vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    let (public, private) = raw
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[Attribute::Token(false), Attribute::EcParams(p256)],
            &[
                Attribute::Token(false),
                Attribute::Sensitive(true),
                Attribute::Extractable(true),
                Attribute::WrapWithTrusted(true),
                Attribute::Sign(true),
            ],
        )
        .unwrap();
    let w = raw
        .wrap_key(&Mechanism::AesKeyWrapPad, s.adapter_kbk(), private)
        .unwrap();
    let mut t = vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Token(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::WrapWithTrusted(true),
        Attribute::Decrypt(false),
        Attribute::Sign(true),
    ];
    let rv = |t: &[Attribute]| {
        let e = raw
            .unwrap_key(&Mechanism::AesKeyWrapPad, s.adapter_kbk(), &w, t)
            .unwrap_err();
        CardError::from(e).rv().unwrap().to_string()
    };
    assert_eq!(rv(&t), "TemplateInconsistent");
    t.push(Attribute::Encrypt(false));
    assert_eq!(rv(&t), "AttributeTypeInvalid");
    raw.destroy_object(private).unwrap();
    raw.destroy_object(public).unwrap();
}
