//! The fold‖write pipeline (ADR 0004), one type for the live projector ([`crate::Projector`]'s
//! `run` and `step`) and the audit replay ([`crate::replay::rebuild`]).
//!
//! The ordering rule, written once here: a batch is folded reading through every batch folded
//! before it that is not written yet ([`Folder::begin`]); each batch is remembered as it is
//! frozen ([`Folder::freeze`]); and batches are written in the order they were frozen, by one
//! writer ([`Writer`]), so a batch never lands before one it read through. A batch kept to read
//! through is forgotten only once it is written (and the row budget says so).

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
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
///
/// A batch may also be written on the thread that froze it ([`WriteQueue::write_here_or_queue`])
/// when nothing is queued before it: a caught-up projector's small batch then costs no hand-off
/// to the writer's thread. Both ways go through one lock and one count of the batches queued
/// and not yet written, so batches are still written one at a time, in the order they were
/// frozen.
#[derive(Debug)]
pub struct Writer<T> {
    jobs: mpsc::Sender<(Arc<Staged>, Durability, T)>,
    shared: Arc<Shared<T>>,
    thread: tokio::task::JoinHandle<()>,
}

/// What the writer's thread and the threads writing in its place share.
struct Shared<T> {
    view: Arc<View>,
    sync: ViewSync,
    state: std::sync::Mutex<WriteState<T>>,
    /// Batches queued for the writer's thread and not yet written (raised before a batch is
    /// queued, lowered under the lock once it is written).
    queued: AtomicUsize,
    /// Tells the writer's thread that a batch written elsewhere is visible and not yet durable
    /// (it times the sync).
    lazy: tokio::sync::Notify,
}

impl<T> std::fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("sync", &self.sync).finish()
    }
}

/// The writer's state, behind its lock.
struct WriteState<T> {
    written: Box<dyn FnMut(Written<T>) -> bool + Send>,
    /// A write failed or `written` said stop: nothing more is written.
    stopped: bool,
    /// Since when commits are visible but not durable (`ViewSync::Within` only).
    pending: Option<Instant>,
    /// A quiet-time sync failed: wait for the next batch, whose commit is durable (its bound
    /// has passed) and reports the error.
    sync_failed: bool,
}

impl<T> Shared<T> {
    /// Writes one batch (the lock held): the durability `sync` gives it, the commit, `written`.
    /// False once the writer has stopped.
    fn write(
        &self,
        st: &mut WriteState<T>,
        staged: Arc<Staged>,
        asked: Durability,
        tag: T,
    ) -> bool {
        if st.stopped {
            return false;
        }
        let durability = match (self.sync, asked) {
            (ViewSync::Within(bound), Durability::Immediate) => {
                let since = *st.pending.get_or_insert_with(Instant::now);
                if since.elapsed() >= bound {
                    Durability::Immediate
                } else {
                    Durability::None
                }
            }
            _ => asked,
        };
        let started = Instant::now();
        let result = self.view.write_staged(&staged, durability);
        let took = started.elapsed();
        if matches!(durability, Durability::Immediate) && result.is_ok() {
            (st.pending, st.sync_failed) = (None, false);
        }
        // Freed here, on a blocking thread: dropping a batch's rows is not work for the async
        // runtime.
        drop(staged);
        let failed = result.is_err();
        if !(st.written)((result, tag, took)) || failed {
            st.stopped = true;
        }
        !st.stopped
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WriteState<T>> {
        // A panic while writing leaves nothing half-done that the next write could see (a redb
        // transaction not committed is rolled back): go on with the state as it is.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<T: Send + 'static> Writer<T> {
    /// Starts the writer; `written` is called after each write (return false to stop), on the
    /// thread that wrote. Every batch is committed with the durability it is queued with.
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
        written: impl FnMut(Written<T>) -> bool + Send + 'static,
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
        let shared = Arc::new(Shared {
            view,
            sync,
            state: std::sync::Mutex::new(WriteState {
                written: Box::new(written),
                stopped: false,
                pending: None,
                sync_failed: false,
            }),
            queued: AtomicUsize::new(0),
            lazy: tokio::sync::Notify::new(),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            tokio::task::spawn_blocking(move || {
                loop {
                    // How long the commits visible but not durable may stay so.
                    let left = match sync {
                        ViewSync::Within(bound) => {
                            let st = shared.lock();
                            match st.pending {
                                Some(since) if !st.sync_failed => {
                                    Some(bound.saturating_sub(since.elapsed()))
                                }
                                _ => None,
                            }
                        }
                        ViewSync::EachCommit => None,
                    };
                    let job = match left {
                        Some(left) => runtime.block_on(async {
                            tokio::select! {
                                job = queued.recv() => Some(job),
                                _ = tokio::time::sleep(left) => None,
                            }
                        }),
                        None if matches!(sync, ViewSync::Within(_)) => {
                            runtime.block_on(async {
                                tokio::select! {
                                    job = queued.recv() => Some(job),
                                    // A batch written elsewhere started a bound: time it.
                                    _ = shared.lazy.notified() => None,
                                }
                            })
                        }
                        None => Some(queued.blocking_recv()),
                    };
                    let Some(job) = job else {
                        // Quiet for the rest of the bound: make what is visible durable.
                        let mut st = shared.lock();
                        if let Some(since) = st.pending {
                            let due = matches!(sync, ViewSync::Within(b) if since.elapsed() >= b);
                            if due && !st.sync_failed {
                                match shared.view.sync() {
                                    Ok(()) => st.pending = None,
                                    Err(e) => {
                                        warn!(error = %e, "making the view durable failed");
                                        st.sync_failed = true;
                                    }
                                }
                            }
                        }
                        continue;
                    };
                    let Some((staged, asked, tag)) = job else {
                        break;
                    };
                    let mut st = shared.lock();
                    let going = shared.write(&mut st, staged, asked, tag);
                    shared.queued.fetch_sub(1, SeqCst);
                    if !going {
                        break;
                    }
                }
                // Stopping: what is visible is made durable before the writer ends.
                let mut st = shared.lock();
                st.stopped = true;
                if st.pending.take().is_some() {
                    if let Err(e) = shared.view.sync() {
                        warn!(error = %e, "making the view durable at the end failed");
                    }
                }
            })
        };
        Self {
            jobs,
            shared,
            thread,
        }
    }

    /// Where batches are queued for this writer; clone it for another thread.
    pub fn queue(&self) -> WriteQueue<T> {
        WriteQueue {
            jobs: self.jobs.clone(),
            shared: Arc::clone(&self.shared),
        }
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
pub struct WriteQueue<T> {
    jobs: mpsc::Sender<(Arc<Staged>, Durability, T)>,
    shared: Arc<Shared<T>>,
}

impl<T> Clone for WriteQueue<T> {
    fn clone(&self) -> Self {
        Self {
            jobs: self.jobs.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T> WriteQueue<T> {
    /// Queues a frozen batch (waiting while the previous one is written); false once the
    /// writer has stopped.
    pub async fn write(&self, staged: Arc<Staged>, durability: Durability, tag: T) -> bool {
        self.shared.queued.fetch_add(1, SeqCst);
        self.jobs.send((staged, durability, tag)).await.is_ok()
    }

    /// [`WriteQueue::write`] from a blocking thread (the fold thread).
    pub fn blocking_write(&self, staged: Arc<Staged>, durability: Durability, tag: T) -> bool {
        self.shared.queued.fetch_add(1, SeqCst);
        self.jobs.blocking_send((staged, durability, tag)).is_ok()
    }

    /// From a blocking thread, and only from the one thread that queues this writer's
    /// batches: writes the batch here when nothing is queued before it (every batch queued
    /// before it is written) and the writer's thread is idle, and queues it otherwise (the
    /// writer's thread is busy: this thread goes on folding meanwhile). False once the writer
    /// has stopped.
    pub fn write_here_or_queue(&self, staged: Arc<Staged>, durability: Durability, tag: T) -> bool {
        let shared = &self.shared;
        // Only this thread raises `queued`: 0 here stays 0 until this thread queues again.
        if shared.queued.load(SeqCst) == 0 {
            if let Ok(mut st) = shared.state.try_lock() {
                let was_durable = st.pending.is_none();
                let going = shared.write(&mut st, staged, durability, tag);
                if was_durable && st.pending.is_some() {
                    // Visible, not durable: the writer's thread makes it durable in time.
                    shared.lazy.notify_one();
                }
                return going;
            }
        }
        self.blocking_write(staged, durability, tag)
    }
}
