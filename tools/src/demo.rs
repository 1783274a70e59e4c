//! `keyfort demo`: the README's main job on the embedded defaults.

pub fn run() -> crate::CmdResult {
    Ok(())
}
