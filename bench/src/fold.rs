//! Projector fold throughput and full replay, against the raw engines on the same stream: an
//! ordered-consumer read of it, batched redb inserts of the same records, and both together.
//!
//! The stream holds a deterministic synthetic history (`projector::workload`: hosts with 16
//! devices, boots with claims and attaches, deletes, re-enumerations, reboots), published with
//! 1,000 acks in flight.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use redb::Durability;
use usbpt_projector::workload::{publish_all, Workload};
use usbpt_projector::{digest, replay, BatchOptions, Projector, ProjectorConfig, RawEvent, View};
use usbpt_schemas::subjects;

use crate::raw;
use crate::report::Figure;
use crate::target::Target;

/// The live projector's largest fetch while behind.
const FETCH_MAX: usize = 10_000;

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

    // The raw limit the live fold is held against, measured just before it and again just
    // after it: this machine's speed drifts by ±15% over a minute, and the mean of the two
    // passes is what the fold meets, not whichever pass a drift favoured.
    let url = target.url();
    let commit_max = ProjectorConfig::default().max_commit_events;
    let server_cpu = || target.server_cpu_seconds().unwrap_or(0.0);
    // Every read path the client offers, and usbpt's own reader; the fastest raw one is the
    // baseline of the read + insert figures (a ratio is honest only against the best path).
    let reads = raw::ordered_reads(url, subjects::STREAM, last).await?;
    let best = reads[0].0;
    let own_read = usbpt_read(&bus, last).await?;
    let before = read_insert_pass(target, last, commit_max, best).await?;

    // The live projector catching up: its real `run()` loop (fetch ‖ fold ‖ write, group
    // commit of up to `max_commit_events`, an fsynced commit each).
    let live = Arc::new(View::open(dir.path().join("live.redb"))?);
    let config = ProjectorConfig {
        consumer: "bench-fold".into(),
        max_batch_size: FETCH_MAX,
        ..ProjectorConfig::default()
    };
    let projector = Projector::new(bus.clone(), Arc::clone(&live), config);
    let metrics = projector.metrics();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let cpu_before = usbpt_projector::metrics::process_cpu_seconds();
    let server_before = server_cpu();
    let t = Instant::now();
    let running = tokio::spawn(projector.run(async {
        let _ = stopped.await;
    }));
    let caught_up = live.wait_applied(last, Duration::from_secs(1800)).await;
    let fold_s = t.elapsed().as_secs_f64();
    let cpu = usbpt_projector::metrics::process_cpu_seconds() - cpu_before;
    let fold_server_cpu = server_cpu() - server_before;
    let _ = stop.send(());
    running.await??;
    if !caught_up {
        bail!("the live projector did not fold {last} events within 30 minutes");
    }
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed);
    let commits = load(&metrics.batches);
    figures.push(
        Figure::new(
            "fold_live",
            "projector fold, live: fetch ‖ fold ‖ write, fsync per commit",
            last,
        )
        .rate(last as f64 / fold_s)
        .note(format!(
            "the projector's run(): fetches of up to {FETCH_MAX}, group commit of up to {commit_max}: {commits} commits in {fold_s:.2} s; fold thread busy {:.2} s, write thread {:.2} s; process CPU {cpu:.2} s = {:.1} µs/event{}",
            load(&metrics.fold_micros) as f64 / 1e6,
            load(&metrics.write_micros) as f64 / 1e6,
            cpu * 1e6 / last as f64,
            server_share(target, fold_server_cpu, fold_s, last),
        )),
    );

    // The raw limit again, right after.
    let after = read_insert_pass(target, last, commit_max, best).await?;
    let (rate_before, rate_after) = (before.rate(), after.rate());
    let payloads = after.payloads;
    let mut read_insert = after.figure.rate((rate_before + rate_after) / 2.0);
    read_insert.note = format!(
        "reader and inserter overlap; latency per commit (second pass); rate = mean of a pass just before the live fold ({rate_before:.0}/s) and one just after it ({rate_after:.0}/s){}",
        server_share(
            target,
            (before.server_cpu + after.server_cpu) / 2.0,
            (before.secs + after.secs) / 2.0,
            last
        )
    );

    // The fold alone, without the bus: one thread folds and writes, commits of the same size.
    let events: Vec<RawEvent> = Workload::new(1, hosts, 16).raw(events)?;
    let alone_path = dir.path().join("alone.redb");
    let alone = tokio::task::spawn_blocking(move || -> Result<f64> {
        let view = View::open(alone_path)?;
        let t = Instant::now();
        for chunk in events.chunks(commit_max) {
            view.apply_batch(chunk, &BatchOptions::default())?;
        }
        Ok(t.elapsed().as_secs_f64())
    })
    .await??;
    figures.push(
        Figure::new(
            "fold_apply",
            "projector fold alone: one thread, fold then write, fsync per commit",
            last,
        )
        .rate(last as f64 / alone)
        .note(format!(
            "no bus; {commit_max} events per commit (decode, checks, staging, every table write, commit)"
        )),
    );

    // Audit replay into a fresh file: ordered consumer, unsynced intermediate commits.
    let scratch = Arc::new(View::open_private(dir.path().join("replay.redb"))?);
    let t = Instant::now();
    let r = replay::rebuild(&bus, Arc::clone(&scratch), last, |_| {}).await?;
    let replay_s = t.elapsed().as_secs_f64();
    // What `usbpt replay` does after the rebuild (digest the replay), and what `--verify` does
    // instead (compare it with the live view, digesting it in the same pass).
    let t = Instant::now();
    let plain_digest = digest::digest(&scratch.snapshot()?)?;
    let digest_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let verified = digest::compare(&live.snapshot()?, &scratch.snapshot()?)?;
    let compare_s = t.elapsed().as_secs_f64();
    match verified {
        Err(d) => bail!("the replayed view differs from the live one: {d:?}"),
        Ok(d) if d != plain_digest => bail!("compare digested {d}, digest said {plain_digest}"),
        Ok(_) => {}
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
    let (plain_s, verify_s) = (replay_s + digest_s, replay_s + compare_s);
    figures.push(
        Figure::new(
            "replay_verify",
            "usbpt replay --verify: replay, compare with the live view",
            r.last_seq,
        )
        .rate(r.last_seq as f64 / verify_s)
        .floor("no slower than usbpt replay", verify_s <= plain_s * 1.05)
        .note(format!(
            "{verify_s:.1} s: the replay, then one pass comparing every table with the live view and digesting the replay ({compare_s:.2} s); usbpt replay without --verify: {plain_s:.1} s (the replay, then its digest: {digest_s:.2} s); floor met within 5 %"
        )),
    );
    let size = std::fs::metadata(dir.path().join("live.redb"))?.len();
    figures.push(
        Figure::new("view_file_size", "view file after the history", last)
            .value(size as f64 / (1024.0 * 1024.0), "MiB"),
    );
    drop((live, scratch));

    // The raw engines on the same stream and records.
    let fastest = reads[0].1.key.clone();
    for (_, mut f) in reads {
        if f.key == fastest {
            f.note = "the fastest raw read path: the baseline of the read + insert figures".into();
        }
        figures.push(f);
    }
    figures.push(own_read);
    figures.push(read_insert);
    let (both, _) = raw::read_insert(
        url,
        subjects::STREAM,
        last,
        replay::REPLAY_COMMIT,
        Durability::None,
        "raw_read_insert_nosync",
        best,
    )
    .await?;
    figures.push(both);
    let insert = {
        let payloads = payloads.clone();
        tokio::task::spawn_blocking(move || {
            raw::redb_batched_insert(
                &payloads,
                commit_max,
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
            replay::REPLAY_COMMIT,
            Durability::None,
            "raw_redb_insert_nosync",
        )
    })
    .await??;
    figures.push(insert);
    Ok(figures)
}

/// "; nats-server CPU …" for a note, when the server is the bench's own (its CPU is readable).
fn server_share(target: &Target, server_cpu: f64, secs: f64, events: u64) -> String {
    if !target.is_private() || events == 0 {
        return String::new();
    }
    format!(
        "; nats-server CPU {:.1} µs/event ({:.0}% of a core)",
        server_cpu * 1e6 / events as f64,
        100.0 * server_cpu / secs.max(1e-9)
    )
}

/// One raw ordered read + insert of the stream at the projector's commit size, with the private
/// nats-server's CPU time spent serving it.
struct RawPass {
    figure: Figure,
    payloads: Vec<bytes::Bytes>,
    server_cpu: f64,
    secs: f64,
}

impl RawPass {
    fn rate(&self) -> f64 {
        self.figure.rate_per_s.unwrap_or(0.0)
    }
}

/// usbpt's own in-order reader (`bus::Reader`, the fetch loop replay and catch-up use) over the
/// whole stream, decoding nothing.
async fn usbpt_read(bus: &usbpt_bus::Bus, last: u64) -> Result<Figure> {
    let mut reader = bus
        .reader_with(
            usbpt_bus::StartAt::Sequence(1),
            None,
            usbpt_bus::ReaderOptions {
                batch: replay::REPLAY_BATCH,
                ..Default::default()
            },
        )
        .await?;
    let t = Instant::now();
    let mut got = 0u64;
    while got < last {
        let m = tokio::time::timeout(Duration::from_secs(30), reader.next())
            .await
            .map_err(|_| anyhow::anyhow!("usbpt's reader stalled after {got} of {last}"))??;
        got = m.seq;
    }
    Ok(Figure::new(
        "usbpt_reader_read",
        "usbpt's reader: fetch loop, in order (replay's path)",
        got,
    )
    .rate(got as f64 / t.elapsed().as_secs_f64()))
}

async fn read_insert_pass(
    target: &Target,
    last: u64,
    commit_max: usize,
    path: raw::ReadPath,
) -> Result<RawPass> {
    let server_cpu = || target.server_cpu_seconds().unwrap_or(0.0);
    let (s0, t0) = (server_cpu(), Instant::now());
    let (figure, payloads) = raw::read_insert(
        target.url(),
        subjects::STREAM,
        last,
        commit_max,
        Durability::Immediate,
        "raw_read_insert",
        path,
    )
    .await?;
    Ok(RawPass {
        figure,
        payloads,
        server_cpu: server_cpu() - s0,
        secs: t0.elapsed().as_secs_f64(),
    })
}
