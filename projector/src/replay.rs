//! Audit replay: rebuild a view from stream sequence 1 into a fresh redb file, up to a chosen
//! sequence, with the same fold the live projector uses.
//!
//! Reading (an ordered consumer), folding (a blocking thread) and writing (another) overlap:
//! the reader hands batches of [`REPLAY_BATCH`] events over a small channel, the fold thread
//! folds them into one staged batch until it holds [`REPLAY_COMMIT`] events, and a batch is
//! folded while the one before it is written (ADR 0004). Intermediate commits are not fsynced
//! (the file is a scratch copy until the end); the last one is.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::Durability;
use tokio::sync::mpsc;
use usbpt_bus::{Bus, StartAt};

use crate::pipeline::{Folder, Writer, Written};
use crate::runner::ProjectorError;
use crate::view::{BatchOptions, BatchReport, RawEvent, View};

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    /// The last sequence folded (the target, unless the stream was shorter).
    pub last_seq: u64,
    pub applied: u64,
    pub quarantined: u64,
    pub elapsed: Duration,
}

/// Events per batch the replay's reader hands to the fold.
pub const REPLAY_BATCH: usize = 20_000;

/// Events per redb transaction during a replay (the live projector's `max_commit_events` while
/// it catches up): a row touched all through the history is written once per commit.
pub const REPLAY_COMMIT: usize = 200_000;

/// Decoded rows of written batches kept for the next batches to read.
const REPLAY_CACHE_ROWS: usize = 300_000;

/// Folds stream sequences `1..=until` into `view` (new and empty, opened with
/// [`View::open_private`] so intermediate commits need no fsync). `progress`
/// is called with the last folded sequence after each batch.
pub async fn rebuild(
    bus: &Bus,
    view: Arc<View>,
    until: u64,
    progress: impl FnMut(u64),
) -> Result<ReplayReport, ProjectorError> {
    rebuild_in_commits_of(bus, view, until, REPLAY_COMMIT, progress).await
}

/// [`rebuild`], committing every `commit_events` events (at least one reader batch): for
/// measuring what the commit size costs (`examples/fold_bench.rs`).
pub async fn rebuild_in_commits_of(
    bus: &Bus,
    view: Arc<View>,
    until: u64,
    commit_events: usize,
    mut progress: impl FnMut(u64),
) -> Result<ReplayReport, ProjectorError> {
    let started = Instant::now();
    let mut report = ReplayReport {
        last_seq: view.last_applied()?,
        applied: 0,
        quarantined: 0,
        elapsed: Duration::ZERO,
    };
    if until <= report.last_seq {
        report.elapsed = started.elapsed();
        return Ok(report);
    }
    let head = bus.last_sequence().await?;
    if until > head {
        return Err(ProjectorError::BeyondStream { until, head });
    }
    let mut reader = bus
        .reader_with(
            StartAt::Sequence(report.last_seq + 1),
            None,
            usbpt_bus::ReaderOptions {
                batch: REPLAY_BATCH,
                ..Default::default()
            },
        )
        .await?;
    let (tx, mut rx) = mpsc::channel::<Vec<RawEvent>>(4);
    let reader = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(REPLAY_BATCH);
        loop {
            let m = reader.next().await?;
            let seq = m.seq;
            if seq > until {
                break;
            }
            batch.push(RawEvent {
                seq,
                subject: m.subject,
                payload: m.payload,
            });
            if batch.len() >= REPLAY_BATCH || seq == until {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(REPLAY_BATCH));
                if tx.send(full).await.is_err() || seq == until {
                    break;
                }
            }
        }
        if !batch.is_empty() {
            let _ = tx.send(batch).await;
        }
        Ok::<(), ProjectorError>(())
    });
    // Fold on one thread while the previous batch is written on another: the pipeline
    // (`crate::pipeline`, ADR 0004). The fold thread takes the reader's batches in as they come
    // and commits every `REPLAY_COMMIT` events: fewer, larger commits write each row touched in
    // them once instead of once per reader batch.
    let failure = Arc::new(std::sync::Mutex::new(None));
    let writer = Writer::spawn(Arc::clone(&view), {
        let failure = Arc::clone(&failure);
        move |(written, (), _): Written<()>| match written {
            Ok(_) => true,
            Err(e) => {
                if let Ok(mut f) = failure.lock() {
                    *f = Some(e);
                }
                false
            }
        }
    });
    let queue = writer.queue();
    let (done, mut folded) = mpsc::unbounded_channel::<BatchReport>();
    let v = Arc::clone(&view);
    let folding = tokio::task::spawn_blocking(move || -> Result<(), crate::ViewError> {
        let mut folder = Folder::new(REPLAY_CACHE_ROWS);
        let options = BatchOptions {
            durability: Durability::None,
            gap_at_start_ok: true,
            gaps_ok: true,
        };
        while let Some(first) = rx.blocking_recv() {
            let mut b = folder.begin(&v)?;
            let mut next = Some(first);
            let mut last_in_batch = 0;
            while let Some(events) = next.take() {
                last_in_batch = events.last().map_or(last_in_batch, |e| e.seq);
                b.fold(&events, &options)?;
                if b.folded() >= commit_events as u64 || last_in_batch >= until {
                    break;
                }
                next = rx.blocking_recv();
            }
            let durability = if last_in_batch >= until {
                Durability::Immediate
            } else {
                Durability::None
            };
            let r = b.report().clone();
            let staged = folder.freeze(b)?;
            if !queue.blocking_write(staged, durability, ()) || done.send(r).is_err() {
                break;
            }
        }
        Ok(())
    });
    while let Some(r) = folded.recv().await {
        report.applied += r.applied;
        report.quarantined += r.quarantined;
        report.last_seq = r.last_applied;
        progress(r.last_applied);
    }
    folding
        .await
        .map_err(|e| crate::ViewError::Task(e.to_string()))??;
    writer.finish().await?;
    if let Some(e) = failure.lock().ok().and_then(|mut f| f.take()) {
        return Err(e.into());
    }
    reader
        .await
        .map_err(|e| ProjectorError::Stream(e.to_string()))??;
    report.elapsed = started.elapsed();
    Ok(report)
}
