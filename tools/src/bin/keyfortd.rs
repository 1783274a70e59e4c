//! `keyfortd`: one keyfort node. The node itself (raft per shard over the WBL, peers, clients)
//! arrives with the replication and service issues; until then it says so instead of pretending.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--version" || a == "-V") {
        println!("keyfortd {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "keyfortd: the node is not built yet (replication and service issues); \
         `keyfort demo` runs what exists: cards and the write-behind log"
    );
    ExitCode::from(2)
}
