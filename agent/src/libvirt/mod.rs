//! The libvirt executor's pure half, and the agent's side of the executor process: the host
//! side of booting, resizing, powering and deleting servers, and of keeping a re-enumerated USB
//! device attached to the server that holds it. **This crate does not link libvirt** (ADR 0016):
//! the calls themselves are the `usbpt-libvirt` crate, which the agent runs in a child process
//! ([`child`]) or, in the all-in-one processes (`usbpt up`, the demo, tests), in-process.
//!
//! - [`domain`] (pure): a server's devices → domain XML; refuses a controller over its port
//!   limit before libvirt sees anything.
//! - [`inspect`] (pure): reads usbpt's `<metadata>` and a domain's USB devices back.
//! - [`work`] (pure): which work an event asks of this host (derived from
//!   `subjects::work_for_host`), and the agent's view of its devices.
//! - [`config`]: how libvirt is reached ([`ExecutorConfig`]), what a domain's state is
//!   ([`Observed`]).
//! - [`hands`]: [`Hands`], what the agent's control loop asks of an executor, wherever it runs.
//! - [`protocol`]: the agent ⇄ executor-process messages (length-prefixed postcard).
//! - [`child`]: [`ChildExecutor`], the executor process started on demand and stopped when idle.
//! - [`validate`]: `virt-xml-validate` against libvirt's schema.
//!
//! See `docs/libvirt.md`.

pub mod child;
pub mod config;
pub mod domain;
pub mod error;
pub mod hands;
pub mod inspect;
pub mod protocol;
pub mod validate;
pub mod work;

pub use child::{ChildExecutor, ExecutorCommand};
pub use config::{test_driver_uri, ExecutorConfig, Observed};
pub use domain::{domain_name, DomainError, DomainSpec, DomainType, HostdevSpec};
pub use error::{ExecutorError, FailureKind, LibvirtError};
pub use hands::{DeviceMap, Hands};
pub use inspect::{observe_domain, parse_metadata, ObservedDomain, ObservedHostdev};
pub use validate::{ValidationError, XmlValidator};
pub use work::{reattach_or_hold, work_for, DeviceInfo, DeviceLookup, ReattachDecision, Work};
