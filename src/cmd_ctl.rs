//! Operator commands (`flavor create|set|delete`, `boot`, `resize`, `migrate`, power actions,
//! `delete`): sent to the command handlers over NATS request/reply.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use usbpt_commands::handler::request;
use usbpt_schemas::commands::{Command, CommandReply};
use usbpt_schemas::{
    FingerprintPolicy, FlavorName, HostName, ServerAction, ServerName, UsbRequest,
};

use crate::global::Global;

/// How long the CLI waits for a command handler's reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct FlavorCreate {
    pub name: FlavorName,
    /// `id=DEVICE_ID`, `lineage=LINEAGE_ID` or `vendor=136b,product=0003[,serial=S][,count=N]`,
    /// each optionally with `,controller=uhci|ehci|xhci,follow=lineage|strict`. Repeatable.
    #[arg(long = "usb", value_name = "SPEC")]
    pub usb: Vec<UsbRequest>,
    /// When a device held by a server of this flavor comes back with another descriptor
    /// fingerprint: `hold` (default; re-attached once an operator accepts it) or `follow`
    /// (accepted and re-attached at once; the alarm is still recorded).
    #[arg(long, value_name = "hold|follow")]
    pub on_fingerprint_change: Option<FingerprintPolicy>,
    #[arg(long)]
    pub json: bool,
}

/// `usbpt flavor set NAME --on-fingerprint-change hold|follow`.
#[derive(Debug, Args)]
pub struct FlavorSet {
    pub name: FlavorName,
    /// `hold` (re-attach once an operator accepts a changed fingerprint) or `follow`.
    #[arg(long, value_name = "hold|follow")]
    pub on_fingerprint_change: FingerprintPolicy,
    #[arg(long)]
    pub json: bool,
}

impl FlavorSet {
    pub fn command(self) -> (Command, bool) {
        (
            Command::SetFlavorPolicy {
                name: self.name,
                on_fingerprint_change: self.on_fingerprint_change,
            },
            self.json,
        )
    }
}

#[derive(Debug, Args)]
pub struct FlavorDelete {
    pub name: FlavorName,
    #[arg(long)]
    pub json: bool,
}

impl FlavorDelete {
    pub fn command(self) -> (Command, bool) {
        (Command::DeleteFlavor { name: self.name }, self.json)
    }
}

#[derive(Debug, Args)]
pub struct Boot {
    pub name: ServerName,
    #[arg(long)]
    pub flavor: FlavorName,
    /// Force the host (the scheduler still checks it can satisfy the flavor).
    #[arg(long)]
    pub host: Option<HostName>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["flavor", "confirm", "revert"])))]
pub struct Resize {
    pub name: ServerName,
    /// Resize to this flavor; the server then awaits `--confirm` or `--revert`
    /// (`VERIFY_RESIZE`), keeping its old devices reserved meanwhile.
    #[arg(long)]
    pub flavor: Option<FlavorName>,
    /// Confirm the pending resize: the old flavor's devices are released.
    #[arg(long)]
    pub confirm: bool,
    /// Revert the pending resize: the old flavor, host and devices back.
    #[arg(long)]
    pub revert: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct Migrate {
    pub name: ServerName,
    /// Live migration (refused for servers holding host USB devices).
    #[arg(long)]
    pub live: bool,
    #[arg(long)]
    pub host: Option<HostName>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct Named {
    pub name: ServerName,
    #[arg(long)]
    pub json: bool,
}

/// Sends `cmd`; prints the reply (a line, or JSON with `json`); a rejection is an error.
pub async fn send(global: &Global, cmd: Command, json: bool) -> Result<()> {
    let bus = global.bus().await?;
    let reply = request(&bus, &cmd, REPLY_TIMEOUT)
        .await
        .map_err(anyhow::Error::msg)?;
    if json {
        println!(
            "{}",
            usbpt_schemas::text::escape_json(&serde_json::to_string(&reply)?)
        );
    }
    match reply {
        CommandReply::Accepted { message, .. } => {
            if !json {
                println!("{}", usbpt_schemas::text::Escaped(&message));
            }
            Ok(())
        }
        // main escapes what it prints.
        CommandReply::Rejected { kind, reason } => bail!("rejected ({kind}): {reason}"),
    }
}

impl FlavorCreate {
    pub fn command(self) -> (Command, bool) {
        (
            Command::CreateFlavor {
                resources: Default::default(),
                name: self.name,
                usb: self.usb,
                on_fingerprint_change: self.on_fingerprint_change,
            },
            self.json,
        )
    }
}
impl Boot {
    pub fn command(self) -> (Command, bool) {
        (
            Command::Boot {
                name: self.name,
                flavor: self.flavor,
                host: self.host,
            },
            self.json,
        )
    }
}
impl Resize {
    pub fn command(self) -> (Command, bool) {
        let name = self.name;
        let cmd = match (self.flavor, self.confirm) {
            (Some(flavor), _) => Command::Resize { name, flavor },
            (None, true) => Command::ConfirmResize { name },
            (None, false) => Command::RevertResize { name },
        };
        (cmd, self.json)
    }
}
impl Migrate {
    pub fn command(self) -> (Command, bool) {
        (
            Command::Migrate {
                name: self.name,
                live: self.live,
                host: self.host,
            },
            self.json,
        )
    }
}
impl Named {
    pub fn action(self, action: ServerAction) -> (Command, bool) {
        (
            Command::Act {
                name: self.name,
                action,
            },
            self.json,
        )
    }
    pub fn delete(self) -> (Command, bool) {
        (Command::Delete { name: self.name }, self.json)
    }
}
