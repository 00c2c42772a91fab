//! The command side's HTTP routes, Nova-shaped: `POST /v2.1/flavors`, `DELETE
//! /v2.1/flavors/{id}`, `POST /v2.1/servers`, `POST /v2.1/servers/{id}/action` with Nova's action
//! bodies, `DELETE /v2.1/servers/{id}`. Each becomes a [`Command`] for the in-process
//! [`Handler`]; `{id}` may be an id or a name. Accepted: `202 {"message", "events"}`; rejected:
//! the JSON error with the rejection's status code and reason.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use usbpt_commands::handler::Handler;
use usbpt_projector::View;
use usbpt_schemas::commands::{Command, CommandReply, UsbRequestFields};
use usbpt_schemas::{
    ControllerModel, DeviceId, FlavorName, FollowPolicy, HostName, LineageId, ProductId,
    ServerAction, ServerName, UsbRequest, VendorId,
};

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
        .route("/v2.1/servers", post(create_server))
        .route("/v2.1/servers/{id}/action", post(server_action))
        .route("/v2.1/servers/{id}", delete(delete_server))
        .with_state(CmdState { handler, view })
}

async fn run(state: &CmdState, cmd: Command) -> Response {
    match state.handler.execute(&cmd).await {
        CommandReply::Accepted { events, message } => (
            StatusCode::ACCEPTED,
            Json(json!({"message": message, "events": events})),
        )
            .into_response(),
        CommandReply::Rejected { code, reason } => ApiError::new(
            StatusCode::from_u16(code).unwrap_or(StatusCode::CONFLICT),
            reason,
        )
        .into_response(),
    }
}

fn bad(e: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(e.to_string())
}

/// One entry of `usb_devices`: the blueprint's `{"id": …}`, or a lineage, or a match.
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
#[derive(Debug, Deserialize)]
struct FlavorBody {
    name: FlavorName,
    #[serde(default)]
    usb_devices: Vec<UsbDeviceBody>,
}

async fn create_flavor(
    State(state): State<CmdState>,
    body: Result<Json<FlavorEnvelope>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return bad(e.body_text()).into_response(),
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
    run(
        &state,
        Command::CreateFlavor {
            name: body.flavor.name,
            usb,
        },
    )
    .await
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

async fn delete_flavor(State(state): State<CmdState>, Path(id): Path<String>) -> Response {
    match name_of(&state, id, flavor_name, "flavor").await {
        Ok(name) => run(&state, Command::DeleteFlavor { name }).await,
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct ServerEnvelope {
    server: ServerBody,
}
#[derive(Debug, Deserialize)]
struct ServerBody {
    name: ServerName,
    #[serde(rename = "flavorRef")]
    flavor_ref: String,
    /// Nova's forced host (`host` in microversion 2.74).
    host: Option<HostName>,
}

async fn create_server(
    State(state): State<CmdState>,
    body: Result<Json<ServerEnvelope>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return bad(e.body_text()).into_response(),
    };
    let flavor = match name_of(&state, body.server.flavor_ref, flavor_name, "flavor").await {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    run(
        &state,
        Command::Boot {
            name: body.server.name,
            flavor,
            host: body.server.host,
        },
    )
    .await
}

/// Nova's action bodies: exactly one key.
async fn server_action(
    State(state): State<CmdState>,
    Path(id): Path<String>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return bad(e.body_text()).into_response(),
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
        match arg.get("host").and_then(Value::as_str) {
            Some(h) => h.parse().map(Some).map_err(bad),
            None => Ok(None),
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
        other => Err(bad(format!("unknown server action {other:?}"))),
    };
    match cmd {
        Ok(cmd) => run(&state, cmd).await,
        Err(e) => e.into_response(),
    }
}

async fn delete_server(State(state): State<CmdState>, Path(id): Path<String>) -> Response {
    match name_of(&state, id, server_name, "server").await {
        Ok(name) => run(&state, Command::Delete { name }).await,
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
