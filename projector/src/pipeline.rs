//! The fold‖write pipeline (ADR 0004), one type for the live projector ([`crate::Projector`]'s
//! `run` and `step`) and the audit replay ([`crate::replay::rebuild`]).
//!
//! The ordering rule, written once here: a batch is folded reading through every batch folded
//! before it that is not written yet ([`Folder::begin`]); each batch is remembered as it is
//! frozen ([`Folder::freeze`]); and batches are written in the order they were frozen, by one
//! writer ([`Writer`]), so a batch never lands before one it read through. A batch kept to read
//! through is forgotten only once it is written (and the row budget says so).

use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::Durability;
use tokio::sync::mpsc;

use crate::error::ViewError;
use crate::fold::Staged;
use crate::view::{Batch, Chain, View};

/// The fold side of the pipeline: where each new batch starts.
#[derive(Debug)]
pub struct Folder {
    chain: Chain,
    /// The most decoded rows kept from written batches to read through.
    cache_rows: usize,
}

impl Folder {
    pub fn new(cache_rows: usize) -> Self {
        Self {
            chain: Chain::default(),
            cache_rows,
        }
    }

    /// Starts a batch after every batch frozen so far (written or not).
    pub fn begin<'v>(&mut self, view: &'v View) -> Result<Batch<'v>, ViewError> {
        let committed = *view.applied().borrow();
        self.chain.trim(committed, self.cache_rows);
        view.begin_batch_after(&self.chain)
    }

    /// Freezes a folded batch for the writer and remembers it for the next [`Folder::begin`].
    pub fn freeze(&mut self, batch: Batch<'_>) -> Result<Arc<Staged>, ViewError> {
        let staged = batch.freeze()?;
        self.chain.push(Arc::clone(&staged));
        Ok(staged)
    }

    /// Forgets every batch (the view is to be read afresh).
    pub fn clear(&mut self) {
        self.chain.clear();
    }
}

/// What the writer tells its owner about one batch: the write's outcome (the last applied
/// sequence), the caller's tag, and how long the write took.
pub type Written<T> = (Result<u64, ViewError>, T, Duration);

/// The write side of the pipeline: one blocking thread that writes frozen batches in the order
/// it is given them, each committed with its own durability. It stops at the first failed
/// write (reported like the others).
#[derive(Debug)]
pub struct Writer<T> {
    jobs: mpsc::Sender<(Arc<Staged>, Durability, T)>,
    thread: tokio::task::JoinHandle<()>,
}

impl<T: Send + 'static> Writer<T> {
    /// Starts the writer; `written` is called on its thread after each write (return false to
    /// stop).
    pub fn spawn(
        view: Arc<View>,
        mut written: impl FnMut(Written<T>) -> bool + Send + 'static,
    ) -> Self {
        let (jobs, mut queued) = mpsc::channel::<(Arc<Staged>, Durability, T)>(1);
        let thread = tokio::task::spawn_blocking(move || {
            while let Some((staged, durability, tag)) = queued.blocking_recv() {
                let started = Instant::now();
                let result = view.write_staged(&staged, durability);
                let took = started.elapsed();
                // Freed here, on the writer's thread: dropping a batch's rows is not work for
                // the async runtime.
                drop(staged);
                let failed = result.is_err();
                if !written((result, tag, took)) || failed {
                    break;
                }
            }
        });
        Self { jobs, thread }
    }

    /// Where batches are queued for this writer; clone it for another thread.
    pub fn queue(&self) -> WriteQueue<T> {
        WriteQueue(self.jobs.clone())
    }

    /// Waits until everything queued is written (or the writer stopped); every
    /// [`WriteQueue`] must be dropped too.
    pub async fn finish(self) -> Result<(), ViewError> {
        drop(self.jobs);
        self.thread
            .await
            .map_err(|e| ViewError::Task(e.to_string()))
    }
}

/// A place in a [`Writer`]'s queue.
#[derive(Debug)]
pub struct WriteQueue<T>(mpsc::Sender<(Arc<Staged>, Durability, T)>);

impl<T> Clone for WriteQueue<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> WriteQueue<T> {
    /// Queues a frozen batch (waiting while the previous one is written); false once the
    /// writer has stopped.
    pub async fn write(&self, staged: Arc<Staged>, durability: Durability, tag: T) -> bool {
        self.0.send((staged, durability, tag)).await.is_ok()
    }

    /// [`WriteQueue::write`] from a blocking thread (the fold thread).
    pub fn blocking_write(&self, staged: Arc<Staged>, durability: Durability, tag: T) -> bool {
        self.0.blocking_send((staged, durability, tag)).is_ok()
    }
}
