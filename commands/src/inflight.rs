//! Decisions in flight in one process (ADR 0010, issue 16 item 1).
//!
//! A handler no longer decides one command at a time from arrival to reply. Only the decision
//! itself (a snapshot and [`crate::decide::decide`], ~0.1 ms) is serialized; the appends, the
//! acks and the wait for the view run for many commands at once. Between a decision and the
//! moment the view has applied what it appended, the view still shows the devices it claimed as
//! free, so the decisions made meanwhile read the view through an [`Overlay`] that adds this
//! process's claims in flight. Across processes nothing changes: the fences (ADR 0003) still
//! decide every race; the overlay only keeps one process's own decisions from racing each
//! other.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use usbpt_schemas::{
    DeviceId, Event, FlavorId, FlavorName, HostName, LineageId, ProductId, ServerId, ServerName,
    VendorId,
};

use crate::decide::Step;
use crate::view::{
    ClaimInfo, DeviceInfo, FlavorInfo, LineageAlarms, ServerInfo, ViewError, ViewRead,
};

/// The claims this process has decided and not yet seen applied by its view.
#[derive(Debug, Default)]
pub struct InFlight {
    claims: Mutex<HashMap<LineageId, ClaimInfo>>,
}

impl InFlight {
    fn lock(&self) -> MutexGuard<'_, HashMap<LineageId, ClaimInfo>> {
        // A panic while holding this lock leaves a map of plain values: still usable.
        self.claims.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the claims among `steps` as in flight until the returned reservation is dropped.
    pub fn reserve(self: &Arc<Self>, steps: &[Step]) -> Reservation {
        let mut lineages = Vec::new();
        let mut claims = self.lock();
        for step in steps {
            if let Event::DeviceClaimed(c) = &step.event {
                claims.insert(
                    c.lineage_id,
                    ClaimInfo {
                        lineage_id: c.lineage_id,
                        device_id: c.device_id,
                        server_id: c.server_id,
                        host: c.host.clone(),
                        follow: c.follow,
                    },
                );
                lineages.push(c.lineage_id);
            }
        }
        Reservation {
            inflight: Arc::clone(self),
            lineages,
        }
    }

    /// How many lineages are claimed in flight.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `lineage` is claimed in flight.
    pub fn contains(&self, lineage: &LineageId) -> bool {
        self.lock().contains_key(lineage)
    }

    fn claim(&self, lineage: &LineageId) -> Option<ClaimInfo> {
        self.lock().get(lineage).cloned()
    }

    fn taken(&self, lineage: &LineageId) -> bool {
        self.lock().contains_key(lineage)
    }
}

/// Claims in flight for one decision; dropping it ends them (after the view has applied the
/// appends, or after a failed command's undo).
#[derive(Debug)]
pub struct Reservation {
    inflight: Arc<InFlight>,
    lineages: Vec<LineageId>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut claims = self.inflight.lock();
        for l in &self.lineages {
            claims.remove(l);
        }
    }
}

/// The view as this process's decisions must see it: a lineage claimed in flight is claimed,
/// and not among the free devices.
pub struct Overlay<'a, V> {
    pub view: &'a V,
    pub inflight: &'a InFlight,
}

impl<V> std::fmt::Debug for Overlay<'_, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("inflight", &self.inflight.len())
            .finish_non_exhaustive()
    }
}

impl<V: ViewRead> Overlay<'_, V> {
    fn keep_free(&self, devices: Vec<DeviceInfo>) -> Vec<DeviceInfo> {
        if self.inflight.is_empty() {
            return devices;
        }
        devices
            .into_iter()
            .filter(|d| !self.inflight.taken(&d.lineage_id))
            .collect()
    }
}

impl<V: ViewRead> ViewRead for Overlay<'_, V> {
    fn flavor_by_name(&self, name: &FlavorName) -> Result<Option<FlavorInfo>, ViewError> {
        self.view.flavor_by_name(name)
    }
    fn flavor_by_id(&self, id: &FlavorId) -> Result<Option<FlavorInfo>, ViewError> {
        self.view.flavor_by_id(id)
    }
    fn server_by_name(&self, name: &ServerName) -> Result<Option<ServerInfo>, ViewError> {
        self.view.server_by_name(name)
    }
    fn server_by_id(&self, id: &ServerId) -> Result<Option<ServerInfo>, ViewError> {
        self.view.server_by_id(id)
    }
    fn lineage_alarms(&self, lineage: &LineageId) -> Result<LineageAlarms, ViewError> {
        self.view.lineage_alarms(lineage)
    }
    fn device(&self, id: &DeviceId) -> Result<Option<DeviceInfo>, ViewError> {
        self.view.device(id)
    }
    fn current_enumeration(&self, lineage: &LineageId) -> Result<Option<DeviceInfo>, ViewError> {
        self.view.current_enumeration(lineage)
    }
    fn free_devices_matching(
        &self,
        vendor: VendorId,
        product: ProductId,
        serial: Option<&str>,
    ) -> Result<BTreeMap<HostName, Vec<DeviceInfo>>, ViewError> {
        let mut map = self.view.free_devices_matching(vendor, product, serial)?;
        if !self.inflight.is_empty() {
            for devices in map.values_mut() {
                *devices = self.keep_free(std::mem::take(devices));
            }
            map.retain(|_, devices| !devices.is_empty());
        }
        Ok(map)
    }
    /// The view's next host with a free match whose free matches are not all claimed in flight.
    fn next_host_with_free(
        &self,
        vendor: VendorId,
        product: ProductId,
        after: Option<&HostName>,
    ) -> Result<Option<HostName>, ViewError> {
        let mut after = after.cloned();
        loop {
            let Some(host) = self
                .view
                .next_host_with_free(vendor, product, after.as_ref())?
            else {
                return Ok(None);
            };
            if self.inflight.is_empty()
                || !self
                    .free_on_host_matching(&host, vendor, product, None)?
                    .is_empty()
            {
                return Ok(Some(host));
            }
            after = Some(host);
        }
    }
    fn free_on_host_matching(
        &self,
        host: &HostName,
        vendor: VendorId,
        product: ProductId,
        serial: Option<&str>,
    ) -> Result<Vec<DeviceInfo>, ViewError> {
        let devices = self
            .view
            .free_on_host_matching(host, vendor, product, serial)?;
        Ok(self.keep_free(devices))
    }
    fn claim(&self, lineage: &LineageId) -> Result<Option<ClaimInfo>, ViewError> {
        match self.inflight.claim(lineage) {
            Some(c) => Ok(Some(c)),
            None => self.view.claim(lineage),
        }
    }
    fn subject_seq(&self, subject: &str) -> Result<u64, ViewError> {
        self.view.subject_seq(subject)
    }
    fn host_known(&self, host: &HostName) -> Result<bool, ViewError> {
        self.view.host_known(host)
    }
    fn agent_hosts(&self) -> Result<Vec<HostName>, ViewError> {
        self.view.agent_hosts()
    }
}
