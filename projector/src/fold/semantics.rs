//! The fold's semantics: how one event changes the view, one function per event, on any
//! [`State`]. Pure: no clock, no randomness, no I/O beyond the reads the state answers, so
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
use crate::error::ViewError;
use crate::model::*;
use crate::tables as t;

/// Why a handler refused an event (internal: becomes a quarantine entry), or a storage failure.
enum Fail {
    Reject(QuarantineReason, String),
    View(ViewError),
}

impl<E: Into<ViewError>> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail::View(e.into())
    }
}

type R<T = ()> = Result<T, Fail>;

fn reject<T>(reason: QuarantineReason, detail: impl Into<String>) -> R<T> {
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
        Ok(()) => handle(v, st, &env.body),
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

fn handle<S: State>(v: &mut S, st: Stamp, body: &Event) -> R {
    match body {
        // The host record is all it changes (see `touch_host`).
        Event::HostAgentStarted(_) | Event::DeviceClashDetected(_) => Ok(()),
        Event::DeviceDiscovered(e) => discovered(v, st, e),
        Event::DeviceInvalidated(e) => invalidated(v, st, e),
        Event::FlavorCreated(e) => flavor_created(v, st, e),
        Event::FlavorDeleted(e) => flavor_deleted(v, st, e),
        Event::FlavorUsbSet(e) => flavor_usb_set(v, e),
        Event::FlavorSized(e) => flavor_sized(v, e),
        Event::ServerUpdated(e) => server_updated(v, st, e),
        Event::ServerResizeVerifying(e) => resize_verifying(v, st, e),
        Event::ServerResizeConfirmed(e) => resize_ended(v, st, e.server_id, false),
        Event::ServerResizeReverted(e) => resize_ended(v, st, e.server_id, true),
        Event::ServerBootRequested(e) => boot_requested(v, st, e),
        Event::ServerScheduled(e) => scheduled(v, st, e),
        Event::ServerScheduleFailed(e) => schedule_failed(v, st, e),
        Event::DeviceClaimed(e) => claimed(v, st, e),
        Event::DeviceAttached(e) => attached(v, st, e),
        Event::DeviceReattached(e) => reattached(v, st, e),
        Event::DeviceReleased(e) => released(v, st, e),
        Event::ServerStateChanged(e) => state_changed(v, st, e),
        Event::ServerResized(e) => moved(
            v,
            st,
            e.server_id,
            &e.from_host,
            &e.host,
            Some((e.from_flavor, e.to_flavor)),
            &e.devices,
        ),
        Event::ServerMigrated(e) => {
            moved(v, st, e.server_id, &e.from_host, &e.host, None, &e.devices)
        }
        Event::ServerMigrationRefused(e) => migration_refused(v, st, e),
        Event::ServerDeleted(e) => server_deleted(v, st, e),
        Event::ServerActionRequested(e) => action_requested(v, st, e),
        Event::DeviceAttachFailed(e) => attach_failed(v, st, e),
    }
}

/// A resize awaits confirmation: the way back is kept until then.
fn resize_verifying<S: State>(v: &mut S, st: Stamp, e: &ServerResizeVerifying) -> R {
    let s = known_server_mut(v, e.server_id)?;
    not_deleted(s)?;
    s.resize_from = Some(ResizeFrom {
        stamp: st,
        flavor_id: e.from_flavor,
        host: e.from_host.clone(),
        devices: e.devices.clone(),
    });
    s.last_change_seq = st.seq;
    Ok(())
}

/// A pending resize confirmed, or reverted (`reverted`): the newest moves are closed.
fn resize_ended<S: State>(v: &mut S, st: Stamp, server_id: ServerId, reverted: bool) -> R {
    let s = known_server_mut(v, server_id)?;
    not_deleted(s)?;
    if s.resize_from.take().is_none() {
        return reject(
            QuarantineReason::Conflict,
            format!("server {server_id} has no resize awaiting confirmation"),
        );
    }
    // The pending resize is the newest move; a revert's way back came after it.
    let mut newest = s.moves.iter_mut().rev();
    if reverted {
        if let Some(back) = newest.next() {
            back.end = Some((MoveEnd::IsRevert, st));
        }
    }
    if let Some(m) = newest.next() {
        m.end = Some((
            if reverted {
                MoveEnd::Reverted
            } else {
                MoveEnd::Confirmed
            },
            st,
        ));
    }
    s.last_change_seq = st.seq;
    Ok(())
}

/// A server placed on a host with its devices.
fn scheduled<S: State>(v: &mut S, st: Stamp, e: &ServerScheduled) -> R {
    let s = known_server_mut(v, e.server_id)?;
    not_deleted(s)?;
    s.host = Some(e.host.clone());
    s.flavor_id = e.flavor_id;
    s.devices = e.devices.clone();
    s.scheduled = Some(st);
    s.last_change_seq = st.seq;
    Ok(())
}

/// A server that could not be placed: in error, the failure kept (capped).
fn schedule_failed<S: State>(v: &mut S, st: Stamp, e: &ServerScheduleFailed) -> R {
    let s = known_server_mut(v, e.server_id)?;
    s.state = ServerState::Error;
    s.state_detail = e.reason.clone();
    s.state_changed = st;
    push_capped(
        &mut s.schedule_failures,
        ScheduleFailure {
            stamp: st,
            reason: e.reason.clone(),
            host_rejections: e.host_rejections.clone(),
        },
    );
    s.schedule_failures_total += 1;
    s.last_change_seq = st.seq;
    Ok(())
}

/// A server's state as reported (an agent's report about a domain the server left is ignored).
fn state_changed<S: State>(v: &mut S, st: Stamp, e: &ServerStateChanged) -> R {
    let s = known_server_mut(v, e.server_id)?;
    if e.reported_by_agent && s.host.is_some() && e.host != s.host {
        // The host a server left (resize or cold migration) reporting its teardown: the
        // state of a domain the server no longer has, not the server's.
        return Ok(());
    }
    s.state = e.state;
    s.state_detail.clone_from(&e.detail);
    s.state_changed = st;
    s.last_change_seq = st.seq;
    Ok(())
}

/// A migration refused: kept (capped) and counted.
fn migration_refused<S: State>(v: &mut S, st: Stamp, e: &ServerMigrationRefused) -> R {
    let s = known_server_mut(v, e.server_id)?;
    push_capped(
        &mut s.migration_refusals,
        MigrationRefusal {
            stamp: st,
            live: e.live,
            reason: e.reason.clone(),
        },
    );
    s.migration_refusals_total += 1;
    s.last_change_seq = st.seq;
    Ok(())
}

/// A server deleted: its name is free again.
fn server_deleted<S: State>(v: &mut S, st: Stamp, e: &ServerDeleted) -> R {
    let mut s = known_server(v, e.server_id)?;
    if let Some(d) = s.deleted {
        return reject(
            QuarantineReason::Duplicate,
            format!("server {} was already deleted at seq {}", s.id, d.seq),
        );
    }
    s.deleted = Some(st);
    s.last_change_seq = st.seq;
    let named = v.server_named(s.name.as_str())?;
    if named == Some(s.id.to_bytes()) {
        v.name_server(s.name.as_str(), None);
    }
    v.put_server(s);
    Ok(())
}

/// The last action asked of a server.
fn action_requested<S: State>(v: &mut S, st: Stamp, e: &ServerActionRequested) -> R {
    let s = known_server_mut(v, e.server_id)?;
    s.last_action = Some(ActionRecord {
        stamp: st,
        action: e.action,
        host: e.host.clone(),
    });
    s.last_change_seq = st.seq;
    Ok(())
}

/// The hypervisor refused a device for a server.
fn attach_failed<S: State>(v: &mut S, st: Stamp, e: &DeviceAttachFailed) -> R {
    let mut d = known_device(v, e.device_id, None, &e.host)?;
    server_exists(v, e.server_id)?;
    d.attach_error = Some(AttachError {
        server_id: e.server_id,
        error: e.error.clone(),
        stamp: st,
    });
    d.last_change_seq = st.seq;
    Ok(v.put_device(d)?)
}

/// A server that must exist.
fn known_server<S: State>(v: &mut S, id: ServerId) -> R<Server> {
    match v.server(id)? {
        Some(s) => Ok(s),
        None => unknown_server(id),
    }
}

/// Refuses the event unless the server exists (without copying its record).
fn server_exists<S: State>(v: &mut S, id: ServerId) -> R {
    if v.server_exists(id)? {
        Ok(())
    } else {
        unknown_server(id)
    }
}

/// A server that must exist, to change in place (see [`State::server_mut`]).
fn known_server_mut<S: State>(v: &mut S, id: ServerId) -> R<&mut Server> {
    match v.server_mut(id)? {
        Some(s) => Ok(s),
        None => unknown_server(id),
    }
}

/// A device that must exist, on `lineage` (when given) and `host`.
fn known_device<S: State>(
    v: &mut S,
    id: DeviceId,
    lineage: Option<LineageId>,
    host: &HostName,
) -> R<Device> {
    let Some(d) = v.device(id)? else {
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

fn push_capped<T>(list: &mut Vec<T>, item: T) {
    list.push(item);
    if list.len() > SERVER_HISTORY_KEEP {
        list.remove(0);
    }
}

fn not_deleted(s: &Server) -> R {
    match s.deleted {
        Some(d) => reject(
            QuarantineReason::Conflict,
            format!("server {} was deleted at seq {}", s.id, d.seq),
        ),
        None => Ok(()),
    }
}

fn discovered<S: State>(v: &mut S, st: Stamp, e: &DeviceDiscovered) -> R {
    if let Some(d) = v.device(e.device_id)? {
        return reject(
            QuarantineReason::Duplicate,
            format!(
                "device {} was already discovered at seq {}",
                e.device_id, d.discovered.seq
            ),
        );
    }
    check_lineage_key(e)?;
    let lineage = v.lineage(e.lineage_id)?;
    let previous = match &lineage {
        Some(l) => v.device(l.current)?,
        None => None,
    };
    if let (Some(l), Some(prev)) = (&lineage, &previous) {
        check_lineage_move(e, l, prev)?;
    }
    let claim = v.claim(e.lineage_id)?;

    let mut new = Device {
        discovery: std::sync::Arc::new(e.clone()),
        status: DeviceStatus::Available,
        holder: None,
        current: true,
        discovered: st,
        invalidation: None,
        attachment: None,
        holders: Vec::new(),
        attach_error: None,
        last_change_seq: st.seq,
    };
    // A claim survives re-enumeration: with `lineage` follow the new enumeration is claimed for
    // the same server (awaiting re-attach); with `strict` it is free and the server keeps the
    // invalid one.
    if let Some(mut c) = claim {
        if c.follow == FollowPolicy::Lineage {
            new.status = DeviceStatus::Claimed;
            new.holder = Some(c.server_id);
            new.holders.push(Holding {
                server_id: c.server_id,
                how: HoldKind::Followed,
                from: st,
                attached: None,
                ended: None,
            });
            c.awaiting = Some(e.device_id);
            v.put_claim(c);
        }
    }
    // The previous enumeration is superseded (normally the agent invalidated it already).
    if let Some(prev) = previous {
        let mut p = prev;
        p.current = false;
        match &mut p.invalidation {
            Some(inv) => {
                inv.superseded_by.get_or_insert(e.device_id);
            }
            None => {
                p.status = DeviceStatus::Invalidated;
                p.invalidation = Some(Invalidation {
                    stamp: st,
                    reason: None,
                    superseded_by: Some(e.device_id),
                });
            }
        }
        p.last_change_seq = st.seq;
        v.put_device(p)?;
    }
    let l = match lineage {
        Some(mut l) => {
            l.current = e.device_id;
            l.current_host = e.host.clone();
            l.enumerations += 1;
            l
        }
        None => Lineage {
            id: e.lineage_id,
            kind: e.lineage_kind,
            vendor_id: e.vendor_id,
            product_id: e.product_id,
            serial: e.serial.clone(),
            current: e.device_id,
            current_host: e.host.clone(),
            enumerations: 1,
            first_seen: st,
        },
    };
    v.push_lineage_history(e.lineage_id, l.enumerations, e.device_id);
    v.put_lineage(l);
    v.put_device(new)?;
    Ok(())
}

/// The lineage id must be the one derived from the discovery's own key, so a publisher cannot
/// name another host's lineage (and take over its claim): a port lineage's key holds the
/// event's host, a serial lineage's the serial.
fn check_lineage_key(e: &DeviceDiscovered) -> R {
    let key = match (e.lineage_kind, e.serial.as_deref()) {
        (LineageKind::Serial, Some(serial)) => LineageKey::Serial {
            vendor: e.vendor_id,
            product: e.product_id,
            serial,
        },
        (LineageKind::Serial, None) => {
            return reject(
                QuarantineReason::LineageMismatch,
                format!(
                    "device {} claims serial lineage {} but has no serial",
                    e.device_id, e.lineage_id
                ),
            )
        }
        (LineageKind::Port, _) => LineageKey::Port {
            host: &e.host,
            port: &e.port_path,
            vendor: e.vendor_id,
            product: e.product_id,
        },
    };
    let derived = LineageId::derive(&key);
    if derived != e.lineage_id {
        return reject(
            QuarantineReason::LineageMismatch,
            format!(
                "device {} on host {} names lineage {} but its {:?} key derives {derived}",
                e.device_id, e.host, e.lineage_id, e.lineage_kind
            ),
        );
    }
    Ok(())
}

/// A known lineage moves to a new enumeration only when that cannot steal it: same kind, a port
/// lineage only on its own host, a serial lineage only when its current enumeration is gone
/// or on the same host (a re-enumeration there).
fn check_lineage_move(e: &DeviceDiscovered, l: &Lineage, prev: &Device) -> R {
    if l.kind != e.lineage_kind {
        return reject(
            QuarantineReason::LineageMismatch,
            format!(
                "lineage {} is a {:?} lineage; device {} says {:?}",
                l.id, l.kind, e.device_id, e.lineage_kind
            ),
        );
    }
    if l.kind == LineageKind::Port && l.current_host != e.host {
        return reject(
            QuarantineReason::LineageMismatch,
            format!(
                "port lineage {} belongs to host {}, not {}",
                l.id, l.current_host, e.host
            ),
        );
    }
    let prev_host = &prev.discovery.host;
    if prev_host != &e.host && prev.invalidation.is_none() {
        return reject(
            QuarantineReason::LineageClash,
            format!(
                "serial lineage {} is still present on host {prev_host} as device {}; device {} on host {} does not take it over",
                l.id, prev.discovery.device_id, e.device_id, e.host
            ),
        );
    }
    Ok(())
}

fn invalidated<S: State>(v: &mut S, st: Stamp, e: &DeviceInvalidated) -> R {
    let d = known_device(v, e.device_id, Some(e.lineage_id), &e.host)?;
    if let Some(Invalidation {
        reason: Some(r),
        stamp,
        ..
    }) = d.invalidation
    {
        return reject(
            QuarantineReason::Duplicate,
            format!(
                "device {} was already invalidated at seq {} ({r:?})",
                e.device_id, stamp.seq
            ),
        );
    }
    let mut n = d;
    n.status = DeviceStatus::Invalidated;
    n.invalidation = Some(match n.invalidation {
        // Superseded earlier: keep when that was, add why.
        Some(inv) => Invalidation {
            reason: Some(e.reason),
            superseded_by: inv.superseded_by.or(e.superseded_by),
            ..inv
        },
        None => Invalidation {
            stamp: st,
            reason: Some(e.reason),
            superseded_by: e.superseded_by,
        },
    });
    n.last_change_seq = st.seq;
    v.put_device(n)?;
    // The lineage's claim stays (pointing at this enumeration) until released or re-attached;
    // a newer enumeration that was awaiting re-attach and died is no longer awaited.
    if let Some(mut c) = v.claim(e.lineage_id)? {
        if c.awaiting == Some(e.device_id) {
            c.awaiting = None;
            v.put_claim(c);
        }
    }
    Ok(())
}

fn flavor_created<S: State>(v: &mut S, st: Stamp, e: &FlavorCreated) -> R {
    if v.flavor(e.flavor_id)?.is_some() {
        return reject(
            QuarantineReason::Duplicate,
            format!("flavor {} already exists", e.flavor_id),
        );
    }
    if let Some(other) = v.flavor_named(e.name.as_str())? {
        return reject(
            QuarantineReason::Conflict,
            format!(
                "flavor name {} is in use by flavor {}",
                e.name,
                t::show_id(&other)
            ),
        );
    }
    let f = Flavor {
        id: e.flavor_id,
        name: e.name.clone(),
        usb: e.usb.clone(),
        created: st,
        deleted: None,
        ram_mb: 0,
        vcpus: 0,
        disk_gb: 0,
    };
    v.put_flavor(&f);
    v.name_flavor(f.name.as_str(), Some(f.id.to_bytes()));
    Ok(())
}

/// The flavor `id` named `name` and not deleted; a deleted one is quarantined as `if_deleted`
/// (a second delete is a duplicate, a change after the delete a conflict).
fn live_flavor<S: State>(
    v: &mut S,
    id: FlavorId,
    name: &FlavorName,
    if_deleted: QuarantineReason,
) -> R<Flavor> {
    let Some(f) = v.flavor(id)? else {
        return reject(
            QuarantineReason::UnknownFlavor,
            format!("flavor {id} was never created"),
        );
    };
    if let Some(d) = f.deleted {
        let what = if if_deleted == QuarantineReason::Duplicate {
            "was already deleted"
        } else {
            "was deleted"
        };
        return reject(
            if_deleted,
            format!("flavor {} {what} at seq {}", f.id, d.seq),
        );
    }
    if f.name != *name {
        return reject(
            QuarantineReason::Conflict,
            format!("flavor {} is named {}, not {name}", f.id, f.name),
        );
    }
    Ok(f)
}

/// A live flavor's Nova resources recorded.
fn flavor_sized<S: State>(v: &mut S, e: &FlavorSized) -> R {
    let mut f = live_flavor(v, e.flavor_id, &e.name, QuarantineReason::Conflict)?;
    f.ram_mb = e.ram_mb;
    f.vcpus = e.vcpus;
    f.disk_gb = e.disk_gb;
    v.put_flavor(&f);
    Ok(())
}

/// A live server renamed (the name index follows) or its description changed.
fn server_updated<S: State>(v: &mut S, st: Stamp, e: &ServerUpdated) -> R {
    let mut s = known_server(v, e.server_id)?;
    not_deleted(&s)?;
    if e.name != s.name {
        if let Some(other) = v.server_named(e.name.as_str())? {
            return reject(
                QuarantineReason::Conflict,
                format!(
                    "server name {} is in use by server {}",
                    e.name,
                    t::show_id(&other)
                ),
            );
        }
        if v.server_named(s.name.as_str())? == Some(s.id.to_bytes()) {
            v.name_server(s.name.as_str(), None);
        }
        v.name_server(e.name.as_str(), Some(s.id.to_bytes()));
        s.name = e.name.clone();
    }
    s.description.clone_from(&e.description);
    s.last_change_seq = st.seq;
    v.put_server(s);
    Ok(())
}

/// A live flavor's USB request replaced (the servers it placed keep their devices).
fn flavor_usb_set<S: State>(v: &mut S, e: &FlavorUsbSet) -> R {
    let mut f = live_flavor(v, e.flavor_id, &e.name, QuarantineReason::Conflict)?;
    f.usb = e.usb.clone();
    v.put_flavor(&f);
    Ok(())
}

fn flavor_deleted<S: State>(v: &mut S, st: Stamp, e: &FlavorDeleted) -> R {
    let mut f = live_flavor(v, e.flavor_id, &e.name, QuarantineReason::Duplicate)?;
    f.deleted = Some(st);
    v.put_flavor(&f);
    let named = v.flavor_named(f.name.as_str())?;
    if named == Some(f.id.to_bytes()) {
        v.name_flavor(f.name.as_str(), None);
    }
    Ok(())
}

fn boot_requested<S: State>(v: &mut S, st: Stamp, e: &ServerBootRequested) -> R {
    if v.server(e.server_id)?.is_some() {
        return reject(
            QuarantineReason::Duplicate,
            format!("server {} was already requested", e.server_id),
        );
    }
    if let Some(other) = v.server_named(e.name.as_str())? {
        return reject(
            QuarantineReason::Conflict,
            format!(
                "server name {} is in use by server {}",
                e.name,
                t::show_id(&other)
            ),
        );
    }
    if v.flavor(e.flavor_id)?.is_none() {
        return reject(
            QuarantineReason::UnknownFlavor,
            format!("flavor {} was never created", e.flavor_id),
        );
    }
    let s = Server {
        id: e.server_id,
        name: e.name.clone(),
        flavor_id: e.flavor_id,
        requested_host: e.requested_host.clone(),
        host: None,
        state: ServerState::Building,
        state_detail: String::new(),
        state_changed: st,
        devices: Vec::new(),
        created: st,
        scheduled: None,
        schedule_failures: Vec::new(),
        schedule_failures_total: 0,
        migration_refusals: Vec::new(),
        migration_refusals_total: 0,
        moves: Vec::new(),
        last_action: None,
        deleted: None,
        last_change_seq: st.seq,
        description: None,
        resize_from: None,
    };
    v.name_server(s.name.as_str(), Some(s.id.to_bytes()));
    v.put_server(s);
    Ok(())
}

fn moved<S: State>(
    v: &mut S,
    st: Stamp,
    server: ServerId,
    from_host: &HostName,
    host: &HostName,
    flavors: Option<(FlavorId, FlavorId)>,
    devices: &[AssignedDevice],
) -> R {
    let mut s = known_server(v, server)?;
    not_deleted(&s)?;
    let (from_flavor, to_flavor) = flavors.unwrap_or((s.flavor_id, s.flavor_id));
    if flavors.is_some() && v.flavor(to_flavor)?.is_none() {
        return reject(
            QuarantineReason::UnknownFlavor,
            format!("flavor {to_flavor} was never created"),
        );
    }
    push_capped(
        &mut s.moves,
        Move {
            stamp: st,
            from_host: from_host.clone(),
            host: host.clone(),
            from_flavor,
            to_flavor,
            migration: flavors.is_none(),
            end: None,
        },
    );
    s.flavor_id = to_flavor;
    s.host = Some(host.clone());
    s.devices = devices.to_vec();
    s.last_change_seq = st.seq;
    {
        v.put_server(s);
        Ok(())
    }
}

fn claimed<S: State>(v: &mut S, st: Stamp, e: &DeviceClaimed) -> R {
    let s = known_server(v, e.server_id)?;
    not_deleted(&s)?;
    let d = known_device(v, e.device_id, Some(e.lineage_id), &e.host)?;
    if let Some(c) = v.claim(e.lineage_id)? {
        if c.server_id != e.server_id {
            return reject(
                QuarantineReason::Conflict,
                format!(
                    "lineage {} is claimed by server {} since seq {}",
                    e.lineage_id, c.server_id, c.claimed.seq
                ),
            );
        }
    }
    if let Some(other) = d.holder.filter(|h| *h != e.server_id) {
        return reject(
            QuarantineReason::Conflict,
            format!("device {} is held by server {other}", e.device_id),
        );
    }
    v.put_claim(Claim {
        lineage_id: e.lineage_id,
        device_id: e.device_id,
        host: e.host.clone(),
        server_id: e.server_id,
        request_index: e.request_index,
        controller: e.controller,
        follow: e.follow,
        claimed: st,
        awaiting: None,
    });
    let mut n = d;
    if n.status == DeviceStatus::Available {
        n.status = DeviceStatus::Claimed;
    }
    n.holder = Some(e.server_id);
    open_holding(&mut n, e.server_id, HoldKind::Claimed, st);
    n.last_change_seq = st.seq;
    Ok(v.put_device(n)?)
}

/// Starts a holding unless `server` already has an open one.
fn open_holding(d: &mut Device, server: ServerId, how: HoldKind, st: Stamp) -> &mut Holding {
    let open = d
        .holders
        .iter()
        .position(|h| h.server_id == server && h.ended.is_none());
    let i = match open {
        Some(i) => i,
        None => {
            d.holders.push(Holding {
                server_id: server,
                how,
                from: st,
                attached: None,
                ended: None,
            });
            d.holders.len() - 1
        }
    };
    &mut d.holders[i]
}

fn end_holding(d: &mut Device, server: ServerId, st: Stamp, end: HoldEnd) {
    for h in d
        .holders
        .iter_mut()
        .filter(|h| h.server_id == server && h.ended.is_none())
    {
        h.ended = Some((st, end));
    }
}

#[allow(clippy::too_many_arguments)]
fn attach(
    d: &mut Device,
    server: ServerId,
    address: UsbAddress,
    method: AttachMethod,
    detail: &str,
    how: HoldKind,
    st: Stamp,
) {
    if d.status != DeviceStatus::Invalidated {
        d.status = DeviceStatus::Attached;
    }
    d.holder = Some(server);
    d.attachment = Some(Attachment {
        server_id: server,
        address,
        method,
        detail: detail.to_owned(),
        stamp: st,
    });
    open_holding(d, server, how, st).attached = Some(st);
    d.last_change_seq = st.seq;
}

fn attached<S: State>(v: &mut S, st: Stamp, e: &DeviceAttached) -> R {
    let d = known_device(v, e.device_id, Some(e.lineage_id), &e.host)?;
    server_exists(v, e.server_id)?;
    if let Some(other) = d.holder.filter(|h| *h != e.server_id) {
        return reject(
            QuarantineReason::Conflict,
            format!("device {} is held by server {other}", e.device_id),
        );
    }
    let mut n = d;
    attach(
        &mut n,
        e.server_id,
        e.address,
        e.method,
        &e.detail,
        HoldKind::Attached,
        st,
    );
    v.put_device(n)?;
    if let Some(mut c) = v.claim(e.lineage_id)? {
        if c.server_id == e.server_id && c.awaiting == Some(e.device_id) {
            c.device_id = e.device_id;
            c.host = e.host.clone();
            c.awaiting = None;
            v.put_claim(c);
        }
    }
    Ok(())
}

fn reattached<S: State>(v: &mut S, st: Stamp, e: &DeviceReattached) -> R {
    let new = known_device(v, e.new_device_id, Some(e.lineage_id), &e.host)?;
    let Some(old) = v.device(e.old_device_id)? else {
        return reject(
            QuarantineReason::UnknownDevice,
            format!("device {} was never discovered", e.old_device_id),
        );
    };
    let mut s = known_server(v, e.server_id)?;
    let Some(mut c) = v
        .claim(e.lineage_id)?
        .filter(|c| c.server_id == e.server_id)
    else {
        return reject(
            QuarantineReason::Conflict,
            format!(
                "lineage {} has no claim by server {}",
                e.lineage_id, e.server_id
            ),
        );
    };
    if let Some(other) = new.holder.filter(|h| *h != e.server_id) {
        return reject(
            QuarantineReason::Conflict,
            format!("device {} is held by server {other}", e.new_device_id),
        );
    }
    let mut n = new;
    attach(
        &mut n,
        e.server_id,
        e.address,
        e.method,
        &e.detail,
        HoldKind::Reattached,
        st,
    );
    v.put_device(n)?;
    if old.holder == Some(e.server_id) {
        let mut o = old;
        o.holder = None;
        o.attachment = None;
        end_holding(&mut o, e.server_id, st, HoldEnd::MovedTo(e.new_device_id));
        o.last_change_seq = st.seq;
        v.put_device(o)?;
    }
    c.device_id = e.new_device_id;
    c.host = e.host.clone();
    c.awaiting = None;
    v.put_claim(c);
    for a in s
        .devices
        .iter_mut()
        .filter(|a| a.lineage_id == e.lineage_id)
    {
        a.device_id = e.new_device_id;
    }
    s.last_change_seq = st.seq;
    {
        v.put_server(s);
        Ok(())
    }
}

fn released<S: State>(v: &mut S, st: Stamp, e: &DeviceReleased) -> R {
    let Some(c) = v.claim(e.lineage_id)? else {
        return reject(
            QuarantineReason::Conflict,
            format!("lineage {} has no active claim to release", e.lineage_id),
        );
    };
    if c.server_id != e.server_id {
        return reject(
            QuarantineReason::Conflict,
            format!(
                "lineage {} is claimed by server {}, not {}",
                e.lineage_id, c.server_id, e.server_id
            ),
        );
    }
    let current = v.lineage(e.lineage_id)?.map(|l| l.current);
    v.remove_claim(e.lineage_id);
    // Every enumeration this claim touched returns to the pool (unless invalidated).
    let mut ids = vec![e.device_id, c.device_id];
    ids.extend(c.awaiting);
    ids.extend(current);
    ids.sort();
    ids.dedup();
    for id in ids {
        let Some(d) = v.device(id)? else { continue };
        if d.holder != Some(e.server_id) {
            continue;
        }
        let mut n = d;
        n.holder = None;
        n.attachment = None;
        if matches!(n.status, DeviceStatus::Claimed | DeviceStatus::Attached) {
            n.status = DeviceStatus::Available;
        }
        end_holding(&mut n, e.server_id, st, HoldEnd::Released(e.reason));
        n.last_change_seq = st.seq;
        v.put_device(n)?;
    }
    Ok(())
}
