//! `keyfort snapshot ...`: offline verification and inspection of a snapshot file. Both only
//! read the file. `verify` checks everything, the footer MAC included, in a card of the realm;
//! `inspect` runs every check except the MAC (no card needed) and says so.
//!
//! The PIN comes from `KEYFORT_PIN_FILE` (or `KEYFORT_PIN`), never from arguments.

use clap::Subcommand;
use keyfort_engine::snapshot::{Snapshot, SnapshotError};
use keyfort_hsm::CoreSession;
use std::path::{Path, PathBuf};

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Every check: footer crc and MAC (in the card), every block's crc, the chain, the index,
    /// counts and the state digest. Exit 0 only if all pass.
    Verify {
        file: PathBuf,
        /// The card's token directory.
        #[arg(long)]
        token_dir: PathBuf,
        /// The card's token label.
        #[arg(long)]
        label: String,
        /// The wrapped cluster integrity key (docs/format.md §2.4).
        #[arg(long)]
        integrity_key: PathBuf,
    },
    /// LSN, term, ConfState, counts, partitions, digest and sizes; every check but the MAC.
    Inspect { file: PathBuf },
}

pub fn run(cmd: SnapshotCmd) -> crate::CmdResult {
    match cmd {
        SnapshotCmd::Verify {
            file,
            token_dir,
            label,
            integrity_key,
        } => {
            let session = session(&token_dir, &label, &integrity_key)?;
            print!("{}", verify(&file, &session)?);
            Ok(())
        }
        SnapshotCmd::Inspect { file } => {
            print!("{}", inspect(&file)?);
            Ok(())
        }
    }
}

/// Opens a session on the card and loads the cluster integrity key into it.
pub(crate) fn session(
    token_dir: &Path,
    label: &str,
    integrity_key: &Path,
) -> Result<CoreSession, String> {
    let card = crate::card::open(token_dir, label)?;
    let mut session = card.session().map_err(|e| e.to_string())?;
    let key =
        std::fs::read(integrity_key).map_err(|e| format!("{}: {e}", integrity_key.display()))?;
    session
        .import_integrity_key(&key)
        .map_err(|e| format!("{}: {e}", integrity_key.display()))?;
    Ok(session)
}

/// The report of a fully verified file, or the defect.
pub fn verify(file: &Path, session: &CoreSession) -> Result<String, String> {
    let snap = Snapshot::open(file, session).map_err(describe)?;
    Ok(format!(
        "{}OK: footer MAC verified in the card\n",
        report(&snap)
    ))
}

/// The report of a file that passed every check but the MAC, or the defect.
pub fn inspect(file: &Path) -> Result<String, String> {
    let snap = Snapshot::open_without_mac(file).map_err(describe)?;
    Ok(format!(
        "{}MAC not checked (use `keyfort snapshot verify` with a card of the realm)\n",
        report(&snap)
    ))
}

fn describe(e: SnapshotError) -> String {
    match e {
        SnapshotError::Corrupt { file, offset, what } => format!(
            "corrupt snapshot: file {} offset {offset}: {what}",
            file.display()
        ),
        other => other.to_string(),
    }
}

fn report(snap: &Snapshot) -> String {
    let f = snap.footer();
    let data_bytes = f.index_offset;
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<20}{v}\n"));
    line("file", snap.path().display().to_string());
    line("lsn", f.lsn.to_string());
    line("term", f.term.to_string());
    line("voters", format!("{:?}", f.voters));
    line("learners", format!("{:?}", f.learners));
    line("wbl chain head", format!("{:016x}", f.chain_head));
    line("state digest", f.digest.to_string());
    line("keys", f.key_count.to_string());
    line("blocks", f.block_count.to_string());
    line("partitions", f.partition_count.to_string());
    line("idempotency", f.idempotency_count.to_string());
    line("idem window lsns", f.idempotency_window_lsns.to_string());
    line(
        "cluster config",
        match snap.cluster_config() {
            Some(c) => format!("{} bytes", c.len()),
            None => "none".into(),
        },
    );
    line("file bytes", snap.file_bytes().to_string());
    line("data block bytes", data_bytes.to_string());
    line("sections chain", format!("{:016x}", f.sections_chain));
    for (p, c) in snap.partitions() {
        line("partition", format!("{p} ({} config bytes)", c.len()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyfort_engine::snapshot::{self, SnapshotMeta};
    use keyfort_engine::state::{Op, StateMachine};
    use keyfort_hsm::softhsm::fixture;
    use keyfort_hsm::PartitionId;

    #[test]
    fn verify_and_inspect_report_a_good_file_and_name_the_defect_of_a_bad_one() {
        let card = fixture().new_card("toolvendor", "toolrealm").unwrap();
        let mut session = card.session().unwrap();
        session.create_integrity_key().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut s = StateMachine::new();
        let op = Op::PartitionCreate {
            partition: PartitionId([5; 16]),
            config: vec![1; 245],
        };
        s.apply(1, op.kind(), &op.encode()).unwrap();
        let meta = SnapshotMeta {
            lsn: 1,
            term: 1,
            chain_head: 9,
            voters: vec![1],
            learners: vec![],
        };
        let path = snapshot::write(dir.path(), &s, &meta, &session).unwrap();
        let good = verify(&path, &session).unwrap();
        assert!(good.contains("partitions          1") && good.contains("MAC verified"));
        assert!(inspect(&path).unwrap().contains("MAC not checked"));

        let mut bytes = std::fs::read(&path).unwrap();
        bytes[9] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = inspect(&path).unwrap_err();
        assert!(
            err.contains("offset 8") && err.contains(&path.display().to_string()),
            "{err}"
        );
    }
}
