//! `keyfort drill` end to end at a small size: a real 3-node cluster loaded with 2,000 keys,
//! every tier's fault caused and recovered, every key checked after each step. Behaviour only
//! (every step ran, every key verified, the results carry the fields); never timings.

use std::process::Command;

const KEYS: u64 = 2000;

#[test]
fn the_drill_runs_every_tier_and_verifies_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keyfort"))
        .args(["drill", "--keys", &KEYS.to_string()])
        .args([
            "--partitions",
            "4",
            "--sample",
            "40",
            "--probe-mib",
            "8",
            "--json",
        ])
        .arg("--dir")
        .arg(dir.path().join("drill"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "keyfort drill failed:\n{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("drill --json printed no JSON ({e}):\n{stderr}"));
    for field in [
        "keys",
        "local_s",
        "peer_s",
        "durable_s",
        "full_replay_s",
        "rpo_s",
        "disk_read_gb_per_s",
        "s3_get_gb_per_s",
        "verified_keys",
    ] {
        assert!(r.get(field).is_some(), "no {field} in {r}");
    }
    assert_eq!(r["keys"], KEYS);
    assert_eq!(r["verified_keys"], KEYS, "{r}");
    let tiers: Vec<&str> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["tier"].as_str().unwrap())
        .collect();
    assert_eq!(tiers, ["full_replay", "local", "peer", "durable"], "{r}");
    for s in r["steps"].as_array().unwrap() {
        assert_eq!(s["verified_keys"], KEYS, "{s}");
        assert_eq!(s["used_keys"], 40, "{s}");
        assert!(s["seconds"].as_f64().unwrap() > 0.0, "{s}");
    }
    // (d) replayed a log with no snapshot; (a) restarted over one; (b) came back as a new id.
    let step = |t: &str| {
        r["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["tier"] == t)
            .unwrap()["detail"]
            .clone()
    };
    assert!(step("full_replay")["snapshot_lsns"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l == 0));
    assert!(step("local")["snapshot_lsns"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l.as_u64().unwrap() > 0));
    let peer = step("peer");
    assert_ne!(peer["new_node_id"], peer["old_node_id"], "{peer}");
    // (c) restored the manifest's state: its digests are the old cluster's at those LSNs, and
    // the new cluster has a new id.
    let durable = step("durable");
    // Every restored snapshot a node of the old cluster still held matches it (null: none
    // still held that LSN's file).
    assert!(
        durable["manifest_digest_match"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m != false),
        "{durable}"
    );
    assert_eq!(durable["restored_keys"], KEYS, "{durable}");
    assert_ne!(
        durable["restore"]["cluster_id"],
        durable["restore"]["old_cluster_id"]
    );
    assert!(r["rpo_s"].as_f64().unwrap() >= 0.0, "{r}");
    // The RPO is measured on keys a client wrote up to the disaster.
    assert!(
        durable["written_during_disaster"].as_u64().unwrap() > 0,
        "{durable}"
    );
    assert!(
        durable["written_lost"].as_u64().unwrap()
            <= durable["written_during_disaster"].as_u64().unwrap()
    );
    assert!(r["s3_get_gb_per_s"].as_f64().unwrap() > 0.0, "{r}");
}
