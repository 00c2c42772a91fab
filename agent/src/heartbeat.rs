//! The agent's liveness beat (ADR 0008): `alive <ms>` on `usbpt.hb.{host}` every
//! [`heartbeat::INTERVAL`] while the agent loop runs, `stopping` when it ends. Core NATS, fire
//! and forget: a lost beat only makes the host look down a little early or late, and the stream
//! stays free of beats.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, warn};
use usbpt_schemas::heartbeat::{self, Heartbeat};
use usbpt_schemas::HostName;

use crate::publisher::BusTarget;

/// The beating task; aborted when dropped (an agent loop that is dropped, as a crash, beats no
/// more), or stopped with a last `stopping` beat by [`Beating::stop`].
#[derive(Debug)]
pub struct Beating {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

/// Starts beating for `host` over its own connection to `target` (reconnecting as needed).
pub fn start(host: HostName, target: BusTarget) -> Beating {
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        let alive = Heartbeat::Alive {
            interval: heartbeat::INTERVAL,
        };
        let bus = loop {
            tokio::select! {
                _ = until_stopped(&mut stopped) => return,
                b = target.connect() => match b {
                    Ok(b) => break b,
                    Err(e) => {
                        warn!(error = %e, "heartbeat: bus unreachable; retrying");
                        tokio::select! {
                            _ = until_stopped(&mut stopped) => return,
                            _ = tokio::time::sleep(heartbeat::INTERVAL) => {}
                        }
                    }
                },
            }
        };
        let mut tick = tokio::time::interval(heartbeat::INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = until_stopped(&mut stopped) => break,
                _ = tick.tick() => {
                    if let Err(e) = bus.beat(&host, &alive).await {
                        debug!(error = %e, "heartbeat not sent");
                    }
                }
            }
        }
        let _ = bus.beat(&host, &Heartbeat::Stopping).await;
    });
    Beating {
        stop,
        task: Some(task),
    }
}

async fn until_stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

impl Beating {
    /// Sends the last beat (`stopping`) and waits briefly for it to leave.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
    }
}

impl Drop for Beating {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}
