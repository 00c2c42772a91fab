//! usbpt's HTTP API (axum), the read side: the Nova-shaped hypervisor document, devices and
//! their lineage history, flavors and servers, live events as Server-Sent Events, Prometheus
//! metrics. Errors are JSON, `{"error": {"code": 404, "message": "…"}}`, with the status code.
//! `GET /` is the live dashboard ([`dashboard`]).
//!
//! [`router`] builds the routes over an [`ApiState`]; other parts of the process (the command
//! side's `POST`s) add theirs with `Router::merge` or `Router::route` on the same paths (axum
//! joins different methods of one path) and can reuse [`ApiError`]. [`serve`] runs a router
//! on a listener until a shutdown future resolves.
//!
//! Every handler reads one consistent [`Snapshot`] of the view, on a blocking thread.

mod commands;
pub mod dashboard;
pub mod docs;
mod sse;

use std::collections::HashMap;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::watch;
use tracing::warn;
use usbpt_bus::Bus;
use usbpt_projector::{
    DeviceFilter, DeviceStatus, Flavor, ProjectorMetrics, Server, Snapshot, View, ViewError,
};
use usbpt_schemas::{DeviceId, FlavorId, FlavorName, HostName, LineageId, ServerId, ServerName};

pub use commands::command_routes;
pub use docs::{device as device_doc, hypervisor as hypervisor_doc};

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub view: Arc<View>,
    /// For `/v1/events`; without it the endpoint answers 503.
    pub bus: Option<Bus>,
    /// The in-process projector's metrics, if it runs here.
    pub metrics: Option<Arc<ProjectorMetrics>>,
    /// Becomes true when the server shuts down: ends live event streams so it can.
    pub shutdown: watch::Receiver<bool>,
}

impl ApiState {
    pub fn new(view: Arc<View>) -> Self {
        Self {
            view,
            bus: None,
            metrics: None,
            // A sender that is never used: the stream ends only with the connection.
            shutdown: watch::channel(false).1,
        }
    }
    pub fn with_bus(mut self, bus: Bus) -> Self {
        self.bus = Some(bus);
        self
    }
    pub fn with_metrics(mut self, metrics: Arc<ProjectorMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }
    pub fn with_shutdown(mut self, shutdown: watch::Receiver<bool>) -> Self {
        self.shutdown = shutdown;
        self
    }
}

/// An error response: `{"error": {"code": …, "message": …}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.status.as_u16(), "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

impl From<ViewError> for ApiError {
    fn from(e: ViewError) -> Self {
        warn!(error = %e, "view read failed");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the view cannot be read: {e}"),
        )
    }
}

type ApiResult<T = Json<Value>> = Result<T, ApiError>;

/// Runs `f` on one snapshot, on a blocking thread.
async fn read<T: Send + 'static>(
    state: &ApiState,
    f: impl FnOnce(&Snapshot) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let view = Arc::clone(&state.view);
    tokio::task::spawn_blocking(move || f(&view.snapshot()?))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

fn parse<T: FromStr>(what: &str, s: &str) -> Result<T, ApiError>
where
    T::Err: std::fmt::Display,
{
    s.parse()
        .map_err(|e: T::Err| ApiError::bad_request(format!("invalid {what} {s:?}: {e}")))
}

fn flag(q: &HashMap<String, String>, name: &str) -> Result<bool, ApiError> {
    match q.get(name).map(String::as_str) {
        None | Some("false") | Some("0") => Ok(false),
        Some("") | Some("true") | Some("1") => Ok(true),
        Some(other) => Err(ApiError::bad_request(format!(
            "invalid {name} {other:?}: expected true or false"
        ))),
    }
}

/// The read routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v2.1/os-hypervisors/{host}", get(hypervisor))
        .route("/v2/{tenant}/os-hypervisors/{host}", get(hypervisor_tenant))
        .route("/v1/devices", get(devices))
        .route("/v1/devices/{id}", get(device))
        .route("/v1/devices/{id}/history", get(history))
        .route("/v1/hosts", get(hosts))
        .route("/v1/quarantine", get(quarantine))
        .route("/v1/status", get(status))
        .route("/v1/events", get(sse::events))
        .route("/v2.1/flavors", get(flavors))
        .route("/v2.1/flavors/detail", get(flavors))
        .route("/v2.1/flavors/{id}", get(flavor))
        .route("/v2.1/servers", get(servers))
        .route("/v2.1/servers/detail", get(servers_detail))
        .route("/v2.1/servers/{id}", get(server))
        .route("/metrics", get(metrics))
        .merge(dashboard::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Runs `router` on `listener` until `shutdown` resolves (then waits for open requests).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

async fn hypervisor(State(st): State<ApiState>, Path(host): Path<String>) -> ApiResult {
    let host: HostName = parse("host name", &host)?;
    read(&st, move |snap| {
        let Some(h) = snap.host(&host)? else {
            return Err(ApiError::not_found(format!(
                "hypervisor {host} not found (no agent or device was ever reported for it)"
            )));
        };
        let devices = snap.host_devices(&host)?;
        Ok(Json(docs::hypervisor(&h, &devices)))
    })
    .await
}

async fn hypervisor_tenant(
    st: State<ApiState>,
    Path((_tenant, host)): Path<(String, String)>,
) -> ApiResult {
    hypervisor(st, Path(host)).await
}

async fn devices(
    State(st): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let filter = DeviceFilter {
        host: q.get("host").map(|h| parse("host name", h)).transpose()?,
        status: q
            .get("status")
            .map(|s| parse::<DeviceStatus>("status", s))
            .transpose()?,
        all: flag(&q, "all")?,
    };
    read(&st, move |snap| {
        let list = snap.devices(&filter)?;
        Ok(Json(
            json!({"devices": list.iter().map(docs::device).collect::<Vec<_>>()}),
        ))
    })
    .await
}

async fn device(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    let id: DeviceId = parse("device id", &id)?;
    read(&st, move |snap| match snap.device(&id)? {
        Some(d) => Ok(Json(json!({"device": docs::device(&d)}))),
        None => Err(ApiError::not_found(format!("device {id} not found"))),
    })
    .await
}

async fn history(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    let uuid: DeviceId = parse("device or lineage id", &id)?;
    read(&st, move |snap| {
        // A device id names its lineage; otherwise the id is a lineage id.
        let lineage = match snap.device(&uuid)? {
            Some(d) => d.lineage_id(),
            None => LineageId::from_uuid(uuid.0),
        };
        let Some(l) = snap.lineage(&lineage)? else {
            return Err(ApiError::not_found(format!(
                "no device or lineage {id} in the view"
            )));
        };
        let devices = snap.lineage_history(&lineage)?;
        let claim = snap.claim(&lineage)?;
        Ok(Json(docs::history(&l, claim.as_ref(), &devices)))
    })
    .await
}

async fn hosts(State(st): State<ApiState>) -> ApiResult {
    read(&st, |snap| {
        let mut out = Vec::new();
        for h in snap.hosts()? {
            let n = snap.host_devices(&h.name)?.len();
            out.push(docs::host(&h, n));
        }
        Ok(Json(json!({"hosts": out})))
    })
    .await
}

async fn quarantine(
    State(st): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let after: u64 = q.get("after").map_or(Ok(0), |s| parse("after", s))?;
    let limit: usize = q.get("limit").map_or(Ok(100), |s| parse("limit", s))?;
    read(&st, move |snap| {
        let list = snap.quarantine(after, limit.min(10_000))?;
        Ok(Json(json!({
            "total": snap.quarantine_len()?,
            "quarantine": list.iter().map(docs::quarantine).collect::<Vec<_>>(),
        })))
    })
    .await
}

/// `GET /v1/status[?min_seq=N&timeout_ms=T]`: the view's position; with `min_seq`, waits (up to
/// `timeout_ms`, default 10 s) until the view has applied that sequence (read your writes).
async fn status(State(st): State<ApiState>, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let min_seq: Option<u64> = q.get("min_seq").map(|s| parse("min_seq", s)).transpose()?;
    let timeout: u64 = q
        .get("timeout_ms")
        .map_or(Ok(10_000), |s| parse("timeout_ms", s))?;
    let reached = match min_seq {
        Some(seq) => {
            st.view
                .wait_applied(seq, Duration::from_millis(timeout.min(60_000)))
                .await
        }
        None => true,
    };
    let metrics = st.metrics.clone();
    read(&st, move |snap| {
        let last = snap.last_applied_seq()?;
        let (stream_last, lag) = metrics.map_or((None, None), |m| {
            use std::sync::atomic::Ordering::Relaxed;
            (
                Some(m.stream_last.load(Relaxed).max(last)),
                Some(m.lag.load(Relaxed)),
            )
        });
        Ok(Json(json!({
            "last_applied_seq": last,
            "reached": reached && min_seq.is_none_or(|s| last >= s),
            "stream_last_seq": stream_last,
            "lag": lag,
            "quarantined": snap.quarantine_len()?,
        })))
    })
    .await
}

async fn flavors(State(st): State<ApiState>) -> ApiResult {
    read(&st, |snap| {
        let list = snap.flavors(false)?;
        Ok(Json(
            json!({"flavors": list.iter().map(docs::flavor).collect::<Vec<_>>()}),
        ))
    })
    .await
}

/// A flavor by id or by name (`{id}` in paths may be either).
pub(crate) fn find_flavor(snap: &Snapshot, id: &str) -> Result<Option<Flavor>, ApiError> {
    Ok(match id.parse::<FlavorId>() {
        Ok(fid) => snap.flavor_by_id(&fid)?,
        Err(_) => snap.flavor_by_name(&parse::<FlavorName>("flavor name", id)?)?,
    })
}

/// A server by id or by name.
pub(crate) fn find_server(snap: &Snapshot, id: &str) -> Result<Option<Server>, ApiError> {
    Ok(match id.parse::<ServerId>() {
        Ok(sid) => snap.server_by_id(&sid)?,
        Err(_) => snap.server_by_name(&parse::<ServerName>("server name", id)?)?,
    })
}

async fn flavor(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    read(&st, move |snap| match find_flavor(snap, &id)? {
        Some(f) => Ok(Json(json!({"flavor": docs::flavor(&f)}))),
        None => Err(ApiError::not_found(format!("flavor {id} not found"))),
    })
    .await
}

async fn servers(
    State(st): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let deleted = flag(&q, "deleted")?;
    read(&st, move |snap| {
        let list = snap.servers(deleted)?;
        Ok(Json(
            json!({"servers": list.iter().map(docs::server_brief).collect::<Vec<_>>()}),
        ))
    })
    .await
}

async fn servers_detail(
    State(st): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let deleted = flag(&q, "deleted")?;
    read(&st, move |snap| {
        let mut out = Vec::new();
        for s in snap.servers(deleted)? {
            out.push(docs::server(snap, &s)?);
        }
        Ok(Json(json!({"servers": out})))
    })
    .await
}

async fn server(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    read(&st, move |snap| match find_server(snap, &id)? {
        Some(s) => Ok(Json(json!({"server": docs::server(snap, &s)?}))),
        None => Err(ApiError::not_found(format!("server {id} not found"))),
    })
    .await
}

async fn metrics(State(st): State<ApiState>) -> Result<Response, ApiError> {
    let m = st.metrics.clone().unwrap_or_default();
    let text = read(&st, move |snap| Ok(m.render(&snap.counters()?))).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
