//! The records the view stores. Values are postcard-encoded (append-only like the wire types: a
//! change to a record is a new [`crate::VIEW_FORMAT`], and the view is rebuilt by replay).
//!
//! Nothing here uses `#[serde(skip_serializing_if)]` or `flatten`: postcard needs every field.

use serde::{Deserialize, Serialize};
use usbpt_schemas::{
    AssignedDevice, AttachMethod, ControllerModel, DeviceDiscovered, DeviceId, Fingerprint,
    FingerprintPolicy, FlavorId, FlavorName, FollowPolicy, HostName, HostRejection,
    InvalidationReason, LineageId, LineageKind, Origin, PortPath, ProductId, ReleaseReason,
    ServerAction, ServerId, ServerName, ServerState, Timestamp, UsbAddress, UsbRequest, VendorId,
};

/// When something happened: the stream sequence of the event and the time the event carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub seq: u64,
    pub at: Timestamp,
}

/// An enumeration's status: `available → claimed → attached → (released)
/// available`; `invalidated` is terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    Available,
    Claimed,
    Attached,
    Invalidated,
}

impl DeviceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Available => "available",
            DeviceStatus::Claimed => "claimed",
            DeviceStatus::Attached => "attached",
            DeviceStatus::Invalidated => "invalidated",
        }
    }
}

impl std::str::FromStr for DeviceStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "available" => Ok(Self::Available),
            "claimed" => Ok(Self::Claimed),
            "attached" => Ok(Self::Attached),
            "invalidated" => Ok(Self::Invalidated),
            other => Err(format!(
                "unknown device status {other:?} (available, claimed, attached, invalidated)"
            )),
        }
    }
}

/// How an enumeration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invalidation {
    pub stamp: Stamp,
    /// `None` while only a newer enumeration of the lineage is known (the agent's
    /// `DeviceInvalidated` has not arrived yet); filled in when it does.
    pub reason: Option<InvalidationReason>,
    pub superseded_by: Option<DeviceId>,
}

/// The device is in a server's domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub server_id: ServerId,
    pub address: UsbAddress,
    pub method: AttachMethod,
    pub detail: String,
    pub stamp: Stamp,
}

/// How a server came to hold an enumeration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldKind {
    /// `DeviceClaimed` named this enumeration.
    Claimed,
    /// A `lineage`-follow claim moved to this new enumeration when it was discovered.
    Followed,
    /// The agent re-attached this new enumeration (`DeviceReattached`).
    Reattached,
    /// The agent attached it without a claim the view knew of.
    Attached,
}

/// Why a hold ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldEnd {
    Released(ReleaseReason),
    /// The claim moved on to a newer enumeration of the lineage.
    MovedTo(DeviceId),
}

/// One server's hold on one enumeration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    pub server_id: ServerId,
    pub how: HoldKind,
    pub from: Stamp,
    pub attached: Option<Stamp>,
    pub ended: Option<(Stamp, HoldEnd)>,
    /// Who asked for the command whose event began it (ADR 0014): the claim's origin; `None`
    /// for a hold an agent's event began (followed, re-attached, attached without a claim) or
    /// a claim recorded before origins were.
    pub started_by: Option<Origin>,
    /// Who asked for the release that ended it; `None` when an agent's event ended it (the
    /// claim moved on) or the release carried no origin.
    pub ended_by: Option<Origin>,
}

/// The last time the hypervisor refused this device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachError {
    pub server_id: ServerId,
    pub error: String,
    pub stamp: Stamp,
}

/// One enumeration of a device (a `DeviceId`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Everything the agent reported (shared: it never changes after discovery, so a staged
    /// copy of the record does not copy it).
    pub discovery: std::sync::Arc<DeviceDiscovered>,
    pub status: DeviceStatus,
    /// The server it is claimed for or attached to.
    pub holder: Option<ServerId>,
    /// Whether this is its lineage's newest enumeration.
    pub current: bool,
    pub discovered: Stamp,
    pub invalidation: Option<Invalidation>,
    pub attachment: Option<Attachment>,
    /// Every server that held this enumeration, in order.
    pub holders: Vec<Holding>,
    pub attach_error: Option<AttachError>,
    pub last_change_seq: u64,
    /// The descriptor fingerprint (`DeviceDiscoveredV2`); `None` for an enumeration announced
    /// without one (older agents, or descriptors that could not be read).
    pub fingerprint: Option<Fingerprint>,
    /// An alarm on its lineage keeps it from new claims (a conflict, or the lineage flapping:
    /// ADR 0011): the combination of every active cause, so clearing one keeps the others.
    pub blocked: bool,
}

impl Device {
    pub fn id(&self) -> DeviceId {
        self.discovery.device_id
    }
    pub fn lineage_id(&self) -> LineageId {
        self.discovery.lineage_id
    }
    pub fn host(&self) -> &HostName {
        &self.discovery.host
    }
    pub fn vendor_id(&self) -> VendorId {
        self.discovery.descriptors.vendor_id
    }
    pub fn product_id(&self) -> ProductId {
        self.discovery.descriptors.product_id
    }
    pub fn serial(&self) -> Option<&str> {
        self.discovery.descriptors.serial.as_deref()
    }
    pub fn address(&self) -> UsbAddress {
        self.discovery.descriptors.address
    }
    pub fn port_path(&self) -> &PortPath {
        &self.discovery.descriptors.port_path
    }
    /// Free for a new claim: available (which implies current).
    pub fn is_free(&self) -> bool {
        self.status == DeviceStatus::Available && self.current && !self.blocked
    }
}

/// The physical device across enumerations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    pub id: LineageId,
    pub kind: LineageKind,
    pub vendor_id: VendorId,
    pub product_id: ProductId,
    pub serial: Option<String>,
    /// The newest enumeration.
    pub current: DeviceId,
    pub current_host: HostName,
    /// How many enumerations it has had (its history's length).
    pub enumerations: u32,
    pub first_seen: Stamp,
    /// Its alarms, raised and cleared, oldest first (the active ones and the newest
    /// [`ALARMS_KEPT`] cleared ones).
    pub alarms: Vec<Alarm>,
    /// An enumeration of this serial lineage on another host, discovered while the current one
    /// is still present (a `LineageConflict`): it takes the lineage over when the current one
    /// ends, and is dropped if it ends first.
    pub pending: Option<PendingDiscovery>,
    /// The operator's name for the device (`LineageLabeled`), if any.
    pub label: Option<String>,
    /// When the label was last set or removed.
    pub label_changed: Option<Stamp>,
    /// The last fingerprint accepted as the lineage's own (`FingerprintAccepted`), if any.
    pub fingerprint_accepted: Option<FingerprintAcceptance>,
}

/// A fingerprint accepted as a serial lineage's own: the expected fingerprint from then on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FingerprintAcceptance {
    pub stamp: Stamp,
    pub fingerprint: Fingerprint,
    /// By a flavor's `on_fingerprint_change=follow` rather than an operator.
    pub by_policy: bool,
}

/// How many cleared alarms a lineage keeps.
pub const ALARMS_KEPT: usize = 8;

/// What an alarm is about (docs/identity.md, "Alarms"). The names are stable: metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlarmKind {
    /// A serial lineage present on two hosts at once.
    LineageConflict,
    /// A serial lineage re-enumerated with another descriptor fingerprint.
    FingerprintChanged,
    /// A lineage re-enumerating again and again on a host (`PortFlapping` from its agent).
    PortFlapping,
}

impl AlarmKind {
    pub const ALL: [AlarmKind; 3] = [
        AlarmKind::LineageConflict,
        AlarmKind::FingerprintChanged,
        AlarmKind::PortFlapping,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            AlarmKind::LineageConflict => "lineage_conflict",
            AlarmKind::FingerprintChanged => "fingerprint_changed",
            AlarmKind::PortFlapping => "port_flapping",
        }
    }
}

/// One alarm on a lineage: raised by an event, cleared by a later one (never by the clock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alarm {
    pub kind: AlarmKind,
    pub raised: Stamp,
    /// What happened and what the operator can do, in words.
    pub reason: String,
    /// The hosts and enumerations involved.
    pub hosts: Vec<HostName>,
    pub devices: Vec<DeviceId>,
    /// `FingerprintChanged`: the fingerprint the lineage had, then the one it reported.
    pub fingerprints: Vec<Fingerprint>,
    /// When and why it cleared; `None` while active.
    pub cleared: Option<(Stamp, String)>,
}

impl Alarm {
    pub fn is_active(&self) -> bool {
        self.cleared.is_none()
    }
}

/// A discovery held back by a lineage conflict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingDiscovery {
    pub stamp: Stamp,
    pub discovery: DeviceDiscovered,
    pub fingerprint: Option<Fingerprint>,
}

/// An active claim on a lineage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub lineage_id: LineageId,
    /// The enumeration the claim holds (possibly invalidated, until released or re-attached).
    pub device_id: DeviceId,
    pub host: HostName,
    pub server_id: ServerId,
    pub request_index: u16,
    pub controller: ControllerModel,
    pub follow: FollowPolicy,
    pub claimed: Stamp,
    /// A newer enumeration, claimed for the server (follow `lineage`), awaiting re-attach.
    pub awaiting: Option<DeviceId>,
}

/// Two devices on a host share a serial (`DeviceClashDetected`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clash {
    pub vendor_id: VendorId,
    pub product_id: ProductId,
    pub serial: String,
    pub port_paths: Vec<PortPath>,
    pub stamp: Stamp,
}

/// A hypervisor host, as its agent (and its devices) reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub name: HostName,
    pub boot_id: Option<String>,
    pub agent_version: Option<String>,
    pub hypervisor_uri: Option<String>,
    /// The last `HostAgentStarted`.
    pub agent_started: Option<Stamp>,
    /// The last event published by this host's agent.
    pub last_seen: Stamp,
    pub clashes: Vec<Clash>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flavor {
    pub id: FlavorId,
    pub name: FlavorName,
    pub usb: Vec<UsbRequest>,
    pub created: Stamp,
    pub deleted: Option<Stamp>,
    /// Nova's resources (`FlavorSized`); 0 for a flavor created without them.
    pub ram_mb: u32,
    pub vcpus: u32,
    pub disk_gb: u32,
    /// `FlavorFingerprintPolicySet`; hold for a flavor that never set it.
    pub on_fingerprint_change: FingerprintPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleFailure {
    pub stamp: Stamp,
    pub reason: String,
    pub host_rejections: Vec<HostRejection>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRefusal {
    pub stamp: Stamp,
    pub live: bool,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionRecord {
    pub stamp: Stamp,
    pub action: ServerAction,
    pub host: HostName,
}

/// A resize or a cold migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub stamp: Stamp,
    pub from_host: HostName,
    pub host: HostName,
    pub from_flavor: FlavorId,
    pub to_flavor: FlavorId,
    /// True for `ServerMigrated`, false for `ServerResized`.
    pub migration: bool,
    /// How a resize awaiting confirmation ended, and when; `None` while it awaits it, and for
    /// moves that never awaited one (migrations, resizes from before `VERIFY_RESIZE`).
    pub end: Option<(MoveEnd, Stamp)>,
}

/// How a move ended (`ServerResizeConfirmed` / `ServerResizeReverted`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MoveEnd {
    Confirmed,
    Reverted,
    /// This move is itself the way back of a reverted resize.
    IsRevert,
}

/// How many schedule failures, migration refusals and moves a server record keeps (the newest);
/// the totals count them all.
pub const SERVER_HISTORY_KEEP: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    pub id: ServerId,
    pub name: ServerName,
    pub flavor_id: FlavorId,
    pub requested_host: Option<HostName>,
    /// Where it runs; `None` until scheduled.
    pub host: Option<HostName>,
    pub state: ServerState,
    pub state_detail: String,
    pub state_changed: Stamp,
    /// The devices the last schedule, resize or migration assigned (device ids follow
    /// re-attached lineages).
    pub devices: Vec<AssignedDevice>,
    pub created: Stamp,
    pub scheduled: Option<Stamp>,
    pub schedule_failures: Vec<ScheduleFailure>,
    pub schedule_failures_total: u32,
    pub migration_refusals: Vec<MigrationRefusal>,
    pub migration_refusals_total: u32,
    pub moves: Vec<Move>,
    pub last_action: Option<ActionRecord>,
    pub deleted: Option<Stamp>,
    pub last_change_seq: u64,
    /// Nova's description (`ServerUpdated`).
    pub description: Option<String>,
    /// A resize awaiting confirmation (`ServerResizeVerifying` until `ServerResizeConfirmed` or
    /// `ServerResizeReverted`): Nova's `VERIFY_RESIZE`.
    pub resize_from: Option<ResizeFrom>,
    /// Re-attaches an agent held because the lineage came back with another fingerprint
    /// (`DeviceReattachHeld`), one per lineage, until the lineage is re-attached or released.
    pub reattach_held: Vec<ReattachHold>,
}

/// "re-attach held: fingerprint changed" for one of a server's lineages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReattachHold {
    pub stamp: Stamp,
    pub lineage_id: LineageId,
    /// The new enumeration that was not re-attached.
    pub device_id: DeviceId,
    /// The fingerprint the server was given, and the one the new enumeration shows.
    pub expected: Fingerprint,
    pub seen: Fingerprint,
}

/// The flavor, host and devices a server had before its pending resize; it keeps their claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResizeFrom {
    pub stamp: Stamp,
    pub flavor_id: FlavorId,
    pub host: HostName,
    pub devices: Vec<AssignedDevice>,
}

/// Why an event was set aside instead of applied. The names are stable: they are metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuarantineReason {
    /// Not a valid envelope (empty, truncated, trailing bytes, invalid field).
    Undecodable,
    /// An envelope of a schema version this build does not read.
    UnknownSchemaVersion,
    /// An event variant this build does not know (a newer writer).
    UnknownEvent,
    /// The envelope names a host other than the one in its subject (a forgery or a bug).
    HostMismatch,
    /// A valid event on a subject it does not belong on.
    WrongSubject,
    /// About a device id the view never saw discovered.
    UnknownDevice,
    /// About a server id the view never saw requested.
    UnknownServer,
    /// About a flavor id the view never saw created.
    UnknownFlavor,
    /// Contradicts the view: a claim on a lineage held by another server, a release of a claim
    /// that is not held, a name in use, a device on another lineage or host …
    Conflict,
    /// The same fact again (a device discovered twice, a server deleted twice).
    Duplicate,
    /// A lineage id that is not the one derived from its key (vendor, product, serial; or host,
    /// port, vendor, product), or a port lineage claimed from another host: a hijack attempt or
    /// a broken agent (ADR 0005).
    LineageMismatch,
    /// A serial lineage whose current enumeration is still present on another host: the
    /// lineage (and its claim) is not moved; the clash is recorded here.
    LineageClash,
}

impl QuarantineReason {
    pub const ALL: [QuarantineReason; 12] = [
        QuarantineReason::Undecodable,
        QuarantineReason::UnknownSchemaVersion,
        QuarantineReason::UnknownEvent,
        QuarantineReason::HostMismatch,
        QuarantineReason::WrongSubject,
        QuarantineReason::UnknownDevice,
        QuarantineReason::UnknownServer,
        QuarantineReason::UnknownFlavor,
        QuarantineReason::Conflict,
        QuarantineReason::Duplicate,
        QuarantineReason::LineageMismatch,
        QuarantineReason::LineageClash,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            QuarantineReason::Undecodable => "undecodable",
            QuarantineReason::UnknownSchemaVersion => "unknown_schema_version",
            QuarantineReason::UnknownEvent => "unknown_event",
            QuarantineReason::HostMismatch => "host_mismatch",
            QuarantineReason::WrongSubject => "wrong_subject",
            QuarantineReason::UnknownDevice => "unknown_device",
            QuarantineReason::UnknownServer => "unknown_server",
            QuarantineReason::UnknownFlavor => "unknown_flavor",
            QuarantineReason::Conflict => "conflict",
            QuarantineReason::Duplicate => "duplicate",
            QuarantineReason::LineageMismatch => "lineage_mismatch",
            QuarantineReason::LineageClash => "lineage_clash",
        }
    }
}

/// An event the projector set aside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineEntry {
    pub seq: u64,
    pub subject: String,
    pub reason: QuarantineReason,
    /// What exactly was wrong, naming the offending value.
    pub detail: String,
    /// The event's kind, when it could be decoded.
    pub kind: Option<String>,
}
