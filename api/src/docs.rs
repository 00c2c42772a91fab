//! The JSON documents the API serves, built from view records: usbpt's own as the typed
//! documents of [`crate::doc`], Nova's (flavors, servers, hypervisors, whose keys depend on the
//! microversion) here, with usbpt's typed parts.

use serde_json::{json, Map, Value};
use usbpt_projector::{Alarm, Claim, Device, Flavor, Host, Lineage, Server, Snapshot, ViewError};
use usbpt_schemas::{DeviceSelector, FingerprintPolicy, HostName, ServerState, UsbRequest};

use crate::doc;
use crate::nova::Nova;

/// A document as JSON (documents are plain data: serializing cannot fail).
pub(crate) fn v<T: serde::Serialize>(x: &T) -> Value {
    serde_json::to_value(x).unwrap_or(Value::Null)
}

/// One enumeration, everything the view knows of it ([`doc::DeviceDoc`]).
pub fn device(d: &Device) -> Value {
    v(&doc::DeviceDoc::from(d))
}

/// A `usb_device_stats` entry of the Nova hypervisor document ([`doc::NovaUsbDevice`]).
pub fn nova_device(d: &Device) -> Value {
    v(&doc::NovaUsbDevice::from(d))
}

/// `GET /v2.1/os-hypervisors/{host}`.
pub fn hypervisor(host: &Host, devices: &[Device]) -> Value {
    json!({"hypervisor": {
        "hypervisor_hostname": host.name,
        "id": host.name,
        "hypervisor_uri": host.hypervisor_uri,
        "boot_id": host.boot_id,
        "agent_version": host.agent_version,
        "last_seen": v(&host.last_seen),
        "usb_device_stats": devices.iter().map(nova_device).collect::<Vec<_>>(),
    }})
}

pub fn host(h: &Host, devices: usize) -> Value {
    v(&doc::HostDoc::new(h, devices))
}

/// A lineage, with its alarms ([`doc::LineageDoc`]).
pub fn lineage(l: &Lineage) -> Value {
    v(&doc::LineageDoc::from(l))
}

/// One alarm of a lineage (`GET /v1/alarms`, and on lineage documents; [`doc::AlarmDoc`]).
pub fn alarm(l: &Lineage, a: &Alarm) -> Value {
    v(&doc::AlarmDoc::new(l, a))
}

pub fn claim(c: &Claim) -> Value {
    v(c)
}

/// A lineage and every enumeration of it, oldest first, each with its ordinal.
pub fn history(l: &Lineage, claim_: Option<&Claim>, devices: &[Device]) -> Value {
    v(&doc::History {
        lineage: doc::LineageDoc::from(l),
        claim: claim_.cloned(),
        enumerations: devices
            .iter()
            .enumerate()
            .map(|(i, d)| doc::Enumeration {
                ordinal: i + 1,
                device: doc::DeviceDoc::from(d),
            })
            .collect(),
    })
}

/// A flavor's USB request in its extra-spec form: a JSON list of objects, each with
/// `id`, `lineage_id`, or `vendor_id` + `product_id` (+ `serial`, `count`), and `controller`,
/// `follow`.
pub fn usb_spec(usb: &[UsbRequest]) -> Value {
    Value::Array(
        usb.iter()
            .map(|r| {
                let mut m = Map::new();
                match &r.selector {
                    DeviceSelector::Enumeration(d) => {
                        m.insert("id".into(), json!(d));
                    }
                    DeviceSelector::Lineage(l) => {
                        m.insert("lineage_id".into(), json!(l));
                    }
                    DeviceSelector::Match {
                        vendor_id,
                        product_id,
                        serial,
                        count,
                    } => {
                        m.insert("vendor_id".into(), v(vendor_id));
                        m.insert("product_id".into(), v(product_id));
                        if let Some(s) = serial {
                            m.insert("serial".into(), json!(s));
                        }
                        m.insert("count".into(), json!(count));
                    }
                }
                m.insert("controller".into(), v(&r.controller));
                m.insert("follow".into(), v(&r.follow));
                Value::Object(m)
            })
            .collect(),
    )
}

/// A flavor's extra specs: `usb_devices` (a JSON string, as extra specs are strings) when it
/// asks for devices.
/// The flavor's extra specs: `usb_devices` when it asks for devices, and
/// `usb:on_fingerprint_change` when it is not the default (hold).
pub fn extra_specs(f: &Flavor) -> Value {
    let mut specs = serde_json::Map::new();
    if !f.usb.is_empty() {
        specs.insert("usb_devices".into(), usb_spec(&f.usb).to_string().into());
    }
    if f.on_fingerprint_change != FingerprintPolicy::default() {
        specs.insert(
            "usb:on_fingerprint_change".into(),
            f.on_fingerprint_change.as_str().into(),
        );
    }
    Value::Object(specs)
}

/// A flavor, Nova's fields (`ram`, `vcpus`, `disk` as recorded at creation, shown and not
/// scheduled on) and usbpt's.
pub fn flavor(f: &Flavor, nova: &Nova) -> Value {
    let mut doc = json!({
        "id": f.id,
        "name": f.name,
        "ram": f.ram_mb,
        "vcpus": f.vcpus,
        "disk": f.disk_gb,
        "swap": if nova.version.at_least(75) { json!(0) } else { json!("") },
        "OS-FLV-EXT-DATA:ephemeral": 0,
        "OS-FLV-DISABLED:disabled": f.deleted.is_some(),
        "os-flavor-access:is_public": true,
        "rxtx_factor": 1.0,
        "links": nova.links(&format!("flavors/{}", f.id)),
        "usb_devices": v(&f.usb),
        "on_fingerprint_change": f.on_fingerprint_change.as_str(),
        "created": v(&f.created),
        "deleted": v(&f.deleted),
    });
    if let Value::Object(m) = &mut doc {
        if nova.version.at_least(55) {
            m.insert("description".into(), Value::Null);
        }
        if nova.version.at_least(61) {
            m.insert("extra_specs".into(), extra_specs(f));
        }
    }
    doc
}

/// A resize awaits confirmation and the server runs its new flavor (or is off): Nova's
/// `VERIFY_RESIZE` (vm_state `resized`). An error or a power transition shows as itself.
fn verifying(s: &Server) -> bool {
    s.resize_from.is_some() && matches!(s.state, ServerState::Active | ServerState::Shutoff)
}

/// Nova's status names.
pub fn nova_status(s: &Server) -> &'static str {
    if s.deleted.is_some() {
        return "DELETED";
    }
    if verifying(s) {
        return "VERIFY_RESIZE";
    }
    match s.state {
        ServerState::Building => "BUILD",
        ServerState::Active => "ACTIVE",
        ServerState::Shutoff => "SHUTOFF",
        ServerState::Paused => "PAUSED",
        ServerState::Suspended => "SUSPENDED",
        ServerState::Rebooting => "REBOOT",
        ServerState::Error => "ERROR",
    }
}

/// Nova's `OS-EXT-STS` triple: vm_state, task_state, power_state.
fn nova_states(s: &Server) -> (&'static str, Option<&'static str>, u8) {
    if s.deleted.is_some() {
        return ("deleted", None, 0);
    }
    if verifying(s) {
        return ("resized", None, 1);
    }
    match s.state {
        ServerState::Building => ("building", Some("scheduling"), 0),
        ServerState::Active => ("active", None, 1),
        ServerState::Shutoff => ("stopped", None, 4),
        ServerState::Paused => ("paused", None, 3),
        ServerState::Suspended => ("suspended", None, 7),
        ServerState::Rebooting => ("active", Some("rebooting"), 1),
        ServerState::Error => ("error", None, 0),
    }
}

/// The project and user every server belongs to: usbpt has no identity service.
pub const TENANT_ID: &str = "usbpt";
pub const USER_ID: &str = "usbpt";

/// A server in the list (`GET /v2.1/servers`).
pub fn server_brief(s: &Server, nova: &Nova) -> Value {
    json!({
        "id": s.id,
        "name": s.name,
        "status": nova_status(s),
        "host": s.host,
        "flavor": {"id": s.flavor_id},
        "links": nova.links(&format!("servers/{}", s.id)),
    })
}

/// Nova's `hostId`: an opaque hash of the host (and project), empty when unplaced.
fn host_id(host: Option<&HostName>) -> String {
    host.map_or_else(String::new, |h| {
        crate::nova::hypervisor_uuid(h).simple().to_string()
    })
}

/// A server in full, Nova's fields and usbpt's, with its devices' live status read from the
/// same snapshot.
pub fn server(snap: &Snapshot, s: &Server, nova: &Nova) -> Result<Value, ViewError> {
    let mut usb = Vec::new();
    for a in &s.devices {
        let d = snap.device(&a.device_id)?;
        let held = snap
            .claim(&a.lineage_id)?
            .is_some_and(|c| c.server_id == s.id);
        usb.push(doc::ServerUsb {
            request_index: a.request_index,
            device_id: a.device_id,
            lineage_id: a.lineage_id,
            label: snap.lineage(&a.lineage_id)?.and_then(|l| l.label),
            controller: a.controller,
            follow: a.follow,
            status: d.as_ref().map(|d| d.status),
            address: d.as_ref().map(|d| d.address().nova_address()),
            host: d.as_ref().map(|d| d.host().clone()),
            held,
            reattach_held: s
                .reattach_held
                .iter()
                .find(|h| h.lineage_id == a.lineage_id)
                .map(|h| doc::ReattachHeldDoc {
                    reason: "re-attach held: fingerprint changed".into(),
                    device_id: h.device_id,
                    expected: h.expected,
                    seen: h.seen,
                    seq: h.stamp.seq,
                }),
        });
    }
    let flavor = snap.flavor_by_id(&s.flavor_id)?;
    let flavor_name = flavor.as_ref().map(|f| f.name.clone());
    let flavor_doc = if nova.version.at_least(47) {
        json!({
            "id": s.flavor_id,
            "name": flavor_name,
            "original_name": flavor_name,
            "vcpus": flavor.as_ref().map_or(0, |f| f.vcpus),
            "ram": flavor.as_ref().map_or(0, |f| f.ram_mb),
            "disk": flavor.as_ref().map_or(0, |f| f.disk_gb),
            "ephemeral": 0, "swap": 0,
            "extra_specs": flavor.as_ref().map_or_else(|| json!({}), extra_specs),
        })
    } else {
        json!({
            "id": s.flavor_id,
            "name": flavor_name,
            "links": nova.links(&format!("flavors/{}", s.flavor_id)),
        })
    };
    let status = nova_status(s);
    let (vm_state, task_state, power_state) = nova_states(s);
    let mut updated = s.state_changed.at.max(s.created.at);
    if let Some(d) = s.deleted {
        updated = updated.max(d.at);
    }
    let mut doc = json!({
        "id": s.id,
        "name": s.name,
        "status": status,
        "tenant_id": TENANT_ID,
        "user_id": USER_ID,
        "hostId": host_id(s.host.as_ref()),
        "metadata": {},
        "image": "",
        "addresses": {},
        "flavor": flavor_doc,
        "created": s.created.at,
        "updated": updated,
        "links": nova.links(&format!("servers/{}", s.id)),
        "key_name": null,
        "accessIPv4": "",
        "accessIPv6": "",
        "config_drive": "",
        "progress": 0,
        "OS-DCF:diskConfig": "MANUAL",
        "OS-EXT-AZ:availability_zone": "nova",
        "OS-EXT-STS:vm_state": vm_state,
        "OS-EXT-STS:task_state": task_state,
        "OS-EXT-STS:power_state": power_state,
        "OS-EXT-SRV-ATTR:host": s.host,
        "OS-EXT-SRV-ATTR:hypervisor_hostname": s.host,
        "OS-EXT-SRV-ATTR:instance_name": format!("usbpt-{}", s.id),
        "OS-SRV-USG:launched_at": s.scheduled.map(|st| st.at),
        "OS-SRV-USG:terminated_at": s.deleted.map(|st| st.at),
        "os-extended-volumes:volumes_attached": [],
        "host": s.host,
        "requested_host": s.requested_host,
        "state": v(&s.state),
        "state_detail": s.state_detail,
        "state_changed": v(&s.state_changed),
        "created_seq": s.created.seq,
        "scheduled": v(&s.scheduled),
        "usb_devices": v(&usb),
        "schedule_failures": v(&s.schedule_failures),
        "schedule_failures_total": s.schedule_failures_total,
        "migration_refusals": v(&s.migration_refusals),
        "migration_refusals_total": s.migration_refusals_total,
        "moves": v(&s.moves),
        "last_action": v(&s.last_action),
        "deleted": v(&s.deleted),
        "last_change_seq": s.last_change_seq,
    });
    if let Value::Object(m) = &mut doc {
        if status == "ERROR" {
            if let Some(f) = s.schedule_failures.last() {
                m.insert(
                    "fault".into(),
                    json!({
                        "code": 500,
                        "message": f.reason,
                        "details": v(&f.host_rejections),
                        "created": f.stamp.at,
                    }),
                );
            }
        }
        if nova.version.at_least(9) {
            m.insert("locked".into(), json!(false));
        }
        if nova.version.at_least(16) {
            m.insert(
                "host_status".into(),
                json!(if s.host.is_some() { "UP" } else { "" }),
            );
        }
        if nova.version.at_least(19) {
            m.insert("description".into(), json!(s.description));
        }
        if nova.version.at_least(26) {
            m.insert("tags".into(), json!([]));
        }
        if nova.version.at_least(63) {
            m.insert("trusted_image_certificates".into(), Value::Null);
        }
        if nova.version.at_least(71) {
            m.insert("server_groups".into(), json!([]));
        }
        if nova.version.at_least(73) {
            m.insert("locked_reason".into(), Value::Null);
        }
    }
    Ok(doc)
}
