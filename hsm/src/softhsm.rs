//! SoftHSM2 token directories for nodes, tests and the demo.
//!
//! SoftHSM reads `SOFTHSM2_CONF` once, inside the process's one `C_Initialize`; so a process gets
//! one token directory, and several labelled tokens in it are several cards. Tests share a
//! process-global fixture (one per test binary) in a fresh directory under the system temp dir.

use crate::card::Card;
use crate::ceremony::{init_card, CeremonyKit};
use crate::error::{CardError, Result};
use crate::hsm::{Hsm, SOFTHSM_MODULE};
use crate::pin::Pin;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// Writes `<token_dir>/softhsm2.conf` pointing SoftHSM at `<token_dir>/tokens`; returns its path.
pub fn write_conf(token_dir: &Path) -> Result<PathBuf> {
    let tokens = token_dir.join("tokens");
    std::fs::create_dir_all(&tokens).map_err(|e| CardError::io(&tokens, e))?;
    let conf = token_dir.join("softhsm2.conf");
    let text = format!(
        "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
        tokens.display()
    );
    std::fs::write(&conf, text).map_err(|e| CardError::io(&conf, e))?;
    Ok(conf)
}

/// Points this process at the SoftHSM token directory `token_dir` (writing its conf) and
/// initialises PKCS#11. Must be the process's first PKCS#11 use.
pub fn open_token_dir(token_dir: &Path) -> Result<&'static Hsm> {
    if let Some(h) = Hsm::get() {
        return Ok(h);
    }
    let conf = write_conf(token_dir)?;
    // Safe in edition 2021; done before any thread of ours touches the environment or PKCS#11.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    Hsm::init(SOFTHSM_MODULE)
}

/// The per-process test fixture: one token directory, dev PINs, cached ceremony kits.
pub struct Fixture {
    dir: PathBuf,
    hsm: &'static Hsm,
    so_pin: Pin,
    user_pin: Pin,
    kits: Mutex<HashMap<(String, String), CeremonyKit>>,
    cards: Mutex<u32>,
}

impl std::fmt::Debug for Fixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fixture").field("dir", &self.dir).finish()
    }
}

const SCRATCH_LABEL: &str = "keyfort-kit-scratch";

/// The process-global fixture; the first call creates the directory and initialises PKCS#11.
pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| Fixture::create().expect("SoftHSM fixture (is softhsm2 installed?)"))
}

impl Fixture {
    fn create() -> Result<Fixture> {
        let base = std::env::temp_dir();
        remove_stale(&base);
        let dir = base.join(format!(
            "keyfort-softhsm-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let hsm = open_token_dir(&dir)?;
        let so_pin = Pin::new(format!("so-{:016x}", rand::random::<u64>()));
        let user_pin = Pin::new(format!("user-{:016x}", rand::random::<u64>()));
        hsm.init_token(SCRATCH_LABEL, &so_pin, &user_pin)?;
        Ok(Fixture {
            dir,
            hsm,
            so_pin,
            user_pin,
            kits: Mutex::new(HashMap::new()),
            cards: Mutex::new(0),
        })
    }

    pub fn hsm(&self) -> &'static Hsm {
        self.hsm
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn user_pin(&self) -> Pin {
        self.user_pin.clone()
    }
    pub fn so_pin(&self) -> Pin {
        self.so_pin.clone()
    }

    /// A logged-in session on the scratch token (kits, spikes). Not a keyfort card.
    pub fn scratch_session(&self) -> Result<cryptoki::session::Session> {
        let slot = self.hsm.slot_by_label(SCRATCH_LABEL)?;
        let s = self.hsm.ctx.open_rw_session(slot)?;
        crate::card::login(&s, &self.user_pin)?;
        Ok(s)
    }

    /// The kit of (vendor, realm); one vendor name always means one vendor KBK.
    pub fn kit(&self, vendor: &str, realm: &str) -> Result<CeremonyKit> {
        let mut kits = self.kits.lock().expect("kits");
        if let Some(k) = kits.get(&(vendor.into(), realm.into())) {
            return Ok(k.clone());
        }
        let s = self.scratch_session()?;
        let same_vendor = kits
            .iter()
            .find(|((v, _), _)| v == vendor)
            .map(|(_, k)| k.clone());
        let kit = match same_vendor {
            Some(k) => k.new_realm(&s, realm)?,
            None => CeremonyKit::generate(&s, vendor, realm)?,
        };
        kits.insert((vendor.into(), realm.into()), kit.clone());
        Ok(kit)
    }

    /// A new card (fresh token, ceremony run) of `vendor` and `realm`.
    pub fn new_card(&self, vendor: &str, realm: &str) -> Result<Card> {
        let n = {
            let mut c = self.cards.lock().expect("cards");
            *c += 1;
            *c
        };
        let label = format!("{vendor}-{realm}-{n}");
        let kit = self.kit(vendor, realm)?;
        init_card(self.hsm, &label, &self.so_pin, &self.user_pin, &kit)
    }
}

/// Removes fixture directories of processes that no longer exist.
fn remove_stale(base: &Path) {
    let Ok(rd) = std::fs::read_dir(base) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix("keyfort-softhsm-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next() else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A session on a fixture card (one realm, shared by every caller) holding the cluster
/// integrity key named by the bytes `key`: the same bytes give the same key in every thread of
/// the process, other bytes another key. For tests and benchmarks of the peer handshake, which need real
/// cards with equal (or deliberately different) integrity keys; sessions are per thread.
pub fn integrity_session(key: &[u8]) -> Result<crate::card::CoreSession> {
    type Keyed = HashMap<Vec<u8>, &'static (Card, Vec<u8>)>;
    static KEYS: OnceLock<Mutex<Keyed>> = OnceLock::new();
    let entry = {
        let mut keys = KEYS
            .get_or_init(|| Mutex::new(HashMap::new()))
            .lock()
            .expect("integrity key table");
        match keys.get(key) {
            Some(e) => *e,
            None => {
                let card = fixture().new_card("peervendor", "peerrealm")?;
                let wrapped = card.session()?.create_integrity_key()?;
                let e: &'static (Card, Vec<u8>) = Box::leak(Box::new((card, wrapped)));
                keys.insert(key.to_vec(), e);
                e
            }
        }
    };
    let mut s = entry.0.session()?;
    s.import_integrity_key(&entry.1)?;
    Ok(s)
}
