//! ECDH mode: two cards agree an AES-256 transport key with `CKM_ECDH1_DERIVE` on P-256 without
//! its value leaving either card. Each side generates an ephemeral key pair in its card, the two
//! public points are exchanged in the open, and each card derives the same key as a sensitive,
//! non-extractable session object; both sides compare the key's fingerprint (a deterministic wrap
//! of a fixed block, like a card identity) before using it.
//!
//! What it may carry: keys that are extractable under a trusted key only. The current ceremony
//! makes the adapter KBK non-extractable (rule 1 of docs/threat-model.md), so carrying a realm
//! card-to-card needs a ceremony variant where the SO derives a *trusted* transport key and the
//! adapter KBK is `CKA_WRAP_WITH_TRUSTED`; that variant is not built yet.

use crate::card::{fingerprint, CoreSession};
use crate::error::{CardError, Fingerprint, Result};
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};

/// DER of the P-256 (prime256v1) OID, for `CKA_EC_PARAMS`.
const P256_OID_DER: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// Uncompressed P-256 point: 0x04 ‖ X(32) ‖ Y(32).
pub const P256_POINT_LEN: usize = 65;

/// One side of an agreement: the ephemeral private key lives in this card's session.
#[derive(Debug)]
pub struct EcdhOffer {
    private: ObjectHandle,
    public: ObjectHandle,
    /// This side's public point, to send to the peer.
    pub point: [u8; P256_POINT_LEN],
}

/// An agreed transport key (session object on this card) and its fingerprint.
#[derive(Debug, Clone, Copy)]
pub struct TransportKey {
    pub handle: ObjectHandle,
    pub fingerprint: Fingerprint,
}

impl CoreSession {
    /// Generates an ephemeral P-256 key pair in the card and returns its public point.
    pub fn ecdh_offer(&self) -> Result<EcdhOffer> {
        let (public, private) = self.session.generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(false),
                Attribute::EcParams(P256_OID_DER.to_vec()),
            ],
            &[
                Attribute::Token(false),
                Attribute::Private(false),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Derive(true),
            ],
        )?;
        let attrs = self
            .session
            .get_attributes(public, &[AttributeType::EcPoint])?;
        let der = match attrs.into_iter().next() {
            Some(Attribute::EcPoint(p)) => p,
            _ => {
                return Err(CardError::corrupt(
                    "ECDH public point",
                    "card returned none",
                ))
            }
        };
        // CKA_EC_POINT is a DER OCTET STRING (0x04 0x41 ‖ point) on SoftHSM.
        let raw = match der.as_slice() {
            [0x04, 0x41, rest @ ..] if rest.len() == P256_POINT_LEN => rest,
            p if p.len() == P256_POINT_LEN => p,
            _ => {
                return Err(CardError::corrupt(
                    "ECDH public point",
                    "not an uncompressed P-256 point",
                ))
            }
        };
        Ok(EcdhOffer {
            private,
            public,
            point: raw.try_into().expect("length checked"),
        })
    }

    /// Derives the transport key from this side's offer and the peer's point; consumes the offer
    /// (its ephemeral keys are destroyed). The key can wrap and unwrap, nothing else.
    pub fn ecdh_agree(&self, offer: EcdhOffer, peer_point: &[u8]) -> Result<TransportKey> {
        let result = (|| -> Result<TransportKey> {
            if peer_point.len() != P256_POINT_LEN || peer_point[0] != 0x04 {
                return Err(CardError::corrupt(
                    "ECDH peer point",
                    "not an uncompressed P-256 point",
                ));
            }
            let params = Ecdh1DeriveParams::new(EcKdf::null(), peer_point);
            let handle = self.session.derive_key(
                &Mechanism::Ecdh1Derive(params),
                offer.private,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(false),
                    Attribute::Private(false),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Wrap(true),
                    Attribute::Unwrap(true),
                    Attribute::Encrypt(false),
                    Attribute::Decrypt(false),
                ],
            )?;
            Ok(TransportKey {
                handle,
                fingerprint: fingerprint(&self.session, handle)?,
            })
        })();
        self.destroy(offer.private);
        self.destroy(offer.public);
        result
    }

    /// Destroys a transport key once the transfer is done.
    pub fn ecdh_forget(&self, key: TransportKey) {
        self.destroy(key.handle);
    }
}
