//! The cluster's TLS certificate authority key: an ECDSA P-256 key pair made in one card, its
//! private key kept wrapped under the realm's adapter KBK (through a per-CA-key KEK, see below)
//! and unwrapped into any card of the realm to sign certificates. The private key is never in
//! plaintext outside a card.
//!
//! Why a KEK between the adapter KBK and the private key: the adapter KBK's
//! `CKA_UNWRAP_TEMPLATE` forces `CKA_ENCRYPT=false` on whatever it unwraps, and SoftHSM 2.6.1
//! refuses `CKA_ENCRYPT` on a private key (CKR_ATTRIBUTE_TYPE_INVALID; leaving it out is
//! CKR_TEMPLATE_INCONSISTENT, measured). So no private key can be unwrapped under the adapter KBK
//! itself. Instead a fresh AES-256 CA KEK is wrapped under the adapter KBK (RFC 3394, like a
//! partition key) and the private key's PKCS#8 under that KEK (`CKM_AES_KEY_WRAP_PAD`, RFC 5649).
//! The loaded KEK can unwrap only, and its own `CKA_UNWRAP_TEMPLATE` forces the private key to be
//! sensitive, non-extractable and a signing key only; the KEK is destroyed as soon as the private
//! key is in.
//!
//! Card facts measured here (SoftHSM2 2.6.1): `CKM_ECDSA` is supported and returns raw r ‖ s
//! (64 bytes); `CKM_ECDSA_SHA256` is not in the mechanism list, so the message is hashed with
//! sha2 and the digest signed with `CKM_ECDSA`. A private key marked `CKA_WRAP_WITH_TRUSTED`
//! cannot be wrapped under the (untrusted, user-made) KEK (CKR_KEY_NOT_WRAPPABLE), so the
//! private key at birth is extractable under any key for the microseconds of its one wrap, as a
//! fresh customer key is. Integrity failures of either unwrap (tampered or truncated bytes)
//! come back as CKR_GENERAL_ERROR, reported as `BadMac`.

use crate::card::CoreSession;
use crate::error::{CardError, Fingerprint, Result};
use crate::format::WRAPPED_KEY_LEN;
use crate::raw;
use crate::templates::{ca_kek_generate, ca_kek_load, ca_key_load, ca_key_pair_generate};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use sha2::{Digest, Sha256};

/// Magic of a wrapped CA key.
pub const CA_KEY_MAGIC: [u8; 4] = *b"KFCA";
/// Format version of a wrapped CA key.
pub const CA_KEY_FORMAT: u8 = 1;
/// Uncompressed P-256 point: 0x04 ‖ X(32) ‖ Y(32).
pub const CA_POINT_LEN: usize = 65;
/// Upper bound on the wrapped private key (a P-256 PKCS#8 wraps to 80 bytes on SoftHSM; other
/// cards' encodings may carry the optional public key, still far below this).
pub const MAX_WRAPPED_CA_KEY_LEN: usize = 512;
/// Bytes before the wrapped private key: magic, format, two fingerprints, point, KEK, length.
const HEADER_LEN: usize = 4 + 1 + 16 + 16 + CA_POINT_LEN + WRAPPED_KEY_LEN + 2;
/// What `load_ca_key` signs and verifies to prove the unwrapped key matches `public_point`.
const SELF_TEST_MESSAGE: &[u8] = b"keyfort CA key load self-test: private key matches public point";

const WHAT: &str = "wrapped CA key";

/// A CA key as stored:
/// `"KFCA" ‖ format(1) ‖ vendor fp(16) ‖ adapter fp(16) ‖ public point(65) ‖ kek(40) ‖
/// wrapped len u16 BE ‖ wrapped`, where `kek` is the CA KEK wrapped under the adapter KBK
/// (`CKM_AES_KEY_WRAP`) and `wrapped` the private key's PKCS#8 wrapped under the KEK
/// (`CKM_AES_KEY_WRAP_PAD`). Nothing here is secret; the public point is not authenticated by
/// the wraps, so `load_ca_key` proves it by a signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedCaKey {
    pub vendor: Fingerprint,
    pub adapter: Fingerprint,
    pub public_point: [u8; CA_POINT_LEN],
    pub kek: [u8; WRAPPED_KEY_LEN],
    pub wrapped: Vec<u8>,
}

impl WrappedCaKey {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_LEN + self.wrapped.len());
        b.extend_from_slice(&CA_KEY_MAGIC);
        b.push(CA_KEY_FORMAT);
        b.extend_from_slice(&self.vendor.0);
        b.extend_from_slice(&self.adapter.0);
        b.extend_from_slice(&self.public_point);
        b.extend_from_slice(&self.kek);
        b.extend_from_slice(&(self.wrapped.len() as u16).to_be_bytes());
        b.extend_from_slice(&self.wrapped);
        b
    }

    /// Parses a wrapped CA key; any structural fault is `CardError::Corrupt`, never a panic.
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() < HEADER_LEN {
            return Err(CardError::corrupt(
                WHAT,
                format!("{} bytes, header alone is {HEADER_LEN}", b.len()),
            ));
        }
        if b[..4] != CA_KEY_MAGIC {
            return Err(CardError::corrupt(WHAT, "bad magic"));
        }
        if b[4] != CA_KEY_FORMAT {
            return Err(CardError::corrupt(WHAT, format!("format {}", b[4])));
        }
        let (vendor, rest) = b[5..].split_at(16);
        let (adapter, rest) = rest.split_at(16);
        let (point, rest) = rest.split_at(CA_POINT_LEN);
        let (kek, rest) = rest.split_at(WRAPPED_KEY_LEN);
        let (len, wrapped) = rest.split_at(2);
        let len = u16::from_be_bytes([len[0], len[1]]) as usize;
        if point[0] != 0x04 {
            return Err(CardError::corrupt(
                WHAT,
                "public point is not an uncompressed P-256 point",
            ));
        }
        // RFC 5649 output is a whole number of 8-byte blocks, at least two.
        if !(16..=MAX_WRAPPED_CA_KEY_LEN).contains(&len) || !len.is_multiple_of(8) {
            return Err(CardError::corrupt(
                WHAT,
                format!("wrapped private key length {len}"),
            ));
        }
        if wrapped.len() != len {
            return Err(CardError::corrupt(
                WHAT,
                format!(
                    "wrapped private key is {} bytes, length field says {len}",
                    wrapped.len()
                ),
            ));
        }
        Ok(WrappedCaKey {
            vendor: Fingerprint(vendor.try_into().expect("16 bytes")),
            adapter: Fingerprint(adapter.try_into().expect("16 bytes")),
            public_point: point.try_into().expect("65 bytes"),
            kek: kek.try_into().expect("40 bytes"),
            wrapped: wrapped.to_vec(),
        })
    }
}

/// A CA private key unwrapped into this session (session object, sensitive, never extractable).
/// Give it back with [`CoreSession::forget_ca_key`]; otherwise it lives until the session closes.
#[derive(Debug)]
pub struct CaKey {
    handle: ObjectHandle,
    pub public_point: [u8; CA_POINT_LEN],
}

impl CaKey {
    /// The card object (audits, threat-model tests).
    pub fn handle(&self) -> ObjectHandle {
        self.handle
    }
}

/// Maps an unwrap's integrity failure (SoftHSM: CKR_GENERAL_ERROR) to `BadMac`.
fn unwrap_failure(e: CardError, context: &str) -> CardError {
    match e.rv() {
        Some("GeneralError")
        | Some("WrappedKeyInvalid")
        | Some("WrappedKeyLenRange")
        | Some("EncryptedDataInvalid") => CardError::BadMac {
            what: WHAT,
            context: context.to_string(),
        },
        _ => e,
    }
}

impl CoreSession {
    /// Generates a P-256 key pair in the card and a fresh CA KEK, wraps the private key under the
    /// KEK and the KEK under the adapter KBK, destroys all three objects and returns the blob.
    pub fn generate_ca_key(&self) -> Result<WrappedCaKey> {
        let kek = self
            .session
            .generate_key(&Mechanism::AesKeyGen, &ca_kek_generate())?;
        let pair = {
            let (public, private) = ca_key_pair_generate();
            self.session
                .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
        };
        let (public, private) = match pair {
            Ok(p) => p,
            Err(e) => {
                self.destroy(kek);
                return Err(e.into());
            }
        };
        let result = (|| -> Result<WrappedCaKey> {
            let public_point = self.ec_point(public)?;
            let wrapped = self
                .session
                .wrap_key(&Mechanism::AesKeyWrapPad, kek, private)?;
            if wrapped.len() > MAX_WRAPPED_CA_KEY_LEN {
                return Err(CardError::corrupt(
                    WHAT,
                    format!("card wrapped the private key to {} bytes", wrapped.len()),
                ));
            }
            let kek = self.wrap_under_adapter(kek, WHAT)?;
            let me = self.identity();
            Ok(WrappedCaKey {
                vendor: me.vendor,
                adapter: me.adapter,
                public_point,
                kek,
                wrapped,
            })
        })();
        self.destroy(private);
        self.destroy(public);
        self.destroy(kek);
        result
    }

    /// Loads a wrapped CA key: refuses another vendor or realm (`WrongVendor`/`WrongRealm`),
    /// tampered bytes (`BadMac`), and a private key that does not match `public_point`
    /// (`BadMac`, proved by signing in the card and verifying with ring).
    pub fn load_ca_key(&self, w: &WrappedCaKey) -> Result<CaKey> {
        self.check_realm(WHAT, w.vendor, w.adapter)?;
        let kek = raw::unwrap_aes_kw(&self.session, self.adapter_kbk, &w.kek, &ca_kek_load())
            .map_err(|e| unwrap_failure(e, "CA KEK under the adapter KBK"))?;
        let private = self
            .session
            .unwrap_key(&Mechanism::AesKeyWrapPad, kek, &w.wrapped, &ca_key_load())
            .map_err(|e| unwrap_failure(e.into(), "CA private key under its KEK"));
        self.destroy(kek);
        let key = CaKey {
            handle: private?,
            public_point: w.public_point,
        };
        let proof = self.ca_sign(&key, SELF_TEST_MESSAGE).and_then(|sig| {
            ring::signature::UnparsedPublicKey::new(
                &ring::signature::ECDSA_P256_SHA256_ASN1,
                &key.public_point,
            )
            .verify(SELF_TEST_MESSAGE, &sig)
            .map_err(|_| CardError::BadMac {
                what: WHAT,
                context: "the private key does not match the public point".into(),
            })
        });
        match proof {
            Ok(()) => Ok(key),
            Err(e) => {
                self.forget_ca_key(key);
                Err(e)
            }
        }
    }

    /// ECDSA P-256 over SHA-256(`msg`), in the card (`CKM_ECDSA` over a sha2 digest: SoftHSM
    /// 2.6.1 lacks `CKM_ECDSA_SHA256`), as a DER ECDSA-Sig-Value (what X.509 carries).
    pub fn ca_sign(&self, key: &CaKey, msg: &[u8]) -> Result<Vec<u8>> {
        let digest = Sha256::digest(msg);
        let raw = self.session.sign(&Mechanism::Ecdsa, key.handle, &digest)?;
        if raw.len() != 64 {
            return Err(CardError::corrupt(
                "ECDSA signature",
                format!("card returned {} bytes, expected r ‖ s of 64", raw.len()),
            ));
        }
        Ok(ecdsa_raw_to_der(
            raw[..32].try_into().expect("64 bytes"),
            raw[32..].try_into().expect("64 bytes"),
        ))
    }

    /// Destroys the CA private key's session object.
    pub fn forget_ca_key(&self, key: CaKey) {
        self.destroy(key.handle);
    }

    /// The uncompressed point of an EC public key (SoftHSM: a DER OCTET STRING around it).
    fn ec_point(&self, public: ObjectHandle) -> Result<[u8; CA_POINT_LEN]> {
        let attrs = self
            .session
            .get_attributes(public, &[AttributeType::EcPoint])?;
        let der = match attrs.into_iter().next() {
            Some(Attribute::EcPoint(p)) => p,
            _ => return Err(CardError::corrupt("CA public point", "card returned none")),
        };
        let raw = match der.as_slice() {
            [0x04, 0x41, rest @ ..] if rest.len() == CA_POINT_LEN => rest,
            p if p.len() == CA_POINT_LEN => p,
            _ => {
                return Err(CardError::corrupt(
                    "CA public point",
                    "not an uncompressed P-256 point",
                ))
            }
        };
        if raw[0] != 0x04 {
            return Err(CardError::corrupt(
                "CA public point",
                "not an uncompressed P-256 point",
            ));
        }
        Ok(raw.try_into().expect("length checked"))
    }
}

/// DER `SEQUENCE { INTEGER r, INTEGER s }` from big-endian unsigned r and s: leading zeros
/// stripped, a 0x00 prepended where the high bit is set (INTEGER is signed).
pub fn ecdsa_raw_to_der(r: &[u8; 32], s: &[u8; 32]) -> Vec<u8> {
    fn integer(out: &mut Vec<u8>, v: &[u8]) {
        let first = v.iter().position(|&b| b != 0).unwrap_or(v.len());
        let v = &v[first..];
        let pad = v.first().is_none_or(|&b| b & 0x80 != 0);
        out.push(0x02);
        out.push((v.len() + pad as usize) as u8);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
    }
    let mut body = Vec::with_capacity(72);
    integer(&mut body, r);
    integer(&mut body, s);
    // r and s are at most 33 bytes each: the body is under 128 bytes, short-form length.
    let mut der = Vec::with_capacity(body.len() + 2);
    der.push(0x30);
    der.push(body.len() as u8);
    der.extend_from_slice(&body);
    der
}
