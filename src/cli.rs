//! Command-line interface: subcommands, flags and their defaults.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use usbpt_schemas::ServerAction;

use crate::global::Global;

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

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// The host agent: watches udev and publishes this host's USB devices as events.
    Agent(crate::cmd_agent::AgentArgs),
    /// The host agent's libvirt executor process: started by the agent when it has libvirt
    /// work, speaks its protocol on stdin/stdout, ends at the end of its input (ADR 0016).
    #[command(hide = true)]
    AgentExecutor(crate::cmd_agent::ExecutorArgs),
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
    /// The whole stack with two simulated hosts, playing the built-in demo story.
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
    /// Identity alarms across the fleet (a serial lineage on two hosts …), with what to do.
    Alarms(crate::cmd_query::AlarmsArgs),
    /// Name a device's lineage ("ERP key #3"), or remove its name (--remove); recorded as history.
    Label(crate::cmd_identity::LabelArgs),
    /// A serial lineage present on two hosts: keep one (`conflict resolve LINEAGE --keep HOST`).
    #[command(subcommand)]
    Conflict(crate::cmd_identity::ConflictCmd),
    /// A serial lineage back with other descriptors: accept them (`fingerprint accept LINEAGE`).
    #[command(subcommand)]
    Fingerprint(crate::cmd_identity::FingerprintCmd),
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
    /// Change a flavor's policy: `--on-fingerprint-change hold|follow`.
    Set(crate::cmd_ctl::FlavorSet),
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
            let (cmd, matches) = crate::config::command_and_matches::<Cli>(loaded)?;
            let rows = crate::config::effective(loaded, &cmd, &matches);
            print!("{}", crate::config::render(loaded, &rows));
            Ok(())
        }
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "usbpt", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Manpages { dir } => crate::config::write_manpages::<Cli>(&dir),
        Cmd::Agent(args) => {
            let log = crate::cmd_agent::Log::of(&cli.global, &cli.setup, loaded);
            crate::cmd_agent::run(&cli.global, args, &log).await
        }
        Cmd::AgentExecutor(args) => crate::cmd_agent::executor(args).await,
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
        Cmd::Alarms(a) => crate::cmd_query::alarms(&cli.global, a).await,
        Cmd::Label(a) => send(&cli.global, a.command(&cli.global).await?).await,
        Cmd::Conflict(c) => crate::cmd_identity::conflict(&cli.global, c).await,
        Cmd::Fingerprint(c) => crate::cmd_identity::fingerprint(&cli.global, c).await,
        Cmd::Find(a) => crate::cmd_identity::find(&cli.global, a).await,
        Cmd::Custody(a) => crate::cmd_identity::custody(&cli.global, a).await,
        Cmd::Hypervisor(c) => crate::cmd_query::hypervisor(&cli.global, c).await,
        Cmd::Flavor(FlavorCmd::List(a)) => crate::cmd_query::flavor_list(&cli.global, a).await,
        Cmd::Flavor(FlavorCmd::Show(a)) => crate::cmd_query::flavor_show(&cli.global, a).await,
        Cmd::Server(ServerCmd::List(a)) => crate::cmd_query::server_list(&cli.global, a).await,
        Cmd::Server(ServerCmd::Show(a)) => crate::cmd_query::server_show(&cli.global, a).await,
        Cmd::Flavor(FlavorCmd::Create(a)) => send(&cli.global, a.command()).await,
        Cmd::Flavor(FlavorCmd::Delete(a)) => send(&cli.global, a.command()).await,
        Cmd::Flavor(FlavorCmd::Set(a)) => send(&cli.global, a.command()).await,
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

/// The config file against this command line (`crate::config` is generic over it).
#[cfg(test)]
mod tests {
    use super::*;

    fn parse_with(file: &str, argv: &[&str]) -> Cli {
        use clap::{CommandFactory, FromArgMatches};
        let file = crate::config::FileConfig::parse(file).expect("file parses");
        let cmd = crate::config::apply(Cli::command(), &file).expect("applies");
        let m = cmd.try_get_matches_from(argv).expect("argv parses");
        Cli::from_arg_matches(&m).expect("cli")
    }

    #[test]
    fn the_file_fills_in_what_flags_do_not_give_and_flags_win() {
        let file = "[agent]\nhost = \"hv-07\"\nhypervisor = \"test:///default\"\n\
                    [nats]\nurls = [\"nats://a:4222\", \"nats://b:4222\"]\n";
        // --host is required on the command line, but the file gives it.
        let cli = parse_with(file, &["usbpt", "agent"]);
        let Cmd::Agent(a) = cli.command else {
            panic!("not agent")
        };
        assert_eq!(a.host.to_string(), "hv-07");
        assert_eq!(a.hypervisor, "test:///default");
        assert_eq!(cli.global.nats, "nats://a:4222,nats://b:4222");
        // A flag beats the file.
        let cli = parse_with(
            file,
            &["usbpt", "--nats", "nats://c:1", "agent", "--host", "x"],
        );
        let Cmd::Agent(a) = cli.command else {
            panic!("not agent")
        };
        assert_eq!(a.host.to_string(), "x");
        assert_eq!(cli.global.nats, "nats://c:1");
    }

    #[test]
    fn a_key_reaches_every_command_it_names() {
        let file = "[commands]\ngrace = 7\nweigh = \"spread\"\n[projector]\nconsumer = \"p2\"\n";
        let Cmd::Serve(s) = parse_with(file, &["usbpt", "serve"]).command else {
            panic!("not serve")
        };
        assert_eq!(s.commands.grace, 7);
        assert!(matches!(
            s.commands.weigh,
            crate::cmd_serve::WeighArg::Spread
        ));
        assert_eq!(s.projector.consumer, "p2");
        let Cmd::Commands(c) = parse_with(file, &["usbpt", "commands"]).command else {
            panic!("not commands")
        };
        assert_eq!(c.commands.grace, 7);
        assert_eq!(c.projector.consumer, "p2");
        // Without the file the built-in defaults stand.
        let Cmd::Serve(s) = parse_with("", &["usbpt", "serve"]).command else {
            panic!("not serve")
        };
        assert_eq!(s.commands.grace, 120);
    }

    #[test]
    fn every_key_names_an_argument_of_each_of_its_commands() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        for k in crate::config::KEYS {
            if k.commands.is_empty() {
                assert!(
                    crate::config::find(&cmd, k.commands, k.arg).is_some(),
                    "{}",
                    k.name
                );
            }
            for c in k.commands {
                assert!(
                    crate::config::find(&cmd, &[c], k.arg).is_some(),
                    "{} on {c}",
                    k.name
                );
            }
        }
    }

    #[test]
    fn a_key_this_build_lacks_is_refused_by_name() {
        use clap::CommandFactory;
        let file =
            crate::config::FileConfig::parse("[api]\ntoken_file = \"/t\"\n").expect("parses");
        // Every key's argument exists in this build; a key without one is refused by name.
        crate::config::apply(Cli::command(), &file).expect("api.token_file is --api-token-file");
        let mut missing = Cli::command();
        missing = missing.mut_subcommand("serve", |c| c.mut_arg("grace", |a| a.id("gone")));
        let file = crate::config::FileConfig::parse("[commands]\ngrace = 5\n").expect("parses");
        let err = crate::config::apply(missing, &file).expect_err("no --grace on serve");
        assert!(format!("{err:#}").contains("commands.grace"), "{err:#}");
    }
}
