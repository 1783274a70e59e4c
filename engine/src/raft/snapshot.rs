//! Raft snapshots are keyfort snapshot files: the raft `Snapshot` message carries only a
//! [`SnapshotDescriptor`] (docs/format.md §4.12); the follower fetches the file from the
//! sender through a [`SnapshotSource`] (the peer transport), verifies it (every section check,
//! then the footer MAC in its card), and only then resets its log to the snapshot's position and
//! steps the message into raft.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;

/// "KFSD".
pub const DESCRIPTOR_MAGIC: [u8; 4] = *b"KFSD";
pub const DESCRIPTOR_VERSION: u8 = 1;
/// magic 4, version 1, reserved 3, shard 4, lsn 8, term 8, size 8, digest 16, crc32c 4.
pub const DESCRIPTOR_BYTES: usize = 64;

/// Which snapshot file a raft snapshot message stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotDescriptor {
    pub shard: u32,
    pub lsn: u64,
    pub term: u64,
    /// File size in bytes.
    pub size: u64,
    /// The state digest in the file's footer.
    pub digest: [u8; 16],
}

/// Opens a fetched snapshot file with every check (on the blocking pool), verifies its footer
/// MAC in the card, and checks it is the file `desc` names: what a follower installing a raft
/// snapshot and a joiner seeding a shard both do before trusting a file from a peer.
pub async fn verify_fetched(
    path: &Path,
    desc: &SnapshotDescriptor,
    mac: &dyn crate::snapshot::FooterMac,
) -> Result<crate::snapshot::Snapshot, String> {
    let p = path.to_path_buf();
    let mut file = crate::exec::spawn_background_blocking(move || {
        crate::snapshot::Snapshot::open_without_mac(&p)
    })
    .await
    .map_err(|e| e.to_string())?;
    file.verify_mac(mac).map_err(|e| e.to_string())?;
    if SnapshotDescriptor::of(desc.shard, &file) != *desc {
        return Err(format!(
            "fetched snapshot does not match its descriptor {desc:?}"
        ));
    }
    Ok(file)
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    #[error("snapshot descriptor: {len} bytes, expected {DESCRIPTOR_BYTES}")]
    Length { len: usize },
    #[error("snapshot descriptor: bad magic")]
    BadMagic,
    #[error("snapshot descriptor: unsupported version {0}")]
    BadVersion(u8),
    #[error("snapshot descriptor: checksum mismatch")]
    BadChecksum,
}

impl SnapshotDescriptor {
    pub fn encode(&self) -> [u8; DESCRIPTOR_BYTES] {
        let mut b = [0u8; DESCRIPTOR_BYTES];
        b[0..4].copy_from_slice(&DESCRIPTOR_MAGIC);
        b[4] = DESCRIPTOR_VERSION;
        b[8..12].copy_from_slice(&self.shard.to_le_bytes());
        b[12..20].copy_from_slice(&self.lsn.to_le_bytes());
        b[20..28].copy_from_slice(&self.term.to_le_bytes());
        b[28..36].copy_from_slice(&self.size.to_le_bytes());
        b[36..52].copy_from_slice(&self.digest);
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<SnapshotDescriptor, DescriptorError> {
        if b.len() != DESCRIPTOR_BYTES {
            return Err(DescriptorError::Length { len: b.len() });
        }
        if b[0..4] != DESCRIPTOR_MAGIC {
            return Err(DescriptorError::BadMagic);
        }
        if b[4] != DESCRIPTOR_VERSION {
            return Err(DescriptorError::BadVersion(b[4]));
        }
        let crc = u32::from_le_bytes(b[60..64].try_into().expect("4 bytes"));
        if crc != crc32c::crc32c(&b[..60]) {
            return Err(DescriptorError::BadChecksum);
        }
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        Ok(SnapshotDescriptor {
            shard: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            lsn: u64_at(12),
            term: u64_at(20),
            size: u64_at(28),
            digest: b[36..52].try_into().expect("16 bytes"),
        })
    }

    /// The descriptor of an open snapshot file of `shard`.
    pub fn of(shard: u32, snap: &crate::snapshot::Snapshot) -> SnapshotDescriptor {
        SnapshotDescriptor {
            shard,
            lsn: snap.lsn(),
            term: snap.footer().term,
            size: snap.file_bytes(),
            digest: snap.digest().to_bytes(),
        }
    }
}

/// Fetches snapshot files from peers (the peer transport's snapshot streaming in a node, a
/// file copy in tests).
pub trait SnapshotSource {
    /// Fetches the file `desc` names from node `from` into `dest` (durably). The caller
    /// verifies it.
    fn fetch<'a>(
        &'a self,
        from: u64,
        desc: &'a SnapshotDescriptor,
        dest: &'a Path,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + 'a>>;
}
