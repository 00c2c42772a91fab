//! Real components for tests: a `nats-server -js` on a free 127.0.0.1 port with a temp store,
//! ready when returned, that can be stopped, killed with SIGKILL and restarted on the same store,
//! and is removed (process and files) when dropped.

use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;
use usbpt_bus::auth::{CredsDir, Role};
use usbpt_bus::server::{ClusterConfig, NatsServer, ServerConfig};
use usbpt_bus::{Bus, StreamSettings};

/// umockdev testbeds for agent tests (feature `umockdev`: links libumockdev).
#[cfg(feature = "umockdev")]
pub mod umockdev;

/// A private nats-server for one test.
#[derive(Debug)]
pub struct TestNats {
    server: NatsServer,
    // Dropped after `server` (fields drop in order), so the process dies before its store.
    _dir: TempDir,
}

impl TestNats {
    /// Starts a server with the default (periodic) fsync.
    pub async fn start() -> Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// Starts a server after `tweak` adjusts its config (e.g. `sync_always`).
    pub async fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("usbpt-nats-")
            .tempdir()
            .context("temp dir for nats-server")?;
        let mut config = ServerConfig::new(dir.path());
        tweak(&mut config);
        let server = NatsServer::start(config)
            .await
            .context("start nats-server")?;
        Ok(Self { server, _dir: dir })
    }

    /// Starts a server that enforces usbpt's generated identities (ADR 0005): an admin, the
    /// projector, the command handler, an auditor and an agent for each of `hosts`, their seed
    /// files in the returned directory.
    pub async fn start_secured(hosts: &[&str]) -> Result<(Self, CredsDir)> {
        let dir = tempfile::Builder::new()
            .prefix("usbpt-nats-")
            .tempdir()
            .context("temp dir for nats-server")?;
        let creds = CredsDir::open(dir.path().join("creds"))?;
        for role in [Role::Admin, Role::Projector, Role::Commands, Role::Auditor] {
            creds.ensure(&role)?;
        }
        for h in hosts {
            creds.ensure(&Role::Agent(usbpt_schemas::HostName::new(*h)?))?;
        }
        let mut config = ServerConfig::new(dir.path().join("nats"));
        config.auth = Some(creds.write_auth_conf()?);
        let server = NatsServer::start(config)
            .await
            .context("start nats-server")?;
        Ok((Self { server, _dir: dir }, creds))
    }

    /// Connects as `role` (its seed in `creds`).
    pub async fn bus_as(&self, creds: &CredsDir, role: &Role) -> Result<Bus> {
        Bus::connect(
            &self.url(),
            Some(&creds.path(role)),
            &StreamSettings::default(),
        )
        .await
        .with_context(|| format!("connect as {}", role.name()))
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The server's log so far (permission violations are logged there).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.server.dir().join("nats-server.log")).unwrap_or_default()
    }
    pub fn port(&self) -> u16 {
        self.server.port()
    }
    pub fn server(&mut self) -> &mut NatsServer {
        &mut self.server
    }

    /// Connects a bus client with the default stream settings.
    pub async fn bus(&self) -> Result<Bus> {
        Bus::connect(&self.url(), None, &StreamSettings::default())
            .await
            .context("connect bus")
    }

    /// Graceful stop.
    pub async fn stop(&mut self) -> Result<()> {
        Ok(self.server.stop().await?)
    }
    /// SIGKILL, as a crash would.
    pub async fn kill(&mut self) {
        self.server.kill().await
    }
    /// Restart on the same store and port.
    pub async fn restart(&mut self) -> Result<()> {
        Ok(self.server.restart().await?)
    }
}

/// A 3-node (or n-node) JetStream cluster on loopback, each node with its own temp store.
#[derive(Debug)]
pub struct TestCluster {
    pub nodes: Vec<NatsServer>,
    _dirs: Vec<TempDir>,
}

/// A free TCP port on 127.0.0.1 (bound then released; the window for a clash is tiny).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind a free port")?;
    Ok(l.local_addr()?.port())
}

impl TestCluster {
    pub async fn start(n: usize) -> Result<Self> {
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_>>()?;
        let client_ports: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_>>()?;
        let mut dirs = Vec::new();
        let mut starting = Vec::new();
        for i in 0..n {
            let dir = tempfile::Builder::new()
                .prefix(&format!("usbpt-cluster-{i}-"))
                .tempdir()?;
            let mut config = ServerConfig::new(dir.path());
            config.name = format!("n{i}");
            config.port = Some(client_ports[i]);
            config.cluster = Some(ClusterConfig {
                name: "usbpt-test".into(),
                port: cluster_ports[i],
                routes: cluster_ports
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, p)| *p)
                    .collect(),
            });
            dirs.push(dir);
            // Nodes only report ready once they can reach a JetStream quorum: start them together.
            starting.push(tokio::spawn(NatsServer::start(config)));
        }
        let mut nodes = Vec::new();
        for s in starting {
            nodes.push(
                s.await
                    .context("join node start")?
                    .context("start cluster node")?,
            );
        }
        // "Server is ready" comes before the JetStream meta leader is elected; the server
        // offers no notification for that, so ask until the JetStream API answers.
        let admin = usbpt_bus::admin::StreamAdmin::connect(&nodes[0].url()).await?;
        eventually(Duration::from_secs(30), || {
            let admin = admin.clone();
            async move { admin.jetstream_ready().await.then_some(()) }
        })
        .await
        .context("JetStream cluster never became ready")?;
        Ok(Self { nodes, _dirs: dirs })
    }

    /// A URL listing every node, so a client fails over.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Polls `check` until it returns `Some`, for state that offers no notification (e.g. a process
/// having written a file). Prefer awaiting an event; this is for the rest. Fails after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("condition not met within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
