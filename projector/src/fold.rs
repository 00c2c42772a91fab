//! Folding: how one event changes the view. [`apply`] is a pure function of (view, stream
//! sequence, subject, envelope) — no clock, no randomness, no I/O beyond the transaction it is
//! given — so replaying the stream rebuilds the same bytes.
//!
//! Bad input never stops the fold: an event that cannot be decoded, arrives on the wrong subject
//! or contradicts the view is recorded in the quarantine with a counted reason and changes
//! nothing else. Every handler checks everything first and writes after, so a rejected event
//! leaves no partial change behind.

use std::collections::BTreeMap;

use redb::{ReadableTable, Table, WriteTransaction};
use usbpt_schemas::subjects::{self, SubjectScope};
use usbpt_schemas::*;

use crate::error::ViewError;
use crate::model::*;
use crate::tables::{self as t, encode, get_by_id, get_by_str, Id};

/// What folding one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied; the event's kind.
    Applied(&'static str),
    /// Set aside with this reason.
    Quarantined(QuarantineReason),
    /// At or below the last applied sequence: a redelivery, already folded.
    Skipped,
}

/// The view's tables, open in one write transaction. Built by [`crate::View`] for each batch.
pub struct FoldTxn<'txn> {
    meta: Table<'txn, &'static str, u64>,
    devices: Table<'txn, Id, &'static [u8]>,
    lineages: Table<'txn, Id, &'static [u8]>,
    lineage_history: Table<'txn, (Id, u32), Id>,
    host_devices: Table<'txn, (&'static str, Id), ()>,
    free_by_host: Table<'txn, (&'static str, Id), ()>,
    free_by_match: Table<'txn, (u64, &'static str, Id), ()>,
    hosts: Table<'txn, &'static str, &'static [u8]>,
    claims: Table<'txn, Id, &'static [u8]>,
    subject_seqs: Table<'txn, &'static str, u64>,
    flavors: Table<'txn, Id, &'static [u8]>,
    flavor_names: Table<'txn, &'static str, Id>,
    servers: Table<'txn, Id, &'static [u8]>,
    server_names: Table<'txn, &'static str, Id>,
    quarantine: Table<'txn, u64, &'static [u8]>,
    counters: Table<'txn, &'static str, u64>,
    last_applied: u64,
    /// Counter increments of this transaction, written by [`FoldTxn::finish`].
    deltas: BTreeMap<(&'static str, &'static str), u64>,
}

impl std::fmt::Debug for FoldTxn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FoldTxn")
            .field("last_applied", &self.last_applied)
            .finish_non_exhaustive()
    }
}

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

impl<'txn> FoldTxn<'txn> {
    /// Opens (creating when missing) every table in `txn`.
    pub fn open(txn: &'txn WriteTransaction) -> Result<Self, ViewError> {
        let meta = txn.open_table(t::META)?;
        let last_applied = meta.get(t::META_LAST_APPLIED)?.map_or(0, |g| g.value());
        Ok(Self {
            meta,
            devices: txn.open_table(t::DEVICES)?,
            lineages: txn.open_table(t::LINEAGES)?,
            lineage_history: txn.open_table(t::LINEAGE_HISTORY)?,
            host_devices: txn.open_table(t::HOST_DEVICES)?,
            free_by_host: txn.open_table(t::FREE_BY_HOST)?,
            free_by_match: txn.open_table(t::FREE_BY_MATCH)?,
            hosts: txn.open_table(t::HOSTS)?,
            claims: txn.open_table(t::CLAIMS)?,
            subject_seqs: txn.open_table(t::SUBJECT_SEQS)?,
            flavors: txn.open_table(t::FLAVORS)?,
            flavor_names: txn.open_table(t::FLAVOR_NAMES)?,
            servers: txn.open_table(t::SERVERS)?,
            server_names: txn.open_table(t::SERVER_NAMES)?,
            quarantine: txn.open_table(t::QUARANTINE)?,
            counters: txn.open_table(t::COUNTERS)?,
            last_applied,
            deltas: BTreeMap::new(),
        })
    }

    /// The last stream sequence folded, including this transaction's events.
    pub fn last_applied(&self) -> u64 {
        self.last_applied
    }

    /// Writes the counters and the last applied sequence. Call before committing.
    pub fn finish(mut self) -> Result<u64, ViewError> {
        for ((group, name), n) in std::mem::take(&mut self.deltas) {
            let key = format!("{group}.{name}");
            let old = self.counters.get(key.as_str())?.map_or(0, |g| g.value());
            self.counters.insert(key.as_str(), old + n)?;
        }
        self.meta.insert(t::META_LAST_APPLIED, self.last_applied)?;
        Ok(self.last_applied)
    }

    /// Decodes `payload` and folds it (see [`apply`]); undecodable bytes are quarantined.
    pub fn fold(&mut self, seq: u64, subject: &str, payload: &[u8]) -> Result<Outcome, ViewError> {
        if seq <= self.last_applied {
            return Ok(Outcome::Skipped);
        }
        match codec::decode(payload) {
            Ok(env) => apply(self, seq, subject, &env),
            Err(e) => {
                let reason = match e {
                    DecodeError::UnknownSchemaVersion { .. } => {
                        QuarantineReason::UnknownSchemaVersion
                    }
                    DecodeError::UnknownVariant => QuarantineReason::UnknownEvent,
                    _ => QuarantineReason::Undecodable,
                };
                self.begin(seq, subject)?;
                self.set_aside(seq, subject, reason, e.to_string(), None)?;
                Ok(Outcome::Quarantined(reason))
            }
        }
    }

    /// Bookkeeping every stored message gets, whatever its payload: the last sequence per
    /// control-plane subject (what fenced publishes expect) and the last applied sequence.
    fn begin(&mut self, seq: u64, subject: &str) -> Result<(), ViewError> {
        // Claim and flavor subjects (and the other control-plane subjects: one row per server)
        // are tracked even when the payload is quarantined, so a fenced writer's expected
        // sequence is never stale.
        if matches!(subjects::scope_of(subject), Ok(SubjectScope::Control)) {
            self.subject_seqs.insert(subject, seq)?;
        }
        self.last_applied = seq;
        Ok(())
    }

    fn set_aside(
        &mut self,
        seq: u64,
        subject: &str,
        reason: QuarantineReason,
        detail: String,
        kind: Option<&str>,
    ) -> Result<(), ViewError> {
        let entry = QuarantineEntry {
            seq,
            subject: subject.to_owned(),
            reason,
            detail,
            kind: kind.map(str::to_owned),
        };
        self.quarantine
            .insert(seq, encode("quarantine", &entry)?.as_slice())?;
        *self
            .deltas
            .entry(("quarantined", reason.as_str()))
            .or_default() += 1;
        Ok(())
    }

    // ---- records ----

    fn device(&self, id: DeviceId) -> Result<Option<Device>, ViewError> {
        get_by_id(&self.devices, "devices", &id.to_bytes())
    }

    /// Stores a device and keeps the host and free-device indexes in step with it.
    fn put_device(&mut self, old: Option<&Device>, new: &Device) -> Result<(), ViewError> {
        let id = new.id().to_bytes();
        let host = new.host().as_str();
        let vp = t::vp_key(new.vendor_id(), new.product_id());
        let (was_free, is_free) = (old.is_some_and(Device::is_free), new.is_free());
        if was_free && !is_free {
            self.free_by_host.remove((host, id))?;
            self.free_by_match.remove((vp, host, id))?;
        } else if is_free && !was_free {
            self.free_by_host.insert((host, id), ())?;
            self.free_by_match.insert((vp, host, id), ())?;
        }
        let was_current = old.is_some_and(|d| d.current);
        if was_current && !new.current {
            self.host_devices.remove((host, id))?;
        } else if new.current && !was_current {
            self.host_devices.insert((host, id), ())?;
        }
        self.devices
            .insert(id, encode("devices", new)?.as_slice())?;
        Ok(())
    }

    fn lineage(&self, id: LineageId) -> Result<Option<Lineage>, ViewError> {
        get_by_id(&self.lineages, "lineages", &id.to_bytes())
    }

    fn claim(&self, lineage: LineageId) -> Result<Option<Claim>, ViewError> {
        get_by_id(&self.claims, "claims", &lineage.to_bytes())
    }

    fn put_claim(&mut self, c: &Claim) -> Result<(), ViewError> {
        self.claims
            .insert(c.lineage_id.to_bytes(), encode("claims", c)?.as_slice())?;
        Ok(())
    }

    fn server(&self, id: ServerId) -> Result<Option<Server>, ViewError> {
        get_by_id(&self.servers, "servers", &id.to_bytes())
    }

    fn known_server(&self, id: ServerId) -> R<Server> {
        match self.server(id)? {
            Some(s) => Ok(s),
            None => reject(
                QuarantineReason::UnknownServer,
                format!("server {id} was never requested"),
            ),
        }
    }

    fn put_server(&mut self, s: &Server) -> Result<(), ViewError> {
        self.servers
            .insert(s.id.to_bytes(), encode("servers", s)?.as_slice())?;
        Ok(())
    }

    fn flavor(&self, id: FlavorId) -> Result<Option<Flavor>, ViewError> {
        get_by_id(&self.flavors, "flavors", &id.to_bytes())
    }

    /// A device that must exist, on `lineage` (when given) and `host`.
    fn known_device(&self, id: DeviceId, lineage: Option<LineageId>, host: &HostName) -> R<Device> {
        let Some(d) = self.device(id)? else {
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

    fn touch_host(&mut self, host: &HostName, st: Stamp, body: &Event) -> Result<(), ViewError> {
        let mut h: Host = get_by_str(&self.hosts, "hosts", host.as_str())?.unwrap_or(Host {
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
        self.hosts
            .insert(host.as_str(), encode("hosts", &h)?.as_slice())?;
        Ok(())
    }
}

/// Folds one decoded event stored at `seq` on `subject`.
///
/// Checks the subject first (the envelope must be exactly where [`subjects::for_event`] would
/// publish it, and its host must be its subject's host), then applies the event. A refused event
/// is quarantined. Only storage failures are errors.
pub fn apply(
    view: &mut FoldTxn<'_>,
    seq: u64,
    subject: &str,
    env: &Envelope,
) -> Result<Outcome, ViewError> {
    if seq <= view.last_applied {
        return Ok(Outcome::Skipped);
    }
    view.begin(seq, subject)?;
    let kind = env.body.kind();
    let st = Stamp {
        seq,
        at: env.occurred_at,
    };
    let result = match check_subject(subject, env) {
        Err(fail) => Err(fail),
        Ok(()) => handle(view, st, &env.body),
    };
    match result {
        Ok(()) => {
            if let Some(host) = env.body.agent_host() {
                view.touch_host(host, st, &env.body)?;
            }
            *view.deltas.entry(("applied", kind)).or_default() += 1;
            Ok(Outcome::Applied(kind))
        }
        Err(Fail::Reject(reason, detail)) => {
            view.set_aside(seq, subject, reason, detail, Some(kind))?;
            Ok(Outcome::Quarantined(reason))
        }
        Err(Fail::View(e)) => Err(e),
    }
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

fn handle(v: &mut FoldTxn<'_>, st: Stamp, body: &Event) -> R {
    match body {
        // The host record is all it changes (see `touch_host`).
        Event::HostAgentStarted(_) | Event::DeviceClashDetected(_) => Ok(()),
        Event::DeviceDiscovered(e) => discovered(v, st, e),
        Event::DeviceInvalidated(e) => invalidated(v, st, e),
        Event::FlavorCreated(e) => flavor_created(v, st, e),
        Event::FlavorDeleted(e) => flavor_deleted(v, st, e),
        Event::ServerBootRequested(e) => boot_requested(v, st, e),
        Event::ServerScheduled(e) => {
            let mut s = v.known_server(e.server_id)?;
            not_deleted(&s)?;
            s.host = Some(e.host.clone());
            s.flavor_id = e.flavor_id;
            s.devices = e.devices.clone();
            s.scheduled = Some(st);
            s.last_change_seq = st.seq;
            Ok(v.put_server(&s)?)
        }
        Event::ServerScheduleFailed(e) => {
            let mut s = v.known_server(e.server_id)?;
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
            Ok(v.put_server(&s)?)
        }
        Event::DeviceClaimed(e) => claimed(v, st, e),
        Event::DeviceAttached(e) => attached(v, st, e),
        Event::DeviceReattached(e) => reattached(v, st, e),
        Event::DeviceReleased(e) => released(v, st, e),
        Event::ServerStateChanged(e) => {
            let mut s = v.known_server(e.server_id)?;
            s.state = e.state;
            s.state_detail = e.detail.clone();
            s.state_changed = st;
            s.last_change_seq = st.seq;
            Ok(v.put_server(&s)?)
        }
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
        Event::ServerMigrationRefused(e) => {
            let mut s = v.known_server(e.server_id)?;
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
            Ok(v.put_server(&s)?)
        }
        Event::ServerDeleted(e) => {
            let mut s = v.known_server(e.server_id)?;
            if let Some(d) = s.deleted {
                return reject(
                    QuarantineReason::Duplicate,
                    format!("server {} was already deleted at seq {}", s.id, d.seq),
                );
            }
            s.deleted = Some(st);
            s.last_change_seq = st.seq;
            v.put_server(&s)?;
            let named = v.server_names.get(s.name.as_str())?.map(|g| g.value());
            if named == Some(s.id.to_bytes()) {
                v.server_names.remove(s.name.as_str())?;
            }
            Ok(())
        }
        Event::ServerActionRequested(e) => {
            let mut s = v.known_server(e.server_id)?;
            s.last_action = Some(ActionRecord {
                stamp: st,
                action: e.action,
                host: e.host.clone(),
            });
            s.last_change_seq = st.seq;
            Ok(v.put_server(&s)?)
        }
        Event::DeviceAttachFailed(e) => {
            let mut d = v.known_device(e.device_id, None, &e.host)?;
            v.known_server(e.server_id)?;
            let old = d.clone();
            d.attach_error = Some(AttachError {
                server_id: e.server_id,
                error: e.error.clone(),
                stamp: st,
            });
            d.last_change_seq = st.seq;
            Ok(v.put_device(Some(&old), &d)?)
        }
    }
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

fn discovered(v: &mut FoldTxn<'_>, st: Stamp, e: &DeviceDiscovered) -> R {
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
    let claim = v.claim(e.lineage_id)?;
    let previous = match &lineage {
        Some(l) => v.device(l.current)?,
        None => None,
    };

    let mut new = Device {
        discovery: e.clone(),
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
            v.put_claim(&c)?;
        }
    }
    // The previous enumeration is superseded (normally the agent invalidated it already).
    if let Some(prev) = previous {
        let mut p = prev.clone();
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
        v.put_device(Some(&prev), &p)?;
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
    v.lineage_history.insert(
        (e.lineage_id.to_bytes(), l.enumerations),
        e.device_id.to_bytes(),
    )?;
    v.lineages
        .insert(e.lineage_id.to_bytes(), encode("lineages", &l)?.as_slice())?;
    v.put_device(None, &new)?;
    Ok(())
}

fn invalidated(v: &mut FoldTxn<'_>, st: Stamp, e: &DeviceInvalidated) -> R {
    let d = v.known_device(e.device_id, Some(e.lineage_id), &e.host)?;
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
    let mut n = d.clone();
    n.status = DeviceStatus::Invalidated;
    n.invalidation = Some(match d.invalidation {
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
    v.put_device(Some(&d), &n)?;
    // The lineage's claim stays (pointing at this enumeration) until released or re-attached;
    // a newer enumeration that was awaiting re-attach and died is no longer awaited.
    if let Some(mut c) = v.claim(e.lineage_id)? {
        if c.awaiting == Some(e.device_id) {
            c.awaiting = None;
            v.put_claim(&c)?;
        }
    }
    Ok(())
}

fn flavor_created(v: &mut FoldTxn<'_>, st: Stamp, e: &FlavorCreated) -> R {
    if v.flavor(e.flavor_id)?.is_some() {
        return reject(
            QuarantineReason::Duplicate,
            format!("flavor {} already exists", e.flavor_id),
        );
    }
    if let Some(other) = v.flavor_names.get(e.name.as_str())?.map(|g| g.value()) {
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
    };
    v.flavors
        .insert(f.id.to_bytes(), encode("flavors", &f)?.as_slice())?;
    v.flavor_names.insert(f.name.as_str(), f.id.to_bytes())?;
    Ok(())
}

fn flavor_deleted(v: &mut FoldTxn<'_>, st: Stamp, e: &FlavorDeleted) -> R {
    let Some(mut f) = v.flavor(e.flavor_id)? else {
        return reject(
            QuarantineReason::UnknownFlavor,
            format!("flavor {} was never created", e.flavor_id),
        );
    };
    if let Some(d) = f.deleted {
        return reject(
            QuarantineReason::Duplicate,
            format!("flavor {} was already deleted at seq {}", f.id, d.seq),
        );
    }
    if f.name != e.name {
        return reject(
            QuarantineReason::Conflict,
            format!("flavor {} is named {}, not {}", f.id, f.name, e.name),
        );
    }
    f.deleted = Some(st);
    v.flavors
        .insert(f.id.to_bytes(), encode("flavors", &f)?.as_slice())?;
    let named = v.flavor_names.get(f.name.as_str())?.map(|g| g.value());
    if named == Some(f.id.to_bytes()) {
        v.flavor_names.remove(f.name.as_str())?;
    }
    Ok(())
}

fn boot_requested(v: &mut FoldTxn<'_>, st: Stamp, e: &ServerBootRequested) -> R {
    if v.server(e.server_id)?.is_some() {
        return reject(
            QuarantineReason::Duplicate,
            format!("server {} was already requested", e.server_id),
        );
    }
    if let Some(other) = v.server_names.get(e.name.as_str())?.map(|g| g.value()) {
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
    };
    v.put_server(&s)?;
    v.server_names.insert(s.name.as_str(), s.id.to_bytes())?;
    Ok(())
}

fn moved(
    v: &mut FoldTxn<'_>,
    st: Stamp,
    server: ServerId,
    from_host: &HostName,
    host: &HostName,
    flavors: Option<(FlavorId, FlavorId)>,
    devices: &[AssignedDevice],
) -> R {
    let mut s = v.known_server(server)?;
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
        },
    );
    s.flavor_id = to_flavor;
    s.host = Some(host.clone());
    s.devices = devices.to_vec();
    s.last_change_seq = st.seq;
    Ok(v.put_server(&s)?)
}

fn claimed(v: &mut FoldTxn<'_>, st: Stamp, e: &DeviceClaimed) -> R {
    let s = v.known_server(e.server_id)?;
    not_deleted(&s)?;
    let d = v.known_device(e.device_id, Some(e.lineage_id), &e.host)?;
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
    v.put_claim(&Claim {
        lineage_id: e.lineage_id,
        device_id: e.device_id,
        host: e.host.clone(),
        server_id: e.server_id,
        request_index: e.request_index,
        controller: e.controller,
        follow: e.follow,
        claimed: st,
        awaiting: None,
    })?;
    let mut n = d.clone();
    if n.status == DeviceStatus::Available {
        n.status = DeviceStatus::Claimed;
    }
    n.holder = Some(e.server_id);
    open_holding(&mut n, e.server_id, HoldKind::Claimed, st);
    n.last_change_seq = st.seq;
    Ok(v.put_device(Some(&d), &n)?)
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

fn attached(v: &mut FoldTxn<'_>, st: Stamp, e: &DeviceAttached) -> R {
    let d = v.known_device(e.device_id, Some(e.lineage_id), &e.host)?;
    v.known_server(e.server_id)?;
    if let Some(other) = d.holder.filter(|h| *h != e.server_id) {
        return reject(
            QuarantineReason::Conflict,
            format!("device {} is held by server {other}", e.device_id),
        );
    }
    let mut n = d.clone();
    attach(
        &mut n,
        e.server_id,
        e.address,
        e.method,
        &e.detail,
        HoldKind::Attached,
        st,
    );
    v.put_device(Some(&d), &n)?;
    if let Some(mut c) = v.claim(e.lineage_id)? {
        if c.server_id == e.server_id && c.awaiting == Some(e.device_id) {
            c.device_id = e.device_id;
            c.host = e.host.clone();
            c.awaiting = None;
            v.put_claim(&c)?;
        }
    }
    Ok(())
}

fn reattached(v: &mut FoldTxn<'_>, st: Stamp, e: &DeviceReattached) -> R {
    let new = v.known_device(e.new_device_id, Some(e.lineage_id), &e.host)?;
    let Some(old) = v.device(e.old_device_id)? else {
        return reject(
            QuarantineReason::UnknownDevice,
            format!("device {} was never discovered", e.old_device_id),
        );
    };
    let mut s = v.known_server(e.server_id)?;
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
    let mut n = new.clone();
    attach(
        &mut n,
        e.server_id,
        e.address,
        e.method,
        &e.detail,
        HoldKind::Reattached,
        st,
    );
    v.put_device(Some(&new), &n)?;
    if old.holder == Some(e.server_id) {
        let mut o = old.clone();
        o.holder = None;
        o.attachment = None;
        end_holding(&mut o, e.server_id, st, HoldEnd::MovedTo(e.new_device_id));
        o.last_change_seq = st.seq;
        v.put_device(Some(&old), &o)?;
    }
    c.device_id = e.new_device_id;
    c.host = e.host.clone();
    c.awaiting = None;
    v.put_claim(&c)?;
    for a in s
        .devices
        .iter_mut()
        .filter(|a| a.lineage_id == e.lineage_id)
    {
        a.device_id = e.new_device_id;
    }
    s.last_change_seq = st.seq;
    Ok(v.put_server(&s)?)
}

fn released(v: &mut FoldTxn<'_>, st: Stamp, e: &DeviceReleased) -> R {
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
    v.claims.remove(e.lineage_id.to_bytes())?;
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
        let mut n = d.clone();
        n.holder = None;
        n.attachment = None;
        if matches!(n.status, DeviceStatus::Claimed | DeviceStatus::Attached) {
            n.status = DeviceStatus::Available;
        }
        end_holding(&mut n, e.server_id, st, HoldEnd::Released(e.reason));
        n.last_change_seq = st.seq;
        v.put_device(Some(&d), &n)?;
    }
    Ok(())
}
