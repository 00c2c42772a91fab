//! `usbpt up`: everything on one machine. Unless `--nats` is given it starts a private
//! nats-server (JetStream, store under the data dir, 127.0.0.1, port 4222 or a free one,
//! `sync_interval: always` unless `--fast-fsync`), then the projector, the command handler and the
//! HTTP API, and an agent for this host. Ctrl-C or SIGTERM stops everything; a second `up` on the
//! same data dir resumes with the same history.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use usbpt_agent::libvirt::{test_driver_uri, Executor, ExecutorConfig};
use usbpt_agent::{progress, read_boot_id, AgentConfig, BusTarget, Filter, UdevSource};
use usbpt_bus::server::{NatsServer, ServerConfig};
use usbpt_bus::StreamSettings;
use usbpt_schemas::HostName;

use crate::cli::Global;
use crate::cmd_serve::{control_plane, CommandArgs, ProjectorArgs, Tasks, WeighArg};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// This host's name (default: the system host name, made a valid subject token).
    #[arg(long)]
    pub host: Option<HostName>,
    /// libvirt URI (default: qemu:///system when it answers, else libvirt's test driver).
    #[arg(long)]
    pub hypervisor: Option<String>,
    /// Where the HTTP API and dashboard listen (a free port is taken if this one is busy).
    #[arg(long, default_value = "127.0.0.1:8774")]
    pub listen: SocketAddr,
    /// Run the private nats-server with its default periodic fsync instead of fsync per write.
    #[arg(long)]
    pub fast_fsync: bool,
    /// Passthrough filter file for this host's agent (see `usbpt agent --help`).
    #[arg(long)]
    pub filter: Option<PathBuf>,
    #[arg(long, default_value = "/proc/sys/kernel/random/boot_id")]
    pub boot_id_file: PathBuf,
}

/// The system host name as a subject token (`[A-Za-z0-9_-]`, at most 64).
fn system_host() -> Result<HostName> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_else(|_| "localhost".into());
    let token: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    Ok(HostName::new(if token.is_empty() {
        "localhost".into()
    } else {
        token
    })?)
}

/// Port 4222 when free, else any free loopback port.
fn nats_port() -> Option<u16> {
    std::net::TcpListener::bind("127.0.0.1:4222")
        .ok()
        .map(|_| 4222)
}

/// The executor for this host, and one line saying which hypervisor it drives.
async fn hypervisor(
    host: &HostName,
    args: &UpArgs,
    data: &std::path::Path,
) -> Option<Arc<Executor>> {
    if let Some(uri) = &args.hypervisor {
        let e = crate::cmd_agent::connect_hypervisor(host, uri).await;
        println!(
            "usbpt up: hypervisor {uri}{}",
            if e.is_some() {
                ""
            } else {
                " (unreachable: servers cannot start here)"
            }
        );
        return e;
    }
    if let Ok(e) = Executor::connect(ExecutorConfig::new(host.clone(), "qemu:///system")).await {
        println!("usbpt up: hypervisor qemu:///system");
        return Some(Arc::new(e));
    }
    let node = data.join("libvirt-test-node.xml");
    let made = std::fs::write(
        &node,
        "<node><cpu><mhz>2400</mhz></cpu><memory>8388608</memory></node>\n",
    )
    .ok()
    .and_then(|()| test_driver_uri(&node).ok());
    match made {
        Some(uri) => {
            match Executor::connect(ExecutorConfig::new(host.clone(), uri.clone())).await {
                Ok(e) => {
                    println!("usbpt up: hypervisor libvirt's test driver ({uri}): qemu:///system does not answer here");
                    Some(Arc::new(e))
                }
                Err(err) => {
                    println!("usbpt up: no hypervisor ({err}): devices are tracked, servers cannot start here");
                    None
                }
            }
        }
        None => None,
    }
}

pub async fn run(global: &Global, args: UpArgs) -> Result<()> {
    let data = crate::cmd_serve::data_dir(global)?;
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let (url, mut server) = if crate::demo::nats_given() {
        (global.nats.clone(), None)
    } else {
        let mut config = ServerConfig::new(data.join("nats"));
        config.sync_always = !args.fast_fsync;
        config.port = nats_port();
        let s = NatsServer::start(config)
            .await
            .context("starting the private nats-server")?;
        println!(
            "usbpt up: private nats-server {} (JetStream store {}, sync_interval {})",
            s.url(),
            s.dir().join("jetstream").display(),
            if args.fast_fsync { "default" } else { "always" }
        );
        (s.url(), Some(s))
    };
    let control = Global {
        nats: url.clone(),
        creds: global.creds.clone(),
        data_dir: Some(data.clone()),
        api: global.api.clone(),
        verbose: global.verbose,
    };
    let mut tasks = Tasks::new();
    let listener = crate::demo::bind_or_free("up", args.listen).await?;
    println!(
        "usbpt up: API and dashboard http://{}/",
        listener.local_addr()?
    );
    control_plane(
        &control,
        &mut tasks,
        listener,
        &ProjectorArgs {
            consumer: "usbpt-projector".into(),
            batch: 1000,
        },
        &CommandArgs {
            weigh: WeighArg::Pack,
            grace: 120,
            concurrency: 32,
        },
    )
    .await?;

    let host = match &args.host {
        Some(h) => h.clone(),
        None => system_host()?,
    };
    if std::path::Path::new("/sys/bus/usb").exists() {
        let executor = hypervisor(&host, &args, &data).await;
        let config = AgentConfig {
            host: host.clone(),
            boot_id: read_boot_id(&args.boot_id_file)?,
            hypervisor_uri: executor
                .as_ref()
                .map_or_else(|| "none".to_owned(), |e| e.uri().to_owned()),
            data_dir: data.join("agent"),
            filter: match &args.filter {
                Some(p) => Filter::load(p)?,
                None => Filter::default(),
            },
            bus: BusTarget {
                url: url.clone(),
                creds: global.creds.clone(),
                settings: StreamSettings::default(),
            },
            progress: progress::silent(),
            drain_on_stop: Duration::from_secs(2),
        };
        let source = UdevSource::open()?;
        let stopping = tasks.stopping();
        println!("usbpt up: agent for host {host} watching udev");
        tasks.spawn("agent", async move {
            Ok(usbpt_agent::run_with_executor(config, source, executor, stopping).await?)
        });
    } else {
        println!("usbpt up: this machine has no /sys/bus/usb: no local agent; serving devices from other hosts' agents");
    }
    println!("usbpt up: ready (Ctrl-C to stop)");
    let result = tasks.run().await;
    if let Some(s) = server.as_mut() {
        s.stop().await?;
    }
    println!("usbpt up: stopped");
    result
}
