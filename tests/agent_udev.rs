//! `usbpt agent` against real libudev under umockdev (the recorded devices of
//! `agent/tests/fixtures/umockdev`) and a real nats-server: identities, re-enumerations, reboots
//! and restarts, read back from the stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent_support;

use agent_support::*;
use usbpt_schemas::{
    subjects, Event, HostName, InvalidationReason, LineageId, LineageKey, LineageKind, PortPath,
    ProductId, UsbAddress, VendorId,
};
use usbpt_testkit::umockdev::{recorded, relocate, umockdev_test, Testbed};
use usbpt_testkit::TestNats;

const CAMERA_SERIAL: &str = "C767F1C714174C309255F70E4A7B2EE2";

fn host() -> HostName {
    HostName::new("host-a").unwrap()
}
fn port(p: &str) -> PortPath {
    p.parse().unwrap()
}
fn port_lineage(p: &str, vendor: u16, product: u16) -> LineageId {
    LineageId::derive(&LineageKey::Port {
        host: &host(),
        port: &port(p),
        vendor: VendorId(vendor),
        product: ProductId(product),
    })
}
fn camera_lineage() -> LineageId {
    LineageId::derive(&LineageKey::Serial {
        vendor: VendorId(0x04a9),
        product: ProductId(0x31c0),
        serial: CAMERA_SERIAL,
    })
}
fn by_port<'a>(
    found: &'a [usbpt_schemas::DeviceDiscovered],
    p: &str,
) -> &'a usbpt_schemas::DeviceDiscovered {
    found
        .iter()
        .find(|d| d.descriptors.port_path == port(p))
        .unwrap_or_else(|| panic!("nothing discovered at {p}"))
}

#[test]
fn the_recorded_devices_give_three_candidates_with_their_lineage_kinds() {
    umockdev_test(
        "the_recorded_devices_give_three_candidates_with_their_lineage_kinds",
        || async {
            let tb = Testbed::new()?;
            tb.add_recording(&host_recording()?)?;
            let nats = TestNats::start().await?;
            let home = AgentHome::new("host-a", "boot-1")?;
            let agent = AgentProcess::start(&home, &nats.url()).await?;
            assert_eq!(agent.ready["candidates"], 3);
            assert_eq!(
                agent.ready["filtered"], 8,
                "2 root hubs, 5 hubs, the keyboard"
            );

            let bus = nats.bus().await?;
            let mut log = StreamLog::open(&bus).await?;
            log.until_count("HostAgentStarted", 1).await?;
            let events = log.envelopes();
            assert_eq!(
                kinds(&events),
                [
                    "DeviceDiscovered",
                    "DeviceDiscovered",
                    "DeviceDiscovered",
                    "HostAgentStarted"
                ]
            );
            let found = discovered(&events);

            let key = by_port(&found, "3-2.3");
            assert_eq!(
                (key.descriptors.vendor_id, key.descriptors.product_id),
                (VendorId(0x1050), ProductId(0x0120))
            );
            assert_eq!(key.descriptors.serial, None);
            assert_eq!(
                key.lineage_kind,
                LineageKind::Port,
                "no serial: port lineage"
            );
            assert_eq!(key.lineage_id, port_lineage("3-2.3", 0x1050, 0x0120));
            assert_eq!(key.descriptors.address, UsbAddress::new(3, 12)?);
            assert_eq!(key.descriptors.interface_classes, [3]);
            assert_eq!(key.descriptors.vendor_db.as_deref(), Some("Yubico.com"));
            assert_eq!(
                key.descriptors.model_db.as_deref(),
                Some("Yubikey Touch U2F Security Key")
            );
            assert_eq!(key.descriptors.manufacturer.as_deref(), Some("Yubico"));
            assert_eq!(
                (
                    key.descriptors.speed.as_deref(),
                    key.descriptors.usb_version.as_deref()
                ),
                (Some("12"), Some("2.00"))
            );
            assert_eq!(key.syspath, recorded::YUBIKEY);
            assert_eq!(key.boot_id, "boot-1");

            let phone = by_port(&found, "1-1.5.2.4");
            assert_eq!(
                phone.descriptors.serial.as_deref(),
                Some("0123456789ABCDEF")
            );
            assert_eq!(
                phone.lineage_kind,
                LineageKind::Port,
                "bogus serial: port lineage"
            );
            assert_eq!(phone.lineage_id, port_lineage("1-1.5.2.4", 0x0fce, 0x0166));
            assert_eq!(phone.descriptors.interface_classes, [0xff]);

            let camera = by_port(&found, "1-1.5.2.3");
            assert_eq!(camera.descriptors.serial.as_deref(), Some(CAMERA_SERIAL));
            assert_eq!(camera.lineage_kind, LineageKind::Serial);
            assert_eq!(camera.lineage_id, camera_lineage());
            assert_eq!(
                camera.descriptors.product.as_deref(),
                Some("Canon Digital Camera")
            );
            assert_eq!(camera.descriptors.interface_classes, [6]);
            assert!(found
                .iter()
                .all(|d| d.supersedes.is_none() && d.host == host()));

            for (_, subject, env) in &log.events {
                assert_eq!(subject, &subjects::for_event(env));
                assert_eq!(env.host, Some(host()));
            }
            let Event::HostAgentStarted(started) = &events[3].body else {
                panic!("not HostAgentStarted");
            };
            assert_eq!(started.boot_id, "boot-1");
            assert_eq!(started.hypervisor_uri, "test:///default");
            assert_eq!(started.agent_version, env!("CARGO_PKG_VERSION"));
            agent.stop().await?;
            Ok(())
        },
    );
}

#[test]
fn a_replug_into_the_same_port_is_a_new_enumeration_of_the_same_lineage() {
    umockdev_test(
        "a_replug_into_the_same_port_is_a_new_enumeration_of_the_same_lineage",
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
            let old = by_port(&discovered(&log.envelopes()), "3-2.3").clone();

            tb.unplug(recorded::YUBIKEY)?;
            log.until_count("DeviceInvalidated", 1).await?;
            tb.add_recording(&relocate(&rec, recorded::YUBIKEY, None, 13)?)?;
            log.until_count("DeviceDiscovered", 4).await?;

            let after = log.since(4);
            assert_eq!(kinds(&after), ["DeviceInvalidated", "DeviceDiscovered"]);
            let gone = &invalidated(&after)[0];
            assert_eq!(gone.device_id, old.device_id);
            assert_eq!(gone.reason, InvalidationReason::Unplugged);
            assert_eq!(gone.superseded_by, None, "the replug was not known yet");
            let new = &discovered(&after)[0];
            assert_ne!(new.device_id, old.device_id);
            assert_eq!(new.lineage_id, old.lineage_id);
            assert_eq!(new.supersedes, Some(old.device_id));
            assert_eq!(new.descriptors.address, UsbAddress::new(3, 13)?);
            assert_eq!(new.descriptors.port_path, port("3-2.3"));
            check_history(&log.envelopes())?;
            agent.stop().await?;
            Ok(())
        },
    );
}

#[test]
fn a_serial_device_moved_to_another_port_keeps_its_lineage() {
    umockdev_test(
        "a_serial_device_moved_to_another_port_keeps_its_lineage",
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
            let first = discovered(&log.envelopes());
            let camera = by_port(&first, "1-1.5.2.3").clone();
            let key = by_port(&first, "3-2.3").clone();

            // The camera (serial lineage) goes from 1-1.5.2.3 to 1-1.5.2.1.
            tb.unplug(recorded::CAMERA)?;
            tb.add_recording(&relocate(&rec, recorded::CAMERA, Some("1-1.5.2.1"), 40)?)?;
            // The YubiKey (port lineage) goes from 3-2.3 to 3-2.4.
            tb.unplug(recorded::YUBIKEY)?;
            tb.add_recording(&relocate(&rec, recorded::YUBIKEY, Some("3-2.4"), 41)?)?;
            log.until_count("DeviceDiscovered", 5).await?;

            let found = discovered(&log.since(4));
            let moved = by_port(&found, "1-1.5.2.1");
            assert_eq!(moved.lineage_id, camera.lineage_id);
            assert_eq!(moved.lineage_id, camera_lineage());
            assert_eq!(moved.supersedes, Some(camera.device_id));
            assert_eq!(moved.descriptors.address, UsbAddress::new(1, 40)?);

            let key_moved = by_port(&found, "3-2.4");
            assert_ne!(
                key_moved.lineage_id, key.lineage_id,
                "a port lineage stays at its port"
            );
            assert_eq!(key_moved.lineage_id, port_lineage("3-2.4", 0x1050, 0x0120));
            assert_eq!(key_moved.supersedes, None);
            check_history(&log.envelopes())?;
            agent.stop().await?;
            Ok(())
        },
    );
}

#[test]
fn two_devices_with_one_serial_both_take_port_lineages_and_the_clash_is_reported() {
    umockdev_test(
        "two_devices_with_one_serial_both_take_port_lineages_and_the_clash_is_reported",
        || async {
            let tb = Testbed::new()?;
            let rec = host_recording()?;
            tb.add_recording(&rec)?;
            // A second camera with the same serial, present from the start.
            tb.add_recording(&relocate(&rec, recorded::CAMERA, Some("1-1.5.2.1"), 40)?)?;
            let nats = TestNats::start().await?;
            let home = AgentHome::new("host-a", "boot-1")?;
            let agent = AgentProcess::start(&home, &nats.url()).await?;
            let bus = nats.bus().await?;
            let mut log = StreamLog::open(&bus).await?;
            log.until_count("HostAgentStarted", 1).await?;
            let events = log.envelopes();
            assert_eq!(
                count(&events, "DeviceClashDetected"),
                1,
                "{:?}",
                kinds(&events)
            );
            let found = discovered(&events);
            for p in ["1-1.5.2.1", "1-1.5.2.3"] {
                let cam = by_port(&found, p);
                assert_eq!(cam.lineage_kind, LineageKind::Port, "{p}");
                assert_eq!(cam.lineage_id, port_lineage(p, 0x04a9, 0x31c0));
                assert_eq!(cam.descriptors.serial.as_deref(), Some(CAMERA_SERIAL));
            }
            let clash = |events: &[usbpt_schemas::Envelope]| {
                events
                    .iter()
                    .filter_map(|e| match &e.body {
                        Event::DeviceClashDetected(c) => Some(c.clone()),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
            };
            let c = &clash(&events)[0];
            assert_eq!(
                (c.vendor_id, c.product_id, c.serial.as_str()),
                (VendorId(0x04a9), ProductId(0x31c0), CAMERA_SERIAL)
            );
            assert_eq!(c.port_paths, [port("1-1.5.2.1"), port("1-1.5.2.3")]);
            let (_, subject, _) = log
                .events
                .iter()
                .find(|(_, _, e)| e.body.kind() == "DeviceClashDetected")
                .unwrap();
            assert_eq!(subject, &subjects::host_clash(&host()));

            // A third one is hot-plugged: a port lineage too, and the clash now names 3 ports.
            tb.add_recording(&relocate(&rec, recorded::CAMERA, Some("1-1.5.2.2"), 41)?)?;
            log.until_count("DeviceClashDetected", 2).await?;
            let after = log.since(events.len());
            assert_eq!(kinds(&after), ["DeviceDiscovered", "DeviceClashDetected"]);
            let third = &discovered(&after)[0];
            assert_eq!(third.lineage_id, port_lineage("1-1.5.2.2", 0x04a9, 0x31c0));
            assert_eq!(
                clash(&after)[0].port_paths,
                [port("1-1.5.2.1"), port("1-1.5.2.2"), port("1-1.5.2.3")]
            );
            agent.stop().await?;
            Ok(())
        },
    );
}

#[test]
fn a_reboot_with_renumbered_devices_invalidates_every_enumeration_and_links_the_new_ones() {
    umockdev_test(
        "a_reboot_with_renumbered_devices_invalidates_every_enumeration_and_links_the_new_ones",
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
            let before = discovered(&log.envelopes());
            agent.stop().await?;

            // The host reboots: every device comes back with a new devnum, and a new boot id.
            for (path, devnum) in [
                (recorded::YUBIKEY, 3),
                (recorded::PHONE, 7),
                (recorded::CAMERA, 6),
            ] {
                tb.remove_silently(path)?;
                tb.add_recording(&relocate(&rec, path, None, devnum)?)?;
            }
            home.set_boot_id("boot-2")?;
            let agent = AgentProcess::start(&home, &nats.url()).await?;
            log.until_count("HostAgentStarted", 2).await?;

            let after = log.since(4);
            assert_eq!(
                kinds(&after),
                [
                    "DeviceInvalidated",
                    "DeviceInvalidated",
                    "DeviceInvalidated",
                    "DeviceDiscovered",
                    "DeviceDiscovered",
                    "DeviceDiscovered",
                    "HostAgentStarted"
                ]
            );
            let now = discovered(&after);
            for old in &before {
                let gone = invalidated(&after)
                    .into_iter()
                    .find(|i| i.device_id == old.device_id)
                    .expect("every old enumeration invalidated");
                assert_eq!(gone.reason, InvalidationReason::HostRebooted);
                let new = now
                    .iter()
                    .find(|d| d.lineage_id == old.lineage_id)
                    .expect("same lineage after the reboot");
                assert_eq!(gone.superseded_by, Some(new.device_id));
                assert_eq!(new.supersedes, Some(old.device_id));
                assert_ne!(new.descriptors.address, old.descriptors.address);
                assert_eq!(new.boot_id, "boot-2");
            }
            let Event::HostAgentStarted(s) = &after[6].body else {
                panic!()
            };
            assert_eq!(s.boot_id, "boot-2");
            check_history(&log.envelopes())?;
            agent.stop().await?;
            Ok(())
        },
    );
}

#[test]
fn an_agent_down_while_devices_changed_reconciles_when_it_comes_back() {
    umockdev_test(
        "an_agent_down_while_devices_changed_reconciles_when_it_comes_back",
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
            let before = discovered(&log.envelopes());
            let phone = by_port(&before, "1-1.5.2.4").clone();
            let camera = by_port(&before, "1-1.5.2.3").clone();
            let key = by_port(&before, "3-2.3").clone();
            agent.crash().await?;

            // While it is down (same boot): the YubiKey leaves, the camera is re-plugged
            // (devnum 11 → 30), a stick arrives; the phone stays.
            tb.remove_silently(recorded::YUBIKEY)?;
            tb.remove_silently(recorded::CAMERA)?;
            tb.add_recording(&relocate(&rec, recorded::CAMERA, None, 30)?)?;
            let stick = usbpt_testkit::umockdev::UsbDeviceSpec::new(
                recorded::HUB_3_2,
                "3-2.4",
                3,
                20,
                0x0781,
                0x5567,
            )
            .serial("4C530001230101116155")
            .interface(8, 6, 0x50);
            tb.plug(&stick)?;

            let agent = AgentProcess::start(&home, &nats.url()).await?;
            log.until_count("HostAgentStarted", 2).await?;
            let after = log.since(4);
            assert_eq!(
                kinds(&after),
                [
                    "DeviceInvalidated",
                    "DeviceInvalidated",
                    "DeviceDiscovered",
                    "DeviceDiscovered",
                    "HostAgentStarted"
                ]
            );
            let gone = invalidated(&after);
            let key_gone = gone
                .iter()
                .find(|i| i.device_id == key.device_id)
                .expect("key");
            assert_eq!(key_gone.reason, InvalidationReason::VanishedWhileAgentDown);
            assert_eq!(key_gone.superseded_by, None);
            let cam_gone = gone
                .iter()
                .find(|i| i.device_id == camera.device_id)
                .expect("camera");
            assert_eq!(cam_gone.reason, InvalidationReason::VanishedWhileAgentDown);
            let now = discovered(&after);
            let cam = by_port(&now, "1-1.5.2.3");
            assert_eq!(cam_gone.superseded_by, Some(cam.device_id));
            assert_eq!(cam.supersedes, Some(camera.device_id));
            assert_eq!(cam.descriptors.address, UsbAddress::new(1, 30)?);
            let st = by_port(&now, "3-2.4");
            assert_eq!(st.lineage_kind, LineageKind::Serial);
            assert_eq!(st.descriptors.interface_classes, [8]);
            // The phone kept its enumeration: nothing about it.
            assert!(after.iter().all(|e| !matches!(&e.body,
                Event::DeviceInvalidated(i) if i.device_id == phone.device_id)));
            assert_eq!(live(&log.envelopes()).len(), 3);
            check_history(&log.envelopes())?;
            agent.stop().await?;
            Ok(())
        },
    );
}

/// Unplugs the recorded YubiKey and plugs it back with `devnum`, waiting for both events: one
/// more enumeration of its port lineage.
async fn replug_key(
    tb: &Testbed,
    rec: &str,
    log: &mut StreamLog,
    devnum: u16,
) -> anyhow::Result<usbpt_schemas::DeviceDiscovered> {
    let gone = count(&log.envelopes(), "DeviceInvalidated");
    let found = count(&log.envelopes(), "DeviceDiscovered");
    tb.unplug(recorded::YUBIKEY)?;
    log.until_count("DeviceInvalidated", gone + 1).await?;
    tb.add_recording(&relocate(rec, recorded::YUBIKEY, None, devnum)?)?;
    log.until_count("DeviceDiscovered", found + 1).await?;
    Ok(discovered(&log.envelopes()).pop().unwrap())
}

fn flap_events(log: &StreamLog) -> Vec<(String, Event)> {
    log.events
        .iter()
        .filter(|(_, _, e)| {
            matches!(
                e.body,
                Event::PortFlapping(_) | Event::PortFlappingCleared(_)
            )
        })
        .map(|(_, s, e)| (s.clone(), e.body.clone()))
        .collect()
}

/// Issue 18: a storm of re-plugs of one device raises `PortFlapping` once, at the enumeration
/// that crosses the threshold, and `PortFlappingCleared` once after the quiet period; a restart
/// in the middle of an episode still ends it (the episode is in the agent's state, not stuck).
#[test]
fn a_flap_storm_raises_port_flapping_once_and_clears_it_once_even_across_a_restart() {
    umockdev_test(
        "a_flap_storm_raises_port_flapping_once_and_clears_it_once_even_across_a_restart",
        || async {
            let tb = Testbed::new()?;
            let rec = host_recording()?;
            tb.add_recording(&rec)?;
            let nats = TestNats::start().await?;
            let home = AgentHome::new("host-a", "boot-1")?;
            // More than 3 enumerations within 10 minutes; over after 5 quiet seconds.
            let flags = [
                "--flap-threshold",
                "3",
                "--flap-window",
                "600",
                "--flap-quiet",
                "5",
            ];
            let agent = AgentProcess::start_with(&home, &nats.url(), &flags).await?;
            let bus = nats.bus().await?;
            let mut log = StreamLog::open(&bus).await?;
            log.until_count("HostAgentStarted", 1).await?;
            let key = by_port(&discovered(&log.envelopes()), "3-2.3").clone();
            let lineage = key.lineage_id;

            // The start's enumeration is the first; re-plugs 1 and 2 stay below the threshold.
            let mut devnum = 20;
            for _ in 0..2 {
                replug_key(&tb, &rec, &mut log, devnum).await?;
                devnum += 1;
            }
            assert!(flap_events(&log).is_empty(), "3 enumerations: not flapping");
            // The third re-plug is the 4th enumeration: raised, right after its discovery.
            let crossing = replug_key(&tb, &rec, &mut log, devnum).await?;
            devnum += 1;
            log.until_count("PortFlapping", 1).await?;
            let events = log.envelopes();
            let at = events
                .iter()
                .position(|e| matches!(e.body, Event::PortFlapping(_)))
                .unwrap();
            let Event::PortFlapping(raised) = &events[at].body else {
                unreachable!()
            };
            assert_eq!(
                events[at - 1].body.discovery().map(|(d, _)| d.device_id),
                Some(crossing.device_id),
                "published with the discovery that crossed the threshold"
            );
            assert_eq!(raised.lineage_id, lineage);
            assert_eq!(raised.device_id, crossing.device_id);
            assert_eq!(raised.port_path, port("3-2.3"));
            assert_eq!(
                (raised.enumerations, raised.threshold, raised.window_secs),
                (4, 3, 600)
            );
            // The storm goes on: no second PortFlapping.
            let mut latest = crossing;
            for _ in 0..3 {
                latest = replug_key(&tb, &rec, &mut log, devnum).await?;
                devnum += 1;
            }
            // Quiet for 5 s: cleared once, naming the enumeration present.
            log.until_count("PortFlappingCleared", 1).await?;
            // One more re-plug (a new count, below the threshold) after the clear: everything
            // the agent published before it is in the log, so the counts are final.
            replug_key(&tb, &rec, &mut log, devnum).await?;
            devnum += 1;
            let flaps = flap_events(&log);
            assert_eq!(flaps.len(), 2, "{flaps:?}");
            let Event::PortFlappingCleared(cleared) = &flaps[1].1 else {
                panic!("{flaps:?}")
            };
            assert_eq!(cleared.lineage_id, lineage);
            assert_eq!(cleared.device_id, Some(latest.device_id));
            assert_eq!(cleared.quiet_secs, 5);
            let subject = format!("usbpt.evt.host.host-a.flap.{lineage}");
            assert!(flaps.iter().all(|(s, _)| *s == subject), "{flaps:?}");

            // A second episode (3 more re-plugs: 4 enumerations since the clear), then the agent
            // stops before it is quiet: the restarted agent still clears it.
            for _ in 0..3 {
                replug_key(&tb, &rec, &mut log, devnum).await?;
                devnum += 1;
            }
            log.until_count("PortFlapping", 2).await?;
            agent.stop().await?;
            let agent = AgentProcess::start_with(&home, &nats.url(), &flags).await?;
            log.until_count("PortFlappingCleared", 2).await?;
            replug_key(&tb, &rec, &mut log, devnum).await?;
            let flaps = flap_events(&log);
            assert_eq!(
                flaps.iter().map(|(_, e)| e.kind()).collect::<Vec<_>>(),
                [
                    "PortFlapping",
                    "PortFlappingCleared",
                    "PortFlapping",
                    "PortFlappingCleared"
                ]
            );
            check_history(&log.envelopes())?;
            agent.stop().await?;
            Ok(())
        },
    );
}
