//! The config file (`/etc/usbpt/usbpt.toml`, `--config`, `USBPT_CONFIG`) and how it merges with
//! environment variables and flags (ADR 0009).
//!
//! One mechanism, in one place: every key of the file names the clap argument it stands for
//! ([`FileConfig::entries`]); [`apply`] makes the file's value that argument's default before
//! the command line is parsed. clap then resolves each argument as it always does, so the
//! precedence is clap's own and the same for every key:
//!
//! **flag > environment variable > config file > built-in default.**
//!
//! The file is parsed with `deny_unknown_fields` and typed fields, so a misspelt key or a
//! value of the wrong type is refused with its line and column (the `toml` crate's spans).

use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{ArgMatches, Args, Command, Subcommand};
use serde::{Deserialize, Serialize};
use usbpt_schemas::HostName;

/// Where the packaged install keeps its config; read when it exists and no `--config` or
/// `USBPT_CONFIG` names another.
pub const DEFAULT_PATH: &str = "/etc/usbpt/usbpt.toml";

/// The environment variable naming the config file (as `--config` does).
pub const ENV: &str = "USBPT_CONFIG";

/// `/etc/usbpt/usbpt.toml`. Every key is optional; an absent key leaves the built-in default.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Where local state lives (views, the agent's outbox).
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub nats: NatsSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub agent: AgentSection,
    #[serde(default)]
    pub serve: ServeSection,
    #[serde(default)]
    pub api: ApiSection,
    #[serde(default)]
    pub projector: ProjectorSection,
    #[serde(default)]
    pub commands: CommandsSection,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSection {
    /// The cluster's servers; the client connects to one and fails over to the others.
    pub urls: Option<Vec<String>>,
    /// This process's identity: an nkey seed file or a `.creds` file.
    pub creds: Option<PathBuf>,
    /// The command handler's own identity (`serve`, `commands`).
    pub command_creds: Option<PathBuf>,
    /// Connect even to a server without authentication.
    pub insecure: Option<bool>,
    /// Replicas of the event stream when a usbpt process creates it (3 on a 3-node cluster).
    pub stream_replicas: Option<u8>,
    #[serde(default)]
    pub tls: TlsSection,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// `text` (default) or `json`.
    pub format: Option<LogFormat>,
    /// A tracing filter (`info`, `warn,usbpt_agent=debug`), used when neither `-v` nor
    /// `USBPT_LOG` is given.
    pub filter: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// This hypervisor's name (a subject token).
    pub host: Option<HostName>,
    /// The libvirt URI the agent drives.
    pub hypervisor: Option<String>,
    /// The passthrough filter rules (TOML, or a `usb_passthrough_blacklist` list as `.json`).
    pub filter: Option<PathBuf>,
    /// The command handler's public key, or a file holding it.
    pub control_key: Option<String>,
    pub boot_id_file: Option<PathBuf>,
    /// Enumerations of one lineage within `flap_window` above which it is flapping (0: off).
    pub flap_threshold: Option<u32>,
    /// The flapping detector's window, in seconds.
    pub flap_window: Option<u64>,
    /// Seconds without an enumeration that end a flapping episode.
    pub flap_quiet: Option<u64>,
    /// Seconds without libvirt work after which the executor process is stopped (ADR 0016).
    pub executor_idle: Option<u64>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServeSection {
    /// Where `usbpt serve` (and `usbpt up`) listen.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// The HTTP API the query commands (`usbpt devices`, …) talk to.
    pub url: Option<String>,
    /// A file holding the API's bearer token (the token itself never goes in this file).
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectorSection {
    /// The durable consumer's name; each view needs its own.
    pub consumer: Option<String>,
    /// Events per fetch and per redb transaction (1 to 10000).
    pub batch: Option<u64>,
    /// Where `usbpt projector` serves reads and /metrics.
    pub listen: Option<SocketAddr>,
    /// How soon a commit of the view is on disk, in ms (0: every commit; at most 60000).
    pub view_sync_ms: Option<u64>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CommandsSection {
    /// `pack` or `spread`.
    pub weigh: Option<Weigh>,
    /// Seconds a claimed device may be gone before its claim is released.
    pub grace: Option<u64>,
    /// Commands handled at once.
    pub concurrency: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (no colour off a terminal, no timestamp under journald).
    Text,
    /// One JSON object per line (tracing-subscriber's JSON), for log shippers.
    Json,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Weigh {
    Pack,
    Spread,
}

/// Which commands a key applies to; empty means a global option (every command).
type Commands = &'static [&'static str];
const GLOBAL: Commands = &[];
const COMMAND_HANDLERS: Commands = &["serve", "commands"];
const PROJECTORS: Commands = &["serve", "commands", "projector"];

/// Every key of the file: its dotted name, the commands whose argument it sets, the argument's
/// clap id, and whether its value may hold a secret (shown redacted).
#[derive(Debug, Clone, Copy)]
pub struct Key {
    pub name: &'static str,
    pub commands: Commands,
    pub arg: &'static str,
    pub url: bool,
}

const fn key(name: &'static str, commands: Commands, arg: &'static str) -> Key {
    Key {
        name,
        commands,
        arg,
        url: false,
    }
}

/// The table: one row per key. `config show` lists them in this order.
pub const KEYS: &[Key] = &[
    key("data_dir", GLOBAL, "data_dir"),
    Key {
        url: true,
        ..key("nats.urls", GLOBAL, "nats")
    },
    key("nats.creds", GLOBAL, "creds"),
    key("nats.command_creds", GLOBAL, "command_creds"),
    key("nats.insecure", GLOBAL, "insecure"),
    key("nats.stream_replicas", GLOBAL, "stream_replicas"),
    key("nats.tls.ca", GLOBAL, "tls_ca"),
    key("nats.tls.cert", GLOBAL, "tls_cert"),
    key("nats.tls.key", GLOBAL, "tls_key"),
    key("log.format", GLOBAL, "log_format"),
    key("agent.host", &["agent"], "host"),
    key("agent.hypervisor", &["agent"], "hypervisor"),
    key("agent.filter", &["agent"], "filter"),
    key("agent.control_key", &["agent"], "control_key"),
    key("agent.boot_id_file", &["agent"], "boot_id_file"),
    key("agent.flap_threshold", &["agent"], "flap_threshold"),
    key("agent.flap_window", &["agent"], "flap_window"),
    key("agent.flap_quiet", &["agent"], "flap_quiet"),
    key("agent.executor_idle", &["agent"], "executor_idle"),
    key("serve.listen", &["serve", "up"], "listen"),
    Key {
        url: true,
        ..key("api.url", GLOBAL, "api")
    },
    key("api.token_file", GLOBAL, "api_token_file"),
    key("projector.consumer", PROJECTORS, "consumer"),
    key("projector.batch", PROJECTORS, "batch"),
    key("projector.view_sync_ms", PROJECTORS, "view_sync_ms"),
    key("projector.listen", &["projector"], "listen"),
    key("commands.weigh", COMMAND_HANDLERS, "weigh"),
    key("commands.grace", COMMAND_HANDLERS, "grace"),
    key("commands.concurrency", COMMAND_HANDLERS, "concurrency"),
];

fn path(p: &Option<PathBuf>) -> Option<String> {
    p.as_ref().map(|p| p.display().to_string())
}

fn shown<T: ToString>(v: &Option<T>) -> Option<String> {
    v.as_ref().map(ToString::to_string)
}

impl FileConfig {
    /// Reads and checks `path`. Errors name the file, and for syntax, unknown keys and
    /// wrong types the key, line and column.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("config file {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let config: Self = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        config.validate()?;
        Ok(config)
    }

    /// What typed fields cannot say.
    fn validate(&self) -> Result<()> {
        if let Some(b) = self.projector.batch {
            if !(1..=10_000).contains(&b) {
                bail!("projector.batch = {b}: must be 1 to 10000");
            }
        }
        if let Some(ms) = self.projector.view_sync_ms {
            if ms > 60_000 {
                bail!("projector.view_sync_ms = {ms}: must be 0 to 60000");
            }
        }
        if let Some(urls) = &self.nats.urls {
            if urls.is_empty() {
                bail!("nats.urls: give at least one server");
            }
            for u in urls {
                if u.contains(',') || u.trim().is_empty() {
                    bail!(
                        "nats.urls: {:?} is not one URL (one list item per server)",
                        u
                    );
                }
            }
        }
        if let Some(r) = self.nats.stream_replicas {
            if !(1..=5).contains(&r) {
                bail!("nats.stream_replicas = {r}: must be 1 to 5");
            }
        }
        for (key, v) in [
            ("agent.flap_window", self.agent.flap_window),
            ("agent.flap_quiet", self.agent.flap_quiet),
            ("agent.executor_idle", self.agent.executor_idle),
        ] {
            if let Some(v) = v {
                if !(1..=86_400).contains(&v) {
                    bail!("{key} = {v}: must be 1 to 86400 seconds");
                }
            }
        }
        if self.commands.concurrency == Some(0) {
            bail!("commands.concurrency = 0: must be at least 1");
        }
        Ok(())
    }

    /// The value the file gives each key of [`KEYS`], as the argument's text.
    pub fn value(&self, key: &str) -> Option<String> {
        match key {
            "data_dir" => path(&self.data_dir),
            "nats.urls" => self.nats.urls.as_ref().map(|u| u.join(",")),
            "nats.creds" => path(&self.nats.creds),
            "nats.command_creds" => path(&self.nats.command_creds),
            "nats.insecure" => shown(&self.nats.insecure),
            "nats.stream_replicas" => shown(&self.nats.stream_replicas),
            "nats.tls.ca" => path(&self.nats.tls.ca),
            "nats.tls.cert" => path(&self.nats.tls.cert),
            "nats.tls.key" => path(&self.nats.tls.key),
            "log.format" => self.log.format.map(|f| f.name().to_owned()),
            "agent.host" => shown(&self.agent.host),
            "agent.hypervisor" => self.agent.hypervisor.clone(),
            "agent.filter" => path(&self.agent.filter),
            "agent.control_key" => self.agent.control_key.clone(),
            "agent.boot_id_file" => path(&self.agent.boot_id_file),
            "agent.flap_threshold" => shown(&self.agent.flap_threshold),
            "agent.flap_window" => shown(&self.agent.flap_window),
            "agent.flap_quiet" => shown(&self.agent.flap_quiet),
            "agent.executor_idle" => shown(&self.agent.executor_idle),
            "serve.listen" => shown(&self.serve.listen),
            "api.url" => self.api.url.clone(),
            "api.token_file" => path(&self.api.token_file),
            "projector.consumer" => self.projector.consumer.clone(),
            "projector.batch" => shown(&self.projector.batch),
            "projector.view_sync_ms" => shown(&self.projector.view_sync_ms),
            "projector.listen" => shown(&self.projector.listen),
            "commands.weigh" => self.commands.weigh.map(|w| w.name().to_owned()),
            "commands.grace" => shown(&self.commands.grace),
            "commands.concurrency" => shown(&self.commands.concurrency),
            _ => None,
        }
    }
}

impl LogFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

impl Weigh {
    fn name(self) -> &'static str {
        match self {
            Self::Pack => "pack",
            Self::Spread => "spread",
        }
    }
}

/// The config file this process reads, and what it holds.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// `None`: no file (none named, and none at [`DEFAULT_PATH`]).
    pub path: Option<PathBuf>,
    pub file: FileConfig,
}

/// The config file named by `--config PATH` / `--config=PATH` in `args`, else `USBPT_CONFIG`,
/// else [`DEFAULT_PATH`] if it exists. A named file must exist.
pub fn locate(args: &[OsString]) -> Option<(PathBuf, bool)> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        if a == "--config" {
            return it.next().map(|p| (PathBuf::from(p), true));
        }
        if let Some(p) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return Some((PathBuf::from(p), true));
        }
    }
    if let Some(p) = std::env::var_os(ENV).filter(|p| !p.is_empty()) {
        return Some((PathBuf::from(p), true));
    }
    let default = PathBuf::from(DEFAULT_PATH);
    default.is_file().then_some((default, false))
}

/// Loads the file [`locate`] finds.
pub fn load(args: &[OsString]) -> Result<Loaded> {
    match locate(args) {
        None => Ok(Loaded::default()),
        Some((path, _)) => Ok(Loaded {
            file: FileConfig::load(&path)?,
            path: Some(path),
        }),
    }
}

/// The argument `arg` of `cmd` (a subcommand's, or the root's for a global key).
pub(crate) fn find<'c>(cmd: &'c Command, commands: &[&str], arg: &str) -> Option<&'c clap::Arg> {
    let c = match commands.first() {
        None => cmd,
        Some(name) => cmd.find_subcommand(name)?,
    };
    c.get_arguments().find(|a| a.get_id() == arg)
}

/// `cmd` with the file's values as the defaults of the arguments they stand for. A key whose
/// argument this build lacks is refused.
pub fn apply(mut cmd: Command, file: &FileConfig) -> Result<Command> {
    for k in KEYS {
        let Some(value) = file.value(k.name) else {
            continue;
        };
        if find(&cmd, k.commands, k.arg).is_none() {
            bail!("{}: not supported by this build of usbpt", k.name);
        }
        if k.commands.is_empty() {
            cmd = cmd.mut_arg(k.arg, |a| a.default_value(value));
        } else {
            for name in k.commands {
                let has = cmd
                    .find_subcommand(name)
                    .is_some_and(|c| c.get_arguments().any(|a| a.get_id() == k.arg));
                if has {
                    // The file's value satisfies a required flag (`agent.host` for `--host`).
                    let value = value.clone();
                    cmd = cmd.mut_subcommand(*name, |c| {
                        c.mut_arg(k.arg, |a| a.default_value(value).required(false))
                    });
                }
            }
        }
    }
    Ok(cmd)
}

/// Where a key's effective value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env(String),
    File,
    Default,
    Unset,
}

/// The effective value of every key, for `config show`: global keys as this invocation
/// resolved them (flags included), command keys as the environment, the file and the
/// defaults give them.
pub fn effective(
    loaded: &Loaded,
    cmd: &Command,
    matches: &ArgMatches,
) -> Vec<(Key, Option<String>, Source)> {
    let mut out = Vec::new();
    for k in KEYS {
        let arg = find(cmd, k.commands, k.arg);
        let from_flag = k.commands.is_empty()
            && matches.try_contains_id(k.arg).unwrap_or(false)
            && matches.value_source(k.arg) == Some(clap::parser::ValueSource::CommandLine);
        let env = arg.and_then(|a| a.get_env()).and_then(|name| {
            let v = std::env::var_os(name)?;
            Some((name.to_string_lossy().into_owned(), v))
        });
        let (value, source) = if from_flag {
            (raw(matches, k.arg), Source::Flag)
        } else if let Some((name, v)) = env {
            (Some(v.to_string_lossy().into_owned()), Source::Env(name))
        } else if let Some(v) = loaded.file.value(k.name) {
            (Some(v), Source::File)
        } else if let Some(d) = arg.and_then(|a| a.get_default_values().first()) {
            (Some(d.to_string_lossy().into_owned()), Source::Default)
        } else {
            (None, Source::Unset)
        };
        let value = value.map(|v| {
            if k.url {
                v.split(',')
                    .map(usbpt_bus::auth::redact_url)
                    .collect::<Vec<_>>()
                    .join(",")
            } else {
                v
            }
        });
        out.push((*k, value, source));
    }
    out
}

fn raw(matches: &ArgMatches, id: &str) -> Option<String> {
    matches
        .get_raw(id)
        .and_then(|mut v| v.next())
        .map(|v| v.to_string_lossy().into_owned())
}

/// `config show`'s text: TOML with each key's source as a comment. Unset keys are commented
/// out.
pub fn render(loaded: &Loaded, rows: &[(Key, Option<String>, Source)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# usbpt effective configuration (flag > environment > file > default)\n# file: {}",
        loaded
            .path
            .as_ref()
            .map_or_else(|| "none".to_owned(), |p| p.display().to_string())
    );
    let mut section = "";
    for (k, value, source) in rows {
        let (sec, leaf) = k.name.rsplit_once('.').unwrap_or(("", k.name));
        let sec = if k.name.starts_with("nats.tls.") {
            "nats.tls"
        } else {
            sec
        };
        if sec != section {
            let _ = writeln!(out, "\n[{sec}]");
            section = sec;
        }
        let from = match source {
            Source::Flag => "flag".to_owned(),
            Source::Env(name) => format!("env {name}"),
            Source::File => "file".to_owned(),
            Source::Default => "default".to_owned(),
            Source::Unset => "unset".to_owned(),
        };
        match value {
            Some(v) => {
                let _ = writeln!(out, "{leaf} = {}  # {from}", toml_value(k.name, v));
            }
            None => {
                let _ = writeln!(out, "# {leaf} =  # unset");
            }
        }
    }
    out
}

/// A value as TOML: numbers and booleans bare, lists for the NATS URLs, strings quoted.
fn toml_value(key: &str, v: &str) -> String {
    let quote = |s: &str| toml::Value::String(s.to_owned()).to_string();
    if key == "nats.urls" {
        let items: Vec<String> = v.split(',').map(|u| quote(u.trim())).collect();
        return format!("[{}]", items.join(", "));
    }
    if v == "true" || v == "false" || (!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())) {
        return v.to_owned();
    }
    quote(v)
}

/// `usbpt config`.
#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Check the config file: syntax, keys, types, and that the files it names exist (and the
    /// filter rules parse). Exits non-zero naming the key on the first problem.
    Check,
    /// Print the effective configuration (flag > environment > file > default), each key with
    /// where its value came from; URLs' passwords redacted.
    Show,
}

/// `--config` and `--log-format`: options of the process itself, beside the global options.
#[derive(Debug, Clone, Args)]
pub struct Setup {
    /// The config file (default: /etc/usbpt/usbpt.toml when it exists).
    #[arg(long, global = true, env = "USBPT_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Log format on stderr: text, or json (one object per line) for log shippers.
    #[arg(
        long,
        global = true,
        env = "USBPT_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

/// Why the command line could not be parsed.
#[derive(Debug)]
pub enum ArgsError {
    /// A bad flag, `--help`, `--version`: clap prints and exits.
    Clap(clap::Error),
    /// The config file is unreadable or invalid.
    Config(anyhow::Error),
}

/// The whole of argument handling: find and load the config file, make its values the
/// arguments' defaults, parse `args`.
pub fn parse_args<C: clap::Parser>(args: Vec<OsString>) -> Result<(C, Loaded), ArgsError> {
    let loaded = load(&args).map_err(ArgsError::Config)?;
    let cmd = apply(C::command(), &loaded.file).map_err(|e| {
        ArgsError::Config(e.context(format!(
            "config file {}",
            loaded.path.as_deref().unwrap_or(Path::new("?")).display()
        )))
    })?;
    let matches = cmd.try_get_matches_from(args).map_err(ArgsError::Clap)?;
    let cli = C::from_arg_matches(&matches).map_err(ArgsError::Clap)?;
    Ok((cli, loaded))
}

/// The command as this process built it, and this invocation's matches (for `config show`).
pub fn command_and_matches<C: clap::CommandFactory>(
    loaded: &Loaded,
) -> Result<(Command, ArgMatches)> {
    let cmd = apply(C::command(), &loaded.file)?;
    let matches = cmd.clone().try_get_matches_from(std::env::args_os())?;
    Ok((cmd, matches))
}

/// Man pages: `usbpt.1` and `usbpt-<command>.1` for each visible subcommand (and theirs).
pub fn write_manpages<C: clap::CommandFactory>(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = C::command();
    cmd.build();
    write_page(dir, &cmd, "usbpt")
}

fn write_page(dir: &Path, cmd: &Command, name: &str) -> Result<()> {
    let page = cmd.clone().name(name.to_owned());
    let mut out = Vec::new();
    clap_mangen::Man::new(page).render(&mut out)?;
    let file = dir.join(format!("{name}.1"));
    std::fs::write(&file, out).with_context(|| format!("writing {}", file.display()))?;
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        write_page(dir, sub, &format!("{name}-{}", sub.get_name()))?;
    }
    Ok(())
}

/// `usbpt config check`: the semantic checks past parsing. Every problem names its key.
pub fn check(loaded: &Loaded) -> Result<String> {
    let Some(path) = &loaded.path else {
        bail!("no config file: none at {DEFAULT_PATH}, and neither --config nor {ENV} names one");
    };
    let f = &loaded.file;
    let files = [
        ("nats.creds", &f.nats.creds),
        ("nats.command_creds", &f.nats.command_creds),
        ("nats.tls.ca", &f.nats.tls.ca),
        ("nats.tls.cert", &f.nats.tls.cert),
        ("nats.tls.key", &f.nats.tls.key),
        ("agent.boot_id_file", &f.agent.boot_id_file),
        ("api.token_file", &f.api.token_file),
    ];
    for (name, p) in files {
        if let Some(p) = p {
            std::fs::File::open(p)
                .with_context(|| format!("{name} = {:?}: cannot open it", p.display()))?;
        }
    }
    if let Some(filter) = &f.agent.filter {
        usbpt_agent::Filter::load(filter).context("agent.filter")?;
    }
    if let Some(k) = &f.agent.control_key {
        crate::cmd_agent::control_key(Some(k)).context("agent.control_key")?;
    }
    let set = KEYS.iter().filter(|k| f.value(k.name).is_some()).count();
    Ok(format!("{}: ok ({set} keys set)", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_refused_with_its_name_and_line() {
        let err = FileConfig::parse("[nats]\nurls = [\"nats://a:4222\"]\ncredz = \"x\"\n")
            .expect_err("unknown key");
        let msg = format!("{err:#}");
        assert!(msg.contains("credz"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn wrong_type_is_refused_with_its_line() {
        let err = FileConfig::parse("[commands]\nweigh = \"pack\"\ngrace = \"soon\"\n")
            .expect_err("wrong type");
        let msg = format!("{err:#}");
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("grace"), "{msg}");
        let err = FileConfig::parse("[agent]\nhost = \"no dots.here\"\n").expect_err("host");
        assert!(format!("{err:#}").contains("line 2"), "{err:#}");
    }

    #[test]
    fn range_checks_name_the_key() {
        let err = FileConfig::parse("[projector]\nbatch = 0\n").expect_err("batch 0");
        assert!(format!("{err:#}").contains("projector.batch"), "{err:#}");
        let err = FileConfig::parse("[projector]\nview_sync_ms = 60001\n").expect_err("too long");
        assert!(
            format!("{err:#}").contains("projector.view_sync_ms"),
            "{err:#}"
        );
        let err = FileConfig::parse("[agent]\nflap_quiet = 0\n").expect_err("quiet 0");
        assert!(format!("{err:#}").contains("agent.flap_quiet"), "{err:#}");
        let err = FileConfig::parse("[nats]\nurls = [\"a,b\"]\n").expect_err("joined urls");
        assert!(format!("{err:#}").contains("nats.urls"), "{err:#}");
    }

    #[test]
    fn every_key_has_a_value_accessor() {
        let text = r#"
            data_dir = "/var/lib/usbpt"
            [nats]
            urls = ["nats://a:4222", "nats://b:4222"]
            creds = "/c"
            command_creds = "/cc"
            insecure = false
            stream_replicas = 3
            [nats.tls]
            ca = "/ca"
            cert = "/cert"
            key = "/key"
            [log]
            format = "json"
            filter = "info"
            [agent]
            host = "hv-01"
            hypervisor = "qemu:///system"
            filter = "/f.toml"
            control_key = "/k"
            boot_id_file = "/b"
            flap_threshold = 5
            flap_window = 60
            flap_quiet = 120
            executor_idle = 30
            [serve]
            listen = "127.0.0.1:8774"
            [api]
            url = "http://127.0.0.1:8774"
            token_file = "/t"
            [projector]
            consumer = "p"
            batch = 10
            listen = "127.0.0.1:8775"
            view_sync_ms = 100
            [commands]
            weigh = "spread"
            grace = 30
            concurrency = 4
        "#;
        let f = FileConfig::parse(text).expect("parses");
        for k in KEYS {
            assert!(f.value(k.name).is_some(), "{} has no accessor", k.name);
        }
        assert_eq!(
            f.value("nats.urls").as_deref(),
            Some("nats://a:4222,nats://b:4222")
        );
    }
}
