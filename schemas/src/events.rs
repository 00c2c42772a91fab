//! Event bodies: facts, named in the past tense. Applying one never fails and has no logic of its
//! own; deciding whether it may happen is the command side's job.
//!
//! Wire rule: postcard encodes variants by index and fields by position. Never reorder or remove
//! a variant or a field; add new variants at the end of an enum. `tests/golden.rs` fails on any
//! change to the bytes of an existing variant.

use serde::{Deserialize, Serialize};

pub use crate::fingerprint::Fingerprint;
use crate::ids::*;

/// How many variants [`Event`] has; the codec refuses higher indexes as unknown. Keep in step
/// with the enum (the golden tests check every index below it has a sample).
pub const EVENT_VARIANTS: u32 = 34;

/// Every event usbpt records. The variant order is the wire format.
// DeviceDiscovered is the largest by far; events are built once and moved rarely, so plain
// variants (easy to match and construct) beat boxing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    HostAgentStarted(HostAgentStarted),
    DeviceDiscovered(DeviceDiscovered),
    DeviceInvalidated(DeviceInvalidated),
    FlavorCreated(FlavorCreated),
    FlavorDeleted(FlavorDeleted),
    ServerBootRequested(ServerBootRequested),
    ServerScheduled(ServerScheduled),
    ServerScheduleFailed(ServerScheduleFailed),
    DeviceClaimed(DeviceClaimed),
    DeviceAttached(DeviceAttached),
    DeviceReattached(DeviceReattached),
    DeviceReleased(DeviceReleased),
    ServerStateChanged(ServerStateChanged),
    ServerResized(ServerResized),
    ServerMigrationRefused(ServerMigrationRefused),
    ServerDeleted(ServerDeleted),
    ServerActionRequested(ServerActionRequested),
    DeviceAttachFailed(DeviceAttachFailed),
    DeviceClashDetected(DeviceClashDetected),
    ServerMigrated(ServerMigrated),
    FlavorUsbSet(FlavorUsbSet),
    FlavorSized(FlavorSized),
    ServerUpdated(ServerUpdated),
    ServerResizeVerifying(ServerResizeVerifying),
    ServerResizeConfirmed(ServerResizeConfirmed),
    ServerResizeReverted(ServerResizeReverted),
    /// `DeviceDiscovered` with its descriptor fingerprint (ADR 0011): what agents publish when
    /// they could read the device's descriptors; index 1 stays for older events and for an
    /// enumeration whose descriptors could not be read.
    DeviceDiscoveredV2(DeviceDiscoveredV2),
    LineageLabeled(LineageLabeled),
    PortFlapping(PortFlapping),
    PortFlappingCleared(PortFlappingCleared),
    LineageConflictResolved(LineageConflictResolved),
    FingerprintAccepted(FingerprintAccepted),
    DeviceReattachHeld(DeviceReattachHeld),
    FlavorFingerprintPolicySet(FlavorFingerprintPolicySet),
}

impl Event {
    /// The variant's name, as in `docs/events.md` and the JSON the API serves.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::HostAgentStarted(_) => "HostAgentStarted",
            Event::DeviceDiscovered(_) => "DeviceDiscovered",
            Event::DeviceInvalidated(_) => "DeviceInvalidated",
            Event::FlavorCreated(_) => "FlavorCreated",
            Event::FlavorDeleted(_) => "FlavorDeleted",
            Event::ServerBootRequested(_) => "ServerBootRequested",
            Event::ServerScheduled(_) => "ServerScheduled",
            Event::ServerScheduleFailed(_) => "ServerScheduleFailed",
            Event::DeviceClaimed(_) => "DeviceClaimed",
            Event::DeviceAttached(_) => "DeviceAttached",
            Event::DeviceReattached(_) => "DeviceReattached",
            Event::DeviceReleased(_) => "DeviceReleased",
            Event::ServerStateChanged(_) => "ServerStateChanged",
            Event::ServerResized(_) => "ServerResized",
            Event::ServerMigrationRefused(_) => "ServerMigrationRefused",
            Event::ServerDeleted(_) => "ServerDeleted",
            Event::ServerActionRequested(_) => "ServerActionRequested",
            Event::DeviceAttachFailed(_) => "DeviceAttachFailed",
            Event::DeviceClashDetected(_) => "DeviceClashDetected",
            Event::ServerMigrated(_) => "ServerMigrated",
            Event::FlavorUsbSet(_) => "FlavorUsbSet",
            Event::FlavorSized(_) => "FlavorSized",
            Event::ServerUpdated(_) => "ServerUpdated",
            Event::ServerResizeVerifying(_) => "ServerResizeVerifying",
            Event::ServerResizeConfirmed(_) => "ServerResizeConfirmed",
            Event::ServerResizeReverted(_) => "ServerResizeReverted",
            Event::DeviceDiscoveredV2(_) => "DeviceDiscoveredV2",
            Event::LineageLabeled(_) => "LineageLabeled",
            Event::PortFlapping(_) => "PortFlapping",
            Event::PortFlappingCleared(_) => "PortFlappingCleared",
            Event::LineageConflictResolved(_) => "LineageConflictResolved",
            Event::FingerprintAccepted(_) => "FingerprintAccepted",
            Event::DeviceReattachHeld(_) => "DeviceReattachHeld",
            Event::FlavorFingerprintPolicySet(_) => "FlavorFingerprintPolicySet",
        }
    }

    /// The host this event is about, when it is published by (or addressed to) a host agent.
    /// An event with a host lives under that host's subjects (see [`crate::subjects`]).
    pub fn agent_host(&self) -> Option<&HostName> {
        match self {
            Event::HostAgentStarted(e) => Some(&e.host),
            Event::DeviceDiscovered(e) => Some(&e.host),
            Event::DeviceDiscoveredV2(e) => Some(&e.discovery.host),
            Event::DeviceInvalidated(e) => Some(&e.host),
            Event::DeviceAttached(e) => Some(&e.host),
            Event::DeviceReattached(e) => Some(&e.host),
            Event::DeviceAttachFailed(e) => Some(&e.host),
            Event::DeviceClashDetected(e) => Some(&e.host),
            Event::PortFlapping(e) => Some(&e.host),
            Event::PortFlappingCleared(e) => Some(&e.host),
            Event::DeviceReattachHeld(e) => Some(&e.host),
            Event::ServerStateChanged(e) if e.reported_by_agent => e.host.as_ref(),
            _ => None,
        }
    }
}

impl Event {
    /// The discovery this event reports, of either layout (`DeviceDiscovered`, or
    /// `DeviceDiscoveredV2` with its fingerprint).
    pub fn discovery(&self) -> Option<(&DeviceDiscovered, Option<&Fingerprint>)> {
        match self {
            Event::DeviceDiscovered(d) => Some((d, None)),
            Event::DeviceDiscoveredV2(d) => Some((&d.discovery, Some(&d.fingerprint))),
            _ => None,
        }
    }

    /// The event announcing a discovery: `DeviceDiscoveredV2` when the fingerprint is known,
    /// the original `DeviceDiscovered` when it is not.
    pub fn discovered(discovery: DeviceDiscovered, fingerprint: Option<Fingerprint>) -> Event {
        match fingerprint {
            Some(fingerprint) => Event::DeviceDiscoveredV2(DeviceDiscoveredV2 {
                discovery,
                fingerprint,
            }),
            None => Event::DeviceDiscovered(discovery),
        }
    }
}

/// An agent came up (or came back) on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostAgentStarted {
    pub host: HostName,
    /// The kernel's boot id; a change means the host rebooted.
    pub boot_id: String,
    pub agent_version: String,
    pub hypervisor_uri: String,
}

/// One enumeration's descriptors as its host read them (sysfs and udev's properties): where
/// the device sits and what it says of itself. Written once: the discovery event carries it, the
/// agent's record of a present device and the API's device document hold it.
///
/// Its fields are in the order `DeviceDiscovered` always had them: postcard writes a nested
/// struct's fields inline, so the event's bytes did not change when they moved here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsbDescriptors {
    /// `busnum` and `devnum`: change on every re-enumeration.
    pub address: UsbAddress,
    /// The kernel name (`1-2.3`): bus and hub ports.
    pub port_path: PortPath,
    pub vendor_id: VendorId,
    pub product_id: ProductId,
    /// The `serial` attribute, trimmed; `None` when absent or blank.
    pub serial: Option<String>,
    /// `bDeviceClass`.
    pub device_class: u8,
    /// `bInterfaceClass` of each interface of the active configuration, in interface order.
    pub interface_classes: Vec<u8>,
    pub manufacturer: Option<String>,
    pub product: Option<String>,
    /// hwdb's `ID_VENDOR_FROM_DATABASE`.
    pub vendor_db: Option<String>,
    /// hwdb's `ID_MODEL_FROM_DATABASE`.
    pub model_db: Option<String>,
    /// sysfs `speed` in Mbit/s as the kernel prints it (`1.5`, `12`, `480`, `5000` …).
    pub speed: Option<String>,
    /// sysfs `version` (bcdUSB), e.g. `2.00`.
    pub usb_version: Option<String>,
}

impl UsbDescriptors {
    /// Descriptors with only where the device sits and its ids; every other field empty (a
    /// source fills in what it reads).
    pub fn new(
        address: UsbAddress,
        port_path: PortPath,
        vendor_id: VendorId,
        product_id: ProductId,
    ) -> Self {
        Self {
            address,
            port_path,
            vendor_id,
            product_id,
            serial: None,
            device_class: 0,
            interface_classes: Vec::new(),
            manufacturer: None,
            product: None,
            vendor_db: None,
            model_db: None,
            speed: None,
            usb_version: None,
        }
    }
}

/// A device appeared at an address: a new enumeration.
///
/// In JSON (the history, `usbpt events`, docs/events.md) the descriptors' fields stand in the
/// event itself, as they did before they had a struct of their own ([`DiscoveredJson`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub struct DeviceDiscovered {
    pub device_id: DeviceId,
    pub lineage_id: LineageId,
    pub lineage_kind: LineageKind,
    pub host: HostName,
    pub boot_id: String,
    pub descriptors: UsbDescriptors,
    pub syspath: String,
    /// The previous enumeration of the same lineage, when there was one.
    pub supersedes: Option<DeviceId>,
}

/// `DeviceDiscovered` for human-readable formats: the descriptors flattened. `flatten` makes
/// the struct a map, which postcard would write with its keys, so the binary form stays the
/// derived struct. The compiler holds the two to the same fields (`remote`).
#[derive(Serialize, Deserialize)]
#[serde(remote = "DeviceDiscovered")]
struct DiscoveredJson {
    device_id: DeviceId,
    lineage_id: LineageId,
    lineage_kind: LineageKind,
    host: HostName,
    boot_id: String,
    #[serde(flatten)]
    descriptors: UsbDescriptors,
    syspath: String,
    supersedes: Option<DeviceId>,
}

impl Serialize for DeviceDiscovered {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            DiscoveredJson::serialize(self, s)
        } else {
            DeviceDiscovered::serialize(self, s)
        }
    }
}

impl<'de> Deserialize<'de> for DeviceDiscovered {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            DiscoveredJson::deserialize(d)
        } else {
            DeviceDiscovered::deserialize(d)
        }
    }
}

/// A device appeared, with its descriptor fingerprint: `DeviceDiscovered`'s fields (same
/// bytes, in the same order) followed by the fingerprint. An append-only extension by a new
/// variant (ADR 0011): postcard has no optional trailing fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDiscoveredV2 {
    pub discovery: DeviceDiscovered,
    /// SHA-256 of name, ids, serial and the raw descriptors, as USBGuard's `hash`
    /// (docs/identity.md).
    pub fingerprint: Fingerprint,
}

/// Why an enumeration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InvalidationReason {
    /// Removed from the host while the agent watched.
    Unplugged,
    /// The host's boot id changed: every enumeration of the previous boot is gone.
    HostRebooted,
    /// Gone when the agent came back; it left while the agent was down.
    VanishedWhileAgentDown,
    /// Reset or re-enumerated in place (same port, new devnum).
    Reenumerated,
    /// Excluded by the host's filter after it had been published.
    Filtered,
}

/// An enumeration is over. Terminal for that `device_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInvalidated {
    pub device_id: DeviceId,
    pub lineage_id: LineageId,
    pub host: HostName,
    pub reason: InvalidationReason,
    /// The enumeration that replaces it, when the agent already knows one.
    pub superseded_by: Option<DeviceId>,
}

/// USB host controller models a flavor can ask for (a flavor request's `controller`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControllerModel {
    Uhci,
    Ehci,
    Xhci,
}

impl ControllerModel {
    /// Ports one controller of this model offers (libvirt/QEMU: piix3-uhci 2, ich9-ehci1 6,
    /// qemu-xhci up to 15 with `ports=`).
    pub fn ports(self) -> u8 {
        match self {
            ControllerModel::Uhci => 2,
            ControllerModel::Ehci => 6,
            ControllerModel::Xhci => 15,
        }
    }
    /// The libvirt `<controller type='usb' model=…>` value.
    pub fn libvirt_model(self) -> &'static str {
        match self {
            ControllerModel::Uhci => "piix3-uhci",
            ControllerModel::Ehci => "ich9-ehci1",
            ControllerModel::Xhci => "qemu-xhci",
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            ControllerModel::Uhci => "uhci",
            ControllerModel::Ehci => "ehci",
            ControllerModel::Xhci => "xhci",
        }
    }
}

/// What a binding does when its device re-enumerates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FollowPolicy {
    /// Follow the lineage to its current enumeration (the default).
    #[default]
    Lineage,
    /// Strict: the invalid device is dropped (`startupPolicy='optional'`) and
    /// the user resizes to a flavor with the new device.
    Strict,
}

/// Which device(s) a USB request wants.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceSelector {
    /// One enumeration (`{"usb_devices":[{"id": …}]}`).
    Enumeration(DeviceId),
    /// Whatever enumeration the lineage currently has.
    Lineage(LineageId),
    /// `count` free devices with these ids (and serial, when given).
    Match {
        vendor_id: VendorId,
        product_id: ProductId,
        serial: Option<String>,
        count: u8,
    },
}

/// One USB request of a flavor.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UsbRequest {
    pub selector: DeviceSelector,
    pub controller: ControllerModel,
    pub follow: FollowPolicy,
}

impl UsbRequest {
    /// How many devices this request needs.
    pub fn device_count(&self) -> u16 {
        match &self.selector {
            DeviceSelector::Match { count, .. } => u16::from(*count),
            _ => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlavorCreated {
    pub flavor_id: FlavorId,
    pub name: FlavorName,
    pub usb: Vec<UsbRequest>,
}

/// A flavor's USB request was replaced (Nova's `usb_devices` extra spec set or removed).
/// Servers already placed keep the devices they hold; the new request applies to the next
/// boot, resize or migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlavorUsbSet {
    pub flavor_id: FlavorId,
    pub name: FlavorName,
    pub usb: Vec<UsbRequest>,
}

/// A flavor's Nova resources (`ram`, `vcpus`, `disk` of `POST /flavors`), recorded right after
/// its `FlavorCreated` when any is non-zero. usbpt schedules USB devices only: these are shown,
/// not scheduled on. A flavor without this event has 0 of each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlavorSized {
    pub flavor_id: FlavorId,
    pub name: FlavorName,
    pub ram_mb: u32,
    pub vcpus: u32,
    pub disk_gb: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlavorDeleted {
    pub flavor_id: FlavorId,
    pub name: FlavorName,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerBootRequested {
    pub server_id: ServerId,
    pub name: ServerName,
    pub flavor_id: FlavorId,
    /// An operator's forced host (`--host`), if any.
    pub requested_host: Option<HostName>,
}

/// One device assigned to a server, with the request it satisfies.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AssignedDevice {
    /// Index into the flavor's `usb` requests.
    pub request_index: u16,
    pub device_id: DeviceId,
    pub lineage_id: LineageId,
    pub controller: ControllerModel,
    pub follow: FollowPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerScheduled {
    pub server_id: ServerId,
    pub host: HostName,
    pub flavor_id: FlavorId,
    pub devices: Vec<AssignedDevice>,
}

/// Why one host could not take a server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRejection {
    pub host: HostName,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerScheduleFailed {
    pub server_id: ServerId,
    pub reason: String,
    pub host_rejections: Vec<HostRejection>,
}

/// A device was claimed for a server. Published on the lineage's claim subject with
/// `Nats-Expected-Last-Subject-Sequence`, so two handlers can never both win it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceClaimed {
    pub device_id: DeviceId,
    pub lineage_id: LineageId,
    pub host: HostName,
    pub server_id: ServerId,
    pub request_index: u16,
    pub controller: ControllerModel,
    pub follow: FollowPolicy,
}

/// How the agent got a device into a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AttachMethod {
    /// Part of the domain definition when it was defined and started.
    DomainDefinition,
    /// Hot-plugged into a running domain.
    HotPlug,
    /// The hypervisor cannot hot-plug (libvirt's test driver): the domain was redefined.
    Redefined,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceAttached {
    pub device_id: DeviceId,
    pub lineage_id: LineageId,
    pub host: HostName,
    pub server_id: ServerId,
    pub address: UsbAddress,
    pub method: AttachMethod,
    /// Free text from the executor (e.g. "test driver has no hot attach; domain redefined").
    pub detail: String,
}

/// A held device re-enumerated and the new enumeration was attached to the same server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceReattached {
    pub server_id: ServerId,
    pub host: HostName,
    pub lineage_id: LineageId,
    pub old_device_id: DeviceId,
    pub new_device_id: DeviceId,
    pub address: UsbAddress,
    pub method: AttachMethod,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReleaseReason {
    ServerDeleted,
    Resized,
    Migrated,
    /// The enumeration was invalidated and no successor came within the grace window.
    GraceExpired,
    /// A `strict` binding's device was invalidated.
    Invalidated,
    /// The server could not be scheduled or started after the claim.
    BootFailed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceReleased {
    pub device_id: DeviceId,
    pub lineage_id: LineageId,
    pub host: HostName,
    pub server_id: ServerId,
    pub reason: ReleaseReason,
}

/// Nova's power and task states, as far as usbpt tracks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ServerState {
    Building,
    Active,
    Shutoff,
    Paused,
    Suspended,
    Rebooting,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStateChanged {
    pub server_id: ServerId,
    pub host: Option<HostName>,
    pub state: ServerState,
    /// True when a host agent observed it (then it lives under the host's subjects).
    pub reported_by_agent: bool,
    /// Why, in words: the libvirt error text on failure, or the action that caused it.
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerResized {
    pub server_id: ServerId,
    pub from_flavor: FlavorId,
    pub to_flavor: FlavorId,
    /// Where the server ran before; when it differs from `host`, that agent tears it down.
    pub from_host: HostName,
    /// Where the server runs now.
    pub host: HostName,
    pub devices: Vec<AssignedDevice>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerMigrationRefused {
    pub server_id: ServerId,
    pub live: bool,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerDeleted {
    pub server_id: ServerId,
    /// The host it ran on, if it was ever scheduled (that agent destroys the domain).
    pub host: Option<HostName>,
}

/// Power and lifecycle actions that keep a server's claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerAction {
    Stop,
    Start,
    Reboot,
    Pause,
    Unpause,
    Suspend,
    Resume,
    Rebuild,
    /// Destroy and undefine the domain on this host (after a resize or cold migration away).
    Teardown,
}

impl ServerAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerAction::Stop => "stop",
            ServerAction::Start => "start",
            ServerAction::Reboot => "reboot",
            ServerAction::Pause => "pause",
            ServerAction::Unpause => "unpause",
            ServerAction::Suspend => "suspend",
            ServerAction::Resume => "resume",
            ServerAction::Rebuild => "rebuild",
            ServerAction::Teardown => "teardown",
        }
    }
}

/// The control plane asks the server's host agent to carry out an action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerActionRequested {
    pub server_id: ServerId,
    pub host: HostName,
    pub action: ServerAction,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceAttachFailed {
    pub device_id: DeviceId,
    pub host: HostName,
    pub server_id: ServerId,
    /// The hypervisor's error text.
    pub error: String,
}

/// Two devices on one host share a serial: both fall back to port lineages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceClashDetected {
    pub host: HostName,
    pub vendor_id: VendorId,
    pub product_id: ProductId,
    pub serial: String,
    pub port_paths: Vec<PortPath>,
}

/// A cold migration moved a server to another host: its serial-lineage devices were moved there
/// physically (or it holds none). The old host's agent tears the domain down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerMigrated {
    pub server_id: ServerId,
    pub from_host: HostName,
    pub host: HostName,
    pub devices: Vec<AssignedDevice>,
}

/// A server was renamed or its description changed (Nova's `PUT /servers/{id}`). Both fields
/// hold the result: the name after the change (the same name when only the description
/// changed) and the description after it (`None`: none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerUpdated {
    pub server_id: ServerId,
    pub name: ServerName,
    pub description: Option<String>,
}

/// A resize (the `ServerResized` just before it) awaits the operator's confirmation (Nova's
/// `VERIFY_RESIZE`): the server keeps its claims on the devices it had before (`devices`, the
/// old flavor's assignment) until the resize is confirmed (they are released) or reverted (the
/// server gets its old flavor and devices back). Nothing else can claim them meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerResizeVerifying {
    pub server_id: ServerId,
    pub from_flavor: FlavorId,
    pub from_host: HostName,
    pub devices: Vec<AssignedDevice>,
}

/// The pending resize was confirmed; the old devices' claims are released beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerResizeConfirmed {
    pub server_id: ServerId,
}

/// The pending resize was reverted: a `ServerResized` back to the old flavor, host and devices
/// precedes it, and the new devices' claims are released beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerResizeReverted {
    pub server_id: ServerId,
}

/// An operator named a lineage (`usbpt label`), or removed its name (`label: None`). The label
/// is the operator's handle for the physical device ("ERP key #3"): shown wherever the device
/// is and searchable (`usbpt find --label`). Valid labels: [`crate::label::check`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineageLabeled {
    pub lineage_id: LineageId,
    pub label: Option<String>,
}

/// A host agent saw one lineage re-enumerate more than its threshold within its window (a
/// flapping hub port, autosuspend, a failing cable or power). While it flaps the agent does not
/// re-attach it automatically and the scheduler does not pick it (ADR 0011). Published once per
/// episode, on the host's `flap.{lineage_id}` subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortFlapping {
    pub host: HostName,
    pub lineage_id: LineageId,
    /// The enumeration current when the threshold was crossed.
    pub device_id: DeviceId,
    pub port_path: PortPath,
    /// Enumerations seen within the window, this one included.
    pub enumerations: u32,
    /// The detector's settings when it was raised.
    pub window_secs: u32,
    pub threshold: u32,
}

/// The lineage stayed enumerated (or stayed away) for the agent's quiet period: the episode its
/// `PortFlapping` opened is over. Published once, on the same subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortFlappingCleared {
    pub host: HostName,
    pub lineage_id: LineageId,
    /// The lineage's enumeration at that moment, if it is present.
    pub device_id: Option<DeviceId>,
    pub quiet_secs: u32,
}

/// An operator ended a `lineage_conflict` by keeping the enumeration on `keep_host` (`usbpt
/// conflict resolve LINEAGE --keep HOST`), without unplugging the other copy. Recorded on the
/// lineage's claim subject, fenced, so it is decided against the lineage's latest claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineageConflictResolved {
    pub lineage_id: LineageId,
    pub keep_host: HostName,
    /// The enumeration that keeps (or takes over) the lineage.
    pub kept_device: DeviceId,
    /// The enumeration set aside: ignored until it ends.
    pub dropped_device: DeviceId,
}

/// A serial lineage's new descriptor fingerprint is accepted as its own (`usbpt fingerprint
/// accept LINEAGE`, or a flavor's `on_fingerprint_change=follow`): a `fingerprint_changed` alarm
/// clears, and a re-attach held back for it (`DeviceReattachHeld`) is carried out by the agent of
/// `host` for `server_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FingerprintAccepted {
    pub lineage_id: LineageId,
    pub fingerprint: Fingerprint,
    /// The lineage's current enumeration and where it is, when it is present.
    pub device_id: Option<DeviceId>,
    pub host: Option<HostName>,
    /// The server that holds the lineage there, if any: its agent re-attaches the enumeration.
    pub server_id: Option<ServerId>,
    /// True when a flavor's `on_fingerprint_change=follow` accepted it rather than an operator.
    pub by_policy: bool,
}

/// An agent did not re-attach a re-enumerated device to the server that holds its lineage,
/// because the new enumeration's fingerprint is not the one the server had (ADR 0011): the
/// server keeps its claim; an accept (`FingerprintAccepted`) lets the re-attach go ahead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceReattachHeld {
    pub host: HostName,
    pub server_id: ServerId,
    pub lineage_id: LineageId,
    pub device_id: DeviceId,
    pub expected: Fingerprint,
    pub seen: Fingerprint,
}

/// What happens when a device held by a server of this flavor comes back with another
/// fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FingerprintPolicy {
    /// Keep the claim, do not re-attach until an operator accepts the new fingerprint.
    #[default]
    Hold,
    /// Accept it and re-attach (the alarm is still raised and recorded).
    Follow,
}

impl FingerprintPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FingerprintPolicy::Hold => "hold",
            FingerprintPolicy::Follow => "follow",
        }
    }
}

impl std::str::FromStr for FingerprintPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hold" => Ok(FingerprintPolicy::Hold),
            "follow" => Ok(FingerprintPolicy::Follow),
            other => Err(format!("{other:?} is not hold or follow")),
        }
    }
}

/// A flavor's `on_fingerprint_change` policy was set (`flavor create|set
/// --on-fingerprint-change`). A flavor without this event holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlavorFingerprintPolicySet {
    pub flavor_id: FlavorId,
    pub name: FlavorName,
    pub on_fingerprint_change: FingerprintPolicy,
}
