//! Where observations come from. [`DeviceSource`] is the boundary: the agent's loop takes
//! snapshots and awaits observations from it, and knows nothing of udev. [`UdevSource`] is the
//! real one and **the only udev code in usbpt**; [`SimulatedSource`] lets the demo (and tests)
//! feed devices through the same resolver and outbox.
//!
//! udev specifics: the monitor listens on `usb`/`usb_device` and is opened *before* the
//! enumeration, so nothing that happens in between is missed (the resolver treats a repeated
//! `add` of a known enumeration as nothing, and ignores a `remove` of an older devnum). Its
//! receive buffer is enlarged as systemd-udevd does; when the socket still overflows (ENOBUFS),
//! the source reports [`SourceEvent::Lost`] and the agent rescans and reconciles.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};

use thiserror::Error;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;
use tracing::{debug, warn};
use udev::AsRaw;
use usbpt_schemas::{Fingerprint, PortPath, ProductId, UsbAddress, UsbDescriptors, VendorId};

use crate::observation::{Action, Interface, Observation, UsbDevice};

#[derive(Debug, Error)]
pub enum SourceError {
    #[error("udev: cannot {what}: {source}")]
    Udev {
        what: &'static str,
        source: io::Error,
    },
    #[error("the device source closed")]
    Closed,
}

fn udev_err(what: &'static str) -> impl FnOnce(io::Error) -> SourceError {
    move |source| SourceError::Udev { what, source }
}

/// What a source reports when awaited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent {
    /// Observations, in the order they happened.
    Observed(Vec<Observation>),
    /// Events may have been lost (and `Observed` ones before the loss were delivered): the
    /// agent must rescan. The reason is for the log.
    Lost(String),
}

/// A source of USB device observations.
pub trait DeviceSource: Send {
    /// Every USB device present now.
    fn snapshot(&mut self) -> Result<Vec<UsbDevice>, SourceError>;
    /// The next observations (waits for them; never polls).
    fn next(&mut self) -> impl Future<Output = Result<SourceEvent, SourceError>> + Send;
}

/// Receive buffer asked for the monitor socket (systemd-udevd asks 128 MiB for its own; an
/// agent that only watches USB devices needs far less).
pub const RECEIVE_BUFFER: i32 = 8 * 1024 * 1024;
/// Observations handed over per batch (one redb commit each).
pub const BATCH: usize = 256;

/// The udev monitor and enumerator.
pub struct UdevSource {
    monitor: AsyncFd<udev::MonitorSocket>,
    /// A loss noticed while handing over a batch: reported by the next call.
    loss_pending: Option<String>,
}

impl std::fmt::Debug for UdevSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdevSource").finish_non_exhaustive()
    }
}

impl UdevSource {
    /// Opens the monitor (listening from now on). Must run inside a tokio runtime.
    pub fn open() -> Result<Self, SourceError> {
        let socket = udev::MonitorBuilder::new()
            .and_then(|b| b.match_subsystem_devtype("usb", "usb_device"))
            .and_then(|b| b.listen())
            .map_err(udev_err("open a monitor on usb/usb_device"))?;
        // SAFETY: `socket` is a live monitor owned by this function; libudev only reads the
        // pointer and sets SO_RCVBUF(FORCE) on the monitor's own fd.
        let r = unsafe {
            udev::ffi::udev_monitor_set_receive_buffer_size(socket.as_raw(), RECEIVE_BUFFER)
        };
        if r < 0 {
            warn!(
                bytes = RECEIVE_BUFFER,
                error = %io::Error::from_raw_os_error(-r),
                "cannot enlarge the udev monitor's receive buffer; a burst may overflow it (the agent then rescans)"
            );
        } else {
            debug!(bytes = RECEIVE_BUFFER, "udev monitor receive buffer set");
        }
        // SAFETY: the fd belongs to the `MonitorSocket` moved into the `AsyncFd`; it stays open
        // and is the same for as long as the `AsyncFd` owns the socket (it is closed only when
        // the socket is dropped, with the `AsyncFd`).
        let monitor = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
            .map_err(|e| SourceError::Udev {
                what: "register the monitor with tokio",
                source: io::Error::other(e.to_string()),
            })?;
        Ok(Self {
            monitor,
            loss_pending: None,
        })
    }

    /// Every `usb_device` present now (the same reading as [`enumerate`]).
    pub fn enumerate() -> Result<Vec<UsbDevice>, SourceError> {
        enumerate()
    }
}

/// Every `usb`/`usb_device` present now, read from sysfs and udev's database. Devices that
/// cannot be read (vanishing as they are read, broken descriptors) are logged and skipped.
pub fn enumerate() -> Result<Vec<UsbDevice>, SourceError> {
    let mut e = udev::Enumerator::new().map_err(udev_err("create an enumerator"))?;
    e.match_subsystem("usb")
        .map_err(udev_err("match subsystem usb"))?;
    e.match_property("DEVTYPE", "usb_device")
        .map_err(udev_err("match DEVTYPE usb_device"))?;
    let mut out = Vec::new();
    for d in e
        .scan_devices()
        .map_err(udev_err("enumerate usb devices"))?
    {
        match read_device(&d) {
            Ok(dev) => out.push(dev),
            Err(why) => {
                warn!(syspath = %d.syspath().display(), %why, "skipping unreadable USB device")
            }
        }
    }
    Ok(out)
}

impl DeviceSource for UdevSource {
    fn snapshot(&mut self) -> Result<Vec<UsbDevice>, SourceError> {
        enumerate()
    }

    async fn next(&mut self) -> Result<SourceEvent, SourceError> {
        if let Some(reason) = self.loss_pending.take() {
            return Ok(SourceEvent::Lost(reason));
        }
        loop {
            let mut guard = self
                .monitor
                .readable_mut()
                .await
                .map_err(udev_err("wait for the monitor"))?;
            let socket = guard.get_inner();
            let mut iter = socket.iter();
            let drained = drain(
                || match iter.next() {
                    Some(event) => Received::Item(event),
                    // errno is still the one libudev set for this NULL.
                    None => Received::from_errno(io::Error::last_os_error()),
                },
                BATCH,
            );
            if drained.exhausted {
                guard.clear_ready();
            }
            drop(guard);
            let mut observations = Vec::with_capacity(drained.items.len());
            let mut loss = None;
            for event in drained.items {
                match observation_of(&event) {
                    Ok(Some(o)) => observations.push(o),
                    Ok(None) => {}
                    Err(why) => {
                        warn!(syspath = %event.syspath().display(), action = %event.event_type(), %why, "cannot read a device from its event");
                        loss = Some(format!("a device event could not be read: {why}"));
                    }
                }
            }
            if let Some(e) = drained.errors.first() {
                warn!(error = %e, count = drained.errors.len(), "udev monitor receive errors");
                loss = Some(format!("udev monitor receive error: {e}"));
            }
            if drained.lost && drained.errors.is_empty() {
                loss = Some("the udev monitor's receive buffer overflowed (ENOBUFS)".into());
            }
            match (observations.is_empty(), loss) {
                (false, loss) => {
                    self.loss_pending = loss;
                    return Ok(SourceEvent::Observed(observations));
                }
                (true, Some(reason)) => return Ok(SourceEvent::Lost(reason)),
                (true, None) => {}
            }
        }
    }
}

/// One result of asking the monitor for a message.
#[derive(Debug)]
pub enum Received<T> {
    Item(T),
    /// EAGAIN: nothing more queued.
    Empty,
    /// ENOBUFS: the kernel dropped messages.
    Overflow,
    /// EINTR: ask again.
    Interrupted,
    /// Anything else (one bad message, or a broken socket).
    Failed(io::Error),
}

impl<T> Received<T> {
    pub fn from_errno(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::EAGAIN) => Received::Empty,
            Some(libc::ENOBUFS) => Received::Overflow,
            Some(libc::EINTR) => Received::Interrupted,
            // libudev returns NULL with errno 0 when it skipped a message that fails its filter.
            Some(0) | None => Received::Interrupted,
            _ => Received::Failed(e),
        }
    }
}

/// What one drain of the socket gave.
#[derive(Debug)]
pub struct Drained<T> {
    pub items: Vec<T>,
    /// Messages were dropped (overflow) or could not be received.
    pub lost: bool,
    /// The socket was read until empty (readiness may be cleared).
    pub exhausted: bool,
    pub errors: Vec<io::Error>,
}

/// Reads up to `limit` items from `next` until the socket is empty, noting overflows and
/// errors. Pure control flow, unit-tested apart from udev (an overflow cannot be produced under
/// umockdev).
pub fn drain<T>(mut next: impl FnMut() -> Received<T>, limit: usize) -> Drained<T> {
    const MAX_ERRORS: usize = 16;
    const MAX_RETRIES: usize = 64;
    let mut out = Drained {
        items: Vec::new(),
        lost: false,
        exhausted: false,
        errors: Vec::new(),
    };
    let mut retries = 0;
    while out.items.len() < limit {
        match next() {
            Received::Item(t) => out.items.push(t),
            Received::Empty => {
                out.exhausted = true;
                break;
            }
            Received::Overflow => out.lost = true,
            Received::Interrupted => {
                retries += 1;
                if retries > MAX_RETRIES {
                    break;
                }
            }
            Received::Failed(e) => {
                out.lost = true;
                out.errors.push(e);
                if out.errors.len() >= MAX_ERRORS {
                    break;
                }
            }
        }
    }
    out
}

/// The observation a udev event stands for; `None` for events the agent ignores.
fn observation_of(event: &udev::Event) -> Result<Option<Observation>, String> {
    if event.devtype() != Some(OsStr::new("usb_device")) {
        return Ok(None);
    }
    let action = match event.event_type() {
        udev::EventType::Add => Action::Add,
        udev::EventType::Change => Action::Change,
        udev::EventType::Bind => Action::Bind,
        udev::EventType::Unbind => Action::Unbind,
        udev::EventType::Remove => {
            let num = |name| prop(event, name).and_then(|v| v.parse::<u16>().ok());
            let address = match (num("BUSNUM"), num("DEVNUM")) {
                (Some(b), Some(d)) => UsbAddress::new(b, d).ok(),
                _ => None,
            };
            return Ok(Some(Observation::Removed {
                syspath: event.syspath().to_string_lossy().into_owned(),
                address,
            }));
        }
        udev::EventType::Unknown => return Ok(None),
    };
    let event_devnum = prop(event, "DEVNUM").and_then(|v| v.parse::<u16>().ok());
    match read_device(event) {
        Ok(device) if event_devnum.is_none_or(|n| n == device.descriptors.address.devnum()) => {
            Ok(Some(Observation::Present { action, device }))
        }
        // sysfs no longer shows this enumeration: it was unplugged (or re-enumerated) before the
        // agent got to its event, or is still half-made. The event's own properties (what udevd
        // recorded when it processed it) describe it; its remove event follows.
        sysfs => {
            let why = match &sysfs {
                Ok(_) => "re-enumerated since".to_owned(),
                Err(e) => e.clone(),
            };
            debug!(syspath = %event.syspath().display(), action = action.as_str(), %why, "describing the device from its event");
            device_from_properties(event)
                .map(|device| Some(Observation::Present { action, device }))
                .map_err(|e| format!("{why}, and its event lacks {e}"))
        }
    }
}

/// A `usb_device` described by an event's properties alone (udevd's `usb_id` and hwdb): the
/// serial is udev's `ID_SERIAL_SHORT` (blanks replaced by `_`), the strings come from
/// `ID_VENDOR_ENC`/`ID_MODEL_ENC`, speed and USB version are unknown.
pub fn device_from_properties(d: &udev::Device) -> Result<UsbDevice, String> {
    let sysname = d.sysname().to_string_lossy().into_owned();
    let port_path: PortPath = sysname
        .parse()
        .map_err(|e| format!("a kernel name ({e})"))?;
    let num = |p: &str| -> Result<u16, String> {
        prop(d, p)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| p.to_owned())
    };
    let address = UsbAddress::new(num("BUSNUM")?, num("DEVNUM")?).map_err(|e| e.to_string())?;
    let product_prop = prop(d, "PRODUCT");
    let from_product = |i: usize| -> Option<String> {
        let part = product_prop.as_deref()?.split('/').nth(i)?;
        u16::from_str_radix(part, 16)
            .ok()
            .map(|v| format!("{v:04x}"))
    };
    let vendor_id: VendorId = prop(d, "ID_VENDOR_ID")
        .or_else(|| from_product(0))
        .ok_or("ID_VENDOR_ID")?
        .parse()
        .map_err(|e| format!("a vendor id ({e})"))?;
    let product_id: ProductId = prop(d, "ID_MODEL_ID")
        .or_else(|| from_product(1))
        .ok_or("ID_MODEL_ID")?
        .parse()
        .map_err(|e| format!("a product id ({e})"))?;
    let device_class = prop(d, "TYPE")
        .and_then(|t| t.split('/').next().and_then(|c| c.parse::<u8>().ok()))
        .unwrap_or(0);
    let mut desc = UsbDescriptors::new(address, port_path, vendor_id, product_id);
    desc.serial = prop(d, "ID_SERIAL_SHORT");
    desc.device_class = device_class;
    desc.manufacturer = prop(d, "ID_VENDOR_ENC").map(|v| unescape_udev(&v));
    desc.product = prop(d, "ID_MODEL_ENC").map(|v| unescape_udev(&v));
    desc.vendor_db = prop(d, "ID_VENDOR_FROM_DATABASE");
    desc.model_db = prop(d, "ID_MODEL_FROM_DATABASE");
    Ok(UsbDevice::new(
        d.syspath().to_string_lossy().into_owned(),
        desc,
        prop(d, "ID_USB_INTERFACES")
            .map(|v| parse_usb_interfaces(&v))
            .unwrap_or_default(),
    )
    .bounded())
}

/// Decodes udev's `\xNN` escapes (`ID_MODEL_ENC=Security\x20Key`).
pub fn unescape_udev(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && bytes.get(i + 1) == Some(&b'x') {
            if let Some(b) = v
                .get(i + 2..i + 4)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).trim().to_owned()
}

fn text(v: Option<&OsStr>) -> Option<String> {
    v.map(|v| v.to_string_lossy().trim().to_owned())
        .filter(|s| !s.is_empty())
}
fn attr(d: &udev::Device, name: &str) -> Option<String> {
    text(d.attribute_value(name))
}
fn prop(d: &udev::Device, name: &str) -> Option<String> {
    text(d.property_value(name))
}
fn hex_u8(d: &udev::Device, name: &str) -> Result<u8, String> {
    let v = attr(d, name).ok_or_else(|| format!("no {name}"))?;
    u8::from_str_radix(&v, 16).map_err(|_| format!("{name} {v:?} is not a hex byte"))
}

/// Reads one `usb_device`.
pub fn read_device(d: &udev::Device) -> Result<UsbDevice, String> {
    let sysname = d.sysname().to_string_lossy().into_owned();
    let port_path: PortPath = sysname.parse().map_err(|e| format!("{e}"))?;
    let num = |a: &str, p: &str| -> Result<u16, String> {
        let v = attr(d, a)
            .or_else(|| prop(d, p))
            .ok_or_else(|| format!("no {a}"))?;
        v.parse().map_err(|_| format!("{a} {v:?} is not a number"))
    };
    let address = UsbAddress::new(num("busnum", "BUSNUM")?, num("devnum", "DEVNUM")?)
        .map_err(|e| e.to_string())?;
    let id = |a: &str, p: &str| -> Result<String, String> {
        attr(d, a)
            .or_else(|| prop(d, p))
            .ok_or_else(|| format!("no {a}"))
    };
    let vendor_id: VendorId = id("idVendor", "ID_VENDOR_ID")?
        .parse()
        .map_err(|e| format!("{e}"))?;
    let product_id: ProductId = id("idProduct", "ID_MODEL_ID")?
        .parse()
        .map_err(|e| format!("{e}"))?;
    let mut desc = UsbDescriptors::new(address, port_path, vendor_id, product_id);
    desc.serial = attr(d, "serial");
    desc.device_class = hex_u8(d, "bDeviceClass")?;
    desc.manufacturer = attr(d, "manufacturer");
    desc.product = attr(d, "product");
    desc.vendor_db = prop(d, "ID_VENDOR_FROM_DATABASE");
    desc.model_db = prop(d, "ID_MODEL_FROM_DATABASE");
    desc.speed = attr(d, "speed");
    desc.usb_version = attr(d, "version");
    Ok(UsbDevice::new(
        d.syspath().to_string_lossy().into_owned(),
        desc,
        interfaces(d),
    )
    .with_fingerprint(fingerprint_of(d, vendor_id, product_id))
    .bounded())
}

/// The descriptor fingerprint ([`crate::fingerprint`]) from the device's sysfs files, read
/// directly (udev's attribute cache stops at a NUL byte, and `descriptors` is binary); `None`
/// when `descriptors` cannot be read.
fn fingerprint_of(
    d: &udev::Device,
    vendor_id: VendorId,
    product_id: ProductId,
) -> Option<Fingerprint> {
    let dir = d.syspath();
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap_or_default();
    let descriptors = std::fs::read(dir.join("descriptors")).ok()?;
    let (name, serial) = (read("product"), read("serial"));
    crate::fingerprint::fingerprint(crate::fingerprint::Reported {
        name: crate::fingerprint::sysfs_value(&name),
        vendor_id,
        product_id,
        serial: crate::fingerprint::sysfs_value(&serial),
        descriptors: &descriptors,
    })
}

/// The device's interfaces: its `usb_interface` children in interface order when sysfs has
/// them, else udev's `ID_USB_INTERFACES` (`:030101:030000:`, read from the configuration
/// descriptor at `add`, before the interfaces exist; it lists each distinct triple once).
fn interfaces(d: &udev::Device) -> Vec<Interface> {
    let children = child_interfaces(d).unwrap_or_default();
    if !children.is_empty() {
        return children;
    }
    prop(d, "ID_USB_INTERFACES")
        .map(|v| parse_usb_interfaces(&v))
        .unwrap_or_default()
}

fn child_interfaces(d: &udev::Device) -> io::Result<Vec<Interface>> {
    let mut e = udev::Enumerator::new()?;
    e.match_parent(d)?;
    e.match_subsystem("usb")?;
    e.match_property("DEVTYPE", "usb_interface")?;
    let mut found: BTreeMap<(u8, String), Interface> = BTreeMap::new();
    for c in e.scan_devices()? {
        // match_parent matches every descendant: keep direct children.
        if c.parent().is_none_or(|p| p.syspath() != d.syspath()) {
            continue;
        }
        let (Ok(class), Ok(subclass), Ok(protocol)) = (
            hex_u8(&c, "bInterfaceClass"),
            hex_u8(&c, "bInterfaceSubClass"),
            hex_u8(&c, "bInterfaceProtocol"),
        ) else {
            continue;
        };
        let number = hex_u8(&c, "bInterfaceNumber").unwrap_or(u8::MAX);
        found.insert(
            (number, c.sysname().to_string_lossy().into_owned()),
            Interface::new(class, subclass, protocol),
        );
    }
    Ok(found.into_values().collect())
}

/// Parses udev's `ID_USB_INTERFACES` (`:ccsspp:ccsspp:`); malformed entries are skipped.
pub fn parse_usb_interfaces(v: &str) -> Vec<Interface> {
    v.split(':')
        .filter(|t| t.len() == 6)
        .filter_map(|t| {
            let b = |i: usize| t.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok());
            Some(Interface::new(b(0)?, b(2)?, b(4)?))
        })
        .collect()
}

/// A source fed by code: the demo's simulated hosts, and tests of the agent loop. Devices
/// plugged through [`SimulatedHost`] are in the next snapshot and arrive as observations.
#[derive(Debug)]
pub struct SimulatedSource {
    sim: Arc<Mutex<Sim>>,
    rx: mpsc::UnboundedReceiver<SourceEvent>,
}

#[derive(Debug, Default)]
struct Sim {
    present: BTreeMap<String, UsbDevice>,
    /// The running agent's source, if any: events while none listens are lost, as udev's are.
    tx: Option<mpsc::UnboundedSender<SourceEvent>>,
}

/// The handle that plugs and unplugs simulated devices (one per simulated host; clones share
/// it).
#[derive(Debug, Clone, Default)]
pub struct SimulatedHost {
    sim: Arc<Mutex<Sim>>,
}

/// A full-speed USB 2.0 device as the kernel would show it at `port` (`2-1.4`) with `devnum`,
/// one interface of `class`: what the demo's and the tests' simulated hosts plug.
pub fn simulated_device(
    port: &str,
    devnum: u16,
    (vendor, product): (u16, u16),
    serial: Option<&str>,
    class: u8,
    (manufacturer, name): (&str, &str),
) -> Result<UsbDevice, usbpt_schemas::IdError> {
    let port_path: PortPath = port.parse()?;
    let bus = port_path.bus();
    let address = UsbAddress::new(bus, devnum)?;
    let mut desc = UsbDescriptors::new(address, port_path, VendorId(vendor), ProductId(product));
    desc.serial = serial.map(str::to_owned);
    desc.manufacturer = Some(manufacturer.to_owned());
    desc.product = Some(name.to_owned());
    desc.speed = Some("12".into());
    desc.usb_version = Some("2.00".into());
    Ok(UsbDevice::new(
        format!("/sys/devices/pci0000:00/0000:00:14.0/usb{bus}/{port}"),
        desc,
        vec![Interface::new(class, 0, 0)],
    ))
}

/// A simulated host starting with `devices` present, and the source for its first agent.
pub fn simulated(devices: Vec<UsbDevice>) -> (SimulatedSource, SimulatedHost) {
    let host = SimulatedHost::default();
    host.change_silently(|p| p.extend(devices.into_iter().map(|d| (d.syspath.clone(), d))));
    (host.source(), host)
}

impl SimulatedHost {
    fn with<R>(&self, f: impl FnOnce(&mut Sim) -> R) -> R {
        let mut guard = match self.sim.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    fn send(sim: &Sim, event: SourceEvent) {
        if let Some(tx) = &sim.tx {
            let _ = tx.send(event);
        }
    }

    /// A source for a (new) agent on this host. The previous source, if still running, is
    /// closed: its `next` fails with [`SourceError::Closed`].
    pub fn source(&self) -> SimulatedSource {
        let (tx, rx) = mpsc::unbounded_channel();
        self.with(|sim| sim.tx = Some(tx));
        SimulatedSource {
            sim: self.sim.clone(),
            rx,
        }
    }

    /// What is plugged in now.
    pub fn present(&self) -> Vec<UsbDevice> {
        self.with(|sim| sim.present.values().cloned().collect())
    }

    /// Plugs a device in (an `add`).
    pub fn plug(&self, device: UsbDevice) {
        self.with(|sim| {
            sim.present.insert(device.syspath.clone(), device.clone());
            let add = Observation::Present {
                action: Action::Add,
                device,
            };
            Self::send(sim, SourceEvent::Observed(vec![add]));
        });
    }

    /// Unplugs whatever is at `syspath` (a `remove`).
    pub fn unplug(&self, syspath: &str) {
        self.with(|sim| {
            let gone = sim.present.remove(syspath);
            let remove = Observation::Removed {
                syspath: syspath.to_owned(),
                address: gone.map(|d| d.descriptors.address),
            };
            Self::send(sim, SourceEvent::Observed(vec![remove]));
        });
    }

    /// Changes what is present without telling the agent, then tells it events were lost (as a
    /// monitor overflow would).
    pub fn change_silently_then_lose(&self, f: impl FnOnce(&mut BTreeMap<String, UsbDevice>)) {
        self.with(|sim| {
            f(&mut sim.present);
            Self::send(sim, SourceEvent::Lost("simulated overflow".into()));
        });
    }

    /// Changes what is present without any event (while the agent is stopped, or a reboot).
    pub fn change_silently(&self, f: impl FnOnce(&mut BTreeMap<String, UsbDevice>)) {
        self.with(|sim| f(&mut sim.present));
    }
}

impl DeviceSource for SimulatedSource {
    fn snapshot(&mut self) -> Result<Vec<UsbDevice>, SourceError> {
        let guard = match self.sim.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        Ok(guard.present.values().cloned().collect())
    }

    async fn next(&mut self) -> Result<SourceEvent, SourceError> {
        self.rx.recv().await.ok_or(SourceError::Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(steps: Vec<Received<u32>>) -> impl FnMut() -> Received<u32> {
        let mut steps = steps.into_iter();
        move || steps.next().unwrap_or(Received::Empty)
    }

    #[test]
    fn drain_reads_until_empty_and_notes_an_overflow() {
        let d = drain(
            script(vec![
                Received::Item(1),
                Received::Overflow,
                Received::Item(2),
                Received::Interrupted,
                Received::Item(3),
                Received::Empty,
                Received::Item(4),
            ]),
            100,
        );
        assert_eq!(d.items, [1, 2, 3]);
        assert!(d.lost && d.exhausted);
    }

    #[test]
    fn drain_stops_at_the_batch_limit_without_claiming_the_socket_is_empty() {
        let d = drain(script((0..10).map(Received::Item).collect()), 4);
        assert_eq!(d.items, [0, 1, 2, 3]);
        assert!(!d.exhausted && !d.lost);
    }

    #[test]
    fn drain_gives_up_on_a_broken_socket() {
        let d = drain(
            || Received::<u32>::Failed(io::Error::from_raw_os_error(libc::EBADF)),
            100,
        );
        assert!(d.lost && !d.exhausted);
        assert_eq!(d.errors.len(), 16);
    }

    #[test]
    fn errno_classification() {
        let r = |n| Received::<()>::from_errno(io::Error::from_raw_os_error(n));
        assert!(matches!(r(libc::EAGAIN), Received::Empty));
        assert!(matches!(r(libc::ENOBUFS), Received::Overflow));
        assert!(matches!(r(libc::EINTR), Received::Interrupted));
        assert!(matches!(r(libc::EINVAL), Received::Failed(_)));
    }

    #[test]
    fn udev_escapes() {
        assert_eq!(
            unescape_udev("Security\\x20Key\\x20by\\x20Yubico"),
            "Security Key by Yubico"
        );
        assert_eq!(unescape_udev("a\\xzzb\\x"), "a\\xzzb\\x");
        assert_eq!(unescape_udev("Caf\\xc3\\xa9"), "Café");
    }

    #[test]
    fn usb_interfaces_property() {
        assert_eq!(
            parse_usb_interfaces(":030101:030000:"),
            [Interface::new(3, 1, 1), Interface::new(3, 0, 0)]
        );
        assert_eq!(
            parse_usb_interfaces(":ffff00:"),
            [Interface::new(0xff, 0xff, 0)]
        );
        assert!(parse_usb_interfaces("").is_empty());
        assert_eq!(
            parse_usb_interfaces(":0g0000:080650:"),
            [Interface::new(8, 6, 0x50)]
        );
    }
}
