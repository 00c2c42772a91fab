//! The fold's semantics: how one event changes the view, on any [`State`]. This module checks
//! the subject, dispatches each event to its function (in `devices`, `servers`, `flavors`),
//! keeps the host records and sets refused events aside. Pure: no clock, no randomness, no I/O beyond the reads the state answers, so
//! replaying the stream rebuilds the same bytes.
//!
//! Bad input never stops the fold: an event that cannot be decoded, arrives on the wrong subject
//! or contradicts the view is recorded in the quarantine with a counted reason and changes
//! nothing else. Every handler checks everything first and writes after, so a rejected event
//! leaves no partial change behind.

use usbpt_schemas::subjects::{self, SubjectScope};
use usbpt_schemas::*;

use super::state::State;
use super::Outcome;
use super::{alarms, devices, flavors, servers};
use crate::error::ViewError;
use crate::model::*;

/// Why a handler refused an event (internal: becomes a quarantine entry), or a storage failure.
pub(super) enum Fail {
    Reject(QuarantineReason, String),
    View(ViewError),
}

impl<E: Into<ViewError>> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail::View(e.into())
    }
}

pub(super) type R<T = ()> = Result<T, Fail>;

pub(super) fn reject<T>(reason: QuarantineReason, detail: impl Into<String>) -> R<T> {
    Err(Fail::Reject(reason, detail.into()))
}

/// Decodes `payload` and folds it (see [`apply`]); undecodable bytes are quarantined.
pub(crate) fn apply_bytes<S: State>(
    v: &mut S,
    seq: u64,
    subject: &str,
    payload: &[u8],
) -> Result<Outcome, ViewError> {
    if seq <= v.last_applied() {
        return Ok(Outcome::Skipped);
    }
    match codec::decode(payload) {
        Ok(env) => apply(v, seq, subject, &env),
        Err(e) => {
            let reason = match e {
                DecodeError::UnknownSchemaVersion { .. } => QuarantineReason::UnknownSchemaVersion,
                DecodeError::UnknownVariant => QuarantineReason::UnknownEvent,
                _ => QuarantineReason::Undecodable,
            };
            begin_event(v, seq, subject);
            set_aside(v, seq, subject, reason, e.to_string(), None)?;
            Ok(Outcome::Quarantined(reason))
        }
    }
}

/// Folds one decoded event stored at `seq` on `subject`.
///
/// Checks the subject first (the envelope must be exactly where [`subjects::for_event`] would
/// publish it, and its host must be its subject's host), then applies the event. A refused event
/// is quarantined. Only storage failures are errors.
pub(crate) fn apply<S: State>(
    v: &mut S,
    seq: u64,
    subject: &str,
    env: &Envelope,
) -> Result<Outcome, ViewError> {
    if seq <= v.last_applied() {
        return Ok(Outcome::Skipped);
    }
    begin_event(v, seq, subject);
    let kind = env.body.kind();
    let st = Stamp {
        seq,
        at: env.occurred_at,
    };
    let result = match check_subject(subject, env) {
        Err(fail) => Err(fail),
        Ok(()) => handle(v, st, env.origin.as_ref(), &env.body),
    };
    match result {
        Ok(()) => {
            if let Some(host) = env.body.agent_host() {
                touch_host(v, host, st, &env.body)?;
            }
            v.count("applied", kind);
            Ok(Outcome::Applied(kind))
        }
        Err(Fail::Reject(reason, detail)) => {
            set_aside(v, seq, subject, reason, detail, Some(kind))?;
            Ok(Outcome::Quarantined(reason))
        }
        Err(Fail::View(e)) => Err(e),
    }
}

/// Bookkeeping every stored message gets, whatever its payload: the last sequence per
/// control-plane subject (what fenced publishes expect) and the last applied sequence.
fn begin_event<S: State>(v: &mut S, seq: u64, subject: &str) {
    // The subjects writers fence on (claims, flavors) are tracked even when the payload is
    // quarantined, so a fenced writer's expected sequence is never stale.
    if subjects::is_fenced(subject) {
        v.set_subject_seq(subject, seq);
    }
    v.begin_event(seq);
}

/// Sets an event aside with a counted reason.
fn set_aside<S: State>(
    v: &mut S,
    seq: u64,
    subject: &str,
    reason: QuarantineReason,
    detail: String,
    kind: Option<&str>,
) -> Result<(), ViewError> {
    v.quarantine(QuarantineEntry {
        seq,
        subject: subject.to_owned(),
        reason,
        detail,
        kind: kind.map(str::to_owned),
    })?;
    v.count("quarantined", reason.as_str());
    Ok(())
}

/// The host a subject is scoped to, if any.
fn subject_host(subject: &str) -> Option<HostName> {
    match subjects::scope_of(subject) {
        Ok(SubjectScope::Agent(h) | SubjectScope::ControlForHost(h)) => Some(h),
        _ => None,
    }
}

fn check_subject(subject: &str, env: &Envelope) -> R {
    if subjects::matches(env, subject) {
        return Ok(());
    }
    let expected = subjects::for_event(env);
    let body_host = env.body.agent_host();
    if env.host.as_ref() != body_host {
        let show = |h: Option<&HostName>| h.map_or("none".to_owned(), |h| h.to_string());
        return reject(
            QuarantineReason::HostMismatch,
            format!(
                "envelope host {} but the {} event is about host {}",
                show(env.host.as_ref()),
                env.body.kind(),
                show(body_host)
            ),
        );
    }
    match (subject_host(subject), subject_host(&expected)) {
        (Some(on), Some(about)) if on != about => reject(
            QuarantineReason::HostMismatch,
            format!(
                "{} event about host {about} published on host {on}'s subject {subject}",
                env.body.kind()
            ),
        ),
        _ => reject(
            QuarantineReason::WrongSubject,
            format!(
                "{} event on {subject}; it belongs on {expected}",
                env.body.kind()
            ),
        ),
    }
}

/// `origin` is who asked for the command that appended the event (ADR 0014): kept where a
/// hold begins (a claim) and ends (a release), for the custody ledger.
fn handle<S: State>(v: &mut S, st: Stamp, origin: Option<&Origin>, body: &Event) -> R {
    match body {
        // The host record is all it changes (see `touch_host`).
        Event::HostAgentStarted(_) | Event::DeviceClashDetected(_) => Ok(()),
        Event::PortFlapping(e) => alarms::flapping(v, st, e),
        Event::PortFlappingCleared(e) => alarms::flapping_cleared(v, st, e),
        Event::DeviceReattachHeld(e) => servers::reattach_held(v, st, e),
        Event::FlavorFingerprintPolicySet(e) => flavors::fingerprint_policy_set(v, e),
        Event::DeviceDiscovered(e) => devices::discovered(v, st, e, None),
        Event::DeviceDiscoveredV2(e) => {
            devices::discovered(v, st, &e.discovery, Some(e.fingerprint))
        }
        Event::DeviceInvalidated(e) => devices::invalidated(v, st, e),
        Event::FlavorCreated(e) => flavors::flavor_created(v, st, e),
        Event::FlavorDeleted(e) => flavors::flavor_deleted(v, st, e),
        Event::FlavorUsbSet(e) => flavors::flavor_usb_set(v, e),
        Event::FlavorSized(e) => flavors::flavor_sized(v, e),
        Event::LineageLabeled(e) => devices::labeled(v, st, e),
        Event::LineageConflictResolved(e) => alarms::conflict_resolved(v, st, e),
        Event::FingerprintAccepted(e) => alarms::fingerprint_accepted(v, st, e),
        Event::ServerUpdated(e) => servers::server_updated(v, st, e),
        Event::ServerResizeVerifying(e) => servers::resize_verifying(v, st, e),
        Event::ServerResizeConfirmed(e) => servers::resize_ended(v, st, e.server_id, false),
        Event::ServerResizeReverted(e) => servers::resize_ended(v, st, e.server_id, true),
        Event::ServerBootRequested(e) => servers::boot_requested(v, st, e),
        Event::ServerScheduled(e) => servers::scheduled(v, st, e),
        Event::ServerScheduleFailed(e) => servers::schedule_failed(v, st, e),
        Event::DeviceClaimed(e) => devices::claimed(v, st, origin, e),
        Event::DeviceAttached(e) => devices::attached(v, st, e),
        Event::DeviceReattached(e) => {
            devices::reattached(v, st, e)?;
            servers::end_reattach_hold(v, st, e.server_id, e.lineage_id)
        }
        Event::DeviceReleased(e) => {
            devices::released(v, st, origin, e)?;
            servers::end_reattach_hold(v, st, e.server_id, e.lineage_id)
        }
        Event::ServerStateChanged(e) => servers::state_changed(v, st, e),
        Event::ServerResized(e) => servers::moved(
            v,
            st,
            e.server_id,
            &e.from_host,
            &e.host,
            Some((e.from_flavor, e.to_flavor)),
            &e.devices,
        ),
        Event::ServerMigrated(e) => {
            servers::moved(v, st, e.server_id, &e.from_host, &e.host, None, &e.devices)
        }
        Event::ServerMigrationRefused(e) => servers::migration_refused(v, st, e),
        Event::ServerDeleted(e) => servers::server_deleted(v, st, e),
        Event::ServerActionRequested(e) => servers::action_requested(v, st, e),
        Event::DeviceAttachFailed(e) => devices::attach_failed(v, st, e),
    }
}

/// A server that must exist.
pub(super) fn known_server<S: State>(v: &mut S, id: ServerId) -> R<Server> {
    match v.server(id)? {
        Some(s) => Ok(s),
        None => unknown_server(id),
    }
}

/// A server that must exist, borrowed (no copy of its record; see [`State::server_ref`]).
pub(super) fn known_server_ref<S: State>(v: &mut S, id: ServerId) -> R<&Server> {
    match v.server_ref(id)? {
        Some(s) => Ok(s),
        None => unknown_server(id),
    }
}

/// Refuses the event unless the server exists (without copying its record).
pub(super) fn server_exists<S: State>(v: &mut S, id: ServerId) -> R {
    if v.server_exists(id)? {
        Ok(())
    } else {
        unknown_server(id)
    }
}

/// A server that must exist, to change in place (see [`State::server_mut`]).
pub(super) fn known_server_mut<S: State>(v: &mut S, id: ServerId) -> R<&mut Server> {
    match v.server_mut(id)? {
        Some(s) => Ok(s),
        None => unknown_server(id),
    }
}

/// A device that must exist, on `lineage` (when given) and `host`.
pub(super) fn known_device<S: State>(
    v: &mut S,
    id: DeviceId,
    lineage: Option<LineageId>,
    host: &HostName,
) -> R<Device> {
    known_device_ref(v, id, lineage, host).cloned()
}

/// A device that must exist, to change in place after the handler's last check (see
/// [`State::device_mut`]).
pub(super) fn known_device_mut<S: State>(v: &mut S, id: DeviceId) -> R<&mut Device> {
    match v.device_mut(id)? {
        Some(d) => Ok(d),
        None => reject(
            QuarantineReason::UnknownDevice,
            format!("device {id} was never discovered"),
        ),
    }
}

/// [`known_device`], borrowed (no copy of the device's holds).
pub(super) fn known_device_ref<'v, S: State>(
    v: &'v mut S,
    id: DeviceId,
    lineage: Option<LineageId>,
    host: &HostName,
) -> R<&'v Device> {
    let Some(d) = v.device_ref(id)? else {
        return reject(
            QuarantineReason::UnknownDevice,
            format!("device {id} was never discovered"),
        );
    };
    if let Some(l) = lineage {
        if d.lineage_id() != l {
            return reject(
                QuarantineReason::Conflict,
                format!("device {id} belongs to lineage {}, not {l}", d.lineage_id()),
            );
        }
    }
    if d.host() != host {
        return reject(
            QuarantineReason::Conflict,
            format!("device {id} is on host {}, not {host}", d.host()),
        );
    }
    Ok(d)
}

/// Every applied agent event re-stamps its host's record; some also change it.
fn touch_host<S: State>(
    v: &mut S,
    host: &HostName,
    st: Stamp,
    body: &Event,
) -> Result<(), ViewError> {
    let h = v.host_mut(host)?.get_or_insert_with(|| Host {
        name: host.clone(),
        boot_id: None,
        agent_version: None,
        hypervisor_uri: None,
        agent_started: None,
        last_seen: st,
        clashes: Vec::new(),
    });
    h.last_seen = st;
    match body {
        Event::HostAgentStarted(e) => {
            h.boot_id = Some(e.boot_id.clone());
            h.agent_version = Some(e.agent_version.clone());
            h.hypervisor_uri = Some(e.hypervisor_uri.clone());
            h.agent_started = Some(st);
        }
        Event::DeviceDiscovered(e) if h.boot_id.is_none() => {
            h.boot_id = Some(e.boot_id.clone());
        }
        Event::DeviceDiscoveredV2(e) if h.boot_id.is_none() => {
            h.boot_id = Some(e.discovery.boot_id.clone());
        }
        Event::DeviceClashDetected(e) => {
            let clash = Clash {
                vendor_id: e.vendor_id,
                product_id: e.product_id,
                serial: e.serial.clone(),
                port_paths: e.port_paths.clone(),
                stamp: st,
            };
            match h.clashes.iter_mut().find(|c| {
                (c.vendor_id, c.product_id, c.serial.as_str())
                    == (e.vendor_id, e.product_id, e.serial.as_str())
            }) {
                Some(c) => *c = clash,
                None => h.clashes.push(clash),
            }
        }
        _ => {}
    }
    Ok(())
}

fn unknown_server<T>(id: ServerId) -> R<T> {
    reject(
        QuarantineReason::UnknownServer,
        format!("server {id} was never requested"),
    )
}

pub(super) fn not_deleted(s: &Server) -> R {
    match s.deleted {
        Some(d) => reject(
            QuarantineReason::Conflict,
            format!("server {} was deleted at seq {}", s.id, d.seq),
        ),
        None => Ok(()),
    }
}
