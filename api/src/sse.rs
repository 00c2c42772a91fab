//! `GET /v1/events`: the stream as Server-Sent Events, decoded to JSON, for dashboards.
//!
//! - Live by default (events stored after the subscription); `?from=SEQ` starts at a stream
//!   sequence (`from=1`: the whole history); a reconnecting client's `Last-Event-ID` resumes
//!   after the last event it saw. `?host=H` keeps only what host H's agent published.
//! - The first message is `event: subscribed` with the stream's last sequence: anything stored
//!   after the client received it is delivered.
//! - Each event: `id:` its sequence, `event:` its kind (`undecodable` for bad bytes), `data:`
//!   `{"seq", "subject", "event": envelope}` (or `"undecodable": reason`), as `usbpt events tail
//!   --json` prints.

use std::collections::HashMap;
use std::convert::Infallible;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{stream, Stream, StreamExt};
use serde_json::json;
use usbpt_bus::StartAt;
use usbpt_schemas::{codec, subjects, HostName};

use crate::{parse, ApiError, ApiState};

pub(crate) async fn events(
    State(st): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Some(bus) = st.bus.clone() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "live events need the bus; this server has none",
        ));
    };
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|s| parse::<u64>("Last-Event-ID", s))
        .transpose()?;
    let from = q.get("from").map(|s| parse::<u64>("from", s)).transpose()?;
    let start = match (resume, from) {
        (Some(last), _) => StartAt::Sequence(last.saturating_add(1)),
        (None, Some(seq)) => StartAt::Sequence(seq.max(1)),
        (None, None) => StartAt::New,
    };
    let filter = q
        .get("host")
        .map(|h| parse::<HostName>("host name", h).map(|h| subjects::host_all(&h)))
        .transpose()?;
    let head = bus
        .last_sequence()
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let messages = bus
        .ordered(start, filter)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let subscribed = Event::default()
        .event("subscribed")
        .data(json!({ "last_seq": head }).to_string());
    let live = messages.map(|m| {
        let event = match m {
            Ok(m) => {
                let seq = m.info().map(|i| i.stream_sequence).unwrap_or_default();
                let subject = m.subject.as_str();
                match codec::decode(&m.payload) {
                    Ok(env) => Event::default()
                        .id(seq.to_string())
                        .event(env.body.kind())
                        .data(json!({"seq": seq, "subject": subject, "event": env}).to_string()),
                    Err(e) => Event::default()
                        .id(seq.to_string())
                        .event("undecodable")
                        .data(
                            json!({"seq": seq, "subject": subject, "undecodable": e.to_string()})
                                .to_string(),
                        ),
                }
            }
            Err(e) => Event::default()
                .event("error")
                .data(json!({ "error": e.to_string() }).to_string()),
        };
        Ok(event)
    });
    let mut shutdown = st.shutdown.clone();
    let stream = stream::once(async move { Ok(subscribed) })
        .chain(live)
        .take_until(async move {
            if shutdown.wait_for(|closing| *closing).await.is_err() {
                // No shutdown signal wired: the stream ends with the connection.
                std::future::pending::<()>().await;
            }
        });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
