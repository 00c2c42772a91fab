//! Labels, `find` and the custody ledger end to end: a real nats-server, `usbpt serve` (its
//! projector, command handler and HTTP API) and the CLI. The history is published as the agents
//! and the command handler would have: a boot, a host reboot with re-attach, a delete.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../schemas/tests/common/mod.rs"]
mod common;
mod projector_support;

use std::time::Duration;

use anyhow::Result;
use projector_support::{http, Serve};
use serde_json::{json, Value};
use usbpt_bus::Bus;
use usbpt_schemas::*;
use usbpt_testkit::TestNats;
use uuid::Uuid;

fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | n)
}

const KEY: (u16, u16) = (0x136b, 0x0003);

fn key_lineage() -> LineageId {
    LineageId::derive(&LineageKey::Serial {
        vendor: VendorId(KEY.0),
        product: ProductId(KEY.1),
        serial: "K1",
    })
}

fn discovered(dev: u128, devnum: u16, supersedes: Option<u128>) -> Event {
    let Event::DeviceDiscovered(mut d) = common::sample_bodies().remove(1) else {
        unreachable!()
    };
    d.device_id = DeviceId(id(dev));
    d.lineage_kind = LineageKind::Serial;
    d.host = common::host("host-a");
    d.descriptors.vendor_id = VendorId(KEY.0);
    d.descriptors.product_id = ProductId(KEY.1);
    d.descriptors.serial = Some("K1".into());
    d.descriptors.address = UsbAddress::new(1, devnum).unwrap();
    d.descriptors.port_path = "1-1.2".parse().unwrap();
    d.supersedes = supersedes.map(|s| DeviceId(id(s)));
    d.lineage_id = key_lineage();
    Event::DeviceDiscovered(d)
}

async fn publish_story(bus: &Bus) -> Result<u64> {
    let server = ServerId(id(30));
    let flavor = FlavorId(id(20));
    let host = common::host("host-a");
    let lineage = key_lineage();
    let bodies = vec![
        discovered(11, 4, None),
        Event::FlavorCreated(FlavorCreated {
            flavor_id: flavor,
            name: FlavorName::new("erp").unwrap(),
            usb: vec![UsbRequest {
                selector: DeviceSelector::Lineage(lineage),
                controller: ControllerModel::Ehci,
                follow: FollowPolicy::Lineage,
            }],
        }),
        Event::ServerBootRequested(ServerBootRequested {
            server_id: server,
            name: ServerName::new("erp-1").unwrap(),
            flavor_id: flavor,
            requested_host: None,
        }),
        Event::DeviceClaimed(DeviceClaimed {
            device_id: DeviceId(id(11)),
            lineage_id: lineage,
            host: host.clone(),
            server_id: server,
            request_index: 0,
            controller: ControllerModel::Ehci,
            follow: FollowPolicy::Lineage,
        }),
        Event::ServerScheduled(ServerScheduled {
            server_id: server,
            host: host.clone(),
            flavor_id: flavor,
            devices: vec![AssignedDevice {
                request_index: 0,
                device_id: DeviceId(id(11)),
                lineage_id: lineage,
                controller: ControllerModel::Ehci,
                follow: FollowPolicy::Lineage,
            }],
        }),
        Event::DeviceAttached(DeviceAttached {
            device_id: DeviceId(id(11)),
            lineage_id: lineage,
            host: host.clone(),
            server_id: server,
            address: UsbAddress::new(1, 4).unwrap(),
            method: AttachMethod::DomainDefinition,
            detail: String::new(),
        }),
        Event::DeviceInvalidated(DeviceInvalidated {
            device_id: DeviceId(id(11)),
            lineage_id: lineage,
            host: host.clone(),
            reason: InvalidationReason::HostRebooted,
            superseded_by: None,
        }),
        discovered(12, 2, Some(11)),
        Event::DeviceReattached(DeviceReattached {
            server_id: server,
            host: host.clone(),
            lineage_id: lineage,
            old_device_id: DeviceId(id(11)),
            new_device_id: DeviceId(id(12)),
            address: UsbAddress::new(1, 2).unwrap(),
            method: AttachMethod::HotPlug,
            detail: String::new(),
        }),
        Event::ServerDeleted(ServerDeleted {
            server_id: server,
            host: Some(host.clone()),
        }),
        Event::DeviceReleased(DeviceReleased {
            device_id: DeviceId(id(12)),
            lineage_id: lineage,
            host: host.clone(),
            server_id: server,
            reason: ReleaseReason::ServerDeleted,
        }),
    ];
    let mut last = 0;
    for (i, body) in bodies.into_iter().enumerate() {
        let env = Envelope::at(
            EventId(id(9000 + i as u128)),
            Timestamp::from_micros(1_764_000_000_000_000 + i as i64 * 1_000_000),
            body,
        );
        last = bus.publish(&env).await?.sequence;
    }
    Ok(last)
}

async fn put_label(serve: &Serve, path: &str, body: Value) -> Result<(u16, Value)> {
    let resp = http()
        .put(format!("{}{path}", serve.api))
        .json(&body)
        .send()
        .await?;
    Ok((resp.status().as_u16(), resp.json().await?))
}

/// Waits (condition, not time) until the lineage's label is `want`.
async fn label_becomes(serve: &Serve, want: Option<&str>) -> Result<()> {
    let path = format!("/v1/lineages/{}", key_lineage());
    usbpt_testkit::eventually(Duration::from_secs(30), || async {
        let (_, doc) = serve.get(&path).await.ok()?;
        (doc["lineage"]["label"].as_str() == want).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_find_and_custody_through_the_cli_and_the_api() -> Result<()> {
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let data = tempfile::tempdir()?;
    let serve = Serve::start(&nats.url(), data.path()).await?;
    let last = publish_story(&bus).await?;
    serve.wait_applied(last).await?;
    serve.commands_ready().await?;
    let lineage = key_lineage().to_string();

    // Label over NATS from the CLI; shown in device lists and found by it.
    let (ok, out, err) = serve.cli(&["label", &lineage, "ERP key #3"]).await?;
    assert!(ok, "{err}");
    assert!(out.contains("labelled"), "{out}");
    label_becomes(&serve, Some("ERP key #3")).await?;
    let devices = serve.cli_json(&["devices", "--json"]).await?;
    assert_eq!(devices["devices"][0]["label"], "ERP key #3", "{devices}");
    let (ok, table, err) = serve.cli(&["devices"]).await?;
    assert!(ok && table.contains("ERP key #3"), "{table}{err}");

    // find by serial, by vendor/product and by label: the key, present, on host-a.
    for args in [
        vec!["find", "--serial", "K1", "--json"],
        vec!["find", "--vendor", "136b", "--product", "0003", "--json"],
        vec!["find", "--label", "erp KEY", "--json"],
    ] {
        let doc = serve.cli_json(&args).await?;
        let found = doc["devices"].as_array().unwrap();
        assert_eq!(found.len(), 1, "{args:?}: {doc}");
        assert_eq!(found[0]["host"], "host-a");
        assert_eq!(found[0]["present"], true);
        assert_eq!(found[0]["device_id"], DeviceId(id(12)).to_string());
        assert_eq!(found[0]["label"], "ERP key #3");
    }
    let none = serve
        .cli_json(&["find", "--serial", "K2", "--json"])
        .await?;
    assert_eq!(none["devices"], json!([]));

    // The custody ledger by label: one interval, boot to delete, across the reboot.
    let doc = serve.cli_json(&["custody", "ERP key #3", "--json"]).await?;
    let intervals = doc["intervals"].as_array().unwrap();
    assert_eq!(intervals.len(), 1, "{doc}");
    let i = &intervals[0];
    assert_eq!(
        (&i["server_name"], &i["started"], &i["ended"]),
        (&json!("erp-1"), &json!("boot"), &json!("ServerDeleted"))
    );
    let segments: Vec<&Value> = i["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| &g["device_id"])
        .collect();
    assert_eq!(
        segments,
        vec![
            &json!(DeviceId(id(11)).to_string()),
            &json!(DeviceId(id(12)).to_string())
        ]
    );
    let (ok, csv, err) = serve.cli(&["custody", &lineage, "--csv"]).await?;
    assert!(ok, "{err}");
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 3, "header and one row per enumeration: {csv}");
    assert!(
        rows[1].contains("ERP key #3") && rows[1].contains(",boot,"),
        "{csv}"
    );
    assert!(rows[2].contains("server_deleted"), "{csv}");
    // Renamed by its current label (LINEAGE may be the label it has), then back.
    let (ok, _, err) = serve.cli(&["label", "ERP key #3", "ERP key #4"]).await?;
    assert!(ok, "{err}");
    label_becomes(&serve, Some("ERP key #4")).await?;
    let (ok, _, err) = serve.cli(&["label", "no such label", "x"]).await?;
    assert!(!ok && err.contains("no such label"), "{err}");
    let (ok, _, err) = serve.cli(&["label", "ERP key #4", "ERP key #3"]).await?;
    assert!(ok, "{err}");
    label_becomes(&serve, Some("ERP key #3")).await?;
    // A window after the interval ended lists nothing.
    let later = serve
        .cli_json(&[
            "custody",
            &lineage,
            "--since",
            "2030-01-01T00:00:00Z",
            "--json",
        ])
        .await?;
    assert_eq!(later["intervals"], json!([]));

    // HTTP: bad labels are 400 naming the field, an unknown lineage 404, then removal.
    let path = format!("/v1/lineages/{lineage}/label");
    for bad in [
        json!({"label": "a\u{1b}[2Jb"}),
        json!({"label": "x".repeat(65)}),
    ] {
        let (status, doc) = put_label(&serve, &path, bad.clone()).await?;
        assert_eq!(status, 400, "{bad}: {doc}");
        assert!(
            doc["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("label: "),
            "{doc}"
        );
    }
    let (status, doc) = put_label(&serve, &path, json!({"lable": "x"})).await?;
    assert_eq!(status, 400, "{doc}");
    assert!(
        doc["error"]["message"].as_str().unwrap().contains("lable"),
        "{doc}"
    );
    let unknown = format!("/v1/lineages/{}/label", LineageId(id(999)));
    let (status, doc) = put_label(&serve, &unknown, json!({"label": "x"})).await?;
    assert_eq!(status, 404, "{doc}");
    let (status, doc) = put_label(&serve, &path, json!({"label": "Spare key"})).await?;
    assert_eq!(status, 202, "{doc}");
    label_becomes(&serve, Some("Spare key")).await?;
    let resp = http().delete(format!("{}{path}", serve.api)).send().await?;
    assert_eq!(resp.status().as_u16(), 202);
    label_becomes(&serve, None).await?;

    // find: 400s naming what is wrong.
    for (query, field) in [
        ("", "query:"),
        ("?fingerprint=ab12", "fingerprint:"),
        ("?vendor=zz", "vendor"),
        ("?colour=red", "colour"),
    ] {
        let (status, doc) = serve.get(&format!("/v1/find{query}")).await?;
        assert_eq!(status, 400, "{query}: {doc}");
        assert!(
            doc["error"]["message"].as_str().unwrap().contains(field),
            "{query}: {doc}"
        );
    }
    Ok(())
}
