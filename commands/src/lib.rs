//! The command side. Commands are validated against a consistent snapshot of the view and turned
//! into events by pure functions ([`decide`]); the [`handler`] does the I/O: it publishes the
//! events, fencing claims on their lineage subject, and retries a lost race against a fresher
//! view.
//!
//! **Decisions are pure**: no clock, no randomness, no I/O; ids come in through [`decide::Ctx`].

pub mod decide;
pub mod handler;
pub mod inflight;
pub mod projected;
pub mod reactor;
pub mod schedule;
pub mod view;

pub use decide::{decide, Ctx, Decision, Fence, Rejection, Step};
pub use view::{
    ClaimInfo, ConflictInfo, DeviceInfo, DeviceStatus, FingerprintAlarmInfo, FlavorInfo,
    LineageAlarms, ServerInfo, ViewError, ViewRead,
};
