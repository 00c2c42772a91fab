//! What the agent's control loop asks of an executor, wherever the executor runs: in this
//! process (`usbpt_libvirt::Executor`, in `usbpt up`, the demo and tests) or in a child
//! process started on demand ([`super::ChildExecutor`], the host agent's; ADR 0016).

use std::collections::HashMap;

use futures::future::BoxFuture;
use usbpt_schemas::{DeviceId, Envelope, Event, HostName, LineageId};

use super::work::DeviceInfo;

/// The agent's devices, as the executor sees them: present ones and recently ended ones.
pub type DeviceMap = HashMap<DeviceId, DeviceInfo>;

/// The executor, as the control loop uses it. Every outcome is a list of events for the outbox;
/// a failure is an event too (`ServerStateChanged { Error }`, `DeviceAttachFailed`), never an
/// `Err`.
pub trait Hands: Send + Sync + 'static {
    /// The host this executor acts for.
    fn host(&self) -> &HostName;

    /// The work `env` asks of this host (none for an event that asks nothing of it).
    fn handle<'a>(&'a self, env: &'a Envelope, devices: &'a DeviceMap)
        -> BoxFuture<'a, Vec<Event>>;

    /// A held lineage re-enumerated as `device`: re-attach it to the servers that hold it.
    fn reattach_lineage(
        &self,
        lineage: LineageId,
        device: DeviceId,
        info: DeviceInfo,
    ) -> BoxFuture<'_, Vec<Event>>;

    /// The host rebooted since the agent last ran: start the domains usbpt keeps running.
    fn resume_after_host_boot<'a>(&'a self, devices: &'a DeviceMap) -> BoxFuture<'a, Vec<Event>>;
}
