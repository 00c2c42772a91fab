//! The executor against libvirt's real test driver (`test:///…/node.xml`, generated per test),
//! with `virt-xml-validate` run on every domain XML it generates.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod libvirt_support;

use libvirt_support::*;
use usbpt_libvirt::inspect::observe_domain;
use usbpt_libvirt::{domain_name, Executor, ExecutorConfig, ExecutorError, FailureKind};
use usbpt_schemas::{
    AttachMethod, ControllerModel, Envelope, Event, FlavorId, FollowPolicy, HostName,
    ServerDeleted, ServerScheduled, ServerState,
};

fn scheduled(
    host: &HostName,
    server: usbpt_schemas::ServerId,
    devices: Vec<usbpt_schemas::AssignedDevice>,
) -> Envelope {
    Envelope::new(Event::ServerScheduled(ServerScheduled {
        server_id: server,
        host: host.clone(),
        flavor_id: FlavorId::new_v7(),
        devices,
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_with_devices_on_each_controller_model() {
    tokio::time::timeout(LIMIT, async {
        // Every model at its full port count, then all three mixed in one domain.
        let cases: Vec<(ControllerModel, u16)> = vec![
            (ControllerModel::Uhci, 2),
            (ControllerModel::Ehci, 6),
            (ControllerModel::Xhci, 15),
        ];
        let devs: Vec<Dev> = (0..40).map(dev).collect();
        let h = host("host-b", &devs).await;
        let lookup = Devices::with(&devs);
        let mut next = 0usize;
        let mut take = |n: usize| {
            let s = &devs[next..next + n];
            next += n;
            s.to_vec()
        };
        let mut servers = Vec::new();
        for (model, n) in &cases {
            servers.push((vec![*model], take(usize::from(*n)), *model));
        }
        let mix = take(3);
        for (models, ds, _) in servers.iter().chain(std::iter::once(&(
            vec![
                ControllerModel::Xhci,
                ControllerModel::Uhci,
                ControllerModel::Ehci,
            ],
            mix.clone(),
            ControllerModel::Xhci,
        ))) {
            let server = server();
            let assigned: Vec<_> = ds
                .iter()
                .zip(models.iter().cycle())
                .map(|(d, m)| assigned(d, *m, FollowPolicy::Lineage))
                .collect();
            let events = h
                .exec
                .handle(&scheduled(&h.host, server, assigned.clone()), &lookup)
                .await;
            assert_eq!(count(&events, "DeviceAttached"), ds.len(), "{events:#?}");
            for e in &events {
                if let Event::DeviceAttached(a) = e {
                    assert_eq!(a.method, AttachMethod::DomainDefinition);
                    assert_eq!(a.host, h.host);
                    assert_eq!(a.server_id, server);
                    let d = ds
                        .iter()
                        .find(|d| d.id == a.device_id)
                        .expect("one of ours");
                    assert_eq!(a.address, d.info.address);
                    assert_eq!(a.lineage_id, d.lineage);
                }
            }
            let (state, detail) = state_of(&events);
            assert_eq!(state, ServerState::Active, "{detail}");
            assert!(detail.contains("started"), "{detail}");

            // What libvirt holds (live): our controllers, our hostdevs at the current addresses.
            let live = h.exec.domain_xml(server, false).await.expect("live xml");
            assert!(live.contains(&format!("<name>{}</name>", domain_name(&server))));
            let o = observe_domain(&live).expect("parse");
            let mut want_models: Vec<&str> = models.iter().map(|m| m.libvirt_model()).collect();
            want_models.sort();
            want_models.dedup();
            let mut got_models: Vec<&str> = o
                .controllers
                .iter()
                .filter_map(|c| c.model.as_deref())
                .collect();
            got_models.sort();
            assert_eq!(got_models, want_models);
            assert_eq!(o.hostdevs.len(), ds.len());
            for (d, hd) in ds.iter().zip(&o.hostdevs) {
                assert_eq!(hd.host_bus, Some(u32::from(d.info.address.bus())));
                assert_eq!(hd.host_device, Some(u32::from(d.info.address.devnum())));
                assert_eq!(hd.product, Some(d.info.product.value()));
                assert_eq!(
                    hd.startup_policy, None,
                    "follow=lineage and present: mandatory"
                );
            }
            // Ports are distinct per controller.
            let mut slots: Vec<_> = o
                .hostdevs
                .iter()
                .map(|h| (h.guest_bus, h.guest_port.clone()))
                .collect();
            slots.sort();
            slots.dedup();
            assert_eq!(slots.len(), ds.len());
        }
        assert_eq!(
            h.validator.validated(),
            4,
            "every generated domain XML was validated"
        );
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_controller_is_refused_before_libvirt() {
    tokio::time::timeout(LIMIT, async {
        let devs: Vec<Dev> = (0..3).map(dev).collect();
        let h = host("host-a", &devs).await;
        let server = server();
        let assigned: Vec<_> = devs
            .iter()
            .map(|d| assigned(d, ControllerModel::Uhci, FollowPolicy::Lineage))
            .collect();
        let events = h
            .exec
            .handle(&scheduled(&h.host, server, assigned), &Devices::with(&devs))
            .await;
        let (state, detail) = state_of(&events);
        assert_eq!(state, ServerState::Error);
        assert!(
            detail.contains("uhci (piix3-uhci) has 2 ports") && detail.contains("needs 3 devices"),
            "{detail}"
        );
        assert_eq!(count(&events, "DeviceAttachFailed"), 3);
        assert_eq!(count(&events, "DeviceAttached"), 0);
        // libvirt never saw it: no domain, and nothing was even validated.
        let err = h.exec.observe(server).await.expect_err("no domain");
        assert_eq!(err.libvirt_kind(), Some(FailureKind::NoDomain), "{err}");
        assert_eq!(h.validator.validated(), 0);
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reenumerated_device_is_reattached_by_redefinition_on_the_test_driver() {
    tokio::time::timeout(LIMIT, async {
        let key = dev(1);
        let other = dev(2);
        let h = host("host-b", &[key, other]).await;
        let mut lookup = Devices::with(&[key, other]);
        let server = server();
        let events = h
            .exec
            .handle(
                &scheduled(
                    &h.host,
                    server,
                    vec![
                        assigned(&other, ControllerModel::Xhci, FollowPolicy::Lineage),
                        assigned(&key, ControllerModel::Xhci, FollowPolicy::Lineage),
                    ],
                ),
                &lookup,
            )
            .await;
        assert_eq!(state_of(&events).0, ServerState::Active);
        let before =
            observe_domain(&h.exec.domain_xml(server, false).await.expect("xml")).expect("parse");
        let key_port = before.hostdevs[1].guest_port.clone();

        // The host rebooted: the key is a new enumeration of the same lineage at a new devnum.
        let mut new_key = key;
        new_key.id = usbpt_schemas::DeviceId::new_v7();
        new_key.info.address = usbpt_schemas::UsbAddress::new(3, 9).expect("valid");
        lookup.map.insert(new_key.id, new_key.info);

        let events = h
            .exec
            .reattach_lineage(key.lineage, new_key.id, new_key.info)
            .await;
        assert_eq!(events.len(), 1, "{events:#?}");
        let Event::DeviceReattached(r) = &events[0] else {
            panic!("{events:#?}")
        };
        assert_eq!(r.method, AttachMethod::Redefined);
        assert_eq!((r.old_device_id, r.new_device_id), (key.id, new_key.id));
        assert_eq!(r.lineage_id, key.lineage);
        assert_eq!(r.address, new_key.info.address);
        assert_eq!(r.host, h.host);
        assert!(r.detail.contains("cannot hot attach"), "{}", r.detail);
        assert!(
            r.detail.contains("not supported by the connection driver"),
            "libvirt's reason: {}",
            r.detail
        );
        assert!(
            r.detail.contains("redefined with the same uuid"),
            "{}",
            r.detail
        );

        // Persistent definition: new address, same controller port; live domain: still the old.
        let inactive =
            observe_domain(&h.exec.domain_xml(server, true).await.expect("xml")).expect("parse");
        assert_eq!(
            (
                inactive.hostdevs[1].host_bus,
                inactive.hostdevs[1].host_device
            ),
            (Some(3), Some(9))
        );
        assert_eq!(inactive.hostdevs[1].guest_port, key_port, "same guest port");
        assert_eq!(
            inactive.hostdevs[0], before.hostdevs[0],
            "the other device is untouched"
        );
        let live =
            observe_domain(&h.exec.domain_xml(server, false).await.expect("xml")).expect("parse");
        assert_eq!(
            live.hostdevs[1].host_device,
            Some(u32::from(key.info.address.devnum()))
        );
        let spec = h.exec.spec(server).await.expect("metadata");
        assert_eq!(
            spec.device_of_lineage(&key.lineage).map(|d| d.device_id),
            Some(new_key.id)
        );

        // After a restart the running domain has it.
        let stop = h
            .exec
            .action(server, usbpt_schemas::ServerAction::Stop, &lookup)
            .await;
        assert_eq!(state_of(&stop).0, ServerState::Shutoff);
        let start = h
            .exec
            .action(server, usbpt_schemas::ServerAction::Start, &lookup)
            .await;
        assert_eq!(state_of(&start).0, ServerState::Active);
        let live =
            observe_domain(&h.exec.domain_xml(server, false).await.expect("xml")).expect("parse");
        assert_eq!(
            (live.hostdevs[1].host_bus, live.hostdevs[1].host_device),
            (Some(3), Some(9))
        );

        // Idempotent: the same re-attach again changes nothing and reports nothing.
        assert!(h
            .exec
            .reattach(server, key.lineage, new_key.id, new_key.info)
            .await
            .is_empty());
        // While shut off, a re-attach is a plain redefinition.
        h.exec
            .action(server, usbpt_schemas::ServerAction::Stop, &lookup)
            .await;
        let mut third = new_key;
        third.id = usbpt_schemas::DeviceId::new_v7();
        third.info.address = usbpt_schemas::UsbAddress::new(3, 10).expect("valid");
        let ev = h
            .exec
            .reattach(server, key.lineage, third.id, third.info)
            .await;
        let Some(Event::DeviceReattached(r)) = ev.first() else {
            panic!("{ev:#?}")
        };
        assert_eq!(r.method, AttachMethod::Redefined);
        assert!(r.detail.contains("not running"), "{}", r.detail);
        // Every document was validated: boot, two re-attaches, and the definitions written
        // before start (devices as they are now, running="yes") and stop (running="no").
        assert_eq!(h.validator.validated(), 6);
    })
    .await
    .expect("bounded");
}

/// ADR 0011's hold: a lineage that comes back with another fingerprint is not re-attached on the
/// agent's own initiative; `FingerprintAccepted` for this host re-attaches it and records the
/// new fingerprint in the domain's metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_fingerprint_holds_the_reattach_until_accepted() {
    tokio::time::timeout(LIMIT, async {
        let a = usbpt_schemas::Fingerprint([0xa; 32]);
        let b = usbpt_schemas::Fingerprint([0xb; 32]);
        let mut key = dev(1);
        key.info.fingerprint = Some(a);
        let h = host("host-fp", &[key]).await;
        let mut lookup = Devices::with(&[key]);
        let server = server();
        let events = h
            .exec
            .handle(
                &scheduled(
                    &h.host,
                    server,
                    vec![assigned(&key, ControllerModel::Xhci, FollowPolicy::Lineage)],
                ),
                &lookup,
            )
            .await;
        assert_eq!(state_of(&events).0, ServerState::Active);
        let spec = h.exec.spec(server).await.expect("metadata");
        assert_eq!(
            spec.device_of_lineage(&key.lineage)
                .and_then(|d| d.fingerprint),
            Some(a),
            "the definition records the fingerprint the server was given"
        );
        let inactive_before = h.exec.domain_xml(server, true).await.expect("xml");
        assert!(
            inactive_before.contains(&a.to_base64()),
            "{inactive_before}"
        );

        // Re-enumerated with fingerprint B: held, nothing changes in the domain.
        let mut spoof = key;
        spoof.id = usbpt_schemas::DeviceId::new_v7();
        spoof.info.address = usbpt_schemas::UsbAddress::new(3, 9).expect("valid");
        spoof.info.fingerprint = Some(b);
        lookup.map.insert(spoof.id, spoof.info);
        let events = h
            .exec
            .reattach_lineage(key.lineage, spoof.id, spoof.info)
            .await;
        assert_eq!(
            events,
            vec![Event::DeviceReattachHeld(
                usbpt_schemas::DeviceReattachHeld {
                    host: h.host.clone(),
                    server_id: server,
                    lineage_id: key.lineage,
                    device_id: spoof.id,
                    expected: a,
                    seen: b,
                }
            )]
        );
        assert_eq!(
            h.exec.domain_xml(server, true).await.expect("xml"),
            inactive_before,
            "a held re-attach leaves the definition as it was"
        );
        let spec = h.exec.spec(server).await.expect("metadata");
        let held = spec
            .device_of_lineage(&key.lineage)
            .expect("the lineage stays");
        assert_eq!((held.device_id, held.fingerprint), (key.id, Some(a)));

        // Accepted: FingerprintAccepted routed to this host is re-attach work.
        let accept = Envelope::new(Event::FingerprintAccepted(
            usbpt_schemas::FingerprintAccepted {
                lineage_id: key.lineage,
                fingerprint: b,
                device_id: Some(spoof.id),
                host: Some(h.host.clone()),
                server_id: Some(server),
                by_policy: false,
            },
        ));
        let events = h.exec.handle(&accept, &lookup).await;
        let [Event::DeviceReattached(r)] = events.as_slice() else {
            panic!("{events:#?}")
        };
        assert_eq!((r.old_device_id, r.new_device_id), (key.id, spoof.id));
        assert_eq!(r.address, spoof.info.address);
        let spec = h.exec.spec(server).await.expect("metadata");
        let now = spec.device_of_lineage(&key.lineage).expect("the lineage");
        assert_eq!((now.device_id, now.fingerprint), (spoof.id, Some(b)));
        let inactive =
            observe_domain(&h.exec.domain_xml(server, true).await.expect("xml")).expect("parse");
        assert_eq!(
            (
                inactive.hostdevs[0].host_bus,
                inactive.hostdevs[0].host_device
            ),
            (Some(3), Some(9))
        );
        // Redelivered: nothing more to do.
        assert!(h.exec.handle(&accept, &lookup).await.is_empty());

        // An accept for an enumeration that has gone again: a failed attach naming why, and
        // the domain untouched.
        let mut gone = spoof;
        gone.id = usbpt_schemas::DeviceId::new_v7();
        gone.info.present = false;
        lookup.map.insert(gone.id, gone.info);
        let late = Envelope::new(Event::FingerprintAccepted(
            usbpt_schemas::FingerprintAccepted {
                lineage_id: key.lineage,
                fingerprint: a,
                device_id: Some(gone.id),
                host: Some(h.host.clone()),
                server_id: Some(server),
                by_policy: true,
            },
        ));
        let events = h.exec.handle(&late, &lookup).await;
        let [Event::DeviceAttachFailed(f)] = events.as_slice() else {
            panic!("{events:#?}")
        };
        assert_eq!((f.server_id, f.device_id), (server, gone.id));
        assert!(f.error.contains("no longer present"), "{}", f.error);
        let spec = h.exec.spec(server).await.expect("metadata");
        let still = spec.device_of_lineage(&key.lineage).expect("the lineage");
        assert_eq!((still.device_id, still.fingerprint), (spoof.id, Some(b)));
    })
    .await
    .expect("bounded");
}

/// Domains without a recorded fingerprint (defined before it was recorded, or descriptors
/// unreadable) re-attach as before, and then record the new enumeration's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fingerprint_reattaches_as_before() {
    tokio::time::timeout(LIMIT, async {
        let key = dev(1); // no fingerprint
        let h = host("host-nofp", &[key]).await;
        let mut lookup = Devices::with(&[key]);
        let server = server();
        let events = h
            .exec
            .handle(
                &scheduled(
                    &h.host,
                    server,
                    vec![assigned(&key, ControllerModel::Xhci, FollowPolicy::Lineage)],
                ),
                &lookup,
            )
            .await;
        assert_eq!(state_of(&events).0, ServerState::Active);
        let xml = h.exec.domain_xml(server, true).await.expect("xml");
        assert!(!xml.contains("fingerprint="), "{xml}");
        let mut next = key;
        next.id = usbpt_schemas::DeviceId::new_v7();
        next.info.fingerprint = Some(usbpt_schemas::Fingerprint([0xb; 32]));
        lookup.map.insert(next.id, next.info);
        let events = h
            .exec
            .reattach_lineage(key.lineage, next.id, next.info)
            .await;
        assert!(
            matches!(events.as_slice(), [Event::DeviceReattached(r)] if r.new_device_id == next.id),
            "{events:#?}"
        );
        let spec = h.exec.spec(server).await.expect("metadata");
        assert_eq!(
            spec.device_of_lineage(&key.lineage)
                .and_then(|d| d.fingerprint),
            next.info.fingerprint
        );
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_bindings_are_optional_and_not_followed() {
    tokio::time::timeout(LIMIT, async {
        let key = dev(1);
        let mut gone = dev(2);
        gone.info.present = false;
        let h = host("host-b", &[key]).await;
        let lookup = Devices::with(&[key, gone]);
        let server = server();
        let events = h
            .exec
            .handle(
                &scheduled(
                    &h.host,
                    server,
                    vec![
                        assigned(&key, ControllerModel::Ehci, FollowPolicy::Strict),
                        assigned(&gone, ControllerModel::Ehci, FollowPolicy::Lineage),
                    ],
                ),
                &lookup,
            )
            .await;
        assert_eq!(state_of(&events).0, ServerState::Active);
        assert_eq!(count(&events, "DeviceAttached"), 1);
        let failed: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::DeviceAttachFailed(f) => Some(f),
                _ => None,
            })
            .collect();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].device_id, gone.id);
        assert!(
            failed[0].error.contains("startupPolicy=optional"),
            "{}",
            failed[0].error
        );
        let o =
            observe_domain(&h.exec.domain_xml(server, true).await.expect("xml")).expect("parse");
        let policies: Vec<_> = o
            .hostdevs
            .iter()
            .map(|h| h.startup_policy.as_deref())
            .collect();
        assert_eq!(policies, vec![Some("optional"), Some("optional")]);

        // A strict binding does not follow its lineage: nothing is re-attached.
        let mut new_key = key;
        new_key.id = usbpt_schemas::DeviceId::new_v7();
        assert!(h
            .exec
            .reattach_lineage(key.lineage, new_key.id, new_key.info)
            .await
            .is_empty());
        assert_eq!(
            h.exec
                .spec(server)
                .await
                .expect("spec")
                .device_of_lineage(&key.lineage)
                .map(|d| d.device_id),
            Some(key.id)
        );
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_lifecycle_action_reports_the_resulting_state() {
    use usbpt_schemas::ServerAction::*;
    tokio::time::timeout(LIMIT, async {
        let key = dev(1);
        let h = host("host-b", &[key]).await;
        let mut lookup = Devices::with(&[key]);
        let server = server();
        lookup.names.insert(
            server,
            usbpt_schemas::ServerName::new("web-1").expect("name"),
        );
        let boot = h
            .exec
            .handle(
                &scheduled(
                    &h.host,
                    server,
                    vec![assigned(&key, ControllerModel::Xhci, FollowPolicy::Lineage)],
                ),
                &lookup,
            )
            .await;
        assert_eq!(state_of(&boot).0, ServerState::Active);
        assert!(h
            .exec
            .domain_xml(server, true)
            .await
            .expect("xml")
            .contains("<title>web-1</title>"));

        let steps: Vec<(usbpt_schemas::ServerAction, ServerState, &str)> = vec![
            (Pause, ServerState::Paused, "paused"),
            (Pause, ServerState::Paused, "already paused"),
            (Unpause, ServerState::Active, "resumed"),
            (Unpause, ServerState::Active, "already running"),
            (Reboot, ServerState::Active, "rebooted"),
            (Stop, ServerState::Shutoff, "shut down"),
            (Stop, ServerState::Shutoff, "already shut off"),
            (Reboot, ServerState::Active, "was shut off; started"),
            (Suspend, ServerState::Suspended, "managed save"),
            (Suspend, ServerState::Suspended, "already suspended"),
            (
                Resume,
                ServerState::Active,
                "restored from the managed save image",
            ),
            (Suspend, ServerState::Suspended, "managed save"),
            (
                Start,
                ServerState::Active,
                "restored from the managed save image",
            ),
            (Start, ServerState::Active, "already running"),
            (Pause, ServerState::Paused, "paused"),
            (Resume, ServerState::Active, "resumed"),
            (Pause, ServerState::Paused, "paused"),
            (
                Stop,
                ServerState::Shutoff,
                "destroyed (a paused guest cannot shut down)",
            ),
            (Start, ServerState::Active, "started"),
        ];
        for (action, want, words) in steps {
            let events = h.exec.action(server, action, &lookup).await;
            let (state, detail) = state_of(&events);
            assert_eq!(state, want, "{action:?}: {detail}");
            assert!(detail.contains(words), "{action:?}: {detail}");
            assert!(detail.starts_with(action.as_str()), "{detail}");
            let observed = h.exec.observe(server).await.expect("observe");
            assert_eq!(observed.state, want, "libvirt agrees after {action:?}");
        }

        // Rebuild picks up the device's current address.
        let moved = usbpt_schemas::UsbAddress::new(4, 44).expect("valid");
        lookup.map.get_mut(&key.id).expect("known").address = moved;
        let events = h.exec.action(server, Rebuild, &lookup).await;
        let (state, detail) = state_of(&events);
        assert_eq!(state, ServerState::Active, "{detail}");
        assert!(detail.starts_with("rebuild"), "{detail}");
        assert_eq!(count(&events, "DeviceAttached"), 1);
        let live =
            observe_domain(&h.exec.domain_xml(server, false).await.expect("xml")).expect("parse");
        assert_eq!(
            (live.hostdevs[0].host_bus, live.hostdevs[0].host_device),
            (Some(4), Some(44))
        );

        // Resume of a running server is a no-op; of a shut-off one without a save, libvirt says no.
        h.exec.action(server, Stop, &lookup).await;
        let events = h.exec.action(server, Resume, &lookup).await;
        let (state, detail) = state_of(&events);
        assert_eq!(state, ServerState::Error);
        assert!(
            detail.contains("resume failed") && detail.contains("virDomainResume"),
            "{detail}"
        );
        assert!(
            detail.contains("not paused"),
            "libvirt's own text: {detail}"
        );

        // Teardown: destroyed and undefined; a second teardown finds nothing to do.
        h.exec.action(server, Start, &lookup).await;
        let events = h.exec.action(server, Teardown, &lookup).await;
        let (state, detail) = state_of(&events);
        assert_eq!(state, ServerState::Shutoff);
        assert!(detail.contains("destroyed and undefined"), "{detail}");
        let err = h.exec.observe(server).await.expect_err("gone");
        assert_eq!(err.libvirt_kind(), Some(FailureKind::NoDomain));
        let again = h.exec.action(server, Teardown, &lookup).await;
        assert!(state_of(&again).1.contains("already gone"));
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirt_failures_become_error_events_with_libvirts_text() {
    tokio::time::timeout(LIMIT, async {
        let h = host("host-b", &[]).await;
        let missing = server();
        for action in [
            usbpt_schemas::ServerAction::Stop,
            usbpt_schemas::ServerAction::Start,
            usbpt_schemas::ServerAction::Suspend,
            usbpt_schemas::ServerAction::Rebuild,
        ] {
            let events = h.exec.action(missing, action, &Devices::default()).await;
            let (state, detail) = state_of(&events);
            assert_eq!(state, ServerState::Error);
            assert!(
                detail.starts_with(&format!("{} failed", action.as_str())),
                "{detail}"
            );
            assert!(
                detail.contains("Domain not found") && detail.contains("code=nodomain"),
                "{detail}"
            );
        }
        let key = dev(1);
        let events = h
            .exec
            .reattach(missing, key.lineage, key.id, key.info)
            .await;
        let Some(Event::DeviceAttachFailed(f)) = events.first() else {
            panic!("{events:#?}")
        };
        assert!(f.error.contains("Domain not found"), "{}", f.error);
        let events = h.exec.detach(missing, key.id).await;
        assert!(state_of(&events).1.contains("Domain not found"));

        // A device the agent does not know is reported, and the server boots without it.
        let server = server();
        let events = h
            .exec
            .handle(
                &scheduled(
                    &h.host,
                    server,
                    vec![assigned(&key, ControllerModel::Uhci, FollowPolicy::Lineage)],
                ),
                &Devices::default(),
            )
            .await;
        assert_eq!(state_of(&events).0, ServerState::Active);
        let Some(Event::DeviceAttachFailed(f)) = events.first() else {
            panic!("{events:#?}")
        };
        assert!(f.error.contains("not known on host host-b"), "{}", f.error);

        // A document the schema check refuses never reaches libvirt.
        let mut cfg = ExecutorConfig::new(h.host.clone(), h.exec.uri().to_owned());
        cfg.validator = Some(std::sync::Arc::new(
            usbpt_libvirt::XmlValidator::with_program("false"),
        ));
        let strict = Executor::connect(cfg).await.expect("connect");
        let s3 = usbpt_schemas::ServerId::new_v7();
        let events = strict
            .handle(&scheduled(&h.host, s3, vec![]), &Devices::default())
            .await;
        let (state, detail) = state_of(&events);
        assert_eq!(state, ServerState::Error);
        assert!(
            detail.contains("libvirt schema rejected the domain XML"),
            "{detail}"
        );
        assert!(strict.servers().await.expect("list").is_empty());

        // A bad URI fails at connect, naming libvirt's reason.
        let cfg = ExecutorConfig::new(h.host.clone(), "test:///nonexistent/usbpt/node.xml");
        let err = Executor::connect(cfg).await.expect_err("bad uri");
        assert!(
            matches!(err, ExecutorError::Libvirt(_)) && err.to_string().contains("nonexistent"),
            "{err}"
        );
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handle_routes_resize_delete_and_ignores_other_hosts() {
    tokio::time::timeout(LIMIT, async {
        let a = dev(1);
        let b = dev(2);
        let h = host("host-b", &[a, b]).await;
        let lookup = Devices::with(&[a, b]);
        let server = server();
        let other = HostName::new("host-a").expect("host");

        // Work for another host is not ours.
        assert!(h
            .exec
            .handle(&scheduled(&other, server, vec![]), &lookup)
            .await
            .is_empty());
        assert!(h.exec.observe(server).await.is_err());

        h.exec
            .handle(
                &scheduled(
                    &h.host,
                    server,
                    vec![assigned(&a, ControllerModel::Uhci, FollowPolicy::Lineage)],
                ),
                &lookup,
            )
            .await;
        // Resize in place to device B on xHCI: stop, redefine, start.
        let resized = Envelope::new(Event::ServerResized(usbpt_schemas::ServerResized {
            server_id: server,
            from_flavor: FlavorId::new_v7(),
            to_flavor: FlavorId::new_v7(),
            from_host: h.host.clone(),
            host: h.host.clone(),
            devices: vec![assigned(&b, ControllerModel::Xhci, FollowPolicy::Lineage)],
        }));
        let events = h.exec.handle(&resized, &lookup).await;
        let (state, detail) = state_of(&events);
        assert_eq!(state, ServerState::Active);
        assert!(detail.starts_with("resize: shut down"), "{detail}");
        let Some(Event::DeviceAttached(att)) = events.first() else {
            panic!("{events:#?}")
        };
        assert_eq!(att.device_id, b.id);
        let live =
            observe_domain(&h.exec.domain_xml(server, false).await.expect("xml")).expect("parse");
        assert_eq!(live.hostdevs.len(), 1);
        assert_eq!(live.hostdevs[0].product, Some(b.info.product.value()));
        assert_eq!(
            live.controllers
                .iter()
                .filter_map(|c| c.model.as_deref())
                .collect::<Vec<_>>(),
            vec!["qemu-xhci"]
        );

        // Detach: on the test driver the running domain keeps it; the definition drops it.
        let events = h.exec.detach(server, b.id).await;
        let (state, detail) = state_of(&events);
        assert_eq!(state, ServerState::Active);
        assert!(detail.contains("cannot hot detach"), "{detail}");
        let inactive =
            observe_domain(&h.exec.domain_xml(server, true).await.expect("xml")).expect("parse");
        assert!(inactive.hostdevs.is_empty());

        // Resized away to another host: the resize is routed to the new host only (this host
        // never receives it, and would do nothing with it); this host tears the domain down on
        // the `ServerActionRequested{teardown}` the control plane addresses to it.
        let away = Envelope::new(Event::ServerResized(usbpt_schemas::ServerResized {
            server_id: server,
            from_flavor: FlavorId::new_v7(),
            to_flavor: FlavorId::new_v7(),
            from_host: h.host.clone(),
            host: other.clone(),
            devices: vec![],
        }));
        assert!(h.exec.handle(&away, &lookup).await.is_empty());
        assert_eq!(h.exec.servers().await.expect("list"), vec![server]);
        let teardown = Envelope::new(Event::ServerActionRequested(
            usbpt_schemas::ServerActionRequested {
                server_id: server,
                host: h.host.clone(),
                action: usbpt_schemas::ServerAction::Teardown,
            },
        ));
        let (state, detail) = state_of(&h.exec.handle(&teardown, &lookup).await);
        assert_eq!(state, ServerState::Shutoff);
        assert!(
            detail.starts_with("teardown: domain destroyed and undefined"),
            "{detail}"
        );
        assert!(h.exec.servers().await.expect("list").is_empty());

        // Delete of a running server.
        let s2 = usbpt_schemas::ServerId::new_v7();
        h.exec
            .handle(
                &scheduled(
                    &h.host,
                    s2,
                    vec![assigned(&a, ControllerModel::Ehci, FollowPolicy::Lineage)],
                ),
                &lookup,
            )
            .await;
        assert_eq!(h.exec.servers().await.expect("list"), vec![s2]);
        let del = Envelope::new(Event::ServerDeleted(ServerDeleted {
            server_id: s2,
            host: Some(h.host.clone()),
        }));
        let (state, detail) = state_of(&h.exec.handle(&del, &lookup).await);
        assert_eq!(state, ServerState::Shutoff);
        assert!(
            detail.starts_with("delete: domain destroyed and undefined"),
            "{detail}"
        );
        assert!(h.exec.servers().await.expect("list").is_empty());
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_boot_is_idempotent_and_parallel_servers_do_not_interfere() {
    tokio::time::timeout(LIMIT, async {
        let devs: Vec<Dev> = (0..8).map(dev).collect();
        let h = host("host-b", &devs).await;
        let lookup = Devices::with(&devs);
        let servers: Vec<_> = (0..8).map(|_| server()).collect();
        let envs: Vec<Envelope> = servers
            .iter()
            .zip(&devs)
            .map(|(s, d)| {
                scheduled(
                    &h.host,
                    *s,
                    vec![assigned(d, ControllerModel::Xhci, FollowPolicy::Lineage)],
                )
            })
            .collect();
        let results = futures_join(&h, &envs, &lookup).await;
        for events in &results {
            assert_eq!(state_of(events).0, ServerState::Active);
        }
        let mut listed = h.exec.servers().await.expect("list");
        listed.sort();
        let mut want = servers.clone();
        want.sort();
        assert_eq!(listed, want);
        // The same boot event delivered again: still active, nothing broken.
        let again = h.exec.handle(&envs[0], &lookup).await;
        let (state, detail) = state_of(&again);
        assert_eq!(state, ServerState::Active);
        assert!(detail.contains("already running"), "{detail}");
    })
    .await
    .expect("bounded");
}

async fn futures_join(h: &Host, envs: &[Envelope], lookup: &Devices) -> Vec<Vec<Event>> {
    let mut tasks = Vec::new();
    for env in envs {
        let exec = h.exec.clone();
        let env = env.clone();
        let lookup = lookup.clone();
        tasks.push(tokio::spawn(
            async move { exec.handle(&env, &lookup).await },
        ));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}
