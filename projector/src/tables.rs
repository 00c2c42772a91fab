//! Every table of the view, declared once. Keys are native ordered redb types (big-endian UUID
//! bytes, integers, tuples, `&str`), never postcard varints; values are postcard records decoded
//! where errors can be returned ([`decode`]).
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | name | u64 (`last_applied_seq`, `format`) |
//! | `devices` | device id | [`crate::Device`] |
//! | `lineages` | lineage id | [`crate::Lineage`] |
//! | `lineage_history` | (lineage id, ordinal from 1) | device id |
//! | `host_devices` | (host, device id) | () — the current enumerations on a host |
//! | `free_by_host` | (host, device id) | () — available devices on a host |
//! | `free_by_match` | (vendor << 16 \| product, host, device id) | () — available devices by ids |
//! | `hosts` | host | [`crate::Host`] |
//! | `claims` | lineage id | [`crate::Claim`] |
//! | `subject_seqs` | subject | last stream sequence on it (claim and flavor subjects) |
//! | `flavors` | flavor id | [`crate::Flavor`] |
//! | `flavor_names` | name | flavor id (live flavors) |
//! | `servers` | server id | [`crate::Server`] |
//! | `server_names` | name | server id (live servers) |
//! | `quarantine` | stream sequence | [`crate::QuarantineEntry`] |
//! | `counters` | `applied.{Kind}` / `quarantined.{reason}` | u64 |

use redb::{ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;
use usbpt_schemas::{ProductId, VendorId};

use crate::error::ViewError;

pub type Id = [u8; 16];

pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub const DEVICES: TableDefinition<Id, &[u8]> = TableDefinition::new("devices");
pub const LINEAGES: TableDefinition<Id, &[u8]> = TableDefinition::new("lineages");
pub const LINEAGE_HISTORY: TableDefinition<(Id, u32), Id> = TableDefinition::new("lineage_history");
pub const HOST_DEVICES: TableDefinition<(&str, Id), ()> = TableDefinition::new("host_devices");
pub const FREE_BY_HOST: TableDefinition<(&str, Id), ()> = TableDefinition::new("free_by_host");
pub const FREE_BY_MATCH: TableDefinition<(u64, &str, Id), ()> =
    TableDefinition::new("free_by_match");
pub const HOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("hosts");
pub const CLAIMS: TableDefinition<Id, &[u8]> = TableDefinition::new("claims");
pub const SUBJECT_SEQS: TableDefinition<&str, u64> = TableDefinition::new("subject_seqs");
pub const FLAVORS: TableDefinition<Id, &[u8]> = TableDefinition::new("flavors");
pub const FLAVOR_NAMES: TableDefinition<&str, Id> = TableDefinition::new("flavor_names");
pub const SERVERS: TableDefinition<Id, &[u8]> = TableDefinition::new("servers");
pub const SERVER_NAMES: TableDefinition<&str, Id> = TableDefinition::new("server_names");
pub const QUARANTINE: TableDefinition<u64, &[u8]> = TableDefinition::new("quarantine");
pub const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// `meta` key of the last stream sequence folded (applied or quarantined).
pub const META_LAST_APPLIED: &str = "last_applied_seq";
/// `meta` key of the record format ([`crate::VIEW_FORMAT`]).
pub const META_FORMAT: &str = "format";

/// The `free_by_match` key prefix of a vendor:product pair (u64, so `+ 1` bounds a range).
pub fn vp_key(vendor: VendorId, product: ProductId) -> u64 {
    (u64::from(vendor.value()) << 16) | u64::from(product.value())
}

/// Encodes a record.
pub fn encode<T: Serialize>(table: &'static str, value: &T) -> Result<Vec<u8>, ViewError> {
    postcard::to_allocvec(value).map_err(|e| ViewError::Encode {
        table,
        message: e.to_string(),
    })
}

/// Decodes a record, naming the table and key when the bytes are not a valid record.
pub fn decode<T: DeserializeOwned>(
    table: &'static str,
    key: impl FnOnce() -> String,
    bytes: &[u8],
) -> Result<T, ViewError> {
    postcard::from_bytes(bytes).map_err(|e| ViewError::Corrupt {
        table,
        key: key(),
        message: e.to_string(),
    })
}

/// Reads and decodes the record under a UUID key.
pub fn get_by_id<T: DeserializeOwned>(
    table: &impl ReadableTable<Id, &'static [u8]>,
    name: &'static str,
    id: &Id,
) -> Result<Option<T>, ViewError> {
    match table.get(id)? {
        None => Ok(None),
        Some(guard) => decode(name, || show_id(id), guard.value()).map(Some),
    }
}

/// Reads and decodes the record under a text key.
pub fn get_by_str<T: DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &'static str,
    key: &str,
) -> Result<Option<T>, ViewError> {
    match table.get(key)? {
        None => Ok(None),
        Some(guard) => decode(name, || key.to_owned(), guard.value()).map(Some),
    }
}

/// A UUID key as text.
pub fn show_id(id: &Id) -> String {
    uuid::Uuid::from_bytes(*id).hyphenated().to_string()
}
