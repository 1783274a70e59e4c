#!/usr/bin/env bash
# perf/capture-load.sh — the create and encrypt flamegraphs of perf/results/: one
# `cluster_bench` run on a fresh 3-node cluster (open-loop creates at CREATE_RATE/s, then 4 KiB
# encrypts at ENCRYPT_RATE/s), and perf/flamegraph.sh on the shard-0 leader during each.
#
# Usage: perf/capture-load.sh [--bin DIR] [--dir SCRATCH] [--out DIR] [--create-rate R]
#                             [--encrypt-rate R] [--seconds N]
#   --bin DIR         where cluster_bench, keyfort and keyfortd are (default target/release;
#                     build: cargo build --release -p keyfort-tools -p keyfort-bench)
#   --dir SCRATCH     cluster_bench's scratch directory (default target/perf-load)
#   --out DIR         where create.svg, encrypt.svg, bench.txt and the self-time tops
#                     (create.self.txt, encrypt.self.txt) go (default perf/results)
#   --create-rate R   offered creates/s (default 3000)
#   --encrypt-rate R  offered 4 KiB encrypts/s (default 10000)
#   --seconds N       recorded seconds of each phase (default 10; each load phase runs N+6 s)
#   --no-profile      only the load (for before/after timings without perf's overhead)
set -euo pipefail
cd "$(dirname "$0")/.."

bin=target/release
dir=target/perf-load
out=perf/results
create_rate=3000
encrypt_rate=10000
seconds=10
profile=1
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) bin="$2"; shift 2 ;;
        --dir) dir="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --create-rate) create_rate="$2"; shift 2 ;;
        --encrypt-rate) encrypt_rate="$2"; shift 2 ;;
        --seconds) seconds="$2"; shift 2 ;;
        --no-profile) profile=0; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "capture-load.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$out"
log="$out/bench.txt"
duration=$((seconds + 4))

# The pid of the keyfortd leading shard 0 (status.json of each node; its config path names it).
leader_pid() {
    local run="$dir/run-0"
    for st in "$run"/node-*/data/status.json; do
        if python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); sys.exit(0 if s["shards"][0]["role"].lower()=="leader" else 1)' "$st" 2>/dev/null; then
            local cfg
            cfg="$(dirname "$(dirname "$st")")/keyfortd.json"
            local p cmdline
            for p in /proc/[0-9]*; do
                cmdline=$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null) || continue
                if [[ "$cmdline" == *"--config $cfg"* ]]; then
                    basename "$p"
                    return 0
                fi
            done
        fi
    done
    return 1
}

# Waits until the bench's output holds a line matching $1.
wait_line() {
    until grep -q -- "$1" "$log" 2>/dev/null; do
        sleep 0.2
        kill -0 "$bench" 2>/dev/null || { echo "capture-load.sh: cluster_bench ended early" >&2; cat "$log" >&2; exit 1; }
    done
}

"$bin/cluster_bench" --dir "$dir" --rates "$create_rate" --duration-s "$duration" --warmup-s 2 \
    --no-search --no-failover --perf-at 0 --sequential 200 --other-tick-ms 0 \
    --encrypt-rate "$encrypt_rate" --encrypt-bytes 4096 > "$log" 2>&1 &
bench=$!

# Creates: the rate phase starts right after the sequential line; record after the warm-up.
wait_line "^sequential creates"
if [ "$profile" = 1 ]; then
    sleep 3
    pid=$(leader_pid) || { echo "capture-load.sh: no shard-0 leader found" >&2; exit 1; }
    perf/flamegraph.sh --pid "$pid" --seconds "$seconds" --record-only "$dir/create.perf.data"
fi
# Encrypts: start after the create phase's report (a few keys are made first, then the warm-up).
wait_line "cpu cores used"
if [ "$profile" = 1 ]; then
    sleep 3
    pid=$(leader_pid) || { echo "capture-load.sh: no shard-0 leader found" >&2; exit 1; }
    perf/flamegraph.sh --pid "$pid" --seconds "$seconds" --record-only "$dir/encrypt.perf.data"
fi
wait "$bench"
# Rendered once the load is over (perf script's unwinding would otherwise eat the cores).
if [ "$profile" = 1 ]; then
    perf/flamegraph.sh --from-data "$dir/create.perf.data" --out "$out/create.svg" \
        --title "keyfortd, shard-0 leader, open-loop creates at $create_rate/s (cluster_bench)"
    perf/flamegraph.sh --from-data "$dir/encrypt.perf.data" --out "$out/encrypt.svg" \
        --title "keyfortd, shard-0 leader, 4 KiB encrypts at $encrypt_rate/s (cluster_bench)"
    for p in create encrypt; do
        perf report -i "$dir/$p.perf.data" --no-children --stdio --percent-limit 0.5 2>/dev/null \
            | grep -E '^ +[0-9.]+%' > "$out/$p.self.txt" || true
    done
fi
grep -E "^(run|sequential|creates|  cpu|encrypt)" "$log" >&2
