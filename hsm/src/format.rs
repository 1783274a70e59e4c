//! Byte formats the card produces (docs/format.md, section 2). All integers little-endian. Every
//! structure starts with a 4-byte magic and a 1-byte format version; readers refuse anything else.

use crate::error::{CardError, Fingerprint, Result};

/// AES-256 key wrapped with RFC 3394: 32 bytes of key + 8 bytes of integrity block.
pub const WRAPPED_KEY_LEN: usize = 40;
/// HMAC-SHA256 output.
pub const MAC_LEN: usize = 32;
pub const KEY_HEADER_LEN: usize = 39;
pub const FORMAT_VERSION: u8 = 1;

pub const MAGIC_BLOB: &[u8; 4] = b"KFMB";
pub const MAGIC_CONFIG: &[u8; 4] = b"KFPC";
pub const MAGIC_INTEGRITY: &[u8; 4] = b"KFIK";
pub const MAGIC_ENVELOPE: &[u8; 4] = b"KFEV";
pub const MAGIC_POLICY: &[u8; 4] = b"KFPP";

/// A partition id: 128 bits chosen by whoever creates the partition.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PartitionId(pub [u8; 16]);
/// A key id: random 128 bits chosen by the node that creates the key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct KeyId(pub [u8; 16]);

macro_rules! hex_id {
    ($t:ty) => {
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                for b in &self.0 {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}({self})", stringify!($t))
            }
        }
    };
}
hex_id!(PartitionId);

impl PartitionId {
    pub fn random() -> Self {
        PartitionId(rand::random())
    }
}

impl KeyId {
    pub fn random() -> Self {
        KeyId(rand::random())
    }
}
hex_id!(KeyId);

/// What a key is for. Stable wire values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum KeyKind {
    /// A customer's symmetric key.
    Symmetric = 1,
}

/// The algorithm a key is used with. Stable wire values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Algorithm {
    Aes256Gcm = 1,
}

/// (partition, key id, version, kind, algorithm): identical on every node, known before the LSN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyHeader {
    pub partition: PartitionId,
    pub key_id: KeyId,
    pub version: u32,
    pub kind: KeyKind,
    pub algorithm: Algorithm,
}

impl KeyHeader {
    /// A symmetric AES-256-GCM key header.
    pub fn aes(partition: PartitionId, key_id: KeyId, version: u32) -> Self {
        KeyHeader {
            partition,
            key_id,
            version,
            kind: KeyKind::Symmetric,
            algorithm: Algorithm::Aes256Gcm,
        }
    }

    /// `format(1) ‖ partition(16) ‖ key id(16) ‖ version u32 ‖ kind(1) ‖ algorithm(1)` = 39 bytes.
    pub fn encode(&self) -> [u8; KEY_HEADER_LEN] {
        let mut b = [0u8; KEY_HEADER_LEN];
        b[0] = FORMAT_VERSION;
        b[1..17].copy_from_slice(&self.partition.0);
        b[17..33].copy_from_slice(&self.key_id.0);
        b[33..37].copy_from_slice(&self.version.to_le_bytes());
        b[37] = self.kind as u8;
        b[38] = self.algorithm as u8;
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != KEY_HEADER_LEN || b[0] != FORMAT_VERSION {
            return Err(CardError::corrupt("key header", "length or version"));
        }
        let kind = match b[37] {
            1 => KeyKind::Symmetric,
            k => return Err(CardError::corrupt("key header", format!("kind {k}"))),
        };
        let algorithm = match b[38] {
            1 => Algorithm::Aes256Gcm,
            a => return Err(CardError::corrupt("key header", format!("algorithm {a}"))),
        };
        Ok(KeyHeader {
            partition: PartitionId(b[1..17].try_into().unwrap()),
            key_id: KeyId(b[17..33].try_into().unwrap()),
            version: u32::from_le_bytes(b[33..37].try_into().unwrap()),
            kind,
            algorithm,
        })
    }

    pub fn key_ref(&self) -> KeyRef {
        KeyRef {
            partition: self.partition,
            key_id: self.key_id,
            version: self.version,
        }
    }
}

/// The identity of one key version (cache and delete key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyRef {
    pub partition: PartitionId,
    pub key_id: KeyId,
    pub version: u32,
}

impl std::fmt::Display for KeyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "key {} v{} in partition {}",
            self.key_id, self.version, self.partition
        )
    }
}

/// Which partition key a blob is wrapped under. Stable wire values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum WrappedUnder {
    /// The partition masking key: replication, snapshots.
    MaskingKey = 1,
    /// The partition backup KBK: single-key user backups.
    BackupKbk = 2,
}

/// A masked blob (or a single-key backup):
/// `"KFMB" ‖ format(1) ‖ under(1) ‖ key header(39) ‖ wrapped key(40) ‖ HMAC-SHA256(32)` = 117
/// bytes; the HMAC, made in the card with the partition HMAC key, covers every byte before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaskedBlob {
    pub header: KeyHeader,
    pub under: WrappedUnder,
    pub wrapped: [u8; WRAPPED_KEY_LEN],
    pub mac: [u8; MAC_LEN],
}

pub const MASKED_BLOB_LEN: usize = 4 + 1 + 1 + KEY_HEADER_LEN + WRAPPED_KEY_LEN + MAC_LEN;

impl MaskedBlob {
    /// The bytes the HMAC covers.
    pub fn authenticated(
        header: &KeyHeader,
        under: WrappedUnder,
        wrapped: &[u8; WRAPPED_KEY_LEN],
    ) -> Vec<u8> {
        let mut b = Vec::with_capacity(MASKED_BLOB_LEN);
        b.extend_from_slice(MAGIC_BLOB);
        b.push(FORMAT_VERSION);
        b.push(under as u8);
        b.extend_from_slice(&header.encode());
        b.extend_from_slice(wrapped);
        b
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Self::authenticated(&self.header, self.under, &self.wrapped);
        b.extend_from_slice(&self.mac);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != MASKED_BLOB_LEN {
            return Err(CardError::corrupt(
                "masked blob",
                format!("length {}", b.len()),
            ));
        }
        if &b[0..4] != MAGIC_BLOB || b[4] != FORMAT_VERSION {
            return Err(CardError::corrupt("masked blob", "magic or version"));
        }
        let under = match b[5] {
            1 => WrappedUnder::MaskingKey,
            2 => WrappedUnder::BackupKbk,
            u => {
                return Err(CardError::corrupt(
                    "masked blob",
                    format!("wrapped-under {u}"),
                ))
            }
        };
        let header = KeyHeader::decode(&b[6..6 + KEY_HEADER_LEN])?;
        let o = 6 + KEY_HEADER_LEN;
        Ok(MaskedBlob {
            header,
            under,
            wrapped: b[o..o + WRAPPED_KEY_LEN].try_into().unwrap(),
            mac: b[o + WRAPPED_KEY_LEN..].try_into().unwrap(),
        })
    }
}

/// A partition config: `"KFPC" ‖ format(1) ‖ partition(16) ‖ vendor fp(16) ‖ adapter fp(16) ‖
/// masking(40) ‖ hmac(40) ‖ credential(40) ‖ backup(40) ‖ HMAC-SHA256(32)` = 245 bytes; the four
/// keys are wrapped under the adapter KBK, the HMAC is made with the partition HMAC key.
///
/// It may be followed by a [`PolicyTrailer`] (38 bytes, 283 in all) carrying the partition's
/// policy flags; without one the partition has no flags (configs made before policies, byte
/// for byte).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionConfig {
    pub partition: PartitionId,
    pub vendor: Fingerprint,
    pub adapter: Fingerprint,
    pub masking: [u8; WRAPPED_KEY_LEN],
    pub hmac: [u8; WRAPPED_KEY_LEN],
    pub credential: [u8; WRAPPED_KEY_LEN],
    pub backup: [u8; WRAPPED_KEY_LEN],
    pub mac: [u8; MAC_LEN],
    /// The policy trailer, when the config has one.
    pub policy: Option<PolicyTrailer>,
}

/// The partition config without a policy trailer.
pub const PARTITION_CONFIG_LEN: usize = 4 + 1 + 16 * 3 + WRAPPED_KEY_LEN * 4 + MAC_LEN;
/// A partition config followed by its policy trailer.
pub const PARTITION_CONFIG_WITH_POLICY_LEN: usize = PARTITION_CONFIG_LEN + POLICY_TRAILER_LEN;

impl PartitionConfig {
    /// The bytes the config HMAC covers (never the trailer).
    pub fn authenticated(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(PARTITION_CONFIG_LEN);
        b.extend_from_slice(MAGIC_CONFIG);
        b.push(FORMAT_VERSION);
        b.extend_from_slice(&self.partition.0);
        b.extend_from_slice(&self.vendor.0);
        b.extend_from_slice(&self.adapter.0);
        for w in [&self.masking, &self.hmac, &self.credential, &self.backup] {
            b.extend_from_slice(w);
        }
        b
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.authenticated();
        b.extend_from_slice(&self.mac);
        if let Some(t) = &self.policy {
            b.extend_from_slice(&t.encode());
        }
        b
    }

    /// The policy the config states (no trailer: no flags). The trailer's MAC is checked by
    /// the card at import, not here.
    pub fn policy(&self) -> PartitionPolicy {
        self.policy
            .as_ref()
            .map(PolicyTrailer::policy)
            .unwrap_or_default()
    }

    /// Decodes a config of [`PARTITION_CONFIG_LEN`] or [`PARTITION_CONFIG_WITH_POLICY_LEN`]
    /// bytes; anything else, a bad magic or version, or a trailer with unknown flag bits is
    /// `Corrupt`.
    pub fn decode(b: &[u8]) -> Result<Self> {
        let policy = match b.len() {
            PARTITION_CONFIG_LEN => None,
            PARTITION_CONFIG_WITH_POLICY_LEN => {
                Some(PolicyTrailer::decode(&b[PARTITION_CONFIG_LEN..])?)
            }
            n => {
                return Err(CardError::corrupt(
                    "partition config",
                    format!("length {n}"),
                ))
            }
        };
        if &b[0..4] != MAGIC_CONFIG || b[4] != FORMAT_VERSION {
            return Err(CardError::corrupt("partition config", "magic or version"));
        }
        let w = |i: usize| -> [u8; WRAPPED_KEY_LEN] {
            let o = 53 + i * WRAPPED_KEY_LEN;
            b[o..o + WRAPPED_KEY_LEN].try_into().unwrap()
        };
        Ok(PartitionConfig {
            partition: PartitionId(b[5..21].try_into().unwrap()),
            vendor: Fingerprint(b[21..37].try_into().unwrap()),
            adapter: Fingerprint(b[37..53].try_into().unwrap()),
            masking: w(0),
            hmac: w(1),
            credential: w(2),
            backup: w(3),
            mac: b[PARTITION_CONFIG_LEN - MAC_LEN..PARTITION_CONFIG_LEN]
                .try_into()
                .unwrap(),
            policy,
        })
    }
}

/// Partition policy flag bits (the trailer's `flags` byte). Stable values.
pub mod policy_flags {
    /// Clients of the partition must present a TLS client certificate naming it
    /// (`p-<partition hex>.<cluster hex>.keyfort`) besides their credential.
    pub const REQUIRE_CLIENT_CERT: u8 = 1 << 0;
    /// Every bit defined; any other is refused.
    pub const KNOWN: u8 = REQUIRE_CLIENT_CERT;
}

/// Format version of the policy trailer.
pub const POLICY_FORMAT_VERSION: u8 = 1;
/// `"KFPP" ‖ format(1) ‖ flags(1) ‖ HMAC-SHA256(32)`.
pub const POLICY_TRAILER_LEN: usize = 4 + 1 + 1 + MAC_LEN;

/// What a partition's policy asks of its clients. The default is no flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PartitionPolicy {
    /// [`policy_flags::REQUIRE_CLIENT_CERT`].
    pub require_client_cert: bool,
}

impl PartitionPolicy {
    pub fn flags(&self) -> u8 {
        if self.require_client_cert {
            policy_flags::REQUIRE_CLIENT_CERT
        } else {
            0
        }
    }

    /// The policy of a flags byte; unknown bits are `Corrupt`.
    pub fn from_flags(flags: u8) -> Result<Self> {
        if flags & !policy_flags::KNOWN != 0 {
            return Err(CardError::corrupt(
                "partition policy",
                format!("unknown flag bits {:#04x}", flags & !policy_flags::KNOWN),
            ));
        }
        Ok(PartitionPolicy {
            require_client_cert: flags & policy_flags::REQUIRE_CLIENT_CERT != 0,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.flags() == 0
    }
}

/// The policy trailer of a partition config: `"KFPP" ‖ format(1) ‖ flags(1) ‖
/// HMAC-SHA256(32)` = 38 bytes. The HMAC, made in the card with the partition HMAC key, covers
/// `config HMAC(32) ‖ "KFPP" ‖ format(1) ‖ flags(1)`: the trailer belongs to that one config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyTrailer {
    pub flags: u8,
    pub mac: [u8; MAC_LEN],
}

impl PolicyTrailer {
    /// The bytes the trailer HMAC covers.
    pub fn authenticated(config_mac: &[u8; MAC_LEN], flags: u8) -> Vec<u8> {
        let mut b = Vec::with_capacity(MAC_LEN + 6);
        b.extend_from_slice(config_mac);
        b.extend_from_slice(MAGIC_POLICY);
        b.push(POLICY_FORMAT_VERSION);
        b.push(flags);
        b
    }

    pub fn encode(&self) -> [u8; POLICY_TRAILER_LEN] {
        let mut b = [0u8; POLICY_TRAILER_LEN];
        b[0..4].copy_from_slice(MAGIC_POLICY);
        b[4] = POLICY_FORMAT_VERSION;
        b[5] = self.flags;
        b[6..].copy_from_slice(&self.mac);
        b
    }

    /// Length, magic, version and flag bits; the MAC is the card's to check.
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != POLICY_TRAILER_LEN {
            return Err(CardError::corrupt(
                "partition policy",
                format!("length {}", b.len()),
            ));
        }
        if &b[0..4] != MAGIC_POLICY || b[4] != POLICY_FORMAT_VERSION {
            return Err(CardError::corrupt("partition policy", "magic or version"));
        }
        PartitionPolicy::from_flags(b[5])?;
        Ok(PolicyTrailer {
            flags: b[5],
            mac: b[6..].try_into().unwrap(),
        })
    }

    pub fn policy(&self) -> PartitionPolicy {
        // Known bits only: decode refused any other.
        PartitionPolicy {
            require_client_cert: self.flags & policy_flags::REQUIRE_CLIENT_CERT != 0,
        }
    }
}

/// The cluster integrity key as kept in the cluster config record: `"KFIK" ‖ format(1) ‖ vendor
/// fp(16) ‖ adapter fp(16) ‖ key wrapped under the adapter KBK(40) ‖ HMAC-SHA256(32)` = 109
/// bytes; the HMAC is made with the integrity key itself over every byte before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedIntegrityKey {
    pub vendor: Fingerprint,
    pub adapter: Fingerprint,
    pub wrapped: [u8; WRAPPED_KEY_LEN],
    pub mac: [u8; MAC_LEN],
}

pub const INTEGRITY_KEY_LEN: usize = 4 + 1 + 32 + WRAPPED_KEY_LEN + MAC_LEN;

impl WrappedIntegrityKey {
    pub fn authenticated(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(INTEGRITY_KEY_LEN);
        b.extend_from_slice(MAGIC_INTEGRITY);
        b.push(FORMAT_VERSION);
        b.extend_from_slice(&self.vendor.0);
        b.extend_from_slice(&self.adapter.0);
        b.extend_from_slice(&self.wrapped);
        b
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.authenticated();
        b.extend_from_slice(&self.mac);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != INTEGRITY_KEY_LEN {
            return Err(CardError::corrupt(
                "integrity key",
                format!("length {}", b.len()),
            ));
        }
        if &b[0..4] != MAGIC_INTEGRITY || b[4] != FORMAT_VERSION {
            return Err(CardError::corrupt("integrity key", "magic or version"));
        }
        Ok(WrappedIntegrityKey {
            vendor: Fingerprint(b[5..21].try_into().unwrap()),
            adapter: Fingerprint(b[21..37].try_into().unwrap()),
            wrapped: b[37..77].try_into().unwrap(),
            mac: b[77..].try_into().unwrap(),
        })
    }
}

/// GCM IV length and tag length.
pub const IV_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// `"KFEV" ‖ format(1) ‖ partition(16) ‖ key id(16) ‖ version u32 ‖ IV(12)`.
pub const ENVELOPE_HEADER_LEN: usize = 4 + 1 + 16 + 16 + 4 + IV_LEN;

/// An AES-256-GCM envelope: header ‖ ciphertext ‖ tag(16). The GCM AAD is
/// `header ‖ caller AAD`, so the key id, version and IV are authenticated with the data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub key: KeyRef,
    pub iv: [u8; IV_LEN],
    /// Ciphertext followed by the 16-byte tag.
    pub sealed: &'a [u8],
}

impl Envelope<'_> {
    pub fn header(key: &KeyRef, iv: &[u8; IV_LEN]) -> [u8; ENVELOPE_HEADER_LEN] {
        let mut b = [0u8; ENVELOPE_HEADER_LEN];
        b[0..4].copy_from_slice(MAGIC_ENVELOPE);
        b[4] = FORMAT_VERSION;
        b[5..21].copy_from_slice(&key.partition.0);
        b[21..37].copy_from_slice(&key.key_id.0);
        b[37..41].copy_from_slice(&key.version.to_le_bytes());
        b[41..53].copy_from_slice(iv);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Envelope<'_>> {
        if b.len() < ENVELOPE_HEADER_LEN + TAG_LEN {
            return Err(CardError::corrupt(
                "envelope",
                format!("length {}", b.len()),
            ));
        }
        if &b[0..4] != MAGIC_ENVELOPE || b[4] != FORMAT_VERSION {
            return Err(CardError::corrupt("envelope", "magic or version"));
        }
        Ok(Envelope {
            key: KeyRef {
                partition: PartitionId(b[5..21].try_into().unwrap()),
                key_id: KeyId(b[21..37].try_into().unwrap()),
                version: u32::from_le_bytes(b[37..41].try_into().unwrap()),
            },
            iv: b[41..53].try_into().unwrap(),
            sealed: &b[ENVELOPE_HEADER_LEN..],
        })
    }
}
