//! libvirt's errors (`virt::error::Error`) as usbpt's [`LibvirtError`]: classified by libvirt's
//! error *code*, never by its text.

use usbpt_agent::libvirt::{FailureKind, LibvirtError};
use virt::enumutil::Enum;
use virt::error::ErrorNumber;

/// A failed libvirt call `op` as a [`LibvirtError`].
pub fn from_virt(op: &'static str, e: &virt::error::Error) -> LibvirtError {
    LibvirtError {
        op,
        kind: classify(e),
        code: e.code().to_raw(),
        text: e.to_string(),
    }
}

/// Maps libvirt's error code to a [`FailureKind`].
pub fn classify(e: &virt::error::Error) -> FailureKind {
    match e.code() {
        Enum::Known(n) => match n {
            ErrorNumber::NoDomain => FailureKind::NoDomain,
            ErrorNumber::NoSupport
            | ErrorNumber::OperationUnsupported
            | ErrorNumber::ArgumentUnsupported => FailureKind::Unsupported,
            ErrorNumber::OperationInvalid => FailureKind::InvalidState,
            ErrorNumber::DeviceMissing => FailureKind::DeviceMissing,
            ErrorNumber::NoDomainMetadata => FailureKind::NoMetadata,
            ErrorNumber::XmlError
            | ErrorNumber::XmlDetail
            | ErrorNumber::XmlInvalidSchema
            | ErrorNumber::ConfigUnsupported
            | ErrorNumber::DomExist => FailureKind::Config,
            ErrorNumber::NoConnect
            | ErrorNumber::InvalidConn
            | ErrorNumber::Rpc
            | ErrorNumber::AuthFailed
            | ErrorNumber::AuthCancelled
            | ErrorNumber::AuthUnavailable => FailureKind::Connection,
            _ => FailureKind::Other,
        },
        Enum::Unknown(_) => FailureKind::Other,
    }
}

/// Extension: `.op("virDomainCreate")?` on a virt result.
pub(crate) trait VirtResultExt<T> {
    fn op(self, op: &'static str) -> Result<T, LibvirtError>;
}

impl<T> VirtResultExt<T> for Result<T, virt::error::Error> {
    fn op(self, op: &'static str) -> Result<T, LibvirtError> {
        self.map_err(|e| from_virt(op, &e))
    }
}
