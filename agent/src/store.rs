//! The agent's local state and outbox, in one redb file (`agent-{host}.redb` in the data dir).
//!
//! Every event the resolver decides is written to the outbox in the same transaction as the
//! state it leads to, before anything is published; the publisher removes an entry only after
//! JetStream acknowledged it. A crash at any point loses nothing: at worst an event that was
//! stored in the stream is published again, and `Nats-Msg-Id` (plus the publisher's check of
//! the subject's last message) keeps it out of the stream the second time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use thiserror::Error;
use usbpt_schemas::{codec, DeviceId, Envelope, LineageId, PortPath, ProductId, Sealed, VendorId};

use crate::resolver::{ClashKey, Known, State};

/// `meta`: `format` (u32, little endian) and `boot_id` (UTF-8).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Present enumerations by syspath: postcard of [`Known`].
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
/// Lineage id → its latest published enumeration's device id (both as u128).
const LINEAGES: TableDefinition<u128, u128> = TableDefinition::new("lineages");
/// Clashing serials: postcard of (vendor, product, serial) → postcard of the reported ports.
const CLASHES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("clashes");
/// Lineages in an open flapping episode (as u128; the value is unused). A table added within
/// layout 2: an older agent ignores it, this one creates it when absent.
const FLAPPING: TableDefinition<u128, ()> = TableDefinition::new("flapping");
/// The outbox: a sequence number (publishing order) → postcard of a [`Sealed`] (subject, event
/// id, encoded envelope), published as stored.
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox.sealed");
/// Layout 1's outbox (sequence → encoded envelope); [`Store::open`] moves its rows to
/// [`OUTBOX`].
const OUTBOX_V1: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");

/// The layout version of this file. Layout 1 (device rows without the descriptor fingerprint,
/// bare envelopes in the outbox) is upgraded in place when opened; any other is refused, never
/// guessed at.
const FORMAT: u32 = 2;

mod v1;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("agent state {path}: {source}")]
    Redb {
        path: String,
        #[source]
        source: redb::Error,
    },
    #[error("agent state {path} has layout version {found}, this agent writes version {FORMAT}; move the file away to start afresh (its outbox may hold unpublished events)")]
    Format { path: String, found: u32 },
    #[error("agent state {path}: cannot decode {what}: {message}")]
    Decode {
        path: String,
        what: String,
        message: String,
    },
    #[error("agent state {path}: cannot encode: {message}")]
    Encode { path: String, message: String },
}

/// The opened redb file.
#[derive(Debug)]
pub struct Store {
    db: Database,
    path: PathBuf,
}

/// The file name of `host`'s state in a data dir.
pub fn file_name(host: &usbpt_schemas::HostName) -> String {
    format!("agent-{host}.redb")
}

impl Store {
    /// Opens (creating if needed) the state file and loads what it knows. Fails with a clear
    /// error when another agent holds the file.
    pub fn open(path: &Path) -> Result<(Self, State), StoreError> {
        let shown = path.display().to_string();
        let redb_err = |e: redb::Error| StoreError::Redb {
            path: shown.clone(),
            source: e,
        };
        let db = Database::create(path).map_err(|e| redb_err(e.into()))?;
        let store = Self {
            db,
            path: path.to_owned(),
        };
        store.init()?;
        let state = store.load()?;
        Ok((store, state))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self) -> impl Fn(redb::Error) -> StoreError + '_ {
        |source| StoreError::Redb {
            path: self.path.display().to_string(),
            source,
        }
    }
    fn decode_err(&self, what: &str, message: impl ToString) -> StoreError {
        StoreError::Decode {
            path: self.path.display().to_string(),
            what: what.to_owned(),
            message: message.to_string(),
        }
    }
    fn encode_err(&self, message: impl ToString) -> StoreError {
        StoreError::Encode {
            path: self.path.display().to_string(),
            message: message.to_string(),
        }
    }

    fn init(&self) -> Result<(), StoreError> {
        let e = self.err();
        let tx = self.db.begin_write().map_err(|x| e(x.into()))?;
        {
            let mut meta = tx.open_table(META).map_err(|x| e(x.into()))?;
            let found = meta
                .get("format")
                .map_err(|x| e(x.into()))?
                .map(|v| v.value().to_vec());
            match found {
                None => {
                    meta.insert("format", FORMAT.to_le_bytes().as_slice())
                        .map_err(|x| e(x.into()))?;
                }
                Some(bytes) => {
                    let found = <[u8; 4]>::try_from(bytes.as_slice())
                        .map(u32::from_le_bytes)
                        .unwrap_or(u32::MAX);
                    if found == 1 {
                        self.upgrade_from_v1(&tx)?;
                        self.upgrade_outbox(&tx)?;
                        meta.insert("format", FORMAT.to_le_bytes().as_slice())
                            .map_err(|x| e(x.into()))?;
                    } else if found != FORMAT {
                        return Err(StoreError::Format {
                            path: self.path.display().to_string(),
                            found,
                        });
                    }
                }
            }
            tx.open_table(DEVICES).map_err(|x| e(x.into()))?;
            tx.open_table(LINEAGES).map_err(|x| e(x.into()))?;
            tx.open_table(CLASHES).map_err(|x| e(x.into()))?;
            tx.open_table(FLAPPING).map_err(|x| e(x.into()))?;
            tx.open_table(OUTBOX).map_err(|x| e(x.into()))?;
        }
        tx.commit().map_err(|x| e(x.into()))
    }

    /// Layout 1 → 2's outbox, inside the opening transaction: each unpublished envelope is sealed once
    /// (subject and bytes) into the new outbox under the same sequence number, and the old
    /// table is dropped. Nothing unpublished is lost by an upgrade.
    fn upgrade_outbox(&self, tx: &redb::WriteTransaction) -> Result<(), StoreError> {
        let e = self.err();
        let rows = {
            let old = tx.open_table(OUTBOX_V1).map_err(|x| e(x.into()))?;
            let mut rows = Vec::new();
            for row in old.iter().map_err(|x| e(x.into()))? {
                let (k, v) = row.map_err(|x| e(x.into()))?;
                let env = codec::decode(v.value())
                    .map_err(|x| self.decode_err(&format!("outbox entry {}", k.value()), x))?;
                rows.push((k.value(), self.seal(&env)?));
            }
            rows
        };
        {
            let mut outbox = tx.open_table(OUTBOX).map_err(|x| e(x.into()))?;
            for (seq, row) in &rows {
                outbox
                    .insert(*seq, row.as_slice())
                    .map_err(|x| e(x.into()))?;
            }
        }
        tx.delete_table(OUTBOX_V1).map_err(|x| e(x.into()))?;
        tracing::info!(
            path = %self.path.display(),
            unpublished = rows.len(),
            "agent state upgraded to layout {FORMAT}: the outbox stores sealed events"
        );
        Ok(())
    }

    /// An outbox row: the envelope sealed with its subject, postcard-encoded.
    fn seal(&self, env: &Envelope) -> Result<Vec<u8>, StoreError> {
        let sealed = Sealed::seal(env).map_err(|x| self.encode_err(x))?;
        postcard::to_allocvec(&sealed).map_err(|x| self.encode_err(x))
    }

    /// Rewrites every `devices` row of a layout-1 file in layout 2 ([`v1`]).
    fn upgrade_from_v1(&self, tx: &redb::WriteTransaction) -> Result<(), StoreError> {
        let e = self.err();
        let mut devices = tx.open_table(DEVICES).map_err(|x| e(x.into()))?;
        let mut rows = Vec::new();
        for row in devices.iter().map_err(|x| e(x.into()))? {
            let (k, v) = row.map_err(|x| e(x.into()))?;
            let known = v1::known(v.value())
                .map_err(|x| self.decode_err(&format!("layout-1 device {}", k.value()), x))?;
            rows.push((k.value().to_owned(), known));
        }
        for (k, known) in rows {
            let bytes = postcard::to_allocvec(&known).map_err(|x| self.encode_err(x))?;
            devices
                .insert(k.as_str(), bytes.as_slice())
                .map_err(|x| e(x.into()))?;
        }
        Ok(())
    }

    fn load(&self) -> Result<State, StoreError> {
        let e = self.err();
        let tx = self.db.begin_read().map_err(|x| e(x.into()))?;
        let mut state = State::default();
        let meta = tx.open_table(META).map_err(|x| e(x.into()))?;
        if let Some(v) = meta.get("boot_id").map_err(|x| e(x.into()))? {
            let boot =
                String::from_utf8(v.value().to_vec()).map_err(|x| self.decode_err("boot id", x))?;
            state.boot_id = Some(boot);
        }
        let devices = tx.open_table(DEVICES).map_err(|x| e(x.into()))?;
        for row in devices.iter().map_err(|x| e(x.into()))? {
            let (k, v) = row.map_err(|x| e(x.into()))?;
            let known: Known = postcard::from_bytes(v.value())
                .map_err(|x| self.decode_err(&format!("device {}", k.value()), x))?;
            state.devices.insert(k.value().to_owned(), known);
        }
        let lineages = tx.open_table(LINEAGES).map_err(|x| e(x.into()))?;
        for row in lineages.iter().map_err(|x| e(x.into()))? {
            let (k, v) = row.map_err(|x| e(x.into()))?;
            state.lineages.insert(
                LineageId::from_uuid(uuid_of(k.value())),
                DeviceId::from_uuid(uuid_of(v.value())),
            );
        }
        let clashes = tx.open_table(CLASHES).map_err(|x| e(x.into()))?;
        for row in clashes.iter().map_err(|x| e(x.into()))? {
            let (k, v) = row.map_err(|x| e(x.into()))?;
            let key: (VendorId, ProductId, String) =
                postcard::from_bytes(k.value()).map_err(|x| self.decode_err("clash key", x))?;
            let ports: Vec<PortPath> =
                postcard::from_bytes(v.value()).map_err(|x| self.decode_err("clash ports", x))?;
            state.clashes.insert(key, ports.into_iter().collect());
        }
        let flapping = tx.open_table(FLAPPING).map_err(|x| e(x.into()))?;
        for row in flapping.iter().map_err(|x| e(x.into()))? {
            let (k, _) = row.map_err(|x| e(x.into()))?;
            state
                .flapping
                .insert(LineageId::from_uuid(uuid_of(k.value())));
        }
        Ok(state)
    }

    /// Writes the state change from `before` to `after` and appends `events` to the outbox, in
    /// one durable transaction.
    pub fn commit(
        &self,
        before: &State,
        after: &State,
        events: &[Envelope],
    ) -> Result<(), StoreError> {
        let e = self.err();
        let tx = self.db.begin_write().map_err(|x| e(x.into()))?;
        {
            if before.boot_id != after.boot_id {
                let mut meta = tx.open_table(META).map_err(|x| e(x.into()))?;
                match &after.boot_id {
                    Some(b) => meta.insert("boot_id", b.as_bytes()).map(|_| ()),
                    None => meta.remove("boot_id").map(|_| ()),
                }
                .map_err(|x| e(x.into()))?;
            }
            let mut devices = tx.open_table(DEVICES).map_err(|x| e(x.into()))?;
            for (path, known) in changed(&before.devices, &after.devices) {
                match known {
                    Some(k) => {
                        let bytes = postcard::to_allocvec(k).map_err(|x| self.encode_err(x))?;
                        devices.insert(path.as_str(), bytes.as_slice()).map(|_| ())
                    }
                    None => devices.remove(path.as_str()).map(|_| ()),
                }
                .map_err(|x| e(x.into()))?;
            }
            let mut lineages = tx.open_table(LINEAGES).map_err(|x| e(x.into()))?;
            for (lineage, device) in changed(&before.lineages, &after.lineages) {
                let key = lineage.as_uuid().as_u128();
                match device {
                    Some(d) => lineages.insert(key, d.as_uuid().as_u128()).map(|_| ()),
                    None => lineages.remove(key).map(|_| ()),
                }
                .map_err(|x| e(x.into()))?;
            }
            let mut clashes = tx.open_table(CLASHES).map_err(|x| e(x.into()))?;
            for (key, ports) in changed(&before.clashes, &after.clashes) {
                let k = clash_bytes(key).map_err(|x| self.encode_err(x))?;
                match ports {
                    Some(p) => {
                        let v: Vec<&PortPath> = p.iter().collect();
                        let v = postcard::to_allocvec(&v).map_err(|x| self.encode_err(x))?;
                        clashes.insert(k.as_slice(), v.as_slice()).map(|_| ())
                    }
                    None => clashes.remove(k.as_slice()).map(|_| ()),
                }
                .map_err(|x| e(x.into()))?;
            }
            if before.flapping != after.flapping {
                let mut flapping = tx.open_table(FLAPPING).map_err(|x| e(x.into()))?;
                for l in after.flapping.difference(&before.flapping) {
                    flapping
                        .insert(l.as_uuid().as_u128(), ())
                        .map_err(|x| e(x.into()))?;
                }
                for l in before.flapping.difference(&after.flapping) {
                    flapping
                        .remove(l.as_uuid().as_u128())
                        .map_err(|x| e(x.into()))?;
                }
            }
            let mut outbox = tx.open_table(OUTBOX).map_err(|x| e(x.into()))?;
            let first = outbox
                .last()
                .map_err(|x| e(x.into()))?
                .map_or(1, |(k, _)| k.value() + 1);
            for (seq, env) in (first..).zip(events) {
                let bytes = self.seal(env)?;
                outbox
                    .insert(seq, bytes.as_slice())
                    .map_err(|x| e(x.into()))?;
            }
        }
        tx.commit().map_err(|x| e(x.into()))
    }

    /// Appends `events` to the outbox alone (no state change), durably.
    pub fn enqueue(&self, events: &[Envelope]) -> Result<(), StoreError> {
        let none = State::default();
        self.commit(&none, &none, events)
    }

    /// Up to `limit` unpublished events, oldest first, as stored.
    pub fn outbox_head(&self, limit: usize) -> Result<Vec<(u64, Sealed)>, StoreError> {
        let e = self.err();
        let tx = self.db.begin_read().map_err(|x| e(x.into()))?;
        let outbox = tx.open_table(OUTBOX).map_err(|x| e(x.into()))?;
        let mut out = Vec::new();
        for row in outbox.iter().map_err(|x| e(x.into()))?.take(limit) {
            let (k, v) = row.map_err(|x| e(x.into()))?;
            let sealed: Sealed = postcard::from_bytes(v.value())
                .map_err(|x| self.decode_err(&format!("outbox entry {}", k.value()), x))?;
            out.push((k.value(), sealed));
        }
        Ok(out)
    }

    /// Removes published events (after their acks) in one durable commit.
    pub fn outbox_remove_all(&self, seqs: &[u64]) -> Result<(), StoreError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let e = self.err();
        let tx = self.db.begin_write().map_err(|x| e(x.into()))?;
        {
            let mut outbox = tx.open_table(OUTBOX).map_err(|x| e(x.into()))?;
            for seq in seqs {
                outbox.remove(*seq).map_err(|x| e(x.into()))?;
            }
        }
        tx.commit().map_err(|x| e(x.into()))
    }

    /// How many events wait to be published.
    pub fn outbox_len(&self) -> Result<u64, StoreError> {
        let e = self.err();
        let tx = self.db.begin_read().map_err(|x| e(x.into()))?;
        let outbox = tx.open_table(OUTBOX).map_err(|x| e(x.into()))?;
        outbox.len().map_err(|x| e(x.into()))
    }
}

fn uuid_of(v: u128) -> uuid::Uuid {
    uuid::Uuid::from_u128(v)
}

fn clash_bytes(key: &ClashKey) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_allocvec(key)
}

/// Entries that differ between two maps: `Some(new value)` for inserted or changed keys,
/// `None` for removed ones.
fn changed<'a, K: Ord, V: PartialEq>(
    before: &'a BTreeMap<K, V>,
    after: &'a BTreeMap<K, V>,
) -> Vec<(&'a K, Option<&'a V>)> {
    let mut out: Vec<(&K, Option<&V>)> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .map(|(k, v)| (k, Some(v)))
        .collect();
    out.extend(
        before
            .keys()
            .filter(|k| !after.contains_key(*k))
            .map(|k| (k, None)),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::Filter;
    use crate::observation::{Interface, UsbDevice};
    use crate::resolver::{reconcile, Context, Reconcile, V7Ids};
    use usbpt_schemas::{Event, HostAgentStarted, HostName, UsbAddress, UsbDescriptors};

    fn device(port: &str, devnum: u16, serial: &str) -> UsbDevice {
        let mut desc = UsbDescriptors::new(
            UsbAddress::new(1, devnum).expect("address"),
            port.parse().expect("port"),
            VendorId(0x04a9),
            ProductId(0x31c0),
        );
        desc.serial = Some(serial.into());
        desc.manufacturer = Some("Canon Inc.".into());
        desc.speed = Some("480".into());
        desc.usb_version = Some("2.00".into());
        UsbDevice::new(
            format!("/sys/devices/pci0000:00/usb1/{port}"),
            desc,
            vec![Interface::new(6, 1, 1)],
        )
    }

    fn started(host: &HostName) -> Envelope {
        Envelope::new(Event::HostAgentStarted(HostAgentStarted {
            host: host.clone(),
            boot_id: "b".into(),
            agent_version: "0".into(),
            hypervisor_uri: "test:///default".into(),
        }))
    }

    /// A layout-1 file (the outbox held bare envelopes) opens as layout 2 with every
    /// unpublished event sealed under its old sequence number, in order.
    #[test]
    fn a_layout_1_outbox_is_sealed_in_place_and_nothing_is_lost() {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = HostName::new("h1").expect("host");
        let path = dir.path().join(file_name(&host));
        let envs: Vec<Envelope> = (0..3).map(|_| started(&host)).collect();
        {
            let db = Database::create(&path).expect("create");
            let tx = db.begin_write().expect("tx");
            {
                let mut meta = tx.open_table(META).expect("meta");
                meta.insert("format", 1u32.to_le_bytes().as_slice())
                    .expect("format");
                let mut old = tx.open_table(OUTBOX_V1).expect("outbox");
                for (seq, env) in (7u64..).zip(&envs) {
                    let bytes = codec::encode(env).expect("encode");
                    old.insert(seq, bytes.as_slice()).expect("row");
                }
            }
            tx.commit().expect("commit");
        }
        let (store, _) = Store::open(&path).expect("upgrade");
        let head = store.outbox_head(10).expect("head");
        assert_eq!(head.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [7, 8, 9]);
        for ((_, sealed), env) in head.iter().zip(&envs) {
            assert_eq!(*sealed, Sealed::seal(env).expect("seal"));
        }
        drop(store);
        let db = Database::create(&path).expect("reopen raw");
        let tx = db.begin_read().expect("read");
        assert!(tx.open_table(OUTBOX_V1).is_err(), "the old table is gone");
        let meta = tx.open_table(META).expect("meta");
        let format = meta
            .get("format")
            .expect("get")
            .expect("format")
            .value()
            .to_vec();
        assert_eq!(format, FORMAT.to_le_bytes());
    }

    #[test]
    fn state_and_outbox_survive_reopening_and_drain_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = HostName::new("h1").expect("host");
        let path = dir.path().join(file_name(&host));
        let (store, empty) = Store::open(&path).expect("open");
        assert_eq!(empty, State::default());

        let mut state = empty.clone();
        let ctx = Context {
            host: &host,
            boot_id: "boot-1",
        };
        let snapshot = vec![
            device("1-1", 3, "AAA"),
            device("1-2", 4, "BBB"),
            device("1-3", 5, "BBB"),
        ];
        let events = reconcile(
            &mut state,
            ctx,
            &Filter::default(),
            snapshot,
            Reconcile::Start,
            &mut V7Ids,
        );
        assert_eq!(events.len(), 4, "3 discovered + 1 clash");
        let mut envs: Vec<Envelope> = events.into_iter().map(Envelope::new).collect();
        envs.push(started(&host));
        store.commit(&empty, &state, &envs).expect("commit");
        drop(store);

        let (store, loaded) = Store::open(&path).expect("reopen");
        assert_eq!(loaded, state);
        assert_eq!(store.outbox_len().expect("len"), 5);
        let head = store.outbox_head(10).expect("head");
        let ids: Vec<_> = head.iter().map(|(_, e)| e.event_id).collect();
        assert_eq!(ids, envs.iter().map(|e| e.event_id).collect::<Vec<_>>());
        assert_eq!(head[0].1, Sealed::seal(&envs[0]).expect("seal"));
        assert_eq!(codec::decode(&head[0].1.bytes), Ok(envs[0].clone()));
        store.outbox_remove_all(&[head[0].0]).expect("remove");
        assert_eq!(
            store
                .outbox_head(1)
                .expect("first")
                .first()
                .map(|(_, e)| e.event_id),
            Some(envs[1].event_id)
        );

        // A change: one device leaves; the diff is written, the outbox keeps counting up.
        let mut next = loaded.clone();
        next.devices.remove("/sys/devices/pci0000:00/usb1/1-3");
        next.clashes.clear();
        next.boot_id = Some("boot-2".into());
        next.flapping
            .insert(LineageId::from_uuid(uuid::Uuid::from_u128(42)));
        store
            .commit(&loaded, &next, &[started(&host)])
            .expect("commit");
        let seqs: Vec<u64> = store
            .outbox_head(10)
            .expect("head")
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(seqs, [2, 3, 4, 5, 6]);
        drop(store);
        let (store, reloaded) = Store::open(&path).expect("reopen");
        assert_eq!(reloaded, next);
        assert_eq!(
            reloaded.flapping.len(),
            1,
            "an open flapping episode is kept"
        );

        // The episode ends: the lineage leaves the flapping table.
        let mut ended = reloaded.clone();
        ended.flapping.clear();
        store.commit(&reloaded, &ended, &[]).expect("commit");
        drop(store);
        let (_, reloaded) = Store::open(&path).expect("reopen");
        assert!(reloaded.flapping.is_empty());
        assert_eq!(reloaded, ended);
    }

    #[test]
    fn a_second_agent_on_the_same_file_is_refused_and_a_foreign_format_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent-h.redb");
        let (store, _) = Store::open(&path).expect("open");
        let err = Store::open(&path).expect_err("locked").to_string();
        assert!(err.contains("agent-h.redb"), "{err}");
        drop(store);

        let db = Database::create(&path).expect("db");
        let tx = db.begin_write().expect("tx");
        {
            let mut meta = tx.open_table(META).expect("meta");
            meta.insert("format", 7u32.to_le_bytes().as_slice())
                .expect("insert");
        }
        tx.commit().expect("commit");
        drop(db);
        let err = Store::open(&path).expect_err("format").to_string();
        assert!(err.contains("layout version 7"), "{err}");
    }

    /// A device's bytes in the state file are layout 2's, as the agent wrote them when
    /// `UsbDevice` listed every descriptor itself (the hex is that struct's postcard encoding
    /// of this device): a file written before the descriptors became one struct reads back.
    #[test]
    fn a_device_row_has_the_bytes_of_layout_2() {
        const LAYOUT_2: &str = "202f7379732f646576696365732f706369303030303a30302f757362312f\
            312d3103312d310105a909c0630102534e0001060101010a43616e6f6e20496e632e0000000103343830\
            0104322e303000";
        let d = device("1-1", 5, "SN");
        let hex: String = postcard::to_allocvec(&d)
            .expect("encode")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, LAYOUT_2);
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&LAYOUT_2[i..i + 2], 16).expect("hex"))
            .collect();
        let back: UsbDevice = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(back, d);
        assert_eq!(back.descriptors.interface_classes, [6]);
    }

    #[test]
    fn a_layout_1_file_is_upgraded_and_its_devices_have_no_fingerprint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent-h.redb");
        drop(Store::open(&path).expect("create"));
        let known = Known {
            device_id: DeviceId::new_v7(),
            lineage_id: LineageId::from_uuid(uuid::Uuid::from_u128(7)),
            lineage_kind: usbpt_schemas::LineageKind::Serial,
            device: device("1-1", 5, "SN"),
            filtered: None,
        };
        // Layout 2 ends with `fingerprint: None` (0x00) then `filtered: None` (0x00): layout 1
        // is the same row without the first of the two.
        let mut v1 = postcard::to_allocvec(&known).expect("encode");
        assert_eq!(v1.split_off(v1.len() - 1), [0]);
        assert_eq!(v1.last(), Some(&0));
        v1.pop();
        v1.push(0);
        let db = Database::create(&path).expect("db");
        let tx = db.begin_write().expect("tx");
        {
            let mut meta = tx.open_table(META).expect("meta");
            meta.insert("format", 1u32.to_le_bytes().as_slice())
                .expect("insert");
            let mut devices = tx.open_table(DEVICES).expect("devices");
            devices
                .insert(known.device.syspath.as_str(), v1.as_slice())
                .expect("insert");
        }
        tx.commit().expect("commit");
        drop(db);
        let (store, state) = Store::open(&path).expect("upgraded");
        assert_eq!(state.devices.get(&known.device.syspath), Some(&known));
        drop(store);
        let (_, again) = Store::open(&path).expect("reopen at layout 2");
        assert_eq!(again.devices.get(&known.device.syspath), Some(&known));
    }
}
