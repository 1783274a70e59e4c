//! raft entries ⟷ WBL records.
//!
//! | raft entry                         | WBL record kind      | record payload          |
//! |------------------------------------|----------------------|-------------------------|
//! | normal, empty data (leader no-op)  | `RaftNoop`           | empty                   |
//! | normal, data = kind ‖ payload      | the state kind       | payload                 |
//! | conf change                        | `RaftConfChange`     | the protobuf bytes      |
//! | conf change v2                     | `RaftConfChangeV2`   | the protobuf bytes      |
//!
//! A proposal's data is one byte of [`RecordKind`] (a state kind: cluster config through
//! checkpoint) followed by the state-machine payload, so the record kind travels with the entry
//! and the WBL stores exactly the bytes the state machine decodes. Entry contexts are unused and
//! must be empty.

use crate::wbl::RecordKind;
use raft::eraftpb::{Entry, EntryType};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("entry {index}: non-empty context ({len} bytes); keyfort proposes none")]
    Context { index: u64, len: usize },
    #[error("entry {index}: normal entry names record kind {kind}, not a state kind")]
    NotStateKind { index: u64, kind: u8 },
    #[error("record {lsn}: kind {kind:?} is never a raft entry")]
    NotRaftRecord { lsn: u64, kind: RecordKind },
}

/// Whether `kind` is one a client or the cluster proposes (it carries a state payload).
pub fn is_state_kind(kind: RecordKind) -> bool {
    (kind as u8) >= RecordKind::ClusterConfig as u8
}

/// The data of a proposal of `kind` with `payload`.
pub fn proposal_data(kind: RecordKind, payload: &[u8]) -> Vec<u8> {
    debug_assert!(is_state_kind(kind));
    let mut d = Vec::with_capacity(1 + payload.len());
    d.push(kind as u8);
    d.extend_from_slice(payload);
    d
}

/// The record a raft entry is stored as: its kind and payload.
pub fn record_of(e: &Entry) -> Result<(RecordKind, &[u8]), EntryError> {
    if !e.context.is_empty() {
        return Err(EntryError::Context {
            index: e.index,
            len: e.context.len(),
        });
    }
    let data = e.get_data();
    match e.get_entry_type() {
        EntryType::EntryConfChange => Ok((RecordKind::RaftConfChange, data)),
        EntryType::EntryConfChangeV2 => Ok((RecordKind::RaftConfChangeV2, data)),
        EntryType::EntryNormal if data.is_empty() => Ok((RecordKind::RaftNoop, data)),
        EntryType::EntryNormal => match RecordKind::from_u8(data[0]) {
            Some(k) if is_state_kind(k) => Ok((k, &data[1..])),
            _ => Err(EntryError::NotStateKind {
                index: e.index,
                kind: data[0],
            }),
        },
    }
}

/// The raft entry a WBL record holds.
pub fn entry_of(
    kind: RecordKind,
    lsn: u64,
    term: u64,
    payload: &[u8],
) -> Result<Entry, EntryError> {
    let mut e = Entry {
        index: lsn,
        term,
        ..Default::default()
    };
    match kind {
        RecordKind::RaftNoop => {}
        RecordKind::RaftConfChange => {
            e.set_entry_type(EntryType::EntryConfChange);
            e.data = payload.to_vec().into();
        }
        RecordKind::RaftConfChangeV2 => {
            e.set_entry_type(EntryType::EntryConfChangeV2);
            e.data = payload.to_vec().into();
        }
        RecordKind::RaftNormal => return Err(EntryError::NotRaftRecord { lsn, kind }),
        k => e.data = proposal_data(k, payload).into(),
    }
    Ok(e)
}

/// Size counted for an entry against the message size limit and the entry cache budget: its
/// data and context plus a fixed overhead (an upper bound of its protobuf framing).
pub fn entry_size(e: &Entry) -> u64 {
    (e.data.len() + e.context.len() + 24) as u64
}

/// Entries `low..high` taken from `get`, stopping before the first one that would take their
/// total [`entry_size`] past `max_size` (always at least one, as raft-rs expects): the size
/// rule of every store's `Storage::entries`.
pub fn collect_within(
    low: u64,
    high: u64,
    max_size: Option<u64>,
    mut get: impl FnMut(u64) -> raft::Result<Entry>,
) -> raft::Result<Vec<Entry>> {
    let max = max_size.unwrap_or(u64::MAX);
    let mut out = Vec::new();
    let mut size = 0;
    for i in low..high {
        let e = get(i)?;
        size += entry_size(&e);
        if !out.is_empty() && size > max {
            break;
        }
        out.push(e);
    }
    Ok(out)
}
