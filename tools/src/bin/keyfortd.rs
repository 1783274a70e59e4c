//! `keyfortd`: one keyfort node (see `keyfort_tools::node`): its card, its shards' raft
//! replicas over their logs, the authenticated peer transport and the client server. SIGTERM
//! (or SIGINT) shuts it down gracefully. `--profile-svg FILE` samples the node's CPU time
//! (`keyfort-perf`, perf/README.md) and writes a flamegraph on shutdown and on every SIGUSR2.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "keyfortd", version, about = "keyfort node")]
struct Args {
    /// The node's config file (JSON; docs/operations.md "Running a node").
    #[arg(long)]
    config: PathBuf,
    /// Profile the node in process (999 Hz) and write a flamegraph SVG here when it shuts
    /// down, and the profile so far whenever it receives SIGUSR2 (perf/README.md).
    #[arg(long, value_name = "FILE")]
    profile_svg: Option<PathBuf>,
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
    let run = || keyfort_tools::node::run(&args.config);
    match keyfort_perf::run_profiled("keyfortd", args.profile_svg.as_deref(), true, run)
        .and_then(|r| r)
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("keyfortd: {msg}");
            ExitCode::FAILURE
        }
    }
}
