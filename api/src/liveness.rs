//! Which hosts' agents are alive (ADR 0008): the agents' heartbeats (`usbpt.hb.{host}`, core
//! NATS, not in the stream), kept in memory here. A host is up while its last beat was `alive`
//! and is younger than [`Heartbeat::valid_for`] (three announced intervals); a clean `stopping`
//! beat makes it down at once. After `serve` starts, a host is down until its first beat
//! (within one interval).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use futures::StreamExt;
use usbpt_bus::Bus;
use usbpt_schemas::heartbeat::Heartbeat;
use usbpt_schemas::HostName;

/// A host's last beat and when it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    pub at: Instant,
    pub beat: Heartbeat,
}

/// Whether a host whose last beat is `last` is up at `now`. Pure.
pub fn is_up(last: Option<&Beat>, now: Instant) -> bool {
    last.is_some_and(|b| now.saturating_duration_since(b.at) < b.beat.valid_for())
}

#[derive(Debug, Default)]
pub struct Liveness {
    beats: Mutex<HashMap<HostName, Beat>>,
}

impl Liveness {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn record(&self, host: HostName, beat: Heartbeat, at: Instant) {
        self.beats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(host, Beat { at, beat });
    }

    pub fn up(&self, host: &HostName) -> bool {
        let beats = self.beats.lock().unwrap_or_else(PoisonError::into_inner);
        is_up(beats.get(host), Instant::now())
    }

    /// Follows the heartbeats on `bus` until `stopping` resolves. The client resubscribes by
    /// itself after a reconnection.
    pub async fn track(
        self: Arc<Self>,
        bus: Bus,
        stopping: impl std::future::Future<Output = ()>,
    ) -> Result<(), String> {
        let mut beats = bus.heartbeats().await.map_err(|e| e.to_string())?;
        tokio::pin!(stopping);
        loop {
            tokio::select! {
                _ = &mut stopping => return Ok(()),
                next = beats.next() => {
                    let Some(b) = next else {
                        return Err("the heartbeat subscription ended".into());
                    };
                    self.record(b.host, b.beat, Instant::now());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn up_until_three_intervals_pass_or_a_stopping_beat() {
        let t0 = Instant::now();
        let alive = Beat {
            at: t0,
            beat: Heartbeat::Alive {
                interval: Duration::from_secs(2),
            },
        };
        assert!(!is_up(None, t0), "never beaten: down");
        assert!(is_up(Some(&alive), t0));
        assert!(is_up(Some(&alive), t0 + Duration::from_millis(5999)));
        assert!(!is_up(Some(&alive), t0 + Duration::from_secs(6)));
        let stopping = Beat {
            at: t0,
            beat: Heartbeat::Stopping,
        };
        assert!(!is_up(Some(&stopping), t0));
    }
}
