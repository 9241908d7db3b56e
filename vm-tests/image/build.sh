#!/usr/bin/env bash
# Builds (or finds in the cache) the vm-tests guest image: a Debian bookworm
# rootfs for the nspawn tier, the same tree packed as an ext4 disk plus its
# kernel and initrd for the QEMU tier.
#
# Cache: ${CGIPOOL_VM_CACHE:-~/.cache/cgipool-vm}/<key>/ where <key> hashes this
# script, packages.txt and files/. Nothing else invalidates it.
# Prints the image directory as the last line of stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${CGIPOOL_VM_CACHE:-$HOME/.cache/cgipool-vm}

key() {
    (
        cd "$here"
        sha256sum build.sh packages.txt packages-apt.txt
        # Only what git tracks counts (no empty dirs, modes as git keeps them).
        find files -type f -o -type l | LC_ALL=C sort | while read -r f; do
            if [ -L "$f" ]; then echo "link $f -> $(readlink "$f")"
            else echo "file $f $(sha256sum < "$f" | cut -c1-64) $([ -x "$f" ] && echo x)"; fi
        done
    ) | sha256sum | cut -c1-16
}

k=$(key)
out=$cache/$k
if [ "${1:-}" = "--key" ]; then echo "$k"; exit 0; fi
if [ -f "$out/done" ]; then
    echo "vm image: cached $out" >&2
    echo "$out"
    exit 0
fi

for tool in debootstrap mkfs.ext4; do
    command -v "$tool" >/dev/null || { echo "vm image: $tool is missing; install it (apt-get install debootstrap e2fsprogs)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "vm image: building the image needs root (debootstrap)" >&2; exit 1; }

start=$(date +%s)
mkdir -p "$cache"
work=$(mktemp -d "$cache/build.XXXXXX")
cleanup() {
    for m in proc sys dev/pts dev; do umount "$work/rootfs/$m" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

pkgs=$(grep -v '^\s*#' "$here/packages.txt" | grep -v '^\s*$' | paste -sd, -)
echo "vm image: debootstrap bookworm ($pkgs)" >&2
debootstrap --variant=minbase --include="$pkgs" bookworm "$work/rootfs" >"$work/debootstrap.log" 2>&1 || {
    tail -40 "$work/debootstrap.log" >&2; echo "vm image: debootstrap failed" >&2; exit 1; }

root=$work/rootfs
# Packages whose dependencies have alternatives go through apt-get, which
# resolves them against what is installed (debootstrap always takes the first
# alternative: `php` would pull in Apache).
apt_pkgs=$(grep -v '^\s*#' "$here/packages-apt.txt" | grep -v '^\s*$' | paste -sd' ' -)
if [ -n "$apt_pkgs" ]; then
    echo "vm image: apt-get install $apt_pkgs" >&2
    mount -t proc proc "$root/proc"
    { chroot "$root" apt-get update && DEBIAN_FRONTEND=noninteractive chroot "$root" \
        apt-get install -y --no-install-recommends $apt_pkgs; } >"$work/apt.log" 2>&1 || {
        tail -40 "$work/apt.log" >&2; echo "vm image: apt-get install failed" >&2; exit 1; }
    umount "$root/proc"
fi
# Debian's php-fpm is there for the benchmark, which starts it itself.
chroot "$root" systemctl disable php8.2-fpm.service >/dev/null 2>&1 || true
# Baked-in files (agent, masks, journald, emergency power-off, payload mount).
cp -a "$here/files/." "$root/"
mkdir -p "$root/payload" "$root/mnt/agent"   # mount points: payload, agent socket dir
chown -R root:root "$root/usr/local/lib/cgipool-test" "$root/etc/systemd"

# Mask gettys and every timer that could start jobs during a test.
for u in getty@.service serial-getty@.service console-getty.service container-getty@.service \
         apt-daily.timer apt-daily-upgrade.timer man-db.timer fstrim.timer e2scrub_all.timer \
         systemd-tmpfiles-clean.timer e2scrub_reap.service systemd-timesyncd.service; do
    ln -sf /dev/null "$root/etc/systemd/system/$u"
done
echo cgipool-vm > "$root/etc/hostname"
: > "$root/etc/machine-id"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' > "$root/etc/fstab"
# Root may log in on the console without password (debugging a kept VM by hand).
chroot "$root" passwd -d root >/dev/null
rm -rf "$root/var/lib/apt/lists/"* "$root/var/cache/apt/"*.bin "$root/var/cache/apt/archives/"*.deb

kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -1)
initrd=$(ls "$root"/boot/initrd.img-* | sort -V | tail -1)
cp "$kernel" "$work/vmlinuz"
cp "$initrd" "$work/initrd.img"
chmod 0644 "$work/vmlinuz" "$work/initrd.img"

echo "vm image: packing disk.raw" >&2
mkfs.ext4 -q -L cgiroot -d "$root" "$work/disk.raw" 2G

rm -f "$work/debootstrap.log" "$work/apt.log"
echo "built $(date -u +%FT%TZ) in $(( $(date +%s) - start ))s key $k" > "$work/done"
trap - EXIT
rm -rf "$out"
mv "$work" "$out"
echo "vm image: built $out in $(( $(date +%s) - start ))s" >&2
echo "$out"
