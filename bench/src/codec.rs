//! Envelope sizes and codec speed: postcard (the wire) against the JSON the API serves.

use std::hint::black_box;
use std::time::Instant;

use usbpt_schemas::*;

use crate::report::Figure;

/// A realistic `DeviceDiscovered` envelope (a YubiKey behind a hub) from `host-b`.
pub fn sample_discovered() -> Envelope {
    sample_discovered_on(HostName::new("host-b").unwrap_or_else(|_| unreachable_host()))
}

/// A realistic `DeviceDiscovered` envelope (a YubiKey behind a hub) from `host`, with fresh
/// event and device ids.
pub fn sample_discovered_on(host: HostName) -> Envelope {
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
        descriptors: UsbDescriptors {
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
        },
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
        Figure::new(
            "size_postcard",
            "envelope size: DeviceDiscovered, postcard (the wire)",
            1,
        )
        .value(bin.len() as f64, "B"),
        Figure::new(
            "size_json",
            "envelope size: DeviceDiscovered, JSON (/v1/events, events tail)",
            1,
        )
        .value(json.len() as f64, "B")
        .note(format!(
            "postcard is {:.0}% of the JSON",
            100.0 * bin.len() as f64 / json.len().max(1) as f64
        )),
        Figure::new("codec_encode", "codec: postcard encode", iterations as u64)
            .rate(1e9 / enc_ns.max(1e-3))
            .value(enc_ns, "ns"),
        Figure::new(
            "codec_decode",
            "codec: postcard decode (validating)",
            iterations as u64,
        )
        .rate(1e9 / dec_ns.max(1e-3))
        .value(dec_ns, "ns"),
        Figure::new("codec_json_encode", "codec: JSON encode", iterations as u64)
            .rate(1e9 / json_ns.max(1e-3))
            .value(json_ns, "ns"),
    ])
}
