//! Every domain XML variant the executor can generate passes libvirt's own schema
//! (`virt-xml-validate … domain`), and over-limit controllers never become XML.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use usbpt_agent::libvirt::domain::{
    domain_xml, hostdev_xml, layout, DomainError, DomainSpec, DomainType, HostdevSpec, Placement,
};
use usbpt_agent::libvirt::inspect::observe_domain;
use usbpt_agent::libvirt::XmlValidator;
use usbpt_schemas::{
    ControllerModel, DeviceId, FollowPolicy, LineageId, ProductId, ServerId, UsbAddress, VendorId,
};

const MODELS: [ControllerModel; 3] = [
    ControllerModel::Uhci,
    ControllerModel::Ehci,
    ControllerModel::Xhci,
];

fn hd(n: u16, controller: ControllerModel, follow: FollowPolicy, present: bool) -> HostdevSpec {
    HostdevSpec {
        device_id: DeviceId::new_v7(),
        lineage_id: LineageId::from_uuid(uuid::Uuid::new_v4()),
        vendor: VendorId(0x136b),
        product: ProductId(n),
        address: UsbAddress::new(1 + n / 100, n % 100 + 1).expect("valid"),
        controller,
        follow,
        present,
        port: None,
        fingerprint: None,
    }
}

fn spec(devices: Vec<HostdevSpec>) -> DomainSpec {
    DomainSpec::new(ServerId::new_v7(), devices)
}

/// Builds, validates and checks what the XML says about controllers and hostdevs.
fn check(v: &XmlValidator, s: &DomainSpec, ty: DomainType) -> String {
    let xml = domain_xml(s, ty).expect("builds");
    if let Err(e) = v.validate_domain(&xml) {
        panic!("{e}\n{xml}");
    }
    let o = observe_domain(&xml).expect("parses");
    assert_eq!(o.hostdevs.len(), s.devices.len(), "{xml}");
    let l = layout(s).expect("layout");
    assert_eq!(o.controllers.len(), l.controllers.len());
    for (d, h) in s.devices.iter().zip(&o.hostdevs) {
        assert_eq!(h.vendor, Some(d.vendor.value()));
        assert_eq!(h.product, Some(d.product.value()));
        assert_eq!(h.host_bus, Some(u32::from(d.address.bus())));
        assert_eq!(h.host_device, Some(u32::from(d.address.devnum())));
        assert_eq!(
            h.startup_policy.as_deref(),
            d.optional().then_some("optional"),
            "{xml}"
        );
    }
    xml
}

#[test]
fn every_variant_validates() {
    let v = XmlValidator::new();
    let mut variants: Vec<(String, DomainSpec)> = Vec::new();
    variants.push(("zero devices".into(), spec(vec![])));
    for m in MODELS {
        for follow in [FollowPolicy::Lineage, FollowPolicy::Strict] {
            for present in [true, false] {
                variants.push((
                    format!("{m:?} {follow:?} present={present}"),
                    spec(vec![hd(1, m, follow, present)]),
                ));
            }
        }
        // Max ports: every port of the controller used.
        let full = (0..u16::from(m.ports()))
            .map(|i| hd(10 + i, m, FollowPolicy::Lineage, true))
            .collect();
        variants.push((format!("{m:?} at its {} ports", m.ports()), spec(full)));
    }
    // Mixes: two and three controllers, strict and lineage, present and not.
    variants.push((
        "uhci+xhci".into(),
        spec(vec![
            hd(1, ControllerModel::Xhci, FollowPolicy::Lineage, true),
            hd(2, ControllerModel::Uhci, FollowPolicy::Strict, true),
        ]),
    ));
    let mut all = Vec::new();
    for (k, m) in MODELS.iter().enumerate() {
        for i in 0..u16::from(m.ports()) {
            let follow = if i % 2 == 0 {
                FollowPolicy::Lineage
            } else {
                FollowPolicy::Strict
            };
            all.push(hd(100 * (k as u16 + 1) + i, *m, follow, i % 3 != 0));
        }
    }
    variants.push((
        "all three controllers full, mixed policies".into(),
        spec(all),
    ));
    let mut titled = spec(vec![hd(
        1,
        ControllerModel::Ehci,
        FollowPolicy::Lineage,
        true,
    )]);
    titled.title = Some("db-1 <primary> & 'quoted' \"too\"\nsecond line".into());
    variants.push(("title needing escapes".into(), titled));
    let mut explicit = spec(vec![
        hd(1, ControllerModel::Xhci, FollowPolicy::Lineage, true),
        hd(2, ControllerModel::Xhci, FollowPolicy::Lineage, true),
    ]);
    explicit.devices[0].port = Some(15);
    variants.push(("explicit last port".into(), explicit));

    for (name, s) in &variants {
        for ty in [DomainType::Kvm, DomainType::Qemu] {
            let xml = check(&v, s, ty);
            assert!(!xml.is_empty(), "{name}");
        }
    }
    assert_eq!(v.validated(), 2 * variants.len() as u64);
}

#[test]
fn xhci_gets_ports_uhci_and_ehci_do_not() {
    let s = spec(
        MODELS
            .iter()
            .map(|m| hd(1, *m, FollowPolicy::Lineage, true))
            .collect(),
    );
    let o = observe_domain(&domain_xml(&s, DomainType::Kvm).expect("builds")).expect("parses");
    let got: Vec<(u32, Option<&str>, Option<u32>)> = o
        .controllers
        .iter()
        .map(|c| (c.index, c.model.as_deref(), c.ports))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, Some("piix3-uhci"), None),
            (1, Some("ich9-ehci1"), None),
            (2, Some("qemu-xhci"), Some(15)),
        ]
    );
    let guest: Vec<(Option<u32>, Option<&str>)> = o
        .hostdevs
        .iter()
        .map(|h| (h.guest_bus, h.guest_port.as_deref()))
        .collect();
    assert_eq!(
        guest,
        vec![
            (Some(0), Some("1")),
            (Some(1), Some("1")),
            (Some(2), Some("1"))
        ]
    );
}

#[test]
fn one_past_the_limit_is_refused_for_every_model() {
    for m in MODELS {
        let n = m.ports() + 1;
        let s = spec(
            (0..u16::from(n))
                .map(|i| hd(i + 1, m, FollowPolicy::Lineage, true))
                .collect(),
        );
        let err = domain_xml(&s, DomainType::Kvm).expect_err("over the limit");
        assert_eq!(
            err,
            DomainError::ControllerOverLimit {
                server: s.server_id,
                controller: m,
                ports: m.ports(),
                devices: usize::from(n),
            }
        );
        let text = err.to_string();
        assert!(
            text.contains(m.libvirt_model())
                && text.contains(&format!("has {} ports", m.ports()))
                && text.contains(&format!("needs {n} devices")),
            "{text}"
        );
    }
}

#[test]
fn hot_attach_fragments_validate_inside_a_domain() {
    let v = XmlValidator::new();
    for m in MODELS {
        for follow in [FollowPolicy::Lineage, FollowPolicy::Strict] {
            let d = hd(7, m, follow, true);
            for placement in [
                None,
                Some(Placement {
                    controller_index: 0,
                    port: 1,
                }),
            ] {
                let frag = hostdev_xml(&d, placement).expect("builds");
                assert!(frag.trim_start().starts_with("<hostdev"), "{frag}");
                let base = domain_xml(&spec(vec![]), DomainType::Kvm).expect("builds");
                let controller =
                    "<controller type=\"usb\" index=\"0\" model=\"qemu-xhci\" ports=\"15\"/>";
                let doc = base.replacen("<devices>", &format!("<devices>{controller}{frag}"), 1);
                assert!(doc.contains("<hostdev"), "fragment spliced in: {doc}");
                if let Err(e) = v.validate_domain(&doc) {
                    panic!("{e}\n{doc}");
                }
            }
        }
    }
}

#[test]
fn the_validator_rejects_what_libvirt_would() {
    let v = XmlValidator::new();
    let xml = domain_xml(
        &spec(vec![hd(
            1,
            ControllerModel::Xhci,
            FollowPolicy::Lineage,
            true,
        )]),
        DomainType::Kvm,
    )
    .expect("builds")
    .replace("qemu-xhci", "bogus-model");
    let err = v.validate_domain(&xml).expect_err("bogus model");
    assert!(err.to_string().contains("fails to validate"), "{err}");
    assert_eq!(v.validated(), 0);
}
