//! `usbpt serve` and the query CLI against a real nats-server and a real redb view: the Nova
//! hypervisor document (golden), lineage history, live events over SSE, JSON errors, metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../schemas/tests/common/mod.rs"]
mod common;
mod projector_support;

use std::time::Duration;

use anyhow::Result;
use projector_support::Serve;
use serde_json::Value;
use usbpt_bus::Bus;
use usbpt_schemas::*;
use usbpt_testkit::TestNats;
use uuid::Uuid;

fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | n)
}

struct Story {
    n: u128,
}

impl Story {
    fn env(&mut self, body: Event) -> Envelope {
        self.n += 1;
        Envelope::at(
            EventId(id(9000 + self.n)),
            Timestamp::from_micros(1_764_000_000_000_000 + self.n as i64 * 1_000_000),
            body,
        )
    }
    async fn publish(&mut self, bus: &Bus, body: Event) -> Result<u64> {
        let env = self.env(body);
        Ok(bus.publish(&env).await?.sequence)
    }
}

#[allow(clippy::too_many_arguments)]
fn discovered(
    dev: u128,
    lineage: u128,
    host: &str,
    (vendor, product): (u16, u16),
    serial: Option<&str>,
    (bus, devnum): (u16, u16),
    port: &str,
    supersedes: Option<u128>,
) -> Event {
    let Event::DeviceDiscovered(mut d) = common::sample_bodies().remove(1) else {
        unreachable!()
    };
    d.device_id = DeviceId(id(dev));
    d.lineage_kind = if serial.is_some() {
        LineageKind::Serial
    } else {
        LineageKind::Port
    };
    d.host = common::host(host);
    d.descriptors.vendor_id = VendorId(vendor);
    d.descriptors.product_id = ProductId(product);
    d.descriptors.serial = serial.map(str::to_owned);
    d.descriptors.address = UsbAddress::new(bus, devnum).unwrap();
    d.descriptors.port_path = port.parse().unwrap();
    d.supersedes = supersedes.map(|s| DeviceId(id(s)));
    // The fold re-derives lineage ids from their keys (ADR 0005): derive it, and remember which
    // id the test's lineage number stands for.
    d.lineage_id = LineageId::derive(&match &d.descriptors.serial {
        Some(s) => LineageKey::Serial {
            vendor: d.descriptors.vendor_id,
            product: d.descriptors.product_id,
            serial: s,
        },
        None => LineageKey::Port {
            host: &d.host,
            port: &d.descriptors.port_path,
            vendor: d.descriptors.vendor_id,
            product: d.descriptors.product_id,
        },
    });
    LINEAGES.with(|m| {
        let previous = m.borrow_mut().insert(lineage, d.lineage_id);
        assert!(
            previous.is_none_or(|p| p == d.lineage_id),
            "lineage number {lineage} used for two keys"
        );
    });
    Event::DeviceDiscovered(d)
}

thread_local! {
    /// The test's lineage numbers and the derived ids they stand for.
    static LINEAGES: std::cell::RefCell<std::collections::HashMap<u128, LineageId>> =
        std::cell::RefCell::default();
}

/// The lineage the test calls `n` (derived when its first device was discovered).
fn lin(n: u128) -> LineageId {
    LINEAGES
        .with(|m| m.borrow().get(&n).copied())
        .unwrap_or(LineageId(id(n)))
}

fn invalidated(
    dev: u128,
    lineage: u128,
    host: &str,
    reason: InvalidationReason,
    by: Option<u128>,
) -> Event {
    Event::DeviceInvalidated(DeviceInvalidated {
        device_id: DeviceId(id(dev)),
        lineage_id: lin(lineage),
        host: common::host(host),
        reason,
        superseded_by: by.map(|b| DeviceId(id(b))),
    })
}

fn boot(server: u128, name: &str, flavor: u128) -> Event {
    Event::ServerBootRequested(ServerBootRequested {
        server_id: ServerId(id(server)),
        name: ServerName::new(name).unwrap(),
        flavor_id: FlavorId(id(flavor)),
        requested_host: None,
    })
}

fn claimed(dev: u128, lineage: u128, host: &str, server: u128) -> Event {
    Event::DeviceClaimed(DeviceClaimed {
        device_id: DeviceId(id(dev)),
        lineage_id: lin(lineage),
        host: common::host(host),
        server_id: ServerId(id(server)),
        request_index: 0,
        controller: ControllerModel::Xhci,
        follow: FollowPolicy::Lineage,
    })
}

fn attached(
    dev: u128,
    lineage: u128,
    host: &str,
    server: u128,
    (bus, devnum): (u16, u16),
) -> Event {
    Event::DeviceAttached(DeviceAttached {
        device_id: DeviceId(id(dev)),
        lineage_id: lin(lineage),
        host: common::host(host),
        server_id: ServerId(id(server)),
        address: UsbAddress::new(bus, devnum).unwrap(),
        method: AttachMethod::DomainDefinition,
        detail: String::new(),
    })
}

fn flavor(n: u128, name: &str) -> Event {
    Event::FlavorCreated(FlavorCreated {
        flavor_id: FlavorId(id(n)),
        name: FlavorName::new(name).unwrap(),
        usb: vec![UsbRequest {
            selector: DeviceSelector::Match {
                vendor_id: VendorId(0x136b),
                product_id: ProductId(0x0003),
                serial: None,
                count: 1,
            },
            controller: ControllerModel::Xhci,
            follow: FollowPolicy::Lineage,
        }],
    })
}

/// host-a with one device in each status (available, claimed, attached, invalidated), and a
/// device on host-b that must not show.
async fn each_status_story(bus: &Bus) -> Result<u64> {
    let mut s = Story { n: 0 };
    s.publish(
        bus,
        Event::HostAgentStarted(HostAgentStarted {
            host: common::host("host-a"),
            boot_id: "boot-a-1".into(),
            agent_version: "0.1.0".into(),
            hypervisor_uri: "qemu:///system".into(),
        }),
    )
    .await?;
    s.publish(
        bus,
        discovered(
            1,
            101,
            "host-a",
            (0x136b, 0x0003),
            Some("SN-A"),
            (2, 3),
            "2-1.4",
            None,
        ),
    )
    .await?;
    s.publish(
        bus,
        discovered(
            2,
            102,
            "host-a",
            (0x1050, 0x0407),
            None,
            (2, 4),
            "2-1.5",
            None,
        ),
    )
    .await?;
    s.publish(
        bus,
        discovered(
            3,
            103,
            "host-a",
            (0x04a9, 0x1909),
            Some("SN-C"),
            (1, 7),
            "1-2",
            None,
        ),
    )
    .await?;
    s.publish(
        bus,
        discovered(
            4,
            104,
            "host-a",
            (0x0781, 0x5567),
            Some("SN-D"),
            (1, 9),
            "1-3",
            None,
        ),
    )
    .await?;
    s.publish(
        bus,
        discovered(
            5,
            105,
            "host-b",
            (0x136b, 0x0003),
            Some("SN-E"),
            (3, 2),
            "3-1",
            None,
        ),
    )
    .await?;
    s.publish(bus, flavor(20, "erp")).await?;
    s.publish(bus, boot(30, "erp-1", 20)).await?;
    s.publish(bus, boot(31, "erp-2", 20)).await?;
    s.publish(bus, claimed(2, 102, "host-a", 30)).await?;
    s.publish(bus, claimed(3, 103, "host-a", 31)).await?;
    s.publish(bus, attached(3, 103, "host-a", 31, (1, 7)))
        .await?;
    s.publish(
        bus,
        invalidated(4, 104, "host-a", InvalidationReason::Unplugged, None),
    )
    .await
}

#[tokio::test]
async fn nova_hypervisor_document_matches_the_golden_file() -> Result<()> {
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let data = tempfile::tempdir()?;
    let serve = Serve::start(&nats.url(), data.path()).await?;
    let last = each_status_story(&bus).await?;
    serve.wait_applied(last).await?;

    // No agent beats here (the events are published directly): host-a's `state` is `down`
    // (ADR 0008); tests/openstack_cli.rs shows it `up` while its agent runs.
    let doc = serve
        .cli_json(&["hypervisor", "show", "host-a", "--json"])
        .await?;
    let golden_path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/hypervisor_host-a.json"
    );
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(golden_path, serde_json::to_string_pretty(&doc)? + "\n")?;
    }
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(golden_path)?)?;
    assert_eq!(doc, golden, "got:\n{}", serde_json::to_string_pretty(&doc)?);
    let statuses: Vec<&str> = doc["hypervisor"]["usb_device_stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["available", "claimed", "attached", "invalidated"]
    );

    // The v2 path with a tenant serves the same document; ids are strings.
    let (code, v2) = serve.get("/v2/some-tenant/os-hypervisors/host-a").await?;
    assert_eq!((code, &v2), (200, &doc));
    assert!(doc["hypervisor"]["usb_device_stats"][0]["id"].is_string());

    // Errors are JSON with the right status.
    let (code, err) = serve.get("/v2.1/os-hypervisors/host-z").await?;
    assert_eq!(code, 404);
    assert_eq!(err["error"]["code"], 404);
    assert!(err["error"]["message"].as_str().unwrap().contains("host-z"));
    let (code, err) = serve.get("/v2.1/os-hypervisors/a%2Eb").await?;
    assert_eq!(code, 400, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("a.b"));
    let (code, err) = serve.get("/v1/devices/not-a-uuid").await?;
    assert_eq!((code, err["error"]["code"].as_u64()), (400, Some(400)));
    let (code, err) = serve.get("/v1/nothing-here").await?;
    assert_eq!((code, err["error"]["code"].as_u64()), (404, Some(404)));

    // The CLI: filters, one JSON document, readable tables, one-line errors.
    let claimed = serve
        .cli_json(&[
            "devices", "--host", "host-a", "--status", "claimed", "--json",
        ])
        .await?;
    let list = claimed["devices"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], id(2).to_string());
    assert_eq!(list[0]["holder"], id(30).to_string());
    let (ok, table, _) = serve.cli(&["devices"]).await?;
    assert!(ok);
    assert_eq!(table.lines().count(), 1 + 5, "{table}");
    assert!(table.lines().next().unwrap().starts_with("DEVICE"));
    let (ok, out, err) = serve.cli(&["device", "show", &id(99).to_string()]).await?;
    assert!(!ok && out.is_empty());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("not found") && err.contains("404"), "{err}");
    let (ok, _, err) = serve.cli(&["devices", "--status", "lost"]).await?;
    assert!(!ok && err.contains("lost"), "{err}");

    let server = serve
        .cli_json(&["server", "show", "erp-2", "--json"])
        .await?;
    assert_eq!(
        server["server"]["usb_devices"].as_array().map(Vec::len),
        Some(0)
    );
    let flavors = serve.cli_json(&["flavor", "list", "--json"]).await?;
    assert_eq!(flavors["flavors"][0]["name"], "erp");
    let (ok, text, _) = serve.cli(&["flavor", "show", "erp"]).await?;
    assert!(
        ok && text.contains("136b:0003 x1 (xhci, lineage)"),
        "{text}"
    );

    // The readable forms are read from the typed documents (`usbpt_api::doc`); enums show as
    // their wire names.
    let (ok, text, err) = serve.cli(&["device", "show", &id(3).to_string()]).await?;
    assert!(ok, "{err}");
    assert!(
        text.contains(&format!(
            "attached       to {} at usb_1_7 (DomainDefinition, seq",
            id(31)
        )),
        "{text}"
    );
    assert!(text.contains("status         attached"), "{text}");
    let (ok, text, err) = serve.cli(&["device", "show", &id(4).to_string()]).await?;
    assert!(ok, "{err}");
    assert!(
        text.contains("(Unplugged), superseded by -"),
        "invalidation reason by its wire name: {text}"
    );
    let (ok, text, err) = serve.cli(&["hypervisor", "show", "host-a"]).await?;
    assert!(ok, "{err}");
    assert!(text.starts_with("hypervisor host-a "), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with(&id(3).to_string()) && l.contains("attached")),
        "{text}"
    );
    let (ok, text, err) = serve.cli(&["server", "list"]).await?;
    assert!(ok, "{err}");
    assert!(text.starts_with("NAME"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("erp-2 ")), "{text}");
    let (ok, text, err) = serve.cli(&["server", "show", "erp-2"]).await?;
    assert!(ok, "{err}");
    assert!(text.contains("name         erp-2"), "{text}");
    assert!(
        text.contains(&format!("flavor       erp ({})", id(20))),
        "{text}"
    );

    let metrics = serve.get_text("/metrics").await?;
    assert!(
        metrics.contains("usbpt_projector_events_applied_total{kind=\"DeviceDiscovered\"} 5"),
        "{metrics}"
    );
    assert!(metrics.contains(&format!("usbpt_projector_last_applied_sequence {last}")));
    assert!(metrics.contains("usbpt_projector_fold_batch_seconds_count"));
    assert!(metrics.contains("usbpt_projector_lag_events 0"));
    Ok(())
}

#[tokio::test]
async fn history_of_a_lineage_across_three_reenumerations_is_in_order() -> Result<()> {
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let data = tempfile::tempdir()?;
    let serve = Serve::start(&nats.url(), data.path()).await?;
    let mut s = Story { n: 100 };
    let key = (0x136b, 0x0003);
    s.publish(&bus, flavor(20, "erp")).await?;
    s.publish(&bus, boot(30, "erp-1", 20)).await?;
    s.publish(
        &bus,
        discovered(11, 201, "host-a", key, Some("K1"), (1, 4), "1-1.2", None),
    )
    .await?;
    s.publish(&bus, claimed(11, 201, "host-a", 30)).await?;
    s.publish(&bus, attached(11, 201, "host-a", 30, (1, 4)))
        .await?;
    // 1: reset in place.
    s.publish(
        &bus,
        invalidated(
            11,
            201,
            "host-a",
            InvalidationReason::Reenumerated,
            Some(12),
        ),
    )
    .await?;
    s.publish(
        &bus,
        discovered(
            12,
            201,
            "host-a",
            key,
            Some("K1"),
            (1, 5),
            "1-1.2",
            Some(11),
        ),
    )
    .await?;
    s.publish(
        &bus,
        Event::DeviceReattached(DeviceReattached {
            server_id: ServerId(id(30)),
            host: common::host("host-a"),
            lineage_id: lin(201),
            old_device_id: DeviceId(id(11)),
            new_device_id: DeviceId(id(12)),
            address: UsbAddress::new(1, 5).unwrap(),
            method: AttachMethod::HotPlug,
            detail: String::new(),
        }),
    )
    .await?;
    // 2: the host rebooted.
    s.publish(
        &bus,
        invalidated(12, 201, "host-a", InvalidationReason::HostRebooted, None),
    )
    .await?;
    s.publish(
        &bus,
        discovered(
            13,
            201,
            "host-a",
            key,
            Some("K1"),
            (1, 2),
            "1-1.2",
            Some(12),
        ),
    )
    .await?;
    // 3: unplugged and plugged into another port of another host (a serial lineage follows).
    s.publish(
        &bus,
        invalidated(13, 201, "host-a", InvalidationReason::Unplugged, None),
    )
    .await?;
    let last = s
        .publish(
            &bus,
            discovered(14, 201, "host-b", key, Some("K1"), (3, 8), "3-2", None),
        )
        .await?;
    serve.wait_applied(last).await?;

    let by_lineage = serve
        .cli_json(&["history", &lin(201).to_string(), "--json"])
        .await?;
    let by_device = serve
        .cli_json(&["history", &id(12).to_string(), "--json"])
        .await?;
    assert_eq!(by_lineage, by_device);
    let e = by_lineage["enumerations"].as_array().unwrap();
    let ids: Vec<String> = e
        .iter()
        .map(|x| x["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, [11, 12, 13, 14].map(|n| id(n).to_string()));
    let ordinals: Vec<u64> = e.iter().map(|x| x["ordinal"].as_u64().unwrap()).collect();
    assert_eq!(ordinals, [1, 2, 3, 4]);
    let reasons: Vec<Value> = e
        .iter()
        .map(|x| x["invalidation"]["reason"].clone())
        .collect();
    assert_eq!(
        reasons,
        [
            Value::from("Reenumerated"),
            Value::from("HostRebooted"),
            Value::from("Unplugged"),
            Value::Null
        ]
    );
    let addresses: Vec<&str> = e.iter().map(|x| x["address"].as_str().unwrap()).collect();
    assert_eq!(addresses, ["usb_1_4", "usb_1_5", "usb_1_2", "usb_3_8"]);
    let hosts: Vec<&str> = e.iter().map(|x| x["host"].as_str().unwrap()).collect();
    assert_eq!(hosts, ["host-a", "host-a", "host-a", "host-b"]);
    // Holders: the server held the first, the claim moved on to the second by re-attach, and
    // followed to the third and fourth (claimed, awaiting re-attach).
    assert_eq!(e[0]["holders"][0]["server_id"], id(30).to_string());
    assert!(e[0]["holders"][0]["ended"]["reason"]
        .as_str()
        .unwrap()
        .contains("moved"));
    assert_eq!(e[1]["holders"][0]["how"], "followed");
    assert!(
        e[1]["holders"][0]["attached"]["seq"].is_u64(),
        "re-attached"
    );
    assert_eq!(e[3]["status"], "claimed");
    assert_eq!(e[3]["holder"], id(30).to_string());
    assert_eq!(by_lineage["lineage"]["enumerations"], 4);
    assert_eq!(by_lineage["lineage"]["current_host"], "host-b");
    assert_eq!(by_lineage["claim"]["awaiting"], id(14).to_string());
    assert!(e
        .windows(2)
        .all(|w| w[0]["discovered"]["seq"].as_u64() < w[1]["discovered"]["seq"].as_u64()));

    let (ok, text, _) = serve.cli(&["history", &lin(201).to_string()]).await?;
    assert!(ok);
    let rows: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with('#'))
        .skip(1)
        .collect();
    assert_eq!(rows.len(), 4, "{text}");
    for (i, n) in [11, 12, 13, 14].iter().enumerate() {
        assert!(rows[i].starts_with(&format!("{}  ", i + 1)), "{text}");
        assert!(rows[i].contains(&id(*n).to_string()), "{text}");
    }
    Ok(())
}

/// Reads server-sent events from a response: (event, id, data) per message.
struct SseReader {
    resp: reqwest::Response,
    buf: String,
}

impl SseReader {
    async fn next(&mut self) -> Result<(String, Option<String>, String)> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut event, mut eid, mut data) = ("message".to_owned(), None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        eid = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() && eid.is_none() && event == "message" {
                    continue; // keep-alive comment
                }
                return Ok((event, eid, data));
            }
            let chunk = self
                .resp
                .chunk()
                .await?
                .ok_or_else(|| anyhow::anyhow!("event stream ended"))?;
            self.buf.push_str(std::str::from_utf8(&chunk)?);
        }
    }
}

#[tokio::test]
async fn sse_delivers_an_event_published_after_the_client_subscribed() -> Result<()> {
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let data = tempfile::tempdir()?;
    let serve = Serve::start(&nats.url(), data.path()).await?;
    let mut s = Story { n: 300 };
    let before = s.publish(&bus, flavor(20, "erp")).await?;

    let resp = projector_support::http()
        .get(format!("{}/v1/events", serve.api))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()?
        .starts_with("text/event-stream"));
    let mut sse = SseReader {
        resp,
        buf: String::new(),
    };
    let (event, _, data) = tokio::time::timeout(Duration::from_secs(10), sse.next()).await??;
    assert_eq!(event, "subscribed");
    let hello: Value = serde_json::from_str(&data)?;
    assert_eq!(hello["last_seq"], before);

    let seq = s.publish(&bus, boot(30, "erp-1", 20)).await?;
    let (event, eid, data) = tokio::time::timeout(Duration::from_secs(10), sse.next()).await??;
    assert_eq!(event, "ServerBootRequested");
    assert_eq!(eid, Some(seq.to_string()));
    let doc: Value = serde_json::from_str(&data)?;
    assert_eq!(doc["seq"], seq);
    assert_eq!(doc["subject"], subjects::name(&ServerName::new("erp-1")?));
    let env: Envelope = serde_json::from_value(doc["event"].clone())?;
    assert_eq!(env.body, boot(30, "erp-1", 20));

    // `?from=1` replays history first; `Last-Event-ID` resumes after an event.
    let resp = projector_support::http()
        .get(format!("{}/v1/events?from=1", serve.api))
        .send()
        .await?;
    let mut all = SseReader {
        resp,
        buf: String::new(),
    };
    assert_eq!(all.next().await?.0, "subscribed");
    assert_eq!(all.next().await?.1, Some(before.to_string()));
    let resp = projector_support::http()
        .get(format!("{}/v1/events", serve.api))
        .header("Last-Event-ID", before.to_string())
        .send()
        .await?;
    let mut resumed = SseReader {
        resp,
        buf: String::new(),
    };
    assert_eq!(resumed.next().await?.0, "subscribed");
    assert_eq!(resumed.next().await?.1, Some(seq.to_string()));
    Ok(())
}
