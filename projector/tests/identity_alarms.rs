//! Identity intelligence in the fold (issue 18, ADR 0011), on real redb files without a bus:
//! the descriptor fingerprint of `DeviceDiscoveredV2` (and none for the original layout), and
//! the alarms the fold derives, raised and cleared by events and equal on replay.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../schemas/tests/common/mod.rs"]
mod common;

use bytes::Bytes;
use usbpt_projector::{BatchOptions, RawEvent, View};
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
    /// Every event folded, for replays.
    events: Vec<RawEvent>,
    _dir: tempfile::TempDir,
}

impl Fold {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let view = View::open(dir.path().join("v.redb")).unwrap();
        Self {
            view,
            seq: 0,
            events: Vec::new(),
            _dir: dir,
        }
    }

    /// Folds `body` on `subject` (its own subject when `None`); returns the quarantine reason.
    fn fold(&mut self, body: Event, subject: Option<String>) -> Option<String> {
        self.fold_env(Envelope::new(body), subject)
    }

    fn fold_env(&mut self, env: Envelope, subject: Option<String>) -> Option<String> {
        self.seq += 1;
        let raw = RawEvent {
            seq: self.seq,
            subject: subject.unwrap_or_else(|| subjects::for_event(&env)),
            payload: Bytes::from(codec::encode(&env).unwrap()),
        };
        self.events.push(raw.clone());
        self.view
            .apply_batch(&[raw], &BatchOptions::default())
            .unwrap();
        let snap = self.view.snapshot().unwrap();
        snap.quarantine(0, 1000)
            .unwrap()
            .into_iter()
            .find(|q| q.seq == self.seq)
            .map(|q| format!("{:?}: {}", q.reason, q.detail))
    }
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint([n; 32])
}

fn v2(d: DeviceDiscovered, n: u8) -> Event {
    Event::discovered(d, Some(fp(n)))
}

#[test]
fn a_v2_discovery_stores_its_fingerprint_and_an_old_one_folds_without() {
    let mut f = Fold::new();
    assert_eq!(
        f.fold(
            Event::DeviceDiscovered(disc(1, "host-a", "1-1", Some("K1"))),
            None
        ),
        None
    );
    assert_eq!(
        f.fold(v2(disc(2, "host-a", "1-2", Some("K2")), 7), None),
        None
    );
    let snap = f.view.snapshot().unwrap();
    let old = snap.device(&DeviceId(id(1))).unwrap().unwrap();
    let new = snap.device(&DeviceId(id(2))).unwrap().unwrap();
    assert_eq!(old.fingerprint, None);
    assert_eq!(new.fingerprint, Some(fp(7)));
    assert_eq!(new.discovery.descriptors.serial.as_deref(), Some("K2"));
}

fn gone(dev: u128, host: &str, lineage: LineageId) -> Event {
    Event::DeviceInvalidated(DeviceInvalidated {
        device_id: DeviceId(id(dev)),
        lineage_id: lineage,
        host: common::host(host),
        reason: InvalidationReason::Unplugged,
        superseded_by: None,
    })
}

fn active(f: &Fold, lineage: LineageId) -> Vec<usbpt_projector::Alarm> {
    let l = f
        .view
        .snapshot()
        .unwrap()
        .lineage(&lineage)
        .unwrap()
        .unwrap();
    l.alarms.into_iter().filter(|a| a.is_active()).collect()
}

fn counter(f: &Fold, key: &str) -> u64 {
    let c = f.view.snapshot().unwrap().counters().unwrap();
    c.get(key).copied().unwrap_or(0)
}

/// The conflict scenario: K1 on host-a, then on host-b while host-a's is present.
fn conflict(f: &mut Fold) -> LineageId {
    let first = disc(1, "host-a", "1-1", Some("K1"));
    let lineage = first.lineage_id;
    assert_eq!(f.fold(v2(first, 1), None), None);
    assert_eq!(
        f.fold(v2(disc(2, "host-b", "3-2", Some("K1")), 1), None),
        None
    );
    lineage
}

#[test]
fn a_serial_lineage_on_two_hosts_raises_a_conflict_that_clears_when_the_newcomer_leaves() {
    let mut f = Fold::new();
    let lineage = conflict(&mut f);
    let alarms = active(&f, lineage);
    assert_eq!(alarms.len(), 1);
    let a = &alarms[0];
    assert_eq!(a.kind, usbpt_projector::AlarmKind::LineageConflict);
    assert_eq!(a.raised.seq, 2);
    assert_eq!(a.hosts, [common::host("host-a"), common::host("host-b")]);
    assert_eq!(a.devices, [DeviceId(id(1)), DeviceId(id(2))]);
    assert!(
        a.reason.contains("host-a") && a.reason.contains("unplugged"),
        "{}",
        a.reason
    );
    assert_eq!(counter(&f, "alarms_raised.lineage_conflict"), 1);
    let snap = f.view.snapshot().unwrap();
    assert!(snap
        .free_devices_on_host(&common::host("host-a"))
        .unwrap()
        .is_empty());

    // host-b's copy is unplugged: the conflict clears, host-a's device is free again.
    assert_eq!(f.fold(gone(2, "host-b", lineage), None), None);
    assert!(active(&f, lineage).is_empty());
    let snap = f.view.snapshot().unwrap();
    let l = snap.lineage(&lineage).unwrap().unwrap();
    let (cleared, why) = l.alarms[0].cleared.clone().expect("cleared");
    assert_eq!(cleared.seq, 3);
    assert!(why.contains("stays on host host-a"), "{why}");
    assert_eq!(l.current_host, common::host("host-a"));
    assert_eq!(
        snap.free_devices_on_host(&common::host("host-a"))
            .unwrap()
            .len(),
        1
    );
    assert_eq!(counter(&f, "alarms_cleared.lineage_conflict"), 1);
}

#[test]
fn a_conflict_clears_when_the_first_host_reports_the_key_gone_and_the_other_host_takes_it() {
    let mut f = Fold::new();
    let lineage = conflict(&mut f);
    assert_eq!(f.fold(gone(1, "host-a", lineage), None), None);
    assert!(active(&f, lineage).is_empty());
    let snap = f.view.snapshot().unwrap();
    let l = snap.lineage(&lineage).unwrap().unwrap();
    assert_eq!(l.current, DeviceId(id(2)));
    assert_eq!(l.current_host, common::host("host-b"));
    assert_eq!(l.enumerations, 2);
    let d2 = snap.device(&DeviceId(id(2))).unwrap().unwrap();
    assert!(d2.is_free(), "{d2:?}");
    assert_eq!(d2.fingerprint, Some(fp(1)));
    assert_eq!(d2.discovered.seq, 3, "promoted when host-a's ended");
}

#[test]
fn alarms_replay_to_the_same_view() {
    let mut f = Fold::new();
    let lineage = conflict(&mut f);
    assert_eq!(f.fold(gone(1, "host-a", lineage), None), None);
    assert_eq!(
        f.fold(v2(disc(3, "host-a", "1-1", Some("K1")), 1), None),
        None
    );
    assert_eq!(
        active(&f, lineage).len(),
        1,
        "host-a's return conflicts with host-b"
    );
    assert_replays(&f);
}

/// A replay of the same events, one per batch and all in one batch, gives the same view.
fn assert_replays(f: &Fold) {
    let events = f.events.clone();
    for per_batch in [1, events.len()] {
        let dir = tempfile::tempdir().unwrap();
        let view = View::open(dir.path().join("r.redb")).unwrap();
        for chunk in events.chunks(per_batch) {
            view.apply_batch(chunk, &BatchOptions::default()).unwrap();
        }
        let a = usbpt_projector::digest::digest(&f.view.snapshot().unwrap()).unwrap();
        let b = usbpt_projector::digest::digest(&view.snapshot().unwrap()).unwrap();
        assert_eq!(a, b, "{per_batch} per batch");
    }
}

#[test]
fn another_fingerprint_on_a_serial_lineage_raises_an_alarm_until_the_expected_one_returns() {
    let mut f = Fold::new();
    let first = disc(1, "host-a", "1-1", Some("K1"));
    let lineage = first.lineage_id;
    let replug = |dev: u128, prev: u128| {
        let mut d = disc(dev, "host-a", "1-1", Some("K1"));
        d.supersedes = Some(DeviceId(id(prev)));
        d
    };
    assert_eq!(f.fold(v2(first, 1), None), None);
    assert_eq!(f.fold(gone(1, "host-a", lineage), None), None);
    // The same fingerprint again: nothing.
    assert_eq!(f.fold(v2(replug(2, 1), 1), None), None);
    assert!(active(&f, lineage).is_empty());
    assert_eq!(f.fold(gone(2, "host-a", lineage), None), None);
    // Another one: raised, naming both.
    assert_eq!(f.fold(v2(replug(3, 2), 9), None), None);
    let alarms = active(&f, lineage);
    assert_eq!(alarms.len(), 1);
    assert_eq!(
        alarms[0].kind,
        usbpt_projector::AlarmKind::FingerprintChanged
    );
    assert_eq!(alarms[0].fingerprints, [fp(1), fp(9)]);
    assert_eq!(alarms[0].raised.seq, 5);
    assert!(
        alarms[0].reason.contains(&fp(1).to_string()),
        "{}",
        alarms[0].reason
    );
    // An enumeration without a fingerprint (an old agent) and the changed one again: no new alarm.
    assert_eq!(f.fold(gone(3, "host-a", lineage), None), None);
    assert_eq!(f.fold(Event::DeviceDiscovered(replug(4, 3)), None), None);
    assert_eq!(f.fold(gone(4, "host-a", lineage), None), None);
    assert_eq!(f.fold(v2(replug(5, 4), 9), None), None);
    assert_eq!(counter(&f, "alarms_raised.fingerprint_changed"), 1);
    // The expected device is back: cleared.
    assert_eq!(f.fold(gone(5, "host-a", lineage), None), None);
    assert_eq!(f.fold(v2(replug(6, 5), 1), None), None);
    assert!(active(&f, lineage).is_empty());
    assert_eq!(counter(&f, "alarms_cleared.fingerprint_changed"), 1);
    let metrics = usbpt_projector::ProjectorMetrics::default()
        .render(&f.view.snapshot().unwrap().counters().unwrap());
    assert!(
        metrics.contains("usbpt_alarms_active{kind=\"fingerprint_changed\"} 0"),
        "{metrics}"
    );
    assert_replays(&f);
}

#[test]
fn a_third_host_replaces_the_held_back_enumeration_and_the_replaced_one_may_end_quietly() {
    let mut f = Fold::new();
    let lineage = conflict(&mut f);
    assert_eq!(
        f.fold(v2(disc(3, "host-c", "2-1", Some("K1")), 1), None),
        None
    );
    let alarms = active(&f, lineage);
    assert_eq!(alarms.len(), 1);
    assert_eq!(
        alarms[0].hosts,
        [common::host("host-a"), common::host("host-c")]
    );
    // host-b's copy, replaced, is unplugged: not quarantined, the conflict with host-c lasts.
    assert_eq!(f.fold(gone(2, "host-b", lineage), None), None);
    assert_eq!(active(&f, lineage).len(), 1);
    // host-a's ends: host-c's takes the lineage.
    assert_eq!(f.fold(gone(1, "host-a", lineage), None), None);
    assert!(active(&f, lineage).is_empty());
    let l = f
        .view
        .snapshot()
        .unwrap()
        .lineage(&lineage)
        .unwrap()
        .unwrap();
    assert_eq!(l.current, DeviceId(id(3)));
    assert_eq!(l.current_host, common::host("host-c"));
    assert_replays(&f);
}

fn flap(dev: u128, host: &str, port: &str, lineage: LineageId) -> Event {
    Event::PortFlapping(PortFlapping {
        host: common::host(host),
        lineage_id: lineage,
        device_id: DeviceId(id(dev)),
        port_path: port.parse().unwrap(),
        enumerations: 6,
        window_secs: 60,
        threshold: 5,
    })
}

fn flap_cleared(dev: Option<u128>, host: &str, lineage: LineageId) -> Event {
    Event::PortFlappingCleared(PortFlappingCleared {
        host: common::host(host),
        lineage_id: lineage,
        device_id: dev.map(|d| DeviceId(id(d))),
        quiet_secs: 120,
    })
}

fn is_free(f: &Fold, dev: u128) -> bool {
    let snap = f.view.snapshot().unwrap();
    snap.device(&DeviceId(id(dev))).unwrap().unwrap().is_free()
}

#[test]
fn port_flapping_is_raised_and_cleared_by_the_agent_and_blocks_the_device_meanwhile() {
    let mut f = Fold::new();
    let first = disc(1, "host-a", "1-4", None);
    let lineage = first.lineage_id;
    assert_eq!(f.fold(v2(first, 1), None), None);
    assert!(is_free(&f, 1));
    assert_eq!(f.fold(flap(1, "host-a", "1-4", lineage), None), None);
    let alarms = active(&f, lineage);
    assert_eq!(alarms.len(), 1);
    let a = &alarms[0];
    assert_eq!(a.kind, usbpt_projector::AlarmKind::PortFlapping);
    assert_eq!(a.hosts, [common::host("host-a")]);
    assert_eq!(a.devices, [DeviceId(id(1))]);
    for words in [
        "host-a",
        "port 1-4",
        "6 times",
        "60 s",
        "re-attach is paused",
    ] {
        assert!(a.reason.contains(words), "{words}: {}", a.reason);
    }
    assert!(!is_free(&f, 1), "not schedulable while flapping");
    // The same episode published again: nothing more.
    assert_eq!(f.fold(flap(1, "host-a", "1-4", lineage), None), None);
    assert_eq!(counter(&f, "alarms_raised.port_flapping"), 1);

    // It keeps re-enumerating: each new enumeration starts blocked.
    assert_eq!(f.fold(gone(1, "host-a", lineage), None), None);
    let mut again = disc(2, "host-a", "1-4", None);
    again.supersedes = Some(DeviceId(id(1)));
    assert_eq!(f.fold(v2(again, 1), None), None);
    assert!(!is_free(&f, 2), "a new enumeration of a flapping lineage");

    // The agent's quiet period passed: cleared once, the device is free.
    assert_eq!(f.fold(flap_cleared(Some(2), "host-a", lineage), None), None);
    assert!(active(&f, lineage).is_empty());
    assert!(is_free(&f, 2));
    let l = f
        .view
        .snapshot()
        .unwrap()
        .lineage(&lineage)
        .unwrap()
        .unwrap();
    let (cleared, why) = l.alarms[0].cleared.clone().expect("cleared");
    assert_eq!(cleared.seq, 6);
    assert!(why.contains("120 s"), "{why}");
    // A second clear (no active alarm) is a no-op, not quarantined.
    assert_eq!(f.fold(flap_cleared(Some(2), "host-a", lineage), None), None);
    assert_eq!(counter(&f, "alarms_cleared.port_flapping"), 1);
    let metrics = usbpt_projector::ProjectorMetrics::default()
        .render(&f.view.snapshot().unwrap().counters().unwrap());
    assert!(
        metrics.contains("usbpt_alarms_active{kind=\"port_flapping\"} 0"),
        "{metrics}"
    );
    assert_replays(&f);
}

#[test]
fn a_flapping_report_about_a_device_never_seen_or_of_another_lineage_is_quarantined() {
    let mut f = Fold::new();
    let first = disc(1, "host-a", "1-4", None);
    let lineage = first.lineage_id;
    let other = disc(2, "host-a", "1-5", None).lineage_id;
    assert_eq!(f.fold(v2(first, 1), None), None);
    let q = f
        .fold(flap(9, "host-a", "1-4", lineage), None)
        .expect("quarantined");
    assert!(q.starts_with("UnknownDevice"), "{q}");
    let q = f
        .fold(flap(1, "host-a", "1-4", other), None)
        .expect("quarantined");
    assert!(q.starts_with("LineageMismatch"), "{q}");
    assert!(active(&f, lineage).is_empty());
    assert!(is_free(&f, 1));
    // A clear for a lineage the view never saw: a no-op.
    assert_eq!(f.fold(flap_cleared(None, "host-a", other), None), None);
}

#[test]
fn a_device_stays_blocked_while_any_alarm_holds_it_back() {
    let mut f = Fold::new();
    // A conflict blocks host-a's K1, then it flaps too.
    let lineage = conflict(&mut f);
    assert_eq!(f.fold(flap(1, "host-a", "1-1", lineage), None), None);
    assert_eq!(active(&f, lineage).len(), 2);
    // The flapping ends first: the conflict still holds it back.
    assert_eq!(f.fold(flap_cleared(Some(1), "host-a", lineage), None), None);
    assert!(!is_free(&f, 1), "the conflict lasts");
    // host-b's copy leaves: free.
    assert_eq!(f.fold(gone(2, "host-b", lineage), None), None);
    assert!(is_free(&f, 1));

    // The other order: flapping, then a conflict that ends first.
    assert_eq!(f.fold(flap(1, "host-a", "1-1", lineage), None), None);
    assert_eq!(
        f.fold(v2(disc(3, "host-c", "2-1", Some("K1")), 1), None),
        None
    );
    assert_eq!(f.fold(gone(3, "host-c", lineage), None), None);
    assert_eq!(active(&f, lineage).len(), 1);
    assert!(!is_free(&f, 1), "still flapping");
    assert_eq!(f.fold(flap_cleared(Some(1), "host-a", lineage), None), None);
    assert!(is_free(&f, 1));
    assert_eq!(counter(&f, "alarms_raised.port_flapping"), 2);
    assert_eq!(counter(&f, "alarms_cleared.port_flapping"), 2);
    assert_replays(&f);
}

fn resolved(lineage: LineageId, keep: &str, kept: u128, dropped: u128) -> Event {
    Event::LineageConflictResolved(LineageConflictResolved {
        lineage_id: lineage,
        keep_host: common::host(keep),
        kept_device: DeviceId(id(kept)),
        dropped_device: DeviceId(id(dropped)),
    })
}

fn cleared_why(f: &Fold, lineage: LineageId, kind: usbpt_projector::AlarmKind) -> (u64, String) {
    let l = f
        .view
        .snapshot()
        .unwrap()
        .lineage(&lineage)
        .unwrap()
        .unwrap();
    let a = l
        .alarms
        .iter()
        .rev()
        .find(|a| a.kind == kind && !a.is_active())
        .expect("a cleared alarm");
    let (st, why) = a.cleared.clone().unwrap();
    (st.seq, why)
}

#[test]
fn an_operator_keeps_the_current_host_the_held_back_copy_is_dropped_and_its_end_is_quiet() {
    let mut f = Fold::new();
    let lineage = conflict(&mut f);
    assert_eq!(f.fold(resolved(lineage, "host-a", 1, 2), None), None);
    assert!(active(&f, lineage).is_empty());
    let (seq, why) = cleared_why(&f, lineage, usbpt_projector::AlarmKind::LineageConflict);
    assert_eq!(seq, 3);
    assert!(why.contains("operator kept host host-a"), "{why}");
    let snap = f.view.snapshot().unwrap();
    let l = snap.lineage(&lineage).unwrap().unwrap();
    assert_eq!(l.pending, None);
    assert_eq!(l.current, DeviceId(id(1)));
    assert!(
        snap.device(&DeviceId(id(2))).unwrap().is_none(),
        "never listed"
    );
    assert_eq!(
        snap.free_devices_on_host(&common::host("host-a"))
            .unwrap()
            .len(),
        1,
        "host-a's copy is schedulable again"
    );
    assert!(snap
        .free_devices_on_host(&common::host("host-b"))
        .unwrap()
        .is_empty());
    // host-b's copy is unplugged later: expected, not quarantined, changes nothing.
    assert_eq!(f.fold(gone(2, "host-b", lineage), None), None);
    assert_eq!(counter(&f, "alarms_cleared.lineage_conflict"), 1);
    assert_eq!(counter(&f, "quarantined.conflict"), 0);
    assert_replays(&f);
}

#[test]
fn an_operator_keeps_the_newcomer_it_takes_the_lineage_and_a_lineage_claim_follows_it() {
    let mut f = Fold::new();
    let samples = common::sample_bodies();
    let pick = |kind: &str| samples.iter().find(|e| e.kind() == kind).cloned().unwrap();
    let first = disc(1, "host-a", "1-1", Some("K1"));
    let lineage = first.lineage_id;
    assert_eq!(f.fold(v2(first, 1), None), None);
    assert_eq!(f.fold(pick("FlavorCreated"), None), None);
    let Event::ServerBootRequested(boot) = pick("ServerBootRequested") else {
        unreachable!()
    };
    let server = boot.server_id;
    assert_eq!(f.fold(Event::ServerBootRequested(boot), None), None);
    let claim = Event::DeviceClaimed(DeviceClaimed {
        device_id: DeviceId(id(1)),
        lineage_id: lineage,
        host: common::host("host-a"),
        server_id: server,
        request_index: 0,
        controller: ControllerModel::Ehci,
        follow: FollowPolicy::Lineage,
    });
    assert_eq!(f.fold(claim, None), None);
    assert_eq!(
        f.fold(v2(disc(2, "host-b", "3-2", Some("K1")), 1), None),
        None
    );
    assert_eq!(active(&f, lineage).len(), 1);
    // Kept the newcomer: on the lineage's claim subject, as the command publishes it.
    assert_eq!(f.fold(resolved(lineage, "host-b", 2, 1), None), None);
    assert!(active(&f, lineage).is_empty());
    let (_, why) = cleared_why(&f, lineage, usbpt_projector::AlarmKind::LineageConflict);
    assert!(why.contains("operator kept host host-b"), "{why}");
    let snap = f.view.snapshot().unwrap();
    let l = snap.lineage(&lineage).unwrap().unwrap();
    assert_eq!(l.current, DeviceId(id(2)));
    assert_eq!(l.current_host, common::host("host-b"));
    assert_eq!(l.pending, None);
    let new = snap.device(&DeviceId(id(2))).unwrap().unwrap();
    assert!(!new.blocked);
    assert_eq!(new.holder, Some(server), "the lineage claim follows it");
    let c = snap.claim(&lineage).unwrap().unwrap();
    assert_eq!(c.awaiting, Some(DeviceId(id(2))));
    // host-a's copy is set aside: not free, superseded by the kept one.
    let old = snap.device(&DeviceId(id(1))).unwrap().unwrap();
    assert!(!old.is_free(), "{old:?}");
    assert!(!old.blocked);
    assert_eq!(
        old.invalidation.as_ref().unwrap().superseded_by,
        Some(DeviceId(id(2)))
    );
    assert!(snap
        .free_devices_on_host(&common::host("host-a"))
        .unwrap()
        .is_empty());
    // Its physical end later only adds why; the lineage stays on host-b.
    assert_eq!(f.fold(gone(1, "host-a", lineage), None), None);
    let l = f
        .view
        .snapshot()
        .unwrap()
        .lineage(&lineage)
        .unwrap()
        .unwrap();
    assert_eq!(l.current, DeviceId(id(2)));
    assert!(l.alarms.iter().all(|a| !a.is_active()));
    assert_replays(&f);
}

#[test]
fn a_resolve_that_no_longer_matches_the_conflict_is_a_counted_no_op_and_an_unknown_lineage_is_quarantined(
) {
    let mut f = Fold::new();
    let lineage = conflict(&mut f);
    // The devices swapped, or a host that is neither side: nothing changes.
    assert_eq!(f.fold(resolved(lineage, "host-a", 2, 1), None), None);
    assert_eq!(f.fold(resolved(lineage, "host-c", 1, 2), None), None);
    assert_eq!(active(&f, lineage).len(), 1);
    assert_eq!(counter(&f, "stale.LineageConflictResolved"), 2);
    // The newcomer was unplugged before the operator's resolve was folded: a no-op.
    assert_eq!(f.fold(gone(2, "host-b", lineage), None), None);
    assert_eq!(f.fold(resolved(lineage, "host-b", 2, 1), None), None);
    assert_eq!(counter(&f, "stale.LineageConflictResolved"), 3);
    let snap = f.view.snapshot().unwrap();
    assert_eq!(
        snap.lineage(&lineage).unwrap().unwrap().current,
        DeviceId(id(1))
    );
    // A lineage the view never had: quarantined.
    let other = disc(9, "host-a", "1-9", Some("NOPE")).lineage_id;
    let q = f
        .fold(resolved(other, "host-a", 1, 2), None)
        .expect("quarantined");
    assert!(q.contains("never discovered"), "{q}");
    assert_replays(&f);
}

fn accepted(lineage: LineageId, n: u8, by_policy: bool) -> Event {
    Event::FingerprintAccepted(FingerprintAccepted {
        lineage_id: lineage,
        fingerprint: fp(n),
        device_id: None,
        host: None,
        server_id: None,
        by_policy,
    })
}

#[test]
fn an_accepted_fingerprint_clears_the_alarm_and_becomes_the_expected_one() {
    let mut f = Fold::new();
    let first = disc(1, "host-a", "1-1", Some("K1"));
    let lineage = first.lineage_id;
    let replug = |dev: u128, prev: u128| {
        let mut d = disc(dev, "host-a", "1-1", Some("K1"));
        d.supersedes = Some(DeviceId(id(prev)));
        d
    };
    assert_eq!(f.fold(v2(first, 1), None), None);
    assert_eq!(f.fold(gone(1, "host-a", lineage), None), None);
    assert_eq!(f.fold(v2(replug(2, 1), 9), None), None);
    assert_eq!(active(&f, lineage).len(), 1);
    assert_eq!(f.fold(accepted(lineage, 9, false), None), None);
    assert!(active(&f, lineage).is_empty());
    let (seq, why) = cleared_why(&f, lineage, usbpt_projector::AlarmKind::FingerprintChanged);
    assert_eq!(seq, 4);
    assert!(why.contains("accepted by operator"), "{why}");
    let l = f
        .view
        .snapshot()
        .unwrap()
        .lineage(&lineage)
        .unwrap()
        .unwrap();
    let acc = l.fingerprint_accepted.unwrap();
    assert_eq!(
        (acc.stamp.seq, acc.fingerprint, acc.by_policy),
        (4, fp(9), false)
    );
    // The accepted fingerprint is the expected one now: 9 again is quiet, 1 raises.
    assert_eq!(f.fold(gone(2, "host-a", lineage), None), None);
    assert_eq!(f.fold(v2(replug(3, 2), 9), None), None);
    assert!(active(&f, lineage).is_empty());
    assert_eq!(f.fold(gone(3, "host-a", lineage), None), None);
    assert_eq!(f.fold(v2(replug(4, 3), 1), None), None);
    let alarms = active(&f, lineage);
    assert_eq!(alarms.len(), 1);
    assert_eq!(alarms[0].fingerprints, [fp(9), fp(1)]);
    // A flavor's policy accepts it: said so.
    assert_eq!(f.fold(accepted(lineage, 1, true), None), None);
    let (_, why) = cleared_why(&f, lineage, usbpt_projector::AlarmKind::FingerprintChanged);
    assert!(why.contains("by flavor policy"), "{why}");
    assert_eq!(counter(&f, "alarms_cleared.fingerprint_changed"), 2);
    // An accept of a fingerprint the current enumeration no longer reports: the alarm is
    // raised again against the accepted one.
    assert_eq!(f.fold(accepted(lineage, 5, false), None), None);
    let alarms = active(&f, lineage);
    assert_eq!(alarms.len(), 1);
    assert_eq!(alarms[0].fingerprints, [fp(5), fp(1)]);
    // An unknown lineage is quarantined.
    let other = disc(9, "host-a", "1-9", Some("NOPE")).lineage_id;
    assert!(f.fold(accepted(other, 1, false), None).is_some());
    assert_replays(&f);
}

#[test]
fn a_resolve_keeps_the_current_enumeration_after_it_re_enumerated_on_its_host() {
    let mut f = Fold::new();
    let lineage = conflict(&mut f);
    // host-a's key resets: its new enumeration arrives before the old one's end, on its own
    // host. It is the lineage's current enumeration now, blocked: the conflict lasts, and the
    // alarm still names device 1.
    let mut reset = disc(3, "host-a", "1-1", Some("K1"));
    reset.supersedes = Some(DeviceId(id(1)));
    assert_eq!(f.fold(v2(reset, 1), None), None);
    let alarms = active(&f, lineage);
    assert_eq!(alarms.len(), 1);
    assert_eq!(alarms[0].devices, [DeviceId(id(1)), DeviceId(id(2))]);
    let snap = f.view.snapshot().unwrap();
    assert_eq!(
        snap.lineage(&lineage).unwrap().unwrap().current,
        DeviceId(id(3))
    );
    assert!(snap.device(&DeviceId(id(3))).unwrap().unwrap().blocked);
    // A resolve naming the alarm's old pair no longer matches: a counted no-op.
    assert_eq!(f.fold(resolved(lineage, "host-a", 1, 2), None), None);
    assert_eq!(counter(&f, "stale.LineageConflictResolved"), 1);
    assert_eq!(active(&f, lineage).len(), 1);
    // Naming the lineage's current enumeration (what the command side reads): resolved.
    assert_eq!(f.fold(resolved(lineage, "host-a", 3, 2), None), None);
    assert!(active(&f, lineage).is_empty());
    let snap = f.view.snapshot().unwrap();
    assert!(snap.device(&DeviceId(id(3))).unwrap().unwrap().is_free());
    assert_replays(&f);
}
