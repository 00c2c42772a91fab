//! Command-line interface (names and flags as in INTERFACES.md).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use usbpt_bus::{Bus, StreamSettings};
use usbpt_schemas::ServerAction;

#[derive(Debug, Parser)]
#[command(
    name = "usbpt",
    version,
    about = "Event-sourced USB passthrough manager for private clouds"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(flatten)]
    pub setup: crate::config::Setup,
    #[command(subcommand)]
    pub command: Cmd,
}

/// Options every subcommand takes (each also as an environment variable).
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// NATS server URL.
    #[arg(
        long,
        global = true,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats: String,
    /// NATS credentials: an nkey seed file (what `usbpt up` generates under
    /// `<data-dir>/creds/`) or a `.creds` file. Default: `<data-dir>/creds/admin.nk` when it
    /// exists (the CLI beside a `usbpt up`).
    #[arg(long, global = true, env = "NATS_CREDS")]
    pub creds: Option<PathBuf>,
    /// The command handler's NATS identity in `serve`/`commands` (default: --creds).
    #[arg(long, global = true, env = "USBPT_COMMAND_CREDS")]
    pub command_creds: Option<PathBuf>,
    /// Connect even to a NATS server that admits clients without authentication.
    #[arg(long, global = true, env = "USBPT_INSECURE", action = clap::ArgAction::SetTrue, value_parser = clap::builder::FalseyValueParser::new())]
    pub insecure: bool,
    /// TLS to NATS: the CA that signed the server's certificate (PEM). Any TLS option makes TLS
    /// required.
    #[arg(long, global = true, env = "USBPT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// TLS to NATS: this client's certificate (PEM), when the server verifies clients.
    #[arg(long, global = true, env = "USBPT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// TLS to NATS: this client's private key (PEM).
    #[arg(long, global = true, env = "USBPT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Replicas of the event stream when this process is the one that creates it: 3 on a
    /// 3-node NATS cluster (docs/operations.md). An existing stream keeps its own.
    #[arg(long, global = true, env = "USBPT_STREAM_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub stream_replicas: u8,
    /// Where local state lives (redb files, a private nats-server's store).
    #[arg(long, global = true, env = "USBPT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The HTTP API's token, in a file (ADR 0006); or set the token itself in USBPT_API_TOKEN.
    /// Default for the CLI: `<data-dir>/api-token` when it exists (what `up` generates).
    #[arg(long, global = true, env = "USBPT_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// usbpt HTTP API URL (for queries).
    #[arg(
        long,
        global = true,
        env = "USBPT_API",
        default_value = "http://127.0.0.1:8774"
    )]
    pub api: String,
    /// More logging on stderr (-v info, -vv debug); or set USBPT_LOG.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

impl Global {
    /// These options on the bus at `url`, with state under `data_dir` (a private server's
    /// control plane when it runs without generated identities).
    pub fn on_bus(&self, url: &str, data_dir: std::path::PathBuf) -> Global {
        Global {
            nats: url.to_owned(),
            data_dir: Some(data_dir),
            ..self.clone()
        }
    }
}

impl Global {
    /// The credentials to connect with: `--creds`, else the admin identity a `usbpt up` on
    /// this data dir generated, if there is one.
    pub fn creds(&self) -> Option<PathBuf> {
        self.creds.clone().or_else(|| {
            let data = crate::cmd_serve::data_dir(self).ok()?;
            let admin = data
                .join("creds")
                .join(format!("{}.nk", usbpt_bus::auth::Role::Admin.name()));
            admin.is_file().then_some(admin)
        })
    }

    /// Connects with [`Global::creds`], refusing a server without authentication unless
    /// `--insecure`.
    pub async fn bus(&self) -> Result<Bus> {
        self.bus_with(self.creds().as_deref()).await
    }

    /// The command handler's connection (`--command-creds`, else [`Global::bus`]'s).
    pub async fn command_bus(&self) -> Result<Bus> {
        match &self.command_creds {
            Some(c) => self.bus_with(Some(c)).await,
            None => self.bus().await,
        }
    }

    /// The stream's settings when this process creates it (`--stream-replicas`).
    pub fn stream_settings(&self) -> StreamSettings {
        StreamSettings {
            replicas: usize::from(self.stream_replicas),
            ..StreamSettings::default()
        }
    }

    /// The connection's security: `--insecure` and the TLS files.
    pub fn security(&self) -> usbpt_bus::ClientSecurity {
        usbpt_bus::ClientSecurity {
            insecure: self.insecure,
            tls: usbpt_bus::TlsClient {
                ca: self.tls_ca.clone(),
                cert: self.tls_cert.clone(),
                key: self.tls_key.clone(),
            },
        }
    }

    async fn bus_with(&self, creds: Option<&std::path::Path>) -> Result<Bus> {
        Bus::connect_checked(&self.nats, creds, &self.stream_settings(), &self.security())
            .await
            .with_context(|| {
                format!(
                    "connecting to the bus at {}",
                    usbpt_bus::auth::redact_url(&self.nats)
                )
            })
    }
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// The host agent: watches udev and publishes this host's USB devices as events.
    Agent(crate::cmd_agent::AgentArgs),
    /// The event stream.
    #[command(subcommand)]
    Events(EventsCmd),
    /// Projector, command handler and HTTP API (Nova-shaped reads and commands, live events,
    /// metrics) in one process.
    Serve(crate::cmd_serve::ServeArgs),
    /// Everything on one machine: a private nats-server, serve, and an agent for this host.
    Up(crate::cmd_up::UpArgs),
    /// The NATS identities of a `usbpt up` (one nkey per role): add a host, list, revoke.
    #[command(subcommand)]
    Creds(crate::cmd_creds::CredsCmd),
    /// The whole stack with two simulated hosts, playing the blueprint's story.
    Demo(crate::demo::DemoArgs),
    /// Benchmarks: usbpt's figures beside the raw limits of NATS JetStream and redb.
    Bench(crate::cmd_bench::BenchArgs),
    /// A command handler alone (with its own projector and view), for scale-out.
    Commands(crate::cmd_serve::CommandsCmdArgs),
    /// The projector alone: folds the stream into the view (optionally serving reads).
    Projector(crate::cmd_serve::ProjectorCmdArgs),
    /// Rebuild the view from sequence 1 (audit): the world at a sequence, or --verify the live view.
    Replay(crate::cmd_replay::ReplayArgs),
    /// List devices (each device's current enumeration).
    Devices(crate::cmd_query::DevicesArgs),
    /// One device.
    #[command(subcommand)]
    Device(crate::cmd_query::DeviceCmd),
    /// Every enumeration of a device's lineage, in order, with addresses, times, reasons, holders.
    History(crate::cmd_query::HistoryArgs),
    /// Name a device's lineage ("ERP key #3"), or remove its name (--remove); recorded as history.
    Label(crate::cmd_identity::LabelArgs),
    /// Where devices are across the fleet (present, or their last known place when gone).
    Find(crate::cmd_identity::FindArgs),
    /// Every interval in which a server held a device: server, host, enumerations, from, to,
    /// why it started and ended (table, --json or --csv for an audit).
    Custody(crate::cmd_identity::CustodyArgs),
    /// The Nova-shaped hypervisor document.
    #[command(subcommand)]
    Hypervisor(crate::cmd_query::HypervisorCmd),
    /// Flavors.
    #[command(subcommand)]
    Flavor(FlavorCmd),
    /// Servers.
    #[command(subcommand)]
    Server(ServerCmd),
    /// Boot a server with a flavor; it is scheduled on a host that holds its USB devices.
    Boot(crate::cmd_ctl::Boot),
    /// Resize a server to another flavor (its USB devices follow the new flavor), then confirm
    /// (`--confirm`) or revert (`--revert`) it.
    Resize(crate::cmd_ctl::Resize),
    /// Migrate a server (live migration is refused while it holds host USB devices).
    Migrate(crate::cmd_ctl::Migrate),
    /// Stop a server (its USB claims are kept).
    Stop(crate::cmd_ctl::Named),
    /// Start a stopped server.
    Start(crate::cmd_ctl::Named),
    /// Reboot a server.
    Reboot(crate::cmd_ctl::Named),
    /// Pause a server.
    Pause(crate::cmd_ctl::Named),
    /// Unpause a paused server.
    Unpause(crate::cmd_ctl::Named),
    /// Suspend a server.
    Suspend(crate::cmd_ctl::Named),
    /// Resume a suspended server.
    Resume(crate::cmd_ctl::Named),
    /// Rebuild a server (its USB claims are kept).
    Rebuild(crate::cmd_ctl::Named),
    /// Delete a server and release its USB devices.
    Delete(crate::cmd_ctl::Named),
    /// The config file (/etc/usbpt/usbpt.toml): check it, or show the effective configuration.
    #[command(subcommand)]
    Config(crate::config::ConfigCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (usbpt.1 and one per subcommand) into a directory (used when packaging).
    #[command(hide = true)]
    Manpages {
        /// The directory to write into (created if missing).
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum FlavorCmd {
    /// Create a flavor with USB requests.
    Create(crate::cmd_ctl::FlavorCreate),
    /// Delete a flavor.
    Delete(crate::cmd_ctl::FlavorDelete),
    /// List live flavors.
    List(crate::cmd_query::ListArgs),
    /// One flavor, by name or id.
    Show(crate::cmd_query::ShowArgs),
}

#[derive(Debug, Subcommand)]
pub enum ServerCmd {
    /// List servers.
    List(crate::cmd_query::ListArgs),
    /// One server, by name or id.
    Show(crate::cmd_query::ShowArgs),
}

#[derive(Debug, Subcommand)]
pub enum EventsCmd {
    /// Print events as they are stored, decoded, one per line.
    Tail {
        /// Start at the first event ever stored instead of now.
        #[arg(long)]
        from_start: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Stop after this many events (default: follow forever).
        #[arg(long)]
        limit: Option<u64>,
    },
}

async fn send(
    global: &Global,
    (cmd, json): (usbpt_schemas::commands::Command, bool),
) -> Result<()> {
    crate::cmd_ctl::send(global, cmd, json).await
}

pub async fn run(cli: Cli, loaded: &crate::config::Loaded) -> Result<()> {
    match cli.command {
        Cmd::Config(crate::config::ConfigCmd::Check) => {
            println!("{}", crate::config::check(loaded)?);
            Ok(())
        }
        Cmd::Config(crate::config::ConfigCmd::Show) => {
            let (cmd, matches) = crate::config::command_and_matches(loaded)?;
            let rows = crate::config::effective(loaded, &cmd, &matches);
            print!("{}", crate::config::render(loaded, &rows));
            Ok(())
        }
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "usbpt", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Manpages { dir } => crate::config::write_manpages(&dir),
        Cmd::Agent(args) => crate::cmd_agent::run(&cli.global, args).await,
        Cmd::Events(EventsCmd::Tail {
            from_start,
            json,
            limit,
        }) => {
            let bus = cli.global.bus().await?;
            crate::tail::tail(&bus, from_start, json, limit).await
        }
        Cmd::Serve(a) => crate::cmd_serve::serve(&cli.global, a).await,
        Cmd::Commands(a) => crate::cmd_serve::commands(&cli.global, a).await,
        Cmd::Demo(a) => crate::demo::run(&cli.global, a).await,
        Cmd::Up(a) => crate::cmd_up::run(&cli.global, a).await,
        Cmd::Creds(c) => crate::cmd_creds::run(&cli.global, c),
        Cmd::Bench(a) => crate::cmd_bench::run(&cli.global, a).await,
        Cmd::Projector(a) => crate::cmd_serve::projector(&cli.global, a).await,
        Cmd::Replay(a) => crate::cmd_replay::replay(&cli.global, a).await,
        Cmd::Devices(a) => crate::cmd_query::devices(&cli.global, a).await,
        Cmd::Device(c) => crate::cmd_query::device(&cli.global, c).await,
        Cmd::History(a) => crate::cmd_query::history(&cli.global, a).await,
        Cmd::Label(a) => send(&cli.global, a.command()?).await,
        Cmd::Find(a) => crate::cmd_identity::find(&cli.global, a).await,
        Cmd::Custody(a) => crate::cmd_identity::custody(&cli.global, a).await,
        Cmd::Hypervisor(c) => crate::cmd_query::hypervisor(&cli.global, c).await,
        Cmd::Flavor(FlavorCmd::List(a)) => crate::cmd_query::flavor_list(&cli.global, a).await,
        Cmd::Flavor(FlavorCmd::Show(a)) => crate::cmd_query::flavor_show(&cli.global, a).await,
        Cmd::Server(ServerCmd::List(a)) => crate::cmd_query::server_list(&cli.global, a).await,
        Cmd::Server(ServerCmd::Show(a)) => crate::cmd_query::server_show(&cli.global, a).await,
        Cmd::Flavor(FlavorCmd::Create(a)) => send(&cli.global, a.command()).await,
        Cmd::Flavor(FlavorCmd::Delete(a)) => send(&cli.global, a.command()).await,
        Cmd::Boot(a) => send(&cli.global, a.command()).await,
        Cmd::Resize(a) => send(&cli.global, a.command()).await,
        Cmd::Migrate(a) => send(&cli.global, a.command()).await,
        Cmd::Stop(a) => send(&cli.global, a.action(ServerAction::Stop)).await,
        Cmd::Start(a) => send(&cli.global, a.action(ServerAction::Start)).await,
        Cmd::Reboot(a) => send(&cli.global, a.action(ServerAction::Reboot)).await,
        Cmd::Pause(a) => send(&cli.global, a.action(ServerAction::Pause)).await,
        Cmd::Unpause(a) => send(&cli.global, a.action(ServerAction::Unpause)).await,
        Cmd::Suspend(a) => send(&cli.global, a.action(ServerAction::Suspend)).await,
        Cmd::Resume(a) => send(&cli.global, a.action(ServerAction::Resume)).await,
        Cmd::Rebuild(a) => send(&cli.global, a.action(ServerAction::Rebuild)).await,
        Cmd::Delete(a) => send(&cli.global, a.delete()).await,
    }
}
