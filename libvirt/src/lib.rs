//! The libvirt executor: the only crate in usbpt that links libvirt (`virt` crate, FFI; ADR
//! 0016). Its pure half — the domain XML, the metadata reader, which work an event asks, the
//! configuration — is `usbpt_agent::libvirt`, re-exported here.
//!
//! - [`executor`]: [`Executor`], the async facade: carries out [`Work`], one server at a time,
//!   different servers in parallel, and turns every outcome into events (`DeviceAttached`,
//!   `DeviceReattached`, `DeviceAttachFailed`, `ServerStateChanged`).
//! - `calls`: the blocking libvirt calls the facade runs on `spawn_blocking`.
//! - [`virt_error`]: libvirt's errors classified by their code.
//! - [`serve`]: the executor process (`usbpt agent-executor`): [`Executor`] behind the agent's
//!   protocol on stdin/stdout.
//!
//! See `docs/libvirt.md`.

mod calls;
pub mod executor;
pub mod serve;
pub mod virt_error;

pub use calls::observe;
pub use executor::Executor;
pub use usbpt_agent::libvirt::*;
