//! Drains the outbox into JetStream in order, a window of events at a time: each event is sent
//! with `Nats-Msg-Id` = event id, up to [`WINDOW`] acks are in flight, and the acknowledged
//! entries leave the outbox in one durable commit. While the bus is unreachable it retries with
//! backoff and the rest of the agent keeps queueing.
//!
//! **Order.** The server stores what one connection sends in the order it was sent, so the
//! stream holds the outbox's order. A window ends before the first event whose subject is
//! already in it: at most one event per subject is ever unacknowledged.
//!
//! **Exactly once.** A retry inside the duplicate window is dropped by the server. Beyond it
//! (an ack or a removal lost to a crash, possibly long ago), the publisher checks, after a start
//! or a failed attempt, the last stored message of each subject in the window: an event that is
//! its subject's last message is already stored and leaves the outbox unpublished. Because no
//! later event of that subject was sent before it was acknowledged, "stored" and "its subject's
//! last message" are the same thing.
//!
//! **What this cannot keep**: if the server refuses one event of a window and stores a later
//! one (a transient per-message failure, as during a JetStream leader change), the refused
//! event is stored after the later one on retry. Each subject's order still holds.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};
use usbpt_bus::{Bus, BusError, StreamSettings};
use usbpt_schemas::Sealed;

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

/// Acks in flight at most, and the most outbox entries one round reads (the bench's raw
/// publish reaches the engine's pace from a few hundred in flight).
pub const WINDOW: usize = 512;
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

/// What one round did: the entries that left the outbox, and the error that ended it early.
struct Round {
    published: u64,
    already_stored: u64,
    failed: Option<BusError>,
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
            let head = self.store.outbox_head(WINDOW)?;
            if head.is_empty() {
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
            }
            let window = window(head);

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
                    Some(b) => Ok(self.round(b, &window, verify).await?),
                    None => Err(unreachable_bus()),
                }
            };
            let result: Result<Round, RoundError> = match deadline {
                Some(d) => match tokio::time::timeout_at(d, attempt).await {
                    Ok(r) => r,
                    Err(_) => break,
                },
                None => attempt.await,
            };
            let round = match result {
                Ok(round) => round,
                Err(RoundError::Store(e)) => return Err(e),
                Err(RoundError::Bus(e)) => Round {
                    published: 0,
                    already_stored: 0,
                    failed: Some(e),
                },
            };
            let moved = round.published + round.already_stored;
            total += round.published;
            since_drained += moved;
            if moved > 0 && outage {
                info!(url = %self.target.shown_url(), "the bus is back");
                (self.progress)(&Progress::Connected {
                    url: self.target.shown_url(),
                });
                outage = false;
            }
            match round.failed {
                None => {
                    verify = false;
                    retry = FIRST_RETRY;
                    failures = 0;
                }
                Some(e) => {
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

    /// Publishes one window: skips what is already stored (when `verify`), sends the rest with
    /// their acks in flight, and removes every entry that is now stored in one commit.
    async fn round(
        &self,
        bus: &Bus,
        window: &[(u64, Sealed)],
        verify: bool,
    ) -> Result<Round, RoundError> {
        let mut done = Vec::with_capacity(window.len());
        let mut already_stored = 0u64;
        let mut to_send = Vec::with_capacity(window.len());
        if verify {
            let lasts = futures::future::join_all(
                window
                    .iter()
                    .map(|(_, sealed)| bus.last_message_id(&sealed.subject)),
            )
            .await;
            for ((seq, sealed), last) in window.iter().zip(lasts) {
                match last? {
                    Some((_, id)) if id == sealed.event_id.to_string() => {
                        info!(
                            subject = %sealed.subject,
                            event_id = %sealed.event_id,
                            "already in the stream from an earlier attempt; not published again"
                        );
                        done.push(*seq);
                        already_stored += 1;
                    }
                    _ => to_send.push((*seq, sealed)),
                }
            }
        } else {
            to_send.extend(window.iter().map(|(seq, sealed)| (*seq, sealed)));
        }

        let mut failed = None;
        let mut pending = Vec::with_capacity(to_send.len());
        for (seq, sealed) in to_send {
            match bus.publish_sealed(sealed).await {
                Ok(ack) => pending.push((seq, sealed, ack)),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let mut published = 0u64;
        // Awaited together: each ack's timeout starts when it is first polled, so awaiting a
        // lost window one ack after another would wait out every timeout in turn.
        let acks = futures::future::join_all(
            pending
                .into_iter()
                .map(|(seq, sealed, ack)| async move { (seq, sealed, ack.stored().await) }),
        )
        .await;
        for (seq, sealed, stored) in acks {
            match stored {
                Ok(p) => {
                    debug!(
                        subject = %sealed.subject,
                        event_id = %sealed.event_id,
                        seq = p.sequence,
                        duplicate = p.duplicate,
                        "published"
                    );
                    done.push(seq);
                    published += 1;
                }
                // Later sends may still be stored: keep awaiting them, so that every stored
                // event leaves the outbox now.
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        self.store
            .outbox_remove_all(&done)
            .map_err(RoundError::Store)?;
        Ok(Round {
            published,
            already_stored,
            failed,
        })
    }
}

enum RoundError {
    Bus(BusError),
    Store(StoreError),
}

impl From<BusError> for RoundError {
    fn from(e: BusError) -> Self {
        RoundError::Bus(e)
    }
}

/// The longest prefix of `head` in which no subject repeats (see the module's "Order").
fn window(head: Vec<(u64, Sealed)>) -> Vec<(u64, Sealed)> {
    let mut seen = std::collections::HashSet::with_capacity(head.len());
    head.into_iter()
        .take_while(|(_, sealed)| seen.insert(sealed.subject.clone()))
        .collect()
}

fn unreachable_bus() -> RoundError {
    RoundError::Bus(BusError::StreamRequest("no bus connection".into()))
}
