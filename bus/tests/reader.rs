//! The stream reader every usbpt process uses (`usbpt_bus::Reader`) reads a large stream from
//! the beginning, several times over, without a gap, a repeat or a stall — the failure the
//! async-nats ordered pull `messages()` showed on this machine kind (silent for 30 s in about
//! one of six 1 M-message reads). Real nats-server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use usbpt_bus::{ReaderOptions, StartAt};
use usbpt_schemas::{Envelope, Event, FlavorDeleted, FlavorId, FlavorName};
use usbpt_testkit::TestNats;

/// `USBPT_READER_TEST_EVENTS` overrides it (the figure is 1,000,000).
fn count() -> u64 {
    std::env::var("USBPT_READER_TEST_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

const READS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_events_read_three_times_without_a_gap() -> Result<()> {
    let n = count();
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    // Small events on a few subjects: the reader's work, not the codec's, is what is measured.
    let names: Vec<FlavorName> = (0..8)
        .map(|i| FlavorName::new(format!("f{i}")))
        .collect::<Result<_, _>>()?;
    let started = Instant::now();
    let events = (0..n).map(|i| {
        Envelope::new(Event::FlavorDeleted(FlavorDeleted {
            flavor_id: FlavorId::new_v7(),
            name: names[(i % 8) as usize].clone(),
        }))
    });
    let last = bus.publish_windowed(events, 1_000).await?;
    ensure!(last == n, "stored {last} of {n}");
    println!("published {n} in {:?}", started.elapsed());

    for read in 1..=READS {
        let started = Instant::now();
        let mut reader = bus
            .reader_with(
                StartAt::Beginning,
                None,
                ReaderOptions {
                    batch: 10_000,
                    ..Default::default()
                },
            )
            .await?;
        let mut expected = 1u64;
        while expected <= n {
            let batch = tokio::time::timeout(
                Duration::from_secs(60),
                reader.next_batch(Duration::from_secs(5)),
            )
            .await
            .with_context(|| format!("read {read}: stalled at {expected} of {n}"))??;
            for d in batch {
                ensure!(
                    d.seq == expected,
                    "read {read}: got {} where {expected} was next",
                    d.seq
                );
                expected += 1;
            }
        }
        println!(
            "read {read}: {n} in {:?}, {} new consumers",
            started.elapsed(),
            reader.resets()
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_filtered_reader_from_now_sees_only_what_is_stored_after_it_opened() -> Result<()> {
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let flavor = |name: &str| {
        Envelope::new(Event::FlavorDeleted(FlavorDeleted {
            flavor_id: FlavorId::new_v7(),
            name: FlavorName::new(name).unwrap(),
        }))
    };
    bus.publish(&flavor("before")).await?;
    let mut reader = bus
        .reader(
            StartAt::New,
            Some(usbpt_schemas::subjects::flavor(&FlavorName::new("wanted")?)),
        )
        .await?;
    bus.publish(&flavor("other")).await?;
    let wanted = flavor("wanted");
    bus.publish(&wanted).await?;
    let d = tokio::time::timeout(Duration::from_secs(10), reader.next()).await??;
    assert_eq!(d.seq, 3);
    assert_eq!(d.decode()?.event_id, wanted.event_id);
    // Nothing more arrives: the next batch is empty at its deadline.
    assert!(reader
        .next_batch(Duration::from_millis(300))
        .await?
        .is_empty());
    Ok(())
}
