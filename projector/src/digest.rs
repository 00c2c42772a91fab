//! Canonical digests of a view, and the first difference between two views: what
//! `usbpt replay --verify` uses to prove the live view equals a clean replay.
//!
//! The digest covers every table, in a fixed order, every entry in key order, as the exact
//! stored bytes (SHA-256 over length-prefixed keys and values). Two views digest alike iff they
//! hold the same bytes.

use std::cmp::Ordering;
use std::fmt;

use redb::{
    Key, ReadTransaction, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle, Value,
};
use sha2::{Digest as _, Sha256};

use crate::error::ViewError;
use crate::tables::{self as t, show_id, Id, KeyKind, Visit};
use crate::view::Snapshot;

fn show_key(kind: KeyKind, bytes: &[u8]) -> String {
    match kind {
        KeyKind::Str => <&str as Value>::from_bytes(bytes).to_owned(),
        KeyKind::Id => show_id(&<Id as Value>::from_bytes(bytes)),
        KeyKind::Seq => <u64 as Value>::from_bytes(bytes).to_string(),
        KeyKind::IdOrdinal => {
            let (id, n) = <(Id, u32) as Value>::from_bytes(bytes);
            format!("{} #{n}", show_id(&id))
        }
        KeyKind::StrId => {
            let (s, id) = <(&str, Id) as Value>::from_bytes(bytes);
            format!("{s}/{}", show_id(&id))
        }
        KeyKind::Match => {
            let (vp, s, id) = <(u64, &str, Id) as Value>::from_bytes(bytes);
            format!("{:04x}:{:04x}/{s}/{}", vp >> 16, vp & 0xffff, show_id(&id))
        }
    }
}

/// The digest of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDigest {
    pub table: String,
    pub entries: u64,
    pub sha256: String,
}

/// The digest of a whole view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewDigest {
    pub tables: Vec<TableDigest>,
    /// SHA-256 over every table's name, entry count and digest.
    pub sha256: String,
}

impl fmt::Display for ViewDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.sha256)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn len_prefixed(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

struct Digester<'a> {
    txn: &'a ReadTransaction,
    tables: Vec<TableDigest>,
}

impl Visit for Digester<'_> {
    fn table<K: Key + 'static, V: Value + 'static>(
        &mut self,
        def: TableDefinition<K, V>,
        _kind: KeyKind,
    ) -> Result<(), ViewError> {
        let table = self.txn.open_table(def)?;
        let mut h = Sha256::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            len_prefixed(&mut h, K::as_bytes(&k.value()).as_ref());
            len_prefixed(&mut h, V::as_bytes(&v.value()).as_ref());
        }
        self.tables.push(TableDigest {
            table: def.name().to_owned(),
            entries: table.len()?,
            sha256: hex(&h.finalize()),
        });
        Ok(())
    }
}

/// The canonical digest of a snapshot.
pub fn digest(snapshot: &Snapshot) -> Result<ViewDigest, ViewError> {
    let mut d = Digester {
        txn: snapshot.txn(),
        tables: Vec::new(),
    };
    t::visit_all(&mut d)?;
    Ok(view_digest(d.tables))
}

fn view_digest(tables: Vec<TableDigest>) -> ViewDigest {
    let mut h = Sha256::new();
    for t in &tables {
        len_prefixed(&mut h, t.table.as_bytes());
        h.update(t.entries.to_be_bytes());
        len_prefixed(&mut h, t.sha256.as_bytes());
    }
    ViewDigest {
        tables,
        sha256: hex(&h.finalize()),
    }
}

/// How two views first differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub table: String,
    /// The key, as text (a UUID, a name, a sequence, a tuple).
    pub key: String,
    pub what: DifferenceKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DifferenceKind {
    /// Only the left view has this key.
    OnlyLeft,
    /// Only the right view has this key.
    OnlyRight,
    /// Both have it with different values (sizes in bytes).
    ValueDiffers { left: usize, right: usize },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.what {
            DifferenceKind::OnlyLeft => "present only in the first view".to_owned(),
            DifferenceKind::OnlyRight => "present only in the second view".to_owned(),
            DifferenceKind::ValueDiffers { left, right } => {
                format!("values differ ({left} vs {right} bytes)")
            }
        };
        write!(f, "table {}, key {}: {what}", self.table, self.key)
    }
}

/// One table entry's raw key and value bytes.
type RawEntry = Option<(Vec<u8>, Vec<u8>)>;
type Guards<'a, K, V> = (redb::AccessGuard<'a, K>, redb::AccessGuard<'a, V>);

fn raw_entry<K: Key + 'static, V: Value + 'static>(
    e: Option<Result<Guards<'_, K, V>, redb::StorageError>>,
) -> Result<RawEntry, ViewError> {
    match e {
        None => Ok(None),
        Some(e) => {
            let (k, v) = e?;
            let key = K::as_bytes(&k.value()).as_ref().to_vec();
            let value = V::as_bytes(&v.value()).as_ref().to_vec();
            Ok(Some((key, value)))
        }
    }
}

struct Comparer<'a> {
    left: &'a ReadTransaction,
    right: &'a ReadTransaction,
    found: Option<Difference>,
    /// The right view's table digests, taken in the same pass (until a difference is found).
    right_tables: Vec<TableDigest>,
}

impl Visit for Comparer<'_> {
    fn table<K: Key + 'static, V: Value + 'static>(
        &mut self,
        def: TableDefinition<K, V>,
        kind: KeyKind,
    ) -> Result<(), ViewError> {
        if self.found.is_some() {
            return Ok(());
        }
        let (lt, rt) = (self.left.open_table(def)?, self.right.open_table(def)?);
        let (mut li, mut ri) = (lt.iter()?, rt.iter()?);
        let raw = raw_entry::<K, V>;
        let (mut l, mut r) = (raw(li.next())?, raw(ri.next())?);
        let mut h = Sha256::new();
        let diff = |key: &[u8], what| Difference {
            table: def.name().to_owned(),
            key: show_key(kind, key),
            what,
        };
        loop {
            match (&l, &r) {
                (None, None) => {
                    self.right_tables.push(TableDigest {
                        table: def.name().to_owned(),
                        entries: rt.len()?,
                        sha256: hex(&h.finalize()),
                    });
                    return Ok(());
                }
                (Some((lk, _)), None) => {
                    self.found = Some(diff(lk, DifferenceKind::OnlyLeft));
                    return Ok(());
                }
                (None, Some((rk, _))) => {
                    self.found = Some(diff(rk, DifferenceKind::OnlyRight));
                    return Ok(());
                }
                (Some((lk, lv)), Some((rk, rv))) => match K::compare(lk, rk) {
                    Ordering::Less => {
                        self.found = Some(diff(lk, DifferenceKind::OnlyLeft));
                        return Ok(());
                    }
                    Ordering::Greater => {
                        self.found = Some(diff(rk, DifferenceKind::OnlyRight));
                        return Ok(());
                    }
                    Ordering::Equal if lv != rv => {
                        self.found = Some(diff(
                            lk,
                            DifferenceKind::ValueDiffers {
                                left: lv.len(),
                                right: rv.len(),
                            },
                        ));
                        return Ok(());
                    }
                    Ordering::Equal => {
                        len_prefixed(&mut h, rk);
                        len_prefixed(&mut h, rv);
                        l = raw(li.next())?;
                        r = raw(ri.next())?;
                    }
                },
            }
        }
    }
}

/// The first difference between two views, table by table in digest order, key by key; `None`
/// when they hold the same bytes.
pub fn first_difference(
    left: &Snapshot,
    right: &Snapshot,
) -> Result<Option<Difference>, ViewError> {
    Ok(compare(left, right)?.err())
}

/// The right view's digest when both views hold the same bytes, or their first difference:
/// [`first_difference`] and [`digest`] in one pass over both (what `usbpt replay --verify` does,
/// so that verifying reads the replayed view once, as a plain replay's digest does).
pub fn compare(
    left: &Snapshot,
    right: &Snapshot,
) -> Result<Result<ViewDigest, Difference>, ViewError> {
    let mut c = Comparer {
        left: left.txn(),
        right: right.txn(),
        found: None,
        right_tables: Vec::new(),
    };
    t::visit_all(&mut c)?;
    Ok(match c.found {
        Some(d) => Err(d),
        None => Ok(view_digest(c.right_tables)),
    })
}
