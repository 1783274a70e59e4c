//! Masked keys, AES-GCM envelopes, data keys, backups, the integrity key and client credentials.

use crate::card::CoreSession;
use crate::error::{CardError, Result};
use crate::format::*;
use crate::raw;
use crate::templates::{
    customer_key_generate, customer_key_load, partition_key_generate, PartitionKeyUse,
};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::ekdf::AesCbcDeriveParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

/// GCM IVs: `prefix (8 bytes, from the card's RNG when the session opens) ‖ counter (u32 LE)`.
/// A prefix is drawn once per process instance and core, so a restart, rejoin or restore never
/// resumes an old counter; when the counter is exhausted a fresh prefix is drawn. Two instances
/// reuse an IV under one key only if their 64-bit prefixes collide: with n prefixes ever drawn
/// for a key, p <= n^2 / 2^65 (docs/threat-model.md, "IV uniqueness").
#[derive(Debug)]
pub struct IvSource {
    prefix: [u8; 8],
    counter: u32,
}

impl IvSource {
    pub(crate) fn new(session: &Session) -> Result<Self> {
        let mut prefix = [0u8; 8];
        session.generate_random_slice(&mut prefix)?;
        Ok(IvSource { prefix, counter: 0 })
    }

    fn next(&mut self, session: &Session) -> Result<[u8; IV_LEN]> {
        if self.counter == u32::MAX {
            *self = IvSource::new(session)?;
        }
        let mut iv = [0u8; IV_LEN];
        iv[..8].copy_from_slice(&self.prefix);
        iv[8..].copy_from_slice(&self.counter.to_le_bytes());
        self.counter += 1;
        Ok(iv)
    }
}

/// Result of creating a key: its masked blob and, when asked, its single-key backup.
#[derive(Clone, Debug)]
pub struct CreatedKey {
    pub blob: Vec<u8>,
    pub backup: Option<Vec<u8>>,
}

impl CoreSession {
    /// Generates a customer key in the card and returns its masked blob (docs/format.md §2.2).
    /// The key object is destroyed before this returns; nothing plaintext leaves the card.
    pub fn create_key(&mut self, header: &KeyHeader) -> Result<Vec<u8>> {
        Ok(self.create_key_inner(header, false)?.blob)
    }

    /// As [`Self::create_key`], also wrapping the fresh key under the partition backup KBK:
    /// a key in use is never extractable, so a single-key backup can only be made at birth.
    pub fn create_key_with_backup(&mut self, header: &KeyHeader) -> Result<CreatedKey> {
        self.create_key_inner(header, true)
    }

    fn create_key_inner(&mut self, header: &KeyHeader, backup: bool) -> Result<CreatedKey> {
        let p = self.partition(&header.partition)?;
        let key = self
            .session
            .generate_key(&Mechanism::AesKeyGen, &customer_key_generate())?;
        let result = (|| -> Result<CreatedKey> {
            let blob = self.seal(p.masking, p.hmac, key, header, WrappedUnder::MaskingKey)?;
            let backup = if backup {
                Some(self.seal(p.backup, p.hmac, key, header, WrappedUnder::BackupKbk)?)
            } else {
                None
            };
            Ok(CreatedKey { blob, backup })
        })();
        self.destroy(key);
        result
    }

    fn seal(
        &self,
        wrapping: ObjectHandle,
        hmac: ObjectHandle,
        key: ObjectHandle,
        header: &KeyHeader,
        under: WrappedUnder,
    ) -> Result<Vec<u8>> {
        let wrapped: [u8; WRAPPED_KEY_LEN] = self
            .session
            .wrap_key(&Mechanism::AesKeyWrap, wrapping, key)?
            .try_into()
            .map_err(|_| CardError::corrupt("masked blob", "wrap is not 40 bytes"))?;
        let mut blob = MaskedBlob::authenticated(header, under, &wrapped);
        let mac = self.sign(hmac, &blob)?;
        blob.extend_from_slice(&mac);
        Ok(blob)
    }

    /// The card handle of a blob's key: from the cache, or verified (HMAC first: an unwrap
    /// integrity failure is only CKR_GENERAL_ERROR on SoftHSM) and unwrapped through the
    /// masking key's unwrap template, which makes it sensitive and non-extractable.
    pub fn key_handle(&mut self, blob: &[u8]) -> Result<(KeyRef, ObjectHandle)> {
        let b = MaskedBlob::decode(blob)?;
        let kref = b.header.key_ref();
        if let Some(h) = self.cache.get(&kref) {
            return Ok((kref, h));
        }
        let p = self.partition(&b.header.partition)?;
        let body = MaskedBlob::authenticated(&b.header, b.under, &b.wrapped);
        self.verify_mac(p.hmac, &body, &b.mac, "masked blob", || kref.to_string())?;
        let wrapping = match b.under {
            WrappedUnder::MaskingKey => p.masking,
            WrappedUnder::BackupKbk => p.backup,
        };
        let h = raw::unwrap_aes_kw(&self.session, wrapping, &b.wrapped, &customer_key_load())
            .map_err(|e| match e.rv() {
                Some("GeneralError") => CardError::BadMac {
                    what: "masked blob",
                    context: format!("{kref}: unwrap integrity check failed"),
                },
                _ => e,
            })?;
        if let Some(old) = self.cache.insert(kref, h) {
            self.destroy(old);
        }
        Ok((kref, h))
    }

    /// Forgets a key version's unwrapped handle (delete, rotation, eviction by the caller).
    pub fn forget_key(&mut self, key: &KeyRef) {
        if let Some(h) = self.cache.remove(key) {
            self.destroy(h);
        }
    }

    /// (hits, misses) of this session's handle cache.
    pub fn cache_stats(&self) -> (u64, u64) {
        (self.cache.hits, self.cache.misses)
    }

    /// AES-256-GCM under the blob's key; returns the envelope (docs/format.md §2.5).
    pub fn encrypt(&mut self, blob: &[u8], plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        let (kref, h) = self.key_handle(blob)?;
        let iv = self.iv.next(&self.session)?;
        let header = Envelope::header(&kref, &iv);
        let mut gcm_aad = Vec::with_capacity(header.len() + aad.len());
        gcm_aad.extend_from_slice(&header);
        gcm_aad.extend_from_slice(aad);
        let mut iv_buf = iv;
        let params = GcmParams::new(&mut iv_buf, &gcm_aad, ((TAG_LEN * 8) as u64).into())?;
        let sealed = self
            .session
            .encrypt(&Mechanism::AesGcm(params), h, plaintext)?;
        let mut out = Vec::with_capacity(header.len() + sealed.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens an envelope made by [`Self::encrypt`] with the same caller AAD. A tampered envelope
    /// or wrong AAD is `BadMac`; an envelope of another key is `Corrupt`.
    pub fn decrypt(&mut self, blob: &[u8], envelope: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        let env = Envelope::decode(envelope)?;
        let (kref, h) = self.key_handle(blob)?;
        if env.key != kref {
            return Err(CardError::corrupt(
                "envelope",
                format!("made by {}, not {kref}", env.key),
            ));
        }
        let mut gcm_aad = Vec::with_capacity(ENVELOPE_HEADER_LEN + aad.len());
        gcm_aad.extend_from_slice(&envelope[..ENVELOPE_HEADER_LEN]);
        gcm_aad.extend_from_slice(aad);
        let mut iv = env.iv;
        let params = GcmParams::new(&mut iv, &gcm_aad, ((TAG_LEN * 8) as u64).into())?;
        self.session
            .decrypt(&Mechanism::AesGcm(params), h, env.sealed)
            .map_err(|e| match e {
                cryptoki::error::Error::Pkcs11(
                    cryptoki::error::RvError::EncryptedDataInvalid
                    | cryptoki::error::RvError::EncryptedDataLenRange
                    | cryptoki::error::RvError::GeneralError,
                    _,
                ) => CardError::BadMac {
                    what: "envelope",
                    context: kref.to_string(),
                },
                e => e.into(),
            })
    }

    /// A fresh data key from the card's RNG, in plaintext and sealed under the blob's key.
    pub fn generate_data_key(
        &mut self,
        blob: &[u8],
        len: usize,
        aad: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        if !(16..=64).contains(&len) {
            return Err(CardError::Config(format!(
                "data key length {len} not in 16..=64"
            )));
        }
        let mut key = vec![0u8; len];
        self.session.generate_random_slice(&mut key)?;
        let sealed = self.encrypt(blob, &key, aad)?;
        Ok((key, sealed))
    }

    // ---- cluster integrity key ----

    /// Makes the cluster integrity key and returns it wrapped (docs/format.md §2.4); loads it.
    pub fn create_integrity_key(&mut self) -> Result<Vec<u8>> {
        let h = self.session.generate_key(
            &Mechanism::GenericSecretKeyGen,
            &partition_key_generate(false, PartitionKeyUse::Mac),
        )?;
        let result = (|| -> Result<Vec<u8>> {
            let mut k = WrappedIntegrityKey {
                vendor: self.identity().vendor,
                adapter: self.identity().adapter,
                wrapped: self.wrap_under_adapter(h, "integrity key")?,
                mac: [0; 32],
            };
            k.mac = self.sign(h, &k.authenticated())?;
            Ok(k.encode())
        })();
        self.destroy(h);
        let bytes = result?;
        self.import_integrity_key(&bytes)?;
        Ok(bytes)
    }

    /// Loads the cluster integrity key; refuses another vendor/realm or altered bytes.
    pub fn import_integrity_key(&mut self, bytes: &[u8]) -> Result<()> {
        let k = WrappedIntegrityKey::decode(bytes)?;
        self.check_realm("integrity key", k.vendor, k.adapter)?;
        let ctx = || "cluster integrity key".to_string();
        let h = self.load_under_adapter(
            &k.wrapped,
            false,
            PartitionKeyUse::Mac,
            "integrity key",
            &ctx,
        )?;
        if let Err(e) = self.verify_mac(h, &k.authenticated(), &k.mac, "integrity key", ctx) {
            self.destroy(h);
            return Err(e);
        }
        if let Some(old) = self.integrity.replace(h) {
            self.destroy(old);
        }
        Ok(())
    }

    /// HMAC-SHA256 of `bytes` with the cluster integrity key, made in the card.
    pub fn mac(&self, bytes: &[u8]) -> Result<[u8; MAC_LEN]> {
        self.sign(self.integrity.ok_or(CardError::NoIntegrityKey)?, bytes)
    }

    /// Verifies a MAC made by [`Self::mac`] on any card of the realm; a mismatch is `BadMac`.
    pub fn verify(&self, bytes: &[u8], mac: &[u8]) -> Result<()> {
        let h = self.integrity.ok_or(CardError::NoIntegrityKey)?;
        self.verify_mac(h, bytes, mac, "integrity MAC", || {
            format!("{} bytes", bytes.len())
        })
    }

    // ---- client credentials ----

    /// Derives, in the card, the per-client secret `AES-256-CBC(credential key, IV=0,
    /// partition ‖ client id)` as a session object (CKM_AES_CBC_ENCRYPT_DATA: SoftHSM has no
    /// HKDF/SP800-108). `reveal` makes it readable: only for issuing it once to the client.
    fn derive_client_key(
        &self,
        partition: &PartitionId,
        client: &[u8; 16],
        reveal: bool,
    ) -> Result<ObjectHandle> {
        let p = self.partition(partition)?;
        let mut data = [0u8; 32];
        data[..16].copy_from_slice(&partition.0);
        data[16..].copy_from_slice(client);
        let params = AesCbcDeriveParams::new([0u8; 16], &data);
        let h = self.session.derive_key(
            &Mechanism::AesCbcEncryptData(params),
            p.credential,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::ValueLen(32.into()),
                Attribute::Token(false),
                Attribute::Private(true),
                Attribute::Sensitive(!reveal),
                Attribute::Extractable(reveal),
                Attribute::Sign(!reveal),
                Attribute::Verify(!reveal),
            ],
        )?;
        Ok(h)
    }

    /// Issues a client's credential (32 bytes) once, when the client is registered: the client
    /// keeps it; the card can recompute it from the credential key, which never leaves the card.
    pub fn issue_client_credential(
        &self,
        partition: &PartitionId,
        client: &[u8; 16],
    ) -> Result<[u8; 32]> {
        let h = self.derive_client_key(partition, client, true)?;
        let value = self.session.get_attributes(h, &[AttributeType::Value]);
        self.destroy(h);
        match value?.into_iter().next() {
            Some(Attribute::Value(v)) if v.len() == 32 => Ok(v.try_into().unwrap()),
            _ => Err(CardError::corrupt(
                "client credential",
                "card returned no 32-byte value",
            )),
        }
    }

    /// The response a client must give: HMAC(client secret, challenge ‖ context), computed in the
    /// card from the credential key.
    pub fn client_response(
        &self,
        partition: &PartitionId,
        client: &[u8; 16],
        challenge: &[u8],
        context: &[u8],
    ) -> Result<[u8; 32]> {
        let h = self.derive_client_key(partition, client, false)?;
        let mut data = challenge.to_vec();
        data.extend_from_slice(context);
        let mac = self.sign(h, &data);
        self.destroy(h);
        mac
    }

    /// Verifies a client's response in the card; a wrong response is `BadMac`.
    pub fn verify_client_response(
        &self,
        partition: &PartitionId,
        client: &[u8; 16],
        challenge: &[u8],
        context: &[u8],
        response: &[u8],
    ) -> Result<()> {
        let h = self.derive_client_key(partition, client, false)?;
        let mut data = challenge.to_vec();
        data.extend_from_slice(context);
        let r = self.verify_mac(h, &data, response, "client response", || {
            format!("partition {partition}")
        });
        self.destroy(h);
        r
    }
}

/// Client side of challenge-response (software, in the client): HMAC(secret, challenge ‖ context).
pub fn client_answer(secret: &[u8; 32], challenge: &[u8], context: &[u8]) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret).expect("any key length");
    m.update(challenge);
    m.update(context);
    m.finalize().into_bytes().into()
}
