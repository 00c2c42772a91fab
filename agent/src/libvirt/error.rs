//! libvirt failures, classified by libvirt's error *code* (never by its text; the
//! classification itself is `usbpt_libvirt::virt_error`, beside the libvirt calls), and the
//! executor's own error type.

use thiserror::Error;
use usbpt_schemas::ServerId;

use super::domain::DomainError;
use super::inspect::InspectError;
use super::validate::ValidationError;

/// What kind of libvirt failure it was; decides retries and fallbacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// `VIR_ERR_NO_DOMAIN`: no such domain.
    NoDomain,
    /// `VIR_ERR_NO_SUPPORT`, `VIR_ERR_OPERATION_UNSUPPORTED`, `VIR_ERR_ARGUMENT_UNSUPPORTED`: the
    /// driver cannot do it (the test driver has no hot attach).
    Unsupported,
    /// `VIR_ERR_OPERATION_INVALID`: not in this state (destroy a stopped domain …).
    InvalidState,
    /// `VIR_ERR_DEVICE_MISSING`: the device to detach is not in the domain.
    DeviceMissing,
    /// `VIR_ERR_NO_DOMAIN_METADATA`: the domain has no usbpt metadata.
    NoMetadata,
    /// XML or configuration refused (`VIR_ERR_XML_*`, `VIR_ERR_CONFIG_UNSUPPORTED`, …).
    Config,
    /// The connection is gone (`VIR_ERR_NO_CONNECT`, `VIR_ERR_INVALID_CONN`, `VIR_ERR_RPC`, …).
    Connection,
    Other,
}

/// A libvirt call failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{op}: {text}")]
pub struct LibvirtError {
    /// The libvirt call, e.g. `virDomainCreate`.
    pub op: &'static str,
    pub kind: FailureKind,
    /// libvirt's `virErrorNumber`.
    pub code: u32,
    /// libvirt's full error text (`error: … [code=… (n), domain=… (m)]`).
    pub text: String,
}

impl LibvirtError {
    pub fn is(&self, kind: FailureKind) -> bool {
        self.kind == kind
    }
}

/// Why an executor operation failed. The `Display` text goes into the failure event.
#[derive(Debug, Error)]
pub enum ExecutorError {
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error(transparent)]
    Validation(#[from] ValidationError),
    #[error("domain of server {server} has unreadable usbpt metadata: {source}")]
    Metadata {
        server: ServerId,
        source: InspectError,
    },
    #[error("domain of server {server} exists but was not defined by usbpt (no usbpt metadata)")]
    NotOurs { server: ServerId },
    #[error("server {server} holds no device of lineage {lineage}")]
    NoSuchLineage {
        server: ServerId,
        lineage: usbpt_schemas::LineageId,
    },
    #[error("server {server} holds no device {device}")]
    NoSuchDevice {
        server: ServerId,
        device: usbpt_schemas::DeviceId,
    },
    #[error("libvirt worker thread failed: {0}")]
    Worker(String),
}

impl ExecutorError {
    pub fn libvirt_kind(&self) -> Option<FailureKind> {
        match self {
            ExecutorError::Libvirt(e) => Some(e.kind),
            _ => None,
        }
    }
}
