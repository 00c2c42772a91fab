//! Projector fold throughput and full replay, against the raw engines on the same stream: an
//! ordered-consumer read of it, batched redb inserts of the same records, and both together.
//!
//! The stream holds a deterministic synthetic history (`projector::workload`: hosts with 16
//! devices, boots with claims and attaches, deletes, re-enumerations, reboots), published with
//! 1,000 acks in flight.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use redb::Durability;
use usbpt_projector::workload::{publish_all, Workload};
use usbpt_projector::{digest, replay, Projector, ProjectorConfig, View};
use usbpt_schemas::subjects;

use crate::raw;
use crate::report::Figure;
use crate::stats::Samples;
use crate::target::Target;

/// The live projector's largest fetch (and transaction) while behind, and the raw batch it is
/// compared with.
const LIVE_BATCH: usize = 10_000;

pub async fn fold_and_replay(target: &Target, events: usize) -> Result<Vec<Figure>> {
    let bus = target.fresh_bus().await?;
    let dir = tempfile::Builder::new().prefix("usbpt-bench-").tempdir()?;
    let hosts = (events / 500).clamp(10, 2000);
    let history: Vec<_> = Workload::new(1, hosts, 16).take(events).collect();
    let t = Instant::now();
    let last = publish_all(&bus, history, 1000).await?;
    let publish_rate = last as f64 / t.elapsed().as_secs_f64();
    if last != events as u64 {
        bail!("the stream holds {last} events, expected {events}");
    }
    let mut figures = vec![Figure::new(
        "setup_publish_history",
        "setup: publish the synthetic history, 1000 acks in flight",
        last,
    )
    .rate(publish_rate)
    .note(format!(
        "{hosts} hosts × 16 devices and their history; Nats-Msg-Id on each"
    ))];

    // The live projector catching up: durable consumer, fetch (growing to 10,000 while
    // behind), fold, fsynced commit, ack.
    let live = Arc::new(View::open(dir.path().join("live.redb"))?);
    let mut projector = Projector::new(
        bus.clone(),
        Arc::clone(&live),
        ProjectorConfig {
            consumer: "bench-fold".into(),
            max_batch_size: LIVE_BATCH,
            ..ProjectorConfig::default()
        },
    );
    let mut per_batch = Samples::default();
    let (mut fetching, mut folding, mut acking) = (0.0f64, 0.0f64, 0.0f64);
    let t = Instant::now();
    while live.last_applied()? < last {
        let b = Instant::now();
        let messages = projector.fetch().await?;
        let fetched = b.elapsed();
        if messages.is_empty() {
            continue;
        }
        let folded = projector.fold(messages).await?;
        let committed = b.elapsed();
        folded.ack().await?;
        let done = b.elapsed();
        fetching += fetched.as_secs_f64();
        folding += (committed - fetched).as_secs_f64();
        acking += (done - committed).as_secs_f64();
        per_batch.push(done);
    }
    let fold_s = t.elapsed().as_secs_f64();
    let batches = per_batch.len();
    figures.push(
        Figure::new(
            "fold_live",
            "projector fold, live: fetch, fold, fsync per batch, ack",
            last,
        )
        .rate(last as f64 / fold_s)
        .latency(per_batch.summary())
        .note(format!(
            "{batches} batches of up to {LIVE_BATCH}, latency per batch; {fold_s:.2} s = fetch {fetching:.2} s + fold and commit {folding:.2} s + ack {acking:.2} s, one after the other"
        )),
    );
    figures.push(
        Figure::new(
            "fold_apply",
            "projector fold alone: apply_batch, fsync per batch",
            last,
        )
        .rate(last as f64 / folding.max(1e-9))
        .note("the live path's fold-and-commit time only (decode, every table write, commit)"),
    );

    // Audit replay into a fresh file: ordered consumer, unsynced intermediate commits.
    let scratch = Arc::new(View::open_private(dir.path().join("replay.redb"))?);
    let t = Instant::now();
    let r = replay::rebuild(&bus, Arc::clone(&scratch), last, |_| {}).await?;
    let replay_s = t.elapsed().as_secs_f64();
    let same = digest::first_difference(&live.snapshot()?, &scratch.snapshot()?)?;
    if let Some(d) = same {
        bail!("the replayed view differs from the live one: {d:?}");
    }
    figures.push(
        Figure::new(
            "replay",
            "full replay: ordered read, fold, no fsync until the end",
            r.last_seq,
        )
        .rate(r.last_seq as f64 / replay_s)
        .note(format!(
            "{} quarantined; {:.1} s; the replayed view equals the live one, table by table",
            r.quarantined, replay_s
        )),
    );
    let size = std::fs::metadata(dir.path().join("live.redb"))?.len();
    figures.push(
        Figure::new("view_file_size", "view file after the history", last)
            .value(size as f64 / (1024.0 * 1024.0), "MiB"),
    );
    drop((live, scratch, projector));

    // The raw engines on the same stream and records.
    let url = target.url();
    figures.push(raw::ordered_read(url, subjects::STREAM, last).await?);
    let (both, payloads) = raw::read_insert(
        url,
        subjects::STREAM,
        last,
        LIVE_BATCH,
        Durability::Immediate,
        "raw_read_insert",
    )
    .await?;
    figures.push(both);
    let (both, _) = raw::read_insert(
        url,
        subjects::STREAM,
        last,
        replay::REPLAY_BATCH,
        Durability::None,
        "raw_read_insert_nosync",
    )
    .await?;
    figures.push(both);
    let insert = {
        let payloads = payloads.clone();
        tokio::task::spawn_blocking(move || {
            raw::redb_batched_insert(
                &payloads,
                LIVE_BATCH,
                Durability::Immediate,
                "raw_redb_insert",
            )
        })
        .await??
    };
    figures.push(insert);
    let insert = tokio::task::spawn_blocking(move || {
        raw::redb_batched_insert(
            &payloads,
            replay::REPLAY_BATCH,
            Durability::None,
            "raw_redb_insert_nosync",
        )
    })
    .await??;
    figures.push(insert);
    Ok(figures)
}
