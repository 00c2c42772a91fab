#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Given a view with a lineage's alarms / when `conflict resolve` or `fingerprint accept` /
//! then one `LineageConflictResolved` or `FingerprintAccepted`, or a typed rejection naming the
//! field. The in-memory view exists only for these pure unit tests of the decisions.

use std::collections::BTreeMap;

use usbpt_commands::decide::{Fence, Reply};
use usbpt_commands::schedule::Weigh;
use usbpt_commands::*;
use usbpt_schemas::commands::{Command, RejectKind};
use usbpt_schemas::*;

/// One lineage's current enumeration, its alarms, a claim, and the claim subject's sequence.
struct Lineage {
    current: DeviceInfo,
    alarms: LineageAlarms,
    claim: Option<ClaimInfo>,
    claim_seq: u64,
}

impl ViewRead for Lineage {
    fn flavor_by_name(&self, _: &FlavorName) -> Result<Option<FlavorInfo>, ViewError> {
        Ok(None)
    }
    fn flavor_by_id(&self, _: &FlavorId) -> Result<Option<FlavorInfo>, ViewError> {
        Ok(None)
    }
    fn server_by_name(&self, _: &ServerName) -> Result<Option<ServerInfo>, ViewError> {
        Ok(None)
    }
    fn server_by_id(&self, _: &ServerId) -> Result<Option<ServerInfo>, ViewError> {
        Ok(None)
    }
    fn device(&self, id: &DeviceId) -> Result<Option<DeviceInfo>, ViewError> {
        Ok((self.current.device_id == *id).then(|| self.current.clone()))
    }
    fn current_enumeration(&self, l: &LineageId) -> Result<Option<DeviceInfo>, ViewError> {
        Ok((self.current.lineage_id == *l).then(|| self.current.clone()))
    }
    fn free_devices_matching(
        &self,
        _: VendorId,
        _: ProductId,
        _: Option<&str>,
    ) -> Result<BTreeMap<HostName, Vec<DeviceInfo>>, ViewError> {
        Ok(BTreeMap::new())
    }
    fn claim(&self, l: &LineageId) -> Result<Option<ClaimInfo>, ViewError> {
        Ok(self.claim.clone().filter(|c| c.lineage_id == *l))
    }
    fn subject_seq(&self, subject: &str) -> Result<u64, ViewError> {
        let claim = subjects::claim(&self.current.lineage_id);
        Ok(if subject == claim { self.claim_seq } else { 0 })
    }
    fn host_known(&self, _: &HostName) -> Result<bool, ViewError> {
        Ok(true)
    }
    fn lineage_alarms(&self, l: &LineageId) -> Result<LineageAlarms, ViewError> {
        Ok(if self.current.lineage_id == *l {
            self.alarms.clone()
        } else {
            LineageAlarms::default()
        })
    }
}

fn ctx() -> Ctx {
    Ctx {
        server_id: ServerId(uuid::Uuid::from_u128(7)),
        flavor_id: FlavorId(uuid::Uuid::from_u128(8)),
        weigh: Weigh::Pack,
        lane: 0,
    }
}

fn h(s: &str) -> HostName {
    HostName::new(s).unwrap()
}
fn dev(n: u128) -> DeviceId {
    DeviceId(uuid::Uuid::from_u128(n))
}
fn fp(n: u8) -> Fingerprint {
    Fingerprint([n; 32])
}

const LINEAGE: LineageId = LineageId(uuid::Uuid::from_u128(1001));

fn view(alarms: LineageAlarms) -> Lineage {
    Lineage {
        current: DeviceInfo {
            device_id: dev(1),
            lineage_id: LINEAGE,
            lineage_kind: LineageKind::Serial,
            host: h("host-a"),
            vendor_id: VendorId(0x136b),
            product_id: ProductId(3),
            serial: Some("K1".into()),
            address: UsbAddress::new(2, 3).unwrap(),
            status: DeviceStatus::Available,
            holder: None,
        },
        alarms,
        claim: None,
        claim_seq: 41,
    }
}

fn in_conflict() -> Lineage {
    view(LineageAlarms {
        conflict: Some(ConflictInfo {
            current: (h("host-a"), dev(1)),
            held_back: (h("host-b"), dev(2)),
        }),
        ..LineageAlarms::default()
    })
}

fn resolve(lineage: LineageId, keep: &str) -> Command {
    Command::ResolveConflict {
        lineage,
        keep: h(keep),
    }
}

fn one_step(d: &Decision) -> &Step {
    assert!(matches!(d.reply, Reply::Accepted(_)), "{:?}", d.reply);
    match &d.steps[..] {
        [s] => s,
        other => panic!("{other:?}"),
    }
}

#[test]
fn resolving_keeps_either_side_fenced_on_the_claim_subject() {
    let v = in_conflict();
    for (keep, kept, dropped) in [("host-a", 1, 2), ("host-b", 2, 1)] {
        let d = decide(&v, &resolve(LINEAGE, keep), &ctx()).unwrap();
        let s = one_step(&d);
        assert_eq!(
            s.event,
            Event::LineageConflictResolved(LineageConflictResolved {
                lineage_id: LINEAGE,
                keep_host: h(keep),
                kept_device: dev(kept),
                dropped_device: dev(dropped),
            })
        );
        assert_eq!(
            subjects::for_body(&s.event),
            format!("usbpt.evt.claim.{LINEAGE}")
        );
        // Fenced at the claim subject's last sequence: a claim in between loses the race.
        assert_eq!(s.fence, Fence::Expect(41));
        assert_eq!(s.undo, None);
    }
}

#[test]
fn resolving_is_refused_for_an_unknown_lineage_no_conflict_or_a_host_on_neither_side() {
    let v = in_conflict();
    let unknown = LineageId(uuid::Uuid::from_u128(9));
    let e = decide(&v, &resolve(unknown, "host-a"), &ctx()).unwrap_err();
    assert_eq!(e.kind(), RejectKind::NotFound);
    assert!(e.to_string().contains(&format!("lineage {unknown}")), "{e}");

    let e = decide(
        &view(LineageAlarms::default()),
        &resolve(LINEAGE, "host-a"),
        &ctx(),
    )
    .unwrap_err();
    assert_eq!(e.kind(), RejectKind::Conflict);
    assert!(e.to_string().contains("no active lineage_conflict"), "{e}");

    let e = decide(&v, &resolve(LINEAGE, "host-c"), &ctx()).unwrap_err();
    assert_eq!(e.kind(), RejectKind::Invalid);
    assert!(e.to_string().starts_with("keep: host host-c"), "{e}");
    assert!(e.to_string().contains("host-a and host-b"), "{e}");
}

fn fingerprint_alarm(current: Option<Fingerprint>) -> LineageAlarms {
    LineageAlarms {
        fingerprint: Some(FingerprintAlarmInfo {
            expected: fp(1),
            seen: fp(9),
        }),
        current_fingerprint: current,
        ..LineageAlarms::default()
    }
}

#[test]
fn accepting_names_the_seen_fingerprint_the_present_enumeration_and_the_holding_server() {
    let accept = Command::AcceptFingerprint { lineage: LINEAGE };
    // Held by no server: routed to the lineage's subject.
    let v = view(fingerprint_alarm(Some(fp(9))));
    let d = decide(&v, &accept, &ctx()).unwrap();
    let s = one_step(&d);
    assert_eq!(
        s.event,
        Event::FingerprintAccepted(FingerprintAccepted {
            lineage_id: LINEAGE,
            fingerprint: fp(9),
            device_id: Some(dev(1)),
            host: Some(h("host-a")),
            server_id: None,
            by_policy: false,
        })
    );
    assert_eq!(
        subjects::for_body(&s.event),
        format!("usbpt.evt.lineage.{LINEAGE}")
    );
    // Held by a server: re-attach work for its host; the current enumeration's fingerprint
    // (it re-enumerated since the alarm) is the one accepted.
    let server = ServerId(uuid::Uuid::from_u128(77));
    let mut v = view(fingerprint_alarm(Some(fp(5))));
    v.claim = Some(ClaimInfo {
        lineage_id: LINEAGE,
        device_id: dev(1),
        server_id: server,
        host: h("host-a"),
        follow: FollowPolicy::Lineage,
    });
    let d = decide(&v, &accept, &ctx()).unwrap();
    let Event::FingerprintAccepted(a) = &one_step(&d).event else {
        panic!()
    };
    assert_eq!((a.fingerprint, a.server_id), (fp(5), Some(server)));
    assert_eq!(
        subjects::for_body(&one_step(&d).event),
        format!("usbpt.evt.ctl.host-a.server.{server}")
    );
    // The current enumeration gone (and no fingerprint of its own): the alarm's seen one, no
    // device or host.
    let mut v = view(fingerprint_alarm(None));
    v.current.status = DeviceStatus::Invalidated;
    let d = decide(&v, &accept, &ctx()).unwrap();
    let Event::FingerprintAccepted(a) = &one_step(&d).event else {
        panic!()
    };
    assert_eq!(
        (a.fingerprint, a.device_id, a.host.as_ref()),
        (fp(9), None, None)
    );
}

#[test]
fn accepting_is_refused_for_an_unknown_lineage_or_one_without_a_fingerprint_alarm() {
    let v = view(fingerprint_alarm(Some(fp(9))));
    let unknown = LineageId(uuid::Uuid::from_u128(9));
    let e = decide(&v, &Command::AcceptFingerprint { lineage: unknown }, &ctx()).unwrap_err();
    assert_eq!(e.kind(), RejectKind::NotFound);
    assert!(e.to_string().contains(&format!("lineage {unknown}")), "{e}");
    // A conflict is not a fingerprint alarm.
    let e = decide(
        &in_conflict(),
        &Command::AcceptFingerprint { lineage: LINEAGE },
        &ctx(),
    )
    .unwrap_err();
    assert_eq!(e.kind(), RejectKind::Conflict);
    assert!(
        e.to_string().contains("no active fingerprint_changed"),
        "{e}"
    );
}

#[test]
fn the_commands_travel_as_json() {
    let json = format!(r#"{{"command":"resolve_conflict","lineage":"{LINEAGE}","keep":"host-b"}}"#);
    assert_eq!(
        serde_json::from_str::<Command>(&json).unwrap(),
        resolve(LINEAGE, "host-b")
    );
    let json = format!(r#"{{"command":"accept_fingerprint","lineage":"{LINEAGE}"}}"#);
    assert_eq!(
        serde_json::from_str::<Command>(&json).unwrap(),
        Command::AcceptFingerprint { lineage: LINEAGE }
    );
    assert!(serde_json::from_str::<Command>(&format!(
        r#"{{"command":"resolve_conflict","lineage":"{LINEAGE}","keep":"not a host!"}}"#
    ))
    .is_err());
}
