//! Server events: boot requests, scheduling, state, resizes and migrations, deletion.

use usbpt_schemas::*;

use super::semantics::{
    known_device, known_server, known_server_mut, known_server_ref, not_deleted, reject, R,
};
use super::state::State;
use crate::model::*;
use crate::tables as t;

pub(super) fn boot_requested<S: State>(v: &mut S, st: Stamp, e: &ServerBootRequested) -> R {
    if v.server_exists(e.server_id)? {
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
    if !v.flavor_exists(e.flavor_id)? {
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
        reattach_held: Vec::new(),
    };
    v.name_server(s.name.as_str(), Some(s.id.to_bytes()));
    v.put_server(s);
    Ok(())
}

/// A server placed on a host with its devices.
pub(super) fn scheduled<S: State>(v: &mut S, st: Stamp, e: &ServerScheduled) -> R {
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
pub(super) fn schedule_failed<S: State>(v: &mut S, st: Stamp, e: &ServerScheduleFailed) -> R {
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
pub(super) fn state_changed<S: State>(v: &mut S, st: Stamp, e: &ServerStateChanged) -> R {
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

/// A live server renamed (the name index follows) or its description changed.
pub(super) fn server_updated<S: State>(v: &mut S, st: Stamp, e: &ServerUpdated) -> R {
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

/// A resize awaits confirmation: the way back is kept until then.
pub(super) fn resize_verifying<S: State>(v: &mut S, st: Stamp, e: &ServerResizeVerifying) -> R {
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
pub(super) fn resize_ended<S: State>(
    v: &mut S,
    st: Stamp,
    server_id: ServerId,
    reverted: bool,
) -> R {
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

pub(super) fn moved<S: State>(
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
    if flavors.is_some() && !v.flavor_exists(to_flavor)? {
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

/// A migration refused: kept (capped) and counted.
pub(super) fn migration_refused<S: State>(v: &mut S, st: Stamp, e: &ServerMigrationRefused) -> R {
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

/// The last action asked of a server.
pub(super) fn action_requested<S: State>(v: &mut S, st: Stamp, e: &ServerActionRequested) -> R {
    let s = known_server_mut(v, e.server_id)?;
    s.last_action = Some(ActionRecord {
        stamp: st,
        action: e.action,
        host: e.host.clone(),
    });
    s.last_change_seq = st.seq;
    Ok(())
}

/// A server deleted: its name is free again.
pub(super) fn server_deleted<S: State>(v: &mut S, st: Stamp, e: &ServerDeleted) -> R {
    let s = known_server_ref(v, e.server_id)?;
    if let Some(d) = s.deleted {
        return reject(
            QuarantineReason::Duplicate,
            format!("server {} was already deleted at seq {}", s.id, d.seq),
        );
    }
    let name = s.name.clone();
    let named = v.server_named(name.as_str())?;
    if named == Some(e.server_id.to_bytes()) {
        v.name_server(name.as_str(), None);
    }
    let s = known_server_mut(v, e.server_id)?;
    s.deleted = Some(st);
    s.last_change_seq = st.seq;
    Ok(())
}

fn push_capped<T>(list: &mut Vec<T>, item: T) {
    list.push(item);
    if list.len() > SERVER_HISTORY_KEEP {
        list.remove(0);
    }
}

/// An agent held a re-attach for a changed fingerprint: the server shows it (one record per
/// lineage, the newest) until the lineage is re-attached or released. The server must hold the
/// lineage's claim and the enumeration must be known on that host.
pub(super) fn reattach_held<S: State>(v: &mut S, st: Stamp, e: &DeviceReattachHeld) -> R {
    known_device(v, e.device_id, Some(e.lineage_id), &e.host)?;
    if v.claim(e.lineage_id)?
        .is_none_or(|c| c.server_id != e.server_id)
    {
        return reject(
            QuarantineReason::Conflict,
            format!(
                "lineage {} has no claim by server {}",
                e.lineage_id, e.server_id
            ),
        );
    }
    let s = known_server_mut(v, e.server_id)?;
    s.reattach_held.retain(|h| h.lineage_id != e.lineage_id);
    s.reattach_held.push(ReattachHold {
        stamp: st,
        lineage_id: e.lineage_id,
        device_id: e.device_id,
        expected: e.expected,
        seen: e.seen,
    });
    s.last_change_seq = st.seq;
    Ok(())
}

/// The lineage was re-attached or released: a held re-attach for it is over.
pub(super) fn end_reattach_hold<S: State>(
    v: &mut S,
    st: Stamp,
    server: ServerId,
    lineage: LineageId,
) -> R {
    let held = v
        .server_ref(server)?
        .is_some_and(|s| s.reattach_held.iter().any(|h| h.lineage_id == lineage));
    if held {
        let s = known_server_mut(v, server)?;
        s.reattach_held.retain(|h| h.lineage_id != lineage);
        s.last_change_seq = st.seq;
    }
    Ok(())
}
