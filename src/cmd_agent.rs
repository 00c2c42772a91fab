//! `usbpt agent --host NAME [--hypervisor URI] [--filter FILE] [--boot-id-file PATH]
//! [--flap-threshold N --flap-window SECS --flap-quiet SECS] [--executor-idle SECS]`: the
//! udev-driven host agent. Progress goes to stdout as JSON lines, logs to stderr.
//!
//! `usbpt agent` resolves its settings (flags, environment, config file) and executes
//! `usbpt-agent`, the small binary installed beside it, with them (ADR 0016): same process,
//! without the other roles' code and without libvirt. libvirt work runs in `usbpt
//! agent-executor`, a child the agent starts when it has work and stops when idle. Without
//! `usbpt-agent` beside it, `usbpt agent` runs the same agent itself.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use usbpt_agent::{read_boot_id, Filter};
use usbpt_schemas::HostName;

use crate::agent_process::{AgentSpec, SPEC_ENV};
use crate::global::Global;

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// This hypervisor host's name (a subject token: letters, digits, '_' and '-').
    #[arg(long)]
    pub host: HostName,
    /// The libvirt URI the agent drives, as reported in HostAgentStarted.
    #[arg(long, default_value = crate::defaults::HYPERVISOR_URI)]
    pub hypervisor: String,
    /// Passthrough filter: TOML rules, or a usb_passthrough_blacklist list as a .json
    /// file. Without it: root hubs, hubs and HID boot keyboards/mice are not candidates.
    #[arg(long)]
    pub filter: Option<PathBuf>,
    /// Where the kernel's boot id is read; a change means the host rebooted.
    #[arg(long, default_value = crate::defaults::BOOT_ID_FILE)]
    pub boot_id_file: PathBuf,
    /// The command handler's nkey public key (`U…`), or a file holding it: control work must
    /// then carry its signature. `usbpt creds list` prints it.
    #[arg(long, env = "USBPT_CONTROL_KEY")]
    pub control_key: Option<String>,
    /// A lineage enumerated more than this many times within --flap-window is flapping: its
    /// automatic re-attach pauses and it is not scheduled until --flap-quiet passes without an
    /// enumeration. 0 disables the detection.
    #[arg(long, default_value_t = crate::defaults::FLAP.threshold)]
    pub flap_threshold: u32,
    /// The flapping detector's window, in seconds.
    #[arg(long, default_value_t = crate::defaults::FLAP.window.as_secs(), value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub flap_window: u64,
    /// Seconds without an enumeration that end a flapping episode.
    #[arg(long, default_value_t = crate::defaults::FLAP.quiet.as_secs(), value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub flap_quiet: u64,
    /// Seconds without libvirt work after which the agent stops its libvirt executor process
    /// (started again for the next work).
    #[arg(long, default_value_t = crate::defaults::EXECUTOR_IDLE.as_secs(), value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub executor_idle: u64,
}

/// `usbpt agent-executor --host NAME --hypervisor URI` (hidden; ADR 0016).
#[derive(Debug, Args)]
pub struct ExecutorArgs {
    #[arg(long)]
    pub host: HostName,
    #[arg(long)]
    pub hypervisor: String,
}

/// How the agent logs: its filter when `USBPT_LOG` is not set, JSON lines or text.
#[derive(Debug, Clone)]
pub struct Log {
    pub filter: String,
    pub json: bool,
}

impl Log {
    pub fn of(
        global: &Global,
        setup: &crate::config::Setup,
        loaded: &crate::config::Loaded,
    ) -> Self {
        Self {
            filter: crate::log_filter(global.verbose, loaded.file.log.filter.as_deref()).to_owned(),
            json: matches!(setup.log_format, crate::config::LogFormat::Json),
        }
    }
}

/// The command handler's public key from `--control-key` (the key itself or a file with it).
pub fn control_key(arg: Option<&str>) -> Result<Option<String>> {
    let Some(arg) = arg else { return Ok(None) };
    let key = if arg.starts_with('U') && !std::path::Path::new(arg).exists() {
        arg.to_owned()
    } else {
        std::fs::read_to_string(arg)
            .with_context(|| format!("reading the control key {arg}"))?
            .trim()
            .to_owned()
    };
    anyhow::ensure!(
        key.starts_with('U') && key.len() == 56,
        "--control-key: not an nkey user public key"
    );
    Ok(Some(key))
}

/// The agent's resolved settings; the same checks as ever (boot id, filter, control key).
fn spec(global: &Global, args: &AgentArgs, log: &Log) -> Result<AgentSpec> {
    let data_dir = global.agent_data_dir()?;
    let boot_id = read_boot_id(&args.boot_id_file)?;
    if let Some(path) = &args.filter {
        Filter::load(path)?;
    }
    let security = global.security();
    Ok(AgentSpec {
        host: args.host.clone(),
        hypervisor: args.hypervisor.clone(),
        boot_id,
        data_dir,
        filter: args.filter.clone(),
        nats: global.nats.clone(),
        creds: global.creds.clone(),
        stream_replicas: global.stream_settings().replicas,
        require_auth: !global.insecure,
        tls_ca: security.tls.ca,
        tls_cert: security.tls.cert,
        tls_key: security.tls.key,
        control_key: control_key(args.control_key.as_deref())?,
        flap_threshold: args.flap_threshold,
        flap_window_s: args.flap_window,
        flap_quiet_s: args.flap_quiet,
        executor_program: std::env::current_exe().context("the usbpt binary's path")?,
        executor_idle_ms: args.executor_idle.saturating_mul(1000),
        log_filter: log.filter.clone(),
        log_json: log.json,
    })
}

/// The small agent binary beside this one.
pub const AGENT_BINARY: &str = "usbpt-agent";

/// Called first thing in `main` for `usbpt agent`: executes `usbpt-agent` (beside this binary)
/// with the resolved settings, in this process (same pid, for systemd). Returns when there is
/// no such binary, when the settings are wrong (the in-process path then reports it as
/// ever), or when the exec fails.
pub fn exec_agent_binary(global: &Global, args: &AgentArgs, log: &Log) {
    use std::os::unix::process::CommandExt;
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let small = exe.with_file_name(AGENT_BINARY);
    if !small.is_file() {
        return;
    }
    let Ok(spec) = spec(global, args, log) else {
        return;
    };
    let Ok(json) = serde_json::to_string(&spec) else {
        return;
    };
    let mut cmd = std::process::Command::new(&small);
    cmd.arg0(AGENT_BINARY).env(SPEC_ENV, json);
    let err = cmd.exec();
    eprintln!(
        "usbpt: could not execute {} ({err}); running the agent in this process",
        small.display()
    );
}

pub async fn run(global: &Global, args: AgentArgs, log: &Log) -> Result<()> {
    let spec = spec(global, &args, log)?;
    crate::agent_process::run(spec).await
}

/// `usbpt agent-executor`: the agent's libvirt executor on stdin/stdout.
pub async fn executor(args: ExecutorArgs) -> Result<()> {
    let config = usbpt_libvirt::ExecutorConfig::new(args.host, args.hypervisor);
    usbpt_libvirt::serve::serve(config, tokio::io::stdin(), tokio::io::stdout())
        .await
        .context("agent-executor")
}

/// Connects the libvirt executor. Without a hypervisor the agent still publishes its devices
/// (they can be seen and claimed) but cannot start servers; it says so once.
pub async fn connect_hypervisor(
    host: &HostName,
    uri: &str,
) -> Option<std::sync::Arc<usbpt_libvirt::Executor>> {
    use usbpt_libvirt::{Executor, ExecutorConfig};
    match Executor::connect(ExecutorConfig::new(host.clone(), uri)).await {
        Ok(e) => {
            tracing::info!(
                uri,
                "hypervisor connected: this agent carries out server work"
            );
            Some(std::sync::Arc::new(e))
        }
        Err(e) => {
            tracing::warn!(uri, error = %e, "no hypervisor: devices are published, but servers cannot be started on this host");
            None
        }
    }
}
