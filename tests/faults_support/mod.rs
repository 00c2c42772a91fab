//! Shared by the `faults_*` tests: a live projector folding the stream into a redb view while
//! faults happen, and the end check that the view equals a clean replay of the stream.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::sync::oneshot;
use usbpt_bus::{Bus, StreamSettings};
use usbpt_projector::{
    digest, replay, DeviceStatus, Projector, ProjectorConfig, ProjectorError, View,
};
use usbpt_schemas::HostName;

/// `(syspath, bus, devnum, serial)`: one present enumeration, as tests compare pictures.
pub type Seen = (String, u16, u16, Option<String>);

/// A projector folding `USBPT_EVENTS` into a view in a temp dir, in this process. It rides out
/// bus outages itself (fetch errors are retried with backoff).
pub struct LiveProjector {
    pub view: Arc<View>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ProjectorError>>,
    dir: tempfile::TempDir,
}

impl LiveProjector {
    pub async fn start(url: &str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("usbpt-faults-").tempdir()?;
        let bus = Bus::connect(url, None, &StreamSettings::default()).await?;
        let view = Arc::new(View::open(dir.path().join("view.redb"))?);
        let projector = Projector::new(
            bus,
            Arc::clone(&view),
            ProjectorConfig {
                consumer: "faults-projector".into(),
                // Short long-polls, so a fetch parked on a killed server is retried soon.
                fetch_wait: Duration::from_secs(1),
                ..ProjectorConfig::default()
            },
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(projector.run(async move {
            let _ = stopped.await;
        }));
        Ok(Self {
            view,
            stop: Some(stop),
            task,
            dir,
        })
    }

    /// Waits until the view has folded everything the stream holds now; returns that sequence.
    pub async fn caught_up(&self, bus: &Bus) -> Result<u64> {
        let head = bus.last_sequence().await?;
        if !self.view.wait_applied(head, Duration::from_secs(60)).await {
            bail!(
                "the view is at {} and did not reach the stream's head {head} within 60 s",
                self.view.last_applied()?
            );
        }
        Ok(head)
    }

    /// Stops the projector (it finishes the batch it is folding).
    pub async fn stop(mut self) -> Result<Arc<View>> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("the projector did not stop")???;
        Ok(self.view)
    }

    /// The view is exactly what a replay of the stream from sequence 1 builds: same tables,
    /// same keys, same bytes. Nothing folded twice, nothing skipped.
    pub async fn assert_equals_replay(&self, bus: &Bus) -> Result<()> {
        let last = self.caught_up(bus).await?;
        let scratch = Arc::new(View::open_private(self.dir.path().join("replay.redb"))?);
        let r = replay::rebuild(bus, Arc::clone(&scratch), last, |_| {}).await?;
        assert_eq!(r.last_seq, last, "the replay folded the whole stream");
        let diff = digest::first_difference(&self.view.snapshot()?, &scratch.snapshot()?)?;
        assert_eq!(
            diff, None,
            "the live view differs from a replay of the stream"
        );
        assert_eq!(
            self.view.snapshot()?.quarantine_len()?,
            0,
            "nothing was quarantined"
        );
        Ok(())
    }

    /// `(syspath, bus, devnum, serial)` of every enumeration the view says is present on
    /// `host`.
    pub fn present(&self, host: &HostName) -> Result<BTreeSet<Seen>> {
        let snap = self.view.snapshot()?;
        Ok(snap
            .host_devices(host)?
            .into_iter()
            .filter(|d| d.status != DeviceStatus::Invalidated)
            .map(|d| {
                (
                    d.discovery.syspath.clone(),
                    d.address().bus(),
                    d.address().devnum(),
                    d.serial().map(str::to_owned),
                )
            })
            .collect())
    }
}
