//! Pure: a server's USB devices → libvirt domain XML. No I/O, no clock.
//!
//! One `<controller type='usb'>` per controller model the devices ask for (index 0, 1, … in
//! model order uhci < ehci < xhci), one `<hostdev mode='subsystem' type='usb'>` per device with
//! its vendor, product and *current* bus/device, placed on its controller's port
//! (`<address type='usb' bus='{controller index}' port='{n}'/>`). A controller asked to hold more
//! devices than it has ports is refused here, before libvirt sees anything.
//!
//! The spec itself travels inside the domain as `<metadata>` (namespace [`METADATA_NS`]), so the
//! agent can rebuild, re-attach or detach after a restart from libvirt alone.

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use quick_xml::events::BytesText;
use quick_xml::Writer;
use thiserror::Error;
use usbpt_schemas::{
    ControllerModel, DeviceId, Fingerprint, FollowPolicy, LineageId, ProductId, ServerId,
    UsbAddress, VendorId,
};

/// The namespace of usbpt's `<metadata>` element inside a domain.
pub const METADATA_NS: &str = "urn:usbpt:domain:1";
/// The prefix (libvirt's metadata "key") of that element.
pub const METADATA_PREFIX: &str = "usbpt";
/// Version of the metadata layout (the `version` attribute).
pub const METADATA_VERSION: u32 = 1;

/// Default guest memory: usbpt flavors carry USB requests, not sizes.
pub const DEFAULT_MEMORY_KIB: u64 = 524_288;
pub const DEFAULT_VCPUS: u32 = 1;

/// The libvirt domain name of a server. Server names are unique only among live servers and the
/// boot event does not carry one, so the domain is named by the server id (also its `<uuid>`);
/// the server name, when the agent knows it, goes in `<title>`.
pub fn domain_name(server: &ServerId) -> String {
    format!("usbpt-{server}")
}

/// libvirt's `<domain type=…>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DomainType {
    /// Hardware virtualisation (production; also accepted by libvirt's test driver).
    #[default]
    Kvm,
    /// Pure emulation (hosts without /dev/kvm).
    Qemu,
}

impl DomainType {
    /// The type a host really runs, from libvirt's capabilities XML
    /// (`<guest><os_type>hvm</os_type><arch …><domain type='kvm'/>`): `kvm` where any hvm guest
    /// offers it, else `qemu` where offered, else `kvm` (drivers such as libvirt's test driver
    /// list neither and accept both). A host without /dev/kvm (nested under emulation, or kvm
    /// not loaded) gets `qemu` instead of a domain that cannot start.
    pub fn from_capabilities(xml: &str) -> DomainType {
        use quick_xml::events::Event as X;
        let mut reader = quick_xml::Reader::from_str(xml);
        let (mut in_guest, mut hvm, mut kvm, mut qemu) = (false, false, false, false);
        let (mut guest_kvm, mut guest_qemu, mut in_os_type) = (false, false, false);
        loop {
            match reader.read_event() {
                Ok(X::Start(e)) if e.name().as_ref() == b"guest" => {
                    (in_guest, hvm, guest_kvm, guest_qemu) = (true, false, false, false);
                }
                Ok(X::End(e)) if e.name().as_ref() == b"guest" => {
                    if hvm {
                        kvm |= guest_kvm;
                        qemu |= guest_qemu;
                    }
                    in_guest = false;
                }
                Ok(X::Start(e)) if in_guest && e.name().as_ref() == b"os_type" => in_os_type = true,
                Ok(X::End(e)) if e.name().as_ref() == b"os_type" => in_os_type = false,
                Ok(X::Text(t)) if in_os_type => hvm = &*t == b"hvm",
                Ok(X::Start(e) | X::Empty(e)) if in_guest && e.name().as_ref() == b"domain" => {
                    match e.try_get_attribute("type").ok().flatten().map(|a| a.value) {
                        Some(v) if v.as_ref() == b"kvm" => guest_kvm = true,
                        Some(v) if v.as_ref() == b"qemu" => guest_qemu = true,
                        _ => {}
                    }
                }
                Ok(X::Eof) | Err(_) => break,
                _ => {}
            }
        }
        if !kvm && qemu {
            DomainType::Qemu
        } else {
            DomainType::Kvm
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DomainType::Kvm => "kvm",
            DomainType::Qemu => "qemu",
        }
    }
}

/// One USB device of a server, as the agent will put it in the domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostdevSpec {
    pub device_id: DeviceId,
    pub lineage_id: LineageId,
    pub vendor: VendorId,
    pub product: ProductId,
    /// The device's current (or, when not present, last known) bus/devnum.
    pub address: UsbAddress,
    pub controller: ControllerModel,
    pub follow: FollowPolicy,
    /// False when the enumeration is invalidated or missing on the host.
    pub present: bool,
    /// The controller port; `None` lets [`layout`] pick the lowest free one.
    pub port: Option<u8>,
    /// The descriptor fingerprint of the enumeration the server was given (at definition, at a
    /// re-attach, or accepted: `FingerprintAccepted`); metadata `fingerprint=`. `None` when it
    /// was not known (descriptors unreadable, or a domain defined before fingerprints were
    /// recorded): a re-attach then goes ahead unchecked.
    pub fingerprint: Option<Fingerprint>,
}

impl HostdevSpec {
    /// `startupPolicy='optional'`: the domain starts without the device when it is not there.
    /// Used for `follow=strict` bindings (the server runs without the device) and for devices that are
    /// currently invalid or missing.
    pub fn optional(&self) -> bool {
        self.follow == FollowPolicy::Strict || !self.present
    }
}

/// Everything needed to write a server's domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    pub server_id: ServerId,
    /// The server's name when known (written as `<title>`).
    pub title: Option<String>,
    pub memory_kib: u64,
    pub vcpus: u32,
    pub devices: Vec<HostdevSpec>,
    /// The server should be running: usbpt started it and has not stopped it since. An agent
    /// that finds its host rebooted starts such domains again (metadata `running="yes"`).
    pub running: bool,
}

impl DomainSpec {
    pub fn new(server_id: ServerId, devices: Vec<HostdevSpec>) -> Self {
        Self {
            server_id,
            title: None,
            memory_kib: DEFAULT_MEMORY_KIB,
            vcpus: DEFAULT_VCPUS,
            devices,
            running: false,
        }
    }
    pub fn domain_name(&self) -> String {
        domain_name(&self.server_id)
    }
    pub fn device(&self, id: &DeviceId) -> Option<&HostdevSpec> {
        self.devices.iter().find(|d| d.device_id == *id)
    }
    pub fn device_of_lineage(&self, lineage: &LineageId) -> Option<&HostdevSpec> {
        self.devices.iter().find(|d| d.lineage_id == *lineage)
    }
}

/// Why a spec cannot become a domain. Every variant names the offending values.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DomainError {
    #[error("USB controller {} ({}) has {ports} ports and server {server} needs {devices} devices on it", controller.as_str(), controller.libvirt_model())]
    ControllerOverLimit {
        server: ServerId,
        controller: ControllerModel,
        ports: u8,
        devices: usize,
    },
    #[error("device {device} asks for port {port} of USB controller {}, which has ports 1..={ports}", controller.as_str())]
    PortOutOfRange {
        device: DeviceId,
        controller: ControllerModel,
        port: u8,
        ports: u8,
    },
    #[error("devices {first} and {second} both ask for port {port} of USB controller {}", controller.as_str())]
    PortTaken {
        first: DeviceId,
        second: DeviceId,
        controller: ControllerModel,
        port: u8,
    },
    #[error("device {device} is listed twice for server {server}")]
    DuplicateDevice { server: ServerId, device: DeviceId },
    #[error(
        "lineage {lineage} is listed twice for server {server} (devices {first} and {second})"
    )]
    DuplicateLineage {
        server: ServerId,
        lineage: LineageId,
        first: DeviceId,
        second: DeviceId,
    },
    #[error("server {server}: memory_kib {memory_kib} and vcpus {vcpus} must both be at least 1")]
    NoResources {
        server: ServerId,
        memory_kib: u64,
        vcpus: u32,
    },
    #[error("writing the domain XML failed: {0}")]
    Write(String),
}

impl From<io::Error> for DomainError {
    fn from(e: io::Error) -> Self {
        DomainError::Write(e.to_string())
    }
}

/// A USB controller of the domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControllerSlot {
    pub model: ControllerModel,
    pub index: u8,
}

/// Where each device sits: `placements[i]` belongs to `spec.devices[i]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub controllers: Vec<ControllerSlot>,
    pub placements: Vec<Placement>,
}

/// A device's USB address inside the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The controller's `index` (libvirt's guest USB `bus`).
    pub controller_index: u8,
    pub port: u8,
}

/// Checks the spec and places every device on a port of its controller: explicit ports first
/// (kept across redefinitions, so a re-attached device stays where the guest saw it), then the
/// lowest free port for the rest.
pub fn layout(spec: &DomainSpec) -> Result<Layout, DomainError> {
    if spec.memory_kib == 0 || spec.vcpus == 0 {
        return Err(DomainError::NoResources {
            server: spec.server_id,
            memory_kib: spec.memory_kib,
            vcpus: spec.vcpus,
        });
    }
    let mut seen_devices = BTreeSet::new();
    let mut seen_lineages: BTreeMap<LineageId, DeviceId> = BTreeMap::new();
    let mut per_model: BTreeMap<ControllerModel, usize> = BTreeMap::new();
    for d in &spec.devices {
        if !seen_devices.insert(d.device_id) {
            return Err(DomainError::DuplicateDevice {
                server: spec.server_id,
                device: d.device_id,
            });
        }
        if let Some(first) = seen_lineages.insert(d.lineage_id, d.device_id) {
            return Err(DomainError::DuplicateLineage {
                server: spec.server_id,
                lineage: d.lineage_id,
                first,
                second: d.device_id,
            });
        }
        *per_model.entry(d.controller).or_default() += 1;
    }
    for (&model, &count) in &per_model {
        if count > usize::from(model.ports()) {
            return Err(DomainError::ControllerOverLimit {
                server: spec.server_id,
                controller: model,
                ports: model.ports(),
                devices: count,
            });
        }
    }
    let controllers: Vec<ControllerSlot> = per_model
        .keys()
        .zip(0u8..)
        .map(|(&model, index)| ControllerSlot { model, index })
        .collect();
    let index_of = |model: ControllerModel| {
        controllers
            .iter()
            .find(|c| c.model == model)
            .map_or(0, |c| c.index)
    };

    // Explicit ports first.
    let mut taken: BTreeMap<(ControllerModel, u8), DeviceId> = BTreeMap::new();
    let mut ports: Vec<Option<u8>> = vec![None; spec.devices.len()];
    for (i, d) in spec.devices.iter().enumerate() {
        let Some(port) = d.port else { continue };
        if port == 0 || port > d.controller.ports() {
            return Err(DomainError::PortOutOfRange {
                device: d.device_id,
                controller: d.controller,
                port,
                ports: d.controller.ports(),
            });
        }
        if let Some(first) = taken.insert((d.controller, port), d.device_id) {
            return Err(DomainError::PortTaken {
                first,
                second: d.device_id,
                controller: d.controller,
                port,
            });
        }
        ports[i] = Some(port);
    }
    // Then the lowest free port for the others; the count check above guarantees one exists.
    let mut placements = Vec::with_capacity(spec.devices.len());
    for (i, d) in spec.devices.iter().enumerate() {
        let port = match ports[i] {
            Some(p) => p,
            None => {
                let free = (1..=d.controller.ports())
                    .find(|p| !taken.contains_key(&(d.controller, *p)))
                    .ok_or(DomainError::ControllerOverLimit {
                        server: spec.server_id,
                        controller: d.controller,
                        ports: d.controller.ports(),
                        devices: per_model.get(&d.controller).copied().unwrap_or_default(),
                    })?;
                taken.insert((d.controller, free), d.device_id);
                free
            }
        };
        placements.push(Placement {
            controller_index: index_of(d.controller),
            port,
        });
    }
    Ok(Layout {
        controllers,
        placements,
    })
}

/// The spec with every device's port fixed to where [`layout`] put it.
pub fn placed(spec: &DomainSpec) -> Result<DomainSpec, DomainError> {
    let layout = layout(spec)?;
    let mut out = spec.clone();
    for (d, p) in out.devices.iter_mut().zip(&layout.placements) {
        d.port = Some(p.port);
    }
    Ok(out)
}

/// The complete `<domain>` document for `spec`.
pub fn domain_xml(spec: &DomainSpec, domain_type: DomainType) -> Result<String, DomainError> {
    let layout = layout(spec)?;
    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    let uuid = spec.server_id.to_string();
    let name = spec.domain_name();
    // libvirt refuses newlines in a title.
    let title = spec.title.as_ref().map(|t| t.replace(['\n', '\r'], " "));
    w.create_element("domain")
        .with_attribute(("type", domain_type.as_str()))
        .write_inner_content(|w| {
            w.create_element("name")
                .write_text_content(BytesText::new(&name))?;
            w.create_element("uuid")
                .write_text_content(BytesText::new(&uuid))?;
            if let Some(title) = &title {
                w.create_element("title")
                    .write_text_content(BytesText::new(title))?;
            }
            w.create_element("metadata")
                .write_inner_content(|w| write_metadata(w, spec, title.as_deref(), &layout))?;
            w.create_element("memory")
                .with_attribute(("unit", "KiB"))
                .write_text_content(BytesText::new(&spec.memory_kib.to_string()))?;
            w.create_element("vcpu")
                .write_text_content(BytesText::new(&spec.vcpus.to_string()))?;
            w.create_element("os").write_inner_content(|w| {
                w.create_element("type")
                    .with_attribute(("arch", "x86_64"))
                    .with_attribute(("machine", "pc"))
                    .write_text_content(BytesText::new("hvm"))?;
                Ok(())
            })?;
            w.create_element("devices").write_inner_content(|w| {
                for c in &layout.controllers {
                    write_controller(w, *c)?;
                }
                for (d, p) in spec.devices.iter().zip(&layout.placements) {
                    write_hostdev(w, d, Some(*p))?;
                }
                Ok(())
            })?;
            Ok(())
        })?;
    finish(w)
}

/// One `<hostdev>` element on its own, for `virDomainAttachDeviceFlags` /
/// `virDomainDetachDeviceFlags`.
pub fn hostdev_xml(
    device: &HostdevSpec,
    placement: Option<Placement>,
) -> Result<String, DomainError> {
    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    write_hostdev(&mut w, device, placement)?;
    finish(w)
}

fn finish(w: Writer<Vec<u8>>) -> Result<String, DomainError> {
    let mut s = String::from_utf8(w.into_inner()).map_err(|e| DomainError::Write(e.to_string()))?;
    s.push('\n');
    Ok(s)
}

fn write_controller(w: &mut Writer<Vec<u8>>, c: ControllerSlot) -> io::Result<()> {
    let index = c.index.to_string();
    let e = w
        .create_element("controller")
        .with_attribute(("type", "usb"))
        .with_attribute(("index", index.as_str()))
        .with_attribute(("model", c.model.libvirt_model()));
    // QEMU accepts `ports` only on the xHCI models (libvirt: "usb controller type … doesn't
    // support 'ports'"); UHCI and EHCI have a fixed port count (2 and 6).
    let ports = c.model.ports().to_string();
    let e = if c.model == ControllerModel::Xhci {
        e.with_attribute(("ports", ports.as_str()))
    } else {
        e
    };
    e.write_empty()?;
    Ok(())
}

fn hex(v: u16) -> String {
    format!("0x{v:04x}")
}

fn write_hostdev(
    w: &mut Writer<Vec<u8>>,
    d: &HostdevSpec,
    placement: Option<Placement>,
) -> io::Result<()> {
    w.create_element("hostdev")
        .with_attribute(("mode", "subsystem"))
        .with_attribute(("type", "usb"))
        .with_attribute(("managed", "yes"))
        .write_inner_content(|w| {
            let source = w.create_element("source");
            let source = if d.optional() {
                source.with_attribute(("startupPolicy", "optional"))
            } else {
                source
            };
            source.write_inner_content(|w| {
                let (vendor, product) = (hex(d.vendor.value()), hex(d.product.value()));
                let (bus, dev) = (d.address.bus().to_string(), d.address.devnum().to_string());
                w.create_element("vendor")
                    .with_attribute(("id", vendor.as_str()))
                    .write_empty()?;
                w.create_element("product")
                    .with_attribute(("id", product.as_str()))
                    .write_empty()?;
                w.create_element("address")
                    .with_attribute(("bus", bus.as_str()))
                    .with_attribute(("device", dev.as_str()))
                    .write_empty()?;
                Ok(())
            })?;
            if let Some(p) = placement {
                let (bus, port) = (p.controller_index.to_string(), p.port.to_string());
                w.create_element("address")
                    .with_attribute(("type", "usb"))
                    .with_attribute(("bus", bus.as_str()))
                    .with_attribute(("port", port.as_str()))
                    .write_empty()?;
            }
            Ok(())
        })?;
    Ok(())
}

fn write_metadata(
    w: &mut Writer<Vec<u8>>,
    spec: &DomainSpec,
    title: Option<&str>,
    layout: &Layout,
) -> io::Result<()> {
    let (server, version) = (spec.server_id.to_string(), METADATA_VERSION.to_string());
    let (memory, vcpus) = (spec.memory_kib.to_string(), spec.vcpus.to_string());
    let ns_attr = format!("xmlns:{METADATA_PREFIX}");
    let e = w
        .create_element(format!("{METADATA_PREFIX}:server"))
        .with_attribute((ns_attr.as_str(), METADATA_NS))
        .with_attribute(("version", version.as_str()))
        .with_attribute(("id", server.as_str()))
        .with_attribute(("memory_kib", memory.as_str()))
        .with_attribute(("vcpus", vcpus.as_str()));
    let e = match title {
        Some(t) => e.with_attribute(("title", t)),
        None => e,
    };
    let e = if spec.running {
        e.with_attribute(("running", "yes"))
    } else {
        e
    };
    e.write_inner_content(|w| {
        for (d, p) in spec.devices.iter().zip(&layout.placements) {
            let attrs = [
                ("id", d.device_id.to_string()),
                ("lineage", d.lineage_id.to_string()),
                ("controller", d.controller.as_str().to_owned()),
                ("follow", follow_str(d.follow).to_owned()),
                ("vendor", d.vendor.to_string()),
                ("product", d.product.to_string()),
                ("bus", d.address.bus().to_string()),
                ("devnum", d.address.devnum().to_string()),
                ("port", p.port.to_string()),
                ("present", d.present.to_string()),
            ];
            let fingerprint = d.fingerprint.map(|f| ("fingerprint", f.to_base64()));
            w.create_element(format!("{METADATA_PREFIX}:device"))
                .with_attributes(
                    attrs
                        .iter()
                        .chain(fingerprint.as_ref())
                        .map(|(k, v)| (*k, v.as_str())),
                )
                .write_empty()?;
        }
        Ok(())
    })?;
    Ok(())
}

pub fn follow_str(f: FollowPolicy) -> &'static str {
    match f {
        FollowPolicy::Lineage => "lineage",
        FollowPolicy::Strict => "strict",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(n: u128, controller: ControllerModel) -> HostdevSpec {
        HostdevSpec {
            device_id: DeviceId::from_uuid(uuid::Uuid::from_u128(n)),
            lineage_id: LineageId::from_uuid(uuid::Uuid::from_u128(1000 + n)),
            vendor: VendorId(0x1050),
            product: ProductId(0x0120),
            address: UsbAddress::new(1, u16::try_from(n % 120 + 1).unwrap()).unwrap(),
            controller,
            follow: FollowPolicy::Lineage,
            present: true,
            port: None,
            fingerprint: None,
        }
    }
    fn spec(devices: Vec<HostdevSpec>) -> DomainSpec {
        DomainSpec::new(ServerId::from_uuid(uuid::Uuid::from_u128(7)), devices)
    }

    #[test]
    fn controllers_are_indexed_in_model_order_and_ports_fill_from_one() {
        let s = spec(vec![
            dev(1, ControllerModel::Xhci),
            dev(2, ControllerModel::Uhci),
            dev(3, ControllerModel::Xhci),
        ]);
        let l = layout(&s).unwrap();
        assert_eq!(
            l.controllers,
            vec![
                ControllerSlot {
                    model: ControllerModel::Uhci,
                    index: 0
                },
                ControllerSlot {
                    model: ControllerModel::Xhci,
                    index: 1
                },
            ]
        );
        let got: Vec<(u8, u8)> = l
            .placements
            .iter()
            .map(|p| (p.controller_index, p.port))
            .collect();
        assert_eq!(got, vec![(1, 1), (0, 1), (1, 2)]);
    }

    #[test]
    fn explicit_ports_are_kept_and_others_take_the_lowest_free() {
        let mut a = dev(1, ControllerModel::Ehci);
        a.port = Some(1);
        let b = dev(2, ControllerModel::Ehci);
        let mut c = dev(3, ControllerModel::Ehci);
        c.port = Some(2);
        let l = layout(&spec(vec![b, a, c])).unwrap();
        let ports: Vec<u8> = l.placements.iter().map(|p| p.port).collect();
        assert_eq!(ports, vec![3, 1, 2]);
    }

    #[test]
    fn over_limit_is_refused_naming_controller_ports_and_devices() {
        let s = spec((1..=3).map(|n| dev(n, ControllerModel::Uhci)).collect());
        let err = layout(&s).unwrap_err();
        assert!(matches!(
            err,
            DomainError::ControllerOverLimit {
                controller: ControllerModel::Uhci,
                ports: 2,
                devices: 3,
                ..
            }
        ));
        let text = err.to_string();
        assert!(
            text.contains("uhci (piix3-uhci) has 2 ports") && text.contains("needs 3 devices"),
            "{text}"
        );
        assert!(domain_xml(&s, DomainType::Kvm).is_err());
    }

    #[test]
    fn bad_ports_and_duplicates_are_refused() {
        let mut a = dev(1, ControllerModel::Uhci);
        a.port = Some(3);
        assert!(matches!(
            layout(&spec(vec![a])),
            Err(DomainError::PortOutOfRange {
                port: 3,
                ports: 2,
                ..
            })
        ));
        let mut a = dev(1, ControllerModel::Uhci);
        a.port = Some(2);
        let mut b = dev(2, ControllerModel::Uhci);
        b.port = Some(2);
        assert!(matches!(
            layout(&spec(vec![a, b])),
            Err(DomainError::PortTaken { port: 2, .. })
        ));
        let a = dev(1, ControllerModel::Uhci);
        assert!(matches!(
            layout(&spec(vec![a.clone(), a.clone()])),
            Err(DomainError::DuplicateDevice { .. })
        ));
        let mut b = dev(2, ControllerModel::Xhci);
        b.lineage_id = a.lineage_id;
        assert!(matches!(
            layout(&spec(vec![a, b])),
            Err(DomainError::DuplicateLineage { .. })
        ));
    }

    #[test]
    fn xml_has_ports_only_on_xhci_and_optional_policy_for_strict_or_absent() {
        let mut strict = dev(1, ControllerModel::Ehci);
        strict.follow = FollowPolicy::Strict;
        let mut gone = dev(2, ControllerModel::Xhci);
        gone.present = false;
        let fine = dev(3, ControllerModel::Uhci);
        let xml = domain_xml(&spec(vec![strict, gone, fine]), DomainType::Kvm).unwrap();
        assert!(
            xml.contains(r#"<controller type="usb" index="0" model="piix3-uhci"/>"#),
            "{xml}"
        );
        assert!(
            xml.contains(r#"<controller type="usb" index="1" model="ich9-ehci1"/>"#),
            "{xml}"
        );
        assert!(
            xml.contains(r#"<controller type="usb" index="2" model="qemu-xhci" ports="15"/>"#),
            "{xml}"
        );
        assert_eq!(
            xml.matches(r#"startupPolicy="optional""#).count(),
            2,
            "{xml}"
        );
        assert!(
            xml.contains(r#"<vendor id="0x1050"/>"#) && xml.contains(r#"<product id="0x0120"/>"#)
        );
        assert!(
            xml.contains(r#"<address type="usb" bus="2" port="1"/>"#),
            "{xml}"
        );
    }

    #[test]
    fn text_is_escaped() {
        let mut s = spec(vec![]);
        s.title = Some("a<b>&'\"c\nd".into());
        let xml = domain_xml(&s, DomainType::Qemu).unwrap();
        assert!(
            xml.contains("<title>a&lt;b&gt;&amp;&apos;&quot;c d</title>"),
            "{xml}"
        );
        assert!(
            xml.contains(r#"title="a&lt;b&gt;&amp;&apos;&quot;c"#),
            "{xml}"
        );
        assert!(xml.starts_with(r#"<domain type="qemu">"#));
    }

    #[test]
    fn domain_type_follows_the_host_capabilities() {
        let caps = |domains: &str| {
            format!(
                "<capabilities><host/><guest><os_type>hvm</os_type><arch name='x86_64'>\
                 <wordsize>64</wordsize>{domains}</arch></guest>\
                 <guest><os_type>xen</os_type><arch name='x86_64'><domain type='kvm'/></arch></guest>\
                 </capabilities>"
            )
        };
        // A host with /dev/kvm lists both; one without (e.g. nested under TCG) only qemu.
        assert_eq!(
            DomainType::from_capabilities(&caps("<domain type='qemu'/><domain type='kvm'/>")),
            DomainType::Kvm
        );
        assert_eq!(
            DomainType::from_capabilities(&caps("<domain type='qemu'/>")),
            DomainType::Qemu
        );
        // libvirt's test driver lists its own type: keep kvm, which it accepts.
        assert_eq!(
            DomainType::from_capabilities(&caps("<domain type='test'/>")),
            DomainType::Kvm
        );
        assert_eq!(DomainType::from_capabilities("not xml <"), DomainType::Kvm);
    }
}
