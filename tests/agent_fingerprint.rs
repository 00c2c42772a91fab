//! The descriptor fingerprint (docs/identity.md, ADR 0011) from `usbpt agent` against real
//! libudev under umockdev and a real nats-server: USBGuard's `hash` rule over what the device
//! reports, carried in `DeviceDiscoveredV2`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent_support;

use agent_support::*;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use usbpt_schemas::{DeviceDiscovered, Envelope, Fingerprint, LineageKind};
use usbpt_testkit::umockdev::{recorded, relocate, umockdev_test, Testbed, UsbDeviceSpec};
use usbpt_testkit::TestNats;

/// The camera's `descriptors`, `product`, ids and `serial` as its recording holds them.
const CAMERA_DESCRIPTORS: &str = "1201000200000040A904C03102000102030109022700010100C001090400000306010100070581020002000705020200020007058303080009";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// USBGuard's rule, computed here apart from the agent: base64(SHA-256(name ‖ vendor ‖
/// product ‖ serial ‖ descriptors)).
fn usbguard_hash(name: &str, vendor: &str, product: &str, serial: &str, desc: &[u8]) -> String {
    let mut h = Sha256::new();
    for part in [name, vendor, product, serial] {
        h.update(part.as_bytes());
    }
    h.update(desc);
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

fn fingerprinted(events: &[Envelope]) -> Vec<(DeviceDiscovered, Option<Fingerprint>)> {
    events
        .iter()
        .filter_map(|e| e.body.discovery().map(|(d, f)| (d.clone(), f.copied())))
        .collect()
}

#[test]
fn recorded_devices_carry_usbguards_hash_and_a_replug_gives_the_same_one() {
    umockdev_test(
        "recorded_devices_carry_usbguards_hash_and_a_replug_gives_the_same_one",
        || async {
            let tb = Testbed::new()?;
            let rec = host_recording()?;
            tb.add_recording(&rec)?;
            let nats = TestNats::start().await?;
            let home = AgentHome::new("host-a", "boot-1")?;
            let agent = AgentProcess::start(&home, &nats.url()).await?;
            let bus = nats.bus().await?;
            let mut log = StreamLog::open(&bus).await?;
            log.until_count("HostAgentStarted", 1).await?;

            let first = log.envelopes();
            for e in &first {
                if e.body.discovery().is_some() {
                    assert_eq!(e.body.kind(), "DeviceDiscoveredV2", "{e:?}");
                }
            }
            let found = fingerprinted(&first);
            assert_eq!(found.len(), 3);
            let (camera, camera_fp) = found
                .iter()
                .find(|(d, _)| d.descriptors.port_path.to_string() == "1-1.5.2.3")
                .expect("the camera");
            let expected = usbguard_hash(
                "Canon Digital Camera",
                "04a9",
                "31c0",
                "C767F1C714174C309255F70E4A7B2EE2",
                &hex(CAMERA_DESCRIPTORS),
            );
            assert_eq!(camera_fp.map(|f| f.to_string()), Some(expected));
            // Three devices, three fingerprints.
            let mut prints: Vec<_> = found.iter().filter_map(|(_, f)| *f).collect();
            prints.sort();
            prints.dedup();
            assert_eq!(prints.len(), 3);

            // The same camera re-plugged: a new enumeration, the same fingerprint.
            tb.unplug(recorded::CAMERA)?;
            log.until_count("DeviceInvalidated", 1).await?;
            tb.add_recording(&relocate(&rec, recorded::CAMERA, None, 13)?)?;
            log.until_count("DeviceDiscovered", 4).await?;
            let again = fingerprinted(&log.since(first.len()));
            let (new, new_fp) = again.last().expect("the re-plugged camera");
            assert_eq!(new.lineage_id, camera.lineage_id);
            assert_ne!(new.device_id, camera.device_id);
            assert_eq!(new_fp, camera_fp);
            agent.stop().await?;
            Ok(())
        },
    );
}

#[test]
fn the_same_serial_with_other_descriptors_gives_another_fingerprint() {
    umockdev_test(
        "the_same_serial_with_other_descriptors_gives_another_fingerprint",
        || async {
            let tb = Testbed::new()?;
            tb.add_recording(&host_recording()?)?;
            let nats = TestNats::start().await?;
            let home = AgentHome::new("host-a", "boot-1")?;
            let agent = AgentProcess::start(&home, &nats.url()).await?;
            let bus = nats.bus().await?;
            let mut log = StreamLog::open(&bus).await?;
            log.until_count("HostAgentStarted", 1).await?;
            let skip = log.envelopes().len();

            // A licence key, then "the same" key (same ids and serial) whose firmware reports
            // another bcdDevice: a new firmware, or a clone.
            let mut desc = hex(CAMERA_DESCRIPTORS);
            desc[8..12].copy_from_slice(&[0x6b, 0x13, 0x03, 0x00]);
            let key = UsbDeviceSpec::new(recorded::HUB_3_2, "3-2.4", 3, 30, 0x136b, 0x0003)
                .serial("LIC-0001")
                .strings("Acme", "Licence key")
                .interface(0xff, 0, 0)
                .descriptors(&desc);
            let path = tb.plug(&key)?;
            log.until_count("DeviceDiscovered", 4).await?;
            tb.unplug(&path)?;
            log.until_count("DeviceInvalidated", 1).await?;
            let mut other = desc.clone();
            other[13] = 0x02; // bcdDevice 0.02 → 2.02
            tb.plug(&key.renumbered(31).descriptors(&other))?;
            log.until_count("DeviceDiscovered", 5).await?;

            let found = fingerprinted(&log.since(skip));
            assert_eq!(found.len(), 2, "{found:?}");
            let ((a, fa), (b, fb)) = (&found[0], &found[1]);
            assert_eq!(a.lineage_kind, LineageKind::Serial);
            assert_eq!(a.lineage_id, b.lineage_id, "one serial lineage");
            let (fa, fb) = (fa.expect("a fingerprint"), fb.expect("a fingerprint"));
            assert_ne!(fa, fb);
            assert_eq!(
                fa.to_string(),
                usbguard_hash("Licence key", "136b", "0003", "LIC-0001", &desc)
            );
            agent.stop().await?;
            Ok(())
        },
    );
}
