//! One SoftHSM card per test process with a cluster integrity key; each test opens its own
//! session (sessions are per thread) and loads the key.

use keyfort_hsm::softhsm::fixture;
use keyfort_hsm::{Card, CoreSession};
use std::sync::OnceLock;

fn card() -> &'static (Card, Vec<u8>) {
    static C: OnceLock<(Card, Vec<u8>)> = OnceLock::new();
    C.get_or_init(|| {
        let card = fixture().new_card("snapvendor", "snaprealm").unwrap();
        let key = card.session().unwrap().create_integrity_key().unwrap();
        (card, key)
    })
}

/// A session holding the cluster integrity key.
pub fn session() -> CoreSession {
    let (card, key) = card();
    let mut s = card.session().unwrap();
    s.import_integrity_key(key).unwrap();
    s
}

/// A session of another realm with its own integrity key: its MACs must not verify.
pub fn other_realm_session() -> CoreSession {
    let card = fixture().new_card("snapvendor", "otherrealm").unwrap();
    let mut s = card.session().unwrap();
    s.create_integrity_key().unwrap();
    s
}
