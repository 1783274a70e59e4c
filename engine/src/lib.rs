//! keyfort-engine: the write-behind log, and (in later issues) the state machine, snapshots and
//! recovery tiers. Everything here runs on glommio executors built by [`exec`].

pub mod archive;
pub mod cluster;
pub mod compaction;
pub mod exec;
pub mod manifest;
pub mod raft;
pub mod recovery;
pub mod snapshot;
pub mod state;
pub mod wbl;
