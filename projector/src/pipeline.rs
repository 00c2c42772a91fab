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
use tracing::warn;

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

/// How soon a committed batch of the live view is on disk ([`Writer::spawn_syncing`]).
///
/// The view is derived from the stream and resumes from its own last applied sequence, so a
/// commit that is visible but not yet durable loses nothing in a crash: the batches after the
/// last durable commit are folded again from the stream (ADR 0015).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ViewSync {
    /// Every commit is made durable (fsync) before it is reported: the default.
    #[default]
    EachCommit,
    /// Commits are visible at once and made durable at most this long after the first one not
    /// yet durable (a durable commit, or an empty durable one when the stream is quiet). Only
    /// for a view no other process may open ([`View::open_private`]); on a shared one every
    /// commit is durable.
    Within(Duration),
}

impl ViewSync {
    /// `0` is every commit, anything else a bound in milliseconds.
    pub fn from_millis(ms: u64) -> Self {
        if ms == 0 {
            ViewSync::EachCommit
        } else {
            ViewSync::Within(Duration::from_millis(ms))
        }
    }
}

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
    /// stop). Every batch is committed with the durability it is queued with.
    pub fn spawn(
        view: Arc<View>,
        written: impl FnMut(Written<T>) -> bool + Send + 'static,
    ) -> Self {
        Self::spawn_syncing(view, ViewSync::EachCommit, written)
    }

    /// [`Writer::spawn`], with batches queued as durable made durable as `sync` says.
    pub fn spawn_syncing(
        view: Arc<View>,
        sync: ViewSync,
        mut written: impl FnMut(Written<T>) -> bool + Send + 'static,
    ) -> Self {
        let (jobs, mut queued) = mpsc::channel::<(Arc<Staged>, Durability, T)>(1);
        let runtime = tokio::runtime::Handle::current();
        // redb refuses commits that are not durable on a file other processes may open.
        let sync = match sync {
            ViewSync::Within(_) if !view.is_private() => {
                warn!("the view is shared with other processes: every commit is made durable");
                ViewSync::EachCommit
            }
            other => other,
        };
        let thread = tokio::task::spawn_blocking(move || {
            // Since when commits are visible but not durable (`ViewSync::Within` only).
            let mut pending: Option<Instant> = None;
            // A quiet-time sync failed: wait for the next batch, whose commit is durable (its
            // bound has passed) and reports the error.
            let mut sync_failed = false;
            loop {
                let job = match (sync, pending) {
                    (ViewSync::Within(bound), Some(since)) if !sync_failed => {
                        let left = bound.saturating_sub(since.elapsed());
                        match runtime.block_on(tokio::time::timeout(left, queued.recv())) {
                            Ok(job) => job,
                            // Quiet for the rest of the bound: make what is visible durable.
                            Err(_) => {
                                match view.sync() {
                                    Ok(()) => pending = None,
                                    Err(e) => {
                                        warn!(error = %e, "making the view durable failed");
                                        sync_failed = true;
                                    }
                                }
                                continue;
                            }
                        }
                    }
                    _ => queued.blocking_recv(),
                };
                let Some((staged, asked, tag)) = job else {
                    break;
                };
                let durability = match (sync, asked) {
                    (ViewSync::Within(bound), Durability::Immediate) => {
                        let since = *pending.get_or_insert_with(Instant::now);
                        if since.elapsed() >= bound {
                            Durability::Immediate
                        } else {
                            Durability::None
                        }
                    }
                    _ => asked,
                };
                let started = Instant::now();
                let result = view.write_staged(&staged, durability);
                let took = started.elapsed();
                if matches!(durability, Durability::Immediate) && result.is_ok() {
                    (pending, sync_failed) = (None, false);
                }
                // Freed here, on the writer's thread: dropping a batch's rows is not work for
                // the async runtime.
                drop(staged);
                let failed = result.is_err();
                if !written((result, tag, took)) || failed {
                    break;
                }
            }
            // Stopping: what is visible is made durable before the writer ends.
            if pending.is_some() {
                if let Err(e) = view.sync() {
                    warn!(error = %e, "making the view durable at the end failed");
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
