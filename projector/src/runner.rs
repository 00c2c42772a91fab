//! The projector process: a durable JetStream pull consumer with explicit `fetch()` loops
//! (`messages()` was seen to stall: `docs/projector.md`) feeding the fold.
//!
//! [`Projector::run`] is a pipeline (ADR 0004): the async task fetches, a fold thread folds the
//! fetched batches into staged batches (each reading through the ones before it), and a write
//! thread commits them, in order, one fsynced redb transaction each. While the stream is ahead,
//! a staged batch takes in every fetch already waiting (group commit, up to
//! [`ProjectorConfig::max_commit_events`]); when it is caught up, each fetch is committed at
//! once. The fetch loop acks each batch as it hands it on: acks only keep the server from
//! tracking deliveries; where folding resumes is the view's business.
//!
//! [`Projector::step`] is the same fold one batch at a time (fetch, fold, commit, then
//! [`Folded::ack`]), for tests and tools.
//!
//! Exactly once: the view stores the last applied sequence in the same transaction as the
//! changes; anything redelivered at or below it is skipped. On start, the durable consumer is
//! reused only if its ack floor is exactly the view's resume point with nothing pending;
//! otherwise (a crash before a commit, a view rebuilt from scratch) it is re-created to deliver
//! from the view's last applied sequence + 1, so nothing waits out an ack timeout and nothing
//! is skipped.

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::Durability;
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use usbpt_bus::{Acker, Bus, BusError, Durable, Received};

use crate::error::ViewError;
use crate::metrics::ProjectorMetrics;
use crate::pipeline::{Folder, ViewSync, WriteQueue, Writer, Written};
use crate::view::{BatchOptions, BatchReport, RawEvent, View};

#[derive(Debug, Error)]
pub enum ProjectorError {
    /// The view cannot be written: folding stops (nothing was acked that is not durable).
    #[error(transparent)]
    View(#[from] ViewError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("reading the stream: {0}")]
    Stream(String),
    #[error("the stream ends at sequence {head}; cannot replay up to {until}")]
    BeyondStream { until: u64, head: u64 },
}

impl ProjectorError {
    /// Whether retrying later may help (bus trouble) rather than not (the view's storage).
    pub fn is_transient(&self) -> bool {
        !matches!(self, ProjectorError::View(_))
    }
}

/// How the projector consumes.
#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    /// The durable consumer's name. Every projector with its own view needs its own name.
    pub consumer: String,
    /// Messages per fetch (and per redb transaction) when the projector is caught up.
    pub batch_size: usize,
    /// While a backlog lasts (each fetch comes back full), the fetch size doubles up to this
    /// (at most 10,000, the consumer's limit): a commit costs about the same for 1,000 events
    /// as for 10,000, so catching up goes several times faster.
    pub max_batch_size: usize,
    /// How long one fetch waits for the first message (long poll); it returns as soon as any
    /// message is available.
    pub fetch_wait: Duration,
    /// After how long an unacknowledged delivery is sent again.
    pub ack_wait: Duration,
    /// The most events one write transaction of [`Projector::run`] takes while the stream is
    /// ahead (fetched batches that are already waiting are folded into it).
    pub max_commit_events: usize,
    /// Decoded rows of committed batches kept for the next batches to read (a cache: the
    /// projector is the view's only writer).
    pub cache_rows: usize,
    /// How soon a commit of [`Projector::run`] is on disk (ADR 0015): every commit (the
    /// default), or within a bound.
    pub view_sync: ViewSync,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            consumer: usbpt_schemas::subjects::js::PROJECTOR_CONSUMER.to_owned(),
            batch_size: 1000,
            max_batch_size: 10_000,
            fetch_wait: Duration::from_secs(5),
            ack_wait: Duration::from_secs(30),
            max_commit_events: 200_000,
            cache_rows: 300_000,
            view_sync: ViewSync::EachCommit,
        }
    }
}

/// Fetched batches that may wait for the fold thread.
const FETCH_QUEUE: usize = 2;

/// A folded, committed batch whose ack has not been sent yet.
#[derive(Debug)]
pub struct Folded {
    pub report: BatchReport,
    /// The last message folded (acking it acks all before it).
    last: Option<Received>,
}

impl Folded {
    /// Acknowledges the batch. If the ack is lost the batch is redelivered after the ack wait
    /// and skipped as already applied.
    pub async fn ack(self) -> Result<(), ProjectorError> {
        if let Some(m) = self.last {
            m.ack()
                .await
                .map_err(|e| ProjectorError::Stream(format!("ack: {e}")))?;
        }
        Ok(())
    }
}

/// Folds the stream into a [`View`].
#[derive(Debug)]
pub struct Projector {
    view: Arc<View>,
    config: ProjectorConfig,
    metrics: Arc<ProjectorMetrics>,
    durable: Durable,
    /// The consumer was just created at the resume point: a jump before its first message is
    /// a hole in the stream, not a lost delivery.
    fresh: bool,
    /// The next fetch's size (see [`ProjectorConfig::max_batch_size`]).
    next_batch: usize,
    /// Counts consumer handles: bumped each time one is opened.
    generation: u64,
}

impl Projector {
    pub fn new(bus: Bus, view: Arc<View>, config: ProjectorConfig) -> Self {
        let durable = bus.durable(&config.consumer, None, config.ack_wait);
        Self {
            view,
            metrics: Arc::new(ProjectorMetrics::default()),
            next_batch: config.batch_size.max(1),
            config,
            durable,
            fresh: false,
            generation: 0,
        }
    }

    pub fn metrics(&self) -> Arc<ProjectorMetrics> {
        Arc::clone(&self.metrics)
    }

    pub fn view(&self) -> &Arc<View> {
        &self.view
    }

    /// Opens the durable consumer at the view's resume point (see the module docs), unless it
    /// is open.
    async fn ensure_consumer(&mut self) -> Result<(), ProjectorError> {
        if self.durable.is_open() {
            return Ok(());
        }
        let last = self.view.last_applied()?;
        let fresh = self.durable.open_at(last).await?;
        if fresh {
            self.metrics.consumer_resets.fetch_add(1, Relaxed);
        }
        self.fresh = fresh;
        self.generation += 1;
        Ok(())
    }

    /// Deletes the durable consumer (after a gap): the next fetch re-creates it at the view's
    /// resume point.
    async fn drop_consumer(&mut self) {
        self.durable.delete().await;
    }

    /// Fetches up to one batch, waiting up to `fetch_wait` for the first message.
    pub async fn fetch(&mut self) -> Result<Vec<Received>, ProjectorError> {
        self.ensure_consumer().await?;
        let size = self.next_batch;
        let out = self
            .durable
            .fetch(size, self.config.fetch_wait)
            .await
            .map_err(|e| ProjectorError::Stream(format!("fetch: {e}")))?;
        let base = self.config.batch_size.max(1);
        self.next_batch = if out.len() >= size {
            (size * 2).min(self.config.max_batch_size.clamp(base, 10_000))
        } else {
            base
        };
        Ok(out)
    }

    /// Folds fetched messages in one write transaction. The returned batch still has to be
    /// acked ([`Folded::ack`]).
    pub async fn fold(&mut self, messages: Vec<Received>) -> Result<Folded, ProjectorError> {
        let (events, pending) = raw_events(&messages)?;
        let options = BatchOptions {
            gap_at_start_ok: self.fresh,
            ..BatchOptions::default()
        };
        let started = Instant::now();
        let view = Arc::clone(&self.view);
        // The pipeline's fold and write, one batch at a time (no batch in flight to read
        // through).
        let report = tokio::task::spawn_blocking(move || {
            let fold_and_write = || -> Result<BatchReport, ViewError> {
                let mut folder = Folder::new(0);
                let mut batch = folder.begin(&view)?;
                batch.fold(&events, &options)?;
                let report = batch.report().clone();
                let staged = folder.freeze(batch)?;
                view.write_staged(&staged, options.durability)?;
                Ok(report)
            };
            (fold_and_write(), events)
        })
        .await
        .map_err(|e| ViewError::Task(e.to_string()))?;
        let (report, events) = (report.0?, report.1);
        let elapsed = started.elapsed();
        if report.applied + report.quarantined > 0 {
            self.fresh = false;
        }
        // Ack up to the last event at or below the committed sequence.
        let last = events
            .iter()
            .rposition(|e| e.seq <= report.last_applied)
            .and_then(|i| messages.into_iter().nth(i));
        if let Some((expected, found)) = report.gap {
            warn!(
                expected,
                found, "sequence gap in deliveries: re-creating the consumer"
            );
            self.drop_consumer().await;
        }
        if let Some((seq, pending)) = pending {
            self.metrics.stream_last.store(seq + pending, Relaxed);
        }
        // Folded and written in one go: the whole time is counted as the fold's.
        count_committed(&self.metrics, &report, elapsed, Duration::ZERO);
        Ok(Folded { report, last })
    }

    /// Fetches and folds one batch; `None` when nothing arrived within `fetch_wait`.
    pub async fn step(&mut self) -> Result<Option<Folded>, ProjectorError> {
        let messages = self.fetch().await?;
        if messages.is_empty() {
            self.metrics.lag.store(0, Relaxed);
            return Ok(None);
        }
        self.fold(messages).await.map(Some)
    }

    /// Folds until `shutdown` resolves, as a pipeline (see the module docs): batches fetched
    /// before shutdown are folded, committed and acked before it returns. Bus trouble is
    /// retried with backoff; a view storage error ends the run.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), ProjectorError> {
        tokio::pin!(shutdown);
        let last = self.view.last_applied()?;
        self.metrics.last_applied.store(last, Relaxed);
        info!(consumer = %self.config.consumer, resume_after = last, "projector running");

        let (fetched_tx, fetched_rx) = mpsc::channel::<Fetched>(FETCH_QUEUE);
        let (done_tx, done_rx) = mpsc::unbounded_channel::<Result<Committed, ViewError>>();
        let writer = {
            let (metrics, done) = (Arc::clone(&self.metrics), done_tx.clone());
            Writer::spawn_syncing(
                Arc::clone(&self.view),
                self.config.view_sync,
                move |(written, (report, fold_time), write_time): Written<(
                    BatchReport,
                    Duration,
                )>| {
                    metrics
                        .write_micros
                        .fetch_add(write_time.as_micros() as u64, Relaxed);
                    done.send(written.map(|_| Committed {
                        report,
                        fold_time,
                        write_time,
                    }))
                    .is_ok()
                },
            )
        };
        // The generation of the consumer whose deliveries hit a gap (0: none).
        let reset = Arc::new(AtomicU64::new(0));
        let folder = {
            let (view, reset, done) = (Arc::clone(&self.view), Arc::clone(&reset), done_tx.clone());
            let limits = (self.config.max_commit_events.max(1), self.config.cache_rows);
            let metrics = Arc::clone(&self.metrics);
            let queue = writer.queue();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = fold_thread(&view, fetched_rx, &queue, &reset, limits, &metrics) {
                    let _ = done.send(Err(e));
                }
            })
        };
        drop(done_tx);
        let counter = tokio::spawn(count_commits(done_rx, Arc::clone(&self.metrics)));
        tokio::pin!(counter);
        let joined = |r: Result<Result<(), ProjectorError>, tokio::task::JoinError>| match r {
            Ok(r) => r,
            Err(e) => Err(ProjectorError::View(ViewError::Task(e.to_string()))),
        };

        let mut backoff = Duration::from_millis(100);
        let mut counter_result = None;
        loop {
            if reset.load(Relaxed) >= self.generation && self.durable.is_open() {
                warn!("sequence gap in deliveries: re-creating the consumer");
                self.drop_consumer().await;
            }
            let fetched = tokio::select! {
                _ = &mut shutdown => break,
                r = &mut counter => { counter_result = Some(joined(r)); break }
                r = self.fetch() => r,
            };
            let messages = match fetched {
                Ok(m) => {
                    backoff = Duration::from_millis(100);
                    m
                }
                Err(e) => {
                    self.metrics.errors.fetch_add(1, Relaxed);
                    warn!(error = %e, retry_in = ?backoff, "projector fetch failed");
                    tokio::select! {
                        _ = &mut shutdown => break,
                        r = &mut counter => { counter_result = Some(joined(r)); break }
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            if messages.is_empty() {
                // A long poll came back empty: everything stored has been handed on.
                if self.metrics.last_applied.load(Relaxed) >= self.metrics.stream_last.load(Relaxed)
                {
                    self.metrics.lag.store(0, Relaxed);
                }
                continue;
            }
            let batch = self.hand_on(messages);
            // Acked as soon as it is handed on (ADR 0004): the view's last applied sequence,
            // not the consumer's ack floor, is where a restart resumes, so an ack here only
            // keeps the server from tracking deliveries as pending.
            if let Some(m) = &batch.last {
                if let Err(e) = m.ack().await {
                    warn!(error = %e, "ack failed; the batch may be redelivered and skipped");
                }
            }
            tokio::select! {
                _ = &mut shutdown => break,
                r = &mut counter => { counter_result = Some(joined(r)); break }
                sent = fetched_tx.send(batch) => if sent.is_err() { break },
            }
        }
        // Drain: what was handed on is folded and committed before this returns.
        drop(fetched_tx);
        let folded = folder.await;
        let written = writer.finish().await;
        let acked = match counter_result {
            Some(r) => r,
            None => joined(counter.await),
        };
        acked?;
        folded.map_err(|e| ViewError::Task(e.to_string()))?;
        written?;
        info!("projector stopped");
        Ok(())
    }

    /// A fetched batch for the fold thread: its events and its last message (to ack).
    fn hand_on(&mut self, messages: Vec<Received>) -> Fetched {
        // The deliveries' bytes move into the events; only the last one's acker is kept.
        let mut events = Vec::with_capacity(messages.len());
        let mut last = None;
        let mut behind = 0;
        for m in messages {
            let pending = m.pending;
            behind = pending;
            let (d, acker) = m.into_parts();
            self.metrics.stream_last.store(d.seq + pending, Relaxed);
            events.push(RawEvent {
                seq: d.seq,
                subject: d.subject,
                payload: d.payload,
            });
            last = Some(acker);
        }
        let fresh = std::mem::take(&mut self.fresh);
        Fetched {
            events,
            last,
            behind,
            fresh,
            generation: self.generation,
        }
    }
}

/// A fetched batch with at least this many messages stored behind it is part of a catch-up:
/// the fold thread waits up to [`CATCH_UP_WAIT`] for the next fetch rather than commit what it
/// has (ADR 0004, fourth addendum). A follower that is caught up, or nearly, commits each batch
/// as it comes.
const CATCH_UP_BEHIND: u64 = 1_000;
/// How long a catching-up fold waits for the next fetch before it commits what it has.
const CATCH_UP_WAIT: Duration = Duration::from_millis(50);

/// A message's stream sequence and how many messages were pending after it.
type SeqPending = (u64, u64);

/// The fetched messages as events, and the last one's (stream sequence, messages pending after
/// it).
fn raw_events(
    messages: &[Received],
) -> Result<(Vec<RawEvent>, Option<SeqPending>), ProjectorError> {
    let mut events = Vec::with_capacity(messages.len());
    let mut last = None;
    for m in messages {
        last = Some((m.delivery.seq, m.pending));
        events.push(RawEvent {
            seq: m.delivery.seq,
            subject: m.delivery.subject.clone(),
            payload: m.delivery.payload.clone(),
        });
    }
    Ok((events, last))
}

/// One fetch on its way to the fold thread.
struct Fetched {
    events: Vec<RawEvent>,
    /// The batch's last message: acking it acks everything before it.
    last: Option<Acker>,
    /// Messages stored after its last one and not delivered yet (the consumer's pending).
    behind: u64,
    /// The first batch of a consumer just created at the resume point (a jump in sequence
    /// before its first event is a hole in the stream, not a lost delivery).
    fresh: bool,
    /// The consumer handle that delivered it.
    generation: u64,
}

/// What the write thread tells the counting task about a committed batch. (The batch itself
/// stays with the threads: freeing its rows is not work for the async runtime.)
struct Committed {
    report: BatchReport,
    fold_time: Duration,
    write_time: Duration,
}

/// Folds fetched batches into staged batches, each read through the ones before it, and hands
/// them to the write thread in order. A staged batch takes in every fetch already waiting (and,
/// while catching up, the fetches still to come), up to `max_events` (only a single fetch
/// larger than that makes a larger one); `cache_rows` bounds the committed batches kept to read
/// through.
fn fold_thread(
    view: &View,
    mut fetched: mpsc::Receiver<Fetched>,
    queue: &WriteQueue<(BatchReport, Duration)>,
    reset: &AtomicU64,
    (max_events, cache_rows): (usize, usize),
    metrics: &ProjectorMetrics,
) -> Result<(), ViewError> {
    let mut folder = Folder::new(cache_rows);
    // Deliveries from consumers at or below this generation follow a gap: dropped.
    let mut stale = 0;
    // A consumer just created at the resume point whose first new event is still to come: a
    // jump in sequence before it is a hole in the stream (its first batches may hold only
    // redeliveries of what a batch in flight already folded).
    let mut fresh = None;
    // For a catch-up's short waits on the fetch (this is one of the runtime's blocking threads).
    let runtime = tokio::runtime::Handle::current();
    // A fetch that would have taken a staged batch past `max_events`: the next batch's first.
    let mut carried: Option<Fetched> = None;
    while let Some(first) = carried.take().or_else(|| fetched.blocking_recv()) {
        if first.generation <= stale {
            continue;
        }
        let started = Instant::now();
        // Time spent waiting for fetches, not folding.
        let mut waited = Duration::ZERO;
        let mut batch = folder.begin(view)?;
        let mut next = Some(first);
        while let Some(f) = next.take() {
            if f.generation > stale {
                if f.fresh {
                    fresh = Some(f.generation);
                }
                let options = BatchOptions {
                    gap_at_start_ok: fresh == Some(f.generation),
                    ..BatchOptions::default()
                };
                let before = batch.folded();
                batch.fold(&f.events, &options)?;
                if batch.folded() > before {
                    fresh = None;
                }
                if batch.report().gap.is_some() {
                    stale = f.generation;
                    reset.fetch_max(f.generation, Relaxed);
                    break;
                }
            }
            if batch.folded() >= max_events as u64 {
                break;
            }
            next = match fetched.try_recv() {
                Ok(f) => Some(f),
                // Catching up: more is stored and on its way, so the commit waits a little for
                // it (up to `max_events`) rather than end with what had been fetched so far.
                Err(_) if f.behind >= CATCH_UP_BEHIND => {
                    let t = Instant::now();
                    let got = runtime
                        .block_on(tokio::time::timeout(CATCH_UP_WAIT, fetched.recv()))
                        .ok()
                        .flatten();
                    waited += t.elapsed();
                    got
                }
                Err(_) => None,
            };
            if next.as_ref().is_some_and(|n| {
                batch.folded() > 0 && batch.folded() + n.events.len() as u64 > max_events as u64
            }) {
                carried = next.take();
            }
        }
        let report = batch.report().clone();
        let staged = folder.freeze(batch)?;
        let fold_time = started.elapsed().saturating_sub(waited);
        metrics
            .fold_micros
            .fetch_add(fold_time.as_micros() as u64, Relaxed);
        if !queue.blocking_write(staged, Durability::Immediate, (report, fold_time)) {
            break;
        }
    }
    Ok(())
}

/// Counts each committed batch; ends with the first storage error.
async fn count_commits(
    mut done: mpsc::UnboundedReceiver<Result<Committed, ViewError>>,
    metrics: Arc<ProjectorMetrics>,
) -> Result<(), ProjectorError> {
    while let Some(job) = done.recv().await {
        let job = job?;
        count_committed(&metrics, &job.report, job.fold_time, job.write_time);
    }
    Ok(())
}

/// Counts one committed batch: its events, where the view is, and the lag behind the stream's
/// last known sequence.
fn count_committed(
    metrics: &ProjectorMetrics,
    r: &BatchReport,
    fold_time: Duration,
    write_time: Duration,
) {
    metrics.batches.fetch_add(1, Relaxed);
    metrics.applied.fetch_add(r.applied, Relaxed);
    metrics.quarantined.fetch_add(r.quarantined, Relaxed);
    metrics.redelivered_skipped.fetch_add(r.skipped, Relaxed);
    metrics.last_applied.store(r.last_applied, Relaxed);
    let head = metrics.stream_last.load(Relaxed);
    metrics
        .lag
        .store(head.saturating_sub(r.last_applied), Relaxed);
    metrics.fold_batch.observe(fold_time + write_time);
    debug!(
        last_applied = r.last_applied,
        applied = r.applied,
        quarantined = r.quarantined,
        skipped = r.skipped,
        lag = metrics.lag.load(Relaxed),
        fold_micros = fold_time.as_micros() as u64,
        write_micros = write_time.as_micros() as u64,
        "batch committed"
    );
}
