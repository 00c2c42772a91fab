//! Bad input never stops the projector: each kind is quarantined with a counted reason while
//! the good events around it are applied (real nats-server, real redb).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../schemas/tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use usbpt_projector::workload::publish_raw;
use usbpt_projector::{Projector, ProjectorConfig, QuarantineReason as Q, View};
use usbpt_schemas::*;
use usbpt_testkit::TestNats;
use uuid::Uuid;

fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | n)
}

fn env(n: u128, body: Event) -> Envelope {
    Envelope::at(
        EventId(id(5000 + n)),
        Timestamp::from_micros(1_764_000_000_000_000 + n as i64),
        body,
    )
}

fn discovered(n: u128, host: &str) -> DeviceDiscovered {
    let Event::DeviceDiscovered(mut d) = common::sample_bodies().remove(1) else {
        unreachable!()
    };
    d.device_id = DeviceId(id(n));
    d.host = common::host(host);
    d.supersedes = None;
    // A lineage derived from its key, as the fold requires (ADR 0005).
    d.descriptors.serial = Some(format!("Q{n}"));
    d.lineage_kind = LineageKind::Serial;
    d.lineage_id = LineageId::derive(&LineageKey::Serial {
        vendor: d.descriptors.vendor_id,
        product: d.descriptors.product_id,
        serial: d.descriptors.serial.as_deref().unwrap_or_default(),
    });
    d
}

#[tokio::test]
async fn each_kind_of_bad_input_is_quarantined_and_good_events_around_it_are_applied() -> Result<()>
{
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let a = common::host("host-a");
    let b = common::host("host-b");
    let mut expected: Vec<(u64, Q)> = Vec::new();

    // Good: a device on host-a.
    let good1 = env(1, Event::DeviceDiscovered(discovered(1, "host-a")));
    let s1 = bus.publish(&good1).await?.sequence;

    // Garbage bytes, and an empty payload.
    let dev_subject = subjects::host_device(&a, &DeviceId(id(1)));
    expected.push((
        publish_raw(&bus, &dev_subject, b"\xff\xfegarbage".to_vec()).await?,
        Q::Undecodable,
    ));
    expected.push((
        publish_raw(&bus, &dev_subject, Vec::new()).await?,
        Q::Undecodable,
    ));

    // An unknown schema version (the first byte is the version varint).
    let mut v99 = codec::encode(&env(2, Event::DeviceDiscovered(discovered(2, "host-a"))))?;
    v99[0] = 99;
    expected.push((
        publish_raw(&bus, &dev_subject, v99).await?,
        Q::UnknownSchemaVersion,
    ));

    // An event variant from a newer writer: the body's variant index follows the header.
    let e3 = env(3, Event::DeviceDiscovered(discovered(3, "host-a")));
    let mut newer = codec::encode(&e3)?;
    let header = newer.len() - postcard::to_allocvec(&e3.body)?.len();
    newer[header] = 0x7f;
    expected.push((
        publish_raw(&bus, &dev_subject, newer).await?,
        Q::UnknownEvent,
    ));

    // host-b's device published on host-a's subject (a forgery).
    let forged = env(4, Event::DeviceDiscovered(discovered(4, "host-b")));
    let on_a = subjects::host_device(&a, &DeviceId(id(4)));
    expected.push((
        publish_raw(&bus, &on_a, codec::encode(&forged)?).await?,
        Q::HostMismatch,
    ));

    // An envelope claiming host-a around a body about host-b, on host-b's subject.
    let mut lying = env(5, Event::DeviceDiscovered(discovered(5, "host-b")));
    lying.host = Some(a.clone());
    let on_b = subjects::host_device(&b, &DeviceId(id(5)));
    expected.push((
        publish_raw(&bus, &on_b, codec::encode(&lying)?).await?,
        Q::HostMismatch,
    ));

    // A valid flavor event on a claim subject.
    let flavor = env(
        6,
        Event::FlavorCreated(FlavorCreated {
            flavor_id: FlavorId(id(6)),
            name: FlavorName::new("f1")?,
            usb: Vec::new(),
        }),
    );
    let claim_subject = subjects::claim(&discovered(1, "host-a").lineage_id);
    expected.push((
        publish_raw(&bus, &claim_subject, codec::encode(&flavor)?).await?,
        Q::WrongSubject,
    ));

    // Garbage on a claim subject: quarantined, and its sequence is the subject's fence.
    let garbage_claim = publish_raw(&bus, &claim_subject, b"\x01\xffjunk".to_vec()).await?;
    expected.push((garbage_claim, Q::Undecodable));

    // About a device nobody discovered.
    let unknown_dev = env(
        7,
        Event::DeviceInvalidated(DeviceInvalidated {
            device_id: DeviceId(id(77)),
            lineage_id: LineageId(id(177)),
            host: a.clone(),
            reason: InvalidationReason::Unplugged,
            superseded_by: None,
        }),
    );
    expected.push((bus.publish(&unknown_dev).await?.sequence, Q::UnknownDevice));

    // About a server nobody requested.
    let unknown_server = env(
        8,
        Event::ServerStateChanged(ServerStateChanged {
            server_id: ServerId(id(88)),
            host: Some(a.clone()),
            state: ServerState::Active,
            reported_by_agent: true,
            detail: String::new(),
        }),
    );
    expected.push((
        bus.publish(&unknown_server).await?.sequence,
        Q::UnknownServer,
    ));

    // Deleting a flavor that never existed.
    let unknown_flavor = env(
        9,
        Event::FlavorDeleted(FlavorDeleted {
            flavor_id: FlavorId(id(99)),
            name: FlavorName::new("nope")?,
        }),
    );
    expected.push((
        bus.publish(&unknown_flavor).await?.sequence,
        Q::UnknownFlavor,
    ));

    // Releasing a claim nobody holds.
    let release = env(
        10,
        Event::DeviceReleased(DeviceReleased {
            device_id: DeviceId(id(1)),
            lineage_id: discovered(1, "host-a").lineage_id,
            host: a.clone(),
            server_id: ServerId(id(88)),
            reason: ReleaseReason::ServerDeleted,
        }),
    );
    let release_seq = bus.publish(&release).await?.sequence;
    expected.push((release_seq, Q::Conflict));

    // The same device discovered again (another event id).
    let again = env(11, Event::DeviceDiscovered(discovered(1, "host-a")));
    expected.push((bus.publish(&again).await?.sequence, Q::Duplicate));

    // Good again, after all of that.
    let good2 = env(12, Event::DeviceDiscovered(discovered(12, "host-a")));
    let s2 = bus.publish(&good2).await?.sequence;

    let dir = tempfile::tempdir()?;
    let view = Arc::new(View::open(dir.path().join("view.redb"))?);
    let mut p = Projector::new(bus.clone(), Arc::clone(&view), ProjectorConfig::default());
    while view.last_applied()? < s2 {
        let batch = tokio::time::timeout(Duration::from_secs(20), p.step())
            .await??
            .expect("a batch");
        batch.ack().await?;
    }

    let snap = view.snapshot()?;
    assert!(
        snap.device(&DeviceId(id(1)))?.is_some(),
        "good event before"
    );
    assert!(
        snap.device(&DeviceId(id(12)))?.is_some(),
        "good event after"
    );
    for bad in [4, 5] {
        assert!(
            snap.device(&DeviceId(id(bad)))?.is_none(),
            "forged device {bad} applied"
        );
    }
    assert!(snap.flavor_by_name(&FlavorName::new("f1")?)?.is_none());
    assert!(
        snap.host(&b)?.is_none(),
        "nothing about host-b was accepted"
    );

    let quarantined = snap.quarantine(0, 100)?;
    let got: Vec<(u64, Q)> = quarantined.iter().map(|q| (q.seq, q.reason)).collect();
    assert_eq!(got, expected);
    assert!(quarantined.iter().all(|q| !q.detail.is_empty()));
    let forged_entry = quarantined
        .iter()
        .find(|q| q.reason == Q::HostMismatch)
        .unwrap();
    assert!(forged_entry.detail.contains("host-b") && forged_entry.detail.contains("host-a"));
    assert_eq!(forged_entry.subject, on_a);

    let counters = snap.counters()?;
    for reason in Q::ALL {
        let n = expected.iter().filter(|(_, r)| *r == reason).count() as u64;
        let key = format!("quarantined.{}", reason.as_str());
        assert_eq!(counters.get(&key).copied().unwrap_or(0), n, "{key}");
    }
    assert_eq!(counters.get("applied.DeviceDiscovered"), Some(&2));
    // Every message on a claim subject moves its fence, quarantined or not: the last one there
    // is the refused release (the garbage before it was the last for a while).
    assert_eq!(
        subjects::claim(&discovered(1, "host-a").lineage_id),
        claim_subject
    );
    assert!(garbage_claim < release_seq);
    assert_eq!(snap.subject_seq(&claim_subject)?, release_seq);
    assert!(s1 < s2);

    let text = p.metrics().render(&counters);
    assert!(
        text.contains("usbpt_projector_events_quarantined_total{reason=\"host_mismatch\"} 2"),
        "{text}"
    );
    assert!(text.contains("usbpt_projector_events_quarantined_total{reason=\"undecodable\"} 3"));
    assert!(text.contains("usbpt_projector_events_applied_total{kind=\"DeviceDiscovered\"} 2"));
    Ok(())
}
