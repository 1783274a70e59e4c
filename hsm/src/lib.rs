//! keyfort-hsm: the card. PKCS#11 (through `cryptoki`) ceremony, partitions, masked export and
//! import, HMAC, AES-GCM, per-core sessions and a bounded cache of unwrapped key handles.
//! Knows nothing of logs or networks. The rules it enforces, and which of them the card itself
//! enforces, are in docs/threat-model.md; its byte formats in docs/format.md §2.

pub mod ca;
pub mod cache;
pub mod card;
pub mod ceremony;
pub mod ecdh;
pub mod error;
pub mod format;
pub mod hsm;
pub mod ops;
pub mod partition;
pub mod pin;
pub mod pool;
pub mod raw;
pub mod softhsm;
pub mod templates;

/// The cryptoki version this crate speaks, for audits and benchmarks of raw card calls.
pub use cryptoki;

pub use ca::{CaKey, WrappedCaKey};
pub use card::{Card, CardIdentity, CoreSession};
pub use ceremony::{init_card, CeremonyKit};
pub use error::{CardError, Fingerprint, Result};
pub use format::{
    Algorithm, KeyHeader, KeyId, KeyKind, KeyRef, MaskedBlob, PartitionConfig, PartitionId,
    PartitionPolicy, PolicyTrailer, WrappedUnder,
};
pub use hsm::{Hsm, SOFTHSM_MODULE};
pub use ops::{client_answer, CreatedKey};
pub use pin::Pin;
pub use pool::BlockingPool;

/// Unwrapped customer key handles one core keeps. Each is a SoftHSM session object (~a few hundred
/// bytes in the module); 4096 covers the hot set of a Zipf workload (docs/bench/hsm.json) while
/// bounding the card's object count per core.
pub const KEY_HANDLE_CACHE_MAX: usize = 4096;
