#!/bin/sh
# The lab guest's end of the host harness's command channel (virtio-serial port org.usbpt.lab).
# Protocol, one line each way: the host sends "ID BASE64(shell script)"; the guest runs it with
# sh and answers "ID RC BASE64(stdout+stderr)". A greeting "HELLO boot_id=… uptime=…" is sent
# when the channel opens, so the host learns of every (re)boot.
PORT=/dev/virtio-ports/org.usbpt.lab
i=0
while [ ! -e "$PORT" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
export PATH=/lab/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
exec 3<>"$PORT"
printf 'HELLO boot_id=%s uptime=%s\n' "$(cat /proc/sys/kernel/random/boot_id)" "$(cut -d' ' -f1 /proc/uptime)" >&3
while read -r id b64 <&3; do
  out=$(printf '%s' "$b64" | base64 -d | sh 2>&1); rc=$?
  printf '%s %s %s\n' "$id" "$rc" "$(printf '%s' "$out" | base64 -w0)" >&3
done
