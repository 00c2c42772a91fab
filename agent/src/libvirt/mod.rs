//! The libvirt executor: the host side of booting, resizing, powering and deleting servers, and
//! of keeping a re-enumerated USB device attached to the server that holds it.
//!
//! - [`domain`] (pure): a server's devices → domain XML; refuses a controller over its port
//!   limit before libvirt sees anything.
//! - [`inspect`] (pure): reads usbpt's `<metadata>` and a domain's USB devices back.
//! - [`work`] (pure): which work an event asks of this host (derived from
//!   `subjects::work_for_host`), and the agent's view of its devices.
//! - [`executor`]: the async facade: carries out [`Work`], one server at a time, different
//!   servers in parallel, and turns every outcome into events (`DeviceAttached`,
//!   `DeviceReattached`, `DeviceAttachFailed`, `ServerStateChanged`).
//! - `calls`: the blocking libvirt calls (`virt` crate, FFI) the facade runs on
//!   `spawn_blocking`.
//! - [`validate`]: `virt-xml-validate` against libvirt's schema.
//!
//! See `docs/libvirt.md`.

mod calls;
pub mod domain;
pub mod error;
pub mod executor;
pub mod inspect;
pub mod validate;
pub mod work;

pub use calls::{observe, test_driver_uri, ExecutorConfig, Observed};
pub use domain::{domain_name, DomainError, DomainSpec, DomainType, HostdevSpec};
pub use error::{ExecutorError, FailureKind, LibvirtError};
pub use executor::Executor;
pub use inspect::{observe_domain, parse_metadata, ObservedDomain, ObservedHostdev};
pub use validate::{ValidationError, XmlValidator};
pub use work::{reattach_or_hold, work_for, DeviceInfo, DeviceLookup, ReattachDecision, Work};
