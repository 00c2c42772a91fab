//! The read side of usbpt: folds the `USBPT_EVENTS` stream, exactly once, into a redb view
//! that scheduling, flavor binding, operators and auditors read.
//!
//! - [`View`]: the redb file. [`View::apply_batch`] folds a batch in one write transaction that
//!   also stores the last applied stream sequence (the fold stages a batch's changes in memory
//!   and writes each changed row once; [`View::begin_batch_after`], [`Batch::freeze`] and
//!   [`View::write_staged`] let the projector fold the next batch while this one is written); [`View::snapshot`] gives a consistent
//!   [`Snapshot`] with the read API (devices, lineages and their history, free devices by
//!   vendor:product or host through indexes, hosts, flavors, servers, claims, the last sequence
//!   per control-plane subject for fenced publishes, the quarantine, counters).
//! - [`fold::apply`]: how one event changes the view — a pure function of (view, sequence,
//!   subject, envelope): **no clock, no randomness, no I/O**, so a replay gives the same bytes.
//!   Bad input (garbage, unknown versions or events, forged hosts, events about unknown
//!   devices, contradictions) is quarantined with a counted reason; it never stops the fold.
//! - [`Projector`]: the durable pull consumer with explicit fetch loops, acking each batch
//!   after its commit; resumes from the view's last applied sequence.
//! - [`replay::rebuild`] (audit replay into a fresh file) and [`digest`] (canonical digests
//!   and the first differing key between two views).
//! - [`identity`] and [`custody`]: lineage labels (folded into the lineage record), "where is
//!   it" ([`Snapshot::find`] over a [`FindQuery`]) and the custody ledger, derived purely from
//!   the enumerations' holdings ([`Snapshot::custody`]).
//! - [`workload`]: a deterministic synthetic history for tests and benchmarks.

pub mod custody;
pub mod digest;
mod error;
pub mod fold;
pub mod identity;
pub mod metrics;
mod model;
pub mod pipeline;
pub mod replay;
mod runner;
mod stage;
pub mod tables;
mod view;
pub mod workload;

pub use custody::{CustodyInterval, CustodySegment, CustodyStart};
pub use error::ViewError;
pub use fold::Staged;
pub use identity::{FindError, FindKey, FindQuery, Found};
pub use metrics::ProjectorMetrics;
pub use model::*;
pub use pipeline::ViewSync;
pub use runner::{Folded, Projector, ProjectorConfig, ProjectorError};
pub use view::{
    Batch, BatchOptions, BatchReport, Chain, DeviceFilter, RawEvent, Snapshot, View, VIEW_FORMAT,
};

/// The view file's name inside the data directory.
pub const VIEW_FILE: &str = "view.redb";
