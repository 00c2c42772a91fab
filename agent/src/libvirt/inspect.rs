//! Pure: read back what libvirt holds — usbpt's `<metadata>` element (the [`DomainSpec`] a domain
//! was defined from) and the USB controllers and hostdevs of a domain XML.

use std::collections::HashMap;
use std::str::FromStr;

use quick_xml::events::{BytesStart, Event};
use quick_xml::{Reader, XmlVersion};
use thiserror::Error;
use usbpt_schemas::{
    ControllerModel, DeviceId, Fingerprint, FollowPolicy, LineageId, ProductId, ServerId,
    UsbAddress, VendorId,
};

use super::domain::{DomainSpec, HostdevSpec, METADATA_VERSION};

/// Why a metadata element or domain XML could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InspectError {
    #[error("malformed XML: {0}")]
    Xml(String),
    #[error("usbpt metadata: missing <server> element")]
    NoServer,
    #[error("usbpt metadata: unsupported version {found:?} (this agent reads {METADATA_VERSION})")]
    Version { found: String },
    #[error("usbpt metadata: <{element}> lacks attribute {attr:?}")]
    Missing {
        element: &'static str,
        attr: &'static str,
    },
    #[error("usbpt metadata: <{element}> attribute {attr}={value:?} is invalid: {why}")]
    Invalid {
        element: &'static str,
        attr: &'static str,
        value: String,
        why: String,
    },
}

fn xml_err(e: impl std::fmt::Display) -> InspectError {
    InspectError::Xml(e.to_string())
}

/// Attributes of one element by local name, unescaped.
fn attrs(e: &BytesStart<'_>) -> Result<HashMap<String, String>, InspectError> {
    let mut out = HashMap::new();
    for a in e.attributes() {
        let a = a.map_err(xml_err)?;
        let key = String::from_utf8_lossy(a.key.local_name().as_ref()).into_owned();
        let value = a
            .normalized_value(XmlVersion::Implicit1_0)
            .map_err(xml_err)?
            .into_owned();
        out.insert(key, value);
    }
    Ok(out)
}

struct Attrs {
    element: &'static str,
    map: HashMap<String, String>,
}

impl Attrs {
    fn raw(&self, attr: &'static str) -> Result<&str, InspectError> {
        self.map
            .get(attr)
            .map(String::as_str)
            .ok_or(InspectError::Missing {
                element: self.element,
                attr,
            })
    }
    fn parse<T: FromStr>(&self, attr: &'static str) -> Result<T, InspectError>
    where
        T::Err: std::fmt::Display,
    {
        let v = self.raw(attr)?;
        v.parse().map_err(|e: T::Err| InspectError::Invalid {
            element: self.element,
            attr,
            value: v.to_owned(),
            why: e.to_string(),
        })
    }
    fn invalid(&self, attr: &'static str, why: &str) -> InspectError {
        InspectError::Invalid {
            element: self.element,
            attr,
            value: self.map.get(attr).cloned().unwrap_or_default(),
            why: why.to_owned(),
        }
    }
}

/// Parses usbpt's metadata element, as `virDomainGetMetadata` returns it (`<server …>` without
/// its prefix) or as written inside a domain (`<usbpt:server xmlns:usbpt=…>`).
pub fn parse_metadata(xml: &str) -> Result<DomainSpec, InspectError> {
    let mut reader = Reader::from_str(xml);
    let mut spec: Option<DomainSpec> = None;
    loop {
        match reader.read_event().map_err(xml_err)? {
            Event::Start(e) | Event::Empty(e) => match e.local_name().as_ref() {
                b"server" if spec.is_none() => {
                    let a = Attrs {
                        element: "server",
                        map: attrs(&e)?,
                    };
                    let version = a.raw("version")?;
                    if version != METADATA_VERSION.to_string() {
                        return Err(InspectError::Version {
                            found: version.to_owned(),
                        });
                    }
                    let mut s = DomainSpec::new(a.parse::<ServerId>("id")?, Vec::new());
                    s.memory_kib = a.parse("memory_kib")?;
                    s.vcpus = a.parse("vcpus")?;
                    s.title = a.map.get("title").cloned();
                    s.running = a.map.get("running").is_some_and(|v| v == "yes");
                    spec = Some(s);
                }
                b"device" => {
                    let s = spec.as_mut().ok_or(InspectError::NoServer)?;
                    s.devices.push(device(&Attrs {
                        element: "device",
                        map: attrs(&e)?,
                    })?);
                }
                _ => {}
            },
            Event::Eof => break,
            _ => {}
        }
    }
    spec.ok_or(InspectError::NoServer)
}

fn device(a: &Attrs) -> Result<HostdevSpec, InspectError> {
    let controller = match a.raw("controller")? {
        "uhci" => ControllerModel::Uhci,
        "ehci" => ControllerModel::Ehci,
        "xhci" => ControllerModel::Xhci,
        _ => return Err(a.invalid("controller", "expected uhci, ehci or xhci")),
    };
    let follow = match a.raw("follow")? {
        "lineage" => FollowPolicy::Lineage,
        "strict" => FollowPolicy::Strict,
        _ => return Err(a.invalid("follow", "expected lineage or strict")),
    };
    let present = match a.raw("present")? {
        "true" => true,
        "false" => false,
        _ => return Err(a.invalid("present", "expected true or false")),
    };
    let address = UsbAddress::new(a.parse("bus")?, a.parse("devnum")?)
        .map_err(|e| a.invalid("devnum", &e.to_string()))?;
    Ok(HostdevSpec {
        device_id: a.parse::<DeviceId>("id")?,
        lineage_id: a.parse::<LineageId>("lineage")?,
        vendor: a.parse::<VendorId>("vendor")?,
        product: a.parse::<ProductId>("product")?,
        address,
        controller,
        follow,
        present,
        port: Some(a.parse("port")?),
        fingerprint: a
            .map
            .get("fingerprint")
            .map(|v| v.parse::<Fingerprint>())
            .transpose()
            .map_err(|e| a.invalid("fingerprint", &e.to_string()))?,
    })
}

/// A `<controller type='usb'>` found in a domain XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedController {
    pub index: u32,
    pub model: Option<String>,
    pub ports: Option<u32>,
}

/// A USB `<hostdev>` found in a domain XML.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedHostdev {
    pub vendor: Option<u16>,
    pub product: Option<u16>,
    /// Host `bus`/`device` of `<source><address>`.
    pub host_bus: Option<u32>,
    pub host_device: Option<u32>,
    /// `startupPolicy` of `<source>`.
    pub startup_policy: Option<String>,
    /// Guest `<address type='usb' bus= port=>`.
    pub guest_bus: Option<u32>,
    pub guest_port: Option<String>,
}

/// The USB controllers and USB hostdevs of a domain XML (what libvirt really holds).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedDomain {
    pub controllers: Vec<ObservedController>,
    pub hostdevs: Vec<ObservedHostdev>,
}

fn hex_attr(map: &HashMap<String, String>, key: &str) -> Option<u16> {
    let v = map.get(key)?;
    let digits = v.strip_prefix("0x").unwrap_or(v);
    u16::from_str_radix(digits, 16).ok()
}

fn num_attr(map: &HashMap<String, String>, key: &str) -> Option<u32> {
    map.get(key)?.parse().ok()
}

/// Reads the USB controllers and hostdevs out of a `<domain>` document.
pub fn observe_domain(xml: &str) -> Result<ObservedDomain, InspectError> {
    let mut reader = Reader::from_str(xml);
    let mut out = ObservedDomain::default();
    // Element path below <domain>: we only care about devices/controller and devices/hostdev.
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut current: Option<ObservedHostdev> = None;
    loop {
        let ev = reader.read_event().map_err(xml_err)?;
        let (e, empty) = match &ev {
            Event::Start(e) => (e, false),
            Event::Empty(e) => (e, true),
            Event::End(_) => {
                if path.last().is_some_and(|n| n == b"hostdev") {
                    if let Some(h) = current.take() {
                        out.hostdevs.push(h);
                    }
                }
                path.pop();
                continue;
            }
            Event::Eof => break,
            _ => continue,
        };
        let name = e.local_name().as_ref().to_vec();
        let map = attrs(e)?;
        let parent = path.last().map(Vec::as_slice);
        let in_hostdev = path.iter().any(|n| n == b"hostdev");
        match (name.as_slice(), parent) {
            (b"controller", Some(b"devices"))
                if map.get("type").map(String::as_str) == Some("usb") =>
            {
                out.controllers.push(ObservedController {
                    index: num_attr(&map, "index").unwrap_or_default(),
                    model: map.get("model").cloned(),
                    ports: num_attr(&map, "ports"),
                });
            }
            (b"hostdev", Some(b"devices"))
                if map.get("type").map(String::as_str) == Some("usb") =>
            {
                current = Some(ObservedHostdev::default());
            }
            (b"source", Some(b"hostdev")) => {
                if let Some(h) = current.as_mut() {
                    h.startup_policy = map.get("startupPolicy").cloned();
                }
            }
            (b"vendor", Some(b"source")) if in_hostdev => {
                if let Some(h) = current.as_mut() {
                    h.vendor = hex_attr(&map, "id");
                }
            }
            (b"product", Some(b"source")) if in_hostdev => {
                if let Some(h) = current.as_mut() {
                    h.product = hex_attr(&map, "id");
                }
            }
            (b"address", Some(b"source")) if in_hostdev => {
                if let Some(h) = current.as_mut() {
                    h.host_bus = num_attr(&map, "bus");
                    h.host_device = num_attr(&map, "device");
                }
            }
            (b"address", Some(b"hostdev")) => {
                if let Some(h) = current.as_mut() {
                    h.guest_bus = num_attr(&map, "bus");
                    h.guest_port = map.get("port").cloned();
                }
            }
            _ => {}
        }
        if empty {
            if name == b"hostdev" {
                if let Some(h) = current.take() {
                    out.hostdevs.push(h);
                }
            }
        } else {
            path.push(name);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::domain::{domain_xml, placed, DomainType};
    use super::*;

    fn spec() -> DomainSpec {
        let mut s = DomainSpec::new(
            ServerId::from_uuid(uuid::Uuid::from_u128(9)),
            vec![
                HostdevSpec {
                    device_id: DeviceId::from_uuid(uuid::Uuid::from_u128(1)),
                    lineage_id: LineageId::from_uuid(uuid::Uuid::from_u128(2)),
                    vendor: VendorId(0x136b),
                    product: ProductId(0x0003),
                    address: UsbAddress::new(2, 3).unwrap(),
                    controller: ControllerModel::Ehci,
                    follow: FollowPolicy::Strict,
                    present: false,
                    port: Some(4),
                    fingerprint: Some(Fingerprint([7; 32])),
                },
                HostdevSpec {
                    device_id: DeviceId::from_uuid(uuid::Uuid::from_u128(3)),
                    lineage_id: LineageId::from_uuid(uuid::Uuid::from_u128(4)),
                    vendor: VendorId(0x1050),
                    product: ProductId(0x0407),
                    address: UsbAddress::new(1, 127).unwrap(),
                    controller: ControllerModel::Xhci,
                    follow: FollowPolicy::Lineage,
                    present: true,
                    port: None,
                    fingerprint: None,
                },
            ],
        );
        s.title = Some("db & <primary>".into());
        s
    }

    #[test]
    fn metadata_round_trips_with_ports_fixed() {
        let s = spec();
        let xml = domain_xml(&s, DomainType::Kvm).unwrap();
        let back = parse_metadata(&xml).unwrap();
        assert_eq!(back, placed(&s).unwrap());
        assert_eq!(back.devices[1].port, Some(1));
    }

    #[test]
    fn the_running_mark_round_trips_and_is_absent_by_default() {
        let mut s = spec();
        let xml = domain_xml(&s, DomainType::Kvm).unwrap();
        assert!(!xml.contains("running="), "{xml}");
        assert!(!parse_metadata(&xml).unwrap().running);
        s.running = true;
        let xml = domain_xml(&s, DomainType::Kvm).unwrap();
        assert!(xml.contains(r#"running="yes""#), "{xml}");
        assert!(parse_metadata(&xml).unwrap().running);
    }

    #[test]
    fn metadata_as_libvirt_returns_it_parses() {
        let s = spec();
        let xml = domain_xml(&s, DomainType::Kvm).unwrap();
        // virDomainGetMetadata strips the prefix and namespace declaration.
        let stripped = xml
            .split("<metadata>")
            .nth(1)
            .and_then(|r| r.split("</metadata>").next())
            .unwrap()
            .replace("usbpt:", "")
            .replace(r#" xmlns:usbpt="urn:usbpt:domain:1""#, "");
        assert!(stripped.trim_start().starts_with("<server "), "{stripped}");
        assert_eq!(parse_metadata(&stripped).unwrap(), placed(&s).unwrap());
    }

    #[test]
    fn bad_metadata_names_the_value() {
        let err = parse_metadata(r#"<server version="2" id="x"/>"#).unwrap_err();
        assert_eq!(err, InspectError::Version { found: "2".into() });
        let err = parse_metadata(r#"<server version="1" id="nope" memory_kib="1" vcpus="1"/>"#)
            .unwrap_err();
        assert!(err.to_string().contains("\"nope\""), "{err}");
        assert_eq!(
            parse_metadata("<other/>").unwrap_err(),
            InspectError::NoServer
        );
    }

    #[test]
    fn observe_reads_controllers_and_hostdevs() {
        let xml = domain_xml(&spec(), DomainType::Kvm).unwrap();
        let o = observe_domain(&xml).unwrap();
        assert_eq!(
            o.controllers,
            vec![
                ObservedController {
                    index: 0,
                    model: Some("ich9-ehci1".into()),
                    ports: None
                },
                ObservedController {
                    index: 1,
                    model: Some("qemu-xhci".into()),
                    ports: Some(15)
                },
            ]
        );
        assert_eq!(o.hostdevs.len(), 2);
        assert_eq!(o.hostdevs[0].vendor, Some(0x136b));
        assert_eq!(
            (o.hostdevs[0].host_bus, o.hostdevs[0].host_device),
            (Some(2), Some(3))
        );
        assert_eq!(o.hostdevs[0].startup_policy.as_deref(), Some("optional"));
        assert_eq!(
            (o.hostdevs[0].guest_bus, o.hostdevs[0].guest_port.as_deref()),
            (Some(0), Some("4"))
        );
        assert_eq!(o.hostdevs[1].startup_policy, None);
        assert_eq!(
            (o.hostdevs[1].guest_bus, o.hostdevs[1].guest_port.as_deref()),
            (Some(1), Some("1"))
        );
    }
}
