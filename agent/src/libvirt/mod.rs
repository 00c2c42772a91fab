//! The libvirt executor: the host side of booting, resizing, powering and deleting servers, and
//! of keeping a re-enumerated USB device attached to the server that holds it.
//!
//! - [`domain`] (pure): a server's devices → domain XML; refuses a controller over its port
//!   limit before libvirt sees anything.
//! - [`inspect`] (pure): reads usbpt's `<metadata>` and a domain's USB devices back.
//! - [`executor`]: drives libvirt (`virt` crate, blocking FFI on `spawn_blocking`) and turns
//!   every outcome into events (`DeviceAttached`, `DeviceReattached`, `DeviceAttachFailed`,
//!   `ServerStateChanged`).
//! - [`validate`]: `virt-xml-validate` against libvirt's schema.
//!
//! See `docs/libvirt.md`.

pub mod domain;
pub mod error;
pub mod executor;
pub mod inspect;
pub mod validate;

pub use domain::{domain_name, DomainError, DomainSpec, DomainType, HostdevSpec};
pub use error::{ExecutorError, FailureKind, LibvirtError};
pub use executor::{
    test_driver_uri, work_for, DeviceInfo, DeviceLookup, Executor, ExecutorConfig, Observed, Work,
};
pub use inspect::{observe_domain, parse_metadata, ObservedDomain, ObservedHostdev};
pub use validate::{ValidationError, XmlValidator};
