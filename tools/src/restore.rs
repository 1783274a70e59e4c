//! `keyfort restore --from URL` (issue 7). Being written.

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// Durable store URL (`file:///dir`, a directory path, or `s3://bucket/prefix?endpoint=...`).
    #[arg(long)]
    pub from: String,
}

pub fn run(_args: RestoreArgs) -> crate::CmdResult {
    Err("keyfort restore: not built yet".into())
}
