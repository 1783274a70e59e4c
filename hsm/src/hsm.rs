//! The one PKCS#11 context of the process and token lookup by label.

use crate::error::{CardError, Result};
use crate::pin::Pin;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::slot::Slot;
use std::sync::{Mutex, OnceLock};

/// Default module: SoftHSM2 as packaged by Debian.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

static HSM: OnceLock<Hsm> = OnceLock::new();

/// The process-wide PKCS#11 library: exactly one `C_Initialize` per process.
#[derive(Debug)]
pub struct Hsm {
    pub(crate) ctx: Pkcs11,
    module: String,
}

pub(crate) fn module_path() -> Option<&'static str> {
    HSM.get().map(|h| h.module.as_str())
}

impl Hsm {
    /// Loads and initialises `module` once; later calls return the same context (and must name
    /// the same module). `SOFTHSM2_CONF` is read by SoftHSM inside this first call, so callers set
    /// it before (the `softhsm` fixture does).
    pub fn init(module: &str) -> Result<&'static Hsm> {
        if let Some(h) = HSM.get() {
            if h.module != module {
                return Err(CardError::Config(format!(
                    "PKCS#11 already initialised with {}, not {module}",
                    h.module
                )));
            }
            return Ok(h);
        }
        let ctx = Pkcs11::new(module).map_err(CardError::from)?;
        // Without OS locking SoftHSM crashes when sessions run on several threads (DESIGN).
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))?;
        let _ = HSM.set(Hsm {
            ctx,
            module: module.to_string(),
        });
        Ok(HSM.get().expect("set above"))
    }

    /// The initialised context, if any.
    pub fn get() -> Option<&'static Hsm> {
        HSM.get()
    }

    /// The raw cryptoki context (threat-model tests, audits).
    pub fn ctx(&self) -> &Pkcs11 {
        &self.ctx
    }

    pub fn module(&self) -> &str {
        &self.module
    }

    /// The slot whose initialised token has `label`. Slot ids are not stable across restarts
    /// (SoftHSM numbers them by token serial), so tokens are only ever found by label.
    pub fn slot_by_label(&self, label: &str) -> Result<Slot> {
        let mut found = None;
        for slot in self.ctx.get_slots_with_initialized_token()? {
            let info = self.ctx.get_token_info(slot)?;
            if info.label().trim_end() == label {
                if found.is_some() {
                    return Err(CardError::Config(format!(
                        "two tokens are labelled {label:?}"
                    )));
                }
                found = Some(slot);
            }
        }
        found.ok_or_else(|| CardError::NotFound(format!("token labelled {label:?}")))
    }

    /// Labels of all initialised tokens.
    pub fn labels(&self) -> Result<Vec<String>> {
        let mut out = vec![];
        for slot in self.ctx.get_slots_with_initialized_token()? {
            out.push(
                self.ctx
                    .get_token_info(slot)?
                    .label()
                    .trim_end()
                    .to_string(),
            );
        }
        Ok(out)
    }

    /// Initialises a fresh token labelled `label` in the first free slot and sets its user PIN.
    /// Refuses when a token with that label exists already.
    pub fn init_token(&self, label: &str, so_pin: &Pin, user_pin: &Pin) -> Result<Slot> {
        // Two threads must not pick the same free slot.
        static INIT: Mutex<()> = Mutex::new(());
        let _one_at_a_time = INIT.lock().unwrap_or_else(|p| p.into_inner());
        if self.slot_by_label(label).is_ok() {
            return Err(CardError::Config(format!(
                "a token labelled {label:?} exists"
            )));
        }
        let mut free = None;
        for slot in self.ctx.get_slots_with_token()? {
            if !self.ctx.get_token_info(slot)?.token_initialized() {
                free = Some(slot);
                break;
            }
        }
        let slot = free.ok_or_else(|| CardError::NotFound("a free slot".into()))?;
        self.ctx.init_token(slot, &so_pin.auth(), label)?;
        // SoftHSM renumbers a slot once its token is initialised: look it up again by label.
        let slot = self.slot_by_label(label)?;
        let session = self.ctx.open_rw_session(slot)?;
        session.login(cryptoki::session::UserType::So, Some(&so_pin.auth()))?;
        session.init_pin(&user_pin.auth())?;
        // The SO logs out here, before any user session exists: logout is token-wide.
        session.logout()?;
        Ok(slot)
    }
}
