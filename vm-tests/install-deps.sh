#!/usr/bin/env bash
# Installs what a fresh Debian bookworm machine lacks to build cgipool and run
# every test tier and the demo. One list, used by .ci/run and `make deps`.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
pkgs=(debootstrap systemd-container qemu-system-x86 qemu-utils e2fsprogs
      gcc make clang llvm libclang-rt-14-dev curl python3 ca-certificates
      nginx-light   # nginx -t in the rendering unit tests
      iproute2      # the lab network of the nspawn::hosts_* scenarios (ip netns, bridge, veth)
      dpkg-dev lintian)  # make deb (dpkg-shlibdeps), make deb-lint
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
# qemu-system-x86 comes from bookworm; some images carry a newer qemu-utils
# (from backports) that breaks it, so qemu-utils goes to bookworm's version too.
install=()
for p in "${missing[@]}"; do
    [ "$p" = qemu-utils ] || install+=("$p")
done
if [[ " ${missing[*]} " == *" qemu-system-x86 "* || " ${missing[*]} " == *" qemu-utils "* ]]; then
    qv=$(apt-cache madison qemu-system-x86 | awk '/bookworm\/main/ {print $3; exit}')
    install+=("qemu-utils${qv:+=$qv}")
fi
apt-get install -y -q --no-install-recommends --allow-downgrades ${APT_SIMULATE:+-s} "${install[@]}"
