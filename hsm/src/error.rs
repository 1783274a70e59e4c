//! One typed error for everything the card layer can refuse. Messages name the partition, key id or
//! PKCS#11 function involved and never carry key bytes or PINs.

use std::fmt;

/// What failed a structural check (`CardError::Corrupt`).
pub type What = &'static str;

/// Every failure of the card layer. Variants are stable: callers match on them.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CardError {
    /// The object was made for another adapter KBK (another realm) than this card holds.
    #[error("wrong realm: {what} was made for adapter fingerprint {theirs}, this card is {ours}")]
    WrongRealm {
        what: What,
        ours: Fingerprint,
        theirs: Fingerprint,
    },
    /// The object was made under another vendor KBK than this card holds.
    #[error("wrong vendor: {what} was made for vendor fingerprint {theirs}, this card is {ours}")]
    WrongVendor {
        what: What,
        ours: Fingerprint,
        theirs: Fingerprint,
    },
    /// A MAC made in the card did not verify: the bytes were altered or made by another key.
    #[error("bad MAC on {what} ({context})")]
    BadMac { what: What, context: String },
    /// Bytes that do not parse as the named format (length, magic, version, field range).
    #[error("corrupt {what}: {detail}")]
    Corrupt { what: What, detail: String },
    /// A token label, partition or object that is not there.
    #[error("not found: {0}")]
    NotFound(String),
    /// The partition named by a key or request has not been imported into this session.
    #[error("partition {0} is not loaded on this card session")]
    PartitionNotLoaded(String),
    /// The card has no integrity key loaded.
    #[error("no cluster integrity key is loaded on this card session")]
    NoIntegrityKey,
    /// A PKCS#11 call failed; `rv` is the CKR_ name.
    #[error("PKCS#11 {func} failed: {rv}")]
    Pkcs11 { func: String, rv: String },
    /// The per-key IV space is exhausted (never expected: 2^64 prefixes of 2^32 each).
    #[error("IV space exhausted")]
    IvExhausted,
    /// Configuration: PIN files, module path, token directory.
    #[error("configuration: {0}")]
    Config(String),
    /// Local I/O on ceremony kits, token directories, PIN files.
    #[error("i/o on {path}: {detail}")]
    Io { path: String, detail: String },
}

impl CardError {
    pub(crate) fn corrupt(what: What, detail: impl Into<String>) -> Self {
        CardError::Corrupt {
            what,
            detail: detail.into(),
        }
    }

    pub(crate) fn io(path: &std::path::Path, e: std::io::Error) -> Self {
        CardError::Io {
            path: path.display().to_string(),
            detail: e.to_string(),
        }
    }

    /// The CKR_ name when this is a PKCS#11 failure.
    pub fn rv(&self) -> Option<&str> {
        match self {
            CardError::Pkcs11 { rv, .. } => Some(rv),
            _ => None,
        }
    }
}

impl From<cryptoki::error::Error> for CardError {
    fn from(e: cryptoki::error::Error) -> Self {
        match e {
            cryptoki::error::Error::Pkcs11(rv, func) => CardError::Pkcs11 {
                func: func.to_string(),
                rv: format!("{rv:?}"),
            },
            other => CardError::Pkcs11 {
                func: "cryptoki".into(),
                rv: other.to_string(),
            },
        }
    }
}

pub type Result<T> = std::result::Result<T, CardError>;

/// A 16-byte fingerprint of an ownership layer (vendor or adapter KBK).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Fingerprint(pub [u8; 16]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}
