//! Exactly once against a real nats-server and a real redb file: a batch whose ack is lost is
//! redelivered and skipped; a restart resumes where the view is, even when the durable
//! consumer is elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use usbpt_projector::workload::{publish_all, Workload};
use usbpt_projector::{digest, BatchOptions, Projector, ProjectorConfig, RawEvent, View};
use usbpt_schemas::{codec, subjects};
use usbpt_testkit::TestNats;

fn config(ack_wait: Duration) -> ProjectorConfig {
    ProjectorConfig {
        consumer: "test-projector".into(),
        batch_size: 500,
        fetch_wait: Duration::from_secs(10),
        ack_wait,
        ..ProjectorConfig::default()
    }
}

fn applied_total(view: &View) -> u64 {
    view.snapshot()
        .unwrap()
        .counters()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("applied."))
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test]
async fn a_batch_whose_ack_is_lost_is_redelivered_and_applied_once() -> Result<()> {
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let last = publish_all(&bus, Workload::new(1, 3, 4).take(200), 100).await?;
    assert_eq!(last, 200);
    let dir = tempfile::tempdir()?;
    let view = Arc::new(View::open(dir.path().join("view.redb"))?);
    let mut p = Projector::new(
        bus.clone(),
        Arc::clone(&view),
        config(Duration::from_secs(1)),
    );

    let first = p.step().await?.expect("a batch");
    assert_eq!(
        (first.report.applied, first.report.last_applied),
        (200, 200)
    );
    let before = digest::digest(&view.snapshot()?)?;
    drop(first); // committed, but the ack never reaches the server

    // After the ack wait the server sends the batch again; the next fetches receive it.
    let mut skipped = 0;
    for _ in 0..20 {
        if skipped == 200 {
            break;
        }
        if let Some(again) = p.step().await? {
            assert_eq!(again.report.applied, 0, "a redelivery must not be applied");
            skipped += again.report.skipped;
            again.ack().await?;
        }
    }
    assert_eq!(skipped, 200, "every event was redelivered once and skipped");
    assert_eq!(p.metrics().redelivered_skipped.load(Relaxed), 200);
    assert_eq!(applied_total(&view), 200);
    assert_eq!(digest::digest(&view.snapshot()?)?, before);
    Ok(())
}

#[tokio::test]
async fn restarts_resume_from_the_view_whatever_the_consumer_says() -> Result<()> {
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let mut workload = Workload::new(2, 3, 4);
    publish_all(&bus, workload.by_ref().take(300), 100).await?;
    let dir = tempfile::tempdir()?;
    let cfg = config(Duration::from_secs(30));

    // A clean run and a clean stop: the consumer's ack floor is the view's resume point.
    let view = Arc::new(View::open(dir.path().join("a.redb"))?);
    let mut p = Projector::new(bus.clone(), Arc::clone(&view), cfg.clone());
    while view.last_applied()? < 300 {
        p.step().await?.expect("a batch").ack().await?;
    }
    drop(p);

    // Crash between commit and ack: more events folded, none acked.
    publish_all(&bus, workload.by_ref().take(100), 100).await?;
    let mut p = Projector::new(bus.clone(), Arc::clone(&view), cfg.clone());
    let folded = p.step().await?.expect("a batch");
    assert_eq!(folded.report.applied, 100);
    assert_eq!(
        p.metrics().consumer_resets.load(Relaxed),
        0,
        "the consumer was at the view's resume point and was reused"
    );
    drop((folded, p));

    // The next process finds 100 unacked deliveries: it re-creates the consumer at 400 rather
    // than waiting 30 s for redeliveries, and folds only what is new.
    publish_all(&bus, workload.by_ref().take(50), 50).await?;
    let mut p = Projector::new(bus.clone(), Arc::clone(&view), cfg.clone());
    let folded = tokio::time::timeout(Duration::from_secs(10), p.step())
        .await??
        .expect("a batch");
    assert_eq!((folded.report.applied, folded.report.skipped), (50, 0));
    assert_eq!(folded.report.last_applied, 450);
    assert_eq!(p.metrics().consumer_resets.load(Relaxed), 1);
    folded.ack().await?;
    assert_eq!(applied_total(&view), 450);

    // A view rebuilt from nothing with the same consumer name starts again from sequence 1.
    let fresh = Arc::new(View::open(dir.path().join("b.redb"))?);
    let mut p = Projector::new(bus.clone(), Arc::clone(&fresh), cfg);
    while fresh.last_applied()? < 450 {
        p.step().await?.expect("a batch").ack().await?;
    }
    assert_eq!(
        digest::first_difference(&view.snapshot()?, &fresh.snapshot()?)?,
        None
    );
    Ok(())
}

#[tokio::test]
async fn run_follows_live_events_and_stops_on_shutdown() -> Result<()> {
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let dir = tempfile::tempdir()?;
    let view = Arc::new(View::open(dir.path().join("view.redb"))?);
    let p = Projector::new(bus.clone(), Arc::clone(&view), ProjectorConfig::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(p.run(async {
        let _ = stopped.await;
    }));
    let last = publish_all(&bus, Workload::new(3, 2, 2).take(50), 10).await?;
    assert!(view.wait_applied(last, Duration::from_secs(20)).await);
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), run).await???;
    assert_eq!(view.last_applied()?, last);
    Ok(())
}

/// `run()` is a pipeline (fetch ‖ fold ‖ write, group commit, a cache of committed batches).
/// With tiny fetches, commits and cache, many batches are in flight at once; a message deleted
/// from the stream is a hole the fold stops at, and the consumer is re-created past it. The
/// view must equal a one-thread fold of the same stored events.
#[tokio::test]
async fn run_as_a_pipeline_equals_a_sequential_fold_even_across_a_hole() -> Result<()> {
    let nats = TestNats::start().await?;
    // usbpt's stream denies deletes (it is the audit trail) and that cannot be lifted later;
    // an operator may have created it without, which is how this test makes a hole.
    let admin = usbpt_bus::admin::StreamAdmin::connect(&nats.url()).await?;
    admin
        .create_stream(&usbpt_bus::StreamSettings::default(), true)
        .await?;
    let bus = nats.bus().await?;
    let envs: Vec<_> = Workload::new(23, 6, 8).take(12_000).collect();
    let last = publish_all(&bus, envs.clone(), 500).await?;
    assert_eq!(last, 12_000);
    // A hole in the middle: the fold sees 6000 followed by 6002.
    assert!(
        admin
            .delete_message(usbpt_schemas::subjects::STREAM, 6_001)
            .await?
    );

    let dir = tempfile::tempdir()?;
    let view = Arc::new(View::open(dir.path().join("piped.redb"))?);
    let p = Projector::new(
        bus.clone(),
        Arc::clone(&view),
        ProjectorConfig {
            consumer: "piped".into(),
            batch_size: 200,
            max_batch_size: 400,
            max_commit_events: 700,
            cache_rows: 500,
            ..ProjectorConfig::default()
        },
    );
    let metrics = p.metrics();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(p.run(async {
        let _ = stopped.await;
    }));
    assert!(
        view.wait_applied(last, Duration::from_secs(60)).await,
        "the pipeline stalled at {}",
        view.last_applied()?
    );
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), run).await???;

    let folded = metrics.applied.load(Relaxed) + metrics.quarantined.load(Relaxed);
    assert_eq!(folded, 11_999, "every stored event folded once");
    assert!(
        metrics.batches.load(Relaxed) >= 12_000 / 700,
        "group commits stay bounded"
    );
    assert_eq!(
        metrics.consumer_resets.load(Relaxed),
        2,
        "created, then past the hole"
    );

    // The same stored events, folded one commit at a time on this thread.
    let reference = View::open(dir.path().join("ref.redb"))?;
    let stored: Vec<RawEvent> = envs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 6_000)
        .map(|(i, e)| RawEvent {
            seq: i as u64 + 1,
            subject: subjects::for_event(e),
            payload: codec::encode(e).expect("encode").into(),
        })
        .collect();
    let gaps_ok = BatchOptions {
        gaps_ok: true,
        ..BatchOptions::default()
    };
    reference.apply_batch(&stored, &gaps_ok)?;
    assert_eq!(
        digest::first_difference(&reference.snapshot()?, &view.snapshot()?)?,
        None
    );
    Ok(())
}

/// A projector far behind (a restart after downtime, a new view) commits in large groups: while
/// thousands of stored events are still to come, the fold waits for the next fetch instead of
/// committing each one, so 40 fetches of 500 become a handful of commits (each commit is an
/// fsync and a copy of every page it touches).
#[tokio::test]
async fn a_catch_up_commits_in_large_groups() -> Result<()> {
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let last = publish_all(&bus, Workload::new(5, 40, 8).take(20_000), 1000).await?;
    assert_eq!(last, 20_000);
    let dir = tempfile::tempdir()?;
    let view = Arc::new(View::open(dir.path().join("view.redb"))?);
    let config = ProjectorConfig {
        consumer: "test-catch-up".into(),
        batch_size: 500,
        max_batch_size: 500,
        ..ProjectorConfig::default()
    };
    let p = Projector::new(bus.clone(), Arc::clone(&view), config);
    let metrics = p.metrics();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(p.run(async {
        let _ = stopped.await;
    }));
    assert!(view.wait_applied(last, Duration::from_secs(60)).await);
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), run).await???;
    let commits = metrics.batches.load(Relaxed);
    // Two, measured: the fetches up to the one with fewer than 1,000 events behind it, then the
    // last one (each fetch committed as it came took 7 to 10 in the same runs, debug build).
    assert!(
        commits <= 4,
        "{commits} commits for 40 fetches of 500 while catching up"
    );
    assert_eq!(applied_total(&view), 20_000);
    Ok(())
}
