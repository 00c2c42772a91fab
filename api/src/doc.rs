//! The typed JSON documents of usbpt's own API (`/v1/...`), and the parts of the Nova-shaped
//! documents that usbpt defines (a hypervisor's `usb_device_stats` entry, a server's
//! `usb_devices` entry): one definition, which the API serializes and the CLI deserializes.
//! For the rest of the Nova-shaped documents (servers, flavors, hypervisors: their shape
//! depends on the microversion, see `docs.rs`) this module holds read-side views with the fields
//! the CLI shows; unknown fields are ignored.
//!
//! Ids are strings, vendor and product ids 4 hex digits, times RFC 3339; every time is paired
//! with its stream sequence. Enums go on the wire as their stable serde names (an event's
//! `InvalidationReason::HostRebooted` is `"HostRebooted"`, as in `usbpt events tail --json`),
//! never as Rust's `Debug` text.

use serde::{Deserialize, Serialize};
use usbpt_projector::{
    Alarm, AlarmKind, AttachError, Claim, Clash, Device, DeviceStatus, FingerprintAcceptance,
    HoldEnd, HoldKind, Holding, Host, Lineage, MigrationRefusal, QuarantineEntry, ScheduleFailure,
    Stamp,
};
use usbpt_schemas::{
    AttachMethod, ControllerModel, DeviceId, Fingerprint, FingerprintPolicy, FlavorId,
    FollowPolicy, HostName, InvalidationReason, LineageId, LineageKind, PortPath, ProductId,
    ServerId, Timestamp, UsbDescriptors, UsbRequest, VendorId,
};

/// A device document's descriptors in JSON: `UsbDescriptors`' own fields, with the address as
/// Nova writes it (`address`: `usb_<bus>_<devnum>`) and its two numbers beside it (`bus`,
/// `devnum`), the shape the API has always had.
mod descriptors_doc {
    use serde::de::Error as _;
    use serde::ser::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::{Map, Value};
    use usbpt_schemas::{UsbAddress, UsbDescriptors};

    pub fn serialize<S: Serializer>(d: &UsbDescriptors, s: S) -> Result<S::Ok, S::Error> {
        let Value::Object(mut m) = serde_json::to_value(d).map_err(S::Error::custom)? else {
            return Err(S::Error::custom("descriptors are not a JSON object"));
        };
        m.insert("address".into(), d.address.nova_address().into());
        m.insert("bus".into(), d.address.bus().into());
        m.insert("devnum".into(), d.address.devnum().into());
        m.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<UsbDescriptors, D::Error> {
        let mut m = Map::deserialize(d)?;
        let number = |m: &mut Map<String, Value>, k: &str| {
            m.remove(k)
                .and_then(|v| v.as_u64())
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(|| D::Error::custom(format!("`{k}`: expected a number")))
        };
        let (bus, devnum) = (number(&mut m, "bus")?, number(&mut m, "devnum")?);
        let address = UsbAddress::new(bus, devnum).map_err(D::Error::custom)?;
        m.insert(
            "address".into(),
            serde_json::to_value(address).map_err(D::Error::custom)?,
        );
        serde_json::from_value(Value::Object(m)).map_err(D::Error::custom)
    }
}

/// A value's stable wire name: its serde form as a string (an enum variant's name).
pub fn wire_name<T: Serialize>(x: &T) -> String {
    match serde_json::to_value(x) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

/// `LineageKind` as the API names it: `serial` or `port`.
mod kind_name {
    use serde::{Deserialize, Deserializer, Serializer};
    use usbpt_schemas::LineageKind;

    pub fn name(k: LineageKind) -> &'static str {
        match k {
            LineageKind::Serial => "serial",
            LineageKind::Port => "port",
        }
    }
    // Serde's `with` passes a reference.
    pub fn serialize<S: Serializer>(k: &LineageKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(name(*k))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<LineageKind, D::Error> {
        match String::deserialize(d)?.as_str() {
            "serial" => Ok(LineageKind::Serial),
            "port" => Ok(LineageKind::Port),
            other => Err(serde::de::Error::unknown_variant(
                other,
                &["serial", "port"],
            )),
        }
    }
}

pub use kind_name::name as lineage_kind_name;

/// The object of every error answer, under usbpt's `error` key and under Nova's fault name
/// (`itemNotFound`, `badRequest`, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: u16,
    pub message: String,
}

/// An error answer, as usbpt's clients read it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ErrorDoc {
    pub error: ErrorBody,
}

/// `GET /v1/devices`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceList {
    pub devices: Vec<DeviceDoc>,
}

/// `GET /v1/devices/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceShow {
    pub device: DeviceDoc,
}

/// One enumeration, everything the view knows of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceDoc {
    pub id: DeviceId,
    pub lineage_id: LineageId,
    #[serde(with = "kind_name")]
    pub lineage_kind: LineageKind,
    pub host: HostName,
    pub status: DeviceStatus,
    pub holder: Option<ServerId>,
    pub current: bool,
    /// What the device says of itself, as its discovery event carries it. In JSON its fields
    /// stand in the document itself, with the address as Nova writes it (`address`:
    /// `usb_<bus>_<devnum>`, and `bus`, `devnum`) ([`descriptors_doc`]).
    #[serde(flatten, with = "descriptors_doc")]
    pub descriptors: UsbDescriptors,
    /// The descriptor fingerprint (USBGuard's `hash`), when the agent reported one.
    #[serde(default)]
    pub fingerprint: Option<Fingerprint>,
    /// Held out of scheduling by an alarm (docs/identity.md, "Alarms").
    #[serde(default)]
    pub blocked: bool,
    /// The lineage's label (`usbpt label`); set where the document is built with the lineage.
    #[serde(default)]
    pub label: Option<String>,
    pub syspath: String,
    pub boot_id: String,
    pub supersedes: Option<DeviceId>,
    pub discovered: Stamp,
    pub invalidation: Option<InvalidationDoc>,
    pub attachment: Option<AttachmentDoc>,
    pub holders: Vec<HoldingDoc>,
    pub attach_error: Option<AttachError>,
    pub last_change_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvalidationDoc {
    pub seq: u64,
    pub at: usbpt_schemas::Timestamp,
    /// `None` while only a newer enumeration is known (its invalidation has not arrived yet).
    pub reason: Option<InvalidationReason>,
    pub superseded_by: Option<DeviceId>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttachmentDoc {
    pub server_id: ServerId,
    pub address: String,
    pub method: AttachMethod,
    pub detail: String,
    pub seq: u64,
    pub at: usbpt_schemas::Timestamp,
}

/// One server's hold on the enumeration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HoldingDoc {
    pub server_id: ServerId,
    pub how: HoldKind,
    pub from: Stamp,
    pub attached: Option<Stamp>,
    pub ended: Option<HoldEndDoc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HoldEndDoc {
    pub seq: u64,
    pub at: usbpt_schemas::Timestamp,
    /// `released: <ReleaseReason>`, or `moved to a new enumeration`.
    pub reason: String,
    pub moved_to: Option<DeviceId>,
}

impl From<&Holding> for HoldingDoc {
    fn from(h: &Holding) -> Self {
        Self {
            server_id: h.server_id,
            how: h.how,
            from: h.from,
            attached: h.attached,
            ended: h.ended.as_ref().map(|(st, end)| {
                let (reason, moved_to) = match end {
                    HoldEnd::Released(r) => (format!("released: {}", wire_name(r)), None),
                    HoldEnd::MovedTo(id) => ("moved to a new enumeration".to_owned(), Some(*id)),
                };
                HoldEndDoc {
                    seq: st.seq,
                    at: st.at,
                    reason,
                    moved_to,
                }
            }),
        }
    }
}

impl From<&Device> for DeviceDoc {
    fn from(d: &Device) -> Self {
        let x = &d.discovery;
        Self {
            id: x.device_id,
            lineage_id: x.lineage_id,
            lineage_kind: x.lineage_kind,
            host: x.host.clone(),
            status: d.status,
            holder: d.holder,
            current: d.current,
            descriptors: x.descriptors.clone(),
            fingerprint: d.fingerprint,
            blocked: d.blocked,
            label: None,
            syspath: x.syspath.clone(),
            boot_id: x.boot_id.clone(),
            supersedes: x.supersedes,
            discovered: d.discovered,
            invalidation: d.invalidation.as_ref().map(|i| InvalidationDoc {
                seq: i.stamp.seq,
                at: i.stamp.at,
                reason: i.reason,
                superseded_by: i.superseded_by,
            }),
            attachment: d.attachment.as_ref().map(|a| AttachmentDoc {
                server_id: a.server_id,
                address: a.address.nova_address(),
                method: a.method,
                detail: a.detail.clone(),
                seq: a.stamp.seq,
                at: a.stamp.at,
            }),
            holders: d.holders.iter().map(HoldingDoc::from).collect(),
            attach_error: d.attach_error.clone(),
            last_change_seq: d.last_change_seq,
        }
    }
}

/// A lineage: the physical device behind its enumerations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineageDoc {
    pub id: LineageId,
    #[serde(with = "kind_name")]
    pub kind: LineageKind,
    pub vendor_id: VendorId,
    pub product_id: ProductId,
    pub serial: Option<String>,
    /// The operator's name for it (`usbpt label`), and when it was last set or removed.
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub label_changed: Option<Stamp>,
    pub enumerations: u32,
    pub current_device_id: DeviceId,
    pub current_host: HostName,
    pub first_seen: Stamp,
    /// Its alarms, active and recently cleared.
    #[serde(default)]
    pub alarms: Vec<AlarmDoc>,
    /// A discovery held back by a lineage conflict.
    #[serde(default)]
    pub held_back_device_id: Option<DeviceId>,
    /// The last fingerprint accepted as the lineage's own (`usbpt fingerprint accept`, or a
    /// flavor's policy), when and by which.
    #[serde(default)]
    pub fingerprint_accepted: Option<FingerprintAcceptance>,
}

/// One alarm of a lineage (docs/identity.md, "Alarms").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlarmDoc {
    pub kind: AlarmKind,
    pub active: bool,
    pub lineage_id: LineageId,
    pub vendor_id: VendorId,
    pub product_id: ProductId,
    pub serial: Option<String>,
    pub reason: String,
    pub hosts: Vec<HostName>,
    pub devices: Vec<DeviceId>,
    pub fingerprints: Vec<Fingerprint>,
    pub raised: Stamp,
    pub cleared: Option<AlarmClearedDoc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlarmClearedDoc {
    pub seq: u64,
    pub at: Timestamp,
    pub reason: String,
}

impl AlarmDoc {
    pub fn new(l: &Lineage, a: &Alarm) -> Self {
        Self {
            kind: a.kind,
            active: a.is_active(),
            lineage_id: l.id,
            vendor_id: l.vendor_id,
            product_id: l.product_id,
            serial: l.serial.clone(),
            reason: a.reason.clone(),
            hosts: a.hosts.clone(),
            devices: a.devices.clone(),
            fingerprints: a.fingerprints.clone(),
            raised: a.raised,
            cleared: a.cleared.as_ref().map(|(st, why)| AlarmClearedDoc {
                seq: st.seq,
                at: st.at,
                reason: why.clone(),
            }),
        }
    }
}

impl From<&Lineage> for LineageDoc {
    fn from(l: &Lineage) -> Self {
        Self {
            id: l.id,
            kind: l.kind,
            vendor_id: l.vendor_id,
            product_id: l.product_id,
            serial: l.serial.clone(),
            label: l.label.clone(),
            label_changed: l.label_changed,
            enumerations: l.enumerations,
            current_device_id: l.current,
            current_host: l.current_host.clone(),
            first_seen: l.first_seen,
            alarms: l.alarms.iter().map(|a| AlarmDoc::new(l, a)).collect(),
            held_back_device_id: l.pending.as_ref().map(|p| p.discovery.device_id),
            fingerprint_accepted: l.fingerprint_accepted.clone(),
        }
    }
}

/// `GET /v1/devices/{id}/history`: a lineage, its claim, and every enumeration of it, oldest
/// first, each with its ordinal (from 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct History {
    pub lineage: LineageDoc,
    pub claim: Option<Claim>,
    pub enumerations: Vec<Enumeration>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Enumeration {
    pub ordinal: usize,
    #[serde(flatten)]
    pub device: DeviceDoc,
}

/// `GET /v1/hosts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostList {
    pub hosts: Vec<HostDoc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostDoc {
    pub name: HostName,
    pub boot_id: Option<String>,
    pub agent_version: Option<String>,
    pub hypervisor_uri: Option<String>,
    pub agent_started: Option<Stamp>,
    pub last_seen: Stamp,
    /// How many of its devices the view holds.
    pub devices: usize,
    pub clashes: Vec<Clash>,
}

impl HostDoc {
    pub fn new(h: &Host, devices: usize) -> Self {
        Self {
            name: h.name.clone(),
            boot_id: h.boot_id.clone(),
            agent_version: h.agent_version.clone(),
            hypervisor_uri: h.hypervisor_uri.clone(),
            agent_started: h.agent_started,
            last_seen: h.last_seen,
            devices,
            clashes: h.clashes.clone(),
        }
    }
}

/// `GET /v1/quarantine`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuarantineList {
    pub total: u64,
    pub quarantine: Vec<QuarantineEntry>,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub last_applied_seq: u64,
    /// Whether the view has applied `min_seq` (true without it).
    pub reached: bool,
    pub stream_last_seq: Option<u64>,
    pub lag: Option<u64>,
    pub quarantined: u64,
}

/// An entry of a hypervisor's `usb_device_stats` (Nova's keys, usbpt's values).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NovaUsbDevice {
    pub id: DeviceId,
    pub compute_node_id: HostName,
    pub address: String,
    pub product_id: ProductId,
    pub vendor_id: VendorId,
    pub bus_id: u16,
    pub device_id: u16,
    pub port_id: PortPath,
    pub lineage_id: LineageId,
    pub status: DeviceStatus,
    pub extra_info: NovaExtraInfo,
    pub instance_uuid: Option<ServerId>,
}

/// `extra_info` of a `usb_device_stats` entry: absent keys are left out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NovaExtraInfo {
    #[serde(with = "kind_name")]
    pub lineage_kind: LineageKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manufacturer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor_db: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_db: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usb_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<Fingerprint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalidation_reason: Option<InvalidationReason>,
}

impl From<&Device> for NovaUsbDevice {
    fn from(d: &Device) -> Self {
        let x = &d.discovery;
        Self {
            id: x.device_id,
            compute_node_id: x.host.clone(),
            address: x.descriptors.address.nova_address(),
            product_id: x.descriptors.product_id,
            vendor_id: x.descriptors.vendor_id,
            bus_id: x.descriptors.address.bus(),
            device_id: x.descriptors.address.devnum(),
            port_id: x.descriptors.port_path.clone(),
            lineage_id: x.lineage_id,
            status: d.status,
            extra_info: NovaExtraInfo {
                lineage_kind: x.lineage_kind,
                serial: x.descriptors.serial.clone(),
                manufacturer: x.descriptors.manufacturer.clone(),
                product: x.descriptors.product.clone(),
                vendor_db: x.descriptors.vendor_db.clone(),
                model_db: x.descriptors.model_db.clone(),
                speed: x.descriptors.speed.clone(),
                usb_version: x.descriptors.usb_version.clone(),
                fingerprint: d.fingerprint,
                invalidation_reason: d.invalidation.and_then(|i| i.reason),
            },
            instance_uuid: d.holder,
        }
    }
}

/// `GET /v2.1/os-hypervisors/{host}`, the fields usbpt adds to Nova's (read side).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HypervisorShow {
    pub hypervisor: HypervisorView,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HypervisorView {
    pub hypervisor_hostname: HostName,
    pub agent_version: Option<String>,
    pub boot_id: Option<String>,
    pub hypervisor_uri: Option<String>,
    pub usb_device_stats: Vec<NovaUsbDevice>,
}

/// An entry of a server's `usb_devices`: what it asked for, and its device's live state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerUsb {
    pub request_index: u16,
    pub device_id: DeviceId,
    pub lineage_id: LineageId,
    /// The lineage's label (`usbpt label`).
    #[serde(default)]
    pub label: Option<String>,
    pub controller: ControllerModel,
    pub follow: FollowPolicy,
    /// `None` when the view no longer has the enumeration.
    pub status: Option<DeviceStatus>,
    pub address: Option<String>,
    pub host: Option<HostName>,
    /// Whether the lineage's claim is this server's.
    pub held: bool,
    /// "re-attach held: fingerprint changed": the lineage came back as `device_id` with
    /// fingerprint `seen` instead of `expected`; the agent waits for an accept
    /// (`usbpt fingerprint accept`, or the flavor's `on_fingerprint_change=follow`).
    #[serde(default)]
    pub reattach_held: Option<ReattachHeldDoc>,
}

/// A re-attach an agent held for a changed fingerprint (`DeviceReattachHeld`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReattachHeldDoc {
    pub reason: String,
    /// The new enumeration, not attached.
    pub device_id: DeviceId,
    pub expected: Fingerprint,
    pub seen: Fingerprint,
    pub seq: u64,
}

/// `GET /v2.1/servers` (read side).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ServerList {
    pub servers: Vec<ServerBrief>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ServerBrief {
    pub id: ServerId,
    pub name: String,
    /// Nova's status name (`ACTIVE`, `SHUTOFF`, …).
    pub status: String,
    pub host: Option<HostName>,
    pub flavor: FlavorRef,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FlavorRef {
    pub id: FlavorId,
    #[serde(default)]
    pub name: Option<String>,
}

/// `GET /v2.1/servers/{id}` (read side: usbpt's fields and the Nova fields the CLI shows).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ServerShow {
    pub server: ServerView,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ServerView {
    pub id: ServerId,
    pub name: String,
    pub status: String,
    pub state_detail: String,
    pub host: Option<HostName>,
    pub flavor: FlavorRef,
    pub usb_devices: Vec<ServerUsb>,
    pub schedule_failures: Vec<ScheduleFailure>,
    pub migration_refusals: Vec<MigrationRefusal>,
}

/// `GET /v2.1/flavors` (read side).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FlavorList {
    pub flavors: Vec<FlavorView>,
}

/// `GET /v2.1/flavors/{id}` (read side).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FlavorShow {
    pub flavor: FlavorView,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FlavorView {
    pub id: FlavorId,
    pub name: String,
    pub usb_devices: Vec<UsbRequest>,
    /// `hold` (the default) or `follow`.
    #[serde(default)]
    pub on_fingerprint_change: FingerprintPolicy,
    pub created: Stamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_go_on_the_wire_by_their_serde_names() {
        assert_eq!(wire_name(&InvalidationReason::HostRebooted), "HostRebooted");
        assert_eq!(wire_name(&AttachMethod::HotPlug), "HotPlug");
        assert_eq!(wire_name(&DeviceStatus::Attached), "attached");
        assert_eq!(
            wire_name(&usbpt_schemas::ReleaseReason::GraceExpired),
            "GraceExpired"
        );
    }

    /// A device document's descriptors stand in the document itself, with the address as Nova
    /// writes it and its two numbers beside it; the document reads back as it was written.
    #[test]
    fn a_device_document_has_the_nova_address_and_reads_back() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Doc {
            id: u32,
            #[serde(flatten, with = "descriptors_doc")]
            descriptors: UsbDescriptors,
            syspath: String,
        }
        let mut descriptors = UsbDescriptors::new(
            usbpt_schemas::UsbAddress::new(2, 3).expect("address"),
            "2-1.4".parse().expect("port"),
            VendorId(0x1050),
            ProductId(0x0407),
        );
        descriptors.serial = Some("0001".into());
        descriptors.interface_classes = vec![3, 11];
        let doc = Doc {
            id: 7,
            descriptors,
            syspath: "/sys/x".into(),
        };
        let json = serde_json::to_value(&doc).expect("writes");
        assert_eq!(json["address"], "usb_2_3");
        assert_eq!(
            (json["bus"].as_u64(), json["devnum"].as_u64()),
            (Some(2), Some(3))
        );
        assert_eq!(json["port_path"], "2-1.4");
        assert_eq!(json["vendor_id"], "1050");
        assert_eq!(json["serial"], "0001");
        assert_eq!(json["interface_classes"], serde_json::json!([3, 11]));
        assert_eq!(json["syspath"], "/sys/x");
        assert_eq!(
            serde_json::from_value::<Doc>(json.clone()).expect("reads"),
            doc
        );
        let mut bad = json;
        bad["devnum"] = 500.into();
        let err = serde_json::from_value::<Doc>(bad).expect_err("devnum out of range");
        assert!(
            err.to_string().contains("devnum") || err.to_string().contains("500"),
            "{err}"
        );
    }

    #[test]
    fn a_lineage_kind_reads_back_as_it_was_written_and_refuses_others() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct K {
            #[serde(with = "kind_name")]
            kind: LineageKind,
        }
        for (kind, text) in [
            (LineageKind::Serial, r#"{"kind":"serial"}"#),
            (LineageKind::Port, r#"{"kind":"port"}"#),
        ] {
            assert_eq!(serde_json::to_string(&K { kind }).expect("writes"), text);
            assert_eq!(serde_json::from_str::<K>(text).expect("reads"), K { kind });
        }
        let err = serde_json::from_str::<K>(r#"{"kind":"Serial"}"#).expect_err("Debug text");
        assert!(err.to_string().contains("Serial"), "{err}");
    }
}
