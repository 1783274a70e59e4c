#!/usr/bin/env bash
# perf/flamegraph.sh — a CPU flamegraph of a running process or of a command, with Linux
# `perf record` and inferno (perf/README.md).
#
# Usage:
#   perf/flamegraph.sh --pid PID [--seconds N] [--out FILE] [options]   # a running process (a keyfortd)
#   perf/flamegraph.sh [--out FILE] [options] -- CMD [ARGS...]          # a command, until it exits
#
# Options:
#   --out FILE        the SVG (default: flamegraph.svg)
#   --seconds N       how long to record a --pid (default 10)
#   --freq HZ         samples per second per CPU (default 999)
#   --call-graph M    perf's unwinding: dwarf (default: keyfort's release build has no frame
#                     pointers, and neither has SoftHSM; DWARF unwinding of a copied stack
#                     gives whole stacks through both) or fp (cheaper, stacks stop at the first
#                     function without a frame pointer)
#   --stack-bytes B   user stack copied per sample with dwarf (default 16384; deeper stacks
#                     than that are cut, shown under their outermost frame that fit)
#   --minwidth PX     omit frames narrower than this in the SVG (default 0.1; raise it if the
#                     SVG is too big)
#   --title TEXT      the SVG's title
#   --keep-data DIR   keep perf.data and the collapsed stacks (folded) in DIR
#   --record-only F   record into perf data file F and stop (render it later with --from-data:
#                     perf script's DWARF unwinding is CPU-heavy, keep it out of a measurement)
#   --from-data F     render the SVG of perf data file F recorded earlier (no recording)
#
# The SVG's widths are perf's sample periods, i.e. CPU time. A quick text summary of the same
# data: perf report -i F --no-children --stdio (self time) or --children.
#
# Needs: perf (installed from apt's linux-perf when missing), inferno-collapse-perf and
# inferno-flamegraph (installed with `cargo install inferno --locked` when missing). Run as
# root, or with kernel.perf_event_paranoid <= 1 for another user's process.
set -euo pipefail

out=flamegraph.svg
pid=""
seconds=10
freq=999
call_graph=dwarf
stack_bytes=16384
minwidth=0.1
title=""
keep=""
record_only=""
from_data=""
cmd=()

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --pid) pid="$2"; shift 2 ;;
        --seconds) seconds="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --freq) freq="$2"; shift 2 ;;
        --call-graph) call_graph="$2"; shift 2 ;;
        --stack-bytes) stack_bytes="$2"; shift 2 ;;
        --minwidth) minwidth="$2"; shift 2 ;;
        --title) title="$2"; shift 2 ;;
        --keep-data) keep="$2"; shift 2 ;;
        --record-only) record_only="$2"; shift 2 ;;
        --from-data) from_data="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        --) shift; cmd=("$@"); break ;;
        *) echo "flamegraph.sh: unknown argument $1" >&2; usage 2 ;;
    esac
done
if [ -z "$pid" ] && [ ${#cmd[@]} -eq 0 ] && [ -z "$from_data" ]; then
    echo "flamegraph.sh: give --pid PID or -- CMD ARGS" >&2
    usage 2
fi
if [ -n "$pid" ] && [ ${#cmd[@]} -gt 0 ]; then
    echo "flamegraph.sh: --pid and a command are exclusive" >&2
    exit 2
fi

# Tools, installed when missing.
if ! command -v perf >/dev/null 2>&1 || ! perf --version >/dev/null 2>&1; then
    echo "flamegraph.sh: installing perf (apt: linux-perf)" >&2
    apt-get install -y linux-perf >&2 || { apt-get update >&2 && apt-get install -y linux-perf >&2; }
fi
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v inferno-collapse-perf >/dev/null 2>&1 || ! command -v inferno-flamegraph >/dev/null 2>&1; then
    echo "flamegraph.sh: installing inferno (cargo install inferno --locked)" >&2
    cargo install inferno --locked >&2
fi

case "$call_graph" in
    dwarf) cg="dwarf,$stack_bytes" ;;
    fp) cg="fp" ;;
    *) echo "flamegraph.sh: --call-graph dwarf or fp" >&2; exit 2 ;;
esac

work=$(mktemp -d "${TMPDIR:-/tmp}/flamegraph.XXXXXX")
trap 'rm -rf "$work"' EXIT
data="$work/perf.data"

if [ -n "$from_data" ]; then
    data="$from_data"
    [ -n "$title" ] || title="$(basename "$from_data")"
elif [ -n "$pid" ]; then
    kill -0 "$pid" 2>/dev/null || { echo "flamegraph.sh: no process $pid" >&2; exit 1; }
    [ -n "$title" ] || title="$(tr '\0' ' ' < "/proc/$pid/cmdline" | cut -c1-80) (pid $pid, ${seconds} s)"
    echo "flamegraph.sh: recording pid $pid for ${seconds} s at ${freq} Hz ($cg)" >&2
    perf record -F "$freq" --call-graph "$cg" -o "$data" -p "$pid" -- sleep "$seconds" >&2
else
    [ -n "$title" ] || title="$(printf '%s ' "${cmd[@]}" | cut -c1-80)"
    echo "flamegraph.sh: recording ${cmd[*]} at ${freq} Hz ($cg)" >&2
    status=0
    perf record -F "$freq" --call-graph "$cg" -o "$data" -- "${cmd[@]}" >&2 || status=$?
    [ "$status" -eq 0 ] || echo "flamegraph.sh: the command exited with $status (graph still written)" >&2
fi
if [ -n "$record_only" ]; then
    mv "$data" "$record_only"
    echo "flamegraph.sh: perf data in $record_only (render: $0 --from-data $record_only --out FILE)" >&2
    exit 0
fi

folded="$work/folded"
perf script -i "$data" 2>/dev/null | inferno-collapse-perf --all > "$folded"
# The folded counts are perf's sample periods (nanoseconds for cpu-clock, the event a VM
# without a PMU records; event counts for cycles), so widths are CPU time either way.
samples=$(perf script -i "$data" -F comm 2>/dev/null | wc -l)
event=$(perf evlist -i "$data" 2>/dev/null | head -1)
case "$event" in
    cpu-clock*|task-clock*) countname="ns" ;;
    *) countname="${event:-events}" ;;
esac
inferno-flamegraph --title "$title" --subtitle "$samples samples, perf record -F $freq --call-graph $cg ($event)" \
    --minwidth "$minwidth" --countname "$countname" < "$folded" > "$out"
if [ -n "$keep" ]; then
    mkdir -p "$keep"
    cp "$data" "$folded" "$keep"/
fi
echo "flamegraph.sh: $out ($samples samples, $(du -h "$out" | cut -f1))" >&2
