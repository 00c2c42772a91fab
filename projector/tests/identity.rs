//! Labels, "where is it" and the custody ledger on a real redb view, over one scripted history:
//! a boot, a host reboot with re-attach, a resize to another device (confirmed), a delete, a
//! second server, an unplug. Folding is pure, so a view folded up to a sequence (what
//! `replay --until` builds) answers as the live view did then.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use usbpt_projector::{
    digest, BatchOptions, CustodyStart, FindError, FindQuery, HoldKind, QuarantineReason, RawEvent,
    Snapshot, View,
};
use usbpt_schemas::*;
use uuid::Uuid;

const KEY: (u16, u16) = (0x136b, 0x0003);
const SCANNER: (u16, u16) = (0x04a9, 0x31c0);

fn host() -> HostName {
    HostName::new("host-a").unwrap()
}
fn dev(n: u128) -> DeviceId {
    DeviceId(Uuid::from_u128(
        0x0190_0000_0000_7000_8000_0000_0000_0000 | n,
    ))
}
fn lineage((v, p): (u16, u16), serial: &str) -> LineageId {
    LineageId::derive(&LineageKey::Serial {
        vendor: VendorId(v),
        product: ProductId(p),
        serial,
    })
}
fn discovered(
    id: DeviceId,
    (v, p): (u16, u16),
    serial: &str,
    devnum: u16,
    supersedes: Option<DeviceId>,
) -> Event {
    Event::DeviceDiscoveredV2(DeviceDiscoveredV2 {
        fingerprint: fingerprint(serial),
        discovery: DeviceDiscovered {
            device_id: id,
            lineage_id: lineage((v, p), serial),
            lineage_kind: LineageKind::Serial,
            host: host(),
            boot_id: "boot".into(),
            descriptors: UsbDescriptors {
                address: UsbAddress::new(1, devnum).unwrap(),
                port_path: "1-1".parse().unwrap(),
                vendor_id: VendorId(v),
                product_id: ProductId(p),
                serial: Some(serial.into()),
                device_class: 0,
                interface_classes: vec![3],
                manufacturer: None,
                product: Some("key".into()),
                vendor_db: None,
                model_db: None,
                speed: None,
                usb_version: None,
            },
            syspath: "/sys/devices/x".into(),
            supersedes,
        },
    })
}

/// The same device reports the same descriptors: a fingerprint of its serial will do here.
fn fingerprint(serial: &str) -> Fingerprint {
    let s = serial.as_bytes();
    Fingerprint(std::array::from_fn(|i| s[i % s.len()] ^ i as u8))
}
fn invalidated(id: DeviceId, l: LineageId, reason: InvalidationReason) -> Event {
    Event::DeviceInvalidated(DeviceInvalidated {
        device_id: id,
        lineage_id: l,
        host: host(),
        reason,
        superseded_by: None,
    })
}
fn assigned(d: DeviceId, l: LineageId) -> AssignedDevice {
    AssignedDevice {
        request_index: 0,
        device_id: d,
        lineage_id: l,
        controller: ControllerModel::Ehci,
        follow: FollowPolicy::Lineage,
    }
}
fn claimed(d: DeviceId, l: LineageId, s: ServerId) -> Event {
    Event::DeviceClaimed(DeviceClaimed {
        device_id: d,
        lineage_id: l,
        host: host(),
        server_id: s,
        request_index: 0,
        controller: ControllerModel::Ehci,
        follow: FollowPolicy::Lineage,
    })
}
fn attached(d: DeviceId, l: LineageId, s: ServerId, devnum: u16) -> Event {
    Event::DeviceAttached(DeviceAttached {
        device_id: d,
        lineage_id: l,
        host: host(),
        server_id: s,
        address: UsbAddress::new(1, devnum).unwrap(),
        method: AttachMethod::DomainDefinition,
        detail: String::new(),
    })
}
fn released(d: DeviceId, l: LineageId, s: ServerId, reason: ReleaseReason) -> Event {
    Event::DeviceReleased(DeviceReleased {
        device_id: d,
        lineage_id: l,
        host: host(),
        server_id: s,
        reason,
    })
}
fn labeled(l: LineageId, label: Option<&str>) -> Event {
    Event::LineageLabeled(LineageLabeled {
        lineage_id: l,
        label: label.map(str::to_owned),
    })
}

struct Story {
    events: Vec<RawEvent>,
    key: LineageId,
    scanner: LineageId,
    s1: ServerId,
    s2: ServerId,
}

/// Who asked for the command events of the story (ADR 0014): erp-1's boot over HTTP, its resize
/// over NATS by the admin identity, the resize's confirmation by the auto-confirm policy,
/// erp-1's delete over HTTP, erp-2's boot over NATS. Agents' events carry none.
fn http() -> Origin {
    Origin::new(Via::Http, "token")
        .with_address("192.0.2.9:50000")
        .with_client("openstack")
        .with_request_id("req-0190a000-0000-7000-8000-000000000005")
}
const ADMIN_KEY: &str = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4";
fn nats() -> Origin {
    Origin::new(Via::Nats, ADMIN_KEY)
}
fn origin_of(seq: u64) -> Option<Origin> {
    match seq {
        5..=7 | 20..=21 => Some(http()),
        14..=15 | 22..=24 => Some(nats()),
        18..=19 => Some(Origin::policy("auto-confirm")),
        _ => None,
    }
}

/// The scripted history; sequence numbers are the positions (1-based) noted beside each event.
fn story() -> Story {
    let key = lineage(KEY, "KEY-A");
    let scanner = lineage(SCANNER, "SCAN-1");
    let (s1, s2) = (ServerId(Uuid::from_u128(31)), ServerId(Uuid::from_u128(32)));
    let (f1, f2) = (FlavorId(Uuid::from_u128(41)), FlavorId(Uuid::from_u128(42)));
    let flavor = |id, name: &str, l| {
        Event::FlavorCreated(FlavorCreated {
            flavor_id: id,
            name: FlavorName::new(name).unwrap(),
            usb: vec![UsbRequest {
                selector: DeviceSelector::Lineage(l),
                controller: ControllerModel::Ehci,
                follow: FollowPolicy::Lineage,
            }],
        })
    };
    let boot = |s, name: &str| {
        Event::ServerBootRequested(ServerBootRequested {
            server_id: s,
            name: ServerName::new(name).unwrap(),
            flavor_id: f1,
            requested_host: None,
        })
    };
    let scheduled = |s, d| {
        Event::ServerScheduled(ServerScheduled {
            server_id: s,
            host: host(),
            flavor_id: f1,
            devices: vec![assigned(d, key)],
        })
    };
    let bodies = vec![
        discovered(dev(1), KEY, "KEY-A", 5, None),      // 1
        discovered(dev(2), SCANNER, "SCAN-1", 6, None), // 2
        flavor(f1, "with-key", key),                    // 3
        flavor(f2, "with-scanner", scanner),            // 4
        boot(s1, "erp-1"),                              // 5
        claimed(dev(1), key, s1),                       // 6  boot claims the key
        scheduled(s1, dev(1)),                          // 7
        attached(dev(1), key, s1, 5),                   // 8
        invalidated(dev(1), key, InvalidationReason::HostRebooted), // 9  host reboots
        invalidated(dev(2), scanner, InvalidationReason::HostRebooted), // 10
        discovered(dev(3), KEY, "KEY-A", 7, Some(dev(1))), // 11 followed by the claim
        discovered(dev(4), SCANNER, "SCAN-1", 8, Some(dev(2))), // 12
        Event::DeviceReattached(DeviceReattached {
            server_id: s1,
            host: host(),
            lineage_id: key,
            old_device_id: dev(1),
            new_device_id: dev(3),
            address: UsbAddress::new(1, 7).unwrap(),
            method: AttachMethod::HotPlug,
            detail: String::new(),
        }), // 13
        claimed(dev(4), scanner, s1),                   // 14 resize to the scanner's flavor
        Event::ServerResized(ServerResized {
            server_id: s1,
            from_flavor: f1,
            to_flavor: f2,
            from_host: host(),
            host: host(),
            devices: vec![assigned(dev(4), scanner)],
        }), // 15
        Event::ServerResizeVerifying(ServerResizeVerifying {
            server_id: s1,
            from_flavor: f1,
            from_host: host(),
            devices: vec![assigned(dev(3), key)],
        }), // 16
        attached(dev(4), scanner, s1, 8),               // 17
        Event::ServerResizeConfirmed(ServerResizeConfirmed { server_id: s1 }), // 18
        released(dev(3), key, s1, ReleaseReason::Resized), // 19
        Event::ServerDeleted(ServerDeleted {
            server_id: s1,
            host: Some(host()),
        }), // 20
        released(dev(4), scanner, s1, ReleaseReason::ServerDeleted), // 21
        boot(s2, "erp-2"),                              // 22
        claimed(dev(3), key, s2),                       // 23
        scheduled(s2, dev(3)),                          // 24
        attached(dev(3), key, s2, 7),                   // 25
        labeled(key, Some("ERP key #3")),               // 26
        labeled(scanner, Some("Scanner")),              // 27
        labeled(scanner, None),                         // 28 removed
        labeled(scanner, Some("Front desk scanner")),   // 29
        labeled(key, Some("bad\u{1b}[2J")),             // 30 quarantined
        labeled(lineage(KEY, "NEVER-SEEN"), Some("ghost")), // 31 quarantined
        invalidated(dev(4), scanner, InvalidationReason::Unplugged), // 32 the scanner leaves
    ];
    let events = bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            let seq = i as u64 + 1;
            let env = Envelope::at(
                EventId(Uuid::from_u128(10_000 + u128::from(seq))),
                Timestamp::from_micros(
                    1_764_000_000_000_000 + i64::try_from(seq).unwrap() * 1_000_000,
                ),
                body,
            )
            .with_origin(origin_of(seq));
            RawEvent {
                seq,
                subject: subjects::for_event(&env),
                payload: Bytes::from(codec::encode(&env).unwrap()),
            }
        })
        .collect();
    Story {
        events,
        key,
        scanner,
        s1,
        s2,
    }
}

fn fold(dir: &tempfile::TempDir, name: &str, events: &[RawEvent], batch: usize) -> View {
    let view = View::open(dir.path().join(name)).unwrap();
    for chunk in events.chunks(batch) {
        let r = view.apply_batch(chunk, &BatchOptions::default()).unwrap();
        assert_eq!(r.gap, None);
    }
    view
}

/// An interval in brief: server, why it started, from, to, why it ended, enumerations.
type Brief = (
    ServerId,
    CustodyStart,
    u64,
    Option<u64>,
    Option<ReleaseReason>,
    Vec<DeviceId>,
);

fn seqs(snap: &Snapshot, l: LineageId) -> Vec<Brief> {
    snap.custody(&l)
        .unwrap()
        .into_iter()
        .map(|i| {
            (
                i.server_id,
                i.started,
                i.from.seq,
                i.to.map(|t| t.seq),
                i.ended,
                i.segments.iter().map(|g| g.device_id).collect(),
            )
        })
        .collect()
}

#[test]
fn the_custody_ledger_lists_exactly_the_intervals_of_the_story() {
    let dir = tempfile::tempdir().unwrap();
    let st = story();
    let view = fold(&dir, "live.redb", &st.events, 1000);
    let snap = view.snapshot().unwrap();
    let q: Vec<_> = snap
        .quarantine(0, 10)
        .unwrap()
        .iter()
        .map(|q| (q.seq, q.reason))
        .collect();
    assert_eq!(
        q,
        vec![
            (30, QuarantineReason::Undecodable),
            (31, QuarantineReason::UnknownDevice)
        ]
    );
    // The key: held by erp-1 from its boot across the reboot (two enumerations), released by
    // the confirmed resize; then held by erp-2 from its boot, still.
    assert_eq!(
        seqs(&snap, st.key),
        vec![
            (
                st.s1,
                CustodyStart::Boot,
                6,
                Some(19),
                Some(ReleaseReason::Resized),
                vec![dev(1), dev(3)]
            ),
            (st.s2, CustodyStart::Boot, 23, None, None, vec![dev(3)]),
        ]
    );
    let first = &snap.custody(&st.key).unwrap()[0];
    assert_eq!(
        first.server_name.as_ref().map(|n| n.as_str()),
        Some("erp-1")
    );
    assert_eq!(
        first
            .segments
            .iter()
            .map(|g| (
                g.how,
                g.from.seq,
                g.attached.map(|a| a.seq),
                g.to.map(|t| t.seq),
                g.invalidation
            ))
            .collect::<Vec<_>>(),
        vec![
            (
                HoldKind::Claimed,
                6,
                Some(8),
                Some(13),
                Some(InvalidationReason::HostRebooted)
            ),
            (HoldKind::Followed, 11, Some(13), Some(19), None),
        ]
    );
    // Who asked: erp-1's HTTP boot began the key's first interval, the auto-confirm of its
    // resize ended it; the admin's NATS boot of erp-2 began the second, still open.
    let who: Vec<_> = snap
        .custody(&st.key)
        .unwrap()
        .into_iter()
        .map(|i| (i.started_by, i.ended_by))
        .collect();
    assert_eq!(
        who,
        vec![
            (Some(http()), Some(Origin::policy("auto-confirm"))),
            (Some(nats()), None),
        ]
    );
    let scanner = &snap.custody(&st.scanner).unwrap()[0];
    assert_eq!(
        (scanner.started_by.clone(), scanner.ended_by.clone()),
        (Some(nats()), Some(http())),
        "the resize (NATS) began it, the delete (HTTP) ended it"
    );
    // The scanner: held by erp-1 from its resize until the server was deleted.
    assert_eq!(
        seqs(&snap, st.scanner),
        vec![(
            st.s1,
            CustodyStart::Resize,
            14,
            Some(21),
            Some(ReleaseReason::ServerDeleted),
            vec![dev(4)]
        )]
    );
    // A window: only intervals overlapping it.
    let at = |seq: i64| Timestamp::from_micros(1_764_000_000_000_000 + seq * 1_000_000);
    let ledger = snap.custody(&st.key).unwrap();
    let since_20: Vec<_> = ledger
        .iter()
        .filter(|i| i.overlaps(Some(at(20)), None))
        .map(|i| i.server_id)
        .collect();
    assert_eq!(since_20, vec![st.s2]);
    let until_10: Vec<_> = ledger
        .iter()
        .filter(|i| i.overlaps(None, Some(at(10))))
        .map(|i| i.server_id)
        .collect();
    assert_eq!(until_10, vec![st.s1]);

    // Replayed up to seq 16 (the resize awaits confirmation): the ledger as it was then.
    let then = fold(&dir, "until16.redb", &st.events[..16], 4);
    let then = then.snapshot().unwrap();
    assert_eq!(
        seqs(&then, st.key),
        vec![(
            st.s1,
            CustodyStart::Boot,
            6,
            None,
            None,
            vec![dev(1), dev(3)]
        )]
    );
    assert_eq!(
        seqs(&then, st.scanner),
        vec![(st.s1, CustodyStart::Resize, 14, None, None, vec![dev(4)])]
    );
    let then_key = &then.custody(&st.key).unwrap()[0];
    assert_eq!(
        (then_key.started_by.clone(), then_key.ended_by.clone()),
        (Some(http()), None),
        "open then: started by the boot, not yet ended"
    );
}

#[test]
fn labels_fold_as_history_and_a_replay_gives_the_same_view() {
    let dir = tempfile::tempdir().unwrap();
    let st = story();
    let live = fold(&dir, "live.redb", &st.events, 1000);
    let replayed = fold(&dir, "replay.redb", &st.events, 3);
    let (a, b) = (live.snapshot().unwrap(), replayed.snapshot().unwrap());
    assert_eq!(digest::digest(&a).unwrap(), digest::digest(&b).unwrap());
    let key = a.lineage(&st.key).unwrap().unwrap();
    // The invalid label (seq 30) changed nothing.
    assert_eq!(key.label.as_deref(), Some("ERP key #3"));
    assert_eq!(key.label_changed.map(|s| s.seq), Some(26));
    let scanner = a.lineage(&st.scanner).unwrap().unwrap();
    assert_eq!(scanner.label.as_deref(), Some("Front desk scanner"));
    assert_eq!(a.lineages_labeled("ERP key #3").unwrap(), vec![st.key]);
    // At seq 28 the scanner's label was removed.
    let then = fold(&dir, "until28.redb", &st.events[..28], 1000);
    let then = then.snapshot().unwrap();
    assert_eq!(then.lineage(&st.scanner).unwrap().unwrap().label, None);
    assert_eq!(
        then.lineage(&st.scanner)
            .unwrap()
            .unwrap()
            .label_changed
            .map(|s| s.seq),
        Some(28)
    );
}

#[test]
fn find_answers_by_serial_vendor_product_and_label_including_gone_devices() {
    let dir = tempfile::tempdir().unwrap();
    let st = story();
    let view = fold(&dir, "live.redb", &st.events, 1000);
    let snap = view.snapshot().unwrap();
    let find = |q: FindQuery| -> Vec<(LineageId, bool, DeviceId, Option<ServerId>, u64)> {
        snap.find(&q)
            .unwrap()
            .into_iter()
            .map(|f| {
                (
                    f.lineage.id,
                    f.present(),
                    f.current.id(),
                    f.current.holder,
                    f.last_seen.seq,
                )
            })
            .collect()
    };
    // Present: the key, on host-a as its third enumeration, held by erp-2; last seen with the
    // host's last event (seq 32, the scanner's unplug on the same host).
    let key_here = (st.key, true, dev(3), Some(st.s2), 32);
    assert_eq!(
        find(FindQuery {
            serial: Some("KEY-A".into()),
            ..FindQuery::default()
        }),
        vec![key_here]
    );
    assert_eq!(
        find(FindQuery {
            vendor: Some(VendorId(KEY.0)),
            product: Some(ProductId(KEY.1)),
            ..FindQuery::default()
        }),
        vec![key_here]
    );
    assert_eq!(
        find(FindQuery {
            label: Some("erp KEY".into()),
            ..FindQuery::default()
        }),
        vec![key_here]
    );
    // Gone: the scanner, at its last known place, last seen when it was unplugged.
    let scanner_gone = (st.scanner, false, dev(4), None, 32);
    assert_eq!(
        find(FindQuery {
            vendor: Some(VendorId(SCANNER.0)),
            ..FindQuery::default()
        }),
        vec![scanner_gone]
    );
    assert_eq!(
        find(FindQuery {
            label: Some("scanner".into()),
            serial: Some("SCAN-1".into()),
            ..FindQuery::default()
        }),
        vec![scanner_gone]
    );
    // Every key must match; present devices come first.
    assert_eq!(
        find(FindQuery {
            serial: Some("KEY-A".into()),
            label: Some("scanner".into()),
            ..FindQuery::default()
        }),
        vec![]
    );
    let both = find(FindQuery {
        label: Some("e".into()),
        ..FindQuery::default()
    });
    assert_eq!(both, vec![key_here, scanner_gone]);
    assert!(matches!(
        snap.find(&FindQuery::default()),
        Err(FindError::NoKey)
    ));
    // By fingerprint: whole, or a prefix of at least 8 characters; a shorter one is refused.
    let key_fp = fingerprint("KEY-A").to_base64();
    for given in [key_fp.clone(), key_fp[..8].to_owned()] {
        assert_eq!(
            find(FindQuery {
                fingerprint: Some(given),
                ..FindQuery::default()
            }),
            vec![key_here]
        );
    }
    assert_eq!(
        find(FindQuery {
            fingerprint: Some(fingerprint("SCAN-1").to_base64()),
            serial: Some("KEY-A".into()),
            ..FindQuery::default()
        }),
        vec![]
    );
    let by_fingerprint = FindQuery {
        fingerprint: Some("ab12".into()),
        ..FindQuery::default()
    };
    let err = snap.find(&by_fingerprint).unwrap_err();
    assert!(matches!(err, FindError::FingerprintTooShort));
    assert!(err.to_string().starts_with("fingerprint: "), "{err}");
}
