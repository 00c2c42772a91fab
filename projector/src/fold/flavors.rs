//! Flavor events: creation, sizing, USB requests, deletion.

use usbpt_schemas::*;

use super::semantics::{reject, R};
use super::state::State;
use crate::model::*;
use crate::tables as t;

pub(super) fn flavor_created<S: State>(v: &mut S, st: Stamp, e: &FlavorCreated) -> R {
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
        on_fingerprint_change: FingerprintPolicy::default(),
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
pub(super) fn flavor_sized<S: State>(v: &mut S, e: &FlavorSized) -> R {
    let mut f = live_flavor(v, e.flavor_id, &e.name, QuarantineReason::Conflict)?;
    f.ram_mb = e.ram_mb;
    f.vcpus = e.vcpus;
    f.disk_gb = e.disk_gb;
    v.put_flavor(&f);
    Ok(())
}

/// A live flavor's USB request replaced (the servers it placed keep their devices).
pub(super) fn flavor_usb_set<S: State>(v: &mut S, e: &FlavorUsbSet) -> R {
    let mut f = live_flavor(v, e.flavor_id, &e.name, QuarantineReason::Conflict)?;
    f.usb = e.usb.clone();
    v.put_flavor(&f);
    Ok(())
}

/// A live flavor's `on_fingerprint_change` policy.
pub(super) fn fingerprint_policy_set<S: State>(v: &mut S, e: &FlavorFingerprintPolicySet) -> R {
    let mut f = live_flavor(v, e.flavor_id, &e.name, QuarantineReason::Conflict)?;
    f.on_fingerprint_change = e.on_fingerprint_change;
    v.put_flavor(&f);
    Ok(())
}

pub(super) fn flavor_deleted<S: State>(v: &mut S, st: Stamp, e: &FlavorDeleted) -> R {
    let mut f = live_flavor(v, e.flavor_id, &e.name, QuarantineReason::Duplicate)?;
    f.deleted = Some(st);
    v.put_flavor(&f);
    let named = v.flavor_named(f.name.as_str())?;
    if named == Some(f.id.to_bytes()) {
        v.name_flavor(f.name.as_str(), None);
    }
    Ok(())
}
