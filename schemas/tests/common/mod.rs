//! One deterministic sample envelope per event variant, and proptest strategies for all of them.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use usbpt_schemas::*;
use uuid::Uuid;

pub fn host(s: &str) -> HostName {
    HostName::new(s).unwrap()
}
fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | n)
}
fn port(s: &str) -> PortPath {
    s.parse().unwrap()
}
fn assigned() -> AssignedDevice {
    AssignedDevice {
        request_index: 0,
        device_id: DeviceId(id(11)),
        lineage_id: LineageId(id(12)),
        controller: ControllerModel::Xhci,
        follow: FollowPolicy::Lineage,
    }
}

/// Number of `Event` variants; `variant_index` is exhaustive, so adding a variant breaks the
/// build here until a sample (and its golden file) is added.
pub const VARIANTS: usize = usbpt_schemas::EVENT_VARIANTS as usize;
pub fn variant_index(e: &Event) -> usize {
    match e {
        Event::HostAgentStarted(_) => 0,
        Event::DeviceDiscovered(_) => 1,
        Event::DeviceInvalidated(_) => 2,
        Event::FlavorCreated(_) => 3,
        Event::FlavorDeleted(_) => 4,
        Event::ServerBootRequested(_) => 5,
        Event::ServerScheduled(_) => 6,
        Event::ServerScheduleFailed(_) => 7,
        Event::DeviceClaimed(_) => 8,
        Event::DeviceAttached(_) => 9,
        Event::DeviceReattached(_) => 10,
        Event::DeviceReleased(_) => 11,
        Event::ServerStateChanged(_) => 12,
        Event::ServerResized(_) => 13,
        Event::ServerMigrationRefused(_) => 14,
        Event::ServerDeleted(_) => 15,
        Event::ServerActionRequested(_) => 16,
        Event::DeviceAttachFailed(_) => 17,
        Event::DeviceClashDetected(_) => 18,
        Event::ServerMigrated(_) => 19,
        Event::FlavorUsbSet(_) => 20,
        Event::FlavorSized(_) => 21,
        Event::ServerUpdated(_) => 22,
        Event::ServerResizeVerifying(_) => 23,
        Event::ServerResizeConfirmed(_) => 24,
        Event::ServerResizeReverted(_) => 25,
        Event::DeviceDiscoveredV2(_) => 26,
        Event::LineageLabeled(_) => 27,
        Event::PortFlapping(_) => 28,
        Event::PortFlappingCleared(_) => 29,
        Event::LineageConflictResolved(_) => 30,
        Event::FingerprintAccepted(_) => 31,
        Event::DeviceReattachHeld(_) => 32,
        Event::FlavorFingerprintPolicySet(_) => 33,
    }
}

fn sample_bodies_v1() -> Vec<Event> {
    let h = host("host-b");
    let dev = DeviceId(id(1));
    let lin = LineageId(id(2));
    let srv = ServerId(id(3));
    let fl = FlavorId(id(4));
    let addr = UsbAddress::new(2, 3).unwrap();
    vec![
        Event::HostAgentStarted(HostAgentStarted {
            host: h.clone(),
            boot_id: "5f0c2b9e-3c1a-4c53-9d1e-2f7b7d8a9c10".into(),
            agent_version: "0.1.0".into(),
            hypervisor_uri: "qemu:///system".into(),
        }),
        Event::DeviceDiscovered(DeviceDiscovered {
            device_id: dev,
            lineage_id: lin,
            lineage_kind: LineageKind::Serial,
            host: h.clone(),
            boot_id: "5f0c2b9e".into(),
            descriptors: UsbDescriptors {
                address: addr,
                port_path: port("2-1.4"),
                vendor_id: VendorId(0x136b),
                product_id: ProductId(0x0003),
                serial: Some("SN123".into()),
                device_class: 0,
                interface_classes: vec![3, 8],
                manufacturer: Some("STMicro".into()),
                product: Some("Licence key".into()),
                vendor_db: Some("STEC".into()),
                model_db: None,
                speed: Some("480".into()),
                usb_version: Some("2.00".into()),
            },
            syspath: "/sys/devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1.4".into(),
            supersedes: Some(DeviceId(id(9))),
        }),
        Event::DeviceInvalidated(DeviceInvalidated {
            device_id: dev,
            lineage_id: lin,
            host: h.clone(),
            reason: InvalidationReason::HostRebooted,
            superseded_by: None,
        }),
        Event::FlavorCreated(FlavorCreated {
            flavor_id: fl,
            name: FlavorName::new("erp-key").unwrap(),
            usb: vec![
                UsbRequest {
                    selector: DeviceSelector::Lineage(lin),
                    controller: ControllerModel::Ehci,
                    follow: FollowPolicy::Lineage,
                },
                UsbRequest {
                    selector: DeviceSelector::Match {
                        vendor_id: VendorId(0x1050),
                        product_id: ProductId(0x0120),
                        serial: None,
                        count: 2,
                    },
                    controller: ControllerModel::Xhci,
                    follow: FollowPolicy::Strict,
                },
                UsbRequest {
                    selector: DeviceSelector::Enumeration(dev),
                    controller: ControllerModel::Uhci,
                    follow: FollowPolicy::Strict,
                },
            ],
        }),
        Event::FlavorDeleted(FlavorDeleted {
            flavor_id: fl,
            name: FlavorName::new("erp-key").unwrap(),
        }),
        Event::ServerBootRequested(ServerBootRequested {
            server_id: srv,
            name: ServerName::new("erp-1").unwrap(),
            flavor_id: fl,
            requested_host: Some(h.clone()),
        }),
        Event::ServerScheduled(ServerScheduled {
            server_id: srv,
            host: h.clone(),
            flavor_id: fl,
            devices: vec![assigned()],
        }),
        Event::ServerScheduleFailed(ServerScheduleFailed {
            server_id: srv,
            reason: "no host can satisfy request 0".into(),
            host_rejections: vec![HostRejection {
                host: host("host-a"),
                reason: "no free 136b:0003".into(),
            }],
        }),
        Event::DeviceClaimed(DeviceClaimed {
            device_id: dev,
            lineage_id: lin,
            host: h.clone(),
            server_id: srv,
            request_index: 0,
            controller: ControllerModel::Ehci,
            follow: FollowPolicy::Lineage,
        }),
        Event::DeviceAttached(DeviceAttached {
            device_id: dev,
            lineage_id: lin,
            host: h.clone(),
            server_id: srv,
            address: addr,
            method: AttachMethod::DomainDefinition,
            detail: String::new(),
        }),
        Event::DeviceReattached(DeviceReattached {
            server_id: srv,
            host: h.clone(),
            lineage_id: lin,
            old_device_id: dev,
            new_device_id: DeviceId(id(5)),
            address: UsbAddress::new(2, 9).unwrap(),
            method: AttachMethod::Redefined,
            detail: "test driver has no hot attach; domain redefined".into(),
        }),
        Event::DeviceReleased(DeviceReleased {
            device_id: dev,
            lineage_id: lin,
            host: h.clone(),
            server_id: srv,
            reason: ReleaseReason::ServerDeleted,
        }),
        Event::ServerStateChanged(ServerStateChanged {
            server_id: srv,
            host: Some(h.clone()),
            state: ServerState::Active,
            reported_by_agent: true,
            detail: "domain started".into(),
        }),
        Event::ServerResized(ServerResized {
            server_id: srv,
            from_flavor: fl,
            to_flavor: FlavorId(id(6)),
            from_host: host("host-a"),
            host: h.clone(),
            devices: vec![assigned()],
        }),
        Event::ServerMigrationRefused(ServerMigrationRefused {
            server_id: srv,
            live: true,
            reason: "server holds host USB devices".into(),
        }),
        Event::ServerDeleted(ServerDeleted {
            server_id: srv,
            host: Some(h.clone()),
        }),
        Event::ServerActionRequested(ServerActionRequested {
            server_id: srv,
            host: h.clone(),
            action: ServerAction::Suspend,
        }),
        Event::DeviceAttachFailed(DeviceAttachFailed {
            device_id: dev,
            host: h.clone(),
            server_id: srv,
            error: "error: this function is not supported".into(),
        }),
        Event::DeviceClashDetected(DeviceClashDetected {
            host: h,
            vendor_id: VendorId(0x0fce),
            product_id: ProductId(0x5170),
            serial: "0123456789ABCDEF".into(),
            port_paths: vec![port("1-1.5.2.4"), port("1-1.6")],
        }),
        Event::ServerMigrated(ServerMigrated {
            server_id: srv,
            from_host: host("host-a"),
            host: host("host-c"),
            devices: vec![assigned()],
        }),
        Event::FlavorUsbSet(FlavorUsbSet {
            flavor_id: fl,
            name: FlavorName::new("erp-key").unwrap(),
            usb: vec![UsbRequest {
                selector: DeviceSelector::Match {
                    vendor_id: VendorId(0x136b),
                    product_id: ProductId(0x0003),
                    serial: Some("SN-1".into()),
                    count: 2,
                },
                controller: ControllerModel::Xhci,
                follow: FollowPolicy::Strict,
            }],
        }),
        Event::FlavorSized(FlavorSized {
            flavor_id: fl,
            name: FlavorName::new("erp-key").unwrap(),
            ram_mb: 2048,
            vcpus: 2,
            disk_gb: 20,
        }),
        Event::ServerUpdated(ServerUpdated {
            server_id: srv,
            name: ServerName::new("erp-1-renamed").unwrap(),
            description: Some("ERP, licence key on host-b".into()),
        }),
        Event::ServerResizeVerifying(ServerResizeVerifying {
            server_id: srv,
            from_flavor: fl,
            from_host: host("host-a"),
            devices: vec![assigned()],
        }),
        Event::ServerResizeConfirmed(ServerResizeConfirmed { server_id: srv }),
        Event::ServerResizeReverted(ServerResizeReverted { server_id: srv }),
    ]
}

/// Every variant's sample: the first 26, then `DeviceDiscoveredV2` (sample 1's discovery with
/// another serial and a fingerprint), then `LineageLabeled`.
pub fn sample_bodies() -> Vec<Event> {
    let mut all = sample_bodies_v1();
    let Event::DeviceDiscovered(mut discovery) = all[1].clone() else {
        unreachable!("sample 1 is DeviceDiscovered")
    };
    discovery.descriptors.serial = Some("SN124".into());
    all.push(Event::DeviceDiscoveredV2(DeviceDiscoveredV2 {
        discovery,
        fingerprint: Fingerprint(std::array::from_fn(|i| i as u8 * 7)),
    }));
    all.push(Event::LineageLabeled(LineageLabeled {
        lineage_id: LineageId(id(2)),
        label: Some("ERP key #3".into()),
    }));
    let fp = |k: u8| Fingerprint(std::array::from_fn(|i| (i as u8).wrapping_mul(k)));
    all.push(Event::PortFlapping(PortFlapping {
        host: host("host-a"),
        lineage_id: LineageId(id(2)),
        device_id: DeviceId(id(1)),
        port_path: port("1-1.4"),
        enumerations: 6,
        window_secs: 60,
        threshold: 5,
    }));
    all.push(Event::PortFlappingCleared(PortFlappingCleared {
        host: host("host-a"),
        lineage_id: LineageId(id(2)),
        device_id: Some(DeviceId(id(1))),
        quiet_secs: 120,
    }));
    all.push(Event::LineageConflictResolved(LineageConflictResolved {
        lineage_id: LineageId(id(2)),
        keep_host: host("host-b"),
        kept_device: DeviceId(id(3)),
        dropped_device: DeviceId(id(1)),
    }));
    all.push(Event::FingerprintAccepted(FingerprintAccepted {
        lineage_id: LineageId(id(2)),
        fingerprint: fp(3),
        device_id: Some(DeviceId(id(1))),
        host: Some(host("host-a")),
        server_id: Some(ServerId(id(4))),
        by_policy: false,
    }));
    all.push(Event::DeviceReattachHeld(DeviceReattachHeld {
        host: host("host-a"),
        server_id: ServerId(id(4)),
        lineage_id: LineageId(id(2)),
        device_id: DeviceId(id(1)),
        expected: fp(7),
        seen: fp(3),
    }));
    all.push(Event::FlavorFingerprintPolicySet(
        FlavorFingerprintPolicySet {
            flavor_id: FlavorId(id(5)),
            name: FlavorName::new("erp").unwrap(),
            on_fingerprint_change: FingerprintPolicy::Follow,
        },
    ));
    all
}

pub fn sample_envelopes() -> Vec<Envelope> {
    sample_bodies()
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            let mut env = Envelope::at(
                EventId(id(1000 + i as u128)),
                Timestamp::from_micros(1_764_000_000_000_000 + i as i64),
                body,
            );
            env.causation_id = Some(EventId(id(77)));
            env.correlation_id = Some(CorrelationId(id(78)));
            env
        })
        .collect()
}

// ---- proptest strategies ----

fn a_uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}
fn a_host() -> impl Strategy<Value = HostName> {
    "[A-Za-z0-9_-]{1,64}".prop_map(|s| HostName::new(s).unwrap())
}
fn a_flavor_name() -> impl Strategy<Value = FlavorName> {
    "[A-Za-z0-9_-]{1,64}".prop_map(|s| FlavorName::new(s).unwrap())
}
fn a_text() -> impl Strategy<Value = String> {
    ".{0,40}"
}
fn a_addr() -> impl Strategy<Value = UsbAddress> {
    (1u16..=255, 1u16..=127).prop_map(|(b, d)| UsbAddress::new(b, d).unwrap())
}
fn a_port() -> impl Strategy<Value = PortPath> {
    (1u16..=255, prop::collection::vec(1u8..=255, 0..=7))
        .prop_map(|(b, p)| PortPath::new(b, p).unwrap())
}
fn a_controller() -> impl Strategy<Value = ControllerModel> {
    prop_oneof![
        Just(ControllerModel::Uhci),
        Just(ControllerModel::Ehci),
        Just(ControllerModel::Xhci)
    ]
}
fn a_follow() -> impl Strategy<Value = FollowPolicy> {
    prop_oneof![Just(FollowPolicy::Lineage), Just(FollowPolicy::Strict)]
}
fn an_assigned() -> impl Strategy<Value = AssignedDevice> {
    (any::<u16>(), a_uuid(), a_uuid(), a_controller(), a_follow()).prop_map(
        |(request_index, d, l, controller, follow)| AssignedDevice {
            request_index,
            device_id: DeviceId(d),
            lineage_id: LineageId(l),
            controller,
            follow,
        },
    )
}
fn a_request() -> impl Strategy<Value = UsbRequest> {
    let selector = prop_oneof![
        a_uuid().prop_map(|u| DeviceSelector::Enumeration(DeviceId(u))),
        a_uuid().prop_map(|u| DeviceSelector::Lineage(LineageId(u))),
        (
            any::<u16>(),
            any::<u16>(),
            proptest::option::of(a_text()),
            any::<u8>()
        )
            .prop_map(|(v, p, serial, count)| DeviceSelector::Match {
                vendor_id: VendorId(v),
                product_id: ProductId(p),
                serial,
                count
            }),
    ];
    (selector, a_controller(), a_follow()).prop_map(|(selector, controller, follow)| UsbRequest {
        selector,
        controller,
        follow,
    })
}

/// Any event body: each variant's fields drawn at random.
pub fn any_event() -> impl Strategy<Value = Event> {
    prop_oneof![
        20 => any_event_v1(),
        1 => (any_event_v1(), any::<[u8; 32]>()).prop_filter_map(
            "a discovery",
            |(e, fp)| match e {
                Event::DeviceDiscovered(discovery) => {
                    Some(Event::DeviceDiscoveredV2(DeviceDiscoveredV2 {
                        discovery,
                        fingerprint: Fingerprint(fp),
                    }))
                }
                _ => None,
            }
        ),
        6 => any_event_v3(),
    ]
}

/// Any event body of the variants added for issue 18 (28 and up).
fn any_event_v3() -> impl Strategy<Value = Event> {
    let fp = || any::<[u8; 32]>().prop_map(Fingerprint);
    prop_oneof![
        (
            a_host(),
            a_uuid(),
            a_uuid(),
            a_port(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(
                |(host, l, d, port_path, enumerations, window_secs, threshold)| {
                    Event::PortFlapping(PortFlapping {
                        host,
                        lineage_id: LineageId(l),
                        device_id: DeviceId(d),
                        port_path,
                        enumerations,
                        window_secs,
                        threshold,
                    })
                }
            ),
        (
            a_host(),
            a_uuid(),
            proptest::option::of(a_uuid()),
            any::<u32>()
        )
            .prop_map(|(host, l, d, quiet_secs)| Event::PortFlappingCleared(
                PortFlappingCleared {
                    host,
                    lineage_id: LineageId(l),
                    device_id: d.map(DeviceId),
                    quiet_secs,
                }
            )),
        (a_uuid(), a_host(), a_uuid(), a_uuid()).prop_map(|(l, keep_host, k, d)| {
            Event::LineageConflictResolved(LineageConflictResolved {
                lineage_id: LineageId(l),
                keep_host,
                kept_device: DeviceId(k),
                dropped_device: DeviceId(d),
            })
        }),
        (
            a_uuid(),
            fp(),
            proptest::option::of(a_uuid()),
            proptest::option::of(a_host()),
            proptest::option::of(a_uuid()),
            any::<bool>()
        )
            .prop_map(|(l, fingerprint, d, host, s, by_policy)| {
                Event::FingerprintAccepted(FingerprintAccepted {
                    lineage_id: LineageId(l),
                    fingerprint,
                    device_id: d.map(DeviceId),
                    host,
                    server_id: s.map(ServerId),
                    by_policy,
                })
            }),
        (a_host(), a_uuid(), a_uuid(), a_uuid(), fp(), fp()).prop_map(
            |(host, s, l, d, expected, seen)| Event::DeviceReattachHeld(DeviceReattachHeld {
                host,
                server_id: ServerId(s),
                lineage_id: LineageId(l),
                device_id: DeviceId(d),
                expected,
                seen,
            })
        ),
        (a_uuid(), a_flavor_name(), any::<bool>()).prop_map(|(f, name, follow)| {
            Event::FlavorFingerprintPolicySet(FlavorFingerprintPolicySet {
                flavor_id: FlavorId(f),
                name,
                on_fingerprint_change: if follow {
                    FingerprintPolicy::Follow
                } else {
                    FingerprintPolicy::Hold
                },
            })
        }),
    ]
}

/// Any event body of the first 26 variants.
fn any_event_v1() -> impl Strategy<Value = Event> {
    let opt = |s: BoxedStrategy<String>| proptest::option::of(s);
    let txt = || a_text().boxed();
    prop_oneof![
        (a_host(), txt(), txt(), txt()).prop_map(
            |(host, boot_id, agent_version, hypervisor_uri)| {
                Event::HostAgentStarted(HostAgentStarted {
                    host,
                    boot_id,
                    agent_version,
                    hypervisor_uri,
                })
            }
        ),
        (
            (
                a_uuid(),
                a_uuid(),
                any::<bool>(),
                a_host(),
                txt(),
                a_addr(),
                a_port()
            ),
            (
                any::<u16>(),
                any::<u16>(),
                opt(txt()),
                any::<u8>(),
                prop::collection::vec(any::<u8>(), 0..4)
            ),
            (
                opt(txt()),
                opt(txt()),
                opt(txt()),
                opt(txt()),
                opt(txt()),
                opt(txt()),
                txt(),
                proptest::option::of(a_uuid())
            ),
        )
            .prop_map(
                |(
                    (d, l, serial_kind, host, boot_id, address, port_path),
                    (v, p, serial, device_class, interface_classes),
                    (manufacturer, product, vendor_db, model_db, speed, usb_version, syspath, sup),
                )| {
                    Event::DeviceDiscovered(DeviceDiscovered {
                        device_id: DeviceId(d),
                        lineage_id: LineageId(l),
                        lineage_kind: if serial_kind {
                            LineageKind::Serial
                        } else {
                            LineageKind::Port
                        },
                        host,
                        boot_id,
                        descriptors: UsbDescriptors {
                            address,
                            port_path,
                            vendor_id: VendorId(v),
                            product_id: ProductId(p),
                            serial,
                            device_class,
                            interface_classes,
                            manufacturer,
                            product,
                            vendor_db,
                            model_db,
                            speed,
                            usb_version,
                        },
                        syspath,
                        supersedes: sup.map(DeviceId),
                    })
                }
            ),
        (
            a_uuid(),
            a_uuid(),
            a_host(),
            0u8..5,
            proptest::option::of(a_uuid())
        )
            .prop_map(|(d, l, host, r, sup)| {
                let reason = [
                    InvalidationReason::Unplugged,
                    InvalidationReason::HostRebooted,
                    InvalidationReason::VanishedWhileAgentDown,
                    InvalidationReason::Reenumerated,
                    InvalidationReason::Filtered,
                ][usize::from(r)];
                Event::DeviceInvalidated(DeviceInvalidated {
                    device_id: DeviceId(d),
                    lineage_id: LineageId(l),
                    host,
                    reason,
                    superseded_by: sup.map(DeviceId),
                })
            }),
        (
            a_uuid(),
            a_flavor_name(),
            prop::collection::vec(a_request(), 0..4)
        )
            .prop_map(|(f, name, usb)| Event::FlavorCreated(FlavorCreated {
                flavor_id: FlavorId(f),
                name,
                usb
            })),
        (
            a_uuid(),
            a_flavor_name(),
            prop::collection::vec(a_request(), 0..4)
        )
            .prop_map(|(f, name, usb)| Event::FlavorUsbSet(FlavorUsbSet {
                flavor_id: FlavorId(f),
                name,
                usb
            })),
        (
            a_uuid(),
            a_flavor_name(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(|(f, name, ram_mb, vcpus, disk_gb)| Event::FlavorSized(
                FlavorSized {
                    flavor_id: FlavorId(f),
                    name,
                    ram_mb,
                    vcpus,
                    disk_gb
                }
            )),
        (a_uuid(), a_flavor_name()).prop_map(|(f, name)| Event::FlavorDeleted(FlavorDeleted {
            flavor_id: FlavorId(f),
            name
        })),
        (
            a_uuid(),
            "[A-Za-z0-9_-]{1,64}",
            a_uuid(),
            proptest::option::of(a_host())
        )
            .prop_map(|(s, n, f, requested_host)| Event::ServerBootRequested(
                ServerBootRequested {
                    server_id: ServerId(s),
                    name: ServerName::new(n).unwrap(),
                    flavor_id: FlavorId(f),
                    requested_host
                }
            )),
        (
            a_uuid(),
            a_host(),
            a_uuid(),
            prop::collection::vec(an_assigned(), 0..4)
        )
            .prop_map(
                |(s, host, f, devices)| Event::ServerScheduled(ServerScheduled {
                    server_id: ServerId(s),
                    host,
                    flavor_id: FlavorId(f),
                    devices
                })
            ),
        (
            a_uuid(),
            txt(),
            prop::collection::vec((a_host(), txt()), 0..4)
        )
            .prop_map(|(s, reason, rj)| Event::ServerScheduleFailed(
                ServerScheduleFailed {
                    server_id: ServerId(s),
                    reason,
                    host_rejections: rj
                        .into_iter()
                        .map(|(host, reason)| HostRejection { host, reason })
                        .collect()
                }
            )),
        (
            a_uuid(),
            a_uuid(),
            a_host(),
            a_uuid(),
            any::<u16>(),
            a_controller(),
            a_follow()
        )
            .prop_map(|(d, l, host, s, request_index, controller, follow)| {
                Event::DeviceClaimed(DeviceClaimed {
                    device_id: DeviceId(d),
                    lineage_id: LineageId(l),
                    host,
                    server_id: ServerId(s),
                    request_index,
                    controller,
                    follow,
                })
            }),
        (a_uuid(), a_uuid(), a_host(), a_uuid(), a_addr(), txt()).prop_map(
            |(d, l, host, s, address, detail)| Event::DeviceAttached(DeviceAttached {
                device_id: DeviceId(d),
                lineage_id: LineageId(l),
                host,
                server_id: ServerId(s),
                address,
                method: AttachMethod::HotPlug,
                detail
            })
        ),
        (
            a_uuid(),
            a_host(),
            a_uuid(),
            a_uuid(),
            a_uuid(),
            a_addr(),
            txt()
        )
            .prop_map(
                |(s, host, l, o, n, address, detail)| Event::DeviceReattached(DeviceReattached {
                    server_id: ServerId(s),
                    host,
                    lineage_id: LineageId(l),
                    old_device_id: DeviceId(o),
                    new_device_id: DeviceId(n),
                    address,
                    method: AttachMethod::Redefined,
                    detail
                })
            ),
        (a_uuid(), a_uuid(), a_host(), a_uuid()).prop_map(|(d, l, host, s)| Event::DeviceReleased(
            DeviceReleased {
                device_id: DeviceId(d),
                lineage_id: LineageId(l),
                host,
                server_id: ServerId(s),
                reason: ReleaseReason::Resized
            }
        )),
        (
            a_uuid(),
            proptest::option::of(a_host()),
            any::<bool>(),
            txt()
        )
            .prop_map(
                |(s, host, reported_by_agent, detail)| Event::ServerStateChanged(
                    ServerStateChanged {
                        server_id: ServerId(s),
                        host,
                        state: ServerState::Paused,
                        reported_by_agent,
                        detail
                    }
                )
            ),
        (
            a_uuid(),
            a_uuid(),
            a_uuid(),
            a_host(),
            a_host(),
            prop::collection::vec(an_assigned(), 0..3)
        )
            .prop_map(|(s, a, b, from_host, host, devices)| Event::ServerResized(
                ServerResized {
                    server_id: ServerId(s),
                    from_flavor: FlavorId(a),
                    to_flavor: FlavorId(b),
                    from_host,
                    host,
                    devices
                }
            )),
        (
            a_uuid(),
            "[A-Za-z0-9_-]{1,64}",
            proptest::option::of(".{0,40}")
        )
            .prop_map(|(s, n, description)| Event::ServerUpdated(ServerUpdated {
                server_id: ServerId(s),
                name: ServerName::new(n).unwrap(),
                description
            })),
        (a_uuid(), a_uuid(), a_host()).prop_map(|(s, f, from_host)| {
            Event::ServerResizeVerifying(ServerResizeVerifying {
                server_id: ServerId(s),
                from_flavor: FlavorId(f),
                from_host,
                devices: vec![],
            })
        }),
        a_uuid().prop_map(|s| Event::ServerResizeConfirmed(ServerResizeConfirmed {
            server_id: ServerId(s)
        })),
        a_uuid().prop_map(|s| Event::ServerResizeReverted(ServerResizeReverted {
            server_id: ServerId(s)
        })),
        (a_uuid(), proptest::option::of(txt())).prop_map(|(l, label)| Event::LineageLabeled(
            LineageLabeled {
                lineage_id: LineageId(l),
                label
            }
        )),
        (a_uuid(), any::<bool>(), txt()).prop_map(|(s, live, reason)| {
            Event::ServerMigrationRefused(ServerMigrationRefused {
                server_id: ServerId(s),
                live,
                reason,
            })
        }),
        (a_uuid(), proptest::option::of(a_host())).prop_map(|(s, host)| Event::ServerDeleted(
            ServerDeleted {
                server_id: ServerId(s),
                host
            }
        )),
        (a_uuid(), a_host()).prop_map(|(s, host)| Event::ServerActionRequested(
            ServerActionRequested {
                server_id: ServerId(s),
                host,
                action: ServerAction::Rebuild
            }
        )),
        (a_uuid(), a_host(), a_uuid(), txt()).prop_map(|(d, host, s, error)| {
            Event::DeviceAttachFailed(DeviceAttachFailed {
                device_id: DeviceId(d),
                host,
                server_id: ServerId(s),
                error,
            })
        }),
        (
            a_host(),
            any::<u16>(),
            any::<u16>(),
            txt(),
            prop::collection::vec(a_port(), 0..3)
        )
            .prop_map(
                |(host, v, p, serial, port_paths)| Event::DeviceClashDetected(
                    DeviceClashDetected {
                        host,
                        vendor_id: VendorId(v),
                        product_id: ProductId(p),
                        serial,
                        port_paths
                    }
                )
            ),
    ]
}

/// Origins of every kind, with any text (the constructors bound it).
pub fn any_origin() -> impl Strategy<Value = Origin> {
    (
        prop_oneof![Just(Via::Http), Just(Via::Nats), Just(Via::Policy)],
        ".{0,80}",
        proptest::option::of(".{0,80}"),
        proptest::option::of(".{0,200}"),
        proptest::option::of(".{0,80}"),
    )
        .prop_map(|(via, principal, address, client, request_id)| {
            let mut o = Origin::new(via, principal);
            if let Some(a) = address {
                o = o.with_address(a);
            }
            if let Some(c) = client {
                o = o.with_client(c);
            }
            if let Some(r) = request_id {
                o = o.with_request_id(r);
            }
            o
        })
}

/// Envelopes of both versions: without an origin (version 1) and with one (version 2).
pub fn any_envelope() -> impl Strategy<Value = Envelope> {
    (
        any_event(),
        a_uuid(),
        0i64..253_402_300_799_000_000,
        proptest::option::of(a_uuid()),
        proptest::option::of(a_uuid()),
        proptest::option::of(any_origin()),
    )
        .prop_map(|(body, e, t, c, k, o)| {
            let mut env = Envelope::at(EventId(e), Timestamp::from_micros(t), body);
            env.causation_id = c.map(EventId);
            env.correlation_id = k.map(CorrelationId);
            env.with_origin(o)
        })
}

/// The version-2 samples (ADR 0014): a command's events with an HTTP, a NATS and a policy
/// origin. Golden vectors `v2-{kind}.hex`.
pub fn sample_envelopes_v2() -> Vec<Envelope> {
    let envs = sample_envelopes();
    let pick = |kind: &str| {
        envs.iter()
            .find(|e| e.body.kind() == kind)
            .cloned()
            .expect("a sample")
    };
    vec![
        pick("DeviceClaimed").with_origin(Some(
            Origin::new(Via::Http, "token")
                .with_address("192.0.2.7:51234")
                .with_client("python-novaclient")
                .with_request_id("req-0190a000-0000-7000-8000-00000000004d"),
        )),
        pick("ServerBootRequested").with_origin(Some(Origin::new(
            Via::Nats,
            "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4",
        ))),
        pick("DeviceReleased").with_origin(Some(Origin::policy("reactor"))),
    ]
}
