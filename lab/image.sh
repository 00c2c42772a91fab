#!/usr/bin/env bash
# Builds (once) the lab's base guest: a Debian bookworm root filesystem with a real kernel, udev,
# systemd, libvirt's QEMU driver and QEMU, from Debian's packages with this machine's apt sources.
# Cached under .tools/lab/base-HASH/, HASH over everything that shapes the image (this script, the
# package list, the apt sources, mmdebstrap's version); a second run prints the path and returns.
#
#   lab/image.sh            -> prints the cache directory (rootfs.img, vmlinuz, initrd.img)
#
# usbpt itself, nats-server and the lab's guest scripts are NOT in this image: they go on a small
# second disk built on every run (lab/run.py), so a code change never rebuilds the base.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  linux-image-amd64 systemd-sysv udev dbus kmod
  libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
  qemu-system-x86 seabios
)
sources=/etc/apt/sources.list.d/debian.sources
[ -f "$sources" ] || sources=/etc/apt/sources.list

key=$( { cat "$0"; printf '%s\n' "${packages[@]}"; cat "$sources"; mmdebstrap --version; } \
  | sha256sum | cut -c1-16)
out=.tools/lab/base-$key
if [ -f "$out/ok" ]; then echo "$out"; exit 0; fi

t0=$(date +%s)
say() { echo "lab/image: [$(( $(date +%s) - t0 ))s] $*" >&2; }
rm -rf "$out" && mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

say "mmdebstrap bookworm (${#packages[@]} packages and their dependencies; ~1-2 min)"
# The guest's customisations, applied inside the new root:
#  - kvm blacklisted: the guest runs under TCG; its emulated SVM makes a nested KVM that can
#    soft-lock (measured), so the guest's libvirt must offer type='qemu' only (usbpt picks the
#    domain type the host's capabilities list);
#  - serial-getty on ttyS0 masked: it hangs up the console under other writers;
#  - usbpt-lab-shell.service: mounts the run's payload disk (/dev/vdb) at /lab and serves the
#    host's commands on the virtio-serial port org.usbpt.lab (lab/guest/shell.sh).
mmdebstrap --variant=apt --mode=root --quiet \
  --aptopt='Apt::Install-Recommends "false"' \
  --include="$(IFS=,; echo "${packages[*]}")" \
  --customize-hook='echo labhost > "$1/etc/hostname"' \
  --customize-hook='echo "/dev/vda / ext4 rw,relatime 0 1" > "$1/etc/fstab"' \
  --customize-hook='printf "blacklist kvm_amd\nblacklist kvm_intel\nblacklist kvm\n" > "$1/etc/modprobe.d/usbpt-lab.conf"' \
  --customize-hook='chroot "$1" systemctl mask serial-getty@ttyS0.service getty@tty1.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer man-db.timer >/dev/null 2>&1 || true' \
  --customize-hook='mkdir -p "$1/lab"' \
  --customize-hook='cat > "$1/etc/systemd/system/usbpt-lab-shell.service" <<UNIT
[Unit]
Description=usbpt lab: the host harness command channel
After=local-fs.target systemd-udev-settle.service
[Service]
Type=simple
ExecStartPre=/bin/mount -o ro /dev/vdb /lab
ExecStart=/bin/sh /lab/guest/shell.sh
Restart=no
[Install]
WantedBy=multi-user.target
UNIT
chroot "$1" systemctl enable usbpt-lab-shell.service >/dev/null 2>&1' \
  bookworm "$tmp/root" "$sources"

say "kernel and initrd"
cp "$tmp"/root/boot/vmlinuz-* "$out/vmlinuz"
cp "$tmp"/root/boot/initrd.img-* "$out/initrd.img"
ls "$tmp"/root/lib/modules > "$out/kernel-release"
rm -rf "$tmp"/root/var/cache/apt/archives/*.deb "$tmp"/root/var/lib/apt/lists/*

say "mkfs.ext4 -d (no loop mount)"
mkfs.ext4 -q -F -L usbpt-lab -d "$tmp/root" "$out/rootfs.img" 3G >&2
touch "$out/ok"
say "base image ready: $out ($(du -sh "$out/rootfs.img" | cut -f1) used, kernel $(cat "$out/kernel-release"))"
echo "$out"
