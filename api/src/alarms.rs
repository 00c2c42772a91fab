//! `GET /v1/alarms[?all=true]`: the fleet's identity alarms (docs/identity.md, "Alarms"),
//! active ones only unless `all`, oldest raised first.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::Json;
use serde_json::json;

use crate::{docs, parse, read, ApiResult, ApiState};

pub async fn list(
    State(st): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let all: bool = q.get("all").map_or(Ok(false), |s| parse("all", s))?;
    read(&st, move |snap| {
        let mut out = Vec::new();
        for (l, alarms) in snap.alarms(all)? {
            out.extend(alarms.iter().map(|a| docs::alarm(&l, a)));
        }
        Ok(Json(json!({"alarms": out})))
    })
    .await
}
