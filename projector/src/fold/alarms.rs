//! Alarms the fold derives (ADR 0011, docs/identity.md "Alarms"): raised and cleared by events
//! only, so a replay raises and clears them at the same sequences. Each alarm lives on its
//! lineage's record ([`Lineage::alarms`]) with its raise and clear stamps; the counters
//! `alarms_raised.{kind}` and `alarms_cleared.{kind}` give the active ones by kind (`/metrics`).
//!
//! `LineageConflict`: a serial lineage discovered on a host while its current enumeration is
//! still present on another. The newcomer is held back ([`Lineage::pending`]) and the current
//! enumeration is blocked from new claims: the lineage is not schedulable until one side ends.
//! If the current one ends, the newcomer takes the lineage over (as if discovered then: the
//! known gap of the carried key closes); if the newcomer ends first, it is dropped. An operator
//! may keep either side without unplugging (`LineageConflictResolved`).
//!
//! `FingerprintChanged`: a serial lineage re-enumerated with another descriptor fingerprint.
//! Cleared when the expected fingerprint comes back, or when an operator (or a flavor's policy)
//! accepts the new one (`FingerprintAccepted`).
//!
//! `PortFlapping`: raised and cleared by the host agent's events (the agent sees its hotplugs
//! and owns the clock; ADR 0011). While active, the lineage's current enumeration is blocked
//! from new claims. A device is blocked while any cause lasts ([`blocks`]): clearing one alarm
//! does not free a device another still holds back.

use usbpt_schemas::{
    DeviceDiscovered, DeviceInvalidated, Fingerprint, FingerprintAccepted, LineageConflictResolved,
    LineageKind, PortFlapping, PortFlappingCleared,
};

use super::devices::discovered;
use super::semantics::{reject, R};
use super::state::State;
use crate::model::{
    Alarm, AlarmKind, Device, DeviceStatus, FingerprintAcceptance, Invalidation, Lineage,
    PendingDiscovery, QuarantineReason, Stamp, ALARMS_KEPT,
};

/// Whether discovering `e` while `prev` is its lineage's current enumeration is a conflict: a
/// serial lineage whose current enumeration is still present on another host.
pub(super) fn is_conflict(e: &DeviceDiscovered, l: &Lineage, prev: &Device) -> bool {
    l.kind == LineageKind::Serial
        && e.lineage_kind == LineageKind::Serial
        && prev.host() != &e.host
        && prev.invalidation.is_none()
}

/// Whether `l`'s enumerations are kept from new claims: another host's is held back (the
/// conflict lasts), or the lineage is flapping. Every cause at once: a device is unblocked only
/// when none is left.
pub(super) fn blocks(l: &Lineage) -> bool {
    l.pending.is_some()
        || l.alarms
            .iter()
            .any(|a| a.kind == AlarmKind::PortFlapping && a.is_active())
}

fn raise<S: State>(v: &mut S, l: &mut Lineage, alarm: Alarm) {
    v.count("alarms_raised", alarm.kind.as_str());
    l.alarms.push(alarm);
}

fn clear<S: State>(v: &mut S, l: &mut Lineage, kind: AlarmKind, st: Stamp, why: String) {
    clear_where(v, l, kind, |_| true, st, why)
}

/// Clears the active alarms of `kind` that `which` selects.
fn clear_where<S: State>(
    v: &mut S,
    l: &mut Lineage,
    kind: AlarmKind,
    which: impl Fn(&Alarm) -> bool,
    st: Stamp,
    why: String,
) {
    for a in l
        .alarms
        .iter_mut()
        .filter(|a| a.kind == kind && a.is_active() && which(a))
    {
        a.cleared = Some((st, why.clone()));
        v.count("alarms_cleared", kind.as_str());
    }
    // Keep every active alarm and the newest cleared ones.
    let cleared = l.alarms.iter().filter(|a| !a.is_active()).count();
    let mut drop = cleared.saturating_sub(ALARMS_KEPT);
    l.alarms.retain(|a| {
        if drop > 0 && !a.is_active() {
            drop -= 1;
            false
        } else {
            true
        }
    });
}

/// Raises (or widens) the conflict: `e` is held back, `prev` is blocked.
pub(super) fn conflict_raised<S: State>(
    v: &mut S,
    st: Stamp,
    e: &DeviceDiscovered,
    fingerprint: Option<Fingerprint>,
    mut l: Lineage,
    mut prev: Device,
) -> R {
    let here = prev.host().clone();
    let reason = format!(
        "serial lineage {} ({}:{} serial {}) is present on host {here} as device {} and was \
         discovered on host {} as device {}: a clone, a hub trick, or a key moved before host \
         {here} reported it gone. Neither side is schedulable until one is unplugged (the other \
         then takes the lineage) or an operator keeps one host",
        l.id,
        l.vendor_id,
        l.product_id,
        l.serial.as_deref().unwrap_or("-"),
        prev.id(),
        e.host,
        e.device_id,
    );
    // A newer newcomer replaces an older one (the older one's end is then not awaited).
    clear(
        v,
        &mut l,
        AlarmKind::LineageConflict,
        st,
        format!("superseded by the conflict with device {}", e.device_id),
    );
    raise(
        v,
        &mut l,
        Alarm {
            kind: AlarmKind::LineageConflict,
            raised: st,
            reason,
            hosts: vec![here, e.host.clone()],
            devices: vec![prev.id(), e.device_id],
            fingerprints: Vec::new(),
            cleared: None,
        },
    );
    l.pending = Some(PendingDiscovery {
        stamp: st,
        discovery: e.clone(),
        fingerprint,
    });
    v.put_lineage(l);
    if !prev.blocked {
        prev.blocked = true;
        prev.last_change_seq = st.seq;
        v.put_device(prev)?;
    }
    Ok(())
}

/// The held-back enumeration ended before the current one: the conflict clears, the current
/// enumeration is schedulable again. `true` when `e` was that enumeration (nothing else to
/// fold: the view never had it as a device).
pub(super) fn pending_ended<S: State>(v: &mut S, st: Stamp, e: &DeviceInvalidated) -> R<bool> {
    // Read borrowed: nearly every invalidation ends here without a change, and a copy of the
    // lineage (its alarms, its held-back discovery) per invalidation cost more than the check.
    let Some(l) = v.lineage_ref(e.lineage_id)? else {
        return Ok(false);
    };
    let held = l
        .pending
        .as_ref()
        .is_some_and(|p| p.discovery.device_id == e.device_id && p.discovery.host == e.host);
    if !held {
        // A held-back enumeration a later one replaced (a third host): its end is expected and
        // changes nothing; the view never had it as a device.
        let replaced = l.alarms.iter().any(|a| {
            a.kind == AlarmKind::LineageConflict
                && a.hosts.get(1) == Some(&e.host)
                && a.devices.get(1) == Some(&e.device_id)
        });
        return Ok(replaced && v.device_ref(e.device_id)?.is_none());
    }
    let Some(mut l) = v.lineage(e.lineage_id)? else {
        return Ok(false);
    };
    l.pending = None;
    let why = format!(
        "device {} on host {} ended ({:?}); the lineage stays on host {}",
        e.device_id, e.host, e.reason, l.current_host
    );
    clear(v, &mut l, AlarmKind::LineageConflict, st, why);
    let current = l.current;
    let still = blocks(&l);
    v.put_lineage(l);
    set_blocked(v, st, current, still)?;
    Ok(true)
}

/// The lineage's current enumeration ended (`e`, already folded) while another host's was held
/// back: the conflict clears and the held-back one takes the lineage over.
pub(super) fn current_ended<S: State>(v: &mut S, st: Stamp, e: &DeviceInvalidated) -> R {
    // Borrowed first, as in `pending_ended`: copied only when a held-back discovery takes over.
    let Some(l) = v.lineage_ref(e.lineage_id)? else {
        return Ok(());
    };
    if l.current != e.device_id || l.pending.is_none() {
        return Ok(());
    }
    let Some(l) = v.lineage(e.lineage_id)? else {
        return Ok(());
    };
    let Some(p) = &l.pending else {
        return Ok(());
    };
    let why = format!(
        "device {} on host {} ended ({:?}); device {} on host {} takes the lineage",
        e.device_id, e.host, e.reason, p.discovery.device_id, p.discovery.host
    );
    promote(v, st, l, why)
}

/// The held-back enumeration takes `l` over (its current one has ended or was set aside): the
/// conflict clears with `why` and the held-back discovery is folded as if discovered now.
fn promote<S: State>(v: &mut S, st: Stamp, mut l: Lineage, why: String) -> R {
    let Some(p) = l.pending.take() else {
        return Ok(());
    };
    clear(v, &mut l, AlarmKind::LineageConflict, st, why);
    let current = l.current;
    let still = blocks(&l);
    v.put_lineage(l);
    set_blocked(v, st, current, still)?;
    // As if discovered now: the lineage moves, a `lineage`-follow claim follows it.
    discovered(v, st, &p.discovery, p.fingerprint)
}

/// Folds `LineageConflictResolved`: the operator kept one side of the conflict.
///
/// Keeping the current enumeration drops the held-back one (its later end is expected and
/// changes nothing) and unblocks the current one. Keeping the held-back one sets the current one
/// aside (invalidated, superseded by the kept one: not free; its later end only adds why) and
/// promotes the held-back one exactly as the current one's end would.
///
/// An event for a lineage the view never had is quarantined (nothing can be resolved there). An
/// event that no longer matches the conflict (it ended by an unplug, or a third host replaced
/// the held-back side, between the command's decision and this event) is a no-op: a race the
/// command side cannot fence against (discoveries and ends are not on the claim subject), not
/// bad input, and the operator's intent is either done or about devices that are no longer in
/// conflict. Counted as `stale.LineageConflictResolved`.
pub(super) fn conflict_resolved<S: State>(v: &mut S, st: Stamp, e: &LineageConflictResolved) -> R {
    let Some(mut l) = v.lineage(e.lineage_id)? else {
        return reject(
            QuarantineReason::UnknownDevice,
            format!("lineage {} was never discovered", e.lineage_id),
        );
    };
    let held = l
        .pending
        .as_ref()
        .map(|p| (p.discovery.host.clone(), p.discovery.device_id));
    let Some((held_host, held_id)) = held else {
        v.count("stale", "LineageConflictResolved");
        return Ok(());
    };
    let current_host = l.current_host.clone();
    if (e.kept_device, e.dropped_device) == (l.current, held_id) && e.keep_host == current_host {
        l.pending = None;
        let why = format!(
            "an operator kept host {current_host} (device {}); device {held_id} on host \
             {held_host} is set aside until it ends",
            l.current
        );
        clear(v, &mut l, AlarmKind::LineageConflict, st, why);
        let current = l.current;
        let still = blocks(&l);
        v.put_lineage(l);
        return set_blocked(v, st, current, still);
    }
    if (e.kept_device, e.dropped_device) == (held_id, l.current) && e.keep_host == held_host {
        let why = format!(
            "an operator kept host {held_host} (device {held_id}), which takes the lineage; \
             device {} on host {current_host} is set aside until it ends",
            l.current
        );
        if let Some(mut old) = v.device(l.current)? {
            if old.invalidation.is_none() {
                old.status = DeviceStatus::Invalidated;
                old.invalidation = Some(Invalidation {
                    stamp: st,
                    reason: None,
                    superseded_by: Some(held_id),
                });
                old.last_change_seq = st.seq;
                v.put_device(old)?;
            }
        }
        return promote(v, st, l, why);
    }
    v.count("stale", "LineageConflictResolved");
    Ok(())
}

/// Folds `FingerprintAccepted`: the accepted fingerprint is the lineage's own from now on. The
/// active `fingerprint_changed` alarm clears ("accepted by operator", or "by flavor policy"),
/// and the acceptance is recorded on the lineage. Should the current enumeration report yet
/// another fingerprint (it re-enumerated after the command was decided), a new alarm is raised
/// against the accepted one. A lineage the view never had is quarantined; an accept with no
/// active alarm (a second accept of the same change) only records the acceptance.
pub(super) fn fingerprint_accepted<S: State>(v: &mut S, st: Stamp, e: &FingerprintAccepted) -> R {
    let Some(mut l) = v.lineage(e.lineage_id)? else {
        return reject(
            QuarantineReason::UnknownDevice,
            format!("lineage {} was never discovered", e.lineage_id),
        );
    };
    let by = if e.by_policy {
        "by flavor policy"
    } else {
        "by operator"
    };
    clear(
        v,
        &mut l,
        AlarmKind::FingerprintChanged,
        st,
        format!("fingerprint {} accepted {by}", e.fingerprint),
    );
    l.fingerprint_accepted = Some(FingerprintAcceptance {
        stamp: st,
        fingerprint: e.fingerprint,
        by_policy: e.by_policy,
    });
    let current = v.device(l.current)?;
    if let Some(d) = current.filter(|d| d.fingerprint.is_some_and(|f| f != e.fingerprint)) {
        let now = d.fingerprint.unwrap_or(e.fingerprint);
        let reason = format!(
            "serial lineage {} reports fingerprint {now} on host {} as device {}, not the \
             fingerprint {} just accepted",
            l.id,
            d.host(),
            d.id(),
            e.fingerprint
        );
        raise(
            v,
            &mut l,
            Alarm {
                kind: AlarmKind::FingerprintChanged,
                raised: st,
                reason,
                hosts: vec![d.host().clone()],
                devices: vec![d.id()],
                fingerprints: vec![e.fingerprint, now],
                cleared: None,
            },
        );
    }
    v.put_lineage(l);
    Ok(())
}

fn set_blocked<S: State>(v: &mut S, st: Stamp, id: usbpt_schemas::DeviceId, blocked: bool) -> R {
    if let Some(mut d) = v.device(id)? {
        if d.blocked != blocked {
            d.blocked = blocked;
            d.last_change_seq = st.seq;
            v.put_device(d)?;
        }
    }
    Ok(())
}

/// After `e` (with `fingerprint`) became its serial lineage's current enumeration, following
/// one whose fingerprint was `before`: a different fingerprint raises `FingerprintChanged`
/// (a spoofed serial, or new firmware); the expected fingerprint coming back clears it. Only
/// enumerations that report a fingerprint are compared.
pub(super) fn fingerprint_seen<S: State>(
    v: &mut S,
    st: Stamp,
    e: &DeviceDiscovered,
    fingerprint: Option<Fingerprint>,
    before: Option<Fingerprint>,
) -> R {
    if e.lineage_kind != LineageKind::Serial {
        return Ok(());
    }
    let (Some(now), Some(mut l)) = (fingerprint, v.lineage(e.lineage_id)?) else {
        return Ok(());
    };
    let active = l
        .alarms
        .iter()
        .find(|a| a.kind == AlarmKind::FingerprintChanged && a.is_active());
    let Some(expected) = active
        .and_then(|a| a.fingerprints.first().copied())
        .or(before)
    else {
        return Ok(());
    };
    match (now == expected, active.is_some()) {
        (true, true) => {
            let why = format!(
                "device {} on host {} reports the expected fingerprint {expected} again",
                e.device_id, e.host
            );
            clear(v, &mut l, AlarmKind::FingerprintChanged, st, why);
            v.put_lineage(l);
        }
        (false, false) => {
            let reason = format!(
                "serial lineage {} ({}:{} serial {}) re-enumerated on host {} as device {} with \
                 fingerprint {now}, not {expected}: the same serial with other descriptors (new \
                 firmware, or a device that copies the serial). Check the device; the alarm \
                 clears when a device with fingerprint {expected} is plugged again",
                l.id,
                l.vendor_id,
                l.product_id,
                l.serial.as_deref().unwrap_or("-"),
                e.host,
                e.device_id,
            );
            raise(
                v,
                &mut l,
                Alarm {
                    kind: AlarmKind::FingerprintChanged,
                    raised: st,
                    reason,
                    hosts: vec![e.host.clone()],
                    devices: vec![e.device_id],
                    fingerprints: vec![expected, now],
                    cleared: None,
                },
            );
            v.put_lineage(l);
        }
        _ => {}
    }
    Ok(())
}

/// A host agent reports `e.lineage_id` flapping: a `port_flapping` alarm on the lineage, and its
/// current enumeration blocked from new claims until the agent clears it. The same episode
/// reported again (an agent that re-published) changes nothing.
pub(super) fn flapping<S: State>(v: &mut S, st: Stamp, e: &PortFlapping) -> R {
    let Some(d) = v.device(e.device_id)? else {
        return reject(
            QuarantineReason::UnknownDevice,
            format!(
                "PortFlapping names device {}, never discovered",
                e.device_id
            ),
        );
    };
    if d.lineage_id() != e.lineage_id || d.host() != &e.host {
        return reject(
            QuarantineReason::LineageMismatch,
            format!(
                "PortFlapping names device {} of lineage {} on host {}, but the device is of \
                 lineage {} on host {}",
                e.device_id,
                e.lineage_id,
                e.host,
                d.lineage_id(),
                d.host()
            ),
        );
    }
    let Some(mut l) = v.lineage(e.lineage_id)? else {
        return Ok(());
    };
    let open = l
        .alarms
        .iter()
        .any(|a| a.kind == AlarmKind::PortFlapping && a.is_active() && a.hosts == [e.host.clone()]);
    if open {
        return Ok(());
    }
    let what = match l.serial.as_deref() {
        Some(serial) => format!("{}:{} serial {serial}", l.vendor_id, l.product_id),
        None => format!("{}:{}", l.vendor_id, l.product_id),
    };
    let reason = format!(
        "lineage {} ({what}) enumerated {} times within {} s on host {} port {} (more than {}): \
         a failing port, hub, cable or power supply. Automatic re-attach is paused and the device \
         is not scheduled; it clears by itself once the agent sees no enumeration for its quiet \
         period. Check the cable and hub, or move the device to another port",
        l.id, e.enumerations, e.window_secs, e.host, e.port_path, e.threshold,
    );
    raise(
        v,
        &mut l,
        Alarm {
            kind: AlarmKind::PortFlapping,
            raised: st,
            reason,
            hosts: vec![e.host.clone()],
            devices: vec![e.device_id],
            fingerprints: Vec::new(),
            cleared: None,
        },
    );
    let current = l.current;
    v.put_lineage(l);
    set_blocked(v, st, current, true)
}

/// The host agent saw no enumeration of the lineage for its quiet period: the alarm clears and
/// the current enumeration is free again unless another cause still blocks it. A clear with no
/// active alarm (the agent's episode began before the view, or was already cleared) is a no-op.
pub(super) fn flapping_cleared<S: State>(v: &mut S, st: Stamp, e: &PortFlappingCleared) -> R {
    let Some(mut l) = v.lineage(e.lineage_id)? else {
        return Ok(());
    };
    let host = e.host.clone();
    let mine = |a: &Alarm| a.hosts.first() == Some(&host);
    let open = l
        .alarms
        .iter()
        .any(|a| a.kind == AlarmKind::PortFlapping && a.is_active() && mine(a));
    if !open {
        return Ok(());
    }
    let why = format!(
        "no enumeration on host {} for {} s; {}",
        e.host,
        e.quiet_secs,
        match e.device_id {
            Some(d) => format!("device {d} is present"),
            None => "the device is not plugged".to_owned(),
        }
    );
    clear_where(v, &mut l, AlarmKind::PortFlapping, mine, st, why);
    let current = l.current;
    let still = blocks(&l);
    v.put_lineage(l);
    set_blocked(v, st, current, still)
}
