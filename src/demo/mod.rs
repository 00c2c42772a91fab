//! `usbpt demo`: the whole stack on one machine — a private nats-server, the projector, the
//! command handler and the HTTP API, and two simulated hypervisor hosts whose agents run the real
//! agent loop (simulated device source → identity resolver → redb outbox → JetStream) and the
//! real libvirt executor (libvirt's test driver) — playing the demo story step by step.

mod hosts;
mod load;
mod story;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use usbpt_bus::server::NatsServer;
use usbpt_schemas::HostName;

use crate::cmd_serve::{control_plane, CommandArgs, ProjectorArgs, Tasks};
use crate::cmd_up::PrivateCreds;
use crate::global::Global;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Exit 0 when the story completes (non-zero, naming the step, if one fails) instead of
    /// serving the dashboard until Ctrl-C.
    #[arg(long)]
    pub exit_when_done: bool,
    /// Where the HTTP API and dashboard listen (a free port is taken if this one is busy).
    #[arg(long, default_value = crate::defaults::API_LISTEN)]
    pub listen: SocketAddr,
    /// Play a load scenario (TOML: `[load] hosts, devices_per_host, churn_per_second,
    /// duration_seconds`) instead of the built-in story.
    #[arg(long)]
    pub scenario: Option<PathBuf>,
}

/// The bus to use: the operator's, or a private nats-server under `root/nats` enforcing
/// per-role identities generated under `root/creds` (one per simulated host in `hosts`);
/// returned to keep it alive.
pub async fn bus_url(
    global: &Global,
    root: &std::path::Path,
    hosts: &[HostName],
    sync_always: bool,
) -> Result<(String, Option<NatsServer>, Option<PrivateCreds>)> {
    if crate::global::nats_given() {
        return Ok((global.nats.clone(), None, None));
    }
    let creds = PrivateCreds::ensure(root, hosts)?;
    let mut config = creds.server_config(root.join("nats"));
    config.sync_always = sync_always;
    let server = NatsServer::start(config)
        .await
        .context("starting a private nats-server")?;
    creds
        .create_stream(&server.url(), &usbpt_bus::StreamSettings::default())
        .await?;
    Ok((server.url(), Some(server), Some(creds)))
}

pub async fn run(global: &Global, args: DemoArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let scenario = args
        .scenario
        .as_deref()
        .map(load::Scenario::load)
        .transpose()?;
    let (root, _temp) = match &global.data_dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile::Builder::new().prefix("usbpt-demo-").tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let hosts = match &scenario {
        Some(s) => s.host_names()?,
        None => story::HOSTS
            .iter()
            .map(|h| HostName::new(*h))
            .collect::<Result<_, _>>()?,
    };
    usbpt_bus::auth::private_dir(&root)?;
    let (url, server, creds) = bus_url(global, &root, &hosts, false).await?;
    let control = match &creds {
        Some(c) => c.control_global(global, &url, root.join("control")),
        None => global.on_bus(&url, root.join("control")),
    };
    // The story and the load generator send commands as an operator would: as admin.
    let operator = match &creds {
        Some(c) => Global {
            creds: Some(c.dir.path(&usbpt_bus::auth::Role::Admin)),
            command_creds: None,
            ..control.clone()
        },
        None => control.clone(),
    };
    let (token, token_file) = crate::api_auth::ensure_token(global, &root)?;
    let mut tasks = Tasks::new();
    let listener = crate::cmd_serve::bind_or_free("demo", args.listen).await?;
    let policy = usbpt_api::HttpPolicy::with_token(token.clone());
    let dashboard = format!("http://{}/", listener.local_addr()?);
    let (view, _) = control_plane(
        &control,
        &mut tasks,
        listener,
        policy,
        &ProjectorArgs::default(),
        &CommandArgs::default(),
    )
    .await?;

    println!("usbpt demo: the demo story on a private bus and two simulated hypervisor hosts");
    match &server {
        Some(s) => println!(
            "  bus        {url}  (private nats-server, store in {})",
            s.dir().display()
        ),
        None => println!("  bus        {}", usbpt_bus::auth::redact_url(&url)),
    }
    if let Some(c) = &creds {
        println!(
            "  identities {}  (nkeys, one per role; permissions in docs/security.md)",
            c.dir.dir().display()
        );
    }
    println!("  dashboard  {dashboard}");
    crate::api_auth::announce("             ", &dashboard, &token, token_file.as_deref());
    println!("  data       {}", root.display());
    println!();

    let bus = operator.bus().await?;
    let exit = args.exit_when_done;
    let stopping = tasks.stopping();
    let story = story::Story::new(bus.clone(), Arc::clone(&view), url.clone(), root.clone());
    tasks.spawn("story", async move {
        let hosts = match scenario {
            Some(s) => load::play(s, bus, view, url, root).await?,
            None => story.play().await?,
        };
        println!();
        println!(
            "usbpt demo: the story is complete ({:.1} s). Dashboard: {dashboard}",
            started.elapsed().as_secs_f64()
        );
        if !exit {
            // The simulated hosts' agents keep running: servers booted, resized or deleted from
            // here on (usbpt CLI, openstack CLI, dashboard) are carried out on them.
            let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
            println!(
                "usbpt demo: serving until Ctrl-C; the agents of {} keep running",
                names.join(", ")
            );
            stopping.await;
        }
        for mut h in hosts {
            h.stop_agent().await;
        }
        Ok(())
    });
    let result = tasks.run().await;
    drop(server);
    result
}
