//! `decide(&view, &command, &ctx) -> Result<Decision, Rejection>`: pure. Given a consistent
//! snapshot of the view, a command and the ids the handler drew, it returns the events to append
//! (each with its fence) and the reply, or a rejection that names its reason. No clock, no
//! randomness, no I/O.

use usbpt_schemas::commands::{Command, FlavorResources, RejectKind};
use usbpt_schemas::{
    subjects, DeviceClaimed, DeviceReleased, DeviceSelector, Event, FingerprintAccepted,
    FingerprintPolicy, FlavorCreated, FlavorDeleted, FlavorFingerprintPolicySet, FlavorId,
    FlavorName, FlavorSized, FlavorUsbSet, HostName, LineageConflictResolved, LineageId,
    LineageKind, LineageLabeled, ReleaseReason, ServerAction, ServerActionRequested,
    ServerBootRequested, ServerDeleted, ServerId, ServerMigrated, ServerMigrationRefused,
    ServerName, ServerResizeConfirmed, ServerResizeReverted, ServerResizeVerifying, ServerResized,
    ServerScheduleFailed, ServerScheduled, ServerState, ServerUpdated,
};

use crate::schedule::{self, check_ports, Weigh};
use crate::view::{DeviceInfo, DeviceStatus, ServerInfo, ViewError, ViewRead};

/// Ids and knobs the handler supplies, so decisions stay pure.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The id a new server gets (boot).
    pub server_id: ServerId,
    /// The id a new flavor gets.
    pub flavor_id: FlavorId,
    pub weigh: Weigh,
    /// This process's lane for pack (ADR 0010): where among the first hosts with a free match
    /// its boots start packing, so handlers in several processes fill different hosts at once.
    /// 0: the first hosts, as a single handler does.
    pub lane: u64,
}

/// How an event must be appended. Derived from its subject ([`subjects::is_fenced`]) by
/// [`step`]; the handler refuses a step whose fence disagrees with its subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// Plain idempotent publish.
    None,
    /// Only if the event's subject's last stored sequence is this (0: empty). The handler uses
    /// the sequence it just wrote when a decision appends twice to one subject.
    Expect(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub event: Event,
    pub fence: Fence,
    /// What undoes this step if a later step of the same decision fails: a claim's
    /// `DeviceReleased{BootFailed}`, a boot request's `ServerDeleted`. Appended by the handler
    /// (fenced on the sequence this step got when its subject is fenced).
    pub undo: Option<Event>,
}

/// What the command's caller is told once the steps are appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Accepted(String),
    /// Recorded (the steps are history, e.g. a refused migration) but not done.
    Refused(Rejection),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub steps: Vec<Step>,
    pub reply: Reply,
}

/// A command that changes nothing, with the values that explain why. Its [`kind`] is all a
/// front end needs to choose a status (HTTP codes are chosen in `api` only).
///
/// [`kind`]: Rejection::kind
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// A malformed field.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// Something named does not exist.
    #[error("{what} {name} does not exist")]
    NotFound { what: String, name: String },
    /// A host no agent has announced.
    #[error("host {host} is unknown (no agent has announced it)")]
    UnknownHost { host: HostName },
    /// The server name is held by another server (a live one, or a boot that claimed it).
    #[error("server name {name} is in use by {by}")]
    NameInUse { name: ServerName, by: ServerId },
    #[error("flavor {name} already exists")]
    FlavorExists { name: FlavorName },
    /// The command conflicts with the server's state, or no placement fits.
    #[error("{0}")]
    Conflict(String),
    /// The view could not be read.
    #[error("{0}")]
    Unavailable(String),
}

impl Rejection {
    pub fn kind(&self) -> RejectKind {
        match self {
            Rejection::Invalid { .. } => RejectKind::Invalid,
            Rejection::NotFound { .. } | Rejection::UnknownHost { .. } => RejectKind::NotFound,
            Rejection::NameInUse { .. }
            | Rejection::FlavorExists { .. }
            | Rejection::Conflict(_) => RejectKind::Conflict,
            Rejection::Unavailable(_) => RejectKind::Unavailable,
        }
    }

    fn not_found(what: impl Into<String>, name: impl ToString) -> Self {
        Rejection::NotFound {
            what: what.into(),
            name: name.to_string(),
        }
    }

    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Rejection::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<ViewError> for Rejection {
    fn from(e: ViewError) -> Self {
        Rejection::Unavailable(e.to_string())
    }
}

/// The step that appends `event`: fenced, at the sequence the view last saw on its subject,
/// exactly when its subject is fenced ([`subjects::is_fenced`]); with what undoes it.
pub fn step(view: &dyn ViewRead, event: Event) -> Result<Step, Rejection> {
    let subject = subjects::for_body(&event);
    let fence = if subjects::is_fenced(&subject) {
        Fence::Expect(view.subject_seq(&subject)?)
    } else {
        Fence::None
    };
    let undo = match &event {
        Event::DeviceClaimed(c) => Some(Event::DeviceReleased(DeviceReleased {
            device_id: c.device_id,
            lineage_id: c.lineage_id,
            host: c.host.clone(),
            server_id: c.server_id,
            reason: ReleaseReason::BootFailed,
        })),
        Event::ServerBootRequested(b) => Some(Event::ServerDeleted(ServerDeleted {
            server_id: b.server_id,
            host: None,
        })),
        _ => None,
    };
    Ok(Step { event, fence, undo })
}

pub fn decide(view: &dyn ViewRead, cmd: &Command, ctx: &Ctx) -> Result<Decision, Rejection> {
    match cmd {
        Command::CreateFlavor {
            name,
            usb,
            resources,
            on_fingerprint_change,
        } => create_flavor(view, name, usb, *resources, *on_fingerprint_change, ctx),
        Command::DeleteFlavor { name } => {
            let f = view
                .flavor_by_name(name)?
                .ok_or_else(|| Rejection::not_found("flavor", name))?;
            Ok(Decision {
                steps: vec![step(
                    view,
                    Event::FlavorDeleted(FlavorDeleted {
                        flavor_id: f.flavor_id,
                        name: f.name,
                    }),
                )?],
                reply: Reply::Accepted(format!("flavor {name} deleted")),
            })
        }
        Command::Boot { name, flavor, host } => boot(view, name, flavor, host.as_ref(), ctx),
        Command::Resize { name, flavor } => resize(view, name, flavor, ctx),
        Command::ConfirmResize { name } => confirm_resize(view, name),
        Command::RevertResize { name } => revert_resize(view, name),
        Command::Migrate { name, live, host } => migrate(view, name, *live, host.as_ref()),
        Command::Act { name, action } => act(view, name, *action),
        Command::Delete { name } => delete(view, name),
        Command::SetFlavorUsb { name, usb } => set_flavor_usb(view, name, usb),
        Command::SetFlavorPolicy {
            name,
            on_fingerprint_change,
        } => set_flavor_policy(view, name, *on_fingerprint_change),
        Command::UpdateServer {
            name,
            new_name,
            description,
        } => update_server(view, name, new_name.as_ref(), description.as_ref()),
        Command::LabelLineage { lineage, label } => label_lineage(view, *lineage, label.as_ref()),
        Command::ResolveConflict { lineage, keep } => resolve_conflict(view, *lineage, keep),
        Command::AcceptFingerprint { lineage } => accept_fingerprint(view, *lineage),
    }
}

/// The lineage's current enumeration, or 404 naming `lineage` (with a hint when the id is an
/// enumeration's).
fn known_lineage(view: &dyn ViewRead, lineage: LineageId) -> Result<DeviceInfo, Rejection> {
    if let Some(d) = view.current_enumeration(&lineage)? {
        return Ok(d);
    }
    let hint = match view.device(&usbpt_schemas::DeviceId(lineage.0))? {
        Some(d) => format!(
            " ({lineage} is a device (enumeration) id; its lineage is {})",
            d.lineage_id
        ),
        None => String::new(),
    };
    Err(Rejection::not_found("lineage", format!("{lineage}{hint}")))
}

/// Ends a `lineage_conflict` by keeping the enumeration on `keep`: 404 for an unknown lineage,
/// 409 when it has no active conflict, `keep` invalid when it is neither of the alarm's hosts.
/// Fenced on the lineage's claim subject, so a claim appended since the view was read makes
/// the handler retry against the newer view.
fn resolve_conflict(
    view: &dyn ViewRead,
    lineage: LineageId,
    keep: &HostName,
) -> Result<Decision, Rejection> {
    known_lineage(view, lineage)?;
    let Some(c) = view.lineage_alarms(&lineage)?.conflict else {
        return Err(Rejection::Conflict(format!(
            "lineage {lineage} has no active lineage_conflict alarm to resolve"
        )));
    };
    let ((kept_host, kept), (_, dropped)) = if *keep == c.current.0 {
        (c.current, c.held_back)
    } else if *keep == c.held_back.0 {
        (c.held_back, c.current)
    } else {
        return Err(Rejection::invalid(
            "keep",
            format!(
                "host {keep} is neither side of lineage {lineage}'s conflict (hosts {} and {})",
                c.current.0, c.held_back.0
            ),
        ));
    };
    Ok(Decision {
        steps: vec![step(
            view,
            Event::LineageConflictResolved(LineageConflictResolved {
                lineage_id: lineage,
                keep_host: kept_host.clone(),
                kept_device: kept,
                dropped_device: dropped,
            }),
        )?],
        reply: Reply::Accepted(format!(
            "lineage {lineage}: kept device {kept} on host {kept_host}; device {dropped} is set \
             aside until it ends"
        )),
    })
}

/// Accepts the fingerprint a serial lineage now reports: 404 for an unknown lineage, 409 when
/// it has no active `fingerprint_changed` alarm. The event names the current enumeration (when
/// present) and the server holding the lineage (if any), whose agent re-attaches it.
fn accept_fingerprint(view: &dyn ViewRead, lineage: LineageId) -> Result<Decision, Rejection> {
    let current = known_lineage(view, lineage)?;
    let alarms = view.lineage_alarms(&lineage)?;
    let Some(alarm) = alarms.fingerprint else {
        return Err(Rejection::Conflict(format!(
            "lineage {lineage} has no active fingerprint_changed alarm to accept"
        )));
    };
    let fingerprint = alarms.current_fingerprint.unwrap_or(alarm.seen);
    let present = (current.status != DeviceStatus::Invalidated).then_some(current);
    let server_id = view.claim(&lineage)?.map(|c| c.server_id);
    Ok(Decision {
        steps: vec![step(
            view,
            Event::FingerprintAccepted(FingerprintAccepted {
                lineage_id: lineage,
                fingerprint,
                device_id: present.as_ref().map(|d| d.device_id),
                host: present.map(|d| d.host),
                server_id,
                by_policy: false,
            }),
        )?],
        reply: Reply::Accepted(format!(
            "lineage {lineage}: fingerprint {fingerprint} accepted (was {})",
            alarm.expected
        )),
    })
}

/// Names a lineage (or removes its name): 400 naming `label` when invalid, 404 for a lineage
/// the view never saw. Always recorded, even when unchanged (the operator's act is history).
fn label_lineage(
    view: &dyn ViewRead,
    lineage: LineageId,
    label: Option<&String>,
) -> Result<Decision, Rejection> {
    if let Some(l) = label {
        usbpt_schemas::label::check(l).map_err(|e| {
            let reason = e.to_string();
            Rejection::invalid("label", reason.trim_start_matches("label: "))
        })?;
    }
    known_lineage(view, lineage)?;
    let reply = match label {
        Some(l) => format!("lineage {lineage} labelled {l:?}"),
        None => format!("lineage {lineage} label removed"),
    };
    Ok(Decision {
        steps: vec![step(
            view,
            Event::LineageLabeled(LineageLabeled {
                lineage_id: lineage,
                label: label.cloned(),
            }),
        )?],
        reply: Reply::Accepted(reply),
    })
}

fn set_flavor_usb(
    view: &dyn ViewRead,
    name: &FlavorName,
    usb: &[usbpt_schemas::UsbRequest],
) -> Result<Decision, Rejection> {
    let f = view
        .flavor_by_name(name)?
        .ok_or_else(|| Rejection::not_found("flavor", name))?;
    check_usb(view, usb)?;
    Ok(Decision {
        steps: vec![step(
            view,
            Event::FlavorUsbSet(FlavorUsbSet {
                flavor_id: f.flavor_id,
                name: name.clone(),
                usb: usb.to_vec(),
            }),
        )?],
        reply: Reply::Accepted(format!(
            "flavor {name} now asks for {} USB request(s)",
            usb.len()
        )),
    })
}

/// A flavor's `on_fingerprint_change`: recorded (`FlavorFingerprintPolicySet`) only when it
/// differs from the current one, so the history holds changes, not repeats.
fn set_flavor_policy(
    view: &dyn ViewRead,
    name: &FlavorName,
    policy: FingerprintPolicy,
) -> Result<Decision, Rejection> {
    let f = view
        .flavor_by_name(name)?
        .ok_or_else(|| Rejection::not_found("flavor", name))?;
    if f.on_fingerprint_change == policy {
        return Ok(Decision {
            steps: Vec::new(),
            reply: Reply::Accepted(format!(
                "flavor {name} already has on_fingerprint_change={}",
                policy.as_str()
            )),
        });
    }
    Ok(Decision {
        steps: vec![step(
            view,
            Event::FlavorFingerprintPolicySet(FlavorFingerprintPolicySet {
                flavor_id: f.flavor_id,
                name: name.clone(),
                on_fingerprint_change: policy,
            }),
        )?],
        reply: Reply::Accepted(format!(
            "flavor {name} now has on_fingerprint_change={}",
            policy.as_str()
        )),
    })
}

fn create_flavor(
    view: &dyn ViewRead,
    name: &FlavorName,
    usb: &[usbpt_schemas::UsbRequest],
    resources: FlavorResources,
    policy: Option<FingerprintPolicy>,
    ctx: &Ctx,
) -> Result<Decision, Rejection> {
    if view.flavor_by_name(name)?.is_some() {
        return Err(Rejection::FlavorExists { name: name.clone() });
    }
    check_usb(view, usb)?;
    let mut steps = vec![step(
        view,
        Event::FlavorCreated(FlavorCreated {
            flavor_id: ctx.flavor_id,
            name: name.clone(),
            usb: usb.to_vec(),
        }),
    )?];
    if !resources.is_zero() {
        // The same subject: the handler fences it on the sequence the first step got.
        steps.push(step(
            view,
            Event::FlavorSized(FlavorSized {
                flavor_id: ctx.flavor_id,
                name: name.clone(),
                ram_mb: resources.ram_mb,
                vcpus: resources.vcpus,
                disk_gb: resources.disk_gb,
            }),
        )?);
    }
    if let Some(policy) = policy.filter(|p| *p != FingerprintPolicy::default()) {
        steps.push(step(
            view,
            Event::FlavorFingerprintPolicySet(FlavorFingerprintPolicySet {
                flavor_id: ctx.flavor_id,
                name: name.clone(),
                on_fingerprint_change: policy,
            }),
        )?);
    }
    Ok(Decision {
        steps,
        reply: Reply::Accepted(format!("flavor {name} created ({})", ctx.flavor_id)),
    })
}

/// Nova's limit on a server's description.
pub const DESCRIPTION_MAX: usize = 255;

fn update_server(
    view: &dyn ViewRead,
    name: &ServerName,
    new_name: Option<&ServerName>,
    description: Option<&Option<String>>,
) -> Result<Decision, Rejection> {
    let s = live_server(view, name)?;
    if let Some(Some(d)) = description {
        if d.chars().count() > DESCRIPTION_MAX {
            return Err(Rejection::invalid(
                "description",
                format!("longer than {DESCRIPTION_MAX} characters"),
            ));
        }
        if d.chars().any(char::is_control) {
            return Err(Rejection::invalid(
                "description",
                "control characters are not allowed",
            ));
        }
    }
    let to = new_name.unwrap_or(name);
    if to != name {
        if let Some(other) = view.server_by_name(to)? {
            return Err(Rejection::NameInUse {
                name: to.clone(),
                by: other.server_id,
            });
        }
    }
    let description = description.cloned().unwrap_or(s.description.clone());
    if to == name && description == s.description {
        return Ok(Decision {
            steps: Vec::new(),
            reply: Reply::Accepted(format!("server {name} unchanged")),
        });
    }
    Ok(Decision {
        steps: vec![step(
            view,
            Event::ServerUpdated(ServerUpdated {
                server_id: s.server_id,
                name: to.clone(),
                description,
            }),
        )?],
        reply: Reply::Accepted(if to == name {
            format!("server {name} updated")
        } else {
            format!("server {name} renamed to {to}")
        }),
    })
}

/// A flavor's USB requests are valid: enough controller ports, known devices and lineages,
/// counts of at least 1.
fn check_usb(view: &dyn ViewRead, usb: &[usbpt_schemas::UsbRequest]) -> Result<(), Rejection> {
    if let Err((model, ports, need)) = check_ports(usb) {
        return Err(Rejection::invalid(
            "usb",
            format!(
                "controller {} has {ports} ports and the flavor needs {need}",
                model.as_str()
            ),
        ));
    }
    for (i, r) in usb.iter().enumerate() {
        // The same rules as the CLI's and the HTTP API's (a NATS client sends requests whole).
        if let Err(e) = r.check() {
            return Err(Rejection::invalid(format!("usb[{i}]"), e.to_string()));
        }
        match &r.selector {
            DeviceSelector::Enumeration(d) if view.device(d)?.is_none() => {
                return Err(Rejection::not_found(format!("usb[{i}]: device"), d))
            }
            DeviceSelector::Lineage(l) if view.current_enumeration(l)?.is_none() => {
                return Err(Rejection::not_found(format!("usb[{i}]: lineage"), l))
            }
            _ => {}
        }
    }
    Ok(())
}

fn live_server(view: &dyn ViewRead, name: &ServerName) -> Result<ServerInfo, Rejection> {
    view.server_by_name(name)?
        .ok_or_else(|| Rejection::not_found("server", name))
}

fn scheduled_host(s: &ServerInfo) -> Result<HostName, Rejection> {
    s.host.clone().ok_or_else(|| {
        Rejection::Conflict(format!(
            "server {} is not scheduled on any host (state {:?})",
            s.name, s.state
        ))
    })
}

fn claim_step(
    view: &dyn ViewRead,
    server: ServerId,
    host: &HostName,
    d: &usbpt_schemas::AssignedDevice,
) -> Result<Step, Rejection> {
    step(
        view,
        Event::DeviceClaimed(DeviceClaimed {
            device_id: d.device_id,
            lineage_id: d.lineage_id,
            host: host.clone(),
            server_id: server,
            request_index: d.request_index,
            controller: d.controller,
            follow: d.follow,
        }),
    )
}

fn boot(
    view: &dyn ViewRead,
    name: &ServerName,
    flavor: &FlavorName,
    host: Option<&HostName>,
    ctx: &Ctx,
) -> Result<Decision, Rejection> {
    let f = view
        .flavor_by_name(flavor)?
        .ok_or_else(|| Rejection::not_found("flavor", flavor))?;
    let mut steps = Vec::new();
    match view.server_by_name(name)? {
        // A retry of our own boot after a lost race: the request is already recorded.
        Some(s) if s.server_id == ctx.server_id => {}
        Some(s) => {
            return Err(Rejection::NameInUse {
                name: name.clone(),
                by: s.server_id,
            })
        }
        None => steps.push(step(
            view,
            Event::ServerBootRequested(ServerBootRequested {
                server_id: ctx.server_id,
                name: name.clone(),
                flavor_id: f.flavor_id,
                requested_host: host.cloned(),
            }),
        )?),
    }
    if let Some(h) = host {
        if !view.host_known(h)? {
            return Err(Rejection::UnknownHost { host: h.clone() });
        }
    }
    let req = schedule::Request {
        usb: &f.usb,
        host,
        server: Some(ctx.server_id),
        weigh: ctx.weigh,
        lane: ctx.lane,
    };
    match schedule::schedule(&req, &[], view)? {
        Ok(p) => {
            for d in &p.devices {
                steps.push(claim_step(view, ctx.server_id, &p.host, d)?);
            }
            let n = p.devices.len();
            let host = p.host.clone();
            steps.push(step(
                view,
                Event::ServerScheduled(ServerScheduled {
                    server_id: ctx.server_id,
                    host: p.host,
                    flavor_id: f.flavor_id,
                    devices: p.devices,
                }),
            )?);
            Ok(Decision {
                steps,
                reply: Reply::Accepted(format!(
                    "server {name} ({}) scheduled on {host} with {n} USB device(s)",
                    ctx.server_id
                )),
            })
        }
        Err(no) => {
            let mut reason = no.reason.clone();
            for r in &no.host_rejections {
                reason.push_str(&format!("; {}: {}", r.host, r.reason));
            }
            steps.push(step(
                view,
                Event::ServerScheduleFailed(ServerScheduleFailed {
                    server_id: ctx.server_id,
                    reason: no.reason,
                    host_rejections: no.host_rejections,
                }),
            )?);
            Ok(Decision {
                steps,
                reply: Reply::Refused(Rejection::Conflict(reason)),
            })
        }
    }
}

/// The devices a server holds now, as the view sees them.
/// With a resize awaiting confirmation, that includes the old flavor's devices.
fn held_devices(view: &dyn ViewRead, s: &ServerInfo) -> Result<Vec<DeviceInfo>, Rejection> {
    let old = s.resize_from.iter().flat_map(|r| &r.devices);
    held_of(view, s, s.devices.iter().chain(old))
}

/// The devices of `assigned` whose lineage `s` still holds, each lineage once.
fn held_of<'a>(
    view: &dyn ViewRead,
    s: &ServerInfo,
    assigned: impl Iterator<Item = &'a usbpt_schemas::AssignedDevice>,
) -> Result<Vec<DeviceInfo>, Rejection> {
    let mut out: Vec<DeviceInfo> = Vec::new();
    for a in assigned {
        if out.iter().any(|d| d.lineage_id == a.lineage_id) {
            continue;
        }
        if let Some(c) = view.claim(&a.lineage_id)? {
            if c.server_id == s.server_id {
                if let Some(d) = view.device(&c.device_id)? {
                    out.push(d);
                }
            }
        }
    }
    Ok(out)
}

fn no_pending_resize(s: &ServerInfo) -> Result<(), Rejection> {
    if s.resize_from.is_some() {
        return Err(Rejection::Conflict(format!(
                "server {} has a resize awaiting confirmation (VERIFY_RESIZE): confirm or revert it first",
                s.name
            ),
        ));
    }
    Ok(())
}

fn pending_resize(s: &ServerInfo) -> Result<crate::view::ResizeFrom, Rejection> {
    s.resize_from.clone().ok_or_else(|| {
        Rejection::Conflict(format!(
            "server {} has no resize awaiting confirmation",
            s.name
        ))
    })
}

/// Confirm: the old flavor's devices that the new one does not use are released.
fn confirm_resize(view: &dyn ViewRead, name: &ServerName) -> Result<Decision, Rejection> {
    let s = live_server(view, name)?;
    let from = pending_resize(&s)?;
    let mut steps = Vec::new();
    let gone = from
        .devices
        .iter()
        .filter(|a| !s.devices.iter().any(|n| n.lineage_id == a.lineage_id));
    let released = held_of(view, &s, gone)?;
    for d in &released {
        steps.push(release_step(view, &s, d, ReleaseReason::Resized)?);
    }
    steps.push(step(
        view,
        Event::ServerResizeConfirmed(ServerResizeConfirmed {
            server_id: s.server_id,
        }),
    )?);
    Ok(Decision {
        steps,
        reply: Reply::Accepted(format!(
            "resize of {name} confirmed; {} USB device(s) of its old flavor released",
            released.len()
        )),
    })
}

/// Revert: back to the old flavor, host and devices (still claimed: nothing can have taken
/// them), the new flavor's devices that the old one does not use released.
fn revert_resize(view: &dyn ViewRead, name: &ServerName) -> Result<Decision, Rejection> {
    let s = live_server(view, name)?;
    let from = pending_resize(&s)?;
    let host = scheduled_host(&s)?;
    // Each old device as the claim has it now (a held lineage may have re-enumerated). A claim
    // that ended meanwhile (its device went away past the grace window, or a strict binding's
    // device was invalidated) cannot be given back without a new placement: refuse.
    let mut devices = Vec::new();
    for a in &from.devices {
        let Some(claim) = view
            .claim(&a.lineage_id)?
            .filter(|c| c.server_id == s.server_id)
        else {
            return Err(Rejection::Conflict(format!(
                    "cannot revert the resize of {name}: its old device {} (lineage {}) is no longer reserved for it; confirm the resize, or resize to a flavor that fits",
                    a.device_id, a.lineage_id
                ),
            ));
        };
        devices.push(usbpt_schemas::AssignedDevice {
            device_id: claim.device_id,
            ..a.clone()
        });
    }
    let mut steps = vec![step(
        view,
        Event::ServerResized(ServerResized {
            server_id: s.server_id,
            from_flavor: s.flavor_id,
            to_flavor: from.flavor_id,
            from_host: host.clone(),
            host: from.host.clone(),
            devices: devices.clone(),
        }),
    )?];
    let gone = s
        .devices
        .iter()
        .filter(|n| !from.devices.iter().any(|a| a.lineage_id == n.lineage_id));
    let released = held_of(view, &s, gone)?;
    for d in &released {
        steps.push(release_step(view, &s, d, ReleaseReason::Resized)?);
    }
    steps.push(step(
        view,
        Event::ServerResizeReverted(ServerResizeReverted {
            server_id: s.server_id,
        }),
    )?);
    if from.host != host {
        steps.push(step(
            view,
            Event::ServerActionRequested(ServerActionRequested {
                server_id: s.server_id,
                host,
                action: ServerAction::Teardown,
            }),
        )?);
    }
    Ok(Decision {
        steps,
        reply: Reply::Accepted(format!(
            "resize of {name} reverted: back on {} with {} USB device(s); {} released",
            from.host,
            devices.len(),
            released.len()
        )),
    })
}

fn release_step(
    view: &dyn ViewRead,
    s: &ServerInfo,
    d: &DeviceInfo,
    reason: ReleaseReason,
) -> Result<Step, Rejection> {
    step(
        view,
        Event::DeviceReleased(DeviceReleased {
            device_id: d.device_id,
            lineage_id: d.lineage_id,
            host: d.host.clone(),
            server_id: s.server_id,
            reason,
        }),
    )
}

fn resize(
    view: &dyn ViewRead,
    name: &ServerName,
    flavor: &FlavorName,
    ctx: &Ctx,
) -> Result<Decision, Rejection> {
    let s = live_server(view, name)?;
    let from_host = scheduled_host(&s)?;
    no_pending_resize(&s)?;
    let f = view
        .flavor_by_name(flavor)?
        .ok_or_else(|| Rejection::not_found("flavor", flavor))?;
    if f.flavor_id == s.flavor_id {
        return Err(Rejection::Conflict(format!(
            "server {name} already has flavor {flavor}"
        )));
    }
    let held = held_devices(view, &s)?;
    let req = schedule::Request {
        usb: &f.usb,
        host: None,
        server: Some(s.server_id),
        weigh: ctx.weigh,
        lane: ctx.lane,
    };
    let p = match schedule::schedule(&req, &held, view)? {
        Ok(p) => p,
        Err(no) => {
            let mut reason = format!("cannot resize {name} to {flavor}: {}", no.reason);
            for r in &no.host_rejections {
                reason.push_str(&format!("; {}: {}", r.host, r.reason));
            }
            return Err(Rejection::Conflict(reason));
        }
    };
    let mut steps = Vec::new();
    for d in &p.devices {
        let already = held
            .iter()
            .any(|h| h.lineage_id == d.lineage_id && h.device_id == d.device_id);
        if !already {
            steps.push(claim_step(view, s.server_id, &p.host, d)?);
        }
    }
    steps.push(step(
        view,
        Event::ServerResized(ServerResized {
            server_id: s.server_id,
            from_flavor: s.flavor_id,
            to_flavor: f.flavor_id,
            from_host: from_host.clone(),
            host: p.host.clone(),
            devices: p.devices.clone(),
        }),
    )?);
    // Nova's VERIFY_RESIZE: the old devices stay claimed until a confirm releases them or a
    // revert gives them back, so nothing can take them meanwhile.
    steps.push(step(
        view,
        Event::ServerResizeVerifying(ServerResizeVerifying {
            server_id: s.server_id,
            from_flavor: s.flavor_id,
            from_host: from_host.clone(),
            devices: s.devices.clone(),
        }),
    )?);
    if p.host != from_host {
        steps.push(step(
            view,
            Event::ServerActionRequested(ServerActionRequested {
                server_id: s.server_id,
                host: from_host,
                action: ServerAction::Teardown,
            }),
        )?);
    }
    Ok(Decision {
        steps,
        reply: Reply::Accepted(format!(
            "server {name} resized to {flavor} on {} with {} USB device(s); confirm or revert it (its old devices stay reserved until then)",
            p.host,
            p.devices.len()
        )),
    })
}

fn migrate(
    view: &dyn ViewRead,
    name: &ServerName,
    live: bool,
    target: Option<&HostName>,
) -> Result<Decision, Rejection> {
    let s = live_server(view, name)?;
    let from_host = scheduled_host(&s)?;
    no_pending_resize(&s)?;
    let held = held_devices(view, &s)?;
    let refuse = |reason: String| -> Result<Decision, Rejection> {
        Ok(Decision {
            steps: vec![step(
                view,
                Event::ServerMigrationRefused(ServerMigrationRefused {
                    server_id: s.server_id,
                    live,
                    reason: reason.clone(),
                }),
            )?],
            reply: Reply::Refused(Rejection::Conflict(reason)),
        })
    };
    if live && !held.is_empty() {
        return refuse(format!(
            "live migration of {name} is impossible: it holds {} host USB device(s) on {from_host} that cannot be in two hosts at once; stop it and cold-migrate after moving a serial-identified device, or resize to a flavor without them",
            held.len()
        ));
    }
    // Cold (or live without devices): every held device must be a serial lineage whose current
    // enumeration is present on one other host.
    let mut dest: Option<HostName> = None;
    let mut devices = Vec::new();
    let mut steps = Vec::new();
    for a in &s.devices {
        let Some(cur) = view.current_enumeration(&a.lineage_id)? else {
            continue;
        };
        if cur.lineage_kind != LineageKind::Serial {
            return refuse(format!(
                "device {} is identified by its port on {}: it cannot follow {name} to another host",
                cur.device_id, cur.host
            ));
        }
        if cur.status == DeviceStatus::Invalidated || cur.host == from_host {
            return refuse(format!(
                "device {} (serial lineage {}) is still on {from_host}: move it to the destination host first",
                cur.device_id, cur.lineage_id
            ));
        }
        if dest.as_ref().is_some_and(|d| d != &cur.host) {
            return refuse(format!("{name}'s devices are now on different hosts"));
        }
        dest = Some(cur.host.clone());
        let moved = usbpt_schemas::AssignedDevice {
            device_id: cur.device_id,
            ..a.clone()
        };
        steps.push(claim_step(view, s.server_id, &cur.host, &moved)?);
        devices.push(moved);
    }
    let host = match (dest, target) {
        (Some(d), Some(t)) if &d != t => {
            return refuse(format!("{name}'s devices are on {d}, not on {t}"))
        }
        (Some(d), _) => d,
        (None, Some(t)) if t != &from_host => {
            if !view.host_known(t)? {
                return Err(Rejection::UnknownHost { host: t.clone() });
            }
            t.clone()
        }
        _ => {
            return refuse(format!(
                "no destination for {name}: give --host (it holds no USB device that moved)"
            ))
        }
    };
    steps.push(step(
        view,
        Event::ServerMigrated(ServerMigrated {
            server_id: s.server_id,
            from_host: from_host.clone(),
            host: host.clone(),
            devices,
        }),
    )?);
    steps.push(step(
        view,
        Event::ServerActionRequested(ServerActionRequested {
            server_id: s.server_id,
            host: from_host.clone(),
            action: ServerAction::Teardown,
        }),
    )?);
    Ok(Decision {
        steps,
        reply: Reply::Accepted(format!("server {name} migrated from {from_host} to {host}")),
    })
}

/// Which states an action may start from.
fn allowed(action: ServerAction, state: ServerState) -> bool {
    use ServerAction as A;
    use ServerState as S;
    match action {
        A::Stop => matches!(
            state,
            S::Active | S::Paused | S::Suspended | S::Rebooting | S::Error
        ),
        A::Start => matches!(state, S::Shutoff),
        A::Reboot => matches!(state, S::Active),
        A::Pause | A::Suspend => matches!(state, S::Active),
        A::Unpause => matches!(state, S::Paused),
        A::Resume => matches!(state, S::Suspended),
        A::Rebuild => matches!(state, S::Active | S::Shutoff | S::Error),
        A::Teardown => false,
    }
}

fn act(
    view: &dyn ViewRead,
    name: &ServerName,
    action: ServerAction,
) -> Result<Decision, Rejection> {
    if action == ServerAction::Teardown {
        return Err(Rejection::invalid(
            "action",
            "teardown is internal; use delete, resize or migrate",
        ));
    }
    let s = live_server(view, name)?;
    let host = scheduled_host(&s)?;
    if !allowed(action, s.state) {
        return Err(Rejection::Conflict(format!(
            "cannot {} server {name} while it is {:?}",
            action.as_str(),
            s.state
        )));
    }
    Ok(Decision {
        steps: vec![step(
            view,
            Event::ServerActionRequested(ServerActionRequested {
                server_id: s.server_id,
                host: host.clone(),
                action,
            }),
        )?],
        reply: Reply::Accepted(format!(
            "{} requested for {name} on {host}; its USB claims are kept",
            action.as_str()
        )),
    })
}

fn delete(view: &dyn ViewRead, name: &ServerName) -> Result<Decision, Rejection> {
    let s = live_server(view, name)?;
    let held = held_devices(view, &s)?;
    let mut steps = vec![step(
        view,
        Event::ServerDeleted(ServerDeleted {
            server_id: s.server_id,
            host: s.host.clone(),
        }),
    )?];
    for d in &held {
        steps.push(release_step(view, &s, d, ReleaseReason::ServerDeleted)?);
    }
    Ok(Decision {
        steps,
        reply: Reply::Accepted(format!(
            "server {name} deleted; {} USB device(s) released",
            held.len()
        )),
    })
}
