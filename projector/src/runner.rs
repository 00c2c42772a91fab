//! The projector process: a durable JetStream pull consumer, explicit `fetch()` loops (DESIGN
//! §9: `messages()` was seen to stall), one redb write transaction per fetched batch, then an
//! ack of the batch's last folded message (`AckPolicy::All` acks everything before it).
//!
//! Exactly once: the view stores the last applied sequence in the same transaction as the
//! changes; anything redelivered at or below it is skipped. On start, the durable consumer is
//! reused only if its ack floor is exactly the view's resume point with nothing pending;
//! otherwise (a crash between commit and ack, a view rebuilt from scratch) it is re-created to
//! deliver from the view's last applied sequence + 1, so nothing waits out an ack timeout and
//! nothing is skipped.

use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use thiserror::Error;
use tracing::{debug, info, warn};
use usbpt_bus::async_nats::jetstream::consumer::PullConsumer;
use usbpt_bus::async_nats::jetstream::Message;
use usbpt_bus::{Bus, BusError};

use crate::error::ViewError;
use crate::metrics::ProjectorMetrics;
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
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            consumer: "usbpt-projector".to_owned(),
            batch_size: 1000,
            max_batch_size: 10_000,
            fetch_wait: Duration::from_secs(5),
            ack_wait: Duration::from_secs(30),
        }
    }
}

/// A folded, committed batch whose ack has not been sent yet.
#[derive(Debug)]
pub struct Folded {
    pub report: BatchReport,
    /// The last message folded (acking it acks all before it).
    last: Option<Message>,
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
    bus: Bus,
    view: Arc<View>,
    config: ProjectorConfig,
    metrics: Arc<ProjectorMetrics>,
    consumer: Option<PullConsumer>,
    /// The consumer was just created at the resume point: a jump before its first message is
    /// a hole in the stream, not a lost delivery.
    fresh: bool,
    /// The next fetch's size (see [`ProjectorConfig::max_batch_size`]).
    next_batch: usize,
}

impl Projector {
    pub fn new(bus: Bus, view: Arc<View>, config: ProjectorConfig) -> Self {
        Self {
            bus,
            view,
            metrics: Arc::new(ProjectorMetrics::default()),
            next_batch: config.batch_size.max(1),
            config,
            consumer: None,
            fresh: false,
        }
    }

    pub fn metrics(&self) -> Arc<ProjectorMetrics> {
        Arc::clone(&self.metrics)
    }

    pub fn view(&self) -> &Arc<View> {
        &self.view
    }

    /// Opens the durable consumer at the view's resume point (see the module docs).
    async fn consumer(&mut self) -> Result<PullConsumer, ProjectorError> {
        if let Some(c) = &self.consumer {
            return Ok(c.clone());
        }
        let last = self.view.last_applied()?;
        let name = self.config.consumer.as_str();
        let stream = self.bus.stream();
        let reusable = match stream.consumer_info(name).await {
            Ok(info) => {
                info.ack_floor.stream_sequence == last
                    && info.num_ack_pending == 0
                    && info.config.ack_wait == self.config.ack_wait
            }
            Err(_) => false,
        };
        if !reusable {
            // Absent, or not at our resume point: start it again from there.
            let _ = stream.delete_consumer(name).await;
            self.metrics.consumer_resets.fetch_add(1, Relaxed);
            info!(
                consumer = name,
                resume_after = last,
                "creating the durable consumer"
            );
        }
        let consumer = self
            .bus
            .pull_consumer_with_ack_wait(name, None, last, self.config.ack_wait)
            .await?;
        self.fresh = !reusable;
        self.consumer = Some(consumer.clone());
        Ok(consumer)
    }

    /// Fetches up to one batch, waiting up to `fetch_wait` for the first message.
    pub async fn fetch(&mut self) -> Result<Vec<Message>, ProjectorError> {
        let consumer = self.consumer().await?;
        let fail = |e: String| ProjectorError::Stream(format!("fetch: {e}"));
        let size = self.next_batch;
        let mut batch = match consumer
            .fetch()
            .max_messages(size)
            .expires(self.config.fetch_wait)
            .messages()
            .await
        {
            Ok(b) => b,
            Err(e) => {
                self.consumer = None;
                return Err(fail(e.to_string()));
            }
        };
        let mut out = Vec::with_capacity(size);
        while let Some(m) = batch.next().await {
            match m {
                Ok(m) => out.push(m),
                Err(e) => {
                    self.consumer = None;
                    // What was received is still good; the rest is fetched again.
                    if out.is_empty() {
                        return Err(fail(e.to_string()));
                    }
                    warn!(error = %e, "fetch ended early");
                    break;
                }
            }
        }
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
    pub async fn fold(&mut self, messages: Vec<Message>) -> Result<Folded, ProjectorError> {
        let mut events = Vec::with_capacity(messages.len());
        let mut pending = None;
        for m in &messages {
            let info = m
                .info()
                .map_err(|e| ProjectorError::Stream(format!("message metadata: {e}")))?;
            pending = Some((info.stream_sequence, info.pending));
            events.push(RawEvent {
                seq: info.stream_sequence,
                subject: m.subject.to_string(),
                payload: m.payload.clone(),
            });
        }
        let options = BatchOptions {
            gap_at_start_ok: self.fresh,
            ..BatchOptions::default()
        };
        let started = Instant::now();
        let view = Arc::clone(&self.view);
        let report = tokio::task::spawn_blocking(move || {
            let r = view.apply_batch(&events, &options);
            (r, events)
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
            if let Err(e) = self
                .bus
                .stream()
                .delete_consumer(&self.config.consumer)
                .await
            {
                warn!(error = %e, "deleting the consumer");
            }
            self.consumer = None;
        }
        let m = &self.metrics;
        m.batches.fetch_add(1, Relaxed);
        m.applied.fetch_add(report.applied, Relaxed);
        m.quarantined.fetch_add(report.quarantined, Relaxed);
        m.redelivered_skipped.fetch_add(report.skipped, Relaxed);
        m.last_applied.store(report.last_applied, Relaxed);
        if let Some((seq, pending)) = pending {
            m.stream_last.store(seq + pending, Relaxed);
            m.lag
                .store((seq + pending).saturating_sub(report.last_applied), Relaxed);
        }
        m.fold_batch.observe(elapsed);
        debug!(
            last_applied = report.last_applied,
            applied = report.applied,
            quarantined = report.quarantined,
            skipped = report.skipped,
            lag = m.lag.load(Relaxed),
            micros = elapsed.as_micros() as u64,
            "batch committed"
        );
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

    /// Folds until `shutdown` resolves (between batches: a batch being folded is finished and
    /// acked first). Bus trouble is retried with backoff; a view storage error ends the run.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), ProjectorError> {
        tokio::pin!(shutdown);
        let last = self.view.last_applied()?;
        self.metrics.last_applied.store(last, Relaxed);
        info!(consumer = %self.config.consumer, resume_after = last, "projector running");
        let mut backoff = Duration::from_millis(100);
        loop {
            let fetched = tokio::select! {
                _ = &mut shutdown => break,
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
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            if messages.is_empty() {
                self.metrics.lag.store(0, Relaxed);
                continue;
            }
            let folded = self.fold(messages).await?;
            if let Err(e) = folded.ack().await {
                warn!(error = %e, "ack failed; the batch will be redelivered and skipped");
            }
        }
        info!("projector stopped");
        Ok(())
    }
}
