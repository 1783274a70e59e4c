#!/usr/bin/env bash
# keyfort and etcd side by side (issue 8) on a fresh Debian machine, as root: installs Debian's
# etcd 3.4 (etcd-server, etcd-client) and protoc when missing, the rest with install-deps.sh,
# builds release, and runs vs_etcd with the arguments given (`--quick` for small figures; see
# `target/release/vs_etcd --help`). vs_etcd runs keyfort's 3-node cluster, then a 3-member etcd
# cluster on 127.0.0.1 (never both at once), and writes docs/bench/vs_etcd.json.
# Everything it starts is stopped on exit, Ctrl-C included: vs_etcd runs in a process group of
# its own (its keyfortd and etcd processes with it), which is terminated if still there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "vs-etcd: run as root (installs Debian packages)" >&2
  exit 1
fi

policy=/usr/sbin/policy-rc.d
made_policy=0
pid=
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    echo "vs-etcd: stopping vs_etcd and its clusters" >&2
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 50); do
      kill -0 -- "-$pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  if [ "$made_policy" = 1 ]; then
    rm -f "$policy"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

need_apt=()
[ -x /usr/bin/etcd ] || need_apt+=(etcd-server)
[ -x /usr/bin/etcdctl ] || need_apt+=(etcd-client)
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
[ -e /usr/include/google/protobuf/descriptor.proto ] || need_apt+=(libprotobuf-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "vs-etcd: apt-get install ${need_apt[*]}"
  # etcd-server's package would start its own etcd (127.0.0.1:2379) as a service: keep it from
  # starting during the install, so nothing but the bench's clusters runs beside the bench.
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
  if [ "$made_policy" = 1 ]; then
    rm -f "$policy"
    made_policy=0
  fi
fi
if pgrep -x etcd >/dev/null 2>&1; then
  echo "vs-etcd: warning: an etcd not started by this script is running (it shares the CPUs)" >&2
fi

scripts/install-deps.sh
cargo build --release --locked -p keyfort-tools -p keyfort-bench

# A process group of its own (job control), so cleanup reaches every process it starts.
set -m
target/release/vs_etcd "$@" &
pid=$!
set +m
rc=0
wait "$pid" || rc=$?
pid=
exit "$rc"
