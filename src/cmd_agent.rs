//! `usbpt agent --host NAME [--hypervisor URI] [--filter FILE] [--boot-id-file PATH]
//! [--flap-threshold N --flap-window SECS --flap-quiet SECS]`: the
//! udev-driven host agent. Progress goes to stdout as JSON lines, logs to stderr.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use usbpt_agent::{progress, read_boot_id, AgentConfig, BusTarget, Filter, UdevSource};
use usbpt_schemas::HostName;

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
}

impl AgentArgs {
    pub fn flap(&self) -> usbpt_agent::FlapSettings {
        usbpt_agent::FlapSettings {
            threshold: self.flap_threshold,
            window: Duration::from_secs(self.flap_window),
            quiet: Duration::from_secs(self.flap_quiet),
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

/// Called first thing in `main`, for `usbpt agent` only. A host agent is small and long-lived:
/// transparent huge pages round the allocator's few live megabytes up to whole 2 MiB pages
/// (11 MiB of an idle agent's resident memory, `docs/performance.md`); the fold, the command
/// handler and the bench keep them. mimalloc reads `MIMALLOC_ALLOW_THP` when the process loads,
/// before `main`, so the agent sets it and executes itself again, once (same pid, same
/// arguments). An operator's own setting of the variable is left as it is.
pub fn lean_process() {
    const KNOB: &str = "MIMALLOC_ALLOW_THP";
    if std::env::var_os(KNOB).is_some() {
        return;
    }
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| "usbpt".into());
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(argv0)
        .args(args)
        .env(KNOB, "0")
        .exec();
    // exec failed (no /proc): run as we are.
    tracing::debug!(error = %err, "could not re-execute without transparent huge pages");
}

pub async fn run(global: &Global, args: AgentArgs) -> Result<()> {
    let data_dir = global.agent_data_dir()?;
    let boot_id = read_boot_id(&args.boot_id_file)?;
    let filter = match &args.filter {
        Some(path) => Filter::load(path)?,
        None => Filter::default(),
    };
    let flap = args.flap();
    let config = AgentConfig {
        host: args.host,
        boot_id,
        hypervisor_uri: args.hypervisor,
        data_dir,
        filter,
        bus: BusTarget {
            url: global.nats.clone(),
            creds: global.creds.clone(),
            settings: global.stream_settings(),
            require_auth: !global.insecure,
            tls: global.security().tls,
            control_key: control_key(args.control_key.as_deref())?,
        },
        progress: with_readiness(progress::stdout()),
        drain_on_stop: Duration::from_secs(2),
        flap,
    };
    tracing::info!(?config, "starting the host agent");
    let source = UdevSource::open()?;
    let executor = connect_hypervisor(&config.host, &config.hypervisor_uri).await;
    usbpt_agent::run_with_executor(config, source, executor, shutdown_signal()).await?;
    Ok(())
}

/// `sink`, and systemd told when the agent is ready (its start-up picture is in the outbox and
/// udev is watched) and when it stops.
fn with_readiness(sink: progress::ProgressSink) -> progress::ProgressSink {
    std::sync::Arc::new(move |p: &progress::Progress| {
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
