//! The fold's semantics on the in-memory state: given events, then the view. (The same history
//! on real redb files, in batches, is in `projector/tests/`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use usbpt_schemas::*;
use uuid::Uuid;

use super::memory::MemState;
use super::semantics::{apply, apply_bytes};
use super::Outcome;
use crate::model::*;

fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | n)
}

fn host(s: &str) -> HostName {
    HostName::new(s).unwrap()
}

/// A serial-identified key's discovery as a correct agent reports it (lineage derived).
fn disc(dev: u128, on: &str, serial: &str) -> DeviceDiscovered {
    let (vendor_id, product_id) = (VendorId(0x136b), ProductId(0x0003));
    DeviceDiscovered {
        device_id: DeviceId(id(dev)),
        lineage_id: LineageId::derive(&LineageKey::Serial {
            vendor: vendor_id,
            product: product_id,
            serial,
        }),
        lineage_kind: LineageKind::Serial,
        host: host(on),
        boot_id: "boot-1".into(),
        descriptors: UsbDescriptors {
            address: UsbAddress::new(2, 3).unwrap(),
            port_path: "2-1.4".parse().unwrap(),
            vendor_id,
            product_id,
            serial: Some(serial.into()),
            device_class: 0,
            interface_classes: vec![3],
            manufacturer: None,
            product: None,
            vendor_db: None,
            model_db: None,
            speed: None,
            usb_version: None,
        },
        syspath: "/sys/devices/usb2/2-1/2-1.4".into(),
        supersedes: None,
    }
}

fn invalidated(d: &DeviceDiscovered, reason: InvalidationReason) -> Event {
    Event::DeviceInvalidated(DeviceInvalidated {
        device_id: d.device_id,
        lineage_id: d.lineage_id,
        host: d.host.clone(),
        reason,
        superseded_by: None,
    })
}

const FLAVOR: u128 = 40;
const SERVER: u128 = 30;

fn flavor_created() -> Event {
    Event::FlavorCreated(FlavorCreated {
        flavor_id: FlavorId(id(FLAVOR)),
        name: FlavorName::new("erp-key").unwrap(),
        usb: Vec::new(),
    })
}

fn boot_requested() -> Event {
    Event::ServerBootRequested(ServerBootRequested {
        server_id: ServerId(id(SERVER)),
        name: ServerName::new("erp-1").unwrap(),
        flavor_id: FlavorId(id(FLAVOR)),
        requested_host: None,
    })
}

fn claimed(d: &DeviceDiscovered, follow: FollowPolicy) -> Event {
    Event::DeviceClaimed(DeviceClaimed {
        device_id: d.device_id,
        lineage_id: d.lineage_id,
        host: d.host.clone(),
        server_id: ServerId(id(SERVER)),
        request_index: 0,
        controller: ControllerModel::Xhci,
        follow,
    })
}

fn attached(d: &DeviceDiscovered) -> Event {
    Event::DeviceAttached(DeviceAttached {
        device_id: d.device_id,
        lineage_id: d.lineage_id,
        host: d.host.clone(),
        server_id: ServerId(id(SERVER)),
        address: UsbAddress::new(1, 2).unwrap(),
        method: AttachMethod::DomainDefinition,
        detail: String::new(),
    })
}

fn released(d: &DeviceDiscovered) -> Event {
    Event::DeviceReleased(DeviceReleased {
        device_id: d.device_id,
        lineage_id: d.lineage_id,
        host: d.host.clone(),
        server_id: ServerId(id(SERVER)),
        reason: ReleaseReason::ServerDeleted,
    })
}

/// An in-memory view and the stream sequence of the last event folded into it.
#[derive(Default)]
struct Fold {
    s: MemState,
    seq: u64,
}

impl Fold {
    /// Folds `body` on its own subject.
    fn ev(&mut self, body: Event) -> Outcome {
        let env = Envelope::new(body);
        let subject = subjects::for_event(&env);
        self.on(&subject, env)
    }

    /// Folds `env` on `subject`.
    fn on(&mut self, subject: &str, env: Envelope) -> Outcome {
        self.seq += 1;
        apply(&mut self.s, self.seq, subject, &env).unwrap()
    }

    /// Folds every event, each of which must be applied.
    fn all(&mut self, bodies: impl IntoIterator<Item = Event>) {
        for body in bodies {
            let kind = body.kind();
            assert_eq!(
                self.ev(body),
                Outcome::Applied(kind),
                "{:?}",
                self.s.quarantine
            );
        }
    }

    fn device(&self, d: &DeviceDiscovered) -> &Device {
        &self.s.devices[&d.device_id]
    }

    fn counter(&self, key: &str) -> u64 {
        self.s.counters.get(key).copied().unwrap_or(0)
    }
}

#[test]
fn discovered_invalidated_rediscovered_moves_the_lineage_on() {
    let mut f = Fold::default();
    let first = disc(1, "host-a", "SN1");
    let second = disc(2, "host-a", "SN1");
    f.all([
        Event::DeviceDiscovered(first.clone()),
        invalidated(&first, InvalidationReason::Unplugged),
        Event::DeviceDiscovered(second.clone()),
    ]);

    let l = &f.s.lineages[&first.lineage_id];
    assert_eq!((l.current, l.enumerations), (second.device_id, 2));
    assert_eq!(
        f.s.lineage_history.values().copied().collect::<Vec<_>>(),
        [first.device_id, second.device_id],
        "each enumeration recorded in order"
    );
    let old = f.device(&first);
    assert!(!old.current);
    assert_eq!(old.status, DeviceStatus::Invalidated);
    let inv = old.invalidation.unwrap();
    assert_eq!(inv.reason, Some(InvalidationReason::Unplugged));
    assert_eq!(inv.superseded_by, Some(second.device_id));
    assert_eq!(
        inv.stamp.seq, 2,
        "invalidated when the agent said so, not later"
    );
    let new = f.device(&second);
    assert!(new.current);
    assert_eq!(new.status, DeviceStatus::Available);
    assert_eq!(
        f.s.hosts[&host("host-a")].as_ref().unwrap().last_seen.seq,
        3
    );
    assert_eq!(f.counter("applied.DeviceDiscovered"), 2);
    assert!(f.s.quarantine.is_empty());
}

#[test]
fn claim_attach_release_returns_the_device_to_the_pool() {
    let mut f = Fold::default();
    let key = disc(1, "host-a", "SN1");
    f.all([
        flavor_created(),
        boot_requested(),
        Event::DeviceDiscovered(key.clone()),
        claimed(&key, FollowPolicy::Lineage),
    ]);
    let server = ServerId(id(SERVER));
    assert_eq!(f.device(&key).status, DeviceStatus::Claimed);
    assert_eq!(f.device(&key).holder, Some(server));
    assert_eq!(f.s.claims[&key.lineage_id].server_id, server);

    f.all([attached(&key)]);
    let d = f.device(&key);
    assert_eq!(d.status, DeviceStatus::Attached);
    assert_eq!(d.attachment.as_ref().unwrap().server_id, server);
    assert_eq!(d.holders.len(), 1, "claim and attach are one holding");
    assert_eq!(d.holders[0].attached.unwrap().seq, 5);

    f.all([released(&key)]);
    let d = f.device(&key);
    assert_eq!(d.status, DeviceStatus::Available);
    assert_eq!((d.holder, d.attachment.is_some()), (None, false));
    assert_eq!(
        d.holders[0].ended.map(|(st, end)| (st.seq, end)),
        Some((6, HoldEnd::Released(ReleaseReason::ServerDeleted)))
    );
    assert!(f.s.claims.is_empty());
    // A second release has no claim to end.
    assert_eq!(
        f.ev(released(&key)),
        Outcome::Quarantined(QuarantineReason::Conflict)
    );
}

#[test]
fn a_followed_claim_awaits_the_new_enumeration() {
    let mut f = Fold::default();
    let first = disc(1, "host-a", "SN1");
    let second = disc(2, "host-a", "SN1");
    f.all([
        flavor_created(),
        boot_requested(),
        Event::DeviceDiscovered(first.clone()),
        claimed(&first, FollowPolicy::Lineage),
        attached(&first),
        invalidated(&first, InvalidationReason::Reenumerated),
        Event::DeviceDiscovered(second.clone()),
    ]);
    let server = ServerId(id(SERVER));
    let new = f.device(&second);
    assert_eq!(
        (new.status, new.holder),
        (DeviceStatus::Claimed, Some(server))
    );
    assert_eq!(new.holders[0].how, HoldKind::Followed);
    let c = &f.s.claims[&first.lineage_id];
    assert_eq!(
        c.device_id, first.device_id,
        "re-pointed only when re-attached"
    );
    assert_eq!(c.awaiting, Some(second.device_id));

    f.all([attached(&second)]);
    let c = &f.s.claims[&first.lineage_id];
    assert_eq!((c.device_id, c.awaiting), (second.device_id, None));
}

#[test]
fn refused_events_are_quarantined_with_their_reason_and_change_nothing() {
    let mut f = Fold::default();
    let key = disc(1, "host-a", "SN1");
    f.all([Event::DeviceDiscovered(key.clone())]);

    // A lineage id not derived from the device's own key.
    let mut forged = disc(2, "host-a", "SN2");
    forged.lineage_id = key.lineage_id;
    assert_eq!(
        f.ev(Event::DeviceDiscovered(forged.clone())),
        Outcome::Quarantined(QuarantineReason::LineageMismatch)
    );
    // The same discovery twice.
    assert_eq!(
        f.ev(Event::DeviceDiscovered(key.clone())),
        Outcome::Quarantined(QuarantineReason::Duplicate)
    );
    // A claim by a server never requested.
    assert_eq!(
        f.ev(claimed(&key, FollowPolicy::Lineage)),
        Outcome::Quarantined(QuarantineReason::UnknownServer)
    );
    // Host b's event on host a's subject.
    let env = Envelope::new(Event::DeviceDiscovered(disc(3, "host-b", "SN3")));
    let on_a = subjects::for_event(&Envelope::new(Event::DeviceDiscovered(disc(
        4, "host-a", "SN4",
    ))));
    assert_eq!(
        f.on(&on_a, env),
        Outcome::Quarantined(QuarantineReason::HostMismatch)
    );
    // Bytes that are no event.
    f.seq += 1;
    assert_eq!(
        apply_bytes(&mut f.s, f.seq, &on_a, b"\xff\xff garbage").unwrap(),
        Outcome::Quarantined(QuarantineReason::Undecodable)
    );

    assert_eq!(
        f.s.devices.keys().copied().collect::<Vec<_>>(),
        [key.device_id],
        "nothing but the first discovery"
    );
    assert_eq!(f.device(&key).status, DeviceStatus::Available);
    assert!(f.s.claims.is_empty());
    let reasons: Vec<_> = f.s.quarantine.iter().map(|q| (q.seq, q.reason)).collect();
    assert_eq!(
        reasons,
        [
            (2, QuarantineReason::LineageMismatch),
            (3, QuarantineReason::Duplicate),
            (4, QuarantineReason::UnknownServer),
            (5, QuarantineReason::HostMismatch),
            (6, QuarantineReason::Undecodable),
        ]
    );
    assert_eq!(f.s.quarantine[0].kind.as_deref(), Some("DeviceDiscovered"));
    assert_eq!(f.s.quarantine[4].kind, None, "undecodable: no kind");
    for r in [
        QuarantineReason::LineageMismatch,
        QuarantineReason::Duplicate,
        QuarantineReason::UnknownServer,
    ] {
        assert_eq!(
            f.counter(&format!("quarantined.{}", r.as_str())),
            1,
            "{r:?}"
        );
    }
    assert_eq!(f.counter("applied.DeviceDiscovered"), 1);
    assert_eq!((f.s.last_applied, f.s.folded), (6, 6));
}

#[test]
fn a_redelivery_is_skipped() {
    let mut f = Fold::default();
    let key = disc(1, "host-a", "SN1");
    f.all([Event::DeviceDiscovered(key.clone())]);
    let env = Envelope::new(Event::DeviceDiscovered(key));
    let subject = subjects::for_event(&env);
    assert_eq!(
        apply(&mut f.s, 1, &subject, &env).unwrap(),
        Outcome::Skipped
    );
    assert_eq!((f.s.folded, f.s.quarantine.len()), (1, 0));
}

#[test]
fn a_deleted_server_frees_its_name_for_the_next() {
    let mut f = Fold::default();
    f.all([
        flavor_created(),
        boot_requested(),
        Event::ServerDeleted(ServerDeleted {
            server_id: ServerId(id(SERVER)),
            host: None,
        }),
    ]);
    assert!(f.s.server_names.is_empty());
    let Event::ServerBootRequested(mut again) = boot_requested() else {
        unreachable!()
    };
    again.server_id = ServerId(id(SERVER + 1));
    f.all([Event::ServerBootRequested(again.clone())]);
    assert_eq!(
        f.s.server_names.get("erp-1"),
        Some(&again.server_id.to_bytes())
    );
    // The name is taken now.
    again.server_id = ServerId(id(SERVER + 2));
    assert_eq!(
        f.ev(Event::ServerBootRequested(again)),
        Outcome::Quarantined(QuarantineReason::Conflict)
    );
}

fn held(d: &DeviceDiscovered) -> Event {
    Event::DeviceReattachHeld(DeviceReattachHeld {
        host: d.host.clone(),
        server_id: ServerId(id(SERVER)),
        lineage_id: d.lineage_id,
        device_id: d.device_id,
        expected: Fingerprint([0xa; 32]),
        seen: Fingerprint([0xb; 32]),
    })
}

#[test]
fn a_held_reattach_shows_on_the_server_until_the_lineage_is_reattached() {
    let mut f = Fold::default();
    let first = disc(1, "host-a", "SN1");
    let second = disc(2, "host-a", "SN1");
    f.all([
        flavor_created(),
        boot_requested(),
        Event::DeviceDiscovered(first.clone()),
        claimed(&first, FollowPolicy::Lineage),
        attached(&first),
        invalidated(&first, InvalidationReason::Reenumerated),
        Event::DeviceDiscovered(second.clone()),
        held(&second),
    ]);
    let server = ServerId(id(SERVER));
    let s = &f.s.servers[&server];
    assert_eq!(s.reattach_held.len(), 1);
    let h = &s.reattach_held[0];
    assert_eq!(
        (h.lineage_id, h.device_id, h.expected, h.seen, h.stamp.seq),
        (
            first.lineage_id,
            second.device_id,
            Fingerprint([0xa; 32]),
            Fingerprint([0xb; 32]),
            8
        )
    );
    // The claim is kept: held, not released.
    assert_eq!(f.s.claims[&first.lineage_id].device_id, first.device_id);
    // A second hold for the lineage replaces the first (one record per lineage).
    f.all([held(&second)]);
    assert_eq!(f.s.servers[&server].reattach_held.len(), 1);
    assert_eq!(f.s.servers[&server].reattach_held[0].stamp.seq, 9);

    f.all([Event::DeviceReattached(DeviceReattached {
        server_id: server,
        host: host("host-a"),
        lineage_id: first.lineage_id,
        old_device_id: first.device_id,
        new_device_id: second.device_id,
        address: second.descriptors.address,
        method: AttachMethod::HotPlug,
        detail: String::new(),
    })]);
    assert!(f.s.servers[&server].reattach_held.is_empty());
}

#[test]
fn a_held_reattach_ends_with_the_release_and_needs_the_servers_claim() {
    let mut f = Fold::default();
    let first = disc(1, "host-a", "SN1");
    let second = disc(2, "host-a", "SN1");
    f.all([
        flavor_created(),
        boot_requested(),
        Event::DeviceDiscovered(first.clone()),
    ]);
    // No claim by the server: quarantined, nothing recorded.
    assert_eq!(
        f.ev(held(&first)),
        Outcome::Quarantined(QuarantineReason::Conflict)
    );
    assert!(f.s.servers[&ServerId(id(SERVER))].reattach_held.is_empty());
    f.all([
        claimed(&first, FollowPolicy::Lineage),
        attached(&first),
        invalidated(&first, InvalidationReason::Reenumerated),
        Event::DeviceDiscovered(second.clone()),
        held(&second),
        released(&first),
    ]);
    assert!(f.s.servers[&ServerId(id(SERVER))].reattach_held.is_empty());
}

#[test]
fn a_flavors_fingerprint_policy_is_folded_and_defaults_to_hold() {
    let mut f = Fold::default();
    f.all([flavor_created()]);
    let fid = FlavorId(id(FLAVOR));
    assert_eq!(
        f.s.flavors[&fid].on_fingerprint_change,
        FingerprintPolicy::Hold
    );
    let set = |p| {
        Event::FlavorFingerprintPolicySet(FlavorFingerprintPolicySet {
            flavor_id: fid,
            name: FlavorName::new("erp-key").unwrap(),
            on_fingerprint_change: p,
        })
    };
    f.all([set(FingerprintPolicy::Follow)]);
    assert_eq!(
        f.s.flavors[&fid].on_fingerprint_change,
        FingerprintPolicy::Follow
    );
    f.all([set(FingerprintPolicy::Hold)]);
    assert_eq!(
        f.s.flavors[&fid].on_fingerprint_change,
        FingerprintPolicy::Hold
    );
    // On a name the flavor does not have, or for a flavor never created: refused.
    assert_eq!(
        f.ev(Event::FlavorFingerprintPolicySet(
            FlavorFingerprintPolicySet {
                flavor_id: fid,
                name: FlavorName::new("other").unwrap(),
                on_fingerprint_change: FingerprintPolicy::Follow,
            }
        )),
        Outcome::Quarantined(QuarantineReason::Conflict)
    );
    assert_eq!(
        f.s.flavors[&fid].on_fingerprint_change,
        FingerprintPolicy::Hold
    );
}
