//! Command-line interface (names and flags as in INTERFACES.md).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use usbpt_bus::{Bus, StreamSettings};

#[derive(Debug, Parser)]
#[command(
    name = "usbpt",
    version,
    about = "Event-sourced USB passthrough manager for private clouds"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Cmd,
}

/// Options every subcommand takes (each also as an environment variable).
#[derive(Debug, Args)]
pub struct Global {
    /// NATS server URL.
    #[arg(
        long,
        global = true,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats: String,
    /// NATS credentials file.
    #[arg(long, global = true, env = "NATS_CREDS")]
    pub creds: Option<PathBuf>,
    /// Where local state lives (redb files, a private nats-server's store).
    #[arg(long, global = true, env = "USBPT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
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
    pub async fn bus(&self) -> Result<Bus> {
        Bus::connect(
            &self.nats,
            self.creds.as_deref(),
            &StreamSettings::default(),
        )
        .await
        .with_context(|| format!("connecting to the bus at {}", self.nats))
    }
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// The event stream.
    #[command(subcommand)]
    Events(EventsCmd),
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

pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Events(EventsCmd::Tail {
            from_start,
            json,
            limit,
        }) => {
            let bus = cli.global.bus().await?;
            crate::tail::tail(&bus, from_start, json, limit).await
        }
    }
}
