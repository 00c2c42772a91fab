//! Audit replay: rebuild a view from stream sequence 1 into a fresh redb file, up to a chosen
//! sequence, with the same fold the live projector uses.
//!
//! Reading (an ordered consumer) and folding (a blocking thread) overlap: the reader hands
//! batches over a small channel. Intermediate commits are not fsynced (the file is a scratch
//! copy until the end); the last one is.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use redb::Durability;
use tokio::sync::mpsc;
use usbpt_bus::{Bus, StartAt};

use crate::runner::ProjectorError;
use crate::view::{BatchOptions, RawEvent, View};

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    /// The last sequence folded (the target, unless the stream was shorter).
    pub last_seq: u64,
    pub applied: u64,
    pub quarantined: u64,
    pub elapsed: Duration,
}

/// Events per redb transaction during a replay.
pub const REPLAY_BATCH: usize = 20_000;

/// Folds stream sequences `1..=until` into `view` (new and empty, opened with
/// [`View::open_private`] so intermediate commits need no fsync). `progress`
/// is called with the last folded sequence after each batch.
pub async fn rebuild(
    bus: &Bus,
    view: Arc<View>,
    until: u64,
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
    let mut messages = bus
        .ordered(StartAt::Sequence(report.last_seq + 1), None)
        .await?;
    let (tx, mut rx) = mpsc::channel::<Vec<RawEvent>>(4);
    let reader = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(REPLAY_BATCH);
        while let Some(m) = messages.next().await {
            let m = m.map_err(|e| ProjectorError::Stream(e.to_string()))?;
            let seq = m
                .info()
                .map_err(|e| ProjectorError::Stream(format!("message metadata: {e}")))?
                .stream_sequence;
            if seq > until {
                break;
            }
            batch.push(RawEvent {
                seq,
                subject: m.subject.to_string(),
                payload: m.payload.clone(),
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
    while let Some(batch) = rx.recv().await {
        let last_in_batch = batch.last().map_or(0, |e| e.seq);
        let options = BatchOptions {
            durability: if last_in_batch >= until {
                Durability::Immediate
            } else {
                Durability::None
            },
            gap_at_start_ok: true,
            gaps_ok: true,
        };
        let v = Arc::clone(&view);
        let r = tokio::task::spawn_blocking(move || v.apply_batch(&batch, &options))
            .await
            .map_err(|e| crate::ViewError::Task(e.to_string()))??;
        report.applied += r.applied;
        report.quarantined += r.quarantined;
        report.last_seq = r.last_applied;
        progress(r.last_applied);
    }
    reader
        .await
        .map_err(|e| ProjectorError::Stream(e.to_string()))??;
    report.elapsed = started.elapsed();
    Ok(report)
}
