//! Nova's hypervisor, compute-service and aggregate routes over usbpt's hosts: every host an
//! agent ever reported is a hypervisor and a `nova-compute` service. Documents follow the
//! negotiated microversion (integer ids before 2.53, UUIDs from it; CPU/RAM/disk statistics,
//! `/statistics` and `/{id}/uptime` before 2.88, `uptime` in the document from it). usbpt tracks
//! no CPU, RAM or disk: those read 0. usbpt's `usb_device_stats` is in every document.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Map, Value};
use usbpt_projector::{Host, Snapshot};
use usbpt_schemas::{HostName, Timestamp};

use crate::liveness::Liveness;
use crate::nova::{hypervisor_uuid, service_uuid, Nova};
use crate::{docs, flag, read, ApiError, ApiResult, ApiState};

/// Nova's resource counters before 2.88, which usbpt does not track: reported as 0 in the
/// hypervisor documents and the statistics alike.
const UNTRACKED_COUNTERS: [&str; 10] = [
    "vcpus",
    "memory_mb",
    "local_gb",
    "vcpus_used",
    "memory_mb_used",
    "local_gb_used",
    "free_ram_mb",
    "free_disk_gb",
    "current_workload",
    "disk_available_least",
];

/// Whether the host's agent is up: from its heartbeats when `serve` follows them (ADR 0008),
/// else once an agent has announced itself there (`HostAgentStarted`).
fn state(h: &Host, live: Option<&Liveness>) -> &'static str {
    let up = match live {
        Some(l) => l.up(&h.name),
        None => h.agent_started.is_some(),
    };
    if up {
        "up"
    } else {
        "down"
    }
}

/// Nova's `hypervisor_type` from the agent's libvirt URI (`qemu:///system` → `QEMU`).
fn hypervisor_type(h: &Host) -> String {
    match h
        .hypervisor_uri
        .as_deref()
        .and_then(|u| u.split(':').next())
    {
        Some("qemu") | None => "QEMU".into(),
        Some(other) => other.to_owned(),
    }
}

/// The hosts in name order, each with its 1-based position (the integer id before 2.53).
fn hosts(snap: &Snapshot) -> Result<Vec<(usize, Host)>, ApiError> {
    let mut hosts = snap.hosts()?;
    hosts.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(hosts
        .into_iter()
        .enumerate()
        .map(|(i, h)| (i + 1, h))
        .collect())
}

fn hypervisor_id(nova: &Nova, n: usize, h: &Host) -> Value {
    if nova.version.at_least(53) {
        json!(hypervisor_uuid(&h.name))
    } else {
        json!(n)
    }
}

fn service_id(nova: &Nova, n: usize, h: &Host) -> Value {
    if nova.version.at_least(53) {
        json!(service_uuid(&h.name))
    } else {
        json!(n)
    }
}

/// Finds a hypervisor by UUID, integer id or host name.
fn find(snap: &Snapshot, id: &str) -> Result<(usize, Host), ApiError> {
    if id.parse::<HostName>().is_err() && id.parse::<uuid::Uuid>().is_err() {
        return Err(ApiError::bad_request(format!(
            "invalid hypervisor id {id:?}: expected a UUID, an integer id or a host name"
        )));
    }
    let found = hosts(snap)?.into_iter().find(|(n, h)| {
        h.name.as_str() == id
            || n.to_string() == id
            || hypervisor_uuid(&h.name).to_string() == id.to_ascii_lowercase()
    });
    found.ok_or_else(|| {
        ApiError::not_found(format!(
            "Hypervisor {id} could not be found (no agent or device was ever reported for it)"
        ))
    })
}

/// `uptime`'s output, from the agent's start to now: `HH:MM:SS up D days, HH:MM,  0 users,
/// load average: 0.00, 0.00, 0.00`.
fn uptime(h: &Host) -> Option<String> {
    let started = h.agent_started?.at;
    let now = Timestamp::now();
    let secs = (now.as_micros() - started.as_micros()).max(0) / 1_000_000;
    let clock = now.as_micros().div_euclid(1_000_000).rem_euclid(86_400);
    let (days, hours, mins) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    Some(format!(
        "{:02}:{:02}:{:02} up {days} days, {hours:2}:{mins:02},  0 users,  load average: 0.00, \
         0.00, 0.00",
        clock / 3600,
        clock % 3600 / 60,
        clock % 60
    ))
}

fn running_vms(snap: &Snapshot, host: &HostName) -> Result<Vec<Value>, ApiError> {
    Ok(snap
        .servers(false)?
        .into_iter()
        .filter(|s| s.host.as_ref() == Some(host))
        .map(|s| json!({"uuid": s.id, "name": s.name}))
        .collect())
}

/// One hypervisor: the list entry, or with `detail` the full document.
fn doc(
    snap: &Snapshot,
    nova: &Nova,
    (n, h): &(usize, Host),
    detail: bool,
    with_servers: bool,
    live: Option<&Liveness>,
) -> Result<Value, ApiError> {
    let mut m = Map::new();
    m.insert("id".into(), hypervisor_id(nova, *n, h));
    m.insert("hypervisor_hostname".into(), json!(h.name));
    m.insert("state".into(), json!(state(h, live)));
    m.insert("status".into(), json!("enabled"));
    let servers = running_vms(snap, &h.name)?;
    if detail {
        let devices = snap.host_devices(&h.name)?;
        if let Value::Object(usbpt) = &docs::hypervisor(h, &devices)["hypervisor"] {
            for (k, val) in usbpt {
                if k != "id" {
                    m.insert(k.clone(), val.clone());
                }
            }
        }
        m.insert("hypervisor_type".into(), json!(hypervisor_type(h)));
        m.insert("hypervisor_version".into(), json!(0));
        m.insert("host_ip".into(), Value::Null);
        m.insert(
            "service".into(),
            json!({"host": h.name, "id": service_id(nova, *n, h), "disabled_reason": null}),
        );
        if nova.version.at_least(88) {
            m.insert("uptime".into(), json!(uptime(h)));
        } else {
            for k in UNTRACKED_COUNTERS {
                m.insert(k.into(), json!(0));
            }
            m.insert("running_vms".into(), json!(servers.len()));
            m.insert(
                "cpu_info".into(),
                if nova.version.at_least(28) {
                    json!({})
                } else {
                    json!("{}")
                },
            );
        }
    }
    if with_servers && !servers.is_empty() {
        m.insert("servers".into(), json!(servers));
    }
    Ok(Value::Object(m))
}

async fn list_inner(
    st: ApiState,
    nova: Nova,
    q: HashMap<String, String>,
    detail: bool,
) -> ApiResult {
    let pattern = q.get("hypervisor_hostname_pattern").cloned();
    let with_servers = flag(&q, "with_servers")?;
    let live = st.liveness.clone();
    read(&st, move |snap| {
        let mut out = Vec::new();
        for entry in hosts(snap)? {
            if pattern
                .as_deref()
                .is_some_and(|p| !entry.1.name.as_str().contains(p))
            {
                continue;
            }
            out.push(doc(
                snap,
                &nova,
                &entry,
                detail,
                with_servers,
                live.as_deref(),
            )?);
        }
        if let Some(p) = &pattern {
            if out.is_empty() {
                return Err(ApiError::not_found(format!(
                    "No hypervisor matching '{p}' could be found."
                )));
            }
        }
        Ok(Json(json!({"hypervisors": out})))
    })
    .await
}

/// `GET /v2.1/os-hypervisors[?hypervisor_hostname_pattern=P&with_servers=true]`.
pub async fn list(
    State(st): State<ApiState>,
    nova: Nova,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    list_inner(st, nova, q, false).await
}

/// `GET /v2.1/os-hypervisors/detail`.
pub async fn detail(
    State(st): State<ApiState>,
    nova: Nova,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    list_inner(st, nova, q, true).await
}

/// `GET /v2.1/os-hypervisors/{id}`: by UUID, integer id or host name.
pub async fn show(
    State(st): State<ApiState>,
    nova: Nova,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let with_servers = flag(&q, "with_servers")?;
    let live = st.liveness.clone();
    read(&st, move |snap| {
        let entry = find(snap, &id)?;
        Ok(Json(
            json!({"hypervisor": doc(snap, &nova, &entry, true, with_servers, live.as_deref())?}),
        ))
    })
    .await
}

/// `GET /v2/{tenant}/os-hypervisors/{id}`, the legacy tenant path.
pub async fn show_tenant(
    st: State<ApiState>,
    nova: Nova,
    Path((_tenant, id)): Path<(String, String)>,
    q: Query<HashMap<String, String>>,
) -> ApiResult {
    show(st, nova, Path(id), q).await
}

fn gone_at_2_88(nova: &Nova, what: &str) -> Result<(), ApiError> {
    if nova.version.at_least(88) {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("{what} was removed in microversion 2.88"),
        ))
    } else {
        Ok(())
    }
}

/// `GET /v2.1/os-hypervisors/{id}/uptime` (before 2.88).
pub async fn show_uptime(
    State(st): State<ApiState>,
    nova: Nova,
    Path(id): Path<String>,
) -> ApiResult {
    gone_at_2_88(&nova, "os-hypervisors/{id}/uptime")?;
    let live = st.liveness.clone();
    read(&st, move |snap| {
        let (n, h) = find(snap, &id)?;
        Ok(Json(json!({"hypervisor": {
            "id": hypervisor_id(&nova, n, &h),
            "hypervisor_hostname": h.name,
            "state": state(&h, live.as_deref()),
            "status": "enabled",
            "uptime": uptime(&h),
        }})))
    })
    .await
}

/// `GET /v2.1/os-hypervisors/statistics` (before 2.88).
pub async fn statistics(State(st): State<ApiState>, nova: Nova) -> ApiResult {
    gone_at_2_88(&nova, "os-hypervisors/statistics")?;
    read(&st, move |snap| {
        let hosts = hosts(snap)?;
        let running = snap
            .servers(false)?
            .iter()
            .filter(|s| s.host.is_some())
            .count();
        let mut m = Map::new();
        m.insert("count".into(), json!(hosts.len()));
        m.insert("running_vms".into(), json!(running));
        for k in UNTRACKED_COUNTERS {
            m.insert(k.into(), json!(0));
        }
        Ok(Json(json!({"hypervisor_statistics": m})))
    })
    .await
}

/// `GET /v2.1/os-services[?binary=nova-compute&host=H]`: one `nova-compute` per host.
pub async fn services(
    State(st): State<ApiState>,
    nova: Nova,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let live = st.liveness.clone();
    read(&st, move |snap| {
        let mut out = Vec::new();
        if q.get("binary").is_some_and(|b| b != "nova-compute") {
            return Ok(Json(json!({"services": out})));
        }
        for (n, h) in hosts(snap)? {
            if q.get("host").is_some_and(|want| want != h.name.as_str()) {
                continue;
            }
            let mut s = json!({
                "id": service_id(&nova, n, &h),
                "binary": "nova-compute",
                "host": h.name,
                "zone": "nova",
                "status": "enabled",
                "state": state(&h, live.as_deref()),
                "updated_at": h.last_seen.at,
                "disabled_reason": null,
            });
            if nova.version.at_least(11) {
                s["forced_down"] = json!(false);
            }
            out.push(s);
        }
        Ok(Json(json!({"services": out})))
    })
    .await
}

/// `GET /v2.1/os-aggregates`: usbpt has no host aggregates.
pub async fn aggregates() -> Json<Value> {
    Json(json!({"aggregates": []}))
}
