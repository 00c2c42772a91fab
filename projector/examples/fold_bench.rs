//! Fold throughput and full-replay time against a real nats-server:
//! `cargo run --release -p usbpt-projector --example fold_bench -- [EVENTS] [BATCH]`
//! (default 1,000,000 events, batches of 1000).
//!
//! Publishes a synthetic history (the `workload` module: 2,000 hosts × 16 devices, boots,
//! deletes, re-enumerations, reboots), then measures (1) the live projector path — durable
//! consumer, fetch, one fsynced redb transaction per batch, ack — and (2) an audit replay
//! (ordered consumer, unsynced intermediate commits) of the same stream. `REPLAY_COMMITS=20000,200000`
//! replays it again with each commit size.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use anyhow::Result;
use usbpt_bus::server::{NatsServer, ServerConfig};
use usbpt_bus::{Bus, StreamSettings};
use usbpt_projector::workload::{publish_all, Workload};
use usbpt_projector::{digest, replay, Projector, ProjectorConfig, View};

#[tokio::main]
async fn main() -> Result<()> {
    // As the `usbpt` binary does (ADR 0017); `MIMALLOC_ALLOW_THP=1` keeps them, to compare.
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        nix::sys::prctl::set_thp_disable(true)?;
    }
    let mut args = std::env::args().skip(1);
    let events: usize = args.next().map_or(Ok(1_000_000), |a| a.parse())?;
    let batch: usize = args.next().map_or(Ok(1000), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    if std::env::var_os("FOLD_ONLY").is_some() {
        return fold_only(events, batch, dir.path());
    }
    let mut server = NatsServer::start(ServerConfig::new(dir.path().join("nats"))).await?;
    let bus = Bus::connect(&server.url(), None, &StreamSettings::default()).await?;

    let t = Instant::now();
    let last = publish_all(&bus, Workload::new(1, 2000, 16).take(events), 1000).await?;
    let publish = t.elapsed();
    println!(
        "published {last} events in {:.2} s ({:.0}/s)",
        publish.as_secs_f64(),
        last as f64 / publish.as_secs_f64()
    );

    let live = Arc::new(View::open(dir.path().join("live.redb"))?);
    let p = Projector::new(
        bus.clone(),
        Arc::clone(&live),
        ProjectorConfig {
            batch_size: batch,
            max_commit_events: std::env::var("COMMIT")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(ProjectorConfig::default().max_commit_events),
            ..ProjectorConfig::default()
        },
    );
    let metrics = p.metrics();
    let cpu0 = usbpt_projector::metrics::process_cpu_seconds();
    let server_cpu = || {
        server
            .pid()
            .map_or(0.0, usbpt_projector::metrics::cpu_seconds_of)
    };
    let scpu0 = server_cpu();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let t = Instant::now();
    let running = tokio::spawn(p.run(async {
        let _ = stopped.await;
    }));
    assert!(
        live.wait_applied(last, std::time::Duration::from_secs(600))
            .await
    );
    let fold = t.elapsed();
    let cpu = usbpt_projector::metrics::process_cpu_seconds() - cpu0;
    let scpu = server_cpu() - scpu0;
    println!(
        "  projector process CPU during the live fold: {cpu:.2} s ({:.1} µs per event); nats-server {scpu:.2} s ({:.1} µs per event)",
        cpu * 1e6 / last as f64,
        scpu * 1e6 / last as f64
    );
    let _ = stop.send(());
    running.await??;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let batches = load(&metrics.batches);
    println!(
        "live projector run() (fetch {batch} growing to 10000, fold and write threads, group commit, fsync per commit): {last} events in {:.2} s = {:.0} events/s; {batches} commits, fold {:.2} s, write {:.2} s",
        fold.as_secs_f64(),
        last as f64 / fold.as_secs_f64(),
        load(&metrics.fold_micros) as f64 / 1e6,
        load(&metrics.write_micros) as f64 / 1e6,
    );

    if std::env::var_os("SKIP_REPLAY").is_some() {
        server.stop().await?;
        return Ok(());
    }
    let scratch = Arc::new(View::open_private(dir.path().join("replay.redb"))?);
    let r = timed_replay(&bus, &scratch, last, replay::REPLAY_COMMIT, "full replay").await?;
    println!("  ({} quarantined)", r.quarantined);
    let t = Instant::now();
    let same = digest::first_difference(&live.snapshot()?, &scratch.snapshot()?)?;
    println!(
        "verify (compare every table): {:.2} s, difference: {same:?}",
        t.elapsed().as_secs_f64()
    );
    let size = std::fs::metadata(dir.path().join("live.redb"))?.len();
    let replayed = std::fs::metadata(dir.path().join("replay.redb"))?.len();
    println!(
        "view file: {:.1} MiB (live), {:.1} MiB (replayed)",
        size as f64 / (1024.0 * 1024.0),
        replayed as f64 / (1024.0 * 1024.0)
    );
    // REPLAY_COMMITS=20000,200000: the replay again with each commit size, one after the other
    // (what the commit size costs, under the same load).
    if let Ok(sizes) = std::env::var("REPLAY_COMMITS") {
        for commit in sizes.split(',').map(str::parse::<usize>) {
            let commit = commit?;
            let path = dir.path().join(format!("replay-{commit}.redb"));
            let scratch = Arc::new(View::open_private(&path)?);
            let label = format!("full replay, commits of {commit}");
            timed_replay(&bus, &scratch, last, commit, &label).await?;
            drop(scratch);
            std::fs::remove_file(&path)?;
        }
    }
    let snap = live.snapshot()?;
    println!(
        "view: {} hosts, {} claims, {} quarantined",
        snap.hosts()?.len(),
        snap.claims()?.len(),
        snap.quarantine_len()?
    );
    server.stop().await?;
    Ok(())
}

/// The fold alone, without the bus: pre-encoded events into a view, one fsynced transaction per
/// batch (`FOLD_ONLY=1`).
fn fold_only(events: usize, batch: usize, dir: &std::path::Path) -> Result<()> {
    use usbpt_projector::{BatchOptions, RawEvent};
    let raw: Vec<RawEvent> = Workload::new(1, 2000, 16).raw(events)?;
    let view = View::open(dir.join("fold.redb"))?;
    let t = Instant::now();
    for chunk in raw.chunks(batch) {
        view.apply_batch(chunk, &BatchOptions::default())?;
    }
    let d = t.elapsed();
    println!(
        "fold only (batch {batch}, fsync per batch): {events} events in {:.2} s = {:.0} events/s",
        d.as_secs_f64(),
        events as f64 / d.as_secs_f64()
    );
    Ok(())
}

/// Replays the stream up to `last` into `view` in commits of `commit` events, and prints how
/// long it took and the process CPU per event under `label`.
async fn timed_replay(
    bus: &Bus,
    view: &Arc<View>,
    last: u64,
    commit: usize,
    label: &str,
) -> Result<replay::ReplayReport> {
    let cpu0 = usbpt_projector::metrics::process_cpu_seconds();
    let t = Instant::now();
    let r = replay::rebuild_in_commits_of(bus, Arc::clone(view), last, commit, |_| {}).await?;
    let secs = t.elapsed().as_secs_f64();
    let cpu = usbpt_projector::metrics::process_cpu_seconds() - cpu0;
    println!(
        "{label}: {} events in {secs:.2} s = {:.0} events/s; process CPU {cpu:.2} s ({:.1} µs per event)",
        r.last_seq,
        r.last_seq as f64 / secs,
        cpu * 1e6 / r.last_seq as f64,
    );
    Ok(r)
}
