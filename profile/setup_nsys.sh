#!/usr/bin/env bash
# Install Nsight Systems (nsys) 2022.4 from Debian 12's non-free component, for `make profile` and the profile tests.
#
#   make setup-nsys            # or: bash profile/setup_nsys.sh
#   make setup-nsys NSYS=0     # decline: nothing is installed; profiling falls back to --profiler torch
#
# Idempotent: does nothing when nsys and its importer are already in place. Never fails the build: when it cannot
# install (not Debian 12, not root, no package access) it says why and exits 0, and the profile tests skip with the
# reason. Facts behind each step: docs/ENVIRONMENT.md ("Nsight Systems and NVTX").
set -euo pipefail

say() { echo "setup-nsys: $*"; }
IMPORTER_WANT=/usr/lib/x86_64-linux-gnu/nsight-systems/host-linux-x64
IMPORTER_HAVE=/usr/lib/nsight-systems/host-linux-x64

if [ "${NSYS:-1}" = "0" ]; then
    say "skipped (NSYS=0): no Nsight Systems timeline; 'make profile' uses the PyTorch profiler and the nsys tests skip"
    exit 0
fi

fix_importer() {
    # Debian's packaging bug: nsys looks for QdstrmImporter under the multiarch path, the package installs it
    # elsewhere; without this link `nsys profile` leaves only a .qdstrm ("importer ... not found").
    if [ -x "$IMPORTER_HAVE/QdstrmImporter" ] && [ ! -e "$IMPORTER_WANT/QdstrmImporter" ]; then
        mkdir -p "$(dirname "$IMPORTER_WANT")"
        rm -rf "$IMPORTER_WANT"
        ln -s "$IMPORTER_HAVE" "$IMPORTER_WANT"
        say "linked $IMPORTER_WANT -> $IMPORTER_HAVE (QdstrmImporter packaging fix)"
    fi
}

if command -v nsys >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] && fix_importer
    if [ -e "$IMPORTER_WANT/QdstrmImporter" ] || [ ! -e "$IMPORTER_HAVE/QdstrmImporter" ]; then
        say "already installed: $(nsys --version 2>/dev/null | head -1)"
        exit 0
    fi
fi

. /etc/os-release 2>/dev/null || true
if [ "${ID:-}" != "debian" ] || [ "${VERSION_CODENAME:-}" != "bookworm" ]; then
    say "not installed: this recipe needs Debian 12 (found ${PRETTY_NAME:-unknown}); install Nsight Systems from" \
        "https://developer.nvidia.com/nsight-systems or run with NSYS=0"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then SUDO="sudo"; else
        say "not installed: needs root (or passwordless sudo) for apt-get; rerun as root or pass NSYS=0"
        exit 0
    fi
fi

# non-free is off by default: add it with the same mirror and keyring as the system's own Debian entry
SRC=/etc/apt/sources.list.d/lmopt-debian-nonfree.sources
if [ ! -f "$SRC" ]; then
    URI=http://deb.debian.org/debian
    KEY=/usr/share/keyrings/debian-archive-keyring.gpg
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        URI=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
        KEY=$(awk '/^Signed-By:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
    fi
    printf 'Types: deb\nURIs: %s\nSuites: bookworm\nComponents: contrib non-free\nSigned-By: %s\n' "$URI" "$KEY" |
        $SUDO tee "$SRC" >/dev/null
    say "added apt source $SRC ($URI bookworm contrib non-free)"
fi
APT="$SUDO apt-get -o DPkg::Lock::Timeout=600 -q"
if ! $APT update >/dev/null || \
   ! DEBIAN_FRONTEND=noninteractive $APT install -y --no-install-recommends nsight-systems nsight-systems-target \
        >/dev/null; then
    say "not installed: apt-get failed (no access to Debian's mirror?); pass NSYS=0 to skip this step"
    exit 0
fi
# --no-install-recommends: the target package recommends libcuda1, which pulls NVIDIA driver userspace libraries
$SUDO bash -c "$(declare -f say fix_importer); IMPORTER_WANT=$IMPORTER_WANT IMPORTER_HAVE=$IMPORTER_HAVE fix_importer"
say "installed: $(nsys --version | head -1)"
