//! A 3-node JetStream cluster on loopback with an R3 stream: one node is killed with SIGKILL
//! during publishing and later returns. Every acknowledged event is stored exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../schemas/tests/common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Result};
use usbpt_bus::{Bus, StartAt, StreamSettings};
use usbpt_schemas::{Envelope, EventId};
use usbpt_testkit::TestCluster;

/// Publishes until acknowledged, retrying the same envelope (same Nats-Msg-Id) through a
/// leader election; bounded.
async fn publish_until_acked(bus: &Bus, env: &Envelope) -> Result<u64> {
    let mut last = None;
    for _ in 0..100 {
        match bus.publish(env).await {
            Ok(p) => return Ok(p.sequence),
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    bail!("not acknowledged after 100 tries: {last:?}")
}

#[tokio::test]
async fn r3_stream_survives_a_node_killed_and_returning() -> Result<()> {
    let mut cluster = TestCluster::start(3).await?;
    let settings = StreamSettings {
        replicas: 3,
        ..StreamSettings::default()
    };
    // Connect through node 0 only, so killing node 2 never drops our connection.
    let bus = Bus::connect(&cluster.nodes[0].url(), None, &settings).await?;
    let samples = common::sample_envelopes();
    let mut acked = BTreeSet::new();
    for i in 0..300usize {
        if i == 100 {
            cluster.nodes[2].kill().await;
        }
        if i == 200 {
            cluster.nodes[2].restart().await?;
        }
        let mut env = samples[i % samples.len()].clone();
        env.event_id = EventId::new_v7();
        publish_until_acked(&bus, &env).await?;
        acked.insert(env.event_id);
    }
    assert_eq!(
        bus.last_sequence().await?,
        300,
        "a retried publish was stored twice"
    );

    let mut read = BTreeSet::new();
    // The returning node may still be catching up: creating the reader's consumer can time out
    // meanwhile (seen under load). Retry, bounded.
    let mut messages = None;
    for attempt in 1..=10 {
        match bus.reader(StartAt::Beginning, None).await {
            Ok(m) => {
                messages = Some(m);
                break;
            }
            Err(e) if attempt < 10 => {
                eprintln!("ordered reader, attempt {attempt}: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let mut messages = messages.expect("an ordered reader or an error");
    while read.len() < acked.len() {
        let msg = tokio::time::timeout(Duration::from_secs(20), messages.next()).await??;
        let env = msg.decode()?;
        assert!(read.insert(env.event_id), "duplicate {}", env.event_id);
    }
    assert_eq!(read, acked);
    Ok(())
}
