//! Given a state, when an observation or a snapshot arrives, then these events.

use usbpt_schemas::{
    Event, InvalidationReason, LineageKey, LineageKind, UsbAddress, UsbDescriptors,
};
use uuid::Uuid;

use super::*;
use crate::observation::{Action, Interface};

const BOOT_1: &str = "6b1c0f1e-0000-4000-8000-000000000001";
const BOOT_2: &str = "6b1c0f1e-0000-4000-8000-000000000002";

fn host() -> HostName {
    HostName::new("host-a").expect("valid")
}

/// Ids 1, 2, 3 … so tests can name them.
fn counter() -> impl FnMut() -> DeviceId {
    let mut n = 0u128;
    move || {
        n += 1;
        DeviceId::from_uuid(Uuid::from_u128(n))
    }
}
fn id(n: u128) -> DeviceId {
    DeviceId::from_uuid(Uuid::from_u128(n))
}

fn dev(
    port: &str,
    devnum: u16,
    vendor: u16,
    product: u16,
    serial: Option<&str>,
    class: u8,
    ifs: &[(u8, u8, u8)],
) -> UsbDevice {
    let port_path: PortPath = port.parse().expect("port");
    let syspath = format!("/sys/devices/pci0000:00/usb{}/{port}", port_path.bus());
    let mut desc = UsbDescriptors::new(
        UsbAddress::new(port_path.bus(), devnum).expect("address"),
        port_path,
        VendorId(vendor),
        ProductId(product),
    );
    desc.serial = serial.map(str::to_owned);
    desc.device_class = class;
    desc.speed = Some("480".into());
    desc.usb_version = Some("2.00".into());
    UsbDevice::new(
        syspath,
        desc,
        ifs.iter()
            .map(|&(c, s, p)| Interface::new(c, s, p))
            .collect(),
    )
}

// The four recordings (fido2 moved to bus 3, as the integration tests load them).
fn yubikey(devnum: u16) -> UsbDevice {
    dev("3-2.3", devnum, 0x1050, 0x0120, None, 0, &[(3, 0, 0)])
}
fn phone(devnum: u16) -> UsbDevice {
    dev(
        "1-1.5.2.4",
        devnum,
        0x0fce,
        0x0166,
        Some("0123456789ABCDEF"),
        0,
        &[(0xff, 0xff, 0)],
    )
}
fn camera_at(port: &str, devnum: u16) -> UsbDevice {
    dev(
        port,
        devnum,
        0x04a9,
        0x31c0,
        Some("C767F1C714174C309255F70E4A7B2EE2"),
        0,
        &[(6, 1, 1)],
    )
}
fn camera(devnum: u16) -> UsbDevice {
    camera_at("1-1.5.2.3", devnum)
}
fn keyboard() -> UsbDevice {
    dev("1-1.5.4.2", 9, 0x05f3, 0x0007, None, 0, &[(3, 1, 1)])
}
fn root_hub(bus: u16) -> UsbDevice {
    dev(
        &format!("usb{bus}"),
        1,
        0x1d6b,
        0x0002,
        Some("0000:00:1a.0"),
        9,
        &[(9, 0, 0)],
    )
}
fn hub(port: &str, devnum: u16) -> UsbDevice {
    dev(port, devnum, 0x0409, 0x0058, None, 9, &[(9, 0, 0)])
}
fn host_snapshot() -> Vec<UsbDevice> {
    vec![
        root_hub(1),
        root_hub(3),
        hub("1-1", 2),
        hub("1-1.5", 3),
        hub("1-1.5.2", 5),
        hub("3-2", 2),
        yubikey(12),
        phone(24),
        camera(11),
        keyboard(),
    ]
}

struct Agent {
    state: State,
    host: HostName,
    boot: String,
    filter: Filter,
    ids: Box<dyn FnMut() -> DeviceId>,
}

impl Agent {
    fn new() -> Self {
        Self {
            state: State::default(),
            host: host(),
            boot: BOOT_1.into(),
            filter: Filter::default(),
            ids: Box::new(counter()),
        }
    }
    fn start(&mut self, snapshot: Vec<UsbDevice>) -> Vec<Event> {
        let ctx = Context {
            host: &self.host,
            boot_id: &self.boot,
        };
        reconcile(
            &mut self.state,
            ctx,
            &self.filter,
            snapshot,
            Reconcile::Start,
            &mut self.ids,
        )
    }
    fn rescan(&mut self, snapshot: Vec<UsbDevice>) -> Vec<Event> {
        let ctx = Context {
            host: &self.host,
            boot_id: &self.boot,
        };
        reconcile(
            &mut self.state,
            ctx,
            &self.filter,
            snapshot,
            Reconcile::Rescan,
            &mut self.ids,
        )
    }
    fn add(&mut self, d: UsbDevice) -> Vec<Event> {
        self.see(Observation::Present {
            action: Action::Add,
            device: d,
        })
    }
    fn remove(&mut self, d: &UsbDevice) -> Vec<Event> {
        self.see(Observation::Removed {
            syspath: d.syspath.clone(),
            address: Some(d.descriptors.address),
        })
    }
    fn see(&mut self, o: Observation) -> Vec<Event> {
        let ctx = Context {
            host: &self.host,
            boot_id: &self.boot,
        };
        observe(&mut self.state, ctx, &self.filter, o, &mut self.ids)
    }
    fn known(&self, d: &UsbDevice) -> &Known {
        self.state.devices.get(&d.syspath).expect("known")
    }
}

fn discovered(events: &[Event]) -> Vec<&DeviceDiscovered> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::DeviceDiscovered(d) => Some(d),
            _ => None,
        })
        .collect()
}
fn invalidated(events: &[Event]) -> Vec<&DeviceInvalidated> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::DeviceInvalidated(d) => Some(d),
            _ => None,
        })
        .collect()
}
fn kinds(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(Event::kind).collect()
}
fn serial_lineage(d: &UsbDevice) -> LineageId {
    LineageId::derive(&LineageKey::Serial {
        vendor: d.descriptors.vendor_id,
        product: d.descriptors.product_id,
        serial: d.descriptors.serial.as_deref().expect("serial"),
    })
}
fn port_lineage(d: &UsbDevice) -> LineageId {
    LineageId::derive(&LineageKey::Port {
        host: &host(),
        port: &d.descriptors.port_path,
        vendor: d.descriptors.vendor_id,
        product: d.descriptors.product_id,
    })
}

#[test]
fn first_start_discovers_candidates_with_the_right_lineages() {
    let mut a = Agent::new();
    let events = a.start(host_snapshot());
    let found = discovered(&events);
    assert_eq!(events.len(), 3, "{:?}", kinds(&events));
    let by_product = |p: u16| {
        found
            .iter()
            .find(|d| d.descriptors.product_id == ProductId(p))
            .copied()
            .expect("discovered")
    };
    let key = by_product(0x0120);
    assert_eq!(
        key.lineage_kind,
        LineageKind::Port,
        "no serial → port lineage"
    );
    assert_eq!(key.lineage_id, port_lineage(&yubikey(12)));
    assert_eq!(key.descriptors.serial, None);
    let phone_ev = by_product(0x0166);
    assert_eq!(
        phone_ev.lineage_kind,
        LineageKind::Port,
        "bogus serial → port lineage"
    );
    assert_eq!(
        phone_ev.descriptors.serial.as_deref(),
        Some("0123456789ABCDEF")
    );
    let cam = by_product(0x31c0);
    assert_eq!(cam.lineage_kind, LineageKind::Serial);
    assert_eq!(cam.lineage_id, serial_lineage(&camera(11)));
    assert_eq!(cam.descriptors.interface_classes, vec![6]);
    assert_eq!(
        cam.descriptors.address,
        UsbAddress::new(1, 11).expect("addr")
    );
    assert_eq!(cam.boot_id, BOOT_1);
    assert!(found
        .iter()
        .all(|d| d.supersedes.is_none() && d.host == host()));
    // Hubs, root hubs and the keyboard are known but filtered.
    assert_eq!(a.state.filtered_count(), 7);
    assert_eq!(a.state.candidates().count(), 3);
    assert_eq!(a.state.boot_id.as_deref(), Some(BOOT_1));
}

#[test]
fn restart_in_the_same_boot_with_nothing_changed_is_silent() {
    let mut a = Agent::new();
    a.start(host_snapshot());
    let before = a.state.clone();
    let events = a.start(host_snapshot());
    assert!(events.is_empty(), "{:?}", kinds(&events));
    assert_eq!(a.state, before);
}

#[test]
fn restart_in_the_same_boot_reports_what_changed_while_down() {
    let mut a = Agent::new();
    a.start(host_snapshot());
    let key_id = a.known(&yubikey(12)).device_id;
    let phone_id = a.known(&phone(24)).device_id;
    let cam_id = a.known(&camera(11)).device_id;
    // While down: the phone left, the camera was re-plugged (devnum 11 → 30), a stick arrived.
    let stick = dev(
        "1-1.5.2.1",
        31,
        0x0781,
        0x5567,
        Some("4C530001"),
        0,
        &[(8, 6, 0x50)],
    );
    let mut now: Vec<UsbDevice> = host_snapshot()
        .into_iter()
        .filter(|d| {
            d.descriptors.product_id != ProductId(0x0166)
                && d.descriptors.product_id != ProductId(0x31c0)
        })
        .collect();
    now.push(camera(30));
    now.push(stick.clone());
    let events = a.start(now);
    assert_eq!(
        kinds(&events),
        [
            "DeviceInvalidated",
            "DeviceInvalidated",
            "DeviceDiscovered",
            "DeviceDiscovered"
        ]
    );
    let gone = invalidated(&events);
    let cam_new = a.known(&camera(30)).device_id;
    let phone_gone = gone
        .iter()
        .find(|i| i.device_id == phone_id)
        .expect("phone");
    assert_eq!(
        phone_gone.reason,
        InvalidationReason::VanishedWhileAgentDown
    );
    assert_eq!(phone_gone.superseded_by, None);
    let cam_gone = gone.iter().find(|i| i.device_id == cam_id).expect("camera");
    assert_eq!(cam_gone.reason, InvalidationReason::VanishedWhileAgentDown);
    assert_eq!(cam_gone.superseded_by, Some(cam_new));
    let new = discovered(&events);
    let cam = new.iter().find(|d| d.device_id == cam_new).expect("camera");
    assert_eq!(cam.supersedes, Some(cam_id));
    assert_eq!(cam.lineage_id, serial_lineage(&camera(30)));
    let st = new
        .iter()
        .find(|d| d.descriptors.product_id == ProductId(0x5567))
        .expect("stick");
    assert_eq!(st.supersedes, None);
    // The YubiKey is untouched and keeps its id.
    assert_eq!(a.known(&yubikey(12)).device_id, key_id);
}

#[test]
fn new_boot_invalidates_everything_and_links_successors_by_lineage() {
    let mut a = Agent::new();
    a.start(host_snapshot());
    let old_key = a.known(&yubikey(12)).device_id;
    let old_cam = a.known(&camera(11)).device_id;
    let old_phone = a.known(&phone(24)).device_id;
    // Reboot: same devices, renumbered; the camera now sits on another port.
    a.boot = BOOT_2.into();
    let snapshot = vec![
        root_hub(1),
        root_hub(3),
        hub("1-1", 2),
        hub("1-1.5", 4),
        hub("1-1.5.2", 6),
        hub("3-2", 2),
        yubikey(3),
        phone(8),
        camera_at("1-1.5.2.1", 7),
    ];
    let events = a.start(snapshot);
    assert_eq!(
        kinds(&events),
        [
            "DeviceInvalidated",
            "DeviceInvalidated",
            "DeviceInvalidated",
            "DeviceDiscovered",
            "DeviceDiscovered",
            "DeviceDiscovered"
        ]
    );
    for inv in invalidated(&events) {
        assert_eq!(inv.reason, InvalidationReason::HostRebooted);
        let successor = discovered(&events)
            .into_iter()
            .find(|d| d.lineage_id == inv.lineage_id)
            .expect("same lineage rediscovered");
        assert_eq!(inv.superseded_by, Some(successor.device_id));
        assert_eq!(successor.supersedes, Some(inv.device_id));
        assert_eq!(successor.boot_id, BOOT_2);
        assert!(![old_key, old_cam, old_phone].contains(&successor.device_id));
    }
    let cam = discovered(&events)
        .into_iter()
        .find(|d| d.descriptors.product_id == ProductId(0x31c0))
        .expect("camera");
    assert_eq!(
        cam.supersedes,
        Some(old_cam),
        "the serial lineage followed it to 1-1.5.2.1"
    );
    assert_eq!(a.state.boot_id.as_deref(), Some(BOOT_2));
}

#[test]
fn replug_into_the_same_port_is_a_new_enumeration_of_the_same_lineage() {
    let mut a = Agent::new();
    a.start(host_snapshot());
    let old = a.known(&yubikey(12)).clone();
    let events = a.remove(&yubikey(12));
    let inv = invalidated(&events);
    assert_eq!(inv.len(), 1);
    assert_eq!(inv[0].device_id, old.device_id);
    assert_eq!(inv[0].reason, InvalidationReason::Unplugged);
    assert_eq!(inv[0].superseded_by, None);
    let events = a.add(yubikey(13));
    let new = discovered(&events);
    assert_eq!(new.len(), 1);
    assert_ne!(new[0].device_id, old.device_id);
    assert_eq!(new[0].lineage_id, old.lineage_id);
    assert_eq!(new[0].supersedes, Some(old.device_id));
    assert_eq!(
        new[0].descriptors.address,
        UsbAddress::new(3, 13).expect("addr")
    );
}

#[test]
fn a_serial_device_keeps_its_lineage_on_another_port_and_a_port_device_does_not() {
    let mut a = Agent::new();
    a.start(host_snapshot());
    let cam = a.known(&camera(11)).clone();
    a.remove(&camera(11));
    let events = a.add(camera_at("1-1.5.2.1", 40));
    let new = discovered(&events);
    assert_eq!(new[0].lineage_id, cam.lineage_id);
    assert_eq!(new[0].supersedes, Some(cam.device_id));
    assert_eq!(new[0].descriptors.port_path.to_string(), "1-1.5.2.1");

    let key = a.known(&yubikey(12)).clone();
    a.remove(&yubikey(12));
    let moved = dev("3-2.4", 14, 0x1050, 0x0120, None, 0, &[(3, 0, 0)]);
    let events = a.add(moved);
    let new = discovered(&events);
    assert_ne!(new[0].lineage_id, key.lineage_id);
    assert_eq!(new[0].supersedes, None);
}

#[test]
fn an_add_over_a_known_enumeration_is_a_reenumeration() {
    let mut a = Agent::new();
    a.start(host_snapshot());
    let old = a.known(&yubikey(12)).device_id;
    let events = a.add(yubikey(20)); // its remove was never seen
    assert_eq!(kinds(&events), ["DeviceInvalidated", "DeviceDiscovered"]);
    let new = a.known(&yubikey(20)).device_id;
    let inv = invalidated(&events)[0];
    assert_eq!(inv.reason, InvalidationReason::Reenumerated);
    assert_eq!(inv.superseded_by, Some(new));
    assert_eq!(discovered(&events)[0].supersedes, Some(old));
    // A different device at that port: the old one was unplugged, no succession.
    let other = dev(
        "3-2.3",
        21,
        0x0781,
        0x5567,
        Some("ABC123"),
        0,
        &[(8, 6, 0x50)],
    );
    let events = a.add(other);
    let inv = invalidated(&events)[0];
    assert_eq!(
        (inv.reason, inv.superseded_by),
        (InvalidationReason::Unplugged, None)
    );
    assert_eq!(discovered(&events)[0].supersedes, None);
}

#[test]
fn duplicate_adds_and_stale_removes_change_nothing() {
    let mut a = Agent::new();
    a.start(host_snapshot());
    let before = a.state.clone();
    assert!(a.add(yubikey(12)).is_empty());
    assert!(a
        .see(Observation::Present {
            action: Action::Bind,
            device: yubikey(12)
        })
        .is_empty());
    assert!(
        a.remove(&yubikey(7)).is_empty(),
        "remove of devnum 7, but 12 is there"
    );
    assert!(a
        .see(Observation::Removed {
            syspath: "/sys/devices/nowhere".into(),
            address: None
        })
        .is_empty());
    assert_eq!(a.state, before);
    // A remove without an address ends whatever is there.
    let events = a.see(Observation::Removed {
        syspath: yubikey(12).syspath,
        address: None,
    });
    assert_eq!(kinds(&events), ["DeviceInvalidated"]);
}

#[test]
fn filtered_devices_are_never_published() {
    let mut a = Agent::new();
    a.start(vec![root_hub(1), hub("1-1", 2)]);
    assert!(a.add(keyboard()).is_empty());
    assert!(a.remove(&keyboard()).is_empty());
    assert!(a.add(hub("1-1.5", 3)).is_empty());
    assert_eq!(a.state.filtered_count(), 3);
}

#[test]
fn a_changed_filter_withdraws_or_publishes_a_known_enumeration() {
    let mut a = Agent::new();
    a.start(host_snapshot());
    let cam = a.known(&camera(11)).clone();
    let kbd = a.known(&keyboard()).clone();
    a.filter = Filter::from_toml(
        "[[rule]]\naction = \"deny\"\nvendor = \"04a9\"\n[[rule]]\naction = \"allow\"\nvendor = \"05f3\"\n",
        "f",
    )
    .expect("valid");
    let events = a.start(host_snapshot());
    assert_eq!(kinds(&events), ["DeviceInvalidated", "DeviceDiscovered"]);
    let inv = invalidated(&events)[0];
    assert_eq!(
        (inv.device_id, inv.reason),
        (cam.device_id, InvalidationReason::Filtered)
    );
    let d = discovered(&events)[0];
    assert_eq!(
        d.device_id, kbd.device_id,
        "same enumeration, published now"
    );
    assert_eq!(d.supersedes, None);
    // Same on a live change event: back to the default filter.
    a.filter = Filter::default();
    let events = a.see(Observation::Present {
        action: Action::Change,
        device: keyboard(),
    });
    assert_eq!(kinds(&events), ["DeviceInvalidated"]);
    let events = a.see(Observation::Present {
        action: Action::Change,
        device: camera(11),
    });
    assert_eq!(kinds(&events), ["DeviceDiscovered"]);
    assert_eq!(discovered(&events)[0].device_id, cam.device_id);
}

#[test]
fn two_devices_with_one_serial_both_take_port_lineages_at_start() {
    let mut a = Agent::new();
    let twin = camera_at("1-1.5.2.1", 12);
    let mut snapshot = host_snapshot();
    snapshot.push(twin.clone());
    let events = a.start(snapshot.clone());
    let cams: Vec<_> = discovered(&events)
        .into_iter()
        .filter(|d| d.descriptors.product_id == ProductId(0x31c0))
        .collect();
    assert_eq!(cams.len(), 2);
    assert!(cams.iter().all(|d| d.lineage_kind == LineageKind::Port));
    assert_eq!(cams[0].lineage_id, port_lineage(&twin));
    assert_eq!(cams[1].lineage_id, port_lineage(&camera(11)));
    let clash: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::DeviceClashDetected(c) => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(clash.len(), 1);
    assert_eq!(clash[0].serial, "C767F1C714174C309255F70E4A7B2EE2");
    let ports: Vec<String> = clash[0]
        .port_paths
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(ports, ["1-1.5.2.1", "1-1.5.2.3"]);
    assert_eq!(events.last().map(Event::kind), Some("DeviceClashDetected"));
    // Restarting in the same boot does not report it again.
    assert!(a.start(snapshot).is_empty());
}

#[test]
fn a_second_device_with_a_known_serial_takes_a_port_lineage_and_the_clash_is_reported() {
    let mut a = Agent::new();
    a.start(host_snapshot());
    let incumbent = a.known(&camera(11)).clone();
    let twin = camera_at("1-1.5.2.1", 40);
    let events = a.add(twin.clone());
    assert_eq!(kinds(&events), ["DeviceDiscovered", "DeviceClashDetected"]);
    let d = discovered(&events)[0];
    assert_eq!(
        (d.lineage_kind, d.lineage_id),
        (LineageKind::Port, port_lineage(&twin))
    );
    assert_eq!(d.supersedes, None);
    // The device already there keeps its enumeration and its serial lineage …
    assert_eq!(a.known(&camera(11)), &incumbent);
    // … until it is next enumerated while the clash lasts.
    a.remove(&camera(11));
    let events = a.add(camera(41));
    assert_eq!(
        kinds(&events),
        ["DeviceDiscovered"],
        "same two ports: not reported again"
    );
    let d = discovered(&events)[0];
    assert_eq!(
        (d.lineage_kind, d.lineage_id),
        (LineageKind::Port, port_lineage(&camera(41)))
    );
    // One leaves; the other keeps the lineage it has.
    a.remove(&twin);
    // A twin at a port not reported yet is reported.
    let events = a.add(camera_at("1-1.5.2.2", 42));
    assert_eq!(kinds(&events), ["DeviceDiscovered", "DeviceClashDetected"]);
    // And a device whose serial is unique again gets its serial lineage back.
    a.remove(&camera_at("1-1.5.2.2", 42));
    a.remove(&camera(41));
    assert!(
        a.state.clashes.is_empty(),
        "no device with the serial is left"
    );
    let events = a.add(camera(43));
    let d = discovered(&events)[0];
    assert_eq!(d.lineage_id, incumbent.lineage_id);
    assert_eq!(d.supersedes, Some(incumbent.device_id));
}

#[test]
fn bogus_serials_never_clash() {
    let mut a = Agent::new();
    a.start(host_snapshot());
    let other_phone = dev(
        "1-1.5.2.1",
        50,
        0x0fce,
        0x0166,
        Some("0123456789ABCDEF"),
        0,
        &[],
    );
    let events = a.add(other_phone);
    assert_eq!(kinds(&events), ["DeviceDiscovered"]);
}

#[test]
fn a_rescan_after_lost_events_reconciles_with_unplugged() {
    let mut a = Agent::new();
    a.start(host_snapshot());
    let cam = a.known(&camera(11)).device_id;
    let key = a.known(&yubikey(12)).device_id;
    let mut now: Vec<UsbDevice> = host_snapshot()
        .into_iter()
        .filter(|d| {
            d.descriptors.product_id != ProductId(0x31c0)
                && d.descriptors.product_id != ProductId(0x0120)
        })
        .collect();
    now.push(yubikey(60));
    let events = a.rescan(now);
    assert_eq!(
        kinds(&events),
        ["DeviceInvalidated", "DeviceInvalidated", "DeviceDiscovered"]
    );
    let inv = invalidated(&events);
    let by_id = |d| inv.iter().find(|i| i.device_id == d).expect("invalidated");
    assert_eq!(by_id(cam).reason, InvalidationReason::Unplugged);
    assert_eq!(by_id(key).reason, InvalidationReason::Unplugged);
    assert_eq!(
        by_id(key).superseded_by,
        Some(a.known(&yubikey(60)).device_id)
    );
    assert_eq!(a.state.boot_id.as_deref(), Some(BOOT_1));
}

#[test]
fn bogus_serials() {
    for s in [
        "",
        "  ",
        "0",
        "0000000000",
        "0123456789ABCDEF",
        "0123456789abcdef",
        "0123456789",
        "AB\u{1}C",
    ] {
        assert!(is_bogus_serial(s), "{s:?}");
    }
    for s in [
        "C767F1C714174C309255F70E4A7B2EE2",
        "1",
        "00000001",
        "0123456789ABCDEE",
    ] {
        assert!(!is_bogus_serial(s), "{s:?}");
    }
}

#[test]
fn lineage_memory_is_bounded_and_forgets_the_oldest() {
    let mut a = Agent::new();
    a.start(vec![]);
    let total = LINEAGE_MEMORY + 10;
    for i in 0..total {
        let d = dev("1-2", 5, 0x1234, 0x5678, Some(&format!("S{i}")), 0, &[]);
        a.add(d.clone());
        a.remove(&d);
    }
    assert_eq!(a.state.lineages.len(), LINEAGE_MEMORY);
    let first = serial_lineage(&dev("1-2", 5, 0x1234, 0x5678, Some("S0"), 0, &[]));
    assert!(!a.state.lineages.contains_key(&first));
    let last_serial = format!("S{}", total - 1);
    let last = serial_lineage(&dev("1-2", 5, 0x1234, 0x5678, Some(&last_serial), 0, &[]));
    assert_eq!(a.state.lineages.get(&last), Some(&id(total as u128)));
}

/// Seen on a real kernel (docs/lab.md): a device that QEMU's `usb-host` held was unplugged, and
/// udevd's `unbind` for it carried none of udevd's properties (no `ID_SERIAL_SHORT`, no strings)
/// while sysfs was already gone, so the agent could describe it only from the kernel's own
/// properties. It is the same enumeration (same syspath and devnum): no event, descriptors kept;
/// the `remove` that follows ends it with its serial lineage. (Before the fix: the real device
/// was invalidated as unplugged, a phantom serial-less device was discovered on a port lineage,
/// then invalidated by the `remove`.)
#[test]
fn an_unbind_without_udev_properties_is_the_same_enumeration() {
    let mut a = Agent::new();
    let token = dev(
        "4-1",
        2,
        0x1050,
        0x0407,
        Some("LABTOKEN0042"),
        0,
        &[(2, 2, 1), (10, 0, 0)],
    );
    let found = a.add(token.clone());
    assert_eq!(discovered(&found).len(), 1);
    let first = discovered(&found)[0].clone();
    assert_eq!(first.lineage_kind, LineageKind::Serial);

    let mut bare = dev("4-1", 2, 0x1050, 0x0407, None, 0, &[]);
    bare.descriptors.speed = None;
    bare.descriptors.usb_version = None;
    let events = a.see(Observation::Present {
        action: Action::Unbind,
        device: bare,
    });
    assert!(events.is_empty(), "{:?}", kinds(&events));
    assert_eq!(a.known(&token).device, token, "descriptors kept");

    let events = a.remove(&token);
    assert_eq!(kinds(&events), vec!["DeviceInvalidated"]);
    let gone = invalidated(&events)[0];
    assert_eq!(gone.device_id, first.device_id);
    assert_eq!(gone.lineage_id, serial_lineage(&token));
    assert_eq!(gone.reason, InvalidationReason::Unplugged);

    // Plugged back: the same serial lineage, superseding the first enumeration.
    let events = a.add(dev(
        "4-1",
        3,
        0x1050,
        0x0407,
        Some("LABTOKEN0042"),
        0,
        &[(2, 2, 1)],
    ));
    let back = discovered(&events);
    assert_eq!(back.len(), 1, "{:?}", kinds(&events));
    assert_eq!(back[0].lineage_id, first.lineage_id);
    assert_eq!(back[0].supersedes, Some(first.device_id));
}

/// The other half of the rule: a report of the same enumeration that reads more than before
/// (interfaces created after `add`) is taken.
#[test]
fn a_later_report_fills_in_what_was_not_readable() {
    let mut a = Agent::new();
    let early = dev("4-1", 2, 0x1050, 0x0407, Some("S1"), 0, &[]);
    a.add(early.clone());
    let full = dev("4-1", 2, 0x1050, 0x0407, Some("S1"), 0, &[(3, 1, 1)]);
    a.see(Observation::Present {
        action: Action::Bind,
        device: full.clone(),
    });
    assert_eq!(a.known(&early).device.interfaces(), full.interfaces());
}
