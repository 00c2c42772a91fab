#!/bin/sh
# Real USB devices in the lab guest: configfs gadgets (libcomposite) on dummy_hcd's virtual
# controllers, each gadget on its own UDC (= its own bus). Any VID/PID/serial.
#   gadget create NAME VID PID SERIAL|- PRODUCT [acm|hid|mass]   (SERIAL "-" = no serial string)
#   gadget plug NAME     bind to the UDC named after the gadget's slot (a new devnum each time)
#   gadget unplug NAME
#   gadget replug NAME   unplug, then plug
#   gadget sysfs NAME    the device's sysfs path on the host side (empty while unplugged)
set -e
C=/sys/kernel/config/usb_gadget
[ -d $C ] || { modprobe libcomposite; mount -t configfs none /sys/kernel/config 2>/dev/null || true; }
cmd=$1 name=$2; G=$C/$name
udc_of() { cat "/run/usbpt-lab/udc.$1"; }
case $cmd in
  create)
    mkdir -p /run/usbpt-lab
    # the Nth gadget takes the Nth free UDC
    used=$(cat /run/usbpt-lab/udc.* 2>/dev/null || true)
    for u in $(ls /sys/class/udc | sort -V); do
      echo "$used" | grep -qx "$u" || { echo "$u" > "/run/usbpt-lab/udc.$name"; break; }
    done
    [ -s "/run/usbpt-lab/udc.$name" ] || { echo "no free UDC for $name" >&2; exit 1; }
    mkdir "$G"; echo "0x$3" > "$G/idVendor"; echo "0x$4" > "$G/idProduct"
    mkdir "$G/strings/0x409"
    [ "$5" = - ] || printf '%s' "$5" > "$G/strings/0x409/serialnumber"
    echo "usbpt lab" > "$G/strings/0x409/manufacturer"; printf '%s' "$6" > "$G/strings/0x409/product"
    mkdir "$G/configs/c.1"
    case "${7:-acm}" in
      hid) # a boot keyboard: interface class 3, subclass 1, protocol 1
        F=$G/functions/hid.usb0; mkdir "$F"
        echo 1 > "$F/protocol"; echo 1 > "$F/subclass"; echo 8 > "$F/report_length"
        printf '\x05\x01\x09\x06\xa1\x01\x05\x07\x19\xe0\x29\xe7\x15\x00\x25\x01\x75\x01\x95\x08\x81\x02\x95\x01\x75\x08\x81\x03\x95\x05\x75\x01\x05\x08\x19\x01\x29\x05\x91\x02\x95\x01\x75\x03\x91\x03\x95\x06\x75\x08\x15\x00\x25\x65\x05\x07\x19\x00\x29\x65\x81\x00\xc0' > "$F/report_desc"
        ln -s "$F" "$G/configs/c.1/" ;;
      mass)
        dd if=/dev/zero of="/run/usbpt-lab/$name.img" bs=1M count=2 2>/dev/null
        mkdir "$G/functions/mass_storage.0"; echo "/run/usbpt-lab/$name.img" > "$G/functions/mass_storage.0/lun.0/file"
        ln -s "$G/functions/mass_storage.0" "$G/configs/c.1/" ;;
      *) mkdir "$G/functions/acm.usb0"; ln -s "$G/functions/acm.usb0" "$G/configs/c.1/" ;;
    esac ;;
  plug)   udc_of "$name" > "$G/UDC" ;;
  unplug) echo "" > "$G/UDC" ;;
  replug) echo "" > "$G/UDC"; udc_of "$name" > "$G/UDC" ;;
  sysfs)
    # dummy_udc.N is paired with dummy_hcd.N, whose root hub has one port: the device is BUS-1
    n=$(udc_of "$name" | sed 's/.*\.//')
    for d in /sys/bus/usb/devices/usb*; do
      case "$(readlink -f "$d")" in */dummy_hcd.$n/*) b=$(cat "$d/busnum"); [ -e "/sys/bus/usb/devices/$b-1" ] && echo "/sys/bus/usb/devices/$b-1";; esac
    done ;;
  *) echo "usage: gadget create|plug|unplug|replug|sysfs NAME …" >&2; exit 2 ;;
esac
