//! Every attribute template keyfort uses, in one place, so the audit test and the threat model
//! can point at exactly one definition per object kind.
//!
//! Session objects are `CKA_PRIVATE=false`: SoftHSM encrypts private objects' values in process
//! memory under a key that is also in process memory, which protects nothing here and cost a third
//! of the create path (measured: generate + wrap + destroy 121 us private vs 82 us public,
//! interleaved in one process). Session objects are visible to this process only.

use crate::raw::Template;
use cryptoki::object::{Attribute, KeyType, ObjectClass};

pub const LABEL_VENDOR_KBK: &str = "keyfort-vendor-kbk";
pub const LABEL_ADAPTER_KBK: &str = "keyfort-adapter-kbk";

/// What a customer key unwrapped under a masking key (or backup KBK) must be: sensitive,
/// never extractable, unable to wrap, unwrap or derive. Enforced by the card through the masking
/// key's `CKA_UNWRAP_TEMPLATE`, so a session that asks for anything else is refused.
pub fn customer_unwrap_forced() -> Template {
    Template::new(vec![
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ])
}

/// What any key unwrapped under the adapter KBK (partition keys, integrity key) must be:
/// sensitive, non-extractable, wrappable only by a trusted key, never an encrypt/decrypt key
/// (an AES key that could decrypt raw blocks could undo RFC 3394 wrapping by hand). It cannot
/// also force the masking key's own unwrap template: SoftHSM 2.6.1 refuses a nested
/// `CKA_UNWRAP_TEMPLATE` with CKR_ATTRIBUTE_VALUE_INVALID (measured, tests/threat_model.rs).
pub fn partition_unwrap_forced() -> Template {
    Template::new(vec![
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::WrapWithTrusted(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
    ])
}

/// What the adapter KBK unwrapped under the vendor KBK must be.
pub fn adapter_unwrap_forced() -> Template {
    Template::new(vec![
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
    ])
}

fn kbk_common(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        // Only the SO can set CKA_TRUSTED, and SoftHSM lets an SO session create only public
        // objects (measured): ownership keys are public token objects, usable by every session.
        Attribute::Private(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        // WRAP is needed only for fingerprints (a deterministic wrap of a fixed block).
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
    ]
}

/// The vendor KBK as the SO loads it (value from the ceremony kit).
pub fn vendor_kbk(value: &[u8]) -> Template {
    let mut a = kbk_common(LABEL_VENDOR_KBK);
    a.push(Attribute::Value(value.to_vec()));
    Template::new(a)
        .with_unwrap(adapter_unwrap_forced())
        .frozen()
}

/// The adapter KBK as the SO unwraps it under the vendor KBK: trusted.
pub fn adapter_kbk() -> Template {
    let mut a = kbk_common(LABEL_ADAPTER_KBK);
    a.push(Attribute::Trusted(true));
    Template::new(a)
        .with_unwrap(partition_unwrap_forced())
        .frozen()
}

/// The attributes a partition key (or the integrity key) is loaded with from its config.
pub fn partition_key_load(aes: bool, usage: PartitionKeyUse) -> Template {
    let mut a = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(if aes {
            KeyType::AES
        } else {
            KeyType::GENERIC_SECRET
        }),
        Attribute::Token(false),
        Attribute::Private(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::WrapWithTrusted(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
    ];
    a.extend(usage.attrs());
    let mut t = Template::new(a);
    if matches!(usage, PartitionKeyUse::Wrap) {
        t = t.with_unwrap(customer_unwrap_forced());
    }
    t.frozen()
}

/// The attributes a partition key (or integrity key) is born with, on the one card that makes
/// it: extractable only so it can be wrapped under the adapter KBK, and only by a trusted key.
pub fn partition_key_generate(aes: bool, usage: PartitionKeyUse) -> Vec<Attribute> {
    let mut a = vec![
        Attribute::Token(false),
        Attribute::Private(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::WrapWithTrusted(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::ValueLen(32.into()),
    ];
    if !aes {
        a.push(Attribute::KeyType(KeyType::GENERIC_SECRET));
    }
    a.extend(usage.attrs());
    a
}

#[derive(Clone, Copy, Debug)]
pub enum PartitionKeyUse {
    /// Masking key, backup KBK.
    Wrap,
    /// HMAC key, integrity key.
    Mac,
    /// Client-credential key (AES-CBC-ENCRYPT-DATA derivation of per-client secrets).
    Derive,
}

impl PartitionKeyUse {
    fn attrs(self) -> Vec<Attribute> {
        let (wrap, mac, derive) = match self {
            PartitionKeyUse::Wrap => (true, false, false),
            PartitionKeyUse::Mac => (false, true, false),
            PartitionKeyUse::Derive => (false, false, true),
        };
        vec![
            Attribute::Wrap(wrap),
            Attribute::Unwrap(wrap),
            Attribute::Sign(mac),
            Attribute::Verify(mac),
            Attribute::Derive(derive),
        ]
    }
}

/// A fresh customer key: a session object, extractable only for its one wrap (it is destroyed
/// right after), never usable for anything else.
pub fn customer_key_generate() -> Vec<Attribute> {
    vec![
        Attribute::Token(false),
        Attribute::Private(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::ValueLen(32.into()),
    ]
}

/// A customer key as unwrapped for use: must satisfy `customer_unwrap_forced`.
pub fn customer_key_load() -> Template {
    Template::new(vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Private(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ])
}

/// DER of the P-256 (prime256v1) OID, for the CA key pair's `CKA_EC_PARAMS`.
const CA_P256_OID_DER: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// What a CA private key unwrapped under its CA KEK must be: sensitive, never extractable, a
/// signing key and nothing else. Enforced by the card through the KEK's `CKA_UNWRAP_TEMPLATE`
/// (only attributes a private key has: SoftHSM 2.6.1 refuses `CKA_ENCRYPT` or `CKA_WRAP` on one
/// with CKR_ATTRIBUTE_TYPE_INVALID, measured).
pub fn ca_key_unwrap_forced() -> Template {
    Template::new(vec![
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::SignRecover(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ])
}

/// A CA KEK at birth: AES-256, wraps the one CA private key it is made for, extractable only so
/// it can itself be wrapped under the adapter KBK, and only by a trusted key. Destroyed right after.
pub fn ca_kek_generate() -> Vec<Attribute> {
    vec![
        Attribute::Token(false),
        Attribute::Private(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::WrapWithTrusted(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(true),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::ValueLen(32.into()),
    ]
}

/// A CA KEK as unwrapped under the adapter KBK (satisfies `partition_unwrap_forced`): unwraps
/// only, and only keys that satisfy `ca_key_unwrap_forced`.
pub fn ca_kek_load() -> Template {
    Template::new(vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Private(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::WrapWithTrusted(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(true),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
    ])
    .with_unwrap(ca_key_unwrap_forced())
    .frozen()
}

/// The CA key pair at birth: (public, private). The public key is read for its point and
/// destroyed. The private key signs and nothing else; it is extractable only for its one wrap
/// under the CA KEK (a user session object, which cannot be trusted, so the private key cannot
/// be `CKA_WRAP_WITH_TRUSTED`: SoftHSM then refuses the wrap with CKR_KEY_NOT_WRAPPABLE,
/// measured) and destroyed right after, like a fresh customer key.
pub fn ca_key_pair_generate() -> (Vec<Attribute>, Vec<Attribute>) {
    (
        vec![
            Attribute::Token(false),
            Attribute::Private(false),
            Attribute::EcParams(CA_P256_OID_DER.to_vec()),
            Attribute::Verify(false),
        ],
        vec![
            Attribute::Token(false),
            Attribute::Private(false),
            Attribute::Sensitive(true),
            Attribute::Extractable(true),
            Attribute::WrapWithTrusted(false),
            Attribute::Sign(true),
            Attribute::Decrypt(false),
            Attribute::SignRecover(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
        ],
    )
}

/// A CA private key as unwrapped for use: must satisfy `ca_key_unwrap_forced`.
pub fn ca_key_load() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Token(false),
        Attribute::Private(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::SignRecover(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ]
}
