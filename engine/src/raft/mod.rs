//! Replication: one raft-rs group per shard over the write-behind log.
//!
//! The decisions live in [`core::ShardCore`], a sans-IO wrapper of `raft::RawNode` that
//! persists through a [`store::LogStore`], applies committed entries to the shard's
//! [`StateMachine`](crate::state::StateMachine) and hands messages back to its caller. Two
//! stores implement the trait: [`wbl_store::WblStore`] (the WBL: direct I/O, group commit,
//! persistence reported when the batch's write is durable) and [`store::MemLog`] (memory,
//! persistence completed when the caller says so, for the deterministic simulation tests).
//!
//! Entries map one to one onto WBL records: raft index = LSN, raft term = record term.
//! See [`entry`] and docs/format.md §4.11.

pub mod conf;
pub mod core;
pub mod driver;
pub mod entry;
pub mod snapshot;
pub mod store;
pub mod wbl_store;

pub use self::core::{CoreConfig, CoreError, Event, ProposeError, ShardCore};
pub use driver::{Applied, Committed, Replica, ReplicaError, SnapshotSetup, Stalls, Transport};
pub use entry::{entry_of, proposal_data, record_of, EntryError};
pub use store::{LogStore, MemLog};
pub use wbl_store::WblStore;

/// Election timeout in ticks (raft-rs randomizes it in `[ELECTION_TICKS, 2 × ELECTION_TICKS)`).
pub const ELECTION_TICKS: usize = 10;
/// Heartbeat interval in ticks.
pub const HEARTBEAT_TICKS: usize = 2;
/// Most bytes of entries in one append message.
pub const MAX_SIZE_PER_MSG: u64 = 128 << 10;
/// Most append messages in flight to one follower. With [`MAX_SIZE_PER_MSG`] this bounds what
/// a leader sends a follower ahead of its acknowledgements to 4 MiB — about 28,000 entries of
/// 150 B, under what the follower takes unpersisted ([`APPEND_BACKLOG_MAX`]), so a follower
/// catching up is not sent appends it must drop (each drop costs a probe round trip and a resend).
pub const MAX_INFLIGHT_MSGS: usize = 32;
/// Most entries a replica holds unpersisted (past raft's persisted index: staged in the WBL
/// queue or waiting to be) before it drops incoming appends: half the WBL's append queue
/// (`wbl::MAX_PENDING_RECORDS`), which an append beyond would overflow — a follower catching up
/// is sent far more (`MAX_INFLIGHT_MSGS` × `MAX_SIZE_PER_MSG`). An append to an empty backlog is
/// always taken, so a single large message is never refused forever.
pub const APPEND_BACKLOG_MAX: usize = crate::wbl::MAX_PENDING_RECORDS / 2;
/// Replicas keep the state digest after each of their last this-many applied entries, so a
/// checkpoint naming an LSN within that window is checked.
pub const DIGEST_HISTORY: usize = 4096;

/// raft-rs logs through `slog`; this drain forwards its records to `tracing` (target `raft`),
/// with the logger's key-values appended to the message.
struct TracingDrain;

struct KvText(String);

impl slog::Serializer for KvText {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments) -> slog::Result {
        use std::fmt::Write;
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        use slog::KV;
        let mut kv = KvText(String::new());
        let _ = record.kv().serialize(record, &mut kv);
        let _ = values.serialize(record, &mut kv);
        let msg = format!("{}{}", record.msg(), kv.0);
        match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::error!(target: "raft", "{msg}"),
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}"),
            slog::Level::Info => tracing::info!(target: "raft", "{msg}"),
            slog::Level::Debug => tracing::debug!(target: "raft", "{msg}"),
            slog::Level::Trace => tracing::trace!(target: "raft", "{msg}"),
        }
        Ok(())
    }
}

/// The logger handed to raft-rs for one shard replica.
pub fn raft_logger(shard: u32, node: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!("shard" => shard, "node" => node))
}
