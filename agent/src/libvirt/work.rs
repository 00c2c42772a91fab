//! Which work an event asks of this host, and the pure steps around it: the agent's view of
//! its devices ([`DeviceLookup`]), a definition refreshed with their current addresses, and the
//! words a state event's detail uses. No libvirt, no I/O.

use std::collections::HashMap;

use usbpt_schemas::subjects::{self, DefineWhy, WorkKind};
use usbpt_schemas::{
    AssignedDevice, DeviceId, Event, Fingerprint, HostName, LineageId, ProductId, ServerAction,
    ServerId, ServerName, UsbAddress, VendorId,
};

use super::domain::{DomainSpec, Layout};

/// What the agent knows about one of its devices right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceInfo {
    pub vendor: VendorId,
    pub product: ProductId,
    /// Current address; for an invalidated enumeration, the last one it had.
    pub address: UsbAddress,
    /// False once the enumeration is invalidated (unplugged, host rebooted, …).
    pub present: bool,
    /// Its descriptor fingerprint; `None` when the descriptors could not be read.
    pub fingerprint: Option<Fingerprint>,
}

/// The agent's knowledge the executor needs: its devices, and server names when it has them.
pub trait DeviceLookup: Sync {
    fn device(&self, id: &DeviceId) -> Option<DeviceInfo>;
    /// The server's name, for the domain's `<title>`; the events for a host do not carry it.
    fn server_name(&self, _server: &ServerId) -> Option<ServerName> {
        None
    }
}

impl DeviceLookup for HashMap<DeviceId, DeviceInfo> {
    fn device(&self, id: &DeviceId) -> Option<DeviceInfo> {
        self.get(id).copied()
    }
}

/// The work an event asks of this host, if any. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Define and start the domain with these devices (boot, resize or cold migration onto this
    /// host); `restart` stops a running domain first (resize in place).
    Define {
        server: ServerId,
        devices: Vec<AssignedDevice>,
        why: String,
        restart: bool,
    },
    Action {
        server: ServerId,
        action: ServerAction,
    },
    /// Destroy and undefine.
    Teardown { server: ServerId, why: String },
    /// Attach the lineage's current enumeration `device` in place of the one the server had: a
    /// re-attach held back for a changed fingerprint, now accepted.
    Reattach {
        server: ServerId,
        lineage: LineageId,
        device: DeviceId,
        fingerprint: Fingerprint,
    },
}

/// What `event` asks of the agent on `host`. Pure, and derived from the one routing-and-work
/// table ([`subjects::route`]): the agent works on exactly the events routed to its control
/// subject, so events for other hosts (and events for no host) give `None`.
pub fn work_for(host: &HostName, event: &Event) -> Option<Work> {
    let w = subjects::work_for_host(host, event)?;
    let server = w.server;
    Some(match w.work {
        WorkKind::Define { devices, why } => {
            let (why, restart) = match why {
                DefineWhy::Boot => ("boot".to_owned(), false),
                DefineWhy::Resize { from_host } if from_host == host => ("resize".into(), true),
                DefineWhy::Resize { from_host } => (format!("resize from host {from_host}"), false),
                DefineWhy::Migrate { from_host } => {
                    (format!("cold migration from host {from_host}"), false)
                }
            };
            Work::Define {
                server,
                devices: devices.to_vec(),
                why,
                restart,
            }
        }
        WorkKind::Action(action) => Work::Action { server, action },
        WorkKind::Teardown => Work::Teardown {
            server,
            why: "delete".into(),
        },
        WorkKind::Reattach {
            lineage,
            device,
            fingerprint,
        } => Work::Reattach {
            server,
            lineage: *lineage,
            device: *device,
            fingerprint: *fingerprint,
        },
    })
}

/// Whether a re-enumerated device goes back to the server that holds its lineage. Pure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReattachDecision {
    /// Re-attach, and record `fingerprint` in the domain's metadata (the new enumeration's, or
    /// the recorded one when the new one is unknown).
    Reattach { fingerprint: Option<Fingerprint> },
    /// Leave the domain as it is: the fingerprint the server was given (`expected`) is not the
    /// one the new enumeration shows (`seen`). An accept (`FingerprintAccepted`) lets it go on.
    Hold {
        expected: Fingerprint,
        seen: Fingerprint,
    },
}

/// The hold of ADR 0011 (`docs/identity.md`, "fingerprint_changed"): a re-attach the agent does
/// on its own is held when both fingerprints are known and differ. Unknown on either side
/// (a domain defined before fingerprints were recorded, descriptors unreadable) re-attaches as
/// before: there is nothing to compare. Pure.
pub fn reattach_or_hold(
    recorded: Option<Fingerprint>,
    seen: Option<Fingerprint>,
) -> ReattachDecision {
    match (recorded, seen) {
        (Some(expected), Some(seen)) if expected != seen => {
            ReattachDecision::Hold { expected, seen }
        }
        (recorded, seen) => ReattachDecision::Reattach {
            fingerprint: seen.or(recorded),
        },
    }
}

/// `spec` with every device's current address and presence from `lookup` (an enumeration the
/// agent no longer knows is absent), and the server's name when known. Pure.
pub fn with_current_devices(
    mut spec: DomainSpec,
    server: ServerId,
    lookup: &dyn DeviceLookup,
) -> DomainSpec {
    for d in &mut spec.devices {
        match lookup.device(&d.device_id) {
            Some(info) => {
                d.vendor = info.vendor;
                d.product = info.product;
                d.address = info.address;
                d.present = info.present;
            }
            None => d.present = false,
        }
    }
    if let Some(name) = lookup.server_name(&server) {
        spec.title = Some(name.to_string());
    }
    spec
}

/// `; devices: 1 absent (optional), 1 at 003:005` for a state event's detail.
pub fn devices_note(spec: &DomainSpec) -> String {
    let absent = spec.devices.iter().filter(|d| !d.present).count();
    let present: Vec<String> = spec
        .devices
        .iter()
        .filter(|d| d.present)
        .map(|d| d.address.to_string())
        .collect();
    format!(
        "; definition refreshed: {absent} device(s) absent (started without them), present at [{}]",
        present.join(", ")
    )
}

pub fn placement_text(l: &Layout, i: usize) -> Option<String> {
    let p = l.placements.get(i)?;
    let c = l
        .controllers
        .iter()
        .find(|c| c.index == p.controller_index)?;
    Some(format!(
        " on USB controller {} ({}) index {} port {}",
        c.model.as_str(),
        c.model.libvirt_model(),
        c.index,
        p.port
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Fingerprint = Fingerprint([0xa; 32]);
    const B: Fingerprint = Fingerprint([0xb; 32]);

    #[test]
    fn a_changed_fingerprint_is_held_naming_both() {
        assert_eq!(
            reattach_or_hold(Some(A), Some(B)),
            ReattachDecision::Hold {
                expected: A,
                seen: B
            }
        );
    }

    #[test]
    fn the_same_fingerprint_is_reattached_and_kept() {
        assert_eq!(
            reattach_or_hold(Some(A), Some(A)),
            ReattachDecision::Reattach {
                fingerprint: Some(A)
            }
        );
    }

    #[test]
    fn unknown_on_either_side_reattaches_keeping_what_is_known() {
        // An old domain (nothing recorded): the new enumeration's fingerprint is recorded.
        assert_eq!(
            reattach_or_hold(None, Some(B)),
            ReattachDecision::Reattach {
                fingerprint: Some(B)
            }
        );
        // Unreadable descriptors: nothing to compare, the recorded one stays.
        assert_eq!(
            reattach_or_hold(Some(A), None),
            ReattachDecision::Reattach {
                fingerprint: Some(A)
            }
        );
        assert_eq!(
            reattach_or_hold(None, None),
            ReattachDecision::Reattach { fingerprint: None }
        );
    }
}
