//! The redb file that holds the view: opening it, folding a batch in one write transaction, and
//! consistent read snapshots.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redb::{
    ConcurrencyMode, Database, Durability, ReadOnlyDatabase, ReadTransaction, ReadableDatabase,
    ReadableTable, ReadableTableMetadata,
};
use tokio::sync::watch;
use usbpt_schemas::{
    DeviceId, FlavorId, FlavorName, HostName, LineageId, ProductId, ServerId, ServerName, VendorId,
};

use crate::error::ViewError;
use crate::fold::{FoldTxn, Outcome, Staged};
use crate::model::*;
use crate::tables::{self as t, decode, get_by_id, get_by_str, show_id, Id};

/// The record format this build reads and writes. A view of another format is rebuilt by
/// replaying the stream (the view is a pure fold: nothing in it is lost).
pub const VIEW_FORMAT: u64 = 6;

/// One stored message: its stream sequence, subject and raw payload.
#[derive(Debug, Clone)]
pub struct RawEvent {
    pub seq: u64,
    pub subject: String,
    pub payload: Bytes,
}

/// How a batch is committed.
#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    /// `Immediate` for the live projector (it acks only what is durable); a replay into a
    /// scratch file may use `None` for all but its last batch.
    pub durability: Durability,
    /// Accept a jump in sequence before the first new event (a consumer just created at the
    /// resume point: the missing sequences do not exist). Otherwise a gap stops the batch.
    pub gap_at_start_ok: bool,
    /// Accept any increasing sequence (an ordered replay, which cannot skip).
    pub gaps_ok: bool,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Immediate,
            gap_at_start_ok: false,
            gaps_ok: false,
        }
    }
}

/// What one batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchReport {
    pub applied: u64,
    pub quarantined: u64,
    /// Redelivered events at or below the last applied sequence, not folded again.
    pub skipped: u64,
    /// The last applied sequence after the batch (committed).
    pub last_applied: u64,
    /// `(expected, found)`: the batch stopped at a sequence gap; the events from `found` on
    /// were not folded.
    pub gap: Option<(u64, u64)>,
}

enum Db {
    ReadWrite(Database),
    ReadOnly(ReadOnlyDatabase),
}

/// The view: a redb file, written by one projector and read by any number of snapshots (in this
/// process, or in others that open it read-only).
pub struct View {
    db: Db,
    path: PathBuf,
    applied: watch::Sender<u64>,
    /// Opened so that no other process may open it ([`View::open_private`]).
    private: bool,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("path", &self.path)
            .field("last_applied", &*self.applied.borrow())
            .finish()
    }
}

fn builder(mode: ConcurrencyMode) -> redb::Builder {
    let mut b = redb::Builder::new();
    b.set_concurrency_mode(mode);
    b
}

impl View {
    /// Opens the view at `path` for folding, creating it (and its tables) when missing. One
    /// process writes; others may open it read-only ([`View::open_read_only`]) meanwhile.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ViewError> {
        Self::open_with(path.as_ref(), ConcurrencyMode::SingleWriter)
    }

    /// Opens the live view for a projector whose commits are made durable as `sync` says: a
    /// view durable only within a bound is private ([`View::open_private`]), since redb commits
    /// without fsync only on a file no other process may open.
    pub fn open_for(path: impl AsRef<Path>, sync: crate::ViewSync) -> Result<Self, ViewError> {
        match sync {
            crate::ViewSync::EachCommit => Self::open(path),
            crate::ViewSync::Within(_) => Self::open_private(path),
        }
    }

    /// Opens a view no other process will read while it is written (a replay's scratch file, a
    /// live view made durable within a bound: ADR 0015): it may commit without fsync
    /// ([`BatchOptions::durability`] `None`).
    pub fn open_private(path: impl AsRef<Path>) -> Result<Self, ViewError> {
        Self::open_with(path.as_ref(), ConcurrencyMode::ExclusiveWriter)
    }

    fn open_with(path: &Path, mode: ConcurrencyMode) -> Result<Self, ViewError> {
        let path = path.to_path_buf();
        let db = builder(mode).create(&path).map_err(|e| ViewError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let txn = db.begin_write()?;
        let last = {
            let mut meta = txn.open_table(t::META)?;
            let found = meta.get(t::META_FORMAT)?.map(|g| g.value());
            match found {
                None => {
                    meta.insert(t::META_FORMAT, VIEW_FORMAT)?;
                }
                Some(f) if f != VIEW_FORMAT => {
                    return Err(ViewError::Format {
                        path: path.display().to_string(),
                        found: f,
                        expected: VIEW_FORMAT,
                    })
                }
                Some(_) => {}
            }
            drop(meta);
            // Creates every table, so read snapshots never miss one.
            crate::fold::create_tables(&txn)?
        };
        txn.commit()?;
        Ok(Self {
            db: Db::ReadWrite(db),
            path,
            applied: watch::Sender::new(last),
            private: matches!(mode, ConcurrencyMode::ExclusiveWriter),
        })
    }

    /// Opens a view another process writes (or wrote), read-only.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self, ViewError> {
        let path = path.as_ref().to_path_buf();
        let db = builder(ConcurrencyMode::SingleWriter)
            .open_read_only(&path)
            .map_err(|e| ViewError::Open {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        let view = Self {
            db: Db::ReadOnly(db),
            path,
            applied: watch::Sender::new(0),
            private: false,
        };
        let snap = view.snapshot()?;
        let found = snap.meta(t::META_FORMAT)?;
        if found != VIEW_FORMAT {
            return Err(ViewError::Format {
                path: view.path.display().to_string(),
                found,
                expected: VIEW_FORMAT,
            });
        }
        view.applied.send_replace(snap.last_applied_seq()?);
        Ok(view)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One consistent snapshot: every read on it sees the view as of one committed batch.
    pub fn snapshot(&self) -> Result<Snapshot, ViewError> {
        let txn = match &self.db {
            Db::ReadWrite(db) => db.begin_read()?,
            Db::ReadOnly(db) => db.begin_read()?,
        };
        Ok(Snapshot { txn })
    }

    /// The last stream sequence folded (applied or quarantined), as committed.
    pub fn last_applied(&self) -> Result<u64, ViewError> {
        self.snapshot()?.last_applied_seq()
    }

    /// Follows the last applied sequence as batches commit (in this process).
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Resolves once the view has applied stream sequence `seq` (true), or after `limit` (false).
    pub async fn wait_applied(&self, seq: u64, limit: Duration) -> bool {
        let mut rx = self.applied.subscribe();
        let reached = tokio::time::timeout(limit, rx.wait_for(|applied| *applied >= seq))
            .await
            .is_ok_and(|r| r.is_ok());
        reached
    }

    /// Folds `events` (in stream order) in one write transaction that also stores the last
    /// applied sequence. Events at or below it are skipped (redeliveries); a gap in sequence
    /// stops the batch (see [`BatchOptions`]). A storage error aborts the whole batch.
    pub fn apply_batch(
        &self,
        events: &[RawEvent],
        options: &BatchOptions,
    ) -> Result<BatchReport, ViewError> {
        let mut batch = self.begin_batch()?;
        batch.fold(events, options)?;
        batch.commit(options.durability)
    }

    fn writable(&self) -> Result<&Database, ViewError> {
        match &self.db {
            Db::ReadWrite(db) => Ok(db),
            Db::ReadOnly(_) => Err(ViewError::Open {
                path: self.path.display().to_string(),
                message: "opened read-only".into(),
            }),
        }
    }

    /// Starts a batch that may fold several runs of events ([`Batch::fold`]) before it commits
    /// them all in one write transaction ([`Batch::commit`]): the projector's group commit.
    pub fn begin_batch(&self) -> Result<Batch<'_>, ViewError> {
        self.begin_batch_after(&Chain::default())
    }

    /// Starts a batch that follows the batches of `chain` (folded, maybe not written yet: they
    /// must be written, in order, before this one — see [`Batch::freeze`]).
    pub fn begin_batch_after(&self, chain: &Chain) -> Result<Batch<'_>, ViewError> {
        let db = self.writable()?;
        let fold = FoldTxn::begin(db, chain.stages.iter().cloned().collect())?;
        let report = BatchReport {
            last_applied: fold.last_applied(),
            ..BatchReport::default()
        };
        Ok(Batch {
            view: self,
            fold,
            report,
        })
    }
}

/// Events folded in memory (staged, decoded) and not committed yet. Dropping it discards them.
pub struct Batch<'v> {
    view: &'v View,
    fold: FoldTxn,
    report: BatchReport,
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

impl Batch<'_> {
    /// Folds `events` (in stream order) into the batch. Events at or below the last applied
    /// sequence are skipped; a gap in sequence stops the batch there (see [`BatchOptions`]):
    /// [`BatchReport::gap`] is set and later calls fold nothing.
    pub fn fold(&mut self, events: &[RawEvent], options: &BatchOptions) -> Result<(), ViewError> {
        if self.report.gap.is_some() {
            return Ok(());
        }
        let report = &mut self.report;
        let fold = &mut self.fold;
        let mut first_new = true;
        for ev in events {
            let last = fold.last_applied();
            if ev.seq <= last {
                report.skipped += 1;
                continue;
            }
            let gap_ok = options.gaps_ok || (first_new && options.gap_at_start_ok);
            if ev.seq != last + 1 && !gap_ok {
                report.gap = Some((last + 1, ev.seq));
                break;
            }
            first_new = false;
            match fold.fold(ev.seq, &ev.subject, &ev.payload)? {
                Outcome::Applied(_) => report.applied += 1,
                Outcome::Quarantined(_) => report.quarantined += 1,
                Outcome::Skipped => report.skipped += 1,
            }
        }
        report.last_applied = fold.last_applied();
        Ok(())
    }

    /// What the batch has folded so far (`last_applied` is not committed until [`Batch::commit`]).
    pub fn report(&self) -> &BatchReport {
        &self.report
    }

    /// Events folded (applied or quarantined) so far.
    pub fn folded(&self) -> u64 {
        self.report.applied + self.report.quarantined
    }

    /// Writes the batch in one redb write transaction and commits it with `durability`; then
    /// readers of [`View::applied`] are told. A batch that folded nothing commits nothing.
    pub fn commit(self, durability: Durability) -> Result<BatchReport, ViewError> {
        let (view, report) = (self.view, self.report.clone());
        let staged = self.freeze()?;
        view.write_staged(&staged, durability)?;
        Ok(report)
    }

    /// Ends folding without writing: the batch's changes, to be written with
    /// [`View::write_staged`] after the batches it follows, and pushed on the [`Chain`] the
    /// next batch is started after.
    pub fn freeze(self) -> Result<Arc<Staged>, ViewError> {
        Ok(Arc::new(self.fold.freeze()?))
    }
}

impl View {
    /// Whether no other process may open this view ([`View::open_private`]): only then may it
    /// commit without making the commit durable at once.
    pub fn is_private(&self) -> bool {
        self.private
    }

    /// Makes every commit so far durable: an empty durable commit (redb persists the
    /// non-durable commits before it with it).
    pub fn sync(&self) -> Result<(), ViewError> {
        let db = self.writable()?;
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        txn.commit()?;
        Ok(())
    }

    /// Writes a frozen batch in one redb write transaction and commits it with `durability`;
    /// readers of [`View::applied`] are told. Batches must be written in the order they were
    /// folded: one that does not start where the view ends is refused.
    pub fn write_staged(&self, staged: &Staged, durability: Durability) -> Result<u64, ViewError> {
        if staged.folded() == 0 {
            return Ok(staged.last_applied());
        }
        let db = self.writable()?;
        let mut txn = db.begin_write()?;
        txn.set_durability(durability)?;
        let last = staged.write(&txn)?;
        txn.commit()?;
        self.applied.send_replace(last);
        Ok(last)
    }
}

/// The batches a new batch reads through (newest first): every batch folded but not yet
/// written, and recently written ones kept as a cache of decoded rows up to a row budget.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    stages: VecDeque<Arc<Staged>>,
}

impl Chain {
    /// The most batches kept once written (a caught-up projector commits many small ones).
    pub const MAX_BATCHES: usize = 8;

    /// Adds the batch just frozen (it is the newest).
    pub fn push(&mut self, staged: Arc<Staged>) {
        self.stages.push_front(staged);
    }

    /// Forgets the oldest batches while the chain holds more than `max_rows` rows or more than
    /// [`Chain::MAX_BATCHES`] batches (a lookup walks them all), but never one beyond
    /// `committed` (the view's last committed sequence): a batch not written yet must stay
    /// readable until it is.
    pub fn trim(&mut self, committed: u64, max_rows: usize) {
        let mut rows: usize = self.stages.iter().map(|s| s.rows()).sum();
        while rows > max_rows || self.stages.len() > Self::MAX_BATCHES {
            match self.stages.back() {
                Some(oldest) if oldest.last_applied() <= committed => {
                    rows -= oldest.rows();
                    self.stages.pop_back();
                }
                _ => break,
            }
        }
    }

    /// Forgets every batch (after a failed write: the view is read afresh).
    pub fn clear(&mut self) {
        self.stages.clear();
    }

    /// Batches held.
    pub fn len(&self) -> usize {
        self.stages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }
}

/// Which devices a listing wants.
#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    pub host: Option<HostName>,
    pub status: Option<DeviceStatus>,
    /// Include superseded enumerations (history), not only each lineage's current one.
    pub all: bool,
}

/// A consistent read-only view of one committed state. Cheap to take; hold it for one decision
/// or one response.
pub struct Snapshot {
    txn: ReadTransaction,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").finish_non_exhaustive()
    }
}

impl Snapshot {
    pub(crate) fn txn(&self) -> &ReadTransaction {
        &self.txn
    }

    fn meta(&self, key: &str) -> Result<u64, ViewError> {
        let table = match self.txn.open_table(t::META) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        Ok(table.get(key)?.map_or(0, |g| g.value()))
    }

    /// The last stream sequence folded (applied or quarantined); 0 for an empty view.
    pub fn last_applied_seq(&self) -> Result<u64, ViewError> {
        self.meta(t::META_LAST_APPLIED)
    }

    /// One enumeration.
    pub fn device(&self, id: &DeviceId) -> Result<Option<Device>, ViewError> {
        let states = self.txn.open_table(t::DEVICES)?;
        let infos = self.txn.open_table(t::DEVICE_INFO)?;
        t::get_device(&states, &infos, &id.to_bytes())
    }

    fn devices_by_ids(&self, ids: impl IntoIterator<Item = Id>) -> Result<Vec<Device>, ViewError> {
        let states = self.txn.open_table(t::DEVICES)?;
        let infos = self.txn.open_table(t::DEVICE_INFO)?;
        let mut out = Vec::new();
        for id in ids {
            match t::get_device(&states, &infos, &id)? {
                Some(d) => out.push(d),
                None => {
                    return Err(ViewError::Corrupt {
                        table: "devices",
                        key: show_id(&id),
                        message: "indexed but missing".into(),
                    })
                }
            }
        }
        Ok(out)
    }

    pub fn lineage(&self, id: &LineageId) -> Result<Option<Lineage>, ViewError> {
        let table = self.txn.open_table(t::LINEAGES)?;
        get_by_id(&table, "lineages", &id.to_bytes())
    }

    /// The lineage's newest enumeration (which may be invalidated).
    pub fn current_enumeration(&self, lineage: &LineageId) -> Result<Option<Device>, ViewError> {
        match self.lineage(lineage)? {
            Some(l) => self.device(&l.current),
            None => Ok(None),
        }
    }

    /// Every enumeration of the lineage, oldest first.
    pub fn lineage_history(&self, lineage: &LineageId) -> Result<Vec<Device>, ViewError> {
        let table = self.txn.open_table(t::LINEAGE_HISTORY)?;
        let id = lineage.to_bytes();
        let mut ids = Vec::new();
        for entry in table.range((&id, 0u32)..=(&id, u32::MAX))? {
            ids.push(*entry?.1.value());
        }
        self.devices_by_ids(ids)
    }

    /// Available devices with these ids (and this serial, when given), grouped by host. Reads
    /// only the matching index entries, whatever the number of hosts and devices.
    pub fn free_devices_matching(
        &self,
        vendor: VendorId,
        product: ProductId,
        serial: Option<&str>,
    ) -> Result<BTreeMap<HostName, Vec<Device>>, ViewError> {
        let table = self.txn.open_table(t::FREE_BY_MATCH)?;
        let vp = t::vp_key(vendor, product);
        let mut ids = Vec::new();
        for entry in table.range((vp, "", &[0u8; 16])..(vp + 1, "", &[0u8; 16]))? {
            ids.push(*entry?.0.value().2);
        }
        let mut out: BTreeMap<HostName, Vec<Device>> = BTreeMap::new();
        for d in self.devices_by_ids(ids)? {
            if serial.is_none_or(|s| d.serial() == Some(s)) {
                out.entry(d.host().clone()).or_default().push(d);
            }
        }
        Ok(out)
    }

    /// The first host after `after` (in name order; from the start when `None`) that has an
    /// available device with these ids. Reads one index key: a first-fit scheduler walks hosts
    /// with it and stops at the first that fits, whatever the number of hosts.
    pub fn next_host_with_free(
        &self,
        vendor: VendorId,
        product: ProductId,
        after: Option<&HostName>,
    ) -> Result<Option<HostName>, ViewError> {
        let table = self.txn.open_table(t::FREE_BY_MATCH)?;
        let vp = t::vp_key(vendor, product);
        // Device ids are UUIDv7s, never all 0xff: this start is past every key of `after`.
        let start = (vp, after.map_or("", HostName::as_str), &[0xffu8; 16]);
        let start = if after.is_some() {
            start
        } else {
            (vp, "", &[0u8; 16])
        };
        if let Some(entry) = table.range(start..(vp + 1, "", &[0u8; 16]))?.next() {
            let (key, _) = entry?;
            let host = key.value().1.to_owned();
            return HostName::new(host.clone())
                .map(Some)
                .map_err(|e| ViewError::Corrupt {
                    table: "free_by_match",
                    key: host,
                    message: e.to_string(),
                });
        }
        Ok(None)
    }

    /// Available devices on `host` with these ids (and serial, when given). Reads that host's
    /// index entries only.
    pub fn free_on_host_matching(
        &self,
        host: &HostName,
        vendor: VendorId,
        product: ProductId,
        serial: Option<&str>,
    ) -> Result<Vec<Device>, ViewError> {
        let table = self.txn.open_table(t::FREE_BY_MATCH)?;
        let vp = t::vp_key(vendor, product);
        let mut ids = Vec::new();
        for entry in
            table.range((vp, host.as_str(), &[0u8; 16])..=(vp, host.as_str(), &[0xffu8; 16]))?
        {
            ids.push(*entry?.0.value().2);
        }
        Ok(self
            .devices_by_ids(ids)?
            .into_iter()
            .filter(|d| serial.is_none_or(|s| d.serial() == Some(s)))
            .collect())
    }

    /// Available devices on one host: its current enumerations that are free (a free device
    /// is current, so these are all of them), in device id order. Format 5 kept them in an
    /// index of their own, written by every claim, release and discovery and read by nothing
    /// but this (ADR 0004, third addendum).
    pub fn free_devices_on_host(&self, host: &HostName) -> Result<Vec<Device>, ViewError> {
        let mut devices = self.host_devices(host)?;
        devices.retain(Device::is_free);
        Ok(devices)
    }

    /// The current enumeration of every lineage last seen on this host, in any status (what
    /// the Nova hypervisor document lists).
    pub fn host_devices(&self, host: &HostName) -> Result<Vec<Device>, ViewError> {
        let table = self.txn.open_table(t::HOST_DEVICES)?;
        let h = host.as_str();
        let mut ids = Vec::new();
        for entry in table.range((h, &[0u8; 16])..=(h, &[0xffu8; 16]))? {
            ids.push(*entry?.0.value().1);
        }
        self.devices_by_ids(ids)
    }

    /// Devices for listings, ordered by host then device id (time of discovery).
    pub fn devices(&self, filter: &DeviceFilter) -> Result<Vec<Device>, ViewError> {
        let mut out = if filter.all {
            let table = self.txn.open_table(t::DEVICES)?;
            let infos = self.txn.open_table(t::DEVICE_INFO)?;
            let mut all = Vec::new();
            for entry in table.iter()? {
                let (k, v) = entry?;
                let id = k.value();
                let d = t::device_from_state(&infos, id, v.value())?;
                if filter.host.as_ref().is_none_or(|h| d.host() == h) {
                    all.push(d);
                }
            }
            all.sort_by(|a, b| (a.host(), a.id()).cmp(&(b.host(), b.id())));
            all
        } else if let Some(h) = &filter.host {
            self.host_devices(h)?
        } else {
            let table = self.txn.open_table(t::HOST_DEVICES)?;
            let mut ids = Vec::new();
            for entry in table.iter()? {
                ids.push(*entry?.0.value().1);
            }
            self.devices_by_ids(ids)?
        };
        if let Some(s) = filter.status {
            out.retain(|d| d.status == s);
        }
        Ok(out)
    }

    pub fn host(&self, name: &HostName) -> Result<Option<Host>, ViewError> {
        let table = self.txn.open_table(t::HOSTS)?;
        get_by_str(&table, "hosts", name.as_str())
    }

    /// Every host seen, by name.
    pub fn hosts(&self) -> Result<Vec<Host>, ViewError> {
        let table = self.txn.open_table(t::HOSTS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            let name = k.value().to_owned();
            out.push(decode("hosts", || name, v.value())?);
        }
        Ok(out)
    }

    /// The active claim on a lineage.
    pub fn claim(&self, lineage: &LineageId) -> Result<Option<Claim>, ViewError> {
        let table = self.txn.open_table(t::CLAIMS)?;
        get_by_id(&table, "claims", &lineage.to_bytes())
    }

    /// Every active claim, by lineage id.
    pub fn claims(&self) -> Result<Vec<Claim>, ViewError> {
        let table = self.txn.open_table(t::CLAIMS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            let id = k.value();
            out.push(decode("claims", || show_id(id), v.value())?);
        }
        Ok(out)
    }

    /// Every lineage with an alarm (active ones only, unless `all`), with those alarms, oldest
    /// raised first. A scan of the lineages: alarms are rare, and this is read by an operator
    /// (`GET /v1/alarms`), not by the fold.
    pub fn alarms(&self, all: bool) -> Result<Vec<(Lineage, Vec<Alarm>)>, ViewError> {
        let table = self.txn.open_table(t::LINEAGES)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            let id = k.value();
            let l: Lineage = decode("lineages", || show_id(id), v.value())?;
            let alarms: Vec<Alarm> = l
                .alarms
                .iter()
                .filter(|a| all || a.is_active())
                .cloned()
                .collect();
            if !alarms.is_empty() {
                out.push((l, alarms));
            }
        }
        out.sort_by_key(|(_, a)| a.first().map(|a| a.raised.seq));
        Ok(out)
    }

    /// The last stream sequence stored on a control-plane subject (claim, flavor, server), 0
    /// when none: the expected sequence of a fenced publish on it.
    pub fn subject_seq(&self, subject: &str) -> Result<u64, ViewError> {
        let table = self.txn.open_table(t::SUBJECT_SEQS)?;
        Ok(table.get(subject)?.map_or(0, |g| g.value()))
    }

    pub fn flavor_by_id(&self, id: &FlavorId) -> Result<Option<Flavor>, ViewError> {
        let table = self.txn.open_table(t::FLAVORS)?;
        get_by_id(&table, "flavors", &id.to_bytes())
    }

    /// The live (not deleted) flavor of that name.
    pub fn flavor_by_name(&self, name: &FlavorName) -> Result<Option<Flavor>, ViewError> {
        let names = self.txn.open_table(t::FLAVOR_NAMES)?;
        let Some(id) = names.get(name.as_str())?.map(|g| *g.value()) else {
            return Ok(None);
        };
        self.flavor_by_id(&FlavorId::from_bytes(id))
    }

    /// Flavors by id; deleted ones only when asked.
    pub fn flavors(&self, include_deleted: bool) -> Result<Vec<Flavor>, ViewError> {
        let table = self.txn.open_table(t::FLAVORS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            let id = k.value();
            let f: Flavor = decode("flavors", || show_id(id), v.value())?;
            if include_deleted || f.deleted.is_none() {
                out.push(f);
            }
        }
        Ok(out)
    }

    pub fn server_by_id(&self, id: &ServerId) -> Result<Option<Server>, ViewError> {
        let table = self.txn.open_table(t::SERVERS)?;
        get_by_id(&table, "servers", &id.to_bytes())
    }

    /// The live (not deleted) server of that name.
    pub fn server_by_name(&self, name: &ServerName) -> Result<Option<Server>, ViewError> {
        let names = self.txn.open_table(t::SERVER_NAMES)?;
        let Some(id) = names.get(name.as_str())?.map(|g| *g.value()) else {
            return Ok(None);
        };
        self.server_by_id(&ServerId::from_bytes(id))
    }

    /// Servers by id; deleted ones only when asked.
    pub fn servers(&self, include_deleted: bool) -> Result<Vec<Server>, ViewError> {
        let table = self.txn.open_table(t::SERVERS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            let id = k.value();
            let s: Server = decode("servers", || show_id(id), v.value())?;
            if include_deleted || s.deleted.is_none() {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// Quarantined events with a sequence above `after`, oldest first, at most `limit`.
    pub fn quarantine(&self, after: u64, limit: usize) -> Result<Vec<QuarantineEntry>, ViewError> {
        let table = self.txn.open_table(t::QUARANTINE)?;
        let mut out = Vec::new();
        for entry in table.range((after.saturating_add(1))..)?.take(limit) {
            let (k, v) = entry?;
            let seq = k.value();
            out.push(decode("quarantine", || seq.to_string(), v.value())?);
        }
        Ok(out)
    }

    /// How many events are quarantined.
    pub fn quarantine_len(&self) -> Result<u64, ViewError> {
        Ok(self.txn.open_table(t::QUARANTINE)?.len()?)
    }

    /// `applied.{Kind}` and `quarantined.{reason}` totals over the whole folded history.
    pub fn counters(&self) -> Result<BTreeMap<String, u64>, ViewError> {
        let table = self.txn.open_table(t::COUNTERS)?;
        let mut out = BTreeMap::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            out.insert(k.value().to_owned(), v.value());
        }
        Ok(out)
    }
}
