//! Device events: discovery and lineages, invalidation, claims, attachments, releases.

use usbpt_schemas::*;

use super::alarms;
use super::semantics::{
    known_device_mut, known_device_ref, known_server_mut, known_server_ref, not_deleted, reject,
    server_exists, R,
};
use super::state::State;
use crate::model::*;

pub(super) fn discovered<S: State>(
    v: &mut S,
    st: Stamp,
    e: &DeviceDiscovered,
    fingerprint: Option<Fingerprint>,
) -> R {
    if let Some(d) = v.device(e.device_id)? {
        return reject(
            QuarantineReason::Duplicate,
            format!(
                "device {} was already discovered at seq {}",
                e.device_id, d.discovered.seq
            ),
        );
    }
    let lineage = v.lineage(e.lineage_id)?;
    let previous = match &lineage {
        Some(l) => v.device(l.current)?,
        None => None,
    };
    if !same_lineage_key(e, previous.as_ref()) {
        check_lineage_key(e)?;
    }
    let fingerprint_before = previous.as_ref().and_then(|p| p.fingerprint);
    if let (Some(l), Some(prev)) = (&lineage, &previous) {
        if alarms::is_conflict(e, l, prev) {
            return alarms::conflict_raised(v, st, e, fingerprint, l.clone(), prev.clone());
        }
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
        fingerprint,
        blocked: lineage.as_ref().is_some_and(alarms::blocks),
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
                started_by: None,
                ended_by: None,
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
            vendor_id: e.descriptors.vendor_id,
            product_id: e.descriptors.product_id,
            serial: e.descriptors.serial.clone(),
            current: e.device_id,
            current_host: e.host.clone(),
            enumerations: 1,
            first_seen: st,
            alarms: Vec::new(),
            pending: None,
            label: None,
            label_changed: None,
            fingerprint_accepted: None,
        },
    };
    v.push_lineage_history(e.lineage_id, l.enumerations, e.device_id);
    v.put_lineage(l);
    v.put_device(new)?;
    alarms::fingerprint_seen(v, st, e, fingerprint, fingerprint_before)
}

/// The lineage id must be the one derived from the discovery's own key, so a publisher cannot
/// name another host's lineage (and take over its claim): a port lineage's key holds the
/// event's host, a serial lineage's the serial.
fn check_lineage_key(e: &DeviceDiscovered) -> R {
    let key = match (e.lineage_kind, e.descriptors.serial.as_deref()) {
        (LineageKind::Serial, Some(serial)) => LineageKey::Serial {
            vendor: e.descriptors.vendor_id,
            product: e.descriptors.product_id,
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
            port: &e.descriptors.port_path,
            vendor: e.descriptors.vendor_id,
            product: e.descriptors.product_id,
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

/// Whether `e` names its lineage with the very key of the lineage's current enumeration `prev`:
/// then the id `e` names is the one its key derives, without deriving it again (a `format!`
/// and a SHA-1 per discovery), since every enumeration in the view passed
/// [`check_lineage_key`] when it was discovered. Otherwise the key is checked in full.
fn same_lineage_key(e: &DeviceDiscovered, prev: Option<&Device>) -> bool {
    let Some(p) = prev.map(|p| &*p.discovery) else {
        return false;
    };
    let (a, b) = (&e.descriptors, &p.descriptors);
    p.lineage_id == e.lineage_id
        && p.lineage_kind == e.lineage_kind
        && a.vendor_id == b.vendor_id
        && a.product_id == b.product_id
        && match e.lineage_kind {
            LineageKind::Serial => a.serial.is_some() && a.serial == b.serial,
            LineageKind::Port => e.host == p.host && a.port_path == b.port_path,
        }
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

pub(super) fn invalidated<S: State>(v: &mut S, st: Stamp, e: &DeviceInvalidated) -> R {
    if alarms::pending_ended(v, st, e)? {
        return Ok(());
    }
    let d = known_device_ref(v, e.device_id, Some(e.lineage_id), &e.host)?;
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
    let n = known_device_mut(v, e.device_id)?;
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
    // The lineage's claim stays (pointing at this enumeration) until released or re-attached;
    // a newer enumeration that was awaiting re-attach and died is no longer awaited.
    if let Some(mut c) = v.claim(e.lineage_id)? {
        if c.awaiting == Some(e.device_id) {
            c.awaiting = None;
            v.put_claim(c);
        }
    }
    alarms::current_ended(v, st, e)
}

pub(super) fn claimed<S: State>(
    v: &mut S,
    st: Stamp,
    origin: Option<&Origin>,
    e: &DeviceClaimed,
) -> R {
    not_deleted(known_server_ref(v, e.server_id)?)?;
    let holder = known_device_ref(v, e.device_id, Some(e.lineage_id), &e.host)?.holder;
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
    if let Some(other) = holder.filter(|h| *h != e.server_id) {
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
    let n = known_device_mut(v, e.device_id)?;
    if n.status == DeviceStatus::Available {
        n.status = DeviceStatus::Claimed;
    }
    n.holder = Some(e.server_id);
    open_holding(n, e.server_id, HoldKind::Claimed, st, origin);
    n.last_change_seq = st.seq;
    Ok(())
}

/// Starts a holding unless `server` already has an open one; `origin` is who asked for it.
fn open_holding<'d>(
    d: &'d mut Device,
    server: ServerId,
    how: HoldKind,
    st: Stamp,
    origin: Option<&Origin>,
) -> &'d mut Holding {
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
                started_by: origin.cloned(),
                ended_by: None,
            });
            d.holders.len() - 1
        }
    };
    &mut d.holders[i]
}

/// Ends `server`'s open holdings; `origin` is who asked for the end (`None`: an agent's event).
fn end_holding(d: &mut Device, server: ServerId, st: Stamp, end: HoldEnd, origin: Option<&Origin>) {
    for h in d
        .holders
        .iter_mut()
        .filter(|h| h.server_id == server && h.ended.is_none())
    {
        h.ended = Some((st, end));
        h.ended_by = origin.cloned();
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
    open_holding(d, server, how, st, None).attached = Some(st);
    d.last_change_seq = st.seq;
}

pub(super) fn attached<S: State>(v: &mut S, st: Stamp, e: &DeviceAttached) -> R {
    let holder = known_device_ref(v, e.device_id, Some(e.lineage_id), &e.host)?.holder;
    server_exists(v, e.server_id)?;
    if let Some(other) = holder.filter(|h| *h != e.server_id) {
        return reject(
            QuarantineReason::Conflict,
            format!("device {} is held by server {other}", e.device_id),
        );
    }
    attach(
        known_device_mut(v, e.device_id)?,
        e.server_id,
        e.address,
        e.method,
        &e.detail,
        HoldKind::Attached,
        st,
    );
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

pub(super) fn reattached<S: State>(v: &mut S, st: Stamp, e: &DeviceReattached) -> R {
    let new_holder = known_device_ref(v, e.new_device_id, Some(e.lineage_id), &e.host)?.holder;
    let Some(old_holder) = v.device_ref(e.old_device_id)?.map(|d| d.holder) else {
        return reject(
            QuarantineReason::UnknownDevice,
            format!("device {} was never discovered", e.old_device_id),
        );
    };
    server_exists(v, e.server_id)?;
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
    if let Some(other) = new_holder.filter(|h| *h != e.server_id) {
        return reject(
            QuarantineReason::Conflict,
            format!("device {} is held by server {other}", e.new_device_id),
        );
    }
    attach(
        known_device_mut(v, e.new_device_id)?,
        e.server_id,
        e.address,
        e.method,
        &e.detail,
        HoldKind::Reattached,
        st,
    );
    if old_holder == Some(e.server_id) {
        let o = known_device_mut(v, e.old_device_id)?;
        o.holder = None;
        o.attachment = None;
        end_holding(o, e.server_id, st, HoldEnd::MovedTo(e.new_device_id), None);
        o.last_change_seq = st.seq;
    }
    c.device_id = e.new_device_id;
    c.host = e.host.clone();
    c.awaiting = None;
    v.put_claim(c);
    let s = known_server_mut(v, e.server_id)?;
    for a in s
        .devices
        .iter_mut()
        .filter(|a| a.lineage_id == e.lineage_id)
    {
        a.device_id = e.new_device_id;
    }
    s.last_change_seq = st.seq;
    Ok(())
}

pub(super) fn released<S: State>(
    v: &mut S,
    st: Stamp,
    origin: Option<&Origin>,
    e: &DeviceReleased,
) -> R {
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
        if v.device_ref(id)?
            .is_none_or(|d| d.holder != Some(e.server_id))
        {
            continue;
        }
        let n = known_device_mut(v, id)?;
        n.holder = None;
        n.attachment = None;
        if matches!(n.status, DeviceStatus::Claimed | DeviceStatus::Attached) {
            n.status = DeviceStatus::Available;
        }
        end_holding(n, e.server_id, st, HoldEnd::Released(e.reason), origin);
        n.last_change_seq = st.seq;
    }
    Ok(())
}

/// The hypervisor refused a device for a server.
pub(super) fn attach_failed<S: State>(v: &mut S, st: Stamp, e: &DeviceAttachFailed) -> R {
    known_device_ref(v, e.device_id, None, &e.host)?;
    server_exists(v, e.server_id)?;
    let d = known_device_mut(v, e.device_id)?;
    d.attach_error = Some(AttachError {
        server_id: e.server_id,
        error: e.error.clone(),
        stamp: st,
    });
    d.last_change_seq = st.seq;
    Ok(())
}

/// Folds `LineageLabeled`: the lineage must be known and the label valid ([`label::check`]);
/// otherwise the event is quarantined (a forged or broken publisher: the command side checks
/// the same rule first).
pub(super) fn labeled<S: State>(v: &mut S, st: Stamp, e: &LineageLabeled) -> R {
    if let Some(l) = &e.label {
        if let Err(err) = usbpt_schemas::label::check(l) {
            return reject(
                QuarantineReason::Undecodable,
                format!("lineage {}: {err}", e.lineage_id),
            );
        }
    }
    let Some(mut l) = v.lineage(e.lineage_id)? else {
        return reject(
            QuarantineReason::UnknownDevice,
            format!("lineage {} was never discovered", e.lineage_id),
        );
    };
    l.label.clone_from(&e.label);
    l.label_changed = Some(st);
    v.put_lineage(l);
    Ok(())
}
