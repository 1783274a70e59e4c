//! What the load generator drives: a [`Target`] (keyfort through its client protocol, or etcd
//! through its gRPC client for the side-by-side runs) started one [`Op`] at a time, pipelined,
//! each answer awaited later through its [`Ticket`]. The generator owns schedules, key choice
//! and histograms; a target owns connections and the mapping of an operation to its requests.
//!
//! Key numbering: keys `0..preloaded` exist before the run ([`Target::preload`]); the generator
//! numbers the keys it creates during the run from `preloaded` upwards, so a target can map a
//! number to its own key id (keyfort: the id its create answered; etcd: a key name).

use std::time::{Duration, Instant};

/// One operation a workload asks a target for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Make key number `key` (a number never used before in this run).
    /// keyfort: KeyCreate (through raft and the card); etcd: a put of a new key whose value has
    /// the run's value size.
    Create { key: u64 },
    /// Use key `key` forward. keyfort: encrypt a plaintext of the run's value size; etcd: a
    /// linearizable get of the key.
    Encrypt { key: u64 },
    /// Use key `key` backward. keyfort: decrypt a ciphertext made under the key beforehand;
    /// etcd: a linearizable get of the key.
    Decrypt { key: u64 },
    /// Delete key `key` (created before, not yet deleted). keyfort: KeyDelete; etcd: a delete.
    Delete { key: u64 },
}

impl Op {
    /// The operation's name in tables, JSON and per-operation histograms.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Encrypt { .. } => "encrypt",
            Op::Decrypt { .. } => "decrypt",
            Op::Delete { .. } => "delete",
        }
    }
}

/// The pending answer of one started operation.
pub trait Ticket: Send {
    /// Waits up to `timeout` for the answer. Returns its outcome (`Err`: the error's name, the
    /// key it is counted under, e.g. `Overloaded`, `Timeout`, `Unavailable`) and the instant the
    /// answer arrived as the client's reader saw it (`None`: no answer arrived).
    fn wait(self: Box<Self>, timeout: Duration) -> (Result<(), String>, Option<Instant>);
}

/// A system under load.
pub trait Target: Send + Sync {
    /// "keyfort" or "etcd": the name results are filed under.
    fn name(&self) -> &str;
    /// How many connections the target holds; the generator spreads operations over them.
    fn connections(&self) -> usize;
    /// Creates keys `0..keys` before the run (and, for keyfort, a ciphertext under each for
    /// [`Op::Decrypt`]). Blocking; not measured.
    fn preload(&self, keys: u64) -> Result<(), String>;
    /// Starts `op` on connection `conn % connections()` without waiting for its answer.
    /// `Err`: refused before it was sent (the error's name).
    fn start(&self, conn: usize, op: Op) -> Result<Box<dyn Ticket>, String>;
}
