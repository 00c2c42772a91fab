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
//! - Every client of the process shares one reader of the stream ([`crate::fanout`]); past
//!   the client cap the answer is 503 with `Retry-After`.

use std::collections::HashMap;
use std::convert::Infallible;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{stream, StreamExt};
use serde_json::json;
use usbpt_schemas::{subjects, HostName};

use crate::fanout::{FanoutError, StartFrom, RETRY_AFTER_SECS};
use crate::{parse, ApiError, ApiState};

/// Where a client starts: after its `Last-Event-ID`, else at `?from=`, else live. A
/// `Last-Event-ID` nothing can follow (`u64::MAX`) is refused, naming the header.
pub(crate) fn start_from(
    last_event_id: Option<&str>,
    from: Option<&str>,
) -> Result<StartFrom, ApiError> {
    if let Some(raw) = last_event_id {
        let last = parse::<u64>("Last-Event-ID", raw)?;
        let next = last.checked_add(1).ok_or_else(|| {
            ApiError::bad_request(format!(
                "invalid Last-Event-ID {last}: no stream sequence follows it"
            ))
        })?;
        return Ok(StartFrom::Seq(next));
    }
    match from {
        Some(raw) => Ok(StartFrom::Seq(parse::<u64>("from", raw)?.max(1))),
        None => Ok(StartFrom::New),
    }
}

pub(crate) async fn events(
    State(st): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    match open(st, q, headers).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn open(
    st: ApiState,
    q: HashMap<String, String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let last_event_id = match headers.get("last-event-id") {
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::bad_request("invalid Last-Event-ID: not a decimal stream sequence")
        })?),
        None => None,
    };
    let start = start_from(last_event_id, q.get("from").map(String::as_str))?;
    // `usbpt.evt.host.{host}.`: what that host's agent publishes.
    let prefix = q
        .get("host")
        .map(|h| {
            parse::<HostName>("host name", h)
                .map(|h| subjects::host_all(&h).trim_end_matches('>').to_owned())
        })
        .transpose()?;
    let fanout = st.fanout().await?;
    let admission = match fanout.admit(start) {
        Ok(a) => a,
        Err(e @ FanoutError::Full(_)) => {
            let mut resp =
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response();
            resp.headers_mut()
                .insert(header::RETRY_AFTER, RETRY_AFTER_SECS.into());
            return Ok(resp);
        }
        Err(FanoutError::Bus(e)) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                e.to_string(),
            ))
        }
    };
    let subscribed = Event::default()
        .event("subscribed")
        .data(json!({ "last_seq": admission.head }).to_string());
    let live = admission
        .into_stream()
        .filter(move |item| {
            let keep = prefix
                .as_deref()
                .is_none_or(|p| item.subject.starts_with(p));
            std::future::ready(keep)
        })
        .map(|item| {
            Ok::<_, Infallible>(
                Event::default()
                    .id(item.seq.to_string())
                    .event(item.kind.as_str())
                    .data(item.data.as_str()),
            )
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
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_event_id_max_is_refused_not_overflowed() {
        let e = start_from(Some(&u64::MAX.to_string()), None).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("Last-Event-ID"), "{}", e.message);
        assert_eq!(
            start_from(Some(&(u64::MAX - 1).to_string()), None).unwrap(),
            StartFrom::Seq(u64::MAX)
        );
        assert_eq!(
            start_from(Some("41"), Some("3")).unwrap(),
            StartFrom::Seq(42)
        );
        assert_eq!(start_from(None, Some("0")).unwrap(), StartFrom::Seq(1));
        assert_eq!(start_from(None, None).unwrap(), StartFrom::New);
        let e = start_from(Some("-1"), None).unwrap_err();
        assert!(e.message.contains("Last-Event-ID"), "{}", e.message);
    }
}
