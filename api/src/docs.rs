//! The JSON documents the API serves, built from view records. Ids are strings, vendor and
//! product ids 4 hex digits, times RFC 3339; every time is paired with its stream sequence.

use serde_json::{json, Map, Value};
use usbpt_projector::{
    Claim, Device, Flavor, HoldEnd, Host, Lineage, QuarantineEntry, Server, Snapshot, ViewError,
};
use usbpt_schemas::{LineageKind, ServerState};

fn v<T: serde::Serialize>(x: &T) -> Value {
    serde_json::to_value(x).unwrap_or(Value::Null)
}

fn kind(k: LineageKind) -> &'static str {
    match k {
        LineageKind::Serial => "serial",
        LineageKind::Port => "port",
    }
}

/// One enumeration, everything the view knows of it.
pub fn device(d: &Device) -> Value {
    let x = &d.discovery;
    let holders: Vec<Value> = d
        .holders
        .iter()
        .map(|h| {
            json!({
                "server_id": h.server_id,
                "how": v(&h.how),
                "from": v(&h.from),
                "attached": v(&h.attached),
                "ended": h.ended.map(|(st, end)| {
                    let (reason, moved_to) = match end {
                        HoldEnd::Released(r) => (format!("released: {r:?}"), None),
                        HoldEnd::MovedTo(id) => ("moved to a new enumeration".to_owned(), Some(id)),
                    };
                    json!({"seq": st.seq, "at": st.at, "reason": reason, "moved_to": moved_to})
                }),
            })
        })
        .collect();
    json!({
        "id": x.device_id,
        "lineage_id": x.lineage_id,
        "lineage_kind": kind(x.lineage_kind),
        "host": x.host,
        "status": d.status.as_str(),
        "holder": d.holder,
        "current": d.current,
        "address": x.address.nova_address(),
        "bus": x.address.bus(),
        "devnum": x.address.devnum(),
        "port_path": x.port_path,
        "vendor_id": x.vendor_id,
        "product_id": x.product_id,
        "serial": x.serial,
        "device_class": x.device_class,
        "interface_classes": x.interface_classes,
        "manufacturer": x.manufacturer,
        "product": x.product,
        "vendor_db": x.vendor_db,
        "model_db": x.model_db,
        "speed": x.speed,
        "usb_version": x.usb_version,
        "syspath": x.syspath,
        "boot_id": x.boot_id,
        "supersedes": x.supersedes,
        "discovered": v(&d.discovered),
        "invalidation": d.invalidation.map(|i| json!({
            "seq": i.stamp.seq,
            "at": i.stamp.at,
            "reason": i.reason.map(|r| format!("{r:?}")),
            "superseded_by": i.superseded_by,
        })),
        "attachment": d.attachment.as_ref().map(|a| json!({
            "server_id": a.server_id,
            "address": a.address.nova_address(),
            "method": format!("{:?}", a.method),
            "detail": a.detail,
            "seq": a.stamp.seq,
            "at": a.stamp.at,
        })),
        "holders": holders,
        "attach_error": v(&d.attach_error),
        "last_change_seq": d.last_change_seq,
    })
}

/// A `usb_device_stats` entry of the Nova hypervisor document (the blueprint's shape).
pub fn nova_device(d: &Device) -> Value {
    let x = &d.discovery;
    let mut extra = Map::new();
    extra.insert("lineage_kind".into(), json!(kind(x.lineage_kind)));
    let optional = [
        ("serial", &x.serial),
        ("manufacturer", &x.manufacturer),
        ("product", &x.product),
        ("vendor_db", &x.vendor_db),
        ("model_db", &x.model_db),
        ("speed", &x.speed),
        ("usb_version", &x.usb_version),
    ];
    for (k, val) in optional {
        if let Some(s) = val {
            extra.insert(k.into(), json!(s));
        }
    }
    if let Some(r) = d.invalidation.and_then(|i| i.reason) {
        extra.insert("invalidation_reason".into(), json!(format!("{r:?}")));
    }
    json!({
        "id": x.device_id,
        "compute_node_id": x.host,
        "address": x.address.nova_address(),
        "product_id": x.product_id,
        "vendor_id": x.vendor_id,
        "bus_id": x.address.bus(),
        "device_id": x.address.devnum(),
        "port_id": x.port_path,
        "lineage_id": x.lineage_id,
        "status": d.status.as_str(),
        "extra_info": extra,
        "instance_uuid": d.holder,
    })
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
    json!({
        "name": h.name,
        "boot_id": h.boot_id,
        "agent_version": h.agent_version,
        "hypervisor_uri": h.hypervisor_uri,
        "agent_started": v(&h.agent_started),
        "last_seen": v(&h.last_seen),
        "devices": devices,
        "clashes": v(&h.clashes),
    })
}

pub fn lineage(l: &Lineage) -> Value {
    json!({
        "id": l.id,
        "kind": kind(l.kind),
        "vendor_id": l.vendor_id,
        "product_id": l.product_id,
        "serial": l.serial,
        "enumerations": l.enumerations,
        "current_device_id": l.current,
        "current_host": l.current_host,
        "first_seen": v(&l.first_seen),
    })
}

pub fn claim(c: &Claim) -> Value {
    v(c)
}

/// A lineage and every enumeration of it, oldest first, each with its ordinal.
pub fn history(l: &Lineage, claim_: Option<&Claim>, devices: &[Device]) -> Value {
    let enumerations: Vec<Value> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut doc = device(d);
            if let Value::Object(m) = &mut doc {
                m.insert("ordinal".into(), json!(i + 1));
            }
            doc
        })
        .collect();
    json!({
        "lineage": lineage(l),
        "claim": claim_.map(claim),
        "enumerations": enumerations,
    })
}

pub fn flavor(f: &Flavor) -> Value {
    json!({
        "id": f.id,
        "name": f.name,
        "usb_devices": v(&f.usb),
        "created": v(&f.created),
        "deleted": v(&f.deleted),
        "links": [],
    })
}

/// Nova's status names.
pub fn nova_status(s: &Server) -> &'static str {
    if s.deleted.is_some() {
        return "DELETED";
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

/// A server in the list (`GET /v2.1/servers`).
pub fn server_brief(s: &Server) -> Value {
    json!({
        "id": s.id,
        "name": s.name,
        "status": nova_status(s),
        "host": s.host,
        "flavor": {"id": s.flavor_id},
        "links": [],
    })
}

/// A server in full, with its devices' live status read from the same snapshot.
pub fn server(snap: &Snapshot, s: &Server) -> Result<Value, ViewError> {
    let mut usb = Vec::new();
    for a in &s.devices {
        let d = snap.device(&a.device_id)?;
        let held = snap
            .claim(&a.lineage_id)?
            .is_some_and(|c| c.server_id == s.id);
        usb.push(json!({
            "request_index": a.request_index,
            "device_id": a.device_id,
            "lineage_id": a.lineage_id,
            "controller": a.controller,
            "follow": a.follow,
            "status": d.as_ref().map(|d| d.status.as_str()),
            "address": d.as_ref().map(|d| d.address().nova_address()),
            "host": d.as_ref().map(|d| d.host().clone()),
            "held": held,
        }));
    }
    let flavor_name = snap.flavor_by_id(&s.flavor_id)?.map(|f| f.name);
    let fault = s.schedule_failures.last().map(|f| {
        json!({
            "code": 500,
            "message": f.reason,
            "details": v(&f.host_rejections),
            "created": f.stamp.at,
        })
    });
    Ok(json!({
        "id": s.id,
        "name": s.name,
        "status": nova_status(s),
        "state": v(&s.state),
        "state_detail": s.state_detail,
        "state_changed": v(&s.state_changed),
        "flavor": {"id": s.flavor_id, "name": flavor_name},
        "OS-EXT-SRV-ATTR:host": s.host,
        "host": s.host,
        "requested_host": s.requested_host,
        "created": v(&s.created),
        "scheduled": v(&s.scheduled),
        "usb_devices": usb,
        "fault": fault,
        "schedule_failures": v(&s.schedule_failures),
        "schedule_failures_total": s.schedule_failures_total,
        "migration_refusals": v(&s.migration_refusals),
        "migration_refusals_total": s.migration_refusals_total,
        "moves": v(&s.moves),
        "last_action": v(&s.last_action),
        "deleted": v(&s.deleted),
        "last_change_seq": s.last_change_seq,
        "links": [],
    }))
}

pub fn quarantine(q: &QuarantineEntry) -> Value {
    v(q)
}
