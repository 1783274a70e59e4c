//! `keyfort wbl ...`: offline verification and dump of a write-behind log (owned by the WBL work).

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum WblCmd {}

pub fn run(cmd: WblCmd) -> crate::CmdResult {
    match cmd {}
}
