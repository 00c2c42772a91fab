//! Folding: how one event changes the view. [`apply`] is a pure function of (view, stream
//! sequence, subject, envelope) — no clock, no randomness, no I/O beyond the reads of the
//! committed view it is given — so replaying the stream rebuilds the same bytes.
//!
//! Two halves with a small trait between them (ADR 0013):
//!
//! - `semantics` (with `devices`, `servers`, `flavors`): the subject checks and one function
//!   per event, written against `state::State` (devices, lineages, claims, servers, flavors, names, hosts, quarantine and
//!   counters); it decides what changes and what is quarantined, and never sees redb.
//! - `staging`: [`FoldTxn`] implements the state over the committed view and the batches
//!   folded before it, stages a batch's changes in memory (see [`crate::stage`] and ADR 0004),
//!   and [`Staged`] writes them in one redb write transaction at the end; how the events are cut
//!   into batches does not change the result.
//!
//! The semantics are generic over the state (static dispatch): the live fold is compiled for
//! [`FoldTxn`] alone; the unit tests fold on an in-memory state (`memory`).
//!
//! Bad input never stops the fold: an event that cannot be decoded, arrives on the wrong subject
//! or contradicts the view is recorded in the quarantine with a counted reason and changes
//! nothing else.

mod alarms;
mod devices;
mod flavors;
#[cfg(test)]
mod memory;
mod semantics;
mod servers;
mod staging;
mod state;
#[cfg(test)]
mod tests;

use usbpt_schemas::Envelope;

use crate::error::ViewError;
use crate::model::QuarantineReason;

pub(crate) use staging::create_tables;
pub use staging::{FoldTxn, Staged};

/// What folding one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied; the event's kind.
    Applied(&'static str),
    /// Set aside with this reason.
    Quarantined(QuarantineReason),
    /// At or below the last applied sequence: a redelivery, already folded.
    Skipped,
}

/// Folds one decoded event stored at `seq` on `subject`.
///
/// Checks the subject first (the envelope must be exactly where
/// [`usbpt_schemas::subjects::for_event`] would publish it, and its host must be its subject's
/// host), then applies the event. A refused event is quarantined. Only storage failures are
/// errors.
pub fn apply(
    view: &mut FoldTxn,
    seq: u64,
    subject: &str,
    env: &Envelope,
) -> Result<Outcome, ViewError> {
    semantics::apply(view, seq, subject, env)
}

impl FoldTxn {
    /// Decodes `payload` and folds it (see [`apply`]); undecodable bytes are quarantined.
    pub fn fold(&mut self, seq: u64, subject: &str, payload: &[u8]) -> Result<Outcome, ViewError> {
        semantics::apply_bytes(self, seq, subject, payload)
    }
}
