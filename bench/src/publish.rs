//! Agent publish throughput: `n` events already in the agent's redb outbox (as a burst of
//! hotplugs or an outage would leave them) drained into JetStream by the real agent loop — in
//! order, each with its `Nats-Msg-Id`, a window of acks in flight, and one durable redb commit
//! removing each acknowledged window.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::{mpsc, oneshot};
use usbpt_agent::store::{self, Store};
use usbpt_agent::{AgentConfig, BusTarget, Filter, Progress};
use usbpt_schemas::{codec, HostName};

use crate::codec::sample_discovered_on;
use crate::report::Figure;
use crate::target::Target;

/// Queues `n` `DeviceDiscovered` events in a fresh agent's outbox, starts the agent and times
/// the drain. Returns the figure and the encoded size of one event.
pub async fn agent_publish(target: &Target, n: usize) -> Result<(Figure, usize)> {
    let bus = target.fresh_bus().await?;
    let dir = tempfile::Builder::new().prefix("usbpt-bench-").tempdir()?;
    let host = HostName::new("bench-publisher")?;
    let envelopes: Vec<_> = (0..n).map(|_| sample_discovered_on(host.clone())).collect();
    let size = envelopes
        .first()
        .map(codec::encode)
        .transpose()?
        .map_or(0, |b| b.len());
    {
        let data = dir.path().join("agent");
        std::fs::create_dir_all(&data)?;
        let (store, state) = Store::open(&data.join(store::file_name(&host)))?;
        store.commit(&state, &state, &envelopes)?;
    }
    drop(envelopes);

    let (tx, mut progress) = mpsc::unbounded_channel();
    let config = AgentConfig {
        host: host.clone(),
        boot_id: "bench-boot".into(),
        hypervisor_uri: "test:///default".into(),
        data_dir: dir.path().join("agent"),
        filter: Filter::default(),
        bus: BusTarget::new(target.url()),
        progress: Arc::new(move |p: &Progress| {
            let _ = tx.send(p.clone());
        }),
        drain_on_stop: Duration::from_secs(2),
        flap: usbpt_agent::FlapSettings::default(),
    };
    let (source, _sim) = usbpt_agent::source::simulated(Vec::new());
    let (stop, stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(usbpt_agent::run(config, source, async move {
        let _ = stopped.await;
    }));

    // From the moment the agent is watching (its outbox loaded) to the outbox drained.
    let total = n as u64 + 1; // + HostAgentStarted
    let mut started = None;
    let mut published = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while published < total {
        let p = tokio::time::timeout_at(deadline, progress.recv())
            .await
            .context("the agent did not drain its outbox within 600 s")?
            .context("the agent stopped")?;
        match p {
            Progress::Ready { outbox, .. } => {
                if outbox != total {
                    bail!("the agent's outbox holds {outbox} events, expected {total}");
                }
                started = Some(Instant::now());
            }
            Progress::Drained { published: p } => published += p,
            _ => {}
        }
    }
    let elapsed = started.map_or(Duration::ZERO, |s| s.elapsed());
    let stored = bus.last_sequence().await?;
    if stored != total {
        bail!("the stream holds {stored} events, expected {total}");
    }
    let _ = stop.send(());
    agent.await.context("agent task")??;
    let rate = total as f64 / elapsed.as_secs_f64().max(1e-9);
    let mut figure = Figure::new(
        "agent_publish",
        "agent publish: outbox → JetStream (queued burst)",
        total,
    )
    .rate(rate)
    .note(format!(
        "{size} B DeviceDiscovered; in order, up to {} acks in flight, one durable outbox commit per window",
        usbpt_agent::PUBLISH_WINDOW
    ));
    // Issue 16's target, on the default-fsync server (an fsync per message bounds the other).
    if target.suffix.is_empty() {
        figure = figure.floor("≥ 20,000/s", rate >= 20_000.0);
    }
    Ok((figure, size))
}
