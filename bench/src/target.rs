//! The nats-server a bench runs against: a private one in a temp dir (default fsync, or
//! `sync_interval: always`), or the operator's (`--nats`).
//!
//! usbpt's figures need the real `USBPT_EVENTS` stream (its subjects are fixed), so each phase
//! starts from an empty one. On the operator's server the bench refuses to run when that stream
//! (or its raw stream) already exists — it never writes synthetic events into a real history —
//! and deletes the streams it made when it ends.

use anyhow::{bail, Context, Result};
use tempfile::TempDir;
use usbpt_bus::admin::StreamAdmin;
use usbpt_bus::server::{NatsServer, ServerConfig};
use usbpt_bus::{Bus, StreamSettings};
use usbpt_schemas::subjects;

use crate::raw::RAW_STREAM;

/// One server under test.
#[derive(Debug)]
pub struct Target {
    url: String,
    /// Key suffix for this server's figures: `""` (default fsync or the operator's server) or
    /// `"sync_always"`.
    pub suffix: &'static str,
    /// Human label: `"default fsync"`, `"sync_interval: always"`, `"the given server"`.
    pub label: &'static str,
    /// `nats-server 2.15.1 (default fsync)`.
    pub description: String,
    server: Option<NatsServer>,
    _dir: Option<TempDir>,
}

impl Target {
    /// Starts a private nats-server with JetStream in a temp dir on a free loopback port.
    pub async fn private(sync_always: bool) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("usbpt-bench-nats-")
            .tempdir()
            .context("temp dir for the private nats-server")?;
        let mut config = ServerConfig::new(dir.path());
        config.sync_always = sync_always;
        config.name = "usbpt-bench".into();
        let server = NatsServer::start(config)
            .await
            .context("starting a private nats-server (pass --nats URL to use yours)")?;
        let (suffix, label) = if sync_always {
            ("sync_always", "sync_interval: always")
        } else {
            ("", "default fsync")
        };
        let mut t = Self {
            url: server.url(),
            suffix,
            label,
            description: String::new(),
            server: Some(server),
            _dir: Some(dir),
        };
        t.description = format!("{} ({label}, private, {})", t.version().await?, t.url);
        Ok(t)
    }

    /// The operator's server. Refuses one that already holds usbpt's streams.
    pub async fn external(url: &str) -> Result<Self> {
        let mut t = Self {
            url: url.to_owned(),
            suffix: "",
            label: "the given server",
            description: String::new(),
            server: None,
            _dir: None,
        };
        let admin = t.admin().await?;
        for name in [subjects::STREAM, RAW_STREAM] {
            if admin.stream_exists(name).await? {
                bail!(
                    "{url} already has a stream {name}: usbpt bench publishes synthetic events and deletes its streams afterwards, so it only runs against a server without them (a scratch server, or another account)"
                );
            }
        }
        t.description = format!(
            "{} (the given server {url}, its own fsync setting)",
            t.version().await?
        );
        Ok(t)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn is_private(&self) -> bool {
        self.server.is_some()
    }
    /// CPU seconds the private nats-server has used so far (`None` for the operator's server).
    pub fn server_cpu_seconds(&self) -> Option<f64> {
        let pid = self.server.as_ref()?.pid()?;
        Some(usbpt_projector::metrics::cpu_seconds_of(pid))
    }

    async fn admin(&self) -> Result<StreamAdmin> {
        StreamAdmin::connect(&self.url)
            .await
            .with_context(|| format!("connecting to {}", usbpt_bus::auth::redact_url(&self.url)))
    }

    async fn version(&self) -> Result<String> {
        Ok(format!(
            "nats-server {}",
            self.admin().await?.server_version()
        ))
    }

    /// Deletes `USBPT_EVENTS` (and its consumers) if present and connects a bus, which creates
    /// it empty.
    pub async fn fresh_bus(&self) -> Result<Bus> {
        if let Err(e) = self.admin().await?.delete_stream(subjects::STREAM).await {
            bail!(
                "cannot delete {} on {}: {e}",
                subjects::STREAM,
                usbpt_bus::auth::redact_url(&self.url)
            );
        }
        Bus::connect(&self.url, None, &StreamSettings::default())
            .await
            .with_context(|| {
                format!(
                    "connecting the bus at {}",
                    usbpt_bus::auth::redact_url(&self.url)
                )
            })
    }

    /// Removes the streams the bench made (on the operator's server; a private one is removed
    /// whole when dropped).
    pub async fn cleanup(&self) -> Result<()> {
        let admin = self.admin().await?;
        for name in [subjects::STREAM, RAW_STREAM] {
            let _ = admin.delete_stream(name).await;
        }
        Ok(())
    }

    /// Stops a private server (it is killed on drop otherwise).
    pub async fn stop(mut self) -> Result<()> {
        if let Some(s) = self.server.as_mut() {
            s.stop().await?;
        }
        Ok(())
    }
}
