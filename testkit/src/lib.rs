//! Real components for tests: a `nats-server -js` on a free 127.0.0.1 port with a temp store,
//! ready when returned, that can be stopped, killed with SIGKILL and restarted on the same store,
//! and is removed (process and files) when dropped.

use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;
use usbpt_bus::server::{NatsServer, ServerConfig};
use usbpt_bus::{Bus, StreamSettings};

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

    pub fn url(&self) -> String {
        self.server.url()
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
