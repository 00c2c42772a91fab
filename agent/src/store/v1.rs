//! The `devices` rows of a layout-1 file (before the descriptor fingerprint), read once to
//! upgrade the file to layout 2: the same fields, and `fingerprint: None` (the enumeration is
//! republished under the layout it was first published with; nothing is re-read).

use serde::Deserialize;
use usbpt_schemas::{DeviceId, LineageId, LineageKind};

use crate::observation::{Layout1, UsbDevice};
use crate::resolver::Known;

#[derive(Deserialize)]
struct KnownV1 {
    device_id: DeviceId,
    lineage_id: LineageId,
    lineage_kind: LineageKind,
    device: Layout1,
    filtered: Option<String>,
}

/// A layout-1 `devices` row as a [`Known`].
pub fn known(bytes: &[u8]) -> Result<Known, postcard::Error> {
    let k: KnownV1 = postcard::from_bytes(bytes)?;
    Ok(Known {
        device_id: k.device_id,
        lineage_id: k.lineage_id,
        lineage_kind: k.lineage_kind,
        device: UsbDevice::from((k.device, None)),
        filtered: k.filtered,
    })
}
