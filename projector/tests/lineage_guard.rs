//! A fold that cannot be lied to (ADR 0005), on real redb files without a bus: a lineage id
//! that is not derived from its key is quarantined, a port lineage cannot be taken from another
//! host, a serial lineage present on another host is not moved (a conflict alarm holds it), and events
//! on the wrong subject or with a lying envelope host stay quarantined.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../schemas/tests/common/mod.rs"]
mod common;

use bytes::Bytes;
use usbpt_projector::{BatchOptions, DeviceStatus, QuarantineReason as Q, RawEvent, View};
use usbpt_schemas::*;
use uuid::Uuid;

fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | n)
}

/// A discovery whose lineage is derived from its key, as a correct agent derives it.
fn disc(dev: u128, host: &str, port: &str, serial: Option<&str>) -> DeviceDiscovered {
    let Event::DeviceDiscovered(mut d) = common::sample_bodies().remove(1) else {
        unreachable!()
    };
    d.device_id = DeviceId(id(dev));
    d.host = common::host(host);
    d.descriptors.port_path = port.parse().unwrap();
    d.descriptors.serial = serial.map(str::to_owned);
    d.supersedes = None;
    d.lineage_kind = if serial.is_some() {
        LineageKind::Serial
    } else {
        LineageKind::Port
    };
    d.lineage_id = LineageId::derive(&match &d.descriptors.serial {
        Some(s) => LineageKey::Serial {
            vendor: d.descriptors.vendor_id,
            product: d.descriptors.product_id,
            serial: s,
        },
        None => LineageKey::Port {
            host: &d.host,
            port: &d.descriptors.port_path,
            vendor: d.descriptors.vendor_id,
            product: d.descriptors.product_id,
        },
    });
    d
}

struct Fold {
    view: View,
    seq: u64,
    _dir: tempfile::TempDir,
}

impl Fold {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let view = View::open(dir.path().join("v.redb")).unwrap();
        Self {
            view,
            seq: 0,
            _dir: dir,
        }
    }

    /// Folds `body` on `subject` (its own subject when `None`); returns the quarantine reason.
    fn fold(&mut self, body: Event, subject: Option<String>) -> Option<Q> {
        self.fold_env(Envelope::new(body), subject)
    }

    fn fold_env(&mut self, env: Envelope, subject: Option<String>) -> Option<Q> {
        self.seq += 1;
        let raw = RawEvent {
            seq: self.seq,
            subject: subject.unwrap_or_else(|| subjects::for_event(&env)),
            payload: Bytes::from(codec::encode(&env).unwrap()),
        };
        self.view
            .apply_batch(&[raw], &BatchOptions::default())
            .unwrap();
        let snap = self.view.snapshot().unwrap();
        snap.quarantine(0, 1000)
            .unwrap()
            .into_iter()
            .find(|q| q.seq == self.seq)
            .map(|q| q.reason)
    }
}

#[test]
fn a_port_lineage_cannot_be_hijacked_from_another_hosts_own_subject() {
    let mut f = Fold::new();
    let real = disc(1, "host-b", "2-1.4", None);
    let lineage = real.lineage_id;
    assert_eq!(f.fold(Event::DeviceDiscovered(real), None), None);

    // host-a, on its own subject (its permissions allow it), names host-b's lineage.
    let mut forged = disc(2, "host-a", "2-1.4", None);
    forged.lineage_id = lineage;
    assert_eq!(
        f.fold(Event::DeviceDiscovered(forged), None),
        Some(Q::LineageMismatch)
    );

    let snap = f.view.snapshot().unwrap();
    let d = snap.device(&DeviceId(id(1))).unwrap().unwrap();
    assert!(d.current, "the real device is still current");
    assert_eq!(d.status, DeviceStatus::Available);
    assert!(snap.device(&DeviceId(id(2))).unwrap().is_none());
    let counters = snap.counters().unwrap();
    assert_eq!(counters.get("quarantined.lineage_mismatch"), Some(&1));
}

#[test]
fn a_lineage_id_not_derived_from_its_key_is_quarantined() {
    let mut f = Fold::new();
    // A serial lineage id of another serial.
    let mut other = disc(1, "host-a", "1-1", Some("SN-1"));
    other.lineage_id = disc(9, "host-a", "1-1", Some("SN-2")).lineage_id;
    assert_eq!(
        f.fold(Event::DeviceDiscovered(other), None),
        Some(Q::LineageMismatch)
    );
    // A serial lineage without a serial.
    let mut no_serial = disc(2, "host-a", "1-2", Some("SN-3"));
    no_serial.descriptors.serial = None;
    assert_eq!(
        f.fold(Event::DeviceDiscovered(no_serial), None),
        Some(Q::LineageMismatch)
    );
    // A made-up id.
    let mut made_up = disc(3, "host-a", "1-3", None);
    made_up.lineage_id = LineageId(id(77));
    assert_eq!(
        f.fold(Event::DeviceDiscovered(made_up), None),
        Some(Q::LineageMismatch)
    );
    // The honest one applies.
    assert_eq!(
        f.fold(
            Event::DeviceDiscovered(disc(4, "host-a", "1-4", None)),
            None
        ),
        None
    );
}

#[test]
fn a_serial_lineage_present_on_another_host_is_not_moved_but_held_back() {
    let mut f = Fold::new();
    let first = disc(1, "host-a", "1-1", Some("K1"));
    let lineage = first.lineage_id;
    assert_eq!(f.fold(Event::DeviceDiscovered(first), None), None);

    // The same serial on host-b while host-a's device is still there: a conflict (ADR 0011),
    // not a move. host-b's enumeration is held back, host-a's is blocked from new claims.
    assert_eq!(
        f.fold(
            Event::DeviceDiscovered(disc(2, "host-b", "3-2", Some("K1"))),
            None
        ),
        None
    );
    let snap = f.view.snapshot().unwrap();
    let l = snap.lineage(&lineage).unwrap().unwrap();
    assert_eq!(l.current, DeviceId(id(1)));
    assert_eq!(l.current_host, common::host("host-a"));
    assert_eq!(l.alarms.iter().filter(|a| a.is_active()).count(), 1);
    let d1 = snap.device(&DeviceId(id(1))).unwrap().unwrap();
    assert!(d1.current && d1.blocked && !d1.is_free(), "{d1:?}");
    assert!(snap.device(&DeviceId(id(2))).unwrap().is_none());

    // A re-enumeration on host-a still moves it there, and stays blocked while host-b's lasts.
    let mut again = disc(3, "host-a", "1-1", Some("K1"));
    again.supersedes = Some(DeviceId(id(1)));
    assert_eq!(f.fold(Event::DeviceDiscovered(again), None), None);
    let d3 = f
        .view
        .snapshot()
        .unwrap()
        .device(&DeviceId(id(3)))
        .unwrap()
        .unwrap();
    assert!(d3.blocked && !d3.is_free());

    // Once host-a's device is unplugged, the key really moved: host-b's held-back enumeration
    // takes the lineage (it is no longer lost, the gap of docs/identity.md).
    assert_eq!(
        f.fold(
            Event::DeviceInvalidated(DeviceInvalidated {
                device_id: DeviceId(id(3)),
                lineage_id: lineage,
                host: common::host("host-a"),
                reason: InvalidationReason::Unplugged,
                superseded_by: None,
            }),
            None
        ),
        None
    );
    let snap = f.view.snapshot().unwrap();
    let l = snap.lineage(&lineage).unwrap().unwrap();
    assert_eq!(l.current, DeviceId(id(2)));
    assert_eq!(l.current_host, common::host("host-b"));
    assert!(l.alarms.iter().all(|a| !a.is_active()));
    assert!(snap.device(&DeviceId(id(2))).unwrap().unwrap().is_free());
    let mut next = disc(4, "host-b", "3-2", Some("K1"));
    next.supersedes = Some(DeviceId(id(2)));
    assert_eq!(f.fold(Event::DeviceDiscovered(next), None), None);
    let l = f
        .view
        .snapshot()
        .unwrap()
        .lineage(&lineage)
        .unwrap()
        .unwrap();
    assert_eq!(l.current, DeviceId(id(4)));
}

#[test]
fn lying_envelopes_and_wrong_kinds_stay_quarantined() {
    let mut f = Fold::new();
    // A host-b discovery published on host-a's subject.
    let d = disc(1, "host-b", "1-1", None);
    let on_a = subjects::host_device(&common::host("host-a"), &d.device_id);
    assert_eq!(
        f.fold(Event::DeviceDiscovered(d), Some(on_a)),
        Some(Q::HostMismatch)
    );
    // An envelope that says host-a around a host-b body.
    let mut env = Envelope::new(Event::DeviceDiscovered(disc(2, "host-b", "1-2", None)));
    env.host = Some(common::host("host-a"));
    assert_eq!(f.fold_env(env, None), Some(Q::HostMismatch));
    // Control work (a command-side kind) on an agent's own subject.
    let work = common::sample_bodies()
        .into_iter()
        .find(|b| b.kind() == "ServerActionRequested")
        .unwrap();
    let own = subjects::host_agent(&common::host("host-b"));
    assert!(matches!(
        f.fold(work, Some(own)),
        Some(Q::WrongSubject | Q::HostMismatch)
    ));
}
