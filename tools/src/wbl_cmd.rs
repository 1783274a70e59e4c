//! `keyfort wbl ...`: offline verification and dump of a write-behind log. Both open the log
//! read-only: they never cut a torn tail, delete or create a file.

use clap::Subcommand;
use keyfort_engine::wbl::{self, Wbl, WblError, WblOptions};
use std::path::{Path, PathBuf};

#[derive(Debug, Subcommand)]
pub enum WblCmd {
    /// Full recovery scan (crc, chain, segment linkage, torn tail vs corruption); read-only.
    Verify {
        /// The log directory (holding seg-*.wbl and hardstate).
        dir: PathBuf,
    },
    /// One line per record: lsn, term, kind, payload length, chain.
    Dump {
        dir: PathBuf,
        /// First LSN to print (default: the first in the log).
        #[arg(long)]
        from: Option<u64>,
        /// Most records to print.
        #[arg(long)]
        limit: Option<u64>,
    },
}

pub fn run(cmd: WblCmd) -> crate::CmdResult {
    match cmd {
        WblCmd::Verify { dir } => verify(&dir),
        WblCmd::Dump { dir, from, limit } => dump(&dir, from, limit.unwrap_or(u64::MAX)),
    }
}

/// glommio must first read a non-empty file on the device (see `keyfort_engine::exec`); an
/// existing log file serves, so the tool writes nothing.
fn probe_file(dir: &Path) -> Result<PathBuf, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() >= 4096))
        .ok_or_else(|| format!("{}: no write-behind log here", dir.display()))
}

fn on_executor<T>(
    dir: &Path,
    f: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    let probe = probe_file(dir)?;
    keyfort_engine::exec::run_local_probing(&probe, |_| f).map_err(|e| e.to_string())?
}

fn describe(e: &WblError) -> String {
    match e {
        WblError::Corrupt {
            file,
            offset,
            lsn,
            reason,
        } => format!(
            "CORRUPT {} offset {offset} lsn {lsn}: {reason}",
            file.display()
        ),
        other => other.to_string(),
    }
}

fn verify(dir: &Path) -> crate::CmdResult {
    let r = on_executor(dir, async {
        wbl::verify_dir(dir).await.map_err(|e| describe(&e))
    })?;
    println!("wbl verify {}: ok", dir.display());
    println!(
        "segments {} records {} lsn {}..={} scanned {} bytes in {:.1} ms",
        r.segments,
        r.records,
        r.first_lsn,
        r.last_lsn,
        r.bytes_scanned,
        r.elapsed.as_secs_f64() * 1e3
    );
    let hs = r.hard_state;
    println!(
        "hard state term {} vote {} commit {}",
        hs.term, hs.vote, hs.commit
    );
    match r.torn_tail {
        Some(t) => println!(
            "torn tail: {} offset {} lsn {} ({} bytes would be discarded): {}",
            t.file.display(),
            t.offset,
            t.lsn,
            t.bytes_discarded,
            t.reason
        ),
        None => println!("no torn tail"),
    }
    Ok(())
}

fn dump(dir: &Path, from: Option<u64>, limit: u64) -> crate::CmdResult {
    on_executor(dir, async {
        let opts = WblOptions {
            read_only: true,
            ..WblOptions::default()
        };
        let (log, _) = Wbl::open(dir, opts).await.map_err(|e| describe(&e))?;
        let mut rd = log.reader(from.unwrap_or(log.first_lsn()));
        println!(
            "{:>12} {:>8} {:<18} {:>8} chain",
            "lsn", "term", "kind", "len"
        );
        let mut n = 0;
        while n < limit {
            let Some(r) = rd.next().await else { break };
            let r = r.map_err(|e| describe(&e))?;
            let kind = format!("{:?}", r.kind);
            println!(
                "{:>12} {:>8} {kind:<18} {:>8} {:016x}",
                r.lsn,
                r.term,
                r.payload.len(),
                r.chain
            );
            n += 1;
        }
        Ok(())
    })
}
