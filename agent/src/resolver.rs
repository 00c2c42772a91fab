//! The identity resolver: pure decisions. Given what the agent knows (a [`State`]), the host, its
//! boot id, the filter and one observation or a full snapshot, it says which events happen and
//! updates the state. No I/O, no clock: device ids come from an [`IdSource`].
//!
//! Rules (`docs/identity.md`):
//! - every enumeration (one device at one bus/devnum in one boot) gets a new `DeviceId`;
//! - its lineage is `vendor:product:serial` when the serial is present, not bogus (blank, all
//!   zeros, `0123456789ABCDEF`, `0123456789`, control characters) and no other candidate on
//!   the host has the same vendor, product and serial; otherwise `host + port path +
//!   vendor:product` (filtered devices, e.g. root hubs whose "serial" is a PCI address, never
//!   take part: they are not published);
//! - a lineage is fixed for the life of an enumeration: when a second device with the same serial
//!   appears, the newcomer (and every enumeration that begins while the clash lasts) takes a port
//!   lineage and `DeviceClashDetected` names every port; the device already there keeps its
//!   serial lineage until it is next enumerated (it may be claimed or attached: re-identifying a
//!   live enumeration would let the control plane hand the same device out twice);
//! - a re-enumeration is `DeviceInvalidated { superseded_by }` + `DeviceDiscovered { supersedes }`;
//!   `supersedes` is the lineage's previous enumeration, even one that ended long ago.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use usbpt_schemas::{
    DeviceClashDetected, DeviceDiscovered, DeviceId, DeviceInvalidated, Event, HostName,
    InvalidationReason, LineageId, LineageKey, LineageKind, PortPath, ProductId, VendorId,
};

use crate::filter::{Decision, Filter};
use crate::observation::{Observation, UsbDevice};

/// The host the resolver works for.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub host: &'a HostName,
    pub boot_id: &'a str,
}

/// Where new device ids come from (UUIDv7 in the agent, counters in tests).
pub trait IdSource {
    fn device_id(&mut self) -> DeviceId;
}

/// Fresh UUIDv7 ids (sorted by time).
#[derive(Debug, Clone, Copy, Default)]
pub struct V7Ids;

impl IdSource for V7Ids {
    fn device_id(&mut self) -> DeviceId {
        DeviceId::new_v7()
    }
}

impl<F: FnMut() -> DeviceId> IdSource for F {
    fn device_id(&mut self) -> DeviceId {
        self()
    }
}

/// One enumeration the agent knows to be present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Known {
    pub device_id: DeviceId,
    pub lineage_id: LineageId,
    pub lineage_kind: LineageKind,
    pub device: UsbDevice,
    /// Why it is not a passthrough candidate; `None` when it was published.
    pub filtered: Option<String>,
}

impl Known {
    pub fn is_published(&self) -> bool {
        self.filtered.is_none()
    }
}

/// Devices sharing a serial: vendor, product, serial.
pub type ClashKey = (VendorId, ProductId, String);

/// Previous enumerations remembered per lineage, for `supersedes`. The oldest are forgotten
/// beyond this many lineages (a host sees a few dozen in practice).
pub const LINEAGE_MEMORY: usize = 4096;

/// Everything the agent knows, persisted in its redb file between runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// The boot the known enumerations belong to.
    pub boot_id: Option<String>,
    /// Present enumerations by syspath (published or filtered).
    pub devices: BTreeMap<String, Known>,
    /// The latest published enumeration of each lineage, present or ended.
    pub lineages: BTreeMap<LineageId, DeviceId>,
    /// Port paths last reported in a `DeviceClashDetected`, per clashing serial.
    pub clashes: BTreeMap<ClashKey, BTreeSet<PortPath>>,
    /// Lineages in an open flapping episode ([`crate::flap`]): kept with the rest so that an
    /// episode survives a restart and is always cleared. The resolver never changes it.
    pub flapping: BTreeSet<LineageId>,
}

impl State {
    /// The published (candidate) enumerations: the agent's picture of the host.
    pub fn candidates(&self) -> impl Iterator<Item = &Known> {
        self.devices.values().filter(|k| k.is_published())
    }
    /// How many present devices the filter keeps out.
    pub fn filtered_count(&self) -> usize {
        self.devices.values().filter(|k| !k.is_published()).count()
    }

    fn remember_lineage(&mut self, lineage: LineageId, device: DeviceId) {
        self.lineages.insert(lineage, device);
        if self.lineages.len() > LINEAGE_MEMORY {
            // UUIDv7 ids sort by time: forget the lineage whose last enumeration is oldest.
            let live: BTreeSet<DeviceId> = self.devices.values().map(|k| k.device_id).collect();
            if let Some(oldest) = self
                .lineages
                .iter()
                .filter(|(_, d)| !live.contains(d))
                .min_by_key(|(_, d)| **d)
                .map(|(l, _)| *l)
            {
                self.lineages.remove(&oldest);
            }
        }
    }
}

/// A serial that identifies nothing: blank, all zeros, the well-known placeholders, or garbage.
pub fn is_bogus_serial(serial: &str) -> bool {
    let s = serial.trim();
    s.is_empty()
        || s.chars().all(|c| c == '0')
        || s.eq_ignore_ascii_case("0123456789ABCDEF")
        || s == "0123456789"
        || s.chars().any(char::is_control)
}

/// The device's serial when it could name a lineage (present and not bogus).
fn plausible_serial(d: &UsbDevice) -> Option<&str> {
    d.descriptors
        .serial
        .as_deref()
        .filter(|s| !is_bogus_serial(s))
}

fn clash_key(d: &UsbDevice) -> Option<ClashKey> {
    plausible_serial(d).map(|s| {
        (
            d.descriptors.vendor_id,
            d.descriptors.product_id,
            s.to_owned(),
        )
    })
}

fn lineage_of(ctx: Context<'_>, d: &UsbDevice, serial_unique: bool) -> (LineageId, LineageKind) {
    let key = match plausible_serial(d) {
        Some(serial) if serial_unique => LineageKey::Serial {
            vendor: d.descriptors.vendor_id,
            product: d.descriptors.product_id,
            serial,
        },
        _ => LineageKey::Port {
            host: ctx.host,
            port: &d.descriptors.port_path,
            vendor: d.descriptors.vendor_id,
            product: d.descriptors.product_id,
        },
    };
    (LineageId::derive(&key), key.kind())
}

fn discovered(ctx: Context<'_>, k: &Known, supersedes: Option<DeviceId>) -> Event {
    let d = &k.device;
    let discovery = DeviceDiscovered {
        device_id: k.device_id,
        lineage_id: k.lineage_id,
        lineage_kind: k.lineage_kind,
        host: ctx.host.clone(),
        boot_id: ctx.boot_id.to_owned(),
        descriptors: d.descriptors.clone(),
        syspath: d.syspath.clone(),
        supersedes,
    };
    Event::discovered(discovery, d.fingerprint)
}

fn invalidated(
    ctx: Context<'_>,
    k: &Known,
    reason: InvalidationReason,
    superseded_by: Option<DeviceId>,
) -> Event {
    Event::DeviceInvalidated(DeviceInvalidated {
        device_id: k.device_id,
        lineage_id: k.lineage_id,
        host: ctx.host.clone(),
        reason,
        superseded_by,
    })
}

/// The lineage's previous published enumeration, unless it is still present (then it is not
/// "previous": two live enumerations never share a lineage through `supersedes`).
fn predecessor(state: &State, lineage: LineageId) -> Option<DeviceId> {
    let prev = *state.lineages.get(&lineage)?;
    let live = state.devices.values().any(|k| k.device_id == prev);
    (!live).then_some(prev)
}

/// Starts a new enumeration for `device` (not in `state.devices` yet). `serial_unique` says
/// whether its serial is the only one of its kind on the host. Returns its `DeviceDiscovered`
/// when it is a candidate.
fn begin(
    state: &mut State,
    ctx: Context<'_>,
    decision: Decision,
    device: UsbDevice,
    serial_unique: bool,
    ids: &mut impl IdSource,
) -> (Known, Option<Event>) {
    let (lineage_id, lineage_kind) = lineage_of(ctx, &device, serial_unique);
    let known = Known {
        device_id: ids.device_id(),
        lineage_id,
        lineage_kind,
        device,
        filtered: decision.reason().map(str::to_owned),
    };
    let event = known.is_published().then(|| {
        let supersedes = predecessor(state, lineage_id);
        discovered(ctx, &known, supersedes)
    });
    if known.is_published() {
        state.remember_lineage(lineage_id, known.device_id);
    }
    state
        .devices
        .insert(known.device.syspath.clone(), known.clone());
    (known, event)
}

/// Whether no other candidate (not at `d`'s syspath) has `d`'s vendor, product and serial.
/// Filtered devices are left out: they are never published, so they cannot be confused.
fn serial_unique_among<'a>(d: &UsbDevice, others: impl IntoIterator<Item = &'a UsbDevice>) -> bool {
    let Some(key) = clash_key(d) else {
        return false;
    };
    !others
        .into_iter()
        .any(|o| o.syspath != d.syspath && clash_key(o).as_ref() == Some(&key))
}

/// A known enumeration was seen again: refresh its descriptors, and publish or withdraw it when
/// the filter's verdict changed (a new filter file, or interfaces that were not readable yet).
fn refresh(
    state: &mut State,
    ctx: Context<'_>,
    filter: &Filter,
    device: UsbDevice,
    out: &mut Vec<Event>,
) {
    let Some(known) = state.devices.get(&device.syspath).cloned() else {
        return;
    };
    let mut updated = known.clone();
    updated.device = known.device.refreshed_by(device);
    let decision = filter.decide(&updated.device);
    match (known.is_published(), decision) {
        (true, Decision::Filtered(reason)) => {
            out.push(invalidated(ctx, &known, InvalidationReason::Filtered, None));
            updated.filtered = Some(reason);
        }
        (false, Decision::Candidate) => {
            updated.filtered = None;
            let supersedes = state
                .lineages
                .get(&updated.lineage_id)
                .copied()
                .filter(|d| *d != updated.device_id);
            out.push(discovered(ctx, &updated, supersedes));
            state.remember_lineage(updated.lineage_id, updated.device_id);
        }
        (false, Decision::Filtered(reason)) => updated.filtered = Some(reason),
        (true, Decision::Candidate) => {}
    }
    state
        .devices
        .insert(updated.device.syspath.clone(), updated);
}

/// Reports serials that two or more present candidates share, when their ports are not all in
/// the last report for that serial, and forgets clashes once no device with the serial is left.
fn clashes(state: &mut State, ctx: Context<'_>, out: &mut Vec<Event>) {
    let mut groups: BTreeMap<ClashKey, BTreeSet<PortPath>> = BTreeMap::new();
    for k in state.candidates() {
        if let Some(key) = clash_key(&k.device) {
            groups
                .entry(key)
                .or_default()
                .insert(k.device.descriptors.port_path.clone());
        }
    }
    let mut reported = BTreeMap::new();
    for (key, ports) in groups {
        if ports.len() >= 2 {
            let grew = state
                .clashes
                .get(&key)
                .is_none_or(|before| !ports.is_subset(before));
            if grew {
                out.push(Event::DeviceClashDetected(DeviceClashDetected {
                    host: ctx.host.clone(),
                    vendor_id: key.0,
                    product_id: key.1,
                    serial: key.2.clone(),
                    port_paths: ports.iter().cloned().collect(),
                }));
            }
            reported.insert(key, ports);
        } else if let Some(before) = state.clashes.remove(&key) {
            // One of the twins is away: remember what was reported, so that it coming back to
            // the same port is not news. Forgotten once no device with the serial is left.
            reported.insert(key, before);
        }
    }
    state.clashes = reported;
}

/// What one observation means. Mutates `state` and returns the events, in publishing order.
pub fn observe(
    state: &mut State,
    ctx: Context<'_>,
    filter: &Filter,
    observation: Observation,
    ids: &mut impl IdSource,
) -> Vec<Event> {
    let mut out = Vec::new();
    match observation {
        Observation::Removed { syspath, address } => {
            let Some(known) = state.devices.get(&syspath) else {
                return out;
            };
            if address.is_some_and(|a| a != known.device.descriptors.address) {
                // A stale remove of an earlier enumeration at this syspath.
                return out;
            }
            if let Some(known) = state.devices.remove(&syspath) {
                if known.is_published() {
                    out.push(invalidated(
                        ctx,
                        &known,
                        InvalidationReason::Unplugged,
                        None,
                    ));
                }
            }
        }
        Observation::Present { device, .. } => {
            let decision = filter.decide(&device);
            match state.devices.get(&device.syspath) {
                Some(known) if known.device.same_enumeration(&device) => {
                    refresh(state, ctx, filter, device, &mut out);
                }
                Some(_) => {
                    // A new enumeration at a known syspath: the old one ended (its remove was
                    // missed, or a change event shows a new devnum).
                    let Some(old) = state.devices.remove(&device.syspath) else {
                        return out;
                    };
                    let unique =
                        serial_unique_among(&device, state.candidates().map(|k| &k.device));
                    let (new, event) = begin(state, ctx, decision, device, unique, ids);
                    if old.is_published() {
                        let same_lineage = new.lineage_id == old.lineage_id;
                        let (reason, by) = if same_lineage {
                            (
                                InvalidationReason::Reenumerated,
                                new.is_published().then_some(new.device_id),
                            )
                        } else {
                            (InvalidationReason::Unplugged, None)
                        };
                        out.push(invalidated(ctx, &old, reason, by));
                    }
                    out.extend(event);
                }
                None => {
                    let unique =
                        serial_unique_among(&device, state.candidates().map(|k| &k.device));
                    let (_, event) = begin(state, ctx, decision, device, unique, ids);
                    out.extend(event);
                }
            }
        }
    }
    clashes(state, ctx, &mut out);
    out
}

/// Why a full snapshot is being reconciled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconcile {
    /// The agent is starting: compare with what it knew when it stopped.
    Start,
    /// The agent may have missed events (monitor overflow): compare with what it believed.
    Rescan,
}

/// Reconciles the state with everything present now. At start with the same boot id, devices
/// still present keep their ids and produce no events; vanished ones are invalidated
/// (`VanishedWhileAgentDown`, or `Unplugged` on a rescan); new ones are discovered. A new boot
/// id invalidates every known enumeration (`HostRebooted`) and discovers every present device,
/// linked to its lineage's predecessor.
pub fn reconcile(
    state: &mut State,
    ctx: Context<'_>,
    filter: &Filter,
    snapshot: Vec<UsbDevice>,
    why: Reconcile,
    ids: &mut impl IdSource,
) -> Vec<Event> {
    let rebooted = why == Reconcile::Start
        && match state.boot_id.as_deref() {
            Some(previous) => previous != ctx.boot_id,
            None => !state.devices.is_empty(),
        };
    state.boot_id = Some(ctx.boot_id.to_owned());
    let vanished = match (why, rebooted) {
        (_, true) => InvalidationReason::HostRebooted,
        (Reconcile::Start, false) => InvalidationReason::VanishedWhileAgentDown,
        (Reconcile::Rescan, false) => InvalidationReason::Unplugged,
    };

    let present: BTreeMap<String, UsbDevice> = snapshot
        .into_iter()
        .map(|d| (d.syspath.clone(), d))
        .collect();

    // Which known enumerations ended.
    let ended_paths: Vec<String> = state
        .devices
        .iter()
        .filter(|(path, known)| {
            rebooted
                || present
                    .get(*path)
                    .is_none_or(|d| !known.device.same_enumeration(d))
        })
        .map(|(path, _)| path.clone())
        .collect();
    let ended: Vec<Known> = ended_paths
        .iter()
        .filter_map(|p| state.devices.remove(p))
        .collect();

    let mut out = Vec::new();
    // Invalidations are emitted first but name their successors, so decide the new ones first.
    let mut flips = Vec::new();
    let mut news = Vec::new();
    let mut candidates: Vec<&UsbDevice> = Vec::new();
    for (path, device) in &present {
        let decision = filter.decide(device);
        if decision.is_candidate() {
            candidates.push(device);
        }
        if state.devices.contains_key(path) {
            refresh(state, ctx, filter, device.clone(), &mut flips);
        } else {
            news.push((device.clone(), decision));
        }
    }
    let mut discovered_events = Vec::new();
    let mut successor: BTreeMap<LineageId, DeviceId> = BTreeMap::new();
    for (device, decision) in news {
        let unique = serial_unique_among(&device, candidates.iter().copied());
        let (known, event) = begin(state, ctx, decision, device, unique, ids);
        if known.is_published() {
            successor.insert(known.lineage_id, known.device_id);
        }
        discovered_events.extend(event);
    }
    for old in &ended {
        if old.is_published() {
            let by = successor.get(&old.lineage_id).copied();
            out.push(invalidated(ctx, old, vanished, by));
        }
    }
    out.extend(flips);
    out.extend(discovered_events);
    if rebooted {
        // Clashes of the previous boot were about enumerations that are all gone.
        state.clashes.clear();
    }
    clashes(state, ctx, &mut out);
    out
}

#[cfg(test)]
mod tests;
