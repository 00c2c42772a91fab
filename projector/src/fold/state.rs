//! What the fold's semantics read and write: the view's records as one event sees them.
//!
//! [`State`] is the seam between the two halves of the fold (ADR 0013): the semantics
//! ([`super::semantics`]) decide what an event changes and say it through this trait; the
//! storage half ([`super::FoldTxn`]) answers reads from the batch, the batches before it and
//! the committed redb view, and stages the writes. Tests fold on an in-memory state
//! (`super::memory`) instead.
//!
//! It is used through generics (static dispatch): the live fold is monomorphised for
//! [`super::FoldTxn`] and costs what the direct calls did.
//!
//! Reads return the row as the batch sees it, or a storage error ([`ViewError`]); writes are
//! staged and cannot fail, except a device's (the storage half may have to read the device's
//! committed row first, to know its index membership).

use usbpt_schemas::{DeviceId, FlavorId, HostName, LineageId, ServerId};

use crate::error::ViewError;
use crate::model::{Claim, Device, Flavor, Host, Lineage, QuarantineEntry, Server};
use crate::tables::Id;

/// The view's records as the fold reads and changes them. Names map to raw UUID bytes (the
/// `flavor_names` / `server_names` index values).
pub(crate) trait State {
    // ---- bookkeeping ----

    /// The last stream sequence folded (applied or quarantined).
    fn last_applied(&self) -> u64;
    /// A new event at `seq` is being folded (applied or quarantined): it becomes the last
    /// applied sequence and counts as folded.
    fn begin_event(&mut self, seq: u64);
    /// The last sequence stored on a fenced control-plane subject.
    fn set_subject_seq(&mut self, subject: &str, seq: u64);
    /// Adds one to the counter `group.name` (`applied.{Kind}`, `quarantined.{reason}`).
    fn count(&mut self, group: &'static str, name: &'static str);
    /// Records an event set aside.
    fn quarantine(&mut self, entry: QuarantineEntry) -> Result<(), ViewError>;

    // ---- devices and lineages ----

    fn device(&mut self, id: DeviceId) -> Result<Option<Device>, ViewError>;
    /// The device as the batch sees it, borrowed (no copy of its holds; not marked written).
    fn device_ref(&mut self, id: DeviceId) -> Result<Option<&Device>, ViewError>;
    /// The device to change in place; the row counts as written, changed or not (see
    /// [`State::server_mut`]).
    fn device_mut(&mut self, id: DeviceId) -> Result<Option<&mut Device>, ViewError>;
    /// Stages a device (devices are never removed).
    fn put_device(&mut self, d: Device) -> Result<(), ViewError>;
    fn lineage(&mut self, id: LineageId) -> Result<Option<Lineage>, ViewError>;
    /// The lineage as the batch sees it, borrowed (no copy of its alarms; not marked written).
    fn lineage_ref(&mut self, id: LineageId) -> Result<Option<&Lineage>, ViewError>;
    fn put_lineage(&mut self, l: Lineage);
    /// Appends `device` as the lineage's enumeration number `ordinal` (from 1).
    fn push_lineage_history(&mut self, lineage: LineageId, ordinal: u32, device: DeviceId);

    // ---- claims ----

    fn claim(&mut self, lineage: LineageId) -> Result<Option<Claim>, ViewError>;
    fn put_claim(&mut self, c: Claim);
    fn remove_claim(&mut self, lineage: LineageId);

    // ---- servers ----

    fn server(&mut self, id: ServerId) -> Result<Option<Server>, ViewError>;
    /// The server as the batch sees it, to read without copying its record and histories (the
    /// row is not written for it).
    fn server_ref(&mut self, id: ServerId) -> Result<Option<&Server>, ViewError>;
    /// Whether the server exists (without copying its record).
    fn server_exists(&mut self, id: ServerId) -> Result<bool, ViewError> {
        Ok(self.server_ref(id)?.is_some())
    }
    /// The server to change in place (no copy of its record and its histories per event). The
    /// row counts as written, changed or not: a caller that may still refuse the event must
    /// not change it before its last check.
    fn server_mut(&mut self, id: ServerId) -> Result<Option<&mut Server>, ViewError>;
    fn put_server(&mut self, s: Server);
    /// The live server holding `name`.
    fn server_named(&mut self, name: &str) -> Result<Option<Id>, ViewError>;
    /// Sets (`Some`) or frees (`None`) a server name.
    fn name_server(&mut self, name: &str, id: Option<Id>);

    // ---- flavors ----

    fn flavor(&mut self, id: FlavorId) -> Result<Option<Flavor>, ViewError>;
    /// Whether the flavor exists (without copying its record).
    fn flavor_exists(&mut self, id: FlavorId) -> Result<bool, ViewError>;
    fn put_flavor(&mut self, f: &Flavor);
    /// The live flavor holding `name`.
    fn flavor_named(&mut self, name: &str) -> Result<Option<Id>, ViewError>;
    /// Sets (`Some`) or frees (`None`) a flavor name.
    fn name_flavor(&mut self, name: &str, id: Option<Id>);

    // ---- hosts ----

    /// The host's record to change in place (`None`: never seen); written at commit.
    fn host_mut(&mut self, host: &HostName) -> Result<&mut Option<Host>, ViewError>;
}
