//! Drains the outbox into JetStream, strictly in order, one event at a time: publish with
//! `Nats-Msg-Id` = event id, await the ack, then remove the entry. While the bus is unreachable it
//! retries with backoff and the rest of the agent keeps queueing.
//!
//! Exactly once in the stream: a retry inside the duplicate window is dropped by the server; for
//! the first event after a start or a failed attempt, the publisher also asks the stream for the
//! last message on the event's subject and skips the publish when it is this event (it was
//! stored, but the ack or the removal was lost, possibly longer ago than the window). Only that
//! first event can be in this state: nothing later is attempted before it is acknowledged.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};
use usbpt_bus::{Bus, BusError, StreamSettings};
use usbpt_schemas::{subjects, Envelope};

use crate::progress::{Progress, ProgressSink};
use crate::store::{Store, StoreError};

/// Which bus to publish to.
#[derive(Clone)]
pub struct BusTarget {
    pub url: String,
    /// This host's identity: an nkey seed file (`usbpt up`) or a NATS `.creds` file.
    pub creds: Option<PathBuf>,
    pub settings: StreamSettings,
    /// Refuse a server that admits clients without authentication (the CLI sets it unless
    /// `--insecure`).
    pub require_auth: bool,
    /// TLS to the server (none: plain TCP).
    pub tls: usbpt_bus::TlsClient,
    /// The command handler's nkey public key: when set, control work must carry its signature
    /// (ADR 0005); when not, only the structural checks apply.
    pub control_key: Option<String>,
}

impl std::fmt::Debug for BusTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusTarget")
            .field("url", &self.shown_url())
            .field("creds", &self.creds)
            .field("require_auth", &self.require_auth)
            .field("tls", &self.tls)
            .field("control_key", &self.control_key)
            .finish_non_exhaustive()
    }
}

impl BusTarget {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            creds: None,
            settings: StreamSettings::default(),
            require_auth: false,
            tls: usbpt_bus::TlsClient::default(),
            control_key: None,
        }
    }

    /// Connects (and ensures the stream), checking that the server requires authentication
    /// when [`BusTarget::require_auth`].
    pub async fn connect(&self) -> Result<Bus, usbpt_bus::BusError> {
        Bus::connect_checked(
            &self.url,
            self.creds.as_deref(),
            &self.settings,
            &usbpt_bus::ClientSecurity {
                insecure: !self.require_auth,
                tls: self.tls.clone(),
            },
        )
        .await
    }

    /// The URL without any `user:password@`, for logs.
    pub fn shown_url(&self) -> String {
        usbpt_bus::auth::redact_url(&self.url)
    }
}

const FIRST_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(2);
/// Failed attempts after which the connection is dropped and made again.
const RECONNECT_AFTER: u32 = 3;

/// When the publisher should stop: `None` while the agent runs; `Some(deadline)` to finish
/// draining by then (what is left stays in the outbox for the next start).
pub type StopSignal = watch::Receiver<Option<Instant>>;

pub(crate) struct Publisher {
    pub store: Arc<Store>,
    pub target: BusTarget,
    pub wake: Arc<Notify>,
    pub progress: ProgressSink,
}

enum Outcome {
    Published { duplicate: bool },
    AlreadyStored,
}

impl Publisher {
    /// Runs until stopped. Returns how many events it published; fails only when the local
    /// store does.
    pub async fn run(self, mut stop: StopSignal) -> Result<u64, StoreError> {
        let mut bus: Option<Bus> = None;
        let mut verify = true;
        let mut retry = FIRST_RETRY;
        let mut total = 0u64;
        let mut since_drained = 0u64;
        let mut outage = false;
        let mut failures = 0u32;
        loop {
            let deadline = *stop.borrow_and_update();
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            let Some((seq, envelope)) = self.store.outbox_first()? else {
                if since_drained > 0 {
                    info!(published = since_drained, "outbox drained");
                    (self.progress)(&Progress::Drained {
                        published: since_drained,
                    });
                    since_drained = 0;
                }
                if deadline.is_some() {
                    break;
                }
                tokio::select! {
                    _ = self.wake.notified() => {}
                    changed = stop.changed() => if changed.is_err() { break },
                }
                continue;
            };

            let attempt = async {
                if bus.is_none() {
                    let b = self.target.connect().await?;
                    info!(url = %self.target.shown_url(), "connected to the bus");
                    (self.progress)(&Progress::Connected {
                        url: self.target.shown_url(),
                    });
                    bus = Some(b);
                }
                match bus.as_ref() {
                    Some(b) => publish(b, &envelope, verify).await,
                    None => unreachable_bus(),
                }
            };
            let result = match deadline {
                Some(d) => match tokio::time::timeout_at(d, attempt).await {
                    Ok(r) => r,
                    Err(_) => break,
                },
                None => attempt.await,
            };
            match result {
                Ok(outcome) => {
                    self.store.outbox_remove(seq)?;
                    match outcome {
                        Outcome::Published { duplicate } => debug!(
                            kind = envelope.body.kind(),
                            event_id = %envelope.event_id,
                            duplicate,
                            "published"
                        ),
                        Outcome::AlreadyStored => info!(
                            kind = envelope.body.kind(),
                            event_id = %envelope.event_id,
                            "already in the stream from an earlier attempt; not published again"
                        ),
                    }
                    if outage {
                        info!(url = %self.target.shown_url(), "the bus is back");
                        (self.progress)(&Progress::Connected {
                            url: self.target.shown_url(),
                        });
                        outage = false;
                    }
                    verify = false;
                    retry = FIRST_RETRY;
                    failures = 0;
                    total += 1;
                    since_drained += 1;
                }
                Err(e) => {
                    verify = true;
                    if !outage {
                        let outbox = self.store.outbox_len()?;
                        warn!(error = %e, outbox, "cannot publish; events wait in the outbox");
                        (self.progress)(&Progress::Unreachable {
                            error: e.to_string(),
                            outbox,
                        });
                        outage = true;
                    } else {
                        debug!(error = %e, ?retry, "publish retry failed");
                    }
                    failures += 1;
                    // The client reconnects by itself; after a few failures start afresh anyway
                    // (a server that came back with an empty store needs the stream made again).
                    if failures >= RECONNECT_AFTER
                        || matches!(e, BusError::Connect { .. } | BusError::NoJetStream(_))
                    {
                        bus = None;
                        failures = 0;
                    }
                    let pause = tokio::time::sleep(retry);
                    tokio::select! {
                        _ = pause => {}
                        changed = stop.changed() => if changed.is_err() { break },
                    }
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
        }
        Ok(total)
    }
}

fn unreachable_bus() -> Result<Outcome, BusError> {
    Err(BusError::StreamRequest("no bus connection".into()))
}

async fn publish(bus: &Bus, envelope: &Envelope, verify: bool) -> Result<Outcome, BusError> {
    if verify {
        let subject = subjects::for_event(envelope);
        if let Some((_, id)) = bus.last_message_id(&subject).await? {
            if id == envelope.event_id.to_string() {
                return Ok(Outcome::AlreadyStored);
            }
        }
    }
    let published = bus.publish(envelope).await?;
    Ok(Outcome::Published {
        duplicate: published.duplicate,
    })
}
