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
use usbpt_agent::{progress, read_boot_id, AgentConfig, BusTarget, Filter, UdevSource};
use usbpt_bus::auth::{CredsDir, Role};
use usbpt_bus::server::{NatsServer, ServerConfig};
use usbpt_bus::StreamSettings;
use usbpt_libvirt::{test_driver_uri, Executor, ExecutorConfig};
use usbpt_schemas::HostName;

use crate::cmd_serve::{control_plane, CommandArgs, ProjectorArgs, Tasks};
use crate::global::Global;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// This host's name (default: the system host name, made a valid subject token).
    #[arg(long)]
    pub host: Option<HostName>,
    /// libvirt URI (default: qemu:///system when it answers, else libvirt's test driver).
    #[arg(long)]
    pub hypervisor: Option<String>,
    /// Where the HTTP API and dashboard listen (a free port is taken if this one is busy).
    #[arg(long, default_value = crate::defaults::API_LISTEN)]
    pub listen: SocketAddr,
    /// Run the private nats-server with its default periodic fsync instead of fsync per write.
    #[arg(long)]
    pub fast_fsync: bool,
    /// Passthrough filter file for this host's agent (see `usbpt agent --help`).
    #[arg(long)]
    pub filter: Option<PathBuf>,
    #[arg(long, default_value = crate::defaults::BOOT_ID_FILE)]
    pub boot_id_file: PathBuf,
    #[command(flatten)]
    pub stream: StreamLimits,
    #[command(flatten)]
    pub http: crate::api_auth::ApiSecurityArgs,
}

/// The stream's limits, applied when `up` creates it.
#[derive(Debug, Args)]
pub struct StreamLimits {
    /// The stream's size limit in bytes; when full, new events are refused (never is history
    /// dropped for space). Default: no limit.
    #[arg(long, env = "USBPT_STREAM_MAX_BYTES", value_parser = clap::value_parser!(i64).range(1..))]
    pub stream_max_bytes: Option<i64>,
    /// How many seconds events are kept. Default: forever (the history is the audit trail).
    #[arg(long, env = "USBPT_STREAM_MAX_AGE", value_parser = clap::value_parser!(u64).range(1..))]
    pub stream_max_age: Option<u64>,
}

impl StreamLimits {
    pub fn settings(&self) -> StreamSettings {
        StreamSettings {
            max_bytes: self.stream_max_bytes.unwrap_or(-1),
            max_age: Duration::from_secs(self.stream_max_age.unwrap_or(0)),
            ..StreamSettings::default()
        }
    }
}

/// The identities of a private bus (ADR 0005), under `<data-dir>/creds`.
#[derive(Debug, Clone)]
pub struct PrivateCreds {
    pub dir: CredsDir,
    /// The command handler's public key, which agents check control work against.
    pub control_key: String,
}

impl PrivateCreds {
    /// Generates what is missing: admin, projector, command handler, auditor, and an agent for
    /// each of `hosts`; writes the server's authorization block.
    pub fn ensure(data: &std::path::Path, hosts: &[HostName]) -> Result<Self> {
        let dir = CredsDir::open(data.join("creds"))?;
        for role in [Role::Admin, Role::Projector, Role::Commands, Role::Auditor] {
            dir.ensure(&role)?;
        }
        for h in hosts {
            dir.ensure(&Role::Agent(h.clone()))?;
        }
        dir.write_auth_conf()?;
        let control_key = usbpt_bus::auth::read_seed(&dir.path(&Role::Commands))?.public_key();
        Ok(Self { dir, control_key })
    }

    /// The identities a secured demo or `up` generated under `data`, if any (nothing is
    /// written).
    pub fn open(data: &std::path::Path) -> Result<Option<Self>> {
        let path = data
            .join("creds")
            .join(format!("{}.nk", Role::Commands.name()));
        if !path.is_file() {
            return Ok(None);
        }
        let control_key = usbpt_bus::auth::read_seed(&path)?.public_key();
        Ok(Some(Self {
            dir: CredsDir::open(data.join("creds"))?,
            control_key,
        }))
    }

    /// The server's config with these identities enforced.
    pub fn server_config(&self, nats_dir: PathBuf) -> ServerConfig {
        let mut config = ServerConfig::new(nats_dir);
        config.auth = Some(self.dir.auth_conf());
        config
    }

    /// The control plane's view of `global`: the projector's identity for reads, the command
    /// handler's for appends.
    pub fn control_global(&self, global: &Global, url: &str, data: PathBuf) -> Global {
        Global {
            nats: url.to_owned(),
            creds: Some(self.dir.path(&Role::Projector)),
            command_creds: Some(self.dir.path(&Role::Commands)),
            insecure: false,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            data_dir: Some(data),
            stream_replicas: global.stream_replicas,
            api_token_file: global.api_token_file.clone(),
            api: global.api.clone(),
            verbose: global.verbose,
        }
    }

    /// Creates (or checks) the stream as admin, with `settings`.
    pub async fn create_stream(&self, url: &str, settings: &StreamSettings) -> Result<()> {
        usbpt_bus::Bus::connect(url, Some(&self.dir.path(&Role::Admin)), settings)
            .await
            .context("creating the stream as admin")?;
        Ok(())
    }

    /// An agent's bus target for `host`, signed work required.
    pub fn agent_target(&self, url: &str, host: &HostName) -> BusTarget {
        BusTarget {
            url: url.to_owned(),
            creds: Some(self.dir.path(&Role::Agent(host.clone()))),
            settings: StreamSettings::default(),
            require_auth: true,
            tls: usbpt_bus::TlsClient::default(),
            control_key: Some(self.control_key.clone()),
        }
    }
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

/// NATS's own port when free, else any free loopback port.
fn nats_port() -> Option<u16> {
    use crate::defaults::NATS_PORT;
    std::net::TcpListener::bind(("127.0.0.1", NATS_PORT))
        .ok()
        .map(|_| NATS_PORT)
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
    if let Ok(e) = Executor::connect(ExecutorConfig::new(
        host.clone(),
        crate::defaults::HYPERVISOR_URI,
    ))
    .await
    {
        println!("usbpt up: hypervisor {}", crate::defaults::HYPERVISOR_URI);
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
    let data = global.data_dir_or_default()?;
    usbpt_bus::auth::private_dir(&data).with_context(|| format!("creating {}", data.display()))?;
    let host = match &args.host {
        Some(h) => h.clone(),
        None => system_host()?,
    };
    let settings = args.stream.settings();
    let (url, mut server, creds) = if crate::global::nats_given() {
        (global.nats.clone(), None, None)
    } else {
        let creds = PrivateCreds::ensure(&data, std::slice::from_ref(&host))?;
        let mut config = creds.server_config(data.join("nats"));
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
        creds.create_stream(&s.url(), &settings).await?;
        println!(
            "usbpt up: NATS identities (nkeys, one per role) in {}; the CLI uses admin.nk from there",
            creds.dir.dir().display()
        );
        (s.url(), Some(s), Some(creds))
    };
    let control = match &creds {
        Some(c) => c.control_global(global, &url, data.clone()),
        None => global.on_bus(&url, data.clone()),
    };
    let (token, token_file) = if args.http.insecure_no_api_token {
        (None, None)
    } else {
        let (t, f) = crate::api_auth::ensure_token(global, &data)?;
        (Some(t), f)
    };
    let policy = args.http.policy(args.listen, token.clone())?;
    let mut tasks = Tasks::new();
    let listener = crate::cmd_serve::bind_or_free("up", args.listen).await?;
    let base = format!("http://{}/", listener.local_addr()?);
    println!("usbpt up: API and dashboard {base}");
    if let Some(t) = &token {
        crate::api_auth::announce("usbpt up: ", &base, t, token_file.as_deref());
    }
    control_plane(
        &control,
        &mut tasks,
        listener,
        policy,
        &ProjectorArgs::default(),
        &CommandArgs::default(),
    )
    .await?;

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
            bus: match &creds {
                Some(c) => c.agent_target(&url, &host),
                None => BusTarget {
                    url: url.clone(),
                    creds: global.creds.clone(),
                    settings: StreamSettings::default(),
                    require_auth: !global.insecure,
                    tls: global.security().tls,
                    control_key: None,
                },
            },
            progress: progress::silent(),
            drain_on_stop: Duration::from_secs(2),
            flap: usbpt_agent::FlapSettings::default(),
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
