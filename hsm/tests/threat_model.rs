//! The threat model's claims (docs/threat-model.md) as tests against real SoftHSM2 tokens: what a
//! process holding the user PIN can and cannot do to the keys keyfort made.
//! Each test names the attribute that enforces (or fails to enforce) the rule.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use keyfort_hsm::raw::{self, Template};
use keyfort_hsm::softhsm::fixture;
use keyfort_hsm::templates;
use keyfort_hsm::*;

struct World {
    s: CoreSession,
    config: PartitionConfig,
    blob: MaskedBlob,
    pid: PartitionId,
}

fn world() -> World {
    let card = fixture().new_card("tm-vendor", "tm-realm").unwrap();
    let mut s = card.session().unwrap();
    let pid = PartitionId(rand::random());
    let config = PartitionConfig::decode(&s.create_partition(pid).unwrap()).unwrap();
    let blob = s
        .create_key(&KeyHeader::aes(pid, KeyId(rand::random()), 1))
        .unwrap();
    World {
        s,
        config,
        blob: MaskedBlob::decode(&blob).unwrap(),
        pid,
    }
}

/// What an attacker with the PIN imports: an AES key whose value it knows, able to wrap/unwrap.
fn own_imported_key(s: &Session) -> ObjectHandle {
    s.create_object(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Value(vec![0x42; 32]),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
    ])
    .unwrap()
}

fn own_generated_key(s: &Session) -> ObjectHandle {
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Token(false),
            Attribute::ValueLen(32.into()),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
        ],
    )
    .unwrap()
}

fn rv(e: cryptoki::error::Error) -> String {
    CardError::from(e).rv().unwrap_or("?").to_string()
}

#[test]
fn a_plain_extractable_key_can_be_wrapped_under_a_key_the_session_imported() {
    // The problem the rest of this file exists for: without WRAP_WITH_TRUSTED, any extractable
    // key leaves the card under a key whose value the PIN holder knows.
    let w = world();
    let s = w.s.pkcs11_session();
    let victim = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::ValueLen(32.into()),
                Attribute::Extractable(true),
                Attribute::Sensitive(true),
            ],
        )
        .unwrap();
    let mine = own_imported_key(s);
    assert!(s.wrap_key(&Mechanism::AesKeyWrap, mine, victim).is_ok());
}

#[test]
fn wrap_with_trusted_key_wraps_only_under_the_trusted_adapter_kbk() {
    let w = world();
    let s = w.s.pkcs11_session();
    let partition_key = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &templates::partition_key_generate(true, templates::PartitionKeyUse::Wrap),
        )
        .unwrap();
    for mine in [own_imported_key(s), own_generated_key(s)] {
        let e = s
            .wrap_key(&Mechanism::AesKeyWrap, mine, partition_key)
            .unwrap_err();
        assert_eq!(rv(e), "KeyNotWrappable");
    }
    assert!(s
        .wrap_key(&Mechanism::AesKeyWrap, w.s.adapter_kbk(), partition_key)
        .is_ok());
    // Nor can the session take WRAP_WITH_TRUSTED off again.
    assert!(s
        .update_attributes(partition_key, &[Attribute::WrapWithTrusted(false)])
        .is_err());
}

#[test]
fn a_user_session_cannot_make_a_key_trusted() {
    let w = world();
    let s = w.s.pkcs11_session();
    let e = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::ValueLen(32.into()),
                Attribute::Wrap(true),
                Attribute::Trusted(true),
            ],
        )
        .unwrap_err();
    assert!(rv(e).contains("Attribute"), "refused as an attribute error");
    let mine = own_imported_key(s);
    assert!(s
        .update_attributes(mine, &[Attribute::Trusted(true)])
        .is_err());
    // Nor by unwrapping: a masking key unwrapped under the adapter KBK cannot come out trusted.
    let mut t = templates::partition_key_load(true, templates::PartitionKeyUse::Wrap);
    t.attrs.push(Attribute::Trusted(true));
    assert!(raw::unwrap_aes_kw(s, w.s.adapter_kbk(), &w.config.masking, &t).is_err());
}

#[test]
fn loaded_partition_keys_cannot_be_wrapped_under_any_key() {
    let w = world();
    let s = w.s.pkcs11_session();
    let p = w.s.partition_keys(&w.pid).unwrap();
    let mine = own_imported_key(s);
    for key in p.handles() {
        for wrapping in [mine, w.s.adapter_kbk()] {
            let e = s
                .wrap_key(&Mechanism::AesKeyWrap, wrapping, key)
                .unwrap_err();
            assert!(
                ["KeyUnextractable", "KeyNotWrappable"].contains(&rv(e).as_str()),
                "partition key wrapped"
            );
        }
    }
}

#[test]
fn a_customer_key_in_use_cannot_be_wrapped_out_or_made_extractable() {
    let mut w = world();
    let (_, h) = w.s.key_handle(&w.blob.encode()).unwrap();
    let s = w.s.pkcs11_session();
    let mine = own_imported_key(s);
    let e = s.wrap_key(&Mechanism::AesKeyWrap, mine, h).unwrap_err();
    assert_eq!(rv(e), "KeyUnextractable");
    assert!(s
        .update_attributes(h, &[Attribute::Extractable(true)])
        .is_err());
    assert!(s
        .update_attributes(h, &[Attribute::Sensitive(false)])
        .is_err());
    assert!(s.copy_object(h, &[Attribute::Extractable(true)]).is_err());
}

#[test]
fn the_masking_key_unwrap_template_refuses_an_extractable_or_non_sensitive_customer_key() {
    let w = world();
    let s = w.s.pkcs11_session();
    let masking = w.s.partition_keys(&w.pid).unwrap().masking;
    for loosen in [Attribute::Extractable(true), Attribute::Sensitive(false)] {
        let mut t = templates::customer_key_load();
        t.attrs
            .retain(|a| a.attribute_type() != loosen.attribute_type());
        t.attrs.push(loosen);
        let e = raw::unwrap_aes_kw(s, masking, &w.blob.wrapped, &t).unwrap_err();
        assert_eq!(e.rv(), Some("TemplateInconsistent"));
    }
    // The key keyfort loads satisfies it.
    assert!(
        raw::unwrap_aes_kw(s, masking, &w.blob.wrapped, &templates::customer_key_load()).is_ok()
    );
}

#[test]
fn the_adapter_kbk_unwrap_template_refuses_extractable_or_decrypting_partition_keys() {
    let w = world();
    let s = w.s.pkcs11_session();
    for loosen in [
        Attribute::Extractable(true),
        Attribute::Sensitive(false),
        Attribute::Decrypt(true),
        Attribute::WrapWithTrusted(false),
    ] {
        let mut t = templates::partition_key_load(true, templates::PartitionKeyUse::Wrap);
        t.attrs
            .retain(|a| a.attribute_type() != loosen.attribute_type());
        t.attrs.push(loosen);
        let e = raw::unwrap_aes_kw(s, w.s.adapter_kbk(), &w.config.masking, &t).unwrap_err();
        assert_eq!(e.rv(), Some("TemplateInconsistent"));
    }
}

#[test]
fn the_vendor_kbk_unwrap_template_refuses_an_extractable_adapter_kbk() {
    let w = world();
    let s = w.s.pkcs11_session();
    let kit = fixture().kit("tm-vendor", "tm-realm").unwrap();
    let vendor = s
        .find_objects(&[Attribute::Label(
            templates::LABEL_VENDOR_KBK.as_bytes().to_vec(),
        )])
        .unwrap()[0];
    let t = Template::new(vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
    ]);
    let e = raw::unwrap_aes_kw(s, vendor, &kit.adapter_wrapped, &t).unwrap_err();
    assert_eq!(e.rv(), Some("TemplateInconsistent"));
}

#[test]
fn frozen_unwrap_templates_cannot_be_loosened() {
    let w = world();
    let s = w.s.pkcs11_session();
    let masking = w.s.partition_keys(&w.pid).unwrap().masking;
    let loose =
        Template::new(vec![]).with_unwrap(Template::new(vec![Attribute::Extractable(true)]));
    assert!(raw::set_attributes(s, masking, &loose).is_err());
    assert!(raw::set_attributes(s, w.s.adapter_kbk(), &loose).is_err());
}

#[test]
fn softhsm_refuses_nested_unwrap_templates() {
    // DESIGN asks for nested templates "where the token supports it": SoftHSM 2.6.1 does not.
    let w = world();
    let s = w.s.pkcs11_session();
    let t = Template::new(vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Value(vec![7; 32]),
        Attribute::Unwrap(true),
    ])
    .with_unwrap(
        Template::new(vec![Attribute::Sensitive(true)])
            .with_unwrap(Template::new(vec![Attribute::Extractable(false)])),
    );
    let e = raw::create_object(s, &t).unwrap_err();
    assert_eq!(e.rv(), Some("AttributeValueInvalid"));
}

#[test]
fn softhsm_cannot_stop_a_pin_holder_loading_a_masking_key_without_its_unwrap_template() {
    // The documented gap (docs/threat-model.md, "What SoftHSM cannot enforce"): the adapter KBK
    // cannot force the masking key's own unwrap template (no nesting), so a PIN holder can load
    // a second copy of the masking key without it, unwrap a customer key extractable through
    // it, and wrap that under a key it imported. Production HSMs must close this (nested
    // templates or a vendor partition policy). If SoftHSM ever closes it, this test fails:
    // update the document.
    let w = world();
    let s = w.s.pkcs11_session();
    let mut t = templates::partition_key_load(true, templates::PartitionKeyUse::Wrap);
    t.unwrap = None;
    let masking_copy = raw::unwrap_aes_kw(s, w.s.adapter_kbk(), &w.config.masking, &t).unwrap();
    let loose = Template::new(vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
    ]);
    let customer = raw::unwrap_aes_kw(s, masking_copy, &w.blob.wrapped, &loose).unwrap();
    let mine = own_imported_key(s);
    assert!(s.wrap_key(&Mechanism::AesKeyWrap, mine, customer).is_ok());
}
