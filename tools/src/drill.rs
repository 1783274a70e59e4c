//! `keyfort drill` (issue 7). Being written.

#[derive(Debug, clap::Args)]
pub struct DrillArgs {
    /// Keys to load before the faults.
    #[arg(long, default_value_t = 1_000_000)]
    pub keys: u64,
}

pub fn run(_args: DrillArgs) -> crate::CmdResult {
    Err("keyfort drill: not built yet".into())
}
