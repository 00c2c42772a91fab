//! usbpt's HTTP API (axum), the read side: Nova's compute API as far as usbpt models it
//! (version discovery and microversions in [`nova`], hypervisors, services, flavors and their
//! `usb_devices` extra spec, servers, instance actions, migrations; `docs/openstack.md`),
//! devices and their lineage history, lineage labels, custody and "where is it" ([`identity`]),
//! live events as Server-Sent Events, Prometheus metrics.
//! Errors are JSON with the status code, Nova's envelope and usbpt's own `error` key:
//! `{"itemNotFound": {"code": 404, "message": "…"}, "error": {"code": 404, "message": "…"}}`.
//! `GET /` is the live dashboard ([`dashboard`]), or the versions document for JSON clients.
//!
//! [`router`] builds the routes over an [`ApiState`]; other parts of the process (the command
//! side's `POST`s) add theirs with `Router::merge` or `Router::route` on the same paths (axum
//! joins different methods of one path) and can reuse [`ApiError`]. [`serve`] runs a router
//! on a listener until a shutdown future resolves.
//!
//! Every handler reads one consistent [`Snapshot`] of the view, on a blocking thread. Every
//! request first passes the front door in [`guard`] (Host allow-list, API token, concurrency
//! limit, timeout, body limit; ADR 0006).

#![recursion_limit = "256"]

mod alarms;
mod commands;
pub mod dashboard;
pub mod doc;
pub mod docs;
pub mod fanout;
pub mod guard;
mod history;
mod hypervisors;
pub mod identity;
pub mod liveness;
pub mod nova;
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
use fanout::{Fanout, FanoutConfig};
use nova::Nova;
use serde_json::{json, Value};
use tokio::sync::watch;
use tracing::warn;
use usbpt_bus::Bus;
use usbpt_projector::{
    DeviceFilter, DeviceStatus, Flavor, ProjectorMetrics, Server, Snapshot, View, ViewError,
};
use usbpt_schemas::{DeviceId, FlavorId, FlavorName, LineageId, ServerId, ServerName};

pub use commands::command_routes;
pub use docs::{device as device_doc, hypervisor as hypervisor_doc};
pub use guard::{ApiToken, HttpPolicy};

/// Where the HTTP API listens by default: loopback, Nova's port.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8774";

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
    /// The limits of `/v1/events`.
    pub fanout_config: FanoutConfig,
    /// The process's one live-event feed, started by the first client.
    fanout: Arc<tokio::sync::OnceCell<Arc<Fanout>>>,
    /// The agents' heartbeats (ADR 0008); without it a host is up once an agent announced
    /// itself there.
    pub liveness: Option<Arc<liveness::Liveness>>,
}

impl ApiState {
    pub fn new(view: Arc<View>) -> Self {
        Self {
            view,
            bus: None,
            metrics: None,
            // A sender that is never used: the stream ends only with the connection.
            shutdown: watch::channel(false).1,
            fanout_config: FanoutConfig::default(),
            fanout: Arc::default(),
            liveness: None,
        }
    }
    pub fn with_liveness(mut self, liveness: Arc<liveness::Liveness>) -> Self {
        self.liveness = Some(liveness);
        self
    }
    pub fn with_fanout(mut self, config: FanoutConfig) -> Self {
        self.fanout_config = config;
        self
    }

    /// The live-event feed, started on first use; 503 without a bus.
    async fn fanout(&self) -> Result<Arc<Fanout>, ApiError> {
        let Some(bus) = self.bus.clone() else {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "live events need the bus; this server has none",
            ));
        };
        let config = self.fanout_config;
        self.fanout
            .get_or_try_init(|| Fanout::start(bus, config))
            .await
            .cloned()
            .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
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
    /// Nova's envelope (`{"itemNotFound": {"code", "message"}}`, the fault name first, as
    /// OpenStack clients read the first key) and usbpt's own `"error"` key with the same object.
    fn into_response(self) -> Response {
        let inner = serde_json::to_string(&doc::ErrorBody {
            code: self.status.as_u16(),
            message: self.message,
        })
        .unwrap_or_default();
        let body = format!(
            "{{\"{}\":{inner},\"error\":{inner}}}",
            nova::fault_name(self.status)
        );
        (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
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
    s.parse().map_err(|e: T::Err| {
        ApiError::bad_request(format!(
            "invalid {what} {}: {}",
            usbpt_schemas::shown(s),
            guard::shown(&e.to_string(), 200)
        ))
    })
}

/// A JSON body the extractor refused, as a precise 4xx: 413 beyond [`guard::MAX_BODY`], 415
/// without `Content-Type: application/json`, 400 for bad syntax or a bad value (the message
/// names the field; a long message, which may quote the value, is cut).
pub(crate) fn rejection(e: &axum::extract::rejection::JsonRejection) -> ApiError {
    let status = match e.status() {
        s @ (StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE) => s,
        _ => StatusCode::BAD_REQUEST,
    };
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            format!("the request body is larger than {} bytes", guard::MAX_BODY)
        }
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            "the request body must be JSON, with Content-Type: application/json".to_owned()
        }
        _ => guard::shown(&e.body_text(), 300),
    };
    ApiError::new(status, message)
}

/// A boolean query parameter, read as Nova reads them (case-insensitive `true/false`, `1/0`,
/// `yes/no`, `on/off`; present and empty is true).
fn flag(q: &HashMap<String, String>, name: &str) -> Result<bool, ApiError> {
    let Some(raw) = q.get(name) else {
        return Ok(false);
    };
    match raw.to_ascii_lowercase().as_str() {
        "false" | "0" | "no" | "off" | "f" | "n" => Ok(false),
        "" | "true" | "1" | "yes" | "on" | "t" | "y" => Ok(true),
        _ => Err(ApiError::bad_request(format!(
            "invalid {name} {raw:?}: expected true or false"
        ))),
    }
}

/// The read routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v2.1", get(nova::version_document))
        .route("/v2.1/", get(nova::version_document))
        .route("/identity/v3", get(nova::identity_version_document))
        .route("/identity/v3/", get(nova::identity_version_document))
        .route("/v2.1/os-hypervisors", get(hypervisors::list))
        .route("/v2.1/os-hypervisors/detail", get(hypervisors::detail))
        .route(
            "/v2.1/os-hypervisors/statistics",
            get(hypervisors::statistics),
        )
        .route("/v2.1/os-hypervisors/{id}", get(hypervisors::show))
        .route(
            "/v2.1/os-hypervisors/{id}/uptime",
            get(hypervisors::show_uptime),
        )
        .route(
            "/v2/{tenant}/os-hypervisors/{host}",
            get(hypervisors::show_tenant),
        )
        .route("/v2.1/os-services", get(hypervisors::services))
        .route("/v2.1/os-aggregates", get(hypervisors::aggregates))
        .route("/v2.1/os-migrations", get(history::migrations))
        .route(
            "/v2.1/servers/{id}/os-instance-actions",
            get(history::actions),
        )
        .route(
            "/v2.1/servers/{id}/os-instance-actions/{request_id}",
            get(history::action),
        )
        .route("/v2.1/flavors/{id}/os-extra_specs", get(extra_specs))
        .route("/v2.1/flavors/{id}/os-extra_specs/{key}", get(extra_spec))
        .route("/v1/devices", get(devices))
        .route("/v1/devices/{id}", get(device))
        .route("/v1/devices/{id}/history", get(history))
        .route("/v1/hosts", get(hosts))
        .route("/v1/quarantine", get(quarantine))
        .route("/v1/status", get(status))
        .route("/v1/alarms", get(alarms::list))
        .route("/v1/events", get(sse::events))
        .route("/v2.1/flavors", get(flavors))
        .route("/v2.1/flavors/detail", get(flavors))
        .route("/v2.1/flavors/{id}", get(flavor))
        .route("/v2.1/servers", get(servers))
        .route("/v2.1/servers/detail", get(servers_detail))
        .route("/v2.1/servers/{id}", get(server))
        .route("/metrics", get(metrics))
        .merge(dashboard::routes())
        .merge(identity::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Runs `router` on `listener` behind the front door [`guard`] (Host allow-list, token,
/// concurrency limit, timeout; bodies up to [`guard::MAX_BODY`]) until `shutdown` resolves
/// (then waits for open requests).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    policy: HttpPolicy,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        secure(router, policy).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// `router` with Nova's headers and the front door: what [`serve`] runs (tests drive it
/// in-process).
pub fn secure(router: Router, policy: HttpPolicy) -> Router {
    let guard = guard::Guard::new(policy);
    router
        .layer(axum::middleware::from_fn(nova::layer))
        .layer(axum::extract::DefaultBodyLimit::max(guard::MAX_BODY))
        .layer(axum::middleware::from_fn(move |req, next| {
            guard.clone().run(req, next)
        }))
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
        let devices = identity::labeled_devices(snap, &list)?;
        Ok(Json(json!({ "devices": devices })))
    })
    .await
}

async fn device(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    let id: DeviceId = parse("device id", &id)?;
    read(&st, move |snap| match snap.device(&id)? {
        Some(d) => Ok(Json(json!({
            "device": identity::labeled_devices(snap, std::slice::from_ref(&d))?.pop()
        }))),
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
        let quarantine = snap.quarantine(after, limit.min(10_000))?;
        Ok(Json(docs::v(&doc::QuarantineList {
            total: snap.quarantine_len()?,
            quarantine,
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
        Ok(Json(docs::v(&doc::Status {
            last_applied_seq: last,
            reached: reached && min_seq.is_none_or(|s| last >= s),
            stream_last_seq: stream_last,
            lag,
            quarantined: snap.quarantine_len()?,
        })))
    })
    .await
}

async fn flavors(State(st): State<ApiState>, nova: Nova) -> ApiResult {
    read(&st, move |snap| {
        let list = snap.flavors(false)?;
        Ok(Json(
            json!({"flavors": list.iter().map(|f| docs::flavor(f, &nova)).collect::<Vec<_>>()}),
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

/// A flavor by id or name, or a 404 naming it.
fn flavor_or_404(snap: &Snapshot, id: &str) -> Result<Flavor, ApiError> {
    find_flavor(snap, id)?
        .ok_or_else(|| ApiError::not_found(format!("Flavor {id} could not be found.")))
}

async fn flavor(State(st): State<ApiState>, nova: Nova, Path(id): Path<String>) -> ApiResult {
    read(&st, move |snap| {
        Ok(Json(
            json!({"flavor": docs::flavor(&flavor_or_404(snap, &id)?, &nova)}),
        ))
    })
    .await
}

/// `GET /v2.1/flavors/{id}/os-extra_specs`.
async fn extra_specs(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    read(&st, move |snap| {
        Ok(Json(
            json!({"extra_specs": docs::extra_specs(&flavor_or_404(snap, &id)?)}),
        ))
    })
    .await
}

/// `GET /v2.1/flavors/{id}/os-extra_specs/{key}`: `{key: value}`.
async fn extra_spec(
    State(st): State<ApiState>,
    Path((id, key)): Path<(String, String)>,
) -> ApiResult {
    read(&st, move |snap| {
        let specs = docs::extra_specs(&flavor_or_404(snap, &id)?);
        match specs.get(&key) {
            Some(v) => Ok(Json(json!({ key: v }))),
            None => Err(ApiError::not_found(format!(
                "Flavor {id} has no extra specs with key {key}."
            ))),
        }
    })
    .await
}

/// Nova's server list filters usbpt can apply: `deleted`, `name` (a substring, as Nova's regex
/// mostly is), `status`, `host`. Others (`limit`, `marker`, `all_tenants`, …) are accepted.
fn server_filter(
    q: &HashMap<String, String>,
) -> Result<(bool, impl Fn(&Server) -> bool + Send + 'static), ApiError> {
    let deleted = flag(q, "deleted")?;
    let name = q.get("name").cloned();
    let status = q.get("status").map(|s| s.to_ascii_uppercase());
    let host = q.get("host").cloned();
    Ok((deleted, move |s: &Server| {
        name.as_deref().is_none_or(|n| s.name.as_str().contains(n))
            && status
                .as_deref()
                .is_none_or(|st| docs::nova_status(s) == st)
            && host
                .as_deref()
                .is_none_or(|h| s.host.as_ref().is_some_and(|x| x.as_str() == h))
    }))
}

async fn servers(
    State(st): State<ApiState>,
    nova: Nova,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let (deleted, keep) = server_filter(&q)?;
    read(&st, move |snap| {
        let list = snap.servers(deleted)?;
        Ok(Json(json!({"servers": list
            .iter()
            .filter(|s| keep(s))
            .map(|s| docs::server_brief(s, &nova))
            .collect::<Vec<_>>()})))
    })
    .await
}

async fn servers_detail(
    State(st): State<ApiState>,
    nova: Nova,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let (deleted, keep) = server_filter(&q)?;
    read(&st, move |snap| {
        let mut out = Vec::new();
        for s in snap.servers(deleted)?.iter().filter(|s| keep(s)) {
            out.push(docs::server(snap, s, &nova)?);
        }
        Ok(Json(json!({"servers": out})))
    })
    .await
}

async fn server(State(st): State<ApiState>, nova: Nova, Path(id): Path<String>) -> ApiResult {
    read(&st, move |snap| match find_server(snap, &id)? {
        Some(s) => Ok(Json(json!({"server": docs::server(snap, &s, &nova)?}))),
        None => Err(ApiError::not_found(format!(
            "Instance {id} could not be found."
        ))),
    })
    .await
}

async fn metrics(State(st): State<ApiState>) -> Result<Response, ApiError> {
    let m = st.metrics.clone().unwrap_or_default();
    let mut text = read(&st, move |snap| Ok(m.render(&snap.counters()?))).await?;
    text.push_str(&Fanout::render(
        st.fanout.get().map(|f| &**f),
        &st.fanout_config,
    ));
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
