//! The `devices` rows of a layout-1 file (before the descriptor fingerprint), read once to
//! upgrade the file to layout 2: the same fields, and `fingerprint: None` (the enumeration is
//! republished under the layout it was first published with; nothing is re-read).

use serde::Deserialize;
use usbpt_schemas::{DeviceId, LineageId, LineageKind, PortPath, ProductId, UsbAddress, VendorId};

use crate::observation::{Interface, UsbDevice};
use crate::resolver::Known;

#[derive(Deserialize)]
struct UsbDeviceV1 {
    syspath: String,
    port_path: PortPath,
    address: UsbAddress,
    vendor_id: VendorId,
    product_id: ProductId,
    serial: Option<String>,
    device_class: u8,
    interfaces: Vec<Interface>,
    manufacturer: Option<String>,
    product: Option<String>,
    vendor_db: Option<String>,
    model_db: Option<String>,
    speed: Option<String>,
    usb_version: Option<String>,
}

#[derive(Deserialize)]
struct KnownV1 {
    device_id: DeviceId,
    lineage_id: LineageId,
    lineage_kind: LineageKind,
    device: UsbDeviceV1,
    filtered: Option<String>,
}

/// A layout-1 `devices` row as a [`Known`].
pub fn known(bytes: &[u8]) -> Result<Known, postcard::Error> {
    let k: KnownV1 = postcard::from_bytes(bytes)?;
    let d = k.device;
    Ok(Known {
        device_id: k.device_id,
        lineage_id: k.lineage_id,
        lineage_kind: k.lineage_kind,
        device: UsbDevice {
            syspath: d.syspath,
            port_path: d.port_path,
            address: d.address,
            vendor_id: d.vendor_id,
            product_id: d.product_id,
            serial: d.serial,
            device_class: d.device_class,
            interfaces: d.interfaces,
            manufacturer: d.manufacturer,
            product: d.product,
            vendor_db: d.vendor_db,
            model_db: d.model_db,
            speed: d.speed,
            usb_version: d.usb_version,
            fingerprint: None,
        },
        filtered: k.filtered,
    })
}
