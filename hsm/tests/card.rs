//! Behaviour of the card layer on real SoftHSM2 tokens: realms, tampering, audits, concurrency.

use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use keyfort_hsm::softhsm::fixture;
use keyfort_hsm::*;
use proptest::prelude::*;
use std::sync::OnceLock;

/// Two cards of realm A, one of realm B (same vendor), one of another vendor.
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
            a1: f.new_card("acme", "realm-a").unwrap(),
            a2: f.new_card("acme", "realm-a").unwrap(),
            other_realm: f.new_card("acme", "realm-b").unwrap(),
            other_vendor: f.new_card("globex", "realm-a").unwrap(),
        }
    })
}

fn pid() -> PartitionId {
    PartitionId(rand::random())
}

fn header(p: PartitionId) -> KeyHeader {
    KeyHeader::aes(p, KeyId(rand::random()), 1)
}

#[test]
fn cards_of_one_realm_share_identity_and_others_differ() {
    let c = cards();
    assert_eq!(c.a1.identity(), c.a2.identity());
    assert_eq!(c.a1.identity().vendor, c.other_realm.identity().vendor);
    assert_ne!(c.a1.identity().adapter, c.other_realm.identity().adapter);
    assert_ne!(c.a1.identity().vendor, c.other_vendor.identity().vendor);
}

#[test]
fn two_cards_of_one_realm_decrypt_each_others_ciphertexts() {
    let c = cards();
    let (mut s1, mut s2) = (c.a1.session().unwrap(), c.a2.session().unwrap());
    let p = pid();
    let config = s1.create_partition(p).unwrap();
    assert_eq!(s2.import_partition(&config).unwrap(), p);
    let blob = s1.create_key(&header(p)).unwrap();
    let e1 = s1.encrypt(&blob, b"from card 1", b"ctx").unwrap();
    let e2 = s2.encrypt(&blob, b"from card 2", b"ctx").unwrap();
    assert_eq!(s2.decrypt(&blob, &e1, b"ctx").unwrap(), b"from card 1");
    assert_eq!(s1.decrypt(&blob, &e2, b"ctx").unwrap(), b"from card 2");
    assert!(matches!(
        s1.decrypt(&blob, &e2, b"other aad"),
        Err(CardError::BadMac { .. })
    ));
    let (dk, sealed) = s2.generate_data_key(&blob, 32, b"dk").unwrap();
    assert_eq!(s1.decrypt(&blob, &sealed, b"dk").unwrap(), dk);
}

#[test]
fn another_realm_or_vendor_refuses_config_blobs_and_integrity_key() {
    let c = cards();
    let mut s1 = c.a1.session().unwrap();
    let p = pid();
    let config = s1.create_partition(p).unwrap();
    let blob = s1.create_key(&header(p)).unwrap();
    let ik = s1.create_integrity_key().unwrap();
    let mut realm_b = c.other_realm.session().unwrap();
    let mut vendor_b = c.other_vendor.session().unwrap();
    assert!(matches!(
        realm_b.import_partition(&config),
        Err(CardError::WrongRealm { .. })
    ));
    assert!(matches!(
        vendor_b.import_partition(&config),
        Err(CardError::WrongVendor { .. })
    ));
    assert!(matches!(
        realm_b.import_integrity_key(&ik),
        Err(CardError::WrongRealm { .. })
    ));
    assert!(matches!(
        vendor_b.import_integrity_key(&ik),
        Err(CardError::WrongVendor { .. })
    ));
    // A config relabelled with the foreign card's fingerprints still cannot be unwrapped there.
    let mut forged = PartitionConfig::decode(&config).unwrap();
    forged.adapter = c.other_realm.identity().adapter;
    assert!(matches!(
        realm_b.import_partition(&forged.encode()),
        Err(CardError::BadMac { .. })
    ));
    // Without the partition the blob is refused too.
    assert!(matches!(
        realm_b.encrypt(&blob, b"x", b""),
        Err(CardError::PartitionNotLoaded(_))
    ));
    assert!(realm_b.session_object_count().unwrap() <= 1);
}

#[test]
fn integrity_key_macs_verify_on_every_card_of_the_realm() {
    let c = cards();
    let mut s1 = c.a1.session().unwrap();
    let mut s2 = c.a2.session().unwrap();
    let ik = s1.create_integrity_key().unwrap();
    s2.import_integrity_key(&ik).unwrap();
    let mac = s1.mac(b"snapshot footer").unwrap();
    s2.verify(b"snapshot footer", &mac).unwrap();
    assert!(matches!(
        s2.verify(b"snapshot footeR", &mac),
        Err(CardError::BadMac { .. })
    ));
}

#[test]
fn single_key_backup_restores_only_where_the_partition_loads() {
    let c = cards();
    let mut s1 = c.a1.session().unwrap();
    let p = pid();
    let config = s1.create_partition(p).unwrap();
    let created = s1.create_key_with_backup(&header(p)).unwrap();
    let backup = created.backup.unwrap();
    let env = s1.encrypt(&created.blob, b"backed up", b"").unwrap();
    let mut s2 = c.a2.session().unwrap();
    s2.import_partition(&config).unwrap();
    assert_eq!(s2.decrypt(&backup, &env, b"").unwrap(), b"backed up");
    assert_eq!(
        MaskedBlob::decode(&backup).unwrap().under,
        WrappedUnder::BackupKbk
    );
}

#[test]
fn client_credentials_verify_in_the_card() {
    let c = cards();
    let mut s1 = c.a1.session().unwrap();
    let p = pid();
    let config = s1.create_partition(p).unwrap();
    let client = [9u8; 16];
    let secret = s1.issue_client_credential(&p, &client).unwrap();
    let answer = client_answer(&secret, b"challenge", b"ctx");
    let mut s2 = c.a2.session().unwrap();
    s2.import_partition(&config).unwrap();
    s2.verify_client_response(&p, &client, b"challenge", b"ctx", &answer)
        .unwrap();
    assert_eq!(
        s2.client_response(&p, &client, b"challenge", b"ctx")
            .unwrap(),
        answer
    );
    assert!(matches!(
        s2.verify_client_response(&p, &[8u8; 16], b"challenge", b"ctx", &answer),
        Err(CardError::BadMac { .. })
    ));
}

fn flip(bytes: &[u8], bit: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let i = bit % (b.len() * 8);
    b[i / 8] ^= 1 << (i % 8);
    b
}

fn refused_as_typed(e: &CardError) -> bool {
    matches!(
        e,
        CardError::BadMac { .. }
            | CardError::Corrupt { .. }
            | CardError::WrongRealm { .. }
            | CardError::WrongVendor { .. }
            | CardError::PartitionNotLoaded(_)
    )
}

struct Fixed {
    s: std::sync::Mutex<CoreSession>,
    config: Vec<u8>,
    blob: Vec<u8>,
    env: Vec<u8>,
    ik: Vec<u8>,
    mac: [u8; 32],
}

fn fixed() -> &'static Fixed {
    static F: OnceLock<Fixed> = OnceLock::new();
    F.get_or_init(|| {
        // A card of its own: session-object counts see every session of the token.
        let mut s = fixture()
            .new_card("prop", "realm")
            .unwrap()
            .session()
            .unwrap();
        let p = pid();
        let config = s.create_partition(p).unwrap();
        let blob = s.create_key(&header(p)).unwrap();
        let env = s.encrypt(&blob, b"payload", b"aad").unwrap();
        let ik = s.create_integrity_key().unwrap();
        let mac = s.mac(b"message").unwrap();
        Fixed {
            s: std::sync::Mutex::new(s),
            config,
            blob,
            env,
            ik,
            mac,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn a_flipped_bit_anywhere_is_refused_with_a_typed_error(bit in 0usize..4096) {
        let f = fixed();
        // Sessions are not Sync; proptest runs cases on this one thread.
        let mut guard = f.s.lock().unwrap();
        let s = &mut *guard;
        let p = PartitionConfig::decode(&f.config).unwrap().partition;
        let before = s.session_object_count().unwrap();

        let e = s.import_partition(&flip(&f.config, bit)).unwrap_err();
        prop_assert!(refused_as_typed(&e), "config: {e:?}");

        let bad = flip(&f.blob, bit);
        let k = MaskedBlob::decode(&f.blob).unwrap().header.key_ref();
        s.forget_key(&k);
        if let Err(e) = s.encrypt(&bad, b"x", b"") {
            prop_assert!(refused_as_typed(&e), "blob: {e:?}");
        } else {
            prop_assert!(false, "a flipped blob was used");
        }

        let e = s.decrypt(&f.blob, &flip(&f.env, bit), b"aad").unwrap_err();
        prop_assert!(refused_as_typed(&e), "envelope: {e:?}");

        let e = s.import_integrity_key(&flip(&f.ik, bit)).unwrap_err();
        prop_assert!(refused_as_typed(&e), "integrity key: {e:?}");

        let e = s.verify(b"message", &flip(&f.mac, bit)).unwrap_err();
        prop_assert!(matches!(e, CardError::BadMac { .. }), "mac: {e:?}");

        // The session stays usable, and nothing leaked into it.
        prop_assert!(s.partition_loaded(&p));
        prop_assert_eq!(s.decrypt(&f.blob, &f.env, b"aad").unwrap(), b"payload".to_vec());
        s.verify(b"message", &f.mac).unwrap();
        prop_assert!(s.session_object_count().unwrap() <= before + 1);
    }
}

fn bool_attr(s: &cryptoki::session::Session, h: ObjectHandle, t: AttributeType) -> Option<bool> {
    let v = s.get_attributes(h, &[t]).ok()?;
    v.into_iter().find_map(|a| match a {
        Attribute::Sensitive(b)
        | Attribute::Extractable(b)
        | Attribute::WrapWithTrusted(b)
        | Attribute::Trusted(b)
        | Attribute::Token(b)
        | Attribute::Encrypt(b)
        | Attribute::Decrypt(b)
        | Attribute::Wrap(b)
        | Attribute::Unwrap(b)
        | Attribute::Modifiable(b)
        | Attribute::NeverExtractable(b) => Some(b),
        _ => None,
    })
}

#[test]
fn attribute_audit_of_every_object_keyfort_creates() {
    use AttributeType as T;
    let c = cards();
    let mut s = c.a1.session().unwrap();
    let p = pid();
    s.create_partition(p).unwrap();
    s.create_integrity_key().unwrap();
    let blob = s.create_key(&header(p)).unwrap();
    let (_, customer) = s.key_handle(&blob).unwrap();
    let raw = s.pkcs11_session();
    let keys = s.partition_keys(&p).unwrap();

    for h in keys.handles() {
        assert_eq!(bool_attr(raw, h, T::Token), Some(false));
        assert_eq!(bool_attr(raw, h, T::Sensitive), Some(true));
        assert_eq!(bool_attr(raw, h, T::Extractable), Some(false));
        assert_eq!(bool_attr(raw, h, T::WrapWithTrusted), Some(true));
        assert_eq!(bool_attr(raw, h, T::Decrypt), Some(false));
        assert_eq!(bool_attr(raw, h, T::Encrypt), Some(false));
        assert_eq!(bool_attr(raw, h, T::Modifiable), Some(false));
    }
    for h in [keys.masking, keys.backup] {
        assert_eq!(
            raw::unwrap_template_len(raw, h).unwrap(),
            5,
            "customer unwrap template"
        );
    }
    assert_eq!(bool_attr(raw, customer, T::Sensitive), Some(true));
    assert_eq!(bool_attr(raw, customer, T::Extractable), Some(false));
    assert_eq!(bool_attr(raw, customer, T::Wrap), Some(false));
    assert_eq!(bool_attr(raw, customer, T::Unwrap), Some(false));

    // Token objects: exactly the two ownership keys.
    let tokens = raw.find_objects(&[Attribute::Token(true)]).unwrap();
    assert_eq!(tokens.len(), 2);
    for h in tokens {
        assert_eq!(bool_attr(raw, h, T::Sensitive), Some(true));
        assert_eq!(bool_attr(raw, h, T::Extractable), Some(false));
        assert_eq!(bool_attr(raw, h, T::Modifiable), Some(false));
        assert_eq!(bool_attr(raw, h, T::Decrypt), Some(false));
        assert!(
            raw::unwrap_template_len(raw, h).unwrap() >= 4,
            "unwrap template"
        );
    }
    let adapter = s.adapter_kbk();
    assert_eq!(bool_attr(raw, adapter, T::Trusted), Some(true));
    assert_eq!(c.a1.token_object_count().unwrap(), 2);
}

#[test]
fn token_objects_as_pkcs11_tool_lists_them() {
    let Ok(out) = std::process::Command::new("pkcs11-tool")
        .args([
            "--module",
            SOFTHSM_MODULE,
            "--token-label",
            cards().a1.label(),
            "--list-objects",
        ])
        .env("SOFTHSM2_CONF", fixture().dir().join("softhsm2.conf"))
        .output()
    else {
        eprintln!("pkcs11-tool is not installed: skipping the external attribute audit");
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    // Without logging in pkcs11-tool sees the public ownership keys; no private object exists on
    // the token at all.
    for label in ["keyfort-vendor-kbk", "keyfort-adapter-kbk"] {
        let block = text
            .split("Secret Key Object")
            .find(|b| b.contains(label))
            .unwrap_or_else(|| panic!("{label} not listed:\n{text}"));
        assert!(block.contains("sensitive"), "{label}: {block}");
        assert!(
            block.contains("never extractable") || !block.contains(" extractable"),
            "{label}: {block}"
        );
        assert!(block.contains("unwrap"), "{label}: {block}");
    }
    assert_eq!(text.matches("Secret Key Object").count(), 2, "{text}");
}

#[test]
fn every_core_uses_its_own_session_concurrently() {
    let c = cards();
    let mut s = c.a1.session().unwrap();
    let p = pid();
    let config = s.create_partition(p).unwrap();
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2)
        * 2;
    std::thread::scope(|scope| {
        for t in 0..threads {
            let config = config.clone();
            let card = if t % 2 == 0 { &c.a1 } else { &c.a2 };
            scope.spawn(move || {
                let mut s = card.session().unwrap();
                s.import_partition(&config).unwrap();
                for _ in 0..200 {
                    let blob = s.create_key(&header(p)).unwrap();
                    let env = s.encrypt(&blob, &[7u8; 256], b"t").unwrap();
                    assert_eq!(s.decrypt(&blob, &env, b"t").unwrap(), vec![7u8; 256]);
                    s.forget_key(&MaskedBlob::decode(&blob).unwrap().header.key_ref());
                }
            });
        }
    });
}

#[test]
fn object_count_stays_flat_over_create_use_evict_delete() {
    let card = fixture().new_card("flat", "realm").unwrap();
    let mut s = card.session().unwrap();
    let p = pid();
    s.create_partition(p).unwrap();
    s.create_integrity_key().unwrap();
    let baseline = s.session_object_count().unwrap();
    let mut live = vec![];
    for i in 0..(KEY_HANDLE_CACHE_MAX + 1500) {
        let h = header(p);
        let blob = s.create_key(&h).unwrap();
        s.encrypt(&blob, b"x", b"").unwrap();
        live.push(h.key_ref());
        if i % 3 == 0 {
            let k = live.swap_remove(i % live.len());
            s.forget_key(&k);
        }
        if i % 512 == 0 {
            let n = s.session_object_count().unwrap();
            assert!(n <= baseline + KEY_HANDLE_CACHE_MAX, "{n} objects at {i}");
        }
    }
    assert!(s.cached_keys() <= KEY_HANDLE_CACHE_MAX);
    assert_eq!(
        s.session_object_count().unwrap(),
        baseline + s.cached_keys()
    );
    for k in live {
        s.forget_key(&k);
    }
    assert_eq!(s.session_object_count().unwrap(), baseline);
    s.drop_partition(&p);
    assert_eq!(s.session_object_count().unwrap(), baseline - 4);
}

#[test]
fn blocking_pool_runs_card_work_on_its_own_sessions() {
    let c = cards();
    let pool = BlockingPool::new(&c.a1, 2).unwrap();
    let p = pid();
    let config = pool.run(move |s| s.create_partition(p)).unwrap();
    for r in pool.broadcast(move |s| s.import_partition(&config).map(|_| ())) {
        r.unwrap();
    }
    let blob = pool.run(move |s| s.create_key(&header(p))).unwrap();
    let b2 = blob.clone();
    let env = pool.run(move |s| s.encrypt(&b2, b"pooled", b"")).unwrap();
    let pt = pool.run(move |s| s.decrypt(&blob, &env, b"")).unwrap();
    assert_eq!(pt, b"pooled");
}

#[test]
fn an_adapter_kbk_of_another_vendor_does_not_load() {
    // The kit's vendor KBK stands in for the one a production card holds from the factory: an
    // adapter KBK wrapped under another vendor's KBK must not unwrap on it.
    let f = fixture();
    let ours = f.kit("acme", "realm-a").unwrap();
    let theirs = f.kit("globex", "realm-a").unwrap();
    let dir = tempfile::tempdir().unwrap();
    ours.write(dir.path()).unwrap();
    std::fs::write(
        dir.path().join(keyfort_hsm::ceremony::KIT_ADAPTER_FILE),
        theirs.adapter_wrapped,
    )
    .unwrap();
    let mixed = CeremonyKit::read(dir.path()).unwrap();
    let e = init_card(f.hsm(), "mixed-vendor", &f.so_pin(), &f.user_pin(), &mixed).unwrap_err();
    assert!(matches!(e, CardError::BadMac { .. }), "{e:?}");
    assert!(format!("{mixed:?}").contains("<redacted>"));
    assert!(format!("{:?}", f.user_pin()).contains("<redacted>"));
}
