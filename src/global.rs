//! The options every subcommand takes ([`Global`]) and what follows from them alone: the data
//! directory, the bus connection, the API token the CLI sends (`crate::api_auth`).

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use usbpt_bus::{Bus, StreamSettings};

/// Options every subcommand takes (each also as an environment variable).
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// NATS server URL.
    #[arg(
        long,
        global = true,
        env = "NATS_URL",
        default_value = crate::defaults::NATS_URL
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
        default_value = crate::defaults::API_URL
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
            let data = self.data_dir_or_default().ok()?;
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

impl Global {
    /// `--data-dir`, else `$XDG_STATE_HOME/usbpt`, else `~/.local/state/usbpt`.
    pub fn data_dir_or_default(&self) -> Result<PathBuf> {
        match &self.data_dir {
            Some(d) => Ok(d.clone()),
            None => user_state_dir()
                .ok_or_else(|| anyhow!("no data directory: pass --data-dir or set USBPT_DATA_DIR")),
        }
    }

    /// The host agent's data dir: `--data-dir`, else `/var/lib/usbpt` for root (a host agent
    /// normally runs as root), else as [`Global::data_dir_or_default`].
    pub fn agent_data_dir(&self) -> Result<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        if let Some(d) = &self.data_dir {
            return Ok(d.clone());
        }
        // /proc/self belongs to the process's effective user.
        if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
            return Ok(PathBuf::from(crate::defaults::SYSTEM_DATA_DIR));
        }
        user_state_dir().context(
            "no --data-dir, USBPT_DATA_DIR, XDG_STATE_HOME or HOME to keep the agent's state in",
        )
    }
}

/// `$XDG_STATE_HOME/usbpt`, else `~/.local/state/usbpt`.
fn user_state_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("usbpt"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".local/state/usbpt"))
}

/// Whether the operator named a bus (`--nats` or `NATS_URL`); else `up` and `demo` run a
/// private server.
pub fn nats_given() -> bool {
    std::env::var_os("NATS_URL").is_some()
        || std::env::args().any(|a| a == "--nats" || a.starts_with("--nats="))
}
