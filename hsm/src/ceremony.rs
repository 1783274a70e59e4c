//! The ceremony: a token gets its ownership layers (vendor KBK, then the adapter KBK delivered
//! wrapped under it). In production the vendor KBK is loaded by the vendor at the factory and the
//! wrapped adapter KBK comes from the realm's safe; the *ceremony kit* files stand in for both in
//! development and tests only (docs/format.md §2.7).

use crate::card::Card;
use crate::error::{CardError, Result};
use crate::format::WRAPPED_KEY_LEN;
use crate::hsm::Hsm;
use crate::pin::Pin;
use crate::raw;
use crate::templates;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::{Session, UserType};
use std::fmt;
use std::path::Path;

pub const KIT_VENDOR_FILE: &str = "vendor-kbk.key";
pub const KIT_ADAPTER_FILE: &str = "adapter-kbk.wrapped";
pub const KIT_INFO_FILE: &str = "kit.txt";

/// Development stand-in for the vendor's KBK and the realm's wrapped adapter KBK.
#[derive(Clone)]
pub struct CeremonyKit {
    pub vendor: String,
    pub realm: String,
    vendor_kbk: [u8; 32],
    /// The adapter KBK wrapped (RFC 3394) under the vendor KBK.
    pub adapter_wrapped: [u8; WRAPPED_KEY_LEN],
}

impl fmt::Debug for CeremonyKit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CeremonyKit")
            .field("vendor", &self.vendor)
            .field("realm", &self.realm)
            .field("vendor_kbk", &"<redacted>")
            .finish()
    }
}

/// A public scratch AES key holding `value` in `session`, able to wrap.
fn scratch_wrapping_key(session: &Session, value: &[u8]) -> Result<cryptoki::object::ObjectHandle> {
    Ok(session.create_object(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Value(value.to_vec()),
        Attribute::Wrap(true),
    ])?)
}

impl CeremonyKit {
    /// Makes a kit for a new vendor and a new realm, using a scratch session of any token.
    pub fn generate(session: &Session, vendor: &str, realm: &str) -> Result<Self> {
        let mut vendor_kbk = [0u8; 32];
        session.generate_random_slice(&mut vendor_kbk)?;
        Self::new_realm_for(session, vendor, vendor_kbk, realm)
    }

    /// Makes a kit for another realm of this kit's vendor (same vendor KBK, new adapter KBK).
    pub fn new_realm(&self, session: &Session, realm: &str) -> Result<Self> {
        Self::new_realm_for(session, &self.vendor, self.vendor_kbk, realm)
    }

    fn new_realm_for(
        session: &Session,
        vendor: &str,
        vendor_kbk: [u8; 32],
        realm: &str,
    ) -> Result<Self> {
        let v = scratch_wrapping_key(session, &vendor_kbk)?;
        let a = session.generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::ValueLen(32.into()),
                Attribute::Extractable(true),
            ],
        );
        let result = a.and_then(|a| {
            let w = session.wrap_key(&Mechanism::AesKeyWrap, v, a);
            let _ = session.destroy_object(a);
            w
        });
        let _ = session.destroy_object(v);
        let adapter_wrapped = result?
            .try_into()
            .map_err(|_| CardError::corrupt("ceremony kit", "wrap is not 40 bytes"))?;
        Ok(CeremonyKit {
            vendor: vendor.to_string(),
            realm: realm.to_string(),
            vendor_kbk,
            adapter_wrapped,
        })
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| CardError::io(dir, e))?;
        let put = |name: &str, bytes: &[u8]| -> Result<()> {
            let p = dir.join(name);
            std::fs::write(&p, bytes).map_err(|e| CardError::io(&p, e))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| CardError::io(&p, e))?;
            }
            Ok(())
        };
        put(KIT_VENDOR_FILE, &self.vendor_kbk)?;
        put(KIT_ADAPTER_FILE, &self.adapter_wrapped)?;
        put(
            KIT_INFO_FILE,
            format!("vendor {}\nrealm {}\n", self.vendor, self.realm).as_bytes(),
        )
    }

    pub fn read(dir: &Path) -> Result<Self> {
        let get = |name: &str| -> Result<Vec<u8>> {
            let p = dir.join(name);
            std::fs::read(&p).map_err(|e| CardError::io(&p, e))
        };
        let info = String::from_utf8(get(KIT_INFO_FILE)?)
            .map_err(|_| CardError::corrupt("ceremony kit", "kit.txt is not UTF-8"))?;
        let field = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
                .ok_or_else(|| CardError::corrupt("ceremony kit", format!("kit.txt lacks {k}")))
        };
        Ok(CeremonyKit {
            vendor: field("vendor ")?,
            realm: field("realm ")?,
            vendor_kbk: get(KIT_VENDOR_FILE)?
                .try_into()
                .map_err(|_| CardError::corrupt("ceremony kit", "vendor KBK is not 32 bytes"))?,
            adapter_wrapped: get(KIT_ADAPTER_FILE)?.try_into().map_err(|_| {
                CardError::corrupt("ceremony kit", "wrapped adapter KBK is not 40 bytes")
            })?,
        })
    }
}

/// `keyfort card init`: initialises token `label`, and as security officer loads the vendor KBK
/// and unwraps the adapter KBK under it as a trusted, non-extractable token object. Returns the
/// opened card.
pub fn init_card(
    hsm: &'static Hsm,
    label: &str,
    so_pin: &Pin,
    user_pin: &Pin,
    kit: &CeremonyKit,
) -> Result<Card> {
    hsm.init_token(label, so_pin, user_pin)?;
    let slot = hsm.slot_by_label(label)?;
    let so = hsm.ctx.open_rw_session(slot)?;
    so.login(UserType::So, Some(&so_pin.auth()))?;
    let loaded = (|| -> Result<()> {
        let vendor = raw::create_object(&so, &templates::vendor_kbk(&kit.vendor_kbk))?;
        raw::unwrap_aes_kw(&so, vendor, &kit.adapter_wrapped, &templates::adapter_kbk()).map_err(
            |e| match e.rv() {
                Some("GeneralError") => CardError::BadMac {
                    what: "ceremony kit",
                    context: "adapter KBK does not unwrap under this vendor KBK".into(),
                },
                _ => e,
            },
        )?;
        Ok(())
    })();
    // No user session of this token exists yet, so the token-wide logout harms nothing.
    so.logout()?;
    drop(so);
    loaded?;
    Card::open(hsm, label, user_pin.clone())
}

/// `keyfort card ceremony-kit`: makes a kit in `out` with a throwaway SoftHSM token under
/// `out/.scratch-softhsm`, deleted afterwards. Must be the process's first PKCS#11 use.
pub fn make_kit_with_scratch_token(
    out: &Path,
    vendor: &str,
    realm: &str,
    same_vendor_as: Option<&Path>,
) -> Result<CeremonyKit> {
    let scratch = out.join(".scratch-softhsm");
    let hsm = crate::softhsm::open_token_dir(&scratch)?;
    let pin = Pin::new(format!("{:032x}", rand::random::<u128>()));
    let result = (|| -> Result<CeremonyKit> {
        hsm.init_token("keyfort-kit-scratch", &pin, &pin)?;
        let slot = hsm.slot_by_label("keyfort-kit-scratch")?;
        let session = hsm.ctx.open_rw_session(slot)?;
        crate::card::login(&session, &pin)?;
        let kit = match same_vendor_as {
            Some(dir) => CeremonyKit::read(dir)?.new_realm(&session, realm)?,
            None => CeremonyKit::generate(&session, vendor, realm)?,
        };
        kit.write(out)?;
        Ok(kit)
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}
