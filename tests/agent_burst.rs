//! A queued burst in the agent's outbox (what a reboot of a host with many devices, or an
//! outage, leaves) drained by the real `usbpt agent` with a window of acks in flight — while the
//! agent is SIGKILLed and then nats-server is SIGKILLed in the middle of it. Every queued event
//! is stored exactly once, in the outbox's order (each subject's order, and the whole order when
//! no publish was refused singly). Real nats-server, the real binary, real redb files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent_support;

use std::collections::{HashMap, HashSet};

use agent_support::*;
use anyhow::{Context, Result};
use futures::StreamExt;
use usbpt_agent::store::{self, Store};
use usbpt_bench::codec::sample_discovered_on;
use usbpt_bus::StartAt;
use usbpt_schemas::{
    subjects, DeviceInvalidated, Envelope, Event, EventId, HostName, InvalidationReason,
};
use usbpt_testkit::umockdev::{umockdev_test, Testbed};
use usbpt_testkit::TestNats;

/// Enough for several windows before, between and after the two crashes.
const DEVICES: usize = 6_000;

/// `DEVICES` discoveries; every 7th device is also invalidated three entries later, on the same
/// subject, so windows end at a repeated subject and per-subject order is exercised.
fn burst(host: &HostName) -> Vec<Envelope> {
    let mut out = Vec::with_capacity(DEVICES + DEVICES / 7 + 1);
    let mut pending = Vec::new();
    for i in 0..DEVICES {
        let discovered = sample_discovered_on(host.clone());
        if i % 7 == 0 {
            if let Event::DeviceDiscovered(d) = &discovered.body {
                pending.push((
                    i + 3,
                    Envelope::new(Event::DeviceInvalidated(DeviceInvalidated {
                        device_id: d.device_id,
                        lineage_id: d.lineage_id,
                        host: host.clone(),
                        reason: InvalidationReason::Unplugged,
                        superseded_by: None,
                    })),
                ));
            }
        }
        out.push(discovered);
        while pending.first().is_some_and(|(at, _)| *at <= i) {
            out.push(pending.remove(0).1);
        }
    }
    out.extend(pending.into_iter().map(|(_, e)| e));
    out
}

#[test]
fn a_queued_burst_survives_sigkill_of_agent_and_nats_exactly_once_in_order() {
    umockdev_test(
        "a_queued_burst_survives_sigkill_of_agent_and_nats_exactly_once_in_order",
        || async {
            let _tb = Testbed::new()?; // no devices: only the queued burst and the agent's own events
            let mut nats = TestNats::start().await?;
            let home = AgentHome::new("host-burst", "boot-1")?;
            let host = HostName::new("host-burst")?;
            let queued = burst(&host);
            {
                std::fs::create_dir_all(home.data_dir())?;
                let (store, state) = Store::open(&home.data_dir().join(store::file_name(&host)))?;
                store.commit(&state, &state, &queued)?;
            }
            let want: Vec<EventId> = queued.iter().map(|e| e.event_id).collect();
            let wanted: HashSet<EventId> = want.iter().copied().collect();

            // Every publish the server receives is also seen by a plain subscriber: the test
            // waits on those, not on time.
            let watcher = nats.bus().await?;
            // `subscribe` returns after a round trip on the same connection: the server holds
            // the subscription before the agent (another connection) publishes.
            let mut seen = watcher.subscribe(&subjects::host_all(&host)).await?;
            let mut received = 0usize;
            let mut wait_for = async |n: usize| -> Result<()> {
                while received < n {
                    tokio::time::timeout(WAIT, seen.next())
                        .await
                        .context("publishes stopped arriving")?
                        .context("subscription ended")?;
                    received += 1;
                }
                Ok(())
            };

            let t0 = std::time::Instant::now();
            // 1. SIGKILL the agent a third of the way in.
            let agent = AgentProcess::start(&home, &nats.url()).await?;
            wait_for(want.len() / 3).await?;
            agent.crash().await?;
            println!("agent SIGKILLed after {:?}", t0.elapsed());

            // 2. Start it again; two thirds of the way in, freeze it (so the burst is surely
            //    unfinished), SIGKILL nats-server, bring it back on the same port and store,
            //    and let the agent go on: its acks in flight are lost.
            let agent = AgentProcess::start(&home, &nats.url()).await?;
            wait_for(2 * want.len() / 3).await?;
            let pid = agent.pid().context("agent pid")?.to_string();
            signal("-STOP", &pid)?;
            nats.kill().await;
            nats.restart().await?;
            signal("-CONT", &pid)?;
            println!("nats-server SIGKILLed and back after {:?}", t0.elapsed());

            // 3. Every queued event arrives; then the agent stops cleanly (it drains first) and
            //    the whole stream is read back.
            let bus = nats.bus().await?;
            let mut reader = bus.reader(StartAt::Beginning, None).await?;
            let mut stored: Vec<(String, EventId)> = Vec::new();
            let mut missing = wanted.clone();
            let mut next = async |stored: &mut Vec<(String, EventId)>| -> Result<EventId> {
                let msg = tokio::time::timeout(WAIT, reader.next())
                    .await
                    .context("reading the stream back")??;
                let env = msg.decode()?;
                stored.push((msg.subject, env.event_id));
                Ok(env.event_id)
            };
            while !missing.is_empty() {
                let id = next(&mut stored)
                    .await
                    .with_context(|| format!("{} queued events never arrived", missing.len()))?;
                missing.remove(&id);
            }
            println!("all queued events read back after {:?}", t0.elapsed());
            agent.stop().await?;
            let last = bus.last_sequence().await?;
            while (stored.len() as u64) < last {
                next(&mut stored).await?;
            }

            let ours: Vec<&(String, EventId)> = stored
                .iter()
                .filter(|(_, id)| wanted.contains(id))
                .collect();
            let mut counts: HashMap<EventId, usize> = HashMap::new();
            for (_, id) in &ours {
                *counts.entry(*id).or_default() += 1;
            }
            let doubled = counts.values().filter(|n| **n > 1).count();
            assert_eq!(doubled, 0, "no queued event is stored twice");
            assert_eq!(counts.len(), want.len(), "every queued event is stored");
            // Each subject's events in the outbox's order.
            let mut per_subject: HashMap<&str, Vec<EventId>> = HashMap::new();
            for (subject, id) in &ours {
                per_subject.entry(subject.as_str()).or_default().push(*id);
            }
            let mut expected_per_subject: HashMap<String, Vec<EventId>> = HashMap::new();
            for e in &queued {
                expected_per_subject
                    .entry(subjects::for_event(e))
                    .or_default()
                    .push(e.event_id);
            }
            for (subject, ids) in &expected_per_subject {
                assert_eq!(
                    per_subject.get(subject.as_str()),
                    Some(ids),
                    "order on {subject}"
                );
            }
            // And here, where no publish was refused on its own, the whole order too.
            let order: Vec<EventId> = ours.iter().map(|(_, id)| *id).collect();
            assert_eq!(order, want, "the stream holds the outbox's order");
            Ok(())
        },
    );
}

fn signal(sig: &str, pid: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .args([sig, pid])
        .status()?;
    anyhow::ensure!(status.success(), "kill {sig} {pid} failed");
    Ok(())
}
