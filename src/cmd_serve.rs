//! `usbpt serve` (the projector and the HTTP API in one process; the command handler joins them
//! here) and `usbpt projector` (the projector alone, optionally with the read API, for
//! scale-out read replicas).
//!
//! Structure: [`ReadSide::open`] opens the view and the bus and builds the projector;
//! [`ReadSide::api_state`] gives the HTTP state; [`Tasks`] runs named tasks until SIGINT/SIGTERM
//! or until one fails, then stops them all. Another part of the process (the command handler)
//! adds its routes to the router and its task to the [`Tasks`] in [`serve`].

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{error, info, warn};
use usbpt_api::ApiState;
use usbpt_bus::Bus;
use usbpt_commands::handler::Handler;
use usbpt_commands::reactor;
use usbpt_commands::schedule::Weigh;
use usbpt_projector::{Projector, ProjectorConfig, View, ViewError, ViewSync, VIEW_FILE};

use crate::defaults;
use crate::global::Global;

#[derive(Debug, Args)]
pub struct ProjectorArgs {
    /// The durable consumer's name; every projector with its own view needs its own.
    #[arg(long, default_value = defaults::PROJECTOR_CONSUMER)]
    pub consumer: String,
    /// Events per fetch and per redb transaction.
    #[arg(long, default_value_t = defaults::PROJECTOR_BATCH, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub batch: u64,
    /// How soon a commit of the view is on disk, in milliseconds: 0 makes every commit durable
    /// (an fsync per commit); N makes commits visible at once and durable within N ms. The view
    /// is rebuilt from the stream, so a crash loses no event either way: it refolds what was
    /// not yet durable (ADR 0015, docs/performance.md). While N > 0 no other process can open
    /// the view (`usbpt replay --verify` of it waits until the process stops).
    #[arg(long, default_value_t = defaults::VIEW_SYNC_MS, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub view_sync_ms: u64,
    /// Live-event (`/v1/events`) clients the HTTP API serves at once; one more gets 503 with
    /// `Retry-After`. They all share one reader of the stream.
    #[arg(long, env = "USBPT_SSE_MAX_CLIENTS", default_value_t = defaults::SSE_MAX_CLIENTS, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub sse_max_clients: u64,
}

impl Default for ProjectorArgs {
    /// The flags' defaults (what `up` and `demo` run).
    fn default() -> Self {
        Self {
            consumer: defaults::PROJECTOR_CONSUMER.to_owned(),
            batch: defaults::PROJECTOR_BATCH,
            view_sync_ms: defaults::VIEW_SYNC_MS,
            sse_max_clients: defaults::SSE_MAX_CLIENTS,
        }
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where the HTTP API listens.
    #[arg(long, default_value = defaults::API_LISTEN)]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub http: crate::api_auth::ApiSecurityArgs,
    #[command(flatten)]
    pub projector: ProjectorArgs,
    #[command(flatten)]
    pub commands: CommandArgs,
}

/// The command handler's knobs.
#[derive(Debug, Args)]
pub struct CommandArgs {
    /// How the scheduler chooses among hosts that can all take a server.
    #[arg(long, value_enum, default_value = "pack")]
    pub weigh: WeighArg,
    /// Seconds a claimed device may be gone before its claim is released (`follow=lineage`).
    #[arg(long, default_value_t = defaults::GRACE.as_secs())]
    pub grace: u64,
    /// Commands handled at once by this process.
    #[arg(long, default_value_t = defaults::COMMAND_CONCURRENCY)]
    pub concurrency: usize,
    /// Nova's `resize_confirm_window`: seconds after which a resize still awaiting confirmation
    /// (`VERIFY_RESIZE`) is confirmed; 0 never does (Nova's default).
    #[arg(long, default_value_t = 0, env = "USBPT_RESIZE_CONFIRM_WINDOW")]
    pub resize_confirm_window: u64,
}

impl Default for CommandArgs {
    /// The flags' defaults (what `up` and `demo` run).
    fn default() -> Self {
        Self {
            weigh: WeighArg::Pack,
            grace: defaults::GRACE.as_secs(),
            concurrency: defaults::COMMAND_CONCURRENCY,
            resize_confirm_window: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum WeighArg {
    Pack,
    Spread,
}

#[derive(Debug, Args)]
pub struct CommandsCmdArgs {
    #[command(flatten)]
    pub projector: ProjectorArgs,
    #[command(flatten)]
    pub commands: CommandArgs,
}

impl CommandArgs {
    /// The handler over `side`'s view, appending through `bus` (the command handler's own
    /// identity when `--command-creds` names one).
    pub fn handler(&self, side: &ReadSide, bus: Bus) -> Arc<Handler<View>> {
        let weigh = match self.weigh {
            WeighArg::Pack => Weigh::Pack,
            WeighArg::Spread => Weigh::Spread,
        };
        Arc::new(Handler::new(bus, Arc::clone(&side.view), weigh))
    }

    /// Adds the NATS command service and the reactor to `tasks`.
    pub fn spawn(&self, tasks: &mut Tasks, side: &ReadSide, handler: Arc<Handler<View>>, bus: Bus) {
        if self.resize_confirm_window > 0 {
            let window = Duration::from_secs(self.resize_confirm_window);
            let (reader, view, handler) = (
                side.bus.clone(),
                Arc::clone(&side.view),
                Arc::clone(&handler),
            );
            let stopping = tasks.stopping();
            tasks.spawn("auto-confirm", async move {
                tokio::select! {
                    r = crate::auto_confirm::run(reader, view, handler, window) => r,
                    () = stopping => Ok(()),
                }
            });
        }
        let concurrency = self.concurrency.max(1);
        let stopping = tasks.stopping();
        tasks.spawn("commands", async move {
            tokio::select! {
                r = handler.serve_nats(concurrency) => r.context("command service"),
                () = stopping => Ok(()),
            }
        });
        let (view, grace) = (Arc::clone(&side.view), Duration::from_secs(self.grace));
        let stopping = tasks.stopping();
        tasks.spawn("reactor", async move {
            tokio::select! {
                r = reactor::run(bus, view, grace) => r.context("reactor"),
                () = stopping => Ok(()),
            }
        });
    }
}

#[derive(Debug, Args)]
pub struct ProjectorCmdArgs {
    /// Also serve the read API and /metrics on this address.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    #[command(flatten)]
    pub http: crate::api_auth::ApiSecurityArgs,
    #[command(flatten)]
    pub projector: ProjectorArgs,
}

/// The live view's path, `<data-dir>/view.redb`.
pub fn view_path(global: &Global) -> Result<PathBuf> {
    Ok(global.data_dir_or_default()?.join(VIEW_FILE))
}

/// Opens (creating) the live view, for commits made durable as `sync` says (ADR 0015). A view
/// of an older record format is moved aside and rebuilt from the stream: it is a pure fold,
/// nothing is lost.
pub fn open_view(global: &Global, sync: ViewSync) -> Result<Arc<View>> {
    let open = |path: &std::path::Path| View::open_for(path, sync);
    let path = view_path(global)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the data directory {}", dir.display()))?;
    }
    match open(&path) {
        Ok(v) => Ok(Arc::new(v)),
        Err(ViewError::Format { found, .. }) => {
            let aside = path.with_extension(format!("redb.format-{found}"));
            warn!(path = %path.display(), aside = %aside.display(), "view of another format: rebuilding it from the stream");
            std::fs::rename(&path, &aside)
                .with_context(|| format!("moving {} aside", path.display()))?;
            Ok(Arc::new(open(&path)?))
        }
        Err(e) => Err(e.into()),
    }
}

/// The read side of a process: the view, the bus and the projector folding into the view.
#[derive(Debug)]
pub struct ReadSide {
    pub view: Arc<View>,
    pub bus: Bus,
    pub projector: Projector,
    pub fanout: usbpt_api::fanout::FanoutConfig,
}

impl ReadSide {
    pub async fn open(global: &Global, args: &ProjectorArgs) -> Result<Self> {
        let bus = global.bus().await?;
        let view_sync = ViewSync::from_millis(args.view_sync_ms);
        let view = open_view(global, view_sync)?;
        let config = ProjectorConfig {
            consumer: args.consumer.clone(),
            batch_size: usize::try_from(args.batch).unwrap_or(1000),
            view_sync,
            ..ProjectorConfig::default()
        };
        let projector = Projector::new(bus.clone(), Arc::clone(&view), config);
        Ok(Self {
            view,
            bus,
            projector,
            fanout: usbpt_api::fanout::FanoutConfig {
                max_clients: usize::try_from(args.sse_max_clients).unwrap_or(usize::MAX),
                ..Default::default()
            },
        })
    }

    /// The HTTP API's state over this view, bus and projector, with the agents' liveness
    /// followed from their heartbeats by a `liveness` task (ADR 0008).
    pub fn api_state(&self, tasks: &mut Tasks) -> ApiState {
        let liveness = usbpt_api::liveness::Liveness::new();
        let (bus, stopping) = (self.bus.clone(), tasks.stopping());
        let tracker = Arc::clone(&liveness);
        tasks.spawn("liveness", async move {
            tracker
                .track(bus, stopping)
                .await
                .map_err(anyhow::Error::msg)
        });
        ApiState::new(Arc::clone(&self.view))
            .with_bus(self.bus.clone())
            .with_metrics(self.projector.metrics())
            .with_shutdown(tasks.shutdown_flag())
            .with_fanout(self.fanout)
            .with_liveness(liveness)
    }
}

type Task = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// Named tasks that run until a signal (SIGINT, SIGTERM) or until one of them ends; then the
/// shutdown flag is raised and the others get 10 s to finish.
#[derive(Debug)]
pub struct Tasks {
    set: JoinSet<(&'static str, Result<()>)>,
    stop: watch::Sender<bool>,
}

impl Tasks {
    pub fn new() -> Self {
        Self {
            set: JoinSet::new(),
            stop: watch::Sender::new(false),
        }
    }

    /// Resolves when the process is shutting down.
    pub fn stopping(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// The shutdown flag, for things that watch it (the API's live streams).
    pub fn shutdown_flag(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    pub fn spawn(
        &mut self,
        name: &'static str,
        task: impl Future<Output = Result<()>> + Send + 'static,
    ) {
        let task: Task = Box::pin(task);
        self.set.spawn(async move { (name, task.await) });
    }

    /// Runs until a signal or a task's end; returns the first task error.
    pub async fn run(mut self) -> Result<()> {
        let mut first_error = None;
        tokio::select! {
            s = shutdown_signal() => info!(signal = s, "shutting down"),
            Some(done) = self.set.join_next() => {
                match done {
                    Ok((name, Ok(()))) => info!(task = name, "task ended; shutting down"),
                    Ok((name, Err(e))) => {
                        error!(task = name, error = %format!("{e:#}"), "task failed; shutting down");
                        first_error = Some(e.context(format!("{name} failed")));
                    }
                    Err(e) => first_error = Some(anyhow!("a task panicked: {e}")),
                }
            }
        }
        crate::systemd::stopping();
        self.stop.send_replace(true);
        let drain = async {
            while let Some(done) = self.set.join_next().await {
                if let Ok((name, Err(e))) = done {
                    warn!(task = name, error = %format!("{e:#}"), "task failed while stopping");
                    first_error.get_or_insert(e.context(format!("{name} failed")));
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), drain)
            .await
            .is_err()
        {
            warn!("tasks did not stop within 10 s; leaving them");
        }
        first_error.map_or(Ok(()), Err)
    }
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term => "SIGTERM",
    }
}

/// Binds `addr`, or a free loopback port when it is taken.
pub async fn bind_or_free(what: &str, addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    match bind(what, addr).await {
        Ok(l) => Ok(l),
        Err(_) => bind(what, SocketAddr::from(([127, 0, 0, 1], 0))).await,
    }
}

/// Binds the API and announces it on stderr (one line: scripts and tests read the port).
pub async fn bind(what: &str, addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    eprintln!(
        "usbpt {what}: listening on http://{}",
        listener.local_addr()?
    );
    Ok(listener)
}

/// `usbpt serve`.
pub async fn serve(global: &Global, args: ServeArgs) -> Result<()> {
    let policy = args.http.policy(args.listen, global.given_api_token()?)?;
    let mut tasks = Tasks::new();
    let listener = bind("serve", args.listen).await?;
    let addr = listener.local_addr()?;
    control_plane(
        global,
        &mut tasks,
        listener,
        policy,
        &args.projector,
        &args.commands,
    )
    .await?;
    crate::systemd::ready(&format!("serving on http://{addr}"));
    tasks.run().await
}

/// The control plane of one process, added to `tasks`: the projector folding into the view, the
/// command handler (NATS service) and its reactor, and the HTTP API on `listener` (reads,
/// commands, dashboard). Used by `serve`, `up` and `demo`; returns the view and the bus.
pub async fn control_plane(
    global: &Global,
    tasks: &mut Tasks,
    listener: tokio::net::TcpListener,
    mut policy: usbpt_api::HttpPolicy,
    projector: &ProjectorArgs,
    commands: &CommandArgs,
) -> Result<(Arc<View>, Bus)> {
    // The address actually bound (a free port may have been taken) is an accepted Host.
    policy.listen = Some(listener.local_addr()?);
    raise_open_files_limit();
    let side = ReadSide::open(global, projector).await?;
    let command_bus = command_bus(global, &side).await?;
    let handler = commands.handler(&side, command_bus.clone());
    let router = usbpt_api::router(side.api_state(tasks)).merge(usbpt_api::command_routes(
        Arc::clone(&handler),
        Arc::clone(&side.view),
    ));
    commands.spawn(tasks, &side, handler, command_bus);
    let (view, bus) = (Arc::clone(&side.view), side.bus.clone());
    let stopping = tasks.stopping();
    tasks.spawn("projector", async move {
        Ok(side.projector.run(stopping).await?)
    });
    let stopping = tasks.stopping();
    tasks.spawn("http", async move {
        usbpt_api::serve(listener, router, policy, stopping)
            .await
            .context("HTTP server")
    });
    Ok((view, bus))
}

/// Raises this process's soft limit on open files to its hard limit: each live-event client
/// holds a socket, and the usual soft limit (1024) would refuse connections below the client cap.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!(error = %e, soft, hard, "cannot raise the open-files limit");
            }
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot read the open-files limit"),
    }
}

/// The command handler's connection: its own identity (`--command-creds`), else the read
/// side's.
async fn command_bus(global: &Global, side: &ReadSide) -> Result<Bus> {
    if global.command_creds.is_some() {
        global.command_bus().await
    } else {
        Ok(side.bus.clone())
    }
}

/// `usbpt commands`: a projector into its own view plus the command handler and the reactor,
/// without HTTP (scale-out: run several, each with its own data dir and consumer name).
pub async fn commands(global: &Global, args: CommandsCmdArgs) -> Result<()> {
    let side = ReadSide::open(global, &args.projector).await?;
    let mut tasks = Tasks::new();
    let command_bus = command_bus(global, &side).await?;
    let handler = args.commands.handler(&side, command_bus.clone());
    args.commands.spawn(&mut tasks, &side, handler, command_bus);
    let stopping = tasks.stopping();
    let view = Arc::clone(&side.view);
    let head = side.bus.last_sequence().await?;
    tasks.spawn("projector", async move {
        Ok(side.projector.run(stopping).await?)
    });
    // Ready once the view has caught up with the stream as it was at start.
    view.wait_applied(head, Duration::from_secs(600)).await;
    eprintln!("usbpt commands: ready");
    crate::systemd::ready("command handler ready");
    tasks.run().await
}

/// `usbpt projector`.
pub async fn projector(global: &Global, args: ProjectorCmdArgs) -> Result<()> {
    let side = ReadSide::open(global, &args.projector).await?;
    let mut tasks = Tasks::new();
    if let Some(addr) = args.listen {
        let policy = args.http.policy(addr, global.given_api_token()?)?;
        raise_open_files_limit();
        let router = usbpt_api::router(side.api_state(&mut tasks));
        let listener = bind("projector", addr).await?;
        let stopping = tasks.stopping();
        tasks.spawn("http", async move {
            usbpt_api::serve(listener, router, policy, stopping)
                .await
                .context("HTTP server")
        });
    }
    let stopping = tasks.stopping();
    tasks.spawn("projector", async move {
        Ok(side.projector.run(stopping).await?)
    });
    crate::systemd::ready("projector running");
    tasks.run().await
}
