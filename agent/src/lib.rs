//! Host agent: the only crate that touches udev, sysfs and libvirt.
//!
//! - [`source`]: udev enumeration and monitor (the only udev code), behind the [`DeviceSource`]
//!   boundary; [`source::simulated`] feeds code-made devices through the same path.
//! - [`resolver`]: pure identity decisions (enumerations, lineages, clashes, reconciliation).
//! - [`filter`]: which devices are passthrough candidates (built-in rules, TOML, `usb_passthrough_blacklist` JSON).
//! - [`store`]: the redb state and outbox; [`publisher`]: drains the outbox into JetStream.
//! - [`run()`]: the agent process; [`run_with_executor`] also carries out the control plane's
//!   work for the host through [`libvirt`] ([`control`]), after [`guard`] checks it.

pub mod control;
pub mod filter;
pub mod fingerprint;
pub mod flap;
pub mod guard;
pub mod heartbeat;
pub mod libvirt;
pub mod observation;
pub mod progress;
pub mod publisher;
pub mod resolver;
pub mod run;
pub mod source;
pub mod store;

pub use filter::{Decision, Filter, FilterError};
pub use flap::FlapSettings;
pub use observation::{Action, Interface, Observation, UsbDevice};
pub use progress::{Progress, ProgressSink};
pub use publisher::{BusTarget, WINDOW as PUBLISH_WINDOW};
pub use run::{read_boot_id, run, run_with_executor, AgentConfig, AgentError, AGENT_VERSION};
pub use source::{DeviceSource, SourceError, SourceEvent, UdevSource};
