//! Nova's `os-instance-actions` and `os-migrations`, built from what the view keeps of each
//! server's history: its boot, its resizes and cold migrations ([`Move`]), refused migrations,
//! its last power action and its deletion. The view keeps the newest
//! `SERVER_HISTORY_KEEP` moves and refusals of a server; `usbpt history` and `usbpt events`
//! read the whole stream. Request ids are stable: derived from the event's stream sequence.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::Json;
use serde_json::{json, Value};
use usbpt_projector::{MoveEnd, Server, Stamp};
use uuid::Uuid;

use crate::docs::{TENANT_ID, USER_ID};
use crate::nova::Nova;
use crate::{find_server, read, ApiError, ApiResult, ApiState};

/// A stable request id for the event at stream sequence `seq`.
fn request_id(seq: u64) -> String {
    format!(
        "req-{}",
        Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("usbpt:seq:{seq}").as_bytes())
    )
}

/// One instance action: Nova's name, when, and the error that ended it (if any).
struct Action {
    name: &'static str,
    stamp: Stamp,
    error: Option<String>,
}

fn actions_of(s: &Server) -> Vec<Action> {
    let mut out = vec![Action {
        name: "create",
        stamp: s.created,
        error: s
            .schedule_failures
            .iter()
            .find(|f| s.scheduled.is_none_or(|sch| f.stamp.seq < sch.seq))
            .map(|f| f.reason.clone()),
    }];
    for m in &s.moves {
        let revert = matches!(m.end, Some((MoveEnd::IsRevert, _)));
        out.push(Action {
            name: match (m.migration, revert) {
                (true, _) => "migrate",
                (false, true) => "revertResize",
                (false, false) => "resize",
            },
            stamp: m.end.filter(|_| revert).map_or(m.stamp, |(_, st)| st),
            error: None,
        });
        if let Some((MoveEnd::Confirmed, st)) = m.end {
            out.push(Action {
                name: "confirmResize",
                stamp: st,
                error: None,
            });
        }
    }
    for r in &s.migration_refusals {
        out.push(Action {
            name: if r.live { "live-migration" } else { "migrate" },
            stamp: r.stamp,
            error: Some(r.reason.clone()),
        });
    }
    if let Some(a) = &s.last_action {
        out.push(Action {
            name: a.action.as_str(),
            stamp: a.stamp,
            error: None,
        });
    }
    if let Some(d) = s.deleted {
        out.push(Action {
            name: "delete",
            stamp: d,
            error: None,
        });
    }
    out.sort_by_key(|a| std::cmp::Reverse(a.stamp.seq));
    out
}

fn action_doc(s: &Server, a: &Action, nova: &Nova, events: bool) -> Value {
    let mut doc = json!({
        "action": a.name,
        "instance_uuid": s.id,
        "request_id": request_id(a.stamp.seq),
        "user_id": USER_ID,
        "project_id": TENANT_ID,
        "start_time": a.stamp.at,
        "message": a.error.as_ref().map(|_| "Error"),
    });
    if nova.version.at_least(58) {
        doc["updated_at"] = json!(a.stamp.at);
    }
    if events {
        doc["events"] = json!([{
            "event": format!("usbpt_{}", a.name.replace('-', "_")),
            "start_time": a.stamp.at,
            "finish_time": a.stamp.at,
            "result": if a.error.is_some() { "Error" } else { "Success" },
            "traceback": a.error,
        }]);
    }
    doc
}

fn server_or_404(snap: &usbpt_projector::Snapshot, id: &str) -> Result<Server, ApiError> {
    find_server(snap, id)?
        .ok_or_else(|| ApiError::not_found(format!("Instance {id} could not be found.")))
}

/// `GET /v2.1/servers/{id}/os-instance-actions`, newest first.
pub async fn actions(State(st): State<ApiState>, nova: Nova, Path(id): Path<String>) -> ApiResult {
    read(&st, move |snap| {
        let s = server_or_404(snap, &id)?;
        let list: Vec<Value> = actions_of(&s)
            .iter()
            .map(|a| action_doc(&s, a, &nova, false))
            .collect();
        Ok(Json(json!({"instanceActions": list})))
    })
    .await
}

/// `GET /v2.1/servers/{id}/os-instance-actions/{request_id}`, with its events.
pub async fn action(
    State(st): State<ApiState>,
    nova: Nova,
    Path((id, req)): Path<(String, String)>,
) -> ApiResult {
    read(&st, move |snap| {
        let s = server_or_404(snap, &id)?;
        let found = actions_of(&s)
            .into_iter()
            .find(|a| request_id(a.stamp.seq) == req);
        match found {
            Some(a) => Ok(Json(
                json!({"instanceAction": action_doc(&s, &a, &nova, true)}),
            )),
            None => Err(ApiError::not_found(format!(
                "Action for request_id {req} on instance {id} not found"
            ))),
        }
    })
    .await
}

/// `GET /v2.1/os-migrations[?instance_uuid=…&migration_type=…&host=…]`: every kept resize,
/// cold migration and refused migration, newest first.
pub async fn migrations(
    State(st): State<ApiState>,
    nova: Nova,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    read(&st, move |snap| {
        let mut out: Vec<(u64, Value)> = Vec::new();
        for s in snap.servers(true)? {
            if q.get("instance_uuid")
                .is_some_and(|u| *u != s.id.to_string())
            {
                continue;
            }
            let last = s.moves.len().saturating_sub(1);
            for (i, m) in s.moves.iter().enumerate() {
                let kind = if m.migration { "migration" } else { "resize" };
                // Nova's statuses: `finished` awaits confirmation, then `confirmed` or
                // `reverted`; usbpt confirms migrations (and resizes before VERIFY_RESIZE) at
                // once. A revert's way back is part of the reverted resize, not a migration.
                let status = match m.end {
                    Some((MoveEnd::IsRevert, _)) => continue,
                    Some((MoveEnd::Reverted, _)) => "reverted",
                    Some((MoveEnd::Confirmed, _)) => "confirmed",
                    None if s.resize_from.is_some() && i == last => "finished",
                    None => "confirmed",
                };
                let updated = m.end.map_or(m.stamp.at, |(_, st)| st.at);
                out.push((
                    m.stamp.seq,
                    json!({
                        "id": m.stamp.seq,
                        "instance_uuid": s.id,
                        "migration_type": kind,
                        "status": status,
                        "source_compute": m.from_host,
                        "source_node": m.from_host,
                        "dest_compute": m.host,
                        "dest_node": m.host,
                        "dest_host": null,
                        "old_instance_type_id": m.from_flavor,
                        "new_instance_type_id": m.to_flavor,
                        "created_at": m.stamp.at,
                        "updated_at": updated,
                    }),
                ));
            }
            for r in &s.migration_refusals {
                let host = s.host.clone();
                out.push((
                    r.stamp.seq,
                    json!({
                        "id": r.stamp.seq,
                        "instance_uuid": s.id,
                        "migration_type": if r.live { "live-migration" } else { "migration" },
                        "status": "error",
                        "source_compute": host,
                        "source_node": host,
                        "dest_compute": null,
                        "dest_node": null,
                        "dest_host": null,
                        "old_instance_type_id": s.flavor_id,
                        "new_instance_type_id": s.flavor_id,
                        "created_at": r.stamp.at,
                        "updated_at": r.stamp.at,
                        "reason": r.reason,
                    }),
                ));
            }
        }
        out.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        let list: Vec<Value> = out
            .into_iter()
            .map(|(seq, mut m)| {
                if nova.version.at_least(59) {
                    m["uuid"] = json!(Uuid::new_v5(
                        &Uuid::NAMESPACE_URL,
                        format!("usbpt:migration:{seq}").as_bytes()
                    ));
                }
                m
            })
            .filter(|m| {
                q.get("migration_type")
                    .is_none_or(|t| m["migration_type"] == json!(t))
                    && q.get("host").is_none_or(|h| {
                        m["source_compute"] == json!(h) || m["dest_compute"] == json!(h)
                    })
            })
            .collect();
        Ok(Json(json!({"migrations": list})))
    })
    .await
}
