//! An in-memory [`State`] for the semantics' unit tests: plain ordered maps, no redb, no
//! batches. What the fold decides is the same on it as on a [`super::FoldTxn`]; how the view
//! stores it (encoding, indexes, batches) is tested on real redb files (`projector/tests/`).

use std::collections::BTreeMap;

use usbpt_schemas::{DeviceId, FlavorId, HostName, LineageId, ServerId};

use super::state::State;
use crate::error::ViewError;
use crate::model::{Claim, Device, Flavor, Host, Lineage, QuarantineEntry, Server};
use crate::tables::Id;

/// The whole view as maps; every field is public for the tests' assertions.
#[derive(Debug, Default)]
pub(crate) struct MemState {
    pub last_applied: u64,
    pub folded: u64,
    pub subject_seqs: BTreeMap<String, u64>,
    pub counters: BTreeMap<String, u64>,
    pub quarantine: Vec<QuarantineEntry>,
    pub devices: BTreeMap<DeviceId, Device>,
    pub lineages: BTreeMap<LineageId, Lineage>,
    pub lineage_history: BTreeMap<(LineageId, u32), DeviceId>,
    pub claims: BTreeMap<LineageId, Claim>,
    pub servers: BTreeMap<ServerId, Server>,
    pub server_names: BTreeMap<String, Id>,
    pub flavors: BTreeMap<FlavorId, Flavor>,
    pub flavor_names: BTreeMap<String, Id>,
    pub hosts: BTreeMap<HostName, Option<Host>>,
}

fn set_name(names: &mut BTreeMap<String, Id>, name: &str, id: Option<Id>) {
    match id {
        Some(id) => names.insert(name.to_owned(), id),
        None => names.remove(name),
    };
}

impl State for MemState {
    fn last_applied(&self) -> u64 {
        self.last_applied
    }

    fn begin_event(&mut self, seq: u64) {
        self.last_applied = seq;
        self.folded += 1;
    }

    fn set_subject_seq(&mut self, subject: &str, seq: u64) {
        self.subject_seqs.insert(subject.to_owned(), seq);
    }

    fn count(&mut self, group: &'static str, name: &'static str) {
        *self.counters.entry(format!("{group}.{name}")).or_default() += 1;
    }

    fn quarantine(&mut self, entry: QuarantineEntry) -> Result<(), ViewError> {
        self.quarantine.push(entry);
        Ok(())
    }

    fn device(&mut self, id: DeviceId) -> Result<Option<Device>, ViewError> {
        Ok(self.devices.get(&id).cloned())
    }

    fn device_ref(&mut self, id: DeviceId) -> Result<Option<&Device>, ViewError> {
        Ok(self.devices.get(&id))
    }

    fn device_mut(&mut self, id: DeviceId) -> Result<Option<&mut Device>, ViewError> {
        Ok(self.devices.get_mut(&id))
    }

    fn put_device(&mut self, d: Device) -> Result<(), ViewError> {
        self.devices.insert(d.id(), d);
        Ok(())
    }

    fn lineage(&mut self, id: LineageId) -> Result<Option<Lineage>, ViewError> {
        Ok(self.lineages.get(&id).cloned())
    }

    fn lineage_ref(&mut self, id: LineageId) -> Result<Option<&Lineage>, ViewError> {
        Ok(self.lineages.get(&id))
    }

    fn put_lineage(&mut self, l: Lineage) {
        self.lineages.insert(l.id, l);
    }

    fn push_lineage_history(&mut self, lineage: LineageId, ordinal: u32, device: DeviceId) {
        self.lineage_history.insert((lineage, ordinal), device);
    }

    fn claim(&mut self, lineage: LineageId) -> Result<Option<Claim>, ViewError> {
        Ok(self.claims.get(&lineage).cloned())
    }

    fn put_claim(&mut self, c: Claim) {
        self.claims.insert(c.lineage_id, c);
    }

    fn remove_claim(&mut self, lineage: LineageId) {
        self.claims.remove(&lineage);
    }

    fn server(&mut self, id: ServerId) -> Result<Option<Server>, ViewError> {
        Ok(self.servers.get(&id).cloned())
    }

    fn server_ref(&mut self, id: ServerId) -> Result<Option<&Server>, ViewError> {
        Ok(self.servers.get(&id))
    }

    fn server_mut(&mut self, id: ServerId) -> Result<Option<&mut Server>, ViewError> {
        Ok(self.servers.get_mut(&id))
    }

    fn put_server(&mut self, s: Server) {
        self.servers.insert(s.id, s);
    }

    fn server_named(&mut self, name: &str) -> Result<Option<Id>, ViewError> {
        Ok(self.server_names.get(name).copied())
    }

    fn name_server(&mut self, name: &str, id: Option<Id>) {
        set_name(&mut self.server_names, name, id);
    }

    fn flavor(&mut self, id: FlavorId) -> Result<Option<Flavor>, ViewError> {
        Ok(self.flavors.get(&id).cloned())
    }

    fn flavor_exists(&mut self, id: FlavorId) -> Result<bool, ViewError> {
        Ok(self.flavors.contains_key(&id))
    }

    fn put_flavor(&mut self, f: &Flavor) {
        self.flavors.insert(f.id, f.clone());
    }

    fn flavor_named(&mut self, name: &str) -> Result<Option<Id>, ViewError> {
        Ok(self.flavor_names.get(name).copied())
    }

    fn name_flavor(&mut self, name: &str, id: Option<Id>) {
        set_name(&mut self.flavor_names, name, id);
    }

    fn host_mut(&mut self, host: &HostName) -> Result<&mut Option<Host>, ViewError> {
        Ok(self.hosts.entry(host.clone()).or_default())
    }
}
