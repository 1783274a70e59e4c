//! `keyfort card ...`: the ceremony and card inspection (owned by the card work).

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum CardCmd {}

pub fn run(cmd: CardCmd) -> crate::CmdResult {
    match cmd {}
}
