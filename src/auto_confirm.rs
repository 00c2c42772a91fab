//! Nova's `resize_confirm_window` (`usbpt serve --resize-confirm-window SECS`, off by default as
//! in Nova): a resize still awaiting confirmation that long after it was made is confirmed by
//! the command handler, as an operator's `confirmResize` would be (same decision, same events).
//! Each pending resize is timed from its `ServerResizeVerifying` (those pending when `serve`
//! starts too); it is confirmed only if that same resize is still the one pending.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tracing::{info, warn};
use usbpt_bus::{Bus, StartAt};
use usbpt_commands::handler::Handler;
use usbpt_projector::{Stamp, View};
use usbpt_schemas::commands::{Command, CommandReply};
use usbpt_schemas::{Event, ServerId, Timestamp};

/// How long after `since` (the resize awaiting confirmation) the window closes, from `now`.
/// Pure.
pub fn remaining(since: Timestamp, window: Duration, now: Timestamp) -> Duration {
    let elapsed = u64::try_from(now.as_micros() - since.as_micros()).unwrap_or(0);
    window.saturating_sub(Duration::from_micros(elapsed))
}

/// Runs until the stream cannot be read.
pub async fn run(
    bus: Bus,
    view: Arc<View>,
    handler: Arc<Handler<View>>,
    window: Duration,
) -> Result<()> {
    // Subscribe first, then look at what is already pending: a resize made in between is seen
    // twice, which is harmless (the second confirmation finds nothing pending).
    let mut events = bus.reader(StartAt::New, None).await?;
    for s in view.snapshot()?.servers(false)? {
        if let Some(r) = &s.resize_from {
            later(&view, &handler, window, s.id, r.stamp);
        }
    }
    loop {
        let msg = events.next().await?;
        let Ok(env) = msg.decode() else {
            continue;
        };
        let Event::ServerResizeVerifying(e) = &env.body else {
            continue;
        };
        later(
            &view,
            &handler,
            window,
            e.server_id,
            Stamp {
                seq: msg.seq,
                at: env.occurred_at,
            },
        );
    }
}

/// Confirms `server`'s resize of `since` once the window has passed, if it is still pending.
fn later(
    view: &Arc<View>,
    handler: &Arc<Handler<View>>,
    window: Duration,
    server: ServerId,
    since: Stamp,
) {
    let (view, handler) = (Arc::clone(view), Arc::clone(handler));
    tokio::spawn(async move {
        tokio::time::sleep(remaining(since.at, window, Timestamp::now())).await;
        view.wait_applied(since.seq, Duration::from_secs(10)).await;
        let pending = view.snapshot().and_then(|snap| snap.server_by_id(&server));
        let name = match pending {
            Ok(Some(s))
                if s.deleted.is_none()
                    && s.resize_from
                        .as_ref()
                        .is_some_and(|r| r.stamp.seq == since.seq) =>
            {
                s.name
            }
            Ok(_) => return,
            Err(e) => {
                warn!(%server, error = %e, "auto-confirm: the view cannot be read");
                return;
            }
        };
        match handler
            .execute(
                &Command::ConfirmResize { name },
                usbpt_schemas::Origin::policy("auto-confirm"),
            )
            .await
        {
            CommandReply::Accepted { message, .. } => {
                info!(%server, "resize_confirm_window passed: {message}");
            }
            CommandReply::Rejected { kind, reason } => {
                info!(%server, %kind, "auto-confirm not needed: {reason}");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_counts_from_the_resize() {
        let t0 = Timestamp::from_micros(1_000_000_000);
        let w = Duration::from_secs(60);
        assert_eq!(remaining(t0, w, t0), w);
        let later = Timestamp::from_micros(1_000_000_000 + 45_000_000);
        assert_eq!(remaining(t0, w, later), Duration::from_secs(15));
        let past = Timestamp::from_micros(1_000_000_000 + 90_000_000);
        assert_eq!(remaining(t0, w, past), Duration::ZERO);
        // A clock that went backwards waits the whole window.
        let before = Timestamp::from_micros(999_000_000);
        assert_eq!(remaining(t0, w, before), w);
    }
}
