//! The command handler: the I/O around [`decide`]. It reads one snapshot of the view, decides,
//! appends the steps in order (claims fenced on their lineage subject), and on a lost race
//! releases what it had claimed, waits for the view to catch up with the stream and decides
//! again. It replies once the view has applied what it appended (read-your-writes).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tracing::{info, info_span, warn, Instrument};
use usbpt_bus::{Bus, BusError};
use usbpt_schemas::commands::{Command, CommandReply};
use usbpt_schemas::{
    subjects, CorrelationId, DeviceReleased, Envelope, Event, EventId, FlavorId, ReleaseReason,
    ServerId,
};

use crate::decide::{decide, Ctx, Fence, Reply, Step};
use crate::schedule::Weigh;
use crate::view::{ViewError, ViewRead};

/// Where the handler reads the view. The projector implements it over its redb file.
pub trait ViewSource: Send + Sync + 'static {
    type Snapshot<'a>: ViewRead
    where
        Self: 'a;
    /// One consistent snapshot.
    fn snapshot(&self) -> Result<Self::Snapshot<'_>, ViewError>;
    /// Resolves once the view has applied stream sequence `seq` (or `limit` passed: false).
    fn wait_applied(&self, seq: u64, limit: Duration) -> impl Future<Output = bool> + Send;
}

/// How many times a decision is retried after losing a race for a fenced subject.
const MAX_ATTEMPTS: usize = 16;
/// How long a reply waits for the view to show what the command appended.
const READ_YOUR_WRITES: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Handler<V> {
    bus: Bus,
    view: Arc<V>,
    weigh: Weigh,
    /// One decision at a time in this process: commands here never race each other, only
    /// other processes (whom the fences stop).
    deciding: Arc<tokio::sync::Mutex<()>>,
    stats: Arc<HandlerStats>,
}

/// What a handler has done since it was made (`usbpt bench` reports the conflict rate).
#[derive(Debug, Default)]
pub struct HandlerStats {
    /// Commands executed.
    pub commands: AtomicU64,
    /// Decisions made: one per command, plus one per retry after a lost race.
    pub decisions: AtomicU64,
    /// Fenced appends that lost their race to another writer (each is followed by a retry).
    pub conflicts: AtomicU64,
}

enum AppendError {
    /// Lost a race on a fenced subject; `claimed` are the claims this attempt already stored.
    Conflict {
        subject: String,
        claimed: Vec<(DeviceReleased, u64)>,
    },
    Bus(BusError),
}

impl<V: ViewSource> Handler<V> {
    pub fn new(bus: Bus, view: Arc<V>, weigh: Weigh) -> Self {
        Self {
            bus,
            view,
            weigh,
            deciding: Arc::new(tokio::sync::Mutex::new(())),
            stats: Arc::default(),
        }
    }

    /// Counters of commands, decisions and lost races.
    pub fn stats(&self) -> &HandlerStats {
        &self.stats
    }

    /// Executes one command end to end.
    pub async fn execute(&self, cmd: &Command) -> CommandReply {
        let correlation = CorrelationId::new_v7();
        let span = info_span!("command", kind = cmd.kind(), %correlation);
        self.execute_inner(cmd, correlation).instrument(span).await
    }

    async fn execute_inner(&self, cmd: &Command, correlation: CorrelationId) -> CommandReply {
        let ctx = Ctx {
            server_id: ServerId::new_v7(),
            flavor_id: FlavorId::new_v7(),
            weigh: self.weigh,
        };
        self.stats.commands.fetch_add(1, Relaxed);
        let mut turn = Some(self.deciding.lock().await);
        // Decide on a view at least as fresh as the stream was when the command arrived, so a
        // command sees what any handler appended before it (read-your-writes across processes).
        match self.bus.last_sequence().await {
            Ok(head) => {
                if !self.view.wait_applied(head, READ_YOUR_WRITES).await {
                    return rejected(
                        503,
                        format!("the view is behind the stream (sequence {head}); try again"),
                    );
                }
            }
            Err(e) => return rejected(503, e.to_string()),
        }
        for attempt in 1..=MAX_ATTEMPTS {
            self.stats.decisions.fetch_add(1, Relaxed);
            let decision = match self.view.snapshot() {
                Ok(snap) => decide(&snap, cmd, &ctx),
                Err(e) => return rejected(503, e.to_string()),
            };
            let decision = match decision {
                Ok(d) => d,
                Err(r) => return rejected(r.code, r.reason),
            };
            match self.append(&decision.steps, correlation).await {
                Ok((ids, last)) => {
                    turn.take();
                    if last > 0 && !self.view.wait_applied(last, READ_YOUR_WRITES).await {
                        warn!(seq = last, "view did not catch up before the reply");
                    }
                    return match decision.reply {
                        Reply::Accepted(message) => CommandReply::Accepted {
                            events: ids,
                            message,
                        },
                        Reply::Refused { code, reason } => rejected(code, reason),
                    };
                }
                Err(AppendError::Bus(e)) => return rejected(503, e.to_string()),
                Err(AppendError::Conflict { subject, claimed }) => {
                    self.stats.conflicts.fetch_add(1, Relaxed);
                    info!(attempt, %subject, "lost a race; releasing and deciding again");
                    if let Err(e) = self.compensate(claimed, correlation).await {
                        return rejected(503, e.to_string());
                    }
                    let Ok(head) = self.bus.last_sequence().await else {
                        return rejected(503, "cannot read the stream's head".into());
                    };
                    // Let the other process's writes land, with a jitter drawn from the
                    // server id so racing handlers do not retry in lockstep.
                    let jitter = (ctx.server_id.0.as_u128() % 7) as u64 + 1;
                    tokio::time::sleep(Duration::from_millis(jitter * attempt as u64)).await;
                    self.view.wait_applied(head, READ_YOUR_WRITES).await;
                }
            }
        }
        rejected(
            409,
            format!("lost the race for a device {MAX_ATTEMPTS} times; try again"),
        )
    }

    /// Appends the steps in order. Returns the event ids and the last stream sequence written.
    async fn append(
        &self,
        steps: &[Step],
        correlation: CorrelationId,
    ) -> Result<(Vec<EventId>, u64), AppendError> {
        let mut written: HashMap<String, u64> = HashMap::new();
        let mut claimed = Vec::new();
        let mut ids = Vec::new();
        let mut last = 0;
        let mut cause: Option<EventId> = None;
        for step in steps {
            let mut env = Envelope::new(step.event.clone()).with_correlation(correlation);
            env.causation_id = cause;
            let subject = subjects::for_event(&env);
            let result = match step.fence {
                Fence::None => self.bus.publish(&env).await,
                Fence::Expect(seen) => {
                    let expected = written.get(&subject).copied().unwrap_or(seen);
                    self.bus.publish_fenced(&env, expected).await
                }
            };
            let published = match result {
                Ok(p) => p,
                Err(BusError::Conflict { subject, .. }) => {
                    return Err(AppendError::Conflict { subject, claimed })
                }
                Err(e) => return Err(AppendError::Bus(e)),
            };
            written.insert(subject, published.sequence);
            if let Event::DeviceClaimed(c) = &step.event {
                claimed.push((
                    DeviceReleased {
                        device_id: c.device_id,
                        lineage_id: c.lineage_id,
                        host: c.host.clone(),
                        server_id: c.server_id,
                        reason: ReleaseReason::BootFailed,
                    },
                    published.sequence,
                ));
            }
            cause.get_or_insert(env.event_id);
            ids.push(env.event_id);
            last = last.max(published.sequence);
        }
        Ok((ids, last))
    }

    /// Undoes the claims of an attempt that lost a later race.
    async fn compensate(
        &self,
        claimed: Vec<(DeviceReleased, u64)>,
        correlation: CorrelationId,
    ) -> Result<(), BusError> {
        for (release, seq) in claimed {
            let env = Envelope::new(Event::DeviceReleased(release)).with_correlation(correlation);
            self.bus.publish_fenced(&env, seq).await?;
        }
        Ok(())
    }

    /// Serves commands over NATS request/reply (`usbpt.cmd.>`, queue group `usbpt-commands`)
    /// until the connection closes. Up to `concurrency` commands run at once.
    pub async fn serve_nats(self: Arc<Self>, concurrency: usize) -> Result<(), BusError> {
        let client = self.bus.client().clone();
        let subscriber = client
            .queue_subscribe(subjects::ALL_COMMANDS, subjects::COMMAND_QUEUE.to_owned())
            .await
            .map_err(|e| BusError::StreamRequest(e.to_string()))?;
        subscriber
            .for_each_concurrent(concurrency, |msg| {
                let this = Arc::clone(&self);
                let client = client.clone();
                async move {
                    let reply = match serde_json::from_slice::<Command>(&msg.payload) {
                        Ok(cmd) => this.execute(&cmd).await,
                        Err(e) => rejected(400, format!("invalid command: {e}")),
                    };
                    if let Some(to) = msg.reply {
                        let body = serde_json::to_vec(&reply).unwrap_or_default();
                        if let Err(e) = client.publish(to, body.into()).await {
                            warn!("cannot send a command reply: {e}");
                        }
                    }
                }
            })
            .await;
        Ok(())
    }
}

fn rejected(code: u16, reason: String) -> CommandReply {
    CommandReply::Rejected { code, reason }
}

/// Sends a command over NATS and waits for the reply (the CLI's and tests' client side).
pub async fn request(
    client: &usbpt_bus::async_nats::Client,
    cmd: &Command,
    timeout: Duration,
) -> Result<CommandReply, String> {
    let body = serde_json::to_vec(cmd).map_err(|e| e.to_string())?;
    let reply = tokio::time::timeout(
        timeout,
        client.request(subjects::command(cmd.kind()), body.into()),
    )
    .await
    .map_err(|_| format!("no reply from a command handler within {timeout:?}"))?
    .map_err(|e| {
        format!("command request failed: {e} (is `usbpt serve` or `usbpt commands` running?)")
    })?;
    serde_json::from_slice(&reply.payload).map_err(|e| format!("unreadable command reply: {e}"))
}
