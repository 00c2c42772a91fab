//! The libvirt executor: carries out what the control plane asks of this host (boot, resize,
//! cold migration, power actions, delete) and re-attaches devices that re-enumerated, reporting
//! every outcome as usbpt events. libvirt calls are blocking FFI and run on `spawn_blocking`;
//! operations on one server are serialised, different servers run in parallel.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, Once, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::OwnedMutexGuard;
use tracing::{debug, info, warn};
use usbpt_schemas::subjects::{self, DefineWhy, WorkKind};
use usbpt_schemas::{
    AssignedDevice, AttachMethod, DeviceAttachFailed, DeviceAttached, DeviceId, DeviceReattached,
    Envelope, Event, FollowPolicy, HostName, LineageId, ProductId, ServerAction, ServerId,
    ServerName, ServerState, ServerStateChanged, UsbAddress, VendorId,
};
use virt::connect::Connect;
use virt::domain::{Domain, DomainState, DomainStateEnum};
use virt::enumutil::Enum;
use virt::sys;

use super::domain::{
    domain_xml, hostdev_xml, layout, placed, DomainSpec, DomainType, HostdevSpec, Layout,
    DEFAULT_MEMORY_KIB, DEFAULT_VCPUS, METADATA_NS,
};
use super::error::{ExecutorError, FailureKind, LibvirtError, VirtResultExt};
use super::inspect::parse_metadata;
use super::validate::XmlValidator;

/// What the agent knows about one of its devices right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    pub vendor: VendorId,
    pub product: ProductId,
    /// Current address; for an invalidated enumeration, the last one it had.
    pub address: UsbAddress,
    /// False once the enumeration is invalidated (unplugged, host rebooted, …).
    pub present: bool,
}

/// The agent's knowledge the executor needs: its devices, and server names when it has them.
pub trait DeviceLookup: Sync {
    fn device(&self, id: &DeviceId) -> Option<DeviceInfo>;
    /// The server's name, for the domain's `<title>`; the events for a host do not carry it.
    fn server_name(&self, _server: &ServerId) -> Option<ServerName> {
        None
    }
}

impl DeviceLookup for HashMap<DeviceId, DeviceInfo> {
    fn device(&self, id: &DeviceId) -> Option<DeviceInfo> {
        self.get(id).copied()
    }
}

/// How the executor talks to libvirt.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// This agent's host: the executor only acts on work addressed to it.
    pub host: HostName,
    /// `qemu:///system` in production, `test:///abs/path/node.xml` in tests.
    pub uri: String,
    /// `<domain type=…>`; `None` picks it from the hypervisor's capabilities at connect time
    /// ([`DomainType::from_capabilities`]: `kvm` where the host offers it, else `qemu`).
    pub domain_type: Option<DomainType>,
    pub memory_kib: u64,
    pub vcpus: u32,
    /// How long a graceful shutdown may take before the domain is destroyed.
    pub shutdown_timeout: Duration,
    /// Validate every generated domain XML against libvirt's schema before defining it.
    pub validator: Option<Arc<XmlValidator>>,
}

impl ExecutorConfig {
    pub fn new(host: HostName, uri: impl Into<String>) -> Self {
        Self {
            host,
            uri: uri.into(),
            domain_type: None,
            memory_kib: DEFAULT_MEMORY_KIB,
            vcpus: DEFAULT_VCPUS,
            shutdown_timeout: Duration::from_secs(60),
            validator: None,
        }
    }
}

/// The URI of libvirt's test driver for a node description file (`test:///abs/path`). Each
/// connection to a file URI gets private state; `test:///default` is shared in-process.
pub fn test_driver_uri(node_xml: &Path) -> std::io::Result<String> {
    Ok(format!(
        "test://{}",
        std::path::absolute(node_xml)?.display()
    ))
}

/// A domain's state as usbpt reports it, with libvirt's own words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub state: ServerState,
    /// libvirt's state, e.g. `running`, `shut off (managed save)`.
    pub libvirt: String,
}

/// The work an event asks of this host, if any. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Define and start the domain with these devices (boot, resize or cold migration onto this
    /// host); `restart` stops a running domain first (resize in place).
    Define {
        server: ServerId,
        devices: Vec<AssignedDevice>,
        why: String,
        restart: bool,
    },
    Action {
        server: ServerId,
        action: ServerAction,
    },
    /// Destroy and undefine.
    Teardown { server: ServerId, why: String },
}

/// What `event` asks of the agent on `host`. Pure, and derived from the one routing-and-work
/// table ([`subjects::route`]): the agent works on exactly the events routed to its control
/// subject, so events for other hosts (and events for no host) give `None`.
pub fn work_for(host: &HostName, event: &Event) -> Option<Work> {
    let w = subjects::work_for_host(host, event)?;
    let server = w.server;
    Some(match w.work {
        WorkKind::Define { devices, why } => {
            let (why, restart) = match why {
                DefineWhy::Boot => ("boot".to_owned(), false),
                DefineWhy::Resize { from_host } if from_host == host => ("resize".into(), true),
                DefineWhy::Resize { from_host } => (format!("resize from host {from_host}"), false),
                DefineWhy::Migrate { from_host } => {
                    (format!("cold migration from host {from_host}"), false)
                }
            };
            Work::Define {
                server,
                devices: devices.to_vec(),
                why,
                restart,
            }
        }
        WorkKind::Action(action) => Work::Action { server, action },
        WorkKind::Teardown => Work::Teardown {
            server,
            why: "delete".into(),
        },
    })
}

/// `spec` with every device's current address and presence from `lookup` (an enumeration the
/// agent no longer knows is absent), and the server's name when known. Pure.
fn with_current_devices(
    mut spec: DomainSpec,
    server: ServerId,
    lookup: &dyn DeviceLookup,
) -> DomainSpec {
    for d in &mut spec.devices {
        match lookup.device(&d.device_id) {
            Some(info) => {
                d.vendor = info.vendor;
                d.product = info.product;
                d.address = info.address;
                d.present = info.present;
            }
            None => d.present = false,
        }
    }
    if let Some(name) = lookup.server_name(&server) {
        spec.title = Some(name.to_string());
    }
    spec
}

/// `; devices: 1 absent (optional), 1 at 003:005` for a state event's detail.
fn devices_note(spec: &DomainSpec) -> String {
    let absent = spec.devices.iter().filter(|d| !d.present).count();
    let present: Vec<String> = spec
        .devices
        .iter()
        .filter(|d| d.present)
        .map(|d| d.address.to_string())
        .collect();
    format!(
        "; definition refreshed: {absent} device(s) absent (started without them), present at [{}]",
        present.join(", ")
    )
}

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

struct Inner {
    config: ExecutorConfig,
    /// The domain type in use: configured, or read from the capabilities at connect time.
    domain_type: DomainType,
    conn: Mutex<Option<Connect>>,
    locks: Mutex<HashMap<ServerId, Arc<tokio::sync::Mutex<()>>>>,
}

static SILENCE_LIBVIRT: Once = Once::new();

impl Executor {
    /// Opens the connection (so a bad URI fails here, naming it) and silences libvirt's default
    /// error printing (every error is reported through events instead).
    pub async fn connect(config: ExecutorConfig) -> Result<Self, ExecutorError> {
        SILENCE_LIBVIRT.call_once(virt::error::clear_error_callback);
        let uri = config.uri.clone();
        let (conn, capabilities) = tokio::task::spawn_blocking(move || {
            let c = Connect::open(Some(&uri)).op("virConnectOpen")?;
            let caps = c.capabilities().op("virConnectGetCapabilities")?;
            Ok::<_, LibvirtError>((c, caps))
        })
        .await
        .map_err(|e| ExecutorError::Worker(e.to_string()))??;
        let domain_type = match config.domain_type {
            Some(t) => t,
            None => DomainType::from_capabilities(&capabilities),
        };
        info!(uri = %config.uri, domain_type = domain_type.as_str(), "libvirt connected");
        let inner = Arc::new(Inner {
            config,
            domain_type,
            conn: Mutex::new(Some(conn)),
            locks: Mutex::new(HashMap::new()),
        });
        Ok(Self { inner })
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
            let active = self
                .blocking(move |inner| {
                    let conn = inner.conn()?;
                    Ok(inner
                        .domain(&conn, server)?
                        .is_active()
                        .op("virDomainIsActive")?)
                })
                .await;
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
    #[tracing::instrument(skip(self, info), fields(host = %self.host()))]
    pub async fn reattach(
        &self,
        server: ServerId,
        lineage: LineageId,
        new_device: DeviceId,
        info: DeviceInfo,
    ) -> Vec<Event> {
        let _guard = self.lock(server).await;
        let result = self
            .blocking(move |inner| inner.reattach(server, lineage, new_device, info))
            .await;
        match result {
            Ok(Reattach::Unchanged) => Vec::new(),
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
        self.blocking(move |inner| {
            let conn = inner.conn()?;
            Ok(observe(&inner.domain(&conn, server)?)?)
        })
        .await
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
        self.blocking(move |inner| {
            let conn = inner.conn()?;
            let flags = if inactive {
                sys::VIR_DOMAIN_XML_INACTIVE
            } else {
                0
            };
            Ok(inner
                .domain(&conn, server)?
                .xml_desc(flags)
                .op("virDomainGetXMLDesc")?)
        })
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

fn placement_text(l: &Layout, i: usize) -> Option<String> {
    let p = l.placements.get(i)?;
    let c = l
        .controllers
        .iter()
        .find(|c| c.index == p.controller_index)?;
    Some(format!(
        " on USB controller {} ({}) index {} port {}",
        c.model.as_str(),
        c.model.libvirt_model(),
        c.index,
        p.port
    ))
}

enum Reattach {
    Unchanged,
    Done {
        old_device: DeviceId,
        method: AttachMethod,
        detail: String,
    },
    HotPlugFailed {
        error: String,
    },
}

fn state_name(s: &DomainStateEnum) -> &'static str {
    match s {
        Enum::Known(DomainState::NoState) => "no state",
        Enum::Known(DomainState::Running) => "running",
        Enum::Known(DomainState::Blocked) => "blocked",
        Enum::Known(DomainState::Paused) => "paused",
        Enum::Known(DomainState::Shutdown) => "shutting down",
        Enum::Known(DomainState::Shutoff) => "shut off",
        Enum::Known(DomainState::Crashed) => "crashed",
        Enum::Known(DomainState::PMSuspended) => "pm-suspended",
        Enum::Unknown(_) => "unknown",
    }
}

/// libvirt's state → usbpt's (Nova's) state.
pub fn observe(dom: &Domain) -> Result<Observed, LibvirtError> {
    let (state, _reason) = dom.state().op("virDomainGetState")?;
    if matches!(state, Enum::Unknown(_)) {
        // virt 0.5 ignores virDomainGetState's failure and reports an unknown state.
        dom.info().op("virDomainGetInfo")?;
    }
    let saved = dom.has_managed_save(0).unwrap_or(false);
    let ours = match state {
        Enum::Known(DomainState::Running | DomainState::Blocked | DomainState::Shutdown) => {
            ServerState::Active
        }
        Enum::Known(DomainState::Paused) => ServerState::Paused,
        Enum::Known(DomainState::Shutoff) if saved => ServerState::Suspended,
        Enum::Known(DomainState::Shutoff) => ServerState::Shutoff,
        Enum::Known(DomainState::PMSuspended) => ServerState::Suspended,
        Enum::Known(DomainState::Crashed | DomainState::NoState) | Enum::Unknown(_) => {
            ServerState::Error
        }
    };
    let mut libvirt = state_name(&state).to_owned();
    if saved {
        libvirt.push_str(" (managed save)");
    }
    Ok(Observed {
        state: ours,
        libvirt,
    })
}

fn is_paused(dom: &Domain) -> Result<bool, LibvirtError> {
    Ok(matches!(
        dom.state().op("virDomainGetState")?.0,
        Enum::Known(DomainState::Paused)
    ))
}

const LIVE: u32 = sys::VIR_DOMAIN_AFFECT_LIVE;

impl Inner {
    /// The shared connection, reopened when it died (libvirtd restarted).
    fn conn(&self) -> Result<Connect, LibvirtError> {
        let mut slot = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = slot.as_ref() {
            if c.is_alive().unwrap_or(false) {
                return Ok(c.clone());
            }
            warn!(uri = %self.config.uri, "libvirt connection lost; reconnecting");
        }
        let c = Connect::open(Some(&self.config.uri)).op("virConnectOpen")?;
        *slot = Some(c.clone());
        Ok(c)
    }

    fn domain(&self, conn: &Connect, server: ServerId) -> Result<Domain, LibvirtError> {
        conn.lookup_domain_by_uuid_string(&server.to_string())
            .op("virDomainLookupByUUIDString")
    }

    fn find_domain(
        &self,
        conn: &Connect,
        server: ServerId,
    ) -> Result<Option<Domain>, LibvirtError> {
        match self.domain(conn, server) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.is(FailureKind::NoDomain) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn spec_of(&self, dom: &Domain, server: ServerId) -> Result<DomainSpec, ExecutorError> {
        let xml = match dom.metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(METADATA_NS),
            sys::VIR_DOMAIN_AFFECT_CONFIG,
        ) {
            Ok(x) => x,
            Err(e) => {
                let e = LibvirtError::from_virt("virDomainGetMetadata", &e);
                return Err(if e.is(FailureKind::NoMetadata) {
                    ExecutorError::NotOurs { server }
                } else {
                    e.into()
                });
            }
        };
        parse_metadata(&xml).map_err(|source| ExecutorError::Metadata { server, source })
    }

    fn read_spec(&self, server: ServerId) -> Result<DomainSpec, ExecutorError> {
        let conn = self.conn()?;
        let dom = self.domain(&conn, server)?;
        self.spec_of(&dom, server)
    }

    /// Writes `spec` as the persistent definition (the running domain, if any, is unchanged).
    fn redefine(&self, spec: &DomainSpec) -> Result<(), ExecutorError> {
        let xml = self.render(spec)?;
        self.conn()?
            .define_domain_xml(&xml)
            .op("virDomainDefineXML")?;
        Ok(())
    }

    /// Pure checks (ports) and schema validation: nothing reaches libvirt before these pass.
    fn render(&self, spec: &DomainSpec) -> Result<String, ExecutorError> {
        let xml = domain_xml(spec, self.domain_type)?;
        if let Some(v) = &self.config.validator {
            v.validate_domain(&xml)?;
        }
        Ok(xml)
    }

    fn define_and_start(
        &self,
        spec: &DomainSpec,
        restart: bool,
    ) -> Result<(Observed, String), ExecutorError> {
        let xml = self.render(spec)?;
        let conn = self.conn()?;
        let mut how = Vec::new();
        if restart {
            if let Some(dom) = self.find_domain(&conn, spec.server_id)? {
                if dom.is_active().op("virDomainIsActive")? {
                    how.push(self.stop(&dom)?);
                }
            }
        }
        let dom = conn.define_domain_xml(&xml).op("virDomainDefineXML")?;
        how.push(format!("domain {} defined", spec.domain_name()));
        if dom.is_active().op("virDomainIsActive")? {
            how.push("already running (the new definition applies at its next start)".into());
        } else {
            dom.create().op("virDomainCreate")?;
            how.push("started".into());
        }
        info!(server = %spec.server_id, devices = spec.devices.len(), "domain defined");
        Ok((observe(&dom)?, how.join(", ")))
    }

    /// Graceful shutdown, destroy after the timeout (or at once for a paused guest, which cannot
    /// act on the shutdown request). libvirt's lifecycle events would need an event loop thread;
    /// a bounded state poll is enough here (the test driver stops synchronously).
    fn stop(&self, dom: &Domain) -> Result<String, LibvirtError> {
        if !dom.is_active().op("virDomainIsActive")? {
            return Ok("already shut off".into());
        }
        if is_paused(dom)? {
            dom.destroy().op("virDomainDestroy")?;
            return Ok("destroyed (a paused guest cannot shut down)".into());
        }
        if let Err(e) = dom.shutdown().op("virDomainShutdown") {
            debug!(error = %e, "graceful shutdown refused; destroying");
            dom.destroy().op("virDomainDestroy")?;
            return Ok(format!("destroyed (shutdown refused: {})", e.text));
        }
        let deadline = Instant::now() + self.config.shutdown_timeout;
        loop {
            if !dom.is_active().op("virDomainIsActive")? {
                return Ok("shut down".into());
            }
            if Instant::now() >= deadline {
                match dom.destroy().op("virDomainDestroy") {
                    Err(e) if e.is(FailureKind::InvalidState) => return Ok("shut down".into()),
                    r => r?,
                }
                return Ok(format!(
                    "destroyed (no shutdown within {:?})",
                    self.config.shutdown_timeout
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn power(
        &self,
        server: ServerId,
        action: ServerAction,
    ) -> Result<(Observed, String), ExecutorError> {
        let conn = self.conn()?;
        let dom = self.domain(&conn, server)?;
        let active = dom.is_active().op("virDomainIsActive")?;
        let saved = !active && dom.has_managed_save(0).op("virDomainHasManagedSaveImage")?;
        let how: String = match action {
            ServerAction::Stop => self.stop(&dom)?,
            ServerAction::Start | ServerAction::Resume if saved => {
                dom.create().op("virDomainCreate")?;
                "restored from the managed save image".into()
            }
            ServerAction::Start if active => "already running".into(),
            ServerAction::Start => {
                dom.create().op("virDomainCreate")?;
                "started".into()
            }
            ServerAction::Reboot if !active => {
                dom.create().op("virDomainCreate")?;
                "was shut off; started".into()
            }
            ServerAction::Reboot => {
                dom.reboot(0).op("virDomainReboot")?;
                "rebooted".into()
            }
            ServerAction::Pause if active && is_paused(&dom)? => "already paused".into(),
            ServerAction::Pause => {
                dom.suspend().op("virDomainSuspend")?;
                "paused".into()
            }
            ServerAction::Unpause | ServerAction::Resume if active && !is_paused(&dom)? => {
                "already running".into()
            }
            ServerAction::Unpause | ServerAction::Resume => {
                // Paused → running; anything else gets libvirt's own refusal.
                dom.resume().op("virDomainResume")?;
                "resumed".into()
            }
            ServerAction::Suspend if saved => "already suspended (managed save)".into(),
            ServerAction::Suspend => {
                dom.managed_save(0).op("virDomainManagedSave")?;
                "saved to a managed save image and stopped".into()
            }
            ServerAction::Rebuild | ServerAction::Teardown => {
                return Err(ExecutorError::Worker(format!(
                    "{} is not a power action",
                    action.as_str()
                )));
            }
        };
        Ok((observe(&dom)?, how))
    }

    fn teardown(&self, server: ServerId) -> Result<String, ExecutorError> {
        let conn = self.conn()?;
        let Some(dom) = self.find_domain(&conn, server)? else {
            return Ok("no domain (already gone)".into());
        };
        let mut how = Vec::new();
        if dom.is_active().op("virDomainIsActive")? {
            match dom.destroy().op("virDomainDestroy") {
                Ok(()) => how.push("destroyed"),
                Err(e) if e.is(FailureKind::InvalidState) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if dom.is_persistent().op("virDomainIsPersistent")? {
            dom.undefine_flags(
                sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA,
            )
            .op("virDomainUndefineFlags")?;
            how.push("undefined");
        }
        Ok(format!("domain {}", how.join(" and ")))
    }

    fn reattach(
        &self,
        server: ServerId,
        lineage: LineageId,
        new_device: DeviceId,
        info: DeviceInfo,
    ) -> Result<Reattach, ExecutorError> {
        let conn = self.conn()?;
        let dom = self.domain(&conn, server)?;
        let spec = placed(&self.spec_of(&dom, server)?)?;
        let Some(pos) = spec.devices.iter().position(|d| d.lineage_id == lineage) else {
            return Err(ExecutorError::NoSuchLineage { server, lineage });
        };
        let old = spec.devices[pos].clone();
        if old.device_id == new_device && old.address == info.address && old.present == info.present
        {
            return Ok(Reattach::Unchanged);
        }
        let mut next = spec.clone();
        let new = &mut next.devices[pos];
        new.device_id = new_device;
        new.vendor = info.vendor;
        new.product = info.product;
        new.address = info.address;
        new.present = info.present;
        let new = new.clone();
        let xml = self.render(&next)?;
        let placement = layout(&next)?.placements.get(pos).copied();

        let mut method = AttachMethod::Redefined;
        let mut detail = String::new();
        let mut hot_error = None;
        if dom.is_active().op("virDomainIsActive")? {
            match self.hot_swap(&dom, &old, &new, placement)? {
                HotSwap::Done => {
                    method = AttachMethod::HotPlug;
                    detail = format!(
                        "hot-plugged at {} in place of {} at {} (controller port kept); persistent definition updated",
                        new.address, old.device_id, old.address
                    );
                }
                HotSwap::Unsupported(text) => {
                    detail = format!(
                        "the hypervisor driver cannot hot attach ({text}); domain redefined with the same uuid and the new address {}: the running domain keeps the old one until it restarts",
                        new.address
                    );
                }
                HotSwap::Failed(text) => hot_error = Some(text),
            }
        } else {
            detail = format!(
                "domain is not running; redefined with the new address {}, attached at its next start",
                new.address
            );
        }
        conn.define_domain_xml(&xml).op("virDomainDefineXML")?;
        if let Some(text) = hot_error {
            return Ok(Reattach::HotPlugFailed {
                error: format!(
                    "hot attach of {} at {} failed: {text}; the persistent definition has the new address (applies at next start)",
                    new.device_id, new.address
                ),
            });
        }
        info!(%server, %lineage, ?method, "device re-attached");
        Ok(Reattach::Done {
            old_device: old.device_id,
            method,
            detail,
        })
    }

    /// Live: unplug the old enumeration's hostdev, plug the new one.
    fn hot_swap(
        &self,
        dom: &Domain,
        old: &HostdevSpec,
        new: &HostdevSpec,
        placement: Option<super::domain::Placement>,
    ) -> Result<HotSwap, ExecutorError> {
        let old_xml = hostdev_xml(old, placement)?;
        match dom
            .detach_device_flags(&old_xml, LIVE)
            .op("virDomainDetachDeviceFlags")
        {
            Ok(()) => {}
            Err(e) if e.is(FailureKind::Unsupported) => return Ok(HotSwap::Unsupported(e.text)),
            // Already gone from the live domain (e.g. a previous redefinition): fine.
            Err(e) => debug!(error = %e, "old hostdev not detached"),
        }
        let new_xml = hostdev_xml(new, placement)?;
        match dom
            .attach_device_flags(&new_xml, LIVE)
            .op("virDomainAttachDeviceFlags")
        {
            Ok(()) => Ok(HotSwap::Done),
            Err(e) if e.is(FailureKind::Unsupported) => Ok(HotSwap::Unsupported(e.text)),
            Err(e) => Ok(HotSwap::Failed(e.text)),
        }
    }

    fn detach(
        &self,
        server: ServerId,
        device: DeviceId,
    ) -> Result<(Observed, String), ExecutorError> {
        let conn = self.conn()?;
        let dom = self.domain(&conn, server)?;
        let spec = placed(&self.spec_of(&dom, server)?)?;
        let Some(pos) = spec.devices.iter().position(|d| d.device_id == device) else {
            return Err(ExecutorError::NoSuchDevice { server, device });
        };
        let placement = layout(&spec)?.placements.get(pos).copied();
        let mut next = spec.clone();
        let gone = next.devices.remove(pos);
        let xml = self.render(&next)?;
        let how = if dom.is_active().op("virDomainIsActive")? {
            let hd = hostdev_xml(&gone, placement)?;
            match dom.detach_device_flags(&hd, LIVE).op("virDomainDetachDeviceFlags") {
                Ok(()) => "hot-unplugged; persistent definition updated".to_owned(),
                Err(e) if e.is(FailureKind::Unsupported) => format!(
                    "the hypervisor driver cannot hot detach ({}); domain redefined without it, the running domain keeps it until it restarts",
                    e.text
                ),
                Err(e) if e.is(FailureKind::DeviceMissing) => {
                    "was not in the running domain; persistent definition updated".to_owned()
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            "domain redefined without it".to_owned()
        };
        conn.define_domain_xml(&xml).op("virDomainDefineXML")?;
        Ok((observe(&dom)?, how))
    }

    /// Every usbpt domain on this connection with its spec.
    fn our_domains(&self) -> Result<Vec<(ServerId, DomainSpec)>, ExecutorError> {
        let conn = self.conn()?;
        let mut out = Vec::new();
        for dom in conn.list_all_domains(0).op("virConnectListAllDomains")? {
            let Ok(uuid) = dom.uuid_string() else {
                continue;
            };
            let Ok(server) = uuid.parse::<ServerId>() else {
                continue;
            };
            match self.spec_of(&dom, server) {
                Ok(spec) => out.push((server, spec)),
                Err(ExecutorError::NotOurs { .. }) => {}
                Err(e) => warn!(%server, error = %e, "skipping a domain with unreadable metadata"),
            }
        }
        Ok(out)
    }

    fn holders(&self, lineage: LineageId) -> Result<Vec<ServerId>, ExecutorError> {
        Ok(self
            .our_domains()?
            .into_iter()
            .filter(|(_, spec)| {
                spec.devices
                    .iter()
                    .any(|d| d.lineage_id == lineage && d.follow == FollowPolicy::Lineage)
            })
            .map(|(s, _)| s)
            .collect())
    }
}

enum HotSwap {
    Done,
    Unsupported(String),
    Failed(String),
}
