//! The blocking side of the executor: every
//! libvirt call (`virt` crate, FFI), on the connection [`Inner`] holds. The async facade ([`crate::executor`]) runs these on
//! `spawn_blocking`; nothing here awaits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use usbpt_schemas::{
    AttachMethod, DeviceId, Fingerprint, FollowPolicy, LineageId, ServerAction, ServerId,
    ServerState,
};
use virt::connect::Connect;
use virt::domain::{Domain, DomainState, DomainStateEnum};
use virt::enumutil::Enum;
use virt::sys;

use usbpt_agent::libvirt::domain::{
    domain_xml, hostdev_xml, layout, placed, DomainSpec, DomainType, HostdevSpec, METADATA_NS,
};
use usbpt_agent::libvirt::inspect::parse_metadata;
use usbpt_agent::libvirt::work::{reattach_or_hold, DeviceInfo, ReattachDecision};
use usbpt_agent::libvirt::{ExecutorConfig, ExecutorError, FailureKind, LibvirtError, Observed};

use crate::virt_error::{from_virt, VirtResultExt};

pub(crate) struct Inner {
    pub(crate) config: ExecutorConfig,
    /// The domain type in use: configured, or read from the capabilities at connect time.
    pub(crate) domain_type: DomainType,
    pub(crate) conn: Mutex<Option<Connect>>,
    pub(crate) locks: Mutex<HashMap<ServerId, Arc<tokio::sync::Mutex<()>>>>,
}

pub(crate) enum Reattach {
    Unchanged,
    /// Not re-attached: the fingerprint changed ([`reattach_or_hold`]).
    Held {
        expected: Fingerprint,
        seen: Fingerprint,
    },
    Done {
        old_device: DeviceId,
        method: AttachMethod,
        detail: String,
    },
    HotPlugFailed {
        error: String,
    },
}

pub(crate) fn state_name(s: &DomainStateEnum) -> &'static str {
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

pub(crate) fn is_paused(dom: &Domain) -> Result<bool, LibvirtError> {
    Ok(matches!(
        dom.state().op("virDomainGetState")?.0,
        Enum::Known(DomainState::Paused)
    ))
}

pub(crate) const LIVE: u32 = sys::VIR_DOMAIN_AFFECT_LIVE;

static SILENCE_LIBVIRT: std::sync::Once = std::sync::Once::new();

impl Inner {
    /// Opens the connection (so a bad URI fails here, naming it) and settles the domain type:
    /// configured, or read from the hypervisor's capabilities.
    /// libvirt's default error printing is silenced: every error is reported through events.
    pub(crate) fn open(config: ExecutorConfig) -> Result<Self, LibvirtError> {
        SILENCE_LIBVIRT.call_once(virt::error::clear_error_callback);
        let conn = Connect::open(Some(&config.uri)).op("virConnectOpen")?;
        let domain_type = match config.domain_type {
            Some(t) => t,
            None => {
                DomainType::from_capabilities(&conn.capabilities().op("virConnectGetCapabilities")?)
            }
        };
        Ok(Self {
            config,
            domain_type,
            conn: Mutex::new(Some(conn)),
            locks: Mutex::new(HashMap::new()),
        })
    }

    /// The server's domain's current state.
    pub(crate) fn observe(&self, server: ServerId) -> Result<Observed, ExecutorError> {
        let conn = self.conn()?;
        Ok(observe(&self.domain(&conn, server)?)?)
    }

    /// Whether the server's domain runs.
    pub(crate) fn is_active(&self, server: ServerId) -> Result<bool, ExecutorError> {
        let conn = self.conn()?;
        Ok(self
            .domain(&conn, server)?
            .is_active()
            .op("virDomainIsActive")?)
    }

    /// The domain XML libvirt holds: the persistent definition (`inactive`) or the running one.
    pub(crate) fn xml(&self, server: ServerId, inactive: bool) -> Result<String, ExecutorError> {
        let conn = self.conn()?;
        let flags = if inactive {
            sys::VIR_DOMAIN_XML_INACTIVE
        } else {
            0
        };
        Ok(self
            .domain(&conn, server)?
            .xml_desc(flags)
            .op("virDomainGetXMLDesc")?)
    }

    /// The shared connection, reopened when it died (libvirtd restarted).
    pub(crate) fn conn(&self) -> Result<Connect, LibvirtError> {
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

    pub(crate) fn domain(&self, conn: &Connect, server: ServerId) -> Result<Domain, LibvirtError> {
        conn.lookup_domain_by_uuid_string(&server.to_string())
            .op("virDomainLookupByUUIDString")
    }

    pub(crate) fn find_domain(
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

    pub(crate) fn spec_of(
        &self,
        dom: &Domain,
        server: ServerId,
    ) -> Result<DomainSpec, ExecutorError> {
        let xml = match dom.metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(METADATA_NS),
            sys::VIR_DOMAIN_AFFECT_CONFIG,
        ) {
            Ok(x) => x,
            Err(e) => {
                let e = from_virt("virDomainGetMetadata", &e);
                return Err(if e.is(FailureKind::NoMetadata) {
                    ExecutorError::NotOurs { server }
                } else {
                    e.into()
                });
            }
        };
        parse_metadata(&xml).map_err(|source| ExecutorError::Metadata { server, source })
    }

    pub(crate) fn read_spec(&self, server: ServerId) -> Result<DomainSpec, ExecutorError> {
        let conn = self.conn()?;
        let dom = self.domain(&conn, server)?;
        self.spec_of(&dom, server)
    }

    /// Writes `spec` as the persistent definition (the running domain, if any, is unchanged).
    pub(crate) fn redefine(&self, spec: &DomainSpec) -> Result<(), ExecutorError> {
        let xml = self.render(spec)?;
        self.conn()?
            .define_domain_xml(&xml)
            .op("virDomainDefineXML")?;
        Ok(())
    }

    /// Pure checks (ports) and schema validation: nothing reaches libvirt before these pass.
    pub(crate) fn render(&self, spec: &DomainSpec) -> Result<String, ExecutorError> {
        let xml = domain_xml(spec, self.domain_type)?;
        if let Some(v) = &self.config.validator {
            v.validate_domain(&xml)?;
        }
        Ok(xml)
    }

    pub(crate) fn define_and_start(
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
    pub(crate) fn stop(&self, dom: &Domain) -> Result<String, LibvirtError> {
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

    pub(crate) fn power(
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

    pub(crate) fn teardown(&self, server: ServerId) -> Result<String, ExecutorError> {
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

    pub(crate) fn reattach(
        &self,
        server: ServerId,
        lineage: LineageId,
        new_device: DeviceId,
        info: DeviceInfo,
        accepted: Option<Fingerprint>,
    ) -> Result<Reattach, ExecutorError> {
        let conn = self.conn()?;
        let dom = self.domain(&conn, server)?;
        let spec = placed(&self.spec_of(&dom, server)?)?;
        let Some(pos) = spec.devices.iter().position(|d| d.lineage_id == lineage) else {
            return Err(ExecutorError::NoSuchLineage { server, lineage });
        };
        let old = spec.devices[pos].clone();
        let fingerprint = match accepted {
            // Accepted (by an operator or the flavor's policy): recorded as the server's.
            Some(f) => Some(f),
            None => match reattach_or_hold(old.fingerprint, info.fingerprint) {
                ReattachDecision::Reattach { fingerprint } => fingerprint,
                ReattachDecision::Hold { expected, seen } => {
                    info!(%server, %lineage, %new_device, "re-attach held: fingerprint changed");
                    return Ok(Reattach::Held { expected, seen });
                }
            },
        };
        if old.device_id == new_device
            && old.address == info.address
            && old.present == info.present
            && old.fingerprint == fingerprint
        {
            return Ok(Reattach::Unchanged);
        }
        let mut next = spec.clone();
        let new = &mut next.devices[pos];
        new.fingerprint = fingerprint;
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
    pub(crate) fn hot_swap(
        &self,
        dom: &Domain,
        old: &HostdevSpec,
        new: &HostdevSpec,
        placement: Option<usbpt_agent::libvirt::domain::Placement>,
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

    pub(crate) fn detach(
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
    pub(crate) fn our_domains(&self) -> Result<Vec<(ServerId, DomainSpec)>, ExecutorError> {
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

    pub(crate) fn holders(&self, lineage: LineageId) -> Result<Vec<ServerId>, ExecutorError> {
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

pub(crate) enum HotSwap {
    Done,
    Unsupported(String),
    Failed(String),
}
