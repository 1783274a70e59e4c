#!/usr/bin/env bash
# The whole test suite: what README's second command and CI (.ci/run) run. Builds once into the
# shared target dir. Long soaks run only with KEYFORT_SOAK=1; FUZZ_SECONDS bounds the fuzz run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh

echo "== fmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests"
cargo nextest run --workspace --locked --no-fail-fast
echo "== doc tests"
cargo test --workspace --locked --doc

if [ -d fuzz ] && rustup toolchain list | grep -q '^nightly' && command -v cargo-fuzz >/dev/null 2>&1; then
  secs=${FUZZ_SECONDS:-20}
  for target in $(cd fuzz && cargo +nightly fuzz list); do
    echo "== fuzz $target (${secs}s)"
    (cd fuzz && cargo +nightly fuzz run "$target" -- -max_total_time="$secs" -rss_limit_mb=2048)
  done
else
  echo "== fuzz skipped: needs fuzz/, a nightly toolchain and cargo-fuzz"
fi
echo "== all tests passed"
