#!/usr/bin/env bash
# The main job on the embedded defaults (README's first command). Today: provisions SoftHSM cards
# with the ceremony, shares a partition across them, creates and uses masked keys, appends through
# the WBL on every core, SIGKILLs the writer, reopens and prints what recovery found and took;
# then the snapshot drill: shards applying masked-key records with rolling card-MACed snapshots
# are SIGKILLed and recover from their newest verified snapshot plus the log, timed per phase.
# Then a 3-node keyfortd cluster (one card each): the leader is SIGKILLed; failover and catch-up are timed.
# Last, a short disaster-recovery drill (`keyfort drill`, issue 7): 100,000 keys loaded through raft,
# then full replay, local restart, wiped-node rejoin and whole-cluster restore from S3, each timed.
# Then the load generator (issue 8): a fresh 3-node cluster driven open-loop at 500/s with each
# workload (create-heavy, use-heavy with Zipf keys, churn); per-operation p50...p99.99 and max.
# Every cluster here runs TLS 1.3 on its client and peer connections (issue 9; the CA made in a
# card at `cluster init`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --locked -p keyfort-tools -p keyfort-bench
data=${KEYFORT_DEMO_DIR:-.kf/demo}
rm -rf "$data"
target/release/keyfort demo --data-dir "$data" "$@"
target/release/keyfort drill --keys 100000 --dir "$data/drill"
exec target/release/load --tls --workload create-heavy,use-heavy,churn --rate 500 --duration 5 \
  --warmup 1 --preload 2000 --shards 2 --quiet --dir "$data/load" --json "$data/load.json"
