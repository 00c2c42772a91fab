//! The libvirt executor's async facade: carries out what the control plane asks of this host
//! ([`usbpt_agent::libvirt::work`]: boot, resize, cold migration, power actions, delete) and re-attaches devices
//! that re-enumerated, reporting every outcome as usbpt events. The libvirt calls themselves
//! (`crate::calls`) are blocking FFI and run on `spawn_blocking`; operations on one server are
//! serialised, different servers run in parallel.

use std::sync::{Arc, PoisonError};

use tokio::sync::OwnedMutexGuard;
use tracing::{info, warn};
use usbpt_schemas::{
    AssignedDevice, AttachMethod, DeviceAttachFailed, DeviceAttached, DeviceId, DeviceReattachHeld,
    DeviceReattached, Envelope, Event, Fingerprint, HostName, LineageId, ServerAction, ServerId,
    ServerState, ServerStateChanged,
};

use usbpt_agent::libvirt::domain::{layout, DomainSpec, DomainType, HostdevSpec};
use usbpt_agent::libvirt::work::{
    devices_note, placement_text, with_current_devices, work_for, DeviceInfo, DeviceLookup, Work,
};
use usbpt_agent::libvirt::{ExecutorConfig, ExecutorError, Observed};

use crate::calls::{Inner, Reattach};

/// Drives libvirt for one host. Cheap to clone; share one per agent.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("host", &self.inner.config.host)
            .field("uri", &self.inner.config.uri)
            .finish()
    }
}

impl Executor {
    /// Opens the connection (so a bad URI fails here, naming it) and silences libvirt's default
    /// error printing (every error is reported through events instead).
    pub async fn connect(config: ExecutorConfig) -> Result<Self, ExecutorError> {
        let inner = tokio::task::spawn_blocking(move || Inner::open(config))
            .await
            .map_err(|e| ExecutorError::Worker(e.to_string()))??;
        info!(uri = %inner.config.uri, domain_type = inner.domain_type.as_str(), "libvirt connected");
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The `<domain type=…>` this executor defines.
    pub fn domain_type(&self) -> DomainType {
        self.inner.domain_type
    }

    pub fn host(&self) -> &HostName {
        &self.inner.config.host
    }
    pub fn uri(&self) -> &str {
        &self.inner.config.uri
    }

    /// Reacts to one event: the work it asks of this host ([`work_for`]: `ServerScheduled`,
    /// `ServerResized`, `ServerMigrated`, `ServerActionRequested` and `ServerDeleted` addressed
    /// to this host); anything else gives no events. The returned bodies are the outcome;
    /// publish each as `Envelope::new(body).caused_by(env)`.
    pub async fn handle(&self, env: &Envelope, lookup: &dyn DeviceLookup) -> Vec<Event> {
        match work_for(self.host(), &env.body) {
            Some(work) => self.run(work, lookup).await,
            None => Vec::new(),
        }
    }

    /// Carries out one piece of [`Work`].
    pub async fn run(&self, work: Work, lookup: &dyn DeviceLookup) -> Vec<Event> {
        match work {
            Work::Define {
                server,
                devices,
                why,
                restart,
            } => self.define(server, &devices, lookup, &why, restart).await,
            Work::Action { server, action } => self.action(server, action, lookup).await,
            Work::Teardown { server, why } => self.teardown(server, &why).await,
            Work::Reattach {
                server,
                lineage,
                device,
                fingerprint,
            } => match lookup.device(&device) {
                Some(info) if info.present => {
                    self.reattach_accepted(server, lineage, device, info, fingerprint)
                        .await
                }
                // The accepted enumeration has gone again: nothing to attach. Said once, as a
                // failed attach; the domain keeps what it has, and the lineage's next
                // enumeration is compared with the fingerprint the domain records.
                _ => vec![self.attach_failed(
                    server,
                    device,
                    format!(
                        "fingerprint {fingerprint} accepted for lineage {lineage}, but device {device} is no longer present on host {}; nothing re-attached",
                        self.host()
                    ),
                )],
            },
        }
    }

    /// Defines the server's domain with `devices` (current addresses from `lookup`) and starts
    /// it. `restart` stops a running domain first so the new definition takes effect.
    #[tracing::instrument(skip(self, devices, lookup), fields(host = %self.host()))]
    pub async fn define(
        &self,
        server: ServerId,
        devices: &[AssignedDevice],
        lookup: &dyn DeviceLookup,
        why: &str,
        restart: bool,
    ) -> Vec<Event> {
        let (mut spec, mut events) = self.spec_from_assigned(server, devices, lookup);
        spec.running = true;
        let _guard = self.lock(server).await;
        let run_spec = spec.clone();
        let result = self
            .blocking(move |inner| inner.define_and_start(&run_spec, restart))
            .await;
        events.extend(self.define_outcome(&spec, why, result));
        events
    }

    /// Carries out a power or lifecycle action on the server's domain.
    #[tracing::instrument(skip(self, lookup), fields(host = %self.host()))]
    pub async fn action(
        &self,
        server: ServerId,
        action: ServerAction,
        lookup: &dyn DeviceLookup,
    ) -> Vec<Event> {
        match action {
            ServerAction::Rebuild => return self.rebuild(server, lookup).await,
            ServerAction::Teardown => return self.teardown(server, "teardown").await,
            _ => {}
        }
        let _guard = self.lock(server).await;
        // The definition first: a domain that (re)starts takes its devices as they are now (one
        // that went away while it was off is optional, else libvirt refuses to start it: "Did not
        // find USB device", seen on the real QEMU driver; one that came back is at its new
        // address), and the metadata records whether the server should run (resumed after a
        // host reboot).
        let starts = matches!(
            action,
            ServerAction::Start
                | ServerAction::Reboot
                | ServerAction::Resume
                | ServerAction::Unpause
        );
        let running = match action {
            _ if starts => Some(true),
            ServerAction::Stop | ServerAction::Suspend => Some(false),
            _ => None,
        };
        let mut refreshed = String::new();
        if starts || running.is_some() {
            match self.blocking(move |inner| inner.read_spec(server)).await {
                Ok(spec) => {
                    let mut next = if starts {
                        with_current_devices(spec.clone(), server, lookup)
                    } else {
                        spec.clone()
                    };
                    next.running = running.unwrap_or(spec.running);
                    if next.devices != spec.devices {
                        refreshed = devices_note(&next);
                    }
                    if next != spec {
                        let run = next.clone();
                        if let Err(e) = self.blocking(move |inner| inner.redefine(&run)).await {
                            return vec![self.failed(server, action.as_str(), &e)];
                        }
                    }
                }
                Err(e) => return vec![self.failed(server, action.as_str(), &e)],
            }
        }
        let result = self
            .blocking(move |inner| inner.power(server, action))
            .await;
        let result = result.map(|(obs, how)| (obs, format!("{how}{refreshed}")));
        match result {
            Ok((obs, how)) => vec![self.state_event(
                server,
                obs.state,
                format!("{}: {how}; libvirt state {}", action.as_str(), obs.libvirt),
            )],
            Err(e) => vec![self.failed(server, action.as_str(), &e)],
        }
    }

    /// After a host reboot: starts every usbpt domain on this host that was running before
    /// (metadata `running="yes"`) and is shut off now, with its devices as they are now (absent
    /// ones optional; a device that appears later is re-attached to the running domain). Nova
    /// calls this `resume_guests_state_on_host_boot`; libvirt's own autostart is not used, as it
    /// would start the domain with the previous boot's USB addresses.
    pub async fn resume_after_host_boot(&self, lookup: &dyn DeviceLookup) -> Vec<Event> {
        let domains = match self.blocking(|inner| inner.our_domains()).await {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "could not list this host's domains to resume them");
                return Vec::new();
            }
        };
        let mut events = Vec::new();
        for (server, spec) in domains {
            if !spec.running {
                continue;
            }
            let active = self.blocking(move |inner| inner.is_active(server)).await;
            if !matches!(active, Ok(false)) {
                continue;
            }
            info!(%server, "host rebooted: starting the server's domain again");
            for mut e in self.action(server, ServerAction::Start, lookup).await {
                if let Event::ServerStateChanged(s) = &mut e {
                    s.detail = format!("host rebooted; resumed: {}", s.detail);
                }
                events.push(e);
            }
        }
        events
    }

    /// Rebuild: redefine the domain from its own metadata with every device's current address
    /// (from `lookup`) and restart it.
    pub async fn rebuild(&self, server: ServerId, lookup: &dyn DeviceLookup) -> Vec<Event> {
        let _guard = self.lock(server).await;
        let spec = match self.blocking(move |inner| inner.read_spec(server)).await {
            Ok(s) => s,
            Err(e) => return vec![self.failed(server, "rebuild", &e)],
        };
        let mut spec = with_current_devices(spec, server, lookup);
        spec.running = true;
        let run_spec = spec.clone();
        let result = self
            .blocking(move |inner| inner.define_and_start(&run_spec, true))
            .await;
        self.define_outcome(&spec, "rebuild", result)
    }

    /// Destroys and undefines the server's domain (delete, resize or migration away). A domain
    /// that is already gone counts as done.
    #[tracing::instrument(skip(self), fields(host = %self.host()))]
    pub async fn teardown(&self, server: ServerId, why: &str) -> Vec<Event> {
        let guard = self.lock(server).await;
        let result = self.blocking(move |inner| inner.teardown(server)).await;
        self.forget_lock(server, guard);
        match result {
            Ok(how) => {
                vec![self.state_event(server, ServerState::Shutoff, format!("{why}: {how}"))]
            }
            Err(e) => vec![self.failed(server, why, &e)],
        }
    }

    /// A held lineage re-enumerated as `new_device`: put the new enumeration in the server's
    /// domain in place of the old one (same controller port). Hot-plugs where the driver can
    /// (QEMU); where it cannot (libvirt's test driver answers `VIR_ERR_NO_SUPPORT`) redefines the
    /// domain with the same uuid and says so. The persistent definition is always updated.
    ///
    /// Held instead (`DeviceReattachHeld`, the domain left as it is) when the fingerprint the
    /// server was given and the new enumeration's are both known and differ
    /// ([`usbpt_agent::libvirt::reattach_or_hold`]).
    pub async fn reattach(
        &self,
        server: ServerId,
        lineage: LineageId,
        new_device: DeviceId,
        info: DeviceInfo,
    ) -> Vec<Event> {
        self.reattach_with(server, lineage, new_device, info, None)
            .await
    }

    /// A held re-attach accepted (`FingerprintAccepted`): re-attach `new_device` whatever its
    /// fingerprint, and record `fingerprint` as the one the server now has.
    pub async fn reattach_accepted(
        &self,
        server: ServerId,
        lineage: LineageId,
        new_device: DeviceId,
        info: DeviceInfo,
        fingerprint: Fingerprint,
    ) -> Vec<Event> {
        self.reattach_with(server, lineage, new_device, info, Some(fingerprint))
            .await
    }

    #[tracing::instrument(skip(self, info), fields(host = %self.host()))]
    async fn reattach_with(
        &self,
        server: ServerId,
        lineage: LineageId,
        new_device: DeviceId,
        info: DeviceInfo,
        accepted: Option<Fingerprint>,
    ) -> Vec<Event> {
        let _guard = self.lock(server).await;
        let result = self
            .blocking(move |inner| inner.reattach(server, lineage, new_device, info, accepted))
            .await;
        match result {
            Ok(Reattach::Unchanged) => Vec::new(),
            Ok(Reattach::Held { expected, seen }) => {
                vec![Event::DeviceReattachHeld(DeviceReattachHeld {
                    host: self.host().clone(),
                    server_id: server,
                    lineage_id: lineage,
                    device_id: new_device,
                    expected,
                    seen,
                })]
            }
            Ok(Reattach::Done {
                old_device,
                method,
                detail,
            }) => vec![Event::DeviceReattached(DeviceReattached {
                server_id: server,
                host: self.host().clone(),
                lineage_id: lineage,
                old_device_id: old_device,
                new_device_id: new_device,
                address: info.address,
                method,
                detail,
            })],
            Ok(Reattach::HotPlugFailed { error }) => {
                vec![self.attach_failed(server, new_device, error)]
            }
            Err(e) => vec![self.attach_failed(server, new_device, format!("reattach: {e}"))],
        }
    }

    /// Re-attaches `new_device` to every server on this host whose domain holds `lineage` with
    /// `follow=lineage` (found in the domains' own metadata, so this works after an agent
    /// restart). `follow=strict` bindings are left alone: the
    /// server runs without the device until it is resized.
    pub async fn reattach_lineage(
        &self,
        lineage: LineageId,
        new_device: DeviceId,
        info: DeviceInfo,
    ) -> Vec<Event> {
        let holders = match self.blocking(move |inner| inner.holders(lineage)).await {
            Ok(h) => h,
            Err(e) => {
                warn!(%lineage, error = %e, "could not list the domains holding a lineage");
                return Vec::new();
            }
        };
        let mut events = Vec::new();
        for server in holders {
            events.extend(self.reattach(server, lineage, new_device, info).await);
        }
        events
    }

    /// Removes one device from the server's domain (hot-unplug where supported; the persistent
    /// definition is always updated). Reported as a `ServerStateChanged` with the observed state.
    #[tracing::instrument(skip(self), fields(host = %self.host()))]
    pub async fn detach(&self, server: ServerId, device: DeviceId) -> Vec<Event> {
        let _guard = self.lock(server).await;
        let result = self
            .blocking(move |inner| inner.detach(server, device))
            .await;
        match result {
            Ok((obs, how)) => {
                vec![self.state_event(server, obs.state, format!("detach device {device}: {how}"))]
            }
            Err(e) => vec![self.failed(server, "detach", &e)],
        }
    }

    /// The domain's current state.
    pub async fn observe(&self, server: ServerId) -> Result<Observed, ExecutorError> {
        self.blocking(move |inner| inner.observe(server)).await
    }

    /// The spec the domain was (last) defined from, read from its persistent metadata.
    pub async fn spec(&self, server: ServerId) -> Result<DomainSpec, ExecutorError> {
        self.blocking(move |inner| inner.read_spec(server)).await
    }

    /// The domain XML libvirt holds: the persistent definition (`inactive`) or the running one.
    pub async fn domain_xml(
        &self,
        server: ServerId,
        inactive: bool,
    ) -> Result<String, ExecutorError> {
        self.blocking(move |inner| inner.xml(server, inactive))
            .await
    }

    /// Servers with a usbpt domain on this host.
    pub async fn servers(&self) -> Result<Vec<ServerId>, ExecutorError> {
        self.blocking(|inner| {
            inner
                .our_domains()
                .map(|v| v.into_iter().map(|(s, _)| s).collect())
        })
        .await
    }

    // ---- helpers (async side) ----

    fn spec_from_assigned(
        &self,
        server: ServerId,
        devices: &[AssignedDevice],
        lookup: &dyn DeviceLookup,
    ) -> (DomainSpec, Vec<Event>) {
        let mut events = Vec::new();
        let mut hostdevs = Vec::with_capacity(devices.len());
        for a in devices {
            match lookup.device(&a.device_id) {
                Some(info) => hostdevs.push(HostdevSpec {
                    device_id: a.device_id,
                    lineage_id: a.lineage_id,
                    vendor: info.vendor,
                    product: info.product,
                    address: info.address,
                    controller: a.controller,
                    follow: a.follow,
                    present: info.present,
                    port: None,
                    fingerprint: info.fingerprint,
                }),
                None => events.push(self.attach_failed(
                    server,
                    a.device_id,
                    format!(
                        "device {} is not known on host {}; the domain is defined without it",
                        a.device_id,
                        self.host()
                    ),
                )),
            }
        }
        let cfg = &self.inner.config;
        let mut spec = DomainSpec::new(server, hostdevs);
        spec.memory_kib = cfg.memory_kib;
        spec.vcpus = cfg.vcpus;
        spec.title = lookup.server_name(&server).map(|n| n.to_string());
        (spec, events)
    }

    fn define_outcome(
        &self,
        spec: &DomainSpec,
        why: &str,
        result: Result<(Observed, String), ExecutorError>,
    ) -> Vec<Event> {
        let server = spec.server_id;
        let mut events = Vec::new();
        match result {
            Ok((obs, how)) => {
                // The layout succeeded inside define_and_start, so it succeeds here too.
                let layout = layout(spec).ok();
                for (i, d) in spec.devices.iter().enumerate() {
                    let place = layout
                        .as_ref()
                        .and_then(|l| placement_text(l, i))
                        .unwrap_or_default();
                    if d.present {
                        let policy = if d.optional() {
                            "; startupPolicy=optional (follow=strict)"
                        } else {
                            ""
                        };
                        events.push(Event::DeviceAttached(DeviceAttached {
                            device_id: d.device_id,
                            lineage_id: d.lineage_id,
                            host: self.host().clone(),
                            server_id: server,
                            address: d.address,
                            method: AttachMethod::DomainDefinition,
                            detail: format!("{why}: in the domain definition{place}{policy}"),
                        }));
                    } else {
                        events.push(self.attach_failed(
                            server,
                            d.device_id,
                            format!(
                                "device {} is not present on host {} (invalidated); defined with startupPolicy=optional at its last address {}{place}, so the server runs without it",
                                d.device_id,
                                self.host(),
                                d.address
                            ),
                        ));
                    }
                }
                events.push(self.state_event(
                    server,
                    obs.state,
                    format!("{why}: {how}; libvirt state {}", obs.libvirt),
                ));
            }
            Err(e) => {
                for d in &spec.devices {
                    events.push(self.attach_failed(server, d.device_id, format!("{why}: {e}")));
                }
                events.push(self.failed(server, why, &e));
            }
        }
        events
    }

    fn state_event(&self, server: ServerId, state: ServerState, detail: String) -> Event {
        Event::ServerStateChanged(ServerStateChanged {
            server_id: server,
            host: Some(self.host().clone()),
            state,
            reported_by_agent: true,
            detail,
        })
    }

    /// A failed operation: `ServerStateChanged { state: Error }` with the error text (libvirt's
    /// own text for libvirt failures).
    fn failed(&self, server: ServerId, what: &str, e: &ExecutorError) -> Event {
        warn!(%server, what, error = %e, "libvirt operation failed");
        self.state_event(server, ServerState::Error, format!("{what} failed: {e}"))
    }

    fn attach_failed(&self, server: ServerId, device: DeviceId, error: String) -> Event {
        Event::DeviceAttachFailed(DeviceAttachFailed {
            device_id: device,
            host: self.host().clone(),
            server_id: server,
            error,
        })
    }

    async fn lock(&self, server: ServerId) -> OwnedMutexGuard<()> {
        let m = {
            let mut map = self
                .inner
                .locks
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            map.entry(server).or_default().clone()
        };
        m.lock_owned().await
    }

    /// Drops the server's lock entry after a teardown when nobody else waits on it.
    fn forget_lock(&self, server: ServerId, guard: OwnedMutexGuard<()>) {
        let mut map = self
            .inner
            .locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // One reference in the map, one in our guard: nobody else holds or waits for it.
        if map.get(&server).is_some_and(|m| Arc::strong_count(m) == 2) {
            map.remove(&server);
        }
        drop(guard);
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, ExecutorError>
    where
        F: FnOnce(&Inner) -> Result<T, ExecutorError> + Send + 'static,
        T: Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| ExecutorError::Worker(e.to_string()))?
    }
}
