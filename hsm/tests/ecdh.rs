//! ECDH mode on real SoftHSM2 tokens: two cards agree a transport key that never leaves either.

use keyfort_hsm::cryptoki::mechanism::Mechanism;
use keyfort_hsm::cryptoki::object::{Attribute, AttributeType};
use keyfort_hsm::softhsm::fixture;

#[test]
fn softhsm_supports_ecdh1_derive_on_p256() {
    let f = fixture();
    let s = f.scratch_session().unwrap();
    let slot = s.get_session_info().unwrap().slot_id();
    let mechs = f.hsm().ctx().get_mechanism_list(slot).unwrap();
    assert!(mechs.contains(
        &Mechanism::Ecdh1Derive(
            keyfort_hsm::cryptoki::mechanism::elliptic_curve::Ecdh1DeriveParams::new(
                keyfort_hsm::cryptoki::mechanism::elliptic_curve::EcKdf::null(),
                &[]
            )
        )
        .mechanism_type()
    ));
}

#[test]
fn two_cards_agree_a_transport_key_that_neither_reveals() {
    let f = fixture();
    let a = f.new_card("ecdh", "realm").unwrap().session().unwrap();
    let b = f
        .new_card("ecdh-other", "realm")
        .unwrap()
        .session()
        .unwrap();
    let offer_a = a.ecdh_offer().unwrap();
    let offer_b = b.ecdh_offer().unwrap();
    let (pa, pb) = (offer_a.point, offer_b.point);
    let ka = a.ecdh_agree(offer_a, &pb).unwrap();
    let kb = b.ecdh_agree(offer_b, &pa).unwrap();
    assert_eq!(ka.fingerprint, kb.fingerprint);

    // The value is not readable and the key cannot be wrapped out.
    let raw = a.pkcs11_session();
    assert!(raw
        .get_attributes(ka.handle, &[AttributeType::Value])
        .map_or(true, |v| !v
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
        .wrap_key(&Mechanism::AesKeyWrap, mine, ka.handle)
        .is_err());

    // A third party with another key pair agrees something else.
    let c = f
        .new_card("ecdh-third", "realm")
        .unwrap()
        .session()
        .unwrap();
    let offer_c = c.ecdh_offer().unwrap();
    let kc = c.ecdh_agree(offer_c, &pa).unwrap();
    assert_ne!(kc.fingerprint, ka.fingerprint);
    a.ecdh_forget(ka);
    b.ecdh_forget(kb);
    c.ecdh_forget(kc);
}

#[test]
fn a_malformed_peer_point_is_refused_typed() {
    let a = fixture()
        .new_card("ecdh-bad", "realm")
        .unwrap()
        .session()
        .unwrap();
    let offer = a.ecdh_offer().unwrap();
    let before = a.session_object_count().unwrap();
    let e = a.ecdh_agree(offer, &[0u8; 10]).unwrap_err();
    assert!(matches!(e, keyfort_hsm::CardError::Corrupt { .. }));
    assert_eq!(a.session_object_count().unwrap(), before - 2);
}
