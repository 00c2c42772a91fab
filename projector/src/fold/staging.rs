//! The storage half of the fold: a batch's changes staged in memory ([`FoldTxn`]), frozen into
//! a [`Staged`] batch whose rows are encoded and sorted, and written in one redb write
//! transaction ([`Staged::write`]). See [`crate::stage`] and ADR 0004.
//!
//! [`FoldTxn`] implements [`State`]: a row is looked up in this batch, then in the prior
//! batches (newest first), then in the committed view; whatever answers first is the current
//! value. What an event changes is decided in [`super::semantics`], never here.

use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable, WriteTransaction};
use usbpt_schemas::{DeviceDiscovered, DeviceId, FlavorId, HostName, LineageId, ServerId};

use super::state::State;
use crate::error::ViewError;
use crate::model::*;
use crate::stage::{Base, Map, Rows};
use crate::tables::{self as t, encode, get_by_id, get_by_str, Id, IdKey};

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
    /// Counter increments of this batch, one entry per counter (a few dozen at most: one per
    /// event kind and quarantine reason), found by a short scan instead of hashing two strings
    /// per event.
    deltas: Vec<((&'static str, &'static str), u64)>,
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
/// Creates every table of the view that is missing (so read snapshots never miss one) and
/// returns the last applied sequence.
pub(crate) fn create_tables(txn: &WriteTransaction) -> Result<u64, ViewError> {
    t::create_all(txn)?;
    let last = txn
        .open_table(t::META)?
        .get(t::META_LAST_APPLIED)?
        .map_or(0, |g| g.value());
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
    base: &redb::ReadOnlyTable<IdKey, &'static [u8]>,
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
    base: &redb::ReadOnlyTable<IdKey, &'static [u8]>,
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
    table: &mut redb::Table<'_, IdKey, &'static [u8]>,
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
    table: &mut redb::Table<'_, &'static str, IdKey>,
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
            deltas: Vec::new(),
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
                w.free_by_match.push((Arc::clone(&d.discovery), now.free));
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
                t::vp_key(d.descriptors.vendor_id, d.descriptors.product_id),
                d.host.as_str(),
                d.device_id.to_bytes(),
            )
        }
        w.current
            .sort_unstable_by(|(a, _), (b, _)| by_host(a).cmp(&by_host(b)));
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
                let key = (d.host.as_str(), &d.device_id.to_bytes());
                if *on {
                    host_devices.insert(key, ())?;
                } else {
                    host_devices.remove(key)?;
                }
            }
            let mut free_by_match = txn.open_table(t::FREE_BY_MATCH)?;
            for (d, on) in &w.free_by_match {
                let key = (
                    t::vp_key(d.descriptors.vendor_id, d.descriptors.product_id),
                    d.host.as_str(),
                    &d.device_id.to_bytes(),
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
            for ((lineage, ordinal), device) in &rows {
                history.insert((lineage, *ordinal), device)?;
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
            let mut deltas = self.deltas.clone();
            deltas.sort_unstable();
            for ((group, name), n) in deltas {
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
    /// Stages the device under `key` as the view has it (absent or not) the first time the
    /// batch reads it, with its committed index membership.
    fn load_device(&mut self, key: &Id) -> Result<(), ViewError> {
        if !self.s.devices.contains(key) {
            let found = match prior_row(&self.prior, |p| &p.devices, key) {
                Some(row) => row,
                None => t::get_device(&self.base.devices, &self.base.device_info, key)?,
            };
            self.s
                .devices_indexed
                .insert(*key, found.as_ref().map(Indexed::of));
            self.s.devices.put_clean(*key, found);
        }
        Ok(())
    }
}

impl State for FoldTxn {
    fn last_applied(&self) -> u64 {
        self.s.last_applied
    }

    fn begin_event(&mut self, seq: u64) {
        self.s.last_applied = seq;
        self.s.folded += 1;
    }

    fn set_subject_seq(&mut self, subject: &str, seq: u64) {
        match self.s.subject_seqs.get_mut(subject) {
            Some(s) => *s = seq,
            None => {
                self.s.subject_seqs.insert(subject.to_owned(), seq);
            }
        }
    }

    fn count(&mut self, group: &'static str, name: &'static str) {
        let deltas = &mut self.s.deltas;
        let i = deltas.iter().position(|(k, _)| *k == (group, name));
        match i {
            Some(i) => deltas[i].1 += 1,
            None => deltas.push(((group, name), 1)),
        }
    }

    fn quarantine(&mut self, entry: QuarantineEntry) -> Result<(), ViewError> {
        self.s
            .quarantine
            .push((entry.seq, encode("quarantine", &entry)?));
        Ok(())
    }

    fn device(&mut self, id: DeviceId) -> Result<Option<Device>, ViewError> {
        Ok(self.device_ref(id)?.cloned())
    }

    fn device_ref(&mut self, id: DeviceId) -> Result<Option<&Device>, ViewError> {
        let key = id.to_bytes();
        self.load_device(&key)?;
        Ok(self.s.devices.peek(&key).and_then(|row| row.now.as_ref()))
    }

    /// Changed in place; its index rows follow at commit, like [`State::put_device`]'s.
    fn device_mut(&mut self, id: DeviceId) -> Result<Option<&mut Device>, ViewError> {
        let key = id.to_bytes();
        self.load_device(&key)?;
        Ok(self.s.devices.get_mut(&key, || Ok(None))?.as_mut())
    }

    /// Stages a device; its index rows follow at commit.
    fn put_device(&mut self, new: Device) -> Result<(), ViewError> {
        let key = new.id().to_bytes();
        self.load_device(&key)?;
        self.s.devices.put(key, Some(new));
        Ok(())
    }

    fn lineage(&mut self, id: LineageId) -> Result<Option<Lineage>, ViewError> {
        staged_record(
            &mut self.s.lineages,
            &self.prior,
            |p| &p.lineages,
            &self.base.lineages,
            "lineages",
            id.to_bytes(),
        )
    }

    fn lineage_ref(&mut self, id: LineageId) -> Result<Option<&Lineage>, ViewError> {
        let (prior, base) = (&self.prior, &self.base.lineages);
        let key = id.to_bytes();
        let load = || unstaged_record(prior, |p| &p.lineages, base, "lineages", &key);
        self.s.lineages.get_ref(&key, load)
    }

    fn put_lineage(&mut self, l: Lineage) {
        self.s.lineages.put(l.id.to_bytes(), Some(l));
    }

    fn push_lineage_history(&mut self, lineage: LineageId, ordinal: u32, device: DeviceId) {
        self.s
            .lineage_history
            .push(((lineage.to_bytes(), ordinal), device.to_bytes()));
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

    fn server_ref(&mut self, id: ServerId) -> Result<Option<&Server>, ViewError> {
        let (prior, base) = (&self.prior, &self.base.servers);
        let key = id.to_bytes();
        let load = || unstaged_record(prior, |p| &p.servers, base, "servers", &key);
        self.s.servers.get_ref(&key, load)
    }

    fn server_mut(&mut self, id: ServerId) -> Result<Option<&mut Server>, ViewError> {
        let (prior, base) = (&self.prior, &self.base.servers);
        let key = id.to_bytes();
        let load = || unstaged_record(prior, |p| &p.servers, base, "servers", &key);
        Ok(self.s.servers.get_mut(&key, load)?.as_mut())
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
                None => Ok(base.get(name)?.map(|g| *g.value())),
            })
    }

    fn name_server(&mut self, name: &str, id: Option<Id>) {
        self.s.server_names.put(name.to_owned(), id);
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

    fn flavor_exists(&mut self, id: FlavorId) -> Result<bool, ViewError> {
        let (prior, base) = (&self.prior, &self.base.flavors);
        let key = id.to_bytes();
        let load = || unstaged_record(prior, |p| &p.flavors, base, "flavors", &key);
        self.s.flavors.exists(&key, load)
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
                None => Ok(base.get(name)?.map(|g| *g.value())),
            })
    }

    fn name_flavor(&mut self, name: &str, id: Option<Id>) {
        self.s.flavor_names.put(name.to_owned(), id);
    }

    fn host_mut(&mut self, host: &HostName) -> Result<&mut Option<Host>, ViewError> {
        let (prior, base) = (&self.prior, &self.base.hosts);
        // Changed in place: every agent event re-stamps its host, so a copy per event would
        // cost more than the change.
        self.s.hosts.get_mut(host.as_str(), || {
            match prior_row(prior, |p| &p.hosts, host.as_str()) {
                Some(row) => Ok(row),
                None => get_by_str(base, "hosts", host.as_str()),
            }
        })
    }
}
