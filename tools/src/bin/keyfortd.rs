//! `keyfortd`: one keyfort node (see `keyfort_tools::node`): its card, its shards' raft
//! replicas over their logs, the authenticated peer transport and the client server. SIGTERM
//! (or SIGINT) shuts it down gracefully.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "keyfortd", version, about = "keyfort node")]
struct Args {
    /// The node's config file (JSON; docs/operations.md "Running a node").
    #[arg(long)]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    keyfort_tools::signals::install();
    match keyfort_tools::node::run(&args.config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("keyfortd: {msg}");
            ExitCode::FAILURE
        }
    }
}
