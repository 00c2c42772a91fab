//! Fleet-wide identity over HTTP (issue 18 items 3–5), with typed documents the CLI reads back:
//!
//! - `GET /v1/lineages/{id}`: a lineage with its label and alarms ([`LineageDoc`]);
//! - `PUT /v1/lineages/{id}/label` `{"label": "ERP key #3"}` (or `{"label": null}`) and
//!   `DELETE /v1/lineages/{id}/label`: the `label_lineage` command (400 naming `label`, 404 for
//!   an unknown lineage);
//! - `POST /v1/lineages/{id}/conflict/resolve` `{"keep": "HOST"}`: the `resolve_conflict`
//!   command (404 for an unknown lineage, 409 without an active `lineage_conflict`, 400 naming
//!   `keep` for a host that is neither side);
//! - `POST /v1/lineages/{id}/fingerprint/accept` (no body, or `{}`): the `accept_fingerprint`
//!   command (404 for an unknown lineage, 409 without an active `fingerprint_changed`);
//! - `GET /v1/lineages/{id}/custody[?since=T&until=T]`: the custody ledger ([`CustodyDoc`]);
//! - `GET /v1/find?serial=&vendor=&product=&label=&fingerprint=`: where matching devices are,
//!   present or gone ([`FindDoc`]).
//!
//! `{id}` is a lineage id, a device id (its lineage) or an exact label (409 when several
//! lineages carry it).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use usbpt_commands::handler::Handler;
use usbpt_projector::{
    CustodyInterval, DeviceStatus, FindError, FindQuery, Found, Lineage, Snapshot, Stamp, View,
};
use usbpt_schemas::commands::Command;
use usbpt_schemas::{
    DeviceId, HostName, InvalidationReason, LineageId, LineageKind, PortPath, ProductId, ServerId,
    ServerName, Timestamp, VendorId,
};

use crate::doc::LineageDoc;
use crate::{parse, read, ApiError, ApiState};

/// `{"lineage": …}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineageEnvelope {
    pub lineage: LineageDoc,
}

/// The body of `PUT /v1/lineages/{id}/label`: `null` removes the label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelBody {
    pub label: Option<String>,
}

/// The body of `POST /v1/lineages/{id}/conflict/resolve`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveBody {
    /// The host whose enumeration keeps the lineage.
    pub keep: HostName,
}

/// `GET /v1/lineages/{id}/custody`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustodyDoc {
    pub lineage: LineageDoc,
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
    /// Every interval overlapping `[since, until]`, in the order they began.
    pub intervals: Vec<CustodyInterval>,
}

/// Where one device is (or was last).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FoundDoc {
    pub lineage_id: LineageId,
    pub lineage_kind: LineageKind,
    pub label: Option<String>,
    pub vendor_id: VendorId,
    pub product_id: ProductId,
    pub serial: Option<String>,
    /// Whether it is there now; `false`: gone, and the fields below are its last known place.
    pub present: bool,
    pub host: HostName,
    pub port_path: PortPath,
    /// `bus:devnum` of its newest enumeration.
    pub address: String,
    pub device_id: DeviceId,
    pub status: DeviceStatus,
    pub holder: Option<ServerId>,
    pub holder_name: Option<ServerName>,
    /// When it went, for a gone device.
    pub gone_reason: Option<InvalidationReason>,
    /// Its invalidation when gone, else its host's last event.
    pub last_seen: Stamp,
}

/// `GET /v1/find`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FindDoc {
    pub query: FindQuery,
    /// Present devices first, then gone ones.
    pub devices: Vec<FoundDoc>,
}

/// The read routes (merged into [`crate::router`]).
pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/lineages/{id}", get(lineage))
        .route("/v1/lineages/{id}/custody", get(custody))
        .route("/v1/find", get(find))
}

#[derive(Debug, Clone)]
struct LabelState {
    handler: Arc<Handler<View>>,
    view: Arc<View>,
}

/// The lineage command routes (label, conflict resolve, fingerprint accept) over an
/// in-process command handler (merged into [`crate::command_routes`]).
pub fn label_routes(handler: Arc<Handler<View>>, view: Arc<View>) -> Router {
    Router::new()
        .route(
            "/v1/lineages/{id}/label",
            put(put_label).delete(delete_label),
        )
        .route("/v1/lineages/{id}/conflict/resolve", post(resolve_conflict))
        .route(
            "/v1/lineages/{id}/fingerprint/accept",
            post(accept_fingerprint),
        )
        .with_state(LabelState { handler, view })
}

/// The lineage `id` names: a lineage id, a device id (its lineage) or an exact label.
pub(crate) fn resolve(snap: &Snapshot, id: &str) -> Result<Lineage, ApiError> {
    if let Ok(uuid) = id.parse::<DeviceId>() {
        let lineage = match snap.device(&uuid)? {
            Some(d) => d.lineage_id(),
            None => LineageId::from_uuid(uuid.0),
        };
        return snap
            .lineage(&lineage)?
            .ok_or_else(|| ApiError::not_found(format!("lineage {id} not found")));
    }
    match &snap.lineages_labeled(id)?[..] {
        [one] => snap
            .lineage(one)?
            .ok_or_else(|| ApiError::not_found(format!("lineage {one} not found"))),
        [] => Err(ApiError::not_found(format!(
            "no lineage or label {}",
            usbpt_schemas::shown(id)
        ))),
        many => Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            format!(
                "label {} names {} lineages; use a lineage id: {}",
                usbpt_schemas::shown(id),
                many.len(),
                many.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

async fn lineage(State(st): State<ApiState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    read(&st, move |snap| {
        let l = resolve(snap, &id)?;
        Ok(Json(LineageEnvelope {
            lineage: LineageDoc::from(&l),
        })
        .into_response())
    })
    .await
}

fn time(q: &HashMap<String, String>, name: &str) -> Result<Option<Timestamp>, ApiError> {
    q.get(name).map(|s| parse(name, s)).transpose()
}

async fn custody(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let since = time(&q, "since")?;
    let until = time(&q, "until")?;
    read(&st, move |snap| {
        let l = resolve(snap, &id)?;
        let intervals = snap
            .custody(&l.id)?
            .into_iter()
            .filter(|i| i.overlaps(since, until))
            .collect();
        Ok(Json(CustodyDoc {
            lineage: LineageDoc::from(&l),
            since,
            until,
            intervals,
        })
        .into_response())
    })
    .await
}

/// The query string of `GET /v1/find`, each key parsed with a 400 naming it.
fn find_query(q: &HashMap<String, String>) -> Result<FindQuery, ApiError> {
    const KEYS: [&str; 5] = ["serial", "vendor", "product", "label", "fingerprint"];
    if let Some(other) = q.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(ApiError::bad_request(format!(
            "unknown query parameter {}: use {}",
            usbpt_schemas::shown(other),
            KEYS.join(", ")
        )));
    }
    Ok(FindQuery {
        serial: q.get("serial").cloned(),
        vendor: q.get("vendor").map(|s| parse("vendor", s)).transpose()?,
        product: q.get("product").map(|s| parse("product", s)).transpose()?,
        label: q.get("label").cloned(),
        fingerprint: q.get("fingerprint").cloned(),
    })
}

fn found_doc(snap: &Snapshot, f: &Found) -> Result<FoundDoc, ApiError> {
    let d = &f.current;
    let holder_name = match d.holder {
        Some(s) => snap.server_by_id(&s)?.map(|s| s.name),
        None => None,
    };
    Ok(FoundDoc {
        lineage_id: f.lineage.id,
        lineage_kind: f.lineage.kind,
        label: f.lineage.label.clone(),
        vendor_id: f.lineage.vendor_id,
        product_id: f.lineage.product_id,
        serial: d.serial().map(str::to_owned),
        present: f.present(),
        host: d.host().clone(),
        port_path: d.port_path().clone(),
        address: d.address().nova_address(),
        device_id: d.id(),
        status: d.status,
        holder: d.holder,
        holder_name,
        gone_reason: d.invalidation.and_then(|i| i.reason),
        last_seen: f.last_seen,
    })
}

async fn find(
    State(st): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let query = find_query(&q)?;
    read(&st, move |snap| {
        let found = snap.find(&query).map_err(|e| match e {
            FindError::View(v) => ApiError::from(v),
            other => ApiError::bad_request(other.to_string()),
        })?;
        let devices = found
            .iter()
            .map(|f| found_doc(snap, f))
            .collect::<Result<_, _>>()?;
        Ok(Json(FindDoc { query, devices }).into_response())
    })
    .await
}

async fn put_label(
    State(st): State<LabelState>,
    origin: crate::commands::HttpOrigin,
    Path(id): Path<String>,
    body: Result<Json<LabelBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return crate::rejection(&e).into_response(),
    };
    set_label(st, origin, id, body.label).await
}

async fn delete_label(
    State(st): State<LabelState>,
    origin: crate::commands::HttpOrigin,
    Path(id): Path<String>,
) -> Response {
    set_label(st, origin, id, None).await
}

async fn set_label(
    st: LabelState,
    origin: crate::commands::HttpOrigin,
    id: String,
    label: Option<String>,
) -> Response {
    if let Some(l) = &label {
        if let Err(e) = usbpt_schemas::label::check(l) {
            return ApiError::bad_request(e.to_string()).into_response();
        }
    }
    match lineage_id(&st, id).await {
        Ok(lineage) => {
            crate::commands::run_command(
                &st.handler,
                origin,
                Command::LabelLineage { lineage, label },
            )
            .await
        }
        Err(e) => e.into_response(),
    }
}

/// The lineage `id` names ([`resolve`]), read off the blocking pool.
async fn lineage_id(st: &LabelState, id: String) -> Result<LineageId, ApiError> {
    let view = Arc::clone(&st.view);
    match tokio::task::spawn_blocking(move || resolve(&view.snapshot()?, &id)).await {
        Ok(r) => r.map(|l| l.id),
        Err(e) => Err(ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        )),
    }
}

async fn resolve_conflict(
    State(st): State<LabelState>,
    origin: crate::commands::HttpOrigin,
    Path(id): Path<String>,
    body: Result<Json<ResolveBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(ResolveBody { keep }) = match body {
        Ok(b) => b,
        Err(e) => return crate::rejection(&e).into_response(),
    };
    match lineage_id(&st, id).await {
        Ok(lineage) => {
            crate::commands::run_command(
                &st.handler,
                origin,
                Command::ResolveConflict { lineage, keep },
            )
            .await
        }
        Err(e) => e.into_response(),
    }
}

/// The body of `POST /v1/lineages/{id}/fingerprint/accept`: nothing, or `{}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AcceptBody {}

async fn accept_fingerprint(
    State(st): State<LabelState>,
    origin: crate::commands::HttpOrigin,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if !body.iter().all(u8::is_ascii_whitespace) {
        if let Err(e) = serde_json::from_slice::<AcceptBody>(&body) {
            return ApiError::bad_request(format!("the body must be empty or {{}}: {e}"))
                .into_response();
        }
    }
    match lineage_id(&st, id).await {
        Ok(lineage) => {
            crate::commands::run_command(
                &st.handler,
                origin,
                Command::AcceptFingerprint { lineage },
            )
            .await
        }
        Err(e) => e.into_response(),
    }
}

/// Device documents ([`crate::docs::device`]) with their lineage's `"label"`, each lineage read
/// once: what `/v1/devices`, `/v1/devices/{id}` and `usbpt replay` show.
pub fn labeled_devices(
    snap: &Snapshot,
    devices: &[usbpt_projector::Device],
) -> Result<Vec<serde_json::Value>, usbpt_projector::ViewError> {
    let mut seen: HashMap<LineageId, Option<String>> = HashMap::new();
    let mut out = Vec::with_capacity(devices.len());
    for d in devices {
        let lineage = d.lineage_id();
        let label = match seen.get(&lineage) {
            Some(l) => l.clone(),
            None => {
                let l = snap.lineage(&lineage)?.and_then(|l| l.label);
                seen.insert(lineage, l.clone());
                l
            }
        };
        let mut doc = crate::doc::DeviceDoc::from(d);
        doc.label = label;
        out.push(crate::docs::v(&doc));
    }
    Ok(out)
}
