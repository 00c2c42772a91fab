#!/bin/sh
# replug GADGET [DOMAIN]: re-plugs a gadget (UDC unbind + bind) and prints
#   OLD_DEVNUM NEW_DEVNUM MS_TO_ENUMERATED MS_TO_HELD
# where the times run from the moment the bind returned: to the kernel's new devnum in sysfs,
# and to the running QEMU of DOMAIN having the new /dev/bus/usb file open ("-" without DOMAIN,
# "timeout" after 30 s). Polls at 10 ms: neither sysfs nor /proc offers an event to wait on.
g=$1 dom=$2
sys=$(gadget sysfs "$g"); port=$(basename "$sys"); bus=$(cat "$sys/busnum"); old=$(cat "$sys/devnum")
now() { date +%s%N; }
gadget replug "$g"; t0=$(now)
i=0
while :; do
  n=$(cat "/sys/bus/usb/devices/$port/devnum" 2>/dev/null)
  [ -n "$n" ] && [ "$n" != "$old" ] && break
  i=$((i+1)); [ $i -gt 3000 ] && { echo "$old - timeout timeout"; exit 1; }; sleep 0.01
done
t1=$(now)
if [ -z "$dom" ]; then echo "$old $n $(( (t1-t0)/1000000 )) -"; exit 0; fi
pid=$(cat "/run/libvirt/qemu/$dom.pid")
want=$(printf '/dev/bus/usb/%03d/%03d' "$bus" "$n")
i=0
while ! ls -l "/proc/$pid/fd" 2>/dev/null | grep -q " $want\$"; do
  i=$((i+1)); [ $i -gt 3000 ] && { echo "$old $n $(( (t1-t0)/1000000 )) timeout"; exit 1; }; sleep 0.01
done
t2=$(now)
echo "$old $n $(( (t1-t0)/1000000 )) $(( (t2-t0)/1000000 ))"
