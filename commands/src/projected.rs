//! The command side reading the projector's redb view: [`ViewRead`] for a projector snapshot
//! and [`ViewSource`] for the view itself.

use std::collections::BTreeMap;
use std::time::Duration;

use usbpt_projector as p;
use usbpt_schemas::{
    DeviceId, FlavorId, FlavorName, HostName, LineageId, ProductId, ServerId, ServerName, VendorId,
};

use crate::handler::ViewSource;
use crate::view::{
    ClaimInfo, ConflictInfo, DeviceInfo, DeviceStatus, FingerprintAlarmInfo, FlavorInfo,
    LineageAlarms, ResizeFrom, ServerInfo, ViewError, ViewRead,
};

fn err(e: p::ViewError) -> ViewError {
    ViewError(e.to_string())
}

fn device(d: p::Device) -> DeviceInfo {
    DeviceInfo {
        device_id: d.id(),
        lineage_id: d.lineage_id(),
        lineage_kind: d.discovery.lineage_kind,
        host: d.host().clone(),
        vendor_id: d.vendor_id(),
        product_id: d.product_id(),
        serial: d.serial().map(str::to_owned),
        address: d.address(),
        status: match d.status {
            p::DeviceStatus::Available => DeviceStatus::Available,
            p::DeviceStatus::Claimed => DeviceStatus::Claimed,
            p::DeviceStatus::Attached => DeviceStatus::Attached,
            p::DeviceStatus::Invalidated => DeviceStatus::Invalidated,
        },
        holder: d.holder,
    }
}

fn flavor(f: p::Flavor) -> Option<FlavorInfo> {
    f.deleted.is_none().then_some(FlavorInfo {
        flavor_id: f.id,
        name: f.name,
        usb: f.usb,
        on_fingerprint_change: f.on_fingerprint_change,
    })
}

fn server(s: p::Server) -> Option<ServerInfo> {
    s.deleted.is_none().then_some(ServerInfo {
        server_id: s.id,
        name: s.name,
        flavor_id: s.flavor_id,
        host: s.host,
        state: s.state,
        devices: s.devices,
        description: s.description,
        resize_from: s.resize_from.map(|r| ResizeFrom {
            flavor_id: r.flavor_id,
            host: r.host,
            devices: r.devices,
        }),
    })
}

impl ViewRead for p::Snapshot {
    fn flavor_by_name(&self, name: &FlavorName) -> Result<Option<FlavorInfo>, ViewError> {
        Ok(p::Snapshot::flavor_by_name(self, name)
            .map_err(err)?
            .and_then(flavor))
    }
    fn flavor_by_id(&self, id: &FlavorId) -> Result<Option<FlavorInfo>, ViewError> {
        Ok(p::Snapshot::flavor_by_id(self, id)
            .map_err(err)?
            .and_then(flavor))
    }
    fn server_by_id(&self, id: &ServerId) -> Result<Option<ServerInfo>, ViewError> {
        Ok(p::Snapshot::server_by_id(self, id)
            .map_err(err)?
            .and_then(server))
    }
    fn server_by_name(&self, name: &ServerName) -> Result<Option<ServerInfo>, ViewError> {
        Ok(p::Snapshot::server_by_name(self, name)
            .map_err(err)?
            .and_then(server))
    }
    fn device(&self, id: &DeviceId) -> Result<Option<DeviceInfo>, ViewError> {
        Ok(p::Snapshot::device(self, id).map_err(err)?.map(device))
    }
    fn current_enumeration(&self, lineage: &LineageId) -> Result<Option<DeviceInfo>, ViewError> {
        Ok(p::Snapshot::current_enumeration(self, lineage)
            .map_err(err)?
            .map(device))
    }
    fn free_devices_matching(
        &self,
        vendor: VendorId,
        product: ProductId,
        serial: Option<&str>,
    ) -> Result<BTreeMap<HostName, Vec<DeviceInfo>>, ViewError> {
        Ok(
            p::Snapshot::free_devices_matching(self, vendor, product, serial)
                .map_err(err)?
                .into_iter()
                .map(|(h, v)| (h, v.into_iter().map(device).collect()))
                .collect(),
        )
    }
    fn next_host_with_free(
        &self,
        vendor: VendorId,
        product: ProductId,
        after: Option<&HostName>,
    ) -> Result<Option<HostName>, ViewError> {
        p::Snapshot::next_host_with_free(self, vendor, product, after).map_err(err)
    }
    fn free_on_host_matching(
        &self,
        host: &HostName,
        vendor: VendorId,
        product: ProductId,
        serial: Option<&str>,
    ) -> Result<Vec<DeviceInfo>, ViewError> {
        Ok(
            p::Snapshot::free_on_host_matching(self, host, vendor, product, serial)
                .map_err(err)?
                .into_iter()
                .map(device)
                .collect(),
        )
    }
    fn claim(&self, lineage: &LineageId) -> Result<Option<ClaimInfo>, ViewError> {
        Ok(p::Snapshot::claim(self, lineage)
            .map_err(err)?
            .map(|c| ClaimInfo {
                lineage_id: c.lineage_id,
                device_id: c.device_id,
                server_id: c.server_id,
                host: c.host,
                follow: c.follow,
            }))
    }
    fn subject_seq(&self, subject: &str) -> Result<u64, ViewError> {
        p::Snapshot::subject_seq(self, subject).map_err(err)
    }
    fn host_known(&self, host: &HostName) -> Result<bool, ViewError> {
        Ok(p::Snapshot::host(self, host).map_err(err)?.is_some())
    }
    fn agent_hosts(&self) -> Result<Vec<HostName>, ViewError> {
        let mut hosts: Vec<HostName> = p::Snapshot::hosts(self)
            .map_err(err)?
            .into_iter()
            .filter(|h| h.agent_started.is_some())
            .map(|h| h.name)
            .collect();
        hosts.sort();
        Ok(hosts)
    }
    fn lineage_alarms(&self, lineage: &LineageId) -> Result<LineageAlarms, ViewError> {
        let Some(l) = p::Snapshot::lineage(self, lineage).map_err(err)? else {
            return Ok(LineageAlarms::default());
        };
        let current_fingerprint = p::Snapshot::device(self, &l.current)
            .map_err(err)?
            .and_then(|d| d.fingerprint);
        let active = |kind| {
            l.alarms
                .iter()
                .rev()
                .find(|a| a.kind == kind && a.is_active())
        };
        // The sides as the lineage has them now: the alarm names the enumerations it was
        // raised for, and the current side may have re-enumerated on its own host since.
        let conflict = active(p::AlarmKind::LineageConflict)
            .and(l.pending.as_ref())
            .map(|p| ConflictInfo {
                current: (l.current_host.clone(), l.current),
                held_back: (p.discovery.host.clone(), p.discovery.device_id),
            });
        let fingerprint =
            active(p::AlarmKind::FingerprintChanged).and_then(|a| match a.fingerprints[..] {
                [expected, seen] => Some(FingerprintAlarmInfo { expected, seen }),
                _ => None,
            });
        Ok(LineageAlarms {
            conflict,
            fingerprint,
            current_fingerprint,
        })
    }
}

impl ViewSource for p::View {
    type Snapshot<'a> = p::Snapshot;
    fn snapshot(&self) -> Result<p::Snapshot, ViewError> {
        p::View::snapshot(self).map_err(err)
    }
    async fn wait_applied(&self, seq: u64, limit: Duration) -> bool {
        p::View::wait_applied(self, seq, limit).await
    }
}
