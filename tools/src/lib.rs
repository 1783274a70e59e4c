//! keyfort-tools: the `keyfortd` node and the `keyfort` CLI. Each subcommand family lives in its
//! own module; the binaries only parse arguments and dispatch.

pub mod archive;
pub mod backup;
pub mod card;
pub mod client_cmd;
pub mod cluster_cmd;
pub mod demo;
pub mod demo_cluster;
pub mod demo_snapshot;
pub mod drill;
pub mod durable;
pub mod join;
pub mod metrics;
pub mod node;
pub mod pki;
pub mod recovery_report;
pub mod restore;
pub mod service;
pub mod signals;
pub mod snapshot_cmd;
pub mod tls_cmd;
pub mod wbl_cmd;

/// Outcome of a CLI subcommand: `Err` carries the one-line message printed before a non-zero exit.
pub type CmdResult = Result<(), String>;
