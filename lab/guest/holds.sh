#!/bin/sh
# What a running QEMU domain really holds (the lab's proof: `info usb` alone is not, QEMU caches
# the product string of a device that has gone):
#   holds DOMAIN  ->  one line per usb-host device and per open USB device file:
#     qom ID hostdevice=PATH   QEMU's own usb-host object: the file it was told to open
#     fd PATH                  /dev/bus/usb files open in the QEMU process: what it holds
# (the live domain XML, libvirt's idea, is read separately with `virsh dumpxml`).
set -e
dom=$1; V="virsh -c qemu:///system"
for id in $($V qemu-monitor-command "$dom" '{"execute":"qom-list","arguments":{"path":"/machine/peripheral"}}' \
    | grep -o '"name": *"hostdev[0-9]*"' | grep -o 'hostdev[0-9]*'); do
  p=$($V qemu-monitor-command "$dom" "{\"execute\":\"qom-get\",\"arguments\":{\"path\":\"/machine/peripheral/$id\",\"property\":\"hostdevice\"}}" \
    | sed -n 's/.*"return": *"\([^"]*\)".*/\1/p')
  echo "qom $id hostdevice=$p"
done
pid=$(cat "/run/libvirt/qemu/$dom.pid")
for f in /proc/$pid/fd/*; do l=$(readlink "$f" 2>/dev/null || true); case "$l" in /dev/bus/usb/*) echo "fd $l";; esac; done
