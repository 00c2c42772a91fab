//! The command side's HTTP routes, Nova-shaped: `POST /v2.1/flavors`, `DELETE
//! /v2.1/flavors/{id}`, `POST /v2.1/servers`, `POST /v2.1/servers/{id}/action` with Nova's action
//! bodies, `DELETE /v2.1/servers/{id}`, the `usb_devices` extra spec. Each becomes a [`Command`]
//! for the in-process [`Handler`]; `{id}` may be an id or a name. Replies are Nova's: a created
//! flavor `200 {"flavor"}`, a created server `202 {"server"}` with `Location`, a deleted server
//! 204, other actions `202 {"message", "events"}`; rejected: the JSON error with the rejection's
//! status code and reason.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use usbpt_commands::handler::Handler;
use usbpt_projector::View;
use usbpt_schemas::commands::{
    Command, CommandReply, FlavorResources, RejectKind, UsbRequestFields,
};
use usbpt_schemas::{
    ControllerModel, DeviceId, FingerprintPolicy, FlavorName, FollowPolicy, HostName, LineageId,
    Origin, ProductId, ServerAction, ServerName, UsbRequest, VendorId, Via,
};

use crate::nova::Nova;
use crate::ApiError;

#[derive(Debug, Clone)]
struct CmdState {
    handler: Arc<Handler<View>>,
    view: Arc<View>,
}

/// The command routes over an in-process handler.
pub fn command_routes(handler: Arc<Handler<View>>, view: Arc<View>) -> Router {
    Router::new()
        .route("/v2.1/flavors", post(create_flavor))
        .route("/v2.1/flavors/{id}", delete(delete_flavor))
        .route("/v2.1/flavors/{id}/os-extra_specs", post(set_extra_specs))
        .route(
            "/v2.1/flavors/{id}/os-extra_specs/{key}",
            put(put_extra_spec).delete(delete_extra_spec),
        )
        .route("/v2.1/servers", post(create_server))
        .route("/v2.1/servers/{id}/action", post(server_action))
        .route(
            "/v2.1/servers/{id}",
            delete(delete_server).put(update_server),
        )
        .with_state(CmdState {
            handler: Arc::clone(&handler),
            view: Arc::clone(&view),
        })
        .merge(crate::identity::label_routes(handler, view))
}

async fn run(state: &CmdState, origin: HttpOrigin, cmd: Command) -> Response {
    run_command(&state.handler, origin, cmd).await
}

/// Who asked, for the handler (ADR 0014): the [`Origin`] the front door ([`crate::guard`])
/// made of the request — the token's identity, the peer, the `User-Agent`, the request id.
/// A router driven without the front door (unit tests) records the principal `unguarded`.
#[derive(Debug, Clone)]
pub(crate) struct HttpOrigin(pub Origin);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for HttpOrigin {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(HttpOrigin(
            parts
                .extensions
                .get::<Origin>()
                .cloned()
                .unwrap_or_else(|| Origin::new(Via::Http, "unguarded")),
        ))
    }
}

/// A command through the in-process handler: 202 `{"message", "events"}`, or the rejection.
pub(crate) async fn run_command(
    handler: &Handler<View>,
    HttpOrigin(origin): HttpOrigin,
    cmd: Command,
) -> Response {
    match handler.execute(&cmd, origin).await {
        CommandReply::Accepted { events, message } => (
            StatusCode::ACCEPTED,
            Json(json!({"message": message, "events": events})),
        )
            .into_response(),
        CommandReply::Rejected { kind, reason } => {
            ApiError::new(status(kind), reason).into_response()
        }
    }
}

/// The HTTP status of a command's refusal: chosen here only (the command side has kinds).
fn status(kind: RejectKind) -> StatusCode {
    match kind {
        RejectKind::Invalid => StatusCode::BAD_REQUEST,
        RejectKind::NotFound => StatusCode::NOT_FOUND,
        RejectKind::Conflict => StatusCode::CONFLICT,
        RejectKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        RejectKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

fn bad(e: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(e.to_string())
}

/// One entry of `usb_devices`: `{"id": …}`, or a lineage, or a match.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsbDeviceBody {
    id: Option<DeviceId>,
    lineage_id: Option<LineageId>,
    vendor_id: Option<VendorId>,
    product_id: Option<ProductId>,
    serial: Option<String>,
    count: Option<u8>,
    #[serde(default)]
    controller: Option<ControllerModel>,
    #[serde(default)]
    follow: Option<FollowPolicy>,
}

impl UsbDeviceBody {
    /// The request, by the one validation the CLI and NATS share
    /// ([`UsbRequestFields::validate`]): 400 naming `usb_devices[i]` and the rule broken.
    fn request(self, i: usize) -> Result<UsbRequest, ApiError> {
        UsbRequestFields {
            id: self.id,
            lineage: self.lineage_id,
            vendor: self.vendor_id,
            product: self.product_id,
            serial: self.serial,
            count: self.count,
            controller: self.controller,
            follow: self.follow,
        }
        .validate()
        .map_err(|e| bad(format!("usb_devices[{i}]: {e}")))
    }
}

#[derive(Debug, Deserialize)]
struct FlavorEnvelope {
    flavor: FlavorBody,
}
/// Nova's flavor body; `ram`, `vcpus`, `disk` are recorded (`FlavorSized`) and shown, not
/// scheduled on (usbpt schedules USB devices only); the rest is accepted and ignored.
/// `usb_devices` is usbpt's own key (a JSON list of USB requests).
#[derive(Debug, Deserialize)]
struct FlavorBody {
    name: FlavorName,
    #[serde(default)]
    ram: Option<u32>,
    #[serde(default)]
    vcpus: Option<u32>,
    #[serde(default)]
    disk: Option<u32>,
    #[serde(default)]
    usb_devices: Vec<UsbDeviceBody>,
    /// usbpt's own key: `hold` (the default) or `follow`.
    #[serde(default)]
    on_fingerprint_change: Option<FingerprintPolicy>,
    /// Nova lets a client choose the id; usbpt's ids are UUIDv7s it draws itself.
    #[serde(default)]
    id: Option<Value>,
}

async fn create_flavor(
    State(state): State<CmdState>,
    origin: HttpOrigin,
    nova: Nova,
    body: Result<Json<FlavorEnvelope>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return crate::rejection(&e).into_response(),
    };
    let usb = match body
        .flavor
        .usb_devices
        .into_iter()
        .enumerate()
        .map(|(i, u)| u.request(i))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    if let Some(id) = body.flavor.id.as_ref().filter(|v| !v.is_null()) {
        if id.as_str() != Some("auto") {
            return bad(format!(
                "flavor.id: usbpt chooses flavor ids itself; omit id (got {id})"
            ))
            .into_response();
        }
    }
    let resources = FlavorResources {
        ram_mb: body.flavor.ram.unwrap_or(0),
        vcpus: body.flavor.vcpus.unwrap_or(0),
        disk_gb: body.flavor.disk.unwrap_or(0),
    };
    let name = body.flavor.name;
    let reply = run(
        &state,
        origin,
        Command::CreateFlavor {
            name: name.clone(),
            usb,
            resources,
            on_fingerprint_change: body.flavor.on_fingerprint_change,
        },
    )
    .await;
    if reply.status() != StatusCode::ACCEPTED {
        return reply;
    }
    flavor_reply(&state, &nova, name.as_str(), StatusCode::OK).await
}

/// `{"flavor": …}` for the flavor `id` names, read after a command wrote it.
async fn flavor_reply(state: &CmdState, nova: &Nova, id: &str, status: StatusCode) -> Response {
    let view = Arc::clone(&state.view);
    let nova = nova.clone();
    let id = id.to_owned();
    let found = tokio::task::spawn_blocking(move || -> Result<Value, ApiError> {
        let snap = view.snapshot()?;
        let f = crate::find_flavor(&snap, &id)?
            .ok_or_else(|| ApiError::not_found(format!("Flavor {id} could not be found.")))?;
        Ok(json!({"flavor": crate::docs::flavor(&f, &nova)}))
    })
    .await;
    match found {
        Ok(Ok(doc)) => (status, Json(doc)).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Resolves `{id}` (an id or a name) to a name with one snapshot.
async fn name_of<N: Send + 'static>(
    state: &CmdState,
    id: String,
    resolve: impl FnOnce(&usbpt_projector::Snapshot, &str) -> Result<Option<N>, ApiError>
        + Send
        + 'static,
    what: &'static str,
) -> Result<N, ApiError> {
    let view = Arc::clone(&state.view);
    let shown = id.clone();
    tokio::task::spawn_blocking(move || resolve(&view.snapshot()?, &id))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??
        .ok_or_else(|| ApiError::not_found(format!("{what} {shown} does not exist")))
}

/// The live flavor `{id}` (an id or a name) names.
fn flavor_name(s: &usbpt_projector::Snapshot, id: &str) -> Result<Option<FlavorName>, ApiError> {
    Ok(crate::find_flavor(s, id)?
        .filter(|f| f.deleted.is_none())
        .map(|f| f.name))
}

/// The live server `{id}` (an id or a name) names.
fn server_name(s: &usbpt_projector::Snapshot, id: &str) -> Result<Option<ServerName>, ApiError> {
    Ok(crate::find_server(s, id)?
        .filter(|srv| srv.deleted.is_none())
        .map(|srv| srv.name))
}

async fn delete_flavor(
    State(state): State<CmdState>,
    origin: HttpOrigin,
    Path(id): Path<String>,
) -> Response {
    match name_of(&state, id, flavor_name, "flavor").await {
        Ok(name) => run(&state, origin, Command::DeleteFlavor { name }).await,
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct ServerEnvelope {
    server: ServerBody,
}
/// Nova's server body; `imageRef`, `networks`, `block_device_mapping_v2` and the rest are
/// accepted and ignored (usbpt places USB devices, not disks or ports).
#[derive(Debug, Deserialize)]
struct ServerBody {
    name: ServerName,
    /// A flavor id, name, or link (its last path segment is used).
    #[serde(rename = "flavorRef")]
    flavor_ref: String,
    /// Nova's requested host (microversion 2.74; usbpt accepts it at any version).
    host: Option<HostName>,
    /// Nova's requested hypervisor (2.74): the same as `host` here.
    hypervisor_hostname: Option<HostName>,
}

/// Reads the live server named `name`, if any.
async fn live_server(
    state: &CmdState,
    name: &ServerName,
) -> Result<Option<usbpt_projector::Server>, ApiError> {
    let view = Arc::clone(&state.view);
    let name = name.clone();
    tokio::task::spawn_blocking(move || {
        Ok(view
            .snapshot()?
            .server_by_name(&name)?
            .filter(|s| s.deleted.is_none()))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

/// Nova's create reply: `202 {"server": {"id", "links", …}}` with `Location`.
fn created_server(nova: &Nova, s: &usbpt_projector::Server) -> Response {
    let links = nova.links(&format!("servers/{}", s.id));
    let location = format!("{}/v2.1/servers/{}", nova.base, s.id);
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(json!({"server": {
            "id": s.id,
            "links": links,
            "OS-DCF:diskConfig": "MANUAL",
            "security_groups": [{"name": "default"}],
        }})),
    )
        .into_response()
}

async fn create_server(
    State(state): State<CmdState>,
    origin: HttpOrigin,
    nova: Nova,
    body: Result<Json<ServerEnvelope>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return crate::rejection(&e).into_response(),
    };
    let b = body.server;
    let flavor_ref = b
        .flavor_ref
        .rsplit('/')
        .next()
        .unwrap_or(&b.flavor_ref)
        .to_owned();
    let flavor = match name_of(&state, flavor_ref, flavor_name, "flavor").await {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let host = match (b.host, b.hypervisor_hostname) {
        (Some(h), Some(hh)) if h != hh => {
            return bad(format!(
                "server.host {h} and server.hypervisor_hostname {hh} differ"
            ))
            .into_response()
        }
        (h, hh) => h.or(hh),
    };
    let existed = match live_server(&state, &b.name).await {
        Ok(s) => s.is_some(),
        Err(e) => return e.into_response(),
    };
    let reply = run(
        &state,
        origin,
        Command::Boot {
            name: b.name.clone(),
            flavor,
            host,
        },
    )
    .await;
    // Accepted, or refused by the scheduler after the server was recorded (then it is in
    // ERROR with a fault saying why, as Nova leaves it): either way the server exists now.
    let refused_after_recording = reply.status() == StatusCode::CONFLICT && !existed;
    if reply.status() != StatusCode::ACCEPTED && !refused_after_recording {
        return reply;
    }
    match live_server(&state, &b.name).await {
        Ok(Some(s)) => created_server(&nova, &s),
        Ok(None) => reply,
        Err(e) => e.into_response(),
    }
}

/// The extra spec that carries a flavor's USB request.
pub const SPEC_USB: &str = "usb_devices";
/// The extra spec that carries a flavor's `on_fingerprint_change` (`hold` or `follow`).
pub const SPEC_FINGERPRINT: &str = "usb:on_fingerprint_change";

/// The extra specs usbpt records: the USB request and/or the fingerprint policy.
#[derive(Debug, Default)]
struct Specs {
    usb: Option<Vec<UsbRequest>>,
    policy: Option<FingerprintPolicy>,
}

/// `{"extra_specs": {"usb_devices": "[…]", "usb:on_fingerprint_change": "follow"}}`: the USB
/// request, as a JSON string (extra specs are strings) holding the JSON list of USB requests,
/// and the fingerprint policy. Other keys are refused: usbpt records none.
fn specs_from(specs: &serde_json::Map<String, Value>) -> Result<Specs, ApiError> {
    if let Some(other) = specs
        .keys()
        .find(|k| *k != SPEC_USB && *k != SPEC_FINGERPRINT)
    {
        return Err(bad(format!(
            "extra_specs.{other}: usbpt records only the {SPEC_USB} and {SPEC_FINGERPRINT} extra specs"
        )));
    }
    if specs.is_empty() {
        return Err(bad(format!(
            "extra_specs: give {SPEC_USB} or {SPEC_FINGERPRINT}"
        )));
    }
    let usb = specs
        .get(SPEC_USB)
        .map(|raw| {
            let list: Vec<UsbDeviceBody> = match raw {
                Value::String(text) => serde_json::from_str(text),
                other => serde_json::from_value(other.clone()),
            }
            .map_err(|e| bad(format!("extra_specs.{SPEC_USB}: {e}")))?;
            list.into_iter()
                .enumerate()
                .map(|(i, u)| u.request(i))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(format!("extra_specs.{}", e.message)))
        })
        .transpose()?;
    let policy = specs
        .get(SPEC_FINGERPRINT)
        .map(|raw| {
            raw.as_str()
                .ok_or_else(|| "expected \"hold\" or \"follow\"".to_owned())
                .and_then(str::parse::<FingerprintPolicy>)
                .map_err(|e| bad(format!("extra_specs.{SPEC_FINGERPRINT}: {e}")))
        })
        .transpose()?;
    Ok(Specs { usb, policy })
}

/// Records the flavor's USB request and/or fingerprint policy and answers with its extra specs.
async fn set_specs(
    state: &CmdState,
    origin: HttpOrigin,
    id: String,
    specs: Specs,
    answer: impl FnOnce(Value) -> Value,
) -> Response {
    let name = match name_of(state, id.clone(), flavor_name, "flavor").await {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    if let Some(usb) = specs.usb {
        let reply = run(
            state,
            origin.clone(),
            Command::SetFlavorUsb {
                name: name.clone(),
                usb,
            },
        )
        .await;
        if reply.status() != StatusCode::ACCEPTED {
            return reply;
        }
    }
    if let Some(policy) = specs.policy {
        let reply = run(
            state,
            origin,
            Command::SetFlavorPolicy {
                name,
                on_fingerprint_change: policy,
            },
        )
        .await;
        if reply.status() != StatusCode::ACCEPTED {
            return reply;
        }
    }
    let view = Arc::clone(&state.view);
    let specs = tokio::task::spawn_blocking(move || -> Result<Value, ApiError> {
        let snap = view.snapshot()?;
        let f = crate::find_flavor(&snap, &id)?
            .ok_or_else(|| ApiError::not_found(format!("Flavor {id} could not be found.")))?;
        Ok(crate::docs::extra_specs(&f))
    })
    .await;
    match specs {
        Ok(Ok(specs)) => (StatusCode::OK, Json(answer(specs))).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// `POST /v2.1/flavors/{id}/os-extra_specs` `{"extra_specs": {"usb_devices": "[…]"}}` (and/or
/// `usb:on_fingerprint_change`): the keys given are set, others are kept.
async fn set_extra_specs(
    State(state): State<CmdState>,
    origin: HttpOrigin,
    Path(id): Path<String>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return crate::rejection(&e).into_response(),
    };
    let Some(specs) = body.get("extra_specs").and_then(Value::as_object) else {
        return bad("extra_specs: expected {\"extra_specs\": {\"usb_devices\": \"[…]\"}}")
            .into_response();
    };
    match specs_from(specs) {
        Ok(specs) => {
            set_specs(
                &state,
                origin,
                id,
                specs,
                |specs| json!({"extra_specs": specs}),
            )
            .await
        }
        Err(e) => e.into_response(),
    }
}

/// `PUT /v2.1/flavors/{id}/os-extra_specs/{key}` `{key: …}`, key `usb_devices` or
/// `usb:on_fingerprint_change`.
async fn put_extra_spec(
    State(state): State<CmdState>,
    origin: HttpOrigin,
    Path((id, key)): Path<(String, String)>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return crate::rejection(&e).into_response(),
    };
    let Some(specs) = body
        .as_object()
        .filter(|o| o.len() == 1 && o.contains_key(&key))
    else {
        return bad(format!(
            "the body must be {{\"{key}\": …}}, one key, the one in the path"
        ))
        .into_response();
    };
    match specs_from(specs) {
        Ok(specs) => set_specs(&state, origin, id, specs, |specs| specs).await,
        Err(e) => e.into_response(),
    }
}

/// `DELETE /v2.1/flavors/{id}/os-extra_specs/{key}`: `usb_devices` (the flavor asks for no
/// devices) or `usb:on_fingerprint_change` (back to the default, hold).
async fn delete_extra_spec(
    State(state): State<CmdState>,
    origin: HttpOrigin,
    Path((id, key)): Path<(String, String)>,
) -> Response {
    let specs = match key.as_str() {
        SPEC_USB => Specs {
            usb: Some(Vec::new()),
            policy: None,
        },
        SPEC_FINGERPRINT => Specs {
            usb: None,
            policy: Some(FingerprintPolicy::Hold),
        },
        _ => {
            return ApiError::not_found(format!("Flavor {id} has no extra specs with key {key}."))
                .into_response()
        }
    };
    set_specs(&state, origin, id, specs, |_| json!({})).await
}

/// Nova's action bodies: exactly one key.
async fn server_action(
    State(state): State<CmdState>,
    origin: HttpOrigin,
    nova: Nova,
    Path(id): Path<String>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return crate::rejection(&e).into_response(),
    };
    let Some((key, arg)) = body
        .as_object()
        .filter(|o| o.len() == 1)
        .and_then(|o| o.iter().next())
    else {
        return bad("an action body has exactly one key, e.g. {\"os-stop\": null}").into_response();
    };
    let name = match name_of(&state, id, server_name, "server").await {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    let host = |arg: &Value| -> Result<Option<HostName>, ApiError> {
        match arg.get("host") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(h)) => h
                .parse()
                .map(Some)
                .map_err(|e| bad(format!("{key}.host: {e}"))),
            Some(other) => Err(bad(format!(
                "{key}.host: expected a host name (a string) or null, got {}",
                crate::guard::shown(&other.to_string(), 40)
            ))),
        }
    };
    let act = |action| {
        Ok(Command::Act {
            name: name.clone(),
            action,
        })
    };
    let cmd: Result<Command, ApiError> = match key.as_str() {
        "resize" => match arg.get("flavorRef").and_then(Value::as_str) {
            Some(f) => match name_of(&state, f.to_owned(), flavor_name, "flavor").await {
                Ok(flavor) => Ok(Command::Resize {
                    name: name.clone(),
                    flavor,
                }),
                Err(e) => Err(e),
            },
            None => Err(bad("resize needs {\"resize\": {\"flavorRef\": …}}")),
        },
        "os-migrateLive" => host(arg).map(|host| Command::Migrate {
            name: name.clone(),
            live: true,
            host,
        }),
        "migrate" => host(arg).map(|host| Command::Migrate {
            name: name.clone(),
            live: false,
            host,
        }),
        "os-stop" => act(ServerAction::Stop),
        "os-start" => act(ServerAction::Start),
        "reboot" => act(ServerAction::Reboot),
        "pause" => act(ServerAction::Pause),
        "unpause" => act(ServerAction::Unpause),
        "suspend" => act(ServerAction::Suspend),
        "resume" => act(ServerAction::Resume),
        "rebuild" => act(ServerAction::Rebuild),
        "confirmResize" => Ok(Command::ConfirmResize { name: name.clone() }),
        "revertResize" => Ok(Command::RevertResize { name: name.clone() }),
        other => Err(bad(format!("unknown server action {other:?}"))),
    };
    let cmd = match cmd {
        Ok(cmd) => cmd,
        Err(e) => return e.into_response(),
    };
    let reply = run(&state, origin, cmd).await;
    // Nova answers a confirmResize with 204.
    if key == "confirmResize" && reply.status() == StatusCode::ACCEPTED {
        return StatusCode::NO_CONTENT.into_response();
    }
    if key != "rebuild" || reply.status() != StatusCode::ACCEPTED {
        return reply;
    }
    // Nova answers a rebuild with the server.
    let view = Arc::clone(&state.view);
    let doc = tokio::task::spawn_blocking(move || -> Result<Value, ApiError> {
        let snap = view.snapshot()?;
        let s = snap
            .server_by_name(&name)?
            .ok_or_else(|| ApiError::not_found(format!("server {name} does not exist")))?;
        Ok(json!({"server": crate::docs::server(&snap, &s, &nova)?}))
    })
    .await;
    match doc {
        Ok(Ok(doc)) => (StatusCode::ACCEPTED, Json(doc)).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Nova's `PUT /servers/{id}` body: `name`, and `description` from 2.19. Nova's other keys
/// (`accessIPv4`, `accessIPv6`, `OS-DCF:diskConfig`) are accepted and ignored, as usbpt has no
/// networks or disks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    server: UpdateFields,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateFields {
    #[serde(default)]
    name: Option<String>,
    /// Absent: unchanged; `null`: cleared.
    #[serde(default, deserialize_with = "present")]
    description: Option<Option<String>>,
    #[serde(default, rename = "accessIPv4")]
    _access_ipv4: Option<Value>,
    #[serde(default, rename = "accessIPv6")]
    _access_ipv6: Option<Value>,
    #[serde(default, rename = "OS-DCF:diskConfig")]
    _disk_config: Option<Value>,
}

/// A key that is present (possibly `null`) is `Some`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// `PUT /v2.1/servers/{id}`: rename and/or describe; 200 with the server, as Nova.
async fn update_server(
    State(state): State<CmdState>,
    origin: HttpOrigin,
    nova: Nova,
    Path(id): Path<String>,
    body: Result<Json<UpdateBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return bad(e.body_text()).into_response(),
    };
    let fields = body.server;
    if fields.description.is_some() && !nova.version.at_least(19) {
        return bad("server.description: needs microversion 2.19 or later").into_response();
    }
    let new_name = match fields.name.map(ServerName::new).transpose() {
        Ok(n) => n,
        Err(e) => return bad(format!("server.name: {e}")).into_response(),
    };
    let name = match name_of(&state, id, server_name, "server").await {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    let shown = new_name.clone().unwrap_or_else(|| name.clone());
    let reply = run(
        &state,
        origin,
        Command::UpdateServer {
            name,
            new_name,
            description: fields.description,
        },
    )
    .await;
    if reply.status() != StatusCode::ACCEPTED {
        return reply;
    }
    let view = Arc::clone(&state.view);
    let doc = tokio::task::spawn_blocking(move || -> Result<Value, ApiError> {
        let snap = view.snapshot()?;
        let s = snap
            .server_by_name(&shown)?
            .ok_or_else(|| ApiError::not_found(format!("server {shown} does not exist")))?;
        Ok(json!({"server": crate::docs::server(&snap, &s, &nova)?}))
    })
    .await;
    match doc {
        Ok(Ok(doc)) => (StatusCode::OK, Json(doc)).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Nova answers a server delete with 204 and no body.
async fn delete_server(
    State(state): State<CmdState>,
    origin: HttpOrigin,
    Path(id): Path<String>,
) -> Response {
    match name_of(&state, id, server_name, "server").await {
        Ok(name) => {
            let reply = run(&state, origin, Command::Delete { name }).await;
            if reply.status() == StatusCode::ACCEPTED {
                StatusCode::NO_CONTENT.into_response()
            } else {
                reply
            }
        }
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: Value) -> UsbDeviceBody {
        serde_json::from_value(json).expect("a usb_devices entry")
    }

    #[test]
    fn usb_devices_entries_use_the_shared_validation() {
        let id = DeviceId::new_v7();
        // `serial` and `count` beside `id` were dropped silently; now refused, naming the entry.
        for entry in [
            json!({"id": id, "serial": "S"}),
            json!({"id": id, "count": 2}),
            json!({"vendor_id": "136b", "product_id": "0003", "count": 0}),
            json!({"vendor_id": "136b", "product_id": "0003", "serial": ""}),
            json!({"vendor_id": "136b", "product_id": "0003", "count": 3, "controller": "uhci"}),
        ] {
            let err = body(entry.clone()).request(2).expect_err("refused");
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{entry}");
            assert!(
                err.message.starts_with("usb_devices[2]: "),
                "{entry}: {}",
                err.message
            );
        }
        let r = body(json!({"id": id})).request(0).expect("valid");
        assert_eq!(r.controller, ControllerModel::Ehci);
        assert_eq!(r.follow, FollowPolicy::Lineage);
    }
}
