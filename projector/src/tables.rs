//! Every table of the view, declared once (the `tables!` list below: constants, [`NAMES`] and
//! [`visit_all`], which creation and digests go through). Keys are native ordered redb types (big-endian UUID
//! bytes, integers, tuples, `&str`), never postcard varints; values are postcard records decoded
//! where errors can be returned ([`decode`]).
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | name | u64 (`last_applied_seq`, `format`) |
//! | `devices` | device id | a [`crate::Device`] without its discovery: status, holder, holds, fingerprint … |
//! | `device_info` | device id | the device's `DeviceDiscovered` (written once, never changed) |
//! | `lineages` | lineage id | [`crate::Lineage`] |
//! | `lineage_history` | (lineage id, ordinal from 1) | device id |
//! | `host_devices` | (host, device id) | () — the current enumerations on a host |
//! | `free_by_match` | (vendor << 16 \| product, host, device id) | () — available devices by ids |
//! | `hosts` | host | [`crate::Host`] |
//! | `claims` | lineage id | [`crate::Claim`] |
//! | `subject_seqs` | subject | last stream sequence on it (the fenced ones: claim and flavor subjects) |
//! | `flavors` | flavor id | [`crate::Flavor`] |
//! | `flavor_names` | name | flavor id (live flavors) |
//! | `servers` | server id | [`crate::Server`] |
//! | `server_names` | name | server id (live servers) |
//! | `quarantine` | stream sequence | [`crate::QuarantineEntry`] |
//! | `counters` | `applied.{Kind}` / `quarantined.{reason}` | u64 |

use redb::{Key, ReadableTable, TableDefinition, Value, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;
use usbpt_schemas::{DeviceDiscovered, Fingerprint, ProductId, ServerId, VendorId};

use crate::error::ViewError;
use crate::model::{AttachError, Attachment, Device, DeviceStatus, Holding, Invalidation, Stamp};

pub type Id = [u8; 16];

/// A UUID as a redb key or value: the same 16 bytes and the same type name as `[u8; 16]` (so a
/// view written with either opens with the other), but compared as one byte string. redb's
/// `[u8; 16]` compares element by element through a call per byte and copies the key into a
/// `Vec` to insert it: that was a quarter of the fold's instructions.
pub type IdKey = &'static Id;

/// Declares every table once: its constant, and its place in [`visit_all`] (the view's fixed
/// table order: creation, digests, comparisons).
macro_rules! tables {
    ($($(#[$doc:meta])* $def:ident: $key:ty => $value:ty = $name:literal, $kind:ident;)*) => {
        $($(#[$doc])* pub const $def: TableDefinition<$key, $value> = TableDefinition::new($name);)*

        /// Every table's name, in the view's fixed order.
        pub const NAMES: &[&str] = &[$($name),*];

        /// Shows every table of the view to `v`, in the view's fixed order.
        pub fn visit_all(v: &mut impl Visit) -> Result<(), ViewError> {
            $(v.table($def, KeyKind::$kind)?;)*
            Ok(())
        }
    };
}

tables! {
    META: &str => u64 = "meta", Str;
    DEVICES: IdKey => &[u8] = "devices", Id;
    DEVICE_INFO: IdKey => &[u8] = "device_info", Id;
    LINEAGES: IdKey => &[u8] = "lineages", Id;
    LINEAGE_HISTORY: (IdKey, u32) => IdKey = "lineage_history", IdOrdinal;
    HOST_DEVICES: (&str, IdKey) => () = "host_devices", StrId;
    FREE_BY_MATCH: (u64, &str, IdKey) => () = "free_by_match", Match;
    HOSTS: &str => &[u8] = "hosts", Str;
    CLAIMS: IdKey => &[u8] = "claims", Id;
    SUBJECT_SEQS: &str => u64 = "subject_seqs", Str;
    FLAVORS: IdKey => &[u8] = "flavors", Id;
    FLAVOR_NAMES: &str => IdKey = "flavor_names", Str;
    SERVERS: IdKey => &[u8] = "servers", Id;
    SERVER_NAMES: &str => IdKey = "server_names", Str;
    QUARANTINE: u64 => &[u8] = "quarantine", Seq;
    COUNTERS: &str => u64 = "counters", Str;
}

/// How a table's keys are read (and shown in a difference report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// Text.
    Str,
    /// A UUID.
    Id,
    /// A stream sequence.
    Seq,
    /// (UUID, ordinal).
    IdOrdinal,
    /// (text, UUID).
    StrId,
    /// (vendor:product, host, UUID).
    Match,
}

/// Something that looks at every table of the view ([`visit_all`]).
pub trait Visit {
    fn table<K: Key + 'static, V: Value + 'static>(
        &mut self,
        def: TableDefinition<K, V>,
        kind: KeyKind,
    ) -> Result<(), ViewError>;
}

/// Creates every table of the view that is missing.
pub(crate) fn create_all(txn: &WriteTransaction) -> Result<(), ViewError> {
    struct Create<'a>(&'a WriteTransaction);
    impl Visit for Create<'_> {
        fn table<K: Key + 'static, V: Value + 'static>(
            &mut self,
            def: TableDefinition<K, V>,
            _kind: KeyKind,
        ) -> Result<(), ViewError> {
            self.0.open_table(def)?;
            Ok(())
        }
    }
    visit_all(&mut Create(txn))
}

/// `meta` key of the last stream sequence folded (applied or quarantined).
pub const META_LAST_APPLIED: &str = "last_applied_seq";
/// `meta` key of the record format ([`crate::VIEW_FORMAT`]).
pub const META_FORMAT: &str = "format";

/// The `free_by_match` key prefix of a vendor:product pair (u64, so `+ 1` bounds a range).
pub fn vp_key(vendor: VendorId, product: ProductId) -> u64 {
    (u64::from(vendor.value()) << 16) | u64::from(product.value())
}

/// Encodes a record: into a scratch buffer kept by the thread, then copied out at its exact
/// size (one allocation; growing a new `Vec` byte by byte reallocated it several times a row).
pub fn encode<T: Serialize>(table: &'static str, value: &T) -> Result<Vec<u8>, ViewError> {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.clear();
        let buf =
            postcard::to_extend(value, std::mem::take(scratch)).map_err(|e| ViewError::Encode {
                table,
                message: e.to_string(),
            })?;
        let out = buf.clone();
        *scratch = buf;
        Ok(out)
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
    table: &impl ReadableTable<IdKey, &'static [u8]>,
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

/// The mutable part of a device, as the `devices` table stores it (ADR 0004): the agent's
/// report is in `device_info`, written once, so the rows the fold rewrites stay small.
#[derive(serde::Serialize)]
struct DeviceStateOut<'a> {
    status: DeviceStatus,
    holder: Option<ServerId>,
    current: bool,
    discovered: Stamp,
    invalidation: &'a Option<Invalidation>,
    attachment: &'a Option<Attachment>,
    holders: &'a [Holding],
    attach_error: &'a Option<AttachError>,
    last_change_seq: u64,
    fingerprint: Option<Fingerprint>,
    blocked: bool,
}

/// [`DeviceStateOut`] read back (the same fields, owned).
#[derive(serde::Deserialize)]
struct DeviceStateIn {
    status: DeviceStatus,
    holder: Option<ServerId>,
    current: bool,
    discovered: Stamp,
    invalidation: Option<Invalidation>,
    attachment: Option<Attachment>,
    holders: Vec<Holding>,
    attach_error: Option<AttachError>,
    last_change_seq: u64,
    fingerprint: Option<Fingerprint>,
    blocked: bool,
}

/// Encodes the `devices` row of a device.
pub fn encode_device_state(d: &Device) -> Result<Vec<u8>, ViewError> {
    encode(
        "devices",
        &DeviceStateOut {
            status: d.status,
            holder: d.holder,
            current: d.current,
            discovered: d.discovered,
            invalidation: &d.invalidation,
            attachment: &d.attachment,
            holders: &d.holders,
            attach_error: &d.attach_error,
            last_change_seq: d.last_change_seq,
            fingerprint: d.fingerprint,
            blocked: d.blocked,
        },
    )
}

/// Reads a device: its `devices` row and its `device_info` row.
pub fn get_device(
    states: &impl ReadableTable<IdKey, &'static [u8]>,
    infos: &impl ReadableTable<IdKey, &'static [u8]>,
    id: &Id,
) -> Result<Option<Device>, ViewError> {
    match states.get(id)? {
        None => Ok(None),
        Some(guard) => device_from_state(infos, id, guard.value()).map(Some),
    }
}

/// Completes a `devices` row with its `device_info` row.
pub fn device_from_state(
    infos: &impl ReadableTable<IdKey, &'static [u8]>,
    id: &Id,
    state: &[u8],
) -> Result<Device, ViewError> {
    let s: DeviceStateIn = decode("devices", || show_id(id), state)?;
    let Some(info) = infos.get(id)? else {
        return Err(ViewError::Corrupt {
            table: "device_info",
            key: show_id(id),
            message: "the device has a devices row but no device_info row".into(),
        });
    };
    let discovery: DeviceDiscovered = decode("device_info", || show_id(id), info.value())?;
    Ok(Device {
        discovery: std::sync::Arc::new(discovery),
        status: s.status,
        holder: s.holder,
        current: s.current,
        discovered: s.discovered,
        invalidation: s.invalidation,
        attachment: s.attachment,
        holders: s.holders,
        attach_error: s.attach_error,
        last_change_seq: s.last_change_seq,
        fingerprint: s.fingerprint,
        blocked: s.blocked,
    })
}

/// A UUID key as text.
pub fn show_id(id: &Id) -> String {
    uuid::Uuid::from_bytes(*id).hyphenated().to_string()
}

#[cfg(test)]
mod tests {
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};

    use super::IdKey;

    /// A table written with `[u8; 16]` keys and values (views before `IdKey`) opens with
    /// `IdKey`, in the same order with the same bytes, and the other way round.
    #[test]
    fn id_key_is_the_same_type_as_a_byte_array() -> Result<(), Box<dyn std::error::Error>> {
        const OLD: TableDefinition<(&str, [u8; 16]), [u8; 16]> = TableDefinition::new("t");
        const NEW: TableDefinition<(&str, IdKey), IdKey> = TableDefinition::new("t");
        let dir = tempfile::tempdir()?;
        let db = redb::Database::create(dir.path().join("v.redb"))?;
        let ids = [[0u8; 16], [0xff; 16], [1; 16], [0x80; 16], [0x7f; 16]];
        let txn = db.begin_write()?;
        {
            let mut t = txn.open_table(OLD)?;
            for id in &ids {
                t.insert(("h", *id), *id)?;
            }
        }
        txn.commit()?;
        let txn = db.begin_write()?;
        {
            let mut t = txn.open_table(NEW)?;
            t.insert(("a", &[2u8; 16]), &[2u8; 16])?;
        }
        txn.commit()?;
        let mut want: Vec<(&str, [u8; 16])> = ids.iter().map(|id| ("h", *id)).collect();
        want.push(("a", [2; 16]));
        want.sort();
        let txn = db.begin_read()?;
        let new: Vec<(String, [u8; 16], [u8; 16])> = txn
            .open_table(NEW)?
            .iter()?
            .map(|e| {
                let (k, v) = e?;
                let (h, id) = k.value();
                Ok((h.to_owned(), *id, *v.value()))
            })
            .collect::<Result<_, redb::StorageError>>()?;
        let old: Vec<(String, [u8; 16], [u8; 16])> = txn
            .open_table(OLD)?
            .iter()?
            .map(|e| {
                let (k, v) = e?;
                let (h, id) = k.value();
                Ok((h.to_owned(), id, v.value()))
            })
            .collect::<Result<_, redb::StorageError>>()?;
        let want: Vec<_> = want
            .into_iter()
            .map(|(h, id)| (h.to_owned(), id, id))
            .collect();
        assert_eq!(new, want);
        assert_eq!(old, want);
        Ok(())
    }
}
