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
        Cmd::Wbl { cmd } => keyfort_tools::wbl_cmd::run(cmd),
        Cmd::Snapshot { cmd } => keyfort_tools::snapshot_cmd::run(cmd),
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
