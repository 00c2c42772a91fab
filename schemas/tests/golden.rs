//! Golden byte vectors: the wire format of every event variant, checked in. A change that alters
//! the bytes of an existing variant fails here. To add a variant's vector, run
//! `USBPT_BLESS=1 cargo test -p usbpt-schemas --test golden` and commit the new file; never
//! re-bless an existing one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use usbpt_schemas::{decode, encode};

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn to_hex(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, chunk) in bytes.chunks(32).enumerate() {
        if i > 0 {
            out.push('\n');
        }
        for b in chunk {
            out.push_str(&format!("{b:02x}"));
        }
    }
    out.push('\n');
    out
}

fn from_hex(text: &str) -> Vec<u8> {
    let digits: String = text.split_whitespace().collect();
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn every_variant_has_a_sample() {
    let seen: BTreeSet<usize> = common::sample_bodies()
        .iter()
        .map(common::variant_index)
        .collect();
    assert_eq!(seen, (0..common::VARIANTS).collect::<BTreeSet<_>>());
}

#[test]
fn wire_format_matches_golden_vectors() {
    let bless = std::env::var_os("USBPT_BLESS").is_some();
    let mut missing = Vec::new();
    for env in common::sample_envelopes() {
        let kind = env.body.kind();
        let path = golden_dir().join(format!("{kind}.hex"));
        let bytes = encode(&env).expect("encode");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let golden = from_hex(&text);
                assert_eq!(
                    to_hex(&bytes),
                    to_hex(&golden),
                    "{kind}: encoding changed; the wire format is frozen (add new variants at the end instead)"
                );
                assert_eq!(decode(&golden).expect("golden decodes"), env, "{kind}");
            }
            Err(_) if bless => std::fs::write(&path, to_hex(&bytes)).expect("write golden"),
            Err(_) => missing.push(kind),
        }
    }
    assert!(
        missing.is_empty(),
        "no golden vector for {missing:?}; run with USBPT_BLESS=1 once and commit the files"
    );
}

/// Version 2 (ADR 0014): a command's events carry who asked. Their bytes are frozen like
/// version 1's; each is the version-1 encoding of the same envelope without its origin with
/// the version changed to 2 and the origin inserted before the body.
#[test]
fn v2_wire_format_matches_golden_vectors() {
    let bless = std::env::var_os("USBPT_BLESS").is_some();
    let mut missing = Vec::new();
    for env in common::sample_envelopes_v2() {
        let kind = env.body.kind();
        let path = golden_dir().join(format!("v2-{kind}.hex"));
        let bytes = encode(&env).expect("encode");
        assert_eq!(
            bytes[0], 2,
            "{kind}: an envelope with an origin is version 2"
        );
        let origin = env.origin.clone().expect("a v2 sample has an origin");
        let v1 = encode(&env.clone().with_origin(None)).expect("v1");
        assert_eq!(v1[0], 1, "{kind}: without an origin, version 1");
        let body = postcard::to_allocvec(&env.body).expect("body");
        let head = &v1[1..v1.len() - body.len()];
        let mut expected = vec![2u8];
        expected.extend_from_slice(head);
        expected.extend_from_slice(&postcard::to_allocvec(&origin).expect("origin"));
        expected.extend_from_slice(&body);
        assert_eq!(to_hex(&bytes), to_hex(&expected), "{kind}: v2 layout");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let golden = from_hex(&text);
                assert_eq!(
                    to_hex(&bytes),
                    to_hex(&golden),
                    "{kind}: v2 encoding changed"
                );
                assert_eq!(decode(&golden).expect("golden decodes"), env, "{kind}");
            }
            Err(_) if bless => std::fs::write(&path, to_hex(&bytes)).expect("write golden"),
            Err(_) => missing.push(kind),
        }
    }
    assert!(missing.is_empty(), "no v2 golden vector for {missing:?}");
}

#[test]
fn postcard_is_much_smaller_than_json() {
    for env in common::sample_envelopes() {
        let bin = encode(&env).expect("encode").len();
        let json = serde_json::to_vec(&env).expect("json").len();
        assert!(
            bin * 2 < json,
            "{}: {bin} B postcard vs {json} B JSON",
            env.body.kind()
        );
    }
}

/// `DeviceDiscoveredV2`'s body is `DeviceDiscovered`'s body, byte for byte, then the 32 bytes of
/// the fingerprint (ADR 0011): a reader of the old layout is not needed to read the new one's
/// first part, and an old event keeps folding as it did.
#[test]
fn the_v2_discovery_is_the_v1_discovery_then_the_fingerprint() {
    let bodies = common::sample_bodies();
    let v2 = bodies
        .iter()
        .find(|b| b.kind() == "DeviceDiscoveredV2")
        .expect("a DeviceDiscoveredV2 sample");
    let (discovery, fingerprint) = v2.discovery().expect("a discovery");
    let fingerprint = *fingerprint.expect("v2 has a fingerprint");
    let v1 = usbpt_schemas::Event::DeviceDiscovered(discovery.clone());
    let b1 = postcard::to_allocvec(&v1).expect("v1");
    let b2 = postcard::to_allocvec(v2).expect("v2");
    assert_eq!(b1[0], 1, "DeviceDiscovered is variant 1");
    assert_eq!(b2[0], 26, "DeviceDiscoveredV2 is variant 26");
    assert_eq!(&b2[1..b2.len() - 32], &b1[1..]);
    assert_eq!(&b2[b2.len() - 32..], &fingerprint.0);
    // The JSON of either layout carries the discovery's fields; V2's fingerprint is USBGuard's
    // base64.
    let json = serde_json::to_value(v2).expect("json");
    assert_eq!(
        json["DeviceDiscoveredV2"]["fingerprint"],
        serde_json::json!(fingerprint.to_base64())
    );
}

/// The descriptors have a struct of their own (`UsbDescriptors`, nested: the bytes above are
/// unchanged), but the JSON (the history, `usbpt events`, docs/events.md) still carries their
/// fields in the event itself, in the order the event always had them, and reads back.
#[test]
fn device_discovered_json_keeps_the_descriptor_fields_in_the_event() {
    let usbpt_schemas::Event::DeviceDiscovered(d) = common::sample_bodies().remove(1) else {
        unreachable!("sample 1 is a DeviceDiscovered")
    };
    let text = serde_json::to_string(&d).expect("json");
    assert!(!text.contains("\"descriptors\""), "{text}");
    let keys = [
        "device_id",
        "lineage_id",
        "lineage_kind",
        "host",
        "boot_id",
        "address",
        "port_path",
        "vendor_id",
        "product_id",
        "serial",
        "device_class",
        "interface_classes",
        "manufacturer",
        "product",
        "vendor_db",
        "model_db",
        "speed",
        "usb_version",
        "syspath",
        "supersedes",
    ];
    let at: Vec<usize> = keys
        .iter()
        .map(|k| {
            text.find(&format!("\"{k}\":"))
                .unwrap_or_else(|| panic!("{k} missing: {text}"))
        })
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "key order: {text}");
    let back: usbpt_schemas::DeviceDiscovered = serde_json::from_str(&text).expect("read back");
    assert_eq!(back, d);
}
