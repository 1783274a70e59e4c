//! `keyfort`: the operator's CLI.

use clap::{Parser, Subcommand};
use keyfort_tools::{
    card::CardCmd, cluster_cmd::ClusterCmd, snapshot_cmd::SnapshotCmd, wbl_cmd::WblCmd,
};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "keyfort",
    version,
    about = "keyfort: HSM-backed replicated key store"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Provision and inspect cards (HSM tokens): the ceremony.
    Card {
        #[command(subcommand)]
        cmd: CardCmd,
    },
    /// Make a cluster and bootstrap its initial members' data dirs.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// The cluster CA: client certificates, revocation, probing a node's TLS.
    Tls {
        #[command(subcommand)]
        cmd: keyfort_tools::tls_cmd::TlsCmd,
    },
    /// Offline tools for a write-behind log directory.
    Wbl {
        #[command(subcommand)]
        cmd: WblCmd,
    },
    /// Offline tools for a snapshot file.
    Snapshot {
        #[command(subcommand)]
        cmd: SnapshotCmd,
    },
    /// Partitions (admin credential): create, delete, issue client credentials.
    Partition {
        #[command(subcommand)]
        cmd: keyfort_tools::client_cmd::PartitionCmd,
    },
    /// Keys of the credential's partition.
    Key {
        #[command(subcommand)]
        cmd: keyfort_tools::client_cmd::KeyCmd,
    },
    /// Encrypt `--in` under a key's current version (AES-256-GCM in the card).
    Encrypt(keyfort_tools::client_cmd::UseIo),
    /// Decrypt an envelope made by `encrypt`.
    Decrypt(keyfort_tools::client_cmd::UseIo),
    /// A fresh data key: plaintext (hex) on stdout, sealed under the key to `--out`.
    DataKey {
        #[command(flatten)]
        io: keyfort_tools::client_cmd::UseIo,
        #[arg(long, default_value_t = 32)]
        len: u8,
    },
    /// Restore a whole cluster from the durable store into new data dirs (the durable tier).
    Restore(keyfort_tools::restore::RestoreArgs),
    /// Time every recovery tier on a local cluster: local, peer, durable, full replay.
    Drill(keyfort_tools::drill::DrillArgs),
    /// Run the README's main job on the embedded defaults.
    Demo(keyfort_tools::demo::DemoArgs),
    /// The demo's WBL writer child (killed by the demo; not for operators).
    #[command(hide = true)]
    DemoWblWriter(keyfort_tools::demo::WriterArgs),
    /// The demo's snapshot drill writer child (killed by the demo; not for operators).
    #[command(hide = true)]
    DemoShardWriter(keyfort_tools::demo_snapshot::ShardWriterArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Card { cmd } => keyfort_tools::card::run(cmd),
        Cmd::Cluster { cmd } => keyfort_tools::cluster_cmd::run(cmd),
        Cmd::Tls { cmd } => keyfort_tools::tls_cmd::run(cmd),
        Cmd::Wbl { cmd } => keyfort_tools::wbl_cmd::run(cmd),
        Cmd::Snapshot { cmd } => keyfort_tools::snapshot_cmd::run(cmd),
        Cmd::Partition { cmd } => keyfort_tools::client_cmd::partition(cmd),
        Cmd::Key { cmd } => keyfort_tools::client_cmd::key(cmd),
        Cmd::Encrypt(io) => keyfort_tools::client_cmd::encrypt(io),
        Cmd::Decrypt(io) => keyfort_tools::client_cmd::decrypt(io),
        Cmd::DataKey { io, len } => keyfort_tools::client_cmd::data_key(io, len),
        Cmd::Restore(a) => keyfort_tools::restore::run(a),
        Cmd::Drill(a) => keyfort_tools::drill::run(a),
        Cmd::Demo(a) => keyfort_tools::demo::run(a),
        Cmd::DemoWblWriter(a) => keyfort_tools::demo::writer(a),
        Cmd::DemoShardWriter(a) => keyfort_tools::demo_snapshot::shard_writer(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("keyfort: {msg}");
            ExitCode::FAILURE
        }
    }
}
