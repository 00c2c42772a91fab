//! The bus against a real nats-server: round trip of every event kind, idempotent publishes,
//! fenced publishes, durability across SIGKILL, and refusing an incompatible stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../schemas/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use futures::StreamExt;
use usbpt_bus::async_nats::jetstream::stream::Config;
use usbpt_bus::{Bus, BusError, StreamSettings};
use usbpt_schemas::{codec, subjects, Envelope};
use usbpt_testkit::TestNats;

/// Reads every stored event from sequence 1 with an ordered-style pull consumer.
async fn read_all(bus: &Bus) -> Result<Vec<(u64, String, Envelope)>> {
    let last = bus.last_sequence().await?;
    let consumer = bus.pull_consumer("reader", None, 0).await?;
    let mut out = Vec::new();
    while (out.len() as u64) < last {
        let mut batch = consumer
            .fetch()
            .max_messages(500)
            .expires(Duration::from_secs(2))
            .messages()
            .await?;
        while let Some(msg) = batch.next().await {
            let msg = msg.map_err(|e| anyhow::anyhow!(e))?;
            let seq = msg.info().map_err(|e| anyhow::anyhow!(e))?.stream_sequence;
            let env = codec::decode(&msg.payload)?;
            out.push((seq, msg.subject.to_string(), env));
            msg.ack().await.map_err(|e| anyhow::anyhow!(e))?;
        }
    }
    Ok(out)
}

#[tokio::test]
async fn every_event_kind_round_trips_through_jetstream() -> Result<()> {
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let sent = common::sample_envelopes();
    for env in &sent {
        let p = bus.publish(env).await?;
        assert!(!p.duplicate);
    }
    let got = read_all(&bus).await?;
    assert_eq!(got.len(), sent.len());
    for ((seq, subject, env), want) in got.iter().zip(&sent) {
        assert_eq!(env, want, "seq {seq}");
        assert_eq!(subject, &subjects::for_event(want));
        assert!(subjects::matches(env, subject));
    }
    Ok(())
}

#[tokio::test]
async fn duplicate_msg_id_is_stored_once() -> Result<()> {
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let env = common::sample_envelopes().remove(1);
    let first = bus.publish(&env).await?;
    let again = bus.publish(&env).await?;
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!(again.sequence, first.sequence);
    assert_eq!(bus.last_sequence().await?, 1);
    Ok(())
}

#[tokio::test]
async fn stale_expected_sequence_is_a_conflict() -> Result<()> {
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let mut claims: Vec<Envelope> = common::sample_envelopes()
        .into_iter()
        .filter(|e| e.body.kind() == "DeviceClaimed")
        .collect();
    let claim = claims.remove(0);
    let subject = subjects::for_event(&claim);
    assert_eq!(bus.last_subject_sequence(&subject).await?, 0);

    // Two handlers read "empty" (expected 0); the first wins, the second conflicts.
    let won = bus.publish_fenced(&claim, 0).await?;
    let mut rival = claim.clone();
    rival.event_id = usbpt_schemas::EventId::new_v7();
    let lost = bus.publish_fenced(&rival, 0).await;
    match lost {
        Err(BusError::Conflict {
            subject: s,
            expected,
        }) => {
            assert_eq!(s, subject);
            assert_eq!(expected, 0);
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // With the fresh sequence the rival goes through.
    assert_eq!(bus.last_subject_sequence(&subject).await?, won.sequence);
    let next = bus.publish_fenced(&rival, won.sequence).await?;
    assert_eq!(next.sequence, won.sequence + 1);
    // A retried fenced publish of an already-stored event is a duplicate, not a conflict.
    let retried = bus.publish_fenced(&rival, won.sequence).await?;
    assert!(retried.duplicate);
    Ok(())
}

#[tokio::test]
async fn sigkill_loses_no_acknowledged_event() -> Result<()> {
    let mut nats = TestNats::start_with(|c| c.sync_always = true).await?;
    let bus = nats.bus().await?;
    let mut acked = BTreeMap::new();
    for round in 0..200u32 {
        let mut env = common::sample_envelopes().remove((round % 19) as usize);
        env.event_id = usbpt_schemas::EventId::new_v7();
        let p = bus.publish(&env).await?;
        acked.insert(p.sequence, env);
    }
    drop(bus);
    nats.kill().await;
    nats.restart().await?;
    let bus = nats.bus().await?;
    let stored = read_all(&bus).await?;
    assert_eq!(stored.len(), acked.len());
    for (seq, _, env) in stored {
        assert_eq!(acked.get(&seq), Some(&env), "seq {seq}");
    }
    Ok(())
}

#[tokio::test]
async fn refuses_an_incompatible_existing_stream() -> Result<()> {
    let nats = TestNats::start().await?;
    let client = usbpt_bus::async_nats::connect(nats.url()).await?;
    let js = usbpt_bus::async_nats::jetstream::new(client);
    js.create_stream(Config {
        name: subjects::STREAM.into(),
        subjects: vec!["usbpt.evt.>".into()],
        storage: usbpt_bus::async_nats::jetstream::stream::StorageType::Memory,
        ..Default::default()
    })
    .await?;
    let err = Bus::connect(&nats.url(), None, &StreamSettings::default())
        .await
        .expect_err("memory storage must be refused");
    let text = err.to_string();
    assert!(
        text.contains("storage") && text.contains("Memory"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn no_server_is_a_clear_error() -> Result<()> {
    let mut nats = TestNats::start().await?;
    let url = nats.url();
    nats.stop().await?;
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        Bus::connect(&url, None, &StreamSettings::default()),
    )
    .await?
    .expect_err("nothing listens");
    assert!(err.to_string().contains(&url), "{err}");
    Ok(())
}
