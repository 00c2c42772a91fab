//! The host agent process from its resolved settings ([`AgentSpec`]), shared by `usbpt agent`
//! and the small `usbpt-agent` binary it executes (ADR 0016): the agent loop, with libvirt in a
//! child process (`usbpt agent-executor`, started when there is work, stopped when idle), systemd
//! readiness, and SIGTERM/SIGINT. Nothing here links libvirt.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use usbpt_agent::libvirt::{ChildExecutor, ExecutorCommand, Hands};
use usbpt_agent::{progress, AgentConfig, BusTarget, Filter, FlapSettings, UdevSource};
use usbpt_schemas::HostName;

/// The environment variable `usbpt agent` hands the resolved settings to `usbpt-agent` in
/// (JSON; the environment, not the arguments: `ps` shows arguments, and the NATS URL may carry a
/// password).
pub const SPEC_ENV: &str = "USBPT_AGENT_SPEC";

/// Everything the agent process needs, resolved by `usbpt agent` from its flags, environment
/// and config file (ADR 0009).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentSpec {
    pub host: HostName,
    pub hypervisor: String,
    pub boot_id: String,
    pub data_dir: PathBuf,
    pub filter: Option<PathBuf>,
    pub nats: String,
    pub creds: Option<PathBuf>,
    pub stream_replicas: usize,
    pub require_auth: bool,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub control_key: Option<String>,
    pub flap_threshold: u32,
    pub flap_window_s: u64,
    pub flap_quiet_s: u64,
    /// The `usbpt` binary, run as `usbpt agent-executor` for libvirt work.
    pub executor_program: PathBuf,
    /// Milliseconds without libvirt work after which the executor process is stopped.
    pub executor_idle_ms: u64,
    /// The log filter when `USBPT_LOG` is not set, and JSON lines or text.
    pub log_filter: String,
    pub log_json: bool,
}

impl AgentSpec {
    fn executor_command(&self) -> ExecutorCommand {
        let mut command =
            ExecutorCommand::usbpt(&self.executor_program, &self.host, &self.hypervisor);
        // The executor needs nothing from the config file: it gets its host and URI here.
        command.args.extend(["--config".into(), "/dev/null".into()]);
        if self.log_json {
            command.args.extend(["--log-format".into(), "json".into()]);
        }
        if std::env::var_os("USBPT_LOG").is_none() {
            command
                .envs
                .push(("USBPT_LOG".into(), self.log_filter.clone().into()));
        }
        command
    }
}

/// Runs the host agent until SIGTERM or SIGINT.
pub async fn run(spec: AgentSpec) -> Result<()> {
    let filter = match &spec.filter {
        Some(path) => Filter::load(path)?,
        None => Filter::default(),
    };
    let config = AgentConfig {
        host: spec.host.clone(),
        boot_id: spec.boot_id.clone(),
        hypervisor_uri: spec.hypervisor.clone(),
        data_dir: spec.data_dir.clone(),
        filter,
        bus: BusTarget {
            url: spec.nats.clone(),
            creds: spec.creds.clone(),
            settings: usbpt_bus::StreamSettings {
                replicas: spec.stream_replicas,
                ..usbpt_bus::StreamSettings::default()
            },
            require_auth: spec.require_auth,
            tls: usbpt_bus::TlsClient {
                ca: spec.tls_ca.clone(),
                cert: spec.tls_cert.clone(),
                key: spec.tls_key.clone(),
            },
            control_key: spec.control_key.clone(),
        },
        progress: with_readiness(progress::stdout()),
        drain_on_stop: Duration::from_secs(2),
        flap: FlapSettings {
            threshold: spec.flap_threshold,
            window: Duration::from_secs(spec.flap_window_s),
            quiet: Duration::from_secs(spec.flap_quiet_s),
        },
    };
    tracing::info!(?config, "starting the host agent");
    let source = UdevSource::open()?;
    let executor = start_executor(&spec).await;
    let hands = executor.clone().map(|e| e as Arc<dyn Hands>);
    let result = usbpt_agent::run_with_executor(config, source, hands, shutdown_signal()).await;
    if let Some(e) = executor {
        e.stop().await;
    }
    result.context("host agent")
}

/// The executor process, checked once at start: it connects to the hypervisor (so a bad URI
/// is said now, as before) and then stops when idle. Without a hypervisor the agent still
/// publishes its devices (they can be seen and claimed) but cannot start servers; it says so
/// once.
async fn start_executor(spec: &AgentSpec) -> Option<Arc<ChildExecutor>> {
    let child = ChildExecutor::new(
        spec.host.clone(),
        spec.executor_command(),
        Duration::from_millis(spec.executor_idle_ms),
    );
    let uri = spec.hypervisor.as_str();
    match child.start().await {
        Ok(domain_type) => {
            tracing::info!(
                uri,
                domain_type,
                "hypervisor connected: this agent carries out server work (libvirt in a child process, stopped when idle)"
            );
            Some(Arc::new(child))
        }
        Err(e) => {
            tracing::warn!(uri, error = %e, "no hypervisor: devices are published, but servers cannot be started on this host");
            None
        }
    }
}

/// `sink`, and systemd told when the agent is ready (its start-up picture is in the outbox and
/// udev is watched) and when it stops.
fn with_readiness(sink: progress::ProgressSink) -> progress::ProgressSink {
    Arc::new(move |p: &progress::Progress| {
        sink(p);
        match p {
            progress::Progress::Ready {
                host, candidates, ..
            } => crate::systemd::ready(&format!(
                "host {host}: watching udev, {candidates} passthrough candidates"
            )),
            progress::Progress::Stopped { .. } => crate::systemd::stopping(),
            _ => {}
        }
    })
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still dies on the default action.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
}
