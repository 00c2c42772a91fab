//! Identity alarms end to end (docs/identity.md "Alarms", ADR 0011): events on a real
//! nats-server, folded by `usbpt serve` into a real redb view, read back through `GET
//! /v1/alarms`, the lineage and device documents, `/metrics` and `usbpt alarms`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../schemas/tests/common/mod.rs"]
mod common;
mod projector_support;

use anyhow::Result;
use projector_support::Serve;
use usbpt_bus::Bus;
use usbpt_schemas::*;
use usbpt_testkit::TestNats;
use uuid::Uuid;

fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | n)
}

/// Licence key K1 (serial lineage) enumerated as `dev` on `host`, fingerprint `[7; 32]`.
fn key_on(dev: u128, host: &str) -> Event {
    let Event::DeviceDiscovered(mut d) = common::sample_bodies().remove(1) else {
        unreachable!()
    };
    d.device_id = DeviceId(id(dev));
    d.host = common::host(host);
    d.descriptors.serial = Some("K1".into());
    d.supersedes = None;
    d.lineage_kind = LineageKind::Serial;
    d.lineage_id = lineage();
    Event::discovered(d, Some(Fingerprint([7; 32])))
}

fn lineage() -> LineageId {
    let d = match common::sample_bodies().remove(1) {
        Event::DeviceDiscovered(d) => d,
        _ => unreachable!(),
    };
    LineageId::derive(&LineageKey::Serial {
        vendor: d.descriptors.vendor_id,
        product: d.descriptors.product_id,
        serial: "K1",
    })
}

async fn publish(bus: &Bus, n: u128, body: Event) -> Result<u64> {
    let env = Envelope::at(
        EventId(id(9000 + n)),
        Timestamp::from_micros(1_764_000_000_000_000 + n as i64 * 1_000_000),
        body,
    );
    Ok(bus.publish(&env).await?.sequence)
}

fn gauge(metrics: &str, kind: &str) -> Option<u64> {
    let prefix = format!("usbpt_alarms_active{{kind=\"{kind}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn a_key_on_two_hosts_is_an_alarm_in_the_api_the_cli_and_metrics_until_one_side_goes(
) -> Result<()> {
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let data = tempfile::tempdir()?;
    let serve = Serve::start(&nats.url(), data.path()).await?;

    publish(&bus, 1, key_on(1, "host-a")).await?;
    let seq = publish(&bus, 2, key_on(2, "host-b")).await?;
    serve.wait_applied(seq).await?;

    let (status, doc) = serve.get("/v1/alarms").await?;
    assert_eq!(status, 200, "{doc}");
    let alarms = doc["alarms"].as_array().unwrap();
    assert_eq!(alarms.len(), 1, "{doc}");
    let a = &alarms[0];
    assert_eq!(a["kind"], "lineage_conflict");
    assert_eq!(a["active"], true);
    assert_eq!(a["lineage_id"], lineage().to_string());
    assert_eq!(a["hosts"], serde_json::json!(["host-a", "host-b"]));
    assert_eq!(a["raised"]["seq"], seq);
    assert!(a["reason"].as_str().unwrap().contains("unplugged"), "{a}");

    let (_, dev) = serve.get(&format!("/v1/devices/{}", id(1))).await?;
    assert_eq!(dev["device"]["blocked"], true, "{dev}");
    assert_eq!(
        dev["device"]["fingerprint"],
        Fingerprint([7; 32]).to_string()
    );
    let (_, hist) = serve.get(&format!("/v1/devices/{}/history", id(1))).await?;
    assert_eq!(hist["lineage"]["held_back_device_id"], id(2).to_string());
    assert_eq!(hist["lineage"]["alarms"][0]["kind"], "lineage_conflict");

    let metrics = serve.get_text("/metrics").await?;
    assert_eq!(gauge(&metrics, "lineage_conflict"), Some(1), "{metrics}");
    assert_eq!(gauge(&metrics, "fingerprint_changed"), Some(0), "{metrics}");

    let (ok, out, err) = serve.cli(&["alarms"]).await?;
    assert!(ok, "{err}");
    assert!(
        out.contains("lineage_conflict") && out.contains("ACTIVE") && out.contains("host-b"),
        "{out}"
    );

    // host-a reports the key gone: the alarm clears, host-b's enumeration takes the lineage.
    let seq = publish(
        &bus,
        3,
        Event::DeviceInvalidated(DeviceInvalidated {
            device_id: DeviceId(id(1)),
            lineage_id: lineage(),
            host: common::host("host-a"),
            reason: InvalidationReason::Unplugged,
            superseded_by: None,
        }),
    )
    .await?;
    serve.wait_applied(seq).await?;
    let (_, doc) = serve.get("/v1/alarms").await?;
    assert_eq!(doc["alarms"], serde_json::json!([]), "{doc}");
    let (_, doc) = serve.get("/v1/alarms?all=true").await?;
    assert_eq!(doc["alarms"][0]["active"], false, "{doc}");
    assert_eq!(doc["alarms"][0]["cleared"]["seq"], seq);
    let (_, dev) = serve.get(&format!("/v1/devices/{}", id(2))).await?;
    assert_eq!(dev["device"]["status"], "available", "{dev}");
    assert_eq!(dev["device"]["blocked"], false);
    let metrics = serve.get_text("/metrics").await?;
    assert_eq!(gauge(&metrics, "lineage_conflict"), Some(0), "{metrics}");
    let (ok, out, _) = serve.cli(&["alarms"]).await?;
    assert!(ok && out.contains("no active alarms"), "{out}");

    // A malformed query names its field.
    let (status, doc) = serve.get("/v1/alarms?all=maybe").await?;
    assert_eq!(status, 400, "{doc}");
    assert!(doc.to_string().contains("all"), "{doc}");
    Ok(())
}

/// Issue 18: `PortFlapping` from host-a's agent is a `port_flapping` alarm in the API, the CLI
/// and `/metrics`, with the device blocked, until its `PortFlappingCleared`.
#[tokio::test]
async fn a_flapping_key_is_an_alarm_in_the_api_the_cli_and_metrics_until_the_agent_clears_it(
) -> Result<()> {
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let data = tempfile::tempdir()?;
    let serve = Serve::start(&nats.url(), data.path()).await?;

    let Event::DeviceDiscoveredV2(d) = key_on(1, "host-a") else {
        unreachable!()
    };
    publish(&bus, 1, Event::DeviceDiscoveredV2(d.clone())).await?;
    let seq = publish(
        &bus,
        2,
        Event::PortFlapping(PortFlapping {
            host: common::host("host-a"),
            lineage_id: lineage(),
            device_id: DeviceId(id(1)),
            port_path: d.discovery.descriptors.port_path.clone(),
            enumerations: 6,
            window_secs: 60,
            threshold: 5,
        }),
    )
    .await?;
    serve.wait_applied(seq).await?;

    let (status, doc) = serve.get("/v1/alarms").await?;
    assert_eq!(status, 200, "{doc}");
    let alarms = doc["alarms"].as_array().unwrap();
    assert_eq!(alarms.len(), 1, "{doc}");
    assert_eq!(alarms[0]["kind"], "port_flapping");
    assert_eq!(alarms[0]["hosts"], serde_json::json!(["host-a"]));
    let reason = alarms[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("6 times within 60 s on host host-a"),
        "{reason}"
    );
    let (_, dev) = serve.get(&format!("/v1/devices/{}", id(1))).await?;
    assert_eq!(dev["device"]["blocked"], true, "{dev}");
    let metrics = serve.get_text("/metrics").await?;
    assert_eq!(gauge(&metrics, "port_flapping"), Some(1), "{metrics}");
    let (ok, out, err) = serve.cli(&["alarms"]).await?;
    assert!(ok, "{err}");
    assert!(
        out.contains("port_flapping") && out.contains("ACTIVE") && out.contains("host-a"),
        "{out}"
    );

    let seq = publish(
        &bus,
        3,
        Event::PortFlappingCleared(PortFlappingCleared {
            host: common::host("host-a"),
            lineage_id: lineage(),
            device_id: Some(DeviceId(id(1))),
            quiet_secs: 120,
        }),
    )
    .await?;
    serve.wait_applied(seq).await?;
    let (_, doc) = serve.get("/v1/alarms").await?;
    assert_eq!(doc["alarms"], serde_json::json!([]), "{doc}");
    let (_, dev) = serve.get(&format!("/v1/devices/{}", id(1))).await?;
    assert_eq!(dev["device"]["blocked"], false, "{dev}");
    let metrics = serve.get_text("/metrics").await?;
    assert_eq!(gauge(&metrics, "port_flapping"), Some(0), "{metrics}");
    Ok(())
}
