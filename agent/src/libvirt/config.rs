//! How the executor reaches libvirt ([`ExecutorConfig`]) and what it reports of a domain
//! ([`Observed`]): plain data, shared by the agent (which runs the executor in a child process,
//! `super::child`) and the executor itself (the `usbpt-libvirt` crate). No libvirt here.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use usbpt_schemas::{HostName, ServerState};

use super::domain::{DomainType, DEFAULT_MEMORY_KIB, DEFAULT_VCPUS};
use super::validate::XmlValidator;

/// How the executor talks to libvirt.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// This agent's host: the executor only acts on work addressed to it.
    pub host: HostName,
    /// `qemu:///system` in production, `test:///abs/path/node.xml` in tests.
    pub uri: String,
    /// `<domain type=…>`; `None` picks it from the hypervisor's capabilities at connect time
    /// ([`DomainType::from_capabilities`]: `kvm` where the host offers it, else `qemu`).
    pub domain_type: Option<DomainType>,
    pub memory_kib: u64,
    pub vcpus: u32,
    /// How long a graceful shutdown may take before the domain is destroyed.
    pub shutdown_timeout: Duration,
    /// Validate every generated domain XML against libvirt's schema before defining it.
    pub validator: Option<Arc<XmlValidator>>,
}

impl ExecutorConfig {
    pub fn new(host: HostName, uri: impl Into<String>) -> Self {
        Self {
            host,
            uri: uri.into(),
            domain_type: None,
            memory_kib: DEFAULT_MEMORY_KIB,
            vcpus: DEFAULT_VCPUS,
            shutdown_timeout: Duration::from_secs(60),
            validator: None,
        }
    }
}

/// The URI of libvirt's test driver for a node description file (`test:///abs/path`). Each
/// connection to a file URI gets private state; `test:///default` is shared in-process.
pub fn test_driver_uri(node_xml: &Path) -> std::io::Result<String> {
    Ok(format!(
        "test://{}",
        std::path::absolute(node_xml)?.display()
    ))
}

/// A domain's state as usbpt reports it, with libvirt's own words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub state: ServerState,
    /// libvirt's state, e.g. `running`, `shut off (managed save)`.
    pub libvirt: String,
}
