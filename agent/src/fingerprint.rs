//! The descriptor fingerprint of one enumeration, by USBGuard's rule for a device's `hash`
//! (`DevicePrivate::initializeHash` / `updateHash` / `finalizeHash`): SHA-256 over the sysfs
//! `product` string, `idVendor`, `idProduct`, `serial` (each as sysfs prints it, without its
//! newline, absent = empty), then the raw bytes of the sysfs `descriptors` file (the device
//! descriptor and every configuration descriptor as the kernel cached them at enumeration).
//! Pure: the caller reads the files. Deviations from USBGuard are in docs/identity.md.

use sha2::{Digest, Sha256};
use usbpt_schemas::{Fingerprint, ProductId, VendorId};

/// What the fingerprint is computed from, exactly as read.
#[derive(Debug, Clone, Copy)]
pub struct Reported<'a> {
    /// sysfs `product` (USBGuard's device `name`).
    pub name: &'a [u8],
    pub vendor_id: VendorId,
    pub product_id: ProductId,
    /// sysfs `serial`.
    pub serial: &'a [u8],
    /// sysfs `descriptors`.
    pub descriptors: &'a [u8],
}

/// The fingerprint of what a device reported. `None` when there are no descriptors to hash
/// (shorter than a device descriptor's 18 bytes: USBGuard refuses such a device too).
pub fn fingerprint(r: Reported<'_>) -> Option<Fingerprint> {
    if r.descriptors.len() < 18 {
        return None;
    }
    let mut h = Sha256::new();
    h.update(r.name);
    h.update(r.vendor_id.to_string().as_bytes());
    h.update(r.product_id.to_string().as_bytes());
    h.update(r.serial);
    h.update(r.descriptors);
    Some(Fingerprint(h.finalize().into()))
}

/// A sysfs attribute's value as USBGuard reads it: the file's bytes without its last newline.
pub fn sysfs_value(mut raw: &[u8]) -> &[u8] {
    if let Some(rest) = raw.strip_suffix(b"\n") {
        raw = rest;
    }
    raw
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAMERA: &str = "1201000200000040A904C03102000102030109022700010100C001090400000306010100070581020002000705020200020007058303080009";

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or_default())
            .collect()
    }

    fn reported<'a>(serial: &'a [u8], descriptors: &'a [u8]) -> Reported<'a> {
        Reported {
            name: b"Canon Digital Camera",
            vendor_id: VendorId(0x04a9),
            product_id: ProductId(0x31c0),
            serial,
            descriptors,
        }
    }

    #[test]
    fn it_is_sha256_of_the_concatenation_as_usbguard_feeds_it() {
        let d = hex(CAMERA);
        let fp = fingerprint(reported(b"C767F1C7", &d)).expect("fingerprint");
        let mut whole = b"Canon Digital Camera04a931c0C767F1C7".to_vec();
        whole.extend_from_slice(&d);
        assert_eq!(fp.0, <[u8; 32]>::from(Sha256::digest(&whole)));
    }

    #[test]
    fn serial_and_descriptors_each_change_it_and_too_few_bytes_give_none() {
        let d = hex(CAMERA);
        let a = fingerprint(reported(b"C767F1C7", &d));
        let mut other = d.clone();
        other[12] ^= 1; // bcdDevice: new firmware
        assert_ne!(a, fingerprint(reported(b"C767F1C7", &other)));
        assert_ne!(a, fingerprint(reported(b"C767F1C8", &d)));
        assert_eq!(a, fingerprint(reported(b"C767F1C7", &d)));
        assert_eq!(fingerprint(reported(b"x", &d[..17])), None);
        assert_eq!(sysfs_value(b"C767\n"), b"C767");
        assert_eq!(sysfs_value(b" C767 "), b" C767 ");
    }
}
