//! The README's main command and the offline tools, as a user runs them: real processes, real
//! SoftHSM tokens, a real SIGKILL.

use std::path::Path;
use std::process::{Command, Output};

fn keyfort(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keyfort"))
        .args(args)
        .output()
        .expect("run keyfort")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Flips one byte in the middle of the first record block of a segment.
fn corrupt_first_record(segment: &Path) {
    let mut bytes = std::fs::read(segment).expect("read segment");
    bytes[4096 + 20] ^= 0x40;
    std::fs::write(segment, bytes).expect("write segment");
}

#[test]
fn demo_runs_cards_wbl_and_snapshot_drills_then_wbl_verify_finds_corruption() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("demo");
    let data = data.to_str().expect("utf-8 path");
    let out = keyfort(&[
        "demo",
        "--data-dir",
        data,
        "--seconds",
        "2",
        "--shards",
        "2",
    ]);
    let said = text(&out);
    assert!(out.status.success(), "demo failed:\n{said}");
    assert!(said.contains("the other realm's card is refused"), "{said}");
    assert!(
        said.contains("every acknowledged record is present"),
        "{said}"
    );
    assert!(
        said.contains("cluster integrity key made on node-1"),
        "{said}"
    );
    // The snapshot drill: one row of 13 columns per shard, and no reported commit lost.
    let drill = said
        .split("== snapshot drill: 2 shard(s)")
        .nth(1)
        .unwrap_or_else(|| panic!("no snapshot drill:\n{said}"));
    let rows = drill
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .filter(|l| l.split_whitespace().count() == 13)
        .count();
    assert_eq!(rows, 2, "{said}");
    assert!(
        said.contains("every reported commit is recovered"),
        "{said}"
    );

    let log = format!("{data}/wbl/shard-0/wbl");
    let out = keyfort(&["wbl", "verify", &log]);
    assert!(
        out.status.success(),
        "verify of a clean log failed:\n{}",
        text(&out)
    );
    let out = keyfort(&["wbl", "dump", &log, "--limit", "3"]);
    assert!(out.status.success(), "dump failed:\n{}", text(&out));
    let dumped = String::from_utf8_lossy(&out.stdout).to_string();
    let lsns: Vec<&str> = dumped
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(lsns, ["1", "2", "3"], "{dumped}");

    corrupt_first_record(&Path::new(&log).join("seg-0000000000000000.wbl"));
    let out = keyfort(&["wbl", "verify", &log]);
    let said = text(&out);
    assert!(
        !out.status.success(),
        "verify accepted a corrupt log:\n{said}"
    );
    assert!(
        said.contains("CORRUPT") && said.contains("seg-0000000000000000.wbl"),
        "{said}"
    );
}
