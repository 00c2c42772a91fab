//! What a device source reports: USB devices as the host sees them, and what happened to them.
//! Plain data with no udev in it, so a simulated source (the demo) feeds the same resolver and
//! outbox as the real udev monitor.

use serde::{Deserialize, Serialize};
use usbpt_schemas::text::{bound, Escaped, DEVICE_STRING_MAX};
use usbpt_schemas::{Fingerprint, PortPath, ProductId, UsbAddress, VendorId};

/// One interface of the active configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Interface {
    /// `bInterfaceClass`.
    pub class: u8,
    /// `bInterfaceSubClass`.
    pub subclass: u8,
    /// `bInterfaceProtocol`.
    pub protocol: u8,
}

impl Interface {
    pub const fn new(class: u8, subclass: u8, protocol: u8) -> Self {
        Self {
            class,
            subclass,
            protocol,
        }
    }
}

/// One USB device (udev `usb`/`usb_device`) present on the host now: one enumeration's raw
/// descriptors, read from sysfs and udev's properties.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsbDevice {
    /// `/sys/devices/…/1-2.3`: where the kernel put it; the key of the agent's local state.
    pub syspath: String,
    /// The kernel name (`1-2.3`): bus and hub ports.
    pub port_path: PortPath,
    /// `busnum` and `devnum`: change on every re-enumeration.
    pub address: UsbAddress,
    pub vendor_id: VendorId,
    pub product_id: ProductId,
    /// The `serial` attribute, trimmed; `None` when absent or blank.
    pub serial: Option<String>,
    /// `bDeviceClass`.
    pub device_class: u8,
    /// The active configuration's interfaces, in interface order.
    pub interfaces: Vec<Interface>,
    pub manufacturer: Option<String>,
    pub product: Option<String>,
    /// hwdb's `ID_VENDOR_FROM_DATABASE`.
    pub vendor_db: Option<String>,
    /// hwdb's `ID_MODEL_FROM_DATABASE`.
    pub model_db: Option<String>,
    /// sysfs `speed` (Mbit/s as the kernel prints it).
    pub speed: Option<String>,
    /// sysfs `version` (bcdUSB), trimmed: `2.00`.
    pub usb_version: Option<String>,
    /// The descriptor fingerprint ([`crate::fingerprint`]); `None` when the descriptors could
    /// not be read (the device left before the agent looked).
    pub fingerprint: Option<Fingerprint>,
}

impl UsbDevice {
    /// True when `other` is the same enumeration: same syspath address (bus, devnum, port)
    /// and the same vendor and product. A different devnum at the same syspath is a
    /// re-enumeration. The serial is compared only when both sides have one: an event udevd
    /// sent without its properties (seen on a real kernel for a device QEMU's `usb-host` held
    /// when it was unplugged: the `unbind` carried no `ID_SERIAL_SHORT`, and sysfs was already
    /// gone) says nothing about the serial, and must not read as a new device.
    pub fn same_enumeration(&self, other: &UsbDevice) -> bool {
        self.address == other.address
            && self.port_path == other.port_path
            && self.vendor_id == other.vendor_id
            && self.product_id == other.product_id
            && match (&self.serial, &other.serial) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }

    /// This enumeration's descriptors after a later report of it (`other`, the same
    /// enumeration): what the later report lacks is kept, what it adds is taken. An
    /// enumeration's descriptors do not change; a later report only fills in what could not be
    /// read before (interfaces not created yet) or misses what can no longer be read (sysfs
    /// removed, an event without udevd's properties).
    pub fn refreshed_by(&self, other: UsbDevice) -> UsbDevice {
        let keep = |new: Option<String>, old: &Option<String>| new.or_else(|| old.clone());
        UsbDevice {
            syspath: other.syspath,
            port_path: other.port_path,
            address: other.address,
            vendor_id: other.vendor_id,
            product_id: other.product_id,
            serial: keep(other.serial, &self.serial),
            device_class: if other.interfaces.is_empty() && other.device_class == 0 {
                self.device_class
            } else {
                other.device_class
            },
            interfaces: if other.interfaces.is_empty() {
                self.interfaces.clone()
            } else {
                other.interfaces
            },
            manufacturer: keep(other.manufacturer, &self.manufacturer),
            product: keep(other.product, &self.product),
            vendor_db: keep(other.vendor_db, &self.vendor_db),
            model_db: keep(other.model_db, &self.model_db),
            speed: keep(other.speed, &self.speed),
            usb_version: keep(other.usb_version, &self.usb_version),
            fingerprint: other.fingerprint.or(self.fingerprint),
        }
    }

    /// This device with its strings (serial, manufacturer, product, hwdb names) cut to
    /// [`DEVICE_STRING_MAX`] bytes, each cut one ending in `…`, so the event says it. A USB
    /// string descriptor holds at most 126 UTF-16 units, so only a hostile or broken device (or
    /// udev database) is cut; it is still reported, not hidden: the operator sees a device that
    /// is plugged in. The cut is deterministic, so a cut serial still gives a stable lineage
    /// (two devices equal in their first 252 bytes clash, as devices sharing a serial do).
    /// Control characters are kept: they are data, escaped by every printer
    /// ([`usbpt_schemas::text::escape`]).
    pub fn bounded(mut self) -> Self {
        for (name, field) in [
            ("serial", &mut self.serial),
            ("manufacturer", &mut self.manufacturer),
            ("product", &mut self.product),
            ("vendor_db", &mut self.vendor_db),
            ("model_db", &mut self.model_db),
        ] {
            if let Some(v) = field.take() {
                let (v, cut) = bound(v, DEVICE_STRING_MAX);
                if cut {
                    tracing::warn!(
                        syspath = %Escaped(&self.syspath),
                        field = name,
                        kept = %Escaped(&v),
                        "a device string longer than {DEVICE_STRING_MAX} bytes was cut"
                    );
                }
                *field = Some(v);
            }
        }
        self
    }

    /// `vvvv:pppp` for logs.
    pub fn ids(&self) -> String {
        format!("{}:{}", self.vendor_id, self.product_id)
    }
}

/// The udev action behind a [`Observation::Present`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    Add,
    Change,
    Bind,
    /// A driver let go of the device; it is still there.
    Unbind,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Change => "change",
            Action::Bind => "bind",
            Action::Unbind => "unbind",
        }
    }
}

/// One thing a source saw happen.
// Observations live for one resolver step; plain variants are easier to build and match than a
// boxed device.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Observation {
    /// The device is present with these descriptors (`add`, `change`, `bind`, `unbind`).
    Present { action: Action, device: UsbDevice },
    /// The device at `syspath` is gone (`remove`). `address` is the enumeration the event was
    /// about, when it said: a stale `remove` of an older enumeration at the same syspath (queued
    /// while the agent rescanned) must not end the current one.
    Removed {
        syspath: String,
        address: Option<UsbAddress>,
    },
}

impl Observation {
    pub fn syspath(&self) -> &str {
        match self {
            Observation::Present { device, .. } => &device.syspath,
            Observation::Removed { syspath, .. } => syspath,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings_are_cut_to_255_bytes_and_say_so_but_keep_their_controls() {
        let d = UsbDevice {
            syspath: "/sys/devices/pci0000:00/usb1/1-2".into(),
            port_path: "1-2".parse().expect("port"),
            address: UsbAddress::new(1, 5).expect("address"),
            vendor_id: VendorId(0x6666),
            product_id: ProductId(0x4242),
            serial: Some("S".repeat(900_000)),
            device_class: 0,
            interfaces: Vec::new(),
            manufacturer: Some("Evil\x1b[2J Corp".into()),
            product: Some("é".repeat(200)),
            vendor_db: None,
            model_db: Some("m".repeat(255)),
            speed: None,
            usb_version: None,
            fingerprint: None,
        }
        .bounded();
        let serial = d.serial.as_deref().unwrap_or_default();
        assert!(serial.len() <= DEVICE_STRING_MAX && serial.ends_with('…'));
        let product = d.product.as_deref().unwrap_or_default();
        assert!(product.len() <= DEVICE_STRING_MAX && product.ends_with('…'));
        assert_eq!(d.manufacturer.as_deref(), Some("Evil\x1b[2J Corp"));
        assert_eq!(d.model_db.as_deref().map(str::len), Some(255));
        assert_eq!(d.vendor_db, None);
    }
}
