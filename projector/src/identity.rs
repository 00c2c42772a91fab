//! Fleet-wide identity reads (issue 18 items 3 and 5): lineage labels (`LineageLabeled`, folded
//! into the lineage's record by `fold::devices::labeled`) and "where is it" ([`Snapshot::find`]):
//! every lineage matching a [`FindQuery`], with its newest enumeration — present or gone (its
//! last known place). The custody ledger is [`crate::custody`].

use serde::{Deserialize, Serialize};
use thiserror::Error;
use usbpt_schemas::{label, LineageId, ProductId, VendorId};

use crate::error::ViewError;
use crate::model::{Device, DeviceStatus, Lineage, Stamp};
use crate::tables::{self as t, decode, show_id};
use crate::view::Snapshot;

/// What `usbpt find` / `GET /v1/find` looks for. Every key given must match (AND); at least one
/// is needed. Serial and vendor/product are exact; the label matches as a case-insensitive
/// substring.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindQuery {
    pub serial: Option<String>,
    pub vendor: Option<VendorId>,
    pub product: Option<ProductId>,
    pub label: Option<String>,
    /// A descriptor fingerprint (USBGuard's base64 `hash`, as `usbpt device show` prints it),
    /// or at least its first [`FINGERPRINT_PREFIX_MIN`] characters; matched against the newest
    /// enumeration's.
    pub fingerprint: Option<String>,
}

/// The shortest fingerprint prefix `find` takes (48 bits: no accidental match in a fleet).
pub const FINGERPRINT_PREFIX_MIN: usize = 8;

/// One key of a [`FindQuery`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FindKey<'a> {
    Serial(&'a str),
    Vendor(VendorId),
    Product(ProductId),
    Label(&'a str),
    Fingerprint(&'a str),
}

/// Why a find query cannot be answered. Messages start with the field they are about.
#[derive(Debug, Error)]
pub enum FindError {
    #[error("query: give at least one of serial, vendor, product, label, fingerprint")]
    NoKey,
    #[error("fingerprint: give the base64 fingerprint (usbpt device show), or at least its first {FINGERPRINT_PREFIX_MIN} characters")]
    FingerprintTooShort,
    #[error(transparent)]
    View(#[from] ViewError),
}

impl FindQuery {
    /// The keys given, in a fixed order.
    pub fn keys(&self) -> Vec<FindKey<'_>> {
        let mut keys = Vec::new();
        keys.extend(self.serial.as_deref().map(FindKey::Serial));
        keys.extend(self.vendor.map(FindKey::Vendor));
        keys.extend(self.product.map(FindKey::Product));
        keys.extend(self.label.as_deref().map(FindKey::Label));
        keys.extend(self.fingerprint.as_deref().map(FindKey::Fingerprint));
        keys
    }

    /// Whether the lineage (with its newest enumeration) matches every key.
    pub fn matches(&self, l: &Lineage, current: &Device) -> Result<bool, FindError> {
        let keys = self.keys();
        if keys.is_empty() {
            return Err(FindError::NoKey);
        }
        if self
            .fingerprint
            .as_deref()
            .is_some_and(|f| f.len() < FINGERPRINT_PREFIX_MIN)
        {
            return Err(FindError::FingerprintTooShort);
        }
        for key in keys {
            if !key_matches(key, l, current)? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// One key against one lineage and its newest enumeration.
pub fn key_matches(key: FindKey<'_>, l: &Lineage, current: &Device) -> Result<bool, FindError> {
    Ok(match key {
        FindKey::Serial(s) => current.serial() == Some(s) || l.serial.as_deref() == Some(s),
        FindKey::Vendor(v) => l.vendor_id == v,
        FindKey::Product(p) => l.product_id == p,
        FindKey::Label(text) => l.label.as_deref().is_some_and(|x| label::matches(x, text)),
        FindKey::Fingerprint(f) => current
            .fingerprint
            .is_some_and(|fp| fp.to_base64().starts_with(f)),
    })
}

/// A lineage [`Snapshot::find`] found, with its newest enumeration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub lineage: Lineage,
    pub current: Device,
    /// When it was last known to be where it is: the stamp of its invalidation when it is gone,
    /// else its host's last event (the agent still reported from there).
    pub last_seen: Stamp,
}

impl Found {
    /// Whether the device is still present (its newest enumeration is not invalidated).
    pub fn present(&self) -> bool {
        self.current.status != DeviceStatus::Invalidated
    }
}

impl Snapshot {
    /// Every lineage, in id order.
    pub fn lineages(&self) -> Result<Vec<Lineage>, ViewError> {
        let table = self.txn().open_table(t::LINEAGES)?;
        let mut out = Vec::new();
        for entry in redb::ReadableTable::iter(&table)? {
            let (k, v) = entry?;
            let id = k.value();
            out.push(decode("lineages", || show_id(id), v.value())?);
        }
        Ok(out)
    }

    /// The lineages whose label is exactly `label` (labels need not be unique).
    pub fn lineages_labeled(&self, label: &str) -> Result<Vec<LineageId>, ViewError> {
        Ok(self
            .lineages()?
            .into_iter()
            .filter(|l| l.label.as_deref() == Some(label))
            .map(|l| l.id)
            .collect())
    }

    /// Where the devices matching `q` are, fleet-wide: present ones first, then gone ones (their
    /// last known place), each group by lineage id. Reads every lineage (no index: labels and
    /// serials are few per fleet compared with what a scan of lineage records costs).
    pub fn find(&self, q: &FindQuery) -> Result<Vec<Found>, FindError> {
        if q.keys().is_empty() {
            return Err(FindError::NoKey);
        }
        let mut out = Vec::new();
        for l in self.lineages()? {
            // The keys the lineage record answers alone, before its device is read.
            let cheap = q.vendor.is_none_or(|v| l.vendor_id == v)
                && q.product.is_none_or(|p| l.product_id == p)
                && q.label
                    .as_deref()
                    .is_none_or(|text| l.label.as_deref().is_some_and(|x| label::matches(x, text)));
            if !cheap {
                continue;
            }
            let Some(current) = self.device(&l.current)? else {
                continue;
            };
            if !q.matches(&l, &current)? {
                continue;
            }
            let last_seen = match current.invalidation {
                Some(inv) => inv.stamp,
                None => self
                    .host(current.host())?
                    .map_or(current.discovered, |h| h.last_seen),
            };
            out.push(Found {
                lineage: l,
                current,
                last_seen,
            });
        }
        out.sort_by_key(|f| !f.present());
        Ok(out)
    }
}
