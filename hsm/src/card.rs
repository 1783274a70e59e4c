//! A card (one token) and its per-core sessions.

use crate::cache::HandleCache;
use crate::error::{CardError, Fingerprint, Result};
use crate::hsm::Hsm;
use crate::pin::Pin;
use crate::templates::{LABEL_ADAPTER_KBK, LABEL_VENDOR_KBK};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use std::collections::HashMap;
use std::sync::Arc;

/// A card's identity: fingerprints of its two ownership layers. Two cards of one realm have equal
/// identities; the partition config and integrity key carry it so a foreign card refuses early.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CardIdentity {
    pub vendor: Fingerprint,
    pub adapter: Fingerprint,
}

/// An opened card: token slot, label, user PIN, identity. Cheap to clone and `Send + Sync`; each
/// core (thread) opens its own [`CoreSession`] from it.
#[derive(Clone, Debug)]
pub struct Card {
    inner: Arc<CardInner>,
}

#[derive(Debug)]
struct CardInner {
    hsm: &'static Hsm,
    slot: Slot,
    label: String,
    pin: Pin,
    identity: CardIdentity,
}

/// The fixed block whose wrap under a KBK is that KBK's fingerprint. SoftHSM sets no
/// `CKA_CHECK_VALUE` after unwrap (DESIGN), so fingerprints come from a deterministic RFC 3394
/// wrap of this known key instead.
const FINGERPRINT_BLOCK: [u8; 32] = *b"keyfort card fingerprint block 1";

impl Card {
    /// Opens the token labelled `label` and logs the user in. The token must have been through
    /// the ceremony ([`crate::ceremony::init_card`]).
    pub fn open(hsm: &'static Hsm, label: &str, pin: Pin) -> Result<Card> {
        let slot = hsm.slot_by_label(label)?;
        let session = hsm.ctx.open_rw_session(slot)?;
        login(&session, &pin)?;
        let vendor = find_token_key(&session, LABEL_VENDOR_KBK, label)?;
        let adapter = find_token_key(&session, LABEL_ADAPTER_KBK, label)?;
        let identity = CardIdentity {
            vendor: fingerprint(&session, vendor)?,
            adapter: fingerprint(&session, adapter)?,
        };
        Ok(Card {
            inner: Arc::new(CardInner {
                hsm,
                slot,
                label: label.to_string(),
                pin,
                identity,
            }),
        })
    }

    pub fn label(&self) -> &str {
        &self.inner.label
    }

    pub fn identity(&self) -> CardIdentity {
        self.inner.identity
    }

    /// Opens a new logged-in session: one per core. Sessions are per thread (DESIGN); a
    /// `CoreSession` is `Send` but not `Sync`.
    pub fn session(&self) -> Result<CoreSession> {
        let session = self.inner.hsm.ctx.open_rw_session(self.inner.slot)?;
        login(&session, &self.inner.pin)?;
        let vendor_kbk = find_token_key(&session, LABEL_VENDOR_KBK, &self.inner.label)?;
        let adapter_kbk = find_token_key(&session, LABEL_ADAPTER_KBK, &self.inner.label)?;
        let iv = crate::ops::IvSource::new(&session)?;
        Ok(CoreSession {
            card: self.clone(),
            session,
            vendor_kbk,
            adapter_kbk,
            partitions: HashMap::new(),
            integrity: None,
            cache: HandleCache::new(crate::KEY_HANDLE_CACHE_MAX),
            iv,
        })
    }

    /// Number of token objects visible to a user session (ownership keys only, by design).
    pub fn token_object_count(&self) -> Result<usize> {
        let session = self.inner.hsm.ctx.open_ro_session(self.inner.slot)?;
        Ok(session.find_objects(&[Attribute::Token(true)])?.len())
    }
}

/// Logs in; a second session of the same process finds the token already logged in, which is
/// fine. keyfort never logs out while running: logout of one session logs out all (DESIGN).
pub(crate) fn login(session: &Session, pin: &Pin) -> Result<()> {
    match session.login(UserType::User, Some(&pin.auth())) {
        Ok(()) => Ok(()),
        Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn find_token_key(session: &Session, label: &str, card: &str) -> Result<ObjectHandle> {
    let found = session.find_objects(&[
        Attribute::Token(true),
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(label.as_bytes().to_vec()),
    ])?;
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(CardError::NotFound(format!(
            "{label} on card {card:?} (has the ceremony run?)"
        ))),
        _ => Err(CardError::corrupt(
            "card",
            format!("two objects labelled {label}"),
        )),
    }
}

/// Fingerprint of a KBK: the first 16 bytes of the RFC 3394 wrap of [`FINGERPRINT_BLOCK`].
pub(crate) fn fingerprint(session: &Session, kbk: ObjectHandle) -> Result<Fingerprint> {
    let probe = session.create_object(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
        Attribute::Value(FINGERPRINT_BLOCK.to_vec()),
    ])?;
    let wrapped = session.wrap_key(&Mechanism::AesKeyWrap, kbk, probe);
    session.destroy_object(probe)?;
    let wrapped = wrapped?;
    Ok(Fingerprint(wrapped[..16].try_into().expect("40-byte wrap")))
}

/// One card session owned by one core: its loaded partitions, integrity key, handle cache and IV
/// source. All methods run inline on the calling thread (see [`crate::pool`] for network HSMs).
pub struct CoreSession {
    pub(crate) card: Card,
    pub(crate) session: Session,
    #[allow(dead_code)]
    pub(crate) vendor_kbk: ObjectHandle,
    pub(crate) adapter_kbk: ObjectHandle,
    pub(crate) partitions: HashMap<crate::format::PartitionId, crate::partition::PartitionKeys>,
    pub(crate) integrity: Option<ObjectHandle>,
    pub(crate) cache: HandleCache,
    pub(crate) iv: crate::ops::IvSource,
}

impl std::fmt::Debug for CoreSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreSession")
            .field("card", &self.card.label())
            .field("partitions", &self.partitions.len())
            .field("cached_keys", &self.cache.len())
            .finish()
    }
}

impl CoreSession {
    pub fn card(&self) -> &Card {
        &self.card
    }

    pub fn identity(&self) -> CardIdentity {
        self.card.identity()
    }

    /// The raw PKCS#11 session, for audits and the threat-model tests.
    pub fn pkcs11_session(&self) -> &Session {
        &self.session
    }

    /// Session objects visible to this session (C_FindObjects over `CKA_TOKEN=false`).
    pub fn session_object_count(&self) -> Result<usize> {
        Ok(self.session.find_objects(&[Attribute::Token(false)])?.len())
    }

    /// Number of unwrapped customer keys held in the handle cache.
    pub fn cached_keys(&self) -> usize {
        self.cache.len()
    }

    /// The adapter KBK handle (threat-model tests).
    pub fn adapter_kbk(&self) -> ObjectHandle {
        self.adapter_kbk
    }

    pub(crate) fn sign(&self, key: ObjectHandle, data: &[u8]) -> Result<[u8; 32]> {
        let mac = self.session.sign(&Mechanism::Sha256Hmac, key, data)?;
        mac.try_into()
            .map_err(|_| CardError::corrupt("HMAC", "card returned a MAC that is not 32 bytes"))
    }

    /// Verifies an HMAC in the card; a mismatch is `BadMac`, never a PKCS#11 error.
    pub(crate) fn verify_mac(
        &self,
        key: ObjectHandle,
        data: &[u8],
        mac: &[u8],
        what: crate::error::What,
        context: impl FnOnce() -> String,
    ) -> Result<()> {
        match self.session.verify(&Mechanism::Sha256Hmac, key, data, mac) {
            Ok(()) => Ok(()),
            Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::SignatureInvalid
                | cryptoki::error::RvError::SignatureLenRange,
                _,
            )) => Err(CardError::BadMac {
                what,
                context: context(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) fn destroy(&self, h: ObjectHandle) {
        if let Err(e) = self.session.destroy_object(h) {
            tracing::warn!(error = %e, "destroying a session object failed");
        }
    }
}

impl Drop for CoreSession {
    fn drop(&mut self) {
        // Session objects die with their session; destroying them explicitly keeps the object
        // count flat even if the PKCS#11 module keeps sessions pooled.
        for h in self.cache.drain() {
            self.destroy(h);
        }
        let parts: Vec<_> = self.partitions.drain().map(|(_, p)| p).collect();
        for p in parts {
            for h in p.handles() {
                self.destroy(h);
            }
        }
        if let Some(h) = self.integrity.take() {
            self.destroy(h);
        }
    }
}
