//! What the command side reads of the view. The projector's redb snapshot implements
//! [`ViewRead`]; unit tests use a small in-memory one. Records carry only what decisions need.

use std::collections::BTreeMap;

use usbpt_schemas::{
    AssignedDevice, DeviceId, Fingerprint, FingerprintPolicy, FlavorId, FlavorName, FollowPolicy,
    HostName, LineageId, LineageKind, ProductId, ServerId, ServerName, ServerState, UsbAddress,
    UsbRequest, VendorId,
};

#[derive(Debug, thiserror::Error)]
#[error("reading the view: {0}")]
pub struct ViewError(pub String);

/// An enumeration's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceStatus {
    Available,
    Claimed,
    Attached,
    Invalidated,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub device_id: DeviceId,
    pub lineage_id: LineageId,
    pub lineage_kind: LineageKind,
    pub host: HostName,
    pub vendor_id: VendorId,
    pub product_id: ProductId,
    pub serial: Option<String>,
    pub address: UsbAddress,
    pub status: DeviceStatus,
    /// The server holding it (claimed or attached).
    pub holder: Option<ServerId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlavorInfo {
    pub flavor_id: FlavorId,
    pub name: FlavorName,
    pub usb: Vec<UsbRequest>,
    /// `FlavorFingerprintPolicySet`; hold when never set.
    pub on_fingerprint_change: FingerprintPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    pub server_id: ServerId,
    pub name: ServerName,
    pub flavor_id: FlavorId,
    /// `None` until scheduled (or when scheduling failed).
    pub host: Option<HostName>,
    pub state: ServerState,
    pub devices: Vec<AssignedDevice>,
    /// Nova's free-text description (`PUT /servers/{id}`).
    pub description: Option<String>,
    /// A resize awaiting confirmation (`VERIFY_RESIZE`): what a revert restores; the server
    /// still holds these devices' claims.
    pub resize_from: Option<ResizeFrom>,
}

/// The flavor, host and devices a server had before its pending resize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResizeFrom {
    pub flavor_id: FlavorId,
    pub host: HostName,
    pub devices: Vec<AssignedDevice>,
}

/// An active claim on a lineage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimInfo {
    pub lineage_id: LineageId,
    pub device_id: DeviceId,
    pub server_id: ServerId,
    pub host: HostName,
    pub follow: FollowPolicy,
}

/// A lineage's active alarms (ADR 0011), as the operator commands that clear them need them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LineageAlarms {
    /// An active `lineage_conflict`.
    pub conflict: Option<ConflictInfo>,
    /// An active `fingerprint_changed`.
    pub fingerprint: Option<FingerprintAlarmInfo>,
    /// The fingerprint the lineage's current enumeration reported, if any.
    pub current_fingerprint: Option<Fingerprint>,
}

/// The two sides of a `lineage_conflict`: the current enumeration (blocked) and the one held
/// back on another host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConflictInfo {
    pub current: (HostName, DeviceId),
    pub held_back: (HostName, DeviceId),
}

/// A `fingerprint_changed` alarm: the fingerprint the lineage had and the one it reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FingerprintAlarmInfo {
    pub expected: Fingerprint,
    pub seen: Fingerprint,
}

/// One consistent snapshot of the view.
pub trait ViewRead {
    fn flavor_by_name(&self, name: &FlavorName) -> Result<Option<FlavorInfo>, ViewError>;
    fn flavor_by_id(&self, id: &FlavorId) -> Result<Option<FlavorInfo>, ViewError>;
    /// A live (not deleted) server of that name.
    fn server_by_name(&self, name: &ServerName) -> Result<Option<ServerInfo>, ViewError>;
    /// A live (not deleted) server by id.
    fn server_by_id(&self, id: &ServerId) -> Result<Option<ServerInfo>, ViewError>;
    fn device(&self, id: &DeviceId) -> Result<Option<DeviceInfo>, ViewError>;
    /// The lineage's newest enumeration (which may be invalidated).
    fn current_enumeration(&self, lineage: &LineageId) -> Result<Option<DeviceInfo>, ViewError>;
    /// Available devices with these ids (and serial), grouped by host. Index-backed.
    fn free_devices_matching(
        &self,
        vendor: VendorId,
        product: ProductId,
        serial: Option<&str>,
    ) -> Result<BTreeMap<HostName, Vec<DeviceInfo>>, ViewError>;
    /// The first host after `after` (name order) with an available device of these ids.
    /// Index-backed views read one key; this default reads every match.
    fn next_host_with_free(
        &self,
        vendor: VendorId,
        product: ProductId,
        after: Option<&HostName>,
    ) -> Result<Option<HostName>, ViewError> {
        Ok(self
            .free_devices_matching(vendor, product, None)?
            .into_keys()
            .find(|h| after.is_none_or(|a| h > a)))
    }
    /// Available devices of these ids (and serial) on one host.
    fn free_on_host_matching(
        &self,
        host: &HostName,
        vendor: VendorId,
        product: ProductId,
        serial: Option<&str>,
    ) -> Result<Vec<DeviceInfo>, ViewError> {
        Ok(self
            .free_devices_matching(vendor, product, serial)?
            .remove(host)
            .unwrap_or_default())
    }
    fn claim(&self, lineage: &LineageId) -> Result<Option<ClaimInfo>, ViewError>;
    /// The last stream sequence stored on `subject` (0: none): what a fenced publish expects.
    fn subject_seq(&self, subject: &str) -> Result<u64, ViewError>;
    /// Whether the host has an agent that announced itself.
    fn host_known(&self, host: &HostName) -> Result<bool, ViewError>;
    /// Every host where an agent announced itself, in name order: where a flavor without USB
    /// requests may run. A view that cannot list hosts offers none.
    fn agent_hosts(&self) -> Result<Vec<HostName>, ViewError> {
        Ok(Vec::new())
    }
    /// The lineage's active alarms. Required, with no default: a view that wraps another must
    /// pass them on (a default of "none" would let a wrapper hide a conflict from the scheduler).
    fn lineage_alarms(&self, lineage: &LineageId) -> Result<LineageAlarms, ViewError>;
}
