//! `usbpt creds add-host NAME | list | revoke NAME`: the NATS identities of a `usbpt up` (ADR
//! 0005), under `<data-dir>/creds`. A change rewrites the private nats-server's authorization
//! block and asks a running server to reload it; new agents then connect with
//! `--creds <data-dir>/creds/agent-NAME.nk`.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use usbpt_bus::auth::{CredsDir, Role};
use usbpt_schemas::HostName;

use crate::global::Global;

#[derive(Debug, Subcommand)]
pub enum CredsCmd {
    /// Generate an identity for a new host's agent (publishes only that host's events).
    AddHost(HostArg),
    /// Every identity: role, nkey public key, what it may do.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a host's (or the auditor's) identity: the server refuses it from its next reload.
    Revoke(RevokeArg),
}

#[derive(Debug, Args)]
pub struct HostArg {
    pub host: HostName,
}

#[derive(Debug, Args)]
pub struct RevokeArg {
    /// A host name, or an identity's name as `creds list` prints it (e.g. `auditor`).
    pub name: String,
}

fn creds_dir(global: &Global) -> Result<(CredsDir, std::path::PathBuf)> {
    let data = global.data_dir_or_default()?;
    Ok((CredsDir::open(data.join("creds"))?, data))
}

/// Rewrites the authorization block and reloads a running private server.
fn apply(creds: &CredsDir, data: &std::path::Path) -> Result<()> {
    creds.write_auth_conf()?;
    if usbpt_bus::server::signal_reload(&data.join("nats"))? {
        println!("the running nats-server reloaded its identities");
    } else {
        println!("no private nats-server runs on this data dir: the change applies when `usbpt up` starts");
    }
    Ok(())
}

pub fn run(global: &Global, cmd: CredsCmd) -> Result<()> {
    let (creds, data) = creds_dir(global)?;
    match cmd {
        CredsCmd::AddHost(HostArg { host }) => {
            let role = Role::Agent(host.clone());
            let existed = creds.path(&role).exists();
            let path = creds.ensure(&role)?;
            println!(
                "{} {host}: {} (give it to that host's agent as --creds, over a private channel)",
                if existed {
                    "kept the identity of"
                } else {
                    "new identity for"
                },
                path.display()
            );
            if let Ok(Some(c)) = crate::cmd_up::PrivateCreds::open(&data) {
                println!(
                    "its agent checks control work with --control-key {}",
                    c.control_key
                );
            }
            apply(&creds, &data)
        }
        CredsCmd::List { json } => {
            let ids = creds.list()?;
            if json {
                let rows: Vec<_> = ids
                    .iter()
                    .map(|i| {
                        serde_json::json!({
                            "name": i.role.name(),
                            "public_key": i.key.public_key(),
                            "may": i.role.summary(),
                            "file": creds.path(&i.role),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string(&rows)?);
            } else {
                for i in &ids {
                    println!(
                        "{:<24} {}  {}",
                        i.role.name(),
                        i.key.public_key(),
                        i.role.summary()
                    );
                }
            }
            Ok(())
        }
        CredsCmd::Revoke(RevokeArg { name }) => {
            let role = Role::from_name(&name)
                .or_else(|| HostName::new(name.clone()).ok().map(Role::Agent))
                .with_context(|| format!("no identity named {name:?}"))?;
            creds.revoke(&role)?;
            println!("revoked {}", role.name());
            apply(&creds, &data)
        }
    }
}
