//! Real libudev under umockdev, for agent tests: a testbed of sysfs devices loaded from
//! recordings or built in code, and uevents injected into it.
//!
//! umockdev works by preloading `libumockdev-preload.so` into the processes that use udev *and*
//! the process that injects uevents. [`umockdev_test`] arranges both: run outside the preload,
//! it re-runs the current test binary for just this test under `umockdev-wrapper`; inside, it
//! runs the body, whose [`Testbed`] sets `UMOCKDEV_DIR` for the children it then spawns (the
//! agent inherits the preload and the testbed).
//!
//! Recipe notes (from the spike that proved it): a remove uevent must be sent before the device
//! is removed (`remove_device` sends none; [`Testbed::unplug`] does both); several recordings can
//! only share a testbed when their syspaths, kernel names and device nodes do not overlap
//! ([`rebus`] moves one to another bus, [`merge`] drops the hubs they share); bursts need
//! `net.unix.max_dgram_qlen` ≥ 1000 (`scripts/setup` raises it).
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt::Write as _;
use std::future::Future;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

#[repr(C)]
struct UMockdevTestbed {
    _opaque: [u8; 0],
}

#[repr(C)]
struct GError {
    domain: u32,
    code: c_int,
    message: *mut c_char,
}

#[link(name = "umockdev")]
extern "C" {
    fn umockdev_testbed_new() -> *mut UMockdevTestbed;
    fn umockdev_testbed_get_root_dir(tb: *mut UMockdevTestbed) -> *mut c_char;
    fn umockdev_testbed_add_from_string(
        tb: *mut UMockdevTestbed,
        data: *const c_char,
        err: *mut *mut GError,
    ) -> c_int;
    fn umockdev_testbed_remove_device(tb: *mut UMockdevTestbed, syspath: *const c_char);
    fn umockdev_testbed_uevent(
        tb: *mut UMockdevTestbed,
        devpath: *const c_char,
        action: *const c_char,
    );
    fn umockdev_testbed_set_attribute(
        tb: *mut UMockdevTestbed,
        devpath: *const c_char,
        name: *const c_char,
        value: *const c_char,
    );
}
#[link(name = "glib-2.0")]
extern "C" {
    fn g_free(p: *mut c_void);
    fn g_error_free(e: *mut GError);
}
#[link(name = "gobject-2.0")]
extern "C" {
    fn g_object_unref(p: *mut c_void);
}

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).with_context(|| format!("{s:?} contains a NUL byte"))
}

/// A umockdev testbed. Creating it sets `UMOCKDEV_DIR` in this process (children spawned
/// afterwards inherit it); dropping it removes the testbed directory. Not `Send`: use it from the
/// thread that made it.
#[derive(Debug)]
pub struct Testbed {
    raw: *mut UMockdevTestbed,
}

impl Testbed {
    /// A new, empty testbed. Call only inside the preload (see [`umockdev_test`]).
    pub fn new() -> Result<Self> {
        if !in_preload() {
            bail!(
                "a umockdev testbed needs libumockdev-preload (run the test through umockdev_test)"
            );
        }
        // SAFETY: no arguments; returns a new GObject reference owned by the Testbed.
        let raw = unsafe { umockdev_testbed_new() };
        if raw.is_null() {
            bail!("umockdev_testbed_new failed");
        }
        Ok(Self { raw })
    }

    /// The testbed's root directory (its `sys/` is what udev sees as `/sys`).
    pub fn root_dir(&self) -> String {
        // SAFETY: `raw` is a live testbed; the returned string is newly allocated and freed by
        // `take_gstring`.
        unsafe { take_gstring(umockdev_testbed_get_root_dir(self.raw)) }
    }

    /// Adds the devices of a recording (`umockdev-record` format). umockdev sends an `add`
    /// uevent for each device it adds, children first; nobody hears them unless a monitor is
    /// open (load a host's devices before the agent starts, or plug them while it runs).
    pub fn add_recording(&self, text: &str) -> Result<()> {
        let data = cstring(text)?;
        let mut err: *mut GError = std::ptr::null_mut();
        // SAFETY: `raw` is live, `data` is a valid C string for the call, `err` is a valid
        // out-pointer that umockdev sets (to an owned GError) only on failure.
        let ok = unsafe { umockdev_testbed_add_from_string(self.raw, data.as_ptr(), &mut err) };
        if ok != 0 {
            return Ok(());
        }
        if err.is_null() {
            bail!("umockdev could not load the recording");
        }
        // SAFETY: `err` is the GError umockdev allocated; its message is a valid C string until
        // the error is freed, which happens right after copying it.
        let message = unsafe {
            let m = CStr::from_ptr((*err).message)
                .to_string_lossy()
                .into_owned();
            g_error_free(err);
            m
        };
        Err(anyhow!("umockdev could not load the recording: {message}"))
    }

    /// Adds a recording read from a file.
    pub fn add_file(&self, path: &Path) -> Result<()> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        self.add_recording(&text)
            .with_context(|| format!("load {}", path.display()))
    }

    /// Sends a uevent (`add`, `remove`, `change`, `bind`, `unbind`) for a device of the testbed.
    pub fn uevent(&self, syspath: &str, action: &str) -> Result<()> {
        let (sp, ac) = (cstring(syspath)?, cstring(action)?);
        // SAFETY: `raw` is live and both strings are valid C strings for the call.
        unsafe { umockdev_testbed_uevent(self.raw, sp.as_ptr(), ac.as_ptr()) };
        Ok(())
    }

    /// Sets a sysfs attribute (no uevent).
    pub fn set_attribute(&self, syspath: &str, name: &str, value: &str) -> Result<()> {
        let (sp, n, v) = (cstring(syspath)?, cstring(name)?, cstring(value)?);
        // SAFETY: `raw` is live and the strings are valid C strings for the call.
        unsafe { umockdev_testbed_set_attribute(self.raw, sp.as_ptr(), n.as_ptr(), v.as_ptr()) };
        Ok(())
    }

    /// The device at `syspath` and the devices below it (interfaces, HID nodes …), deepest
    /// first, as syspaths.
    fn device_tree(&self, syspath: &str) -> Result<Vec<String>> {
        let root = self.root_dir();
        let top = std::path::PathBuf::from(format!("{root}{syspath}"));
        if !top.join("uevent").is_file() {
            bail!("{syspath} is not a device of the testbed");
        }
        let mut found = Vec::new();
        let mut stack = vec![top];
        while let Some(dir) = stack.pop() {
            if dir.join("uevent").is_file() {
                found.push(dir.clone());
            }
            for entry in
                std::fs::read_dir(&dir).with_context(|| format!("list {}", dir.display()))?
            {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    stack.push(entry.path());
                }
            }
        }
        found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        Ok(found
            .into_iter()
            .filter_map(|p| {
                p.to_str()
                    .and_then(|s| s.strip_prefix(&root))
                    .map(str::to_owned)
            })
            .collect())
    }

    /// Removes a device and everything below it without any uevent: a change made while nobody
    /// listened (the agent stopped, the host rebooted). Children go first, so the same device can
    /// be added again at the same place.
    pub fn remove_silently(&self, syspath: &str) -> Result<()> {
        for path in self.device_tree(syspath)? {
            let sp = cstring(&path)?;
            // SAFETY: `raw` is live and `sp` is a valid C string for the call.
            unsafe { umockdev_testbed_remove_device(self.raw, sp.as_ptr()) };
        }
        Ok(())
    }

    /// Hot-unplugs a device: a `remove` uevent for it and each device below it (deepest first,
    /// as the kernel sends them), and they leave sysfs.
    pub fn unplug(&self, syspath: &str) -> Result<()> {
        for path in self.device_tree(syspath)? {
            self.uevent(&path, "remove")?;
            let sp = cstring(&path)?;
            // SAFETY: `raw` is live and `sp` is a valid C string for the call.
            unsafe { umockdev_testbed_remove_device(self.raw, sp.as_ptr()) };
        }
        Ok(())
    }

    /// Hot-plugs a device built in code: its interfaces then the device enter sysfs, each with
    /// its `add` uevent (so the device's event finds its interfaces, as udevd delivers it).
    /// Returns its syspath.
    pub fn plug(&self, device: &UsbDeviceSpec) -> Result<String> {
        self.add_recording(&device.recording())?;
        Ok(device.syspath())
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // SAFETY: `raw` is the reference `umockdev_testbed_new` gave us, released once here.
        unsafe { g_object_unref(self.raw.cast()) }
    }
}

/// # Safety
/// `p` must be null or a string allocated by glib that nothing else frees.
unsafe fn take_gstring(p: *mut c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: per the contract, `p` is a valid glib string we own.
    unsafe {
        let s = CStr::from_ptr(p).to_string_lossy().into_owned();
        g_free(p.cast());
        s
    }
}

/// True inside `umockdev-wrapper` (the preload library is loaded).
pub fn in_preload() -> bool {
    std::env::var("LD_PRELOAD").is_ok_and(|v| v.contains("libumockdev-preload"))
}

/// Runs a test body under umockdev. Outside the preload it re-runs this test binary for exactly
/// `name` under `umockdev-wrapper` (bounded by `timeout` from coreutils) and fails if that run
/// fails; inside, it runs `body` on a current-thread tokio runtime.
pub fn umockdev_test<F, Fut>(name: &str, body: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    const LIMIT_SECS: &str = "300";
    if !in_preload() {
        let exe = std::env::current_exe()
            .unwrap_or_else(|e| panic!("cannot find the test binary's path: {e}"));
        let status = std::process::Command::new("timeout")
            .args(["--kill-after=10", LIMIT_SECS, "umockdev-wrapper"])
            .arg(exe)
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run timeout/umockdev-wrapper ({e}); scripts/setup installs umockdev")
            });
        assert!(
            status.success(),
            "{name} failed under umockdev-wrapper ({status}); its output is above"
        );
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("cannot build a tokio runtime: {e}"));
    if let Err(e) = runtime.block_on(body()) {
        panic!("{name}: {e:#}");
    }
}

/// Makes a child process die (SIGKILL) when the thread that spawned it ends, so an agent
/// started by a test never outlives it, whatever way the test ends.
pub fn die_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl, which
    // is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Moves a recording from bus `from` to bus `to` (syspaths, kernel names, bus numbers, device
/// nodes), so it can share a testbed with recordings of bus `from`.
pub fn rebus(text: &str, from: u16, to: u16) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut l = line.to_owned();
        if let Some(rest) = l.strip_prefix("P: ") {
            let moved: Vec<String> = rest
                .split('/')
                .map(|seg| rebus_name(seg, from, to))
                .collect();
            l = format!("P: {}", moved.join("/"));
        } else if l.starts_with("E: BUSNUM=") {
            l = format!("E: BUSNUM={to:03}");
        } else if l.starts_with("A: busnum=") {
            l = format!("A: busnum={to}\\n");
        } else if l.starts_with("E: ID_PATH") || l.starts_with("E: ID_FOR_SEAT") {
            // Left as recorded: informational only.
        }
        let old_node = format!("bus/usb/{from:03}/");
        let new_node = format!("bus/usb/{to:03}/");
        l = l.replace(&old_node, &new_node);
        if let Some(rest) = l.strip_prefix("L: port=") {
            l = format!(
                "L: port={}",
                rest.split('/')
                    .map(|s| rebus_name(s, from, to))
                    .collect::<Vec<_>>()
                    .join("/")
            );
        }
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// `usb1` → `usb3`, `1-2.3` → `3-2.3`, `1-2.3:1.0` → `3-2.3:1.0`, `1-0:1.0` → `3-0:1.0`.
fn rebus_name(seg: &str, from: u16, to: u16) -> String {
    if seg == format!("usb{from}") {
        return format!("usb{to}");
    }
    let prefix = format!("{from}-");
    match seg.strip_prefix(&prefix) {
        Some(rest) if rest.starts_with(|c: char| c.is_ascii_digit()) => format!("{to}-{rest}"),
        _ => seg.to_owned(),
    }
}

/// Merges recordings into one: a device (syspath) recorded in several keeps its first record,
/// and a device node already taken by another device is dropped from later ones.
pub fn merge(texts: &[&str]) -> String {
    let mut seen_paths = std::collections::HashSet::new();
    let mut seen_nodes = std::collections::HashSet::new();
    let mut blocks = Vec::new();
    for text in texts {
        for block in text.split("\n\n") {
            let lines: Vec<&str> = block.lines().filter(|l| !l.is_empty()).collect();
            let Some(first) = lines.first() else { continue };
            if !first.starts_with("P: ") || !seen_paths.insert((*first).to_owned()) {
                continue;
            }
            let nodes: Vec<String> = lines
                .iter()
                .filter_map(|l| {
                    l.strip_prefix("N: ")
                        .map(|n| n.split('=').next().unwrap_or(n).to_owned())
                        .or_else(|| l.strip_prefix("E: DEVNAME=/dev/").map(str::to_owned))
                })
                .collect();
            let clash = nodes.iter().any(|n| seen_nodes.contains(n));
            seen_nodes.extend(nodes);
            let kept: Vec<&str> = lines
                .into_iter()
                .filter(|l| !(clash && (l.starts_with("N: ") || l.starts_with("E: DEVNAME="))))
                .collect();
            blocks.push(kept.join("\n"));
        }
    }
    let mut out = blocks.join("\n\n");
    out.push('\n');
    out
}

/// The four recorded devices as one host, from the recordings in `dir`: the YubiKey
/// (`fido2.umockdev`) moved to bus 3 at 3-2.3, the phone (1-1.5.2.4), the camera (1-1.5.2.3) and
/// the keyboard (1-1.5.4.2) behind bus 1's shared hubs.
pub fn four_recordings(dir: &Path) -> Result<String> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
    };
    let fido = rebus(&read("fido2.umockdev")?, 1, 3);
    let phone = read("sony-xperia-mini-pro.umockdev")?;
    let camera = read("canon-powershot-sx200.umockdev")?;
    let keyboard = read("usbkbd.umockdev")?;
    Ok(merge(&[&fido, &phone, &camera, &keyboard]))
}

/// Syspaths (as udev reports them under umockdev) of the devices in [`four_recordings`].
pub mod recorded {
    pub const BUS1: &str = "/sys/devices/pci0000:00/0000:00:1a.0/usb1";
    pub const BUS3: &str = "/sys/devices/pci0000:00/0000:00:08.1/0000:05:00.3/usb3";
    /// The hub the YubiKey sits behind (3-2).
    pub const HUB_3_2: &str = "/sys/devices/pci0000:00/0000:00:08.1/0000:05:00.3/usb3/3-2";
    /// The hub the phone and the camera sit behind (1-1.5.2).
    pub const HUB_1_1_5_2: &str = "/sys/devices/pci0000:00/0000:00:1a.0/usb1/1-1/1-1.5/1-1.5.2";
    pub const YUBIKEY: &str = "/sys/devices/pci0000:00/0000:00:08.1/0000:05:00.3/usb3/3-2/3-2.3";
    pub const PHONE: &str = "/sys/devices/pci0000:00/0000:00:1a.0/usb1/1-1/1-1.5/1-1.5.2/1-1.5.2.4";
    pub const CAMERA: &str =
        "/sys/devices/pci0000:00/0000:00:1a.0/usb1/1-1/1-1.5/1-1.5.2/1-1.5.2.3";
    pub const KEYBOARD: &str =
        "/sys/devices/pci0000:00/0000:00:1a.0/usb1/1-1/1-1.5/1-1.5.4/1-1.5.4.2";
}

/// The records of the device at `syspath` (as udev names it, `/sys/devices/…`) and of every
/// device below it, taken from `recording`, re-enumerated: renamed to kernel name `new_name`
/// when given (the same device in another port of the same hub), with `devnum`, and without
/// device nodes. Add the result to put the recorded device back (a re-plug, a reboot, a move).
pub fn relocate(
    recording: &str,
    syspath: &str,
    new_name: Option<&str>,
    devnum: u16,
) -> Result<String> {
    let dev = syspath.strip_prefix("/sys").unwrap_or(syspath);
    let (parent, name) = dev
        .rsplit_once('/')
        .with_context(|| format!("{syspath} has no parent"))?;
    let target = new_name.unwrap_or(name);
    let rename = |p: &str| -> String {
        let rest = &p[dev.len()..];
        format!(
            "{parent}/{target}{}",
            rest.replace(&format!("/{name}:"), &format!("/{target}:"))
        )
    };
    let mut blocks = Vec::new();
    for block in recording.split("\n\n") {
        let lines: Vec<&str> = block.lines().filter(|l| !l.is_empty()).collect();
        let Some(path) = lines.first().and_then(|l| l.strip_prefix("P: ")) else {
            continue;
        };
        let top = path == dev;
        if !(top || path.starts_with(&format!("{dev}/"))) {
            continue;
        }
        let mut out = vec![format!("P: {}", rename(path))];
        for l in &lines[1..] {
            if l.starts_with("N: ") || l.starts_with("E: DEVNAME=") {
                continue;
            }
            if top && l.starts_with("A: devnum=") {
                out.push(format!("A: devnum={devnum}\\n"));
            } else if top && l.starts_with("E: DEVNUM=") {
                out.push(format!("E: DEVNUM={devnum:03}"));
            } else if top && l.starts_with("A: devpath=") {
                let port = target.split_once('-').map_or(target, |(_, p)| p);
                out.push(format!("A: devpath={port}\\n"));
            } else {
                out.push((*l).to_owned());
            }
        }
        blocks.push(out.join("\n"));
    }
    if blocks.is_empty() {
        bail!("{syspath} is not in the recording");
    }
    let mut text = blocks.join("\n\n");
    text.push('\n');
    Ok(text)
}

/// A USB device to add to a testbed, written as a umockdev recording (no device node).
#[derive(Debug, Clone)]
pub struct UsbDeviceSpec {
    /// The parent's syspath as umockdev names it (`/sys/devices/…/usb3/3-2`).
    pub parent: String,
    /// Kernel name: `3-2.4`.
    pub name: String,
    pub busnum: u16,
    pub devnum: u16,
    pub vendor: u16,
    pub product: u16,
    pub serial: Option<String>,
    pub device_class: u8,
    /// (class, subclass, protocol) per interface.
    pub interfaces: Vec<(u8, u8, u8)>,
    pub manufacturer: Option<String>,
    pub product_name: Option<String>,
    pub vendor_db: Option<String>,
    pub model_db: Option<String>,
    pub speed: String,
    pub version: String,
    /// The sysfs `descriptors` file (binary), when the device should have one.
    pub descriptors: Option<Vec<u8>>,
}

impl UsbDeviceSpec {
    /// A device with the given ids at `parent`/`name`; the rest plain (USB 2.0, 480 Mbit/s).
    pub fn new(
        parent: &str,
        name: &str,
        busnum: u16,
        devnum: u16,
        vendor: u16,
        product: u16,
    ) -> Self {
        Self {
            parent: parent.trim_end_matches('/').to_owned(),
            name: name.to_owned(),
            busnum,
            devnum,
            vendor,
            product,
            serial: None,
            device_class: 0,
            interfaces: Vec::new(),
            manufacturer: None,
            product_name: None,
            vendor_db: None,
            model_db: None,
            speed: "480".to_owned(),
            version: " 2.00".to_owned(),
            descriptors: None,
        }
    }
    /// The raw descriptors the kernel would cache in sysfs `descriptors`.
    pub fn descriptors(mut self, bytes: &[u8]) -> Self {
        self.descriptors = Some(bytes.to_vec());
        self
    }
    pub fn serial(mut self, s: &str) -> Self {
        self.serial = Some(s.to_owned());
        self
    }
    pub fn interface(mut self, class: u8, subclass: u8, protocol: u8) -> Self {
        self.interfaces.push((class, subclass, protocol));
        self
    }
    pub fn class(mut self, class: u8) -> Self {
        self.device_class = class;
        self
    }
    pub fn strings(mut self, manufacturer: &str, product: &str) -> Self {
        self.manufacturer = Some(manufacturer.to_owned());
        self.product_name = Some(product.to_owned());
        self
    }
    pub fn hwdb(mut self, vendor: &str, model: &str) -> Self {
        self.vendor_db = Some(vendor.to_owned());
        self.model_db = Some(model.to_owned());
        self
    }
    /// The same device at another address (a re-plug or a reboot).
    pub fn renumbered(&self, devnum: u16) -> Self {
        Self {
            devnum,
            ..self.clone()
        }
    }
    /// The same device plugged elsewhere.
    pub fn moved(&self, parent: &str, name: &str, devnum: u16) -> Self {
        Self {
            parent: parent.trim_end_matches('/').to_owned(),
            name: name.to_owned(),
            devnum,
            ..self.clone()
        }
    }

    /// Its syspath as udev reports it under umockdev (`/sys/devices/…`).
    pub fn syspath(&self) -> String {
        let parent = self.parent.strip_prefix("/sys").unwrap_or(&self.parent);
        format!("/sys{parent}/{}", self.name)
    }

    /// The umockdev recording: the interfaces first, then the device (children before parents,
    /// as `umockdev-record` writes them).
    pub fn recording(&self) -> String {
        let parent = self.parent.strip_prefix("/sys").unwrap_or(&self.parent);
        let dev = format!("{parent}/{}", self.name);
        let mut out = String::new();
        for (i, (c, s, p)) in self.interfaces.iter().enumerate() {
            let _ = writeln!(out, "P: {dev}/{}:1.{i}", self.name);
            let _ = writeln!(out, "E: DEVTYPE=usb_interface\nE: SUBSYSTEM=usb");
            let _ = writeln!(out, "E: INTERFACE={c}/{s}/{p}");
            let _ = writeln!(out, "A: bInterfaceNumber={i:02x}\\n");
            let _ = writeln!(out, "A: bInterfaceClass={c:02x}\\n");
            let _ = writeln!(out, "A: bInterfaceSubClass={s:02x}\\n");
            let _ = writeln!(out, "A: bInterfaceProtocol={p:02x}\\n");
            out.push('\n');
        }
        let ifs: String = self
            .interfaces
            .iter()
            .map(|(c, s, p)| format!("{c:02x}{s:02x}{p:02x}:"))
            .collect();
        let _ = writeln!(out, "P: {dev}");
        let _ = writeln!(
            out,
            "E: DEVTYPE=usb_device\nE: SUBSYSTEM=usb\nE: DRIVER=usb"
        );
        let _ = writeln!(
            out,
            "E: BUSNUM={:03}\nE: DEVNUM={:03}",
            self.busnum, self.devnum
        );
        let _ = writeln!(out, "E: PRODUCT={:x}/{:x}/100", self.vendor, self.product);
        let _ = writeln!(
            out,
            "E: ID_VENDOR_ID={:04x}\nE: ID_MODEL_ID={:04x}",
            self.vendor, self.product
        );
        let _ = writeln!(out, "E: ID_USB_INTERFACES=:{ifs}");
        // What udevd's usb_id builtin adds (an agent that reads the event after the device is
        // gone describes it from these).
        let _ = writeln!(out, "E: TYPE={}/0/0", self.device_class);
        if let Some(s) = &self.serial {
            let _ = writeln!(out, "E: ID_SERIAL_SHORT={}", s.replace(' ', "_"));
        }
        if let Some(m) = &self.manufacturer {
            let _ = writeln!(out, "E: ID_VENDOR_ENC={}", m.replace(' ', "\\x20"));
        }
        if let Some(p) = &self.product_name {
            let _ = writeln!(out, "E: ID_MODEL_ENC={}", p.replace(' ', "\\x20"));
        }
        if let Some(v) = &self.vendor_db {
            let _ = writeln!(out, "E: ID_VENDOR_FROM_DATABASE={v}");
        }
        if let Some(m) = &self.model_db {
            let _ = writeln!(out, "E: ID_MODEL_FROM_DATABASE={m}");
        }
        let _ = writeln!(
            out,
            "A: busnum={}\\n\nA: devnum={}\\n",
            self.busnum, self.devnum
        );
        let _ = writeln!(
            out,
            "A: idVendor={:04x}\\n\nA: idProduct={:04x}\\n",
            self.vendor, self.product
        );
        let _ = writeln!(out, "A: bDeviceClass={:02x}\\n", self.device_class);
        let _ = writeln!(out, "A: bNumInterfaces={:2}\\n", self.interfaces.len());
        let _ = writeln!(
            out,
            "A: speed={}\\n\nA: version={}\\n",
            self.speed, self.version
        );
        if let Some(s) = &self.serial {
            let _ = writeln!(out, "A: serial={s}\\n");
        }
        if let Some(m) = &self.manufacturer {
            let _ = writeln!(out, "A: manufacturer={m}\\n");
        }
        if let Some(p) = &self.product_name {
            let _ = writeln!(out, "A: product={p}\\n");
        }
        if let Some(d) = &self.descriptors {
            // `H:` is umockdev's binary attribute, in hex (as `umockdev-record` writes it).
            let hex: String = d.iter().map(|b| format!("{b:02X}")).collect();
            let _ = writeln!(out, "H: descriptors={hex}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebus_moves_names_nodes_and_numbers() {
        let text = "P: /devices/pci0000:00/0000:05:00.3/usb1/1-2/1-2.3/1-2.3:1.0\nE: DEVTYPE=usb_interface\n\nP: /devices/pci0000:00/0000:05:00.3/usb1/1-2/1-2.3\nN: bus/usb/001/012=1201\nE: DEVNAME=/dev/bus/usb/001/012\nE: BUSNUM=001\nA: busnum=1\\n\nL: port=../1-2:1.0/1-2-port3\nA: devpath=2.3\\n\n";
        let moved = rebus(text, 1, 3);
        assert!(
            moved.contains("P: /devices/pci0000:00/0000:05:00.3/usb3/3-2/3-2.3/3-2.3:1.0\n"),
            "{moved}"
        );
        assert!(moved.contains("N: bus/usb/003/012=1201"), "{moved}");
        assert!(moved.contains("E: DEVNAME=/dev/bus/usb/003/012"), "{moved}");
        assert!(
            moved.contains("E: BUSNUM=003") && moved.contains("A: busnum=3\\n"),
            "{moved}"
        );
        assert!(moved.contains("L: port=../3-2:1.0/3-2-port3"), "{moved}");
        // PCI addresses that merely contain "1-" are left alone.
        assert_eq!(rebus_name("0000:00:1a.0", 1, 3), "0000:00:1a.0");
    }

    #[test]
    fn merge_keeps_the_first_record_of_a_shared_device_and_unique_nodes() {
        let a = "P: /devices/x/usb1\nN: bus/usb/001/001\nA: devnum=1\\n\n\nP: /devices/x/usb1/1-1\nA: devnum=2\\n\n";
        let b = "P: /devices/x/usb1\nA: devnum=9\\n\n\nP: /devices/x/usb1/1-2\nN: bus/usb/001/001\nE: DEVNAME=/dev/bus/usb/001/001\nA: devnum=3\\n\n";
        let m = merge(&[a, b]);
        assert_eq!(m.matches("P: /devices/x/usb1\n").count(), 1);
        assert!(!m.contains("devnum=9"));
        assert!(m.contains("P: /devices/x/usb1/1-2\nA: devnum=3"), "{m}");
    }

    #[test]
    fn relocate_renames_and_renumbers_a_recorded_subtree() {
        let rec = "P: /devices/x/usb1/1-2/1-2.3/1-2.3:1.0/hid/hidraw5\nN: hidraw5\nE: DEVNAME=/dev/hidraw5\n\nP: /devices/x/usb1/1-2/1-2.3/1-2.3:1.0\nA: bInterfaceClass=03\\n\n\nP: /devices/x/usb1/1-2/1-2.3\nN: bus/usb/001/012\nE: DEVNUM=012\nA: devnum=12\\n\nA: devpath=2.3\\n\n\nP: /devices/x/usb1/1-2\nA: devnum=2\\n\n";
        let moved =
            relocate(rec, "/sys/devices/x/usb1/1-2/1-2.3", Some("1-2.1"), 40).expect("relocate");
        assert!(
            moved.contains("P: /devices/x/usb1/1-2/1-2.1/1-2.1:1.0/hid/hidraw5\n"),
            "{moved}"
        );
        assert!(
            moved.contains(
                "P: /devices/x/usb1/1-2/1-2.1\nE: DEVNUM=040\nA: devnum=40\\n\nA: devpath=2.1\\n"
            ),
            "{moved}"
        );
        assert!(
            !moved.contains("N: ") && !moved.contains("DEVNAME") && !moved.contains("devnum=2\\n"),
            "{moved}"
        );
        assert!(relocate(rec, "/sys/devices/x/usb1/1-9", None, 3).is_err());
    }

    #[test]
    fn spec_recording_lists_interfaces_before_the_device() {
        let spec = UsbDeviceSpec::new("/sys/devices/x/usb3/3-2", "3-2.4", 3, 14, 0x1050, 0x0407)
            .serial("123")
            .interface(3, 1, 1)
            .interface(0x0b, 0, 0);
        assert_eq!(spec.syspath(), "/sys/devices/x/usb3/3-2/3-2.4");
        let r = spec.recording();
        let iface = r
            .find("P: /devices/x/usb3/3-2/3-2.4/3-2.4:1.1")
            .expect("interface");
        let dev = r.find("P: /devices/x/usb3/3-2/3-2.4\n").expect("device");
        assert!(iface < dev);
        assert!(r.contains("E: ID_USB_INTERFACES=:030101:0b0000:"), "{r}");
        assert!(r.contains("A: serial=123\\n"), "{r}");
    }
}
