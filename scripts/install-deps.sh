#!/usr/bin/env bash
# Installs what keyfort needs on a fresh Debian machine (run as root). Idempotent: each step is
# skipped when its tool is already present, so CI and a new user run the same script.
set -euo pipefail

need_apt=()
command -v softhsm2-util >/dev/null 2>&1 || need_apt+=(softhsm2)
command -v pkcs11-tool >/dev/null 2>&1 || need_apt+=(opensc)
# protoc and its well-known types: the etcd-client crate (bench, etcd side by side) runs it.
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
[ -e /usr/include/google/protobuf/descriptor.proto ] || need_apt+=(libprotobuf-dev)
# Debian's etcd 3.4: bench/tests/etcd.rs and the side-by-side benchmark (scripts/vs-etcd.sh).
[ -x /usr/bin/etcd ] || need_apt+=(etcd-server)
[ -x /usr/bin/etcdctl ] || need_apt+=(etcd-client)
# tcpdump: tools/tests/tls_capture.rs captures loopback traffic to show TLS hides plaintexts.
command -v tcpdump >/dev/null 2>&1 || need_apt+=(tcpdump)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # etcd-server's package would start an etcd service on 127.0.0.1:2379: no service may start
  # during the install (policy-rc.d answering 101), so only the tests' own clusters ever run.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: cargo not found; install Rust with rustup first" >&2
  exit 1
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
command -v cargo-nextest >/dev/null 2>&1 || cargo install cargo-nextest --locked

# cargo-fuzz needs a nightly toolchain; the fuzz step is skipped (with a message) where none exists.
if [ "${KEYFORT_FUZZ:-1}" = 1 ] && rustup toolchain list | grep -q '^nightly'; then
  command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
fi
