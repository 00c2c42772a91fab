#!/usr/bin/env python3
"""usbpt's real-kernel, real-QEMU lab: the host-side harness.

Boots the lab guest (a Debian bookworm host with a real kernel, udevd, libvirt's QEMU driver and
QEMU, built by lab/image.sh) under QEMU TCG, puts real USB devices into it (configfs gadgets on
dummy_hcd, and QEMU-emulated devices hot-plugged through QMP onto the guest's xHCI), runs
`usbpt up --hypervisor qemu:///system` inside it, and plays the scenarios of docs/lab.md. Each
scenario is checked through usbpt (`--json` CLI) and through what QEMU itself holds (the live
domain XML, QEMU's usb-host objects over QMP, and the /dev/bus/usb files open in the QEMU process).

Usage: lab/run.py --base DIR --payload DIR [--out DIR] [--only S1,S2,…]
(scripts/lab builds both and calls this; run that instead.)

Only the Python standard library is used. The guest has no network: the harness talks to it over
a virtio-serial port (lab/guest/shell.sh) and to the outer QEMU over QMP, both on unix sockets.
"""
import argparse
import base64
import itertools
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET

T0 = time.monotonic()


def log(msg):
    print(f"lab: [{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


class LabError(Exception):
    pass


def connect_unix(path, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class QMP:
    """The outer QEMU's monitor: hot-plugs emulated USB devices into the lab guest."""

    def __init__(self, path):
        self.s = connect_unix(path)
        self.f = self.s.makefile("rwb", buffering=0)
        self.replies = queue.Queue()
        self.lock = threading.Lock()
        json.loads(self.f.readline())  # greeting
        threading.Thread(target=self._reader, daemon=True).start()
        self.cmd("qmp_capabilities")

    def _reader(self):
        try:
            for line in self.f:
                msg = json.loads(line)
                if "event" not in msg:
                    self.replies.put(msg)
        except (OSError, ValueError):
            pass

    def cmd(self, name, **args):
        with self.lock:
            self.f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
            r = self.replies.get(timeout=60)
        if "error" in r:
            raise LabError(f"QMP {name} {args}: {r['error']}")
        return r["return"]


class Guest:
    """The lab guest's command channel (virtio-serial, lab/guest/shell.sh)."""

    def __init__(self, path):
        self.s = connect_unix(path)
        self.f = self.s.makefile("rwb", buffering=0)
        self.lines = queue.Queue()
        self.hellos = queue.Queue()
        self.ids = itertools.count(1)
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self):
        try:
            for raw in self.f:
                line = raw.decode(errors="replace").strip()
                if line.startswith("HELLO "):
                    fields = dict(kv.split("=", 1) for kv in line.split()[1:])
                    self.hellos.put((time.monotonic(), fields))
                elif line:
                    self.lines.put(line)
        except OSError:
            pass

    def wait_hello(self, timeout):
        try:
            return self.hellos.get(timeout=timeout)
        except queue.Empty:
            raise LabError(f"the guest did not greet within {timeout} s (see console.log)")

    def sh(self, script, timeout=120, check=True):
        """Runs `script` with sh in the guest; returns its output (stdout+stderr)."""
        i = str(next(self.ids))
        self.f.write(f"{i} {base64.b64encode(script.encode()).decode()}\n".encode())
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise LabError(f"guest command timed out after {timeout} s: {script[:200]}")
            parts = line.split(" ", 2)
            if parts[0] != i:
                continue  # a late answer to a timed-out command
            rc = int(parts[1])
            out = base64.b64decode(parts[2]).decode(errors="replace") if len(parts) > 2 else ""
            if check and rc != 0:
                raise LabError(f"guest command failed (rc {rc}): {script[:300]}\n{out[-3000:]}")
            return out

    def json(self, script, timeout=60):
        out = self.sh(script, timeout)
        try:
            return json.loads(out)
        except ValueError:
            raise LabError(f"not JSON from `{script}`: {out[:500]}")


def until(what, fn, timeout, interval=0.2):
    """Polls `fn` until it returns a truthy value (the guest offers no event to wait on for
    these: libvirt's live XML and QEMU's open files are read, not pushed). Returns (value, s)."""
    t = time.monotonic()
    deadline = t + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v, time.monotonic() - t
        except LabError as e:
            last = e
        time.sleep(interval)
    raise LabError(f"timed out after {timeout} s waiting for {what}" + (f" ({last})" if last else ""))


# ---------------------------------------------------------------------------------------------
# The lab


USBPT = "env USBPT_DATA_DIR=/var/lib/usbpt usbpt"
VIRSH = "virsh -c qemu:///system"

UNIT = """[Unit]
Description=usbpt up (the lab's whole stack on this host)
After=libvirtd.service usbpt-lab-shell.service
Wants=libvirtd.service
[Service]
Environment=PATH=/lab/bin:/usr/sbin:/usr/bin:/sbin:/bin USBPT_DATA_DIR=/var/lib/usbpt RUST_LOG=info
ExecStart=/lab/bin/usbpt up --host labhost --hypervisor qemu:///system --filter /etc/usbpt/lab-filter.toml
Restart=on-failure
[Install]
WantedBy=multi-user.target
"""

# The gadgets: (name, vid, pid, serial or "-", product, function)
GADGETS = [
    ("key", "0529", "0001", "-", "HASP HL", "acm"),  # licence key without a serial
    ("token", "1050", "0407", "LABTOKEN0042", "YubiKey OTP+FIDO+CCID", "acm"),  # real serial
    ("ftdi1", "0403", "6001", "A50285BI", "FT232R USB UART", "acm"),  # FTDI's default serial…
    ("ftdi2", "0403", "6001", "A50285BI", "FT232R USB UART", "acm"),  # …on two devices at once
    ("kbd", "046d", "c31c", "-", "USB Keyboard", "hid"),  # a keyboard: must be filtered
]

# S7's two copies of one serial device: the same vendor, product and serial, told apart by their
# function (CDC-ACM and HID), so each of the guest's two agents sees only one of them.
TWINS = [
    ("twina", "16d0", "0f9c", "LABTWIN0001", "usbpt twin", "acm"),
    ("twinb", "16d0", "0f9c", "LABTWIN0001", "usbpt twin", "hid"),
]
# labhost's agent never passes a HID device through (its keyboards are filtered anyway): the HID
# twin is for the second agent, labtwin, whose filter allows that and nothing else.
LAB_FILTER = """[[rule]]
action = "deny"
class = "03"
"""
TWIN_FILTER = """default = "deny"

[[rule]]
action = "allow"
vendor = "16d0"
class = "03"
"""


class Lab:
    def __init__(self, args):
        self.args = args
        self.out = args.out
        self.results = []
        self.timings = {}
        self.qemu = None
        self.boot_id = None

    # -- the outer VM ------------------------------------------------------------------------
    def start_vm(self):
        base, out = self.args.base, self.out
        os.makedirs(out, exist_ok=True)
        disk = os.path.join(out, "guest.qcow2")
        if os.path.exists(disk):
            os.unlink(disk)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                        os.path.abspath(os.path.join(base, "rootfs.img")), disk], check=True)
        payload = os.path.join(out, "payload.img")
        if os.path.exists(payload):
            os.unlink(payload)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "usbpt-payload", "-d", self.args.payload,
                        payload, "256M"], check=True, stdout=subprocess.DEVNULL)
        self.qmp_path = os.path.join(out, "qmp.sock")
        self.lab_path = os.path.join(out, "lab.sock")
        for p in (self.qmp_path, self.lab_path):
            if os.path.exists(p):
                os.unlink(p)
        cmd = [
            "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-M", "q35", "-m", "4096",
            "-smp", "2", "-display", "none", "-nic", "none", "-no-user-config",
            "-kernel", os.path.join(base, "vmlinuz"), "-initrd", os.path.join(base, "initrd.img"),
            "-append", "root=/dev/vda rw console=ttyS0 quiet dummy_hcd.num=8 "
                       "systemd.show_status=0 usbcore.autosuspend=-1",
            "-drive", f"file={disk},format=qcow2,if=virtio",
            "-drive", f"file={payload},format=raw,if=virtio,readonly=on",
            "-serial", f"file:{os.path.join(out, 'console.log')}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=lab,path={self.lab_path},server=on,wait=off",
            "-device", "virtserialport,chardev=lab,name=org.usbpt.lab",
            # the guest's own xHCI with a hub: QEMU-emulated devices are hot-plugged behind it
            "-device", "qemu-xhci,id=xhci,p2=8,p3=8",
            "-device", "usb-hub,bus=xhci.0,port=1,id=hub",
        ]
        log("booting the lab guest (QEMU TCG, 2 vCPUs, 4 GiB)")
        self.t_boot = time.monotonic()
        self.qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                     stdout=open(os.path.join(out, "qemu.log"), "w"),
                                     stderr=subprocess.STDOUT)
        self.qmp = QMP(self.qmp_path)
        self.guest = Guest(self.lab_path)
        t, hello = self.guest.wait_hello(300)
        self.boot_id = hello["boot_id"]
        self.timings["boot to command channel (s)"] = round(t - self.t_boot, 1)
        log(f"guest up in {t - self.t_boot:.1f} s (boot id {self.boot_id[:8]}…, "
            f"guest uptime {hello['uptime']} s)")

    def stop_vm(self):
        if self.qemu and self.qemu.poll() is None:
            try:
                self.qmp.cmd("quit")
            except Exception:
                pass
            try:
                self.qemu.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.qemu.kill()

    # -- helpers -------------------------------------------------------------------------------
    def sh(self, script, timeout=120, check=True):
        return self.guest.sh(script, timeout, check)

    def devices(self, all_=False):
        doc = self.guest.json(f"{USBPT} devices --json" + (" --all" if all_ else ""))
        return doc["devices"] if isinstance(doc, dict) and "devices" in doc else doc

    def server(self, name):
        return self.guest.json(f"{USBPT} server show {name} --json")

    def sysfs_devices(self):
        """The kernel's own list: every USB device with its address and identity."""
        out = self.sh(r"""for d in /sys/bus/usb/devices/*; do [ -f "$d/devnum" ] || continue
  printf '%s %s %s %s %s %s %s\n' "$(basename $d)" "$(cat $d/busnum)" "$(cat $d/devnum)" \
    "$(cat $d/idVendor)" "$(cat $d/idProduct)" "$(cat $d/bDeviceClass)" "$(cat $d/serial 2>/dev/null || echo -)"
done""")
        rows = []
        for line in out.splitlines():
            port, bus, dev, vid, pid, cls, serial = line.split(" ", 6)
            rows.append(dict(port=port, bus=int(bus), devnum=int(dev), vendor=vid, product=pid,
                             cls=cls, serial=serial))
        return rows

    def gadget_addr(self, name):
        """(bus, devnum) of a plugged gadget, from sysfs."""
        path = self.sh(f"gadget sysfs {name}").strip()
        if not path:
            return None
        bus, dev = self.sh(f"cat {path}/busnum {path}/devnum").split()
        return int(bus), int(dev)

    def domain_of(self, server_doc):
        sid = server_doc.get("id") or server_doc.get("server", {}).get("id")
        return f"usbpt-{sid}"

    def holds(self, dom):
        """What the running domain holds: {xml: {(bus,dev)}, qom: {paths}, fd: {paths}}."""
        xml = self.sh(f"{VIRSH} dumpxml {dom}")
        held = {"xml": set(), "qom": set(), "fd": set()}
        for hd in ET.fromstring(xml).iter("hostdev"):
            a = hd.find("source/address")
            if a is not None:
                held["xml"].add((int(a.get("bus")), int(a.get("device"))))
        for line in self.sh(f"holds {dom}").splitlines():
            kind, rest = line.split(" ", 1)
            if kind == "qom":
                held["qom"].add(rest.split("hostdevice=", 1)[1])
            elif kind == "fd":
                held["fd"].add(rest)
        return held

    @staticmethod
    def path_of(addr):
        return f"/dev/bus/usb/{addr[0]:03d}/{addr[1]:03d}"

    def holds_addr(self, dom, addr):
        """True when libvirt, QEMU's object and QEMU's open files all say `addr`."""
        h = self.holds(dom)
        p = self.path_of(addr)
        return addr in h["xml"] and p in h["qom"] and p in h["fd"]

    def events(self):
        out = self.sh(f"timeout 15 {USBPT} events tail --from-start --json 2>/dev/null; true", 30)
        evs = []
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("{"):
                evs.append(json.loads(line))
        return evs

    def record(self, sid, title, ok, detail, **extra):
        self.results.append(dict(id=sid, title=title, ok=ok, detail=detail, **extra))
        log(f"{sid} {'PASS' if ok else 'FAIL'}: {title} — {detail}")

    # -- setup ---------------------------------------------------------------------------------
    def setup(self):
        t = time.monotonic()
        self.sh("modprobe dummy_hcd && modprobe libcomposite && "
                "(mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config)")
        for g in GADGETS:
            self.sh("gadget create " + " ".join(f"'{x}'" for x in g))
        self.sh(f"mkdir -p /etc/usbpt && cat > /etc/usbpt/lab-filter.toml <<'F'\n{LAB_FILTER}F\n"
                f"cat > /etc/usbpt/twin-filter.toml <<'F'\n{TWIN_FILTER}F\n")
        self.sh(f"cat > /etc/systemd/system/usbpt.service <<'UNIT'\n{UNIT}UNIT\n"
                "systemctl daemon-reload && systemctl enable usbpt.service 2>&1")
        # libvirt-guests: shut guests down at host shutdown (briefly: the lab's domains sit in
        # firmware and never act on ACPI), and never start them at boot itself, which would use
        # the previous boot's USB addresses: usbpt's agent resumes its domains (docs/libvirt.md).
        self.sh("printf 'ON_BOOT=ignore\\nON_SHUTDOWN=shutdown\\nSHUTDOWN_TIMEOUT=10\\n' "
                "> /etc/default/libvirt-guests")
        self.sh("systemctl start libvirtd", 120)
        self.sh(f"{VIRSH} version >/dev/null", 60)
        self.timings["libvirtd up (s)"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        self.sh("systemctl start usbpt.service")
        until("usbpt's API", lambda: self.guest.sh(f"{USBPT} devices --json", 30, check=False)
              .lstrip().startswith(("{", "[")), 120, 0.5)
        self.timings["usbpt up answers (s)"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        for g in GADGETS:
            self.sh(f"gadget plug {g[0]}")
        until("the gadgets in sysfs", lambda: all(self.gadget_addr(g[0]) for g in GADGETS), 60)
        self.timings["5 gadgets enumerated (s)"] = round(time.monotonic() - t, 1)
        log(f"setup done: {self.timings}")

    # -- scenarios -----------------------------------------------------------------------------
    def s0_inventory(self):
        """The view equals the kernel's enumeration, with the filter applied."""
        def settled():
            devs = [d for d in self.devices() if d.get("status") != "invalidated"]
            return devs if len(devs) >= 4 else None
        devs, _ = until("4 passthrough candidates in the view", settled, 60)
        self.inventory_check("S0", "inventory: view = kernel enumeration, keyboard filtered", devs)

    def inventory_check(self, sid, title, devs=None):
        if devs is None:
            devs = [d for d in self.devices() if d.get("status") != "invalidated"]
        sysfs = [d for d in self.sysfs_devices()
                 if d["vendor"] != "1d6b" and d["cls"] != "09" and d["vendor"] != "046d"]
        view = sorted((d["bus"], d["devnum"], d["vendor_id"], d["product_id"]) for d in devs)
        kern = sorted((d["bus"], d["devnum"], d["vendor"], d["product"]) for d in sysfs)
        kbd = [d for d in devs if d.get("vendor_id") == "046d"]
        ok = view == kern and not kbd
        self.record(sid, title, ok,
                    f"{len(view)} devices in the view, {len(kern)} candidates in sysfs; "
                    f"keyboard {'filtered' if not kbd else 'NOT filtered'}"
                    + ("" if view == kern else f"; view {view} != sysfs {kern}"))
        return ok

    def s1_boot(self):
        self.sh(f"{USBPT} flavor create key-flavor --usb vendor=0529,product=0001 >/dev/null")
        t = time.monotonic()
        self.sh(f"{USBPT} boot vm1 --flavor key-flavor >/dev/null")
        addr = self.gadget_addr("key")

        def running():
            doc = self.server("vm1")
            return doc if json.dumps(doc).find("ACTIVE") >= 0 else None
        doc, _ = until("vm1 ACTIVE", running, 180, 0.5)
        self.dom1 = self.domain_of(doc)
        _, _ = until(f"QEMU holding the key at {addr}", lambda: self.holds_addr(self.dom1, addr), 60)
        self.timings["boot vm1 → QEMU holds the key (s)"] = round(time.monotonic() - t, 1)
        info = self.sh(f"{VIRSH} qemu-monitor-command --hmp {self.dom1} 'info usb'")
        self.record("S1", "boot: a flavor binds the serial-less key; the running QEMU holds it", True,
                    f"key at bus {addr[0]} dev {addr[1]}: live XML, QEMU's usb-host object and its "
                    f"open /dev/bus/usb file agree; info usb: {info.strip().splitlines()[-1:]}")

    def replug_timed(self, gadget, dom=None):
        """Re-plugs a gadget in the guest; (old devnum, new devnum, ms to enumerated, ms to held)
        measured inside the guest from the UDC bind (lab/guest/replug.sh)."""
        out = self.sh(f"replug {gadget} {dom or ''}", 90).split()
        held = None if out[3] in ("-", "timeout") else int(out[3])
        if out[3] == "timeout":
            raise LabError(f"re-plugged {gadget} ({out[0]} → {out[1]}) but QEMU did not open the "
                           f"new device within 30 s")
        return int(out[0]), int(out[1]), int(out[2]), held

    def kinds(self, evs=None):
        """Each event's kind; both layouts of a discovery count as DeviceDiscovered."""
        return [self.body_of(e)[0] for e in (evs if evs is not None else self.events())]

    def s2_replug(self):
        runs = [self.replug_timed("key", self.dom1) for _ in range(3)]
        new = self.gadget_addr("key")
        ok = self.holds_addr(self.dom1, new)
        h = self.holds(self.dom1)
        stale = sorted(p for p in h["fd"] | h["qom"] if p != self.path_of(new))
        evs = self.events()
        lineage = self.lineage_of("key")
        mine = [e for e in evs if self.lineage_in(e) == lineage]
        k = self.kinds(mine)
        held = [r[3] for r in runs]
        ok = ok and not stale and k.count("DeviceReattached") >= 3 and \
            k.count("DeviceInvalidated") >= 3
        self.timings["re-plug → running QEMU holds the new device (ms), 3 runs"] = held
        self.record("S2", "re-plug: the running VM gets the key back at its new address, no restart",
                    ok, f"devnums {' → '.join(str(r[0]) for r in runs)} → {runs[-1][1]}; re-plug → "
                    f"kernel enumerated: {', '.join(str(r[2]) for r in runs)} ms; → QEMU holds the "
                    f"new device: {', '.join(str(x) for x in held)} ms; lineage {lineage[:8]} has "
                    f"{k.count('DeviceInvalidated')} DeviceInvalidated, "
                    f"{k.count('DeviceDiscovered')} DeviceDiscovered, "
                    f"{k.count('DeviceReattached')} DeviceReattached; stale: {stale or 'none'}",
                    replug_ms=held)

    def lineage_of(self, gadget):
        addr = self.gadget_addr(gadget)
        for d in self.devices():
            if (d["bus"], d["devnum"]) == addr and d["status"] != "invalidated":
                return d["lineage_id"]
        raise LabError(f"{gadget} at {addr} is not in the view")

    @staticmethod
    def body_of(e):
        """An event's body; a DeviceDiscoveredV2's is its discovery (the fingerprint beside it)."""
        kind, body = next(iter(e["event"]["body"].items()))
        if kind == "DeviceDiscoveredV2" and isinstance(body, dict):
            return "DeviceDiscovered", body["discovery"]
        return kind, body

    @classmethod
    def lineage_in(cls, e):
        _, body = cls.body_of(e)
        return body.get("lineage_id") if isinstance(body, dict) else None

    def wait_server(self, name, pred, what, timeout=180):
        doc, _ = until(f"{name}: {what}", lambda: (d := self.server(name)) and pred(d) and d,
                       timeout, 0.5)
        return doc

    @staticmethod
    def state(doc):
        return (doc.get("server") or doc).get("status") or (doc.get("server") or doc).get("state")

    def s3_strict(self):
        """A strict binding: the re-plugged device is released, not re-attached."""
        self.sh(f"{USBPT} flavor create token-strict --usb vendor=1050,product=0407,follow=strict "
                ">/dev/null")
        self.sh(f"{USBPT} boot vm2 --flavor token-strict >/dev/null")
        doc = self.wait_server("vm2", lambda d: "ACTIVE" in json.dumps(d), "ACTIVE")
        self.dom2 = self.domain_of(doc)
        addr = self.gadget_addr("token")
        until(f"QEMU holding the token at {addr}", lambda: self.holds_addr(self.dom2, addr), 60)
        before = len(self.events())
        old, new, _, _ = self.replug_timed("token")
        # wait for the release: the reactor's DeviceReleased for the token's old enumeration
        evs, _ = until("DeviceReleased of the strict token",
                       lambda: (e := self.events()) and "DeviceReleased" in self.kinds(e[before:]) and e,
                       60, 0.5)
        after = evs[before:]
        reattached = [e for e in after if "DeviceReattached" in e["event"]["body"]]
        newpath = self.path_of((addr[0], new))
        h = self.holds(self.dom2)
        ok = not reattached and newpath not in h["fd"] and (addr[0], new) not in h["xml"]
        self.record("S3", "strict binding: the re-plugged token is released and not re-attached", ok,
                    f"token devnum {old} → {new}; events after the re-plug: "
                    f"{', '.join(self.kinds(after))}; vm2 holds {sorted(h['fd']) or 'nothing'} "
                    f"(live XML {sorted(h['xml']) or 'no address'})")

    def s6_missing_at_start(self):
        """A device missing when its server starts: the domain starts without it and gets it
        when it appears."""
        # The token: a serial lineage that is the same after a re-plug. (Not an FTDI: the pair
        # shares a serial, so an FTDI plugged back while the other is present takes a port
        # lineage by design, docs/identity.md, and is rightly not the same device.)
        self.sh(f"{USBPT} flavor create token-follow --usb vendor=1050,product=0407,count=1 "
                ">/dev/null")
        self.sh(f"{USBPT} boot vm3 --flavor token-follow >/dev/null")
        doc = self.wait_server("vm3", lambda d: "ACTIVE" in json.dumps(d), "ACTIVE")
        self.dom3 = self.domain_of(doc)
        gadget = "token"
        addr0 = self.gadget_addr(gadget)
        until(f"vm3's QEMU holding the token at {addr0}", lambda: self.holds_addr(self.dom3, addr0), 60)
        self.sh(f"{USBPT} stop vm3 >/dev/null")
        self.wait_server("vm3", lambda d: "SHUTOFF" in json.dumps(d), "SHUTOFF", 120)
        self.sh(f"gadget unplug {gadget}")
        until(f"{gadget} gone from the view",
              lambda: not any(d["vendor_id"] == "1050" and d["status"] != "invalidated"
                              for d in self.devices()), 60, 0.5)
        self.sh(f"{USBPT} start vm3 >/dev/null")
        self.wait_server("vm3", lambda d: "ACTIVE" in json.dumps(d), "ACTIVE", 120)
        running = "running" in self.sh(f"{VIRSH} domstate {self.dom3}")
        h0 = self.holds(self.dom3)
        t = time.monotonic()
        self.sh(f"gadget plug {gadget}")
        addr, _ = until(f"{gadget} back", lambda: self.gadget_addr(gadget), 30, 0.1)
        _, dt = until(f"vm3's QEMU holding {gadget} at {addr}",
                      lambda: self.holds_addr(self.dom3, addr), 60, 0.2)
        ok = running and not h0["fd"]
        self.record("S6", "a device missing at server start: the domain starts without it and "
                    "gets it when it appears", ok,
                    f"vm3 started while {gadget} was unplugged: domain running={running}, held "
                    f"{sorted(h0['fd']) or 'nothing'}; plugged back at {addr}: QEMU holds it "
                    f"{time.monotonic() - t:.1f} s later")

    # -- S5: flap storm while other devices appear ---------------------------------------------
    def s5_flap_storm(self, cycles=50):
        """50 fast re-plugs of the held key while QEMU-emulated devices are hot-plugged into the
        guest's xHCI through QMP: the final view equals a fresh enumeration, nothing is lost or
        doubled, and nothing gone is left attached."""
        before = len(self.events())
        key_port = os.path.basename(self.sh("gadget sysfs key").strip())
        # udevd's own account of the storm, to hold usbpt's against: every usb_device add/remove
        self.sh("(udevadm monitor --udev --subsystem-match=usb/usb_device > /tmp/storm.udev 2>&1 &"
                " echo $! > /tmp/storm.pid)")
        t = time.monotonic()
        # the burst: QEMU-emulated USB storage with serials, behind the emulated hub
        for i in range(1, 5):
            self.qmp.cmd("blockdev-add", driver="null-co", **{"node-name": f"null{i}"},
                         size=16 * 1024 * 1024)
        self.sh(f"(for i in $(seq {cycles}); do gadget replug key; done; echo done > /tmp/flap.done) "
                ">/tmp/flap.log 2>&1 &")
        for i in range(1, 5):
            self.qmp.cmd("device_add", driver="usb-storage", drive=f"null{i}", id=f"stor{i}",
                         bus="xhci.0", port=f"1.{i}", serial=f"LABSTOR{i:04d}", removable=True)
        until("the flap storm to end", lambda: "done" in self.sh("cat /tmp/flap.done 2>/dev/null; true"),
              300, 0.5)
        storm_s = time.monotonic() - t

        def settled():
            devs = [d for d in self.devices() if d["status"] != "invalidated"]
            view = sorted((d["bus"], d["devnum"], d["vendor_id"], d["product_id"]) for d in devs)
            kern = sorted((d["bus"], d["devnum"], d["vendor"], d["product"])
                          for d in self.sysfs_devices()
                          if d["vendor"] not in ("1d6b", "046d") and d["cls"] != "09")
            return (view, kern) if view == kern else None
        (view, kern), _ = until("the view to equal sysfs", settled, 120, 1)
        # Read once the storm has settled: "done" can be written while the last re-plug is
        # still binding, when the key has no address yet.
        addr, _ = until("the key enumerated after the storm", lambda: self.gadget_addr("key"),
                        60, 0.5)
        lineage = self.lineage_of("key")

        def flaps():
            return [k for k, b in map(self.body_of, self.events()[before:])
                    if k in ("PortFlapping", "PortFlappingCleared")
                    and isinstance(b, dict) and b.get("lineage_id") == lineage]
        # Issue 18: a storm this fast is a flapping episode (more than 5 enumerations in 60 s):
        # the agent does not re-attach the key until 120 s pass without an enumeration, then
        # re-attaches its last one once (PortFlappingCleared).
        if "PortFlapping" in flaps():
            until("the key's PortFlappingCleared", lambda: "PortFlappingCleared" in flaps(), 300, 1)
        flap_kinds = flaps()
        _, _ = until(f"vm1's QEMU holding the key at {addr}",
                     lambda: self.holds_addr(self.dom1, addr), 60, 0.5)
        # the view equals sysfs: udevd has broadcast every event of the storm, to usbpt and to
        # the monitor alike
        udev = self.sh("kill $(cat /tmp/storm.pid); cat /tmp/storm.udev")
        udev_adds = sum(1 for l in udev.splitlines() if re.search(rf"\badd\s+\S*/{re.escape(key_port)} \(usb\)", l))
        udev_removes = sum(1 for l in udev.splitlines() if re.search(rf"\bremove\s+\S*/{re.escape(key_port)} \(usb\)", l))
        evs = self.events()
        storm = evs[before:]
        ids = [e["event"]["event_id"] for e in evs]
        dup_ids = len(ids) - len(set(ids))
        seqs = [e["seq"] for e in evs]
        gaps = [b for a, b in zip(seqs, seqs[1:]) if b != a + 1]
        disc = [b for k, b in map(self.body_of, storm) if k == "DeviceDiscovered"]
        inval = [b for k, b in map(self.body_of, storm) if k == "DeviceInvalidated"]
        key_disc = [d["device_id"] for d in disc if d["lineage_id"] == lineage]
        key_inval = [d["device_id"] for d in inval if d["lineage_id"] == lineage]
        # every enumeration of the key that began in the storm ended exactly once, but the last
        live = set(key_disc) - set(key_inval)
        twice = len(key_inval) - len(set(key_inval))
        h = self.holds(self.dom1)
        stale = sorted(p for p in h["fd"] | h["qom"] if p != self.path_of(addr))
        stor = [d for d in self.devices() if d["vendor_id"] == "46f4" and d["status"] != "invalidated"]
        verify = self.sh(f"{USBPT} replay --verify 2>&1; echo rc=$?", 300)
        # every enumeration udevd announced is one usbpt discovered, and every removal one it ended
        ok = (len(live) == 1 and twice == 0 and dup_ids == 0 and not gaps and not stale
              and len(stor) == 4 and "rc=0" in verify
              and len(key_disc) == udev_adds and len(set(key_inval)) == udev_removes
              and flap_kinds in ([], ["PortFlapping", "PortFlappingCleared"]))
        self.timings[f"flap storm: {cycles} re-plugs + 4 QMP hot-plugs (s)"] = round(storm_s, 1)
        self.record("S5", f"flap storm: {cycles} re-plugs of the held key while 4 emulated devices "
                    "appear", ok,
                    f"{len(storm)} events; flapping: {' then '.join(flap_kinds) or 'none'}; "
                    f"udevd: {udev_adds} adds, {udev_removes} removes of the key; "
                    f"usbpt: {len(key_disc)} enumerations discovered, "
                    f"{len(key_inval)} invalidated ({twice} twice), {len(live)} live; view = sysfs "
                    f"({len(view)} devices, 4 QEMU usb-storage among them: {len(stor)}); vm1 holds "
                    f"the key at {addr} (stale: {stale or 'none'}); event ids unique: "
                    f"{dup_ids == 0}, stream gaps: {gaps or 'none'}; replay --verify: "
                    f"{verify.strip().splitlines()[-2] if len(verify.strip().splitlines()) > 1 else verify.strip()}")

    # -- S7: one serial on two hosts -------------------------------------------------------------
    def alarms(self, all_=False):
        doc = self.guest.json(f"{USBPT} alarms --json" + (" --all" if all_ else ""))
        return doc["alarms"] if isinstance(doc, dict) and "alarms" in doc else doc

    def s7_conflict(self):
        """The same serial on two hosts at once (a clone): a second agent in the guest, `labtwin`,
        sees only the HID copy, `labhost` only the ACM copy. The projector raises
        `lineage_conflict` naming both hosts, the first copy is blocked from new claims and the
        second held back; unplugging the second clears it, as an event."""
        for g in TWINS:
            self.sh("gadget create " + " ".join(f"'{x}'" for x in g))
        added = self.sh(f"{USBPT} creds add-host labtwin")
        m = re.search(r"--control-key (\S+)", added)
        if not m:
            raise LabError(f"creds add-host printed no control key: {added.strip()}")
        self.sh("systemctl reset-failed usbpt-twin 2>/dev/null; "
                "systemd-run --unit usbpt-twin -p Environment=PATH=/lab/bin:/usr/sbin:/usr/bin:/sbin:/bin "
                "-p Environment=USBPT_DATA_DIR=/var/lib/usbpt-twin -p Environment=RUST_LOG=info "
                "/lab/bin/usbpt agent --host labtwin --hypervisor test:///default "
                "--filter /etc/usbpt/twin-filter.toml "
                f"--creds /var/lib/usbpt/creds/agent-labtwin.nk --control-key {m.group(1)}")
        self.sh("gadget plug twina")

        def twin_on(host):
            return [d for d in self.devices() if d.get("vendor_id") == "16d0"
                    and d.get("host") == host and d.get("status") != "invalidated"]
        first, _ = until("the ACM twin in the view on labhost", lambda: twin_on("labhost"), 60, 0.5)
        lineage = first[0]["lineage_id"]
        serial_kind = first[0].get("lineage_kind") == "serial"
        # labtwin's agent discovers the HID twin whether it is plugged before or after the agent
        # has started (its start-up reconcile, or the hotplug)
        self.sh("gadget plug twinb")

        def raised():
            a = [x for x in self.alarms() if x["lineage_id"] == lineage
                 and x["kind"] == "lineage_conflict" and x["active"]]
            return a or None
        try:
            alarm, t_raise = until("lineage_conflict on the twins' lineage", raised, 120, 0.5)
        except LabError as e:
            twin_log = self.sh("journalctl -u usbpt-twin --no-pager | tail -n 20", 30, check=False)
            raise LabError(f"{e}; labtwin's agent: {twin_log.strip()[-1500:]}")
        alarm = alarm[0]
        blocked = [d for d in twin_on("labhost") if d.get("blocked")]
        held_out = not twin_on("labtwin")  # the newcomer is held back, not listed
        self.sh("gadget unplug twinb")

        def cleared():
            a = [x for x in self.alarms(all_=True) if x["lineage_id"] == lineage
                 and x["kind"] == "lineage_conflict"]
            return a if a and not any(x["active"] for x in a) else None
        done, _ = until("the conflict to clear", cleared, 60, 0.5)
        free = [d for d in twin_on("labhost") if not d.get("blocked")]
        verify = self.sh(f"{USBPT} replay --verify 2>&1; echo rc=$?", 300)
        self.sh("gadget unplug twina; systemctl stop usbpt-twin; true")
        ok = (serial_kind and sorted(alarm["hosts"]) == ["labhost", "labtwin"]
              and len(blocked) == 1 and held_out
              and len(free) == 1 and "rc=0" in verify)
        self.record("S7", "one serial on two hosts: lineage_conflict raised naming both, the copy "
                    "blocked, cleared by unplugging", ok,
                    f"serial lineage: {serial_kind}; raised {t_raise:.1f} s after the plug; "
                    f"alarm hosts {alarm['hosts']}, reason: {alarm['reason']}; labhost's copy "
                    f"blocked: {len(blocked) == 1}; labtwin's held back: {held_out}; cleared: "
                    f"{done[0].get('cleared', {}).get('reason')}; free again: {len(free) == 1}; "
                    f"replay --verify rc=0: {'rc=0' in verify}")

    # -- S4: a real reboot -----------------------------------------------------------------------
    def s4_reboot(self):
        """Reboot the guest (new boot id, devnums renumbered): the servers' domains run again with
        their devices, through usbpt alone."""
        old_boot = self.boot_id
        old_addr = self.gadget_addr("key")
        t = time.monotonic()
        self.sh("(sleep 1; systemctl reboot) >/dev/null 2>&1 &")
        tb, hello = self.guest.wait_hello(600)
        self.boot_id = hello["boot_id"]
        self.timings["reboot: command to channel (s)"] = round(tb - t, 1)
        # the physical devices come back: the gadgets are recreated (configfs lives in memory)
        self.sh("modprobe dummy_hcd && modprobe libcomposite && "
                "(mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config)")
        for g in GADGETS:
            self.sh("gadget create " + " ".join(f"'{x}'" for x in g))
        until("usbpt's API after the reboot",
              lambda: self.guest.sh(f"{USBPT} devices --json", 30, check=False)
              .lstrip().startswith(("{", "[")), 300, 1)
        for g in GADGETS:
            self.sh(f"gadget plug {g[0]}")
        addr, _ = until("the key enumerated", lambda: self.gadget_addr("key"), 60)
        _, _ = until(f"vm1's domain running and holding the key at {addr}",
                     lambda: "running" in self.sh(f"{VIRSH} domstate {self.dom1}", check=False)
                     and self.holds_addr(self.dom1, addr), 300, 1)
        self.timings["reboot: command to vm1 holding the key again (s)"] = round(time.monotonic() - t, 1)
        docs = self.guest.json(f"{USBPT} server list --json")
        docs = docs.get("servers", docs) if isinstance(docs, dict) else docs
        states = {d.get("name"): d.get("status") for d in docs}
        evs = self.events()
        rebooted = [e for e in evs if "DeviceInvalidated" in e["event"]["body"]
                    and e["event"]["body"]["DeviceInvalidated"].get("reason") == "HostRebooted"]
        resumed = [e for e in evs if "ServerStateChanged" in e["event"]["body"]
                   and "host rebooted" in e["event"]["body"]["ServerStateChanged"]["detail"]]
        ok = self.boot_id != old_boot and bool(rebooted) and len(resumed) >= 1
        self.record("S4", "reboot: new boot id, devnums renumbered; the server's domain runs with "
                    "its device again", ok,
                    f"boot id {old_boot[:8]} → {self.boot_id[:8]}; key {old_addr} → {addr}; "
                    f"{len(rebooted)} DeviceInvalidated(HostRebooted); {len(resumed)} domains "
                    f"resumed by the agent; vm1 holds the key (live XML, QOM, fd); states {states}")

    def p1_package(self):
        """The Debian package installed with dpkg -i into this clean Debian guest; its units
        started by systemd with the guest's real udev; readiness through sd_notify."""
        deb = "/lab/pkg/usbpt.deb"
        t = time.monotonic()
        self.sh(f"DEBIAN_FRONTEND=noninteractive dpkg -i {deb} 2>&1", 180)
        self.timings["P1 dpkg -i (s)"] = round(time.monotonic() - t, 1)
        # A single-machine install beside the lab's `usbpt up`: its own nats-server (the
        # packaged usbpt-nats unit, the lab's nats-server binary), port and host name.
        self.sh("install -m 0755 /lab/bin/nats-server /usr/bin/nats-server && "
                "cat > /etc/usbpt/nats-server.conf <<'EOF'\n"
                "server_name: usbpt-pkg\nlisten: 127.0.0.1:4322\n"
                "jetstream { store_dir: /var/lib/usbpt/nats, sync_interval: always }\nEOF\n"
                "cat > /etc/usbpt/usbpt.toml <<'EOF'\n"
                "[nats]\nurls = [\"nats://127.0.0.1:4322\"]\ninsecure = true\n"
                "[agent]\nhost = \"pkghost\"\nhypervisor = \"test:///default\"\n"
                "[serve]\nlisten = \"127.0.0.1:8790\"\n"
                "[api]\nurl = \"http://127.0.0.1:8790\"\n"
                "token_file = \"/etc/usbpt/api-token\"\n"
                "[projector]\nconsumer = \"usbpt-serve-pkghost\"\nEOF")
        check = self.sh("/usr/bin/usbpt config check 2>&1")
        units = " ".join(f"/usr/lib/systemd/system/usbpt-{u}.service"
                         for u in ("agent", "serve", "projector", "nats", "commands@p1"))
        # --man=no: the guest has no man-db to resolve Documentation=man:… (the package's man
        # pages are checked on the build machine).
        verify = self.sh(f"systemd-analyze verify --man=no {units} 2>&1; echo rc=$?")
        exposure = self.sh("for u in agent serve; do systemd-analyze security usbpt-$u.service "
                           "2>/dev/null | sed -n 's/.*Overall exposure level for //p'; done",
                           check=False)
        # Type=notify: `systemctl start` returns once the process sent READY=1.
        t = time.monotonic()
        # usbpt-nats is Type=simple (nats-server does not speak sd_notify): its port is polled.
        started = self.sh("systemctl start usbpt-nats.service && bash -c 'for i in $(seq 100); "
                          "do (exec 3<>/dev/tcp/127.0.0.1/4322) 2>/dev/null && exit 0; sleep 0.1; "
                          "done; exit 1' && systemctl start usbpt-serve.service "
                          "usbpt-agent.service 2>&1; echo rc=$?", 180)
        if not started.strip().endswith("rc=0"):
            journal = self.sh("journalctl -u usbpt-nats -u usbpt-serve -u usbpt-agent --no-pager "
                              "-o short-monotonic | tail -n 40", check=False)
            raise LabError(f"the units did not start: {started.strip()}\n{journal}")
        self.timings["P1 units ready (s)"] = round(time.monotonic() - t, 1)
        state = self.sh("systemctl show -p ActiveState -p SubState -p StatusText -p User "
                        "usbpt-serve.service usbpt-agent.service")
        hv = until("pkghost in the packaged API", lambda: self.guest.json(
            "/usr/bin/usbpt hypervisor show pkghost --json", 30), 60)[0]
        journal = self.sh("journalctl -u usbpt-agent -u usbpt-serve --no-pager -o cat | tail -n 5",
                          check=False)
        self.sh("systemctl stop usbpt-agent usbpt-serve usbpt-nats", 60, check=False)
        statuses = re.findall(r"StatusText=(.*)", state)
        candidates = re.search(r"(\d+) passthrough candidates", state)
        ok = ("ok (" in check and verify.strip().endswith("rc=0")
              and state.count("ActiveState=active") == 2 and state.count("User=usbpt") == 2
              and bool(candidates) and int(candidates.group(1)) >= 1
              and hv.get("hypervisor", hv).get("hypervisor_hostname", "pkghost") == "pkghost")
        self.record("P1", "the .deb in a clean Debian: dpkg -i, config check, systemd-analyze "
                    "verify, units started by systemd (Type=notify) as user usbpt", ok,
                    f"config check: {check.strip()}; verify: {verify.strip()}; exposure "
                    f"{', '.join(exposure.split()) or '?'}; status {statuses}; "
                    f"journal tail: {journal.strip()[-300:]}")

    def run(self):
        only = set(self.args.only.split(",")) if self.args.only else None
        scenarios = [("S0", self.s0_inventory), ("S1", self.s1_boot), ("S2", self.s2_replug),
                     ("S3", self.s3_strict), ("S6", self.s6_missing_at_start),
                     ("S5", self.s5_flap_storm), ("S7", self.s7_conflict),
                     ("S4", self.s4_reboot),
                     ("P1", self.p1_package)]
        try:
            self.start_vm()
            self.setup()
            for sid, fn in scenarios:
                if only and sid not in only:
                    continue
                try:
                    fn()
                except LabError as e:
                    self.record(sid, fn.__name__, False, str(e))
                except Exception as e:  # a harness defect fails the scenario, not the run
                    self.record(sid, fn.__name__, False,
                                f"{type(e).__name__} in the harness: {e}")
        except (LabError, OSError, subprocess.SubprocessError) as e:
            self.record("setup", "boot and setup", False, f"{type(e).__name__}: {e}")
        finally:
            try:
                if self.qemu and self.qemu.poll() is None:
                    self.sh("journalctl -u usbpt --no-pager > /tmp/usbpt.log; true", 30, check=False)
                    log_text = self.sh("tail -n 400 /tmp/usbpt.log", 30, check=False)
                    with open(os.path.join(self.out, "usbpt-guest.log"), "w") as f:
                        f.write(log_text)
            except Exception:
                pass
            self.stop_vm()
        return self.report()

    def report(self):
        passed = sum(1 for r in self.results if r["ok"])
        failed = len(self.results) - passed
        with open(os.path.join(self.out, "result.json"), "w") as f:
            json.dump(dict(results=self.results, timings=self.timings,
                           total_s=round(time.monotonic() - T0, 1)), f, indent=1)
        print()
        print("| scenario | result | detail |")
        print("|---|---|---|")
        for r in self.results:
            print(f"| {r['id']} {r['title']} | {'pass' if r['ok'] else 'FAIL'} | {r['detail']} |")
        print()
        for k, v in self.timings.items():
            print(f"  {k}: {v}")
        print(f"\nlab: {passed} passed, {failed} failed")
        return 0 if failed == 0 and passed > 0 else 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--payload", required=True)
    ap.add_argument("--out", default="target/lab")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    sys.exit(Lab(args).run())


if __name__ == "__main__":
    main()
