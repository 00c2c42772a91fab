//! The dashboard in a real browser: Debian's headless Chromium against a running `usbpt serve` on
//! a real nats-server. The page loads a populated view; then a hotplug published by an "agent"
//! (a `DeviceDiscovered` envelope on the bus) appears in the live feed and in the host's device
//! table without a reload; an unplug turns the row invalidated; a click opens the lineage
//! timeline. Strings from devices are shown as text, never parsed as HTML. Skips only when
//! Chromium is absent and `CI` is unset.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent_support;
#[path = "../schemas/tests/common/mod.rs"]
mod common;
mod dashboard_support;
mod projector_support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use projector_support::Serve;
use serde_json::{json, Value};
use usbpt_bus::Bus;
use usbpt_schemas::*;
use usbpt_testkit::TestNats;

const WAIT: Duration = Duration::from_secs(20);
const APP_JS: &str = include_str!("../api/assets/app.js");

fn host(s: &str) -> HostName {
    HostName::new(s).unwrap()
}

/// A device as an agent reports it.
struct Dev {
    host: &'static str,
    vp: (u16, u16),
    serial: Option<&'static str>,
    addr: (u16, u16),
    port: &'static str,
    maker: &'static str,
    product: &'static str,
}

impl Dev {
    fn lineage(&self) -> LineageId {
        let (vendor, product) = (VendorId(self.vp.0), ProductId(self.vp.1));
        let port: PortPath = self.port.parse().unwrap();
        let h = host(self.host);
        LineageId::derive(&match self.serial {
            Some(serial) => LineageKey::Serial {
                vendor,
                product,
                serial,
            },
            None => LineageKey::Port {
                host: &h,
                port: &port,
                vendor,
                product,
            },
        })
    }

    fn discovered(&self, boot: &str, supersedes: Option<DeviceId>) -> DeviceDiscovered {
        DeviceDiscovered {
            device_id: DeviceId::new_v7(),
            lineage_id: self.lineage(),
            lineage_kind: if self.serial.is_some() {
                LineageKind::Serial
            } else {
                LineageKind::Port
            },
            host: host(self.host),
            boot_id: boot.to_owned(),
            descriptors: UsbDescriptors {
                address: UsbAddress::new(self.addr.0, self.addr.1).unwrap(),
                port_path: self.port.parse().unwrap(),
                vendor_id: VendorId(self.vp.0),
                product_id: ProductId(self.vp.1),
                serial: self.serial.map(str::to_owned),
                device_class: 0,
                interface_classes: vec![3],
                manufacturer: Some(self.maker.to_owned()),
                product: Some(self.product.to_owned()),
                vendor_db: None,
                model_db: None,
                speed: Some("12".into()),
                usb_version: Some("2.00".into()),
            },
            syspath: format!("/sys/devices/pci0000:00/0000:00:14.0/usb1/{}", self.port),
            supersedes,
        }
    }
}

/// Publishes as an agent or the control plane would: a fresh envelope, now.
async fn publish(bus: &Bus, body: Event) -> Result<u64> {
    Ok(bus.publish(&Envelope::new(body)).await?.sequence)
}

async fn agent_started(bus: &Bus, name: &str, boot: &str) -> Result<u64> {
    publish(
        bus,
        Event::HostAgentStarted(HostAgentStarted {
            host: host(name),
            boot_id: boot.into(),
            agent_version: "0.1.0".into(),
            hypervisor_uri: "qemu:///system".into(),
        }),
    )
    .await
}

async fn post(serve: &Serve, path: &str, body: Value) -> Result<Value> {
    let resp = projector_support::http()
        .post(format!("{}{path}", serve.api))
        .json(&body)
        .send()
        .await?;
    let status = resp.status().as_u16();
    let doc: Value = resp.json().await?;
    // Nova's codes: 200 for a created flavor, 202 for a created server.
    if !matches!(status, 200 | 202) {
        bail!("POST {path} answered {status}: {doc}");
    }
    Ok(doc)
}

async fn server_doc(serve: &Serve, name: &str) -> Result<Value> {
    let (code, doc) = serve.get(&format!("/v2.1/servers/{name}")).await?;
    if code != 200 {
        bail!("GET server {name}: {code} {doc}");
    }
    Ok(doc["server"].clone())
}

struct Seeded {
    key_lineage: LineageId,
    evil: DeviceId,
}

/// Two hosts, six devices, three servers: one running with a key that re-enumerated when its host
/// rebooted, one holding a claim not yet attached, one that could not be placed; an unplugged
/// receiver; a device whose strings are HTML.
async fn seed(bus: &Bus, serve: &Serve) -> Result<Seeded> {
    let yubikey = Dev {
        host: "host-a",
        vp: (0x1050, 0x0407),
        serial: Some("16284291"),
        addr: (1, 4),
        port: "1-1.2",
        maker: "Yubico",
        product: "YubiKey OTP+FIDO+CCID",
    };
    let receiver = Dev {
        host: "host-a",
        vp: (0x046d, 0xc52b),
        serial: None,
        addr: (1, 7),
        port: "1-4",
        maker: "Logitech",
        product: "USB Receiver",
    };
    let token = Dev {
        host: "host-a",
        vp: (0x0529, 0x0620),
        serial: Some("0A1B2C3D"),
        addr: (1, 5),
        port: "1-1.3",
        maker: "SafeNet",
        product: "eToken 5110",
    };
    let mut key = Dev {
        host: "host-b",
        vp: (0x0529, 0x0001),
        serial: Some("HL-7731"),
        addr: (2, 3),
        port: "2-1.4",
        maker: "Thales",
        product: "Sentinel HL Max",
    };
    let mut ftdi = Dev {
        host: "host-b",
        vp: (0x0403, 0x6001),
        serial: Some("FT94X1QZ"),
        addr: (2, 5),
        port: "2-2",
        maker: "FTDI",
        product: "FT232R USB UART",
    };
    let evil = Dev {
        host: "host-b",
        vp: (0x1234, 0x5678),
        serial: None,
        addr: (2, 6),
        port: "2-3",
        maker: "<b>Evil & Co</b>",
        product: "<img src=x onerror=\"document.body.dataset.pwned='1'\">",
    };

    agent_started(bus, "host-a", "a1b2c3d4-boot-1").await?;
    agent_started(bus, "host-b", "b7e1f0c2-boot-1").await?;
    let mut ids = Vec::new();
    for d in [&yubikey, &receiver, &token] {
        let e = d.discovered("a1b2c3d4-boot-1", None);
        ids.push(e.device_id);
        publish(bus, Event::DeviceDiscovered(e)).await?;
    }
    let receiver_id = ids[1];
    let mut b_ids = Vec::new();
    for d in [&key, &ftdi, &evil] {
        let e = d.discovered("b7e1f0c2-boot-1", None);
        b_ids.push(e.device_id);
        publish(bus, Event::DeviceDiscovered(e)).await?;
    }
    let (key_id, ftdi_id, evil_id) = (b_ids[0], b_ids[1], b_ids[2]);
    // Wait until the command side can see the devices it will schedule.
    serve.wait_applied(bus.last_sequence().await?).await?;

    // The administrator's flavors and servers, through the command API.
    let usb = |v: &str, p: &str| json!([{"vendor_id": v, "product_id": p, "controller": "xhci"}]);
    for (name, devs) in [
        ("erp-key", usb("0529", "0001")),
        ("signing", usb("1050", "0407")),
        ("cuda-dongle", usb("10de", "2204")),
    ] {
        post(
            serve,
            "/v2.1/flavors",
            json!({"flavor": {"name": name, "usb_devices": devs}}),
        )
        .await?;
    }
    for (name, flavor) in [
        ("erp-1", "erp-key"),
        ("build-7", "signing"),
        ("render-1", "cuda-dongle"),
    ] {
        // A server that cannot be placed is accepted and recorded as a schedule failure, or
        // refused outright; either way the dashboard shows what the view holds.
        let _ = post(
            serve,
            "/v2.1/servers",
            json!({"server": {"name": name, "flavorRef": flavor}}),
        )
        .await;
    }
    serve.wait_applied(bus.last_sequence().await?).await?;
    let erp = server_doc(serve, "erp-1").await?;
    let erp_id: ServerId = erp["id"].as_str().context("erp-1 id")?.parse()?;
    assert_eq!(erp["host"], "host-b", "{erp}");

    // host-b's agent starts the domain with the key.
    publish(
        bus,
        Event::DeviceAttached(DeviceAttached {
            device_id: key_id,
            lineage_id: key.lineage(),
            host: host("host-b"),
            server_id: erp_id,
            address: UsbAddress::new(2, 3).unwrap(),
            method: AttachMethod::DomainDefinition,
            detail: String::new(),
        }),
    )
    .await?;
    publish(
        bus,
        Event::ServerStateChanged(ServerStateChanged {
            server_id: erp_id,
            host: Some(host("host-b")),
            state: ServerState::Active,
            reported_by_agent: true,
            detail: "domain started".into(),
        }),
    )
    .await?;

    // host-b reboots: its devices re-enumerate with new devnums; the server keeps its key.
    agent_started(bus, "host-b", "b7e1f0c2-boot-2").await?;
    for old in [key_id, ftdi_id] {
        let lineage = if old == key_id {
            key.lineage()
        } else {
            ftdi.lineage()
        };
        publish(
            bus,
            Event::DeviceInvalidated(DeviceInvalidated {
                device_id: old,
                lineage_id: lineage,
                host: host("host-b"),
                reason: InvalidationReason::HostRebooted,
                superseded_by: None,
            }),
        )
        .await?;
    }
    key.addr = (2, 8);
    ftdi.addr = (2, 9);
    let new_key = key.discovered("b7e1f0c2-boot-2", Some(key_id));
    let new_key_id = new_key.device_id;
    publish(bus, Event::DeviceDiscovered(new_key)).await?;
    publish(
        bus,
        Event::DeviceDiscovered(ftdi.discovered("b7e1f0c2-boot-2", Some(ftdi_id))),
    )
    .await?;
    publish(
        bus,
        Event::DeviceReattached(DeviceReattached {
            server_id: erp_id,
            host: host("host-b"),
            lineage_id: key.lineage(),
            old_device_id: key_id,
            new_device_id: new_key_id,
            address: UsbAddress::new(2, 8).unwrap(),
            method: AttachMethod::HotPlug,
            detail: String::new(),
        }),
    )
    .await?;
    // The receiver is pulled out of host-a.
    publish(
        bus,
        Event::DeviceInvalidated(DeviceInvalidated {
            device_id: receiver_id,
            lineage_id: receiver.lineage(),
            host: host("host-a"),
            reason: InvalidationReason::Unplugged,
            superseded_by: None,
        }),
    )
    .await?;
    serve.wait_applied(bus.last_sequence().await?).await?;

    let erp = server_doc(serve, "erp-1").await?;
    assert_eq!(erp["usb_devices"][0]["device_id"], new_key_id.to_string());
    assert_eq!(erp["usb_devices"][0]["status"], "attached", "{erp}");
    Ok(Seeded {
        key_lineage: key.lineage(),
        evil: evil_id,
    })
}

/// Where screenshots go: a temp dir, and also `$USBPT_DASHBOARD_SHOTS` when set.
fn keep_screenshot(dir: &std::path::Path, name: &str, png: &[u8]) -> Result<PathBuf> {
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{name} is not a PNG");
    assert!(
        png.len() > 20_000,
        "{name} is suspiciously small: {} bytes",
        png.len()
    );
    let path = dir.join(name);
    std::fs::write(&path, png)?;
    if let Some(extra) = std::env::var_os("USBPT_DASHBOARD_SHOTS") {
        std::fs::write(PathBuf::from(extra).join(name), png)?;
    }
    Ok(path)
}

#[test]
fn the_script_listens_for_every_event_kind() {
    // The feed drops a kind its `KINDS` list does not name (not merely one mentioned elsewhere
    // in the script: `LineageLabeled` had a summary but was missing from the list).
    let list = APP_JS
        .split_once("const KINDS = [")
        .and_then(|(_, rest)| rest.split_once("];"))
        .map(|(list, _)| list)
        .expect("app.js declares `const KINDS = [ … ];`");
    for body in common::sample_bodies() {
        let kind = body.kind();
        assert!(
            list.contains(&format!("'{kind}'")),
            "app.js's KINDS does not list {kind}: the feed would drop it"
        );
    }
}

/// The browser, or `None` (with a message) when it is absent outside CI; in CI it must exist.
fn chromium_or_skip(test: &str) -> Option<PathBuf> {
    let found = dashboard_support::locate();
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is required in CI (scripts/setup installs the Debian package `chromium`)"
        );
        eprintln!(
            "SKIPPED {test}: chromium not found (apt-get install chromium, or set \
             CHROMIUM=/path/to/chromium)"
        );
    }
    found
}

/// A fresh stack (nothing on the stream yet) says so; its first host appears live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_stack_shows_its_first_host_live() -> Result<()> {
    let Some(chromium) = chromium_or_skip("an_empty_stack_shows_its_first_host_live") else {
        return Ok(());
    };
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let data = tempfile::tempdir()?;
    let serve = Serve::start(&nats.url(), data.path()).await?;
    let browser = dashboard_support::Browser::launch(&chromium).await?;
    let page = browser.new_page(1200, 700).await?;
    page.goto(&format!(
        "{}/#token={}",
        serve.api,
        projector_support::API_TOKEN
    ))
    .await?;
    page.wait_for(
        "the empty state, live",
        "document.body.dataset.ready === 'true' && \
         document.getElementById('conn').dataset.state === 'live' && \
         document.getElementById('hosts').textContent.includes('No hosts yet') && \
         document.getElementById('servers').textContent.includes('No servers')",
        WAIT,
    )
    .await?;
    // The token left the address bar (and history) for this tab's sessionStorage.
    let kept = page
        .eval(
            "location.hash === '' && !location.href.includes('token') && \
             sessionStorage.getItem('usbpt-api-token')",
        )
        .await?;
    assert_eq!(kept, json!(projector_support::API_TOKEN), "{kept}");
    let seq = agent_started(&bus, "edge-1", "e1-boot-1").await?;
    page.wait_for(
        "the first host",
        &format!(
            "document.querySelector('article.host[data-host=\"edge-1\"]') && \
             document.querySelector('#feed li[data-kind=\"HostAgentStarted\"][data-seq=\"{seq}\"]')"
        ),
        WAIT,
    )
    .await?;
    let problems = browser.problems.lock().unwrap().clone();
    assert!(
        problems.is_empty(),
        "the page reported problems: {problems:#?}"
    );
    // A new tab without the token (sessionStorage is per tab): the page loads, its data does
    // not, and it says how to get in.
    let bare = browser.new_page(1200, 700).await?;
    bare.goto(&format!("{}/", serve.api)).await?;
    bare.wait_for(
        "the page asking for the token",
        "!document.getElementById('banner').hidden && \
         document.getElementById('banner').textContent.includes('401') && \
         document.getElementById('banner').textContent.includes('#token=') && \
         !document.getElementById('hosts').textContent.includes('edge-1')",
        WAIT,
    )
    .await?;
    browser.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotplug_after_load_appears_in_feed_and_table_without_reload() -> Result<()> {
    let Some(chromium) =
        chromium_or_skip("hotplug_after_load_appears_in_feed_and_table_without_reload")
    else {
        return Ok(());
    };
    let started = Instant::now();
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let data = tempfile::tempdir()?;
    let serve = Serve::start(&nats.url(), data.path()).await?;
    let seeded = seed(&bus, &serve).await?;

    // The page and its assets: right types, a strict policy, nothing inline.
    let http = projector_support::http();
    for (path, ty) in [
        ("/", "text/html"),
        ("/assets/app.js", "text/javascript"),
        ("/assets/app.css", "text/css"),
        ("/assets/favicon.svg", "image/svg+xml"),
    ] {
        let resp = http.get(format!("{}{path}", serve.api)).send().await?;
        assert_eq!(resp.status().as_u16(), 200, "{path}");
        let h = resp.headers();
        let ct = h["content-type"].to_str()?;
        assert!(ct.starts_with(ty), "{path}: content-type {ct}");
        let csp = h["content-security-policy"].to_str()?;
        assert!(
            csp.contains("script-src 'self'") && csp.contains("default-src 'none'"),
            "{path}: {csp}"
        );
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
        assert_eq!(h["x-content-type-options"], "nosniff");
    }
    let (code, err) = serve.get("/assets/nope.js").await?;
    assert_eq!((code, err["error"]["code"].as_u64()), (404, Some(404)));

    let browser = dashboard_support::Browser::launch(&chromium).await?;
    let page = browser.new_page(1440, 960).await?;
    page.goto(&format!(
        "{}/#token={}",
        serve.api,
        projector_support::API_TOKEN
    ))
    .await?;
    page.wait_for(
        "the tables and the live stream",
        "document.body.dataset.ready === 'true' && \
         document.getElementById('conn').dataset.state === 'live' && \
         document.querySelectorAll('#feed li').length >= 10",
        WAIT,
    )
    .await?;
    // A marker a reload would wipe.
    page.eval("window.__loadedOnce = 'yes'").await?;

    // What the page shows before the hotplug.
    let before = page
        .eval(
            r#"({
            hosts: [...document.querySelectorAll('article.host')].map(a => a.dataset.host),
            rows: document.querySelectorAll('article[data-host="host-a"] tr.device').length,
            devices: Number(document.querySelector('[data-stat="devices"] b').textContent),
            servers: [...document.querySelectorAll('tr.server')].map(r => r.dataset.status).sort(),
            failed: document.querySelector('#servers').textContent.includes('schedule failed'),
            holder: document.querySelector('article[data-host="host-b"] tr.device[data-status="attached"] .c-holder').textContent,
        })"#,
        )
        .await?;
    assert_eq!(before["hosts"], json!(["host-a", "host-b"]), "{before}");
    assert_eq!(before["rows"], 3, "{before}");
    assert_eq!(before["devices"], 6, "{before}");
    assert_eq!(before["holder"], "erp-1", "{before}");
    let servers = before["servers"].as_array().unwrap();
    assert!(servers.contains(&json!("ACTIVE")), "{before}");
    assert_eq!(servers.len(), 3, "{before}");
    assert_eq!(
        before["failed"], true,
        "render-1's schedule failure shows: {before}"
    );

    // Device strings are text: the HTML in them is shown, not run.
    let evil = page
        .eval(&format!(
            r#"(() => {{
                const row = document.querySelector('tr[data-device-id="{}"]');
                return {{
                    text: row.textContent,
                    elements: row.querySelectorAll('img, b').length,
                    pwned: document.body.dataset.pwned || null,
                }};
            }})()"#,
            seeded.evil
        ))
        .await?;
    assert!(
        evil["text"]
            .as_str()
            .unwrap()
            .contains("<img src=x onerror="),
        "{evil}"
    );
    assert!(evil["text"].as_str().unwrap().contains("<b>Evil & Co</b>"));
    assert_eq!(evil["elements"], 0, "{evil}");
    assert_eq!(evil["pwned"], Value::Null);

    let dir = tempfile::tempdir()?;
    let shot = keep_screenshot(
        dir.path(),
        "dashboard.png",
        &page.full_page_screenshot().await?,
    )?;

    // The hotplug, published by host-a's "agent" after the page loaded.
    let nitrokey = Dev {
        host: "host-a",
        vp: (0x20a0, 0x42b2),
        serial: Some("NK3-5521"),
        addr: (1, 9),
        port: "1-1.5",
        maker: "Nitrokey",
        product: "Nitrokey 3",
    };
    let plugged = nitrokey.discovered("a1b2c3d4-boot-1", None);
    let id = plugged.device_id;
    let t0 = Instant::now();
    let seq = publish(&bus, Event::DeviceDiscovered(plugged)).await?;
    page.wait_for(
        "the hotplug in the live feed",
        &format!(
            "document.querySelector('#feed li.fresh[data-kind=\"DeviceDiscovered\"][data-device-id=\"{id}\"][data-seq=\"{seq}\"]')"
        ),
        WAIT,
    )
    .await?;
    page.wait_for(
        "the hotplugged device in host-a's table",
        &format!(
            "document.querySelector('article[data-host=\"host-a\"] tr.device[data-device-id=\"{id}\"][data-status=\"available\"]')"
        ),
        WAIT,
    )
    .await?;
    let shown_after = t0.elapsed();
    let after = page
        .eval(&format!(
            r#"({{
            reloaded: window.__loadedOnce !== 'yes',
            row: document.querySelector('tr[data-device-id="{id}"]').textContent,
            feed: document.querySelector('#feed li[data-device-id="{id}"]').textContent,
            devices: Number(document.querySelector('[data-stat="devices"] b').textContent),
            rows: document.querySelectorAll('article[data-host="host-a"] tr.device').length,
        }})"#
        ))
        .await?;
    assert_eq!(after["reloaded"], false, "the page reloaded");
    let row = after["row"].as_str().unwrap();
    for want in [
        "Nitrokey 3",
        "20a0:42b2",
        "NK3-5521",
        "usb_1_9",
        "1-1.5",
        "available",
    ] {
        assert!(row.contains(want), "row lacks {want}: {row}");
    }
    let feed = after["feed"].as_str().unwrap();
    assert!(
        feed.contains("Nitrokey 3") && feed.contains("host-a") && feed.contains(&format!("#{seq}")),
        "{feed}"
    );
    assert_eq!(after["devices"], 7, "{after}");
    assert_eq!(after["rows"], 4, "{after}");

    // Unplugged again: the same row turns invalidated, still without a reload.
    publish(
        &bus,
        Event::DeviceInvalidated(DeviceInvalidated {
            device_id: id,
            lineage_id: nitrokey.lineage(),
            host: host("host-a"),
            reason: InvalidationReason::Unplugged,
            superseded_by: None,
        }),
    )
    .await?;
    page.wait_for(
        "the unplug in the table",
        &format!(
            "document.querySelector('tr.device[data-device-id=\"{id}\"][data-status=\"invalidated\"]') && \
             document.querySelector('#feed li[data-kind=\"DeviceInvalidated\"][data-device-id=\"{id}\"]')"
        ),
        WAIT,
    )
    .await?;

    // A click on the key opens its lineage: two enumerations, the reboot, the server that held it.
    let lineage = seeded.key_lineage;
    page.eval(&format!(
        "document.querySelector('article[data-host=\"host-b\"] tr.device[data-lineage-id=\"{lineage}\"]').click()"
    ))
    .await?;
    page.wait_for(
        "the lineage timeline",
        &format!(
            "!document.getElementById('lineage').hidden && \
             document.getElementById('lineage').dataset.lineageId === '{lineage}' && \
             document.querySelectorAll('#lineage-timeline li.tl').length === 2"
        ),
        WAIT,
    )
    .await?;
    let timeline = page
        .eval(
            r#"({
            items: [...document.querySelectorAll('#lineage-timeline li.tl')].map(li => li.textContent),
            facts: document.getElementById('lineage-facts').textContent,
            hash: location.hash,
        })"#,
        )
        .await?;
    let items: Vec<&str> = timeline["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    // Newest first: the current enumeration at its new address, then the one the reboot ended.
    assert!(
        items[0].contains("#2") && items[0].contains("usb_2_8") && items[0].contains("current"),
        "{items:?}"
    );
    assert!(
        items[1].contains("#1")
            && items[1].contains("usb_2_3")
            && items[1].contains("host rebooted"),
        "{items:?}"
    );
    assert!(items.iter().all(|i| i.contains("erp-1")), "{items:?}");
    assert!(timeline["facts"].as_str().unwrap().contains("erp-1"));
    // Its custody: one interval, erp-1's since its boot, across both enumerations, still held.
    let custody = page
        .eval(
            r#"[...document.querySelectorAll('#lineage-custody li')].map(li => ({
            text: li.textContent, started: li.dataset.started || null }))"#,
        )
        .await?;
    let custody = custody.as_array().unwrap();
    assert_eq!(custody.len(), 1, "{custody:?}");
    let only = custody[0]["text"].as_str().unwrap();
    assert_eq!(custody[0]["started"], "boot", "{custody:?}");
    assert!(
        only.contains("erp-1")
            && only.contains("host-b")
            && only.contains("holding")
            && only.contains("2 enumerations"),
        "{only}"
    );
    assert_eq!(
        timeline["hash"],
        format!("#lineage={lineage}"),
        "the drawer is linkable"
    );
    keep_screenshot(
        dir.path(),
        "dashboard-lineage.png",
        &page.screenshot().await?,
    )?;

    // Nothing rendered as a JavaScript artefact anywhere on the page.
    let text = page.eval("document.body.innerText").await?;
    let text = text.as_str().unwrap();
    for junk in ["[object", "undefined", "NaN", "null"] {
        assert!(!text.contains(junk), "the page shows {junk:?}:\n{text}");
    }

    // Closing the drawer, then asking for every enumeration: the two the reboot superseded show.
    page.eval("document.getElementById('lineage-close').click()")
        .await?;
    page.wait_for(
        "the drawer closed",
        "document.getElementById('lineage').hidden && location.hash === ''",
        WAIT,
    )
    .await?;

    // Where is it: the key found by its serial, at its current place, held by erp-1; a click on
    // the result opens its lineage. A serial nobody has says so.
    page.eval(
        "document.getElementById('find-key').value = 'serial'; \
         document.getElementById('find-text').value = 'HL-7731'; \
         document.getElementById('find').requestSubmit()",
    )
    .await?;
    page.wait_for(
        "the key found by its serial",
        &format!("document.querySelector('#find-results li.found[data-lineage-id=\"{lineage}\"]')"),
        WAIT,
    )
    .await?;
    let hit = page
        .eval("[...document.querySelectorAll('#find-results li')].map(li => li.textContent)")
        .await?;
    let hit = hit.as_array().unwrap();
    assert_eq!(hit.len(), 1, "{hit:?}");
    let hit = hit[0].as_str().unwrap();
    assert!(
        hit.contains("on host-b port 2-1.4")
            && hit.contains("held by erp-1")
            && hit.contains("HL-7731"),
        "{hit}"
    );
    page.eval(&format!(
        "document.querySelector('#find-results li.found[data-lineage-id=\"{lineage}\"]').click()"
    ))
    .await?;
    page.wait_for(
        "the lineage opened from the search",
        &format!("!document.getElementById('lineage').hidden && document.getElementById('lineage').dataset.lineageId === '{lineage}'"),
        WAIT,
    )
    .await?;
    page.eval("document.getElementById('lineage-close').click()")
        .await?;
    page.eval(
        "document.getElementById('find-text').value = 'NO-SUCH-SERIAL'; \
         document.getElementById('find').requestSubmit()",
    )
    .await?;
    page.wait_for(
        "the empty search result",
        "document.querySelector('#find-results li.empty') && \
         document.querySelector('#find-results li.empty').textContent.includes('NO-SUCH-SERIAL')",
        WAIT,
    )
    .await?;
    page.eval("document.getElementById('show-all').click()")
        .await?;
    page.wait_for(
        "the superseded enumerations",
        "document.querySelectorAll('article[data-host=\"host-b\"] tr.device.superseded').length === 2 && \
         document.querySelectorAll('article[data-host=\"host-b\"] tr.device').length === 5",
        WAIT,
    )
    .await?;

    let problems = browser.problems.lock().unwrap().clone();
    assert!(
        problems.is_empty(),
        "the page reported problems: {problems:#?}"
    );

    // The policy is in force: an injected inline script is refused, and the browser says so.
    let violated = page
        .eval(
            r#"new Promise((resolve) => {
                document.addEventListener('securitypolicyviolation',
                    (e) => resolve(e.effectiveDirective), { once: true });
                const s = document.createElement('script');
                s.textContent = 'window.__inline = 1';
                document.head.appendChild(s);
            }).then((d) => ({ directive: d, ran: window.__inline === 1 }))"#,
        )
        .await?;
    assert_eq!(
        violated,
        json!({"directive": "script-src-elem", "ran": false}),
        "inline script under the CSP"
    );
    browser.close().await?;
    eprintln!(
        "dashboard: hotplug shown in {shown_after:?} after publish; screenshot {} ; whole test {:?}",
        shot.display(),
        started.elapsed()
    );
    Ok(())
}

/// Bytes a terminal acts on, as `usbpt_schemas::text` defines them; a CLI's stdout must have
/// none but the newlines that end its own lines.
fn raw_controls(out: &str) -> Vec<char> {
    out.chars()
        .filter(|c| *c != '\n' && usbpt_schemas::text::is_dangerous(*c))
        .collect()
}

/// The hostile device of `agent/tests/fixtures/umockdev/hostile-strings.umockdev` (a hand-written
/// umockdev recording): its manufacturer clears the screen, homes the cursor, sets the terminal
/// title (OSC 0) and forges a line; its product is HTML that would run script or inject an
/// element, 361 bytes long; its serial is exactly 255 bytes with an ESC colour sequence and a
/// right-to-left override.
const HOSTILE_MANUFACTURER: &str = "Evil\x1b[2J\x1b[H\x1b]0;pwned-title\x07 Corp\nFORGED LINE ok";
const HOSTILE_PRODUCT_HEAD: &str = "<script>document.body.dataset.pwned='script'</script>\"><img src=x onerror=\"document.body.dataset.pwned='img'\"> ";

fn hostile_serial() -> String {
    format!("\x1b[31m\u{202e}{}", "S".repeat(255 - 5 - 3))
}

/// A real agent (under umockdev) reports the hostile device; the projector folds it; the API
/// returns its strings exactly (data stays data), the product cut to 255 bytes and marked; the
/// CLI prints them escaped with no raw control byte; the dashboard in Chromium shows them as
/// literal text, with no injected element and no script run.
#[test]
fn hostile_usb_strings_are_harmless_from_agent_to_cli_and_dashboard() {
    usbpt_testkit::umockdev::umockdev_test(
        "hostile_usb_strings_are_harmless_from_agent_to_cli_and_dashboard",
        || async {
            let tb = usbpt_testkit::umockdev::Testbed::new()?;
            tb.add_file(&agent_support::fixtures().join("hostile-strings.umockdev"))?;
            let nats = TestNats::start().await?;
            let data = tempfile::tempdir()?;
            let serve = Serve::start(&nats.url(), data.path()).await?;
            let home = agent_support::AgentHome::new("host-h", "hostile-boot-1")?;
            let agent = agent_support::AgentProcess::start(&home, &nats.url()).await?;

            // agent → NATS → projector → API: the exact strings, the long one cut and marked.
            let device = usbpt_testkit::eventually(WAIT, || async {
                let (code, doc) = serve.get("/v1/devices?host=host-h").await.ok()?;
                (code == 200).then_some(())?;
                doc["devices"]
                    .as_array()?
                    .iter()
                    .find(|d| d["vendor_id"] == "6666")
                    .cloned()
            })
            .await
            .context("the hostile device in the view")?;
            let id = device["id"].as_str().context("device id")?.to_owned();
            let (_, doc) = serve.get(&format!("/v1/devices/{id}")).await?;
            let d = &doc["device"];
            assert_eq!(d["manufacturer"], HOSTILE_MANUFACTURER, "{d}");
            assert_eq!(d["serial"], hostile_serial(), "{d}");
            let product = d["product"].as_str().context("product")?;
            assert!(product.starts_with(HOSTILE_PRODUCT_HEAD), "{product}");
            assert!(
                product.len() <= 255 && product.ends_with('…'),
                "{} bytes",
                product.len()
            );

            // → CLI: escaped, nothing raw, no forged line.
            let stored = nats.bus().await?.last_sequence().await?.to_string();
            for args in [
                vec!["devices", "--all"],
                vec!["device", "show", id.as_str()],
                vec!["device", "show", id.as_str(), "--json"],
                vec!["history", id.as_str()],
                vec!["events", "tail", "--from-start", "--limit", stored.as_str()],
                vec![
                    "events",
                    "tail",
                    "--from-start",
                    "--limit",
                    stored.as_str(),
                    "--json",
                ],
            ] {
                let (ok, out, err) = tokio::time::timeout(WAIT, serve.cli(&args))
                    .await
                    .with_context(|| format!("usbpt {args:?} did not finish"))??;
                assert!(ok, "usbpt {args:?}: {err}");
                let raw = raw_controls(&out);
                assert!(raw.is_empty(), "usbpt {args:?} printed raw {raw:?}:\n{out}");
                assert!(
                    !out.lines().any(|l| l.starts_with("FORGED")),
                    "usbpt {args:?} forged a line:\n{out}"
                );
                if args[0] == "device" && !args.contains(&"--json") {
                    assert!(
                        out.contains(
                            r"Evil\x1b[2J\x1b[H\x1b]0;pwned-title\x07 Corp\nFORGED LINE ok"
                        ),
                        "{out}"
                    );
                    assert!(out.contains(r"\x1b[31m\u{202e}SSSS"), "{out}");
                    assert!(out.contains("<script>document.body"), "{out}");
                    assert_eq!(
                        out.lines()
                            .filter(|l| l.starts_with("manufacturer"))
                            .count(),
                        1
                    );
                }
                if args.len() == 5 {
                    assert!(out.contains(r"\x1b[31m\u{202e}SSSS"), "events tail: {out}");
                }
                if args[0] == "device" && args.contains(&"--json") {
                    // Pretty JSON, still the exact strings once parsed.
                    let doc: Value = serde_json::from_str(&out)?;
                    assert_eq!(doc["device"]["serial"], hostile_serial());
                    assert_eq!(doc["device"]["manufacturer"], HOSTILE_MANUFACTURER);
                    assert!(out.contains(r"\u202e"), "{out}");
                }
                if args[0] == "events" && args.contains(&"--json") {
                    // Still JSON, still the same strings once parsed.
                    let found = out
                        .lines()
                        .map(serde_json::from_str::<Value>)
                        .collect::<Result<Vec<_>, _>>()?
                        .into_iter()
                        .any(|v| {
                            v["event"]["body"]["DeviceDiscovered"]["serial"] == hostile_serial()
                                || v.to_string().contains("pwned-title")
                        });
                    assert!(found, "{out}");
                }
            }

            // → dashboard in Chromium: literal text, nothing injected, nothing run.
            if let Some(chromium) =
                chromium_or_skip("hostile_usb_strings_are_harmless_from_agent_to_cli_and_dashboard")
            {
                let browser = dashboard_support::Browser::launch(&chromium).await?;
                let page = browser.new_page(1440, 960).await?;
                page.goto(&format!(
                    "{}/#token={}",
                    serve.api,
                    projector_support::API_TOKEN
                ))
                .await?;
                page.wait_for(
                    "the hostile device's row",
                    &format!(
                        "document.body.dataset.ready === 'true' && \
                         document.querySelector('tr[data-device-id=\"{id}\"]')"
                    ),
                    WAIT,
                )
                .await?;
                let seen = page
                    .eval(&format!(
                        r#"(() => {{
                            const row = document.querySelector('tr[data-device-id="{id}"]');
                            return {{
                                text: row.textContent,
                                // The page's own images (its logo) have a src of the page's.
                                imgs: [...document.images].filter(i => i.getAttribute('src') === 'x').length,
                                handlers: document.querySelectorAll('[onerror]').length,
                                scripts: [...document.scripts].map(s => s.src),
                                injected: row.querySelectorAll('script, img, b').length,
                                pwned: document.body.dataset.pwned || null,
                                title: document.title,
                            }};
                        }})()"#
                    ))
                    .await?;
                let text = seen["text"].as_str().unwrap_or_default();
                assert!(
                    text.contains("<script>document.body.dataset.pwned='script'</script>"),
                    "{seen}"
                );
                assert!(text.contains("\"><img src=x onerror="), "{seen}");
                assert_eq!(seen["imgs"], 0, "{seen}");
                assert_eq!(seen["injected"], 0, "{seen}");
                assert_eq!(seen["handlers"], 0, "{seen}");
                assert_eq!(seen["pwned"], Value::Null, "{seen}");
                let scripts = seen["scripts"].as_array().context("scripts")?;
                assert_eq!(scripts.len(), 1, "only app.js: {seen}");
                assert!(
                    !seen["title"].as_str().unwrap_or_default().contains("pwned"),
                    "{seen}"
                );
                let problems = browser.problems.lock().unwrap().clone();
                assert!(
                    problems.is_empty(),
                    "the page reported problems: {problems:#?}"
                );
                browser.close().await?;
            }
            agent.stop().await?;
            Ok(())
        },
    );
}

/// Licence key K1 as enumeration `dev` on `host`, with fingerprint `[fp; 32]`.
fn key_k1(dev: u128, host_name: &str, fp: u8, supersedes: Option<u128>) -> Event {
    let Event::DeviceDiscovered(mut d) = common::sample_bodies().remove(1) else {
        unreachable!()
    };
    d.device_id = DeviceId(uuid::Uuid::from_u128(
        0x0190_0000_0000_7000_8000_0000_0000_0000 | dev,
    ));
    d.host = host(host_name);
    d.descriptors.serial = Some("K1".into());
    d.supersedes = supersedes.map(|s| {
        DeviceId(uuid::Uuid::from_u128(
            0x0190_0000_0000_7000_8000_0000_0000_0000 | s,
        ))
    });
    d.lineage_kind = LineageKind::Serial;
    d.lineage_id = LineageId::derive(&LineageKey::Serial {
        vendor: d.descriptors.vendor_id,
        product: d.descriptors.product_id,
        serial: "K1",
    });
    Event::discovered(d, Some(Fingerprint([fp; 32])))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alarm_panel_keeps_a_host_and_accepts_a_fingerprint() -> Result<()> {
    let Some(chromium) = chromium_or_skip("the_alarm_panel_keeps_a_host_and_accepts_a_fingerprint")
    else {
        return Ok(());
    };
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let data = tempfile::tempdir()?;
    let serve = Serve::start(&nats.url(), data.path()).await?;
    publish(&bus, key_k1(1, "host-a", 7, None)).await?;
    let seq = publish(&bus, key_k1(2, "host-b", 7, None)).await?;
    serve.wait_applied(seq).await?;
    serve.commands_ready().await?;

    let browser = dashboard_support::Browser::launch(&chromium).await?;
    let page = browser.new_page(1200, 800).await?;
    page.goto(&format!(
        "{}/#token={}",
        serve.api,
        projector_support::API_TOKEN
    ))
    .await?;
    let keep_b = "#alarms li[data-kind=\"lineage_conflict\"] button[data-host=\"host-b\"]";
    page.wait_for(
        "the conflict with a button per host",
        &format!(
            "!document.getElementById('alarms-panel').hidden && \
             document.querySelector('{keep_b}') && \
             document.querySelector('#alarms button[data-host=\"host-a\"]')"
        ),
        WAIT,
    )
    .await?;
    // The operator confirms (the dialog is the browser's); the click sends the command with
    // the tab's token.
    page.eval(&format!(
        "window.confirm = () => true; document.querySelector('{keep_b}').click(); true"
    ))
    .await?;
    page.wait_for(
        "the conflict resolved and gone from the panel",
        "document.getElementById('alarms-panel').hidden && \
         document.querySelector('#feed li[data-kind=\"LineageConflictResolved\"]')",
        WAIT,
    )
    .await?;
    let (_, all) = serve.get("/v1/alarms?all=true").await?;
    assert!(
        all["alarms"][0]["cleared"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("operator kept host host-b"),
        "{all}"
    );

    // The key comes back on host-b with other descriptors: accept them from the panel.
    publish(
        &bus,
        Event::DeviceInvalidated(DeviceInvalidated {
            device_id: DeviceId(uuid::Uuid::from_u128(
                0x0190_0000_0000_7000_8000_0000_0000_0000 | 2,
            )),
            lineage_id: match key_k1(2, "host-b", 7, None) {
                Event::DeviceDiscoveredV2(d) => d.discovery.lineage_id,
                _ => unreachable!(),
            },
            host: host("host-b"),
            reason: InvalidationReason::Unplugged,
            superseded_by: None,
        }),
    )
    .await?;
    publish(&bus, key_k1(3, "host-b", 9, Some(2))).await?;
    let accept = "#alarms li[data-kind=\"fingerprint_changed\"] button[data-action=\"accept\"]";
    page.wait_for(
        "the changed fingerprint with its accept button",
        &format!("document.querySelector('{accept}')"),
        WAIT,
    )
    .await?;
    page.eval(&format!(
        "window.confirm = () => true; document.querySelector('{accept}').click(); true"
    ))
    .await?;
    page.wait_for(
        "the fingerprint accepted and the panel empty",
        "document.getElementById('alarms-panel').hidden && \
         document.querySelector('#feed li[data-kind=\"FingerprintAccepted\"]')",
        WAIT,
    )
    .await?;
    let (_, all) = serve.get("/v1/alarms?all=true").await?;
    let text = all.to_string();
    assert!(text.contains("accepted by operator"), "{all}");
    let problems = browser.problems.lock().unwrap().clone();
    assert!(
        problems.is_empty(),
        "the page reported problems: {problems:#?}"
    );
    browser.close().await?;
    Ok(())
}
