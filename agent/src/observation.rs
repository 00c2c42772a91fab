//! What a device source reports: USB devices as the host sees them, and what happened to them.
//! Plain data with no udev in it, so a simulated source (the demo) feeds the same resolver and
//! outbox as the real udev monitor.

use serde::{Deserialize, Serialize};
use usbpt_schemas::text::{bound, Escaped, DEVICE_STRING_MAX};
use usbpt_schemas::{Fingerprint, PortPath, ProductId, UsbAddress, UsbDescriptors, VendorId};

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
///
/// Its bytes in the agent's state (layout 2, `crate::store`) are the fields it had before the
/// descriptors were one struct, in the same order ([`Layout2`]); postcard writes a struct as its
/// fields, so a tuple of them reads and writes the same rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Layout2", into = "Layout2")]
pub struct UsbDevice {
    /// `/sys/devices/…/1-2.3`: where the kernel put it; the key of the agent's local state.
    pub syspath: String,
    /// What the device says of itself, as the discovery event carries it. Its
    /// `interface_classes` are [`UsbDevice::interfaces`]' classes, always: only
    /// [`UsbDevice::new`] writes them.
    pub descriptors: UsbDescriptors,
    /// The active configuration's interfaces, in interface order.
    interfaces: Vec<Interface>,
    /// The descriptor fingerprint ([`crate::fingerprint`]); `None` when the descriptors could
    /// not be read (the device left before the agent looked).
    pub fingerprint: Option<Fingerprint>,
}

/// A device row of the agent's state in layout 1: syspath, port path, address, vendor,
/// product, serial, device class, interfaces, and six strings (manufacturer, product,
/// vendor_db, model_db, speed, usb_version).
pub(crate) type Layout1 = (
    String,
    PortPath,
    UsbAddress,
    VendorId,
    ProductId,
    Option<String>,
    u8,
    Vec<Interface>,
    [Option<String>; 6],
);

/// Layout 2: layout 1, then the fingerprint. Postcard writes a nested tuple inline, so this is
/// the flat row the struct of layout 2 wrote.
pub(crate) type Layout2 = (Layout1, Option<Fingerprint>);

impl From<Layout2> for UsbDevice {
    fn from((row, fingerprint): Layout2) -> Self {
        let (syspath, port_path, address, vendor_id, product_id, serial, class, ifs, strings) = row;
        let [manufacturer, product, vendor_db, model_db, speed, usb_version] = strings;
        let mut d = UsbDescriptors::new(address, port_path, vendor_id, product_id);
        d.serial = serial;
        d.device_class = class;
        (d.manufacturer, d.product, d.vendor_db, d.model_db) =
            (manufacturer, product, vendor_db, model_db);
        (d.speed, d.usb_version) = (speed, usb_version);
        UsbDevice::new(syspath, d, ifs).with_fingerprint(fingerprint)
    }
}

impl From<UsbDevice> for Layout2 {
    fn from(u: UsbDevice) -> Self {
        let d = u.descriptors;
        let strings = [
            d.manufacturer,
            d.product,
            d.vendor_db,
            d.model_db,
            d.speed,
            d.usb_version,
        ];
        let row = (
            u.syspath,
            d.port_path,
            d.address,
            d.vendor_id,
            d.product_id,
            d.serial,
            d.device_class,
            u.interfaces,
            strings,
        );
        (row, u.fingerprint)
    }
}

impl UsbDevice {
    /// A device at `syspath` with these descriptors and interfaces (the descriptors'
    /// `interface_classes` are taken from `interfaces`), and no fingerprint yet.
    pub fn new(
        syspath: String,
        mut descriptors: UsbDescriptors,
        interfaces: Vec<Interface>,
    ) -> Self {
        descriptors.interface_classes = interfaces.iter().map(|i| i.class).collect();
        UsbDevice {
            syspath,
            descriptors,
            interfaces,
            fingerprint: None,
        }
    }

    /// This device with a fingerprint (or none).
    pub fn with_fingerprint(mut self, fingerprint: Option<Fingerprint>) -> Self {
        self.fingerprint = fingerprint;
        self
    }

    /// The active configuration's interfaces, in interface order.
    pub fn interfaces(&self) -> &[Interface] {
        &self.interfaces
    }

    /// True when `other` is the same enumeration: same syspath address (bus, devnum, port)
    /// and the same vendor and product. A different devnum at the same syspath is a
    /// re-enumeration. The serial is compared only when both sides have one: an event udevd
    /// sent without its properties (seen on a real kernel for a device QEMU's `usb-host` held
    /// when it was unplugged: the `unbind` carried no `ID_SERIAL_SHORT`, and sysfs was already
    /// gone) says nothing about the serial, and must not read as a new device.
    pub fn same_enumeration(&self, other: &UsbDevice) -> bool {
        let (a, b) = (&self.descriptors, &other.descriptors);
        a.address == b.address
            && a.port_path == b.port_path
            && a.vendor_id == b.vendor_id
            && a.product_id == b.product_id
            && match (&a.serial, &b.serial) {
                (Some(x), Some(y)) => x == y,
                _ => true,
            }
    }

    /// This enumeration's descriptors after a later report of it (`other`, the same
    /// enumeration): what the later report lacks is kept, what it adds is taken. An
    /// enumeration's descriptors do not change; a later report only fills in what could not be
    /// read before (interfaces not created yet) or misses what can no longer be read (sysfs
    /// removed, an event without udevd's properties).
    pub fn refreshed_by(&self, other: UsbDevice) -> UsbDevice {
        let keep = |new: &mut Option<String>, old: &Option<String>| {
            if new.is_none() {
                new.clone_from(old);
            }
        };
        let (old, mut d) = (&self.descriptors, other.descriptors);
        keep(&mut d.serial, &old.serial);
        if other.interfaces.is_empty() && d.device_class == 0 {
            d.device_class = old.device_class;
        }
        keep(&mut d.manufacturer, &old.manufacturer);
        keep(&mut d.product, &old.product);
        keep(&mut d.vendor_db, &old.vendor_db);
        keep(&mut d.model_db, &old.model_db);
        keep(&mut d.speed, &old.speed);
        keep(&mut d.usb_version, &old.usb_version);
        let interfaces = if other.interfaces.is_empty() {
            self.interfaces.clone()
        } else {
            other.interfaces
        };
        let mut device = UsbDevice::new(other.syspath, d, interfaces);
        device.fingerprint = other.fingerprint.or(self.fingerprint);
        device
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
        let d = &mut self.descriptors;
        for (name, field) in [
            ("serial", &mut d.serial),
            ("manufacturer", &mut d.manufacturer),
            ("product", &mut d.product),
            ("vendor_db", &mut d.vendor_db),
            ("model_db", &mut d.model_db),
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
        format!(
            "{}:{}",
            self.descriptors.vendor_id, self.descriptors.product_id
        )
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
        let mut x = UsbDescriptors::new(
            UsbAddress::new(1, 5).expect("address"),
            "1-2".parse().expect("port"),
            VendorId(0x6666),
            ProductId(0x4242),
        );
        x.serial = Some("S".repeat(900_000));
        x.manufacturer = Some("Evil\x1b[2J Corp".into());
        x.product = Some("é".repeat(200));
        x.model_db = Some("m".repeat(255));
        let d = UsbDevice::new("/sys/devices/pci0000:00/usb1/1-2".into(), x, Vec::new())
            .bounded()
            .descriptors;
        let serial = d.serial.as_deref().unwrap_or_default();
        assert!(serial.len() <= DEVICE_STRING_MAX && serial.ends_with('…'));
        let product = d.product.as_deref().unwrap_or_default();
        assert!(product.len() <= DEVICE_STRING_MAX && product.ends_with('…'));
        assert_eq!(d.manufacturer.as_deref(), Some("Evil\x1b[2J Corp"));
        assert_eq!(d.model_db.as_deref().map(str::len), Some(255));
        assert_eq!(d.vendor_db, None);
    }
}
