#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Given a view / when a command / then events or a rejection. The in-memory view here exists
//! only for these pure unit tests of decision logic; the handler's tests use the real projector.

use std::collections::BTreeMap;

use usbpt_commands::decide::Reply;
use usbpt_commands::schedule::Weigh;
use usbpt_commands::*;
use usbpt_schemas::commands::{Command, RejectKind};
use usbpt_schemas::*;

#[derive(Default, Clone)]
struct MemView {
    flavors: Vec<FlavorInfo>,
    servers: Vec<ServerInfo>,
    devices: Vec<DeviceInfo>,
    claims: Vec<ClaimInfo>,
    seqs: BTreeMap<String, u64>,
}

impl ViewRead for MemView {
    fn flavor_by_name(&self, name: &FlavorName) -> Result<Option<FlavorInfo>, ViewError> {
        Ok(self.flavors.iter().find(|f| &f.name == name).cloned())
    }
    fn flavor_by_id(&self, id: &FlavorId) -> Result<Option<FlavorInfo>, ViewError> {
        Ok(self.flavors.iter().find(|f| &f.flavor_id == id).cloned())
    }
    fn server_by_name(&self, name: &ServerName) -> Result<Option<ServerInfo>, ViewError> {
        Ok(self.servers.iter().find(|s| &s.name == name).cloned())
    }
    fn server_by_id(&self, id: &ServerId) -> Result<Option<ServerInfo>, ViewError> {
        Ok(self.servers.iter().find(|s| &s.server_id == id).cloned())
    }
    fn device(&self, id: &DeviceId) -> Result<Option<DeviceInfo>, ViewError> {
        Ok(self.devices.iter().find(|d| &d.device_id == id).cloned())
    }
    fn current_enumeration(&self, l: &LineageId) -> Result<Option<DeviceInfo>, ViewError> {
        Ok(self
            .devices
            .iter()
            .filter(|d| &d.lineage_id == l)
            .max_by_key(|d| d.device_id)
            .cloned())
    }
    fn free_devices_matching(
        &self,
        v: VendorId,
        p: ProductId,
        serial: Option<&str>,
    ) -> Result<BTreeMap<HostName, Vec<DeviceInfo>>, ViewError> {
        let mut out: BTreeMap<HostName, Vec<DeviceInfo>> = BTreeMap::new();
        for d in &self.devices {
            if d.vendor_id == v
                && d.product_id == p
                && d.status == DeviceStatus::Available
                && serial.is_none_or(|s| d.serial.as_deref() == Some(s))
            {
                out.entry(d.host.clone()).or_default().push(d.clone());
            }
        }
        Ok(out)
    }
    fn claim(&self, l: &LineageId) -> Result<Option<ClaimInfo>, ViewError> {
        Ok(self.claims.iter().find(|c| &c.lineage_id == l).cloned())
    }
    fn subject_seq(&self, subject: &str) -> Result<u64, ViewError> {
        Ok(self.seqs.get(subject).copied().unwrap_or(0))
    }
    fn host_known(&self, host: &HostName) -> Result<bool, ViewError> {
        Ok(self.devices.iter().any(|d| &d.host == host))
    }
    fn lineage_alarms(&self, _: &LineageId) -> Result<LineageAlarms, ViewError> {
        Ok(LineageAlarms::default())
    }
}

fn h(s: &str) -> HostName {
    HostName::new(s).unwrap()
}
fn dev(n: u128, host: &str, vp: (u16, u16), serial: Option<&str>) -> DeviceInfo {
    DeviceInfo {
        device_id: DeviceId(uuid::Uuid::from_u128(n)),
        lineage_id: LineageId(uuid::Uuid::from_u128(1000 + n)),
        lineage_kind: if serial.is_some() {
            LineageKind::Serial
        } else {
            LineageKind::Port
        },
        host: h(host),
        vendor_id: VendorId(vp.0),
        product_id: ProductId(vp.1),
        serial: serial.map(str::to_owned),
        address: UsbAddress::new(2, u16::try_from(n % 100 + 1).unwrap()).unwrap(),
        status: DeviceStatus::Available,
        holder: None,
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
fn usb(spec: &str) -> Vec<UsbRequest> {
    spec.split(';').map(|s| s.parse().unwrap()).collect()
}
fn flavor(name: &str, spec: &str) -> FlavorInfo {
    FlavorInfo {
        flavor_id: FlavorId(uuid::Uuid::from_u128(name.len() as u128 + 500)),
        name: FlavorName::new(name).unwrap(),
        usb: usb(spec),
        on_fingerprint_change: FingerprintPolicy::Hold,
    }
}
fn kinds(d: &Decision) -> Vec<&'static str> {
    d.steps.iter().map(|s| s.event.kind()).collect()
}
fn boot(name: &str, f: &str) -> Command {
    Command::Boot {
        name: ServerName::new(name).unwrap(),
        flavor: FlavorName::new(f).unwrap(),
        host: None,
    }
}

const KEY: (u16, u16) = (0x136b, 0x0003);

#[test]
fn flavor_create_validates_ports_ids_and_names() {
    let mut v = MemView::default();
    v.devices.push(dev(1, "host-b", KEY, Some("S1")));
    let ok = decide(
        &v,
        &Command::CreateFlavor {
            resources: Default::default(),
            name: FlavorName::new("key").unwrap(),
            usb: usb("vendor=136b,product=0003"),
            on_fingerprint_change: None,
        },
        &ctx(),
    )
    .unwrap();
    assert_eq!(kinds(&ok), ["FlavorCreated"]);
    assert_eq!(ok.steps[0].fence, Fence::Expect(0));

    v.flavors.push(flavor("key", "vendor=136b,product=0003"));
    let dup = decide(
        &v,
        &Command::CreateFlavor {
            resources: Default::default(),
            name: FlavorName::new("key").unwrap(),
            usb: vec![],
            on_fingerprint_change: None,
        },
        &ctx(),
    )
    .unwrap_err();
    assert_eq!(dup.kind(), RejectKind::Conflict);

    // Two requests on one uhci controller: 3 devices > 2 ports.
    let ports = decide(
        &v,
        &Command::CreateFlavor {
resources: Default::default(),
            name: FlavorName::new("big").unwrap(),
            usb: usb("vendor=136b,product=0003,count=2,controller=uhci;vendor=1050,product=0120,controller=uhci"),
on_fingerprint_change: None,
        },
        &ctx(),
    )
    .unwrap_err();
    assert_eq!(ports.kind(), RejectKind::Invalid);
    assert!(
        ports
            .to_string()
            .contains("uhci has 2 ports and the flavor needs 3"),
        "{}",
        ports.to_string()
    );

    let unknown = decide(
        &v,
        &Command::CreateFlavor {
            resources: Default::default(),
            name: FlavorName::new("ghost").unwrap(),
            usb: usb(&format!("id={}", DeviceId(uuid::Uuid::from_u128(99)))),
            on_fingerprint_change: None,
        },
        &ctx(),
    )
    .unwrap_err();
    assert_eq!(unknown.kind(), RejectKind::NotFound);

    // A request sent whole over NATS meets the CLI's and HTTP's rules: serial only with
    // vendor/product, count at least 1.
    let d1 = v.devices[0].device_id;
    for bad in [
        UsbRequest {
            selector: DeviceSelector::Match {
                vendor_id: VendorId(0x136b),
                product_id: ProductId(3),
                serial: None,
                count: 0,
            },
            controller: ControllerModel::Xhci,
            follow: FollowPolicy::Lineage,
        },
        UsbRequest {
            selector: DeviceSelector::Match {
                vendor_id: VendorId(0x136b),
                product_id: ProductId(3),
                serial: Some(String::new()),
                count: 1,
            },
            controller: ControllerModel::Xhci,
            follow: FollowPolicy::Lineage,
        },
    ] {
        let r = decide(
            &v,
            &Command::CreateFlavor {
                resources: Default::default(),
                name: FlavorName::new("nats").unwrap(),
                usb: vec![usb(&format!("id={d1}")).remove(0), bad.clone()],
                on_fingerprint_change: None,
            },
            &ctx(),
        )
        .unwrap_err();
        assert_eq!(r.kind(), RejectKind::Invalid, "{bad:?}");
        assert!(r.to_string().starts_with("usb[1]: "), "{}", r.to_string());
    }
}

#[test]
fn boot_goes_to_the_host_that_holds_the_device_and_fences_the_claim() {
    let mut v = MemView::default();
    v.devices.push(dev(1, "host-a", (0x1050, 0x0120), None));
    v.devices.push(dev(2, "host-b", KEY, Some("S1")));
    v.flavors.push(flavor("key", "vendor=136b,product=0003"));
    let claim_subject = subjects::claim(&v.devices[1].lineage_id);
    v.seqs.insert(claim_subject, 41);

    let d = decide(&v, &boot("erp", "key"), &ctx()).unwrap();
    assert_eq!(
        kinds(&d),
        ["ServerBootRequested", "DeviceClaimed", "ServerScheduled"]
    );
    assert_eq!(d.steps[1].fence, Fence::Expect(41));
    // Every step is fenced exactly when its subject is, and says what undoes it.
    for s in &d.steps {
        let fenced = subjects::is_fenced(&subjects::for_body(&s.event));
        assert_eq!(matches!(s.fence, Fence::Expect(_)), fenced, "{s:?}");
    }
    let Some(Event::DeviceReleased(undo)) = &d.steps[1].undo else {
        panic!("a claim's undo is its release: {:?}", d.steps[1].undo)
    };
    assert_eq!(
        (undo.lineage_id, undo.reason),
        (v.devices[1].lineage_id, ReleaseReason::BootFailed)
    );
    assert!(
        matches!(&d.steps[0].undo, Some(Event::ServerDeleted(s)) if s.server_id == ctx().server_id)
    );
    assert_eq!(d.steps[2].undo, None);
    match &d.steps[2].event {
        Event::ServerScheduled(s) => {
            assert_eq!(s.host, h("host-b"));
            assert_eq!(s.devices[0].device_id, v.devices[1].device_id);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(d.reply, Reply::Accepted(_)));
}

#[test]
fn a_claimed_device_cannot_be_booted_twice_and_each_host_says_why() {
    let mut v = MemView::default();
    v.devices.push(dev(1, "host-a", KEY, None));
    v.devices.push(dev(2, "host-b", KEY, None));
    v.flavors
        .push(flavor("two", "vendor=136b,product=0003,count=2"));
    let d = decide(&v, &boot("erp", "two"), &ctx()).unwrap();
    assert_eq!(kinds(&d), ["ServerBootRequested", "ServerScheduleFailed"]);
    let Event::ServerScheduleFailed(f) = &d.steps[1].event else {
        panic!()
    };
    assert_eq!(f.host_rejections.len(), 2);
    assert!(
        f.host_rejections[0]
            .reason
            .contains("needs 2 free, host has 1"),
        "{:?}",
        f.host_rejections
    );
    let Reply::Refused(r) = &d.reply else {
        panic!()
    };
    assert_eq!(r.kind(), RejectKind::Conflict);
    let reason = r.to_string();
    assert!(
        reason.contains("host-a") && reason.contains("host-b"),
        "{reason}"
    );

    // Claimed elsewhere: the lineage is held.
    let mut v = MemView::default();
    let d1 = dev(1, "host-b", KEY, Some("S"));
    v.claims.push(ClaimInfo {
        lineage_id: d1.lineage_id,
        device_id: d1.device_id,
        server_id: ServerId(uuid::Uuid::from_u128(99)),
        host: h("host-b"),
        follow: FollowPolicy::Lineage,
    });
    v.devices.push(DeviceInfo {
        status: DeviceStatus::Claimed,
        ..d1.clone()
    });
    v.flavors
        .push(flavor("lin", &format!("lineage={}", d1.lineage_id)));
    let d = decide(&v, &boot("erp", "lin"), &ctx()).unwrap();
    let Reply::Refused(r) = &d.reply else {
        panic!()
    };
    let reason = r.to_string();
    assert!(reason.contains("already claimed"), "{reason}");
}

#[test]
fn pack_and_spread_choose_differently() {
    let mut v = MemView::default();
    v.devices.push(dev(1, "host-a", KEY, None));
    v.devices.push(dev(2, "host-b", KEY, None));
    v.devices.push(dev(3, "host-b", KEY, None));
    v.flavors.push(flavor("key", "vendor=136b,product=0003"));
    let host_of = |d: &Decision| match &d.steps.last().unwrap().event {
        Event::ServerScheduled(s) => s.host.clone(),
        e => panic!("{e:?}"),
    };
    let pack = decide(&v, &boot("a", "key"), &ctx()).unwrap();
    assert_eq!(host_of(&pack), h("host-a"));
    let spread = decide(
        &v,
        &boot("a", "key"),
        &Ctx {
            weigh: Weigh::Spread,
            ..ctx()
        },
    )
    .unwrap();
    assert_eq!(host_of(&spread), h("host-b"));
}

#[test]
fn an_enumeration_binding_follows_its_lineage_unless_strict() {
    let mut v = MemView::default();
    let old = DeviceInfo {
        status: DeviceStatus::Invalidated,
        ..dev(1, "host-b", KEY, None)
    };
    let new = DeviceInfo {
        device_id: DeviceId(uuid::Uuid::from_u128(2)),
        ..dev(1, "host-b", KEY, None)
    };
    v.devices.push(old.clone());
    v.devices.push(new.clone());
    v.flavors
        .push(flavor("f", &format!("id={}", old.device_id)));
    v.flavors.push(flavor(
        "strict",
        &format!("id={},follow=strict", old.device_id),
    ));
    let d = decide(&v, &boot("a", "f"), &ctx()).unwrap();
    let Event::DeviceClaimed(c) = &d.steps[1].event else {
        panic!("{:?}", kinds(&d))
    };
    assert_eq!(c.device_id, new.device_id);
    let d = decide(&v, &boot("a", "strict"), &ctx()).unwrap();
    let Reply::Refused(r) = &d.reply else {
        panic!()
    };
    let reason = r.to_string();
    assert!(
        reason.contains("invalidated") && reason.contains("strict"),
        "{reason}"
    );
}

fn running(v: &mut MemView, d: &DeviceInfo, f: &FlavorInfo) -> ServerInfo {
    let s = ServerInfo {
        server_id: ServerId(uuid::Uuid::from_u128(7)),
        name: ServerName::new("erp").unwrap(),
        flavor_id: f.flavor_id,
        host: Some(d.host.clone()),
        state: ServerState::Active,
        description: None,
        resize_from: None,
        devices: vec![AssignedDevice {
            request_index: 0,
            device_id: d.device_id,
            lineage_id: d.lineage_id,
            controller: ControllerModel::Ehci,
            follow: FollowPolicy::Lineage,
        }],
    };
    v.claims.push(ClaimInfo {
        lineage_id: d.lineage_id,
        device_id: d.device_id,
        server_id: s.server_id,
        host: d.host.clone(),
        follow: FollowPolicy::Lineage,
    });
    v.servers.push(s.clone());
    s
}

#[test]
fn resize_awaits_confirmation_keeping_the_old_device_then_confirm_or_revert() {
    let mut v = MemView::default();
    let a = DeviceInfo {
        status: DeviceStatus::Attached,
        ..dev(1, "host-b", KEY, Some("A"))
    };
    let b = dev(2, "host-b", (0x1050, 0x0120), Some("B"));
    v.devices.extend([a.clone(), b.clone()]);
    let fa = flavor("fa", "vendor=136b,product=0003");
    let fb = flavor("flavor-b", "vendor=1050,product=0120");
    v.flavors.extend([fa.clone(), fb.clone()]);
    let s = running(&mut v, &a, &fa);
    let name = ServerName::new("erp").unwrap();
    let d = decide(
        &v,
        &Command::Resize {
            name: name.clone(),
            flavor: FlavorName::new("flavor-b").unwrap(),
        },
        &ctx(),
    )
    .unwrap();
    // No release: the old key stays claimed (VERIFY_RESIZE).
    assert_eq!(
        kinds(&d),
        ["DeviceClaimed", "ServerResized", "ServerResizeVerifying"]
    );
    let Event::ServerResizeVerifying(verifying) = &d.steps[2].event else {
        panic!()
    };
    assert_eq!(verifying.from_flavor, fa.flavor_id);
    assert_eq!(verifying.devices, s.devices);

    // The view after it: the server on flavor-b with the token, both claimed.
    let Event::ServerResized(resized) = &d.steps[1].event else {
        panic!()
    };
    let mut after = v;
    after.claims.push(ClaimInfo {
        lineage_id: b.lineage_id,
        device_id: b.device_id,
        server_id: s.server_id,
        host: b.host.clone(),
        follow: FollowPolicy::Lineage,
    });
    after.servers[0] = ServerInfo {
        flavor_id: fb.flavor_id,
        devices: resized.devices.clone(),
        resize_from: Some(usbpt_commands::view::ResizeFrom {
            flavor_id: fa.flavor_id,
            host: verifying.from_host.clone(),
            devices: verifying.devices.clone(),
        }),
        ..s.clone()
    };
    // Another resize or a migration must wait.
    for cmd in [
        Command::Resize {
            name: name.clone(),
            flavor: FlavorName::new("fa").unwrap(),
        },
        Command::Migrate {
            name: name.clone(),
            live: false,
            host: None,
        },
    ] {
        let e = decide(&after, &cmd, &ctx()).unwrap_err();
        assert_eq!(e.kind(), RejectKind::Conflict, "{cmd:?}");
        assert!(e.to_string().contains("VERIFY_RESIZE"), "{}", e.to_string());
    }
    // Confirm releases the old key.
    let c = decide(
        &after,
        &Command::ConfirmResize { name: name.clone() },
        &ctx(),
    )
    .unwrap();
    assert_eq!(kinds(&c), ["DeviceReleased", "ServerResizeConfirmed"]);
    let Event::DeviceReleased(r) = &c.steps[0].event else {
        panic!()
    };
    assert_eq!(
        (r.device_id, r.reason),
        (a.device_id, ReleaseReason::Resized)
    );
    // Revert: flavor fa and the key back (a resize back, same host: redefined there), the
    // token released.
    let r = decide(
        &after,
        &Command::RevertResize { name: name.clone() },
        &ctx(),
    )
    .unwrap();
    assert_eq!(
        kinds(&r),
        ["ServerResized", "DeviceReleased", "ServerResizeReverted"]
    );
    let Event::ServerResized(back) = &r.steps[0].event else {
        panic!()
    };
    assert_eq!(
        (back.from_flavor, back.to_flavor),
        (fb.flavor_id, fa.flavor_id)
    );
    assert_eq!(back.devices, s.devices);
    let Event::DeviceReleased(t) = &r.steps[1].event else {
        panic!()
    };
    assert_eq!(t.device_id, b.device_id);
    // An old device whose claim ended meanwhile cannot be given back.
    let lost = MemView {
        claims: after
            .claims
            .iter()
            .filter(|c| c.lineage_id != a.lineage_id)
            .cloned()
            .collect(),
        ..after.clone()
    };
    let e = decide(&lost, &Command::RevertResize { name: name.clone() }, &ctx()).unwrap_err();
    assert_eq!(e.kind(), RejectKind::Conflict);
    assert!(
        e.to_string().contains("no longer reserved"),
        "{}",
        e.to_string()
    );
    // Deleting while verifying releases both.
    let del = decide(&after, &Command::Delete { name: name.clone() }, &ctx()).unwrap();
    assert_eq!(
        kinds(&del),
        ["ServerDeleted", "DeviceReleased", "DeviceReleased"]
    );
    // Nothing pending: confirm and revert are 409s.
    for cmd in [
        Command::ConfirmResize { name: name.clone() },
        Command::RevertResize { name },
    ] {
        assert_eq!(
            decide(&fresh(&s, &a, &fa), &cmd, &ctx())
                .unwrap_err()
                .kind(),
            RejectKind::Conflict
        );
    }
}

fn fresh(_s: &ServerInfo, a: &DeviceInfo, f: &FlavorInfo) -> MemView {
    let mut v = MemView::default();
    v.devices.push(a.clone());
    v.flavors.push(f.clone());
    running(&mut v, a, f);
    v
}

#[test]
fn live_migration_with_usb_is_refused_and_cold_follows_a_moved_serial_lineage() {
    let mut v = MemView::default();
    let a = DeviceInfo {
        status: DeviceStatus::Attached,
        ..dev(1, "host-b", KEY, Some("A"))
    };
    v.devices.push(a.clone());
    let fa = flavor("fa", "vendor=136b,product=0003");
    v.flavors.push(fa.clone());
    running(&mut v, &a, &fa);
    let name = ServerName::new("erp").unwrap();
    let live = decide(
        &v,
        &Command::Migrate {
            name: name.clone(),
            live: true,
            host: None,
        },
        &ctx(),
    )
    .unwrap();
    assert_eq!(kinds(&live), ["ServerMigrationRefused"]);
    let Reply::Refused(r) = &live.reply else {
        panic!()
    };
    let reason = r.to_string();
    assert!(
        reason.contains("live migration") && reason.contains("USB"),
        "{reason}"
    );

    // Cold, device still on host-b: refused.
    let cold = decide(
        &v,
        &Command::Migrate {
            name: name.clone(),
            live: false,
            host: None,
        },
        &ctx(),
    )
    .unwrap();
    assert_eq!(kinds(&cold), ["ServerMigrationRefused"]);

    // The key was moved to host-c: a new enumeration of the same serial lineage.
    v.devices[0].status = DeviceStatus::Invalidated;
    let moved = DeviceInfo {
        device_id: DeviceId(uuid::Uuid::from_u128(50)),
        host: h("host-c"),
        status: DeviceStatus::Claimed,
        ..a.clone()
    };
    v.devices.push(moved.clone());
    let cold = decide(
        &v,
        &Command::Migrate {
            name,
            live: false,
            host: None,
        },
        &ctx(),
    )
    .unwrap();
    assert_eq!(
        kinds(&cold),
        ["DeviceClaimed", "ServerMigrated", "ServerActionRequested"]
    );
    let Event::ServerMigrated(m) = &cold.steps[1].event else {
        panic!()
    };
    assert_eq!(
        (m.from_host.as_str(), m.host.as_str()),
        ("host-b", "host-c")
    );
    assert_eq!(m.devices[0].device_id, moved.device_id);
}

#[test]
fn actions_keep_claims_and_respect_state() {
    let mut v = MemView::default();
    let a = dev(1, "host-b", KEY, Some("A"));
    v.devices.push(a.clone());
    let fa = flavor("fa", "vendor=136b,product=0003");
    v.flavors.push(fa.clone());
    running(&mut v, &a, &fa);
    let name = ServerName::new("erp").unwrap();
    let pause = decide(
        &v,
        &Command::Act {
            name: name.clone(),
            action: ServerAction::Pause,
        },
        &ctx(),
    )
    .unwrap();
    assert_eq!(kinds(&pause), ["ServerActionRequested"]);
    let unpause = decide(
        &v,
        &Command::Act {
            name: name.clone(),
            action: ServerAction::Unpause,
        },
        &ctx(),
    )
    .unwrap_err();
    assert_eq!(unpause.kind(), RejectKind::Conflict);
    assert!(
        unpause.to_string().contains("unpause") && unpause.to_string().contains("Active"),
        "{}",
        unpause.to_string()
    );
    let gone = decide(
        &v,
        &Command::Act {
            name: ServerName::new("nope").unwrap(),
            action: ServerAction::Stop,
        },
        &ctx(),
    )
    .unwrap_err();
    assert_eq!(gone.kind(), RejectKind::NotFound);
}

#[test]
fn delete_releases_every_held_device() {
    let mut v = MemView::default();
    let a = dev(1, "host-b", KEY, Some("A"));
    v.devices.push(a.clone());
    let fa = flavor("fa", "vendor=136b,product=0003");
    v.flavors.push(fa.clone());
    running(&mut v, &a, &fa);
    v.seqs.insert(subjects::claim(&a.lineage_id), 12);
    let d = decide(
        &v,
        &Command::Delete {
            name: ServerName::new("erp").unwrap(),
        },
        &ctx(),
    )
    .unwrap();
    assert_eq!(kinds(&d), ["ServerDeleted", "DeviceReleased"]);
    assert_eq!(d.steps[1].fence, Fence::Expect(12));
}

#[test]
fn reactor_releases_strict_claims_at_once_and_lineage_claims_after_grace() {
    use usbpt_commands::reactor::{grace_expired, on_invalidated, Reaction};
    let mut v = MemView::default();
    let a = DeviceInfo {
        status: DeviceStatus::Invalidated,
        ..dev(1, "host-b", KEY, Some("A"))
    };
    v.devices.push(a.clone());
    let fa = flavor("fa", "vendor=136b,product=0003");
    v.flavors.push(fa.clone());
    running(&mut v, &a, &fa);
    let inv = DeviceInvalidated {
        device_id: a.device_id,
        lineage_id: a.lineage_id,
        host: a.host.clone(),
        reason: InvalidationReason::HostRebooted,
        superseded_by: None,
    };
    assert_eq!(on_invalidated(&v, &inv).unwrap(), Reaction::WaitGrace);
    // Nothing came back within the grace window: released.
    let step = grace_expired(&v, a.device_id, a.lineage_id)
        .unwrap()
        .unwrap();
    let Event::DeviceReleased(r) = &step.event else {
        panic!()
    };
    assert_eq!(r.reason, ReleaseReason::GraceExpired);
    // A new enumeration of the lineage came: the claim stays.
    v.devices.push(DeviceInfo {
        device_id: DeviceId(uuid::Uuid::from_u128(2)),
        status: DeviceStatus::Claimed,
        ..a.clone()
    });
    assert_eq!(grace_expired(&v, a.device_id, a.lineage_id).unwrap(), None);

    v.claims[0].follow = FollowPolicy::Strict;
    match on_invalidated(&v, &inv).unwrap() {
        Reaction::Release(step) => {
            let Event::DeviceReleased(r) = &step.event else {
                panic!()
            };
            assert_eq!(r.reason, ReleaseReason::Invalidated);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_sized_flavor_is_created_then_sized_on_its_subject() {
    let v = MemView::default();
    let d = decide(
        &v,
        &Command::CreateFlavor {
            name: FlavorName::new("big").unwrap(),
            usb: vec![],
            resources: usbpt_schemas::commands::FlavorResources {
                ram_mb: 2048,
                vcpus: 2,
                disk_gb: 0,
            },
            on_fingerprint_change: None,
        },
        &ctx(),
    )
    .unwrap();
    assert_eq!(kinds(&d), ["FlavorCreated", "FlavorSized"]);
    // Both fenced on the flavor's subject; the handler chains the second on the first.
    assert_eq!(d.steps[1].fence, Fence::Expect(0));
    match &d.steps[1].event {
        usbpt_schemas::Event::FlavorSized(e) => {
            assert_eq!((e.ram_mb, e.vcpus, e.disk_gb), (2048, 2, 0));
            assert_eq!(e.flavor_id, ctx().flavor_id);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn update_server_renames_describes_and_refuses_a_taken_name() {
    let mut v = MemView::default();
    let a = dev(1, "host-b", KEY, Some("A"));
    v.devices.push(a.clone());
    let f = flavor("fa", "vendor=136b,product=0003");
    v.flavors.push(f.clone());
    let s = running(&mut v, &a, &f);
    let update =
        |new_name: Option<&str>, description: Option<Option<&str>>| Command::UpdateServer {
            name: s.name.clone(),
            new_name: new_name.map(|n| ServerName::new(n).unwrap()),
            description: description.map(|d| d.map(str::to_owned)),
        };
    let renamed = decide(&v, &update(Some("erp-2"), None), &ctx()).unwrap();
    match &renamed.steps[..] {
        [step] => match &step.event {
            usbpt_schemas::Event::ServerUpdated(e) => {
                assert_eq!((e.name.as_str(), e.description.as_deref()), ("erp-2", None));
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    let described = decide(&v, &update(None, Some(Some("key on host-b"))), &ctx()).unwrap();
    match &described.steps[0].event {
        usbpt_schemas::Event::ServerUpdated(e) => {
            assert_eq!(e.name, s.name);
            assert_eq!(e.description.as_deref(), Some("key on host-b"));
        }
        other => panic!("{other:?}"),
    }
    // Nothing to change: nothing recorded.
    assert!(decide(&v, &update(None, None), &ctx())
        .unwrap()
        .steps
        .is_empty());
    let long = "x".repeat(256);
    let e = decide(&v, &update(None, Some(Some(&long))), &ctx()).unwrap_err();
    assert_eq!(e.kind(), RejectKind::Invalid);
    assert!(
        e.to_string().starts_with("description:"),
        "{}",
        e.to_string()
    );
    v.servers.push(ServerInfo {
        server_id: ServerId(uuid::Uuid::from_u128(99)),
        name: ServerName::new("taken").unwrap(),
        ..s.clone()
    });
    let e = decide(&v, &update(Some("taken"), None), &ctx()).unwrap_err();
    assert_eq!(e.kind(), RejectKind::Conflict);
    let e = decide(
        &v,
        &Command::UpdateServer {
            name: ServerName::new("nope").unwrap(),
            new_name: None,
            description: None,
        },
        &ctx(),
    )
    .unwrap_err();
    assert_eq!(e.kind(), RejectKind::NotFound);
}

#[test]
fn flavor_fingerprint_policy_is_recorded_only_when_it_changes() {
    let name = FlavorName::new("fp").unwrap();
    let create = |p: Option<FingerprintPolicy>| Command::CreateFlavor {
        name: name.clone(),
        usb: Vec::new(),
        resources: Default::default(),
        on_fingerprint_change: p,
    };
    let v = MemView::default();
    // The default (absent, or hold) adds nothing; follow is recorded on the flavor's subject.
    for p in [None, Some(FingerprintPolicy::Hold)] {
        let d = decide(&v, &create(p), &ctx()).unwrap();
        assert_eq!(kinds(&d), ["FlavorCreated"]);
    }
    let d = decide(&v, &create(Some(FingerprintPolicy::Follow)), &ctx()).unwrap();
    assert_eq!(kinds(&d), ["FlavorCreated", "FlavorFingerprintPolicySet"]);
    let Event::FlavorFingerprintPolicySet(e) = &d.steps[1].event else {
        panic!()
    };
    assert_eq!(
        (e.flavor_id, &e.name, e.on_fingerprint_change),
        (ctx().flavor_id, &name, FingerprintPolicy::Follow)
    );

    let mut v = MemView::default();
    let mut f = flavor("fp", "vendor=136b,product=0003");
    v.flavors.push(f.clone());
    let set = |p| Command::SetFlavorPolicy {
        name: name.clone(),
        on_fingerprint_change: p,
    };
    let d = decide(&v, &set(FingerprintPolicy::Hold), &ctx()).unwrap();
    assert!(d.steps.is_empty(), "unchanged: nothing recorded");
    let d = decide(&v, &set(FingerprintPolicy::Follow), &ctx()).unwrap();
    assert_eq!(kinds(&d), ["FlavorFingerprintPolicySet"]);
    assert!(matches!(d.steps[0].fence, Fence::Expect(_)), "fenced");
    f.on_fingerprint_change = FingerprintPolicy::Follow;
    v.flavors[0] = f;
    let d = decide(&v, &set(FingerprintPolicy::Follow), &ctx()).unwrap();
    assert!(d.steps.is_empty());
    let err = decide(
        &v,
        &Command::SetFlavorPolicy {
            name: FlavorName::new("nope").unwrap(),
            on_fingerprint_change: FingerprintPolicy::Follow,
        },
        &ctx(),
    )
    .unwrap_err();
    assert_eq!(err.kind(), RejectKind::NotFound);
}

#[test]
fn reactor_accepts_a_held_fingerprint_only_for_a_follow_flavor() {
    use usbpt_commands::reactor::{react, Reaction};
    let mut v = MemView::default();
    let d = dev(1, "host-a", KEY, Some("SN1"));
    let mut f = flavor("fp", "vendor=136b,product=0003");
    v.flavors.push(f.clone());
    let s = running(&mut v, &d, &f);
    let held = Event::DeviceReattachHeld(DeviceReattachHeld {
        host: d.host.clone(),
        server_id: s.server_id,
        lineage_id: d.lineage_id,
        device_id: DeviceId(uuid::Uuid::from_u128(77)),
        expected: Fingerprint([0xa; 32]),
        seen: Fingerprint([0xb; 32]),
    });
    // hold (the default): the operator accepts.
    assert_eq!(react(&v, &held).unwrap(), Reaction::Nothing);

    f.on_fingerprint_change = FingerprintPolicy::Follow;
    v.flavors[0] = f;
    let Reaction::Accept(step) = react(&v, &held).unwrap() else {
        panic!("follow accepts")
    };
    assert_eq!(
        step.event,
        Event::FingerprintAccepted(FingerprintAccepted {
            lineage_id: d.lineage_id,
            fingerprint: Fingerprint([0xb; 32]),
            device_id: Some(DeviceId(uuid::Uuid::from_u128(77))),
            host: Some(d.host.clone()),
            server_id: Some(s.server_id),
            by_policy: true,
        })
    );
    // Work for that host's agent.
    assert_eq!(
        subjects::for_body(&step.event),
        format!("usbpt.evt.ctl.host-a.server.{}", s.server_id)
    );

    // The claim has moved to another server (or was released): nothing to re-attach.
    v.claims[0].server_id = ServerId(uuid::Uuid::from_u128(99));
    assert_eq!(react(&v, &held).unwrap(), Reaction::Nothing);
    v.claims.clear();
    assert_eq!(react(&v, &held).unwrap(), Reaction::Nothing);
    // An unknown server: nothing.
    v.servers.clear();
    assert_eq!(react(&v, &held).unwrap(), Reaction::Nothing);
}

#[test]
fn decisions_in_flight_claim_different_devices_and_free_them_when_done() {
    use std::sync::Arc;
    use usbpt_commands::inflight::{InFlight, Overlay};
    // Three free keys on two hosts; boots decided one after another on the same (stale) view,
    // each with the claims of the ones before it in flight.
    let mut v = MemView::default();
    v.devices.push(dev(1, "host-a", KEY, Some("S1")));
    v.devices.push(dev(2, "host-a", KEY, Some("S2")));
    v.devices.push(dev(3, "host-b", KEY, Some("S3")));
    v.flavors.push(flavor("key", "vendor=136b,product=0003"));
    let inflight = Arc::new(InFlight::default());
    let claimed = |d: &Decision| -> Vec<LineageId> {
        d.steps
            .iter()
            .filter_map(|s| match &s.event {
                Event::DeviceClaimed(c) => Some(c.lineage_id),
                _ => None,
            })
            .collect()
    };
    let overlay = Overlay {
        view: &v,
        inflight: &inflight,
    };
    let mut held = Vec::new();
    let mut lineages = Vec::new();
    for name in ["a", "b", "c"] {
        let d = decide(&overlay, &boot(name, "key"), &ctx()).unwrap();
        assert!(
            matches!(d.reply, Reply::Accepted(_)),
            "{name}: {:?}",
            d.reply
        );
        lineages.extend(claimed(&d));
        held.push(inflight.reserve(&d.steps));
    }
    lineages.sort();
    lineages.dedup();
    assert_eq!(
        lineages.len(),
        3,
        "three boots in flight claim three devices"
    );
    assert_eq!(inflight.len(), 3);
    // A fourth finds nothing free while the three are in flight: it claims nothing.
    let d = decide(&overlay, &boot("d", "key"), &ctx()).unwrap();
    assert!(claimed(&d).is_empty(), "{:?}", kinds(&d));
    // Once the first is done (its reservation dropped; the stale view here still shows the
    // device free, as a view that has not applied the claim would), its device is free again to
    // this process's decisions: the next decision takes exactly that one (the fence then decides
    // against other processes).
    drop(held.remove(0));
    assert_eq!(inflight.len(), 2);
    let freed: Vec<LineageId> = lineages
        .iter()
        .copied()
        .filter(|l| !inflight.contains(l))
        .collect();
    assert_eq!(freed.len(), 1, "{freed:?}");
    let d = decide(&overlay, &boot("e", "key"), &ctx()).unwrap();
    assert_eq!(claimed(&d), freed);
    drop(held);
    assert!(inflight.is_empty());
}

#[test]
fn pack_lanes_start_several_processes_at_different_hosts() {
    // 40 hosts with one free key each; host names sort as h00 < h01 < … < h39.
    let mut v = MemView::default();
    for i in 0..40u128 {
        v.devices
            .push(dev(i + 1, &format!("h{i:02}"), KEY, Some(&format!("S{i}"))));
    }
    v.flavors.push(flavor("key", "vendor=136b,product=0003"));
    let host_index = |lane: u64| -> usize {
        let d = decide(&v, &boot("a", "key"), &Ctx { lane, ..ctx() }).unwrap();
        let host = d
            .steps
            .iter()
            .find_map(|s| match &s.event {
                Event::DeviceClaimed(c) => Some(c.host.to_string()),
                _ => None,
            })
            .expect("a claim");
        host[1..].parse().unwrap()
    };
    // Lane 0 (a single handler): among the first PACK_SUBSET hosts, as before lanes.
    assert!(host_index(0) < schedule::PACK_SUBSET);
    // Other lanes start within the first PACK_LANES hosts, each at its own place.
    let starts: Vec<usize> = [5u64, 13, 21, 29].iter().map(|&l| host_index(l)).collect();
    assert!(
        starts.iter().all(|&i| i < schedule::PACK_LANES),
        "{starts:?}"
    );
    let mut distinct = starts.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        4,
        "four lanes, four start hosts: {starts:?}"
    );
}
