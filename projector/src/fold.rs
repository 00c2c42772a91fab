//! Folding: how one event changes the view. [`apply`] is a pure function of (view, stream
//! sequence, subject, envelope) — no clock, no randomness, no I/O beyond the reads of the
//! committed view it is given — so replaying the stream rebuilds the same bytes.
//!
//! A [`FoldTxn`] stages a batch's changes in memory (see [`crate::stage`] and ADR 0004) and
//! writes them in one redb write transaction at the end; how the events are cut into batches
//! does not change the result.
//!
//! Bad input never stops the fold: an event that cannot be decoded, arrives on the wrong subject
//! or contradicts the view is recorded in the quarantine with a counted reason and changes
//! nothing else. Every handler checks everything first and writes after, so a rejected event
//! leaves no partial change behind.

use std::collections::BTreeMap;
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable, WriteTransaction};
use usbpt_schemas::subjects::{self, SubjectScope};
use usbpt_schemas::*;

use crate::error::ViewError;
use crate::model::*;
use crate::stage::{Base, Map, Rows};
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

/// A device's index membership as committed, kept when a batch first reads the device: at
/// commit the indexes change only where the final row differs from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Indexed {
    free: bool,
    current: bool,
}

impl Indexed {
    fn of(d: &Device) -> Self {
        Self {
            free: d.is_free(),
            current: d.current,
        }
    }
}

/// One batch of folding: reads the view as committed plus the batches folded before it and not
/// forgotten yet (`prior`, newest first: they are written before this one), and stages every
/// change in memory ([`Staged`]). Built by [`crate::View`].
pub struct FoldTxn {
    base: Base,
    prior: Vec<Arc<Staged>>,
    s: Staged,
}

/// A batch's changes, decoded: what [`Staged::write`] writes in one redb write transaction.
/// Once folding ends it is frozen (shared, read-only) until written, and may be kept a little
/// longer as a cache of rows the next batches read.
pub struct Staged {
    devices: Rows<Id, Device>,
    /// The committed index membership of every device in `devices` (`None`: not in the view).
    devices_indexed: Map<Id, Option<Indexed>>,
    lineages: Rows<Id, Lineage>,
    /// New `lineage_history` rows (the fold only appends to it).
    lineage_history: Vec<((Id, u32), Id)>,
    hosts: Rows<String, Host>,
    claims: Rows<Id, Claim>,
    /// The last sequence per control-plane subject (the fold only writes it).
    subject_seqs: Map<String, u64>,
    flavors: Rows<Id, Flavor>,
    flavor_names: Rows<String, Id>,
    servers: Rows<Id, Server>,
    server_names: Rows<String, Id>,
    /// New quarantine entries, encoded.
    quarantine: Vec<(u64, Vec<u8>)>,
    /// The last applied sequence the batch starts after (the view must end there when it is
    /// written).
    start: u64,
    last_applied: u64,
    /// Events folded (applied or quarantined) in this batch.
    folded: u64,
    /// Counter increments of this batch.
    deltas: BTreeMap<(&'static str, &'static str), u64>,
    /// The changed rows encoded and in key order, prepared when folding ends (on the fold
    /// thread) so that writing the batch is only B-tree inserts.
    prepared: WriteSet,
}

/// Encoded record rows in key order (`None`: the row is removed).
type EncodedRows = Vec<(Id, Option<Vec<u8>>)>;

/// A frozen batch's writes: records encoded, rows and index keys sorted in each table's key
/// order. Index keys name their device by its report (`Arc`: the host name is not copied).
#[derive(Default)]
struct WriteSet {
    devices: Vec<(Id, Vec<u8>)>,
    device_info: Vec<(Id, Vec<u8>)>,
    /// `host_devices` rows to insert (`true`) or remove, by (host, device id).
    current: Vec<(Arc<DeviceDiscovered>, bool)>,
    /// `free_by_host` rows, by (host, device id).
    free_by_host: Vec<(Arc<DeviceDiscovered>, bool)>,
    /// `free_by_match` rows, by (vendor:product, host, device id).
    free_by_match: Vec<(Arc<DeviceDiscovered>, bool)>,
    lineages: EncodedRows,
    hosts: Vec<(String, Vec<u8>)>,
    claims: EncodedRows,
    flavors: EncodedRows,
    servers: EncodedRows,
}

impl std::fmt::Debug for FoldTxn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FoldTxn")
            .field("staged", &self.s)
            .field("prior", &self.prior.len())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged")
            .field("last_applied", &self.last_applied)
            .field("folded", &self.folded)
            .field("rows", &self.rows())
            .finish_non_exhaustive()
    }
}

/// Why a handler refused an event (internal: becomes a quarantine entry), or a storage failure.
pub(crate) enum Fail {
    Reject(QuarantineReason, String),
    View(ViewError),
}

impl<E: Into<ViewError>> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail::View(e.into())
    }
}

pub(crate) type R<T = ()> = Result<T, Fail>;

pub(crate) fn reject<T>(reason: QuarantineReason, detail: impl Into<String>) -> R<T> {
    Err(Fail::Reject(reason, detail.into()))
}

/// Creates every table of the view that is missing (so read snapshots never miss one) and
/// returns the last applied sequence.
pub(crate) fn create_tables(txn: &WriteTransaction) -> Result<u64, ViewError> {
    let meta = txn.open_table(t::META)?;
    let last = meta.get(t::META_LAST_APPLIED)?.map_or(0, |g| g.value());
    txn.open_table(t::DEVICES)?;
    txn.open_table(t::DEVICE_INFO)?;
    txn.open_table(t::LINEAGES)?;
    txn.open_table(t::LINEAGE_HISTORY)?;
    txn.open_table(t::HOST_DEVICES)?;
    txn.open_table(t::FREE_BY_HOST)?;
    txn.open_table(t::FREE_BY_MATCH)?;
    txn.open_table(t::HOSTS)?;
    txn.open_table(t::CLAIMS)?;
    txn.open_table(t::SUBJECT_SEQS)?;
    txn.open_table(t::FLAVORS)?;
    txn.open_table(t::FLAVOR_NAMES)?;
    txn.open_table(t::SERVERS)?;
    txn.open_table(t::SERVER_NAMES)?;
    txn.open_table(t::QUARANTINE)?;
    txn.open_table(t::COUNTERS)?;
    Ok(last)
}

/// The newest value a prior batch knows for `key` (`Some(None)`: absent), if any knows it.
fn prior_row<K, V, Q>(
    prior: &[Arc<Staged>],
    rows: impl Fn(&Staged) -> &Rows<K, V>,
    key: &Q,
) -> Option<Option<V>>
where
    K: Ord + std::hash::Hash + std::borrow::Borrow<Q>,
    V: Clone,
    Q: std::hash::Hash + Eq + ?Sized,
{
    prior
        .iter()
        .find_map(|p| rows(p).peek(key).map(|row| row.now.clone()))
}

/// A record under a UUID key as the batch sees it: staged, else from the newest prior batch
/// that knows it, else from the committed view.
fn staged_record<V: serde::de::DeserializeOwned + Clone>(
    rows: &mut Rows<Id, V>,
    prior: &[Arc<Staged>],
    pick: fn(&Staged) -> &Rows<Id, V>,
    base: &redb::ReadOnlyTable<Id, &'static [u8]>,
    table: &'static str,
    key: Id,
) -> Result<Option<V>, ViewError> {
    rows.get(&key, || unstaged_record(prior, pick, base, table, &key))
}

/// A record under a UUID key as the batch would load it: from the newest prior batch that
/// knows it, else from the committed view.
fn unstaged_record<V: serde::de::DeserializeOwned + Clone>(
    prior: &[Arc<Staged>],
    pick: fn(&Staged) -> &Rows<Id, V>,
    base: &redb::ReadOnlyTable<Id, &'static [u8]>,
    table: &'static str,
    key: &Id,
) -> Result<Option<V>, ViewError> {
    match prior_row(prior, pick, key) {
        Some(row) => Ok(row),
        None => get_by_id(base, table, key),
    }
}

/// One staged record table's changed rows, encoded, in key order (`None`: removed).
fn encode_records<V: serde::Serialize + Clone>(
    name: &'static str,
    rows: &Rows<Id, V>,
) -> Result<EncodedRows, ViewError> {
    rows.dirty()
        .into_iter()
        .map(|(id, row)| Ok((*id, row.map(|v| encode(name, v)).transpose()?)))
        .collect()
}

/// Writes encoded record rows (in key order).
fn write_records(
    table: &mut redb::Table<'_, Id, &'static [u8]>,
    rows: &EncodedRows,
) -> Result<(), ViewError> {
    for (id, row) in rows {
        match row {
            Some(bytes) => table.insert(id, bytes.as_slice())?,
            None => table.remove(id)?,
        };
    }
    Ok(())
}

/// Writes a staged name index's changed rows.
fn write_names(
    table: &mut redb::Table<'_, &'static str, Id>,
    rows: &Rows<String, Id>,
) -> Result<(), ViewError> {
    for (name, row) in rows.dirty() {
        match row {
            Some(id) => table.insert(name.as_str(), id)?,
            None => table.remove(name.as_str())?,
        };
    }
    Ok(())
}

impl FoldTxn {
    /// Starts a batch on the committed state of `db` and the batches in `prior` (newest
    /// first), which must be every batch folded but not yet committed, plus any committed ones
    /// to read through as a cache.
    pub(crate) fn begin(
        db: &impl ReadableDatabase,
        prior: Vec<Arc<Staged>>,
    ) -> Result<Self, ViewError> {
        let base = Base::open(db)?;
        let last_applied = match prior.first() {
            Some(p) => p.last_applied,
            None => base
                .meta
                .get(t::META_LAST_APPLIED)?
                .map_or(0, |g| g.value()),
        };
        Ok(Self {
            base,
            prior,
            s: Staged::new(last_applied),
        })
    }

    /// Ends folding: the changes, encoded and sorted, ready to be written ([`Staged::write`]).
    pub(crate) fn freeze(self) -> Result<Staged, ViewError> {
        let mut s = self.s;
        s.prepared = s.prepare()?;
        Ok(s)
    }

    /// The last stream sequence folded, including this batch's events.
    pub fn last_applied(&self) -> u64 {
        self.s.last_applied
    }

    /// Events folded (applied or quarantined) so far in this batch.
    pub fn folded(&self) -> u64 {
        self.s.folded
    }
}

impl Staged {
    fn new(last_applied: u64) -> Self {
        Self {
            devices: Rows::default(),
            devices_indexed: Map::default(),
            lineages: Rows::default(),
            lineage_history: Vec::new(),
            hosts: Rows::default(),
            claims: Rows::default(),
            subject_seqs: Map::default(),
            flavors: Rows::default(),
            flavor_names: Rows::default(),
            servers: Rows::default(),
            server_names: Rows::default(),
            quarantine: Vec::new(),
            start: last_applied,
            last_applied,
            folded: 0,
            deltas: BTreeMap::new(),
            prepared: WriteSet::default(),
        }
    }

    /// The last stream sequence of the batch.
    pub fn last_applied(&self) -> u64 {
        self.last_applied
    }

    /// Events folded (applied or quarantined) in the batch.
    pub fn folded(&self) -> u64 {
        self.folded
    }

    /// Rows the batch holds in memory (read or written), a measure of its size.
    pub fn rows(&self) -> usize {
        self.devices.len()
            + self.lineages.len()
            + self.hosts.len()
            + self.claims.len()
            + self.servers.len()
            + self.flavors.len()
    }

    /// Encodes and sorts the batch's changed rows and derives its index changes: the devices'
    /// index rows change only where a device's final row differs from its committed one.
    fn prepare(&self) -> Result<WriteSet, ViewError> {
        let mut w = WriteSet::default();
        for (id, row) in self.devices.dirty() {
            // Devices are never removed from the view.
            let Some(d) = row else { continue };
            w.devices.push((*id, t::encode_device_state(d)?));
            let was = self.devices_indexed.get(id).copied().flatten();
            if was.is_none() {
                // New to the view: its report is stored once, here.
                w.device_info
                    .push((*id, encode("device_info", &*d.discovery)?));
            }
            let now = Indexed::of(d);
            let (was_free, was_current) = was.map_or((false, false), |w| (w.free, w.current));
            if was_free != now.free {
                w.free_by_host.push((Arc::clone(&d.discovery), now.free));
            }
            if was_current != now.current {
                w.current.push((Arc::clone(&d.discovery), now.current));
            }
        }
        // Each device appears once, so the keys are unique.
        fn by_host(d: &DeviceDiscovered) -> (&str, Id) {
            (d.host.as_str(), d.device_id.to_bytes())
        }
        fn by_match(d: &DeviceDiscovered) -> (u64, &str, Id) {
            (
                t::vp_key(d.vendor_id, d.product_id),
                d.host.as_str(),
                d.device_id.to_bytes(),
            )
        }
        w.current
            .sort_unstable_by(|(a, _), (b, _)| by_host(a).cmp(&by_host(b)));
        w.free_by_host
            .sort_unstable_by(|(a, _), (b, _)| by_host(a).cmp(&by_host(b)));
        w.free_by_match = w.free_by_host.clone();
        w.free_by_match
            .sort_unstable_by(|(a, _), (b, _)| by_match(a).cmp(&by_match(b)));
        w.lineages = encode_records("lineages", &self.lineages)?;
        for (name, row) in self.hosts.dirty() {
            // Hosts are never removed.
            if let Some(h) = row {
                w.hosts.push((name.clone(), encode("hosts", h)?));
            }
        }
        w.claims = encode_records("claims", &self.claims)?;
        w.flavors = encode_records("flavors", &self.flavors)?;
        w.servers = encode_records("servers", &self.servers)?;
        Ok(w)
    }

    /// Writes everything the batch changed into `txn`: each changed row once, in key order,
    /// the device indexes where a device's final row differs from its committed one, the new
    /// history and quarantine rows, the counters and the last applied sequence. The caller
    /// commits.
    pub(crate) fn write(&self, txn: &WriteTransaction) -> Result<u64, ViewError> {
        let committed = txn
            .open_table(t::META)?
            .get(t::META_LAST_APPLIED)?
            .map_or(0, |g| g.value());
        if committed != self.start {
            return Err(ViewError::OutOfOrder {
                follows: self.start,
                committed,
            });
        }
        let w = &self.prepared;
        {
            let mut devices = txn.open_table(t::DEVICES)?;
            for (id, bytes) in &w.devices {
                devices.insert(id, bytes.as_slice())?;
            }
            let mut infos = txn.open_table(t::DEVICE_INFO)?;
            for (id, bytes) in &w.device_info {
                infos.insert(id, bytes.as_slice())?;
            }
            let mut host_devices = txn.open_table(t::HOST_DEVICES)?;
            for (d, on) in &w.current {
                let key = (d.host.as_str(), d.device_id.to_bytes());
                if *on {
                    host_devices.insert(key, ())?;
                } else {
                    host_devices.remove(key)?;
                }
            }
            let mut free_by_host = txn.open_table(t::FREE_BY_HOST)?;
            for (d, on) in &w.free_by_host {
                let key = (d.host.as_str(), d.device_id.to_bytes());
                if *on {
                    free_by_host.insert(key, ())?;
                } else {
                    free_by_host.remove(key)?;
                }
            }
            let mut free_by_match = txn.open_table(t::FREE_BY_MATCH)?;
            for (d, on) in &w.free_by_match {
                let key = (
                    t::vp_key(d.vendor_id, d.product_id),
                    d.host.as_str(),
                    d.device_id.to_bytes(),
                );
                if *on {
                    free_by_match.insert(key, ())?;
                } else {
                    free_by_match.remove(key)?;
                }
            }
        }
        write_records(&mut txn.open_table(t::LINEAGES)?, &w.lineages)?;
        {
            let mut history = txn.open_table(t::LINEAGE_HISTORY)?;
            let mut rows = self.lineage_history.clone();
            rows.sort_unstable();
            for (key, device) in rows {
                history.insert(key, device)?;
            }
        }
        {
            let mut hosts = txn.open_table(t::HOSTS)?;
            for (name, bytes) in &w.hosts {
                hosts.insert(name.as_str(), bytes.as_slice())?;
            }
        }
        write_records(&mut txn.open_table(t::CLAIMS)?, &w.claims)?;
        {
            let mut seqs = txn.open_table(t::SUBJECT_SEQS)?;
            let mut rows: Vec<_> = self.subject_seqs.iter().collect();
            rows.sort_unstable();
            for (subject, seq) in rows {
                seqs.insert(subject.as_str(), seq)?;
            }
        }
        write_records(&mut txn.open_table(t::FLAVORS)?, &w.flavors)?;
        write_names(&mut txn.open_table(t::FLAVOR_NAMES)?, &self.flavor_names)?;
        write_records(&mut txn.open_table(t::SERVERS)?, &w.servers)?;
        write_names(&mut txn.open_table(t::SERVER_NAMES)?, &self.server_names)?;
        {
            let mut quarantine = txn.open_table(t::QUARANTINE)?;
            for (seq, entry) in &self.quarantine {
                quarantine.insert(seq, entry.as_slice())?;
            }
        }
        {
            let mut counters = txn.open_table(t::COUNTERS)?;
            for ((group, name), n) in &self.deltas {
                let key = format!("{group}.{name}");
                let old = counters.get(key.as_str())?.map_or(0, |g| g.value());
                counters.insert(key.as_str(), old + n)?;
            }
        }
        txn.open_table(t::META)?
            .insert(t::META_LAST_APPLIED, self.last_applied)?;
        Ok(self.last_applied)
    }
}

impl FoldTxn {
    /// Decodes `payload` and folds it (see [`apply`]); undecodable bytes are quarantined.
    pub fn fold(&mut self, seq: u64, subject: &str, payload: &[u8]) -> Result<Outcome, ViewError> {
        if seq <= self.s.last_applied {
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
                self.begin_event(seq, subject);
                self.set_aside(seq, subject, reason, e.to_string(), None)?;
                Ok(Outcome::Quarantined(reason))
            }
        }
    }

    /// Bookkeeping every stored message gets, whatever its payload: the last sequence per
    /// control-plane subject (what fenced publishes expect) and the last applied sequence.
    fn begin_event(&mut self, seq: u64, subject: &str) {
        // The subjects writers fence on (claims, flavors) are tracked even when the payload is
        // quarantined, so a fenced writer's expected sequence is never stale.
        if subjects::is_fenced(subject) {
            match self.s.subject_seqs.get_mut(subject) {
                Some(s) => *s = seq,
                None => {
                    self.s.subject_seqs.insert(subject.to_owned(), seq);
                }
            }
        }
        self.s.last_applied = seq;
        self.s.folded += 1;
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
        self.s.quarantine.push((seq, encode("quarantine", &entry)?));
        *self
            .s
            .deltas
            .entry(("quarantined", reason.as_str()))
            .or_default() += 1;
        Ok(())
    }

    // ---- records ----
    //
    // A row is looked up in this batch, then in the prior batches (newest first), then in the
    // committed view; whatever answers first is the current value.

    fn device(&mut self, id: DeviceId) -> Result<Option<Device>, ViewError> {
        let key = id.to_bytes();
        if !self.s.devices.contains(&key) {
            let found = match prior_row(&self.prior, |p| &p.devices, &key) {
                Some(row) => row,
                None => t::get_device(&self.base.devices, &self.base.device_info, &key)?,
            };
            self.s
                .devices_indexed
                .insert(key, found.as_ref().map(Indexed::of));
            self.s.devices.put_clean(key, found);
        }
        self.s.devices.get(&key, || Ok(None))
    }

    /// Stages a device; its index rows follow at commit.
    fn put_device(&mut self, new: Device) -> Result<(), ViewError> {
        let key = new.id().to_bytes();
        if !self.s.devices.contains(&key) {
            self.device(new.id())?;
        }
        self.s.devices.put(key, Some(new));
        Ok(())
    }

    pub(crate) fn lineage(&mut self, id: LineageId) -> Result<Option<Lineage>, ViewError> {
        staged_record(
            &mut self.s.lineages,
            &self.prior,
            |p| &p.lineages,
            &self.base.lineages,
            "lineages",
            id.to_bytes(),
        )
    }

    pub(crate) fn put_lineage(&mut self, l: Lineage) {
        self.s.lineages.put(l.id.to_bytes(), Some(l));
    }

    fn claim(&mut self, lineage: LineageId) -> Result<Option<Claim>, ViewError> {
        staged_record(
            &mut self.s.claims,
            &self.prior,
            |p| &p.claims,
            &self.base.claims,
            "claims",
            lineage.to_bytes(),
        )
    }

    fn put_claim(&mut self, c: Claim) {
        self.s.claims.put(c.lineage_id.to_bytes(), Some(c));
    }

    fn remove_claim(&mut self, lineage: LineageId) {
        self.s.claims.put(lineage.to_bytes(), None);
    }

    fn server(&mut self, id: ServerId) -> Result<Option<Server>, ViewError> {
        staged_record(
            &mut self.s.servers,
            &self.prior,
            |p| &p.servers,
            &self.base.servers,
            "servers",
            id.to_bytes(),
        )
    }

    fn known_server(&mut self, id: ServerId) -> R<Server> {
        match self.server(id)? {
            Some(s) => Ok(s),
            None => unknown_server(id),
        }
    }

    /// Refuses the event unless the server exists (without copying its record).
    fn server_exists(&mut self, id: ServerId) -> R {
        let (prior, base) = (&self.prior, &self.base.servers);
        let key = id.to_bytes();
        let load = || unstaged_record(prior, |p| &p.servers, base, "servers", &key);
        if self.s.servers.exists(&key, load)? {
            Ok(())
        } else {
            unknown_server(id)
        }
    }

    /// A server that must exist, to change in place (see [`Rows::get_mut`]): no copy of its
    /// record and its histories per event.
    fn known_server_mut(&mut self, id: ServerId) -> R<&mut Server> {
        let (prior, base) = (&self.prior, &self.base.servers);
        let key = id.to_bytes();
        let load = || unstaged_record(prior, |p| &p.servers, base, "servers", &key);
        match self.s.servers.get_mut(&key, load)? {
            Some(s) => Ok(s),
            None => unknown_server(id),
        }
    }

    fn put_server(&mut self, s: Server) {
        self.s.servers.put(s.id.to_bytes(), Some(s));
    }

    fn server_named(&mut self, name: &str) -> Result<Option<Id>, ViewError> {
        let (prior, base) = (&self.prior, &self.base.server_names);
        self.s
            .server_names
            .get(name, || match prior_row(prior, |p| &p.server_names, name) {
                Some(row) => Ok(row),
                None => Ok(base.get(name)?.map(|g| g.value())),
            })
    }

    fn flavor(&mut self, id: FlavorId) -> Result<Option<Flavor>, ViewError> {
        staged_record(
            &mut self.s.flavors,
            &self.prior,
            |p| &p.flavors,
            &self.base.flavors,
            "flavors",
            id.to_bytes(),
        )
    }

    fn put_flavor(&mut self, f: &Flavor) {
        self.s.flavors.put(f.id.to_bytes(), Some(f.clone()));
    }

    fn flavor_named(&mut self, name: &str) -> Result<Option<Id>, ViewError> {
        let (prior, base) = (&self.prior, &self.base.flavor_names);
        self.s
            .flavor_names
            .get(name, || match prior_row(prior, |p| &p.flavor_names, name) {
                Some(row) => Ok(row),
                None => Ok(base.get(name)?.map(|g| g.value())),
            })
    }

    /// A device that must exist, on `lineage` (when given) and `host`.
    fn known_device(
        &mut self,
        id: DeviceId,
        lineage: Option<LineageId>,
        host: &HostName,
    ) -> R<Device> {
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
        let (prior, base) = (&self.prior, &self.base.hosts);
        // Changed in place: every agent event re-stamps its host, so a copy per event would
        // cost more than the change.
        let row = self.s.hosts.get_mut(host.as_str(), || {
            match prior_row(prior, |p| &p.hosts, host.as_str()) {
                Some(row) => Ok(row),
                None => get_by_str(base, "hosts", host.as_str()),
            }
        })?;
        let h = row.get_or_insert_with(|| Host {
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
}

/// Folds one decoded event stored at `seq` on `subject`.
///
/// Checks the subject first (the envelope must be exactly where [`subjects::for_event`] would
/// publish it, and its host must be its subject's host), then applies the event. A refused event
/// is quarantined. Only storage failures are errors.
pub fn apply(
    view: &mut FoldTxn,
    seq: u64,
    subject: &str,
    env: &Envelope,
) -> Result<Outcome, ViewError> {
    if seq <= view.s.last_applied {
        return Ok(Outcome::Skipped);
    }
    view.begin_event(seq, subject);
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
            *view.s.deltas.entry(("applied", kind)).or_default() += 1;
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

fn handle(v: &mut FoldTxn, st: Stamp, body: &Event) -> R {
    match body {
        // The host record is all it changes (see `touch_host`).
        Event::HostAgentStarted(_) | Event::DeviceClashDetected(_) => Ok(()),
        Event::DeviceDiscovered(e) => discovered(v, st, e),
        Event::DeviceInvalidated(e) => invalidated(v, st, e),
        Event::FlavorCreated(e) => flavor_created(v, st, e),
        Event::FlavorDeleted(e) => flavor_deleted(v, st, e),
        Event::FlavorUsbSet(e) => flavor_usb_set(v, e),
        Event::FlavorSized(e) => flavor_sized(v, e),
        Event::LineageLabeled(e) => crate::identity::labeled(v, st, e),
        Event::ServerUpdated(e) => server_updated(v, st, e),
        Event::ServerResizeVerifying(e) => {
            let s = v.known_server_mut(e.server_id)?;
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
        Event::ServerResizeConfirmed(ServerResizeConfirmed { server_id })
        | Event::ServerResizeReverted(ServerResizeReverted { server_id }) => {
            let reverted = matches!(body, Event::ServerResizeReverted(_));
            let s = v.known_server_mut(*server_id)?;
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
        Event::ServerBootRequested(e) => boot_requested(v, st, e),
        Event::ServerScheduled(e) => {
            let s = v.known_server_mut(e.server_id)?;
            not_deleted(s)?;
            s.host = Some(e.host.clone());
            s.flavor_id = e.flavor_id;
            s.devices = e.devices.clone();
            s.scheduled = Some(st);
            s.last_change_seq = st.seq;
            Ok(())
        }
        Event::ServerScheduleFailed(e) => {
            let s = v.known_server_mut(e.server_id)?;
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
        Event::DeviceClaimed(e) => claimed(v, st, e),
        Event::DeviceAttached(e) => attached(v, st, e),
        Event::DeviceReattached(e) => reattached(v, st, e),
        Event::DeviceReleased(e) => released(v, st, e),
        Event::ServerStateChanged(e) => {
            let s = v.known_server_mut(e.server_id)?;
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
            let s = v.known_server_mut(e.server_id)?;
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
            let named = v.server_named(s.name.as_str())?;
            if named == Some(s.id.to_bytes()) {
                v.s.server_names.put(s.name.as_str().to_owned(), None);
            }
            v.put_server(s);
            Ok(())
        }
        Event::ServerActionRequested(e) => {
            let s = v.known_server_mut(e.server_id)?;
            s.last_action = Some(ActionRecord {
                stamp: st,
                action: e.action,
                host: e.host.clone(),
            });
            s.last_change_seq = st.seq;
            Ok(())
        }
        Event::DeviceAttachFailed(e) => {
            let mut d = v.known_device(e.device_id, None, &e.host)?;
            v.server_exists(e.server_id)?;
            d.attach_error = Some(AttachError {
                server_id: e.server_id,
                error: e.error.clone(),
                stamp: st,
            });
            d.last_change_seq = st.seq;
            Ok(v.put_device(d)?)
        }
    }
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

fn discovered(v: &mut FoldTxn, st: Stamp, e: &DeviceDiscovered) -> R {
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
            label: None,
            label_changed: None,
        },
    };
    v.s.lineage_history.push((
        (e.lineage_id.to_bytes(), l.enumerations),
        e.device_id.to_bytes(),
    ));
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

fn invalidated(v: &mut FoldTxn, st: Stamp, e: &DeviceInvalidated) -> R {
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

fn flavor_created(v: &mut FoldTxn, st: Stamp, e: &FlavorCreated) -> R {
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
    v.s.flavor_names
        .put(f.name.as_str().to_owned(), Some(f.id.to_bytes()));
    Ok(())
}

/// The flavor `id` named `name` and not deleted; a deleted one is quarantined as `if_deleted`
/// (a second delete is a duplicate, a change after the delete a conflict).
fn live_flavor(
    v: &mut FoldTxn,
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
fn flavor_sized(v: &mut FoldTxn, e: &FlavorSized) -> R {
    let mut f = live_flavor(v, e.flavor_id, &e.name, QuarantineReason::Conflict)?;
    f.ram_mb = e.ram_mb;
    f.vcpus = e.vcpus;
    f.disk_gb = e.disk_gb;
    v.put_flavor(&f);
    Ok(())
}

/// A live server renamed (the name index follows) or its description changed.
fn server_updated(v: &mut FoldTxn, st: Stamp, e: &ServerUpdated) -> R {
    let mut s = v.known_server(e.server_id)?;
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
            v.s.server_names.put(s.name.as_str().to_owned(), None);
        }
        v.s.server_names
            .put(e.name.as_str().to_owned(), Some(s.id.to_bytes()));
        s.name = e.name.clone();
    }
    s.description.clone_from(&e.description);
    s.last_change_seq = st.seq;
    v.put_server(s);
    Ok(())
}

/// A live flavor's USB request replaced (the servers it placed keep their devices).
fn flavor_usb_set(v: &mut FoldTxn, e: &FlavorUsbSet) -> R {
    let mut f = live_flavor(v, e.flavor_id, &e.name, QuarantineReason::Conflict)?;
    f.usb = e.usb.clone();
    v.put_flavor(&f);
    Ok(())
}

fn flavor_deleted(v: &mut FoldTxn, st: Stamp, e: &FlavorDeleted) -> R {
    let mut f = live_flavor(v, e.flavor_id, &e.name, QuarantineReason::Duplicate)?;
    f.deleted = Some(st);
    v.put_flavor(&f);
    let named = v.flavor_named(f.name.as_str())?;
    if named == Some(f.id.to_bytes()) {
        v.s.flavor_names.put(f.name.as_str().to_owned(), None);
    }
    Ok(())
}

fn boot_requested(v: &mut FoldTxn, st: Stamp, e: &ServerBootRequested) -> R {
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
    v.s.server_names
        .put(s.name.as_str().to_owned(), Some(s.id.to_bytes()));
    v.put_server(s);
    Ok(())
}

fn moved(
    v: &mut FoldTxn,
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

fn claimed(v: &mut FoldTxn, st: Stamp, e: &DeviceClaimed) -> R {
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

fn attached(v: &mut FoldTxn, st: Stamp, e: &DeviceAttached) -> R {
    let d = v.known_device(e.device_id, Some(e.lineage_id), &e.host)?;
    v.server_exists(e.server_id)?;
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

fn reattached(v: &mut FoldTxn, st: Stamp, e: &DeviceReattached) -> R {
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

fn released(v: &mut FoldTxn, st: Stamp, e: &DeviceReleased) -> R {
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
