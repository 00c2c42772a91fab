//! Envelope sizes and codec speed: postcard (the wire) against the JSON the API serves.

use std::hint::black_box;
use std::time::Instant;

use usbpt_schemas::*;

use crate::report::Figure;

/// A realistic `DeviceDiscovered` envelope (a YubiKey behind a hub).
pub fn sample_discovered() -> Envelope {
    let host = HostName::new("host-b").unwrap_or_else(|_| unreachable_host());
    let port: PortPath = "1-2.3".parse().unwrap_or_else(|_| unreachable_port());
    let vendor = VendorId(0x1050);
    let product = ProductId(0x0120);
    let lineage = LineageId::derive(&LineageKey::Port {
        host: &host,
        port: &port,
        vendor,
        product,
    });
    let mut env = Envelope::new(Event::DeviceDiscovered(DeviceDiscovered {
        device_id: DeviceId::new_v7(),
        lineage_id: lineage,
        lineage_kind: LineageKind::Port,
        host,
        boot_id: "5f0c2b9e-3c1a-4c53-9d1e-2f7b7d8a9c10".into(),
        address: UsbAddress::new(1, 12).unwrap_or_else(|_| unreachable_addr()),
        port_path: port,
        vendor_id: vendor,
        product_id: product,
        serial: None,
        device_class: 0,
        interface_classes: vec![3],
        manufacturer: Some("Yubico".into()),
        product: Some("Security Key by Yubico".into()),
        vendor_db: Some("Yubico.com".into()),
        model_db: Some("Yubikey Touch U2F Security Key".into()),
        speed: Some("12".into()),
        usb_version: Some("2.00".into()),
        syspath: "/sys/devices/pci0000:00/0000:00:08.1/0000:05:00.3/usb1/1-2/1-2.3".into(),
        supersedes: None,
    }));
    env.correlation_id = Some(CorrelationId::new_v7());
    env
}

// The literals above are valid; these keep `unwrap` out of library code.
fn unreachable_host() -> HostName {
    unreachable!("literal host name is valid")
}
fn unreachable_port() -> PortPath {
    unreachable!("literal port path is valid")
}
fn unreachable_addr() -> UsbAddress {
    unreachable!("literal address is valid")
}

pub fn figures(iterations: usize) -> anyhow::Result<Vec<Figure>> {
    let env = sample_discovered();
    let bin = encode(&env)?;
    let json = serde_json::to_vec(&env)?;
    let t = Instant::now();
    for _ in 0..iterations {
        black_box(encode(black_box(&env))?);
    }
    let enc_ns = t.elapsed().as_nanos() as f64 / iterations as f64;
    let t = Instant::now();
    for _ in 0..iterations {
        black_box(decode(black_box(&bin))?);
    }
    let dec_ns = t.elapsed().as_nanos() as f64 / iterations as f64;
    let t = Instant::now();
    for _ in 0..iterations {
        black_box(serde_json::to_vec(black_box(&env))?);
    }
    let json_ns = t.elapsed().as_nanos() as f64 / iterations as f64;
    Ok(vec![
        Figure::new("envelope size: DeviceDiscovered, postcard", 1).value(bin.len() as f64, "B"),
        Figure::new("envelope size: DeviceDiscovered, API JSON", 1).value(json.len() as f64, "B"),
        Figure::new("codec: postcard encode", iterations as u64).value(enc_ns, "ns"),
        Figure::new("codec: postcard decode (validating)", iterations as u64).value(dec_ns, "ns"),
        Figure::new("codec: JSON encode", iterations as u64).value(json_ns, "ns"),
    ])
}
