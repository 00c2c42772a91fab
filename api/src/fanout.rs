//! One reader of the stream for every live-events client of this process.
//!
//! A dashboard costs the server a TCP connection and a queue slot here, never a JetStream
//! consumer: one ordered consumer per process (started by the first client) feeds a broadcast
//! channel and keeps the newest events in a replay window. A client that resumes
//! (`Last-Event-ID`, `?from=`) inside the window is served from it; one that asks for older
//! history waits for one of a few catch-up readers (short-lived ephemeral consumers the server
//! removes seconds after their last pull), which read up to the window and hand over to the
//! shared feed. Clients beyond [`FanoutConfig::max_clients`] are refused (503 + `Retry-After`).
//!
//! The window covers every stored event with a sequence in `(base, head]`: a start sequence
//! above `base` is served from memory, anything at or below it needs a catch-up reader.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::{Stream, StreamExt};
use serde_json::json;
use tokio::sync::{broadcast, OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};
use usbpt_bus::{Bus, BusError, Delivery, Reader, ReaderOptions, StartAt};

/// The limits of live-event fan-out in one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FanoutConfig {
    /// Live-event clients at once; the next one gets 503 with `Retry-After`.
    pub max_clients: usize,
    /// Catch-up readers (JetStream consumers) at once for clients resuming before the window;
    /// further such clients wait their turn.
    pub catch_up_readers: usize,
    /// The newest events kept in memory for resuming clients.
    pub window: usize,
    /// Events a client may fall behind the shared feed before its stream is ended (the
    /// browser reconnects and resumes with `Last-Event-ID`).
    pub lag: usize,
}

impl Default for FanoutConfig {
    fn default() -> Self {
        Self {
            max_clients: 1024,
            catch_up_readers: 4,
            window: 4096,
            lag: 1024,
        }
    }
}

/// How long the server keeps a catch-up reader's consumer after its last pull.
const CATCH_UP_INACTIVE: Duration = Duration::from_secs(5);
/// `Retry-After` for a client refused at the cap.
pub const RETRY_AFTER_SECS: u64 = 5;

/// One stored event, decoded and rendered once for every client.
#[derive(Debug)]
pub struct Item {
    pub seq: u64,
    pub subject: String,
    /// The SSE event name: the body's kind, or `undecodable`.
    pub kind: String,
    /// The SSE data: `{"seq", "subject", "event"}` or `{"seq", "subject", "undecodable"}`.
    pub data: String,
}

impl Item {
    fn from_delivery(m: Delivery) -> Self {
        let seq = m.seq;
        let (kind, data) = match m.decode() {
            Ok(env) => (
                env.body.kind().to_owned(),
                json!({"seq": seq, "subject": m.subject, "event": env}).to_string(),
            ),
            Err(e) => (
                "undecodable".to_owned(),
                json!({"seq": seq, "subject": m.subject, "undecodable": e.to_string()}).to_string(),
            ),
        };
        Self {
            seq,
            subject: m.subject,
            kind,
            data,
        }
    }
}

#[derive(Debug)]
struct Window {
    items: VecDeque<Arc<Item>>,
    /// Every stored event after `base` up to `head` is in `items`.
    base: u64,
    head: u64,
}

/// The shared feed of one process.
#[derive(Debug)]
pub struct Fanout {
    bus: Bus,
    config: FanoutConfig,
    clients: Arc<Semaphore>,
    catch_up: Arc<Semaphore>,
    window: Mutex<Window>,
    tx: broadcast::Sender<Arc<Item>>,
    /// Clients refused at the cap, and ended for falling behind (for `/metrics`).
    refused: AtomicU64,
    lagged: AtomicU64,
}

/// Why a client cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum FanoutError {
    #[error("too many live-event clients (the limit is {0}); retry later")]
    Full(usize),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Where a client starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// Events stored after the subscription.
    New,
    /// This stream sequence and after.
    Seq(u64),
}

/// A client's admission: its place under the cap and the head it was told about.
pub struct Admission {
    pub head: u64,
    stream: futures::stream::BoxStream<'static, Arc<Item>>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("head", &self.head)
            .finish_non_exhaustive()
    }
}

impl Admission {
    pub fn into_stream(self) -> futures::stream::BoxStream<'static, Arc<Item>> {
        self.stream
    }
}

impl Fanout {
    /// Starts the shared reader at the stream's current end.
    pub async fn start(bus: Bus, config: FanoutConfig) -> Result<Arc<Self>, BusError> {
        let head = bus.last_sequence().await?;
        let reader = bus.reader(StartAt::Sequence(head + 1), None).await?;
        let (tx, _) = broadcast::channel(config.lag.max(1));
        let fanout = Arc::new(Self {
            bus,
            config,
            clients: Arc::new(Semaphore::new(config.max_clients)),
            catch_up: Arc::new(Semaphore::new(config.catch_up_readers.max(1))),
            window: Mutex::new(Window {
                items: VecDeque::with_capacity(config.window.min(65_536)),
                base: head,
                head,
            }),
            tx,
            refused: AtomicU64::new(0),
            lagged: AtomicU64::new(0),
        });
        info!(
            head,
            max_clients = config.max_clients,
            "live-event feed started"
        );
        tokio::spawn(Arc::clone(&fanout).read(reader));
        Ok(fanout)
    }

    /// Clients admitted now.
    pub fn clients(&self) -> usize {
        self.config.max_clients - self.clients.available_permits()
    }

    /// Prometheus text: clients now, the cap, catch-up readers busy, refusals and lagging ends.
    pub fn render(this: Option<&Self>, config: &FanoutConfig) -> String {
        let (clients, readers, refused, lagged) = this.map_or((0, 0, 0, 0), |f| {
            (
                f.clients(),
                config.catch_up_readers.max(1) - f.catch_up.available_permits(),
                f.refused.load(Relaxed),
                f.lagged.load(Relaxed),
            )
        });
        let mut out = String::new();
        for (name, kind, help, value) in [
            (
                "usbpt_sse_clients",
                "gauge",
                "Live-event (SSE) clients served now.",
                clients as u64,
            ),
            (
                "usbpt_sse_max_clients",
                "gauge",
                "The cap on live-event clients (--sse-max-clients).",
                config.max_clients as u64,
            ),
            (
                "usbpt_sse_catch_up_readers",
                "gauge",
                "Catch-up readers (JetStream consumers) reading history for clients now.",
                readers as u64,
            ),
            (
                "usbpt_sse_refused_total",
                "counter",
                "Live-event clients refused with 503 at the cap.",
                refused,
            ),
            (
                "usbpt_sse_lagged_total",
                "counter",
                "Live-event streams ended because the client fell too far behind.",
                lagged,
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        }
        out
    }

    fn lock(&self) -> MutexGuard<'_, Window> {
        self.window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The shared reader: every event once, into the window and to every client. The reader
    /// recovers from lost fetches and gaps by itself; when it cannot make a consumer at all
    /// (the server is away), a new one resumes after the last event seen.
    async fn read(self: Arc<Self>, mut reader: Reader) {
        loop {
            match reader.next().await {
                Ok(m) => self.push(Item::from_delivery(m)),
                Err(e) => {
                    warn!(error = %e, "live-event feed: reading the stream");
                    loop {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        let next = self.lock().head + 1;
                        match self.bus.reader(StartAt::Sequence(next), None).await {
                            Ok(r) => {
                                reader = r;
                                break;
                            }
                            Err(e) => warn!(error = %e, "live-event feed: reopening"),
                        }
                    }
                }
            }
        }
    }

    fn push(&self, item: Item) {
        let item = Arc::new(item);
        let mut w = self.lock();
        if item.seq <= w.head {
            return;
        }
        w.head = item.seq;
        w.items.push_back(Arc::clone(&item));
        while w.items.len() > self.config.window {
            if let Some(old) = w.items.pop_front() {
                w.base = old.seq;
            }
        }
        // Sent under the lock: a client that snapshots the window and subscribes under it
        // misses nothing and sees nothing twice.
        let _ = self.tx.send(item);
    }

    /// Admits a client starting at `from`, or refuses it at the cap.
    pub fn admit(self: &Arc<Self>, from: StartFrom) -> Result<Admission, FanoutError> {
        let permit = Arc::clone(&self.clients).try_acquire_owned().map_err(|_| {
            self.refused.fetch_add(1, Relaxed);
            FanoutError::Full(self.config.max_clients)
        })?;
        let w = self.lock();
        let head = w.head;
        let start = match from {
            StartFrom::New => head + 1,
            StartFrom::Seq(s) => s.max(1),
        };
        let phase = if start > w.base {
            let backlog = w.items.iter().filter(|i| i.seq >= start).cloned().collect();
            Phase::Live {
                backlog,
                rx: self.tx.subscribe(),
            }
        } else {
            Phase::CatchUp { start }
        };
        drop(w);
        let client = Client {
            fanout: Arc::clone(self),
            phase,
            last: start - 1,
            _permit: permit,
        };
        Ok(Admission {
            head,
            stream: client.into_stream().boxed(),
        })
    }
}

enum Phase {
    /// Waiting for a catch-up reader, then reading from `start`.
    CatchUp {
        start: u64,
    },
    Reading {
        messages: Box<Reader>,
        _reader: OwnedSemaphorePermit,
    },
    Live {
        backlog: VecDeque<Arc<Item>>,
        rx: broadcast::Receiver<Arc<Item>>,
    },
    Done,
}

struct Client {
    fanout: Arc<Fanout>,
    phase: Phase,
    /// The last sequence delivered (or skipped): nothing at or below it is sent again.
    last: u64,
    _permit: OwnedSemaphorePermit,
}

impl Client {
    fn into_stream(self) -> impl Stream<Item = Arc<Item>> + Send + 'static {
        futures::stream::unfold(self, |mut c| async move {
            let item = c.next().await?;
            Some((item, c))
        })
    }

    async fn next(&mut self) -> Option<Arc<Item>> {
        loop {
            match &mut self.phase {
                Phase::Done => return None,
                Phase::CatchUp { start } => {
                    let start = *start;
                    let reader = Arc::clone(&self.fanout.catch_up)
                        .acquire_owned()
                        .await
                        .ok()?;
                    // The window may have moved on while this client waited.
                    if self.switch_if_covered() {
                        continue;
                    }
                    // Boxed: the consumer's creation is a large future, and it would otherwise
                    // size every client's stream, live ones included.
                    let opening = Box::pin(self.fanout.bus.reader_with(
                        StartAt::Sequence(start),
                        None,
                        ReaderOptions {
                            batch: 256,
                            inactive: CATCH_UP_INACTIVE,
                            ..ReaderOptions::default()
                        },
                    ));
                    match opening.await {
                        Ok(messages) => {
                            self.phase = Phase::Reading {
                                messages: Box::new(messages),
                                _reader: reader,
                            }
                        }
                        Err(e) => {
                            warn!(error = %e, "live events: no catch-up reader");
                            self.phase = Phase::Done;
                        }
                    }
                }
                Phase::Reading { messages, .. } => {
                    let item = match messages.next().await {
                        Ok(m) => Arc::new(Item::from_delivery(m)),
                        Err(e) => {
                            warn!(error = %e, "live events: catching up");
                            self.phase = Phase::Done;
                            continue;
                        }
                    };
                    // Drops the consumer (and frees the reader) once the window covers the rest.
                    self.last = self.last.max(item.seq);
                    self.switch_if_covered();
                    return Some(item);
                }
                Phase::Live { backlog, rx } => {
                    let item = match backlog.pop_front() {
                        Some(item) => item,
                        None => match rx.recv().await {
                            Ok(item) => item,
                            Err(broadcast::error::RecvError::Lagged(n)) => {
                                // Too slow for the shared feed: end the stream; the client
                                // resumes with Last-Event-ID.
                                warn!(
                                    behind = n,
                                    "live events: a client fell behind; ending its stream"
                                );
                                self.fanout.lagged.fetch_add(1, Relaxed);
                                self.phase = Phase::Done;
                                continue;
                            }
                            Err(broadcast::error::RecvError::Closed) => {
                                self.phase = Phase::Done;
                                continue;
                            }
                        },
                    };
                    if item.seq <= self.last {
                        continue;
                    }
                    self.last = item.seq;
                    return Some(item);
                }
            }
        }
    }

    /// Moves to the shared feed when the window holds everything after `last`.
    fn switch_if_covered(&mut self) -> bool {
        let w = self.fanout.lock();
        if self.last < w.base {
            return false;
        }
        let last = self.last;
        let backlog = w.items.iter().filter(|i| i.seq > last).cloned().collect();
        self.phase = Phase::Live {
            backlog,
            rx: self.fanout.tx.subscribe(),
        };
        true
    }
}
