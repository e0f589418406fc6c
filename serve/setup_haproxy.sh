#!/usr/bin/env bash
# Install HAProxy from the OS packages (Debian/Ubuntu: apt-get install haproxy), for `make serve-replicas` and the
# replica/fault tests.
#
#   make setup-haproxy         # or: bash serve/setup_haproxy.sh
#
# Idempotent: does nothing when haproxy is on PATH. Never fails the build: when it cannot install (no apt-get, not
# root) it says why and exits 0, and the replica tests skip with that reason.
set -euo pipefail
say() { echo "setup-haproxy: $*"; }
if command -v haproxy >/dev/null 2>&1; then
    say "already installed: $(haproxy -v 2>/dev/null | head -1)"
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || { say "not installed: no apt-get here; install HAProxy with the OS's package manager"; exit 0; }
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then SUDO="sudo"; else
        say "not installed: needs root (or passwordless sudo) for apt-get install haproxy"
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -q haproxy >/dev/null 2>&1; then
    $SUDO apt-get update -q >/dev/null 2>&1 || true
    $SUDO apt-get install -y -q haproxy >/dev/null 2>&1 || { say "not installed: apt-get install haproxy failed"; exit 0; }
fi
say "installed: $(haproxy -v 2>/dev/null | head -1)"
