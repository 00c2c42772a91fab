//! The command handler: the I/O around [`decide`]. It reads one snapshot of the view, decides,
//! appends the steps in order (claims fenced on their lineage subject), and on a lost race
//! releases what it had claimed, waits for the view to catch up with the stream and decides
//! again. It replies once the view has applied what it appended (read-your-writes).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tracing::{info, info_span, warn, Instrument};
use usbpt_bus::{Bus, BusError};
use usbpt_schemas::commands::{Command, CommandReply, RejectKind};
use usbpt_schemas::{
    subjects, CorrelationId, Envelope, Event, EventId, FlavorId, Origin, ServerId, Via,
};

use crate::decide::{decide, Ctx, Fence, Reply, Step};
use crate::inflight::{InFlight, Overlay};
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
/// Commands of one handler past their decision at once ([`Handler::window`]).
pub const IN_FLIGHT: usize = 8;
/// How long a reply waits for the view to show what the command appended.
const READ_YOUR_WRITES: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Handler<V> {
    bus: Bus,
    view: Arc<V>,
    weigh: Weigh,
    /// One decision at a time in this process (a snapshot and `decide`, ~0.1 ms); appends,
    /// acks and waits for the view run for many commands at once.
    deciding: Arc<tokio::sync::Mutex<()>>,
    /// How many commands of this process may be past their decision and not yet done (ADR
    /// 0010): enough to keep the acks and the view's commits busy, few enough that concurrent
    /// decisions of several processes rarely pick the same device.
    window: Arc<tokio::sync::Semaphore>,
    /// This process's claims decided and not yet applied by the view: later decisions read the
    /// view through them, so commands here do not race each other, only other processes (whom
    /// the fences stop).
    inflight: Arc<InFlight>,
    /// This process's pack lane (`Ctx::lane`): drawn at random, never 0.
    lane: u64,
    /// The stream-head reads, shared by the commands that wait for one at the same time.
    head: Arc<HeadReads>,
    stats: Arc<HandlerStats>,
}

/// Reads of the stream's head, shared (ADR 0010). A command must decide on a view at least as
/// new as the stream was when the command arrived, so it needs a head read that *started*
/// after it arrived; any such read will do, whoever asked for it. One read runs at a time;
/// the commands that arrive meanwhile share the next one. Under load that is one request per
/// round trip instead of one per command, with the same guarantee.
#[derive(Debug, Default)]
struct HeadReads {
    /// How many reads have started.
    started: AtomicU64,
    /// The last read done: its number (1 for the first) and the head it returned.
    last: tokio::sync::Mutex<(u64, u64)>,
}

impl HeadReads {
    async fn read(&self, bus: &Bus) -> Result<u64, BusError> {
        self.read_with(|| bus.last_sequence()).await
    }

    /// [`HeadReads::read`] with the read itself given (tests count them).
    async fn read_with<F, R>(&self, fetch: F) -> Result<u64, BusError>
    where
        F: FnOnce() -> R,
        R: Future<Output = Result<u64, BusError>>,
    {
        let arrived = self.started.load(SeqCst);
        let mut last = self.last.lock().await;
        // Read number `n` took its number after this command loaded `arrived` exactly when
        // `n > arrived`, so it started after the command arrived.
        if last.0 > arrived {
            return Ok(last.1);
        }
        let n = self.started.fetch_add(1, SeqCst) + 1;
        let head = fetch().await?;
        *last = (n, head);
        Ok(head)
    }
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
    /// Where commands spent their time, summed in microseconds (`usbpt bench` breaks a boot
    /// down with these): waiting for this process's turn to decide (the decision alone is
    /// serialized),
    pub queue_us: AtomicU64,
    /// for the view to reach the stream's head before deciding,
    pub head_us: AtomicU64,
    /// deciding (snapshot and `decide`),
    pub decide_us: AtomicU64,
    /// appending the steps,
    pub append_us: AtomicU64,
    /// for the view to apply what was appended (read-your-writes),
    pub view_us: AtomicU64,
    /// and undoing, backing off and catching up after lost races.
    pub retry_us: AtomicU64,
}

/// Adds the time since `t` to `counter` (microseconds) and restarts `t`.
fn lap(counter: &AtomicU64, t: &mut std::time::Instant) {
    let now = std::time::Instant::now();
    counter.fetch_add((now - *t).as_micros() as u64, Relaxed);
    *t = now;
}

enum AppendError {
    /// Lost a race on a fenced subject; `undo` undoes what this attempt already stored.
    Conflict { subject: String, undo: Vec<Undo> },
    /// A step would be larger than the bus takes; nothing was appended.
    TooLarge {
        step: usize,
        kind: &'static str,
        bytes: usize,
        limit: usize,
    },
    /// A step's fence disagrees with its subject ([`subjects::is_fenced`]): a claim without a
    /// fence is never appended. Nothing from this step on was appended.
    Unfenced {
        step: usize,
        subject: String,
        undo: Vec<Undo>,
    },
    /// The bus refused or lost an append after the steps `undo` undoes were stored.
    Bus { error: BusError, undo: Vec<Undo> },
}

/// A stored step's compensation ([`Step::undo`]): fenced on the sequence the step got when its
/// subject is fenced (a claim's release), plain otherwise (a boot request's `ServerDeleted`).
struct Undo {
    event: Event,
    fence: Option<u64>,
}

/// Room left in a NATS message for usbpt's headers (message id, fence, signature).
const HEADER_ROOM: usize = 1024;

impl<V: ViewSource> Handler<V> {
    pub fn new(bus: Bus, view: Arc<V>, weigh: Weigh) -> Self {
        Self {
            bus,
            view,
            weigh,
            deciding: Arc::new(tokio::sync::Mutex::new(())),
            window: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
            inflight: Arc::default(),
            // The random low bits of a fresh UUIDv7.
            lane: (ServerId::new_v7().0.as_u128() as u64).max(1),
            head: Arc::default(),
            stats: Arc::default(),
        }
    }

    /// Counters of commands, decisions and lost races.
    pub fn stats(&self) -> &HandlerStats {
        &self.stats
    }

    /// Executes one command end to end. Every event it appends (compensations too) carries
    /// `origin`, who asked (ADR 0014): the caller vouches for it — the HTTP API in-process, the
    /// NATS server loop from the reply subject ([`nats_origin`]), a policy for itself.
    pub async fn execute(&self, cmd: &Command, origin: Origin) -> CommandReply {
        let correlation = CorrelationId::new_v7();
        let span = info_span!(
            "command",
            kind = cmd.kind(),
            %correlation,
            via = origin.via().as_str(),
            principal = %usbpt_schemas::text::Escaped(origin.principal()),
        );
        let stamp = Stamp {
            correlation,
            origin,
        };
        self.execute_inner(cmd, &stamp).instrument(span).await
    }

    async fn execute_inner(&self, cmd: &Command, stamp: &Stamp) -> CommandReply {
        let ctx = Ctx {
            server_id: ServerId::new_v7(),
            flavor_id: FlavorId::new_v7(),
            weigh: self.weigh,
            lane: self.lane,
        };
        self.stats.commands.fetch_add(1, Relaxed);
        let mut t = std::time::Instant::now();
        // A place in this handler's window, held until the command is done. Taken before the
        // stream-head wait: a decision made long after its head was read is made on a stale
        // view, and loses its race to the handlers that appended meanwhile.
        let Ok(_slot) = self.window.acquire().await else {
            return rejected(RejectKind::Unavailable, "the handler is closing".into());
        };
        lap(&self.stats.queue_us, &mut t);
        // Plain undos of steps a retry does not repeat (the boot request's `ServerDeleted`): if
        // the command fails after them, they leave no half-created server behind.
        let mut kept: Vec<Undo> = Vec::new();
        // Decide on a view at least as fresh as the stream was when the command arrived, so a
        // command sees what any handler appended before it (read-your-writes across processes).
        match self.head.read(&self.bus).await {
            Ok(head) => {
                if !self.view.wait_applied(head, READ_YOUR_WRITES).await {
                    return rejected(
                        RejectKind::Unavailable,
                        format!("the view is behind the stream (sequence {head}); try again"),
                    );
                }
            }
            Err(e) => return rejected(RejectKind::Unavailable, e.to_string()),
        }
        lap(&self.stats.head_us, &mut t);
        for attempt in 1..=MAX_ATTEMPTS {
            let turn = self.deciding.lock().await;
            lap(&self.stats.queue_us, &mut t);
            self.stats.decisions.fetch_add(1, Relaxed);
            let decision = match self.view.snapshot() {
                Ok(snap) => decide(
                    &Overlay {
                        view: &snap,
                        inflight: &self.inflight,
                    },
                    cmd,
                    &ctx,
                ),
                Err(e) => return rejected(RejectKind::Unavailable, e.to_string()),
            };
            let decision = match decision {
                Ok(d) => d,
                Err(r) => return rejected(r.kind(), r.to_string()),
            };
            // In flight from here until the view shows them (or the command gives them up).
            let reservation = self.inflight.reserve(&decision.steps);
            drop(turn);
            lap(&self.stats.decide_us, &mut t);
            let appended = self.append(&decision.steps, stamp).await;
            lap(&self.stats.append_us, &mut t);
            match appended {
                Ok((ids, last)) => {
                    if last > 0 && !self.view.wait_applied(last, READ_YOUR_WRITES).await {
                        warn!(seq = last, "view did not catch up before the reply");
                    }
                    drop(reservation);
                    lap(&self.stats.view_us, &mut t);
                    return match decision.reply {
                        Reply::Accepted(message) => CommandReply::Accepted {
                            events: ids,
                            message,
                        },
                        Reply::Refused(r) => rejected(r.kind(), r.to_string()),
                    };
                }
                Err(AppendError::TooLarge {
                    step,
                    kind,
                    bytes,
                    limit,
                }) => {
                    return rejected(
                        RejectKind::TooLarge,
                        format!(
                            "step {step} ({kind}) would be {bytes} bytes; the bus takes at most \
                             {limit}: nothing was appended"
                        ),
                    )
                }
                Err(AppendError::Unfenced {
                    step,
                    subject,
                    mut undo,
                }) => {
                    undo.append(&mut kept);
                    let undone = self.undone(undo, stamp).await;
                    return rejected(
                        RejectKind::Unavailable,
                        format!(
                            "step {step} on the fenced subject {subject} has no fence (a \
                             defect in the decision); nothing from it on was appended, {undone}"
                        ),
                    );
                }
                Err(AppendError::Bus { error, mut undo }) => {
                    warn!(%error, "an append failed part-way; undoing what this command appended");
                    undo.append(&mut kept);
                    let undone = self.undone(undo, stamp).await;
                    return rejected(RejectKind::Unavailable, format!("{error}; {undone}"));
                }
                Err(AppendError::Conflict { subject, undo }) => {
                    self.stats.conflicts.fetch_add(1, Relaxed);
                    info!(attempt, %subject, "lost a race; releasing and deciding again");
                    let (now, later): (Vec<Undo>, Vec<Undo>) =
                        undo.into_iter().partition(|u| u.fence.is_some());
                    kept.extend(later);
                    if let Err(e) = self.undo(now, stamp).await {
                        return rejected(RejectKind::Unavailable, e.to_string());
                    }
                    let Ok(head) = self.head.read(&self.bus).await else {
                        return rejected(
                            RejectKind::Unavailable,
                            "cannot read the stream's head".into(),
                        );
                    };
                    // Let the other process's writes land, with a jitter drawn from the
                    // server id so racing handlers do not retry in lockstep.
                    let jitter = (ctx.server_id.0.as_u128() % 7) as u64 + 1;
                    tokio::time::sleep(Duration::from_millis(jitter * attempt as u64)).await;
                    self.view.wait_applied(head, READ_YOUR_WRITES).await;
                    lap(&self.stats.retry_us, &mut t);
                }
            }
        }
        let undone = match self.undo(kept, stamp).await {
            Ok(()) => "",
            Err(_) => " (and the server it recorded could not be removed)",
        };
        rejected(
            RejectKind::Conflict,
            format!("lost the race for a device {MAX_ATTEMPTS} times; try again{undone}"),
        )
    }

    /// Appends `undo` (in order: claims' releases before the server's removal) and says how
    /// that went, for a reply.
    async fn undone(&self, undo: Vec<Undo>, stamp: &Stamp) -> String {
        match self.undo(undo, stamp).await {
            Ok(()) => "what it had appended was undone".to_owned(),
            Err(e) => format!("undoing what it had appended failed too: {e}"),
        }
    }

    /// Appends the compensations of stored steps, fenced releases first: a command that failed
    /// part-way leaves no claim and no half-created server.
    async fn undo(&self, mut undo: Vec<Undo>, stamp: &Stamp) -> Result<(), BusError> {
        undo.sort_by_key(|u| u.fence.is_none());
        for u in undo {
            let env = stamp.envelope(u.event);
            match u.fence {
                Some(seq) => self.bus.publish_fenced(&env, seq).await?,
                None => self.bus.publish(&env).await?,
            };
        }
        Ok(())
    }

    /// Every step's envelope, built before the first append; each one's encoded size is
    /// checked against what the bus takes, so an oversized step is refused with nothing stored.
    fn envelopes(&self, steps: &[Step], stamp: &Stamp) -> Result<Vec<Envelope>, AppendError> {
        let limit = match self.bus.server_info().max_payload {
            0 => 1 << 20,
            n => n,
        }
        .saturating_sub(HEADER_ROOM);
        let mut cause: Option<EventId> = None;
        let mut out = Vec::with_capacity(steps.len());
        for (i, step) in steps.iter().enumerate() {
            let mut env = stamp.envelope(step.event.clone());
            env.causation_id = cause;
            let bytes = usbpt_schemas::encode(&env).map_or(usize::MAX, |b| b.len());
            if bytes > limit {
                return Err(AppendError::TooLarge {
                    step: i,
                    kind: step.event.kind(),
                    bytes,
                    limit,
                });
            }
            cause.get_or_insert(env.event_id);
            out.push(env);
        }
        Ok(out)
    }

    /// Appends the steps in order. Returns the event ids and the last stream sequence written.
    /// A step is fenced exactly when its subject is ([`subjects::is_fenced`]); a step whose
    /// fence disagrees is not appended.
    async fn append(
        &self,
        steps: &[Step],
        stamp: &Stamp,
    ) -> Result<(Vec<EventId>, u64), AppendError> {
        let envelopes = self.envelopes(steps, stamp)?;
        let mut written: HashMap<String, u64> = HashMap::new();
        let mut undo = Vec::new();
        let mut ids = Vec::new();
        let mut last = 0;
        for (i, (step, env)) in steps.iter().zip(envelopes).enumerate() {
            let subject = subjects::for_event(&env);
            let result = match (subjects::is_fenced(&subject), step.fence) {
                (false, Fence::None) => self.bus.publish(&env).await,
                (true, Fence::Expect(seen)) => {
                    let expected = written.get(&subject).copied().unwrap_or(seen);
                    self.bus.publish_fenced(&env, expected).await
                }
                _ => {
                    return Err(AppendError::Unfenced {
                        step: i,
                        subject,
                        undo,
                    })
                }
            };
            let published = match result {
                Ok(p) => p,
                Err(BusError::Conflict { subject, .. }) => {
                    return Err(AppendError::Conflict { subject, undo })
                }
                Err(error) => return Err(AppendError::Bus { error, undo }),
            };
            if let Some(event) = &step.undo {
                let fence =
                    subjects::is_fenced(&subjects::for_body(event)).then_some(published.sequence);
                undo.push(Undo {
                    event: event.clone(),
                    fence,
                });
            }
            written.insert(subject, published.sequence);
            ids.push(env.event_id);
            last = last.max(published.sequence);
        }
        Ok((ids, last))
    }

    /// Serves commands over NATS request/reply (`usbpt.cmd.>`, queue group `usbpt-commands`)
    /// until the connection closes. Up to `concurrency` commands run at once.
    pub async fn serve_nats(self: Arc<Self>, concurrency: usize) -> Result<(), BusError> {
        let authenticated = self.bus.public_key().is_some();
        let requests = self
            .bus
            .requests(subjects::ALL_COMMANDS, subjects::COMMAND_QUEUE)
            .await?;
        requests
            .for_each_concurrent(concurrency, |msg| {
                let this = Arc::clone(&self);
                async move {
                    let origin = nats_origin(msg.reply.as_deref(), authenticated);
                    let reply = match serde_json::from_slice::<Command>(&msg.payload) {
                        Ok(cmd) => this.execute(&cmd, origin).await,
                        Err(e) => rejected(RejectKind::Invalid, format!("invalid command: {e}")),
                    };
                    let body = serde_json::to_vec(&reply).unwrap_or_default();
                    if let Err(e) = this.bus.respond(&msg, body).await {
                        warn!("cannot send a command reply: {e}");
                    }
                }
            })
            .await;
        Ok(())
    }
}

/// What every envelope of one command carries: its correlation and who asked.
struct Stamp {
    correlation: CorrelationId,
    origin: Origin,
}

impl Stamp {
    fn envelope(&self, event: Event) -> Envelope {
        Envelope::new(event)
            .with_correlation(self.correlation)
            .with_origin(Some(self.origin.clone()))
    }
}

/// The origin of a command that arrived over NATS with reply subject `reply`: the requester's
/// nkey public key, read from its reply inbox `_INBOX.{public key}.…` (ADR 0014).
///
/// What that proves: on a bus with nkey authentication (`authenticated`: this handler
/// connected with one, so the server requires them) only the identity with that key may
/// subscribe to that inbox (ADR 0005), so a requester naming another identity's inbox never
/// gets the reply; and only `admin` identities may publish on `usbpt.cmd.>` at all. The
/// command body cannot claim an origin (commands deny unknown fields). A request without a
/// reply subject, or whose inbox is not an nkey's, or on a bus without nkeys, is recorded as
/// `unverified`.
pub fn nats_origin(reply: Option<&str>, authenticated: bool) -> Origin {
    let key = reply
        .and_then(|r| r.strip_prefix("_INBOX."))
        .and_then(|r| r.split('.').next())
        .filter(|k| {
            k.len() == 56
                && k.starts_with('U')
                && k.bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        });
    match key {
        Some(k) if authenticated => Origin::new(Via::Nats, k),
        _ => Origin::new(Via::Nats, "unverified"),
    }
}

fn rejected(kind: RejectKind, reason: String) -> CommandReply {
    CommandReply::Rejected { kind, reason }
}

/// Sends a command over NATS and waits for the reply (the CLI's and tests' client side).
pub async fn request(bus: &Bus, cmd: &Command, timeout: Duration) -> Result<CommandReply, String> {
    let body = serde_json::to_vec(cmd).map_err(|e| e.to_string())?;
    let reply = tokio::time::timeout(timeout, bus.request(subjects::command(cmd.kind()), body))
        .await
        .map_err(|_| format!("no reply from a command handler within {timeout:?}"))?
        .map_err(|e| {
            format!("command request failed: {e} (is `usbpt serve` or `usbpt commands` running?)")
        })?;
    serde_json::from_slice(&reply).map_err(|e| format!("unreadable command reply: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Commands waiting for a head read share the next one that starts after they arrived;
    /// none is answered by a read that started before it arrived.
    #[tokio::test]
    async fn head_reads_are_shared_and_never_older_than_the_command() {
        let reads = Arc::new(HeadReads::default());
        let count = Arc::new(AtomicU64::new(0));
        // The stream's head: each read returns how many reads have been made (1, 2, ...).
        let fetch = |count: Arc<AtomicU64>, gate: Option<tokio::sync::oneshot::Receiver<()>>| {
            move || async move {
                if let Some(gate) = gate {
                    let _ = gate.await;
                }
                Ok(count.fetch_add(1, SeqCst) + 1)
            }
        };
        // Read 1 is in flight (held by its gate) when commands A and B arrive.
        let (open, gate) = tokio::sync::oneshot::channel();
        let first = tokio::spawn({
            let (reads, count) = (Arc::clone(&reads), Arc::clone(&count));
            async move { reads.read_with(fetch(count, Some(gate))).await }
        });
        while reads.started.load(SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let later: Vec<_> = (0..2)
            .map(|_| {
                let (reads, count) = (Arc::clone(&reads), Arc::clone(&count));
                tokio::spawn(async move { reads.read_with(fetch(count, None)).await })
            })
            .collect();
        tokio::task::yield_now().await;
        open.send(()).ok();
        assert_eq!(first.await.ok().and_then(Result::ok), Some(1));
        let mut seen = Vec::new();
        for t in later {
            seen.push(t.await.ok().and_then(Result::ok));
        }
        // A and B arrived while read 1 ran: read 1 is too old for them; one read (2) serves both.
        assert_eq!(seen, vec![Some(2), Some(2)]);
        assert_eq!(count.load(SeqCst), 2);
        // A command arriving now, with no read running, makes its own.
        let c = reads.read_with(fetch(Arc::clone(&count), None)).await;
        assert_eq!(c.ok(), Some(3));
    }

    #[test]
    fn the_nats_principal_is_the_reply_inbox_key_only_on_an_authenticated_bus() {
        let key = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4";
        let reply = format!("_INBOX.{key}.abc.1");
        assert_eq!(nats_origin(Some(&reply), true), Origin::new(Via::Nats, key));
        let unverified = Origin::new(Via::Nats, "unverified");
        assert_eq!(nats_origin(Some(&reply), false), unverified);
        assert_eq!(nats_origin(None, true), unverified);
        assert_eq!(nats_origin(Some("_INBOX.abc.1"), true), unverified);
        assert_eq!(nats_origin(Some("reply.to.me"), true), unverified);
        let lower = format!("_INBOX.{}.x", key.to_lowercase());
        assert_eq!(nats_origin(Some(&lower), true), unverified);
    }
}
