//! The write side of a fold (ADR 0004): a batch's changes are staged in memory, decoded, and
//! written once each when the batch commits.
//!
//! Folding reads the committed view through one read transaction ([`Base`]) and keeps every row
//! it reads or writes in a [`Rows`] map. A device claimed, attached and released in one batch is
//! decoded once and written once; a host's record is re-stamped by each of its agent's events
//! but written once; the device indexes are not touched per event at all — at commit they are
//! derived from each device's committed row and its final row, so a device that is free again
//! by the end of the batch costs no index write. The rows go to redb in key order, one B-tree
//! pass per table.
//!
//! The result is the same view, byte for byte, as writing through at every event (the fold
//! tests fold one history in batches of 1 and of thousands and compare every table).

use std::borrow::Borrow;
use std::hash::Hash;

use hashbrown::hash_map::RawEntryMut;

use redb::{ReadOnlyTable, ReadTransaction, ReadableDatabase};

use crate::error::ViewError;
use crate::tables::{self as t, IdKey};

/// The committed view a batch reads: one read transaction, each table opened once.
pub(crate) struct Base {
    pub meta: ReadOnlyTable<&'static str, u64>,
    pub devices: ReadOnlyTable<IdKey, &'static [u8]>,
    pub device_info: ReadOnlyTable<IdKey, &'static [u8]>,
    pub lineages: ReadOnlyTable<IdKey, &'static [u8]>,
    pub hosts: ReadOnlyTable<&'static str, &'static [u8]>,
    pub claims: ReadOnlyTable<IdKey, &'static [u8]>,
    pub flavors: ReadOnlyTable<IdKey, &'static [u8]>,
    pub flavor_names: ReadOnlyTable<&'static str, IdKey>,
    pub servers: ReadOnlyTable<IdKey, &'static [u8]>,
    pub server_names: ReadOnlyTable<&'static str, IdKey>,
    /// Holds the snapshot the tables read (they keep it alive too; this makes it explicit).
    _txn: ReadTransaction,
}

impl Base {
    /// Opens the last committed state of `db`. Every table exists ([`crate::View`] creates
    /// them all when it opens the file).
    pub fn open(db: &impl ReadableDatabase) -> Result<Self, ViewError> {
        let txn = db.begin_read()?;
        Ok(Self {
            meta: txn.open_table(t::META)?,
            devices: txn.open_table(t::DEVICES)?,
            device_info: txn.open_table(t::DEVICE_INFO)?,
            lineages: txn.open_table(t::LINEAGES)?,
            hosts: txn.open_table(t::HOSTS)?,
            claims: txn.open_table(t::CLAIMS)?,
            flavors: txn.open_table(t::FLAVORS)?,
            flavor_names: txn.open_table(t::FLAVOR_NAMES)?,
            servers: txn.open_table(t::SERVERS)?,
            server_names: txn.open_table(t::SERVER_NAMES)?,
            _txn: txn,
        })
    }
}

/// One row as the batch sees it: `None` is absent (never written, or removed by the batch).
#[derive(Debug)]
pub(crate) struct Row<V> {
    pub now: Option<V>,
    /// Changed by the batch: written (or removed) at commit.
    pub dirty: bool,
    /// Whether the row existed before the batch (`None`: not known, the batch wrote it without
    /// reading it first). A row absent before and after the batch is not written at all: a
    /// server named and deleted, a claim made and released within one batch cost no redb
    /// remove.
    pub existed: Option<bool>,
}

/// The hash map the fold stages rows in: hashbrown with its default hasher (foldhash, seeded
/// per process) instead of std's SipHash, which was ~4% of the fold's CPU, and with
/// `raw_entry_mut`, so a row is found or staged in one lookup without an owned key.
pub(crate) type Map<K, V> = hashbrown::HashMap<K, V>;

/// The rows of one table that a batch has read or written, keyed like the table (hashed for
/// the fold's lookups; sorted only when written).
#[derive(Debug)]
pub(crate) struct Rows<K, V> {
    rows: Map<K, Row<V>>,
}

impl<K, V> Default for Rows<K, V> {
    fn default() -> Self {
        Self {
            rows: Map::default(),
        }
    }
}

impl<K: Ord + Hash, V: Clone> Rows<K, V> {
    /// The row under `key` as the batch sees it, loading it from the committed view on first
    /// use (`load` is called at most once per key and batch).
    pub fn get<Q>(
        &mut self,
        key: &Q,
        load: impl FnOnce() -> Result<Option<V>, ViewError>,
    ) -> Result<Option<V>, ViewError>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        Ok(self.row(key, load)?.now.clone())
    }

    /// The row under `key` as the batch sees it, borrowed (loaded on first use, not copied,
    /// not marked as written).
    pub fn get_ref<Q>(
        &mut self,
        key: &Q,
        load: impl FnOnce() -> Result<Option<V>, ViewError>,
    ) -> Result<Option<&V>, ViewError>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        Ok(self.row(key, load)?.now.as_ref())
    }

    /// Whether the row under `key` exists as the batch sees it (loaded on first use, not copied).
    pub fn exists<Q>(
        &mut self,
        key: &Q,
        load: impl FnOnce() -> Result<Option<V>, ViewError>,
    ) -> Result<bool, ViewError>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        Ok(self.row(key, load)?.now.is_some())
    }

    /// The staged row under `key`, loaded on first use.
    fn row<Q>(
        &mut self,
        key: &Q,
        load: impl FnOnce() -> Result<Option<V>, ViewError>,
    ) -> Result<&mut Row<V>, ViewError>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        Ok(match self.rows.raw_entry_mut().from_key(key) {
            RawEntryMut::Occupied(o) => o.into_mut(),
            RawEntryMut::Vacant(v) => {
                let now = load()?;
                let existed = Some(now.is_some());
                v.insert(
                    key.to_owned(),
                    Row {
                        now,
                        dirty: false,
                        existed,
                    },
                )
                .1
            }
        })
    }

    /// The row under `key` to change in place (no copy), loading it from the committed view on
    /// first use like [`Rows::get`]. The row is written at commit, changed or not; a caller that
    /// may still refuse the event must not change it before its last check.
    pub fn get_mut<Q>(
        &mut self,
        key: &Q,
        load: impl FnOnce() -> Result<Option<V>, ViewError>,
    ) -> Result<&mut Option<V>, ViewError>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let row = self.row(key, load)?;
        row.dirty = true;
        Ok(&mut row.now)
    }

    /// The row under `key`, if the batch has seen it.
    pub fn peek<Q>(&self, key: &Q) -> Option<&Row<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.rows.get(key)
    }

    /// Whether the batch has seen this key (read or written).
    pub fn contains<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.rows.contains_key(key)
    }

    /// Records a row as committed (read from the view, unchanged).
    pub fn put_clean(&mut self, key: K, now: Option<V>) {
        let existed = Some(now.is_some());
        self.rows.insert(
            key,
            Row {
                now,
                dirty: false,
                existed,
            },
        );
    }

    /// Sets the row (`None` removes it) for the commit.
    pub fn put(&mut self, key: K, now: Option<V>) {
        match self.rows.entry(key) {
            hashbrown::hash_map::Entry::Occupied(mut o) => {
                let row = o.get_mut();
                row.now = now;
                row.dirty = true;
            }
            hashbrown::hash_map::Entry::Vacant(v) => {
                v.insert(Row {
                    now,
                    dirty: true,
                    existed: None,
                });
            }
        }
    }

    /// The changed rows, in key order (the order redb writes them fastest), less those absent
    /// both before and after the batch (nothing to write).
    pub fn dirty(&self) -> Vec<(&K, Option<&V>)> {
        let mut rows: Vec<_> = self
            .rows
            .iter()
            .filter(|(_, r)| r.dirty && (r.now.is_some() || r.existed != Some(false)))
            .map(|(k, r)| (k, r.now.as_ref()))
            .collect();
        rows.sort_unstable_by(|a, b| a.0.cmp(b.0));
        rows
    }

    /// How many rows the batch holds (read or written).
    pub fn len(&self) -> usize {
        self.rows.len()
    }
}
