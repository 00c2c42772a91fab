//! The agent process: open the state, enumerate once, reconcile, queue `HostAgentStarted`, then
//! resolve observations as they come, each batch committed (state + outbox) in one redb
//! transaction before the publisher is woken. No polling: the loop sleeps until the source or
//! the shutdown signal wakes it; the publisher sleeps until it is woken or retries an outage.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use usbpt_schemas::text::Escaped;

use std::collections::HashMap;
use thiserror::Error;

use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tracing::{error, info, info_span, warn, Instrument};
use usbpt_schemas::{
    DeviceId, Envelope, Event, HostAgentStarted, HostName, LineageId, PortFlapping,
    PortFlappingCleared,
};

use crate::control::{Control, Devices, Reenumerated};
use crate::libvirt::{DeviceInfo, Hands};

use crate::filter::Filter;
use crate::flap::{Detector, FlapSettings};
use crate::observation::Observation;
use crate::progress::{Progress, ProgressSink};
use crate::publisher::{BusTarget, Publisher};
use crate::resolver::{self, Context, Reconcile, State, V7Ids};
use crate::source::{DeviceSource, SourceError, SourceEvent};
use crate::store::{self, Store, StoreError};

/// The agent's version, as published in `HostAgentStarted`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Everything the agent needs to run.
#[derive(Clone)]
pub struct AgentConfig {
    pub host: HostName,
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    pub hypervisor_uri: String,
    /// Holds `agent-{host}.redb`.
    pub data_dir: PathBuf,
    pub filter: Filter,
    pub bus: BusTarget,
    pub progress: ProgressSink,
    /// How long a stopping agent keeps publishing what is queued (the rest waits in the outbox).
    pub drain_on_stop: Duration,
    /// When a re-enumerating lineage is flapping ([`crate::flap`]).
    pub flap: FlapSettings,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("host", &self.host)
            .field("boot_id", &self.boot_id)
            .field("hypervisor_uri", &self.hypervisor_uri)
            .field("data_dir", &self.data_dir)
            .field("bus", &self.bus)
            .field("flap", &self.flap)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Error)]
pub enum AgentError {
    #[error("cannot create the data dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("the publisher task failed: {0}")]
    Publisher(String),
}

/// Reads a boot id file (trimmed); an empty file is an error naming it.
pub fn read_boot_id(path: &std::path::Path) -> Result<String, std::io::Error> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot read boot id file {}: {e}", path.display()),
        )
    })?;
    let id = text.trim();
    if id.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("boot id file {} is empty", path.display()),
        ));
    }
    Ok(id.to_owned())
}

struct Agent {
    config: AgentConfig,
    store: Arc<Store>,
    state: State,
    wake: Arc<Notify>,
    filtered_total: u64,
    /// The executor's view of this host's devices (present, and recently ended).
    devices: HashMap<DeviceId, DeviceInfo>,
    devices_tx: watch::Sender<Devices>,
    /// Re-enumerated lineages for the executor to re-attach (when there is one).
    reenumerated: Option<mpsc::UnboundedSender<Reenumerated>>,
    /// Flapping lineages: not re-attached while their episode lasts.
    flap: Detector,
}

/// How many ended enumerations the executor's device map remembers.
const ENDED_KEPT: usize = 1024;

impl Agent {
    fn ctx(&self) -> Context<'_> {
        Context {
            host: &self.config.host,
            boot_id: &self.config.boot_id,
        }
    }

    /// Commits `events` with the state change from `before`, logs them and wakes the publisher.
    /// Each discovery among them is counted by the flapping detector first: an episode it opens
    /// is committed with them (`PortFlapping` right after the discovery that opened it).
    fn commit(&mut self, before: &State, events: Vec<Event>) -> Result<u64, StoreError> {
        let events = self.detect_flapping(events);
        self.log_filtered(before);
        if events.is_empty() && *before == self.state {
            return self.store.outbox_len();
        }
        for e in &events {
            log_event(e);
        }
        let envelopes: Vec<Envelope> = events.into_iter().map(Envelope::new).collect();
        self.store.commit(before, &self.state, &envelopes)?;
        if !envelopes.is_empty() {
            self.wake.notify_one();
        }
        self.track(&envelopes);
        self.store.outbox_len()
    }

    fn detect_flapping(&mut self, events: Vec<Event>) -> Vec<Event> {
        if !self.flap.settings().enabled() {
            return events;
        }
        let now = Instant::now();
        let settings = self.flap.settings();
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            let raised = e.discovery().and_then(|(d, _)| {
                self.flap
                    .enumerated(d.lineage_id, now)
                    .map(|n| PortFlapping {
                        host: self.config.host.clone(),
                        lineage_id: d.lineage_id,
                        device_id: d.device_id,
                        port_path: d.descriptors.port_path.clone(),
                        enumerations: n,
                        window_secs: settings.window.as_secs().try_into().unwrap_or(u32::MAX),
                        threshold: settings.threshold,
                    })
            });
            out.push(e);
            if let Some(f) = raised {
                warn!(
                    lineage_id = %f.lineage_id,
                    port = %f.port_path,
                    enumerations = f.enumerations,
                    window_secs = f.window_secs,
                    "port flapping: automatic re-attach paused for this lineage"
                );
                self.state.flapping.insert(f.lineage_id);
                out.push(Event::PortFlapping(f));
            }
        }
        out
    }

    /// Ends the flapping episodes that stayed quiet: `PortFlappingCleared` for each, and the
    /// lineage's present enumeration re-attached once (the ones skipped meanwhile were not).
    fn flap_quiet(&mut self) -> Result<(), StoreError> {
        let ended = self.flap.quiet(Instant::now());
        if ended.is_empty() {
            return Ok(());
        }
        let before = self.state.clone();
        let quiet_secs = self
            .flap
            .settings()
            .quiet
            .as_secs()
            .try_into()
            .unwrap_or(u32::MAX);
        let mut events = Vec::new();
        let mut reattach = Vec::new();
        for lineage in ended {
            self.state.flapping.remove(&lineage);
            let present = self.present(lineage);
            info!(%lineage, present = ?present.map(|(d, _)| d.to_string()), "port flapping cleared");
            events.push(Event::PortFlappingCleared(PortFlappingCleared {
                host: self.config.host.clone(),
                lineage_id: lineage,
                device_id: present.map(|(d, _)| d),
                quiet_secs,
            }));
            if let Some((device, info)) = present {
                reattach.push(Reenumerated {
                    lineage,
                    device,
                    info,
                });
            }
        }
        self.commit(&before, events)?;
        if let Some(tx) = &self.reenumerated {
            for r in reattach {
                let _ = tx.send(r);
            }
        }
        Ok(())
    }

    /// The lineage's present (published) enumeration on this host.
    fn present(&self, lineage: LineageId) -> Option<(DeviceId, DeviceInfo)> {
        self.state
            .candidates()
            .find(|k| k.lineage_id == lineage)
            .map(|k| {
                (
                    k.device_id,
                    DeviceInfo {
                        vendor: k.device.descriptors.vendor_id,
                        product: k.device.descriptors.product_id,
                        address: k.device.descriptors.address,
                        present: true,
                        fingerprint: k.device.fingerprint,
                    },
                )
            })
    }

    /// Keeps the executor's device map in step and hands re-enumerated lineages to it, after
    /// the events are safely in the outbox.
    fn track(&mut self, envelopes: &[Envelope]) {
        let mut changed = false;
        for env in envelopes {
            match (&env.body, env.body.discovery()) {
                (_, Some((d, fingerprint))) => {
                    let info = DeviceInfo {
                        vendor: d.descriptors.vendor_id,
                        product: d.descriptors.product_id,
                        address: d.descriptors.address,
                        present: true,
                        fingerprint: fingerprint.copied(),
                    };
                    self.devices.insert(d.device_id, info);
                    changed = true;
                    if d.supersedes.is_some() && !self.flap.is_flapping(d.lineage_id) {
                        if let Some(tx) = &self.reenumerated {
                            let _ = tx.send(Reenumerated {
                                lineage: d.lineage_id,
                                device: d.device_id,
                                info,
                            });
                        }
                    }
                }
                (Event::DeviceInvalidated(d), _) => {
                    if let Some(info) = self.devices.get_mut(&d.device_id) {
                        info.present = false;
                        changed = true;
                    }
                }
                _ => {}
            }
        }
        if self.devices.len() > ENDED_KEPT + self.state.devices.len() {
            let present: Vec<DeviceId> = self.state.candidates().map(|k| k.device_id).collect();
            self.devices
                .retain(|id, info| info.present || present.contains(id));
            changed = true;
        }
        if changed {
            self.devices_tx.send_replace(Arc::new(self.devices.clone()));
        }
    }

    fn log_filtered(&mut self, before: &State) {
        for (path, k) in &self.state.devices {
            if let Some(reason) = &k.filtered {
                let new = before
                    .devices
                    .get(path)
                    .is_none_or(|b| b.device_id != k.device_id || b.filtered.is_none());
                if new {
                    self.filtered_total += 1;
                    info!(
                        port = %k.device.descriptors.port_path,
                        ids = %k.device.ids(),
                        address = %k.device.descriptors.address,
                        %reason,
                        filtered_total = self.filtered_total,
                        "not a passthrough candidate"
                    );
                }
            }
        }
    }

    fn start(&mut self, snapshot: Vec<crate::observation::UsbDevice>) -> Result<u64, StoreError> {
        let before = self.state.clone();
        let previous_boot = before.boot_id.clone();
        let ctx = self.ctx();
        let mut state = self.state.clone();
        let mut events = resolver::reconcile(
            &mut state,
            ctx,
            &self.config.filter,
            snapshot,
            Reconcile::Start,
            &mut V7Ids,
        );
        self.state = state;
        info!(
            previous_boot = previous_boot.as_deref().unwrap_or("none"),
            boot = %self.config.boot_id,
            events = events.len(),
            "reconciled with the devices present at start"
        );
        events.push(Event::HostAgentStarted(HostAgentStarted {
            host: self.config.host.clone(),
            boot_id: self.config.boot_id.clone(),
            agent_version: AGENT_VERSION.to_owned(),
            hypervisor_uri: self.config.hypervisor_uri.clone(),
        }));
        self.commit(&before, events)
    }

    fn observed(&mut self, observations: Vec<Observation>) -> Result<(), StoreError> {
        let before = self.state.clone();
        let mut state = self.state.clone();
        let mut events = Vec::new();
        let mut causes = Vec::new();
        for o in observations {
            causes.push(describe(&o));
            let ctx = self.ctx();
            events.extend(resolver::observe(
                &mut state,
                ctx,
                &self.config.filter,
                o,
                &mut V7Ids,
            ));
        }
        self.state = state;
        let count = events.len();
        let outbox = self.commit(&before, events)?;
        if count > 0 {
            const SHOWN: usize = 8;
            let mut cause = causes
                .iter()
                .take(SHOWN)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            if causes.len() > SHOWN {
                cause.push_str(&format!(" (+{} more)", causes.len() - SHOWN));
            }
            (self.config.progress)(&Progress::Queued {
                events: count,
                outbox,
                cause,
            });
        }
        Ok(())
    }

    fn rescan(
        &mut self,
        reason: String,
        snapshot: Vec<crate::observation::UsbDevice>,
    ) -> Result<(), StoreError> {
        let before = self.state.clone();
        let mut state = self.state.clone();
        let ctx = self.ctx();
        let events = resolver::reconcile(
            &mut state,
            ctx,
            &self.config.filter,
            snapshot,
            Reconcile::Rescan,
            &mut V7Ids,
        );
        self.state = state;
        let count = events.len();
        warn!(%reason, events = count, "rescanned after possible event loss");
        let outbox = self.commit(&before, events)?;
        (self.config.progress)(&Progress::Rescanned {
            reason,
            events: count,
            outbox,
        });
        Ok(())
    }
}

fn describe(o: &Observation) -> String {
    match o {
        Observation::Present { action, device } => {
            format!("{} {}", action.as_str(), device.descriptors.port_path)
        }
        Observation::Removed { syspath, .. } => {
            let name = syspath.rsplit('/').next().unwrap_or(syspath);
            format!("remove {name}")
        }
    }
}

fn log_event(e: &Event) {
    if let Some((d, fingerprint)) = e.discovery() {
        info!(
            device_id = %d.device_id,
            lineage_id = %d.lineage_id,
            lineage = ?d.lineage_kind,
            port = %d.descriptors.port_path,
            address = %d.descriptors.address,
            ids = %format!("{}:{}", d.descriptors.vendor_id, d.descriptors.product_id),
            manufacturer = %Escaped(d.descriptors.manufacturer.as_deref().unwrap_or("-")),
            product = %Escaped(d.descriptors.product.as_deref().unwrap_or("-")),
            serial = %Escaped(d.descriptors.serial.as_deref().unwrap_or("-")),
            fingerprint = %fingerprint.map(|f| f.to_string()).unwrap_or_else(|| "-".into()),
            supersedes = ?d.supersedes.map(|s| s.to_string()),
            "device discovered"
        );
        return;
    }
    match e {
        Event::DeviceInvalidated(d) => info!(
            device_id = %d.device_id,
            reason = ?d.reason,
            superseded_by = ?d.superseded_by.map(|s| s.to_string()),
            "device invalidated"
        ),
        Event::DeviceClashDetected(c) => warn!(
            ids = %format!("{}:{}", c.vendor_id, c.product_id),
            serial = %Escaped(&c.serial),
            ports = ?c.port_paths.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "devices share a serial: they get port lineages"
        ),
        other => info!(kind = other.kind(), "event"),
    }
}

/// Runs the agent until `shutdown` completes (or a fatal error). The source must already be
/// listening, so that nothing between the enumeration and the first `next()` is missed.
pub async fn run<S: DeviceSource>(
    config: AgentConfig,
    source: S,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    run_with_executor::<S, dyn Hands>(config, source, None, shutdown).await
}

/// [`run`], also carrying out the control plane's work for this host through `executor`
/// (define and start domains, re-attach re-enumerated devices, power actions, teardown): the
/// executor in this process (`usbpt_libvirt::Executor`) or in a child process
/// ([`crate::libvirt::ChildExecutor`], the host agent's: ADR 0016).
pub async fn run_with_executor<S: DeviceSource, H: Hands + ?Sized>(
    config: AgentConfig,
    mut source: S,
    executor: Option<Arc<H>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    let span = info_span!("agent", host = %config.host);
    async move {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| AgentError::DataDir {
            path: config.data_dir.display().to_string(),
            source,
        })?;
        let path = config.data_dir.join(store::file_name(&config.host));
        let (store, state) = Store::open(&path)?;
        info!(state = %path.display(), known = state.devices.len(), "opened agent state");
        let (devices_tx, devices_rx) = watch::channel(Devices::default());
        let (reenum_tx, reenum_rx) = mpsc::unbounded_channel();
        let mut agent = Agent {
            store: Arc::new(store),
            state,
            wake: Arc::new(Notify::new()),
            filtered_total: 0,
            devices: HashMap::new(),
            devices_tx,
            reenumerated: executor.is_some().then_some(reenum_tx),
            flap: Detector::new(config.flap),
            config,
        };
        // Episodes open when the agent stopped go on; each ends after a quiet period from now.
        let now = Instant::now();
        for lineage in &agent.state.flapping {
            agent.flap.resume(*lineage, now);
        }
        if !agent.state.flapping.is_empty() {
            info!(
                lineages = agent.state.flapping.len(),
                "flapping episodes resumed"
            );
        }
        // A known boot id that differs from this one: the host rebooted while the agent was
        // away (an unknown one, on a first start or a lost state, proves nothing).
        let rebooted = agent
            .state
            .boot_id
            .as_deref()
            .is_some_and(|b| b != agent.config.boot_id);
        // Beating starts first so that its connection (its own) is under way before the first
        // device is published: a host is `up` about when its devices appear (ADR 0008).
        let beating =
            crate::heartbeat::start(agent.config.host.clone(), agent.config.bus.clone());
        let snapshot = source.snapshot()?;
        let outbox = agent.start(snapshot)?;
        // Devices that kept their ids across the restart produced no event: seed them.
        let present: Vec<(DeviceId, DeviceInfo)> = agent
            .state
            .candidates()
            .map(|k| {
                (
                    k.device_id,
                    DeviceInfo {
                        vendor: k.device.descriptors.vendor_id,
                        product: k.device.descriptors.product_id,
                        address: k.device.descriptors.address,
                        present: true,
                        fingerprint: k.device.fingerprint,
                    },
                )
            })
            .collect();
        agent.devices.extend(present);
        agent
            .devices_tx
            .send_replace(Arc::new(agent.devices.clone()));
        let mut controlling = executor.map(|executor| {
            let control = Control {
                executor,
                store: agent.store.clone(),
                wake: agent.wake.clone(),
                target: agent.config.bus.clone(),
                devices: devices_rx,
                reenumerated: reenum_rx,
                resume_after_boot: rebooted,
                progress: agent.config.progress.clone(),
            };
            tokio::spawn(control.run().in_current_span())
        });
        (agent.config.progress)(&Progress::Ready {
            host: agent.config.host.to_string(),
            boot_id: agent.config.boot_id.clone(),
            candidates: agent.state.candidates().count(),
            filtered: agent.state.filtered_count(),
            outbox,
        });
        info!(
            candidates = agent.state.candidates().count(),
            filtered = agent.state.filtered_count(),
            outbox,
            "watching for hotplug"
        );

        let (stop_tx, stop_rx) = watch::channel(None);
        let publisher = Publisher {
            store: agent.store.clone(),
            target: agent.config.bus.clone(),
            wake: agent.wake.clone(),
            progress: agent.config.progress.clone(),
        };
        let mut publishing = tokio::spawn(publisher.run(stop_rx).in_current_span());

        tokio::pin!(shutdown);
        let result: Result<(), AgentError> = loop {
            let quiet_at = agent.flap.next_deadline();
            tokio::select! {
                _ = &mut shutdown => break Ok(()),
                _ = async { match quiet_at { Some(at) => tokio::time::sleep_until(at).await, None => std::future::pending().await } } => {
                    if let Err(e) = agent.flap_quiet() {
                        break Err(e.into());
                    }
                }
                Some(done) = async { match controlling.as_mut() { Some(c) => Some(c.await), None => std::future::pending().await } } => {
                    controlling = None;
                    break Err(match done {
                        Ok(Ok(())) => AgentError::Publisher("the control task stopped unexpectedly".into()),
                        Ok(Err(e)) => AgentError::Store(e),
                        Err(e) => AgentError::Publisher(e.to_string()),
                    });
                }
                done = &mut publishing => {
                    break Err(match done {
                        Ok(Ok(_)) => AgentError::Publisher("stopped unexpectedly".into()),
                        Ok(Err(e)) => AgentError::Store(e),
                        Err(e) => AgentError::Publisher(e.to_string()),
                    });
                }
                next = source.next() => {
                    let step = match next {
                        Ok(SourceEvent::Observed(obs)) => agent.observed(obs).map_err(AgentError::from),
                        Ok(SourceEvent::Lost(reason)) => match source.snapshot() {
                            Ok(snapshot) => agent.rescan(reason, snapshot).map_err(AgentError::from),
                            Err(e) => Err(e.into()),
                        },
                        Err(e) => Err(e.into()),
                    };
                    if let Err(e) = step {
                        break Err(e);
                    }
                }
            }
        };

        // Down from here on, for os-services and os-hypervisors.
        beating.stop().await;
        if let Some(c) = controlling {
            // Wait until it is gone: it shares the state file, which a restart reopens.
            c.abort();
            let _ = c.await;
        }
        let _ = stop_tx.send(Some(Instant::now() + agent.config.drain_on_stop));
        if !publishing.is_finished() {
            match publishing.await {
                Ok(Ok(n)) => info!(published = n, "publisher stopped"),
                Ok(Err(e)) => error!(error = %e, "publisher failed"),
                Err(e) => error!(error = %e, "publisher task failed"),
            }
        }
        let outbox = agent.store.outbox_len().unwrap_or(0);
        info!(outbox, "agent stopped");
        (agent.config.progress)(&Progress::Stopped { outbox });
        result
    }
    .instrument(span)
    .await
}
