#!/usr/bin/env bash
# Installs SoftHSM2 and OpenSC (pkcs11-tool) when missing. Idempotent; called by the lead's
# scripts and CI. Needs root (or sudo) only when something is missing.
set -euo pipefail
MODULE=/usr/lib/softhsm/libsofthsm2.so
if [[ -e "$MODULE" ]] && command -v pkcs11-tool >/dev/null && command -v softhsm2-util >/dev/null; then
  echo "softhsm-install: SoftHSM2 and pkcs11-tool present ($MODULE)"
  exit 0
fi
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq softhsm2 opensc
test -e "$MODULE" || { echo "softhsm-install: $MODULE missing after install" >&2; exit 1; }
echo "softhsm-install: installed SoftHSM2 and pkcs11-tool"
