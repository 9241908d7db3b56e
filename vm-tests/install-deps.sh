#!/usr/bin/env bash
# Installs what a fresh Debian bookworm machine lacks to build cgipool and run
# every test tier and the demo. One list, used by .ci/run and `make deps`.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
pkgs=(debootstrap systemd-container qemu-system-x86 qemu-utils e2fsprogs
      gcc make clang llvm libclang-rt-14-dev curl python3 wrk nginx-light
      ca-certificates)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "deps: all installed"
    exit 0
fi
echo "deps: installing ${missing[*]}"
apt-get update -q
# qemu-system-x86 comes from bookworm; a newer qemu-utils (from backports on
# some images) breaks it, so take both at bookworm's version.
qv=$(apt-cache madison qemu-system-x86 | awk '/bookworm\/main/ {print $3; exit}')
extra=()
if [ -n "$qv" ]; then
    extra=("qemu-utils=$qv")
fi
apt-get install -y -q --no-install-recommends --allow-downgrades "${missing[@]/qemu-utils/}" "${extra[@]}"
# The host's own nginx is not used by the tests; keep it from holding port 80.
if command -v nginx >/dev/null && pgrep -x nginx >/dev/null; then nginx -s stop 2>/dev/null || true; fi
