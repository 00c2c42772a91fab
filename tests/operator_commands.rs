//! The operator commands that clear identity alarms, end to end (issue 18 item 2, ADR 0011): a
//! real nats-server, `usbpt serve` (projector, command handler, HTTP API) and the CLI. A key
//! discovered on two hosts raises `lineage_conflict` and is not schedulable; `POST
//! /v1/lineages/{id}/conflict/resolve` keeps host-b's copy, which takes the lineage and boots a
//! server there. The key then comes back with other descriptors (`fingerprint_changed`), and
//! `usbpt fingerprint accept LABEL` clears it. Bad requests get a 4xx naming the field.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../schemas/tests/common/mod.rs"]
mod common;
mod projector_support;

use std::time::Duration;

use anyhow::{bail, Result};
use projector_support::{http, Serve};
use serde_json::{json, Value};
use usbpt_bus::Bus;
use usbpt_schemas::*;
use usbpt_testkit::TestNats;
use uuid::Uuid;

fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | n)
}

fn lineage() -> LineageId {
    let Event::DeviceDiscovered(d) = common::sample_bodies().remove(1) else {
        unreachable!()
    };
    LineageId::derive(&LineageKey::Serial {
        vendor: d.descriptors.vendor_id,
        product: d.descriptors.product_id,
        serial: "K1",
    })
}

/// Licence key K1 enumerated as `dev` on `host`, with fingerprint `[fp; 32]`.
fn key_on(dev: u128, host: &str, fp: u8, supersedes: Option<u128>) -> Event {
    let Event::DeviceDiscovered(mut d) = common::sample_bodies().remove(1) else {
        unreachable!()
    };
    d.device_id = DeviceId(id(dev));
    d.host = common::host(host);
    d.descriptors.serial = Some("K1".into());
    d.supersedes = supersedes.map(|s| DeviceId(id(s)));
    d.lineage_kind = LineageKind::Serial;
    d.lineage_id = lineage();
    Event::discovered(d, Some(Fingerprint([fp; 32])))
}

fn gone(dev: u128, host: &str) -> Event {
    Event::DeviceInvalidated(DeviceInvalidated {
        device_id: DeviceId(id(dev)),
        lineage_id: lineage(),
        host: common::host(host),
        reason: InvalidationReason::Unplugged,
        superseded_by: None,
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

async fn post(serve: &Serve, path: &str, body: Option<Value>) -> Result<(u16, Value)> {
    let mut req = http().post(format!("{}{path}", serve.api));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

/// The fleet's active alarms once the view has caught up with the stream (a condition, polled).
async fn active_alarms(serve: &Serve, bus: &Bus) -> Result<Vec<Value>> {
    serve.wait_applied(bus.last_sequence().await?).await?;
    let (status, doc) = serve.get("/v1/alarms").await?;
    assert_eq!(status, 200, "{doc}");
    Ok(doc["alarms"].as_array().cloned().unwrap_or_default())
}

fn error_message(doc: &Value) -> String {
    doc["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn an_operator_keeps_one_host_of_a_conflict_and_accepts_a_new_fingerprint() -> Result<()> {
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let data = tempfile::tempdir()?;
    let serve = Serve::start(&nats.url(), data.path()).await?;
    let l = lineage();

    publish(&bus, 1, key_on(1, "host-a", 7, None)).await?;
    publish(&bus, 2, key_on(2, "host-b", 7, None)).await?;
    let alarms = active_alarms(&serve, &bus).await?;
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    assert_eq!(alarms[0]["kind"], "lineage_conflict");
    serve.commands_ready().await?;

    // While the conflict lasts the key is not schedulable.
    let (ok, _, err) = serve
        .cli(&["flavor", "create", "erp", "--usb", &format!("lineage={l}")])
        .await?;
    assert!(ok, "{err}");
    let (ok, _, err) = serve.cli(&["boot", "erp-0", "--flavor", "erp"]).await?;
    assert!(!ok, "a blocked key was scheduled");
    assert!(
        err.contains("rejected (conflict)") && err.contains("lineage_conflict"),
        "{err}"
    );

    // Bad requests: 4xx naming what is wrong, nothing recorded.
    let resolve = format!("/v1/lineages/{l}/conflict/resolve");
    let (status, doc) = post(&serve, &resolve, Some(json!({"keep": "host-c"}))).await?;
    assert_eq!(status, 400, "{doc}");
    assert!(
        error_message(&doc).starts_with("keep: host host-c"),
        "{doc}"
    );
    let (status, doc) = post(&serve, &resolve, Some(json!({"keep": "not a host!"}))).await?;
    assert_eq!(status, 400, "{doc}");
    assert!(error_message(&doc).contains("keep"), "{doc}");
    let (status, doc) = post(&serve, &resolve, Some(json!({"kept": "host-a"}))).await?;
    assert_eq!(status, 400, "{doc}");
    assert!(error_message(&doc).contains("kept"), "{doc}");
    let unknown = format!("/v1/lineages/{}/conflict/resolve", LineageId(id(999)));
    let (status, doc) = post(&serve, &unknown, Some(json!({"keep": "host-a"}))).await?;
    assert_eq!(status, 404, "{doc}");
    let accept = format!("/v1/lineages/{l}/fingerprint/accept");
    let (status, doc) = post(&serve, &accept, None).await?;
    assert_eq!(status, 409, "{doc}");
    assert!(error_message(&doc).contains("fingerprint_changed"), "{doc}");
    let (status, doc) = post(&serve, &accept, Some(json!({"fingerprint": "x"}))).await?;
    assert_eq!(status, 400, "{doc}");
    assert_eq!(active_alarms(&serve, &bus).await?.len(), 1);

    // Keep host-b's copy (the held-back one): it takes the lineage, host-a's is set aside.
    let (status, doc) = post(&serve, &resolve, Some(json!({"keep": "host-b"}))).await?;
    assert_eq!(status, 202, "{doc}");
    assert_eq!(doc["events"].as_array().map(Vec::len), Some(1), "{doc}");
    assert!(active_alarms(&serve, &bus).await?.is_empty());
    let (_, all) = serve.get("/v1/alarms?all=true").await?;
    let why = all["alarms"][0]["cleared"]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(why.contains("operator kept host host-b"), "{all}");
    let (_, lineage_doc) = serve.get(&format!("/v1/lineages/{l}")).await?;
    assert_eq!(
        lineage_doc["lineage"]["current_host"], "host-b",
        "{lineage_doc}"
    );
    assert_eq!(lineage_doc["lineage"]["held_back_device_id"], Value::Null);
    let (_, dev) = serve.get(&format!("/v1/devices/{}", id(2))).await?;
    assert_eq!(dev["device"]["status"], "available", "{dev}");
    assert_eq!(dev["device"]["blocked"], false, "{dev}");
    let (_, dev) = serve.get(&format!("/v1/devices/{}", id(1))).await?;
    assert_eq!(dev["device"]["status"], "invalidated", "{dev}");
    // A second resolve finds no conflict.
    let (status, doc) = post(&serve, &resolve, Some(json!({"keep": "host-b"}))).await?;
    assert_eq!(status, 409, "{doc}");

    // Schedulable again: a boot lands on host-b.
    let out = serve
        .cli_json(&["boot", "erp-1", "--flavor", "erp", "--json"])
        .await?;
    assert_eq!(out["outcome"], "accepted", "{out}");
    serve.wait_applied(bus.last_sequence().await?).await?;
    let (_, dev) = serve.get(&format!("/v1/devices/{}", id(2))).await?;
    assert_eq!(dev["device"]["status"], "claimed", "{dev}");

    // The key re-enumerates on host-b with other descriptors: fingerprint_changed.
    publish(&bus, 3, gone(2, "host-b")).await?;
    publish(&bus, 4, key_on(3, "host-b", 9, Some(2))).await?;
    let alarms = active_alarms(&serve, &bus).await?;
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    assert_eq!(alarms[0]["kind"], "fingerprint_changed");

    // Accepted from the CLI by the lineage's label; `--json` prints the command's reply.
    let (ok, _, err) = serve.cli(&["label", &l.to_string(), "ERP key"]).await?;
    assert!(ok, "{err}");
    usbpt_testkit::eventually(Duration::from_secs(20), || async {
        let (_, d) = serve.get(&format!("/v1/lineages/{l}")).await.ok()?;
        (d["lineage"]["label"] == "ERP key").then_some(())
    })
    .await?;
    let reply = serve
        .cli_json(&["fingerprint", "accept", "ERP key", "--json"])
        .await?;
    assert_eq!(reply["outcome"], "accepted", "{reply}");
    assert!(active_alarms(&serve, &bus).await?.is_empty());
    let (_, lineage_doc) = serve.get(&format!("/v1/lineages/{l}")).await?;
    let acc = &lineage_doc["lineage"]["fingerprint_accepted"];
    assert_eq!(
        acc["fingerprint"],
        Fingerprint([9; 32]).to_string(),
        "{lineage_doc}"
    );
    assert_eq!(acc["by_policy"], false);
    let cleared = lineage_doc["lineage"]["alarms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["kind"] == "fingerprint_changed")
        .cloned()
        .unwrap_or_default();
    assert_eq!(cleared["active"], false, "{lineage_doc}");
    assert!(
        cleared["cleared"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("accepted by operator"),
        "{cleared}"
    );

    // CLI errors are clear: no alarm left to accept, an unknown label, a bad host.
    let (ok, _, err) = serve.cli(&["fingerprint", "accept", "ERP key"]).await?;
    assert!(!ok);
    assert!(
        err.contains("rejected (conflict)") && err.contains("no active fingerprint_changed"),
        "{err}"
    );
    let (ok, _, err) = serve
        .cli(&["conflict", "resolve", "no such key", "--keep", "host-a"])
        .await?;
    assert!(!ok);
    assert!(err.contains("no lineage or label"), "{err}");
    let (ok, _, err) = serve
        .cli(&["conflict", "resolve", &l.to_string(), "--keep", "host-a"])
        .await?;
    assert!(!ok);
    assert!(err.contains("no active lineage_conflict"), "{err}");
    if err.is_empty() {
        bail!("no message");
    }
    Ok(())
}
